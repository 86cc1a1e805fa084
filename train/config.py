"""Training options: one typed dataclass, commented defaults; unknown keys are errors."""
from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
SHARED_DATA = REPO.parent / "shared" / "data"


@dataclass
class TrainConfig:
    # data
    data: list[str] = field(default_factory=lambda: [str(SHARED_DATA / "ham10000"), str(SHARED_DATA / "isic2017")])
    layout: str | None = None  # None: detect per folder (isic_csv, isic_archive, class_folders)
    on_bad: str = "skip"  # "skip" or "fail" on missing/unreadable/unlabelled/duplicate rows
    val_fraction: float = 0.1  # of groups (patients/lesions), stratified by label
    test_fraction: float = 0.1
    honour_split: bool = False  # keep an existing train/val/test column where present
    cache_dir: str = str(Path.home() / ".cache" / "melanoma-screen")  # resized pixels, outside the repo
    # model
    backbone: str = "efficientnet_lite0"  # see train.backbones.REGISTRY
    weights: str = "imagenet"  # "imagenet", "none", or a local weights file
    image_size: int = 224
    resize: str = "squash"  # edge.preprocess policy
    dropout: float = 0.3
    init_from: str | None = None  # a run folder: start from its model.h5, skip phase 1 (same split enforced)
    # phase 1: head on cached frozen-backbone features
    head_epochs: int = 30
    head_lr: float = 1e-3
    # phase 2: fine-tune the top blocks, BatchNorm frozen (inference mode)
    top_blocks: int = 8  # blocks counted from the end; 0 skips phase 2
    epochs: int = 14  # maximum fine-tune epochs
    batch_size: int = 32
    lr: float = 3e-4  # peak learning rate after warm-up (Adam)
    warmup_epochs: float = 1.0
    weight_decay: float = 1e-5  # L2 on trainable kernels
    ema_decay: float = 0.998  # weight EMA; 0 disables. Evaluated and shipped weights are the EMA
    patience: int = 4  # early stopping on validation ROC AUC
    class_weighting: str = "balanced"  # "balanced" or "none"
    augment: bool = True  # flips, 90-degree rotations, random resized crops, colour jitter
    # evaluation
    target_sensitivity: float = 0.90  # threshold chosen on validation for this sensitivity
    bootstrap: int = 1000  # resamples for the AUC interval
    # run
    seed: int = 0
    out: str = str(REPO / "runs" / "efficientnet_lite0")
    workers: int = 2  # image decoding processes for the pixel cache
    limit: int = 0  # use only this many images (tests, smoke runs); 0 = all

    @classmethod
    def from_dict(cls, d: dict) -> "TrainConfig":
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - names)
        if unknown:
            raise ValueError(f"unknown config keys: {unknown}")
        return cls(**d)

    @classmethod
    def from_json(cls, path: Path) -> "TrainConfig":
        return cls.from_dict(json.loads(Path(path).read_text()))

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def validate(self) -> None:
        if self.on_bad not in ("skip", "fail"):
            raise ValueError("on_bad must be 'skip' or 'fail'")
        if self.class_weighting not in ("balanced", "none"):
            raise ValueError("class_weighting must be 'balanced' or 'none'")
        if not 0 <= self.ema_decay < 1:
            raise ValueError("ema_decay must be in [0, 1)")
        if not 0 < self.target_sensitivity <= 1:
            raise ValueError("target_sensitivity must be in (0, 1]")
