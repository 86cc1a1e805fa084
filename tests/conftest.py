"""Shared fixtures: synthetic images and datasets, tiny TFLite models with sidecars."""
from __future__ import annotations

import io
import json
import os
import socket
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

REPO = Path(__file__).resolve().parent.parent
SHARED_DATA = REPO.parent / "shared" / "data"
SHARED_WEIGHTS = REPO.parent / "shared" / "weights"
TINY = 32  # input size of the tiny test models


def lesion_image(seed: int, size=(64, 48), melanoma: bool = False) -> Image.Image:
    """A synthetic 'lesion': a dark blob on a skin-coloured background (darker when melanoma)."""
    rng = np.random.default_rng(seed)
    w, h = size
    yy, xx = np.mgrid[0:h, 0:w]
    cx, cy = w / 2 + rng.uniform(-4, 4), h / 2 + rng.uniform(-4, 4)
    r = (min(w, h) / 4) * rng.uniform(0.7, 1.2)
    blob = ((xx - cx) ** 2 + (yy - cy) ** 2) < r ** 2
    img = np.empty((h, w, 3), np.float32)
    img[:] = [225, 180, 160]
    img[blob] = [60, 30, 25] if melanoma else [150, 100, 80]
    img += rng.normal(0, 8, img.shape)
    return Image.fromarray(np.clip(img, 0, 255).astype(np.uint8))


def jpeg_bytes(img: Image.Image, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, "JPEG", **kw)
    return buf.getvalue()


def write_isic_csv(root: Path, n: int, melanoma_every: int) -> Path:
    """Synthetic images in the ISIC 2020 CSV layout, two images per patient."""
    (root / "train").mkdir(parents=True)
    lines = ["image_name,patient_id,lesion_id,sex,age_approx,anatom_site_general_challenge,diagnosis,benign_malignant,target"]
    for i in range(n):
        mel = i % melanoma_every == 0
        lesion_image(i, melanoma=mel).save(root / "train" / f"ISIC_{i:07d}.jpg")
        lines.append(f"ISIC_{i:07d},IP_{i // 2:03d},,male,45,torso,{'melanoma' if mel else 'nevus'},"
                     f"{'malignant' if mel else 'benign'},{int(mel)}")
    (root / "train.csv").write_text("\n".join(lines) + "\n")
    return root


@pytest.fixture
def isic_csv_dir(tmp_path) -> Path:
    """A dataset in the ISIC 2020 CSV layout: 40 images, 20 patients, 10 melanomas."""
    return write_isic_csv(tmp_path / "isic", 40, 4)


def make_tiny_model(tmp: Path, variant: str = "int8", io_type: str = "uint8") -> Path:
    """A tiny conv net (32x32 input, sigmoid output) exported like the real ones, with sidecar."""
    from train import tfenv  # noqa: F401
    import tensorflow as tf
    import tf_keras as keras
    from edge import write_sidecar
    from edge.preprocess import PreprocessSpec

    keras.utils.set_random_seed(0)
    inp = keras.Input((TINY, TINY, 3))
    x = keras.layers.Rescaling(1 / 128, offset=-127 / 128)(inp)
    x = keras.layers.Conv2D(8, 3, strides=2, activation="relu")(x)
    x = keras.layers.GlobalAveragePooling2D()(x)
    out = keras.layers.Dense(1, activation="sigmoid")(x)
    model = keras.Model(inp, out)
    conv = tf.lite.TFLiteConverter.from_keras_model(model)
    if variant == "int8":
        rng = np.random.default_rng(0)
        conv.optimizations = [tf.lite.Optimize.DEFAULT]
        conv.representative_dataset = lambda: ([rng.uniform(0, 255, (1, TINY, TINY, 3)).astype(np.float32)] for _ in range(50))
        conv.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS_INT8]
        conv.inference_input_type = conv.inference_output_type = {"uint8": tf.uint8, "int8": tf.int8}[io_type]
    path = tmp / f"tiny_{variant}_{io_type}.tflite"
    path.write_bytes(conv.convert())
    spec = PreprocessSpec(size=(TINY, TINY))
    write_sidecar(path, {"model": "tiny", "variant": variant, "input": {"shape": [1, TINY, TINY, 3], "dtype": io_type},
                         "output": {"shape": [1, 1]}, "preprocessing": spec.to_dict(),
                         "labels": ["not melanoma", "melanoma"], "threshold": 0.5,
                         "metrics": {"test": {"all": {"roc_auc": 0.5, "roc_auc_ci95": [0.4, 0.6], "sensitivity": 0.5,
                                                      "specificity": 0.5}}},
                         "provenance": {"datasets": "synthetic"}, "config": {"test": True}})
    model.save(str(tmp / f"tiny_{variant}_{io_type}.h5"))
    return path


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("models")
    return {"uint8": make_tiny_model(d, "int8", "uint8"), "int8": make_tiny_model(d, "int8", "int8"),
            "float32": make_tiny_model(d, "float32", "float32")}


@pytest.fixture
def images_dir(tmp_path) -> Path:
    d = tmp_path / "imgs"
    d.mkdir()
    for i in range(3):
        lesion_image(i).save(d / f"ok{i}.jpg")
    return d


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def shared_data_available() -> bool:
    return (SHARED_DATA / "ham10000" / "train.csv").is_file() and (SHARED_DATA / "isic2017" / "train.csv").is_file()


os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
__all__ = ["lesion_image", "jpeg_bytes", "make_tiny_model", "REPO", "SHARED_DATA", "SHARED_WEIGHTS", "TINY",
           "shared_data_available", "json"]


def tiny_train_config(data_dir: Path, out: Path, cache: Path, **over):
    from train.config import TrainConfig
    base = dict(data=[str(data_dir)], image_size=32, top_blocks=2, epochs=2, head_epochs=2, batch_size=8,
                bootstrap=20, val_fraction=0.25, test_fraction=0.25, out=str(out), cache_dir=str(cache),
                workers=1, patience=5, seed=0)
    return TrainConfig.from_dict({**base, **over})


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory) -> Path:
    """A complete (tiny) training run on synthetic images: the run folder."""
    from train.pipeline import run
    root = tmp_path_factory.mktemp("run")
    data = write_isic_csv(root / "isic", 48, 3)
    run(tiny_train_config(data, root / "out", root / "cache"), log=lambda m: None)
    return root / "out"
