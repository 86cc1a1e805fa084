"""Refusing what is not a usable dermoscopic image of one lesion (numpy only).

Two checks, both on what the single invoke already gives:

* **Image quality**, on the resized image before colour constancy: nearly uniform frames,
  heavy over- or under-exposure, strong blur. Each has its own message.
* **Out-of-distribution gate** on the pooled embedding: a Mahalanobis distance to
  class-conditional Gaussians with one shared covariance (Lee et al. 2018), fitted on the
  training split of the very .tflite file. It is computed in the top principal directions of the
  within-class covariance plus a term for the energy outside them (photos of faces or text
  land there). Its threshold is chosen on the validation split so that at most a set share
  (2 %) of real lesions is refused. Parameters travel in the sidecar (`gate`).
"""
from __future__ import annotations

import base64
from dataclasses import dataclass

import numpy as np

OOD_MESSAGE = "this does not look like a dermoscopic image of a single skin lesion"


# --------------------------------------------------------------------------- image quality
@dataclass(frozen=True)
class QualityLimits:
    min_contrast: float = 4.0  # std of grey levels (0..255): below is a nearly uniform frame
    max_bright_fraction: float = 0.6  # share of pixels with grey >= 250: above is overexposed
    max_dark_fraction: float = 0.7  # share of pixels with grey <= 8: above is underexposed
    min_sharpness: float = 2.0  # variance of the Laplacian of grey levels at the model's size

    @classmethod
    def from_dict(cls, d: dict | None) -> "QualityLimits":
        known = {"min_contrast", "max_bright_fraction", "max_dark_fraction", "min_sharpness"}
        return cls(**{k: float(v) for k, v in (d or {}).items() if k in known})


def quality_measures(x: np.ndarray) -> dict:
    """Contrast, exposure and sharpness of an (H, W, 3) float image, values 0..255 (at the
    model's size: the sharpness limit is for that resolution)."""
    grey = np.asarray(x, dtype=np.float32) @ np.array([0.299, 0.587, 0.114], np.float32)
    lap = (grey[:-2, 1:-1] + grey[2:, 1:-1] + grey[1:-1, :-2] + grey[1:-1, 2:] - 4 * grey[1:-1, 1:-1])
    return {"contrast": float(grey.std()), "bright_fraction": float(np.mean(grey >= 250)),
            "dark_fraction": float(np.mean(grey <= 8)), "sharpness": float(lap.var())}


def quality_problem(x: np.ndarray, limits: QualityLimits = QualityLimits()) -> tuple[str, str, dict] | None:
    """(code, message, measures) of the first problem found, or None for a usable image."""
    m = quality_measures(x)
    if m["contrast"] < limits.min_contrast:
        return "uniform", "the image is nearly uniform: there is no lesion to see", m
    if m["bright_fraction"] > limits.max_bright_fraction:
        return "overexposed", "the image is heavily overexposed: retake it with less light or flash", m
    if m["dark_fraction"] > limits.max_dark_fraction:
        return "underexposed", "the image is too dark: retake it with more light", m
    if m["sharpness"] < limits.min_sharpness:
        return "blurred", "the image is too blurred: hold the dermatoscope still and refocus", m
    return None


# --------------------------------------------------------------------------- embedding gate
def _pack(a: np.ndarray) -> str:
    return base64.b64encode(np.asarray(a, "<f4").tobytes()).decode()


def _unpack(s: str, shape) -> np.ndarray:
    return np.frombuffer(base64.b64decode(s), "<f4").reshape(shape).astype(np.float64)


class Gate:
    """The out-of-distribution score of an embedding, and the refusal threshold."""

    def __init__(self, mean, basis, eigvals, class_means, residual_var: float, threshold: float):
        self.mean, self.basis, self.eigvals = mean, basis, eigvals
        self.class_means, self.residual_var, self.threshold = class_means, residual_var, threshold

    @classmethod
    def fit(cls, embeddings: np.ndarray, groups: np.ndarray, dims: int = 64) -> "Gate":
        """Fit on training embeddings (N, C) with a class label per row (any hashable)."""
        e = np.asarray(embeddings, dtype=np.float64)
        mean = e.mean(axis=0)
        labels = np.unique(groups)
        centred = np.concatenate([e[groups == g] - e[groups == g].mean(axis=0) for g in labels])
        cov = centred.T @ centred / max(1, len(centred) - len(labels))
        vals, vecs = np.linalg.eigh(cov)
        order = np.argsort(vals)[::-1][:dims]
        basis, eigvals = vecs[:, order], np.maximum(vals[order], 1e-8)
        class_means = np.stack([(e[groups == g] - mean).mean(axis=0) @ basis for g in labels])
        z = (e - mean) @ basis
        residual = np.sum((e - mean) ** 2, axis=1) - np.sum(z ** 2, axis=1)
        return cls(mean, basis, eigvals, class_means, float(max(np.mean(residual), 1e-8)), float("inf"))

    def scores(self, embeddings: np.ndarray) -> np.ndarray:
        """(N,) distances: squared Mahalanobis to the nearest class mean in the principal
        subspace per dimension, plus the residual energy outside it in units of its training
        mean. Both terms are about 1 on training lesions, so neither drowns the other."""
        e = np.atleast_2d(np.asarray(embeddings, dtype=np.float64)) - self.mean
        z = e @ self.basis
        maha = np.min(np.sum((z[:, None, :] - self.class_means[None]) ** 2 / self.eigvals, axis=2), axis=1)
        residual = np.maximum(np.sum(e ** 2, axis=1) - np.sum(z ** 2, axis=1), 0.0)
        return maha / len(self.eigvals) + residual / self.residual_var

    def score(self, embedding: np.ndarray) -> float:
        return float(self.scores(embedding)[0])

    def to_dict(self) -> dict:
        c, d = self.basis.shape
        return {"method": "mahalanobis (shared covariance, class-conditional means) in the top principal "
                          "directions + residual energy, on the pooled embedding",
                "dims": d, "embedding_size": c, "classes": int(len(self.class_means)),
                "mean_b64": _pack(self.mean), "basis_b64": _pack(self.basis), "eigvals": self.eigvals.tolist(),
                "class_means_b64": _pack(self.class_means), "residual_var": self.residual_var,
                "threshold": self.threshold}

    @classmethod
    def from_dict(cls, g: dict) -> "Gate":
        c, d, k = int(g["embedding_size"]), int(g["dims"]), int(g["classes"])
        return cls(_unpack(g["mean_b64"], (c,)), _unpack(g["basis_b64"], (c, d)),
                   np.asarray(g["eigvals"], dtype=np.float64), _unpack(g["class_means_b64"], (k, d)),
                   float(g["residual_var"]), float(g["threshold"]))


# --------------------------------------------------------------------------- activation maps
def activation_map(feature_map: np.ndarray, kernel: np.ndarray, column: int) -> np.ndarray:
    """Class activation map (Zhou et al. 2016) of one output column: the linear head applied at
    every position of the last feature map (H, W, C). Its mean over positions is the column's
    logit minus the bias, exactly, because the head is global average pooling + a linear layer."""
    column_weights = np.asarray(kernel)[:, column].astype(np.float32)  # float32: it runs per image
    return np.asarray(feature_map, dtype=np.float32) @ column_weights


def head_kernel(head: dict) -> np.ndarray:
    """The sidecar's head kernel (embedding size, columns) as float64."""
    raw = np.frombuffer(base64.b64decode(head["kernel_b64"]), "<f2")
    return raw.reshape(head["shape"]).astype(np.float64)


def normalised(cam: np.ndarray) -> np.ndarray:
    """A map min-max scaled to 0..1 for display (all zeros for a flat map)."""
    cam = np.asarray(cam, dtype=np.float64)
    span = cam.max() - cam.min()
    return (cam - cam.min()) / span if span > 1e-12 else np.zeros_like(cam)


# Anchor colours of the overlay's scale (low -> high), interpolated linearly: dark blue, cyan,
# yellow, red. Readable for the common colour-vision deficiencies by its lightness ramp.
_SCALE = np.array([[20, 30, 120], [0, 170, 200], [250, 220, 40], [220, 30, 30]], dtype=np.float64)


def colour(values: np.ndarray) -> np.ndarray:
    """0..1 values -> RGB uint8 on the overlay's colour scale."""
    v = np.clip(np.asarray(values, dtype=np.float64), 0, 1) * (len(_SCALE) - 1)
    lo = np.minimum(np.floor(v).astype(int), len(_SCALE) - 2)
    t = (v - lo)[..., None]
    return np.round(_SCALE[lo] * (1 - t) + _SCALE[lo + 1] * t).astype(np.uint8)


def overlay(image: np.ndarray, cam01: np.ndarray, alpha: float = 0.45, legend: bool = True):
    """A PIL image: `image` (H, W, 3, 0..255) with the 0..1 map blended over it (bilinear
    upsampling), and a colour scale from "low" to "high" under it."""
    from PIL import Image, ImageDraw
    h, w = image.shape[:2]
    small = Image.fromarray(np.round(np.asarray(cam01) * 255).astype(np.uint8))
    up = np.asarray(small.resize((w, h), Image.Resampling.BILINEAR), dtype=np.float64) / 255.0
    blended = (1 - alpha) * np.asarray(image, dtype=np.float64) + alpha * colour(up)
    out = Image.fromarray(np.clip(np.round(blended), 0, 255).astype(np.uint8))
    if not legend:
        return out
    bar_h = max(14, h // 12)
    canvas = Image.new("RGB", (w, h + bar_h + 14), (255, 255, 255))
    canvas.paste(out, (0, 0))
    ramp = colour(np.linspace(0, 1, w))[None].repeat(bar_h, axis=0)
    canvas.paste(Image.fromarray(ramp), (0, h + 2))
    draw = ImageDraw.Draw(canvas)
    draw.text((2, h + bar_h + 2), "low", fill=(0, 0, 0))
    draw.text((w - 28, h + bar_h + 2), "high", fill=(0, 0, 0))
    return canvas
