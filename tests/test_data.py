"""The data layer: three layouts, bad-row reporting, grouped splits, the pixel cache."""
import pandas as pd
import pytest

from train import data as D

from .conftest import SHARED_DATA, lesion_image, shared_data_available


def test_isic_csv_layout(isic_csv_dir):
    ds = D.read_source(isic_csv_dir)
    assert len(ds.rows) == 40 and len(ds.problems) == 0
    assert ds.rows["target"].sum() == 10
    assert ds.rows["group"].nunique() == 20  # patient_id groups
    assert ds.provenance[0]["layout"] == "isic_csv"


def test_bad_rows_are_listed_with_reason(isic_csv_dir):
    csv = isic_csv_dir / "train.csv"
    lines = csv.read_text().splitlines()
    lines.append("ISIC_9999999,IP_900,,male,40,torso,nevus,benign,0")  # no image file
    lesion_image(0).save(isic_csv_dir / "train" / "ISIC_8888888.jpg")
    lines.append("ISIC_8888888,IP_901,,male,40,torso,nevus,benign,maybe")  # unknown label
    lines.append(lines[2])  # duplicate name
    csv.write_text("\n".join(lines) + "\n")
    ds = D.read_source(isic_csv_dir)
    reasons = " | ".join(ds.problems["reason"])
    assert "missing image file" in reasons and "unknown label value" in reasons and "duplicate" in reasons
    assert len(ds.problems) == 3
    with pytest.raises(D.DataError, match="3 bad rows"):
        D.apply_policy(ds, "fail", log=lambda m: None)
    seen = []
    D.apply_policy(ds, "skip", log=seen.append)
    assert "skipping 3 bad rows" in seen[0]


def test_unreadable_image_reported_by_cache(isic_csv_dir, tmp_path):
    (isic_csv_dir / "train" / "ISIC_0000005.jpg").write_bytes(b"garbage")
    ds = D.read_source(isic_csv_dir)
    from edge.preprocess import PreprocessSpec
    _, bad = D.build_pixel_cache(ds.rows, PreprocessSpec(size=(16, 16)), tmp_path / "c", workers=1)
    assert list(bad["image"]) == ["ISIC_0000005"] and "unreadable" in bad["reason"].iloc[0]


def test_isic_archive_layout(tmp_path):
    root = tmp_path / "archive"
    root.mkdir()
    rows = [("ISIC_1", "Malignant", "Malignant melanocytic proliferations (Melanoma)", "Melanoma Invasive"),
            ("ISIC_2", "Benign", "Benign melanocytic proliferations", "Nevus"),
            ("ISIC_3", "Malignant", "Malignant adnexal epithelial proliferations - Follicular", "Basal cell carcinoma"),
            ("ISIC_4", "Indeterminate", "", "")]
    for r in rows:
        lesion_image(1).save(root / f"{r[0]}.jpg")
    pd.DataFrame(rows, columns=["isic_id", "diagnosis_1", "diagnosis_2", "diagnosis_3"]).assign(
        patient_id=["P1", "P1", "P2", "P3"], license=["CC-0", "CC-BY-NC", "CC-0", "CC-0"]).to_csv(root / "metadata.csv", index=False)
    (root / "attribution.txt").write_text("Images from the ISIC Archive.")
    (root / "licenses").mkdir()
    (root / "licenses" / "CC-0.txt").write_text("cc0")
    ds = D.read_source(root)
    assert dict(zip(ds.rows["image"], ds.rows["target"])) == {"ISIC_1": 1, "ISIC_2": 0, "ISIC_3": 0}
    assert "unknown label" in ds.problems["reason"].iloc[0]  # Indeterminate, no finer diagnosis
    prov = ds.provenance[0]
    assert prov["layout"] == "isic_archive" and "ISIC Archive" in prov["attribution"] and prov["licenses"] == ["CC-0.txt"]


def test_archive_legacy_columns(tmp_path):
    root = tmp_path / "old"
    root.mkdir()
    for n in ("a", "b"):
        lesion_image(2).save(root / f"{n}.jpg")
    pd.DataFrame({"isic_id": ["a", "b"], "benign_malignant": ["malignant", "benign"],
                  "diagnosis": ["melanoma", "nevus"]}).to_csv(root / "metadata.csv", index=False)
    assert D.read_source(root).rows["target"].tolist() == [1, 0]


def test_class_folders_with_splits(tmp_path):
    root = tmp_path / "kaggle"
    for split in ("train", "test"):
        for cls in ("benign", "malignant"):
            (root / split / cls).mkdir(parents=True)
            for i in range(3):
                lesion_image(i).save(root / split / cls / f"{split}_{cls}_{i}.jpg")
    ds = D.read_source(root)
    assert D.detect_layout(root) == "class_folders"
    assert len(ds.rows) == 12 and ds.rows["target"].sum() == 6
    assert set(ds.rows["split"]) == {"train", "test"}


def test_combine_keeps_source_and_flags_cross_duplicates(isic_csv_dir, tmp_path):
    import shutil
    other = tmp_path / "other"
    shutil.copytree(isic_csv_dir, other)
    ds = D.load_sources([isic_csv_dir, other])
    assert len(ds.rows) == 40 and (ds.problems["reason"] == "duplicate image name across sources").sum() == 40
    assert set(ds.rows["source"]) == {"isic"}


def test_splits_grouped_stratified_reproducible(isic_csv_dir):
    rows = D.read_source(isic_csv_dir).rows
    a = D.make_splits(rows, 0.2, 0.2, seed=1)
    b = D.make_splits(rows, 0.2, 0.2, seed=1)
    c = D.make_splits(rows, 0.2, 0.2, seed=2)
    assert (a == b).all() and not (a == c).all()
    per_group = pd.DataFrame({"g": rows["group"], "s": a}).groupby("g")["s"].nunique()
    assert per_group.max() == 1  # no patient in two splits
    for s in ("train", "val", "test"):
        assert rows["target"][a == s].sum() >= 1  # stratified: melanomas in every split
    summary = D.split_summary(rows.assign(split=a))
    assert summary["total"].sum() == 40


def test_existing_split_honoured(isic_csv_dir):
    rows = D.read_source(isic_csv_dir).rows
    rows.loc[rows["group"].str.endswith(("IP_000", "IP_001")), "split"] = "test"
    s = D.make_splits(rows, 0.2, 0.2, seed=0, honour_existing=True)
    assert (s[rows["split"] == "test"] == "test").all()


def test_group_leak_detected():
    rows = pd.DataFrame({"group": ["g1", "g1"], "target": [0, 1]})
    with pytest.raises(D.DataError, match="more than one split"):
        D._check_groups_disjoint(rows["group"], pd.Series(["train", "test"]))


@pytest.mark.skipif(not shared_data_available(), reason="../shared/data not present")
def test_shared_data_reads_and_splits():
    ds = D.load_sources([SHARED_DATA / "ham10000", SHARED_DATA / "isic2017"])
    assert len(ds.rows) == 9646 and int(ds.rows["target"].sum()) == 1066 and len(ds.problems) == 0
    split = D.make_splits(ds.rows, seed=0)
    per_group = pd.DataFrame({"g": ds.rows["group"], "s": split}).groupby("g")["s"].nunique()
    assert per_group.max() == 1
    assert set(ds.rows["source"]) == {"HAM10000", "ISIC2018_test", "ISIC2017_train", "ISIC2017_val"}


def test_data_cli_reports_and_exits(isic_csv_dir, tmp_path, capsys):
    assert D.main([str(isic_csv_dir), "--val", "0.2", "--test", "0.2"]) == 0
    assert "0 bad rows" in capsys.readouterr().out
    (isic_csv_dir / "train" / "ISIC_0000003.jpg").write_bytes(b"broken")
    assert D.main([str(isic_csv_dir), "--val", "0.2", "--test", "0.2", "--cache", str(tmp_path / "c"), "--size", "16",
                   "--problems", str(tmp_path / "p.csv")]) == 1
    out = capsys.readouterr().out
    assert "skipping 1 bad rows" in out and "ISIC_0000003" in out
    assert "ISIC_0000003" in (tmp_path / "p.csv").read_text()
    assert D.main([str(tmp_path / "absent")]) == 2


def test_pixel_cache_key_follows_the_preprocessing_version(monkeypatch, tmp_path):
    # a change of how pixels are computed must not reuse caches built by the old code
    import train.data as D
    from edge.preprocess import PreprocessSpec
    f = tmp_path / "a.jpg"
    f.write_bytes(b"x")
    before = D.cache_key([str(f)], PreprocessSpec())
    monkeypatch.setattr(D, "PIXELS_VERSION", D.PIXELS_VERSION + 1)
    assert D.cache_key([str(f)], PreprocessSpec()) != before
