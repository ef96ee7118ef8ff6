"""Our ``models`` package (reference CNNs, data sets, training, shipped checkpoints), found by
file location.

The ``models`` package ships beside ``linop`` (same repository / same site-packages).  A
plain ``import models`` would pick whatever ``models`` comes first on ``sys.path`` — with
``python -m linop`` that is the current directory, so a user's own ``models/`` package
would shadow ours.  :func:`models_package` therefore loads the package from its file
location; if the name ``models`` is already taken by another package, ours is loaded under
the private name ``_linop_models`` (its relative imports work under either name).

Only the command line imports this module: the core (``linop`` minus ``linop.cli``) never
touches ``models``.
"""
from __future__ import annotations

import importlib
import importlib.util
import sys
from pathlib import Path
from types import ModuleType

__all__ = ["MODELS_DIR", "checkpoint_dir", "models_module", "models_package", "normalization", "shipped_checkpoint"]

#: the directory of our ``models`` package: beside the ``linop`` package
MODELS_DIR = Path(__file__).resolve().parents[2] / "models"
_PRIVATE_NAME = "_linop_models"


def _is_ours(module: ModuleType | None) -> bool:
    file = getattr(module, "__file__", None)
    return file is not None and Path(file).resolve() == MODELS_DIR / "__init__.py"


def models_package() -> ModuleType:
    """Our ``models`` package, imported from :data:`MODELS_DIR` (once per process)."""
    for name in ("models", _PRIVATE_NAME):
        if _is_ours(sys.modules.get(name)):
            return sys.modules[name]
    init = MODELS_DIR / "__init__.py"
    if not init.is_file():
        raise FileNotFoundError(f"the reference-model package is missing: no {init}")
    name = "models" if "models" not in sys.modules else _PRIVATE_NAME
    spec = importlib.util.spec_from_file_location(name, init, submodule_search_locations=[str(MODELS_DIR)])
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    try:
        spec.loader.exec_module(module)
    except BaseException:
        del sys.modules[name]
        raise
    return module


def models_module(name: str) -> ModuleType:
    """A submodule of our ``models`` package, e.g. ``models_module("train")``."""
    return importlib.import_module(f"{models_package().__name__}.{name}")


def checkpoint_dir() -> Path:
    """The directory of the shipped checkpoints (independent of the working directory)."""
    return MODELS_DIR / "checkpoints"


def shipped_checkpoint(stem: str) -> Path:
    """Path of the shipped checkpoint ``<stem>.pt`` (it may not exist; callers check)."""
    return checkpoint_dir() / f"{stem}.pt"


def normalization(meta: dict) -> object:
    """The input normalisation a checkpoint was trained with, as ``load_dataset``'s
    ``normalize=``: the stored per-channel (mean, std) of ``"dataset"`` / ``"custom"``
    normalisation (the training split's statistics), else the mode's name."""
    mode = meta.get("normalize", "none") or "none"
    if mode in ("dataset", "custom"):
        if meta.get("mean") and meta.get("std"):
            return (tuple(meta["mean"]), tuple(meta["std"]))
        if mode == "custom":
            raise ValueError("the checkpoint used a custom normalisation but stores no mean / std")
    return mode
