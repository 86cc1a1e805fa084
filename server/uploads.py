"""Upload handling: bytes stay in memory, bad input becomes a 400 with a message."""
from __future__ import annotations

import io

from flask import Request, abort, current_app, request

from edge import ImageError, Prediction

from .classifier import get_classifier


class InMemoryRequest(Request):
    """Werkzeug spools uploads over 500 KB to a temporary file; medical images must not touch
    the disk, so every file part is kept in a BytesIO (bounded by MAX_CONTENT_LENGTH)."""

    def _get_file_stream(self, total_content_length, content_type, filename=None, content_length=None):
        return io.BytesIO()


def read_upload(field: str = "image") -> bytes:
    f = request.files.get(field)
    if f is None:
        abort(400, f"no file in the form field '{field}'")
    data = f.read()
    if not data:
        abort(400, "the uploaded file is empty (0 bytes)")
    return data


def classify_upload() -> Prediction:
    data = read_upload()
    try:
        return get_classifier().classify(data, tta=current_app.config["TTA"])  # decodes share the MemoryBudget
    except ImageError as e:
        abort(400, f"not a usable image: {e.reason}")
