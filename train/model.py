"""The classifier (backbone -> dropout -> one sigmoid unit), augmentation and strategy choice."""
from __future__ import annotations

import json
import os

from . import tfenv  # noqa: F401
import tensorflow as tf
import tf_keras as keras

from .backbones import BackboneInfo, block_index, build_backbone


HEAD_LAYERS = ("melanoma", "diagnosis", "scores", "head_dropout")


def build_classifier(backbone: str, image_size: int = 224, dropout: float = 0.3,
                     weights: str | None = "imagenet", diagnoses: int = 0) -> tuple[keras.Model, BackboneInfo]:
    """0..255 RGB pixels -> scores. With `diagnoses` = 0: (N, 1) P(melanoma). Otherwise (N, 1 +
    diagnoses): column 0 the melanoma head's sigmoid, then the diagnosis head's softmax over
    train.data.DIAGNOSES (multi-task: two linear heads on one pooled embedding). Activations are
    inside, so exports output probabilities."""
    base, info = build_backbone(backbone, (image_size, image_size, 3),
                                weights=None if weights in (None, "none") else weights)
    x = keras.layers.Dropout(dropout, name="head_dropout")(base.output)
    out = keras.layers.Dense(1, activation="sigmoid", name="melanoma")(x)
    if diagnoses:
        dx = keras.layers.Dense(diagnoses, activation="softmax", name="diagnosis")(x)
        out = keras.layers.Concatenate(name="scores")([out, dx])
    return keras.Model(base.input, out, name=f"{backbone}_melanoma"), info


def backbone_layers(model: keras.Model):
    """All layers of the backbone; flattens a nested base model (MobileNetV2 runs saved before it was built flat)."""
    for layer in model.layers:
        if isinstance(layer, keras.Model):
            yield from layer.layers
        else:
            yield layer


def set_trainable(model: keras.Model, backbone: str, top_blocks: int, num_blocks: int) -> int:
    """Train the head plus the last `top_blocks` blocks (and the final conv); BatchNorm stays
    frozen, which in Keras 2 also runs it in inference mode. Returns trainable weight count."""
    first = num_blocks - top_blocks
    for layer in model.layers:
        if isinstance(layer, keras.Model):
            layer.trainable = True
    for layer in backbone_layers(model):
        if layer.name in HEAD_LAYERS:
            layer.trainable = True
            continue
        if isinstance(layer, keras.layers.BatchNormalization) or not layer.weights:
            layer.trainable = False
            continue
        b = block_index(layer.name, backbone)
        is_top_conv = b is None and layer.name.startswith(("head", "Conv_1", "Conv_2", "conv_1", "Conv_1_bn"))
        layer.trainable = top_blocks > 0 and ((b is not None and b >= first) or is_top_conv)
    return sum(int(tf.size(w)) for w in model.trainable_weights)


def freeze_backbone(model: keras.Model) -> None:
    for layer in backbone_layers(model):
        layer.trainable = layer.name in HEAD_LAYERS


def augment(images: tf.Tensor, g: tf.random.Generator) -> tf.Tensor:
    """Dermoscopy augmentation on a uint8/float batch (B, H, W, 3), values 0..255.

    Lesions have no canonical orientation: flips and 90-degree rotations are exact; random
    resized crops (70-100 % area) vary scale; brightness/contrast/hue jitter covers devices.
    """
    x = tf.cast(images, tf.float32)
    b, h, w = tf.shape(x)[0], tf.shape(x)[1], tf.shape(x)[2]
    x = tf.where(g.uniform([b, 1, 1, 1]) < 0.5, tf.reverse(x, [2]), x)
    x = tf.where(g.uniform([b, 1, 1, 1]) < 0.5, tf.reverse(x, [1]), x)
    x = tf.where(g.uniform([b, 1, 1, 1]) < 0.5, tf.transpose(x, [0, 2, 1, 3]), x)  # with flips: all 8 rot/flips
    scale = tf.sqrt(g.uniform([b], 0.7, 1.0))
    aspect = tf.exp(g.uniform([b], -0.2, 0.2))
    hh, ww = tf.clip_by_value(scale * aspect, 0.5, 1.0), tf.clip_by_value(scale / aspect, 0.5, 1.0)
    y0, x0 = g.uniform([b]) * (1 - hh), g.uniform([b]) * (1 - ww)
    boxes = tf.stack([y0, x0, y0 + hh, x0 + ww], axis=1)
    x = tf.image.crop_and_resize(x, boxes, tf.range(b), tf.stack([h, w]))
    x = x * g.uniform([b, 1, 1, 1], 0.8, 1.2) + g.uniform([b, 1, 1, 1], -20.0, 20.0)  # contrast-ish, brightness
    mean = tf.reduce_mean(x, axis=[1, 2, 3], keepdims=True)
    x = (x - mean) * g.uniform([b, 1, 1, 1], 0.85, 1.15) + mean  # contrast
    x = tf.image.adjust_hue(tf.clip_by_value(x, 0, 255) / 255.0, g.uniform([], -0.03, 0.03)) * 255.0
    return tf.clip_by_value(x, 0.0, 255.0)


def select_strategy(tf_config: str | None = None, gpus: int | None = None) -> tf.distribute.Strategy:
    """MultiWorkerMirrored when TF_CONFIG names a cluster, Mirrored for several GPUs, else default."""
    name = strategy_name(tf_config if tf_config is not None else os.environ.get("TF_CONFIG"),
                         gpus if gpus is not None else len(tf.config.list_physical_devices("GPU")))
    if name == "multi_worker_mirrored":
        return tf.distribute.MultiWorkerMirroredStrategy()
    if name == "mirrored":
        return tf.distribute.MirroredStrategy()
    return tf.distribute.get_strategy()


def strategy_name(tf_config: str | None, gpus: int) -> str:
    """The selection rule, as a pure function (tested without a cluster)."""
    if tf_config:
        cluster = json.loads(tf_config).get("cluster", {})
        if sum(len(v) for v in cluster.values()) > 1:
            return "multi_worker_mirrored"
    if gpus > 1:
        return "mirrored"
    return "default"
