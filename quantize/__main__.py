"""`python -m quantize`: prune a trained model and export the .tflite files that ship.

    python -m quantize prune   --run runs/efficientnet_lite0            # pruned Keras model + report
    python -m quantize convert --run runs/efficientnet_lite0 --variants int8 float16 ...   # -> <run>/export
    python -m quantize all     --run runs/efficientnet_lite0 --out models --force  # re-ship every variant
    python -m quantize card                                                 # MODEL_CARD.md from the sidecars
    python -m quantize calibrate models/*.tflite        # Platt calibration of exported files (on validation)
    python -m quantize refusals models/*.tflite         # refusal gate of exported files, fitted again

Each .tflite gets a JSON sidecar with its threshold (chosen on validation with this very file)
and its test metrics computed through the edge runner. Files that exist (the shipped models
in models/, say) are replaced only with --force.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from edge import MODELS_DIR  # numpy and Pillow only
from train.config import WORKSPACE  # no TensorFlow

VARIANTS = ("float32", "float16", "dynamic", "int8", "pruned_int8")
PTQ_CHOSEN = ("post-training int8 requested with --int8-method ptq; the default (auto) uses quantization-aware "
              "training for backbones tfmot supports")
EXIT_OK, EXIT_USAGE = 0, 2
EXIT_TEXT = "Exit status: 0 done, 2 bad usage (no trained run, files exist without --force, missing packages)."


def log(msg: str) -> None:
    print(msg, flush=True)


@dataclass(frozen=True)
class Run:
    """A training run folder, loaded once: its config, rows with the split, pixels and model."""
    path: Path
    cfg: object
    rows: object
    pixels: object
    model: object
    metrics: dict

    @classmethod
    def load(cls, run_dir: Path) -> "Run":
        from train.rundir import load_keras_model, load_run_data
        rows, pixels, cfg = load_run_data(run_dir)
        return cls(run_dir, cfg, rows, pixels, load_keras_model(run_dir / "model.h5"),
                   json.loads((run_dir / "metrics.json").read_text()))

    def index(self, split: str):
        return self.rows.index[self.rows["split"] == split].to_numpy()

    @property
    def y(self):
        return self.rows["target"].to_numpy().astype("float32")

    @property
    def dx(self):
        """Diagnosis indices (train.data.DIAGNOSES, -1 unknown) for a multi-task run, else None."""
        return self.rows["dx"].to_numpy().astype("int32") if self.cfg.target == "multitask" else None


def prune(run: Run, sparsity: float, epochs: int, lr: float):
    """Prune the run's model; writes <run>/pruned.h5 and <run>/prune_report.json."""
    from edge import gzip_size
    from train.backbones import REGISTRY
    from train.rundir import save_keras_model
    from . import prune as P
    cfg = run.cfg
    first = REGISTRY[cfg.backbone][1].num_blocks - max(cfg.top_blocks, 1)
    steps = (len(run.index("train")) // cfg.batch_size) * epochs
    pruned = P.apply_pruning(run.model, cfg.backbone, first, sparsity, 0, max(1, int(steps * 0.8)))
    t0 = time.time()
    P.fine_tune_pruned(pruned, run.pixels, run.y, run.index("train"), epochs, lr, cfg.batch_size, cfg.training_seed,
                       cfg.class_weighting, dx=run.dx)
    stripped = P.strip(pruned)
    save_keras_model(stripped, run.path / "pruned.h5")
    layers = P.sparsity_report(stripped)
    before, after = gzip_size(P.keras_weight_bytes(run.model)), gzip_size(P.keras_weight_bytes(stripped))
    total = sum(r["weights"] for r in layers)
    report = {"target_sparsity": sparsity, "schedule": "PolynomialDecay 0 -> target over 80% of the fine-tune",
              "fine_tune_epochs": epochs, "fine_tune_lr": lr, "fine_tune_seconds": round(time.time() - t0),
              "pruned_scope": f"Conv2D/Dense of blocks >= {first}, the top conv and the head",
              "overall_sparsity_conv_dense": sum(r["weights"] * r["sparsity"] for r in layers) / total,
              "keras_weights_gzip_bytes_before": before, "keras_weights_gzip_bytes_after": after, "layers": layers}
    (run.path / "prune_report.json").write_text(json.dumps(report, indent=2))
    log(f"pruned: sparsity {report['overall_sparsity_conv_dense']:.3f} of Conv2D/Dense weights; "
        f"gzip weights {before / 1e6:.2f} MB -> {after / 1e6:.2f} MB")
    return stripped, report


def qat(run: Run, images: int, lr: float, epochs: int, calibration: int):
    """QAT fine-tune of the run's model (efficientnet_lite0/lite1, mobilenet_v2) for the int8 export."""
    from .qat import quantize_aware
    cfg = run.cfg
    t0 = time.time()
    model, done = quantize_aware(run.model, run.pixels, run.y, run.index("train"), images, lr, cfg.batch_size,
                                 cfg.training_seed, cfg.class_weighting, calibration=calibration, epochs=epochs,
                                 dx=run.dx)
    info = {"method": "quantization-aware training (tfmot) + int8 conversion", **done,
            "qat_seconds": round(time.time() - t0), "not_quantized_in_training": "Rescaling (input scaling)"}
    log(f"QAT fine-tune on {info['qat_images']} images in {info['qat_seconds']}s")
    return model, info


def source_model(run: Run, variant: str, pruned, qat_result):
    """(Keras model to convert, quantization facts, extra sidecar fields) for one variant."""
    from train.rundir import load_keras_model
    if variant == "pruned_int8":
        if pruned is None:
            if not (run.path / "pruned.h5").exists():
                raise FileNotFoundError(f"{run.path / 'pruned.h5'} missing: run `python -m quantize prune` first")
            pruned = (load_keras_model(run.path / "pruned.h5"),
                      json.loads((run.path / "prune_report.json").read_text()))
        return pruned[0], {}, {"pruning": {k: v for k, v in pruned[1].items() if k != "layers"}}
    if variant == "int8" and qat_result is not None:
        return qat_result[0], qat_result[1], {}
    return run.model, {}, {}


def convert(run: Run, variants: list[str], out_dir: Path, calibration: int, pruned=None, qat_result=None,
            why_not_qat: str = PTQ_CHOSEN) -> list[dict]:
    from edge import gzip_size
    from . import convert as C
    out_dir.mkdir(parents=True, exist_ok=True)
    keras_probs = C.keras_predictions(run.model, run.rows, run.pixels, run.metrics.get("melanoma_rule", "binary"))
    rep, n_cal = C.representative_data(run.pixels, run.index("train"), calibration, run.cfg.seed)
    results = []
    for variant in variants:
        src, qat_info, extra = source_model(run, variant, pruned, qat_result)
        t0 = time.time()
        data, how = C.convert(src, variant, rep if "int8" in variant else None)
        quant = {**how, "method": "post-training quantization" if variant != "float32" else "none",
                 "calibration_images": n_cal if "int8" in variant else 0,
                 "calibration_source": "training split" if "int8" in variant else None, **qat_info}
        if variant == "int8" and not qat_info:
            quant["why_not_qat"] = why_not_qat
        name = f"{run.cfg.backbone}_{variant}.tflite"
        meta = C.export(data, out_dir / name, backbone=run.cfg.backbone, variant=variant, quantization=quant,
                        cfg=run.cfg.to_dict(), run_metrics=run.metrics, rows=run.rows, pixels=run.pixels,
                        keras_probs=keras_probs, extra={**extra, "head": C.head_weights(src)})
        m, par = meta["metrics"]["test"]["all"], meta["metrics"]["parity_vs_keras_float"]
        results.append({"file": name, "size_bytes": len(data), "gzip_bytes": gzip_size(data),
                        "test_auc": m["roc_auc"], "test_auc_ci95": m["roc_auc_ci95"], "sensitivity": m["sensitivity"],
                        "specificity": m["specificity"], "threshold": meta["threshold"],
                        "delta_auc_vs_keras": par["delta_auc"], "abs_prob_diff_median": par["abs_prob_diff_median"],
                        "abs_prob_diff_p99": par["abs_prob_diff_p99"]})
        log(f"{name}: {len(data) / 1e6:.2f} MB, test AUC {m['roc_auc']:.4f}, sens {m['sensitivity']:.3f}, "
            f"spec {m['specificity']:.3f}, dAUC vs Keras {par['delta_auc']:+.4f} [{time.time() - t0:.0f}s]")
    return results


def recalibrate(model: Path, threads: int = 2) -> dict:
    """Fit Platt calibration for an exported file on its own validation split (rebuilt from the
    config in its sidecar, and checked: same split counts, same validated threshold), and
    rewrite its sidecar with the calibration and the calibrated test metrics."""
    from edge import read_sidecar, write_sidecar
    from train.evaluate import choose_threshold, full_report, predict_tflite
    from train.rundir import load_sidecar_data
    from . import convert as C
    meta = read_sidecar(model)
    rows, pixels, cfg = load_sidecar_data(model)
    keep = rows.index[rows["split"].isin(["val", "test"])].to_numpy()
    preds = rows.loc[keep, ["image", "source", "split", "target"]].assign(
        probability=predict_tflite(model, pixels, keep, threads))
    if choose_threshold(preds, cfg.target_sensitivity)["threshold"] != meta["threshold"]:
        raise ValueError(f"{model.name}: its validation predictions do not give its own threshold")
    calibrated, cal = C.calibrate(preds, meta["threshold"])
    report = full_report(calibrated, cal.get("probability_threshold", meta["threshold"]), cfg.bootstrap, cfg.seed)
    meta = {k: v for k, v in meta.items() if k not in ("calibration", "calibration_skipped", "file", "sha256",
                                                         "size_bytes", "schema_version")}
    meta["metrics"] = {**meta["metrics"], **report}
    meta["calibration" if cal.get("method") == "platt" else "calibration_skipped"] = cal
    write_sidecar(model, meta)
    log(f"{model.name}: Platt a={cal.get('a', float('nan')):.3f} b={cal.get('b', float('nan')):.3f}; "
        f"test ECE {cal.get('ece', {}).get('test_before', float('nan')):.3f} -> "
        f"{cal.get('ece', {}).get('test_after', float('nan')):.3f}")
    return cal


def refit_refusals(model: Path, threads: int = 2) -> dict:
    """Fit the refusal gate and measure the quality checks again for an exported file, as the
    export does (training embeddings; threshold on its validation split, rebuilt from its
    sidecar), and rewrite the sidecar's `gate`, `quality` and `metrics.refusals`."""
    from edge import read_sidecar, write_sidecar
    from train.rundir import load_sidecar_data
    from . import convert as C
    meta = read_sidecar(model)
    rows, pixels, cfg = load_sidecar_data(model)
    refusals = C.fit_refusals(model, rows, pixels, cfg.seed, threads)
    if "refusal_metrics" not in refusals:
        raise ValueError(f"{model.name} has no embedding output: re-export it to give it a refusal gate")
    meta = {k: v for k, v in meta.items() if k not in ("file", "sha256", "size_bytes", "schema_version")}
    meta.update({k: v for k, v in refusals.items() if k != "refusal_metrics"})
    meta["metrics"] = {**meta["metrics"], "refusals": refusals["refusal_metrics"]}
    write_sidecar(model, meta)
    m = refusals["refusal_metrics"]
    log(f"{model.name}: gate threshold {refusals['gate']['threshold']:.3f}; lesions refused: validation "
        f"{m['gate_val_refused']:.1%}, test {m['gate_test_refused']:.1%}")
    return refusals


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="python -m quantize", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter, epilog=EXIT_TEXT)
    sub = ap.add_subparsers(dest="command", required=True)
    cmds = {c: sub.add_parser(c, help=h, description=h[0].upper() + h[1:] + ".", epilog=EXIT_TEXT,
                              formatter_class=argparse.ArgumentDefaultsHelpFormatter) for c, h in (("prune", "prune the run's model (pruned.h5)"),
                                                     ("convert", "export .tflite variants with sidecars"),
                                                     ("all", "prune, then export every variant"),
                                                     ("card", "render MODEL_CARD.md from the sidecars"),
                                                     ("calibrate", "fit Platt calibration of exported files"),
                                                     ("refusals", "fit the refusal gate of exported files again"))}
    cmds["calibrate"].add_argument("models", type=Path, nargs="+", help=".tflite files with sidecars (rewritten)")
    cmds["refusals"].add_argument("models", type=Path, nargs="+", help=".tflite files with sidecars (rewritten)")
    cmds["card"].add_argument("--models", type=Path, default=MODELS_DIR, help="folder of sidecars")
    cmds["card"].add_argument("--out", type=Path, default=WORKSPACE / "MODEL_CARD.md", help="the card to write")
    for name in ("prune", "convert", "all"):
        p = cmds[name]
        p.add_argument("--run", type=Path, required=True, help="run folder from python -m train")
        if name in ("prune", "all"):
            p.add_argument("--sparsity", type=float, default=0.5, help="target sparsity")
            p.add_argument("--prune-epochs", type=int, default=1, help="fine-tune epochs while pruning")
            p.add_argument("--prune-lr", type=float, default=5e-5, help="fine-tune learning rate")
        if name in ("convert", "all"):
            add_convert_flags(p)
    return ap


def add_convert_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--out", type=Path, help="output folder; None: <run>/export (models/ holds the shipped files)")
    p.add_argument("--force", action="store_true", help="replace .tflite/.json files that already exist in --out")
    p.add_argument("--variants", nargs="+", choices=VARIANTS, default=list(VARIANTS), help="what to export")
    p.add_argument("--calibration", type=int, default=300, help="training images for int8 calibration (at least 200)")
    p.add_argument("--report", type=Path, help="JSON summary of the exported files; None: <run>/export_report.json")
    p.add_argument("--int8-method", choices=["auto", "qat", "ptq"], default="auto",
                   help="auto (default): quantization-aware training where tfmot supports the backbone "
                        "(efficientnet_lite0/lite1, mobilenet_v2), post-training int8 otherwise (MobileNetV3). "
                        "qat: require QAT. ptq: post-training int8 only")
    p.add_argument("--qat-images", type=int, default=2048, help="training images for the QAT fine-tune")
    p.add_argument("--qat-lr", type=float, default=2e-6, help="QAT fine-tune learning rate (Adam)")
    p.add_argument("--qat-epochs", type=int, default=1, help="QAT fine-tune epochs")
    p.add_argument("--qat-calibration", type=int, default=512,
                   help="training images whose mean per-batch min/max start the QAT activation ranges")


def usage_problem(args, backbone: str | None = None) -> str | None:
    """What is wrong with the arguments, checked before anything is loaded or written."""
    if not (args.run / "model.h5").is_file():
        return f"{args.run / 'model.h5'} not found; train first with python -m train"
    if args.command == "prune":
        return None
    if args.calibration < 200:
        return "--calibration must be at least 200 images"
    cfg = json.loads((args.run / "config.json").read_text())
    clash = [args.out / f"{cfg['backbone']}_{v}{s}" for v in args.variants for s in (".tflite", ".json")
             if (args.out / f"{cfg['backbone']}_{v}{s}").exists()]
    if clash and not args.force:
        return f"{clash[0]} exists (the shipped model?); pass --force to replace it, or another --out"
    return None


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    if args.command == "card":
        try:
            from .card import write_card
        except ImportError as e:
            print(f"error: the model card needs {e.name}: pip install -r requirements.txt (or '.[all]')", file=sys.stderr)
            return EXIT_USAGE
        return write_card(args.models, args.out)
    if args.command in ("calibrate", "refusals"):
        for model in args.models:
            (recalibrate if args.command == "calibrate" else refit_refusals)(model)
        return EXIT_OK
    if args.command != "prune":
        args.out = args.out or args.run / "export"
    problem = usage_problem(args)
    if problem:
        print(f"error: {problem}", file=sys.stderr)
        return EXIT_USAGE
    run = Run.load(args.run)
    pruned = None
    if args.command == "prune" or (args.command == "all" and "pruned_int8" in args.variants):
        pruned = prune(run, args.sparsity, args.prune_epochs, args.prune_lr)
    if args.command == "prune":
        return EXIT_OK
    from train.backbones import REGISTRY
    supported = REGISTRY[run.cfg.backbone][1].qat_supported
    if args.int8_method == "qat" and not supported:
        print(f"error: tfmot QAT does not support {run.cfg.backbone}", file=sys.stderr)
        return EXIT_USAGE
    use_qat = "int8" in args.variants and args.int8_method != "ptq" and supported
    qat_result = qat(run, args.qat_images, args.qat_lr, args.qat_epochs, args.qat_calibration) if use_qat else None
    why = PTQ_CHOSEN if supported else (f"tfmot quantize_model does not support {run.cfg.backbone} "
                                        "(hard-swish TFOpLambda): post-training full int8 instead")
    results = convert(run, args.variants, args.out, args.calibration, pruned, qat_result, why)
    report = args.report or (args.run / "export_report.json")
    report.write_text(json.dumps(results, indent=2) + "\n")
    log(f"wrote {report}")
    return EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
