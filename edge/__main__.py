"""`python -m edge predict|info`: melanoma screening on a Pi or laptop (no TensorFlow)."""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from . import DEFAULT_MODEL, DISCLAIMER, Classifier, ImageError, SidecarError

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp", ".gif"}
EXIT_OK, EXIT_USAGE, EXIT_UNREADABLE = 0, 2, 3


def expand_inputs(paths: list[str]) -> list[Path]:
    """Files as given; folders expand to the image files inside them (sorted, recursive).
    Whatever is not a regular file (a FIFO named x.jpg, a socket, a broken link) is kept, so
    that the decoder names it and skips it instead of blocking on it."""
    out: list[Path] = []
    for p in map(Path, paths):
        if p.is_dir():
            out += sorted(f for f in p.rglob("*") if f.suffix.lower() in IMAGE_SUFFIXES and not f.is_dir())
        else:
            out.append(p)
    return out


def shown(path: Path) -> str:
    """A path as printable text: undecodable bytes and control characters escaped."""
    text = os.fsencode(path).decode("utf-8", "backslashreplace")
    return "".join(c if c.isprintable() else c.encode("unicode_escape").decode() for c in text)


def run_predict(clf: Classifier, images: list[Path], as_json: bool, out=None, err=None) -> int:
    """Predict every image; report unreadable ones and keep going. Returns the exit status."""
    out, err = out or sys.stdout, err or sys.stderr
    failures = 0
    if not as_json:
        print(f"{'image':40s} {'P(melanoma)':>11s}  decision (threshold {clf.threshold:.3f})", file=out)
    for path in images:
        name = shown(path)
        try:
            pred = clf.classify(path)
        except ImageError as e:
            failures += 1
            print(f"skipped: {name}: {e.reason}", file=err)
            if as_json:
                print(json.dumps({"image": name, "error": e.reason}), file=out)
            continue
        if as_json:
            print(json.dumps({"image": name, **pred.to_dict(), "model": clf.model_path.name,
                              "disclaimer": DISCLAIMER}), file=out)
        else:
            print(f"{name[-40:]:40s} {pred.probability:11.3f}  {pred.label}", file=out)
    if not as_json:
        print(f"\n{DISCLAIMER}", file=out)
    if failures:
        print(f"{failures} of {len(images)} inputs could not be read", file=err)
    return EXIT_UNREADABLE if failures else EXIT_OK


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m edge", description=(
        "Run the melanoma screening model (.tflite + JSON sidecar) on images. " + DISCLAIMER))
    sub = p.add_subparsers(dest="command", required=True)
    pr = sub.add_parser("predict", help="classify images or folders of images", epilog=(
        "Exit status: 0 when every input was read; 3 when some could not be (each is named on "
        "stderr as 'skipped: NAME: REASON' and the rest are still predicted); 2 for bad usage "
        "(missing or mismatched model, no images); 130 when interrupted."))
    pr.add_argument("inputs", nargs="+", help="image files or folders")
    info = sub.add_parser("info", help="print the backend, the model spec and the threads")
    for s in (pr, info):
        s.add_argument("--model", type=Path, default=DEFAULT_MODEL, help=f"model file (default {DEFAULT_MODEL.name})")
        s.add_argument("--threads", type=int, default=None, help="interpreter threads (default: runtime's choice)")
    pr.add_argument("--json", action="store_true", help="one JSON object per image")
    return p


def main(argv: list[str] | None = None) -> int:
    """Run the CLI; a reader that goes away (`| head`) ends it quietly."""
    try:
        status = run_cli(argv)
        sys.stdout.flush()
        return status
    except BrokenPipeError:
        # Python would report the broken pipe again when it flushes stdout at exit.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return EXIT_OK
    except KeyboardInterrupt:
        return 130


def run_cli(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.threads is not None and args.threads < 1:
        print("error: --threads must be at least 1", file=sys.stderr)
        return EXIT_USAGE
    try:
        clf = Classifier(args.model, num_threads=args.threads)
    except (SidecarError, ValueError, ImportError) as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_USAGE
    if args.command == "info":
        print(json.dumps(clf.describe(), indent=2))
        return EXIT_OK
    images = expand_inputs(args.inputs)
    if not images:
        print("error: no images found in the given inputs", file=sys.stderr)
        return EXIT_USAGE
    return run_predict(clf, images, args.json)


if __name__ == "__main__":
    sys.exit(main())
