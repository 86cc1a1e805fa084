"""Prove the edge runner on arm64: Debian bookworm (Raspberry Pi OS 64-bit's base, Python 3.11)
under qemu-user-static, with requirements-edge.txt's aarch64 wheels and no TensorFlow.

    python -m benchmarks arm64 [--model models/efficientnet_lite0_int8.tflite] [--images DIR]

Steps: (1) debootstrap an arm64 bookworm userland (minbase + python3.11, unpacked with
--foreign: no binfmt registration is needed because the emulator is invoked directly);
(2) install requirements-edge.txt's aarch64 wheels into it with the host's pip
(--platform manylinux aarch64, binary wheels only); (3) run `python -m edge predict --json`
under qemu-aarch64-static; (4) compare each probability with the x86 run of the same command:
equal within one output quantization step for int8 models, 1e-4 for float models. Writes a
JSON report and exits 0 on pass, 1 on fail, 2 when the environment cannot be built.
Needs root (debootstrap), Debian's debootstrap and qemu-user-static packages.
"""
from __future__ import annotations

import json
import os
import platform
import shutil
import subprocess
import sys
import time
from pathlib import Path

from edge.runner import DEFAULT_MODEL

from .measure import REPO

MIRROR = "http://deb.debian.org/debian"
DEFAULT_ROOT = Path.home() / ".cache" / "melanoma-screen" / "arm64-bookworm"
SITE = "opt/edge-site"  # where the aarch64 wheels go inside the userland


def build_userland(root: Path, log) -> None:
    """debootstrap --foreign: unpacks arm64 packages without running any arm64 code."""
    if (root / "usr" / "bin" / "python3.11").exists():
        log(f"reusing {root}")
        return
    root.mkdir(parents=True, exist_ok=True)
    cmd = ["debootstrap", "--arch=arm64", "--foreign", "--variant=minbase",
           "--include=python3.11,libpython3.11-stdlib,python3.11-minimal,libexpat1,zlib1g,libffi8,libssl3",
           "bookworm", str(root), MIRROR]
    log(" ".join(cmd))
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
    # --foreign leaves the second stage undone; unpack the few debs it staged but did not extract.
    for deb in sorted((root / "var" / "cache" / "apt" / "archives").glob("*.deb")):
        subprocess.run(["dpkg-deb", "-x", str(deb), str(root)], check=True)


def requirements_for_target(path: Path) -> list[str]:
    """requirements-edge.txt with its environment markers evaluated for Pi OS (aarch64, 3.11):
    pip evaluates markers for the host even when --platform names another machine."""
    from packaging.requirements import Requirement
    target = {"platform_machine": "aarch64", "python_version": "3.11", "python_full_version": "3.11.2",
              "sys_platform": "linux", "platform_system": "Linux", "os_name": "posix"}
    out = []
    for line in path.read_text().splitlines():
        line = line.split("#")[0].strip()
        if line:
            req = Requirement(line)
            if req.marker is None or req.marker.evaluate(target):
                out.append(f"{req.name}{req.specifier}")
    return out


def install_wheels(root: Path, log) -> list[str]:
    site = root / SITE
    reqs = requirements_for_target(REPO / "requirements-edge.txt")
    cmd = [sys.executable, "-m", "pip", "install", "--quiet", "--upgrade", "--target", str(site),
           "--only-binary=:all:", "--python-version", "3.11", "--implementation", "cp",
           "--platform", "manylinux_2_17_aarch64", "--platform", "manylinux2014_aarch64",
           "--platform", "manylinux_2_28_aarch64", *reqs]
    log("installing aarch64 wheels: " + " ".join(reqs))
    subprocess.run(cmd, check=True)
    return reqs


def run_predict(python: list[str], model: Path, images: list[Path], env: dict) -> dict[str, dict]:
    out = subprocess.run(python + ["-m", "edge", "predict", "--json", "--threads", "2", "--model", str(model),
                                   *map(str, images)], capture_output=True, text=True, cwd=REPO,
                         env={**os.environ, **env}, timeout=3600)
    if out.returncode not in (0, 3):
        raise RuntimeError(f"edge predict failed (exit {out.returncode}): {out.stderr.strip()[-500:]}")
    return {json.loads(l)["image"]: json.loads(l) for l in out.stdout.splitlines() if l.startswith("{")}


def compare(x86: dict, arm: dict, tolerance: float) -> dict:
    rows, worst = [], 0.0
    for image, r in x86.items():
        a = arm.get(image, {})
        d = abs(a.get("probability", float("nan")) - r["probability"]) if "probability" in r else 0.0
        worst = max(worst, d) if d == d else float("inf")
        rows.append({"image": Path(image).name, "x86": r.get("probability"), "arm64": a.get("probability"),
                     "abs_diff": d, "same_label": a.get("label") == r.get("label")})
    ok = worst <= tolerance and len(arm) == len(x86) and all(r["same_label"] for r in rows)
    return {"pass": ok, "max_abs_diff": worst, "tolerance": tolerance, "images": rows}


def main(argv=None) -> int:
    import argparse
    from edge import read_sidecar
    ap = argparse.ArgumentParser(prog="python -m benchmarks arm64", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", type=Path, default=DEFAULT_MODEL)
    ap.add_argument("--images", type=Path, nargs="+", default=[REPO / "tests" / "fixtures"])
    ap.add_argument("--root", type=Path, default=DEFAULT_ROOT, help="where the arm64 userland is built")
    ap.add_argument("--report", type=Path, default=REPO / "reports" / "arm64_check.json")
    args = ap.parse_args(argv)
    log = lambda s: print(s, flush=True)  # noqa: E731
    qemu = shutil.which("qemu-aarch64-static")
    if not qemu or not shutil.which("debootstrap"):
        print("error: needs Debian's qemu-user-static and debootstrap (apt-get install qemu-user-static debootstrap)",
              file=sys.stderr)
        return 2
    from edge.__main__ import expand_inputs
    images = expand_inputs([str(p) for p in args.images])
    meta = read_sidecar(args.model)
    q = (meta["output"].get("quantization") or {})
    tolerance = q.get("scale", 0) * 1.0001 if q else 1e-4
    try:
        t0 = time.time()
        build_userland(args.root, log)
        installed = install_wheels(args.root, log)
        setup_s = time.time() - t0
    except (subprocess.CalledProcessError, OSError) as e:
        print(f"error: could not build the arm64 environment: {e}", file=sys.stderr)
        return 2
    env = {"PYTHONPATH": f"{args.root / SITE}:{REPO}", "PYTHONNOUSERSITE": "1"}
    arm_python = [qemu, "-L", str(args.root), str(args.root / "usr" / "bin" / "python3.11")]
    t0 = time.time()
    arch = subprocess.run(arm_python + ["-c", "import platform, sys; print(platform.machine(), sys.version.split()[0])"],
                          capture_output=True, text=True, env={**os.environ, **env}).stdout.strip()
    arm = run_predict(arm_python, args.model, images, env)
    arm_s = time.time() - t0
    x86 = run_predict([sys.executable], args.model, images, {})
    result = compare(x86, arm, tolerance)
    no_tf = subprocess.run(arm_python + ["-c", "import edge, sys; print(any(m.startswith('tensorflow') for m in sys.modules))"],
                           capture_output=True, text=True, env={**os.environ, **env}, cwd=REPO).stdout.strip()
    report = {"generated": time.strftime("%Y-%m-%d %H:%M:%S %Z"), "host": platform.machine(), "emulated": arch,
              "model": args.model.name, "installed_on_arm64": installed, "setup_seconds": round(setup_s), "arm64_predict_seconds": round(arm_s),
              "tensorflow_imported_on_arm64": no_tf, **result}
    args.report.parent.mkdir(parents=True, exist_ok=True)
    args.report.write_text(json.dumps(report, indent=2) + "\n")
    log(f"arm64 ({arch}) vs x86: max |dP| {result['max_abs_diff']:.6f} (tolerance {tolerance:.6f}) over "
        f"{len(result['images'])} images: {'PASS' if result['pass'] else 'FAIL'}; report {args.report}")
    return 0 if result["pass"] else 1
