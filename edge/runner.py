"""The on-device classifier: one .tflite + its sidecar, no TensorFlow required."""
from __future__ import annotations

import copy
import importlib
import os
import threading
from contextlib import contextmanager
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .gate import OOD_MESSAGE, Gate, QualityLimits, activation_map, head_kernel, normalised, quality_problem
from .preprocess import DEFAULT_MAX_PIXELS, ImageSource, MemoryBudget, finish, resized_array
from .scores import diagnosis_distribution, melanoma_score, tempered
from .sidecar import SidecarError, preprocess_spec, read_sidecar

# The shipped models: models/ in a checkout, edge/models once installed (pyproject.toml maps it).
_HERE = Path(__file__).resolve().parent
MODELS_DIR = next((d for d in (_HERE.parent / "models", _HERE / "models") if d.is_dir()), _HERE.parent / "models")
DEFAULT_MODEL = MODELS_DIR / "efficientnet_lite0_int8.tflite"


def usable_cores() -> int:
    """CPUs this process may run on (a container's or taskset's limit, not the host's count)."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


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
    # refusals: no melanoma verdict is given for an image that is not a usable lesion image
    refused: bool = False
    refusal: str | None = None  # "out_of_distribution", "uniform", "overexposed", "underexposed", "blurred"
    reason: str | None = None  # the message shown
    ood_score: float | None = None  # the gate's distance (refused above the sidecar's gate.threshold)
    heatmap: dict | None = None  # {"melanoma": HxW 0..1, "<top diagnosis>": HxW 0..1}: class activation maps

    def to_dict(self) -> dict:
        if self.refused:
            d = {"refused": True, "refusal": self.refusal, "reason": self.reason,
                 "latency_ms": round(self.latency_ms, 3)}
            if self.ood_score is not None:
                d["ood_score"] = round(self.ood_score, 4)
            return d
        d = {"probability": round(self.probability, 6), "calibrated": self.calibrated,
             "score": round(self.score, 6), "label": self.label, "melanoma": self.melanoma,
             "threshold": round(self.threshold, 6), "latency_ms": round(self.latency_ms, 3)}
        if self.diagnoses is not None:
            d.update(malignant_probability=round(self.malignant_probability, 6), malignant=self.malignant,
                     diagnoses=[{"diagnosis": n, "probability": round(p, 6)} for n, p in self.diagnoses])
        if self.ood_score is not None:
            d.update(refused=False, ood_score=round(self.ood_score, 4))
        if self.heatmap is not None:
            d["heatmap"] = {k: np.round(v, 3).tolist() for k, v in self.heatmap.items()}
        return d


def refused(code: str, reason: str, ood_score: float | None = None, ms: float = 0.0) -> Prediction:
    """A Prediction with no verdict: the image is not a usable lesion image."""
    return Prediction(probability=float("nan"), melanoma=False, label="refused", threshold=float("nan"),
                      latency_ms=ms, refused=True, refusal=code, reason=reason, ood_score=ood_score)


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
    """Float array -> the integer input tensor (`q = round(x / scale) + zero_point`). A uint8
    image for a uint8 input of scale 1 and zero point 0 (the shipped int8 files) is that tensor."""
    if x.dtype == np.uint8 and np.dtype(dtype) == np.uint8 and scale == 1.0 and zero_point == 0:
        return np.ascontiguousarray(x)
    info = np.iinfo(dtype)
    # float32 throughout: the preprocessed values are whole 0..255, exact in float32, and this
    # runs per image (float64 made it a fifth of the int8 invoke's time)
    q = np.rint(np.asarray(x, dtype=np.float32) / np.float32(scale))
    q += np.float32(zero_point)
    return np.clip(q, info.min, info.max, out=q).astype(dtype)


def dequantize(q: np.ndarray, scale: float, zero_point: int) -> np.ndarray:
    return scale * (q.astype(np.float32) - zero_point)


class Classifier:
    """Loads a model once; `classify()` is preprocess -> invoke -> postprocess. Thread-safe."""

    def __init__(self, model_path: Path | str = DEFAULT_MODEL, num_threads: int | None = None,
                 max_pixels: int = DEFAULT_MAX_PIXELS, budget: MemoryBudget | None = None, refuse: bool = True):
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
        # refusals (sidecars that carry them): image quality limits and the embedding gate
        self.refuse = refuse
        self.quality = QualityLimits.from_dict(self.meta["quality"]) if "quality" in self.meta else None
        try:
            self.gate = Gate.from_dict(self.meta["gate"]) if "gate" in self.meta else None
            self.head_kernel = head_kernel(self.meta["head"]) if "head" in self.meta else None
        except (ValueError, TypeError, KeyError) as e:  # a damaged base64 field or a wrong size
            raise SidecarError(f"{self.model_path.name}: the sidecar's gate or head cannot be read ({e})") from None
        self.num_threads = num_threads
        self.max_pixels = max_pixels
        self.budget = budget  # shared by the threads that call classify(), if given
        self._interpreter, self.backend = make_interpreter(self.model_path, num_threads)
        self._input = self._interpreter.get_input_details()[0]
        outputs = self._interpreter.get_output_details()
        self._output = self._scores_output(outputs)
        extra = self.meta["output"].get("extra", {})
        self._extra = {name: next((o for o in outputs if [int(v) for v in o["shape"]] == list(e["shape"])), None)
                       for name, e in extra.items()}
        if self.gate is not None and self._extra.get("embedding") is None:
            raise SidecarError(f"{self.model_path.name}: the sidecar has a refusal gate but the file has no "
                               "embedding output of the declared shape")
        actual, declared = [int(v) for v in self._input["shape"]], list(self.meta["input"]["shape"])
        if actual[1:] != declared[1:]:
            raise SidecarError(f"{self.model_path.name}: the model's input shape is {actual}, "
                               f"its sidecar says {declared}")
        self._lock = threading.Lock()

    def replica(self) -> "Classifier":
        """Another interpreter on the same file, sharing everything else (sidecar, gate, memory
        budget): for answering images at once (one invoke per interpreter at a time; the
        runtime releases the GIL during invoke)."""
        twin = copy.copy(self)
        twin._interpreter, twin.backend = make_interpreter(self.model_path, self.num_threads)
        twin._lock = threading.Lock()
        return twin

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

    @staticmethod
    def _dequantized(detail: dict, y: np.ndarray) -> np.ndarray:
        if np.issubdtype(detail["dtype"], np.integer):
            scale, zero_point = detail["quantization"]
            return dequantize(y, scale, zero_point)
        return y.astype(np.float32)

    def _postprocess(self, y: np.ndarray) -> np.ndarray:
        return np.clip(self._dequantized(self._output, y).reshape(-1).astype(np.float64), 0.0, 1.0)

    def predict_outputs(self, x: np.ndarray) -> tuple[dict, float]:
        """One invoke: {"scores": columns, "embedding": (C,), "feature_map": (H, W, C)} (the
        last two where the file has them) and the interpreter milliseconds."""
        batch = self._prepare(x[None, ...])
        with self._lock:
            t0 = time.perf_counter()
            self._interpreter.set_tensor(self._input["index"], batch)
            self._interpreter.invoke()
            y = self._interpreter.get_tensor(self._output["index"])  # get_tensor returns a copy
            extra = {name: self._interpreter.get_tensor(d["index"])
                     for name, d in self._extra.items() if d is not None}
            ms = (time.perf_counter() - t0) * 1000
        out = {"scores": self._postprocess(y)}
        for name, v in extra.items():
            out[name] = self._dequantized(self._extra[name], v)[0]
        return out, ms

    def predict_scores(self, x: np.ndarray) -> tuple[np.ndarray, float]:
        """Preprocessed float array (H, W, 3) -> (every output column, interpreter milliseconds):
        one column for a binary model; the melanoma head then the diagnoses for a multi-task one."""
        out, ms = self.predict_outputs(x)
        return out["scores"], ms

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

        Refusals first (sidecars that carry them, unless `refuse` is off): an unusable image
        (nearly uniform, over/under-exposed, blurred) is refused before the invoke; an image whose
        embedding is far from the training lesions (edge.gate) after it. A refused image gets no
        melanoma verdict.

        A multi-task model also gives every diagnosis with its probability (melanoma's is the
        calibrated melanoma probability; the others share the rest as the diagnosis head says)
        and the malignant probability (melanoma + BCC + AK/IEC). A lesion is `malignant`
        (suspected) when melanoma is flagged, when that probability reaches the sidecar's
        `malignant_threshold`, or when its most likely diagnosis is malignant; the label then
        never reads merely "not melanoma". Files with a feature map and head weights also give
        class activation maps (`heatmap`) of melanoma and of the most likely diagnosis."""
        return self.answer(self.prepare(source), tta)

    def prepare(self, source: ImageSource) -> np.ndarray | Prediction:
        """The decoding half of `classify` (thread-safe, no interpreter): the model's input array
        (uint8 when decoded from a file), or the refusal of an unusable image. Raises
        edge.ImageError for unreadable input."""
        raw = resized_array(source, self.spec, max_pixels=self.max_pixels, budget=self.budget, dtype=np.uint8)
        if self.refuse and self.quality is not None:
            problem = quality_problem(raw, self.quality)
            if problem is not None:
                return refused(problem[0], problem[1])
        return finish(raw, self.spec)

    def answer(self, x: np.ndarray | Prediction, tta: bool = False) -> Prediction:
        """The inference half of `classify`, on what `prepare` returned."""
        if isinstance(x, Prediction):
            return x
        outs, ms = self.predict_outputs(x)
        ood = None
        if self.gate is not None and "embedding" in outs:
            ood = self.gate.score(outs["embedding"])
            if self.refuse and ood > self.gate.threshold:  # before any TTA invoke
                return refused("out_of_distribution", OOD_MESSAGE, ood, ms)
        if tta:
            views = [self.predict_scores(np.ascontiguousarray(v)) for v in dihedral_views(x)[1:]]
            outs["scores"] = np.mean([outs["scores"]] + [v[0] for v in views], axis=0)
            ms += sum(v[1] for v in views)
        y = outs["scores"]
        score = float(melanoma_score(y[None], self.rule)[0])
        melanoma = score >= self.score_threshold  # the same decision as probability >= threshold
        probability = self.to_probability(score)
        base = dict(probability=probability, melanoma=melanoma, threshold=self.threshold, latency_ms=ms,
                    score=score, calibrated=self.calibration is not None, ood_score=ood)
        if not self.classes or len(y) != 1 + len(self.classes):
            return Prediction(label=self.labels[int(melanoma)], heatmap=self._heatmap(outs, None), **base)
        dist = diagnosis_distribution(probability, tempered(y[1:], self.dx_temperature), self.classes.index("melanoma"))
        order = np.argsort(-dist, kind="stable")
        malignant_p = float(dist[self.malignant_classes].sum())
        top = int(order[0])
        suspected = bool(melanoma or top in self.malignant_classes
                         or (self.malignant_threshold is not None and malignant_p >= self.malignant_threshold))
        if melanoma:
            label = self.labels[1]
        elif suspected:
            likely = max(self.malignant_classes or [top], key=lambda i: dist[i])
            label = ("possibly melanoma (below the flagging threshold)" if self.classes[likely] == "melanoma"
                     else f"not melanoma, but possibly malignant: {self.classes[likely]}")
        else:
            label = f"{self.labels[0]} (most likely {self.classes[top]})"
        return Prediction(label=label, diagnoses=tuple((self.classes[i], float(dist[i])) for i in order),
                          malignant_probability=malignant_p, malignant=suspected, heatmap=self._heatmap(outs, top),
                          **base)

    def _heatmap(self, outs: dict, top: int | None) -> dict | None:
        """Class activation maps (0..1) of the melanoma head and of diagnosis `top`."""
        if self.head_kernel is None or "feature_map" not in outs:
            return None
        maps = {"melanoma": normalised(activation_map(outs["feature_map"], self.head_kernel, 0))}
        if top is not None and self.classes[top] != "melanoma":
            maps[self.classes[top]] = normalised(activation_map(outs["feature_map"], self.head_kernel, 1 + top))
        return maps

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
