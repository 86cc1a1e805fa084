"""`python -m server`: serve the upload form and JSON API with waitress (production WSGI)."""
from __future__ import annotations

import argparse
import errno
import gc
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from edge import DEFAULT_MODEL, SidecarError
from edge.runner import usable_cores

EXIT_OK, EXIT_FAILED, EXIT_USAGE = 0, 1, 2


def port_number(text: str) -> int:
    """argparse type: a TCP port, 1..65535 (waitress would silently wrap 99999 to 34463)."""
    try:
        port = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a port number") from None
    if not 1 <= port <= 65535:
        raise argparse.ArgumentTypeError(f"port {port} is out of range (1-65535)")
    return port


def positive(kind):
    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
        if value <= 0:
            raise argparse.ArgumentTypeError(f"{text} must be greater than 0")
        return value
    return parse


def multi_process_ok() -> bool:
    """Several processes on one port need SO_REUSEPORT with kernel balancing: Linux."""
    import socket
    return sys.platform.startswith("linux") and hasattr(socket, "SO_REUSEPORT")


def workers_count(text: str) -> int:
    if text == "auto":
        return max(1, min(8, usable_cores())) if multi_process_ok() else 1
    return positive(int)(text)


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="python -m server", description=(
        "Melanoma screening aid: upload form and JSON API on the shipped .tflite model "
        "(research use, not a diagnosis). Exit status: 0 after a clean stop, 2 for bad usage "
        "(bad flag, missing or mismatched model, port in use)."))
    ap.add_argument("--host", default="127.0.0.1", help="bind address (default 127.0.0.1; 0.0.0.0 for the LAN)")
    ap.add_argument("--port", type=port_number, default=8000, help="port, 1-65535 (default 8000)")
    ap.add_argument("--threads", type=positive(int), default=None, help=(
        "waitress worker threads per process (default: 1 in each worker of --workers N whose interpreter "
        "runs one thread, where more threads only take turns on that core; else 4)"))
    ap.add_argument("--model", type=Path, default=DEFAULT_MODEL, help=f"model file (default {DEFAULT_MODEL.name})")
    ap.add_argument("--model-threads", type=positive(int), default=None, help=(
        "TFLite interpreter threads per process (default: the cores divided among the workers, at least 1)"))
    ap.add_argument("--workers", default="auto", type=workers_count, help=(
        "server processes, each with its own interpreter, sharing the port (Linux SO_REUSEPORT: the kernel "
        "spreads connections); 'auto' = one per usable CPU core, at most 8, on Linux, else 1 (default auto). "
        "Each process has its own decode budget, upload buffers and connection limit"))
    ap.add_argument("--reuse-port", action="store_true", help=argparse.SUPPRESS)  # set on the worker processes
    ap.add_argument("--cpu", type=int, default=None, help=argparse.SUPPRESS)  # the core a worker process keeps to
    ap.add_argument("--pin-cores", action=argparse.BooleanOptionalAction, default=True, help=(
        "with --workers up to the number of usable cores, keep each worker process on its own core (fewer "
        "migrations between cores); default on"))
    ap.add_argument("--max-upload-mb", type=positive(float), default=10, help="upload size limit (default 10 MB)")
    ap.add_argument("--client-grace", type=positive(float), default=10.0, help=(
        "seconds any request may take to start arriving; after that each such window must bring "
        "2 KB/s or the client is disconnected (and no request may take over 120 s), so slow or "
        "stalled clients cannot hold connections (default 10)"))
    ap.add_argument("--tta", action="store_true", help=(
        "test-time augmentation: average 8 flips/rotations per upload (8x the inference time)"))
    ap.add_argument("--debug", action="store_true", help="Flask's development server with debug (never in production)")
    return ap


def port_problem(host: str, port: int) -> str | None:
    """Why host:port cannot be served (checked once by the supervisor), or None."""
    import socket
    from .serving import reuse_port_socket
    try:  # SO_REUSEPORT would let us bind beside another server of this user: see if one answers
        with socket.create_connection((host if host not in ("0.0.0.0", "::") else "127.0.0.1", port), timeout=0.5):
            return f"error: {host}:{port} is already in use; pick another with --host/--port"
    except OSError:
        pass
    try:
        reuse_port_socket(host, port).close()
    except OSError as e:
        why = {errno.EADDRINUSE: "is already in use", errno.EACCES: "needs more privileges",
               errno.EADDRNOTAVAIL: "is not an address of this machine"}.get(e.errno, f"cannot be used ({e.strerror})")
        return f"error: {host}:{port} {why}; pick another with --host/--port"
    return None


def default_threads(args) -> int:
    """waitress threads when --threads is not given: 1 in a worker of `--workers N` with one
    interpreter thread (a second handler thread would only take turns with the first on the same
    core, and every switch costs), 4 in a single process (one upload is decoded while another is
    classified)."""
    return 1 if args.reuse_port and args.model_threads == 1 else 4


def worker_cores(workers: int) -> list[int | None]:
    """The core each worker process keeps to: one usable core each while there are enough of them
    (and os.sched_setaffinity exists), else None for all (the scheduler decides)."""
    try:
        usable = sorted(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return [None] * workers
    return usable[:workers] if workers <= len(usable) else [None] * workers


def keep_to_core(core: int | None) -> None:
    """Pin this process (and the threads it starts later: the interpreter's, waitress's) to `core`."""
    if core is None:
        return
    try:
        os.sched_setaffinity(0, {core})
    except (AttributeError, OSError) as e:  # a core taken away since the supervisor looked: run unpinned
        print(f"note: could not keep to core {core} ({e}); running unpinned", file=sys.stderr)


WORKER_STARTUP_S = 10.0  # a worker that exits sooner failed to start: the supervisor stops
WORKER_RESTARTS_PER_MIN = 5  # more exits than this in a minute: the supervisor stops


def supervise(args, argv: list[str]) -> int:
    """`--workers N` (N > 1): N `python -m server` processes on one port (SO_REUSEPORT), each
    with its own interpreter; stops them all on Ctrl-C/SIGTERM, or when one fails within
    WORKER_STARTUP_S of starting or more than WORKER_RESTARTS_PER_MIN exit in a minute; a
    worker that dies after it has served for a while (killed, out of memory) is replaced."""
    problem = port_problem(args.host, args.port)
    if problem:
        print(problem, file=sys.stderr)
        return EXIT_USAGE
    child = [a for i, a in enumerate(argv) if a != "--workers" and (i == 0 or argv[i - 1] != "--workers")
             and not a.startswith("--workers=")]
    threads = args.model_threads or max(1, usable_cores() // args.workers)
    cmd = [sys.executable, "-m", "server", *child, "--workers", "1", "--reuse-port", "--model-threads", str(threads)]
    cores = worker_cores(args.workers) if args.pin_cores and threads == 1 else [None] * args.workers
    def start(core):
        return subprocess.Popen(cmd + ([] if core is None else ["--cpu", str(core)])), time.monotonic()
    procs, started = map(list, zip(*(start(core) for core in cores)))
    restarts: list[float] = []  # when workers were restarted (the last minute's count is capped)
    stop = {"signal": False}

    def on_signal(signum, frame):
        stop["signal"] = True
    signal.signal(signal.SIGTERM, on_signal)
    print(f"serving on http://{args.host}:{args.port}/ with {args.workers} worker processes "
          f"({threads} interpreter thread{'s' * (threads != 1)} each"
          f"{', each kept to its own core' if cores[0] is not None else ''})", flush=True)
    status = EXIT_OK
    try:
        while not stop["signal"]:
            done = [i for i, p in enumerate(procs) if p.poll() is not None]
            now = time.monotonic()
            restarts = [t for t in restarts if now - t < 60]
            if any(now - started[i] < WORKER_STARTUP_S for i in done):  # it would fail again: stop
                status = next((procs[i].returncode for i in done if procs[i].returncode), EXIT_OK)
                status = status if status >= 0 else EXIT_FAILED  # killed by a signal
                break
            if len(restarts) + len(done) > WORKER_RESTARTS_PER_MIN:
                print(f"error: more than {WORKER_RESTARTS_PER_MIN} worker processes exited within a minute; "
                      "stopping (run the server under a service manager that restarts it, e.g. systemd's "
                      "Restart=on-failure)", file=sys.stderr, flush=True)
                status = EXIT_FAILED
                break
            for i in done:  # a worker that ran for a while and died (killed, out of memory): replace it
                print(f"worker process {procs[i].pid} exited with status {procs[i].returncode}; starting another",
                      file=sys.stderr, flush=True)
                procs[i], started[i] = start(cores[i])
                restarts.append(now)
            time.sleep(0.2)
    except KeyboardInterrupt:
        pass
    for p in procs:
        if p.poll() is None:
            p.terminate()  # SIGTERM: a worker started from a background job ignores SIGINT
    for p in procs:
        try:
            p.wait(timeout=10)
        except subprocess.TimeoutExpired:
            p.kill()
    return status


M_ARENA_MAX = -8  # glibc's mallopt parameter
MALLOC_ARENAS = 1  # malloc arenas per server process (2 still kept 457 MB after those uploads)


def limit_malloc_arenas(arenas: int = MALLOC_ARENAS) -> bool:
    """glibc gives threads that allocate at once their own malloc arenas and keeps the freed memory
    of each: four waitress threads that had each decoded a 49 Mpx upload in turn held 1.6 GB, for
    good (with one arena: 77 MB). Called before any thread starts; False where it does not apply
    (not glibc)."""
    try:
        import ctypes
        return bool(ctypes.CDLL("libc.so.6").mallopt(M_ARENA_MAX, arenas))
    except (OSError, AttributeError):
        return False


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    if args.workers > 1 and not multi_process_ok():
        print("error: --workers above 1 needs Linux (SO_REUSEPORT); run several instances behind a reverse "
              "proxy instead", file=sys.stderr)
        return EXIT_USAGE
    if args.model_threads is None:
        args.model_threads = max(1, usable_cores() // args.workers)
    if args.threads is None:
        args.threads = default_threads(args)
    keep_to_core(args.cpu)  # before the interpreter and waitress start their threads
    limit_malloc_arenas()
    try:
        from .app import create_app
        from .serving import ServeOptions, make_server
    except ImportError as e:
        print(f"error: the server needs {e.name}: from a checkout, pip install -r requirements.txt "
              "or pip install '.[server]'", file=sys.stderr)
        return EXIT_USAGE
    max_upload = int(args.max_upload_mb * 1024 * 1024)
    try:
        app = create_app({"MODEL_PATH": str(args.model), "NUM_THREADS": args.model_threads,
                          "MAX_CONTENT_LENGTH": max_upload, "TTA": args.tta})
    except (SidecarError, ValueError, ImportError) as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_USAGE
    if args.workers > 1 and not args.debug:  # the model and flags are valid: start the worker processes
        del app
        return supervise(args, argv)
    if args.debug:
        print(f"serving {Path(args.model).name} on http://{args.host}:{args.port}/ (Flask debug server)", flush=True)
        app.run(host=args.host, port=args.port, debug=True, use_reloader=False)
        return EXIT_OK
    options = ServeOptions(host=args.host, port=args.port, threads=args.threads, max_upload_bytes=max_upload,
                           request_grace_s=args.client_grace, reuse_port=args.reuse_port)
    try:
        server = make_server(app, options)
    except OSError as e:
        why = {errno.EADDRINUSE: "is already in use", errno.EACCES: "needs more privileges",
               errno.EADDRNOTAVAIL: "is not an address of this machine"}.get(e.errno, f"cannot be used ({e.strerror})")
        print(f"error: {args.host}:{args.port} {why}; pick another with --host/--port", file=sys.stderr)
        return EXIT_USAGE
    print(f"serving {Path(args.model).name} on http://{args.host}:{args.port}/ "
          f"(waitress, {args.threads} thread{'s' * (args.threads != 1)}"
          f"{', worker process ' + str(os.getpid()) if args.reuse_port else ''})",
          flush=True)
    # SIGTERM (the supervisor, systemd, docker stop, the load test) stops it like Ctrl-C does; a
    # process started in the background by a shell has SIGINT ignored, so SIGTERM is the one to use
    signal.signal(signal.SIGTERM, _interrupt)
    # what start-up built (Flask, numpy, the model's metadata) stays for the process's life: move it
    # out of the collector's reach, so its full collections under load walk only what requests make
    gc.collect()  # start-up's garbage first: frozen, it would stay for good
    gc.freeze()
    try:
        server.run()
    except KeyboardInterrupt:
        pass
    return EXIT_OK


def _interrupt(signum, frame):
    raise KeyboardInterrupt


if __name__ == "__main__":
    sys.exit(main())
