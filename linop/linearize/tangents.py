r"""Compressed forward-mode tangents: the state of the sweep and its per-node step.

Tangent ``(c, a, b)`` of a node at period ``P`` is the sum of the image columns
``(c, y, x)`` of its Jacobian with ``y ≡ a (mod P_y)``, ``x ≡ b (mod P_x)`` (Curtis–Powell–Reid
colouring, ``T = J S_P``); inside a unit's window every residue occurs once, so the
compression is lossless (see :mod:`linop.linearize`).  The bias columns are kept dense, as
tangents that start where each bias enters.  :func:`step` pushes both through a node by
applying the node's *own local operator* (:meth:`linop.network.Node.linearize`) to the
tangent batches — the fast path evaluates the operators, it has no rules of its own.
"""
from __future__ import annotations

import weakref
from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch

from ..network.geometry import Window
from ..operators.base import Operator
from ..operators.composite import apply_parts as _apply_parts
from ..operators.elementwise import Diagonal

__all__ = ["CHANNELS_LAST", "State", "input_state", "step", "apply_parts", "recolour", "merge_bias", "spatial_groups"]


#: keep 4-D tangent batches ``(n, C, H, W)`` channels-last on the CPU: torch's convolutions run
#: 1.2–1.7× faster on them (float32, oneDNN), and every other step (elementwise slopes, sums, the recolour gather, ``dot``) reads them in
#: place.  A layout, not a different computation: every op is layout-agnostic in value.
CHANNELS_LAST = True


def batch_layout(T: torch.Tensor) -> torch.Tensor:
    """``T`` in the sweep's memory format (channels-last for 4-D CPU batches when
    :data:`CHANNELS_LAST`; no copy when it already is)."""
    if CHANNELS_LAST and T.dim() == 4 and T.device.type == "cpu":
        return T.contiguous(memory_format=torch.channels_last)
    return T


@dataclass
class State:
    """Forward-mode state of one node: compressed image tangents and dense bias tangents."""

    Ti: torch.Tensor  # (nc·Py·Px, *shape)
    P: tuple[int, int]
    Tb: torch.Tensor  # (nb, *shape)
    cols: torch.Tensor  # (nb,) int64, sorted indices into x_b


def input_state(shape: tuple[int, ...], image: tuple[int, int, int], chans: torch.Tensor, P: tuple[int, int],
                dtype: torch.dtype, device: torch.device) -> State:
    """The input's tangents at period ``P``: ``T[(i, a, b), c, y, x] = 1`` iff ``c = chans[i]``,
    ``y ≡ a``, ``x ≡ b`` (``P = (1, 1)``: one tangent per channel; ``P = (H, W)``: the identity)."""
    C, H, W = image
    nc = chans.numel()
    Py, Px = P
    T = torch.zeros((nc, Py, Px, C, H, W), dtype=dtype, device=device)
    i = torch.arange(nc, device=device).view(nc, 1, 1)
    y = torch.arange(H, device=device).view(1, H, 1)
    x = torch.arange(W, device=device).view(1, 1, W)
    T[i, y % Py, x % Px, chans.to(device).view(nc, 1, 1), y, x] = 1.0
    Ti = batch_layout(T.reshape((nc * Py * Px,) + tuple(shape)))
    return State(Ti, P, Ti.new_zeros((0,) + tuple(shape)), torch.zeros(0, dtype=torch.long, device=device))


def apply_parts(op: Operator, xs: Sequence[torch.Tensor | None]) -> torch.Tensor:
    """``Σ_i A_i x_i`` of the node's local operator on tangent batches, by the operator's own
    torch path; a diagonal (slope) operator on a channels-last batch multiplies in that layout."""
    if len(xs) == 1 and xs[0] is not None:
        x = xs[0]
        if isinstance(op, Diagonal) and type(op)._apply is Diagonal._apply and x.dim() == 4 \
                and not x.is_contiguous() and x.is_contiguous(memory_format=torch.channels_last):
            # the same products x ⊙ d, with d in x's layout (a mismatched broadcast is ~1.5× slower)
            return x * _diag_like(op, x)
    return _apply_parts(op, xs)


#: per diagonal operator, its diagonal as a channels-last ``(1, C, H, W)`` tensor, by dtype / device
_DIAG_CL: "weakref.WeakKeyDictionary[Operator, dict]" = weakref.WeakKeyDictionary()


def _diag_like(op: Operator, x: torch.Tensor) -> torch.Tensor:
    cache = _DIAG_CL.setdefault(op, {})
    key = (x.dtype, x.device)
    d = cache.get(key)
    if d is None:
        d = op._param("diag", x).reshape((1,) + tuple(x.shape[1:])).contiguous(memory_format=torch.channels_last)
        cache[key] = d
    return d


def bias_columns(op: Operator) -> np.ndarray:
    """Sorted entries of ``x_b`` that a bias-reading node's operator reads (its last part)."""
    return op.part_columns(-1)


def step(op: Operator, n_inputs: int, reads_bias: bool, Tis: Sequence[torch.Tensor], ins: Sequence[State],
         P: tuple[int, int], n_bias: int, bias: bool = True) -> State:
    """Push the (recoloured) image tangents ``Tis`` and the bias tangents of ``ins`` through the
    local operator ``op`` of a node (``n_inputs`` inputs, plus ``x_b`` when ``reads_bias``).

    Image part: ``Σ_i A_i T_i`` (``x_b``'s image tangents are zero).  Bias part: the inputs' bias
    tangents expanded to the union of their columns, pushed through the same ``A_i``, plus ``A_b``
    applied to the unit vectors of the columns it reads (new tangents start here)."""
    pad = [None] * int(reads_bias)
    Ti = apply_parts(op, list(Tis) + pad)
    out_shape = tuple(Ti.shape[1:])
    Tb, cols = None, Ti.new_zeros(0, dtype=torch.long)
    if any(s.cols.numel() for s in ins):
        if n_inputs == 1:
            cols, Tbs = ins[0].cols, [ins[0].Tb]
        else:  # every input's bias tangents over the union of their columns (zeros where absent)
            cols, Tbs = merge_bias([(s.Tb, s.cols) for s in ins], Ti)
        Tb = apply_parts(op, Tbs + pad)
    if reads_bias and bias:
        newc = torch.from_numpy(bias_columns(op)).to(Ti.device)
        if newc.numel():
            E = Ti.new_zeros((newc.numel(), n_bias))
            E[torch.arange(newc.numel(), device=Ti.device), newc] = 1.0
            Rb = apply_parts(op, [None] * n_inputs + [E])  # A_b on unit bias vectors
            if Tb is None:
                Tb, cols = Rb, newc
            elif int(cols.max()) < int(newc[0]):  # the usual case: the new biases come last
                Tb, cols = torch.cat([Tb, Rb]), torch.cat([cols, newc])
            else:
                cols, (A, B) = merge_bias([(Tb, cols), (Rb, newc)], Ti)
                Tb = A + B
    if Tb is None:
        Tb = Ti.new_zeros((0,) + out_shape)
    return State(batch_layout(Ti), P, batch_layout(Tb), cols)


def spatial_groups(g: Window, shape: tuple[int, ...]) -> tuple[int, int]:
    """``(G, S)`` with ``U = G·S`` such that the window origins depend on the last ``S`` (spatial)
    positions only — true for every conv/pool/activation output (all channels of a position
    share the receptive field), which shrinks every x-independent index by the channel count."""
    U = int(np.prod(shape))
    key = ("groups", tuple(shape))
    hit = g.cache.get(key)
    if hit is None:
        hit = (1, U)
        if len(shape) == 3 and shape[0] > 1:
            G, S = int(shape[0]), int(shape[1] * shape[2])
            oy, ox = g.oy.reshape(G, S), g.ox.reshape(G, S)
            if bool((oy == oy[:1]).all()) and bool((ox == ox[:1]).all()):
                hit = (G, S)
        g.cache[key] = hit
    return hit


def _recolour_index(g: Window, P: tuple[int, int], Pn: tuple[int, int], S: int, dev: torch.device) -> torch.Tensor:
    """(Pn_y·Pn_x, S) source colour ``a·P_x + b`` of every new colour per spatial unit, or
    ``P_y·P_x`` (a zero slot) where the new residue falls outside the unit's window.  Cached:
    the geometry does not depend on x, so a verification study over many images builds it once."""
    key = ("recolour", P, Pn, S, str(dev))
    hit = g.cache.get(key)
    if hit is not None:
        return hit

    def idx(Pold: int, Pnew: int, o: torch.Tensor, r: int) -> torch.Tensor:
        a = torch.arange(Pnew)[:, None]
        o = o[None, :S]
        d = torch.remainder(a - o, Pnew)  # offset in the window of the pixel with residue a
        return torch.where(d < r, torch.remainder(o + d, Pold), torch.full_like(d, -1))

    IY = idx(P[0], Pn[0], g.oy, g.ry)
    IX = idx(P[1], Pn[1], g.ox, g.rx)
    flat = IY[:, None, :] * P[1] + IX[None, :, :]
    zero = P[0] * P[1]
    flat = torch.where((IY[:, None, :] < 0) | (IX[None, :, :] < 0), torch.full_like(flat, zero), flat)
    hit = flat.reshape(Pn[0] * Pn[1], S).to(dev)
    g.cache[key] = hit
    return hit


def recolour(Ti: torch.Tensor, nc: int, P: tuple[int, int], Pn: tuple[int, int], g: Window) -> torch.Tensor:
    """Re-compress tangents from period ``P`` to ``Pn >= P`` (exact; needs ``g.r <= P``).

    One gather along the colour axis with a cached ``(Pn², S)`` index broadcast over image
    channels and feature channels (no per-call index arithmetic, no ``Pn²·U`` index)."""
    if P == Pn:
        return Ti
    shape = tuple(Ti.shape[1:])
    G, S = spatial_groups(g, shape)
    idx = _recolour_index(g, P, Pn, S, Ti.device)
    if len(shape) == 3 and G == shape[0] and not Ti.is_contiguous() \
            and Ti.is_contiguous(memory_format=torch.channels_last):
        # channels-last (n, H, W, C) memory: the same gather on the (nc, colours, S, G) view
        T = Ti.permute(0, 2, 3, 1).reshape(nc, P[0] * P[1], S, G)
        Tp = torch.cat([T, T.new_zeros(nc, 1, S, G)], 1)
        out = torch.gather(Tp, 1, idx.view(1, -1, S, 1).expand(nc, -1, S, G))
        return out.reshape((nc * Pn[0] * Pn[1], shape[1], shape[2], G)).permute(0, 3, 1, 2)
    T = Ti.reshape(nc, P[0] * P[1], G, S)
    Tp = torch.cat([T, T.new_zeros(nc, 1, G, S)], 1)  # colour P_y·P_x is the zero slot
    out = torch.gather(Tp, 1, idx.view(1, -1, 1, S).expand(nc, -1, G, S))
    return out.reshape((nc * Pn[0] * Pn[1],) + shape)


def merge_bias(parts: Sequence[tuple[torch.Tensor, torch.Tensor]], like: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """Union of bias column sets; each part expanded to the union's rows."""
    cols = torch.unique(torch.cat([c for _, c in parts])) if parts else like.new_zeros(0, dtype=torch.long)
    out: list[torch.Tensor] = []
    for T, c in parts:
        if c.numel() == cols.numel() and torch.equal(c, cols):
            out.append(T)
        else:
            E = T.new_zeros((cols.numel(),) + tuple(T.shape[1:]))
            if c.numel():
                E.index_copy_(0, torch.searchsorted(cols, c), T)
            out.append(E)
    return cols, out
