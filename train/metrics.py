"""Evaluation metrics as pure functions of (labels, probabilities). No I/O here."""
from __future__ import annotations

import numpy as np
from sklearn.metrics import average_precision_score, roc_auc_score, roc_curve


def roc_auc(y: np.ndarray, p: np.ndarray) -> float | None:
    """ROC AUC, or None when only one class is present."""
    return float(roc_auc_score(y, p)) if len(np.unique(y)) == 2 else None


def bootstrap_auc_ci(y: np.ndarray, p: np.ndarray, n: int = 1000, seed: int = 0,
                     level: float = 0.95) -> tuple[float, float] | None:
    """Percentile bootstrap interval for ROC AUC (resampling images, stratified by class)."""
    if len(np.unique(y)) < 2:
        return None
    rng = np.random.default_rng(seed)
    pos, neg = np.flatnonzero(y == 1), np.flatnonzero(y == 0)
    aucs = []
    for _ in range(n):
        idx = np.concatenate([rng.choice(pos, len(pos)), rng.choice(neg, len(neg))])
        aucs.append(roc_auc_score(y[idx], p[idx]))
    lo, hi = np.quantile(aucs, [(1 - level) / 2, 1 - (1 - level) / 2])
    return float(lo), float(hi)


def threshold_for_sensitivity(y: np.ndarray, p: np.ndarray, target: float = 0.90) -> float:
    """The highest threshold whose sensitivity (p >= t) on these data reaches `target`.

    Used on validation data only; the test split never picks anything.
    """
    pos = np.sort(p[y == 1])[::-1]
    if len(pos) == 0:
        raise ValueError("no positive examples to set a sensitivity threshold on")
    k = int(np.ceil(target * len(pos)))  # need at least k positives at or above t
    return float(pos[max(k, 1) - 1])


def confusion(y: np.ndarray, p: np.ndarray, threshold: float) -> dict:
    pred = p >= threshold
    return {"tp": int(np.sum(pred & (y == 1))), "fn": int(np.sum(~pred & (y == 1))),
            "tn": int(np.sum(~pred & (y == 0))), "fp": int(np.sum(pred & (y == 0)))}


def _ratio(a: int, b: int) -> float | None:
    return a / b if b else None


def calibration(y: np.ndarray, p: np.ndarray, bins: int = 10) -> dict:
    """Expected calibration error over equal-width bins, with the reliability table."""
    edges = np.linspace(0, 1, bins + 1)
    idx = np.clip(np.digitize(p, edges[1:-1]), 0, bins - 1)
    table, ece = [], 0.0
    for b in range(bins):
        m = idx == b
        if not m.any():
            continue
        conf, acc = float(p[m].mean()), float(y[m].mean())
        ece += m.mean() * abs(conf - acc)
        table.append({"bin_low": float(edges[b]), "bin_high": float(edges[b + 1]), "count": int(m.sum()),
                      "mean_probability": conf, "fraction_melanoma": acc})
    return {"ece": float(ece), "bins": bins, "reliability": table}


def fit_platt(y, p) -> dict:
    """Platt scaling fitted on (labels, raw scores): P = sigmoid(a * logit(score) + b), by
    unregularised logistic regression on the logit (edge.runner.platt applies it). Both
    parameters are needed: a class-balanced loss shifts the scores (b) as well as scaling them (a)."""
    from sklearn.linear_model import LogisticRegression
    s = np.clip(np.asarray(p, dtype=np.float64), 1e-4, 1 - 1e-4)
    z = np.log(s / (1 - s)).reshape(-1, 1)
    fit = LogisticRegression(C=1e6, max_iter=1000).fit(z, np.asarray(y).astype(int))
    return {"method": "platt", "a": float(fit.coef_[0, 0]), "b": float(fit.intercept_[0])}


def binary_metrics(y, p, threshold: float, bootstrap: int = 1000, seed: int = 0) -> dict:
    """Everything the report asks for, for one set of (labels, probabilities)."""
    y, p = np.asarray(y).astype(int), np.asarray(p, dtype=np.float64)
    cm = confusion(y, p, threshold)
    sens, spec = _ratio(cm["tp"], cm["tp"] + cm["fn"]), _ratio(cm["tn"], cm["tn"] + cm["fp"])
    prec = _ratio(cm["tp"], cm["tp"] + cm["fp"])
    f1 = 2 * prec * sens / (prec + sens) if prec and sens else 0.0
    ci = bootstrap_auc_ci(y, p, bootstrap, seed) if bootstrap else None
    return {
        "n": int(len(y)), "n_melanoma": int(y.sum()),
        "roc_auc": roc_auc(y, p), "roc_auc_ci95": list(ci) if ci else None,
        "pr_auc": float(average_precision_score(y, p)) if y.any() else None,
        "threshold": float(threshold), "sensitivity": sens, "specificity": spec,
        "balanced_accuracy": (sens + spec) / 2 if sens is not None and spec is not None else None,
        "precision": prec, "f1": f1, "confusion_matrix": cm,
        "calibration": calibration(y, p),
    }


def metrics_by_source(y, p, sources, threshold: float, bootstrap: int = 1000, seed: int = 0) -> dict:
    """binary_metrics overall and for each source."""
    y, p, sources = np.asarray(y), np.asarray(p), np.asarray(sources)
    out = {"all": binary_metrics(y, p, threshold, bootstrap, seed)}
    for s in sorted(set(sources.tolist())):
        m = sources == s
        out[s] = binary_metrics(y[m], p[m], threshold, bootstrap, seed)
    return out


def roc_points(y, p) -> tuple[np.ndarray, np.ndarray]:
    fpr, tpr, _ = roc_curve(y, p)
    return fpr, tpr
