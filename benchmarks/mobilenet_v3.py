"""Why MobileNetV3-Small int8 is slow here, and the fix (#16): which ops XNNPACK leaves to
TFLite's own kernels, into how many delegate partitions the graph falls, and the latency of the
same network with hard-swish written as the converter fuses it (one HARD_SWISH op, which the
XNNPACK delegate does not take in int8) against the same function in delegable ops.

    python -m benchmarks.mobilenet_v3 [--runs 200] [--threads 1 2]

Every candidate is the same MobileNetV3-Small (ImageNet weights from ../shared/weights when
present; latency does not depend on the values), converted to full int8 with 64 random
calibration images, timed alternately with the shipped `efficientnet_lite0_int8.tflite` in one
process per thread count. Writes reports/mobilenet_v3.{json,md}. Run it on an idle machine.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from collections import Counter
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
REPORTS = REPO / "reports"
LITE0 = REPO / "models" / "efficientnet_lite0_int8.tflite"
SHARED_WEIGHTS = REPO.parent / "shared" / "weights"


def delegation(path: Path) -> dict:
    """XNNPACK partitions of a .tflite file and the ops left outside them, from the
    interpreter's own node list after the default delegate is applied: DELEGATE nodes are the
    partitions; an original op is outside when it feeds a partition's inputs or reads its outputs
    and is not inside any (its output is not produced by a DELEGATE node)."""
    from edge import make_interpreter
    it, _ = make_interpreter(path, 1)
    ops = it._get_ops_details()
    partitions = [o for o in ops if o["op_name"] == "DELEGATE"]
    produced = {t for o in partitions for t in o["outputs"]}
    consumed = {t for o in partitions for t in o["inputs"]}
    original = [o for o in ops if o["op_name"] != "DELEGATE"]
    # an op runs outside XNNPACK iff its output is read by a partition (or is a model output)
    # while not produced by one, i.e. it is computed by TFLite's own kernel
    model_outputs = {d["index"] for d in it.get_output_details()}
    outside = [o for o in original if (set(o["outputs"]) & (consumed | model_outputs)) and not
               (set(o["outputs"]) & produced)]
    return {"ops": dict(Counter(o["op_name"] for o in original)), "partitions": len(partitions),
            "ops_outside_xnnpack": dict(Counter(o["op_name"] for o in outside))}


def build(form: str):
    """MobileNetV3-Small (no top, avg pooling, keras.applications) with hard-swish as `form`:
    'hard_swish' = keras' own x * relu6(x + 3) / 6 (fused by the converter into HARD_SWISH);
    'delegable' = the same function as (x / 6) * relu6(x + 3), which the converter leaves as
    MUL + ADD (fused ReLU6) + MUL, all in XNNPACK's int8 path; 'relu' = plain ReLU, fused into
    the convolutions (another function: the floor of what the activations cost)."""
    from train.backbones import mobilenet_v3_hard_swish
    import tf_keras as keras
    weights = SHARED_WEIGHTS / "weights_mobilenet_v3_small_224_1.0_float_no_top_v2.h5"
    with mobilenet_v3_hard_swish(form):
        return keras.applications.MobileNetV3Small(input_shape=(224, 224, 3), include_top=False, pooling="avg",
                                                   weights=str(weights) if weights.is_file() else None,
                                                   include_preprocessing=True)


def convert_int8(model) -> bytes:
    from train import tfenv  # noqa: F401
    import tensorflow as tf
    rng = np.random.default_rng(0)

    def rep():
        for _ in range(64):
            yield [rng.uniform(0, 255, (1, 224, 224, 3)).astype(np.float32)]
    conv = tf.lite.TFLiteConverter.from_keras_model(model)
    conv.optimizations = [tf.lite.Optimize.DEFAULT]
    conv.representative_dataset = rep
    conv.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS_INT8]
    conv.inference_input_type = tf.uint8
    conv.inference_output_type = tf.uint8
    return conv.convert()


def timed_pair(paths: list[Path], threads: int, runs: int, warmup: int) -> list[dict]:
    """p50/p90/p99 of each file's invoke, calls interleaved round-robin in this process."""
    from benchmarks.measure import latency_stats
    from edge import make_interpreter
    its = []
    for p in paths:
        it, _ = make_interpreter(p, threads)
        d = it.get_input_details()[0]
        x = np.random.default_rng(0).integers(0, 256, d["shape"]).astype(d["dtype"])
        its.append((it, d["index"], x))
    ms = [[] for _ in paths]
    for i in range(warmup + runs):
        for k, (it, idx, x) in enumerate(its):
            t0 = time.perf_counter()
            it.set_tensor(idx, x)
            it.invoke()
            if i >= warmup:
                ms[k].append((time.perf_counter() - t0) * 1000)
    return [latency_stats(m) for m in ms]


def markdown(rep: dict) -> str:
    lines = ["# MobileNetV3-Small int8: XNNPACK partitions and latency", "",
             f"Generated by `python -m benchmarks.mobilenet_v3` on {rep['machine']['cpu']}, {rep['machine']['cores']} "
             f"cores, {rep['generated']}; {rep['runs']} timed invokes after {rep['warmup']} warm-up, files timed "
             "alternately in one process. Same network and weights; only how hard-swish is written differs.", "",
             "| file | XNNPACK partitions | ops outside XNNPACK | " +
             " | ".join(f"p50 ms {t} thr | ratio to Lite0 {t} thr" for t in rep["threads"]) + " |",
             "|---|---|---|" + "---|---|" * len(rep["threads"])]
    for c in rep["candidates"]:
        cells = [f"{c['by_threads'][str(t)]['latency_ms_p50']:.2f} | {c['by_threads'][str(t)]['ratio_to_lite0']:.2f}"
                 for t in rep["threads"]]
        lines.append(f"| {c['name']} | {c['partitions']} | {c['ops_outside_xnnpack'] or '-'} | " + " | ".join(cells) + " |")
    lines += ["", "Op counts: " + "; ".join(f"{c['name']}: {c['ops']}" for c in rep["candidates"]), ""]
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.mobilenet_v3", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runs", type=int, default=200)
    ap.add_argument("--warmup", type=int, default=20)
    ap.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--extra", type=Path, nargs="*", default=[], help="more .tflite files to analyse and time")
    ap.add_argument("--out", type=Path, default=REPORTS)
    args = ap.parse_args(argv)
    if not LITE0.is_file():
        print(f"error: {LITE0} not found (the Lite0 reference of the ratios)", file=sys.stderr)
        return 2
    from benchmarks.measure import machine
    work = args.out / "mobilenet_v3_candidates"
    work.mkdir(parents=True, exist_ok=True)
    files = {}
    for form in ("hard_swish", "delegable", "relu"):
        path = work / f"mobilenet_v3_small_{form}_int8.tflite"
        path.write_bytes(convert_int8(build(form)))
        files[f"MobileNetV3-Small, hard-swish as {form} (random-calibrated)"] = path
    for p in args.extra:
        files[p.name] = p
    names, paths = list(files), list(files.values())
    rep = {"generated": time.strftime("%Y-%m-%d %H:%M:%S %Z"), "machine": machine(), "runs": args.runs,
           "warmup": args.warmup, "threads": args.threads, "lite0": LITE0.name, "candidates": []}
    timings = {t: timed_pair(paths + [LITE0], t, args.runs, args.warmup) for t in args.threads}
    for i, (name, path) in enumerate(zip(names, paths)):
        entry = {"name": name, "file": path.name, **delegation(path), "by_threads": {}}
        for t in args.threads:
            r, lite0 = timings[t][i], timings[t][-1]
            entry["by_threads"][str(t)] = {**r, "lite0_ms_p50": lite0["latency_ms_p50"],
                                           "ratio_to_lite0": r["latency_ms_p50"] / lite0["latency_ms_p50"]}
        rep["candidates"].append(entry)
    lite0 = {"name": f"{LITE0.name} (reference)", "file": LITE0.name, **delegation(LITE0), "by_threads": {
        str(t): {**timings[t][-1], "ratio_to_lite0": 1.0} for t in args.threads}}
    rep["candidates"].append(lite0)
    (args.out / "mobilenet_v3.json").write_text(json.dumps(rep, indent=2) + "\n")
    (args.out / "mobilenet_v3.md").write_text(markdown(rep))
    for p in work.glob("*.tflite"):
        p.unlink()
    work.rmdir()
    print(markdown(rep))
    return 0


if __name__ == "__main__":
    sys.exit(main())
