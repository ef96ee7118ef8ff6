"""linop — exact linear-operator analysis of piecewise-linear CNNs.

Data flow, top to bottom:
torch model → ``from_torch`` (``linop.convert``: the equivalent network on [x; x_b],
``linop.network``) → ``linearise`` (``linop.linearize``: the Jacobian of every layer w.r.t.
[x; x_b] as an Operator) → ``backmap`` (``linop.hypersurface``: AdjointBackMapV2, RM0–RM4) /
``reconstruct`` (``linop.reverse``: label → features, ``embed`` + ``solve`` MDP/CCP from
``linop.solvers``) → ``verify`` (``linop.studies``) → reports.

The public functions are exported here lazily (importing ``linop`` is cheap) and none of them
shares its name with a submodule, so ``linop.backmap`` is the function and
``linop.hypersurface`` the module that defines it.
"""
from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

# public name -> module that defines it
_EXPORTS = {
    "EquivalentNetwork": "linop.network",
    "Operator": "linop.operators",
    "as_operator": "linop.operators",
    "dottest": "linop.operators",
    "from_torch": "linop.convert",
    "register_converter": "linop.convert",
    "linearise": "linop.linearize",
    "Linearisation": "linop.linearize",
    "backmap": "linop.hypersurface",
    "embed": "linop.reverse",
    "reconstruct": "linop.reverse",
    "solve": "linop.solvers",
    "verify": "linop.studies.verify",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'linop' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value  # cache: the next access does not come here
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
