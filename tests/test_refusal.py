"""#15: one invoke gives scores, a feature map and an embedding; the runner refuses what is not a
usable lesion image (quality checks, embedding gate) and draws class activation maps."""
import io
import json

import numpy as np
import pytest
from PIL import Image

from edge import Classifier
from edge.gate import (OOD_MESSAGE, Gate, QualityLimits, activation_map, colour, head_kernel, normalised, overlay,
                       quality_problem)
from edge.preprocess import PreprocessSpec
from train.data import DIAGNOSES, MALIGNANT

from .conftest import REPO, SHARED_DATA, jpeg_bytes, lesion_image, shared_data_available

SIZE = 32


@pytest.fixture(scope="module")
def explained_model(tmp_path_factory):
    """A tiny multi-task float .tflite exported by quantize.convert (extra outputs, head weights)
    with a gate fitted on synthetic lesions, as `python -m quantize` writes it."""
    from train import tfenv  # noqa: F401
    import tf_keras as keras
    from edge import write_sidecar
    from quantize.convert import convert, head_weights, io_spec
    keras.utils.set_random_seed(0)
    inp = keras.Input((SIZE, SIZE, 3))
    x = keras.layers.Rescaling(1 / 127.5, offset=-1)(inp)
    x = keras.layers.Conv2D(16, 3, strides=2, activation="relu")(x)
    x = keras.layers.Conv2D(24, 3, activation="relu")(x)
    pooled = keras.layers.GlobalAveragePooling2D(name="avg_pool")(x)
    d = keras.layers.Dropout(0.1, name="head_dropout")(pooled)
    out = keras.layers.Concatenate(name="scores")([keras.layers.Dense(1, activation="sigmoid", name="melanoma")(d),
                                                   keras.layers.Dense(len(DIAGNOSES), activation="softmax",
                                                                      name="diagnosis")(d)])
    model = keras.Model(inp, out)
    data, _ = convert(model, "float32")
    folder = tmp_path_factory.mktemp("explained")
    path = folder / "explained.tflite"
    path.write_bytes(data)
    inp_spec, out_spec = io_spec(data, list(DIAGNOSES))
    meta = {"model": "tiny", "variant": "float32", "input": inp_spec, "output": out_spec,
            "labels": ["not melanoma", "melanoma"], "threshold": 0.5,
            "preprocessing": PreprocessSpec(size=(SIZE, SIZE)).to_dict(), "classes": list(DIAGNOSES),
            "malignant_classes": list(MALIGNANT), "melanoma_rule": "binary", "head": head_weights(model),
            "quality": {}, "metrics": {}, "provenance": {}, "config": {}}
    write_sidecar(path, meta)
    clf = Classifier(path, refuse=False)
    emb = np.stack([clf.predict_outputs(np.asarray(lesion_image(i, size=(SIZE, SIZE)), np.float32))[0]["embedding"]
                    for i in range(120)])
    gate = Gate.fit(emb[:100], np.arange(100) % 2, dims=8)
    gate.threshold = float(np.quantile(gate.scores(emb[100:]), 0.98)) * 1.5
    write_sidecar(path, {**meta, "gate": gate.to_dict()})
    return path


def lesion_bytes(i: int = 1) -> bytes:
    return jpeg_bytes(lesion_image(i, size=(96, 80)))


# --------------------------------------------------------------------------- one invoke, three answers
def test_one_invoke_gives_scores_feature_map_and_embedding(explained_model):
    clf = Classifier(explained_model)
    calls = []
    real_invoke = clf._interpreter.invoke
    clf._interpreter.invoke = lambda: (calls.append(1), real_invoke())[1]
    p = clf.classify(lesion_bytes())
    assert len(calls) == 1
    assert p.heatmap is not None and p.heatmap["melanoma"].shape == (13, 13)
    assert p.ood_score is not None and not p.refused
    outs, _ = clf.predict_outputs(np.asarray(lesion_image(1, size=(SIZE, SIZE)), np.float32))
    assert outs["feature_map"].shape == (13, 13, 24) and outs["embedding"].shape == (24,)


def test_activation_map_is_exact_for_pooling_plus_linear_head(explained_model):
    clf = Classifier(explained_model)
    outs, _ = clf.predict_outputs(np.asarray(lesion_image(2, size=(SIZE, SIZE)), np.float32))
    bias = np.asarray(clf.meta["head"]["bias"])
    cam = activation_map(outs["feature_map"], clf.head_kernel, 0)
    logit = np.log(outs["scores"][0] / (1 - outs["scores"][0]))
    assert cam.mean() + bias[0] == pytest.approx(logit, abs=2e-2)  # float16 head weights
    assert np.allclose(outs["feature_map"].mean(axis=(0, 1)), outs["embedding"], atol=1e-5)


def test_map_changes_when_the_head_is_randomised(explained_model):
    """Adebayo et al. 2018: a map that survives randomising the weights explains nothing."""
    clf = Classifier(explained_model)
    outs, _ = clf.predict_outputs(np.asarray(lesion_image(3, size=(SIZE, SIZE)), np.float32))
    real = normalised(activation_map(outs["feature_map"], clf.head_kernel, 0))
    rng = np.random.default_rng(0)
    rand = normalised(activation_map(outs["feature_map"], rng.normal(0, 1, clf.head_kernel.shape), 0))
    assert abs(np.corrcoef(real.ravel(), rand.ravel())[0, 1]) < 0.9


def test_overlay_has_the_image_size_and_a_colour_scale():
    img = np.asarray(lesion_image(4, size=(120, 90)), dtype=np.float32)
    cam = np.zeros((7, 7))
    cam[3, 3] = 1.0
    out = overlay(img, cam)
    assert out.size[0] == 120 and out.size[1] > 90  # the scale sits under the image
    assert tuple(colour(np.array([0.0]))[0]) != tuple(colour(np.array([1.0]))[0])
    centre, corner = np.asarray(out)[45, 60].astype(int), np.asarray(out)[2, 2].astype(int)
    assert centre[0] - centre[2] > corner[0] - corner[2]  # hotter (redder) where the map is high


# --------------------------------------------------------------------------- refusals
@pytest.mark.parametrize("make, code", [
    (lambda: np.full((64, 64, 3), 128.0), "uniform"),
    (lambda: np.where(np.arange(64)[None, :, None] < 50, 255.0, 90.0) * np.ones((64, 64, 3)), "overexposed"),
    (lambda: np.where(np.arange(64)[None, :, None] < 54, 2.0, 120.0) * np.ones((64, 64, 3)), "underexposed"),
    (lambda: np.broadcast_to(np.linspace(60, 200, 64)[None, :, None], (64, 64, 3)).copy(), "blurred"),
])
def test_quality_checks_name_their_problem(make, code):
    problem = quality_problem(make())
    assert problem is not None and problem[0] == code and problem[1]


def test_quality_checks_pass_a_lesion_image():
    assert quality_problem(np.asarray(lesion_image(5, size=(224, 224)), np.float32)) is None


def test_gate_separates_a_shifted_distribution_and_round_trips():
    rng = np.random.default_rng(0)
    train = rng.normal(0, 1, (600, 40)) + np.repeat(np.eye(2, 40) * 3, 300, axis=0)
    groups = np.repeat([0, 1], 300)
    gate = Gate.fit(train, groups, dims=10)
    val = rng.normal(0, 1, (300, 40)) + np.repeat(np.eye(2, 40) * 3, 150, axis=0)
    gate.threshold = float(np.quantile(gate.scores(val), 0.98))
    far = rng.normal(0, 1.5, (100, 40)) + 2.0  # shifted and wider in every direction
    assert np.mean(gate.scores(far) > gate.threshold) > 0.95
    assert np.mean(gate.scores(val) > gate.threshold) <= 0.021
    again = Gate.from_dict(json.loads(json.dumps(gate.to_dict())))
    assert np.allclose(again.scores(far), gate.scores(far), rtol=1e-5)


def test_gate_refusal_gives_no_verdict(explained_model, tmp_path):
    from edge import write_sidecar
    meta = json.loads(explained_model.with_suffix(".json").read_text())
    strict = tmp_path / "strict.tflite"
    strict.write_bytes(explained_model.read_bytes())
    write_sidecar(strict, {**meta, "gate": {**meta["gate"], "threshold": -1.0}})
    p = Classifier(strict).classify(lesion_bytes())
    assert p.refused and p.refusal == "out_of_distribution" and p.reason == OOD_MESSAGE
    d = p.to_dict()
    assert d["refused"] is True and "probability" not in d and "label" not in d and d["ood_score"] > -1
    assert not Classifier(strict, refuse=False).classify(lesion_bytes()).refused


def test_quality_limits_come_from_the_sidecar(explained_model, tmp_path):
    from edge import write_sidecar
    meta = json.loads(explained_model.with_suffix(".json").read_text())
    picky = tmp_path / "picky.tflite"
    picky.write_bytes(explained_model.read_bytes())
    write_sidecar(picky, {**meta, "quality": {"min_contrast": 1000.0}})
    p = Classifier(picky).classify(lesion_bytes())
    assert p.refused and p.refusal == "uniform"
    assert QualityLimits.from_dict({"min_contrast": 1000}).min_contrast == 1000.0


# --------------------------------------------------------------------------- every output path
def test_cli_refusal_exit_status_heatmap_and_json(explained_model, tmp_path, capsys):
    from edge.__main__ import EXIT_REFUSED, main
    lesion_image(6, size=(96, 80)).save(tmp_path / "lesion.jpg")
    Image.new("RGB", (64, 64), (128, 128, 128)).save(tmp_path / "blank.png")
    hm = tmp_path / "maps"
    code = main(["predict", str(tmp_path / "lesion.jpg"), str(tmp_path / "blank.png"), "--model", str(explained_model),
                 "--heatmap", str(hm), "--json"])
    captured = capsys.readouterr()
    assert code == EXIT_REFUSED == 4
    rows = [json.loads(line) for line in captured.out.splitlines()]
    answered = next(r for r in rows if not r.get("refused"))
    refused_row = next(r for r in rows if r.get("refused"))
    assert refused_row["refusal"] == "uniform" and "probability" not in refused_row
    assert np.asarray(answered["heatmap"]["melanoma"]).shape == (13, 13)
    png = Image.open(answered["heatmap_file"])
    assert png.size[0] == SIZE and png.format == "PNG"
    assert sorted(p.name for p in hm.iterdir()) == ["lesion.heatmap.png"]
    assert "refused: " in captured.err and "1 refused" in captured.err


def test_api_422_and_friendly_page(explained_model):
    from server import create_app
    app = create_app({"TESTING": True, "MODEL_PATH": str(explained_model), "NUM_THREADS": 1})
    client = app.test_client()
    blank = io.BytesIO()
    Image.new("RGB", (64, 64), (200, 200, 200)).save(blank, "PNG")
    r = client.post("/api/v1/predict", data={"image": (io.BytesIO(blank.getvalue()), "b.png")})
    assert r.status_code == 422 and r.json["refused"] is True and r.json["refusal"] == "uniform"
    assert "probability" not in r.json and r.json["error"] and "not a diagnosis" in r.json["disclaimer"]
    r = client.post("/predict", data={"image": (io.BytesIO(blank.getvalue()), "b.png")})
    assert r.status_code == 422 and b'id="reason"' in r.data and b"nearly uniform" in r.data
    r = client.post("/predict", data={"image": (io.BytesIO(lesion_bytes()), "a.jpg")})
    page = r.data.decode()
    assert r.status_code == 200
    assert 'id="uploaded" src="data:image/jpeg;base64,' in page and 'id="overlay" src="data:image/png;base64,' in page
    r = client.post("/api/v1/predict", data={"image": (io.BytesIO(lesion_bytes()), "a.jpg")})
    assert r.status_code == 200 and r.json["refused"] is False and "heatmap" in r.json


def test_head_weights_and_gate_basis_are_not_in_the_public_model_card(explained_model):
    """They are arrays for the runner (the shipped gate's basis alone is 437 KB of base64)."""
    from server import create_app
    app = create_app({"TESTING": True, "MODEL_PATH": str(explained_model), "NUM_THREADS": 1})
    card = app.test_client().get("/api/v1/model").json
    assert "kernel_b64" not in card["head"] and card["head"]["shape"] == [24, 1 + len(DIAGNOSES)]
    assert card["gate"] and not [k for k in card["gate"] if k.endswith("_b64")], card["gate"].keys()


# --------------------------------------------------------------------------- the shipped default
def shipped_with_head():
    from edge.runner import DEFAULT_MODEL
    if not shared_data_available():
        pytest.skip("../shared/data not present")
    clf = Classifier(DEFAULT_MODEL, num_threads=2, refuse=False)
    if clf.head_kernel is None or clf._extra.get("feature_map") is None:
        pytest.skip("the shipped default has no activation-map outputs")
    return clf


def test_shipped_map_sanity_occlusion_beats_random():
    """Occluding the hottest region of the melanoma map lowers the melanoma score more than
    occluding a random region of the same size, on average over melanomas of the test split
    (a committed sample; the full figures are in reports/heatmap_checks.json)."""
    import pandas as pd
    from benchmarks.heatmap_checks import occlusion_drops
    clf = shipped_with_head()
    sample = pd.read_csv(REPO / "tests" / "fixtures" / "regression_sample.csv", dtype={"image": str})
    mel = sample[sample["target"] == 1].head(24)
    paths = [SHARED_DATA / d / "train" / f"{i}.jpg" for d, i in zip(mel["dataset"], mel["image"])]
    hot, rand = occlusion_drops(clf, paths, seed=0)
    assert np.mean(hot) > np.mean(rand), (np.mean(hot), np.mean(rand))


def test_shipped_map_changes_with_randomised_head():
    clf = shipped_with_head()
    from benchmarks.heatmap_checks import randomisation_similarity
    lesion = SHARED_DATA / "ham10000" / "train"
    paths = sorted(lesion.glob("*.jpg"))[:8]
    # A map that ignores the head gives 1.0. The shipped multi-task model's last feature map is
    # dominated by one spatial pattern (about 77 % of its energy in the first singular vector), so
    # any linear head, a random one included, shares part of it: measured 0.53 on average over the
    # test melanomas (reports/heatmap_checks.json), 0.35 on these 8 images (the file before: 0.69, 0.65).
    assert np.mean(randomisation_similarity(clf, paths, seed=0)) < 0.8


def test_head_kernel_round_trip():
    import base64
    k = np.arange(12, dtype="<f2").reshape(4, 3)
    assert np.array_equal(head_kernel({"kernel_b64": base64.b64encode(k.tobytes()).decode(), "shape": [4, 3]}), k)


def test_browser_result_page_with_image_overlay_and_refusal(explained_model, tmp_path):
    """Headless Chromium at phone width: the result page shows the upload and its overlay (data:
    URIs allowed by the CSP and actually rendered), the diagnosis bars, no sideways scroll; a
    blank frame gets the refusal page."""
    import threading
    import time
    import urllib.request
    import waitress
    from server import create_app
    from .conftest import free_port
    from .test_server import CHROMEDRIVER, CHROMIUM
    if not (CHROMIUM and CHROMEDRIVER):
        pytest.skip("Debian chromium/chromium-driver not installed (.ci/run installs them)")
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions
    from selenium.webdriver.support.ui import WebDriverWait
    app = create_app({"TESTING": True, "MODEL_PATH": str(explained_model), "NUM_THREADS": 1})
    port = free_port()
    server = waitress.create_server(app, host="127.0.0.1", port=port, threads=2)
    threading.Thread(target=server.run, daemon=True).start()
    for _ in range(50):
        try:
            urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=1)
            break
        except OSError:
            time.sleep(0.1)
    opts = webdriver.ChromeOptions()
    opts.binary_location = CHROMIUM
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--no-first-run", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--disable-dev-shm-usage",
                 f"--user-data-dir={tmp_path / 'profile'}", "--window-size=390,844"):
        opts.add_argument(flag)
    lesion_image(5, size=(300, 240)).save(tmp_path / "lesion.jpg")
    Image.new("RGB", (200, 200), (180, 180, 180)).save(tmp_path / "blank.png")
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=opts)
    try:
        driver.get(f"http://127.0.0.1:{port}/")
        driver.find_element(By.ID, "image").send_keys(str(tmp_path / "lesion.jpg"))
        driver.find_element(By.ID, "submit").click()
        WebDriverWait(driver, 30).until(expected_conditions.presence_of_element_located((By.ID, "overlay")))
        for element in ("uploaded", "overlay"):
            assert driver.execute_script(f"return document.getElementById('{element}').naturalWidth") > 0
        assert len(driver.find_elements(By.CSS_SELECTOR, "#diagnoses meter")) == len(DIAGNOSES)
        assert driver.find_element(By.ID, "malignant-probability").text.endswith("%")
        assert "not a diagnosis" in driver.find_element(By.CSS_SELECTOR, ".disclaimer").text
        assert driver.execute_script("return document.documentElement.scrollWidth <= window.innerWidth + 1")
        driver.get(f"http://127.0.0.1:{port}/")
        driver.find_element(By.ID, "image").send_keys(str(tmp_path / "blank.png"))
        driver.find_element(By.ID, "submit").click()
        reason = WebDriverWait(driver, 30).until(expected_conditions.presence_of_element_located((By.ID, "reason")))
        assert "uniform" in reason.text
    finally:
        driver.quit()
        server.close()


def test_result_page_images_carry_no_metadata(explained_model):
    """The data: URIs are re-encoded pixels: a 64 KB JPEG comment or EXIF never reaches the page."""
    import base64
    import re
    from server import create_app
    img = lesion_image(7, size=(120, 100))
    buf = io.BytesIO()
    img.save(buf, "JPEG", comment=b"x" * 65000, exif=Image.Exif())
    app = create_app({"TESTING": True, "MODEL_PATH": str(explained_model), "NUM_THREADS": 1})
    r = app.test_client().post("/predict", data={"image": (io.BytesIO(buf.getvalue()), "c.jpg")})
    assert r.status_code == 200
    uri = re.search(r'id="uploaded" src="data:image/jpeg;base64,([^"]+)"', r.data.decode()).group(1)
    shown = Image.open(io.BytesIO(base64.b64decode(uri)))
    assert "comment" not in shown.info and "exif" not in shown.info
