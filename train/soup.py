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
import json
import shutil
import sys
from pathlib import Path

EXIT_OK, EXIT_USAGE = 0, 2
# Config fields that must be equal for weights to be averaged and the soup evaluated on one split.
MUST_MATCH = ("data", "layout", "val_fraction", "test_fraction", "honour_split", "backbone", "weights", "image_size",
              "resize", "color_constancy", "target", "seed", "limit")
COPIED = ("splits.csv", "split_summary.csv", "problems.csv")


def check_runs(runs: list[Path]) -> dict:
    """The first run's config; ValueError unless every run is complete and matches it on
    MUST_MATCH and on its saved split."""
    if len({r.resolve() for r in runs}) < 2:
        raise ValueError("a weight average needs at least two different runs")
    if len({r.resolve() for r in runs}) < len(runs):
        raise ValueError("a run is named twice")
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


def check_out(runs: list[Path], out: Path, force: bool) -> None:
    """ValueError unless `out` may be (re)written: not a file, not one of the runs, not inside one,
    holding none; an existing non-empty folder only with `force`, and only if it is a weight
    average this tool wrote (nothing else is ever deleted)."""
    target = out.resolve()
    for r in runs:
        r = r.resolve()
        if target == r or r in target.parents or target in r.parents:
            raise ValueError(f"--out {out} is, holds or sits inside the run {r}")
    if out.exists() and not out.is_dir():
        raise ValueError(f"--out {out} is not a folder")
    if out.is_dir() and any(out.iterdir()):
        if not force:
            raise ValueError(f"{out} is not empty; use --force to replace it, or another --out")
        if not is_soup(out):
            raise ValueError(f"{out} is not a weight average written by python -m train.soup: not replaced")


def is_soup(folder: Path) -> bool:
    try:
        return "soup" in json.loads((folder / "metrics.json").read_text())
    except (OSError, ValueError):
        return False


def make_soup(runs: list[Path], out: Path, log=print, force: bool = False) -> dict:
    """Average, save, evaluate; returns the metrics written to <out>/metrics.json. Built in a
    temporary folder beside `out` that replaces it only once complete: a failure leaves nothing."""
    import tempfile
    first = check_runs(runs)
    check_out(runs, out, force)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        metrics = _make_soup(runs, first, tmp, out, log)
        if out.exists():
            shutil.rmtree(out)  # check_out: a weight average of ours, replaced with --force
        tmp.rename(out)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)
    return metrics


def _make_soup(runs: list[Path], first: dict, out: Path, final: Path, log) -> dict:
    from edge import sha256_of
    from .config import TrainConfig
    from .evaluate import summary_line
    from .pipeline import evaluate_run
    from .rundir import load_keras_model, load_run_data, save_keras_model
    # no one training seed made these weights: the ingredients' are in metrics.json
    cfg = TrainConfig.from_dict({**first, "out": str(final), "init_from": None, "train_seed": None})
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
        ingredients.append({"run": str(r), "model_sha256": sha256_of(r / "model.h5"),
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
    ap.add_argument("--force", action="store_true", help="replace --out if it holds a weight average written by this tool")
    args = ap.parse_args(argv)
    try:
        make_soup(args.runs, args.out, force=args.force)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_USAGE
    return EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
