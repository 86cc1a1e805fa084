"""Keras model -> .tflite variants, each with a sidecar holding the metrics of that exact file."""
from __future__ import annotations

import platform
import time
from pathlib import Path

import numpy as np
import pandas as pd

from train import tfenv  # noqa: F401
import tensorflow as tf
import tf_keras as keras

from edge import DISCLAIMER, make_interpreter, write_sidecar
from edge.sidecar import sidecar_path
from train.backbones import REGISTRY
from train.config import TrainConfig
from train.evaluate import choose_threshold, full_report, predict_keras, predict_tflite

VARIANTS = ("float32", "float16", "dynamic", "int8", "pruned_int8")
LABELS = ["not melanoma", "melanoma"]
LICENCE_NOTE = ("Trained on HAM10000 (CC BY-NC 4.0) and ISIC archive images (CC-0 / CC BY-NC): "
                "for non-commercial research use only.")


def representative_data(pixels, idx: np.ndarray, n: int, seed: int):
    """Calibration generator: `n` training-split images, edge-preprocessed (0..255 float32)."""
    pick = np.sort(np.random.default_rng(seed).choice(idx, size=min(n, len(idx)), replace=False))

    def gen():
        for i in pick:
            yield [np.asarray(pixels[i], np.float32)[None]]
    return gen, len(pick)


def convert(model: keras.Model, variant: str, rep_data=None) -> tuple[bytes, dict]:
    """One variant's flatbuffer and a description of how it was quantized."""
    conv = tf.lite.TFLiteConverter.from_keras_model(model)
    how = {"float32": "none (float32)"}
    if variant == "float16":
        conv.optimizations = [tf.lite.Optimize.DEFAULT]
        conv.target_spec.supported_types = [tf.float16]
        how["float16"] = "float16 weights, float32 compute and I/O"
    elif variant == "dynamic":
        conv.optimizations = [tf.lite.Optimize.DEFAULT]
        how["dynamic"] = "dynamic-range: int8 weights, float activations and I/O"
    elif variant in ("int8", "pruned_int8"):
        if rep_data is None:
            raise ValueError("full-int8 conversion needs calibration data")
        conv.optimizations = [tf.lite.Optimize.DEFAULT]
        conv.representative_dataset = rep_data  # QAT models: calibrates the ranges QAT left open
        conv.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS_INT8]
        conv.inference_input_type = tf.uint8
        conv.inference_output_type = tf.uint8
        how[variant] = "full int8 (uint8 input/output)"
    elif variant != "float32":
        raise ValueError(f"unknown variant {variant!r}; choose from {VARIANTS}")
    return conv.convert(), {"description": how[variant]}


def io_spec(tflite_bytes: bytes) -> tuple[dict, dict]:
    """Input and output tensor specs as the interpreter reports them."""
    it, _ = make_interpreter(tflite_bytes)

    def spec(d):
        scale, zp = d["quantization"]
        return {"shape": [int(s) for s in d["shape"]], "dtype": np.dtype(d["dtype"]).name,
                "quantization": {"scale": float(scale), "zero_point": int(zp)} if scale else None}
    i, o = it.get_input_details()[0], it.get_output_details()[0]
    return spec(i), {**spec(o), "meaning": "probability of melanoma (target = 1)"}


def export(model_bytes: bytes, out_path: Path, *, backbone: str, variant: str, quantization: dict,
           cfg: dict, run_metrics: dict, rows: pd.DataFrame, pixels, keras_probs: np.ndarray,
           extra: dict | None = None, threads: int = 2) -> dict:
    """Write the .tflite and its sidecar; its threshold and metrics come from this very file."""
    out_path.write_bytes(model_bytes)
    inp, outp = io_spec(model_bytes)
    spec = TrainConfig.from_dict(cfg).preprocess_spec()
    provisional = {"model": backbone, "variant": variant, "input": inp, "output": outp,
                   "preprocessing": spec.to_dict(), "labels": LABELS, "threshold": 0.5,
                   "metrics": {}, "provenance": {}, "config": cfg}
    write_sidecar(out_path, provisional)  # lets the edge runner load the file for evaluation
    keep = rows.index[rows["split"].isin(["val", "test"])].to_numpy()
    t0 = time.time()
    try:
        probs = predict_tflite(out_path, pixels, keep, threads)
    except BaseException:
        # never leave a model behind with a provisional (unvalidated) threshold
        out_path.unlink(missing_ok=True)
        sidecar_path(out_path).unlink(missing_ok=True)
        raise
    preds = rows.loc[keep, ["image", "source", "split", "target"]].assign(probability=probs)
    threshold = choose_threshold(preds, cfg["target_sensitivity"])
    calibrated, calibration = calibrate(preds, threshold["threshold"])
    report = full_report(calibrated, calibration.get("probability_threshold", threshold["threshold"]),
                         cfg["bootstrap"], cfg["seed"])
    parity = parity_report(preds, keras_probs)
    meta = {
        "model": backbone, "variant": variant, "input": inp, "output": outp,
        "preprocessing": {**spec.to_dict(), "normalization": REGISTRY[backbone][1].input_scaling},
        "labels": LABELS, "threshold": threshold["threshold"], "threshold_policy": threshold,
        **({"calibration": calibration} if calibration.get("method") == "platt" else {"calibration_skipped": calibration}),
        "quantization": quantization,
        "metrics": {"computed_with": "this .tflite file through edge.Classifier", **report,
                    "parity_vs_keras_float": parity, "evaluation_seconds": round(time.time() - t0, 1)},
        "provenance": {"datasets": run_metrics.get("provenance", []), "licence": LICENCE_NOTE,
                       "split": "StratifiedGroupKFold by patient/lesion, seed "
                                f"{cfg['seed']}, val {cfg['val_fraction']}, test {cfg['test_fraction']}",
                       "split_counts": rows["split"].value_counts().to_dict(),
                       "converted_with": {"tensorflow": tf.__version__, "python": platform.python_version()}},
        "config": cfg, "training_lineage": run_metrics.get("init_from"), **(extra or {}), "disclaimer": DISCLAIMER,
    }
    write_sidecar(out_path, meta)
    return meta


def calibrate(preds: pd.DataFrame, score_threshold: float) -> tuple[pd.DataFrame, dict]:
    """Platt scaling fitted on the validation rows of `preds` (raw scores of this file); returns
    the predictions as calibrated probabilities and what the sidecar records. The test rows are
    only measured (their ECE before and after)."""
    from edge.runner import platt
    from train.metrics import calibration as ece_of, fit_platt
    val, test = preds["split"] == "val", preds["split"] == "test"
    fit = fit_platt(preds.loc[val, "target"], preds.loc[val, "probability"])
    if fit["a"] <= 0:  # a score that does not rank the validation set: leave it uncalibrated
        return preds, {"reason": f"Platt fit on validation gave slope {fit['a']:.3f} <= 0"}
    p = platt(preds["probability"], fit["a"], fit["b"])
    ece = {f"{name}_{when}": ece_of(preds.loc[m, "target"].to_numpy(), q[m.to_numpy()])["ece"]
           for name, m in (("val", val), ("test", test)) if m.any()
           for when, q in (("before", preds["probability"].to_numpy()), ("after", p))}
    return preds.assign(probability=p), {
        **fit, "fitted_on": "validation split", "n": int(val.sum()), "ece": ece,
        "score_threshold": float(score_threshold),
        "probability_threshold": float(platt(score_threshold, fit["a"], fit["b"])),
        "applies": "P(melanoma) = sigmoid(a * logit(score) + b), score clipped to [1e-4, 1 - 1e-4]; "
                   "the decision stays score >= threshold (the same images)"}


def parity_report(preds: pd.DataFrame, keras_probs: np.ndarray) -> dict:
    """Test-split agreement of this file with the float Keras model it came from."""
    from train.metrics import roc_auc
    t = preds["split"].to_numpy() == "test"
    y, p, k = preds["target"].to_numpy()[t], preds["probability"].to_numpy()[t], keras_probs[t]
    d = np.abs(p - k)
    return {"keras_test_auc": roc_auc(y, k), "tflite_test_auc": roc_auc(y, p),
            "delta_auc": roc_auc(y, p) - roc_auc(y, k),
            "abs_prob_diff_median": float(np.median(d)), "abs_prob_diff_p99": float(np.quantile(d, 0.99)),
            "abs_prob_diff_max": float(d.max())}


def keras_predictions(model: keras.Model, rows: pd.DataFrame, pixels) -> np.ndarray:
    keep = rows.index[rows["split"].isin(["val", "test"])].to_numpy()
    return predict_keras(model, pixels, keep)
