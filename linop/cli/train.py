"""``linop train``: train a reference model on a data set and save a checkpoint.

The options and the training loop are those of ``python -m models.train`` (the ``models``
package owns its training code); this module only wires them into ``linop``.
"""
from __future__ import annotations

import argparse

from ._models import models_module

__all__ = ["add_arguments", "run"]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    models_module("train").add_arguments(parser)


def run(args: argparse.Namespace) -> int:
    import math

    # models.train checks ``lr <= 0``, which NaN passes: refuse non-finite rates here
    for opt in ("lr", "momentum", "weight_decay", "l1", "scalar_lr_mult"):
        val = getattr(args, opt, None)
        if val is not None and not math.isfinite(val):
            raise ValueError(f"--{opt.replace('_', '-')} must be a finite number, got {val}")
    return models_module("train").run(args)
