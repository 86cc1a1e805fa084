"""Measurement helpers: machine facts, latency statistics, one-model runs in a fresh process."""
from __future__ import annotations

import json
import os
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent


def machine() -> dict:
    """CPU model, cores, flags that set the peak, and the software versions."""
    cpu, mhz, flags = platform.processor() or platform.machine(), None, set()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, val = line.partition(":")
            key, val = key.strip(), val.strip()
            if key == "model name" and cpu in (platform.processor(), platform.machine(), ""):
                cpu = val
            elif key == "cpu MHz" and mhz is None:
                mhz = float(val)
            elif key == "flags" and not flags:
                flags = set(val.split())
    except OSError:
        pass
    from edge import load_interpreter_class
    _, backend = load_interpreter_class()
    return {"cpu": cpu, "cores": os.cpu_count(), "mhz": mhz, "arch": platform.machine(),
            "simd": [f for f in ("avx512f", "avx512_vnni", "avx2", "fma", "neon", "asimd", "asimddp") if f in flags],
            "python": platform.python_version(), "backend": backend, "os": platform.platform()}


def peak_gflops(m: dict) -> dict:
    """Theoretical fp32 peak: cores x clock x FLOPs/cycle/core.

    FLOPs/cycle: 2 FMA ports x vector lanes x 2 (multiply + add): 64 with AVX-512, 32 with
    AVX2+FMA, 16 with SSE/NEON-128. The clock is /proc/cpuinfo's current "cpu MHz" (a VM may
    report the nominal clock; turbo is ignored), so this is an estimate, not a measurement.
    """
    per_cycle = 64 if "avx512f" in m["simd"] else 32 if {"avx2", "fma"} <= set(m["simd"]) else 16
    ghz = (m.get("mhz") or 2000.0) / 1000
    fp32 = m["cores"] * ghz * per_cycle
    # int8 dot products: VNNI (and NEON sdot) do 4 int8 MACs where fp32 FMA does 1; without them ~2x.
    int8_factor = 4 if {"avx512_vnni", "asimddp"} & set(m["simd"]) else 2
    return {"fp32_peak_gflops": fp32, "int8_peak_gops": fp32 * int8_factor, "flops_per_cycle_per_core": per_cycle,
            "int8_factor": int8_factor, "ghz": ghz,
            "derivation": ("fp32: cores x clock x FLOPs/cycle/core (2 FMA ports x lanes x 2); int8: x"
                           f"{int8_factor} for int8 dot-product instructions; clock from /proc/cpuinfo, no turbo")}


def latency_stats(ms: list[float]) -> dict:
    a = np.asarray(ms)
    return {"count": int(a.size), "latency_ms_mean": float(a.mean()), "latency_ms_p50": float(np.percentile(a, 50)),
            "latency_ms_p90": float(np.percentile(a, 90)), "latency_ms_p99": float(np.percentile(a, 99)),
            "latency_ms_min": float(a.min()), "latency_ms_std": float(a.std())}


def peak_rss_mb() -> float:
    """Peak resident memory of this process (ru_maxrss is KiB on Linux)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def file_sizes(path: Path) -> dict:
    from edge import gzip_size
    return {"model_size_bytes": Path(path).stat().st_size, "model_gzip_bytes": gzip_size(Path(path))}


def time_calls(call, runs: int, warmup: int) -> dict:
    """The one timing loop: the first call alone, `warmup` untimed calls, then `runs` timed ones."""
    t0 = time.perf_counter()
    call()
    first_ms = (time.perf_counter() - t0) * 1000
    for _ in range(warmup):
        call()
    ms = []
    for _ in range(runs):
        t0 = time.perf_counter()
        call()
        ms.append((time.perf_counter() - t0) * 1000)
    return {"first_inference_ms": first_ms, "warmup_runs": warmup, **latency_stats(ms)}


def time_alternately(calls, runs: int, warmup: int) -> list[dict]:
    """Several calls timed in turn (a, b, ..., a, b, ...), so that a drift of the machine's speed
    during the run (other tenants, frequency) weighs on all alike: for differences of a few %."""
    for _ in range(warmup):
        for call in calls:
            call()
    ms = [[] for _ in calls]
    for _ in range(runs):
        for call, times in zip(calls, ms):
            t0 = time.perf_counter()
            call()
            times.append((time.perf_counter() - t0) * 1000)
    return [latency_stats(m) for m in ms]


def time_pair(a, b, runs: int, warmup: int) -> tuple[dict, dict]:
    """`time_alternately` of two calls."""
    first, second = time_alternately([a, b], runs, warmup)
    return first, second


def timed_init(make):
    """(object, milliseconds) for building a model, interpreter or session."""
    t0 = time.perf_counter()
    obj = make()
    return obj, (time.perf_counter() - t0) * 1000


def random_input(detail: dict) -> np.ndarray:
    """A fixed random input of an interpreter's input tensor (latency does not depend on it)."""
    rng = np.random.default_rng(0)
    shape, dtype = detail["shape"], detail["dtype"]
    return (rng.integers(0, 256, shape) if np.issubdtype(dtype, np.integer) else rng.uniform(0, 255, shape)).astype(dtype)


def bench_tflite(path: Path, threads: int, runs: int, warmup: int) -> dict:
    """Load, first inference, then `runs` timed invokes after `warmup` (run in a child process)."""
    from edge import make_interpreter
    (it, backend), init_ms = timed_init(lambda: make_interpreter(path, threads))
    d = it.get_input_details()[0]
    x = random_input(d)

    def invoke():
        it.set_tensor(d["index"], x)
        it.invoke()
    return {"init_ms": init_ms, "num_threads": threads, **time_calls(invoke, runs, warmup),
            "peak_memory_mb": peak_rss_mb(), "backend": backend}


def bench_scaling(path: Path, threads: list[int], runs: int, warmup: int) -> dict:
    """One interpreter per thread count in one process, timed in turn (`time_alternately`): the
    speed-up over the first thread count, free of the drift between the separate processes of
    `bench_tflite` (a second thread gains ~0.3 ms on a 1 ms model, about this machine's drift)."""
    from edge import make_interpreter
    calls = []
    for t in threads:
        it, _ = make_interpreter(path, t)
        d = it.get_input_details()[0]
        x = random_input(d)

        def invoke(it=it, d=d, x=x):
            it.set_tensor(d["index"], x)
            it.invoke()
        calls.append(invoke)
    stats = time_alternately(calls, runs, warmup)
    base = stats[0]["latency_ms_p50"]
    return {"threads": threads, "p50_ms": {str(t): r["latency_ms_p50"] for t, r in zip(threads, stats)},
            "speedup": {str(t): base / r["latency_ms_p50"] for t, r in zip(threads, stats)}}


def bench_keras(backbone: str, image_size: int, threads: int, runs: int, warmup: int) -> dict:
    """The float Keras model at batch 1, `model(x, training=False)`. Latency does not depend on
    the weight values, so the architecture is built from the registry (weights=None)."""
    from train import tfenv  # noqa: F401
    import tensorflow as tf
    tf.config.threading.set_intra_op_parallelism_threads(threads)
    tf.config.threading.set_inter_op_parallelism_threads(1)
    from train.model import build_classifier
    (model, _), init_ms = timed_init(lambda: build_classifier(backbone, image_size, weights=None))
    x = tf.constant(np.random.default_rng(0).uniform(0, 255, (1, image_size, image_size, 3)).astype(np.float32))
    return {"init_ms": init_ms, "num_threads": threads,
            **time_calls(lambda: model(x, training=False).numpy(), runs, warmup), "peak_memory_mb": peak_rss_mb(),
            "backend": f"tensorflow {tf.__version__} (eager)", "macs": count_macs(model)}


def bench_onnx(path: str, threads: int, runs: int, warmup: int) -> dict:
    """ONNX Runtime on a converted copy of the same network (CPU execution provider)."""
    import onnxruntime as ort
    opts = ort.SessionOptions()
    opts.intra_op_num_threads, opts.inter_op_num_threads = threads, 1
    sess, init_ms = timed_init(lambda: ort.InferenceSession(path, opts, providers=["CPUExecutionProvider"]))
    inp = sess.get_inputs()[0]
    shape = [1 if not isinstance(s, int) else s for s in inp.shape]
    x = np.random.default_rng(0).uniform(0, 255, shape).astype(np.float32)
    return {"init_ms": init_ms, "num_threads": threads, **time_calls(lambda: sess.run(None, {inp.name: x}), runs, warmup),
            "peak_memory_mb": peak_rss_mb(), "backend": f"onnxruntime {ort.__version__}"}


def bench_extras(path: Path, threads: int, runs: int, warmup: int) -> dict:
    """What the heatmap and the refusal gate add to one image, in one process. `scores only` is
    what answering needs without them: quantize the preprocessed array, invoke, read the scores.
    `with heatmap + gate` is `classify`'s path: the same, plus reading the feature map and the
    embedding, the activation maps and the gate distance. Test-time augmentation (8 views, 8
    invokes) against one view, alternately, for the tradeoff report. The quality checks (run on the decoded
    image before the invoke) and Shades of Grey are timed on their own, on the model-size array."""
    from edge import Classifier
    from edge.gate import quality_problem
    from edge.preprocess import resized_array, shades_of_grey
    clf = Classifier(path, num_threads=threads)
    raw = resized_array(REPO / "tests" / "fixtures" / "lesion.jpg", clf.spec, dtype=np.uint8)  # as prepare()
    x = shades_of_grey(raw)
    it, inp, out = clf._interpreter, clf.input_details, clf._output

    def scores_only():
        it.set_tensor(inp["index"], clf._prepare(x[None]))
        it.invoke()
        return clf._postprocess(it.get_tensor(out["index"]))

    def with_extras():
        outs, _ = clf.predict_outputs(x)
        if clf.gate is not None:
            clf.gate.score(outs["embedding"])
        clf._heatmap(outs, 1 if clf.classes else None)
    a, b = time_pair(scores_only, with_extras, runs, warmup)
    single, tta = time_pair(lambda: clf.predict_array(x), lambda: clf.predict_tta(x), max(runs // 4, 25), warmup)
    c = time_calls(lambda: shades_of_grey(raw), runs, warmup)
    q = time_calls(lambda: quality_problem(raw, clf.quality), runs, warmup) if clf.quality else None
    return {"num_threads": threads, "scores_only_ms_p50": a["latency_ms_p50"], "with_extras_ms_p50": b["latency_ms_p50"],
            "overhead_fraction": b["latency_ms_p50"] / a["latency_ms_p50"] - 1,
            "quality_checks_ms_p50": q["latency_ms_p50"] if q else None,
            "single_view_ms_p50": single["latency_ms_p50"], "tta_ms_p50": tta["latency_ms_p50"],
            "shades_of_grey_ms_p50": c["latency_ms_p50"], "has_gate": clf.gate is not None,
            "has_heatmap": clf.head_kernel is not None}


def count_macs(model) -> int:
    """Multiply-accumulates of one image through Conv2D, DepthwiseConv2D and Dense layers."""
    import tf_keras as keras
    from train.model import backbone_layers
    total = 0
    for layer in backbone_layers(model):
        if isinstance(layer, keras.layers.DepthwiseConv2D):
            _, h, w, c = layer.output_shape
            kh, kw = layer.kernel_size
            total += h * w * c * kh * kw
        elif isinstance(layer, keras.layers.Conv2D):
            _, h, w, cout = layer.output_shape
            kh, kw = layer.kernel_size
            total += h * w * cout * kh * kw * layer.input_shape[-1] // layer.groups
        elif isinstance(layer, keras.layers.Dense):
            total += layer.input_shape[-1] * layer.units
    return int(total)


def run_child(kind: str, **kwargs) -> dict:
    """Run one measurement in a fresh interpreter, so load time and peak memory are its own."""
    cmd = [sys.executable, "-m", "benchmarks", "_child", kind, json.dumps(kwargs)]
    out = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, timeout=1800)
    if out.returncode != 0:
        raise RuntimeError(f"{kind} benchmark failed: {out.stderr.strip().splitlines()[-1:] or out.returncode}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def cold_start(cmd: list[str], env: dict | None = None, ok_codes: tuple[int, ...] = (0,)) -> float:
    """Seconds from process start to its first line on stdout; `ok_codes`: exit statuses of a
    complete run."""
    t0 = time.perf_counter()
    p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, cwd=REPO,
                         env={**os.environ, **(env or {})})
    line = p.stdout.readline()
    elapsed = time.perf_counter() - t0
    p.wait(timeout=600)
    if not line or p.returncode not in ok_codes:
        raise RuntimeError(f"cold-start command failed: {' '.join(cmd)} (exit {p.returncode})")
    return elapsed
