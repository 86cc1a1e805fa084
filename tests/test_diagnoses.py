"""Diagnosis-aware models (#14): the shared taxonomy, Shades of Grey, score rules, calibration of
the diagnosis head, and what every output path shows for a multi-task model."""
import json

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from edge import Classifier
from edge.preprocess import PreprocessSpec, preprocess, preprocess_uint8, shades_of_grey
from edge.scores import diagnosis_distribution, fit_temperature, melanoma_score, tempered
from train.data import DIAGNOSES, MALIGNANT, diagnosis_index, diagnosis_summary, read_source

from .conftest import REPO, SHARED_DATA, jpeg_bytes, lesion_image, shared_data_available

BCC = DIAGNOSES.index("basal cell carcinoma")


# --------------------------------------------------------------------------- taxonomy
@pytest.mark.parametrize("text, target, expected", [
    ("melanoma", 1, 0), ("nevus", 0, 1), ("seborrheic keratosis", 0, 2), ("benign keratosis", 0, 2),
    ("basal cell carcinoma", 0, 3), ("actinic keratosis/intraepithelial carcinoma", 0, 4), ("dermatofibroma", 0, 5),
    ("vascular lesion", 0, 6), ("unknown", 0, -1), ("", 0, -1), ("unknown", 1, 0), ("Nevus", 0, 1)])
def test_diagnosis_mapping(text, target, expected):
    assert diagnosis_index(text, target) == expected


def test_sources_map_onto_one_taxonomy(tmp_path):
    root = tmp_path / "src"
    (root / "train").mkdir(parents=True)
    rows = ["image_name,patient_id,diagnosis,target"]
    for i, (dx, t) in enumerate([("seborrheic keratosis", 0), ("basal cell carcinoma", 0), ("unknown", 0),
                                 ("melanoma", 1), ("nevus", 0)]):
        lesion_image(i).save(root / "train" / f"ISIC_{i:07d}.jpg")
        rows.append(f"ISIC_{i:07d},P{i},{dx},{t}")
    (root / "train.csv").write_text("\n".join(rows) + "\n")
    ds = read_source(root)
    assert ds.rows["dx"].tolist() == [2, 3, -1, 0, 1]
    table = diagnosis_summary(ds.rows)
    assert int(table["other/unknown"].iloc[0]) == 1 and int(table["benign keratosis"].iloc[0]) == 1


def test_data_check_reports_the_mapping(isic_csv_dir, capsys):
    from train.data import main
    main([str(isic_csv_dir)])
    out = capsys.readouterr().out
    assert "diagnoses" in out and "nevus" in out and "melanoma" in out


# --------------------------------------------------------------------------- Shades of Grey
def test_shades_of_grey_leaves_a_neutral_image_and_removes_a_cast():
    rng = np.random.default_rng(0)
    grey = np.repeat(rng.uniform(40, 200, (32, 32, 1)), 3, axis=2).astype(np.float32)
    assert np.abs(shades_of_grey(grey) - np.round(grey)).max() <= 1
    cast = np.clip(grey * np.array([1.3, 0.9, 0.7]), 0, 255)
    out = shades_of_grey(cast)
    spread = lambda a: np.ptp(np.power(np.mean(np.power(a / 255, 6), axis=(0, 1)), 1 / 6))  # noqa: E731
    assert spread(out) < 0.2 * spread(cast)
    assert out.min() >= 0 and out.max() <= 255 and np.all(out == np.round(out))
    assert np.all(shades_of_grey(np.zeros((4, 4, 3))) == 0)  # a black frame stays black, no NaN


def test_shades_of_grey_histogram_path_equals_the_per_pixel_path():
    # decoded images (whole values 0..255) take the histogram path, anything else the per-pixel
    # p-th powers; on the same whole values both must give the same pixels
    rng = np.random.default_rng(1)
    img = np.clip(rng.normal([170, 110, 90], 40, (64, 48, 3)), 0, 255).round().astype(np.float32)
    fractional = img.astype(np.float64)
    fractional[0, 0, 0] += 0.5  # one fractional value sends the whole array down the per-pixel path
    from edge.preprocess import _whole_uint8
    assert _whole_uint8(img) is not None and _whole_uint8(fractional) is None  # the two paths
    fast, slow = shades_of_grey(img), shades_of_grey(fractional)
    assert fast.dtype == np.float32
    assert np.array_equal(fast.reshape(-1, 3)[1:], slow.reshape(-1, 3)[1:])
    as_uint8 = shades_of_grey(img.astype(np.uint8))  # the runner's path: uint8 in, uint8 out
    assert as_uint8.dtype == np.uint8 and np.array_equal(as_uint8, fast)
    p = 6  # the reference formula, written out once more
    ill = np.mean((img.reshape(-1, 3) / 255.0) ** p, axis=0) ** (1 / p)
    gain = 1 / (ill / np.linalg.norm(ill) * np.sqrt(3) + 1e-6)
    assert np.abs(fast - np.clip(np.round(img * gain), 0, 255)).max() <= 1
    nan = img.copy()
    nan[0, 0, 0] = np.nan  # not an image: a clear error, no warning
    with pytest.raises(ValueError, match="finite"):
        shades_of_grey(nan)
    for shape in [(6, 3), (4, 4, 4), (2, 4, 4, 3)]:
        with pytest.raises(ValueError, match=r"\(H, W, 3\)"):
            shades_of_grey(np.zeros(shape, np.uint8))


def test_preprocessing_applies_colour_constancy_from_the_spec(tmp_path):
    img = lesion_image(3, size=(80, 60))
    red = Image.fromarray(np.clip(np.asarray(img) * np.array([1.2, 0.9, 0.8]), 0, 255).astype(np.uint8))
    data = jpeg_bytes(red)
    plain = preprocess(data, PreprocessSpec(size=(32, 32)))
    sog = preprocess(data, PreprocessSpec(size=(32, 32), color_constancy="shades_of_grey"))
    assert not np.array_equal(plain, sog)
    assert np.array_equal(sog, shades_of_grey(plain, 6))
    # the pixel cache (uint8) holds exactly what the runner computes (float)
    cached = preprocess_uint8(data, PreprocessSpec(size=(32, 32), color_constancy="shades_of_grey"))
    assert np.array_equal(cached.astype(np.float32), sog)
    spec = PreprocessSpec(size=(32, 32), color_constancy="shades_of_grey", constancy_power=4)
    assert PreprocessSpec.from_dict(spec.to_dict()) == spec
    with pytest.raises(ValueError, match="colour constancy"):
        PreprocessSpec(color_constancy="retinex")


def test_old_configs_keep_what_they_meant():
    from train.config import TrainConfig
    old = TrainConfig.from_saved({"epochs": 3})
    assert (old.target, old.color_constancy) == ("binary", "none")
    assert old.preprocess_spec().color_constancy == "none"
    new = TrainConfig()
    assert (new.target, new.color_constancy) == ("multitask", "shades_of_grey")


# --------------------------------------------------------------------------- scores
def test_melanoma_score_rules():
    raw = np.array([[0.8, 0.2, 0.5, 0.1, 0.1, 0.05, 0.03, 0.02]])
    assert melanoma_score(raw, "binary")[0] == pytest.approx(0.8)
    assert melanoma_score(raw, "diagnosis")[0] == pytest.approx(0.2)
    assert melanoma_score(raw, "mean")[0] == pytest.approx(0.5)
    assert melanoma_score(np.array([[0.3]]), "mean")[0] == pytest.approx(0.3)  # binary models: one column
    with pytest.raises(ValueError):
        melanoma_score(raw, "max")


def test_diagnosis_distribution_agrees_with_the_melanoma_probability():
    dx = np.array([0.1, 0.6, 0.1, 0.15, 0.05, 0.0, 0.0])
    d = diagnosis_distribution(0.3, dx)
    assert d.sum() == pytest.approx(1.0) and d[0] == pytest.approx(0.3)
    assert d[1] / d[3] == pytest.approx(0.6 / 0.15)  # the other classes keep the head's proportions
    many = diagnosis_distribution(np.array([0.3, 0.9]), np.stack([dx, dx]))
    assert many.shape == (2, 7) and np.allclose(many.sum(axis=1), 1)


def test_temperature_fit_recovers_a_known_temperature():
    rng = np.random.default_rng(0)
    logits = rng.normal(0, 3, (4000, 5))
    labels = np.array([rng.choice(5, p=p) for p in tempered(np.exp(logits), 1.0)])
    overconfident = tempered(np.exp(logits), 0.5)  # sharpened 2x
    assert fit_temperature(overconfident, labels) == pytest.approx(2.0, rel=0.1)


def test_unknown_diagnoses_are_left_out_of_the_loss():
    from train import tfenv  # noqa: F401
    import tensorflow as tf
    from train.optim import per_image_loss
    out = tf.constant([[0.3, 0.1, 0.6, 0.1, 0.1, 0.05, 0.03, 0.02]] * 2)
    t = tf.constant([0.0, 0.0])
    loss = per_image_loss(out, t, tf.constant([1, -1]), (1.0, 1.0), np.ones(7, np.float32)).numpy()
    binary_only = per_image_loss(out, t, tf.constant([1, -1]), (1.0, 1.0)).numpy()
    assert loss[1] == pytest.approx(binary_only[1])  # unknown: the melanoma term only
    assert loss[0] == pytest.approx(binary_only[0] - np.log(0.6), rel=1e-4)


# --------------------------------------------------------------------------- the runner's answer
class FakeInterpreterClassifier(Classifier):
    """The real Classifier with its invoke replaced by fixed output columns."""

    def __init__(self, model, columns):
        super().__init__(model)
        self._columns = np.asarray(columns, dtype=np.float64)

    def predict_outputs(self, x):
        return {"scores": self._columns}, 0.1


@pytest.fixture(scope="module")
def multitask_model(tmp_path_factory):
    """A tiny multi-task .tflite (1 + 7 columns) with a sidecar as quantize writes it."""
    from train import tfenv  # noqa: F401
    import tensorflow as tf
    import tf_keras as keras
    from edge import write_sidecar
    keras.utils.set_random_seed(0)
    inp = keras.Input((32, 32, 3))
    x = keras.layers.GlobalAveragePooling2D()(keras.layers.Conv2D(4, 3)(keras.layers.Rescaling(1 / 255)(inp)))
    out = keras.layers.Concatenate()([keras.layers.Dense(1, activation="sigmoid")(x),
                                      keras.layers.Dense(len(DIAGNOSES), activation="softmax")(x)])
    path = tmp_path_factory.mktemp("mt") / "mt.tflite"
    path.write_bytes(tf.lite.TFLiteConverter.from_keras_model(keras.Model(inp, out)).convert())
    write_sidecar(path, {"model": "tiny", "variant": "float32", "input": {"shape": [1, 32, 32, 3]},
                         "output": {"shape": [1, 1 + len(DIAGNOSES)]}, "labels": ["not melanoma", "melanoma"],
                         "preprocessing": PreprocessSpec(size=(32, 32), color_constancy="shades_of_grey").to_dict(),
                         "threshold": 0.5, "classes": list(DIAGNOSES), "malignant_classes": list(MALIGNANT),
                         "melanoma_rule": "mean", "malignant_threshold": 0.3,
                         "calibration": {"method": "platt", "a": 1.0, "b": 0.0, "diagnosis_temperature": 1.0},
                         "metrics": {}, "provenance": {}, "config": {}})
    return path


def columns(binary, dx):
    return np.concatenate([[binary], dx])


def test_a_basal_cell_carcinoma_is_never_merely_not_melanoma(multitask_model):
    dx = np.array([0.05, 0.15, 0.05, 0.7, 0.03, 0.01, 0.01])
    clf = FakeInterpreterClassifier(multitask_model, columns(0.05, dx))
    p = clf.classify(jpeg_bytes(lesion_image(1)))
    assert not p.melanoma and p.malignant
    assert p.label != "not melanoma" and "basal cell carcinoma" in p.label
    assert p.diagnoses[0][0] == "basal cell carcinoma"
    assert p.malignant_probability == pytest.approx(sum(q for n, q in p.diagnoses if n in MALIGNANT))
    d = p.to_dict()
    assert d["malignant"] is True and d["diagnoses"][0]["diagnosis"] == "basal cell carcinoma"


def test_a_benign_answer_names_the_likely_diagnosis(multitask_model):
    dx = np.array([0.02, 0.9, 0.05, 0.01, 0.01, 0.005, 0.005])
    p = FakeInterpreterClassifier(multitask_model, columns(0.02, dx)).classify(jpeg_bytes(lesion_image(1)))
    assert not p.melanoma and not p.malignant
    assert p.label == "not melanoma (most likely nevus)"
    assert sum(q for _, q in p.diagnoses) == pytest.approx(1.0)
    assert dict(p.diagnoses)["melanoma"] == pytest.approx(p.probability)


def test_malignant_threshold_flags_a_spread_out_malignant_probability(multitask_model):
    dx = np.array([0.1, 0.5, 0.05, 0.2, 0.15, 0.0, 0.0])  # top: nevus; malignant mass above 0.3
    p = FakeInterpreterClassifier(multitask_model, columns(0.1, dx)).classify(jpeg_bytes(lesion_image(1)))
    assert p.diagnoses[0][0] == "nevus" and p.malignant_probability >= 0.3 and p.malignant
    assert "possibly malignant" in p.label


def test_real_multitask_file_through_the_cli_json(multitask_model, tmp_path, capsys):
    from edge.__main__ import main
    lesion_image(2).save(tmp_path / "a.jpg")
    assert main(["predict", str(tmp_path / "a.jpg"), "--model", str(multitask_model), "--json"]) == 0
    row = json.loads(capsys.readouterr().out.splitlines()[0])
    assert {d["diagnosis"] for d in row["diagnoses"]} == set(DIAGNOSES)
    assert 0 <= row["malignant_probability"] <= 1 and "malignant" in row
    assert main(["predict", str(tmp_path / "a.jpg"), "--model", str(multitask_model)]) == 0
    out = capsys.readouterr().out
    assert "P(malignant)" in out and "top diagnoses" in out


def test_api_and_result_page_show_the_diagnoses(multitask_model):
    from server import create_app
    app = create_app({"TESTING": True, "MODEL_PATH": str(multitask_model), "NUM_THREADS": 1})
    client = app.test_client()
    r = client.post("/api/v1/predict", data={"image": (__import__("io").BytesIO(jpeg_bytes(lesion_image(4))), "a.jpg")})
    assert r.status_code == 200 and len(r.json["diagnoses"]) == len(DIAGNOSES) and "malignant_probability" in r.json
    r = client.post("/predict", data={"image": (__import__("io").BytesIO(jpeg_bytes(lesion_image(4))), "a.jpg")})
    page = r.data.decode()
    assert r.status_code == 200 and 'id="diagnoses"' in page and 'id="malignant-probability"' in page
    assert page.count("<meter") == len(DIAGNOSES)


def test_sidecar_refuses_inconsistent_classes(multitask_model, tmp_path):
    from edge.sidecar import SidecarError, check_sidecar
    meta = json.loads(multitask_model.with_suffix(".json").read_text())
    with pytest.raises(SidecarError, match="output.shape"):
        check_sidecar({**meta, "classes": list(DIAGNOSES[:3])}, tmp_path / "x.json")
    with pytest.raises(SidecarError, match="melanoma_rule"):
        check_sidecar({**meta, "melanoma_rule": "max"}, tmp_path / "x.json")
    with pytest.raises(SidecarError, match="malignant_classes"):
        check_sidecar({**meta, "malignant_classes": ["psoriasis"]}, tmp_path / "x.json")


# --------------------------------------------------------------------------- training and export
def test_tiny_run_is_multitask_and_chooses_its_rule_on_validation(tiny_run):
    m = json.loads((tiny_run / "metrics.json").read_text())
    assert m["classes"] == list(DIAGNOSES)
    assert m["melanoma_rule"] == max(m["melanoma_rule_val_auc"], key=m["melanoma_rule_val_auc"].get)
    preds = pd.read_csv(tiny_run / "predictions.csv")
    assert {"dx", "p_0", f"p_{len(DIAGNOSES)}"} <= set(preds.columns)
    cfg = json.loads((tiny_run / "config.json").read_text())
    assert cfg["color_constancy"] == "shades_of_grey"


# --------------------------------------------------------------------------- the shipped default
@pytest.mark.skipif(not shared_data_available(), reason="../shared/data not present")
def test_shipped_default_on_real_basal_cell_carcinomas():
    """Real BCC images of the shipped model's own test split: every answer names diagnoses and
    the malignant probability, and none reads merely "not melanoma"."""
    from edge.runner import DEFAULT_MODEL
    clf = Classifier(DEFAULT_MODEL, num_threads=2)
    if not clf.classes:
        pytest.skip("the shipped default is a binary model")
    sample = pd.read_csv(REPO / "tests" / "fixtures" / "regression_sample.csv", dtype={"image": str})
    ham = pd.read_csv(SHARED_DATA / "ham10000" / "train.csv", dtype=str)
    bcc = ham[ham["diagnosis"] == "basal cell carcinoma"]["image_name"]
    picks = [i for i in sample["image"] if i in set(bcc)][:8] or list(bcc[:8])
    for image in picks:
        p = clf.classify(SHARED_DATA / "ham10000" / "train" / f"{image}.jpg")
        assert p.diagnoses is not None and p.malignant_probability is not None
        assert p.label != "not melanoma"
