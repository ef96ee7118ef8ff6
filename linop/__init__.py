"""linop — exact linear-operator analysis of piecewise-linear CNNs.

Data flow, top to bottom:
torch model → ``from_torch`` (equivalent network on [x; x_b], ``linop.graph``) →
``linop.jacobian`` (linearisation at x) → ``backmap`` (AdjointBackMapV2, RM0–RM4) /
``reconstruct`` (label → features: ``embed`` + ``solve`` MDP/CCP) → ``verify`` (study) → report.

Public functions are imported lazily so that ``import linop`` stays cheap.
"""
from __future__ import annotations

import importlib

__version__ = "0.1.0"

_LAZY = {
    "from_torch": ("linop.convert", "from_torch"),
    "EquivalentNetwork": ("linop.graph", "EquivalentNetwork"),
    "linearise": ("linop.jacobian", "linearise"),
    "backmap": ("linop.backmap", "backmap"),
    "verify": ("linop.verify", "verify"),
    "embed": ("linop.embed", "embed"),
    "solve": ("linop.solve", "solve"),
    "reconstruct": ("linop.reconstruct", "reconstruct"),
    "dottest": ("linop.operators.base", "dottest"),
}

__all__ = sorted(_LAZY)


def __getattr__(name: str):
    if name in _LAZY:
        mod, attr = _LAZY[name]
        return getattr(importlib.import_module(mod), attr)
    raise AttributeError(f"module 'linop' has no attribute {name!r}")
