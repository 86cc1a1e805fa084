"""Render MODEL_CARD.md from the shipped sidecars, so every figure in it is the file's own.

    python -m quantize card [--models models] [--out MODEL_CARD.md]

The text lives in quantize/templates/model_card.md.j2 (Jinja2, which ships with Flask).
"""
from __future__ import annotations

import json
from pathlib import Path

from jinja2 import Environment, FileSystemLoader, StrictUndefined

from edge.runner import DEFAULT_MODEL

DEFAULT = DEFAULT_MODEL.name  # the file the CLI and the server load by default
TEMPLATES = Path(__file__).resolve().parent / "templates"


def f(x, nd=3) -> str:
    return "-" if x is None else f"{x:.{nd}f}"


def ci(m: dict) -> str:
    interval = m.get("roc_auc_ci95")
    return f"{f(m['roc_auc'])} ({f(interval[0])}-{f(interval[1])})" if interval else f(m.get("roc_auc"))


class CardError(ValueError):
    """No sidecar of the default model in the folder."""


def leave_source_out(reports_dir: Path) -> list[dict]:
    """The leave-source-out reports (`python -m train.evaluate --data ... --out
    reports/leave_source_out/NAME`): trained on HAM10000 first, binary before multi-task, and the rows of
    one run (e.g. its Keras and int8 files) next to each other."""
    found = [json.loads(p.read_text()) for p in sorted(Path(reports_dir).glob("leave_source_out/*/metrics.json"))]
    return sorted(found, key=lambda r: (r.get("trained_on", []) != ["ham10000"], r.get("recipe", {}).get("target") != "binary",
                                        r.get("run", ""), r.get("model", "")))


def read_json(path: Path) -> dict | None:
    return json.loads(path.read_text()) if path.is_file() else None


def render(models_dir: Path, reports_dir: Path | None = None) -> str:
    reports_dir = Path(reports_dir) if reports_dir else Path(models_dir).resolve().parent / "reports"
    metas = [json.loads(p.read_text()) for p in sorted(Path(models_dir).glob("*.json"))]
    d = next((m for m in metas if m.get("file") == DEFAULT), None)
    if d is None:
        raise CardError(f"no sidecar of {DEFAULT} in {models_dir}")
    env = Environment(loader=FileSystemLoader(TEMPLATES), undefined=StrictUndefined, keep_trailing_newline=True)
    env.globals.update(f=f, ci=ci, basename=lambda p: Path(p).name)
    return env.get_template("model_card.md.j2").render(
        d=d, metas=metas, default=DEFAULT, cfg=d["config"], test=d["metrics"]["test"], val=d["metrics"]["val"],
        cm=d["metrics"]["test"]["all"]["confusion_matrix"], par=d["metrics"]["parity_vs_keras_float"],
        pol=d["threshold_policy"], pre=d["preprocessing"], q=d["quantization"], lineage=d.get("training_lineage"),
        lso=leave_source_out(reports_dir), dxm=d["metrics"].get("diagnosis"), mal=d["metrics"].get("malignant"),
        reliability_png=(reports_dir / "default_int8" / "reliability.png").is_file(),
        refusals=d["metrics"].get("refusals"), ood=read_json(reports_dir / "ood.json"),
        checks=read_json(reports_dir / "heatmap_checks.json"), pct=lambda x: "-" if x is None else f"{100 * x:.1f} %")


def write_card(models_dir: Path, out: Path) -> int:
    """Render and write the card; 2 with a one-line message when the folder has no default model."""
    import sys
    try:
        out.write_text(render(models_dir))
    except CardError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"wrote {out}")
    return 0
