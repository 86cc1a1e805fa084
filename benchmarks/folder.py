"""Folder throughput of `python -m edge predict` (#16 item 4): images/s on a folder of real images,
in one run: serial (decode, then infer, one after the other) at 1 and 2 interpreter threads, one
interpreter on 2 threads fed by the decode pool, and the default on several cores (one
single-threaded interpreter per core, fed by the pool); optionally the CLI of an earlier commit
(`--baseline-ref`, run from a temporary git worktree on the same model file) as "before".

    python -m benchmarks.folder [--images 1000] [--data ../shared/data/ham10000/train] [--baseline-ref REF]

`--baseline-ref 3d180a4` is main as it was when #16 ("folders are decoded serially") was filed.

The folder is made of symbolic links to the first N images of --data, in a temporary directory
(no image is copied, nothing is kept). Each setting runs the real CLI (`--json`) as a child
process, twice; the faster wall time counts (the first run also warms the page cache). Writes
reports/folder.{json,md}. Run it on an idle machine.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
REPORTS = REPO / "reports"
DEFAULT_DATA = REPO.parent / "shared" / "data" / "ham10000" / "train"
# (what it is, CLI flags, CPU threads it uses for inference)
SERIAL_2 = "serial, 1 interpreter x 2 threads"
DEFAULT_2 = "decode pool, 2 interpreters x 1 thread (the default on 2 cores)"
SETTINGS = [
    ("serial, 1 interpreter x 1 thread", ["--threads", "1", "--parallel", "1", "--decode-threads", "1"], 1),
    (SERIAL_2, ["--threads", "2", "--parallel", "1", "--decode-threads", "1"], 2),
    ("decode pool, 1 interpreter x 2 threads", ["--threads", "2", "--parallel", "1", "--decode-threads", "3"], 2),
    (DEFAULT_2, ["--threads", "1", "--parallel", "2", "--decode-threads", "3"], 2),
]
# an earlier commit's CLI (flags every version has): as its users ran it, and with 2 interpreter
# threads. At 3d180a4 (main when #16 was filed: decode, then infer, one image after the other)
# its default left the thread count to the runtime (1 thread here).
BEFORE = [("before: its default", [], 1),
          ("before: --threads 2", ["--threads", "2"], 2)]


def timed_cli(folder: Path, flags: list[str], model: Path, cwd: Path = REPO, repeats: int = 2) -> dict:
    cmd = [sys.executable, "-m", "edge", "predict", str(folder), "--json", "--model", str(model.resolve()), *flags]
    walls, lines = [], 0
    for _ in range(repeats):
        t0 = time.perf_counter()
        out = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True)
        walls.append(time.perf_counter() - t0)
        if out.returncode not in (0, 4):  # 4: some images refused, still answered
            raise RuntimeError(f"edge predict failed ({out.returncode}): {out.stderr.strip()[-300:]}")
        lines = len(out.stdout.splitlines())
    return {"flags": flags, "seconds": min(walls), "all_seconds": walls, "images": lines,
            "images_per_s": lines / min(walls)}


def worktree(ref: str, where: Path) -> Path:
    """A checkout of `ref` (its code only; the model file comes from --model)."""
    subprocess.run(["git", "-C", str(REPO), "worktree", "add", "--detach", str(where), ref],
                   check=True, capture_output=True, text=True)
    return where


def main(argv=None) -> int:
    from edge.runner import DEFAULT_MODEL
    ap = argparse.ArgumentParser(prog="python -m benchmarks.folder", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", type=Path, default=DEFAULT_DATA, help="a folder of real images")
    ap.add_argument("--images", type=int, default=1000)
    ap.add_argument("--model", type=Path, default=DEFAULT_MODEL)
    ap.add_argument("--baseline-ref", metavar="REF", help="also time the CLI of this git commit (\"before\")")
    ap.add_argument("--out", type=Path, default=REPORTS)
    args = ap.parse_args(argv)
    files = sorted(p for p in args.data.glob("*") if p.suffix.lower() in (".jpg", ".jpeg", ".png"))[:args.images]
    if len(files) < args.images:
        print(f"error: {args.data} holds {len(files)} images, fewer than --images {args.images}", file=sys.stderr)
        return 2
    runs = []
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "images"
        folder.mkdir()
        for f in files:
            os.symlink(f.resolve(), folder / f.name)
        plan = [(label, flags, threads, REPO, None) for label, flags, threads in SETTINGS]
        if args.baseline_ref:
            old = worktree(args.baseline_ref, Path(tmp) / "before")
            plan = [(label, flags, threads, old, args.baseline_ref) for label, flags, threads in BEFORE] + plan
        try:
            for label, flags, threads, cwd, ref in plan:
                r = {"setting": label, "inference_threads": threads, "ref": ref,
                     **timed_cli(folder, flags, args.model, cwd)}
                runs.append(r)
                print(f"{label}: {r['images_per_s']:.1f} images/s ({r['seconds']:.1f} s for {r['images']})", flush=True)
        finally:
            if args.baseline_ref:
                subprocess.run(["git", "-C", str(REPO), "worktree", "remove", "--force", str(Path(tmp) / "before")],
                               capture_output=True)
    now = {r["setting"]: r for r in runs if r["ref"] is None}
    serial2, default = now[SERIAL_2], now[DEFAULT_2]
    best2 = max((r for r in now.values() if r["inference_threads"] == 2), key=lambda r: r["images_per_s"])
    from benchmarks.measure import machine
    report = {"generated": time.strftime("%Y-%m-%d %H:%M:%S %Z"), "machine": machine(), "model": args.model.name,
              "data": str(args.data), "images": len(files), "baseline_ref": args.baseline_ref, "runs": runs,
              "speedup_default_vs_serial_2_threads": default["images_per_s"] / serial2["images_per_s"],
              "best_2_threads": best2["setting"]}
    before = [r for r in runs if r["ref"] is not None]
    if before:
        report["speedup_default_vs_before"] = {r["setting"]: default["images_per_s"] / r["images_per_s"]
                                               for r in before}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "folder.json").write_text(json.dumps(report, indent=2) + "\n")
    lines = [f"# Folder throughput: `python -m edge predict FOLDER --json`, {len(files)} real images", "",
             f"{report['machine']['cpu']}, {report['machine']['cores']} cores, {report['generated']}; model "
             f"{args.model.name}; wall time of the whole command (process start, model load, every image), "
             "best of 2, all settings in this one run.", "",
             "| setting | flags | inference threads | seconds | images/s |", "|---|---|---|---|---|"]
    lines += [f"| {r['setting']}{' (' + r['ref'] + ')' if r['ref'] else ''} | `{' '.join(r['flags'])}` | "
              f"{r['inference_threads']} | {r['seconds']:.1f} | {r['images_per_s']:.1f} |" for r in runs]
    lines += ["", f"At 2 threads the default is {report['speedup_default_vs_serial_2_threads']:.2f}x the serial "
                  f"CLI of this commit; the fastest 2-thread setting is: {best2['setting']}."]
    for label, ratio in report.get("speedup_default_vs_before", {}).items():
        lines.append(f"Against {label} ({args.baseline_ref}): {ratio:.2f}x.")
    (args.out / "folder.md").write_text("\n".join(lines + [""]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
