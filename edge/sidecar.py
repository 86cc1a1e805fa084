"""The JSON sidecar that travels with every .tflite: the single description of a model."""
from __future__ import annotations

import gzip
import hashlib
import json
from pathlib import Path

from .preprocess import PreprocessSpec
from .scores import SCORE_RULES

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


def gzip_size(data: bytes | Path) -> int:
    """Bytes after gzip -9: how small a model file gets on the wire (pruning shows here)."""
    return len(gzip.compress(Path(data).read_bytes() if isinstance(data, (str, Path)) else data, 9))


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
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise SidecarError(f"{path}: not valid JSON ({e})") from None
    except OSError as e:
        raise SidecarError(f"{path}: cannot be read ({e.strerror})") from None
    check_sidecar(meta, path)
    if verify:
        try:
            actual = sha256_of(model_path)
        except OSError as e:
            raise SidecarError(f"{model_path}: cannot be read ({e.strerror or e})") from None
        if actual != meta["sha256"]:
            raise SidecarError(
                f"{model_path.name} does not match its sidecar: sha256 is {actual[:12]}..., "
                f"the sidecar says {meta['sha256'][:12]}... The model file was changed or "
                f"replaced; re-export it with `python -m quantize convert` or restore the original.")
    return meta


def check_sidecar(meta, path: Path) -> None:
    """Refuse a sidecar the runner cannot use, naming the field (a traceback helps no one)."""
    def bad(field: str, why: str):
        raise SidecarError(f"{path}: field '{field}' {why}")

    if not isinstance(meta, dict):
        raise SidecarError(f"{path}: must hold a JSON object, found {type(meta).__name__}")
    missing = [k for k in REQUIRED_KEYS if k not in meta]
    if missing:
        raise SidecarError(f"{path}: missing keys {missing}")
    if meta["schema_version"] != SCHEMA_VERSION:
        raise SidecarError(f"{path}: schema_version {meta['schema_version']}, expected {SCHEMA_VERSION}")
    for key in ("input", "output", "preprocessing", "metrics", "provenance", "config"):
        if not isinstance(meta[key], dict):
            bad(key, "must be a JSON object")
    shape = meta["input"].get("shape")
    if not (isinstance(shape, list) and len(shape) == 4 and all(type(v) is int and v > 0 for v in shape)
            and shape[3] == 3):
        bad("input.shape", f"must be [1, height, width, 3] with positive integers, found {shape!r}")
    labels = meta["labels"]
    if not (isinstance(labels, list) and len(labels) == 2 and all(isinstance(v, str) for v in labels)):
        bad("labels", f"must be two names [negative, positive], found {labels!r}")
    threshold = meta["threshold"]
    if not (isinstance(threshold, (int, float)) and not isinstance(threshold, bool) and 0 <= threshold <= 1):
        bad("threshold", f"must be a number from 0 to 1, found {threshold!r}")
    cal = meta.get("calibration")
    if cal is not None and not (isinstance(cal, dict) and cal.get("method") == "platt"
                                and all(isinstance(cal.get(k), (int, float)) for k in ("a", "b")) and cal["a"] > 0):
        bad("calibration", f"must be {{'method': 'platt', 'a': > 0, 'b': number}} or absent, found {cal!r}")
    classes = meta.get("classes")
    if classes is not None:
        if not (isinstance(classes, list) and len(classes) >= 2 and all(isinstance(c, str) for c in classes)
                and "melanoma" in classes):
            bad("classes", f"must list the diagnosis names, melanoma among them, found {classes!r}")
        out_shape = meta["output"].get("shape")
        if out_shape != [1, 1 + len(classes)]:
            bad("output.shape", f"must be [1, {1 + len(classes)}] (melanoma head + {len(classes)} classes), "
                                f"found {out_shape!r}")
        malignant = meta.get("malignant_classes", [])
        if not (isinstance(malignant, list) and all(c in classes for c in malignant)):
            bad("malignant_classes", f"must be a list of names from 'classes', found {malignant!r}")
        if classes[0] != "melanoma":
            bad("classes", f"must start with melanoma (the column the score rules read), found {classes!r}")
    for key in ("gate", "head", "quality"):
        if key in meta and not isinstance(meta[key], dict):
            bad(key, "must be a JSON object")
    gate = meta.get("gate")
    if gate is not None:
        need = ("mean_b64", "basis_b64", "class_means_b64", "eigvals", "dims", "embedding_size", "classes",
                "residual_var", "threshold")
        missing_gate = [k for k in need if k not in gate]
        if missing_gate:
            bad("gate", f"lacks {missing_gate}")
        if not isinstance(gate["threshold"], (int, float)) or isinstance(gate["threshold"], bool):
            bad("gate.threshold", f"must be a number, found {gate['threshold']!r}")
        if "embedding" not in meta["output"].get("extra", {}):
            bad("gate", "needs an embedding output (output.extra.embedding), and the sidecar declares none")
    head = meta.get("head")
    if head is not None:
        hs = head.get("shape")
        fmap = meta["output"].get("extra", {}).get("feature_map", {}).get("shape")
        columns = meta["output"].get("shape", [1, 1])[-1]
        if not (isinstance(hs, list) and len(hs) == 2 and fmap and hs == [fmap[-1], columns]
                and isinstance(head.get("kernel_b64"), str)):
            bad("head", f"shape {hs!r} must be [feature map channels, output columns] = "
                        f"[{fmap[-1] if fmap else '?'}, {columns}] with a kernel_b64")
    quality = meta.get("quality") or {}
    if not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in quality.values()):
        bad("quality", f"must map limit names to numbers, found {quality!r}")
    if meta.get("melanoma_rule", "binary") not in SCORE_RULES:
        bad("melanoma_rule", f"must be one of {list(SCORE_RULES)}, found {meta.get('melanoma_rule')!r}")
    mt = meta.get("malignant_threshold")
    if mt is not None and not (isinstance(mt, (int, float)) and not isinstance(mt, bool) and 0 <= mt <= 1):
        bad("malignant_threshold", f"must be a number from 0 to 1 or absent, found {mt!r}")
    temp = (cal or {}).get("diagnosis_temperature", 1.0)
    if not (isinstance(temp, (int, float)) and 0.05 <= temp <= 20):
        bad("calibration.diagnosis_temperature", f"must be a number from 0.05 to 20, found {temp!r}")
    for key in ("sha256", "model", "variant"):
        if not isinstance(meta[key], str):
            bad(key, "must be a string")
    try:
        spec = PreprocessSpec.from_dict(meta["preprocessing"])
    except (TypeError, ValueError) as e:
        bad("preprocessing", f"is not a valid preprocessing spec ({e})")
    if list(spec.size) != shape[1:3]:
        bad("preprocessing.size", f"{list(spec.size)} disagrees with input.shape {shape}")


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
