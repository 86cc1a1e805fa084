"""Training end to end on a tiny synthetic set; config, resume and strategy selection."""
import json
import shutil
from pathlib import Path

import pandas as pd
import pytest

from train.config import TrainConfig
from train.model import strategy_name



def test_tiny_run_writes_everything(tiny_run):
    for name in ("config.json", "history.csv", "model.h5", "best.weights.h5", "metrics.json", "splits.csv",
                 "predictions.csv", "roc.png", "reliability.png", "history.png", "split_summary.csv"):
        assert (tiny_run / name).is_file(), name
    cfg = json.loads((tiny_run / "config.json").read_text())
    assert cfg["image_size"] == 32 and cfg["seed"] == 0
    hist = pd.read_csv(tiny_run / "history.csv")
    assert list(hist["phase"]) == [1, 2, 2]
    m = json.loads((tiny_run / "metrics.json").read_text())
    assert m["threshold"]["chosen_on"] == "validation split"
    for key in ("roc_auc", "roc_auc_ci95", "pr_auc", "sensitivity", "specificity", "balanced_accuracy", "f1",
                "confusion_matrix", "calibration"):
        assert key in m["test"]["all"], key
    assert "isic" in m["test"]  # per-source breakdown
    assert m["input_scaling"].startswith("(x - 127) / 128")


def test_threshold_comes_from_validation_only(tiny_run):
    """Re-deriving the threshold from the saved validation predictions gives the stored one."""
    from train.metrics import threshold_for_sensitivity
    preds = pd.read_csv(tiny_run / "predictions.csv")
    m = json.loads((tiny_run / "metrics.json").read_text())
    v = preds[preds["split"] == "val"]
    assert threshold_for_sensitivity(v["target"].to_numpy(), v["probability"].to_numpy(), 0.9) == pytest.approx(
        m["threshold"]["threshold"])


def test_splits_are_group_disjoint(tiny_run):
    s = pd.read_csv(tiny_run / "splits.csv")
    assert s.groupby("group")["split"].nunique().max() == 1
    assert set(s["split"]) == {"train", "val", "test"}


def test_resume_continues_from_checkpoint(tiny_run, tmp_path):
    """A finished run resumed with more epochs trains only the new ones."""
    import shutil
    from train.pipeline import run
    run_dir = tmp_path / "resumed"
    shutil.copytree(tiny_run, run_dir)
    cfg = TrainConfig.from_json(run_dir / "config.json")
    cfg.out = str(run_dir)
    (run_dir / "config.json").write_text(json.dumps(cfg.to_dict()))
    with pytest.raises(ValueError, match="different config"):
        changed = TrainConfig.from_dict({**cfg.to_dict(), "lr": 1.0})
        run(changed, resume=True, log=lambda m: None)
    logs = []
    run(cfg, resume=True, log=logs.append)
    assert any("resumed from epoch 2" in m for m in logs)
    assert len(pd.read_csv(run_dir / "history.csv")) == 3  # nothing retrained


def test_config_unknown_key_and_validation():
    with pytest.raises(ValueError, match="unknown config keys"):
        TrainConfig.from_dict({"learning_rate": 1})
    with pytest.raises(ValueError, match="on_bad"):
        TrainConfig(on_bad="ignore").validate()


def test_default_run_folder_follows_the_backbone(tmp_path):
    """Training another backbone without --out must not land in (and be refused by, or with
    --force replace) the default model's run folder."""
    from train.__main__ import build_parser, config_from_args
    lite1 = config_from_args(build_parser().parse_args(["--backbone", "efficientnet_lite1"]))
    assert Path(lite1.out).name == "efficientnet_lite1"
    assert Path(TrainConfig().out).name == "efficientnet_lite0"
    assert TrainConfig(out=str(tmp_path)).out == str(tmp_path)


def test_cli_flags_override_config(tmp_path):
    from train.__main__ import build_parser, config_from_args
    (tmp_path / "c.json").write_text(json.dumps({"epochs": 3, "seed": 5}))
    args = build_parser().parse_args(["--config", str(tmp_path / "c.json"), "--seed", "7", "--no-augment",
                                      "--data", "a", "b"])
    cfg = config_from_args(args)
    assert (cfg.epochs, cfg.seed, cfg.augment, cfg.data) == (3, 7, False, ["a", "b"])


def test_cli_bad_data_folder_exits_2(tmp_path, capsys):
    from train.__main__ import main
    assert main(["--data", str(tmp_path / "nowhere"), "--out", str(tmp_path / "o")]) == 2
    assert "data folder not found" in capsys.readouterr().err


@pytest.mark.parametrize("tf_config,gpus,expected", [
    (None, 0, "default"), (None, 1, "default"), (None, 4, "mirrored"),
    ('{"cluster": {"worker": ["h1:2222", "h2:2222"]}, "task": {"type": "worker", "index": 0}}', 0, "multi_worker_mirrored"),
    ('{"cluster": {"worker": ["h1:2222"]}, "task": {"type": "worker", "index": 0}}', 2, "mirrored"),
])
def test_strategy_selection(tf_config, gpus, expected):
    assert strategy_name(tf_config, gpus) == expected


def test_augmentation_keeps_shape_and_range():
    import numpy as np
    import tensorflow as tf
    from train.model import augment
    x = tf.constant(np.random.default_rng(0).integers(0, 256, (4, 32, 32, 3)), tf.uint8)
    g = tf.random.Generator.from_seed(1)
    a, b = augment(x, g).numpy(), augment(x, g).numpy()
    assert a.shape == (4, 32, 32, 3) and a.min() >= 0 and a.max() <= 255
    assert not np.allclose(a, b)  # random each call


def test_init_from_previous_run(tiny_run, tmp_path):
    """Continue from a run's model (e.g. all blocks after the top ones); a different split is refused."""
    from train.pipeline import run
    cfg = TrainConfig.from_json(tiny_run / "config.json")
    follow = TrainConfig.from_dict({**cfg.to_dict(), "init_from": str(tiny_run), "top_blocks": 16, "epochs": 1,
                                    "out": str(tmp_path / "all")})
    m = run(follow, log=lambda s: None)
    assert m["init_from"]["run"] == str(tiny_run) and m["phase1"] is None
    assert list(pd.read_csv(tmp_path / "all" / "history.csv")["phase"]) == [2]
    other = TrainConfig.from_dict({**follow.to_dict(), "seed": 1, "out": str(tmp_path / "bad")})
    with pytest.raises(ValueError, match="split differs"):
        run(other, log=lambda s: None)


@pytest.mark.parametrize("flags,message", [
    (["--backbone", "resnet50"], "invalid choice: 'resnet50'"),
    (["--layout", "zip"], "invalid choice: 'zip'"),
    (["--on-bad", "ignore"], "invalid choice: 'ignore'"),
    (["--resize", "stretch"], "invalid choice: 'stretch'"),
    (["--class-weighting", "auto"], "invalid choice: 'auto'"),
])
def test_cli_refuses_bad_choices_before_anything_is_written(tmp_path, capsys, flags, message):
    from train.__main__ import main
    with pytest.raises(SystemExit) as e:
        main([*flags, "--out", str(tmp_path / "run")])
    assert e.value.code == 2 and message in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("flags,message", [
    (["--data", "nowhere"], "data folder not found"),
    (["--weights", "missing.h5"], "weights must be"),
    (["--val-fraction", "0"], "val_fraction must be"),
    (["--batch-size", "0"], "batch_size must be"),
])
def test_cli_refuses_bad_values_before_anything_is_written(isic_csv_dir, tmp_path, capsys, flags, message):
    from train.__main__ import main
    args = ["--data", str(isic_csv_dir)] if flags[0] != "--data" else []
    assert main([*args, *flags, "--out", str(tmp_path / "run")]) == 2
    assert message in capsys.readouterr().err and not (tmp_path / "run").exists()


def test_cli_help_lists_choices_and_sources(capsys):
    from train.__main__ import main
    with pytest.raises(SystemExit):
        main(["--help"])
    text = " ".join(capsys.readouterr().out.split())
    for shown in ("efficientnet_lite0,efficientnet_lite1,mobilenet_v3_small", "isic_csv,isic_archive,class_folders", "skip,fail",
                  "squash,center_crop", "balanced,none", "ISIC 2020", "--limit", "--weights", "--force"):
        assert shown in text, shown


def test_existing_run_is_not_overwritten_without_force(tiny_run, tmp_path, capsys):
    import shutil
    from train.__main__ import main
    run_dir = tmp_path / "run"
    shutil.copytree(tiny_run, run_dir)
    before = (run_dir / "metrics.json").read_text()
    cfg = json.loads((run_dir / "config.json").read_text())
    args = ["--data", *cfg["data"], "--out", str(run_dir), "--image-size", "32", "--epochs", "0",
            "--head-epochs", "1", "--cache-dir", cfg["cache_dir"], "--val-fraction", "0.25", "--test-fraction", "0.25",
            "--bootstrap", "20"]
    assert main(args) == 2
    assert "already holds a run" in capsys.readouterr().err
    assert (run_dir / "metrics.json").read_text() == before
    assert main([*args, "--force"]) == 0
    assert json.loads((run_dir / "config.json").read_text())["epochs"] == 0


def test_backbone_names_match_the_registry():
    from train.backbones import REGISTRY
    from train.config import BACKBONES, LAYOUTS
    from train.data import READERS
    assert set(BACKBONES) == set(REGISTRY) and set(LAYOUTS) == set(READERS)


def test_schedule_warms_up_then_decays():
    from train.optim import lr_schedule
    s = lr_schedule(1e-3, 10, 100)
    lrs = [float(s(i)) for i in (0, 5, 10, 55, 99)]
    assert lrs[0] < lrs[1] < lrs[2] == pytest.approx(1e-3) and lrs[2] > lrs[3] > lrs[4] >= 0


def test_leave_source_out_evaluation(tiny_run, tmp_path, isic_csv_dir):
    """Every image of a folder the run never saw, at the run's threshold; a folder that shares
    images with the run's split is refused (it would not be another source)."""
    from tests.conftest import lesion_image
    from train.evaluate import evaluate_external, main
    ext = tmp_path / "other_clinic"
    for label, melanoma in (("benign", False), ("melanoma", True)):
        (ext / label).mkdir(parents=True)
        for i in range(6):
            lesion_image(200 + i + 10 * melanoma, melanoma=melanoma).save(ext / label / f"{label}_{i}.jpg")
    preds, report = evaluate_external(tiny_run, None, [str(ext)])
    m = report["external"]["all"]
    assert m["n"] == 12 and m["n_melanoma"] == 6 and 0 <= m["roc_auc"] <= 1
    assert report["threshold"] == json.loads((tiny_run / "metrics.json").read_text())["threshold"]["threshold"]
    with pytest.raises(ValueError, match="in the run's own split"):
        evaluate_external(tiny_run, None, [str(isic_csv_dir)])
    assert main(["--run", str(tiny_run), "--data", str(ext), "--out", str(tmp_path / "lso")]) == 0
    assert "external" in json.loads((tmp_path / "lso" / "metrics.json").read_text())


def test_weight_average_of_runs_is_a_run_folder(tiny_run, tmp_path, capsys):
    """train.soup averages the weights of runs on one split into a run folder that is evaluated
    like a run (rule and threshold on validation); runs that differ are refused."""
    import numpy as np
    from train.pipeline import run
    from train.rundir import load_keras_model
    from train.soup import main as soup
    cfg = TrainConfig.from_json(tiny_run / "config.json")
    other = tmp_path / "other"
    run(TrainConfig.from_dict({**cfg.to_dict(), "init_from": str(tiny_run), "epochs": 1, "out": str(other)}),
        log=lambda s: None)
    out = tmp_path / "soup"
    assert soup([str(tiny_run), str(other), "--out", str(out)]) == 0
    a, b, c = (load_keras_model(p / "model.h5").get_weights() for p in (tiny_run, other, out))
    assert any(not np.allclose(x, y) for x, y in zip(a, b))  # two different ingredients
    assert all(np.allclose(z, (x + y) / 2, atol=1e-6) for x, y, z in zip(a, b, c) if x.dtype.kind == "f")
    m = json.loads((out / "metrics.json").read_text())
    assert [i["run"] for i in m["soup"]["ingredients"]] == [str(tiny_run), str(other)]
    assert m["val"]["all"]["n"] > 0 and "threshold" in m["threshold"] and m["melanoma_rule"]
    assert (out / "splits.csv").read_bytes() == (tiny_run / "splits.csv").read_bytes()
    assert "weight average: validation AUC" in capsys.readouterr().out
    # refusals, each before anything is written or deleted
    assert soup([str(tiny_run), str(other), "--out", str(out)]) == 2  # exists, no --force
    assert soup([str(tiny_run), "--out", str(tmp_path / "one")]) == 2
    assert soup([str(tiny_run), str(tiny_run) + "/", "--out", str(tmp_path / "twice")]) == 2

    def variant(name, **change):
        d = tmp_path / name
        d.mkdir()
        for f in ("model.h5", "metrics.json", "splits.csv"):
            shutil.copy(other / f, d / f)
        (d / "config.json").write_text(json.dumps({**json.loads((other / "config.json").read_text()), **change}))
        return d
    assert soup([str(tiny_run), str(variant("seed1", seed=1)), "--out", str(tmp_path / "s2")]) == 2
    assert soup([str(tiny_run), str(variant("size", image_size=48)), "--out", str(tmp_path / "s2")]) == 2
    moved = variant("split")
    (moved / "splits.csv").write_text((moved / "splits.csv").read_text().replace(",train,", ",val,", 1))
    assert soup([str(tiny_run), str(moved), "--out", str(tmp_path / "s2")]) == 2
    assert soup([str(tiny_run), str(other), "--out", str(other), "--force"]) == 2  # a run itself
    assert soup([str(tiny_run), str(other), "--out", str(tmp_path), "--force"]) == 2  # holds a run
    keep = tmp_path / "keep"
    keep.mkdir()
    (keep / "notes.txt").write_text("mine")
    assert soup([str(tiny_run), str(other), "--out", str(keep), "--force"]) == 2  # not a weight average
    err = capsys.readouterr().err
    for message in ("not empty", "at least two different runs", "differs from", "seed", "image_size",
                    "split differs", "holds or sits inside", "not a weight average"):
        assert message in err, message
    assert not (tmp_path / "s2").exists() and (keep / "notes.txt").read_text() == "mine"
    assert other.joinpath("model.h5").is_file() and tiny_run.joinpath("model.h5").is_file()


def test_weight_average_failure_leaves_nothing_and_force_replaces_its_own(tiny_run, tmp_path, monkeypatch):
    import train.pipeline
    from train.soup import main as soup
    other = tmp_path / "copy"
    shutil.copytree(tiny_run, other)
    out = tmp_path / "soup"

    def boom(*a, **k):
        raise RuntimeError("evaluation failed")
    with monkeypatch.context() as m:
        m.setattr(train.pipeline, "evaluate_run", boom)
        with pytest.raises(RuntimeError):
            soup([str(tiny_run), str(other), "--out", str(out)])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["copy"]  # no soup, no temporary folder
    assert soup([str(tiny_run), str(other), "--out", str(out)]) == 0
    (out / "stale.txt").write_text("from before")
    assert soup([str(tiny_run), str(other), "--out", str(out), "--force"]) == 0
    assert not (out / "stale.txt").exists() and (out / "metrics.json").is_file()


def test_exported_weight_average_names_its_ingredients():
    from quantize.convert import weight_average
    assert weight_average({"init_from": None}) == {}
    got = weight_average({"soup": {"method": "uniform mean", "ingredients": [
        {"run": "/abs/runs/a", "val_auc": 0.9}, {"run": "runs/b", "val_auc": 0.91}]}})
    assert [i["run"] for i in got["weight_average"]["ingredients"]] == ["a", "b"]


def test_train_seed_changes_training_not_the_split(tiny_run, tmp_path, monkeypatch):
    """--train-seed seeds shuffling, augmentation and initialisation; the split keeps --seed, so
    such runs can be averaged (train.soup checks `seed`, not `train_seed`)."""
    import train.loop as L
    import train.pipeline as P
    from train.__main__ import build_parser, config_from_args
    cfg = TrainConfig.from_json(tiny_run / "config.json")
    assert cfg.train_seed is None and cfg.training_seed == cfg.seed == 0
    parsed = config_from_args(build_parser().parse_args(["--train-seed", "5", "--out", str(tmp_path / "x")]))
    assert parsed.train_seed == 5 and parsed.training_seed == 5 and parsed.seed == 0
    seen = {"set_seeds": [], "dataset": [], "augment": []}
    set_seeds, dataset, generator = P.set_seeds, L.distributed_dataset, L.tf.random.Generator.from_seed
    monkeypatch.setattr(P, "set_seeds", lambda s: (seen["set_seeds"].append(s), set_seeds(s))[1])
    monkeypatch.setattr(L.tf.random.Generator, "from_seed",
                        staticmethod(lambda s, *a, **k: (seen["augment"].append(s), generator(s, *a, **k))[1]))

    def recording_dataset(strategy, pixels, y, idx, batch, seed, *a, **k):
        seen["dataset"].append(seed)
        return dataset(strategy, pixels, y, idx, batch, seed, *a, **k)
    monkeypatch.setattr(L, "distributed_dataset", recording_dataset)
    out = tmp_path / "seed5"
    P.run(TrainConfig.from_dict({**cfg.to_dict(), "train_seed": 5, "epochs": 1, "out": str(out)}), log=lambda s: None)
    assert seen["set_seeds"] == [5] and seen["dataset"] and set(seen["dataset"]) == {5} and seen["augment"] == [5]
    assert (out / "splits.csv").read_bytes() == (tiny_run / "splits.csv").read_bytes()
    assert json.loads((out / "config.json").read_text())["train_seed"] == 5
    from train.soup import check_runs
    assert check_runs([tiny_run, out])["seed"] == 0  # same split: a weight average is allowed
    with pytest.raises(ValueError, match="train_seed must be in"):
        TrainConfig.from_dict({**cfg.to_dict(), "train_seed": -1}).validate()
