"""Errors in the user's words: JSON under /api/ (and /healthz), a page elsewhere; never a traceback."""
from __future__ import annotations

from flask import Flask, current_app, jsonify, render_template, request
from werkzeug.exceptions import HTTPException, RequestEntityTooLarge


def wants_json() -> bool:
    return request.path.startswith("/api/") or request.path == "/healthz"


def respond(status: int, message: str):
    if wants_json():
        return jsonify({"error": message, "status": status}), status
    return render_template("error.html", status=status, message=message), status


def too_large(e):
    limit = current_app.config["MAX_CONTENT_LENGTH"]
    if (request.content_length or 0) > limit:
        return respond(413, f"upload too large: the limit is {limit / 2**20:g} MB")
    return respond(413, "the form has too many fields or parts, or one too large; send one image in the field 'image'")


def http_error(e: HTTPException):
    return respond(e.code or 500, e.description or e.name)


def unexpected(e: Exception):
    current_app.logger.error("internal error on %s: %s", request.path, type(e).__name__)
    return respond(500, "internal error; the request was not processed")


def init_app(app: Flask) -> None:
    app.register_error_handler(RequestEntityTooLarge, too_large)
    app.register_error_handler(HTTPException, http_error)
    app.register_error_handler(Exception, unexpected)
