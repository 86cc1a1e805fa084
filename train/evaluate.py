"""Evaluate a model (Keras .h5 or .tflite via the edge runner) on a run's held-out split, or
on every image of dataset folders the run never saw (leave-source-out).

    python -m train.evaluate --run runs/efficientnet_lite0 [--model models/x.tflite]
    python -m train.evaluate --run runs/lso_ham --data ../shared/data/isic2017   # another source

The decision threshold is the model's own (the sidecar's for a .tflite, the run's for Keras),
chosen on validation data; the test split is only measured, never used to choose.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import pandas as pd

from .metrics import binary_metrics, metrics_by_source, roc_points, threshold_for_sensitivity


# --------------------------------------------------------------------------- predictions
def predict_tflite(model_path: Path, pixels: np.ndarray, idx: np.ndarray, threads: int | None = 2,
                   tta: bool = False, raw: bool = False) -> np.ndarray:
    """Raw melanoma scores for pixels[idx] through edge.Classifier (the shipped code path); `tta`
    averages the 8 flips/rotations as `python -m edge predict --tta` does. With `raw`, every
    output column (N, columns)."""
    from edge import Classifier
    clf = Classifier(model_path, num_threads=threads)
    if raw:
        predict = clf.predict_scores_tta if tta else clf.predict_scores
    else:
        predict = clf.predict_tta if tta else clf.predict_array
    return np.array([predict(np.asarray(pixels[i], dtype=np.float32))[0] for i in idx])


def predict_keras(model, pixels: np.ndarray, idx: np.ndarray, batch: int = 64, rule: str | None = "mean") -> np.ndarray:
    """Melanoma scores (N,) of pixels[idx], read from a multi-task model's columns by `rule`
    (edge.scores); with rule=None the raw outputs (N, columns)."""
    from edge.scores import melanoma_score
    out = []
    for s in range(0, len(idx), batch):
        x = np.asarray(pixels[idx[s:s + batch]], dtype=np.float32)
        y = model(x, training=False).numpy()
        out.append(y.reshape(len(x), -1))
    raw = np.concatenate(out) if out else np.zeros((0, 1))
    return raw if rule is None else melanoma_score(raw, rule)


# --------------------------------------------------------------------------- report
def full_report(preds: pd.DataFrame, threshold: float, bootstrap: int = 1000, seed: int = 0) -> dict:
    """preds has split, source, target, probability. Metrics for val and test, per source."""
    report = {"threshold": float(threshold)}
    for split in ("val", "test"):
        d = preds[preds["split"] == split]
        if len(d):
            report[split] = metrics_by_source(d["target"].to_numpy(), d["probability"].to_numpy(),
                                              d["source"].to_numpy(), threshold, bootstrap, seed)
    return report


def choose_threshold(preds: pd.DataFrame, target_sensitivity: float) -> dict:
    """Pick the threshold on validation predictions; report its validation operating point."""
    v = preds[preds["split"] == "val"]
    y, p = v["target"].to_numpy(), v["probability"].to_numpy()
    t = threshold_for_sensitivity(y, p, target_sensitivity)
    m = binary_metrics(y, p, t, bootstrap=0)
    return {"threshold": t, "chosen_on": "validation split", "target_sensitivity": target_sensitivity,
            "val_sensitivity": m["sensitivity"], "val_specificity": m["specificity"], "val_n": m["n"]}


def save_plots(preds: pd.DataFrame, report: dict, out_dir: Path, title: str) -> list[str]:
    """ROC per source and a reliability diagram for the test split, as PNGs."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    test = preds[preds["split"] == "test"]
    files = []
    fig, ax = plt.subplots(figsize=(5, 5))
    for name, d in [("all", test)] + list(test.groupby("source")):
        if d["target"].nunique() == 2:
            fpr, tpr = roc_points(d["target"], d["probability"])
            auc = report["test"][name]["roc_auc"]
            ax.plot(fpr, tpr, lw=2 if name == "all" else 1, label=f"{name} (AUC {auc:.3f}, n={len(d)})")
    ax.plot([0, 1], [0, 1], "k:", lw=0.8)
    ax.set(xlabel="1 - specificity", ylabel="sensitivity", title=f"ROC, test split: {title}")
    ax.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    fig.savefig(out_dir / "roc.png", dpi=110)
    plt.close(fig)
    files.append("roc.png")

    table = report["test"]["all"]["calibration"]["reliability"]
    fig, ax = plt.subplots(figsize=(5, 5))
    ax.plot([0, 1], [0, 1], "k:", lw=0.8)
    ax.plot([r["mean_probability"] for r in table], [r["fraction_melanoma"] for r in table], "o-")
    ax.set(xlabel="mean predicted probability", ylabel="observed melanoma fraction",
           title=f"Reliability, test (ECE {report['test']['all']['calibration']['ece']:.3f})")
    fig.tight_layout()
    fig.savefig(out_dir / "reliability.png", dpi=110)
    plt.close(fig)
    files.append("reliability.png")
    return files


def summary_line(report: dict, split: str = "test") -> str:
    m = report[split]["all"]
    lo, hi = m["roc_auc_ci95"] or (float("nan"), float("nan"))
    return (f"{split}: AUC {m['roc_auc']:.4f} [95% CI {lo:.4f}-{hi:.4f}], sensitivity {m['sensitivity']:.3f}, "
            f"specificity {m['specificity']:.3f} at threshold {m['threshold']:.4f}, "
            f"balanced accuracy {m['balanced_accuracy']:.3f}, ECE {m['calibration']['ece']:.3f}, n={m['n']}")


# --------------------------------------------------------------------------- CLI
def evaluate_model(run_dir: Path | None, model_path: Path | None, threads: int | None = 2,
                   tta: bool = False) -> tuple[pd.DataFrame, dict]:
    """Predict val+test of the run's split with `model_path` (default: the run's Keras model).
    Without a run folder, a .tflite is evaluated on the split its sidecar's config rebuilds.
    A .tflite with a calibration in its sidecar is reported as calibrated probabilities."""
    from .rundir import load_run_data, load_sidecar_data
    rows, pixels, cfg = load_run_data(run_dir) if run_dir else load_sidecar_data(model_path)
    keep = rows.index[rows["split"].isin(["val", "test"])].to_numpy()
    probs, threshold = model_predictions(run_dir, model_path, pixels, keep, threads, tta)
    probs, threshold = as_shipped(model_path, probs, threshold)
    preds = rows.loc[keep, ["image", "source", "split", "target"]].assign(probability=probs)
    return preds, full_report(preds, threshold, cfg.bootstrap, cfg.seed)


def as_shipped(model_path: Path | None, scores: np.ndarray, threshold: float) -> tuple[np.ndarray, float]:
    """What users see: a .tflite whose sidecar carries a calibration reports calibrated
    probabilities (and the threshold in the same units); AUC and decisions are unchanged."""
    if model_path is None or Path(model_path).suffix != ".tflite":
        return scores, threshold
    from edge import read_sidecar
    from edge.runner import platt
    cal = read_sidecar(model_path).get("calibration")
    if cal is None:
        return scores, threshold
    return platt(scores, cal["a"], cal["b"]), float(platt(threshold, cal["a"], cal["b"]))


def model_predictions(run_dir: Path | None, model_path: Path | None, pixels, idx, threads,
                      tta: bool = False) -> tuple[np.ndarray, float]:
    """(scores of pixels[idx], the model's own validated threshold)."""
    from .rundir import load_keras_model
    model_path = Path(model_path) if model_path else run_dir / "model.h5"
    if model_path.suffix == ".tflite":
        from edge import read_sidecar
        return predict_tflite(model_path, pixels, idx, threads, tta), read_sidecar(model_path)["threshold"]
    if tta:
        raise ValueError("--tta evaluates .tflite files (through the edge runner)")
    metrics = json.loads((run_dir / "metrics.json").read_text())
    rule = metrics.get("melanoma_rule", "mean")  # chosen on validation (multi-task runs)
    return predict_keras(load_keras_model(model_path), pixels, idx, rule=rule), metrics["threshold"]["threshold"]


def evaluate_external(run_dir: Path, model_path: Path | None, data: list[str], threads: int | None = 2):
    """Every image of `data` (folders the run did not train on), at the run's threshold.
    Refuses folders that share an image with the run's split: that would not be another source."""
    from . import data as D
    from .config import TrainConfig
    cfg = TrainConfig.from_json(Path(run_dir) / "config.json")
    ds = D.apply_policy(D.load_sources(data, None), "skip", lambda m: None)
    seen = set(pd.read_csv(Path(run_dir) / "splits.csv", dtype={"image": str})["image"])
    overlap = seen & set(ds.rows["image"])
    if overlap:
        raise ValueError(f"{len(overlap)} images of {data} are in the run's own split (e.g. {sorted(overlap)[0]}): "
                         "not a source the run never saw")
    rows = ds.rows.reset_index(drop=True)
    pixels, bad = D.build_pixel_cache(rows, cfg.preprocess_spec(), Path(cfg.cache_dir), cfg.workers)
    rows = rows[~rows["image"].isin(set(bad["image"]))].assign(split="external")
    probs, threshold = as_shipped(model_path, *model_predictions(Path(run_dir), model_path, pixels,
                                                                 rows.index.to_numpy(), threads))
    preds = rows[["image", "source", "split", "target"]].assign(probability=probs)
    report = {"threshold": float(threshold), "data": [Path(d).name for d in data],
              "run": Path(run_dir).name, "model": Path(model_path).name if model_path else "model.h5 (Keras float32)",
              "trained_on": [Path(d).name for d in cfg.data],
              "recipe": {k: getattr(cfg, k) for k in ("backbone", "target", "color_constancy", "top_blocks", "epochs",
                                                       "lr", "init_from", "class_weighting")},
              "external": metrics_by_source(preds["target"].to_numpy(), preds["probability"].to_numpy(),
                                            preds["source"].to_numpy(), threshold, cfg.bootstrap, cfg.seed)}
    return preds, report


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m train.evaluate", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter,
                                 epilog="Exit status: 0 done, 2 bad usage (missing run or model, overlapping data).")
    ap.add_argument("--run", type=Path, help="run folder written by python -m train (a .tflite needs none: "
                                            "its split is rebuilt from its sidecar)")
    ap.add_argument("--model", type=Path, help=".h5 or .tflite (default: the run's model.h5)")
    ap.add_argument("--data", nargs="+", metavar="FOLDER",
                    help="evaluate on every image of these dataset folders instead (sources the run never saw)")
    ap.add_argument("--out", type=Path, help="write metrics JSON (and plots) into this folder")
    ap.add_argument("--threads", type=int, default=2, help="interpreter threads for .tflite (default 2)")
    ap.add_argument("--tta", action="store_true", help="average the 8 flips/rotations (.tflite; 8 invokes per image)")
    args = ap.parse_args(argv)
    if args.run is None and not (args.model and args.model.suffix == ".tflite" and not args.data):
        print("error: --run is needed (only a .tflite on its own split can do without)", file=sys.stderr)
        return 2
    needed = [args.run / "config.json", args.run / "splits.csv"] if args.run else []
    missing = [p for p in needed + [args.model or args.run / "model.h5"] if not Path(p).is_file()]
    if missing:
        print(f"error: {missing[0]} not found: --run takes a folder written by python -m train, "
              "--model a .h5 or .tflite file", file=sys.stderr)
        return 2
    try:
        if args.data:
            preds, report = evaluate_external(args.run, args.model, args.data, args.threads)
        else:
            preds, report = evaluate_model(args.run, args.model, args.threads, args.tta)
    except (FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    split = "external" if args.data else "test"
    print(summary_line(report, split))
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "metrics.json").write_text(json.dumps(report, indent=2))
        if not args.data:
            save_plots(preds, report, args.out, Path(args.model or args.run).name)
    for src, m in report[split].items():
        if src != "all" and m["roc_auc"] is not None:
            print(f"  {src:16s} AUC {m['roc_auc']:.4f} sens {m['sensitivity']:.3f} spec {m['specificity']:.3f} n={m['n']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
