"""Receptive-field geometry: which image pixels each unit of a node can depend on.

Row ``u`` of a node's Jacobian w.r.t. the image is supported on ``u``'s receptive field.
Every node kind maps its inputs' per-unit *support boxes* (image rows / columns, inclusive)
to its own (:meth:`linop.network.Node.geometry`); the generic rule reads the structural
sparsity of an x-independent operator whose pattern contains every linearisation's
(:func:`structural_boxes`).  :class:`Window` adds the uniform window size ``(r_y, r_x)`` of a
node and per-unit window origins, from which the compressed-window sweep
(:mod:`linop.linearize`) derives its periods.  The geometry never depends on x, so a network
computes it once per image shape (:meth:`EquivalentNetwork.geometry`).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence

import numpy as np
import torch

from ..operators.base import Operator

__all__ = ["Window", "window_of", "full_window", "pixel_boxes", "structural_boxes", "union_boxes", "EMPTY_LO"]

#: the ``lo`` of an empty box (``lo > hi``): no pixel reaches the unit
EMPTY_LO = np.iinfo(np.int64).max // 4


@dataclass
class Window:
    """Per-unit support boxes and the node's uniform window.

    Attributes
    ----------
    box : (4, U) int64 — ``ymin, ymax, xmin, xmax`` per unit (empty rows have ``lo > hi``).
    ry, rx : the window size (largest box, capped at the image).
    oy, ox : (U,) int64 tensors — per-unit window origins (clipped into the image).
    cache : x-independent index tensors derived from the window (recolour gathers,
        densification masks), keyed by their parameters; owned by this object.
    """

    box: np.ndarray
    ry: int
    rx: int
    oy: torch.Tensor
    ox: torch.Tensor
    cache: dict = field(default_factory=dict, repr=False)


def window_of(box: np.ndarray, H: int, W: int) -> Window:
    """The :class:`Window` of support boxes ``box`` in an ``H × W`` image."""
    ymin, ymax, xmin, xmax = box
    nonempty = ymin <= ymax
    ry = int(min(H, max(1, int((ymax - ymin + 1)[nonempty].max(initial=1)))))
    rx = int(min(W, max(1, int((xmax - xmin + 1)[nonempty].max(initial=1)))))
    oy = np.where(nonempty, np.clip(ymin, 0, H - ry), 0)
    ox = np.where(nonempty, np.clip(xmin, 0, W - rx), 0)
    return Window(box, ry, rx, torch.from_numpy(oy.astype(np.int64)), torch.from_numpy(ox.astype(np.int64)))


def full_window(U: int, H: int, W: int) -> Window:
    """The trivial window of ``U`` units: the whole ``H × W`` image (no geometry needed; what
    the dense identity batch of seed 000 Algorithm 1 assumes)."""
    box = np.array([[0], [H - 1], [0], [W - 1]], dtype=np.int64).repeat(U, axis=1)
    zero = torch.zeros(U, dtype=torch.int64)
    return Window(box, H, W, zero, zero.clone())


def pixel_boxes(C: int, H: int, W: int) -> np.ndarray:
    """The boxes of the image itself: pixel ``(c, y, x)`` depends on ``(y, x)`` only."""
    _, y, x = np.meshgrid(np.arange(C), np.arange(H), np.arange(W), indexing="ij")
    return np.stack([y.ravel(), y.ravel(), x.ravel(), x.ravel()]).astype(np.int64)


def _reduce_rows(vals: np.ndarray, indptr: np.ndarray, ufunc, empty: int) -> np.ndarray:
    out = np.full(len(indptr) - 1, empty, dtype=np.int64)
    nz = np.diff(indptr) > 0
    if nz.any():
        out[nz] = ufunc.reduceat(vals, indptr[:-1][nz])
    return out


def structural_boxes(op: Operator, boxes: Sequence[np.ndarray]) -> np.ndarray:
    """The generic rule: a unit's box is the union of the boxes of the inputs its row of
    ``op`` reads (``op`` maps the stacked inputs, so ``boxes`` are concatenated)."""
    indptr, indices = op.structure
    src = np.concatenate(list(boxes), axis=1) if len(boxes) > 1 else boxes[0]
    return np.stack([
        _reduce_rows(src[0][indices], indptr, np.minimum, EMPTY_LO),
        _reduce_rows(src[1][indices], indptr, np.maximum, -1),
        _reduce_rows(src[2][indices], indptr, np.minimum, EMPTY_LO),
        _reduce_rows(src[3][indices], indptr, np.maximum, -1),
    ])


def union_boxes(boxes: Sequence[np.ndarray]) -> np.ndarray:
    """Unit-wise union of equally shaped box arrays (the boxes of a sum)."""
    b = boxes[0].copy()
    for o in boxes[1:]:
        np.minimum(b[0], o[0], out=b[0])
        np.maximum(b[1], o[1], out=b[1])
        np.minimum(b[2], o[2], out=b[2])
        np.maximum(b[3], o[3], out=b[3])
    return b

