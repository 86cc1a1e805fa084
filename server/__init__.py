"""Flask server: upload form and JSON API over the same .tflite the edge runner uses.

`from server import create_app` gives the app factory (server/app.py). It is loaded on first
use, not when the package is imported, so that `python -m server` on a machine without Flask
says so in one line instead of failing inside this import.
"""


def __getattr__(name: str):
    if name in ("create_app", "DEFAULTS"):
        from . import app
        return getattr(app, name)
    raise AttributeError(f"module 'server' has no attribute {name!r}")
