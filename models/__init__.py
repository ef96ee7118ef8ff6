"""Reference CNNs (seed 000 appendix D, seed 001 §4), the zoo of torchvision-style CNNs
(:mod:`models.zoo`, issue 13), data loaders and training.

Shipped checkpoints trained on the embedded digits set live in ``models/checkpoints/``
(see its README); ``shipped_checkpoint("vgg7_digits32")`` gives the path.
"""
from __future__ import annotations

from pathlib import Path

from .baselines import (KConvMFC, conv2_fc1, conv3_fc2, conv4_fc2, conv5_fc2,
                        conv_channel_decreasing)
from .data import (DATASETS, IMAGE_SIZES, NORMALIZATIONS, PAPER_CIFAR_MEAN, PAPER_CIFAR_STD,
                   Dataset, load_dataset, photo_crops, sample_images)
from .fixup_resnet20 import FixupResNet20, fixup_resnet20
from .resnet20 import ResNet20, resnet20
from .vgg7 import VGG7, vgg7
from .zoo import ZOO, make_checkpoint, randomise

# (the training function itself is ``models.train.train``: the name ``models.train`` is the
# submodule)
_TRAIN_API = ("MODELS", "build_model", "load_checkpoint", "save_checkpoint")


def __getattr__(name: str):
    # models.train is imported lazily so that ``python -m models.train`` does not find it
    # already imported (runpy warning) and ``import models`` stays light
    if name in _TRAIN_API:
        import importlib

        return getattr(importlib.import_module(".train", __name__), name)
    raise AttributeError(f"module 'models' has no attribute {name!r}")


CHECKPOINTS_DIR = Path(__file__).resolve().parent / "checkpoints"


def shipped_checkpoint(name: str) -> Path:
    """Path of a shipped checkpoint, e.g. ``"vgg7_digits32"`` (``.pt`` optional)."""
    path = CHECKPOINTS_DIR / (name if name.endswith(".pt") else name + ".pt")
    if not path.exists():
        have = sorted(p.stem for p in CHECKPOINTS_DIR.glob("*.pt"))
        raise FileNotFoundError(f"shipped_checkpoint: no {path.name} in {CHECKPOINTS_DIR}; "
                                f"available: {have}")
    return path


__all__ = [
    "VGG7", "vgg7", "ResNet20", "resnet20", "FixupResNet20", "fixup_resnet20",
    "KConvMFC", "conv2_fc1", "conv3_fc2", "conv4_fc2", "conv5_fc2", "conv_channel_decreasing",
    "ZOO", "make_checkpoint", "randomise",
    "Dataset", "load_dataset", "photo_crops", "sample_images", "DATASETS", "IMAGE_SIZES", "NORMALIZATIONS",
    "PAPER_CIFAR_MEAN", "PAPER_CIFAR_STD",
    "MODELS", "build_model", "load_checkpoint", "save_checkpoint",
    "CHECKPOINTS_DIR", "shipped_checkpoint",
]
