"""The run folder: what a training run reads and writes, and how later stages read it back.

    <out>/config.json  splits.csv  split_summary.csv  problems.csv  history.csv  history.png
          checkpoints/  best.weights.h5  model.h5  metrics.json  predictions.csv  roc.png ...

`quantize/` and `train.evaluate` load runs through `load_run_data` and `load_keras_model`.
"""
from __future__ import annotations

import csv
import json
import shutil
import warnings
from pathlib import Path

import numpy as np
import pandas as pd

from . import data as D
from .config import TrainConfig

HISTORY_FIELDS = ["phase", "epoch", "lr", "train_loss", "val_auc", "val_auc_ema", "seconds"]
RUN_MARKERS = ("config.json", "history.csv", "model.h5", "checkpoints")


class RunFolderError(ValueError):
    """A run folder that cannot be used as asked (exists without --force, resumed with another config)."""


def check_run_dir(cfg: TrainConfig, resume: bool, force: bool) -> bool:
    """Whether --out holds a run; RunFolderError if it may not be used as asked (checked by the
    CLI before TensorFlow loads, and again when the run starts)."""
    run_dir = Path(cfg.out)
    holds_run = run_dir.is_dir() and any((run_dir / m).exists() for m in RUN_MARKERS)
    if resume:
        saved = run_dir / "config.json"
        if saved.is_file() and TrainConfig.from_json(saved).to_dict() != cfg.to_dict():
            raise RunFolderError(f"--resume with a different config than {saved}")
    elif holds_run and not force:
        raise RunFolderError(f"{run_dir} already holds a run; use --resume to continue it, --force to "
                             "replace it, or another --out")
    return holds_run


def prepare_run_dir(cfg: TrainConfig, resume: bool, force: bool) -> Path:
    """Make (or reopen, with `resume`) the run folder and write config.json. An existing run is
    replaced only with `force`: re-running into the same --out must not silently overwrite it."""
    run_dir = Path(cfg.out)
    if check_run_dir(cfg, resume, force) and not resume:
        shutil.rmtree(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "config.json").write_text(json.dumps(cfg.to_dict(), indent=2))
    return run_dir


def load_rows(cfg: TrainConfig, log=None) -> tuple[pd.DataFrame, D.Dataset]:
    """The configured sources as one table (bad rows handled by cfg.on_bad), `limit` applied."""
    ds = D.load_sources(cfg.data, cfg.layout)
    if log is not None:
        ds = D.apply_policy(ds, cfg.on_bad, log)
    rows = ds.rows
    if cfg.limit:
        rows = rows.sample(n=min(cfg.limit, len(rows)), random_state=cfg.seed).sort_index()
    return rows.reset_index(drop=True), ds


def prepare_data(cfg: TrainConfig, log=print) -> tuple[pd.DataFrame, np.ndarray, list[dict], pd.DataFrame]:
    """Read sources, report bad rows, build/reuse the pixel cache, split by group."""
    rows, ds = load_rows(cfg, log)
    pixels, bad = D.build_pixel_cache(rows, cfg.preprocess_spec(), Path(cfg.cache_dir), cfg.workers,
                                      progress=decode_progress())
    if len(bad):
        D.apply_policy(D.Dataset(rows, bad, []), cfg.on_bad, log)
        rows = rows[~rows["image"].isin(set(bad["image"]))]
    rows = rows.assign(split=D.make_splits(rows, cfg.val_fraction, cfg.test_fraction, cfg.seed, cfg.honour_split))
    return rows, pixels, ds.provenance, pd.concat([ds.problems, bad], ignore_index=True)


def decode_progress():
    """A progress callback for the pixel cache whose bar appears only when there is decoding to
    do (a cached run shows none, not a bar stuck at 0 %)."""
    bar = None

    def update(done: int, total: int) -> None:
        nonlocal bar
        if bar is None:
            from tqdm import tqdm
            bar = tqdm(total=total, desc="decode", unit="img", mininterval=5, disable=None)
        bar.update(done - bar.n)
        if done == total:
            bar.close()
    return update


def save_splits(run_dir: Path, rows: pd.DataFrame, problems: pd.DataFrame, log) -> None:
    rows[["image", "source", "dataset", "group", "split", "target", "dx"]].to_csv(run_dir / "splits.csv", index=False)
    log("diagnoses (train.data.DIAGNOSES; other/unknown is left out of the diagnosis loss):\n"
        + D.diagnosis_summary(rows).to_string(index=False))
    problems.to_csv(run_dir / "problems.csv", index=False)
    summary = D.split_summary(rows)
    log("split summary:\n" + summary.to_string(index=False))
    summary.to_csv(run_dir / "split_summary.csv", index=False)


def load_run_data(run_dir: Path) -> tuple[pd.DataFrame, np.ndarray, TrainConfig]:
    """The run's rows (with its saved split) and pixel cache, for evaluation and export."""
    run_dir = Path(run_dir)
    cfg = TrainConfig.from_json(run_dir / "config.json")
    splits = pd.read_csv(run_dir / "splits.csv", dtype={"image": str})
    rows, _ = load_rows(cfg)
    pixels, _ = D.build_pixel_cache(rows, cfg.preprocess_spec(), Path(cfg.cache_dir), cfg.workers)
    rows["split"] = rows["image"].map(dict(zip(splits["image"], splits["split"])))
    return rows[rows["split"].notna()], pixels, cfg


def load_sidecar_data(model_path: Path) -> tuple[pd.DataFrame, np.ndarray, TrainConfig]:
    """The split an exported file was evaluated on, rebuilt from the config in its sidecar
    (for files whose run folder is gone); refused if the data no longer gives the same counts."""
    from edge import read_sidecar
    meta = read_sidecar(model_path)
    cfg = TrainConfig.from_saved(meta["config"])
    rows, pixels, _, _ = prepare_data(cfg, log=lambda m: None)
    if rows["split"].value_counts().to_dict() != meta["provenance"]["split_counts"]:
        raise ValueError(f"{Path(model_path).name}: the data no longer gives the split its sidecar records")
    return rows, pixels, cfg


def load_keras_model(path: Path):
    from . import tfenv  # noqa: F401  (Keras 2, TensorFlow's start-up chatter muted)
    import tf_keras as keras
    return keras.models.load_model(path, compile=False)


def save_keras_model(model, path: Path) -> None:
    """model.h5, the format quantize/ reads; Keras's note that HDF5 is "legacy" is not news here."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        model.save(str(path), include_optimizer=False)


def init_from_run(prev: Path, model, rows: pd.DataFrame, log) -> dict:
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


def append_history(path: Path, row: dict) -> None:
    new = not path.exists()
    with open(path, "a", newline="") as f:
        w = csv.DictWriter(f, fieldnames=HISTORY_FIELDS)
        if new:
            w.writeheader()
        w.writerow({k: row.get(k, "") for k in HISTORY_FIELDS})


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
