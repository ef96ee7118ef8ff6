"""Optimal embedding of category labels into the output space (seed 001 §3.3).

Given the network output ``â_L`` and a label ``y*``, find the output vector closest to
``â_L`` whose entry ``y*`` is a maximum (problem 21)::

    min_a ||a − â_L||_N   s.t.  a_{y*} ≥ a_i  for all i ≠ y*.

* **MA** (maximum assignment, Eq. 22) — the L1 optimum: ``a_{y*} = max_i â_i``, every
  other entry unchanged (proof: Eq. 23).
* **NE** (nearest embedding, Algorithm 1, Eqs. 26–33) — the L2 optimum.  With
  ``d_i = â_i − â_{y*}`` sorted decreasingly and ``c_w = Σ_{s≤w} d_s``, the active set
  ``I_3`` is the longest prefix with ``(w+1)·d_w > c_w`` (formula 33; the quantity
  ``w·d_w − c_{w−1}`` is non-increasing in ``w``, so that set really is a prefix and the
  count of indices satisfying it *is* ``|I_3|``).  Then, with the common value
  ``t = â_{y*} + c_{|I_3|}/(|I_3|+1)`` (Eqs. 26, 30, 31)::

      a_{y*} = t,    a_i = min(â_i, t)  (i ≠ y*),

  because every index of ``I_3`` has ``â_i > t`` and every other index ``â_i ≤ t``.  The
  multipliers are ``μ_i = 2(â_i − a_i) ≥ 0`` (Eq. 27).  Writing the answer with ``min``
  makes the argmax constraint hold *exactly* in floating point, keeps ties exact, and
  returns ``â`` unchanged (bit for bit) when ``y*`` is already a maximum (``t = â_{y*}``).

* **one-hot** — the ablation baseline of seed 001 §4.2: ``a_{y*} = 1``, every other entry 0
  (independent of ``â_L``).

Everything is vectorised over the batch (one sort, one cumsum).  **Return rule** (the same
as :func:`linop.solvers.solve`): numpy in → numpy out, torch → torch on its device and
dtype, cupy → cupy; a batch ``(N, n)`` gives a batch, one sample ``(n,)`` gives one sample.
"""
from __future__ import annotations

from typing import Any

import numpy as np
import torch

from .. import backend

__all__ = ["embed", "EMBEDDINGS", "nearest_embedding", "maximum_assignment", "one_hot", "ne_multipliers"]

#: The embeddings by their canonical names (``reconstruct(embedding=...)``); :func:`embed` also
#: accepts the norms "l2" (= "ne") and "l1" (= "ma").
EMBEDDINGS = ("ne", "ma", "onehot")
_NORMS = {"l2": "ne", "ne": "ne", "l1": "ma", "ma": "ma", "onehot": "onehot"}


def _as_torch_batch(a_hat: Any, y: Any) -> tuple[torch.Tensor, torch.Tensor, bool]:
    """Validate inputs; return (a (N, n) float tensor, y (N,) int64 tensor, squeeze flag)."""
    if isinstance(a_hat, (list, tuple)):
        a_hat = np.asarray(a_hat, dtype=np.float64)
    if not (isinstance(a_hat, torch.Tensor) or isinstance(a_hat, np.ndarray) or backend.is_cupy(a_hat)):
        raise ValueError(f"embed: a_hat must be a numpy array, torch tensor or cupy array, got {type(a_hat).__name__}")
    a = backend.to_torch(a_hat)
    if not a.is_floating_point():
        raise ValueError(f"embed: a_hat must be floating point, got dtype {a.dtype}")
    squeeze = a.ndim == 1
    if squeeze:
        a = a.unsqueeze(0)
    if a.ndim != 2 or a.shape[1] < 1:
        raise ValueError(f"embed: a_hat must have shape (N, n_classes) or (n_classes,), got {tuple(a.shape)}")
    if not bool(torch.isfinite(a).all()):
        bad = (~torch.isfinite(a)).any(dim=1).nonzero().flatten()[:5].tolist()
        raise ValueError(f"embed: a_hat contains NaN or inf (first bad rows: {bad})")
    N, n = a.shape
    if isinstance(y, torch.Tensor):
        yt = y.detach()
    else:
        yt = torch.from_numpy(np.array(backend.to_numpy(y)))
    if yt.is_floating_point() or yt.is_complex() or yt.dtype == torch.bool:
        raise ValueError(f"embed: labels y must be integers, got dtype {yt.dtype}")
    if yt.ndim == 0:
        yt = yt.expand(N)
    if yt.ndim != 1 or yt.shape[0] != N:
        raise ValueError(f"embed: labels y must have shape ({N},) to match a_hat {tuple(a.shape)}, got {tuple(yt.shape)}")
    yt = yt.to(device=a.device, dtype=torch.int64)
    if N and (int(yt.min()) < 0 or int(yt.max()) >= n):
        bad = int(yt[(yt < 0) | (yt >= n)][0])
        raise ValueError(f"embed: y: label {bad} out of range [0, {n}) for {n} classes")
    return a, yt, squeeze


def _return_like(out: torch.Tensor, like: Any, squeeze: bool) -> Any:
    if squeeze:
        out = out[0]
    if isinstance(like, torch.Tensor):
        return out
    return backend.from_torch(out, like=like)


def maximum_assignment(a: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """MA (Eq. 22) on validated tensors: ``a_{y*} ← max_i â_i``."""
    out = a.clone()
    out.scatter_(1, y[:, None], a.max(dim=1, keepdim=True).values)
    return out


def nearest_embedding(a: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """NE (Algorithm 1) on validated tensors, vectorised over the batch."""
    N, n = a.shape
    a_y = a.gather(1, y[:, None])  # (N, 1)
    d = a - a_y  # step 2; d_{y*} = 0 never enters the positive prefix
    d_sorted = torch.sort(d, dim=1, descending=True).values  # step 3
    c = torch.cumsum(d_sorted, dim=1)  # step 4
    w = torch.arange(1, n + 1, device=a.device, dtype=a.dtype)
    # step 6: formula 33 — (w+1) d_w > c_w holds exactly on the prefix w ≤ |I_3|
    k = ((w + 1) * d_sorted > c).sum(dim=1, keepdim=True)  # |I_3|, (N, 1)
    c_k = torch.where(k > 0, c.gather(1, (k - 1).clamp_min(0)), torch.zeros_like(a_y))
    t = a_y + c_k / (k + 1).to(a.dtype)  # Eqs. 26, 31
    out = torch.minimum(a, t)  # Eq. 27 with μ from Eq. 30: I_3 entries drop to t, others stay
    out.scatter_(1, y[:, None], t)
    return out


def one_hot(a: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """The one-hot code of ``y`` (seed 001 §4.2 ablation) in ``a``'s shape, dtype and device."""
    return torch.zeros_like(a).scatter_(1, y[:, None], 1.0)


_EMBEDDERS = {"ne": nearest_embedding, "ma": maximum_assignment, "onehot": one_hot}


def embed(a_hat: Any, y: Any, norm: str = "l2") -> Any:
    """Optimal embedding of labels ``y`` into the output space (seed 001 §3.3, problem 21).

    Parameters
    ----------
    a_hat : array (N, n_classes) or (n_classes,)
        Forward network outputs ``â_L`` (numpy, torch on any device, or cupy; float).
    y : int array (N,) or int
        Target labels ``y*`` in ``[0, n_classes)``.
    norm : {"l2", "ne", "l1", "ma", "onehot"}
        ``"l2"``/``"ne"``: nearest embedding (Algorithm 1, Eqs. 26–33), the L2 optimum.
        ``"l1"``/``"ma"``: maximum assignment (Eq. 22), an L1 optimum (Eq. 23).
        ``"onehot"``: the one-hot code of ``y*`` (the §4.2 ablation; ignores ``â_L``'s values).

    Returns
    -------
    a_star : same type, device, dtype and shape as ``a_hat`` (the return rule above)
        ``a*_L`` with ``a*_{y*} ≥ a*_i`` for all i, exactly.  For "ne"/"ma", rows whose label
        is already a maximum are returned unchanged.

    Raises
    ------
    ValueError
        Unknown norm, wrong shapes, non-integer or out-of-range labels, NaN/inf in ``a_hat``.
    """
    key = _NORMS.get(str(norm).lower()) if isinstance(norm, str) else None
    if key is None:
        raise ValueError(f"embed: norm must be one of 'l2'/'ne', 'l1'/'ma' or 'onehot', got {norm!r}")
    a, yt, squeeze = _as_torch_batch(a_hat, y)
    return _return_like(_EMBEDDERS[key](a, yt), a_hat, squeeze)


def ne_multipliers(a_hat: Any, a_star: Any, y: Any) -> Any:
    """KKT multipliers ``μ_i = 2(â_i − a*_i)`` (Eq. 27) of an embedding, with ``μ_{y*} = 0``.

    Returned in the type of ``a_hat``; useful to check conditions (25b)–(25e).
    """
    a, yt, squeeze = _as_torch_batch(a_hat, y)
    s = backend.to_torch(a_star).reshape(a.shape).to(a)
    mu = 2.0 * (a - s)
    mu.scatter_(1, yt[:, None], 0.0)
    return _return_like(mu, a_hat, squeeze)
