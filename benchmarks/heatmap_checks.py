"""Sanity checks of the melanoma activation maps (Adebayo et al. 2018 style).

    python -m benchmarks.heatmap_checks [--model models/efficientnet_lite0_int8.tflite] [--limit 0]

1. Randomisation: the map computed with randomised head weights should look nothing like the
   real one (Spearman-free: Pearson correlation of the two 0..1 maps, mean over images).
2. Occlusion: greying out the hottest cell neighbourhood of the map (a square of the same size
   as one map cell x 2) lowers the melanoma score more than greying out a random square of the
   same size, on average over the melanomas of the model's test split.
Written to reports/heatmap_checks.json.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

from edge.gate import activation_map, normalised
from edge.preprocess import finish, resized_array
from edge.scores import melanoma_score


def _score(clf, x: np.ndarray) -> float:
    y, _ = clf.predict_scores(finish(x, clf.spec))
    return float(melanoma_score(y[None], clf.rule)[0])


def _occluded(x: np.ndarray, cy: int, cx: int, side: int) -> np.ndarray:
    out = x.copy()
    y0, x0 = max(0, cy - side // 2), max(0, cx - side // 2)
    out[y0:y0 + side, x0:x0 + side] = x.reshape(-1, 3).mean(axis=0)  # the image's mean colour
    return out


def occlusion_drops(clf, paths, seed: int = 0) -> tuple[list[float], list[float]]:
    """(score drops when the hottest square is occluded, drops for a random square), per image."""
    rng = np.random.default_rng(seed)
    hot, rand = [], []
    for p in paths:
        x = resized_array(p, clf.spec)
        outs, _ = clf.predict_outputs(finish(x, clf.spec))
        cam = activation_map(outs["feature_map"], clf.head_kernel, 0)
        h, w = x.shape[:2]
        cells = cam.shape[0]
        side = 2 * h // cells
        iy, ix = np.unravel_index(int(np.argmax(cam)), cam.shape)
        base = _score(clf, x)
        hot.append(base - _score(clf, _occluded(x, int((iy + 0.5) * h / cells), int((ix + 0.5) * w / cells), side)))
        rand.append(base - _score(clf, _occluded(x, int(rng.integers(side // 2, h - side // 2)),
                                                 int(rng.integers(side // 2, w - side // 2)), side)))
    return hot, rand


def randomisation_similarity(clf, paths, seed: int = 0) -> list[float]:
    """|Pearson correlation| of the real melanoma map and the map of a randomised head, per image."""
    rng = np.random.default_rng(seed)
    random_kernel = rng.normal(0, clf.head_kernel.std(), clf.head_kernel.shape)
    out = []
    for p in paths:
        outs, _ = clf.predict_outputs(finish(resized_array(p, clf.spec), clf.spec))
        real = normalised(activation_map(outs["feature_map"], clf.head_kernel, 0)).ravel()
        rand = normalised(activation_map(outs["feature_map"], random_kernel, 0)).ravel()
        out.append(float(abs(np.corrcoef(real, rand)[0, 1])) if real.std() and rand.std() else 0.0)
    return out


def main(argv=None) -> int:
    from edge import Classifier
    from edge.runner import DEFAULT_MODEL
    ap = argparse.ArgumentParser(prog="python -m benchmarks.heatmap_checks", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", type=Path, default=DEFAULT_MODEL)
    ap.add_argument("--limit", type=int, default=0, help="melanomas of the test split to use (0: all)")
    ap.add_argument("--out", type=Path, default=Path(__file__).resolve().parent.parent / "reports")
    args = ap.parse_args(argv)
    from train.rundir import load_sidecar_data
    clf = Classifier(args.model, num_threads=2, refuse=False)
    if clf.head_kernel is None:
        print(f"error: {args.model.name} has no activation-map outputs", file=sys.stderr)
        return 2
    rows, _, _ = load_sidecar_data(args.model)
    mel = rows[(rows["split"] == "test") & (rows["target"] == 1)]
    if args.limit:
        mel = mel.head(args.limit)
    hot, rand = occlusion_drops(clf, list(mel["path"]))
    test = rows[rows["split"] == "test"]
    sim = randomisation_similarity(clf, list(test["path"].head(200)))
    hot, rand = np.asarray(hot), np.asarray(rand)
    diff = hot - rand
    boot = np.random.default_rng(0)
    ci = np.quantile([boot.choice(diff, len(diff)).mean() for _ in range(1000)], [0.025, 0.975])
    report = {"model": args.model.name, "melanomas": int(len(hot)),
              "occlusion": {"hottest_mean_drop": float(hot.mean()), "random_mean_drop": float(rand.mean()),
                            "difference_mean": float(diff.mean()), "difference_ci95": [float(v) for v in ci],
                            "hottest_beats_random_share": float(np.mean(diff > 0))},
              "randomised_head": {"images": len(sim), "mean_abs_correlation": float(np.mean(sim)),
                                  "max_abs_correlation": float(np.max(sim))}}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "heatmap_checks.json").write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
