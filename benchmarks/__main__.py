"""`python -m benchmarks latency|tradeoff|all`: measure every model variant, write reports/.

    python -m benchmarks all            # latency (with baselines) then the tradeoff table + plot
    python -m benchmarks latency [--model models/x.tflite ...] [--runs 200] [--threads 1 2]
    python -m benchmarks tradeoff       # reads the sidecars and reports/latency.json
    python -m benchmarks arm64          # the runner on arm64 (Debian bookworm under qemu) vs x86

Scripts, not timed tests: warm-up runs are dropped, each model runs in a fresh process, and
the machine (CPU, cores, backend) is written into every report.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

from edge import MODELS_DIR
from edge.runner import DEFAULT_MODEL
from train.config import WORKSPACE

from .measure import (REPO, bench_extras, bench_keras, bench_onnx, bench_scaling, bench_tflite, cold_start, file_sizes,
                      machine, peak_gflops, run_child)

MODELS = MODELS_DIR  # models/ in a checkout, edge/models when installed
REPORTS = WORKSPACE / "reports"


def default_threads() -> list[int]:
    return [t for t in (1, 2, 4) if t <= (os.cpu_count() or 1)]


# --------------------------------------------------------------------------- latency
def onnx_models(float_tflite: Path, folder: Path, log) -> dict[str, Path | str]:
    """The same network for ONNX Runtime: {"float32": the float32 .tflite converted by tf2onnx,
    "int8": that model statically quantized (QDQ, per-channel int8 weights, int8 activations) by
    onnxruntime.quantization, calibrated on the images the .tflite int8 export was calibrated on}.
    A value that is a string says why that file could not be made."""
    import subprocess
    out: dict[str, Path | str] = {}
    f32 = folder / "model.onnx"
    conv = subprocess.run([sys.executable, "-m", "tf2onnx.convert", "--tflite", str(float_tflite),
                           "--output", str(f32), "--opset", "17"], capture_output=True, text=True)
    if conv.returncode != 0:
        return {"float32": "tf2onnx conversion failed: " + (conv.stderr.strip().splitlines() or ["no message"])[-1]}
    out["float32"] = f32
    try:
        images = calibration_images(float_tflite)
    except Exception as e:  # no data folder or no training stack here
        out["int8"] = f"no calibration images ({type(e).__name__}: {e})"
        return out
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static

    class Reader(CalibrationDataReader):
        def __init__(self):
            import onnxruntime as ort
            name = ort.InferenceSession(str(f32), providers=["CPUExecutionProvider"]).get_inputs()[0].name
            self.items = iter([{name: x[None]} for x in images])

        def get_next(self):
            return next(self.items, None)
    int8 = folder / "model_int8.onnx"
    t0 = time.time()
    quantize_static(str(f32), str(int8), Reader(), quant_format=QuantFormat.QDQ, per_channel=True,
                    activation_type=QuantType.QInt8, weight_type=QuantType.QInt8)
    log(f"ONNX Runtime static int8 (QDQ) quantization on {len(images)} images in {time.time() - t0:.0f}s")
    out["int8"] = int8
    return out


def calibration_images(float_tflite: Path):
    """The training-split images the int8 .tflite export calibrated on (same seed, same count)."""
    import numpy as np
    from edge import read_sidecar
    from train.rundir import load_sidecar_data
    rows, pixels, cfg = load_sidecar_data(float_tflite)
    n = read_sidecar(float_tflite.with_name(float_tflite.name.replace("float32", "int8")))["quantization"][
        "calibration_images"]
    idx = rows.index[rows["split"] == "train"].to_numpy()
    pick = np.sort(np.random.default_rng(cfg.seed).choice(idx, size=min(n, len(idx)), replace=False))
    return [np.asarray(pixels[i], np.float32) for i in pick]


def cold_starts(default_model: Path, image: Path, backbone: str, image_size: int) -> dict:
    """Process start -> first printed prediction: the edge CLI vs a TensorFlow + Keras script."""
    edge_cmd = [sys.executable, "-m", "edge", "predict", str(image), "--json", "--model", str(default_model)]
    keras_script = (
        "import os; os.environ['TF_USE_LEGACY_KERAS']='1'; os.environ['TF_CPP_MIN_LOG_LEVEL']='3'\n"
        "import numpy as np\nfrom edge.preprocess import preprocess, PreprocessSpec\n"
        "from train.model import build_classifier\n"
        f"m, _ = build_classifier({backbone!r}, {image_size}, weights=None)\n"
        f"x = preprocess({str(image)!r}, PreprocessSpec(size=({image_size}, {image_size})))\n"
        "print(float(m(x[None], training=False).numpy()[0, 0]), flush=True)\n")
    # exit 4: the image was answered with a refusal (the demo image is a drawing the refusal gate
    # may turn away), after the same decode, invoke and gate as any answer
    return {"edge_cli_seconds": cold_start(edge_cmd, ok_codes=(0, 4)),
            "keras_tensorflow_seconds": cold_start([sys.executable, "-c", keras_script]),
            "edge_command": " ".join(edge_cmd[1:]),
            "keras_command": "python -c <import TF, build the Keras model, preprocess, predict>"}


def not_installed(*modules: str) -> str | None:
    """The first of `modules` that is not installed (an edge-only device has no TensorFlow)."""
    import importlib.util
    return next((m for m in modules if importlib.util.find_spec(m) is None), None)


def run_baselines(report: dict, models: list[Path], macs: dict, threads: list[int], runs: int, warmup: int, log):
    """Keras, ONNX Runtime and cold-start baselines in the same run; each one that cannot run
    here is recorded as skipped, with the reason, and the .tflite figures still get written."""
    for backbone in macs:
        size = json.loads(next(p for p in models if json.loads(p.with_suffix(".json").read_text())["model"] == backbone)
                          .with_suffix(".json").read_text())["input"]["shape"][1]
        absent = not_installed("tensorflow", "tf_keras")
        for t in threads if not absent else []:
            r = run_child("keras", backbone=backbone, image_size=size, threads=t, runs=max(50, runs // 2), warmup=warmup)
            macs[backbone] = r.pop("macs")
            report["baselines"].append({"name": f"{backbone} Keras float32 (batch 1)", "model": backbone, **r})
            log(f"Keras {backbone} threads={t}: p50 {r['latency_ms_p50']:.2f} ms")
        if absent:
            skip(report, f"{backbone} Keras float32 (batch 1)", f"{absent} is not installed (edge-only install?)", log)
        f32 = MODELS / f"{backbone}_float32.tflite"
        absent = not_installed("tf2onnx", "onnxruntime")
        if f32.exists() and absent:
            skip(report, f"{backbone} ONNX Runtime", f"{absent} is not installed", log)
        if f32.exists() and not absent:
            with tempfile.TemporaryDirectory() as d:
                try:
                    files = onnx_models(f32, Path(d), log)
                except Exception as e:  # a converter or quantizer failure must not lose the report
                    files = {"float32": f"ONNX conversion failed: {type(e).__name__}: {e}"}
                for kind, path in files.items():
                    name = f"{backbone} ONNX Runtime {kind}" + (" (static QDQ, same calibration images)"
                                                               if kind == "int8" else f" (tf2onnx of {f32.name})")
                    if isinstance(path, str):
                        skip(report, name, path, log)
                        continue
                    for t in threads:
                        try:
                            r = run_child("onnx", path=str(path), threads=t, runs=runs, warmup=warmup)
                        except (RuntimeError, ImportError) as e:
                            report["baselines"].append({"name": name, "error": str(e)})
                            break
                        report["baselines"].append({"name": name, "model": backbone, "runtime": "onnxruntime",
                                                    "precision": kind, **r})
                        log(f"{name} threads={t}: p50 {r['latency_ms_p50']:.2f} ms")
    image = REPO / "tests" / "fixtures" / "lesion.jpg"
    default = MODELS / DEFAULT_MODEL.name
    if not_installed("tensorflow", "tf_keras"):
        skip(report, "cold start (edge CLI vs TensorFlow + Keras)", "TensorFlow is not installed", log)
    elif image.exists() and default.exists():
        meta = json.loads(default.with_suffix(".json").read_text())
        report["cold_start"] = cold_starts(default, image, meta["model"], meta["input"]["shape"][1])
        log(f"cold start: edge CLI {report['cold_start']['edge_cli_seconds']:.2f} s, "
            f"TF+Keras {report['cold_start']['keras_tensorflow_seconds']:.2f} s")


def skip(report: dict, name: str, why: str, log) -> None:
    report["baselines"].append({"name": name, "skipped": why})
    log(f"skipped {name}: {why}")


def run_latency(models: list[Path], threads: list[int], runs: int, warmup: int, baselines: bool, log) -> dict:
    m = machine()
    report = {"generated": time.strftime("%Y-%m-%d %H:%M:%S %Z"), "machine": m, "peak": peak_gflops(m),
              "runs": runs, "warmup_runs": warmup, "threads": threads, "models": [], "baselines": []}
    macs: dict[str, int] = {}
    for path in models:
        meta = json.loads(path.with_suffix(".json").read_text())
        entry = {"file": path.name, "model": meta["model"], "variant": meta["variant"], **file_sizes(path), "by_threads": {}}
        for t in threads:
            r = run_child("tflite", path=str(path), threads=t, runs=runs, warmup=warmup)
            entry["by_threads"][str(t)] = r
            log(f"{path.name} threads={t}: p50 {r['latency_ms_p50']:.2f} ms, p99 {r['latency_ms_p99']:.2f} ms, "
                f"init {r['init_ms']:.0f} ms, peak RSS {r['peak_memory_mb']:.0f} MB")
        if len(threads) > 1:
            entry["scaling"] = run_child("scaling", path=str(path), threads=threads, runs=runs, warmup=warmup)
            log(f"{path.name} thread scaling (interleaved): " + ", ".join(
                f"{t} threads {p:.2f} ms (x{entry['scaling']['speedup'][t]:.2f})"
                for t, p in entry["scaling"]["p50_ms"].items()))
        report["models"].append(entry)
        macs.setdefault(meta["model"], 0)
    default = MODELS / DEFAULT_MODEL.name
    if default in models:
        report["explain_and_refuse"] = {str(t): run_child("extras", path=str(default), threads=t, runs=runs,
                                                          warmup=warmup) for t in threads}
        for t, r in report["explain_and_refuse"].items():
            log(f"{default.name} threads={t}: scores only {r['scores_only_ms_p50']:.2f} ms, with heatmap + gate "
                f"{r['with_extras_ms_p50']:.2f} ms ({100 * r['overhead_fraction']:+.1f} %); quality checks "
                f"{r.get('quality_checks_ms_p50') or 0:.2f} ms; Shades of Grey {r['shades_of_grey_ms_p50']:.2f} ms")
    if baselines:
        run_baselines(report, models, macs, threads, runs, warmup, log)
    for entry in report["models"] + [b for b in report["baselines"] if "model" in b and "latency_ms_p50" in b]:
        n = macs.get(entry["model"])
        if n:
            entry["macs"] = n
            integer = "int8" in entry.get("variant", "")
            peak = report["peak"]["int8_peak_gops" if integer else "fp32_peak_gflops"]
            rows = entry["by_threads"].values() if "by_threads" in entry else [entry]
            for r in rows:
                # the peak is for the whole machine; scale by the threads actually used
                used = peak * min(r["num_threads"], report["machine"]["cores"]) / report["machine"]["cores"]
                r["achieved_gflops"] = 2 * n / (r["latency_ms_p50"] / 1000) / 1e9
                r["fraction_of_peak"] = r["achieved_gflops"] / used
                r["peak_used"] = "int8" if integer else "fp32"
    return report


def latency_markdown(report: dict) -> str:
    m = report["machine"]
    lines = ["# Latency report", "", f"Machine: {m['cpu']}, {m['cores']} cores, {m['arch']}, SIMD {', '.join(m['simd'])}; "
             f"backend {m['backend']}; Python {m['python']}. Generated {report['generated']}.", "",
             f"{report['runs']} timed runs after {report['warmup_runs']} warm-up runs, batch 1, one process per measurement. "
             f"Peak estimate: fp32 {report['peak']['fp32_peak_gflops']:.0f} GFLOP/s, int8 {report['peak']['int8_peak_gops']:.0f} GOP/s "
             f"for all cores ({report['peak']['derivation']}). '% of peak' compares with the peak of the threads used, "
             "int8 variants with the int8 peak. GFLOP/s = 2 x multiply-accumulates / median latency.", "",
             "| file | threads | size MB | gzip MB | init ms | first ms | p50 ms | p90 ms | p99 ms | peak RSS MB | GFLOP/s | % of peak |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for e in report["models"]:
        for t, r in e["by_threads"].items():
            lines.append(f"| {e['file']} | {t} | {e['model_size_bytes'] / 1e6:.2f} | {e['model_gzip_bytes'] / 1e6:.2f} | "
                         f"{r['init_ms']:.0f} | {r['first_inference_ms']:.1f} | {r['latency_ms_p50']:.2f} | "
                         f"{r['latency_ms_p90']:.2f} | {r['latency_ms_p99']:.2f} | {r['peak_memory_mb']:.0f} | "
                         f"{r.get('achieved_gflops', 0):.1f} | {100 * r.get('fraction_of_peak', 0):.1f} |")
    scaled = [e for e in report["models"] if "scaling" in e]
    if scaled:
        ts = scaled[0]["scaling"]["threads"]
        lines += ["", "## Thread scaling (interleaved in one process)", "",
                  "The table above runs every thread count in its own process, one after the other, so the "
                  "machine's drift between them weighs on small differences. Here one process holds an "
                  "interpreter per thread count and times them in turn (same runs and warm-up): p50 and speed-up "
                  f"over {ts[0]} thread(s).", "",
                  "| file | " + " | ".join(f"{t} thread(s) p50 ms" for t in ts) + " | " +
                  " | ".join(f"speed-up at {t}" for t in ts[1:]) + " |", "|---|" + "---|" * (2 * len(ts) - 1)]
        for e in scaled:
            sc = e["scaling"]
            lines.append(f"| {e['file']} | " + " | ".join(f"{sc['p50_ms'][str(t)]:.2f}" for t in ts) + " | " +
                         " | ".join(f"{sc['speedup'][str(t)]:.2f}x" for t in ts[1:]) + " |")
    if report["baselines"]:
        lines += ["", "## Baselines (same run)", "", "| baseline | threads | init ms | first ms | p50 ms | p90 ms | p99 ms | peak RSS MB |",
                  "|---|---|---|---|---|---|---|---|"]
        for b in report["baselines"]:
            if "error" in b or "skipped" in b:
                why = f"failed: {b['error']}" if "error" in b else f"skipped: {b['skipped']}"
                lines.append(f"| {b['name']} | - | {why} | | | | | |")
            else:
                lines.append(f"| {b['name']} | {b['num_threads']} | {b['init_ms']:.0f} | {b['first_inference_ms']:.1f} | "
                             f"{b['latency_ms_p50']:.2f} | {b['latency_ms_p90']:.2f} | {b['latency_ms_p99']:.2f} | {b['peak_memory_mb']:.0f} |")
    lines += int8_comparison(report)
    if "explain_and_refuse" in report:
        lines += ["", "## Heatmap, refusal gate and colour constancy on the default model (same run)", "",
                  "Per image, after decoding and preprocessing: `scores only` = quantize the array, invoke, read the "
                  "scores (answering without heatmap or gate); `with heatmap + gate` = `classify`'s path: the same "
                  "invoke also reading the feature map and the embedding, plus the class activation maps and the gate "
                  "distance. The quality checks (run on the decoded image before the invoke) and Shades of Grey are "
                  "timed on their own on the 224x224 array.", "",
                  "| threads | scores only p50 ms | with heatmap + gate p50 ms | overhead | quality checks p50 ms | "
                  "Shades of Grey p50 ms |", "|---|---|---|---|---|---|"]
        for t, r in report["explain_and_refuse"].items():
            quality = r.get("quality_checks_ms_p50")
            lines.append(f"| {t} | {r['scores_only_ms_p50']:.2f} | {r['with_extras_ms_p50']:.2f} | "
                         f"{100 * r['overhead_fraction']:+.1f} % | {'-' if quality is None else f'{quality:.2f}'} | "
                         f"{r['shades_of_grey_ms_p50']:.2f} |")
        tta = {t: r for t, r in report["explain_and_refuse"].items() if "tta_ms_p50" in r}
        if tta:
            lines += ["", "Test-time augmentation (`--tta`: the 8 flips and 90-degree rotations, 8 invokes), per "
                      "preprocessed image: " + "; ".join(f"{t} thread(s) {r['tta_ms_p50']:.2f} ms against "
                                                         f"{r['single_view_ms_p50']:.2f} ms for one view"
                                                         for t, r in tta.items()) + "."]
    if "cold_start" in report:
        c = report["cold_start"]
        lines += ["", "## Cold start (process start to first printed prediction)", "",
                  f"- `{c['edge_command']}`: {c['edge_cli_seconds']:.2f} s",
                  f"- TensorFlow + Keras script: {c['keras_tensorflow_seconds']:.2f} s"]
    macs = {e["model"]: e["macs"] for e in report["models"] if "macs" in e}
    if macs:
        lines += ["", "## Compute", ""] + [f"- {k}: {v / 1e6:.0f} M multiply-accumulates per image" for k, v in macs.items()]
    return "\n".join(lines) + "\n"


def int8_comparison(report: dict) -> list[str]:
    """int8 TFLite against ONNX Runtime int8 on the same network, per thread count, said plainly."""
    out = []
    for e in report["models"]:
        if not e["file"].endswith("_int8.tflite") or "pruned" in e["file"]:
            continue
        onnx = {b["num_threads"]: b for b in report["baselines"] if b.get("model") == e.get("model")
                and b.get("precision") == "int8" and "latency_ms_p50" in b}
        rows = [(int(t), r["latency_ms_p50"], onnx[int(t)]["latency_ms_p50"]) for t, r in e["by_threads"].items()
                if int(t) in onnx]
        if not rows:
            continue
        out += ["", f"## {e['file']} against ONNX Runtime int8 (same network, same calibration images)", "",
                "| threads | TFLite int8 p50 ms | ONNX Runtime int8 p50 ms | ratio | faster |", "|---|---|---|---|---|"]
        for t, a, b in rows:
            out.append(f"| {t} | {a:.2f} | {b:.2f} | {b / a:.2f} | {'TFLite' if a < b else 'ONNX Runtime'} |")
        slower = [t for t, a, b in rows if a >= b]
        out.append("")
        out.append("The TFLite int8 file is faster at every thread count measured." if not slower else
                   f"The TFLite int8 file is NOT faster at {', '.join(map(str, slower))} thread(s).")
    return out


# --------------------------------------------------------------------------- tradeoff
def pareto(points: list[tuple[float, float]]) -> list[bool]:
    """Not dominated: no other point is at least as fast and at least as accurate, and better in one."""
    out = []
    for i, (lat, auc) in enumerate(points):
        dominated = any((l2 <= lat and a2 >= auc) and (l2 < lat or a2 > auc) for j, (l2, a2) in enumerate(points) if j != i)
        out.append(not dominated)
    return out


def tta_tradeoff_row(rows: list[dict], latency: dict | None, threads: int, tta_metrics: Path | None) -> dict | None:
    """The default int8 file with test-time augmentation, when both its evaluation
    (`python -m train.evaluate --model ... --tta --out reports/default_int8_tta`) and its TTA
    latency (this latency run) exist."""
    default = next((r for r in rows if r["file"] == DEFAULT_MODEL.name), None)
    timing = ((latency or {}).get("explain_and_refuse") or {}).get(str(threads), {})
    if default is None or tta_metrics is None or not tta_metrics.is_file() or "tta_ms_p50" not in timing:
        return None
    test = json.loads(tta_metrics.read_text())["test"]["all"]
    ratio = timing["tta_ms_p50"] / timing["single_view_ms_p50"]
    return {**default, "file": f"{default['file']} --tta", "variant": "int8 + TTA (8 views)",
            "roc_auc": test["roc_auc"], "roc_auc_ci95": test["roc_auc_ci95"], "sensitivity": test["sensitivity"],
            "specificity": test["specificity"], "latency_ms_p50": default["latency_ms_p50"] * ratio,
            "latency_ms_p90": default["latency_ms_p90"] * ratio,
            "latency_note": f"the file's invoke p50 x {ratio:.2f} (TTA / one view, measured in the same run)"}


def run_tradeoff(models: list[Path], latency: dict | None, threads: int, log, tta_metrics: Path | None = None) -> dict:
    rows = []
    lat_by_file = {e["file"]: e for e in (latency or {}).get("models", [])}
    for path in models:
        meta = json.loads(path.with_suffix(".json").read_text())
        test = meta["metrics"]["test"]["all"]
        lat = lat_by_file.get(path.name, {}).get("by_threads", {}).get(str(threads))
        if lat is None:
            lat = bench_tflite(path, threads, 100, 10)
        rows.append({"file": path.name, "model": meta["model"], "variant": meta["variant"],
                     "roc_auc": test["roc_auc"], "roc_auc_ci95": test["roc_auc_ci95"],
                     "sensitivity": test["sensitivity"], "specificity": test["specificity"],
                     "threshold": meta["threshold"], "size_bytes": path.stat().st_size,
                     "latency_ms_p50": lat["latency_ms_p50"], "latency_ms_p90": lat["latency_ms_p90"]})
    tta_row = tta_tradeoff_row(rows, latency, threads, tta_metrics)
    if tta_row:
        rows.append(tta_row)
    for r, p in zip(rows, pareto([(r["latency_ms_p50"], r["roc_auc"]) for r in rows])):
        r["pareto"] = p
    m = latency["machine"] if latency else machine()
    return {"generated": time.strftime("%Y-%m-%d %H:%M:%S %Z"), "machine": m, "threads": threads,
            "split": "held-out test split (grouped by patient/lesion); threshold chosen on validation", "rows": rows}


def tradeoff_markdown(rep: dict) -> str:
    m = rep["machine"]
    lines = ["# Accuracy-latency tradeoff", "", f"Machine: {m['cpu']}, {m['cores']} cores, backend {m['backend']}. "
             f"Generated {rep['generated']}. Latency: median per image at {rep['threads']} threads. {rep['split']}.", "",
             "| file | ROC AUC (95% CI) | sensitivity | specificity | threshold | size MB | p50 ms | p90 ms | Pareto |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in rep["rows"]:
        lo, hi = r["roc_auc_ci95"]
        lines.append(f"| {r['file']} | {r['roc_auc']:.3f} ({lo:.3f}-{hi:.3f}) | {r['sensitivity']:.3f} | {r['specificity']:.3f} | "
                     f"{r['threshold']:.3f} | {r['size_bytes'] / 1e6:.2f} | {r['latency_ms_p50']:.2f} | {r['latency_ms_p90']:.2f} | "
                     f"{'yes' if r['pareto'] else ''} |")
    lines += [f"\n{r['file']}: latency = {r['latency_note']}; same threshold as the file." for r in rep["rows"]
              if "latency_note" in r]
    return "\n".join(lines) + "\n"


def tradeoff_plot(rep: dict, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(6.5, 4.5))
    for i, r in enumerate(rep["rows"]):
        lo, hi = r["roc_auc_ci95"]
        ax.errorbar(r["latency_ms_p50"], r["roc_auc"], yerr=[[r["roc_auc"] - lo], [hi - r["roc_auc"]]],
                    fmt="o" if r["pareto"] else "s", color="C0" if r["pareto"] else "C7", capsize=3)
        ax.annotate(r["file"].replace(".tflite", ""), (r["latency_ms_p50"], r["roc_auc"]), fontsize=7,
                    xytext=(4, 4 - 12 * (i % 2)), textcoords="offset points")  # alternate: neighbours overlap
    front = sorted((r["latency_ms_p50"], r["roc_auc"]) for r in rep["rows"] if r["pareto"])
    if front:
        ax.plot(*zip(*front), "C0--", lw=1, label="Pareto front")
        ax.legend(fontsize=8)
    ax.set(xlabel=f"median latency per image, ms ({rep['threads']} threads)", ylabel="test ROC AUC (95% CI)",
           title="Accuracy vs latency of each shipped variant")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def merge_latency(old: dict | None, new: dict) -> dict:
    """The new measurements over the old report: models and baselines measured now replace their
    old entries, the rest are kept (a one-model run must not erase the six-model report)."""
    if not old:
        return new
    measured = {e["file"] for e in new["models"]}
    names = {b["name"] for b in new["baselines"]}
    merged = {**new, "models": [e for e in old.get("models", []) if e["file"] not in measured] + new["models"],
              "baselines": [b for b in old.get("baselines", []) if b["name"] not in names] + new["baselines"]}
    if "cold_start" in old and "cold_start" not in new:
        merged["cold_start"] = old["cold_start"]
    if old.get("machine") != new["machine"]:
        merged["note"] = "entries measured on different machines were merged: compare within one machine only"
    return merged


# --------------------------------------------------------------------------- CLI
def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter,
                                 epilog="`python -m benchmarks arm64 --help` lists the arm64 check's own options. "
                                        "Exit status: 0 reports written, 2 bad usage (no model, too few runs).")
    ap.add_argument("command", choices=["latency", "tradeoff", "all", "arm64", "ood"], help=(
        "latency: every variant (and baselines); tradeoff: table + Pareto plot from the sidecars and latency.json; "
        "all: both; arm64: the runner on arm64 under qemu vs x86; ood: the refusal gate on a generated "
        "out-of-distribution set (python -m benchmarks ood --help)"))
    ap.add_argument("--model", type=Path, nargs="+", help="model files (default: every .tflite in models/)")
    ap.add_argument("--threads", type=int, nargs="+", default=default_threads(),
                    help=f"interpreter thread counts to measure (default {' '.join(map(str, default_threads()))})")
    ap.add_argument("--runs", type=int, default=200, help="timed runs per measurement (at least 100; default 200)")
    ap.add_argument("--warmup", type=int, default=20, help="untimed runs before timing (default 20)")
    ap.add_argument("--no-baselines", action="store_true", help="skip Keras, ONNX Runtime and cold start")
    ap.add_argument("--out", type=Path, default=REPORTS,
                    help="report folder (default reports/); latency.json there is merged, not replaced")
    return ap


def main(argv=None) -> int:
    if argv is None:
        argv = sys.argv[1:]
    if argv[:1] == ["arm64"]:  # the arm64 emulation check, its own flags
        from .arm64 import main as arm64_main
        return arm64_main(argv[1:])
    if argv[:1] == ["ood"]:  # the refusal gate on a generated out-of-distribution set, its own flags
        return ood_main(argv[1:])
    if argv[:1] == ["_child"]:  # internal: one measurement in a fresh process
        kind, kw = argv[1], json.loads(argv[2])
        fn = {"tflite": lambda: bench_tflite(Path(kw["path"]), kw["threads"], kw["runs"], kw["warmup"]),
              "keras": lambda: bench_keras(**kw), "onnx": lambda: bench_onnx(**kw),
              "extras": lambda: bench_extras(Path(kw["path"]), kw["threads"], kw["runs"], kw["warmup"]),
              "scaling": lambda: bench_scaling(Path(kw["path"]), kw["threads"], kw["runs"], kw["warmup"])}[kind]
        print(json.dumps(fn()))
        return 0
    args = build_parser().parse_args(argv)
    models = args.model or sorted(MODELS.glob("*.tflite"))
    missing = [p for p in models if not p.is_file() or not p.with_suffix(".json").is_file()]
    if args.runs < 100:
        print("error: --runs must be at least 100 (percentiles of fewer runs are noise)", file=sys.stderr)
        return 2
    if not models or missing:
        print(f"error: no model (with sidecar) to benchmark: {missing or MODELS}", file=sys.stderr)
        return 2
    args.out.mkdir(parents=True, exist_ok=True)
    log = lambda s: print(s, flush=True)  # noqa: E731
    latency = None
    if args.command in ("latency", "all"):
        path = args.out / "latency.json"
        latency = run_latency(models, args.threads, args.runs, args.warmup, not args.no_baselines, log)
        latency = merge_latency(json.loads(path.read_text()) if path.is_file() else None, latency)
        path.write_text(json.dumps(latency, indent=2) + "\n")
        (args.out / "latency.md").write_text(latency_markdown(latency))
        log(f"wrote {args.out / 'latency.md'}")
    if args.command in ("tradeoff", "all"):
        if latency is None and (args.out / "latency.json").is_file():
            latency = json.loads((args.out / "latency.json").read_text())
        threads = 2 if 2 in args.threads else args.threads[0]
        rep = run_tradeoff(models, latency, threads, log, args.out / "default_int8_tta" / "metrics.json")
        (args.out / "tradeoff.json").write_text(json.dumps(rep, indent=2) + "\n")
        (args.out / "tradeoff.md").write_text(tradeoff_markdown(rep))
        if not_installed("matplotlib"):
            log(f"wrote {args.out / 'tradeoff.md'}; skipped tradeoff.png: matplotlib is not installed")
        else:
            tradeoff_plot(rep, args.out / "tradeoff.png")
            log(f"wrote {args.out / 'tradeoff.md'} and tradeoff.png")
    return 0


def ood_main(argv) -> int:
    from . import ood
    ap = argparse.ArgumentParser(prog="python -m benchmarks ood", description=ood.__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter,
                                 epilog="Exit status: 0 done, 2 bad usage (no model, no gate in its sidecar, "
                                        "scikit-image missing).")
    ap.add_argument("--model", type=Path, default=MODELS / DEFAULT_MODEL.name)
    ap.add_argument("--per-category", type=int, default=40, help="images per category (default 40)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--test-limit", type=int, default=0, help="test-split lesions to measure (0: all)")
    ap.add_argument("--out", type=Path, default=REPORTS, help="report folder (default reports/)")
    args = ap.parse_args(argv)
    if not_installed("skimage"):
        print("error: the out-of-distribution set needs scikit-image (pip install -r requirements.txt)", file=sys.stderr)
        return 2
    try:
        report = ood.measure(args.model, args.per_category, args.seed, args.test_limit)
    except (ValueError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    ood.write(report, args.out)
    print(ood.to_markdown(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
