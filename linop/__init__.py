"""linop — exact linear-operator analysis of piecewise-linear CNNs.

Data flow, top to bottom:
torch model → ``from_torch`` (equivalent network on [x; x_b], ``linop.graph``) →
``linearise`` (Jacobians at x, ``linop.jacobian``) → ``backmap`` (AdjointBackMapV2, RM0–RM4) /
``reconstruct`` (label → features: ``embed`` + ``solve`` MDP/CCP) → ``verify`` (study) → report.

The public functions share their names with the modules that define them
(``linop.backmap`` the function lives in ``linop/backmap.py``); they are imported here
eagerly so that the package attribute is always the function, never the submodule.
"""
from __future__ import annotations

__version__ = "0.1.0"

from .operators.base import dottest
from .graph import EquivalentNetwork
from .convert import from_torch
from .jacobian import linearise
from .backmap import backmap
from .embed import embed
from .solve import solve
from .reconstruct import reconstruct
from .verify import verify

__all__ = [
    "EquivalentNetwork",
    "backmap",
    "dottest",
    "embed",
    "from_torch",
    "linearise",
    "reconstruct",
    "solve",
    "verify",
]
