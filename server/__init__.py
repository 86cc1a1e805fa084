"""Flask server: upload form and JSON API over the same .tflite the edge runner uses.

No TensorFlow here: the classifier is edge.Classifier, built once in create_app.
Uploads are read into memory only; nothing is written to disk and no image content is logged.
"""
from __future__ import annotations

import json
import logging
from pathlib import Path

from flask import Flask, jsonify, render_template, request
from werkzeug.exceptions import HTTPException, RequestEntityTooLarge

from edge import DEFAULT_MAX_PIXELS, DEFAULT_MODEL, DISCLAIMER, Classifier

REPO = Path(__file__).resolve().parent.parent

DEFAULTS = {
    "MODEL_PATH": str(DEFAULT_MODEL),  # the shipped default int8 model
    "NUM_THREADS": 2,  # interpreter threads
    "MAX_CONTENT_LENGTH": 10 * 1024 * 1024,  # upload limit in bytes (413 above it)
    "MAX_PIXELS": DEFAULT_MAX_PIXELS,  # decompression-bomb guard (400 above it)
    "REPORTS_DIR": str(REPO / "reports"),  # where /tradeoffs looks for the benchmark report
}


def create_app(test_config: dict | None = None) -> Flask:
    """Build the app; the classifier is loaded once, here, never per request."""
    from .uploads import InMemoryRequest
    app = Flask(__name__)
    app.request_class = InMemoryRequest
    app.config.from_mapping(DEFAULTS)
    if test_config:
        app.config.from_mapping(test_config)
    app.config["MAX_FORM_MEMORY_SIZE"] = app.config["MAX_CONTENT_LENGTH"]
    app.extensions["classifier"] = Classifier(app.config["MODEL_PATH"], num_threads=app.config["NUM_THREADS"],
                                              max_pixels=app.config["MAX_PIXELS"])
    app.jinja_env.globals["disclaimer"] = DISCLAIMER
    logging.getLogger("werkzeug").setLevel(logging.WARNING)  # request lines only, never bodies

    from . import api, pages
    app.register_blueprint(pages.bp)
    app.register_blueprint(api.bp)
    register_errors(app)
    return app


def wants_json() -> bool:
    return request.path.startswith("/api/") or request.path == "/healthz"


def register_errors(app: Flask) -> None:
    """4xx as JSON for the API and as a page for the form; a 500 never shows a traceback."""

    def respond(status: int, message: str):
        if wants_json():
            return jsonify({"error": message, "status": status}), status
        return render_template("error.html", status=status, message=message), status

    @app.errorhandler(RequestEntityTooLarge)
    def too_large(e):
        limit = app.config["MAX_CONTENT_LENGTH"] / (1024 * 1024)
        return respond(413, f"upload too large: the limit is {limit:g} MB")

    @app.errorhandler(HTTPException)
    def http_error(e):
        return respond(e.code or 500, e.description or e.name)

    @app.errorhandler(Exception)
    def unexpected(e):
        app.logger.error("internal error on %s: %s", request.path, type(e).__name__)
        return respond(500, "internal error; the request was not processed")


def classifier(app: Flask | None = None) -> Classifier:
    from flask import current_app
    return (app or current_app).extensions["classifier"]


def model_card(app: Flask | None = None) -> dict:
    """The sidecar of the served model (spec, metrics, provenance)."""
    return classifier(app).meta


def load_tradeoffs(reports_dir: Path) -> dict | None:
    path = Path(reports_dir) / "tradeoff.json"
    return json.loads(path.read_text()) if path.is_file() else None
