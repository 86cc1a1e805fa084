"""`python -m server`: serve the upload form and JSON API with waitress (production WSGI)."""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from edge import DEFAULT_MODEL, SidecarError


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="python -m server", description=(
        "Melanoma screening aid: upload form and JSON API on the shipped .tflite model "
        "(research use, not a diagnosis)."))
    ap.add_argument("--host", default="127.0.0.1", help="bind address (default 127.0.0.1; 0.0.0.0 for the LAN)")
    ap.add_argument("--port", type=int, default=8000, help="port (default 8000)")
    ap.add_argument("--threads", type=int, default=4, help="waitress worker threads (default 4)")
    ap.add_argument("--model", type=Path, default=DEFAULT_MODEL, help=f"model file (default {DEFAULT_MODEL.name})")
    ap.add_argument("--model-threads", type=int, default=2, help="TFLite interpreter threads (default 2)")
    ap.add_argument("--max-upload-mb", type=float, default=10, help="upload size limit (default 10 MB)")
    ap.add_argument("--debug", action="store_true", help="Flask's development server with debug (never in production)")
    return ap


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    from . import create_app
    try:
        app = create_app({"MODEL_PATH": str(args.model), "NUM_THREADS": args.model_threads,
                          "MAX_CONTENT_LENGTH": int(args.max_upload_mb * 1024 * 1024)})
    except (SidecarError, ValueError, ImportError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"serving {Path(args.model).name} on http://{args.host}:{args.port}/ "
          f"({'Flask debug server' if args.debug else f'waitress, {args.threads} threads'})", flush=True)
    if args.debug:
        app.run(host=args.host, port=args.port, debug=True, use_reloader=False)
    else:
        import waitress
        waitress.serve(app, host=args.host, port=args.port, threads=args.threads, ident="melanoma-screen")
    return 0


if __name__ == "__main__":
    sys.exit(main())
