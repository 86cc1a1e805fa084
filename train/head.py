"""Phase 1: the head(s) alone, fitted on pooled features of the frozen backbone (computed once)."""
from __future__ import annotations

import time

import numpy as np

from . import tfenv  # noqa: F401
import tf_keras as keras

from .batching import class_weights, diagnosis_weights
from .config import TrainConfig
from .evaluate import predict_keras
from .metrics import roc_auc


def train_head(cfg: TrainConfig, model: keras.Model, pixels, y, train_idx, val_idx, log, dx=None) -> dict:
    """Fit the head on cached features (no augmentation); copy its weights into `model`. A
    multi-task model (a "diagnosis" layer) gets both heads, the diagnosis loss masked where the
    diagnosis is unknown (dx = -1)."""
    features = keras.Model(model.input, model.get_layer("head_dropout").input)
    t0 = time.time()
    f_train = predict_keras(features, pixels, train_idx, rule=None).reshape(len(train_idx), -1)
    f_val = predict_keras(features, pixels, val_idx, rule=None).reshape(len(val_idx), -1)
    log(f"phase 1: features of {len(train_idx) + len(val_idx)} images in {time.time() - t0:.0f}s")
    multitask = any(layer.name == "diagnosis" for layer in model.layers)
    head_in = keras.Input(f_train.shape[1:])
    x = keras.layers.Dropout(cfg.dropout)(head_in)
    mel = keras.layers.Dense(1, activation="sigmoid", name="melanoma")(x)
    w0, w1 = class_weights(y[train_idx], cfg.class_weighting)
    sample_w = {"melanoma": np.where(y[train_idx] > 0.5, w1, w0)}
    targets, val_targets = {"melanoma": y[train_idx]}, {"melanoma": y[val_idx]}
    outputs, losses = [mel], {"melanoma": "binary_crossentropy"}
    if multitask:
        k = model.get_layer("diagnosis").units
        outputs.append(keras.layers.Dense(k, activation="softmax", name="diagnosis")(x))
        losses["diagnosis"] = "sparse_categorical_crossentropy"
        dwt = diagnosis_weights(dx[train_idx], k, cfg.class_weighting)
        sample_w["diagnosis"] = np.where(dx[train_idx] >= 0, dwt[np.maximum(dx[train_idx], 0)], 0.0) * cfg.diagnosis_weight
        targets["diagnosis"], val_targets["diagnosis"] = np.maximum(dx[train_idx], 0), np.maximum(dx[val_idx], 0)
    head = keras.Model(head_in, outputs)
    head.compile(keras.optimizers.Adam(cfg.head_lr), losses,
                 metrics={"melanoma": [keras.metrics.AUC(name="auc")]})
    monitor = "val_melanoma_auc" if multitask else "val_auc"
    stop = keras.callbacks.EarlyStopping(monitor, patience=5, mode="max", restore_best_weights=True)
    hist = head.fit(f_train, targets if multitask else targets["melanoma"], batch_size=64, epochs=cfg.head_epochs,
                    verbose=0, validation_data=(f_val, val_targets if multitask else val_targets["melanoma"]),
                    sample_weight=sample_w if multitask else sample_w["melanoma"], callbacks=[stop])
    model.get_layer("melanoma").set_weights(head.get_layer("melanoma").get_weights())
    if multitask:
        model.get_layer("diagnosis").set_weights(head.get_layer("diagnosis").get_weights())
    out = head.predict(f_val, verbose=0)
    auc = roc_auc(y[val_idx], (out[0] if multitask else out).reshape(-1))
    log(f"phase 1: head val AUC {auc:.4f} (melanoma head) after {len(hist.history['loss'])} epochs")
    return {"val_auc": auc, "epochs": len(hist.history["loss"])}
