"""Magnitude pruning with tensorflow-model-optimization (Keras 2 / tf_keras)."""
from __future__ import annotations

import tempfile
from pathlib import Path

import numpy as np

from train import tfenv  # noqa: F401
import tensorflow_model_optimization as tfmot
import tf_keras as keras

from train.backbones import block_index
from train.batching import batches
from train.optim import keras_objective
from train.model import backbone_layers

PRUNABLE = (keras.layers.Conv2D, keras.layers.Dense)  # DepthwiseConv2D is a Conv2D subclass: excluded below


def prunable(layer, backbone: str, first_block: int) -> bool:
    """Conv2D/Dense (not depthwise) in the fine-tuned top blocks, the top conv or the head.

    Frozen lower blocks are left dense: without training they could not recover from pruning.
    """
    if not isinstance(layer, PRUNABLE) or isinstance(layer, keras.layers.DepthwiseConv2D):
        return False
    b = block_index(layer.name, backbone)
    return (b is not None and b >= first_block) or b is None and not layer.name.startswith(("stem", "Conv1"))


def apply_pruning(model: keras.Model, backbone: str, first_block: int, sparsity: float,
                  begin_step: int, end_step: int) -> keras.Model:
    """Wrap the chosen layers with prune_low_magnitude through clone_model (the Rescaling layer
    of keras.applications models is refused by the model-level API)."""
    schedule = tfmot.sparsity.keras.PolynomialDecay(initial_sparsity=0.0, final_sparsity=sparsity,
                                                    begin_step=begin_step, end_step=end_step,
                                                    frequency=max(1, min(50, (end_step - begin_step) // 10)))

    def clone_fn(layer):
        fresh = layer.__class__.from_config(layer.get_config())  # never wrap the original: it would share weights
        if prunable(layer, backbone, first_block):
            return tfmot.sparsity.keras.prune_low_magnitude(fresh, pruning_schedule=schedule)
        return fresh

    pruned = keras.models.clone_model(model, clone_function=clone_fn)
    for src, dst in zip(model.layers, pruned.layers):  # clone_model does not copy weights
        target = dst.layer if hasattr(dst, "pruning_schedule") else dst
        target.set_weights(src.get_weights())
    for layer in pruned.layers:  # BatchNorm stays in inference mode
        if isinstance(layer, keras.layers.BatchNormalization):
            layer.trainable = False
    return pruned


def fine_tune_pruned(pruned: keras.Model, pixels, y: np.ndarray, train_idx: np.ndarray, epochs: int,
                     lr: float, batch: int, seed: int, weighting: str = "balanced", dx: np.ndarray | None = None) -> None:
    """The pruning fine-tune, on the training objective (multi-task when `dx` is given)."""
    loss, labels, weights = keras_objective(y, dx, train_idx, weighting)
    stream = batches(pixels, labels, train_idx, batch, np.random.default_rng(seed), weights, epochs=epochs)
    steps = (len(train_idx) // batch) * epochs
    pruned.compile(keras.optimizers.Adam(lr), loss)
    pruned.fit(stream, steps_per_epoch=steps, epochs=1, verbose=2,
               callbacks=[tfmot.sparsity.keras.UpdatePruningStep()])


def strip(pruned: keras.Model) -> keras.Model:
    return tfmot.sparsity.keras.strip_pruning(pruned)


def sparsity_report(model: keras.Model) -> list[dict]:
    """Fraction of exactly-zero weights in each Conv2D/Dense kernel."""
    out = []
    for layer in backbone_layers(model):
        if isinstance(layer, PRUNABLE) and layer.weights:
            k = layer.weights[0].numpy()
            out.append({"layer": layer.name, "weights": int(k.size), "sparsity": float(np.mean(k == 0))})
    return out


def keras_weight_bytes(model: keras.Model) -> bytes:
    """The model's weights file as bytes (its gzip size is what pruning shrinks)."""
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "w.h5"
        model.save_weights(str(path))
        return path.read_bytes()


__all__ = ["apply_pruning", "fine_tune_pruned", "strip", "sparsity_report", "keras_weight_bytes"]
