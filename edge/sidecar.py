"""The JSON sidecar that travels with every .tflite: the single description of a model."""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

from .preprocess import PreprocessSpec

SCHEMA_VERSION = 1
DISCLAIMER = ("Screening aid for research use only, not a diagnosis and not a medical device. "
              "Any lesion of concern must be examined by a dermatologist.")
REQUIRED_KEYS = ("schema_version", "model", "variant", "file", "sha256", "input", "output",
                 "preprocessing", "labels", "threshold", "metrics", "provenance", "config")


class SidecarError(ValueError):
    """A sidecar that is missing, malformed or does not match its model file."""


def sha256_of(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def sidecar_path(model_path: Path) -> Path:
    return Path(model_path).with_suffix(".json")


def read_sidecar(model_path: Path, *, verify: bool = True) -> dict:
    """Read and validate the sidecar of `model_path`; with `verify`, check its sha256."""
    model_path = Path(model_path)
    path = sidecar_path(model_path)
    if not model_path.is_file():
        raise SidecarError(f"model file not found: {model_path}")
    if not path.is_file():
        raise SidecarError(f"no sidecar for {model_path.name}: expected {path}")
    try:
        meta = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise SidecarError(f"{path}: not valid JSON ({e})") from None
    missing = [k for k in REQUIRED_KEYS if k not in meta]
    if missing:
        raise SidecarError(f"{path}: missing keys {missing}")
    if meta["schema_version"] != SCHEMA_VERSION:
        raise SidecarError(f"{path}: schema_version {meta['schema_version']}, expected {SCHEMA_VERSION}")
    if verify:
        actual = sha256_of(model_path)
        if actual != meta["sha256"]:
            raise SidecarError(
                f"{model_path.name} does not match its sidecar: sha256 is {actual[:12]}..., "
                f"the sidecar says {meta['sha256'][:12]}... The model file was changed or "
                f"replaced; re-export it with `python -m quantize convert` or restore the original.")
    return meta


def preprocess_spec(meta: dict) -> PreprocessSpec:
    return PreprocessSpec.from_dict(meta["preprocessing"])


def write_sidecar(model_path: Path, meta: dict) -> Path:
    """Write `meta` beside `model_path`, filling in sha256, size and schema version."""
    model_path = Path(model_path)
    meta = {"schema_version": SCHEMA_VERSION, **meta, "file": model_path.name,
            "sha256": sha256_of(model_path), "size_bytes": model_path.stat().st_size}
    meta.setdefault("disclaimer", DISCLAIMER)
    path = sidecar_path(model_path)
    path.write_text(json.dumps(meta, indent=2, sort_keys=False) + "\n")
    return path
