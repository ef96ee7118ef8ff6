"""Small shared helpers of the core: memory budgets and JSON-able values.

One definition each (the duplicates the redesign removed): ``parse_memory`` / ``gib`` for
every memory budget, ``jsonable`` for every results file and report.
"""
from __future__ import annotations

import math
import re
from pathlib import Path
from typing import Any, Mapping

import numpy as np

__all__ = ["parse_memory", "gib", "jsonable"]

_UNITS = {"": 1, "b": 1, "k": 2**10, "kb": 10**3, "kib": 2**10, "m": 2**20, "mb": 10**6, "mib": 2**20,
          "g": 2**30, "gb": 10**9, "gib": 2**30, "t": 2**40, "tb": 10**12, "tib": 2**40}


def parse_memory(budget: Any, name: str = "memory_budget") -> int:
    """``"2GiB"`` / ``"500MB"`` / ``1_000_000`` (bytes) -> bytes (int > 0)."""
    if isinstance(budget, (int, np.integer)) and not isinstance(budget, bool):
        n = int(budget)
    elif isinstance(budget, float) and math.isfinite(budget):
        n = int(budget)
    elif isinstance(budget, str):
        m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([A-Za-z]*)\s*", budget)
        if not m or m.group(2).lower() not in _UNITS:
            raise ValueError(f"{name} must be a byte count or a string like '2GiB' / '500MB', got {budget!r}")
        n = int(float(m.group(1)) * _UNITS[m.group(2).lower()])
    else:
        raise ValueError(f"{name} must be a byte count or a string like '2GiB' / '500MB', got {budget!r}")
    if n <= 0:
        raise ValueError(f"{name} must be positive, got {budget!r}")
    return n


def gib(nbytes: float) -> str:
    """A byte count as a short GiB string (for refusals that state a size)."""
    return f"{nbytes / 2**30:.3g} GiB"


def jsonable(obj: Any, max_items: int | None = None) -> Any:
    """``obj`` as plain JSON values: numpy / torch scalars and arrays become Python numbers and
    lists, non-finite floats become strings (JSON has no inf / nan), paths become strings.

    ``max_items``: arrays with more entries are summarised as ``{"mean", "max"}`` (the
    per-step solver figures of a reconstruction); ``None`` keeps everything."""
    if isinstance(obj, Mapping):
        return {str(k): jsonable(v, max_items) for k, v in obj.items()}
    if type(obj).__module__ == "torch" and hasattr(obj, "detach"):
        obj = obj.detach().cpu().numpy()
    if isinstance(obj, np.ndarray):
        if max_items is not None and obj.size > max_items:
            return {"mean": jsonable(float(obj.mean())), "max": jsonable(float(obj.max()))}
        return jsonable(obj.tolist(), max_items)
    if isinstance(obj, (list, tuple)):
        items = [jsonable(v, max_items) for v in obj]
        return items if max_items is None else items[:max_items]
    if isinstance(obj, (bool, np.bool_)):
        return bool(obj)
    if isinstance(obj, (int, np.integer)):
        return int(obj)
    if isinstance(obj, (float, np.floating)):
        f = float(obj)
        return f if math.isfinite(f) else str(f)
    if isinstance(obj, Path):
        return str(obj)
    if obj is None or isinstance(obj, str):
        return obj
    return repr(obj)
