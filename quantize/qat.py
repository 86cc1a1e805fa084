"""Quantization-aware training (tfmot) for backbones whose layers it supports.

tfmot refuses the Rescaling layer, so every layer but Rescaling is annotated through
clone_model and quantize_apply inserts the fake-quant ops; the converter then calibrates
the remaining (input) range from the representative data. MobileNetV3 (hard-swish
TFOpLambda) is not supported: it gets post-training int8 instead.
"""
from __future__ import annotations

import numpy as np

from train import tfenv  # noqa: F401
import tensorflow_model_optimization as tfmot
import tf_keras as keras

from train.loop import class_weights, weighted_batches

SKIP = (keras.layers.Rescaling, keras.layers.InputLayer)


def annotate(model: keras.Model) -> keras.Model:
    ann = tfmot.quantization.keras.quantize_annotate_layer

    def clone_fn(layer):
        fresh = layer.__class__.from_config(layer.get_config())
        return fresh if isinstance(layer, SKIP) else ann(fresh)

    annotated = keras.models.clone_model(model, clone_function=clone_fn)
    annotated.set_weights(model.get_weights())
    return annotated


def quantize_aware(model: keras.Model, pixels, y: np.ndarray, train_idx: np.ndarray, images: int, lr: float,
                   batch: int, seed: int, weighting: str = "balanced") -> keras.Model:
    """QAT fine-tune on `images` training-split images (BatchNorm stays frozen)."""
    with tfmot.quantization.keras.quantize_scope():
        q = tfmot.quantization.keras.quantize_apply(annotate(model))
    rng = np.random.default_rng(seed)
    pick = rng.permutation(train_idx)[:images]
    batches = weighted_batches(pixels, y, pick, batch, rng, class_weights(y[train_idx], weighting), shuffle=False)
    q.compile(keras.optimizers.Adam(lr), "binary_crossentropy")
    q.fit(batches, steps_per_epoch=len(pick) // batch, epochs=1, verbose=2)
    return q
