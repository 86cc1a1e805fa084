"""Upload handling: bytes stay in memory, bad input becomes a 400 with a message."""
from __future__ import annotations

import io
import math

import multipart
from flask import Request, abort, current_app, request
from werkzeug.datastructures import FileStorage, Headers
from werkzeug.exceptions import RequestEntityTooLarge
from werkzeug.formparser import FormDataParser
from werkzeug.http import parse_options_header

from edge import ImageError, Prediction

from .classifier import get_classifier

READ_CHUNK = 64 * 1024  # bytes read from the (already buffered) request body at a time
PART_HEADER_BYTES = 16 * 1024  # one header line of one part (multipart's default: 4 KB; long file names)
PART_HEADERS = 32  # headers of one part (multipart's default: 8; RFC 7578 needs 3)


class PushFormDataParser(FormDataParser):
    """werkzeug's FormDataParser with the multipart body parsed by `multipart`'s push parser
    (Bottle's; it finds the boundary with bytes.find) instead of werkzeug's, which scans it with a
    regular expression: about 12 instead of 130 microseconds for a 15 KB upload, a third of the
    app's own time per request. The same limits: every file part in a BytesIO (never on disk),
    more than MAX_FORM_PARTS parts or a text field over MAX_FORM_MEMORY_SIZE is 413, a malformed
    body leaves the form empty (the view answers 400). Stricter than werkzeug, as RFC 7578 asks
    (browsers and HTTP libraries send none of these): line breaks must be CRLF, every part needs
    `Content-Disposition: form-data` and, when it states one, a Content-Length that matches, and
    an empty file is sent as headers, CRLF, nothing, CRLF and the boundary (werkzeug's test client
    leaves out one CRLF); such bodies are answered 400 "no file"."""

    def _parse_multipart(self, stream, mimetype, content_length, options):
        boundary = options.get("boundary", "").encode("ascii")  # UnicodeEncodeError is a ValueError
        if not boundary:
            raise ValueError("Missing boundary")
        parser = multipart.PushMultipartParser(
            boundary, content_length=-1 if content_length is None else content_length,
            max_header_size=PART_HEADER_BYTES, max_header_count=PART_HEADERS,
            max_segment_count=self.max_form_parts or math.inf)
        text_limit = self.max_form_memory_size or math.inf
        form, files = [], []
        segment, buf, filename = None, None, None
        try:
            with parser:  # leaving it checks that the body ended with the closing boundary
                while chunk := stream.read(READ_CHUNK):
                    for event in parser.parse(chunk):
                        if isinstance(event, multipart.MultipartSegment):
                            segment, buf, filename = event, io.BytesIO(), file_name(event)
                        elif event is not None:
                            if filename is None and segment.size > text_limit:
                                raise RequestEntityTooLarge()
                            buf.write(event)
                        elif filename is None:  # werkzeug also honours a part's ASCII/Latin-1 charset; no field here needs it
                            form.append((segment.name, buf.getvalue().decode("utf-8", "replace")))
                        else:
                            buf.seek(0)
                            files.append((segment.name, FileStorage(buf, filename=filename, name=segment.name,
                                                                    headers=Headers(segment.headerlist))))
        except multipart.ParserLimitReached:
            raise RequestEntityTooLarge() from None
        except multipart.MultipartError as e:
            self.problem = e.args[0] if e.args else "malformed"  # for the view's message
            raise ValueError(str(e)) from None
        return stream, self.cls(form), self.cls(files)

    problem: str | None = None  # why the body could not be parsed (werkzeug then leaves the form empty)


def file_name(segment) -> str | None:
    """The part's file name, None for a text field. `multipart` reads only `filename=`; clients
    that send only the RFC 2231 form `filename*=utf-8''...` (urllib3 before 1.25 for non-ASCII
    names) are read with werkzeug's header parser, as werkzeug's own form parser would."""
    if segment.filename is not None:
        return segment.filename
    disposition = segment.header("Content-Disposition", "")
    if "filename*" not in disposition.lower():
        return None
    return parse_options_header(disposition)[1].get("filename", "")


class InMemoryRequest(Request):
    """Werkzeug spools uploads over 500 KB to a temporary file; medical images must not touch
    the disk: PushFormDataParser keeps every file part in a BytesIO (bounded by
    MAX_CONTENT_LENGTH)."""

    form_data_parser_class = PushFormDataParser
    form_parser: PushFormDataParser | None = None

    def make_form_data_parser(self) -> PushFormDataParser:
        self.form_parser = super().make_form_data_parser()  # one per request: it keeps the parse problem
        return self.form_parser


def read_upload(field: str = "image") -> bytes:
    f = request.files.get(field)
    if f is None:
        problem = getattr(getattr(request, "form_parser", None), "problem", None)
        if problem is not None:  # e.g. a file name that is not UTF-8 (browsers always send UTF-8)
            abort(400, f"the upload is not a readable multipart form ({problem.lower()}); "
                       "send the image as multipart/form-data with UTF-8 headers")
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
