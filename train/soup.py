"""`python -m train.soup RUN RUN [RUN ...] --out DIR`: the uniform average of the weights of
runs that share one split, backbone, input size and target (stochastic weight averaging of
checkpoints of one trajectory, or a "model soup" of runs fine-tuned from the same ImageNet start),
written as a run folder that `python -m quantize convert --run DIR` and `python -m train.evaluate
--run DIR` take. It is evaluated like a training run: score rule and threshold chosen on
validation, test only measured. Whether a soup is better is read from its validation AUC, next
to its ingredients' (printed), never from test.

Exit status: 0 done, 2 bad usage (fewer than two runs, a missing run, runs that do not match,
--out already holding a run without --force).
"""
from __future__ import annotations

import argparse
import hashlib
import json
import shutil
import sys
from pathlib import Path

EXIT_OK, EXIT_USAGE = 0, 2
# Config fields that must be equal for weights to be averaged and the soup evaluated on one split.
MUST_MATCH = ("data", "layout", "val_fraction", "test_fraction", "honour_split", "backbone", "image_size", "resize",
              "color_constancy", "target", "seed", "limit")
COPIED = ("splits.csv", "split_summary.csv", "problems.csv")


def check_runs(runs: list[Path]) -> dict:
    """The first run's config; ValueError unless every run is complete and matches it on
    MUST_MATCH and on its saved split."""
    if len(runs) < 2:
        raise ValueError("a weight average needs at least two runs")
    for r in runs:
        missing = [f for f in ("config.json", "model.h5", "metrics.json", "splits.csv") if not (r / f).is_file()]
        if missing:
            raise ValueError(f"{r} is not a finished run (no {', '.join(missing)})")
    first = json.loads((runs[0] / "config.json").read_text())
    split = (runs[0] / "splits.csv").read_bytes()
    for r in runs[1:]:
        cfg = json.loads((r / "config.json").read_text())
        diff = [k for k in MUST_MATCH if cfg.get(k) != first.get(k)]
        if diff:
            raise ValueError(f"{r} differs from {runs[0]} in {', '.join(diff)}: weights of different models "
                             "or splits cannot be averaged")
        if (r / "splits.csv").read_bytes() != split:
            raise ValueError(f"{r}: its split differs from {runs[0]}'s")
    return first


def average_weights(models) -> list:
    """Element-wise mean of every float weight (integer counters are taken from the first)."""
    import numpy as np
    out = []
    for ws in zip(*(m.get_weights() for m in models)):
        if np.issubdtype(ws[0].dtype, np.floating):
            out.append(np.mean(np.stack(ws), axis=0).astype(ws[0].dtype))
        else:
            out.append(ws[0])
    return out


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def make_soup(runs: list[Path], out: Path, log=print) -> dict:
    """Average, save, evaluate; returns the metrics written to <out>/metrics.json."""
    from .config import TrainConfig
    from .evaluate import summary_line
    from .pipeline import evaluate_run
    from .rundir import load_keras_model, load_run_data, save_keras_model
    first = check_runs(runs)
    out.mkdir(parents=True, exist_ok=True)
    cfg = TrainConfig.from_dict({**first, "out": str(out), "init_from": None})
    (out / "config.json").write_text(json.dumps(cfg.to_dict(), indent=2))
    for name in COPIED:
        if (runs[0] / name).is_file():
            shutil.copy(runs[0] / name, out / name)
    models = [load_keras_model(r / "model.h5") for r in runs]
    soup = models[0]
    soup.set_weights(average_weights(models))
    save_keras_model(soup, out / "model.h5")
    rows, pixels, cfg = load_run_data(out)
    report, threshold, rule, rule_aucs = evaluate_run(cfg, soup, rows, pixels, out)
    ingredients = []
    for r in runs:
        m = json.loads((r / "metrics.json").read_text())
        ingredients.append({"run": str(r), "model_sha256": sha256(r / "model.h5"),
                            "val_auc": m["val"]["all"]["roc_auc"], "melanoma_rule": m.get("melanoma_rule")})
    base = json.loads((runs[0] / "metrics.json").read_text())
    metrics = {"model": f"{cfg.backbone} (Keras float32, uniform weight average of {len(runs)} runs)", **report,
               "threshold": threshold, "melanoma_rule": rule, "melanoma_rule_val_auc": rule_aucs,
               "classes": base.get("classes"), "head_only_test_auc": None, "phase1": None, "phase2": {},
               "init_from": None, "soup": {"ingredients": ingredients, "method": "uniform mean of every float weight"},
               "wall_time_minutes": None, "input_scaling": base.get("input_scaling"),
               "provenance": base.get("provenance"), "problems": base.get("problems")}
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2))
    for ing in ingredients:
        log(f"ingredient {ing['run']}: validation AUC {ing['val_auc']:.4f}")
    log(f"weight average: validation AUC {report['val']['all']['roc_auc']:.4f}")
    log(summary_line(report))
    return metrics


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m train.soup", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("runs", nargs="+", type=Path, help="run folders written by python -m train")
    ap.add_argument("--out", type=Path, required=True, help="the new run folder")
    ap.add_argument("--force", action="store_true", help="replace --out if it holds a run")
    args = ap.parse_args(argv)
    try:
        check_runs(args.runs)
        if any(args.out.resolve() == r.resolve() for r in args.runs):
            raise ValueError(f"--out {args.out} is one of the runs averaged")
        if args.out.exists() and any(args.out.iterdir()):
            if not args.force:
                raise ValueError(f"{args.out} is not empty; use --force to replace it, or another --out")
            shutil.rmtree(args.out)
        make_soup(args.runs, args.out)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_USAGE
    return EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
