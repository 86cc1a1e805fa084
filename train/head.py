"""Phase 1: the head alone, fitted on pooled features of the frozen backbone (computed once)."""
from __future__ import annotations

import time

from . import tfenv  # noqa: F401
import tf_keras as keras

from .batching import class_weights
from .config import TrainConfig
from .evaluate import predict_keras
from .metrics import roc_auc


def train_head(cfg: TrainConfig, model: keras.Model, pixels, y, train_idx, val_idx, log) -> dict:
    """Fit the head on cached features (no augmentation); copy its weights into `model`."""
    features = keras.Model(model.input, model.get_layer("head_dropout").input)
    t0 = time.time()
    f_train = predict_keras(features, pixels, train_idx).reshape(len(train_idx), -1)
    f_val = predict_keras(features, pixels, val_idx).reshape(len(val_idx), -1)
    log(f"phase 1: features of {len(train_idx) + len(val_idx)} images in {time.time() - t0:.0f}s")
    head_in = keras.Input(f_train.shape[1:])
    head_out = keras.layers.Dense(1, activation="sigmoid")(keras.layers.Dropout(cfg.dropout)(head_in))
    head = keras.Model(head_in, head_out)
    head.compile(keras.optimizers.Adam(cfg.head_lr), "binary_crossentropy", metrics=[keras.metrics.AUC(name="auc")])
    w0, w1 = class_weights(y[train_idx], cfg.class_weighting)
    stop = keras.callbacks.EarlyStopping("val_auc", patience=5, mode="max", restore_best_weights=True)
    hist = head.fit(f_train, y[train_idx], batch_size=64, epochs=cfg.head_epochs, verbose=0,
                    validation_data=(f_val, y[val_idx]), class_weight={0: w0, 1: w1}, callbacks=[stop])
    model.get_layer("melanoma").set_weights(head.layers[-1].get_weights())
    auc = roc_auc(y[val_idx], head.predict(f_val, verbose=0).reshape(-1))
    log(f"phase 1: head val AUC {auc:.4f} after {len(hist.history['loss'])} epochs")
    return {"val_auc": auc, "epochs": len(hist.history["loss"])}
