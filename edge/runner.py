"""The on-device classifier: one .tflite + its sidecar, no TensorFlow required."""
from __future__ import annotations

import importlib
import os
import threading
from contextlib import contextmanager
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .preprocess import DEFAULT_MAX_PIXELS, ImageSource, MemoryBudget, preprocess
from .scores import diagnosis_distribution, melanoma_score, tempered
from .sidecar import SidecarError, preprocess_spec, read_sidecar

# The shipped models: models/ in a checkout, edge/models once installed (pyproject.toml maps it).
_HERE = Path(__file__).resolve().parent
MODELS_DIR = next((d for d in (_HERE.parent / "models", _HERE / "models") if d.is_dir()), _HERE.parent / "models")
DEFAULT_MODEL = MODELS_DIR / "efficientnet_lite0_int8.tflite"


def load_interpreter_class():
    """Return (Interpreter class, backend name): ai_edge_litert, else tflite_runtime, else tf.lite."""
    try:
        from ai_edge_litert.interpreter import Interpreter
        return Interpreter, "ai_edge_litert"
    except ImportError:
        pass
    try:
        from tflite_runtime.interpreter import Interpreter
        return Interpreter, "tflite_runtime"
    except ImportError:
        pass
    try:
        # Last resort, loaded only when neither runtime above exists (training machines have TF);
        # never imported on a device that has ai_edge_litert or tflite_runtime.
        tf = importlib.import_module("tensorflow")
        return tf.lite.Interpreter, "tensorflow.lite"
    except ImportError:
        raise ImportError("no TFLite interpreter found: pip install -r requirements-edge.txt "
                          "(ai-edge-litert)") from None


def make_interpreter(model: Path | str | bytes, num_threads: int | None = None):
    """(allocated interpreter, backend name) for a .tflite path or its bytes: the one place an
    interpreter is made (runner, export checks, benchmarks)."""
    cls, backend = load_interpreter_class()
    source = {"model_content": bytes(model)} if isinstance(model, (bytes, bytearray)) else {"model_path": str(model)}
    with quiet_stderr():  # "INFO: Created TensorFlow Lite XNNPACK delegate for CPU." on every start
        interpreter = cls(**source, num_threads=num_threads)
        interpreter.allocate_tensors()
    return interpreter, backend


@contextmanager
def quiet_stderr():
    """Mute file descriptor 2 (the runtime's C++ notices bypass Python); errors still raise."""
    try:
        saved = os.dup(2)
    except OSError:  # no fd 2 at all
        yield
        return
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, 2)
    try:
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)
        os.close(devnull)


@dataclass(frozen=True)
class Prediction:
    probability: float  # P(melanoma): calibrated when `calibrated`, else the raw score
    melanoma: bool  # at or above the threshold
    label: str  # "melanoma", or "not melanoma" with the most likely diagnosis where the model has them
    threshold: float  # the shipped decision threshold, in the same units as `probability`
    latency_ms: float  # interpreter time for this image (no decoding)
    score: float = float("nan")  # the model's raw melanoma score, 0..1 (what the sidecar's threshold is on)
    calibrated: bool = False  # `probability` went through the sidecar's calibration
    # multi-task models only (None otherwise):
    diagnoses: tuple[tuple[str, float], ...] | None = None  # every class with its probability, most likely first
    malignant_probability: float | None = None  # melanoma + basal cell carcinoma + actinic keratosis/IEC
    malignant: bool | None = None  # a malignant or pre-malignant lesion is suspected (see Classifier.classify)

    def to_dict(self) -> dict:
        d = {"probability": round(self.probability, 6), "calibrated": self.calibrated,
             "score": round(self.score, 6), "label": self.label, "melanoma": self.melanoma,
             "threshold": round(self.threshold, 6), "latency_ms": round(self.latency_ms, 3)}
        if self.diagnoses is not None:
            d.update(malignant_probability=round(self.malignant_probability, 6), malignant=self.malignant,
                     diagnoses=[{"diagnosis": n, "probability": round(p, 6)} for n, p in self.diagnoses])
        return d


def platt(score, a: float, b: float):
    """Platt scaling: sigmoid(a * logit(score) + b), the calibration a sidecar may carry.
    Scores are clipped to [1e-4, 1 - 1e-4] first (an int8 output can be exactly 0 or 1)."""
    s = np.clip(np.asarray(score, dtype=np.float64), 1e-4, 1 - 1e-4)
    return 1.0 / (1.0 + np.exp(-(a * np.log(s / (1 - s)) + b)))


def dihedral_views(x: np.ndarray) -> list[np.ndarray]:
    """The 8 flips/rotations of a square (H, W, C) array; the first is `x` itself."""
    turns = [np.rot90(x, k, axes=(0, 1)) for k in range(4)]
    return turns + [t[:, ::-1] for t in turns]


def quantize(x: np.ndarray, dtype: np.dtype, scale: float, zero_point: int) -> np.ndarray:
    """Float array -> the integer input tensor (`q = round(x / scale) + zero_point`)."""
    info = np.iinfo(dtype)
    return np.clip(np.round(x / scale) + zero_point, info.min, info.max).astype(dtype)


def dequantize(q: np.ndarray, scale: float, zero_point: int) -> np.ndarray:
    return scale * (q.astype(np.float32) - zero_point)


class Classifier:
    """Loads a model once; `classify()` is preprocess -> invoke -> postprocess. Thread-safe."""

    def __init__(self, model_path: Path | str = DEFAULT_MODEL, num_threads: int | None = None,
                 max_pixels: int = DEFAULT_MAX_PIXELS, budget: MemoryBudget | None = None):
        self.model_path = Path(model_path)
        self.meta = read_sidecar(self.model_path)  # raises SidecarError on a mismatch
        self.spec = preprocess_spec(self.meta)
        self.calibration = self.meta.get("calibration")  # Platt scaling fitted on validation, if any
        self.score_threshold = float(self.meta["threshold"])  # on the raw score, chosen on validation
        self.threshold = self.to_probability(self.score_threshold)
        self.labels = list(self.meta["labels"])
        # multi-task models: the diagnosis classes, how the melanoma score is read, what counts as malignant
        self.classes = self.meta.get("classes")
        self.rule = self.meta.get("melanoma_rule", "binary")
        self.malignant_classes = [self.classes.index(c) for c in self.meta.get("malignant_classes", [])] \
            if self.classes else []
        self.dx_temperature = float((self.calibration or {}).get("diagnosis_temperature", 1.0))
        self.malignant_threshold = self.meta.get("malignant_threshold")
        self.num_threads = num_threads
        self.max_pixels = max_pixels
        self.budget = budget  # shared by the threads that call classify(), if given
        self._interpreter, self.backend = make_interpreter(self.model_path, num_threads)
        self._input = self._interpreter.get_input_details()[0]
        self._output = self._scores_output(self._interpreter.get_output_details())
        actual, declared = [int(v) for v in self._input["shape"]], list(self.meta["input"]["shape"])
        if actual[1:] != declared[1:]:
            raise SidecarError(f"{self.model_path.name}: the model's input shape is {actual}, "
                               f"its sidecar says {declared}")
        self._lock = threading.Lock()

    def _scores_output(self, outputs: list[dict]) -> dict:
        """The output tensor the sidecar's `output` describes (files may carry more outputs)."""
        want = list(self.meta["output"].get("shape", [1, 1]))
        for o in outputs:
            if [int(v) for v in o["shape"]] == want:
                return o
        raise SidecarError(f"{self.model_path.name}: no output of shape {want} (the sidecar's output.shape); "
                           f"the file has {[list(map(int, o['shape'])) for o in outputs]}")

    @property
    def input_details(self) -> dict:
        return self._input

    def _prepare(self, x: np.ndarray) -> np.ndarray:
        dtype = self._input["dtype"]
        if np.issubdtype(dtype, np.integer):
            scale, zero_point = self._input["quantization"]
            return quantize(x, dtype, scale, zero_point)
        return x.astype(dtype)

    def _postprocess(self, y: np.ndarray) -> np.ndarray:
        if np.issubdtype(self._output["dtype"], np.integer):
            scale, zero_point = self._output["quantization"]
            y = dequantize(y, scale, zero_point)
        return np.clip(y.reshape(-1).astype(np.float64), 0.0, 1.0)

    def predict_scores(self, x: np.ndarray) -> tuple[np.ndarray, float]:
        """Preprocessed float array (H, W, 3) -> (every output column, interpreter milliseconds):
        one column for a binary model; the melanoma head then the diagnoses for a multi-task one."""
        batch = self._prepare(x[None, ...])
        with self._lock:
            t0 = time.perf_counter()
            self._interpreter.set_tensor(self._input["index"], batch)
            self._interpreter.invoke()
            y = self._interpreter.get_tensor(self._output["index"]).copy()
            ms = (time.perf_counter() - t0) * 1000
        return self._postprocess(y), ms

    def predict_array(self, x: np.ndarray) -> tuple[float, float]:
        """Preprocessed float array (H, W, 3) -> (raw melanoma score, interpreter milliseconds)."""
        y, ms = self.predict_scores(x)
        return float(melanoma_score(y[None], self.rule)[0]), ms

    def predict_tta(self, x: np.ndarray) -> tuple[float, float]:
        """Test-time augmentation: the mean score over the 8 flips and 90-degree rotations of
        the array (a lesion has no up or left), and the summed interpreter milliseconds."""
        y, ms = self.predict_scores_tta(x)
        return float(melanoma_score(y[None], self.rule)[0]), ms

    def predict_scores_tta(self, x: np.ndarray) -> tuple[np.ndarray, float]:
        runs = [self.predict_scores(np.ascontiguousarray(v)) for v in dihedral_views(x)]
        return np.mean([r[0] for r in runs], axis=0), float(sum(r[1] for r in runs))

    def classify(self, source: ImageSource, tta: bool = False) -> Prediction:
        """Image path/bytes -> Prediction (with `tta`, 8 invokes averaged). Raises
        edge.ImageError for unreadable input.

        A multi-task model also gives every diagnosis with its probability (melanoma's is the
        calibrated melanoma probability; the others share the rest as the diagnosis head says)
        and the malignant probability (melanoma + BCC + AK/IEC). A lesion is `malignant`
        (suspected) when melanoma is flagged, when that probability reaches the sidecar's
        `malignant_threshold`, or when its most likely diagnosis is malignant; the label then
        never reads merely "not melanoma"."""
        x = preprocess(source, self.spec, max_pixels=self.max_pixels, budget=self.budget)
        y, ms = self.predict_scores_tta(x) if tta else self.predict_scores(x)
        score = float(melanoma_score(y[None], self.rule)[0])
        melanoma = score >= self.score_threshold  # the same decision as probability >= threshold
        probability = self.to_probability(score)
        base = dict(probability=probability, melanoma=melanoma, threshold=self.threshold, latency_ms=ms,
                    score=score, calibrated=self.calibration is not None)
        if not self.classes or len(y) != 1 + len(self.classes):
            return Prediction(label=self.labels[int(melanoma)], **base)
        dist = diagnosis_distribution(probability, tempered(y[1:], self.dx_temperature), self.classes.index("melanoma"))
        order = np.argsort(-dist, kind="stable")
        malignant_p = float(dist[self.malignant_classes].sum())
        top = int(order[0])
        suspected = bool(melanoma or top in self.malignant_classes
                         or (self.malignant_threshold is not None and malignant_p >= self.malignant_threshold))
        if melanoma:
            label = self.labels[1]
        elif suspected:
            other = max((i for i in self.malignant_classes if self.classes[i] != "melanoma"), key=lambda i: dist[i])
            label = f"not melanoma, but possibly malignant: {self.classes[other]}"
        else:
            label = f"{self.labels[0]} (most likely {self.classes[top]})"
        return Prediction(label=label, diagnoses=tuple((self.classes[i], float(dist[i])) for i in order),
                          malignant_probability=malignant_p, malignant=suspected, **base)

    def to_probability(self, score: float) -> float:
        """The calibrated probability of a raw score (the score itself without calibration)."""
        if self.calibration is None:
            return float(score)
        return float(platt(score, self.calibration["a"], self.calibration["b"]))

    def identity(self) -> dict:
        """How every output (CLI --json, API) names the model."""
        return {"model": self.meta["model"], "variant": self.meta["variant"], "model_sha256": self.meta["sha256"]}

    def describe(self) -> dict:
        """A short summary for `python -m edge info` and the server."""
        q = self._input.get("quantization", (0.0, 0))
        return {"model": self.meta["model"], "variant": self.meta["variant"],
                "file": str(self.model_path), "sha256": self.meta["sha256"],
                "backend": self.backend, "num_threads": self.num_threads,
                "input_shape": [int(s) for s in self._input["shape"]],
                "input_dtype": np.dtype(self._input["dtype"]).name,
                "input_quantization": {"scale": float(q[0]), "zero_point": int(q[1])},
                "output_dtype": np.dtype(self._output["dtype"]).name,
                "threshold": self.threshold, "score_threshold": self.score_threshold,
                "calibration": self.calibration, "labels": self.labels, "classes": self.classes,
                "melanoma_rule": self.rule, "malignant_threshold": self.malignant_threshold,
                "preprocessing": self.meta["preprocessing"]}
