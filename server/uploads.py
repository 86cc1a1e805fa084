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


def classify_upload() -> tuple[Prediction, bytes]:
    """(prediction, the uploaded bytes): the bytes stay in memory for the result page."""
    data = read_upload()
    try:
        return get_classifier().classify(data, tta=current_app.config["TTA"]), data  # decodes share the MemoryBudget
    except ImageError as e:
        abort(400, f"not a usable image: {e.reason}")


def data_uri(img, fmt: str = "JPEG") -> str:
    """A PIL image as a data: URI (the page shows uploads without ever storing them)."""
    import base64
    import numpy as np
    from PIL import Image
    clean = Image.fromarray(np.asarray(img.convert("RGB")))  # pixels only: no EXIF, ICC, comments or GPS
    buf = io.BytesIO()
    clean.save(buf, fmt, **({"quality": 85} if fmt == "JPEG" else {}))
    return f"data:image/{fmt.lower()};base64," + base64.b64encode(buf.getvalue()).decode()


def display_images(data: bytes, pred: Prediction, side: int = 360) -> dict:
    """The upload at display size and, where the model gives one, its melanoma heatmap overlay, as
    data URIs. The map covers the whole image (the model squashes it), so it is drawn over the
    aspect-preserving display image directly."""
    import numpy as np
    from edge.gate import overlay
    from edge.preprocess import open_image
    clf = get_classifier()
    img = open_image(data, draft_size=(side, side), max_pixels=clf.max_pixels, budget=clf.budget).convert("RGB")
    img.thumbnail((side, side))
    out = {"image": data_uri(img)}
    if pred.heatmap is not None:
        out["overlay"] = data_uri(overlay(np.asarray(img, dtype=np.float32), pred.heatmap["melanoma"]), "PNG")
    return out
