"""The on-device runner and its CLI: quantized I/O, sidecar checks, bad images, no TensorFlow."""
import json
import re
import shutil
import subprocess
import sys

import numpy as np
import pytest

from edge import Classifier, SidecarError, read_sidecar
from edge.__main__ import main as edge_main
from edge.runner import dequantize, quantize

from .conftest import REPO, TINY, jpeg_bytes, lesion_image


@pytest.mark.parametrize("kind", ["uint8", "int8", "float32"])
def test_runner_on_each_io_type(tiny_models, kind):
    clf = Classifier(tiny_models[kind], num_threads=1)
    assert np.dtype(clf.input_details["dtype"]).name == kind
    pred = clf.classify(jpeg_bytes(lesion_image(3)))
    assert 0.0 <= pred.probability <= 1.0
    assert pred.label == ("melanoma" if pred.probability >= pred.threshold else "not melanoma")
    assert pred.threshold == 0.5


def test_quantized_models_agree_with_float(tiny_models):
    """The runner's input quantization and output dequantization follow the tensors' params."""
    from train import tfenv  # noqa: F401
    import tf_keras as keras
    keras_model = keras.models.load_model(str(tiny_models["float32"]).replace(".tflite", ".h5"), compile=False)
    x = np.random.default_rng(1).uniform(0, 255, (TINY, TINY, 3)).astype(np.float32)
    ref = float(keras_model(x[None]).numpy()[0, 0])
    for kind in ("uint8", "int8"):
        p, _ = Classifier(tiny_models[kind]).predict_array(np.round(x))
        assert abs(p - ref) < 0.05, kind  # within a few int8 steps of the float model


def test_quantize_dequantize_round_trip():
    x = np.array([0.0, 1.0, 127.4, 255.0])
    q = quantize(x, np.int8, 1.0, -128)
    assert q.dtype == np.int8 and q.tolist() == [-128, -127, -1, 127]
    np.testing.assert_allclose(dequantize(q, 1.0, -128), np.round(x))
    assert quantize(np.array([1000.0]), np.uint8, 1.0, 0).tolist() == [255]  # clipped, not wrapped
    # a uint8 image for a uint8 input of scale 1, zero point 0 is the tensor itself, no float round trip
    img = np.arange(12, dtype=np.uint8).reshape(2, 2, 3)
    assert quantize(img, np.uint8, 1.0, 0) is img
    assert np.array_equal(quantize(img, np.uint8, 2.0, 0), [[[0, 0, 1], [2, 2, 2]], [[3, 4, 4], [4, 5, 6]]])


def test_runner_answers_decoded_uint8_like_float(tiny_models):
    """prepare() hands the int8 file the uint8 image; the answer equals the float array's."""
    clf = Classifier(tiny_models["uint8"], num_threads=1)
    data = jpeg_bytes(lesion_image(5))
    x = clf.prepare(data)
    assert x.dtype == np.uint8
    assert clf.predict_array(x)[0] == clf.predict_array(x.astype(np.float32))[0]


def test_sidecar_sha_mismatch_refused(tiny_models, tmp_path):
    model = tmp_path / "m.tflite"
    shutil.copy(tiny_models["uint8"], model)
    shutil.copy(tiny_models["uint8"].with_suffix(".json"), model.with_suffix(".json"))
    Classifier(model)  # intact: loads
    with open(model, "ab") as f:
        f.write(b"\0")
    with pytest.raises(SidecarError, match="does not match its sidecar"):
        Classifier(model)


def test_missing_or_broken_sidecar(tiny_models, tmp_path):
    model = tmp_path / "m.tflite"
    shutil.copy(tiny_models["uint8"], model)
    with pytest.raises(SidecarError, match="no sidecar"):
        read_sidecar(model)
    model.with_suffix(".json").write_text("{not json")
    with pytest.raises(SidecarError, match="not valid JSON"):
        read_sidecar(model)
    model.with_suffix(".json").write_text(json.dumps({"schema_version": 1}))
    with pytest.raises(SidecarError, match="missing keys"):
        read_sidecar(model)


BAD_SIDECARS = {  # how the sidecar is damaged -> the field the message must name
    "null": (lambda m: None, "must hold a JSON object"),
    "list": (lambda m: [m], "must hold a JSON object"),
    "empty input": (lambda m: {**m, "input": {}}, "'input.shape'"),
    "shape of strings": (lambda m: {**m, "input": {"shape": ["1", "32", "32", "3"]}}, "'input.shape'"),
    "one label": (lambda m: {**m, "labels": ["melanoma"]}, "'labels'"),
    "threshold string": (lambda m: {**m, "threshold": "0.5"}, "'threshold'"),
    "threshold 7": (lambda m: {**m, "threshold": 7}, "'threshold'"),
    "preprocessing null": (lambda m: {**m, "preprocessing": None}, "'preprocessing'"),
    "bad resize": (lambda m: {**m, "preprocessing": {**m["preprocessing"], "resize": "stretch"}}, "'preprocessing'"),
    "size mismatch": (lambda m: {**m, "preprocessing": {**m["preprocessing"], "size": [64, 64]}}, "'preprocessing.size'"),
    "calibration slope 0": (lambda m: {**m, "calibration": {"method": "platt", "a": 0, "b": 1}}, "'calibration'"),
    "calibration unknown": (lambda m: {**m, "calibration": {"method": "isotonic"}}, "'calibration'"),
}


@pytest.mark.parametrize("case", sorted(BAD_SIDECARS))
def test_bad_sidecar_is_refused_naming_the_field(tiny_models, tmp_path, capsys, case):
    damage, field = BAD_SIDECARS[case]
    model = tmp_path / "m.tflite"
    shutil.copy(tiny_models["uint8"], model)
    meta = json.loads(tiny_models["uint8"].with_suffix(".json").read_text())
    model.with_suffix(".json").write_text(json.dumps(damage(meta)))
    with pytest.raises(SidecarError, match=field):
        read_sidecar(model)
    assert edge_main(["info", "--model", str(model)]) == 2
    err = capsys.readouterr().err
    assert field in err and "Traceback" not in err


def test_shape_mismatch_message_names_both_sides(tiny_models, tmp_path):
    model = tmp_path / "m.tflite"
    shutil.copy(tiny_models["uint8"], model)
    meta = json.loads(tiny_models["uint8"].with_suffix(".json").read_text())
    meta["input"]["shape"] = [1, 64, 64, 3]
    meta["preprocessing"]["size"] = [64, 64]
    model.with_suffix(".json").write_text(json.dumps(meta))
    with pytest.raises(SidecarError) as e:
        Classifier(model)
    assert str(e.value).endswith(f"input shape is [1, {TINY}, {TINY}, 3], its sidecar says [1, 64, 64, 3]")
    assert "np.int" not in str(e.value)


def test_cli_json_and_exit_codes(tiny_models, images_dir, capsys):
    (images_dir / "broken.jpg").write_bytes(jpeg_bytes(lesion_image(9))[:200])
    (images_dir / "text.png").write_bytes(b"hello")
    code = edge_main(["predict", str(images_dir), "--json", "--model", str(tiny_models["uint8"]), "--threads", "1"])
    out, err = capsys.readouterr()
    records = [json.loads(line) for line in out.splitlines()]
    assert code == 3
    ok = [r for r in records if "error" not in r]
    bad = [r for r in records if "error" in r]
    assert len(ok) == 3 and len(bad) == 2
    for r in ok:
        assert {"image", "probability", "label", "threshold", "model", "variant", "model_sha256"} <= set(r)
        assert r["label"] in ("melanoma", "not melanoma")
        assert (r["model"], r["variant"]) == ("tiny", "int8")  # the API's fields, not the file name
    assert "skipped: " in err and "broken.jpg" in err and "text.png" in err
    assert re.search(r"5 images: 3 predicted, 0 flagged, 2 unreadable \(\d+\.\d images/s\)$", err.strip())


def test_cli_table_all_readable(tiny_models, images_dir, capsys):
    assert edge_main(["predict", str(images_dir / "ok0.jpg"), "--model", str(tiny_models["float32"])]) == 0
    out = capsys.readouterr().out
    assert "ok0.jpg" in out and "not a diagnosis" in out


def test_cli_table_shows_whole_paths(tiny_models, tmp_path, capsys):
    deep = tmp_path / ("a_rather_long_folder_name_" * 3) / "nested"
    deep.mkdir(parents=True)
    lesion_image(0).save(deep / "lesion_with_a_long_name.jpg")
    assert edge_main(["predict", str(tmp_path), "--model", str(tiny_models["uint8"])]) == 0
    out, err = capsys.readouterr()
    assert str(deep / "lesion_with_a_long_name.jpg") in out  # not cut to 40 characters
    assert "1 image: 1 predicted" in err


def test_cli_progress_bar_only_on_terminals(tiny_models, tmp_path):
    import io
    from edge.__main__ import PROGRESS_FROM, progress

    class Terminal(io.StringIO):
        def isatty(self):
            return True
    images = [tmp_path / f"{i}.jpg" for i in range(PROGRESS_FROM)]
    assert progress(images, False, io.StringIO()) is images  # a pipe or file: no bar
    assert progress(images, True, Terminal()) is images  # --json: no bar
    few = images[:-1]
    assert progress(few, False, Terminal()) is few  # a few images: no bar
    bar = progress(images, False, Terminal())
    assert bar is not images and list(bar) == images


def test_cli_help_documents_exit_codes_and_the_number(capsys):
    with pytest.raises(SystemExit):
        edge_main(["predict", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "Exit status: 0" in text and "3 when some could not be" in text and "130" in text
    assert "ranking score" in text and "threshold" in text and "%%" not in text


def test_an_image_named_twice_is_predicted_once(tiny_models, images_dir, capsys):
    assert edge_main(["predict", str(images_dir / "ok0.jpg"), str(images_dir), "--json",
                      "--model", str(tiny_models["uint8"])]) == 0
    assert len(capsys.readouterr().out.splitlines()) == 3


def test_cli_usage_errors(tiny_models, tmp_path, capsys):
    assert edge_main(["predict", str(tmp_path), "--model", str(tiny_models["uint8"])]) == 2  # empty folder
    assert edge_main(["predict", "x.jpg", "--model", str(tmp_path / "none.tflite")]) == 2
    assert edge_main(["predict", "x.jpg", "--threads", "0", "--model", str(tiny_models["uint8"])]) == 2
    with pytest.raises(SystemExit) as e:
        edge_main(["frobnicate"])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and "model file not found" in err
    # an empty folder and a missing model: the model is named first
    assert edge_main(["predict", str(tmp_path), "--model", str(tmp_path / "none.tflite")]) == 2
    err = capsys.readouterr().err
    assert "model file not found" in err and "no images found" not in err


def test_cli_info(tiny_models, capsys):
    assert edge_main(["info", "--model", str(tiny_models["uint8"]), "--threads", "2"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["backend"] in ("ai_edge_litert", "tflite_runtime", "tensorflow.lite")
    assert info["num_threads"] == 2 and info["input_dtype"] == "uint8" and info["input_shape"] == [1, TINY, TINY, 3]


def test_importing_edge_and_server_loads_no_tensorflow():
    code = ("import sys, edge, edge.__main__, server, server.__main__\n"
            "bad = sorted(m for m in sys.modules if m.split('.')[0] in ('tensorflow', 'tf_keras', 'keras', 'tensorflow_model_optimization'))\n"
            "print(len(bad)); sys.exit(1 if bad else 0)")
    r = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr


def test_edge_runs_a_prediction_without_tensorflow(tiny_models, images_dir):
    """A full CLI prediction in a process where importing TensorFlow is made impossible."""
    code = ("import sys\nclass Block:\n"
            "    def find_spec(self, name, *a):\n"
            "        if name.split('.')[0] in ('tensorflow', 'tf_keras', 'keras'): raise ImportError('blocked ' + name)\n"
            "sys.meta_path.insert(0, Block())\n"
            "from edge.__main__ import main\n"
            f"sys.exit(main(['predict', {str(images_dir / 'ok1.jpg')!r}, '--json', '--model', {str(tiny_models['uint8'])!r}]))")
    r = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout.splitlines()[0])["label"] in ("melanoma", "not melanoma")


def test_interpreter_fallback_order(monkeypatch):
    """ai_edge_litert first, then tflite_runtime, then tf.lite."""
    import builtins
    import importlib
    import types
    from edge.runner import load_interpreter_class
    real_import = builtins.__import__
    fake_tflite = types.ModuleType("tflite_runtime.interpreter")
    fake_tflite.Interpreter = object

    def blocked(name, *a, **k):
        if name.startswith("ai_edge_litert"):
            raise ImportError(name)
        if name.startswith("tflite_runtime"):
            return types.SimpleNamespace(interpreter=fake_tflite) if not a or not a[2] else fake_tflite
        return real_import(name, *a, **k)
    monkeypatch.setattr(builtins, "__import__", blocked)
    assert load_interpreter_class()[1] == "tflite_runtime"

    def none_but_tf(name, *a, **k):
        if name.startswith(("ai_edge_litert", "tflite_runtime")):
            raise ImportError(name)
        return real_import(name, *a, **k)
    monkeypatch.setattr(builtins, "__import__", none_but_tf)
    monkeypatch.setattr(importlib, "import_module", lambda n: types.SimpleNamespace(lite=types.SimpleNamespace(Interpreter=int)))
    assert load_interpreter_class() == (int, "tensorflow.lite")


def test_calibrated_sidecar_gives_probabilities_and_the_same_decisions(tiny_models, tmp_path, images_dir):
    from edge.runner import platt
    model = tmp_path / "m.tflite"
    shutil.copy(tiny_models["uint8"], model)
    meta = json.loads(tiny_models["uint8"].with_suffix(".json").read_text())
    shutil.copy(tiny_models["uint8"].with_suffix(".json"), model.with_suffix(".json"))
    raw = Classifier(model)
    meta["calibration"] = {"method": "platt", "a": 2.0, "b": -1.0}
    model.with_suffix(".json").write_text(json.dumps(meta))
    cal = Classifier(model)
    assert cal.threshold == pytest.approx(float(platt(0.5, 2.0, -1.0))) and raw.threshold == 0.5
    for image in sorted(images_dir.glob("*.jpg")):
        a, b = raw.classify(image), cal.classify(image)
        assert b.calibrated and not a.calibrated and a.score == b.score == a.probability
        assert b.probability == pytest.approx(float(platt(a.score, 2.0, -1.0)))
        assert a.melanoma == b.melanoma == (b.probability >= b.threshold) == (a.score >= 0.5)
        assert b.to_dict()["calibrated"] is True and b.to_dict()["threshold"] == pytest.approx(cal.threshold, abs=1e-6)


def test_tta_averages_the_eight_views(tiny_models, images_dir, capsys):
    from edge.runner import dihedral_views
    x = np.arange(2 * 2 * 1, dtype=np.float32).reshape(2, 2, 1)
    views = {tuple(v.ravel()) for v in dihedral_views(x)}
    assert len(dihedral_views(x)) == 8 and len(views) == 8 and np.array_equal(dihedral_views(x)[0], x)
    clf = Classifier(tiny_models["float32"])
    image = images_dir / "ok0.jpg"
    plain, tta = clf.classify(image), clf.classify(image, tta=True)
    from edge.preprocess import preprocess
    arr = preprocess(image, clf.spec)
    expected = np.mean([clf.predict_array(np.ascontiguousarray(v))[0] for v in dihedral_views(arr)])
    assert tta.score == pytest.approx(expected) and plain.score == pytest.approx(clf.predict_array(arr)[0])
    assert edge_main(["predict", str(image), "--tta", "--json", "--model", str(tiny_models["float32"])]) == 0
    assert json.loads(capsys.readouterr().out)["tta"] is True
