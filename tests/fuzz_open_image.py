"""Fuzz the bounded decoder with hypothesis: `python -m tests.fuzz_open_image --minutes 10`.

Inputs are valid files of every allowed format (and a few refused ones) with hypothesis-chosen
damage: byte overwrites, insertions, deletions, truncation and splices, plus raw random bytes.
The property: `preprocess` returns a (224, 224, 3) float32 array in 0..255, or raises
`ImageError`; nothing else, and no input takes more than `SLOW_S` seconds. A short run of the
same property is part of the test suite (tests/test_preprocess.py).
"""
from __future__ import annotations

import argparse
import sys
import time

import numpy as np
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from edge.preprocess import ImageError, PreprocessSpec, preprocess

from .hostile import lesion, save, valid_files

SLOW_S = 2.0
SPEC = PreprocessSpec()


def seeds() -> list[bytes]:
    extra = [save(lesion(20, size=(40, 30)).convert(m), f) for m, f in
             (("P", "PNG"), ("I;16", "PNG"), ("CMYK", "TIFF"), ("F", "TIFF"), ("RGBA", "WEBP"), ("1", "BMP"),
              ("RGB", "GIF"), ("RGB", "PCX"))]
    return [v for k, v in sorted(valid_files().items()) if "large" not in k] + extra


SEEDS = seeds()
edit = st.tuples(st.sampled_from(["set", "insert", "delete", "splice"]), st.floats(0, 1),
                 st.binary(min_size=1, max_size=64), st.integers(0, len(SEEDS) - 1))


@st.composite
def damaged_files(draw) -> bytes:
    if draw(st.integers(0, 19)) == 0:
        return draw(st.binary(max_size=2048))
    data = bytearray(SEEDS[draw(st.integers(0, len(SEEDS) - 1))])
    for op, where, blob, other in draw(st.lists(edit, min_size=1, max_size=8)):
        pos = int(where * (len(data) - 1)) if data else 0
        if op == "set":
            data[pos:pos + len(blob)] = blob
        elif op == "insert":
            data[pos:pos] = blob
        elif op == "delete":
            del data[pos:pos + len(blob) * 8]
        else:
            donor = SEEDS[other]
            data[pos:] = donor[int(where * (len(donor) - 1)):]
    if draw(st.booleans()):
        data = data[:draw(st.integers(0, len(data)))]
    return bytes(data)


def check(data: bytes) -> None:
    """The property every input must satisfy."""
    t0 = time.perf_counter()
    try:
        x = preprocess(data, SPEC)
    except ImageError:
        pass
    else:
        assert x.shape == (224, 224, 3) and x.dtype == np.float32
        assert 0 <= float(x.min()) and float(x.max()) <= 255
    assert time.perf_counter() - t0 < SLOW_S, f"slow input ({time.perf_counter() - t0:.1f} s)"


def fuzz(examples: int, seed: int | None = None):
    """A hypothesis test over `examples` inputs (shrinks and raises on the first failure)."""
    @settings(max_examples=examples, deadline=None, database=None, derandomize=seed is not None,
              suppress_health_check=list(HealthCheck))
    @given(damaged_files())
    def run(data):
        check(data)
    run()


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m tests.fuzz_open_image", description=__doc__.splitlines()[0])
    ap.add_argument("--minutes", type=float, default=10.0, help="how long to fuzz (default 10)")
    ap.add_argument("--batch", type=int, default=2000, help="inputs per hypothesis run (default 2000)")
    args = ap.parse_args(argv)
    deadline, tried, t0 = time.monotonic() + args.minutes * 60, 0, time.monotonic()
    while time.monotonic() < deadline:
        fuzz(args.batch)  # each batch draws fresh random inputs; a failure raises with the shrunk input
        tried += args.batch
        print(f"{tried} inputs, {time.monotonic() - t0:.0f} s, no failure", flush=True)
    print(f"done: {tried} inputs in {time.monotonic() - t0:.0f} s, 0 failures")
    return 0


if __name__ == "__main__":
    sys.exit(main())
