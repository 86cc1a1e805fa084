"""`python -m edge predict|info`: melanoma screening on a Pi or laptop (no TensorFlow)."""
from __future__ import annotations

import argparse
import json
import os
import queue
import sys
import time
from pathlib import Path

from . import DEFAULT_MODEL, DISCLAIMER, Classifier, ImageError, SidecarError, read_sidecar
from .preprocess import FORMAT_NAMES, IMAGE_SUFFIXES, DecodeLimits, MemoryBudget
from .runner import usable_cores

EXIT_OK, EXIT_USAGE, EXIT_UNREADABLE, EXIT_REFUSED, EXIT_INTERRUPTED = 0, 2, 3, 4, 130
PROGRESS_FROM = 20  # a progress bar (stderr, terminals only) from this many images
EXIT_HELP = ("Exit status: 0 when every input was read and answered; 3 when some could not be read (each is "
             "named on stderr as 'skipped: NAME: REASON' and the rest are still predicted); 4 when every input "
             "was read but some were refused (not a usable dermoscopic image of one lesion: 'refused: NAME: "
             "REASON', no verdict); 2 for bad usage (missing or mismatched model, no images) or output that "
             "cannot be written; 130 when interrupted.")
NUMBER_HELP = ("The number is P(melanoma), calibrated on validation images when the model's sidecar carries a "
               "calibration (the table's column says 'P(melanoma)'), else the model's raw ranking score ('score'); "
               "an image at or above the model's threshold (chosen on validation images for 90 percent "
               "sensitivity, see `info`) is flagged. It is never a diagnosis.")


def image_files(folder: Path, err) -> list[Path]:
    """Image files below `folder`, sorted. An explicit stack, not recursion (Path.rglob and, before
    Python 3.12, os.walk recurse: a folder 1,000 deep overflowed them); links to folders are not
    followed, and a folder that cannot be listed is named and skipped."""
    found, stack = [], [folder]
    while stack:
        current = stack.pop()
        try:
            with os.scandir(current) as entries:
                for entry in entries:
                    if entry.is_dir(follow_symlinks=False):
                        stack.append(Path(entry.path))
                    elif Path(entry.name).suffix.lower() in IMAGE_SUFFIXES:
                        found.append(Path(entry.path))  # FIFOs, links and the like too: the decoder names them
        except OSError as e:
            print(f"skipped: {shown(current)}: cannot be listed ({e.strerror or e})", file=err)
    return sorted(found)


def expand_inputs(paths: list[str], err=None) -> list[Path]:
    """Files as given; folders expand to the image files inside them (sorted, recursive).
    Whatever is not a regular file (a FIFO named x.jpg, a socket, a broken link) is kept, so
    that the decoder names it and skips it instead of blocking on it."""
    out: list[Path] = []
    for p in map(Path, paths):
        out += image_files(p, err or sys.stderr) if p.is_dir() else [p]
    return list(dict.fromkeys(out))  # an image named twice (a file and its folder) is predicted once


def shown(path: Path) -> str:
    """A path as printable text: undecodable bytes and control characters escaped."""
    text = os.fsencode(path).decode("utf-8", "backslashreplace")
    return "".join(c if c.isprintable() else c.encode("unicode_escape").decode() for c in text)


def progress(items, as_json: bool, err, total: int | None = None):
    """The items, wrapped in a tqdm bar on stderr when it is a terminal and the folder is large."""
    total = len(items) if total is None else total
    if as_json or total < PROGRESS_FROM or not getattr(err, "isatty", lambda: False)():
        return items
    from tqdm import tqdm
    return tqdm(items, file=err, unit="img", leave=False, total=total)


def heatmap_name(path: Path, used: set) -> str:
    """A unique overlay file name for an input (two inputs may share a stem)."""
    base = "".join(c if c.isalnum() or c in "-_." else "_" for c in path.stem)[:80] or "image"
    name, k = f"{base}.heatmap.png", 1
    while name in used:  # within this run; files from an earlier run in DIR are replaced
        k += 1
        name = f"{base}-{k}.heatmap.png"
    used.add(name)
    return name


def write_heatmap(clf: Classifier, path: Path, pred, folder: Path, used: set) -> Path | None:
    """The overlay PNG of `pred`'s melanoma map over the image the model saw."""
    if pred.heatmap is None:
        return None
    from .gate import overlay
    from .preprocess import resized_array
    image = resized_array(path, clf.spec, max_pixels=clf.max_pixels)
    target = folder / heatmap_name(path, used)
    overlay(image, pred.heatmap["melanoma"]).save(target, "PNG")
    return target


def answered_ahead(clfs: list[Classifier], images: list[Path], workers: int, tta: bool = False):
    """(path, Prediction or ImageError) in input order.

    With `workers` > 1, that many threads each decode an image and then answer it on whichever of
    `clfs` (replicas of one model, an interpreter each) is free, at most 2 x workers images ahead
    of the reader (the bounded window bounds memory). Pillow's decoding and the interpreter's
    invoke release the GIL, so decoding overlaps inference and the interpreters run at once."""
    free: queue.SimpleQueue = queue.SimpleQueue()
    for clf in clfs:
        free.put(clf)

    def work(path):
        try:
            x = clfs[0].prepare(path)  # needs no interpreter
            clf = free.get()
            try:
                return clf.answer(x, tta=tta)
            finally:
                free.put(clf)
        except ImageError as e:
            return e
    if workers <= 1:
        for path in images:
            yield path, work(path)
        return
    from collections import deque
    from concurrent.futures import ThreadPoolExecutor
    with ThreadPoolExecutor(workers, thread_name_prefix="image") as pool:
        window: deque = deque()
        todo = iter(images)
        for path in todo:
            window.append((path, pool.submit(work, path)))
            if len(window) >= 2 * workers:
                break
        while window:
            path, future = window.popleft()
            nxt = next(todo, None)
            if nxt is not None:
                window.append((nxt, pool.submit(work, nxt)))
            yield path, future.result()


def run_predict(clf: Classifier, images: list[Path], as_json: bool, out=None, err=None, tta: bool = False,
                heatmaps: Path | None = None, workers: int = 1, parallel: int = 1) -> int:
    """Predict every image; report unreadable and refused ones and keep going. Returns the exit status.
    `parallel` interpreters (clf and replicas of it) answer images from `workers` threads."""
    out, err = out or sys.stdout, err or sys.stderr
    width = max([len(shown(p)) for p in images] + [5])
    flagged = failures = malignant = refusals = 0
    used: set = set()
    multitask = bool(clf.classes)
    started = time.perf_counter()
    if not as_json:
        column = "P(melanoma)" if clf.calibration is not None else "score"
        extra = f"  {'P(malignant)':>12s}" if multitask else ""
        print(f"{'image':{width}s}  {column:>11s}{extra}  decision (threshold {clf.threshold:.3f})"
              + ("  |  top diagnoses" if multitask else ""), file=out)
    clfs = [clf] + [clf.replica() for _ in range(parallel - 1)]
    for path, pred in progress(answered_ahead(clfs, images, workers, tta), as_json, err, len(images)):
        name = shown(path)
        if isinstance(pred, ImageError):
            failures += 1
            print(f"skipped: {name}: {pred.reason}", file=err)
            if as_json:
                print(json.dumps({"image": name, "error": pred.reason}), file=out)
            continue
        if pred.refused:
            refusals += 1
            print(f"refused: {name}: {pred.reason}", file=err)
            if as_json:
                print(json.dumps({"image": name, **pred.to_dict(), **clf.identity(), "disclaimer": DISCLAIMER}),
                      file=out)
            else:
                print(f"{name:{width}s}  {'-':>11s}{'  ' + '-':>14s}  refused: {pred.reason}" if multitask else
                      f"{name:{width}s}  {'-':>11s}  refused: {pred.reason}", file=out)
            continue
        flagged += pred.melanoma
        malignant += bool(pred.malignant)
        row = {}
        if heatmaps is not None:
            try:
                written = write_heatmap(clf, path, pred, heatmaps, used)
                row = {"heatmap_file": str(written)} if written else {}
            except (ImageError, OSError) as e:  # the answer stands; say why the picture is missing
                print(f"heatmap not written: {name}: {getattr(e, 'reason', None) or e.strerror or e}", file=err)
        if as_json:
            print(json.dumps({"image": name, **pred.to_dict(), **row, "tta": tta, **clf.identity(),
                              "disclaimer": DISCLAIMER}), file=out)
        elif multitask:
            top = ", ".join(f"{n} {100 * q:.0f}%" for n, q in pred.diagnoses[:3])
            print(f"{name:{width}s}  {pred.probability:11.3f}  {pred.malignant_probability:12.3f}  {pred.label}  |  {top}",
                  file=out)
        else:
            print(f"{name:{width}s}  {pred.probability:11.3f}  {pred.label}", file=out)
    if not as_json:
        if multitask:
            print("\nP(malignant) = melanoma + basal cell carcinoma + actinic keratosis/intraepithelial carcinoma.",
                  file=out)
        print(f"\n{DISCLAIMER}", file=out, flush=True)
    also = f" ({malignant} possibly malignant)" if multitask else ""
    can_refuse = clf.refuse and (clf.gate is not None or clf.quality is not None)
    print(f"{len(images)} image{'s' * (len(images) != 1)}: {len(images) - failures - refusals} predicted, "
          f"{flagged} flagged{also}, " + (f"{refusals} refused, " if can_refuse else "") + f"{failures} unreadable"
          f" ({len(images) / max(time.perf_counter() - started, 1e-9):.1f} images/s)", file=err)
    return EXIT_UNREADABLE if failures else (EXIT_REFUSED if refusals else EXIT_OK)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m edge", description=(
        "Run the melanoma screening model (.tflite + JSON sidecar) on images. " + DISCLAIMER), epilog=EXIT_HELP)
    sub = p.add_subparsers(dest="command", required=True)
    pr = sub.add_parser("predict", help="classify images or folders of images",
                        description=f"Classify {FORMAT_NAMES} images. {NUMBER_HELP}", epilog=EXIT_HELP)
    pr.add_argument("inputs", nargs="+", help="image files or folders (searched recursively for "
                                              + " ".join(IMAGE_SUFFIXES) + ")")
    info = sub.add_parser("info", help="print the backend, the model spec and the threads")
    for s in (pr, info):
        s.add_argument("--model", type=Path, default=DEFAULT_MODEL, help=f"model file (default {DEFAULT_MODEL.name})")
        s.add_argument("--threads", type=int, default=None, help="interpreter threads (default: runtime's choice)")
    pr.add_argument("--json", action="store_true", help="one JSON object per image on stdout (no table, no bar)")
    pr.add_argument("--parallel", type=int, default=None, metavar="N", help=(
        "interpreters answering images at once, each with --threads threads (default: one per CPU core, "
        "at most 4, with 1 thread each, for several images when --threads is not given; else 1)"))
    pr.add_argument("--decode-threads", type=int, default=None, metavar="N", help=(
        "threads that decode images ahead and hand them to a free interpreter, order kept (default: "
        "--parallel + 1 for several images, else 1)"))
    pr.add_argument("--heatmap", type=Path, metavar="DIR", help=(
        "write an overlay PNG per answered image into DIR (the image the model saw with its melanoma activation "
        "map blended over it, and a colour scale); --json then names the file"))
    pr.add_argument("--tta", action="store_true", help=(
        "test-time augmentation: average the 8 flips/rotations (8x the inference time; the threshold and "
        "calibration were fitted without it)"))
    return p


def main(argv: list[str] | None = None) -> int:
    """Run the CLI; a reader that goes away (`| head`) ends it quietly; results or messages that
    cannot be written (stdout closed, a full disk) end it with EXIT_USAGE and no traceback."""
    if sys.stderr is None:  # started with stderr closed (`2>&-`): messages go nowhere, results still out
        sys.stderr = open(os.devnull, "w")
    if sys.stdout is None:  # started with its output closed (`>&-`): print() would drop every result
        say("error: standard output is closed; nowhere to write the results")
        return EXIT_USAGE
    try:
        status = run_cli(argv)
        sys.stdout.flush()
        sys.stderr.flush()
        return status
    except BrokenPipeError:
        # Python would report the broken pipe again when it flushes stdout at exit.
        silence(sys.stdout)
        return EXIT_OK
    except OSError as e:  # stdout or stderr on a full disk, a closed terminal, ...
        silence(sys.stdout)
        say(f"error: cannot write the results ({e.strerror or e})")
        return EXIT_USAGE
    except KeyboardInterrupt:
        return EXIT_INTERRUPTED


def silence(stream) -> None:
    """Point `stream` at /dev/null, so that Python's flush at exit cannot fail again."""
    try:
        os.dup2(os.open(os.devnull, os.O_WRONLY), stream.fileno())
    except (OSError, AttributeError, ValueError):
        pass


def say(message: str) -> None:
    """A message on stderr, if stderr can take it (on a full disk it is dropped; `main` has put a
    closed stderr on /dev/null)."""
    try:
        print(message, file=sys.stderr, flush=True)
    except OSError:
        silence(sys.stderr)


def run_cli(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    for flag in ("threads", "parallel", "decode_threads"):
        value = getattr(args, flag, None)  # `info` has no --parallel / --decode-threads
        if value is not None and value < 1:
            print(f"error: --{flag.replace('_', '-')} must be at least 1", file=sys.stderr)
            return EXIT_USAGE
    images, parallel, workers, threads = [], 1, 1, args.threads
    if args.command == "predict":
        try:  # a missing, unreadable or mismatched model is the first thing to hear about, before the inputs
            read_sidecar(args.model)
        except SidecarError as e:
            print(f"error: {e}", file=sys.stderr)
            return EXIT_USAGE
        images = expand_inputs(args.inputs)
        if not images:
            print("error: no images found in the given inputs", file=sys.stderr)
            return EXIT_USAGE
        several = len(images) > 1
        # several images: one single-threaded interpreter per core beats one interpreter on every core
        parallel = args.parallel or (min(usable_cores(), 4) if several and threads is None else 1)
        workers = args.decode_threads or (parallel + 1 if several else 1)
        parallel = min(parallel, workers, len(images))  # an interpreter no thread feeds would idle
        threads = threads or (1 if parallel > 1 else None)
    try:
        # decodes in the pool share one memory budget, as the server's threads do
        clf = Classifier(args.model, num_threads=threads, budget=MemoryBudget(DecodeLimits().max_decode_bytes))
    except (SidecarError, ValueError, ImportError) as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_USAGE
    if args.command == "info":
        print(json.dumps(clf.describe(), indent=2))
        return EXIT_OK
    if args.heatmap is not None:
        try:
            args.heatmap.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            print(f"error: --heatmap {args.heatmap}: {e.strerror or e}", file=sys.stderr)
            return EXIT_USAGE
    return run_predict(clf, images, args.json, tta=args.tta, heatmaps=args.heatmap, workers=workers,
                       parallel=parallel)


if __name__ == "__main__":
    sys.exit(main())
