"""Flask server: upload form and JSON API over the same .tflite the edge runner uses.

No TensorFlow here: the classifier is edge.Classifier, built once in create_app.
Uploads are read into memory only; nothing is written to disk and no image content is logged.
"""
from __future__ import annotations

import json
import logging
from pathlib import Path
from urllib.parse import urlsplit

from flask import Flask, abort, jsonify, render_template, request
from flask_talisman import Talisman
from werkzeug.exceptions import HTTPException, RequestEntityTooLarge

from edge import DEFAULT_MAX_PIXELS, DEFAULT_MODEL, DISCLAIMER, Classifier
from edge.preprocess import MemoryBudget

REPO = Path(__file__).resolve().parent.parent

DEFAULTS = {
    "MODEL_PATH": str(DEFAULT_MODEL),  # the shipped default int8 model
    "NUM_THREADS": 2,  # interpreter threads
    "MAX_CONTENT_LENGTH": 10 * 1024 * 1024,  # upload limit in bytes (413 above it)
    "MAX_PIXELS": DEFAULT_MAX_PIXELS,  # decompression-bomb guard (400 above it)
    "REPORTS_DIR": str(REPO / "reports"),  # where /tradeoffs looks for the benchmark report
    "DECODE_BUDGET_MB": 400,  # memory all concurrent decodes may use together (one image at the limit)
    "TRUSTED_ORIGINS": [],  # extra origins (scheme://host[:port]) allowed to POST, e.g. behind a proxy
}

# Inline <style>/<script> carry a per-response nonce; nothing is loaded from elsewhere.
CSP = {"default-src": "'self'", "img-src": "'self' data:", "style-src": "'self'", "script-src": "'self'",
       "object-src": "'none'", "base-uri": "'none'", "form-action": "'self'", "frame-ancestors": "'none'"}


def create_app(test_config: dict | None = None) -> Flask:
    """Build the app; the classifier is loaded once, here, never per request."""
    from .uploads import InMemoryRequest
    app = Flask(__name__)
    app.request_class = InMemoryRequest
    app.config.from_mapping(DEFAULTS)
    if test_config:
        app.config.from_mapping(test_config)
    app.config["MAX_FORM_MEMORY_SIZE"] = app.config["MAX_CONTENT_LENGTH"]
    budget = MemoryBudget(int(app.config["DECODE_BUDGET_MB"] * 2**20))
    app.extensions["classifier"] = Classifier(app.config["MODEL_PATH"], num_threads=app.config["NUM_THREADS"],
                                              max_pixels=app.config["MAX_PIXELS"], budget=budget)
    app.jinja_env.globals["disclaimer"] = DISCLAIMER
    logging.getLogger("werkzeug").setLevel(logging.WARNING)  # request lines only, never bodies
    Talisman(app, force_https=False, strict_transport_security=False, session_cookie_secure=False,
             content_security_policy=CSP, content_security_policy_nonce_in=["script-src", "style-src"],
             frame_options="DENY", referrer_policy="same-origin")  # no-referrer would make browsers send "Origin: null"
    app.before_request(refuse_cross_site_posts)
    app.after_request(no_store)

    from . import api, pages
    app.register_blueprint(pages.bp)
    app.register_blueprint(api.bp)
    register_errors(app)
    return app


def same_origin(url: str) -> bool:
    parts = urlsplit(url)
    origin = f"{parts.scheme}://{parts.netloc}"
    from flask import current_app
    return parts.netloc == request.host or origin in current_app.config["TRUSTED_ORIGINS"]


def refuse_cross_site_posts():
    """A form on another site must not be able to post to this server (OWASP: verify the
    Origin, else the Referer; clients that send neither, like curl, are not browsers)."""
    if request.method != "POST":
        return None
    origin, referer = request.headers.get("Origin"), request.headers.get("Referer")
    if request.headers.get("Sec-Fetch-Site") == "cross-site" or origin == "null":
        abort(403, "requests from other websites are not accepted")
    if (origin and not same_origin(origin)) or (not origin and referer and not same_origin(referer)):
        abort(403, "requests from other websites are not accepted")
    return None


def no_store(response):
    """Results describe a patient's image: no cache may keep them."""
    response.headers["Cache-Control"] = "no-store"
    return response


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
        limit = app.config["MAX_CONTENT_LENGTH"]
        if (request.content_length or 0) > limit:
            return respond(413, f"upload too large: the limit is {limit / 2**20:g} MB")
        return respond(413, "the form has too many fields or parts; send one image in the field 'image'")

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
