"""HTML pages: the upload form, the result page and the tradeoff report."""
import json
import mimetypes
from pathlib import Path

from flask import Blueprint, Response, abort, current_app, render_template

from edge import ImageError

from .classifier import get_classifier
from .uploads import classify_upload, display_images

bp = Blueprint("pages", __name__)
REPORT_FILES = {"tradeoff.png", "tradeoff.md", "tradeoff.json", "latency.md", "latency.json"}


def model_summary() -> dict:
    clf = get_classifier()
    meta = clf.meta
    policy = meta.get("threshold_policy", {})
    tests = meta.get("metrics", {}).get("test", {})
    test = tests.get("all", {})
    per_source = [{"source": k, "n": v.get("n"), "sensitivity": v.get("sensitivity"), "specificity": v.get("specificity")}
                  for k, v in tests.items() if k != "all" and isinstance(v, dict) and v.get("sensitivity") is not None]
    return {"model": meta["model"], "variant": meta["variant"], "threshold": clf.threshold,
            "calibrated": clf.calibration is not None, "malignant_threshold": clf.malignant_threshold,
            "classes": clf.classes,
            "val_sensitivity": policy.get("val_sensitivity"), "val_specificity": policy.get("val_specificity"),
            "test_auc": test.get("roc_auc"), "test_sensitivity": test.get("sensitivity"),
            "test_specificity": test.get("specificity"), "per_source": per_source}


def load_tradeoffs(reports_dir: Path) -> dict | None:
    path = Path(reports_dir) / "tradeoff.json"
    return json.loads(path.read_text()) if path.is_file() else None


@bp.get("/")
def index():
    """The upload form."""
    limit_mb = current_app.config["MAX_CONTENT_LENGTH"] / (1024 * 1024)
    return render_template("index.html", m=model_summary(), limit_mb=limit_mb)


@bp.post("/predict")
def predict():
    """Classify the uploaded image and show the result page."""
    pred, data = classify_upload()
    if pred.refused:
        return render_template("refused.html", p=pred, m=model_summary()), 422
    try:
        shown = display_images(data, pred)
    except (ImageError, OSError, ValueError):  # the answer stands; only the pictures are left out
        shown = {}
    return render_template("result.html", p=pred, m=model_summary(), shown=shown)


@bp.get("/tradeoffs")
def tradeoffs():
    """The accuracy-latency table and Pareto plot from the benchmark report, if one exists."""
    reports = Path(current_app.config["REPORTS_DIR"])
    report = load_tradeoffs(reports)
    has_plot = (reports / "tradeoff.png").is_file()
    return render_template("tradeoffs.html", report=report, has_plot=has_plot)


@bp.get("/reports/<name>")
def report_file(name: str):
    """Serve the report files /tradeoffs links to (a fixed allow-list)."""
    if name not in REPORT_FILES:
        abort(404, "no such report")
    # read into memory, not sent as an open file: a client that pipelines requests and never
    # reads the answers would otherwise hold a file descriptor per queued answer (with the common
    # 1,024-descriptor limit, a couple of hundred such connections left the worker unable to accept)
    try:
        data = (Path(current_app.config["REPORTS_DIR"]) / name).read_bytes()
    except OSError:
        abort(404, "no such report (run python -m benchmarks all)")
    return Response(data, mimetype=mimetypes.guess_type(name)[0] or "application/octet-stream")
