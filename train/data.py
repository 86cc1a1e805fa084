"""The data layer: read ISIC-style datasets, report bad rows, split by group, cache pixels.

Three layouts, each read from a folder the user names:
  isic_csv       the ISIC 2020 ground-truth CSV layout (image_name, patient_id, lesion_id, ...,
                 target) with `<image_name>.jpg` in `train/` (or beside the CSV). Used by
                 ../shared/data/ham10000, ../shared/data/isic2017 and the official download.
  isic_archive   an `isic image download DIR` export: `metadata.csv` keyed by isic_id, with
                 diagnosis_1..3 (or the older benign_malignant/diagnosis); attribution.txt and
                 licenses/ are recorded for the model card.
  class_folders  benign/ + malignant/ (or melanoma/ + any others), optionally under
                 train/ val/ test/ folders, as in common Kaggle sets.

Every row gets: image, path, target (1 melanoma / 0 not), group, source, split, row, and the
metadata columns the source has. Bad rows are listed in a problems table (source, row,
image, reason); the caller decides to fail or to skip, and the count is always reported.
"""
from __future__ import annotations

import hashlib
import json
import os
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from edge.preprocess import IMAGE_SUFFIXES, PIXELS_VERSION, ImageError, PreprocessSpec, preprocess_uint8

POSITIVE_FOLDERS = {"melanoma", "malignant", "mel"}

# The shared diagnosis taxonomy (HAM10000's seven classes; ISIC 2017's seborrheic keratosis is a
# benign keratosis). Each source's diagnosis text maps onto it; anything else (ISIC 2018 test rows
# without a published diagnosis, "malignant" class folders) is "other/unknown": index -1, left
# out of the diagnosis loss but kept for the melanoma target.
DIAGNOSES = ("melanoma", "nevus", "benign keratosis", "basal cell carcinoma",
             "actinic keratosis / intraepithelial carcinoma", "dermatofibroma", "vascular lesion")
MALIGNANT = ("melanoma", "basal cell carcinoma", "actinic keratosis / intraepithelial carcinoma")
UNKNOWN_DIAGNOSIS = "other/unknown"
_DIAGNOSIS_ALIASES = {
    "melanoma": 0, "mel": 0, "melanoma metastasis": 0,
    "nevus": 1, "nv": 1, "naevus": 1, "benign nevus": 1,
    "benign keratosis": 2, "bkl": 2, "seborrheic keratosis": 2, "solar lentigo": 2,
    "lentigo nos": 2, "lichenoid keratosis": 2, "benign keratosis-like lesions": 2, "pigmented benign keratosis": 2,
    "basal cell carcinoma": 3, "bcc": 3,
    "actinic keratosis/intraepithelial carcinoma": 4, "actinic keratosis": 4, "akiec": 4,
    "squamous cell carcinoma in situ": 4, "intraepithelial carcinoma": 4, "bowen's disease": 4,
    "dermatofibroma": 5, "df": 5,
    "vascular lesion": 6, "vasc": 6, "angioma": 6, "angiokeratoma": 6, "pyogenic granuloma": 6,
}


def diagnosis_index(text, target: int | None = None) -> int:
    """Index in DIAGNOSES of a source's diagnosis text, -1 for other/unknown. A melanoma target
    with no usable diagnosis text is still a melanoma."""
    key = str(text or "").strip().lower()
    if key in _DIAGNOSIS_ALIASES:
        return _DIAGNOSIS_ALIASES[key]
    return 0 if target == 1 else -1


def diagnosis_summary(rows: pd.DataFrame) -> pd.DataFrame:
    """Counts per source x diagnosis (the data check reports how each source mapped)."""
    names = rows["dx"].map(lambda i: DIAGNOSES[i] if i >= 0 else UNKNOWN_DIAGNOSIS)
    return rows.assign(diagnosis_mapped=names).pivot_table(
        index="source", columns="diagnosis_mapped", values="image", aggfunc="count", fill_value=0).reset_index()
SPLITS = ("train", "val", "test")
PROBLEM_COLUMNS = ["source", "row", "image", "reason"]


class DataError(ValueError):
    """A dataset that cannot be used as given; the message lists what is wrong."""


@dataclass
class Dataset:
    rows: pd.DataFrame  # one row per usable image
    problems: pd.DataFrame  # PROBLEM_COLUMNS, one row per rejected input
    provenance: list[dict]  # per source: path, layout, counts, attribution/licences


# --------------------------------------------------------------------------- layouts
def detect_layout(root: Path) -> str:
    root = Path(root)
    if (root / "metadata.csv").is_file():
        return "isic_archive"
    if list(root.glob("*.csv")):
        return "isic_csv"
    sub = {p.name.lower() for p in root.iterdir() if p.is_dir()} if root.is_dir() else set()
    if sub & (POSITIVE_FOLDERS | {"benign"}) or sub & set(SPLITS):
        return "class_folders"
    raise DataError(f"{root}: no metadata.csv, no *.csv and no class folders; cannot tell its layout")


def _find_image(folder: Path, stem: str) -> Path | None:
    for suffix in IMAGE_SUFFIXES:
        p = folder / f"{stem}{suffix}"
        if p.is_file():
            return p
    return None


def _parse_target(value) -> int | None:
    s = str(value).strip().lower()
    if s in ("1", "1.0", "true", "melanoma", "malignant"):
        return 1
    if s in ("0", "0.0", "false", "benign", "not melanoma"):
        return 0
    return None


def _pick_csv(root: Path) -> Path:
    csvs = sorted(root.glob("*.csv"))
    preferred = [p for p in csvs if "groundtruth" in p.name.lower().replace("_", "")] or \
                [p for p in csvs if p.stem in ("train", "metadata")] or csvs
    return preferred[0]


def read_isic_csv(root: Path, source: str) -> pd.DataFrame:
    root = Path(root)
    csv = _pick_csv(root)
    df = pd.read_csv(csv, dtype=str, keep_default_na=False)
    if "image_name" not in df.columns:
        raise DataError(f"{csv}: no image_name column (columns: {list(df.columns)})")
    img_dir = root / "train" if (root / "train").is_dir() else root
    rows = []
    for i, r in enumerate(df.to_dict("records")):
        if "target" in r:
            target = _parse_target(r["target"])
        else:
            target = 1 if r.get("diagnosis", "").lower() == "melanoma" else \
                (0 if r.get("diagnosis") else None)
        rows.append({**r, "image": r["image_name"], "target": target, "row": i + 2,
                     "path": _find_image(img_dir, r["image_name"]), "label_raw": r.get("target", "")})
    out = pd.DataFrame(rows)
    out["source_name"] = source
    return out


def _archive_target(r: dict) -> int | None:
    """Melanoma if any diagnosis level names it; 0 if benign or a named non-melanoma."""
    levels = [str(r.get(f"diagnosis_{i}", "")).strip() for i in (1, 2, 3, 4, 5)]
    if any(levels):
        if any("melanoma" in lv.lower() for lv in levels[1:]):
            return 1
        if levels[0].lower() == "benign" or levels[2]:
            return 0
        return None  # e.g. "Malignant" or "Indeterminate" without a finer diagnosis
    dx, bm = str(r.get("diagnosis", "")).lower(), str(r.get("benign_malignant", "")).lower()
    if dx == "melanoma":
        return 1
    if dx or bm == "benign":
        return 0
    return None


def read_isic_archive(root: Path, source: str) -> pd.DataFrame:
    root = Path(root)
    df = pd.read_csv(root / "metadata.csv", dtype=str, keep_default_na=False)
    if "isic_id" not in df.columns:
        raise DataError(f"{root / 'metadata.csv'}: no isic_id column")
    rows = []
    for i, r in enumerate(df.to_dict("records")):
        label_cols = [c for c in ("diagnosis_1", "diagnosis_2", "diagnosis_3", "diagnosis", "benign_malignant") if c in r]
        finest = next((str(r[f"diagnosis_{k}"]) for k in (5, 4, 3, 2) if str(r.get(f"diagnosis_{k}", "")).strip()), "")
        rows.append({**r, "diagnosis": r.get("diagnosis") or finest,
                     "image": r["isic_id"], "target": _archive_target(r), "row": i + 2,
                     "path": _find_image(root, r["isic_id"]),
                     "label_raw": " / ".join(str(r[c]) for c in label_cols)})
    out = pd.DataFrame(rows)
    out["source_name"] = source
    return out


def read_class_folders(root: Path, source: str) -> pd.DataFrame:
    root = Path(root)
    split_dirs = [d for d in root.iterdir() if d.is_dir() and d.name.lower() in SPLITS]
    bases = [(d, d.name.lower()) for d in split_dirs] or [(root, "")]
    rows = []
    for base, split in bases:
        for cls in sorted(d for d in base.iterdir() if d.is_dir()):
            target = 1 if cls.name.lower() in POSITIVE_FOLDERS else 0
            for p in sorted(cls.iterdir()):
                if p.suffix.lower() in IMAGE_SUFFIXES:
                    rows.append({"image": p.stem, "path": p, "target": target, "split": split,
                                 "row": len(rows) + 1, "label_raw": cls.name, "diagnosis": cls.name})
    if not rows:
        raise DataError(f"{root}: class folders hold no images")
    out = pd.DataFrame(rows)
    out["source_name"] = source
    return out


READERS = {"isic_csv": read_isic_csv, "isic_archive": read_isic_archive, "class_folders": read_class_folders}


def _provenance(root: Path, layout: str, rows: pd.DataFrame) -> dict:
    prov = {"path": str(root), "layout": layout, "images": int(len(rows)),
            "melanoma": int((rows["target"] == 1).sum())}
    if (root / "attribution.txt").is_file():
        prov["attribution"] = (root / "attribution.txt").read_text(errors="replace")[:20000]
    if (root / "licenses").is_dir():
        prov["licenses"] = sorted(p.name for p in (root / "licenses").iterdir())
    if "license" in rows.columns:
        prov["license_counts"] = {str(k): int(v) for k, v in rows["license"].value_counts().items()}
    return prov


def read_source(root: Path | str, layout: str | None = None, name: str | None = None) -> Dataset:
    """Read one dataset folder; rows with problems go to `problems`, not to `rows`."""
    root = Path(root).expanduser()
    if not root.is_dir():
        raise DataError(f"data folder not found: {root}")
    layout = layout or detect_layout(root)
    if layout not in READERS:
        raise DataError(f"unknown layout {layout!r}; use one of {sorted(READERS)}")
    name = name or root.name
    df = READERS[layout](root, name)
    df["source"] = df["source"].where(df["source"].astype(bool), name) if "source" in df.columns else name
    df["dataset"] = name
    df["group"] = _groups(df)
    if "split" not in df.columns:
        df["split"] = ""
    df["split"] = df["split"].fillna("").str.lower()
    problems = []
    for r in df.itertuples():
        if r.path is None or (isinstance(r.path, float) and np.isnan(r.path)):
            problems.append((name, r.row, r.image, "missing image file"))
        elif r.target is None or (isinstance(r.target, float) and np.isnan(r.target)):
            problems.append((name, r.row, r.image, f"unknown label value {r.label_raw!r}"))
    dup = df["image"].duplicated(keep="first")
    for r in df[dup].itertuples():
        problems.append((name, r.row, r.image, "duplicate image name"))
    bad_rows = {(p[1]) for p in problems}
    ok = df[~df["row"].isin(bad_rows)].copy()
    ok["target"] = ok["target"].astype(int)
    diagnosis = ok["diagnosis"] if "diagnosis" in ok.columns else pd.Series("", index=ok.index)
    ok["dx"] = [diagnosis_index(d, t) for d, t in zip(diagnosis, ok["target"])]
    ok["path"] = ok["path"].map(str)
    return Dataset(ok.drop(columns=["source_name", "label_raw"]), pd.DataFrame(problems, columns=PROBLEM_COLUMNS),
                   [_provenance(root, layout, ok)])


def _groups(df: pd.DataFrame) -> pd.Series:
    """patient_id, else lesion_id, else the image itself: the key no two splits may share."""
    group = df["image"].astype(str)
    for col in ("lesion_id", "patient_id"):  # later wins: patient_id has priority
        if col in df.columns:
            v = df[col].fillna("").astype(str)
            group = v.where(v != "", group)
    return df["source_name"].astype(str) + ":" + group if "source_name" in df.columns else group


def combine(datasets: list[Dataset]) -> Dataset:
    """Several sources -> one dataset; an image name seen in two sources is a duplicate."""
    rows = pd.concat([d.rows for d in datasets], ignore_index=True)
    problems = pd.concat([d.problems for d in datasets], ignore_index=True)
    dup = rows["image"].duplicated(keep="first")
    extra = pd.DataFrame({"source": rows.loc[dup, "source"], "row": rows.loc[dup, "row"],
                          "image": rows.loc[dup, "image"], "reason": "duplicate image name across sources"})
    return Dataset(rows[~dup].reset_index(drop=True), pd.concat([problems, extra], ignore_index=True),
                   [p for d in datasets for p in d.provenance])


def load_sources(paths: list[str | Path], layout: str | None = None) -> Dataset:
    return combine([read_source(p, layout) for p in paths])


def apply_policy(ds: Dataset, on_bad: str, log=print) -> Dataset:
    """on_bad="fail" raises with the list; "skip" keeps going. Either way the count is shown."""
    n = len(ds.problems)
    if n:
        listing = "\n".join(f"  {r.source} row {r.row} {r.image}: {r.reason}" for r in ds.problems.head(50).itertuples())
        more = f"\n  ... and {n - 50} more" if n > 50 else ""
        if on_bad == "fail":
            raise DataError(f"{n} bad rows (use --on-bad skip to leave them out):\n{listing}{more}")
        log(f"skipping {n} bad rows:\n{listing}{more}")
    else:
        log("0 bad rows")
    return ds


# --------------------------------------------------------------------------- splits
def make_splits(rows: pd.DataFrame, val: float = 0.1, test: float = 0.1, seed: int = 0,
                honour_existing: bool = False) -> pd.Series:
    """Label-stratified, group-disjoint split -> Series of "train"/"val"/"test".

    Groups are split with StratifiedGroupKFold into 1/min(val, test) folds; the first folds
    go to test, the next to val. With `honour_existing`, rows whose `split` is already one of
    train/val/test keep it and only the rest are assigned.
    """
    from sklearn.model_selection import StratifiedGroupKFold

    out = pd.Series("", index=rows.index, dtype=object)
    if honour_existing:
        given = rows["split"].isin(SPLITS)
        out[given] = rows.loc[given, "split"]
    todo = rows[out == ""]
    if len(todo):
        n_folds = max(2, int(round(1 / min(val, test))))
        n_test, n_val = max(1, round(test * n_folds)), max(1, round(val * n_folds))
        sgkf = StratifiedGroupKFold(n_splits=n_folds, shuffle=True, random_state=seed)
        for k, (_, idx) in enumerate(sgkf.split(todo, todo["target"], todo["group"])):
            out[todo.index[idx]] = "test" if k < n_test else ("val" if k < n_test + n_val else "train")
    _check_groups_disjoint(rows["group"], out)
    return out


def _check_groups_disjoint(groups: pd.Series, split: pd.Series) -> None:
    per_group = pd.DataFrame({"g": groups, "s": split}).groupby("g")["s"].nunique()
    leaked = per_group[per_group > 1]
    if len(leaked):
        raise DataError(f"{len(leaked)} groups fall in more than one split, e.g. {list(leaked.index[:5])}")


def split_summary(rows: pd.DataFrame) -> pd.DataFrame:
    """Counts per split x source x class."""
    t = rows.assign(cls=rows["target"].map({1: "melanoma", 0: "not_melanoma"}))
    table = t.pivot_table(index=["split", "source"], columns="cls", values="image", aggfunc="count", fill_value=0)
    table["total"] = table.sum(axis=1)
    return table.reset_index()


# --------------------------------------------------------------------------- pixel cache
def _decode_one(args) -> tuple[int, np.ndarray | None, str]:
    i, path, spec = args
    try:
        return i, preprocess_uint8(path, spec), ""
    except ImageError as e:
        return i, None, str(e)


def cache_key(paths: list[str], spec: PreprocessSpec) -> str:
    h = hashlib.sha256(json.dumps({**spec.to_dict(), "pixels_version": PIXELS_VERSION}, sort_keys=True).encode())
    for p in paths:
        st = os.stat(p) if os.path.exists(p) else None
        h.update(f"{p}|{st.st_size if st else -1}|{st.st_mtime_ns if st else -1}\n".encode())
    return h.hexdigest()[:20]


def build_pixel_cache(rows: pd.DataFrame, spec: PreprocessSpec, cache_dir: Path, workers: int = 2,
                      progress=None) -> tuple[np.ndarray, pd.DataFrame]:
    """Decode every image once through edge's preprocessing into a uint8 memmap on disk.

    Returns (memmap of shape (N, H, W, 3), problems). Unreadable images are listed in
    problems and left as zeros; the caller drops them. A second call with the same files and
    spec reuses the cache. The cache holds derived pixels: keep it outside the repository.
    """
    cache_dir = Path(cache_dir)
    cache_dir.mkdir(parents=True, exist_ok=True)
    paths = rows["path"].tolist()
    key = cache_key(paths, spec)
    arr_path, meta_path = cache_dir / f"pixels-{key}.npy", cache_dir / f"pixels-{key}.json"
    if arr_path.is_file() and meta_path.is_file():
        bad = json.loads(meta_path.read_text())["problems"]
        return np.load(arr_path, mmap_mode="r"), pd.DataFrame(bad, columns=PROBLEM_COLUMNS)
    h, w = spec.size
    tmp = arr_path.with_suffix(".tmp.npy")
    arr = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.uint8, shape=(len(paths), h, w, 3))
    bad = []
    jobs = [(i, p, spec) for i, p in enumerate(paths)]
    with ProcessPoolExecutor(max_workers=workers) as pool:
        for n, (i, x, err) in enumerate(pool.map(_decode_one, jobs, chunksize=64)):
            if x is None:
                r = rows.iloc[i]
                bad.append([r["source"], int(r["row"]), r["image"], f"unreadable image: {err}"])
            else:
                arr[i] = x
            if progress is not None:
                progress(n + 1, len(jobs))
    arr.flush()
    del arr
    os.replace(tmp, arr_path)
    meta_path.write_text(json.dumps({"n": len(paths), "spec": spec.to_dict(), "problems": bad}))
    return np.load(arr_path, mmap_mode="r"), pd.DataFrame(bad, columns=PROBLEM_COLUMNS)


# --------------------------------------------------------------------------- CLI
def main(argv=None) -> int:
    """`python -m train.data DIR... [--cache]`: report bad rows and the split, optionally cache pixels."""
    import argparse
    import sys
    ap = argparse.ArgumentParser(prog="python -m train.data", description=(
        "Check dataset folders: bad rows (missing, unlabelled, duplicate, unreadable) and the grouped split."),
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
        epilog="Exit status: 0 no bad rows, 1 some bad rows (listed), 2 a folder that cannot be read.")
    ap.add_argument("data", nargs="+", help="dataset folders (isic_csv, isic_archive or class_folders)")
    ap.add_argument("--layout", choices=sorted(READERS), help="force one layout (None: detect per folder)")
    ap.add_argument("--seed", type=int, default=0, help="seed of the grouped, stratified split")
    ap.add_argument("--val", type=float, default=0.1, help="fraction of groups for validation")
    ap.add_argument("--test", type=float, default=0.1, help="fraction of groups for test")
    ap.add_argument("--cache", type=Path, help="also decode every image into this pixel cache (finds unreadable files)")
    ap.add_argument("--size", type=int, default=224, help="side of the cached images")
    ap.add_argument("--problems", type=Path, help="write the bad-row table as CSV here")
    args = ap.parse_args(argv)
    try:
        ds = load_sources(args.data, args.layout)
    except DataError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    problems = ds.problems
    if args.cache:
        _, bad = build_pixel_cache(ds.rows, PreprocessSpec(size=(args.size, args.size)), args.cache)
        problems = pd.concat([problems, bad], ignore_index=True)
    apply_policy(Dataset(ds.rows, problems, ds.provenance), "skip", log=print)
    rows = ds.rows[~ds.rows["image"].isin(set(problems["image"]))]
    rows = rows.assign(split=make_splits(rows, args.val, args.test, args.seed))
    print(split_summary(rows).to_string(index=False))
    print("diagnoses (train.data.DIAGNOSES; other/unknown is left out of the diagnosis loss):")
    print(diagnosis_summary(rows).to_string(index=False))
    if args.problems:
        problems.to_csv(args.problems, index=False)
    return 1 if len(problems) else 0


if __name__ == "__main__":
    raise SystemExit(main())
