"""Backend dispatch: the one place that decides numpy vs cupy and scipy vs cupyx.

Everything else in the library asks this module which array / sparse / linalg module
to use for the arrays it was given (the ``get_array_module`` pattern), and converts
between numpy / cupy arrays and torch tensors here.  cupy is optional: every import
of it is guarded, and ``cupy_available()`` tells tests whether GPU paths can run.
"""
from __future__ import annotations

from types import ModuleType
from typing import Any

import numpy as np
import scipy.sparse
import scipy.sparse.linalg
import torch

try:  # optional GPU backend
    import cupy as _cupy  # type: ignore
    import cupyx.scipy.sparse as _cupy_sparse  # type: ignore
    import cupyx.scipy.sparse.linalg as _cupy_sparse_linalg  # type: ignore

    try:
        _CUPY_OK = _cupy.cuda.runtime.getDeviceCount() > 0
    except Exception:  # cupy installed but no driver / device
        _CUPY_OK = False
except Exception:  # pragma: no cover - depends on the machine
    _cupy = None
    _cupy_sparse = None
    _cupy_sparse_linalg = None
    _CUPY_OK = False

__all__ = [
    "cupy_available",
    "get_array_module",
    "get_sparse_module",
    "get_sparse_linalg",
    "is_cupy",
    "to_numpy",
    "to_torch",
    "from_torch",
    "asarray_like",
]


def cupy_available() -> bool:
    """True when cupy imports and sees at least one CUDA device."""
    return _CUPY_OK


def is_cupy(a: Any) -> bool:
    """True for cupy arrays and cupyx sparse matrices."""
    if _cupy is None:
        return False
    return isinstance(a, _cupy.ndarray) or (_cupy_sparse is not None and _cupy_sparse.issparse(a))


def get_array_module(*arrays: Any) -> ModuleType:
    """numpy, or cupy if any argument lives on the GPU."""
    return _cupy if any(is_cupy(a) for a in arrays) else np


def get_sparse_module(*arrays: Any) -> ModuleType:
    """scipy.sparse, or cupyx.scipy.sparse if any argument lives on the GPU."""
    return _cupy_sparse if any(is_cupy(a) for a in arrays) else scipy.sparse


def get_sparse_linalg(*arrays: Any) -> ModuleType:
    """scipy.sparse.linalg, or cupyx.scipy.sparse.linalg for GPU arguments."""
    return _cupy_sparse_linalg if any(is_cupy(a) for a in arrays) else scipy.sparse.linalg


def to_numpy(a: Any) -> np.ndarray:
    """Host numpy copy (no copy for numpy input) of a numpy/cupy array or torch tensor."""
    if isinstance(a, torch.Tensor):
        return a.detach().cpu().numpy()
    if is_cupy(a):
        return a.get()
    return np.asarray(a)


def to_torch(a: Any, device: torch.device | str | None = None) -> torch.Tensor:
    """Zero-copy view of a numpy or cupy array as a torch tensor (cupy through DLPack)."""
    if isinstance(a, torch.Tensor):
        t = a
    elif is_cupy(a):
        t = torch.from_dlpack(a)
    else:
        arr = np.asarray(a)
        if not arr.flags.writeable or not (arr.flags.c_contiguous or arr.flags.f_contiguous):
            arr = np.ascontiguousarray(arr).copy()
        t = torch.from_numpy(arr)
    return t if device is None else t.to(device)


def from_torch(t: torch.Tensor, like: Any = None) -> Any:
    """Convert a tensor back to the array family of ``like`` (numpy by default)."""
    t = t.detach()
    if like is not None and is_cupy(like):
        return _cupy.from_dlpack(t.contiguous())
    return t.cpu().numpy()


def asarray_like(a: Any, like: Any) -> Any:
    """``a`` as an array of the same family (numpy/cupy) as ``like``."""
    xp = get_array_module(like)
    if xp is np:
        return to_numpy(a)
    return xp.asarray(a)
