"""Folder throughput of `python -m edge predict` (#16 item 4): images/s on a folder of real images,
decoding serially (one thread: decode, then infer, one after the other) against the decode pool,
at 1 and 2 interpreter threads, in one run.

    python -m benchmarks.folder [--images 1000] [--data ../shared/data/ham10000/train]

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
SETTINGS = [(1, 1), (1, 2), (2, 1), (2, 2)]  # (interpreter threads, decode threads)


def timed_cli(folder: Path, threads: int, decode: int, model: Path, repeats: int = 2) -> dict:
    cmd = [sys.executable, "-m", "edge", "predict", str(folder), "--json", "--model", str(model),
           "--threads", str(threads), "--decode-threads", str(decode)]
    walls, lines = [], 0
    for _ in range(repeats):
        t0 = time.perf_counter()
        out = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True)
        walls.append(time.perf_counter() - t0)
        if out.returncode not in (0, 4):  # 4: some images refused, still answered
            raise RuntimeError(f"edge predict failed ({out.returncode}): {out.stderr.strip()[-300:]}")
        lines = len(out.stdout.splitlines())
    return {"threads": threads, "decode_threads": decode, "seconds": min(walls), "all_seconds": walls,
            "images": lines, "images_per_s": lines / min(walls)}


def main(argv=None) -> int:
    from edge.runner import DEFAULT_MODEL
    ap = argparse.ArgumentParser(prog="python -m benchmarks.folder", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", type=Path, default=DEFAULT_DATA, help="a folder of real images")
    ap.add_argument("--images", type=int, default=1000)
    ap.add_argument("--model", type=Path, default=DEFAULT_MODEL)
    ap.add_argument("--out", type=Path, default=REPORTS)
    args = ap.parse_args(argv)
    files = sorted(p for p in args.data.glob("*") if p.suffix.lower() in (".jpg", ".jpeg", ".png"))[:args.images]
    if len(files) < args.images:
        print(f"error: {args.data} holds {len(files)} images, fewer than --images {args.images}", file=sys.stderr)
        return 2
    runs = []
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        for f in files:
            os.symlink(f.resolve(), folder / f.name)
        for threads, decode in SETTINGS:
            r = timed_cli(folder, threads, decode, args.model)
            runs.append(r)
            print(f"threads {threads}, decode threads {decode}: {r['images_per_s']:.1f} images/s "
                  f"({r['seconds']:.1f} s for {r['images']})", flush=True)
    serial = next(r for r in runs if (r["threads"], r["decode_threads"]) == (2, 1))
    best = next(r for r in runs if (r["threads"], r["decode_threads"]) == (2, 2))
    from benchmarks.measure import machine
    report = {"generated": time.strftime("%Y-%m-%d %H:%M:%S %Z"), "machine": machine(), "model": args.model.name,
              "data": str(args.data), "images": len(files), "runs": runs,
              "speedup_2_threads_pool_vs_serial": best["images_per_s"] / serial["images_per_s"]}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "folder.json").write_text(json.dumps(report, indent=2) + "\n")
    lines = [f"# Folder throughput: `python -m edge predict FOLDER --json`, {len(files)} real images", "",
             f"{report['machine']['cpu']}, {report['machine']['cores']} cores, {report['generated']}; model "
             f"{args.model.name}; wall time of the whole command (process start, model load, every image), best of 2.",
             "Decode threads 1 = decode then infer, one after the other (the CLI before the pool).", "",
             "| interpreter threads | decode threads | seconds | images/s |", "|---|---|---|---|"]
    lines += [f"| {r['threads']} | {r['decode_threads']} | {r['seconds']:.1f} | {r['images_per_s']:.1f} |" for r in runs]
    lines += ["", f"At 2 interpreter threads, the decode pool is {report['speedup_2_threads_pool_vs_serial']:.2f}x the "
                  "serial throughput.", ""]
    (args.out / "folder.md").write_text("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
