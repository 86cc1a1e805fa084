"""Quantization-aware training (tfmot) for backbones whose layers it supports.

tfmot refuses the Rescaling layer, so every layer but Rescaling is annotated through
clone_model and quantize_apply inserts the fake-quant ops; the converter then calibrates
the remaining (input) range from the representative data. MobileNetV3 (hard-swish
TFOpLambda) is not supported: it gets post-training int8 instead.

tfmot starts every activation range at [-6, 6] and moves it with a fixed EMA decay of
0.999, so a short QAT fine-tune barely moves it: Add outputs beyond +-6 get clipped and
the exported int8 model collapses (measured: test AUC 0.739 against 0.895 float). The
ranges are therefore calibrated first, as a running mean of per-batch min/max over
training images, before the fine-tune refines them.
"""
from __future__ import annotations

import contextlib

import numpy as np

from train import tfenv  # noqa: F401
import tensorflow as tf
import tensorflow_model_optimization as tfmot
import tf_keras as keras
from tensorflow_model_optimization.python.core.quantization.keras import quant_ops

from train.batching import batches
from train.optim import keras_objective
from train.model import augment

SKIP = (keras.layers.Rescaling, keras.layers.InputLayer)


def annotate(model: keras.Model) -> keras.Model:
    ann = tfmot.quantization.keras.quantize_annotate_layer

    def clone_fn(layer):
        fresh = layer.__class__.from_config(layer.get_config())
        return fresh if isinstance(layer, SKIP) else ann(fresh)

    annotated = keras.models.clone_model(model, clone_function=clone_fn)
    annotated.set_weights(model.get_weights())
    return annotated


def fake_quant_model(model: keras.Model) -> keras.Model:
    """The model with tfmot's fake-quant ops on every layer but Rescaling (ranges not yet calibrated)."""
    with tfmot.quantization.keras.quantize_scope():
        return tfmot.quantization.keras.quantize_apply(annotate(model))


@contextlib.contextmanager
def ema_decay_override(decay: list[float]):
    """Make tfmot's MovingAvgQuantize use decay[0] (mutable, read at each eager call)."""
    original = quant_ops.MovingAvgQuantize

    def patched(*args, **kwargs):
        kwargs["ema_decay"] = decay[0]
        return original(*args, **kwargs)

    quant_ops.MovingAvgQuantize = patched
    try:
        yield
    finally:
        quant_ops.MovingAvgQuantize = original


def range_variables(model: keras.Model) -> dict[str, np.ndarray]:
    """The fake-quant range variables (name -> value) of a quantize_apply'd model."""
    return {v.name: v.numpy() for v in model.non_trainable_variables if v.name.endswith(("_min:0", "_max:0"))}


def calibrate_ranges(q: keras.Model, stream) -> int:
    """Set every moving-average range to the mean of per-batch min/max over the `stream` of batches.

    Runs the model eagerly in training mode (BatchNorm stays in inference mode: its layers
    are frozen) with decay k/(k+1) at step k, i.e. an exact running mean. Returns the step count.
    """
    decay = [0.0]
    steps = 0
    with ema_decay_override(decay):
        for x in stream:
            decay[0] = steps / (steps + 1)
            q(x, training=True)
            steps += 1
    return steps


def quantize_aware(model: keras.Model, pixels, y: np.ndarray, train_idx: np.ndarray, images: int, lr: float,
                   batch: int, seed: int, weighting: str = "balanced", calibration: int = 512,
                   epochs: int = 1, dx: np.ndarray | None = None) -> tuple[keras.Model, dict]:
    """Range calibration on `calibration` images, then a QAT fine-tune on `images` augmented
    training-split images for `epochs` (BatchNorm stays frozen). Returns the QAT model and what was done."""
    q = fake_quant_model(model)
    rng = np.random.default_rng(seed)
    cal = np.sort(rng.choice(train_idx, size=min(calibration, len(train_idx)), replace=False))
    steps = calibrate_ranges(q, (x for x, _, _ in batches(pixels, y, cal, batch, rng, shuffle=False, drop_last=False)))
    pick = rng.permutation(train_idx)[:images]
    batch = min(batch, len(pick))
    g = tf.random.Generator.from_seed(seed)
    loss, labels, weights = keras_objective(y, dx, train_idx, weighting)  # the training objective (multi-task too)
    stream = ((augment(x, g), yb, wb) for x, yb, wb in  # the training run's augmentation: no drift to un-augmented data
              batches(pixels, labels, pick, batch, rng, weights, epochs=epochs))
    q.compile(keras.optimizers.Adam(lr), loss)
    q.fit(stream, steps_per_epoch=len(pick) // batch, epochs=epochs, verbose=2)
    return q, {"qat_images": len(pick), "qat_lr": lr, "qat_epochs": epochs,
               "range_calibration_images": len(cal), "range_calibration_steps": steps}
