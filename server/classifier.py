"""The served model: one edge.Classifier per app, built once in `init_app`, never per request."""
from __future__ import annotations

from flask import Flask, current_app

from edge import Classifier
from edge.preprocess import MemoryBudget


def init_app(app: Flask) -> None:
    """Load the model named by MODEL_PATH; decodes share one memory budget (DECODE_BUDGET_MB)."""
    budget = MemoryBudget(int(app.config["DECODE_BUDGET_MB"] * 2**20))
    app.extensions["classifier"] = Classifier(app.config["MODEL_PATH"], num_threads=app.config["NUM_THREADS"],
                                              max_pixels=app.config["MAX_PIXELS"], budget=budget)


def get_classifier() -> Classifier:
    return current_app.extensions["classifier"]


def model_card() -> dict:
    """The served model's sidecar (spec, metrics, provenance)."""
    return get_classifier().meta
