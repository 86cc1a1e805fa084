"""`python -m quantize`: prune a trained model and export the .tflite files that ship.

    python -m quantize prune   --run runs/efficientnet_lite0            # pruned Keras model + report
    python -m quantize convert --run runs/efficientnet_lite0 --out models --variants int8 float16 ...
    python -m quantize all     --run runs/efficientnet_lite0 --out models  # prune, then every variant
    python -m quantize card                                                 # MODEL_CARD.md from the sidecars

Each .tflite gets a JSON sidecar with its threshold (chosen on validation with this very file)
and its test metrics computed through the edge runner.
"""
from __future__ import annotations

import argparse
import gzip
import json
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
PTQ_CHOSEN = ("post-training int8 requested with --int8-method ptq; the default (auto) uses quantization-aware "
              "training for backbones tfmot supports")


def log(msg: str) -> None:
    print(msg, flush=True)


def do_prune(run_dir: Path, sparsity: float, epochs: int, lr: float, ctx: dict) -> dict:
    """Prune the run's model; writes <run>/pruned.h5 and <run>/prune_report.json."""
    from . import prune as P
    from train.backbones import REGISTRY
    cfg, rows, pixels, model = ctx["cfg"], ctx["rows"], ctx["pixels"], ctx["model"]
    info = REGISTRY[cfg.backbone][1]
    first = info.num_blocks - max(cfg.top_blocks, 1)
    train_idx = rows.index[rows["split"] == "train"].to_numpy()
    y = rows["target"].to_numpy().astype("float32")
    steps = (len(train_idx) // cfg.batch_size) * epochs
    pruned = P.apply_pruning(model, cfg.backbone, first, sparsity, 0, max(1, int(steps * 0.8)))
    t0 = time.time()
    P.fine_tune_pruned(pruned, pixels, y, train_idx, epochs, lr, cfg.batch_size, cfg.seed, cfg.class_weighting)
    stripped = P.strip(pruned)
    stripped.save(str(run_dir / "pruned.h5"), include_optimizer=False)
    layers = P.sparsity_report(stripped)
    before, after = P.keras_gzip_size(model), P.keras_gzip_size(stripped)
    total = sum(r["weights"] for r in layers)
    report = {"target_sparsity": sparsity, "schedule": "PolynomialDecay 0 -> target over 80% of the fine-tune",
              "fine_tune_epochs": epochs, "fine_tune_lr": lr, "fine_tune_seconds": round(time.time() - t0),
              "pruned_scope": f"Conv2D/Dense of blocks >= {first}, the top conv and the head",
              "overall_sparsity_conv_dense": sum(r["weights"] * r["sparsity"] for r in layers) / total,
              "keras_weights_gzip_bytes_before": before, "keras_weights_gzip_bytes_after": after,
              "layers": layers}
    (run_dir / "prune_report.json").write_text(json.dumps(report, indent=2))
    log(f"pruned: sparsity {report['overall_sparsity_conv_dense']:.3f} of Conv2D/Dense weights; "
        f"gzip weights {before / 1e6:.2f} MB -> {after / 1e6:.2f} MB")
    ctx["pruned_model"], ctx["prune_report"] = stripped, report
    return report


def do_qat(images: int, lr: float, epochs: int, calibration: int, ctx: dict) -> None:
    """QAT fine-tune of the run's model (efficientnet_lite0, mobilenet_v2) for the int8 export."""
    from .qat import quantize_aware
    cfg, rows = ctx["cfg"], ctx["rows"]
    train_idx = rows.index[rows["split"] == "train"].to_numpy()
    t0 = time.time()
    ctx["qat_model"], done = quantize_aware(ctx["model"], ctx["pixels"], rows["target"].to_numpy().astype("float32"),
                                            train_idx, images, lr, cfg.batch_size, cfg.seed, cfg.class_weighting,
                                            calibration=calibration, epochs=epochs)
    ctx["qat_info"] = {"method": "quantization-aware training (tfmot) + int8 conversion", **done,
                       "qat_seconds": round(time.time() - t0), "not_quantized_in_training": "Rescaling (input scaling)"}
    log(f"QAT fine-tune on {ctx['qat_info']['qat_images']} images in {ctx['qat_info']['qat_seconds']}s")


def do_convert(variants: list[str], out_dir: Path, calibration: int, ctx: dict) -> list[dict]:
    from . import convert as C
    from train.loop import load_keras_model
    cfg, rows, pixels, model = ctx["cfg"], ctx["rows"], ctx["pixels"], ctx["model"]
    out_dir.mkdir(parents=True, exist_ok=True)
    keras_probs = C.keras_predictions(model, rows, pixels)
    train_idx = rows.index[rows["split"] == "train"].to_numpy()
    rep, n_cal = C.representative_data(pixels, train_idx, calibration, cfg.seed)
    results = []
    for variant in variants:
        src = model
        extra = {}
        if variant == "pruned_int8":
            src = ctx.get("pruned_model")
            if src is None:
                pruned_path = Path(cfg.out) / "pruned.h5"
                if not pruned_path.exists():
                    raise FileNotFoundError(f"{pruned_path} missing: run `python -m quantize prune` first")
                src = load_keras_model(pruned_path)
            report = ctx.get("prune_report") or json.loads((Path(cfg.out) / "prune_report.json").read_text())
            extra["pruning"] = {k: v for k, v in report.items() if k != "layers"}
        qat = variant == "int8" and "qat_model" in ctx
        if qat:
            src = ctx["qat_model"]
        t0 = time.time()
        data, how = C.convert(src, variant, rep if "int8" in variant else None)
        quant = {**how, "method": "post-training quantization" if variant != "float32" else "none",
                 "calibration_images": n_cal if "int8" in variant else 0,
                 "calibration_source": "training split" if "int8" in variant else None}
        if qat:
            quant.update(ctx["qat_info"])
        elif variant == "int8":
            quant["why_not_qat"] = ctx.get("why_not_qat", PTQ_CHOSEN)
        name = f"{cfg.backbone}_{variant}.tflite"
        meta = C.export(data, out_dir / name, backbone=cfg.backbone, variant=variant, quantization=quant,
                        cfg=cfg.to_dict(), run_metrics=ctx["run_metrics"], rows=rows, pixels=pixels,
                        keras_probs=keras_probs, extra=extra)
        m, par = meta["metrics"]["test"]["all"], meta["metrics"]["parity_vs_keras_float"]
        size = (out_dir / name).stat().st_size
        results.append({"file": name, "size_bytes": size, "gzip_bytes": len(gzip.compress(data, 9)),
                        "test_auc": m["roc_auc"], "test_auc_ci95": m["roc_auc_ci95"],
                        "sensitivity": m["sensitivity"], "specificity": m["specificity"],
                        "threshold": meta["threshold"], "delta_auc_vs_keras": par["delta_auc"],
                        "abs_prob_diff_median": par["abs_prob_diff_median"],
                        "abs_prob_diff_p99": par["abs_prob_diff_p99"]})
        log(f"{name}: {size / 1e6:.2f} MB, test AUC {m['roc_auc']:.4f}, sens {m['sensitivity']:.3f}, "
            f"spec {m['specificity']:.3f}, dAUC vs Keras {par['delta_auc']:+.4f} [{time.time() - t0:.0f}s]")
    return results


def load_context(run_dir: Path) -> dict:
    from train.loop import load_keras_model, load_run_data
    rows, pixels, cfg = load_run_data(run_dir)
    return {"cfg": cfg, "rows": rows, "pixels": pixels, "model": load_keras_model(run_dir / "model.h5"),
            "run_metrics": json.loads((run_dir / "metrics.json").read_text())}


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["card"]:
        from .card import main as card_main
        return card_main(argv[1:])
    ap = argparse.ArgumentParser(prog="python -m quantize", description=__doc__.split("\n")[0])
    sub = ap.add_subparsers(dest="command", required=True)
    cmds = {c: sub.add_parser(c) for c in ("prune", "convert", "all")}
    for name, p in cmds.items():
        p.add_argument("--run", type=Path, required=True, help="run folder from python -m train")
        if name in ("prune", "all"):
            p.add_argument("--sparsity", type=float, default=0.5, help="target sparsity (default 0.5)")
            p.add_argument("--prune-epochs", type=int, default=1, help="fine-tune epochs while pruning")
            p.add_argument("--prune-lr", type=float, default=5e-5)
        if name in ("convert", "all"):
            p.add_argument("--out", type=Path, default=REPO / "models", help="output folder (default models/)")
            p.add_argument("--variants", nargs="+", default=["float32", "float16", "dynamic", "int8", "pruned_int8"],
                           help="float32 float16 dynamic int8 pruned_int8")
            p.add_argument("--calibration", type=int, default=300, help="training images for int8 calibration")
            p.add_argument("--report", type=Path, help="write a JSON summary of the exported files here")
            p.add_argument("--int8-method", choices=["auto", "qat", "ptq"], default="auto",
                           help="auto (default): quantization-aware training where tfmot supports the backbone "
                                "(efficientnet_lite0, mobilenet_v2), post-training int8 otherwise (MobileNetV3). "
                                "qat: require QAT. ptq: post-training int8 only")
            p.add_argument("--qat-images", type=int, default=2048, help="training images for the QAT fine-tune")
            p.add_argument("--qat-lr", type=float, default=2e-6, help="QAT fine-tune learning rate (Adam)")
            p.add_argument("--qat-epochs", type=int, default=1)
            p.add_argument("--qat-calibration", type=int, default=512,
                           help="training images whose mean per-batch min/max start the QAT activation ranges")
    args = ap.parse_args(argv)
    if not (args.run / "model.h5").is_file():
        print(f"error: {args.run / 'model.h5'} not found; train first with python -m train", file=sys.stderr)
        return 2
    if getattr(args, "calibration", 200) < 200:
        print("error: --calibration must be at least 200 images", file=sys.stderr)
        return 2
    ctx = load_context(args.run)
    if args.command in ("prune", "all") and (args.command == "prune" or "pruned_int8" in args.variants):
        do_prune(args.run, args.sparsity, args.prune_epochs, args.prune_lr, ctx)
    if args.command in ("convert", "all"):
        from train.backbones import REGISTRY
        supported = REGISTRY[ctx["cfg"].backbone][1].qat_supported
        if not supported:
            ctx["why_not_qat"] = (f"tfmot quantize_model does not support {ctx['cfg'].backbone} "
                                  "(hard-swish TFOpLambda): post-training full int8 instead")
        if "int8" in args.variants and args.int8_method != "ptq":
            if supported:
                do_qat(args.qat_images, args.qat_lr, args.qat_epochs, args.qat_calibration, ctx)
            elif args.int8_method == "qat":
                print(f"error: tfmot QAT does not support {ctx['cfg'].backbone}", file=sys.stderr)
                return 2
        results = do_convert(args.variants, args.out, args.calibration, ctx)
        report = args.report or (args.run / "export_report.json")
        report.write_text(json.dumps(results, indent=2) + "\n")
        log(f"wrote {report}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
