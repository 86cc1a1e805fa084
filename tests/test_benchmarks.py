"""Benchmarks are scripts: check that they run on a tiny model and write well-formed reports."""
import json
import shutil

import pytest

from benchmarks.__main__ import main, pareto


def test_pareto_front():
    # (latency, auc): b dominates c; a and b are on the front
    assert pareto([(10, 0.90), (5, 0.88), (6, 0.85)]) == [True, True, False]


def test_latency_and_tradeoff_reports(tiny_models, tmp_path):
    models = tmp_path / "models"
    models.mkdir()
    for k in ("uint8", "float32"):
        for suffix in (".tflite", ".json"):
            shutil.copy(tiny_models[k].with_suffix(suffix), models / (tiny_models[k].stem + suffix))
    out = tmp_path / "reports"
    files = sorted(models.glob("*.tflite"))
    assert main(["all", "--model", *map(str, files), "--threads", "1", "2", "--runs", "100", "--warmup", "5",
                 "--no-baselines", "--out", str(out)]) == 0
    lat = json.loads((out / "latency.json").read_text())
    assert lat["machine"]["cores"] >= 1 and lat["machine"]["backend"]
    assert lat["runs"] == 100 and len(lat["models"]) == 2
    for e in lat["models"]:
        assert e["model_gzip_bytes"] > 0 and set(e["by_threads"]) == {"1", "2"}
        r = e["by_threads"]["1"]
        assert r["count"] == 100 and r["latency_ms_p50"] <= r["latency_ms_p90"] <= r["latency_ms_p99"]
        assert r["peak_memory_mb"] > 0 and r["init_ms"] > 0
        sc = e["scaling"]  # 1 and 2 threads timed in turn in one process
        assert sc["threads"] == [1, 2] and sc["speedup"]["1"] == 1.0 and sc["p50_ms"]["2"] > 0
        assert sc["speedup"]["2"] == pytest.approx(sc["p50_ms"]["1"] / sc["p50_ms"]["2"])
    md = (out / "latency.md").read_text()
    assert "p99 ms" in md and lat["machine"]["cpu"] in md and "Thread scaling (interleaved" in md
    trade = json.loads((out / "tradeoff.json").read_text())
    assert [r["file"] for r in trade["rows"]] == [p.name for p in files]
    assert all("latency_ms_p50" in r and "roc_auc_ci95" in r for r in trade["rows"])
    assert (out / "tradeoff.png").stat().st_size > 1000 and "Pareto" in (out / "tradeoff.md").read_text()


def test_refuses_too_few_runs_and_missing_models(tiny_models, tmp_path, capsys):
    assert main(["latency", "--runs", "10", "--model", str(tiny_models["uint8"]), "--out", str(tmp_path)]) == 2
    assert "--runs must be at least 100" in capsys.readouterr().err
    assert not (tmp_path / "latency.json").exists()
    assert main(["latency", "--model", str(tmp_path / "x.tflite")]) == 2
    assert "no model" in capsys.readouterr().err


def test_latency_report_is_merged_not_replaced(tiny_models, tmp_path):
    """Measuring one model keeps the other models' entries of the existing report."""
    common = ["--threads", "1", "--runs", "100", "--warmup", "2", "--no-baselines", "--out", str(tmp_path)]
    assert main(["latency", "--model", str(tiny_models["uint8"]), str(tiny_models["float32"]), *common]) == 0
    first = json.loads((tmp_path / "latency.json").read_text())
    # mark the entry to be re-measured (two medians of a tiny model can be equal to the last digit)
    next(e for e in first["models"] if e["file"] == tiny_models["uint8"].name)["by_threads"]["1"]["latency_ms_p50"] = -1.0
    (tmp_path / "latency.json").write_text(json.dumps(first))
    assert main(["latency", "--model", str(tiny_models["uint8"]), *common]) == 0
    merged = json.loads((tmp_path / "latency.json").read_text())
    assert sorted(e["file"] for e in merged["models"]) == sorted(e["file"] for e in first["models"])
    fresh = next(e for e in merged["models"] if e["file"] == tiny_models["uint8"].name)
    assert fresh["by_threads"]["1"]["latency_ms_p50"] > 0  # re-measured
    kept = next(e for e in merged["models"] if e["file"] == tiny_models["float32"].name)
    assert kept == next(e for e in first["models"] if e["file"] == tiny_models["float32"].name)


def test_help_lists_every_command_and_option(capsys):
    import pytest
    with pytest.raises(SystemExit):
        main(["--help"])
    text = capsys.readouterr().out
    assert "arm64" in text
    for flag in ("--threads", "--warmup", "--out", "--runs"):
        line = next(line for line in text.splitlines() if line.strip().startswith(flag))
        assert len(line.split(flag, 1)[1].strip()) > 10 or flag in text.split(line)[1][:200]


def test_mac_count_of_a_known_layer_stack():
    from train import tfenv  # noqa: F401
    import tf_keras as keras
    from benchmarks.measure import count_macs
    inp = keras.Input((8, 8, 3))
    x = keras.layers.Conv2D(4, 3, padding="same")(inp)  # 8*8*4*9*3 = 6912
    x = keras.layers.DepthwiseConv2D(3, padding="same")(x)  # 8*8*4*9 = 2304
    x = keras.layers.GlobalAveragePooling2D()(x)
    out = keras.layers.Dense(2)(x)  # 8
    assert count_macs(keras.Model(inp, out)) == 6912 + 2304 + 8


def test_arm64_requirements_and_comparison(tmp_path):
    """The arm64 check's pure parts: markers evaluated for Pi OS, and the one-step tolerance."""
    from benchmarks.arm64 import compare, requirements_for_target
    req = tmp_path / "r.txt"
    req.write_text("numpy==2.4.6\nfoo==2.0; platform_machine != 'aarch64'\nfoo==1.0; platform_machine == 'aarch64'  # pi\n")
    assert requirements_for_target(req) == ["numpy==2.4.6", "foo==1.0"]
    x86 = {"a.jpg": {"probability": 0.5, "label": "melanoma"}, "b.jpg": {"probability": 0.1, "label": "not melanoma"}}
    same = {"a.jpg": {"probability": 0.5039, "label": "melanoma"}, "b.jpg": {"probability": 0.1, "label": "not melanoma"}}
    assert compare(x86, same, 1 / 255)["pass"]
    off = {**same, "b.jpg": {"probability": 0.2, "label": "not melanoma"}}
    assert not compare(x86, off, 1 / 255)["pass"]
    assert not compare(x86, {"a.jpg": same["a.jpg"]}, 1 / 255)["pass"]  # a missing image fails


EDGE_ONLY = """
import importlib.machinery as machinery
_find = machinery.PathFinder.find_spec.__func__
HIDDEN = {"tensorflow", "tf_keras", "tf2onnx", "onnxruntime", "onnx", "matplotlib", "sklearn", "pandas"}

def find_spec(cls, name, path=None, target=None):
    return None if name.split(".")[0] in HIDDEN else _find(cls, name, path, target)

machinery.PathFinder.find_spec = classmethod(find_spec)
"""


def test_latency_runs_on_an_edge_only_install(tiny_models, tmp_path):
    """With only the edge requirements (TensorFlow, ONNX Runtime, matplotlib hidden), the latency
    and tradeoff benchmarks measure the .tflite files and record each baseline as skipped."""
    import os
    import subprocess
    import sys
    from .conftest import REPO
    hook = tmp_path / "hook"
    hook.mkdir()
    (hook / "sitecustomize.py").write_text(EDGE_ONLY)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(hook), str(REPO)])}
    r = subprocess.run([sys.executable, "-m", "benchmarks", "all", "--model", str(tiny_models["uint8"]), "--threads", "1",
                        "--runs", "100", "--warmup", "2", "--out", str(tmp_path / "r")], cwd=REPO, env=env,
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    report = json.loads((tmp_path / "r" / "latency.json").read_text())
    assert report["models"][0]["by_threads"]["1"]["count"] == 100
    skipped = {b["name"]: b["skipped"] for b in report["baselines"] if "skipped" in b}
    assert any("Keras" in n and "tensorflow is not installed" in why for n, why in skipped.items())
    assert "skipped" in (tmp_path / "r" / "latency.md").read_text() and "skipped tradeoff.png" in r.stdout


def test_paired_timing_alternates_its_two_calls():
    from benchmarks.measure import time_pair
    order = []
    a, b = time_pair(lambda: order.append("a"), lambda: order.append("b"), runs=4, warmup=1)
    assert order == ["a", "b"] * 5 and a["count"] == b["count"] == 4


def test_heatmap_and_gate_overhead_on_the_shipped_model():
    from benchmarks.measure import bench_extras
    from edge.runner import DEFAULT_MODEL
    r = bench_extras(DEFAULT_MODEL, threads=1, runs=20, warmup=2)
    assert r["has_gate"] and r["has_heatmap"]
    assert r["with_extras_ms_p50"] > 0 and r["scores_only_ms_p50"] > 0 and r["quality_checks_ms_p50"] > 0
    assert abs(r["overhead_fraction"] - (r["with_extras_ms_p50"] / r["scores_only_ms_p50"] - 1)) < 1e-12


def test_tta_row_in_the_tradeoff(tmp_path):
    from benchmarks.__main__ import tta_tradeoff_row
    row = {"file": "efficientnet_lite0_int8.tflite", "roc_auc": 0.90, "latency_ms_p50": 2.0, "latency_ms_p90": 3.0}
    metrics = tmp_path / "metrics.json"
    latency = {"explain_and_refuse": {"2": {"tta_ms_p50": 16.0, "single_view_ms_p50": 2.0}}}
    assert tta_tradeoff_row([row], latency, 2, metrics) is None  # no TTA evaluation yet
    metrics.write_text(json.dumps({"test": {"all": {"roc_auc": 0.91, "roc_auc_ci95": [0.88, 0.93],
                                                    "sensitivity": 0.9, "specificity": 0.7}}}))
    tta = tta_tradeoff_row([row], latency, 2, metrics)
    assert tta["file"].endswith("--tta") and tta["roc_auc"] == 0.91 and tta["latency_ms_p50"] == 16.0
    assert tta_tradeoff_row([row], latency, 1, metrics) is None  # no TTA timing at 1 thread


def test_load_ceiling_runs_every_process_at_once(tiny_models):
    from benchmarks.load import all_cores_images_per_s
    from .conftest import REPO
    data = (REPO / "tests" / "fixtures" / "lesion.jpg").read_bytes()
    r = all_cores_images_per_s(tiny_models["uint8"], data, 2, seconds=0.5, settle=3.0)
    assert r["processes"] == 2 and len(r["images_per_process"]) == 2
    assert min(r["images_per_process"]) > 0  # both processes classified in the common window
    assert r["images"] == sum(r["images_per_process"])
    with pytest.raises(RuntimeError, match="after the common start"):
        all_cores_images_per_s(tiny_models["uint8"], data, 1, seconds=0.2, settle=0.0)


def test_load_efficiency_uses_the_single_image_times_sampled_during_each_run(tmp_path, monkeypatch):
    """Each server run's ideal comes from the median of the single-image times sampled between its
    slices (the cores' speed drifts), every round is kept, and the summary gives medians over rounds."""
    from benchmarks import load
    singles = iter([5.0, 3.0])  # around the no-server ceiling
    monkeypatch.setattr(load, "warm_classifier", lambda model, data: object())
    monkeypatch.setattr(load, "single_image_ms", lambda clf, data, runs=200: {"p50_ms": next(singles), "runs": runs})
    monkeypatch.setattr(load, "all_cores_images_per_s", lambda *a, **k: {
        "processes": 2, "seconds": 10.0, "images_per_process": [1, 1], "images": 2, "images_per_s": 390.0})
    runs = iter([(200.0, [4.0, 5.0, 9.0]), (180.0, [8.0, 8.0, 7.0]), (150.0, [10.0, 12.0, 10.0])])

    def serve_and_load(args, w, client, data, sample):
        rps, samples = next(runs)
        return {"requests": 1000, "errors": 0, "seconds": 5.0, "requests_per_s": rps, "p50_ms": 50.0,
                "p90_ms": 60.0, "p99_ms": 90.0, "slices": 2, "single_ms_samples": samples}
    monkeypatch.setattr(load, "serve_and_load", serve_and_load)
    monkeypatch.setattr(load.os, "cpu_count", lambda: 2)
    assert load.main(["--workers", "2", "--rounds", "3", "--client", "python", "--out", str(tmp_path)]) == 0
    rep = json.loads((tmp_path / "load.json").read_text())
    # ideal = 2 cores / median of the samples: 400, 250, 200 requests/s
    assert [r["efficiency"] for r in rep["runs"]] == pytest.approx([200 / 400, 180 / 250, 150 / 200])
    assert [r["round"] for r in rep["runs"]] == [1, 2, 3]
    s = rep["summary"][0]
    assert s["median_efficiency"] == pytest.approx(0.72) and s["min_efficiency"] == pytest.approx(0.5)
    assert s["median_requests_per_s"] == 180.0 and s["errors"] == 0 and s["worst_p99_over_p50"] == pytest.approx(1.8)
    assert rep["all_cores_no_server"]["over_ideal"] == pytest.approx(390 / 500)  # 2 cores / 4 ms
    md = (tmp_path / "load.md").read_text()
    assert "| 2 | 3 | 180 | 0.72 | 0.50-0.75 | 0 | 1.80 |" in md and md.count("| python | 16 |") == 3
    assert "range from 4.00 to 12.00 ms" in md and "5 slices of 400 requests" in md
    with pytest.raises(SystemExit) as e:  # slices must divide the run evenly
        load.main(["--seconds", "7", "--slices", "5", "--out", str(tmp_path)])
    assert e.value.code == 2


def test_load_run_alternates_single_image_samples_and_load_slices(monkeypatch):
    """serve_and_load: sample, slice, sample, slice, ..., sample; the slices merged (counts add
    up, p50 the slices' median, p99 the worst); the server is stopped."""
    import argparse
    from benchmarks import load
    events = []

    class Proc:
        def terminate(self):
            events.append("stop")

        def wait(self, timeout=None):
            return 0
    monkeypatch.setattr(load, "start_server", lambda model, workers, port: events.append("start") or Proc())
    slices = iter([(100, 1, 40.0, 80.0), (120, 0, 50.0, 70.0), (90, 0, 45.0, 140.0)])

    def fake_wrk(port, data, concurrency, seconds, tmp, warm_up=True):
        n, err, p50, p99 = next(slices)
        events.append(f"slice {seconds}s warm={warm_up}")
        return {"requests": n, "errors": err, "seconds": 2.0, "requests_per_s": n / 2, "p50_ms": p50,
                "p90_ms": p50 + 10, "p99_ms": p99}
    monkeypatch.setattr(load, "hammer_wrk", fake_wrk)
    samples = iter([6.0, 7.0, 8.0, 9.0])

    def sample():
        events.append("sample")
        return next(samples)
    args = argparse.Namespace(model="m.tflite", slices=3, seconds=7, concurrency=16, requests=2000)
    r = load.serve_and_load(args, 2, "wrk", b"x", sample)
    assert events == ["start", "sample", "slice 2s warm=True", "sample", "slice 2s warm=False", "sample",
                      "slice 2s warm=False", "sample", "stop"]
    assert r["single_ms_samples"] == [6.0, 7.0, 8.0, 9.0]
    assert (r["requests"], r["errors"], r["seconds"]) == (310, 1, 6.0)
    assert r["requests_per_s"] == pytest.approx(310 / 6.0)
    assert r["p50_ms"] == 45.0 and r["p90_ms"] == 55.0 and r["p99_ms"] == 140.0


def test_folder_throughput_report_times_every_setting_and_an_earlier_commit(tiny_models, tmp_path):
    """benchmarks.folder runs the real CLI on a folder for each setting, and (--baseline-ref)
    the CLI of an earlier commit from a temporary worktree that it removes afterwards."""
    import subprocess
    from benchmarks import folder
    from .conftest import lesion_image
    if not (folder.REPO / ".git").exists():
        pytest.skip("--baseline-ref needs a git checkout")
    data = tmp_path / "data"
    data.mkdir()
    for i in range(4):
        lesion_image(i, size=(60, 50)).save(data / f"img{i}.jpg")
    out = tmp_path / "reports"
    assert folder.main(["--data", str(data), "--images", "4", "--model", str(tiny_models["uint8"]),
                        "--baseline-ref", "HEAD", "--out", str(out)]) == 0
    rep = json.loads((out / "folder.json").read_text())
    assert [r["setting"] for r in rep["runs"]] == [s[0] for s in folder.BEFORE + folder.SETTINGS]
    assert all(r["images"] == 4 and r["images_per_s"] > 0 for r in rep["runs"])
    assert rep["runs"][0]["ref"] == "HEAD" and set(rep["speedup_default_vs_before"]) == {s[0] for s in folder.BEFORE}
    assert "images/s" in (out / "folder.md").read_text()
    worktrees = subprocess.run(["git", "-C", str(folder.REPO), "worktree", "list"], capture_output=True, text=True)
    assert str(tmp_path) not in worktrees.stdout  # the worktree is gone
    assert folder.main(["--data", str(data), "--images", "5", "--out", str(out)]) == 2  # too few images
