"""One validation of what users hand the public entry points: unit selections, images,
batches, labels and compute dtypes.

Every public function that takes one of these (``backmap``, ``linearise``, ``reconstruct``,
the studies, the command line) calls the function here, so a bad value is refused the same
way everywhere: a ``ValueError`` / ``TypeError`` whose message starts with the argument's
name — never a silent cast that changes the numbers, never a deep traceback.

Rules
-----
* **Unit selections** (:func:`units`): ``None`` (all), a slice, integer indices (any integer
  dtype, a Python int, list, numpy array or tensor) or a boolean mask of exactly ``n``
  entries (its ``True`` positions).  Floats (even ``1.0``), strings, ``bool`` scalars,
  out-of-range, negative and duplicate indices and an empty selection are refused.
* **Images / batches** (:func:`image`, :func:`batch`): real numbers only; float16 / bfloat16
  are refused like ``from_torch`` refuses them (the exact identities need float32/64);
  integer and bool images are cast to the compute dtype (exact: |value| < 2**24 in float32,
  2**53 in float64 — checked); NaN / Inf are refused (the activation pattern of a
  non-finite input means nothing).  A batch must hold at least one sample.
* **Labels** (:func:`labels`): integers in ``[0, n_classes)``, one per sample.
* **Dtypes** (:func:`dtype`): float32 or float64 (numpy / torch dtypes or their names).
* **Devices** (:func:`device`): ``None`` / ``"cpu"``, ``"cuda"``, ``"cuda:k"`` or a
  ``torch.device``; a CUDA device must exist on this machine.
"""
from __future__ import annotations

from typing import Any

import numpy as np
import torch

__all__ = ["units", "dtype", "device", "image", "batch", "labels", "finite"]

_FLOATS = {"float32": torch.float32, "float64": torch.float64, "double": torch.float64, "float": torch.float32}
_REFUSED_FLOATS = (torch.float16, torch.bfloat16)


def dtype(value: Any, name: str = "dtype") -> torch.dtype:
    """The torch compute dtype of ``value`` (float32 / float64, as a torch or numpy dtype or
    a name); ValueError naming ``name`` for float16, bfloat16, integers, complex, …"""
    if isinstance(value, torch.dtype):
        dt = value
    elif isinstance(value, str) and value.replace("torch.", "") in _FLOATS:
        dt = _FLOATS[value.replace("torch.", "")]
    else:
        try:
            npdt = np.dtype(value)
        except TypeError:
            raise TypeError(f"{name} must be float32 or float64, got {value!r}") from None
        dt = {np.dtype(np.float32): torch.float32, np.dtype(np.float64): torch.float64}.get(npdt)
        if dt is None:
            raise ValueError(f"{name} must be float32 or float64, got {npdt}")
    if dt not in (torch.float32, torch.float64):
        raise ValueError(f"{name} must be float32 or float64, got {dt} (float16 / bfloat16 lose the exactness "
                         "the identities rest on; integer / complex dtypes are not compute dtypes)")
    return dt


def device(value: Any, name: str = "device") -> torch.device:
    """``None`` (CPU), ``"cpu"``, ``"cuda"``, ``"cuda:k"`` or a ``torch.device``, validated: a
    CUDA device needs CUDA on this machine and an existing index (else one clear line, not a
    failure deep inside the first kernel)."""
    if value is None:
        return torch.device("cpu")
    try:
        dev = torch.device(value)
    except (RuntimeError, TypeError, ValueError):
        raise ValueError(f"{name} must be 'cpu', 'cuda' or 'cuda:k', got {value!r}") from None
    if dev.type == "cpu":
        return dev
    if dev.type != "cuda":
        raise ValueError(f"{name} must be 'cpu', 'cuda' or 'cuda:k', got {value!r}")
    if not torch.cuda.is_available():
        raise ValueError(f"{name} {value!r}: CUDA is not available on this machine (torch "
                         f"{torch.__version__}); use 'cpu'")
    if dev.index is not None and dev.index >= torch.cuda.device_count():
        raise ValueError(f"{name} {value!r}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    return dev


def _as_tensor(value: Any, name: str) -> torch.Tensor:
    if isinstance(value, torch.Tensor):
        return value
    if isinstance(value, (str, bytes, dict, set)) or value is None:
        raise TypeError(f"{name} must be an array or tensor of numbers, got {type(value).__name__}")
    try:
        arr = np.asarray(value)
    except (ValueError, TypeError) as exc:  # ragged nesting and the like
        raise ValueError(f"{name} is not a rectangular array of numbers ({exc})") from None
    if arr.dtype.kind not in "biuf":
        raise TypeError(f"{name} must hold real numbers, got dtype {arr.dtype}")
    if arr.dtype == np.float16:
        raise ValueError(f"{name} has dtype float16; pass float32 or float64 (float16 loses the exactness "
                         "the identities rest on)")
    return torch.as_tensor(arr)


def finite(t: torch.Tensor, name: str) -> torch.Tensor:
    """``t`` unchanged; ValueError naming ``name`` when it holds NaN or Inf."""
    if t.is_floating_point() and t.numel() and not bool(torch.isfinite(t).all()):
        bad = int((~torch.isfinite(t)).sum())
        raise ValueError(f"{name} holds {bad} NaN / Inf value(s); the activation pattern, hence every "
                         "result, of a non-finite input is meaningless")
    return t


def image(value: Any, to: Any = None, name: str = "x") -> torch.Tensor:
    """``value`` as a finite real tensor in the compute dtype ``to`` (kept when None).

    Refuses (naming ``name``): non-numeric / complex values (TypeError), float16 / bfloat16
    and NaN / Inf (ValueError), integers too large to be exact in ``to`` (ValueError).
    The shape is the caller's to check (single-point and batch APIs differ)."""
    t = _as_tensor(value, name)
    if t.is_complex():
        raise TypeError(f"{name} must hold real numbers, got dtype {t.dtype}")
    if t.dtype in _REFUSED_FLOATS:
        raise ValueError(f"{name} has dtype {t.dtype}; pass float32 or float64 (like from_torch, the library "
                         "refuses half precision: it loses the exactness the identities rest on)")
    target = dtype(to, "dtype") if to is not None else None
    if not t.is_floating_point():
        if target is None:
            raise TypeError(f"{name} has integer dtype {t.dtype}; pass a float32 / float64 tensor or a dtype")
        if t.dtype != torch.bool and t.numel():
            limit = 2 ** (24 if target == torch.float32 else 53)  # the significand bits
            if int(t.abs().max()) > limit:
                raise ValueError(f"{name}: integer values beyond {limit} are not exact in {target}")
    else:
        finite(t, name)
    return t.to(target) if target is not None and t.dtype != target else t


def batch(value: Any, to: Any = None, name: str = "x", sample_ndim: int | None = None) -> torch.Tensor:
    """:func:`image` for a batch ``(N, *shape)``; also refuses an empty batch (N = 0).

    ``sample_ndim``: the number of axes of one sample (a batch has one more); a value with
    exactly ``sample_ndim`` axes is one sample and passes as it is."""
    t = image(value, to, name)
    if t.dim() == 0:
        raise ValueError(f"{name} must be a batch (N, *shape), got a scalar")
    if (sample_ndim is None or t.dim() == sample_ndim + 1) and t.shape[0] == 0:
        raise ValueError(f"{name} is an empty batch (N = 0): pass at least one sample")
    if t.numel() == 0:
        raise ValueError(f"{name} is empty (shape {tuple(t.shape)})")
    return t


def labels(value: Any, n: int, n_classes: int, name: str = "y") -> torch.Tensor:
    """Labels as an int64 tensor of shape ``(n,)`` with values in ``[0, n_classes)``."""
    if isinstance(value, (int, np.integer)) and not isinstance(value, bool) and n == 1:
        value = [value]
    t = _as_tensor(value, name)
    if t.is_floating_point() or t.is_complex() or t.dtype == torch.bool:
        raise ValueError(f"{name}: labels must be integers, got dtype {t.dtype}")
    if t.ndim != 1 or t.shape[0] != n:
        raise ValueError(f"{name}: labels must have shape ({n},) to match the batch, got {tuple(t.shape)}")
    if n and (int(t.min()) < 0 or int(t.max()) >= n_classes):
        bad = int(t[(t < 0) | (t >= n_classes)][0])
        raise ValueError(f"{name}: label {bad} out of range [0, {n_classes}) for an output of {n_classes} classes")
    return t.to(torch.int64)


def units(value: Any, n: int, name: str = "units", what: str = "unit indices") -> torch.Tensor:
    """A unit selection as a LongTensor of distinct indices in ``[0, n)`` (order kept).

    Parameters
    ----------
    value : None (all ``n``), a slice, an int, a sequence / array / tensor of integers, or a
        boolean mask of exactly ``n`` entries (its True positions, ascending).
    n : the number of selectable units.
    name, what : the argument's name and what its indices mean, for the messages.

    Raises
    ------
    TypeError
        Strings, bool scalars, floats given as a scalar, other objects.
    ValueError
        Float / non-integral indices, a mask of the wrong length, out-of-range, negative or
        duplicate indices, an empty selection.
    """
    if value is None:
        sel = torch.arange(n)
    elif isinstance(value, slice):
        sel = torch.arange(n)[value]
    elif isinstance(value, bool) or isinstance(value, np.bool_):
        raise TypeError(f"{name} must be indices or a boolean mask of {n} entries, got the scalar {value!r}")
    else:
        t = _as_tensor(value, name).reshape(-1)
        if t.numel() == 0:  # np.asarray([]) is float64: say "empty", not "floats"
            raise ValueError(f"{name} selects no unit (an empty selection); select at least one of {n}")
        if t.dtype == torch.bool:
            if t.numel() != n:
                raise ValueError(f"{name}: a boolean mask must have one entry per unit ({n}), got {t.numel()}")
            sel = torch.nonzero(t).reshape(-1)
        elif t.is_floating_point():
            raise ValueError(f"{name} must be integer {what} (or a boolean mask), got floats, e.g. "
                             f"{t[0].item()}; cast explicitly if they are integral")
        else:
            sel = t.to(torch.int64)
            if sel.numel() and (int(sel.min()) < 0 or int(sel.max()) >= n):
                raise ValueError(f"{name} must be {what} in [0, {n}), got values in "
                                 f"[{int(sel.min())}, {int(sel.max())}]")
    if sel.numel() == 0:
        raise ValueError(f"{name} selects no unit (an empty selection); select at least one of {n}")
    if torch.unique(sel).numel() != sel.numel():
        vals, counts = torch.unique(sel, return_counts=True)
        raise ValueError(f"{name} repeats indices {vals[counts > 1][:5].tolist()}; select each unit once")
    return sel
