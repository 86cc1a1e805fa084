"""`python -m server`: serve the upload form and JSON API with waitress (production WSGI)."""
from __future__ import annotations

import argparse
import errno
import sys
from pathlib import Path

from edge import DEFAULT_MODEL, SidecarError

EXIT_OK, EXIT_USAGE = 0, 2


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


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="python -m server", description=(
        "Melanoma screening aid: upload form and JSON API on the shipped .tflite model "
        "(research use, not a diagnosis). Exit status: 0 after a clean stop, 2 for bad usage "
        "(bad flag, missing or mismatched model, port in use)."))
    ap.add_argument("--host", default="127.0.0.1", help="bind address (default 127.0.0.1; 0.0.0.0 for the LAN)")
    ap.add_argument("--port", type=port_number, default=8000, help="port, 1-65535 (default 8000)")
    ap.add_argument("--threads", type=positive(int), default=4, help="waitress worker threads (default 4)")
    ap.add_argument("--model", type=Path, default=DEFAULT_MODEL, help=f"model file (default {DEFAULT_MODEL.name})")
    ap.add_argument("--model-threads", type=positive(int), default=2, help="TFLite interpreter threads (default 2)")
    ap.add_argument("--max-upload-mb", type=positive(float), default=10, help="upload size limit (default 10 MB)")
    ap.add_argument("--client-grace", type=positive(float), default=10.0, help=(
        "seconds any request may take to start arriving; after that each such window must bring "
        "2 KB/s or the client is disconnected (and no request may take over 120 s), so slow or "
        "stalled clients cannot hold connections (default 10)"))
    ap.add_argument("--tta", action="store_true", help=(
        "test-time augmentation: average 8 flips/rotations per upload (8x the inference time)"))
    ap.add_argument("--debug", action="store_true", help="Flask's development server with debug (never in production)")
    return ap


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
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
    if args.debug:
        print(f"serving {Path(args.model).name} on http://{args.host}:{args.port}/ (Flask debug server)", flush=True)
        app.run(host=args.host, port=args.port, debug=True, use_reloader=False)
        return EXIT_OK
    options = ServeOptions(host=args.host, port=args.port, threads=args.threads, max_upload_bytes=max_upload,
                           request_grace_s=args.client_grace)
    try:
        server = make_server(app, options)
    except OSError as e:
        why = {errno.EADDRINUSE: "is already in use", errno.EACCES: "needs more privileges",
               errno.EADDRNOTAVAIL: "is not an address of this machine"}.get(e.errno, f"cannot be used ({e.strerror})")
        print(f"error: {args.host}:{args.port} {why}; pick another with --host/--port", file=sys.stderr)
        return EXIT_USAGE
    print(f"serving {Path(args.model).name} on http://{args.host}:{args.port}/ "
          f"(waitress, {args.threads} threads)", flush=True)
    try:
        server.run()
    except KeyboardInterrupt:
        pass
    return EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
