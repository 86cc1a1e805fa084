"""Pruning and conversion of a tiny trained model, end to end in a temporary folder."""
import json

import numpy as np
import pytest

from edge import Classifier, read_sidecar


@pytest.fixture(scope="module")
def exported(tiny_run, tmp_path_factory):
    from quantize.__main__ import main
    out = tmp_path_factory.mktemp("models")
    code = main(["all", "--run", str(tiny_run), "--out", str(out), "--calibration", "200", "--sparsity", "0.5",
                 "--prune-epochs", "2"])
    assert code == 0
    return out


def test_every_variant_with_sidecar(exported):
    for v in ("float32", "float16", "dynamic", "int8", "pruned_int8"):
        path = exported / f"efficientnet_lite0_{v}.tflite"
        meta = read_sidecar(path)  # checks sha256 too
        assert meta["variant"] == v
        for key in ("input", "output", "preprocessing", "labels", "threshold", "metrics", "provenance", "config",
                    "quantization"):
            assert key in meta, key
        assert meta["metrics"]["computed_with"].startswith("this .tflite file")
        cal = meta.get("calibration") or meta["calibration_skipped"]  # fitted on validation, or why not
        if "a" in cal:
            assert cal["fitted_on"] == "validation split" and cal["a"] > 0
            assert meta["metrics"]["test"]["all"]["calibration"]["ece"] == pytest.approx(cal["ece"]["test_after"])
        assert meta["threshold_policy"]["chosen_on"] == "validation split"
        assert "parity_vs_keras_float" in meta["metrics"]


def test_int8_is_integer_io_and_small(exported):
    meta = read_sidecar(exported / "efficientnet_lite0_int8.tflite")
    assert meta["input"]["dtype"] == "uint8" and meta["output"]["dtype"] == "uint8"
    assert meta["input"]["quantization"]["scale"] > 0
    assert meta["quantization"]["calibration_source"] == "training split"
    # efficientnet_lite0 is QAT-capable: the default (--int8-method auto) uses QAT and says so
    assert meta["quantization"]["method"] == "quantization-aware training (tfmot) + int8 conversion"
    assert meta["quantization"]["range_calibration_images"] > 0 and "why_not_qat" not in meta["quantization"]
    f32 = (exported / "efficientnet_lite0_float32.tflite").stat().st_size
    assert (exported / "efficientnet_lite0_int8.tflite").stat().st_size <= 0.30 * f32


def test_pruning_reaches_target_sparsity(tiny_run, exported):
    report = json.loads((tiny_run / "prune_report.json").read_text())
    pruned = [l for l in report["layers"] if l["sparsity"] > 0]
    assert pruned and max(l["sparsity"] for l in pruned) == pytest.approx(0.5, abs=0.02)
    assert report["keras_weights_gzip_bytes_after"] < report["keras_weights_gzip_bytes_before"]
    meta = read_sidecar(exported / "efficientnet_lite0_pruned_int8.tflite")
    assert meta["pruning"]["target_sparsity"] == 0.5


def test_int8_parity_with_float_on_fixed_inputs(exported):
    """The runner on int8 vs float32 of the same network, within PARITY_TOLERANCE per image."""
    PARITY_TOLERANCE = 0.05
    f = Classifier(exported / "efficientnet_lite0_float32.tflite")
    q = Classifier(exported / "efficientnet_lite0_int8.tflite")
    rng = np.random.default_rng(0)
    for _ in range(8):
        x = rng.integers(0, 256, (32, 32, 3)).astype(np.float32)
        assert abs(f.predict_array(x)[0] - q.predict_array(x)[0]) < PARITY_TOLERANCE


def test_convert_requires_trained_run(tmp_path, capsys):
    from quantize.__main__ import main
    assert main(["convert", "--run", str(tmp_path)]) == 2
    assert "train first" in capsys.readouterr().err


def test_pruning_leaves_the_source_model_dense(tiny_run):
    """Pruning works on a clone: the float model the other variants come from keeps its weights."""
    import numpy as np
    from quantize.prune import apply_pruning, fine_tune_pruned
    from train.rundir import load_keras_model
    model = load_keras_model(tiny_run / "model.h5")
    before = [w.copy() for w in model.get_weights()]
    pruned = apply_pruning(model, "efficientnet_lite0", 14, 0.5, 0, 2)
    x = np.random.default_rng(0).uniform(0, 255, (16, 32, 32, 3)).astype(np.float32)
    fine_tune_pruned(pruned, x, np.r_[np.ones(4), np.zeros(12)].astype(np.float32), np.arange(16), 2, 1e-3, 8, 0)
    assert all(np.array_equal(a, b) for a, b in zip(before, model.get_weights()))


def test_qat_ranges_start_from_calibrated_activation_statistics():
    """calibrate_ranges sets each moving-average range to the mean of per-batch min/max, not tfmot's +-6."""
    from train import tfenv  # noqa: F401
    import tf_keras as keras
    from quantize.qat import calibrate_ranges, fake_quant_model, range_variables
    inp = keras.Input((4,))
    hidden = keras.layers.Dense(3, name="d")(keras.layers.Rescaling(0.1)(inp))
    model = keras.Model(inp, keras.layers.Dense(1, activation="sigmoid", name="o")(hidden))
    q = fake_quant_model(model)
    rng = np.random.default_rng(0)
    batches = [rng.normal(0, 30, (8, 4)).astype(np.float32) for _ in range(3)]
    assert calibrate_ranges(q, iter(batches)) == 3
    outs = [keras.Model(model.input, model.get_layer("d").output)(b).numpy() for b in batches]
    ranges = range_variables(q)
    # the fake-quantized kernel shifts outputs slightly: within 0.05 of the float statistics
    assert ranges["quant_d/post_activation_min:0"] == pytest.approx(np.mean([o.min() for o in outs]), abs=0.05)
    assert ranges["quant_d/post_activation_max:0"] == pytest.approx(np.mean([o.max() for o in outs]), abs=0.05)


def test_convert_refuses_to_replace_existing_files_without_force(tiny_run, exported, capsys):
    """Forgetting --out must not replace the shipped models: existing files need --force."""
    from quantize.__main__ import main
    before = (exported / "efficientnet_lite0_float32.json").read_text()
    assert main(["convert", "--run", str(tiny_run), "--out", str(exported), "--variants", "float32"]) == 2
    assert "pass --force" in capsys.readouterr().err
    assert (exported / "efficientnet_lite0_float32.json").read_text() == before


def test_convert_defaults_to_the_run_folder(tiny_run):
    from quantize.__main__ import build_parser
    args = build_parser().parse_args(["convert", "--run", str(tiny_run)])
    assert args.out is None  # main() resolves it to <run>/export, never models/


def test_card_is_a_subcommand(tmp_path, capsys):
    from quantize.__main__ import main
    out = tmp_path / "card.md"
    assert main(["card", "--out", str(out)]) == 0
    text = out.read_text()
    assert text.startswith("# Model card") and "## Decision threshold" in text and "not a diagnosis" in text.lower()


def test_leave_source_out_rows_of_one_run_stay_together(tmp_path):
    from quantize.card import leave_source_out
    rows = [("a", "ham10000", "multitask", "lso_ham_mt", "model.h5"),
            ("b", "ham10000", "multitask", "lso_ham_mt", "efficientnet_lite0_int8.tflite"),
            ("c", "ham10000", "multitask", "lso_ham_e8", "model.h5"),
            ("d", "ham10000", "binary", "lso_ham_old", "model.h5"),
            ("e", "isic2017", "binary", "lso_isic", "model.h5")]
    for name, source, target, run, model in rows:
        (tmp_path / "leave_source_out" / name).mkdir(parents=True)
        (tmp_path / "leave_source_out" / name / "metrics.json").write_text(json.dumps(
            {"trained_on": [source], "recipe": {"target": target}, "run": run, "model": model}))
    order = [(r["run"], r["model"]) for r in leave_source_out(tmp_path)]
    assert order == [("lso_ham_old", "model.h5"), ("lso_ham_e8", "model.h5"),
                     ("lso_ham_mt", "efficientnet_lite0_int8.tflite"), ("lso_ham_mt", "model.h5"),
                     ("lso_isic", "model.h5")]
