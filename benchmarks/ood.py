"""An out-of-distribution set built from what installs offline, and the refusal gate measured on it.

    python -m benchmarks ood [--model models/efficientnet_lite0_int8.tflite] [--per-category 40]

Categories (all generated in memory, seeded; nothing is downloaded or written but the report):
  natural_photos   the photos bundled with scikit-image (`skimage.data`): astronaut, cat, coffee,
                   rocket, coins, horse, microscopy, ..., whole and as random crops
  documents        rendered text pages and the scanned page/text samples of skimage.data
  screenshots      drawn user interfaces: title bars, buttons, text fields, lists
  faces_hands      face crops of skimage's astronaut photo, drawn faces and hands in skin tones
  frames           blank, noise, gradient and stripe frames
  skin_closeups    non-dermoscopic skin: smooth skin-tone patches with pores, hair and shading,
                   without a lesion

Every image goes through the real path (`Classifier.classify` on JPEG bytes). Reported: per
category, the share refused (by the gate and by the quality checks), and the AUROC of the gate
score against the lesions of the model's own test split (needs ../shared/data); the false-refusal
rate on that test split, per source. Written to reports/ood.{json,md}.
"""
from __future__ import annotations

import io
import json
import time
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

CATEGORIES = ("natural_photos", "documents", "screenshots", "faces_hands", "frames", "skin_closeups")
SKIMAGE_PHOTOS = ("astronaut", "camera", "coffee", "chelsea", "rocket", "coins", "moon", "horse", "clock",
                  "hubble_deep_field", "immunohistochemistry", "retina", "cell",
                  "grass", "gravel", "brick", "colorwheel", "logo", "binary_blobs", "microaneurysms")
SKIN_TONES = [(241, 194, 167), (224, 172, 138), (198, 134, 103), (161, 102, 74), (112, 68, 48), (80, 50, 35)]


def _jpeg(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.convert("RGB").save(buf, "JPEG", quality=90)
    return buf.getvalue()


def _rgb(a: np.ndarray) -> Image.Image:
    a = np.asarray(a)
    if a.dtype != np.uint8:
        a = np.clip(a * (255 if a.max() <= 1.0 else 1), 0, 255).astype(np.uint8)
    if a.ndim == 2:
        a = np.stack([a] * 3, axis=-1)
    return Image.fromarray(a[..., :3])


def _crops(img: Image.Image, rng, n: int) -> list[Image.Image]:
    out = [img]
    w, h = img.size
    for _ in range(n - 1):
        side = int(min(w, h) * rng.uniform(0.35, 0.9))
        x, y = int(rng.integers(0, w - side + 1)), int(rng.integers(0, h - side + 1))
        out.append(img.crop((x, y, x + side, y + side)))
    return out


def natural_photos(rng, n: int) -> list[Image.Image]:
    import skimage.data as data
    photos = []
    for name in SKIMAGE_PHOTOS:
        fn = getattr(data, name, None)
        if fn is None:
            continue
        try:
            photos.append(_rgb(fn()))
        except Exception:  # a sample that needs a download (pooch) or is missing: skip it
            continue
    out = []
    per = max(1, -(-n // max(1, len(photos))))
    for p in photos:
        out.extend(_crops(p, rng, per))
    return out[:n]


def _text_lines(rng, k: int) -> list[str]:
    words = ("the patient was seen in clinic today results of the examination are attached please review "
             "invoice total amount due payment reference meeting agenda minutes action items report summary").split()
    return [" ".join(rng.choice(words, size=int(rng.integers(4, 12)))) for _ in range(k)]


def documents(rng, n: int) -> list[Image.Image]:
    import skimage.data as data
    out = []
    for name in ("page", "text"):
        try:
            out.extend(_crops(_rgb(getattr(data, name)()), rng, 3))
        except Exception:
            pass
    while len(out) < n:
        w, h = int(rng.integers(400, 900)), int(rng.integers(500, 1100))
        bg = tuple(int(v) for v in rng.integers(225, 256, 3))
        img = Image.new("RGB", (w, h), bg)
        d = ImageDraw.Draw(img)
        y = 20
        size = int(rng.integers(10, 28))
        for line in _text_lines(rng, 60):
            d.text((20, y), line, fill=tuple(int(v) for v in rng.integers(0, 80, 3)), font_size=size)
            y += int(size * 1.5)
            if y > h - 20:
                break
        out.append(img)
    return out[:n]


def screenshots(rng, n: int) -> list[Image.Image]:
    out = []
    for _ in range(n):
        w, h = int(rng.integers(600, 1200)), int(rng.integers(400, 800))
        dark = rng.random() < 0.3
        img = Image.new("RGB", (w, h), (32, 33, 36) if dark else (245, 246, 248))
        d = ImageDraw.Draw(img)
        accent = tuple(int(v) for v in rng.integers(30, 220, 3))
        d.rectangle((0, 0, w, 40), fill=accent)
        d.text((12, 10), "Settings - Account", fill=(255, 255, 255), font_size=18)
        y = 60
        while y < h - 60:
            kind = rng.integers(0, 3)
            if kind == 0:  # a button
                d.rounded_rectangle((20, y, 180, y + 36), 8, fill=accent)
                d.text((36, y + 8), "Continue", fill=(255, 255, 255), font_size=16)
            elif kind == 1:  # a text field
                d.rectangle((20, y, w - 40, y + 32), outline=(150, 150, 150), fill=(255, 255, 255))
                d.text((28, y + 7), "user@example.org", fill=(60, 60, 60), font_size=15)
            else:  # a list row
                d.text((20, y + 6), _text_lines(rng, 1)[0], fill=(200, 200, 200) if dark else (40, 40, 40), font_size=15)
                d.line((20, y + 34, w - 20, y + 34), fill=(200, 200, 200))
            y += 48
        out.append(img)
    return out


def faces_hands(rng, n: int) -> list[Image.Image]:
    out = []
    try:
        import skimage.data as data
        astro = _rgb(data.astronaut())
        for box in [(150, 40, 330, 240), (170, 60, 300, 210), (130, 20, 360, 280)]:
            out.append(astro.crop(box))
    except Exception:
        pass
    while len(out) < n:
        w = int(rng.integers(300, 600))
        bg = tuple(int(v) for v in rng.integers(60, 240, 3))
        img = Image.new("RGB", (w, w), bg)
        d = ImageDraw.Draw(img)
        tone = SKIN_TONES[int(rng.integers(0, len(SKIN_TONES)))]
        if rng.random() < 0.5:  # a face
            d.ellipse((w * .2, w * .12, w * .8, w * .9), fill=tone)
            for ex in (.38, .62):
                d.ellipse((w * ex - w * .05, w * .4, w * ex + w * .05, w * .47), fill=(255, 255, 255))
                d.ellipse((w * ex - w * .02, w * .415, w * ex + w * .02, w * .455), fill=(40, 30, 20))
            d.arc((w * .38, w * .55, w * .62, w * .72), 20, 160, fill=(150, 60, 60), width=max(2, w // 80))
            d.ellipse((w * .2, w * .05, w * .8, w * .3), fill=tuple(int(v) for v in rng.integers(20, 120, 3)))
        else:  # a hand: palm and five fingers
            d.rounded_rectangle((w * .3, w * .45, w * .7, w * .9), int(w * .08), fill=tone)
            for i, fx in enumerate((.31, .4, .49, .58)):
                d.rounded_rectangle((w * fx, w * (.12 + .03 * abs(i - 1.5)), w * (fx + .08), w * .5), int(w * .04), fill=tone)
            d.rounded_rectangle((w * .62, w * .5, w * .85, w * .6), int(w * .04), fill=tone)
        out.append(img.filter(ImageFilter.GaussianBlur(1)))
    return out[:n]


def frames(rng, n: int) -> list[Image.Image]:
    out = []
    s = 300
    yy, xx = np.mgrid[0:s, 0:s] / s
    for i in range(n):
        kind = i % 5
        c = rng.integers(0, 256, 3)
        if kind == 0:
            a = np.broadcast_to(c, (s, s, 3))
        elif kind == 1:
            a = rng.integers(0, 256, (s, s, 3))
        elif kind == 2:
            a = np.stack([xx * c[0], yy * c[1], (1 - xx) * c[2]], axis=-1)
        elif kind == 3:
            a = np.stack([(np.sin(xx * rng.uniform(5, 40)) > 0) * c[k] for k in range(3)], axis=-1)
        else:
            a = np.clip(c + rng.normal(0, 6, (s, s, 3)), 0, 255)
        out.append(Image.fromarray(np.asarray(a, dtype=np.uint8)))
    return out


def skin_closeups(rng, n: int) -> list[Image.Image]:
    out = []
    s = 320
    yy, xx = np.mgrid[0:s, 0:s] / s
    for _ in range(n):
        tone = np.array(SKIN_TONES[int(rng.integers(0, len(SKIN_TONES)))], dtype=np.float64)
        shade = 0.85 + 0.2 * (xx * rng.uniform(-1, 1) + yy * rng.uniform(-1, 1))
        texture = np.asarray(Image.fromarray(rng.integers(0, 255, (s // 8, s // 8), dtype=np.uint8))
                             .resize((s, s), Image.Resampling.BICUBIC), dtype=np.float64) / 255 - 0.5
        a = tone[None, None] * shade[..., None] * (1 + 0.08 * texture[..., None])
        pores = rng.random((s, s)) < 0.004
        a[pores] *= 0.8
        img = Image.fromarray(np.clip(a, 0, 255).astype(np.uint8))
        d = ImageDraw.Draw(img)
        for _ in range(int(rng.integers(0, 25))):  # hairs
            x0, y0 = rng.integers(0, s, 2)
            d.line((int(x0), int(y0), int(x0 + rng.integers(-60, 60)), int(y0 + rng.integers(-60, 60))),
                   fill=(60, 40, 30), width=1)
        out.append(img.filter(ImageFilter.GaussianBlur(0.6)))
    return out


BUILDERS = {"natural_photos": natural_photos, "documents": documents, "screenshots": screenshots,
            "faces_hands": faces_hands, "frames": frames, "skin_closeups": skin_closeups}


def build(per_category: int = 40, seed: int = 0) -> dict[str, list[bytes]]:
    """{category: [JPEG bytes]}: the out-of-distribution set, the same for a seed."""
    return {c: [_jpeg(img) for img in BUILDERS[c](np.random.default_rng([seed, i]), per_category)]
            for i, c in enumerate(CATEGORIES)}


def auroc(in_scores, out_scores) -> float | None:
    """P(score of an OOD image > score of a lesion), ties counted half."""
    a, b = np.asarray(in_scores, float), np.asarray(out_scores, float)
    if not len(a) or not len(b):
        return None
    allv = np.concatenate([a, b])
    ranks = allv.argsort().argsort().astype(float) + 1
    # average ranks for ties
    _, inv, counts = np.unique(allv, return_inverse=True, return_counts=True)
    sums = np.bincount(inv, weights=ranks)
    ranks = (sums / counts)[inv]
    return float((ranks[len(a):].sum() - len(b) * (len(b) + 1) / 2) / (len(a) * len(b)))


def measure(model: Path, per_category: int = 40, seed: int = 0, test_limit: int = 0, threads: int = 2) -> dict:
    from edge import Classifier, read_sidecar
    clf = Classifier(model, num_threads=threads)
    if clf.gate is None:
        raise ValueError(f"{Path(model).name} has no refusal gate in its sidecar (re-export it with python -m quantize)")
    t0 = time.time()
    ood = build(per_category, seed)
    report = {"model": Path(model).name, "gate_threshold": clf.gate.threshold, "per_category": per_category,
              "seed": seed, "categories": {}}
    lesion_scores = test_lesions(clf, model, test_limit, report)
    all_out = []
    for cat, images in ood.items():
        preds = [clf.classify(b) for b in images]
        scores = [ood_score(clf, b) for b in images]
        all_out += scores
        codes = [p.refusal for p in preds if p.refused]
        flagged = sum(1 for p in preds if not p.refused and p.melanoma)
        report["categories"][cat] = {
            "n": len(images), "refused": len(codes) / len(images),
            "refused_by": {c: codes.count(c) for c in sorted(set(codes))},
            "answered_flagged_melanoma": flagged,
            "auroc_vs_test_lesions": auroc(lesion_scores, scores) if lesion_scores is not None else None}
    n_all = sum(c["n"] for c in report["categories"].values())
    report["all"] = {"n": n_all,
                     "refused": sum(c["refused"] * c["n"] for c in report["categories"].values()) / n_all,
                     "auroc_vs_test_lesions": auroc(lesion_scores, all_out) if lesion_scores is not None else None}
    report["seconds"] = round(time.time() - t0, 1)
    report["sidecar_refusals"] = read_sidecar(model).get("metrics", {}).get("refusals")
    return report


def ood_score(clf, data: bytes) -> float:
    """The gate score of an image whatever the quality checks say (for the AUROC)."""
    from edge.preprocess import preprocess
    outs, _ = clf.predict_outputs(preprocess(data, clf.spec))
    return clf.gate.score(outs["embedding"])


def test_lesions(clf, model: Path, limit: int, report: dict) -> list[float] | None:
    """Gate scores of the model's own test split, and its false refusals per source."""
    try:
        from train.rundir import load_sidecar_data
        rows, _, _ = load_sidecar_data(model)
    except Exception as e:  # no data folder, or no training stack: OOD figures only
        report["test_split"] = {"skipped": f"{type(e).__name__}: {e}"}
        return None
    rows = rows[rows["split"] == "test"]
    if limit:
        rows = rows.sample(n=min(limit, len(rows)), random_state=0)
    scores, refused = [], {}
    for path, source in zip(rows["path"], rows["source"]):
        data = Path(path).read_bytes()
        p = clf.classify(data)
        scores.append(ood_score(clf, data))
        r = refused.setdefault(source, [0, 0, {}])
        r[0] += 1
        if p.refused:
            r[1] += 1
            r[2][p.refusal] = r[2].get(p.refusal, 0) + 1
    total = sum(v[0] for v in refused.values())
    report["test_split"] = {"n": total, "refused": sum(v[1] for v in refused.values()) / max(1, total),
                            "by_source": {s: {"n": v[0], "refused": v[1] / v[0], "refused_by": v[2]}
                                          for s, v in sorted(refused.items())}}
    return scores


def to_markdown(r: dict) -> str:
    f = lambda x: "-" if x is None else f"{x:.3f}"  # noqa: E731
    lines = [f"# Refusal gate on an out-of-distribution set: {r['model']}", "",
             f"Generated by `python -m benchmarks ood` ({r['per_category']} images per category, seed {r['seed']}); "
             f"gate threshold {r['gate_threshold']:.3f} (chosen on validation).", "",
             "| category | images | refused | refused by | answered and flagged melanoma | AUROC vs test lesions |",
             "|---|---|---|---|---|---|"]
    for c, m in r["categories"].items():
        lines.append(f"| {c} | {m['n']} | {m['refused']:.1%} | {m['refused_by']} | {m['answered_flagged_melanoma']} | "
                     f"{f(m['auroc_vs_test_lesions'])} |")
    lines.append(f"| **all** | {r['all']['n']} | {r['all']['refused']:.1%} | | | {f(r['all']['auroc_vs_test_lesions'])} |")
    t = r.get("test_split", {})
    lines += ["", "False refusals of real lesions (the model's own test split):", ""]
    if "by_source" in t:
        lines += ["| source | images | refused | refused by |", "|---|---|---|---|"]
        for s, m in t["by_source"].items():
            lines.append(f"| {s} | {m['n']} | {m['refused']:.1%} | {m['refused_by']} |")
        lines.append(f"| **all** | {t['n']} | {t['refused']:.1%} | |")
    else:
        lines.append(f"skipped: {t.get('skipped')}")
    return "\n".join(lines) + "\n"


def write(report: dict, out_dir: Path) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "ood.json").write_text(json.dumps(report, indent=2))
    (out_dir / "ood.md").write_text(to_markdown(report))
