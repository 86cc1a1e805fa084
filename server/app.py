"""The app factory: `create_app(test_config=None)`, flaskr's shape.

No TensorFlow here: the classifier is edge.Classifier, built once by `classifier.init_app`.
Uploads are read into memory only; nothing is written to disk and no image content is logged.
"""
from __future__ import annotations

import logging
from pathlib import Path

from flask import Flask

from edge import DEFAULT_MAX_PIXELS, DEFAULT_MODEL, DISCLAIMER

from . import api, classifier, errors, pages, security
from .uploads import InMemoryRequest

PACKAGE = Path(__file__).resolve().parent
# The benchmark reports /tradeoffs shows: reports/ in a checkout, server/reports when installed.
REPORTS = next((p for p in (PACKAGE.parent / "reports", PACKAGE / "reports") if p.is_dir()), PACKAGE.parent / "reports")

DEFAULTS = {
    "MODEL_PATH": str(DEFAULT_MODEL),  # the shipped default int8 model
    "NUM_THREADS": 2,  # interpreter threads
    "MAX_CONTENT_LENGTH": 10 * 1024 * 1024,  # upload limit in bytes (413 above it)
    "MAX_PIXELS": DEFAULT_MAX_PIXELS,  # decompression-bomb guard (400 above it)
    "DECODE_BUDGET_MB": 400,  # memory all concurrent decodes may use together (one image at the limit)
    "TRUSTED_ORIGINS": [],  # extra origins (scheme://host[:port]) allowed to POST, e.g. behind a proxy
    "REPORTS_DIR": str(REPORTS),  # where /tradeoffs looks for the benchmark report
    "TTA": False,  # test-time augmentation: 8 invokes per upload, averaged
}


TEXT_FIELD_LIMIT = 64 * 1024  # bytes of one text (non-file) form field before 413


def create_app(test_config: dict | None = None) -> Flask:
    """Build the app from DEFAULTS, then `test_config`; the model is loaded here, once."""
    app = Flask(__name__)
    app.request_class = InMemoryRequest
    app.config.from_mapping(DEFAULTS)
    if test_config:
        app.config.from_mapping(test_config)
    app.config["MAX_FORM_MEMORY_SIZE"] = TEXT_FIELD_LIMIT  # the form has no text field; files are not bound by it
    app.jinja_env.globals["disclaimer"] = DISCLAIMER
    logging.getLogger("werkzeug").setLevel(logging.WARNING)  # request lines only, never bodies
    classifier.init_app(app)
    security.init_app(app)
    errors.init_app(app)
    app.register_blueprint(pages.bp)
    app.register_blueprint(api.bp)
    return app
