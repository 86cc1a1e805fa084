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


# Config fields that name folders or files of the machine the model was trained on.
PATH_FIELDS = ("data", "cache_dir", "out", "init_from", "weights")


def model_card() -> dict:
    """The served model's sidecar (spec, metrics, provenance), with the training machine's
    paths cut to their last part: a public page has no business showing them."""
    meta = get_classifier().meta

    def short(v):
        if isinstance(v, list):
            return [short(x) for x in v]
        return v.replace("\\", "/").rstrip("/").rsplit("/", 1)[-1] if isinstance(v, str) and "/" in v else v

    def scrub(cfg: dict) -> dict:
        return {k: short(v) if k in PATH_FIELDS else v for k, v in cfg.items()}
    card = {**meta, "config": scrub(meta.get("config", {}))}
    for part in ("head", "gate"):  # weights and the gate's basis (base64 arrays, 460 KB) are for the
        if isinstance(card.get(part), dict):  # runner, not for reading: every client of this page paid for them
            card[part] = {k: v for k, v in card[part].items() if not k.endswith("_b64")}
    if isinstance(meta.get("training_lineage"), dict):
        lineage = meta["training_lineage"]
        card["training_lineage"] = {**lineage, "run": short(lineage.get("run")),
                                    "config": scrub(lineage.get("config") or {})}
    prov = meta.get("provenance", {})
    if isinstance(prov.get("datasets"), list):
        card["provenance"] = {**prov, "datasets": [{**d, "path": short(d.get("path"))} if isinstance(d, dict) else d
                                                   for d in prov["datasets"]]}
    return card
