"""The whole training run: data -> phase 1 (head on cached features) -> phase 2 (top blocks,
EMA; train.loop) -> threshold on validation -> evaluation on test. Everything lands in one
run folder (train.rundir)."""
from __future__ import annotations

import json
import random
import time
from pathlib import Path

import numpy as np

from . import tfenv  # noqa: F401
import tensorflow as tf
import tf_keras as keras

from . import data as D
from . import rundir as R
from .config import TrainConfig
from .evaluate import choose_threshold, full_report, predict_keras, save_plots, summary_line
from .head import train_head
from .loop import TrainingData, fine_tune
from .metrics import roc_auc
from edge.scores import SCORE_RULES, melanoma_score
from .model import build_classifier, freeze_backbone, select_strategy
from .optim import sync_from_first_replica


def set_seeds(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    tf.random.set_seed(seed)
    keras.utils.set_random_seed(seed)


def start_model(cfg: TrainConfig, model, data: TrainingData, rows, test_idx, run_dir: Path, resume: bool, log):
    """Phase 1 (or --init-from another run); returns (phase 1 facts, init facts, head-only test AUC)."""
    if cfg.init_from:
        init = R.init_from_run(Path(cfg.init_from), model, rows, log)
        return None, init, init["head_only_test_auc"]
    if resume and (run_dir / "checkpoints").exists():  # phase 1 is done; its test AUC is in the earlier metrics
        earlier = run_dir / "metrics.json"
        return None, None, json.loads(earlier.read_text()).get("head_only_test_auc") if earlier.exists() else None
    phase1 = train_head(cfg, model, data.pixels, data.y, data.train_idx, data.val_idx, log, dx=data.dx)
    R.append_history(run_dir / "history.csv", {"phase": 1, "epoch": phase1["epochs"], "val_auc": phase1["val_auc"]})
    model.save_weights(str(run_dir / "best.weights.h5"))
    return phase1, None, roc_auc(data.y[test_idx], predict_keras(model, data.pixels, test_idx))


def choose_rule(raw, y, is_val) -> tuple[str, dict]:
    """How a multi-task model's melanoma score is read (edge.scores.SCORE_RULES), chosen by
    validation AUC; test is not looked at. A binary model has one column: rule "binary"."""
    if raw.shape[1] == 1:
        return "binary", {}
    aucs = {r: roc_auc(y[is_val], melanoma_score(raw[is_val], r)) for r in SCORE_RULES}
    return max(aucs, key=aucs.get), aucs


def evaluate_run(cfg: TrainConfig, model, rows, pixels, run_dir: Path) -> tuple[dict, dict, str, dict]:
    """Predict val + test, choose the score rule and the threshold on val, report both (test is
    only measured)."""
    keep = rows.index[rows["split"].isin(["val", "test"])].to_numpy()
    raw = predict_keras(model, pixels, keep, rule=None)
    rule, rule_aucs = choose_rule(raw, rows.loc[keep, "target"].to_numpy(), (rows.loc[keep, "split"] == "val").to_numpy())
    preds = rows.loc[keep, ["image", "source", "split", "target"]].assign(probability=melanoma_score(raw, rule))
    if raw.shape[1] > 1:
        preds = preds.assign(dx=rows.loc[keep, "dx"].to_numpy(), **{f"p_{i}": raw[:, i] for i in range(raw.shape[1])})
    preds.to_csv(run_dir / "predictions.csv", index=False)
    threshold = choose_threshold(preds, cfg.target_sensitivity)
    report = full_report(preds, threshold["threshold"], cfg.bootstrap, cfg.seed)
    save_plots(preds, report, run_dir, cfg.backbone)
    return report, threshold, rule, rule_aucs


def run(cfg: TrainConfig, resume: bool = False, force: bool = False, log=print) -> dict:
    """Train and evaluate; returns the metrics written to <out>/metrics.json."""
    cfg.validate()
    run_dir = R.prepare_run_dir(cfg, resume, force)
    set_seeds(cfg.training_seed)
    t_total = time.time()
    # -- data
    rows, pixels, provenance, problems = R.prepare_data(cfg, log)
    R.save_splits(run_dir, rows, problems, log)
    pos = {s: rows.index[rows["split"] == s].to_numpy() for s in D.SPLITS}
    multitask = cfg.target == "multitask"
    data = TrainingData(pixels, rows["target"].to_numpy().astype(np.float32), pos["train"], pos["val"],
                        dx=rows["dx"].to_numpy().astype(np.int32) if multitask else None)
    # -- model, phase 1, phase 2
    strategy = select_strategy()
    log(f"strategy: {type(strategy).__name__}, replicas {strategy.num_replicas_in_sync}")
    with strategy.scope():
        model, info = build_classifier(cfg.backbone, cfg.image_size, cfg.dropout, cfg.weights,
                                       diagnoses=len(D.DIAGNOSES) if multitask else 0)
    freeze_backbone(model)
    phase1, init, head_only_test = start_model(cfg, model, data, rows, pos["test"], run_dir, resume, log)
    sync_from_first_replica(strategy, model.weights)  # phase 1 / --init-from set each worker's copy alone
    phase2 = {}
    if cfg.top_blocks > 0 and cfg.epochs > 0:
        phase2 = fine_tune(cfg, model, info.num_blocks, data, run_dir, strategy, resume, log)
    R.save_keras_model(model, run_dir / "model.h5")
    # -- evaluation
    report, threshold, rule, rule_aucs = evaluate_run(cfg, model, rows, pixels, run_dir)
    metrics = {"model": f"{cfg.backbone} (Keras float32)", **report, "threshold": threshold,
               "melanoma_rule": rule, "melanoma_rule_val_auc": rule_aucs,
               "classes": list(D.DIAGNOSES) if multitask else None,
               "head_only_test_auc": head_only_test, "phase1": phase1, "phase2": phase2, "init_from": init,
               "wall_time_minutes": round((time.time() - t_total) / 60, 1),
               "input_scaling": info.input_scaling, "provenance": provenance, "problems": int(len(problems))}
    (run_dir / "metrics.json").write_text(json.dumps(metrics, indent=2))
    R.save_history_plot(run_dir)
    log(summary_line(report))
    log(f"head only (frozen backbone) test AUC {head_only_test if head_only_test is None else round(head_only_test, 4)}; "
        f"wall time {metrics['wall_time_minutes']} min")
    return metrics
