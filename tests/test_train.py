"""Training end to end on a tiny synthetic set; config, resume and strategy selection."""
import json

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
    from train.loop import run
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
    from train.loop import run
    cfg = TrainConfig.from_json(tiny_run / "config.json")
    follow = TrainConfig.from_dict({**cfg.to_dict(), "init_from": str(tiny_run), "top_blocks": 16, "epochs": 1,
                                    "out": str(tmp_path / "all")})
    m = run(follow, log=lambda s: None)
    assert m["init_from"]["run"] == str(tiny_run) and m["phase1"] is None
    assert list(pd.read_csv(tmp_path / "all" / "history.csv")["phase"]) == [2]
    other = TrainConfig.from_dict({**follow.to_dict(), "seed": 1, "out": str(tmp_path / "bad")})
    with pytest.raises(ValueError, match="split differs"):
        run(other, log=lambda s: None)
