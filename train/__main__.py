"""`python -m train`: fine-tune an ImageNet backbone to flag melanoma, then evaluate it.

Every TrainConfig field is a flag (--top-blocks 8, --no-augment, --data A B, ...);
--config loads a JSON of fields first; unknown keys are errors.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import typing
from pathlib import Path

from .config import TrainConfig


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="python -m train", description=(
        "Train a melanoma screening classifier (ISIC `target`: melanoma 1 / not 0) and evaluate it "
        "on a patient/lesion-grouped test split. Research screening aid, not a diagnosis."))
    ap.add_argument("--config", type=Path, help="JSON file of TrainConfig fields")
    ap.add_argument("--resume", action="store_true", help="continue from the run folder's last checkpoint")
    defaults = TrainConfig()
    hints = typing.get_type_hints(TrainConfig)
    for f in dataclasses.fields(TrainConfig):
        flag, default, hint = "--" + f.name.replace("_", "-"), getattr(defaults, f.name), hints[f.name]
        if hint is bool:
            ap.add_argument(flag, dest=f.name, action=argparse.BooleanOptionalAction, default=None,
                            help=f"default {default}")
        elif f.name == "data":
            ap.add_argument(flag, dest=f.name, nargs="+", default=None, help="dataset folders (default: ../shared/data/ham10000 and isic2017)")
        else:
            kind = {int: int, float: float}.get(hint, str)
            ap.add_argument(flag, dest=f.name, type=kind, default=None, help=f"default {default}")
    return ap


def config_from_args(args: argparse.Namespace) -> TrainConfig:
    values = json.loads(args.config.read_text()) if args.config else {}
    for f in dataclasses.fields(TrainConfig):
        v = getattr(args, f.name)
        if v is not None:
            values[f.name] = v
    return TrainConfig.from_dict(values)


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    try:
        cfg = config_from_args(args)
        cfg.validate()
    except (ValueError, json.JSONDecodeError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    from .data import DataError
    from .loop import run
    try:
        run(cfg, resume=args.resume, log=lambda m: print(m, flush=True))
    except DataError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
