"""`python -m train`: fine-tune an ImageNet backbone to flag melanoma, then evaluate it.

Every TrainConfig field is a flag (--top-blocks 8, --no-augment, --data A B, ...);
--config loads a JSON of fields first; unknown keys are errors. Every option is checked
before any data is read and before the run folder is made.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import typing
from pathlib import Path

from .config import CHOICES, HELP, TrainConfig

EXIT_OK, EXIT_USAGE = 0, 2


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="python -m train", description=(
        "Train a melanoma screening classifier (ISIC `target`: melanoma 1 / not 0) and evaluate it "
        "on a patient/lesion-grouped test split. Research screening aid, not a diagnosis."),
        epilog="Exit status: 0 done, 2 bad options or data (nothing is written), 130 interrupted.")
    ap.add_argument("--config", type=Path, help="JSON file of TrainConfig fields (flags override it)")
    ap.add_argument("--resume", action="store_true", help="continue the run in --out from its last checkpoint")
    ap.add_argument("--force", action="store_true", help="replace a finished or partial run in --out")
    defaults = TrainConfig()
    hints = typing.get_type_hints(TrainConfig)
    for f in dataclasses.fields(TrainConfig):
        flag, default, hint = "--" + f.name.replace("_", "-"), getattr(defaults, f.name), hints[f.name]
        text = f"{HELP[f.name]} (default {default})"
        if hint is bool:
            ap.add_argument(flag, dest=f.name, action=argparse.BooleanOptionalAction, default=None, help=text)
        elif f.name == "data":
            ap.add_argument(flag, dest=f.name, nargs="+", default=None, metavar="FOLDER", help=HELP["data"])
        elif f.name in CHOICES:
            ap.add_argument(flag, dest=f.name, choices=[c for c in CHOICES[f.name] if c], default=None, help=text)
        else:
            base = next((a for a in typing.get_args(hint) if a is not type(None)), hint)  # int | None -> int
            kind = {int: int, float: float}.get(base, str)
            ap.add_argument(flag, dest=f.name, type=kind, default=None, help=text)
    return ap


def config_from_args(args: argparse.Namespace) -> TrainConfig:
    try:
        values = json.loads(args.config.read_text()) if args.config else {}
    except OSError as e:
        raise ValueError(f"cannot read --config {args.config} ({e.strerror})") from None
    except json.JSONDecodeError as e:
        raise ValueError(f"--config {args.config} is not valid JSON ({e})") from None
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
    except (ValueError, TypeError) as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_USAGE
    try:
        from .data import DataError
        from .rundir import RunFolderError, check_run_dir
        check_run_dir(cfg, args.resume, args.force)  # before TensorFlow loads: a refusal takes a second
        from .pipeline import run
    except ImportError as e:
        print(f"error: training needs {e.name}: from a checkout, pip install -r requirements.txt "
              "(or pip install '.[all]')", file=sys.stderr)
        return EXIT_USAGE
    except RunFolderError as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_USAGE
    try:
        run(cfg, resume=args.resume, force=args.force, log=lambda m: print(m, flush=True))
    except (DataError, RunFolderError) as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print("interrupted; continue with --resume", file=sys.stderr)
        return 130
    return EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
