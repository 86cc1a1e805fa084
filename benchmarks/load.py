"""Load test of the real server: `python -m server --workers N` under wrk (Debian's `wrk`, used
when installed) or a threaded Python client (`--client python`), with the model's own
single-image time (decode + inference, 1 thread) measured in the same run.

    python -m benchmarks.load [--workers 1 2] [--concurrency 16] [--seconds 20] [--rounds 3] [--slices 5]
                              [--image PATH]

For each worker count: requests/s, p50/p90/p99 latency and errors at the given concurrency, and
the efficiency ratio requests/s / (cores / single-image time), the ideal being 1. The speed of a
shared cloud core drifts by tens of percent within minutes, so each server run is cut into
`--slices` slices with the single-image time measured (server idle) before each slice and after
the last: the median of those samples gives that run's ideal. The whole series is repeated
`--rounds` times: every round is reported, and the median per worker count.
For scale, the same run also measures the ceiling without any server: one process per core, each
classifying the image in a loop at the same time (images/s in all, and that over the ideal): what
the cores give when they are all busy. Results go to reports/load.{json,md}. Run it on an idle
machine: the client shares its cores.
"""
from __future__ import annotations

import argparse
import http.client
import json
import os
import platform
import socket
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
REPORTS = REPO / "reports"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def multipart(data: bytes) -> tuple[bytes, str]:
    boundary = "loadtestboundary"
    body = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"image\"; filename=\"l.jpg\"\r\n"
            f"Content-Type: image/jpeg\r\n\r\n").encode() + data + f"\r\n--{boundary}--\r\n".encode()
    return body, f"multipart/form-data; boundary={boundary}"


def warm_classifier(model: Path, data: bytes):
    """A 1-thread Classifier that has classified `data` 20 times."""
    from edge import Classifier
    clf = Classifier(Path(model), num_threads=1)
    for _ in range(20):
        clf.classify(data)
    return clf


def single_image_ms(clf, data: bytes, runs: int = 200) -> dict:
    """Median decode + inference time of one upload on `clf` (a warm 1-thread Classifier, from
    `warm_classifier`), in this process."""
    times = []
    for _ in range(runs):
        t0 = time.perf_counter()
        clf.classify(data)
        times.append((time.perf_counter() - t0) * 1000)
    return {"p50_ms": statistics.median(times), "runs": runs}


def _classify_until(model: str, data: bytes, start: float, stop: float) -> tuple[int, float]:
    """One process of `all_cores_images_per_s`: warm up, wait for the common start, count the
    images finished before `stop`. Returns (images, when it was ready)."""
    clf = warm_classifier(model, data)
    ready = time.time()
    while time.time() < start:
        time.sleep(0.001)
    n = 0
    while True:
        clf.classify(data)
        if time.time() > stop:
            return n, ready
        n += 1


def all_cores_images_per_s(model: Path, data: bytes, processes: int, seconds: float = 10.0,
                           settle: float = 5.0) -> dict:
    """Images/s of `processes` processes classifying at once (1 interpreter thread each), no HTTP.
    They start together `settle` seconds from now; a process not ready by then is an error
    (its window would be shorter and the figure too low)."""
    import multiprocessing as mp
    start = time.time() + settle
    with mp.get_context("spawn").Pool(processes) as pool:
        done = pool.starmap(_classify_until, [(str(model), data, start, start + seconds)] * processes)
    late = [round(ready - start, 2) for _, ready in done if ready > start]
    if late:
        raise RuntimeError(f"{len(late)} process(es) were ready {late} s after the common start: raise settle")
    counts = [n for n, _ in done]
    return {"processes": processes, "seconds": seconds, "images_per_process": counts, "images": sum(counts),
            "images_per_s": sum(counts) / seconds}


def start_server(model: Path, workers: int, port: int) -> subprocess.Popen:
    log = open(os.devnull, "w")  # waitress logs queue depth under load: an unread pipe would fill and stall it
    proc = subprocess.Popen([sys.executable, "-m", "server", "--model", str(model), "--port", str(port),
                             "--workers", str(workers)], cwd=REPO,
                            stdout=log, stderr=log)
    for _ in range(200):
        try:
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=1)
            conn.request("GET", "/healthz")
            if conn.getresponse().status == 200:
                time.sleep(1.0 if workers > 1 else 0.2)  # let every worker finish loading
                return proc
        except OSError:
            time.sleep(0.1)
    proc.kill()
    raise RuntimeError(f"server did not start on port {port} (run python -m server --workers {workers} to see why)")


def hammer(port: int, data: bytes, concurrency: int, requests: int) -> dict:
    body, ctype = multipart(data)

    def worker(n: int):
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)  # keep-alive per client
        out = []
        for _ in range(n):
            t0 = time.perf_counter()
            try:
                conn.request("POST", "/api/v1/predict", body=body, headers={"Content-Type": ctype})
                r = conn.getresponse()
                r.read()
                ok = r.status in ANSWERED
            except OSError:
                ok = False
                conn.close()
                conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
            out.append(((time.perf_counter() - t0) * 1000, ok))
        conn.close()
        return out
    per = [requests // concurrency + (i < requests % concurrency) for i in range(concurrency)]
    hammer_warm = worker(20)  # noqa: F841  warm-up on one connection
    t0 = time.perf_counter()
    with ThreadPoolExecutor(concurrency) as pool:
        results = [r for chunk in pool.map(worker, per) for r in chunk]
    wall = time.perf_counter() - t0
    lat = np.array([r[0] for r in results])
    return {"requests": len(results), "errors": int(sum(not r[1] for r in results)), "seconds": round(wall, 2),
            "requests_per_s": len(results) / wall, "p50_ms": float(np.percentile(lat, 50)),
            "p90_ms": float(np.percentile(lat, 90)), "p99_ms": float(np.percentile(lat, 99))}


# A classification's answers: 200, or 422 when the image is refused after the same decode,
# invoke and gate (the demo image is a drawing the refusal gate may turn away).
ANSWERED = (200, 422)
WRK_SCRIPT = r"""
local f = assert(io.open(os.getenv("LOAD_BODY"), "rb"))
wrk.method = "POST"
wrk.body = f:read("*all")
f:close()
wrk.headers["Content-Type"] = os.getenv("LOAD_CTYPE")
local threads = {}
function setup(thread)
  table.insert(threads, thread)
end
unanswered = 0
response = function(status, headers, body)
  if UNANSWERED_TEST then unanswered = unanswered + 1 end
end
done = function(summary, latency, requests)
  local bad = summary.errors.connect + summary.errors.read + summary.errors.write + summary.errors.timeout
  for _, thread in ipairs(threads) do bad = bad + thread:get("unanswered") end
  io.write(string.format('WRK_JSON {"requests": %d, "errors": %d, "seconds": %.3f, "p50_ms": %.3f, '
    .. '"p90_ms": %.3f, "p99_ms": %.3f}\n', summary.requests, bad, summary.duration / 1e6,
    latency:percentile(50) / 1e3, latency:percentile(90) / 1e3, latency:percentile(99) / 1e3))
end
"""
WRK_SCRIPT = WRK_SCRIPT.replace("UNANSWERED_TEST", " and ".join(f"status ~= {c}" for c in ANSWERED))


def hammer_wrk(port: int, data: bytes, concurrency: int, seconds: int, tmp: Path, warm_up: bool = True) -> dict:
    """The same load from wrk (a C load generator: far less of the 2 cores than Python threads),
    `concurrency` keep-alive connections on 2 client threads for `seconds`, after a 3 s warm-up
    (`warm_up`)."""
    body, ctype = multipart(data)
    (tmp / "body").write_bytes(body)
    (tmp / "post.lua").write_text(WRK_SCRIPT)
    env = {**os.environ, "LOAD_BODY": str(tmp / "body"), "LOAD_CTYPE": ctype}
    url = f"http://127.0.0.1:{port}/api/v1/predict"
    if warm_up:
        subprocess.run(["wrk", "-t", "2", "-c", str(concurrency), "-d", "3s", "-s", str(tmp / "post.lua"), url],
                       env=env, capture_output=True, check=True)
    out = subprocess.run(["wrk", "-t", "2", "-c", str(concurrency), "-d", f"{seconds}s", "--timeout", "30s",
                          "-s", str(tmp / "post.lua"), url], env=env, capture_output=True, text=True, check=True)
    line = next(x for x in out.stdout.splitlines() if x.startswith("WRK_JSON "))
    r = json.loads(line[len("WRK_JSON "):])
    r["requests_per_s"] = r["requests"] / r["seconds"]
    return r


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.load", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    from edge.runner import DEFAULT_MODEL
    ap.add_argument("--model", type=Path, default=DEFAULT_MODEL)
    ap.add_argument("--image", type=Path, default=REPO / "tests" / "fixtures" / "lesion.jpg")
    ap.add_argument("--workers", type=int, nargs="+", default=[1, os.cpu_count() or 1])
    ap.add_argument("--concurrency", type=int, default=16)
    ap.add_argument("--requests", type=int, default=2000)
    ap.add_argument("--out", type=Path, default=REPORTS)
    ap.add_argument("--client", choices=["auto", "wrk", "python"], default="auto",
                    help="load generator: wrk (Debian package wrk; auto when installed) or a threaded Python client")
    ap.add_argument("--seconds", type=int, default=20, help="duration of each wrk run (default 20)")
    ap.add_argument("--rounds", type=int, default=3, help="repeat every worker count this often (default 3)")
    ap.add_argument("--slices", type=int, default=5, help=(
        "cut each run into this many slices with a single-image time before each and after the last (default 5)"))
    args = ap.parse_args(argv)
    if min(args.rounds, args.seconds, args.slices, args.requests) < 1:
        ap.error("--rounds, --seconds, --slices and --requests must be at least 1")
    if args.seconds % args.slices or args.requests % args.slices:
        ap.error("--seconds (wrk) and --requests (python client) must be multiples of --slices")
    import shutil
    client = ("wrk" if shutil.which("wrk") else "python") if args.client == "auto" else args.client
    if client == "wrk" and not shutil.which("wrk"):
        print("error: wrk is not installed (apt-get install wrk), or use --client python", file=sys.stderr)
        return 2
    data = args.image.read_bytes()
    cores = os.cpu_count() or 1
    clf = warm_classifier(args.model, data)
    first = single_image_ms(clf, data)["p50_ms"]
    ceiling = all_cores_images_per_s(args.model, data, cores)
    ceiling["single_ms_before"], ceiling["single_ms_after"] = first, single_image_ms(clf, data)["p50_ms"]
    ceiling["over_ideal"] = ceiling["images_per_s"] / (cores / ((first + ceiling["single_ms_after"]) / 2000))
    print(f"single image {first:.2f} ms; no server, {cores} processes at once: "
          f"{ceiling['images_per_s']:.0f} images/s ({ceiling['over_ideal']:.2f} of the ideal)", flush=True)
    runs = []
    for rnd in range(1, args.rounds + 1):
        for w in args.workers:
            r = serve_and_load(args, w, client, data, lambda: single_image_ms(clf, data, runs=100)["p50_ms"])
            single = statistics.median(r["single_ms_samples"])
            ideal = cores / (single / 1000)
            r.update(round=rnd, workers=w, concurrency=args.concurrency, client=client, single_ms=single,
                     ideal_requests_per_s=ideal, efficiency=r["requests_per_s"] / ideal,
                     p99_over_p50=r["p99_ms"] / r["p50_ms"] if r["p50_ms"] > 0 else None)  # None: no answers
            runs.append(r)
            print(f"round {rnd}, workers {w}: {r['requests_per_s']:.0f} req/s, p50 {r['p50_ms']:.1f} ms, "
                  f"p99 {r['p99_ms']:.1f} ms, errors {r['errors']}, single image {single:.2f} ms "
                  f"({min(r['single_ms_samples']):.2f}-{max(r['single_ms_samples']):.2f}), "
                  f"efficiency {r['efficiency']:.2f}", flush=True)
    summary = summarise(runs, args.workers)
    report = {"model": args.model.name, "image": args.image.name, "image_bytes": len(data), "cores": cores,
              "machine": f"{platform.machine()} {platform.processor() or ''}".strip(), "python": platform.python_version(),
              "rounds": args.rounds, "seconds": args.seconds, "requests": args.requests, "slices": args.slices,
              "client": client,
              "all_cores_no_server": ceiling, "summary": summary, "runs": runs,
              "measured_at": time.strftime("%Y-%m-%d %H:%M:%S")}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "load.json").write_text(json.dumps(report, indent=2) + "\n")
    (args.out / "load.md").write_text(markdown(report))
    return 0


def serve_and_load(args, workers: int, client: str, data: bytes, sample) -> dict:
    """Start `python -m server --workers N`, then alternate a single-image time (`sample()`, the
    server idle) and a slice of the load, `--slices` times, and a last sample; stop the server.
    The slices are merged: requests, errors and seconds add up, p50 and p90 are the slices'
    medians, p99 their maximum."""
    import tempfile
    port = free_port()
    proc = start_server(args.model, workers, port)
    samples, slices = [], []
    try:
        with tempfile.TemporaryDirectory() as tmp:
            for i in range(args.slices):
                samples.append(sample())
                if client == "wrk":
                    slices.append(hammer_wrk(port, data, args.concurrency, args.seconds // args.slices,
                                             Path(tmp), warm_up=i == 0))
                else:
                    slices.append(hammer(port, data, args.concurrency, args.requests // args.slices))
            samples.append(sample())
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            raise RuntimeError(f"the server with {workers} worker(s) did not stop within 20 s of SIGTERM") from None
    merged = {k: sum(x[k] for x in slices) for k in ("requests", "errors", "seconds")}
    merged.update(requests_per_s=merged["requests"] / merged["seconds"],
                  p50_ms=statistics.median(x["p50_ms"] for x in slices),
                  p90_ms=statistics.median(x["p90_ms"] for x in slices),
                  p99_ms=max(x["p99_ms"] for x in slices), slices=len(slices), single_ms_samples=samples)
    return merged


def summarise(runs: list[dict], workers: list[int]) -> list[dict]:
    """Per worker count, over the rounds: median efficiency and requests/s, their range, all
    errors, the worst p99/p50."""
    out = []
    for w in workers:
        rs = [r for r in runs if r["workers"] == w]
        eff = [r["efficiency"] for r in rs]
        out.append({"workers": w, "rounds": len(rs), "median_efficiency": statistics.median(eff),
                    "min_efficiency": min(eff), "max_efficiency": max(eff),
                    "median_requests_per_s": statistics.median(r["requests_per_s"] for r in rs),
                    "errors": sum(r["errors"] for r in rs),
                    "worst_p99_over_p50": None if any(r["p99_over_p50"] is None for r in rs)
                    else max(r["p99_over_p50"] for r in rs)})
    return out


def num(x, fmt: str) -> str:
    return "-" if x is None else format(x, fmt)


def markdown(report: dict) -> str:
    c = report["all_cores_no_server"]
    samples = [x for r in report["runs"] for x in r["single_ms_samples"]] or [c["single_ms_before"]]
    lo, hi = min(samples), max(samples)
    lines = [f"# Server load test: {report['model']}", "",
             f"`python -m benchmarks.load`, {report['cores']} cores ({report['machine']}), image {report['image']} "
             f"({report['image_bytes']} bytes), server `python -m server --workers N` with its default flags "
             "(one waitress thread and one interpreter thread per worker process when N > 1), "
             f"{report['rounds']} round(s) per worker count, each run "
             f"{report['slices']} slices of " + (f"{report['seconds'] // report['slices']} s (wrk). "
                                                 if report["client"] == "wrk" else
                                                 f"{report['requests'] // report['slices']} requests. ") +
             "Efficiency = requests/s / (cores / single-image time). The speed of shared cloud cores drifts "
             f"(here the single-image samples of this report range from {lo:.2f} to {hi:.2f} ms), so each run is cut "
             "into slices with the single-image time "
             "(decode + inference, 1 interpreter thread, median of 100 in the load-test process, the server idle) "
             "measured before every slice and after the last; that run's single-image time is the median of those "
             "samples. p50/p90 of a run are the medians over its slices, p99 the worst slice's. "
             f"Without any server, {c['processes']} processes classifying the same image at once (1 thread each, "
             f"{c['seconds']:.0f} s) reach {c['images_per_s']:.0f} images/s, {c['over_ideal']:.2f} of the ideal "
             f"from the single-image times around that run ({c['single_ms_before']:.2f} / {c['single_ms_after']:.2f} "
             "ms): what the cores give when they are all busy.", "",
             "| workers | rounds | median req/s | median efficiency | range | errors | worst p99/p50 |",
             "|---|---|---|---|---|---|---|"]
    for s in report["summary"]:
        lines.append(f"| {s['workers']} | {s['rounds']} | {s['median_requests_per_s']:.0f} | "
                     f"{s['median_efficiency']:.2f} | {s['min_efficiency']:.2f}-{s['max_efficiency']:.2f} | "
                     f"{s['errors']} | {num(s['worst_p99_over_p50'], '.2f')} |")
    lines += ["", "Every run:", "",
              "| round | workers | client | concurrency | requests | errors | req/s | p50 ms | p90 ms | p99 ms | "
              "p99/p50 | single ms (samples' range) | ideal req/s | efficiency |",
              "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in report["runs"]:
        lines.append(f"| {r['round']} | {r['workers']} | {r['client']} | {r['concurrency']} | {r['requests']} | "
                     f"{r['errors']} | {r['requests_per_s']:.0f} | {r['p50_ms']:.1f} | {r['p90_ms']:.1f} | "
                     f"{r['p99_ms']:.1f} | {num(r['p99_over_p50'], '.2f')} | {r['single_ms']:.2f} "
                     f"({min(r['single_ms_samples']):.2f}-{max(r['single_ms_samples']):.2f}) | "
                     f"{r['ideal_requests_per_s']:.0f} | {r['efficiency']:.2f} |")
    return "\n".join(lines) + "\n"

if __name__ == "__main__":
    sys.exit(main())
