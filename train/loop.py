"""The training run: data -> phase 1 (head on cached features) -> phase 2 (top blocks, EMA)
-> threshold on validation -> evaluation on test. Everything lands in one run folder."""
from __future__ import annotations

import csv
import json
import math
import random
import time
from pathlib import Path

import numpy as np
import pandas as pd

from . import tfenv  # noqa: F401
import tensorflow as tf
import tf_keras as keras
from tqdm import tqdm

from edge.preprocess import PreprocessSpec
from . import data as D
from .config import TrainConfig
from .evaluate import choose_threshold, full_report, predict_keras, save_plots, summary_line
from .metrics import roc_auc
from .model import augment, build_classifier, freeze_backbone, select_strategy, set_trainable

HISTORY_FIELDS = ["phase", "epoch", "lr", "train_loss", "val_auc", "val_auc_ema", "seconds"]


# --------------------------------------------------------------------------- helpers
def set_seeds(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    tf.random.set_seed(seed)
    keras.utils.set_random_seed(seed)


def preprocess_spec(cfg: TrainConfig) -> PreprocessSpec:
    return PreprocessSpec(size=(cfg.image_size, cfg.image_size), resize=cfg.resize)


def prepare_data(cfg: TrainConfig, log=print) -> tuple[pd.DataFrame, np.ndarray, list[dict], pd.DataFrame]:
    """Read sources, report bad rows, split by group, build/reuse the pixel cache."""
    ds = D.apply_policy(D.load_sources(cfg.data, cfg.layout), cfg.on_bad, log)
    rows = ds.rows
    if cfg.limit:
        rows = rows.sample(n=min(cfg.limit, len(rows)), random_state=cfg.seed).sort_index()
    rows = rows.reset_index(drop=True)
    bar = tqdm(total=len(rows), desc="decode", mininterval=10, unit="img")
    pixels, bad = D.build_pixel_cache(rows, preprocess_spec(cfg), Path(cfg.cache_dir), cfg.workers,
                                      progress=lambda n, total: bar.update(n - bar.n))
    bar.close()
    if len(bad):
        D.apply_policy(D.Dataset(rows, bad, []), cfg.on_bad, log)
        rows = rows[~rows["image"].isin(set(bad["image"]))]
    rows = rows.assign(split=D.make_splits(rows, cfg.val_fraction, cfg.test_fraction, cfg.seed, cfg.honour_split))
    return rows, pixels, ds.provenance, pd.concat([ds.problems, bad], ignore_index=True)


def load_run_data(run_dir: Path) -> tuple[pd.DataFrame, np.ndarray, TrainConfig]:
    """The run's rows (with its saved split) and pixel cache, for evaluation and export."""
    run_dir = Path(run_dir)
    cfg = TrainConfig.from_json(run_dir / "config.json")
    splits = pd.read_csv(run_dir / "splits.csv", dtype={"image": str})
    ds = D.load_sources(cfg.data, cfg.layout)
    rows = ds.rows.copy()
    if cfg.limit:
        rows = rows.sample(n=min(cfg.limit, len(rows)), random_state=cfg.seed).sort_index()
    rows = rows.reset_index(drop=True)
    pixels, _ = D.build_pixel_cache(rows, preprocess_spec(cfg), Path(cfg.cache_dir), cfg.workers)
    split = dict(zip(splits["image"], splits["split"]))
    rows["split"] = rows["image"].map(split)
    return rows[rows["split"].notna()], pixels, cfg


def load_keras_model(path: Path) -> keras.Model:
    return keras.models.load_model(path, compile=False)


class WarmupCosine(keras.optimizers.schedules.LearningRateSchedule):
    """Linear warm-up to `peak`, then cosine decay to zero at `total` steps."""

    def __init__(self, peak: float, warmup: int, total: int):
        self.peak, self.warmup, self.total = peak, max(1, warmup), max(1, total)

    def __call__(self, step):
        step = tf.cast(step, tf.float32)
        warm = self.peak * (step + 1) / self.warmup
        progress = tf.clip_by_value((step - self.warmup) / max(1, self.total - self.warmup), 0.0, 1.0)
        cos = 0.5 * self.peak * (1 + tf.cos(math.pi * progress))
        return tf.where(step < self.warmup, warm, cos)

    def get_config(self):
        return {"peak": self.peak, "warmup": self.warmup, "total": self.total}


def class_weights(y: np.ndarray, mode: str) -> tuple[float, float]:
    """(weight of class 0, weight of class 1); "balanced" gives each class equal total weight."""
    if mode == "none":
        return 1.0, 1.0
    n, pos = len(y), max(1, int(y.sum()))
    return n / (2 * (n - pos)), n / (2 * pos)


def batches(idx: np.ndarray, size: int, rng: np.random.Generator, shuffle: bool):
    order = rng.permutation(idx) if shuffle else idx
    for s in range(0, len(order), size):
        yield order[s:s + size]


def weighted_batches(pixels, y: np.ndarray, idx: np.ndarray, batch: int, rng: np.random.Generator,
                     weights: tuple[float, float], epochs: int = 1, shuffle: bool = True):
    """Full batches of (float32 pixels, labels, per-image class weights) for Keras `fit`."""
    w0, w1 = weights
    for _ in range(epochs):
        order = rng.permutation(idx) if shuffle else idx
        for s in range(0, len(order) - batch + 1, batch):
            b = np.sort(order[s:s + batch])
            yield np.asarray(pixels[b], np.float32), y[b], np.where(y[b] > 0.5, w1, w0).astype(np.float32)


def append_history(path: Path, row: dict) -> None:
    new = not path.exists()
    with open(path, "a", newline="") as f:
        w = csv.DictWriter(f, fieldnames=HISTORY_FIELDS)
        if new:
            w.writeheader()
        w.writerow({k: row.get(k, "") for k in HISTORY_FIELDS})


# --------------------------------------------------------------------------- phase 1
def train_head(cfg: TrainConfig, model: keras.Model, pixels, y, train_idx, val_idx, log) -> dict:
    """Fit the head on pooled features of the frozen backbone, computed once (no augmentation)."""
    features = keras.Model(model.input, model.get_layer("head_dropout").input)
    t0 = time.time()
    f_train = predict_keras(features, pixels, train_idx)
    f_train = f_train.reshape(len(train_idx), -1)
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


# --------------------------------------------------------------------------- phase 2
class EMA:
    """Exponential moving average of the trainable weights (evaluated and shipped)."""

    def __init__(self, variables, decay: float):
        self.variables, self.decay = list(variables), decay
        self.shadow = [tf.Variable(v, trainable=False) for v in self.variables]
        self.backup = [tf.Variable(v, trainable=False) for v in self.variables]

    def update(self, step):
        d = tf.minimum(self.decay, (1.0 + tf.cast(step, tf.float32)) / (10.0 + tf.cast(step, tf.float32)))
        for s, v in zip(self.shadow, self.variables):
            s.assign(d * s + (1 - d) * v)

    def swap_in(self):
        for b, s, v in zip(self.backup, self.shadow, self.variables):
            b.assign(v)
            v.assign(s)

    def swap_out(self):
        for b, v in zip(self.backup, self.variables):
            v.assign(b)


def fine_tune(cfg: TrainConfig, model: keras.Model, info, pixels, y, train_idx, val_idx,
              run_dir: Path, strategy, resume: bool, log) -> dict:
    """Phase 2 with warm-up+cosine, class weights, EMA, early stopping and checkpoints."""
    n_train = set_trainable(model, cfg.backbone, cfg.top_blocks, info.num_blocks)
    log(f"phase 2: fine-tuning the top {cfg.top_blocks} of {info.num_blocks} blocks ({n_train:,} weights)")
    steps_per_epoch = math.ceil(len(train_idx) / cfg.batch_size)
    with strategy.scope():
        sched = WarmupCosine(cfg.lr, int(cfg.warmup_epochs * steps_per_epoch), cfg.epochs * steps_per_epoch)
        opt = keras.optimizers.Adam(sched)
        ema = EMA(model.trainable_variables, cfg.ema_decay) if cfg.ema_decay else None
        gen = tf.random.Generator.from_seed(cfg.seed)
    w0, w1 = class_weights(y[train_idx], cfg.class_weighting)
    kernels = [v for v in model.trainable_variables if "kernel" in v.name]

    @tf.function
    def step_fn(x, t):
        if cfg.augment:
            x = augment(x, gen)
        with tf.GradientTape() as tape:
            p = model(x, training=True)[:, 0]
            per = keras.losses.binary_crossentropy(t[:, None], p[:, None])
            weight = tf.where(t > 0.5, w1, w0)
            loss = tf.nn.compute_average_loss(per * weight, global_batch_size=cfg.batch_size)
            if cfg.weight_decay:
                loss += cfg.weight_decay * tf.add_n([tf.reduce_sum(tf.square(k)) for k in kernels]) / strategy.num_replicas_in_sync
        grads = tape.gradient(loss, model.trainable_variables)
        opt.apply_gradients(zip(grads, model.trainable_variables))
        return loss

    @tf.function
    def train_step(x, t):
        loss = strategy.reduce("SUM", strategy.run(step_fn, (x, t)), axis=None)
        if ema is not None:
            ema.update(opt.iterations)
        return loss

    ckpt = tf.train.Checkpoint(model=model, optimizer=opt, gen=gen, epoch=tf.Variable(0),
                               **({"ema": ema.shadow} if ema else {}))
    manager = tf.train.CheckpointManager(ckpt, str(run_dir / "checkpoints"), max_to_keep=1)
    best, wait, history_path = -1.0, 0, run_dir / "history.csv"
    if resume and manager.latest_checkpoint:
        ckpt.restore(manager.latest_checkpoint)
        done = pd.read_csv(history_path)
        done = done[done["phase"] == 2]
        aucs = done["val_auc_ema" if ema else "val_auc"].tolist()
        best = max(aucs) if aucs else -1.0
        wait = len(aucs) - 1 - int(np.argmax(aucs)) if aucs else 0
        log(f"resumed from epoch {int(ckpt.epoch)} (best val AUC {best:.4f})")
    rng = np.random.default_rng(cfg.seed + int(ckpt.epoch))
    start_epoch, t_start = int(ckpt.epoch), time.time()
    for epoch in range(start_epoch, cfg.epochs):
        t0, losses = time.time(), []
        bar = tqdm(total=len(train_idx), desc=f"epoch {epoch + 1}/{cfg.epochs}", unit="img", mininterval=20)
        for b in batches(train_idx, cfg.batch_size, rng, shuffle=True):
            if len(b) < cfg.batch_size and len(train_idx) >= cfg.batch_size:
                continue  # keep one static batch shape: no retracing
            x = tf.constant(np.asarray(pixels[np.sort(b)], dtype=np.uint8))
            t = tf.constant(y[np.sort(b)], dtype=tf.float32)
            losses.append(float(train_step(x, t)))
            bar.update(len(b))
        bar.close()
        val_auc = roc_auc(y[val_idx], predict_keras(model, pixels, val_idx))
        val_auc_ema = None
        if ema:
            ema.swap_in()
            val_auc_ema = roc_auc(y[val_idx], predict_keras(model, pixels, val_idx))
        score = val_auc_ema if ema else val_auc
        if score > best:
            best, wait = score, 0
            model.save_weights(str(run_dir / "best.weights.h5"))
        else:
            wait += 1
        if ema:
            ema.swap_out()
        ckpt.epoch.assign(epoch + 1)
        manager.save()
        elapsed = time.time() - t0
        append_history(history_path, {"phase": 2, "epoch": epoch + 1, "lr": float(sched(opt.iterations)),
                                      "train_loss": float(np.mean(losses)), "val_auc": val_auc,
                                      "val_auc_ema": val_auc_ema, "seconds": round(elapsed, 1)})
        eta = (time.time() - t_start) / (epoch + 1 - start_epoch) * (cfg.epochs - epoch - 1)
        log(f"epoch {epoch + 1}: loss {np.mean(losses):.4f} val AUC {val_auc:.4f}"
            + (f" (EMA {val_auc_ema:.4f})" if ema else "") + f" [{elapsed:.0f}s, ETA {eta / 60:.1f} min]")
        if wait >= cfg.patience:
            log(f"early stop: no val AUC gain for {cfg.patience} epochs (best {best:.4f})")
            break
    model.load_weights(str(run_dir / "best.weights.h5"))
    return {"best_val_auc": best, "epochs_run": int(ckpt.epoch)}


def init_from_run(prev: Path, model: keras.Model, rows: pd.DataFrame, log) -> dict:
    """Start from another run's model (e.g. top blocks first, then every block). Its split must
    be this run's split, or its training images could sit in this run's test set."""
    before = pd.read_csv(prev / "splits.csv", dtype={"image": str}).set_index("image")["split"]
    now = rows.set_index("image")["split"]
    if not (before.reindex(now.index).astype(str).to_numpy() == now.astype(str).to_numpy()).all():
        raise ValueError(f"--init-from {prev}: its split differs from this run's (same data, seed and fractions needed)")
    model.load_weights(str(prev / "model.h5"))
    prev_metrics = json.loads((prev / "metrics.json").read_text())
    log(f"initialised from {prev / 'model.h5'} (its test AUC {prev_metrics['test']['all']['roc_auc']:.4f})")
    return {"run": str(prev), "config": json.loads((prev / "config.json").read_text()),
            "test_auc": prev_metrics["test"]["all"]["roc_auc"], "val_auc": prev_metrics["val"]["all"]["roc_auc"],
            "head_only_test_auc": prev_metrics.get("head_only_test_auc"),
            "wall_time_minutes": prev_metrics.get("wall_time_minutes")}


# --------------------------------------------------------------------------- the run
def save_history_plot(run_dir: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    h = pd.read_csv(run_dir / "history.csv")
    h = h[h["phase"] == 2]
    if h.empty:
        return
    fig, (a, b) = plt.subplots(1, 2, figsize=(9, 3.5))
    a.plot(h["epoch"], h["train_loss"], "o-")
    a.set(xlabel="epoch", ylabel="train loss (weighted BCE)")
    b.plot(h["epoch"], h["val_auc"], "o-", label="weights")
    if h["val_auc_ema"].notna().any():
        b.plot(h["epoch"], h["val_auc_ema"], "s-", label="EMA weights")
    b.set(xlabel="epoch", ylabel="validation ROC AUC")
    b.legend()
    fig.tight_layout()
    fig.savefig(run_dir / "history.png", dpi=100)
    plt.close(fig)


def run(cfg: TrainConfig, resume: bool = False, log=print) -> dict:
    """Train and evaluate; returns the metrics written to <out>/metrics.json."""
    cfg.validate()
    run_dir = Path(cfg.out)
    run_dir.mkdir(parents=True, exist_ok=True)
    if resume and (run_dir / "config.json").exists():
        saved = TrainConfig.from_json(run_dir / "config.json")
        if saved.to_dict() != cfg.to_dict():
            raise ValueError(f"--resume with a different config than {run_dir / 'config.json'}")
    elif (run_dir / "history.csv").exists():
        (run_dir / "history.csv").unlink()
    (run_dir / "config.json").write_text(json.dumps(cfg.to_dict(), indent=2))
    set_seeds(cfg.seed)
    t_total = time.time()
    rows, pixels, provenance, problems = prepare_data(cfg, log)
    rows[["image", "source", "dataset", "group", "split", "target"]].to_csv(run_dir / "splits.csv", index=False)
    problems.to_csv(run_dir / "problems.csv", index=False)
    summary = D.split_summary(rows)
    log("split summary:\n" + summary.to_string(index=False))
    summary.to_csv(run_dir / "split_summary.csv", index=False)

    y = rows["target"].to_numpy().astype(np.float32)
    pos = {s: rows.index[rows["split"] == s].to_numpy() for s in D.SPLITS}
    strategy = select_strategy()
    log(f"strategy: {type(strategy).__name__}, replicas {strategy.num_replicas_in_sync}")
    with strategy.scope():
        model, info = build_classifier(cfg.backbone, cfg.image_size, cfg.dropout, cfg.weights)
    freeze_backbone(model)
    phase1, init = None, None
    if cfg.init_from:
        init = init_from_run(Path(cfg.init_from), model, rows, log)
        head_only_test = init["head_only_test_auc"]
    else:
        if not (resume and (run_dir / "checkpoints").exists()):
            phase1 = train_head(cfg, model, pixels, y, pos["train"], pos["val"], log)
            append_history(run_dir / "history.csv", {"phase": 1, "epoch": phase1["epochs"], "val_auc": phase1["val_auc"]})
            model.save_weights(str(run_dir / "best.weights.h5"))
        head_only_test = roc_auc(y[pos["test"]], predict_keras(model, pixels, pos["test"]))
    phase2 = {}
    if cfg.top_blocks > 0 and cfg.epochs > 0:
        phase2 = fine_tune(cfg, model, info, pixels, y, pos["train"], pos["val"], run_dir, strategy, resume, log)
    model.save(str(run_dir / "model.h5"), include_optimizer=False)

    keep = np.concatenate([pos["val"], pos["test"]])
    preds = rows.loc[keep, ["image", "source", "split", "target"]].assign(
        probability=predict_keras(model, pixels, keep))
    preds.to_csv(run_dir / "predictions.csv", index=False)
    threshold = choose_threshold(preds, cfg.target_sensitivity)
    report = full_report(preds, threshold["threshold"], cfg.bootstrap, cfg.seed)
    metrics = {"model": f"{cfg.backbone} (Keras float32)", **report, "threshold": threshold,
               "head_only_test_auc": head_only_test, "phase1": phase1, "phase2": phase2, "init_from": init,
               "wall_time_minutes": round((time.time() - t_total) / 60, 1),
               "input_scaling": info.input_scaling, "provenance": provenance,
               "problems": int(len(problems))}
    (run_dir / "metrics.json").write_text(json.dumps(metrics, indent=2))
    save_plots(preds, report, run_dir, cfg.backbone)
    save_history_plot(run_dir)
    log(summary_line(report))
    log(f"head only (frozen backbone) test AUC {head_only_test:.4f}; wall time {metrics['wall_time_minutes']} min")
    return metrics
