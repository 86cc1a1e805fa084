"""JSON API: /api/v1/predict, /api/v1/model, /healthz."""
from flask import Blueprint, current_app, jsonify

from edge import DISCLAIMER

from .classifier import get_classifier, model_card
from .uploads import classify_upload

bp = Blueprint("api", __name__)


@bp.post("/api/v1/predict")
def predict():
    """Classify the multipart field `image`; JSON with probability, label, threshold, diagnoses,
    malignant probability, heatmap, model, latency. An image that is not a usable dermoscopic image
    of one lesion gets 422 with `refused: true`, the reason and the gate score."""
    pred, _ = classify_upload()
    clf = get_classifier()
    body = {**pred.to_dict(), "tta": current_app.config["TTA"], **clf.identity(), "disclaimer": DISCLAIMER}
    if pred.refused:  # not a usable lesion image: no verdict, 422 with the reason
        return jsonify({**body, "error": pred.reason, "status": 422}), 422
    return jsonify(body)


@bp.get("/api/v1/model")
def model():
    """The served model's sidecar: spec, metrics, provenance."""
    return jsonify(model_card())


@bp.get("/healthz")
def healthz():
    """Ready once the model is loaded; names it by sha256."""
    clf = get_classifier()
    return jsonify({"status": "ok", "model": clf.model_path.name, "sha256": clf.meta["sha256"],
                    "backend": clf.backend})
