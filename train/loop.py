"""Phase 2, the training loop: fine-tune the top blocks with warm-up + cosine, class weights,
weight EMA, early stopping on validation AUC, and a checkpoint after every epoch (resumable).

Batches come from `batching.distributed_dataset`, so under a `tf.distribute` strategy every
replica trains on its own share of each global batch (and every worker on its own shard)."""
from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from . import tfenv  # noqa: F401
import tensorflow as tf
import tf_keras as keras
from tqdm import tqdm

from .batching import class_weights, diagnosis_weights, distributed_dataset
from .data import DIAGNOSES
from .config import TrainConfig
from .evaluate import predict_keras
from .metrics import roc_auc
from .model import set_trainable
from .optim import EMA, agree, lr_schedule, make_train_step, sync_from_first_replica
from .rundir import append_history


@dataclass
class TrainingData:
    pixels: np.ndarray  # (N, H, W, 3) uint8 memmap
    y: np.ndarray  # (N,) float32 melanoma labels
    train_idx: np.ndarray
    val_idx: np.ndarray
    dx: np.ndarray | None = None  # (N,) int diagnosis index (train.data.DIAGNOSES), -1 unknown; None: binary


@dataclass
class Progress:
    """Where the loop stands: restored from the checkpoint and history.csv on --resume."""
    epoch: int = 0
    best: float = -1.0
    wait: int = 0


def restore(manager: tf.train.CheckpointManager, ckpt, history: Path, metric: str, log) -> Progress:
    if not manager.latest_checkpoint:
        return Progress()
    ckpt.restore(manager.latest_checkpoint)
    aucs = pd.read_csv(history).query("phase == 2")[metric].tolist()
    best = max(aucs) if aucs else -1.0
    log(f"resumed from epoch {int(ckpt.epoch)} (best val AUC {best:.4f})")
    return Progress(int(ckpt.epoch), best, len(aucs) - 1 - int(np.argmax(aucs)) if aucs else 0)


def run_epoch(train_step, strategy, data: TrainingData, cfg: TrainConfig, epoch: int) -> float:
    dataset, steps = distributed_dataset(strategy, data.pixels, data.y, data.train_idx, cfg.batch_size, cfg.training_seed, epoch,
                                         dx=data.dx)
    losses = []
    with tqdm(total=steps * cfg.batch_size, desc=f"epoch {epoch + 1}/{cfg.epochs}", unit="img", mininterval=20,
              disable=None) as bar:  # None: no bar when stderr is not a terminal (logs)
        for x, t, d in dataset:
            losses.append(float(train_step(x, t, d)))
            bar.update(cfg.batch_size)
    return float(np.mean(losses))


def validate(model, ema: EMA | None, data: TrainingData) -> tuple[float, float | None]:
    """Validation AUC of the weights and, with EMA, of the EMA weights (left swapped in); a
    multi-task model is scored by the mean of its two melanoma columns (edge.scores)."""
    auc = roc_auc(data.y[data.val_idx], predict_keras(model, data.pixels, data.val_idx))
    if ema is None:
        return auc, None
    ema.swap_in()
    return auc, roc_auc(data.y[data.val_idx], predict_keras(model, data.pixels, data.val_idx))


def fine_tune(cfg: TrainConfig, model: keras.Model, num_blocks: int, data: TrainingData, run_dir: Path,
              strategy, resume: bool, log) -> dict:
    """Phase 2; leaves the best (EMA) weights in `model`."""
    # -- what trains, and how
    n_train = set_trainable(model, cfg.backbone, cfg.top_blocks, num_blocks)
    log(f"phase 2: fine-tuning the top {cfg.top_blocks} of {num_blocks} blocks ({n_train:,} weights)")
    steps_per_epoch = max(1, len(data.train_idx) // cfg.batch_size)
    with strategy.scope():
        sched = lr_schedule(cfg.lr, int(cfg.warmup_epochs * steps_per_epoch), cfg.epochs * steps_per_epoch)
        opt = keras.optimizers.Adam(sched)
        ema = EMA(model.trainable_variables, cfg.ema_decay) if cfg.ema_decay else None
        gen = tf.random.Generator.from_seed(cfg.training_seed)
    train_step = make_train_step(model, opt, strategy, global_batch=cfg.batch_size,
                                 class_weight=class_weights(data.y[data.train_idx], cfg.class_weighting),
                                 weight_decay=cfg.weight_decay, augment_gen=gen if cfg.augment else None, ema=ema,
                                 diagnosis_weights=None if data.dx is None else
                                 diagnosis_weights(data.dx[data.train_idx], len(DIAGNOSES), cfg.class_weighting),
                                 diagnosis_weight=cfg.diagnosis_weight)
    # -- checkpoints (resume)
    ckpt = tf.train.Checkpoint(model=model, optimizer=opt, gen=gen, epoch=tf.Variable(0),
                               **({"ema": ema.shadow} if ema else {}))
    manager = tf.train.CheckpointManager(ckpt, str(run_dir / "checkpoints"), max_to_keep=1)
    history = run_dir / "history.csv"
    state = restore(manager, ckpt, history, "val_auc_ema" if ema else "val_auc", log) if resume else Progress()
    sync_from_first_replica(strategy, model.weights + (ema.shadow if ema else []))
    # -- the loop
    t_start, first = time.time(), state.epoch
    for epoch in range(first, cfg.epochs):
        t0 = time.time()
        loss = run_epoch(train_step, strategy, data, cfg, epoch)
        val_auc, val_auc_ema = validate(model, ema, data)
        score = agree(strategy, val_auc if ema is None else val_auc_ema)  # one decision on every worker
        state.best, state.wait = (score, 0) if score > state.best else (state.best, state.wait + 1)
        if state.wait == 0:
            model.save_weights(str(run_dir / "best.weights.h5"))
        if ema is not None:
            ema.swap_out()
        ckpt.epoch.assign(epoch + 1)
        manager.save()
        append_history(history, {"phase": 2, "epoch": epoch + 1, "lr": float(sched(opt.iterations)),
                                 "train_loss": loss, "val_auc": val_auc, "val_auc_ema": val_auc_ema,
                                 "seconds": round(time.time() - t0, 1)})
        eta = (time.time() - t_start) / (epoch + 1 - first) * (cfg.epochs - epoch - 1)
        log(f"epoch {epoch + 1}: loss {loss:.4f} val AUC {val_auc:.4f}" + (f" (EMA {val_auc_ema:.4f})" if ema else "")
            + f" [{time.time() - t0:.0f}s, ETA {eta / 60:.1f} min]")
        if state.wait >= cfg.patience:
            log(f"early stop: no val AUC gain for {cfg.patience} epochs (best {state.best:.4f})")
            break
    model.load_weights(str(run_dir / "best.weights.h5"))
    return {"best_val_auc": state.best, "epochs_run": int(ckpt.epoch)}
