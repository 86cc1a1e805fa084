"""What a model's output columns mean, in numpy only (the runner, training and export share it).

A binary model outputs one column, P(melanoma). A multi-task model outputs 1 + K columns: its
melanoma head's sigmoid, then a softmax over K diagnoses (the sidecar's `classes`). The melanoma
score is read from them by a rule chosen on validation and recorded in the sidecar:

    binary     the melanoma head alone
    diagnosis  the diagnosis head's melanoma column
    mean       the mean of the two
"""
from __future__ import annotations

import numpy as np

SCORE_RULES = ("binary", "diagnosis", "mean")


def melanoma_score(scores: np.ndarray, rule: str = "mean", melanoma_class: int = 0) -> np.ndarray:
    """(N, 1 + K) or (N,) outputs -> (N,) melanoma scores by `rule`."""
    s = np.asarray(scores, dtype=np.float64)
    if s.ndim == 1 or s.shape[-1] == 1:
        return s.reshape(len(s), -1)[:, 0] if s.ndim > 1 else s
    if rule not in SCORE_RULES:
        raise ValueError(f"unknown melanoma score rule {rule!r}; use one of {SCORE_RULES}")
    binary, dx = s[:, 0], s[:, 1 + melanoma_class]
    return {"binary": binary, "diagnosis": dx, "mean": (binary + dx) / 2}[rule]


def tempered(probabilities: np.ndarray, temperature: float) -> np.ndarray:
    """Temperature scaling of softmax outputs: softmax(log(p) / T), rows summing to 1."""
    logp = np.log(np.clip(np.asarray(probabilities, dtype=np.float64), 1e-6, 1.0)) / temperature
    e = np.exp(logp - logp.max(axis=-1, keepdims=True))
    return e / e.sum(axis=-1, keepdims=True)


def diagnosis_distribution(p_melanoma, dx: np.ndarray, melanoma_class: int = 0) -> np.ndarray:
    """The diagnoses shown to the user: melanoma gets the (calibrated) melanoma probability, the
    other classes share the rest in the proportions of the diagnosis head, so the list sums to 1
    and agrees with the melanoma figure. One image (K,) or many (N, K) with p_melanoma (N,)."""
    dx = np.asarray(dx, dtype=np.float64)
    one = dx.ndim == 1
    dx, p = np.atleast_2d(dx), np.atleast_1d(np.asarray(p_melanoma, dtype=np.float64))
    rest = np.delete(dx, melanoma_class, axis=1)
    total = rest.sum(axis=1, keepdims=True)
    share = np.where(total > 1e-9, rest / np.maximum(total, 1e-9), 1.0 / rest.shape[1])
    out = np.insert(share * (1.0 - p[:, None]), melanoma_class, p, axis=1)
    return out[0] if one else out


def fit_temperature(probabilities: np.ndarray, labels: np.ndarray) -> float:
    """The temperature T minimising the negative log-likelihood of softmax(log(p) / T) on
    (validation) rows with a known class; a log-spaced grid, then a finer one around the best."""
    labels = np.asarray(labels, dtype=int)

    def nll(t):
        q = tempered(probabilities, t)
        return -np.mean(np.log(np.clip(q[np.arange(len(labels)), labels], 1e-12, 1.0)))
    grid = np.exp(np.linspace(np.log(0.25), np.log(8.0), 61))
    best = grid[int(np.argmin([nll(t) for t in grid]))]
    fine = np.linspace(best * 0.94, best * 1.06, 25)
    return float(fine[int(np.argmin([nll(t) for t in fine]))])
