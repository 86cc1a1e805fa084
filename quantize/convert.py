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
from edge.scores import diagnosis_distribution, fit_temperature, melanoma_score, tempered
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


def head_layer(model: keras.Model, name: str, unwrap: bool = True):
    """The layer `name` of a plain, pruned or QAT model (tfmot prefixes and wraps layers)."""
    for layer in model.layers:
        if layer.name in (name, f"quant_{name}", f"prune_low_magnitude_{name}"):
            return getattr(layer, "layer", layer) if unwrap else layer
    return None


def with_extra_outputs(model: keras.Model) -> keras.Model:
    """The model with two more outputs beside its scores: the last feature map (H, W, C), input
    of the global average pooling, and the pooled embedding (C). Because the head is pooling + a
    linear layer, the runner computes an exact class activation map from the first and an
    out-of-distribution distance from the second, in the same single invoke."""
    dropout = next(layer for layer in model.layers if layer.name.endswith("head_dropout"))
    # A layer shared with another graph (pruning's strip, QAT's clone, a wrapper model) has one
    # inbound node per graph, and `.input` is the first one's: take the newest node that
    # connects to this model's input.
    problems = []
    for node in reversed(range(len(dropout.inbound_nodes))):
        embedding = dropout.get_input_at(node)
        pool = embedding._keras_history.layer
        feature_map = pool.get_input_at(embedding._keras_history.node_index)
        try:
            return keras.Model(model.input, [model.output, feature_map, embedding], name=model.name)
        except ValueError as err:  # "Graph disconnected": that node belongs to another graph
            problems.append(str(err).split(".")[0])
    raise ValueError(f"{model.name}: no head_dropout input reaches the model input ({'; '.join(problems)})")


def head_weights(model: keras.Model) -> dict:
    """The linear head (melanoma column, then the diagnosis columns) as the sidecar stores it:
    float16 little-endian, base64, (embedding size, columns), for the runner's activation maps."""
    import base64
    kernels, biases = [], []
    for name in ("melanoma", "diagnosis"):
        layer = head_layer(model, name, unwrap=False)
        if layer is not None:  # by variable name: tfmot's QAT wrapper owns the kernel, not the inner layer
            named = {w.name.rsplit("/", 1)[-1].split(":")[0]: w.numpy() for w in layer.weights}
            kernels.append(named["kernel"])
            biases.append(named["bias"])
    kernel = np.concatenate(kernels, axis=1).astype("<f2")
    return {"kernel_b64": base64.b64encode(kernel.tobytes()).decode(), "dtype": "float16",
            "shape": [int(v) for v in kernel.shape], "bias": [float(v) for v in np.concatenate(biases)],
            "columns": "as output.columns: melanoma head, then the diagnosis classes"}


def convert(model: keras.Model, variant: str, rep_data=None) -> tuple[bytes, dict]:
    """One variant's flatbuffer (scores + feature map + embedding) and how it was quantized."""
    conv = tf.lite.TFLiteConverter.from_keras_model(with_extra_outputs(model))
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


def io_spec(tflite_bytes: bytes, classes: list[str] | None = None) -> tuple[dict, dict]:
    """Input and output tensor specs as the interpreter reports them."""
    it, _ = make_interpreter(tflite_bytes)

    def spec(d):
        scale, zp = d["quantization"]
        return {"shape": [int(s) for s in d["shape"]], "dtype": np.dtype(d["dtype"]).name,
                "quantization": {"scale": float(scale), "zero_point": int(zp)} if scale else None}
    outputs = it.get_output_details()
    i = it.get_input_details()[0]
    o = next(d for d in outputs if len(d["shape"]) == 2 and d["shape"][1] == 1 + len(classes or []))
    extra = {}
    for d in outputs:
        if len(d["shape"]) == 4:
            extra["feature_map"] = {**spec(d), "meaning": "last feature map, input of the global average pooling"}
        elif d is not o:
            extra["embedding"] = {**spec(d), "meaning": "pooled embedding (input of the linear head)"}
    if not classes:
        return spec(i), {**spec(o), **({"extra": extra} if extra else {}), "meaning": "probability of melanoma (target = 1)"}
    return spec(i), {**spec(o), **({"extra": extra} if extra else {}), "meaning": "column 0: the melanoma head's sigmoid; columns 1..: the diagnosis "
                                           "head's softmax over `classes`; the melanoma score is read by "
                                           "`melanoma_rule` (edge.scores)",
                     "columns": ["melanoma (melanoma head)"] + [f"{c} (diagnosis head)" for c in classes]}


def heads(run_metrics: dict) -> dict:
    """The sidecar fields of a multi-task model (nothing for a binary one)."""
    from train.data import MALIGNANT
    classes = run_metrics.get("classes")
    if not classes:
        return {}
    return {"classes": list(classes), "malignant_classes": list(MALIGNANT),
            "melanoma_rule": run_metrics.get("melanoma_rule", "mean")}


def export(model_bytes: bytes, out_path: Path, *, backbone: str, variant: str, quantization: dict,
           cfg: dict, run_metrics: dict, rows: pd.DataFrame, pixels, keras_probs: np.ndarray,
           extra: dict | None = None, threads: int = 2) -> dict:
    """Write the .tflite and its sidecar; its threshold and metrics come from this very file."""
    out_path.write_bytes(model_bytes)
    head = heads(run_metrics)
    inp, outp = io_spec(model_bytes, head.get("classes"))
    spec = TrainConfig.from_saved(cfg).preprocess_spec()
    provisional = {"model": backbone, "variant": variant, "input": inp, "output": outp,
                   "preprocessing": spec.to_dict(), "labels": LABELS, "threshold": 0.5,
                   "metrics": {}, "provenance": {}, "config": cfg, **head}
    write_sidecar(out_path, provisional)  # lets the edge runner load the file for evaluation
    keep = rows.index[rows["split"].isin(["val", "test"])].to_numpy()
    t0 = time.time()
    try:
        return _finish_export(out_path, backbone=backbone, variant=variant, quantization=quantization, cfg=cfg,
                              run_metrics=run_metrics, rows=rows, pixels=pixels, keras_probs=keras_probs,
                              extra=extra, threads=threads, head=head, inp=inp, outp=outp, spec=spec, keep=keep,
                              t0=t0)
    except BaseException:
        # never leave a model behind with a provisional (unvalidated) threshold or half its fields
        out_path.unlink(missing_ok=True)
        sidecar_path(out_path).unlink(missing_ok=True)
        raise


def _finish_export(out_path, *, backbone, variant, quantization, cfg, run_metrics, rows, pixels, keras_probs,
                   extra, threads, head, inp, outp, spec, keep, t0) -> dict:
    """export(), once the provisional sidecar lets the runner load the file: evaluate, calibrate,
    fit the refusals, write the final sidecar."""
    raw = predict_tflite(out_path, pixels, keep, threads, raw=True)
    probs = melanoma_score(raw, head.get("melanoma_rule", "binary"))
    preds = rows.loc[keep, ["image", "source", "split", "target"]].assign(probability=probs)
    threshold = choose_threshold(preds, cfg["target_sensitivity"])
    calibrated, calibration = calibrate(preds, threshold["threshold"])
    report = full_report(calibrated, calibration.get("probability_threshold", threshold["threshold"]),
                         cfg["bootstrap"], cfg["seed"])
    parity = parity_report(preds, keras_probs)
    dx_metrics = {}
    if head:
        dx_metrics = diagnosis_report(calibrated, raw, rows.loc[keep, "dx"].to_numpy(), head, calibration,
                                      cfg["target_sensitivity"], cfg["bootstrap"], cfg["seed"])
        head["malignant_threshold"] = dx_metrics["malignant"]["threshold"]
    meta = {
        "model": backbone, "variant": variant, "input": inp, "output": outp,
        "preprocessing": {**spec.to_dict(), "normalization": REGISTRY[backbone][1].input_scaling},
        "labels": LABELS, "threshold": threshold["threshold"], "threshold_policy": threshold, **head,
        **({"calibration": calibration} if calibration.get("method") == "platt" else {"calibration_skipped": calibration}),
        "quantization": quantization,
        "metrics": {"computed_with": "this .tflite file through edge.Classifier", **report, **dx_metrics,
                    "parity_vs_keras_float": parity, "evaluation_seconds": round(time.time() - t0, 1)},
        "provenance": {"datasets": run_metrics.get("provenance", []), "licence": LICENCE_NOTE,
                       "split": "StratifiedGroupKFold by patient/lesion, seed "
                                f"{cfg['seed']}, val {cfg['val_fraction']}, test {cfg['test_fraction']}",
                       "split_counts": rows["split"].value_counts().to_dict(),
                       "converted_with": {"tensorflow": tf.__version__, "python": platform.python_version()}},
        "config": cfg, "training_lineage": run_metrics.get("init_from"), **weight_average(run_metrics),
        **(extra or {}), "disclaimer": DISCLAIMER,
    }
    refusals = fit_refusals(out_path, rows, pixels, cfg["seed"], threads)
    meta.update({k: v for k, v in refusals.items() if k != "refusal_metrics"})
    if "refusal_metrics" in refusals:
        meta["metrics"]["refusals"] = refusals["refusal_metrics"]
    write_sidecar(out_path, meta)
    return meta


def weight_average(run_metrics: dict) -> dict:
    """{"weight_average": ...} for a run made by train.soup (its ingredients by folder name), else {}."""
    soup = run_metrics.get("soup")
    if not soup:
        return {}
    return {"weight_average": {"method": soup["method"], "ingredients": [
        {**i, "run": Path(i["run"]).name} for i in soup["ingredients"]]}}


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


def diagnosis_report(preds: pd.DataFrame, raw: np.ndarray, dx: np.ndarray, head: dict, calibration: dict,
                     target_sensitivity: float, bootstrap: int, seed: int) -> dict:
    """Fit the diagnosis head's temperature on validation (stored in `calibration`), choose the
    malignant threshold on validation (sensitivity `target_sensitivity` for melanoma + BCC +
    AK/IEC among images with a known diagnosis), and measure both on test, per class and per
    source, with the distribution the runner shows (edge.scores.diagnosis_distribution)."""
    from train.metrics import binary_metrics, metrics_by_source, roc_auc, threshold_for_sensitivity
    classes = head["classes"]
    mel, malignant = classes.index("melanoma"), [classes.index(c) for c in head["malignant_classes"]]
    val, test = (preds["split"] == "val").to_numpy(), (preds["split"] == "test").to_numpy()
    known = dx >= 0
    temperature = fit_temperature(raw[val & known, 1:], dx[val & known])
    calibration["diagnosis_temperature"] = temperature
    dist = diagnosis_distribution(preds["probability"].to_numpy(), tempered(raw[:, 1:], temperature), mel)
    p_malignant = dist[:, malignant].sum(axis=1)
    y_malignant = np.isin(dx, malignant) | (preds["target"].to_numpy() == 1)
    judged = known | y_malignant  # a non-melanoma of unknown diagnosis may be malignant: not judged
    t = threshold_for_sensitivity(y_malignant[val & judged], p_malignant[val & judged], target_sensitivity)
    sel = test & judged
    per_class = {}
    for k, name in enumerate(classes):
        yk = (dx[test & known] == k)
        per_class[name] = {"n": int(yk.sum()), "roc_auc": roc_auc(yk, dist[test & known, k]) if 0 < yk.sum() < len(yk) else None,
                           "recall_top1": float(np.mean(dist[test & known][yk].argmax(axis=1) == k)) if yk.any() else None}
    top1 = dist[test & known].argmax(axis=1) == dx[test & known]
    return {
        "diagnosis": {"classes": classes, "temperature": temperature, "temperature_fitted_on": "validation split",
                      "test_known_n": int((test & known).sum()), "test_top1_accuracy": float(top1.mean()),
                      "test_balanced_accuracy": float(np.nanmean([v["recall_top1"] for v in per_class.values()
                                                                  if v["recall_top1"] is not None])),
                      "per_class": per_class},
        "malignant": {"classes": head["malignant_classes"], "threshold": float(t), "chosen_on": "validation split",
                      "target_sensitivity": target_sensitivity,
                      "val": binary_metrics(y_malignant[val & judged], p_malignant[val & judged], t, bootstrap=0),
                      "test": metrics_by_source(y_malignant[sel], p_malignant[sel], preds["source"].to_numpy()[sel],
                                                t, bootstrap, seed),
                      "judged_on": "images with a known diagnosis, and every melanoma"},
    }


GATE_TRAIN_IMAGES = 3000  # training images the gate is fitted on (a seeded sample)
GATE_MAX_VAL_REFUSED = 0.02  # at most this share of validation lesions refused by the gate


def fit_refusals(model_path: Path, rows: pd.DataFrame, pixels, seed: int, threads: int = 2) -> dict:
    """The sidecar's refusal fields for this very file: the embedding gate (edge.gate.Gate)
    fitted on training-split embeddings, its threshold chosen on validation (at most 2 %
    refused), and the image-quality limits with their measured refusal rates. Test is only
    measured."""
    from edge import Classifier, ImageError
    from edge.gate import Gate, QualityLimits, quality_problem
    from edge.preprocess import resized_array
    clf = Classifier(model_path, num_threads=threads, refuse=False)
    if "embedding" not in clf._extra or clf._extra["embedding"] is None:
        return {}
    idx = {s: rows.index[rows["split"] == s].to_numpy() for s in ("train", "val", "test")}
    rng = np.random.default_rng(seed)
    fit_idx = np.sort(rng.choice(idx["train"], size=min(GATE_TRAIN_IMAGES, len(idx["train"])), replace=False))

    def embed(ids):
        return np.stack([clf.predict_outputs(np.asarray(pixels[i], np.float32))[0]["embedding"] for i in ids])
    dx = rows["dx"].to_numpy() if "dx" in rows.columns else np.full(len(rows), -1)
    groups = np.where(dx >= 0, dx, 100 + rows["target"].to_numpy())
    gate = Gate.fit(embed(fit_idx), groups[rows.index.get_indexer(fit_idx)])
    val_scores = gate.scores(embed(idx["val"]))
    # "higher": the threshold is a validation score, so strictly above it are at most 2 % (the
    # interpolated quantile let 20 of 964 = 2.07 % through)
    gate.threshold = float(np.quantile(val_scores, 1 - GATE_MAX_VAL_REFUSED, method="higher"))
    test_scores = gate.scores(embed(idx["test"]))
    test_sources = rows.loc[idx["test"], "source"].to_numpy()
    limits = QualityLimits()
    quality = {}
    def checked(path):
        try:
            return quality_problem(resized_array(path, clf.spec), limits)
        except ImageError as e:  # gone or changed since the pixel cache: counted, not fatal
            return ("unreadable", e.reason, {})
    for split in ("val", "test"):
        problems = [checked(p) for p in rows.loc[idx[split], "path"]]
        codes = [q[0] for q in problems if q is not None]
        quality[split] = {"n": len(problems), "refused": len(codes),
                          "by_reason": {c: codes.count(c) for c in sorted(set(codes))}}
    return {
        "gate": gate.to_dict(),
        "quality": {k: getattr(limits, k) for k in limits.__dataclass_fields__},
        "refusal_metrics": {
            "gate_fitted_on": f"{len(fit_idx)} training-split images (seeded sample), this file's embeddings",
            "gate_threshold_chosen_on": f"validation split: at most {GATE_MAX_VAL_REFUSED:.0%} of its lesions refused",
            "gate_val_refused": float(np.mean(val_scores > gate.threshold)),
            "gate_test_refused": float(np.mean(test_scores > gate.threshold)),
            "gate_test_refused_by_source": {s: float(np.mean(test_scores[test_sources == s] > gate.threshold))
                                            for s in sorted(set(test_sources))},
            "quality": quality}}


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


def keras_predictions(model: keras.Model, rows: pd.DataFrame, pixels, rule: str = "binary") -> np.ndarray:
    keep = rows.index[rows["split"].isin(["val", "test"])].to_numpy()
    return predict_keras(model, pixels, keep, rule=rule)
