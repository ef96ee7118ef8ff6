r"""Linearisation of an equivalent network at a point: Jacobians w.r.t. ``[x; x_b]``.

Seed 000, appendix C: at a fixed input the network is the composition of fixed linear maps
(convolutions, pooling, pads, restrictions ``R_l``) and fixed diagonal/selection maps (the
activation slopes ``Σ_l`` and the max-pool argmax selections), so

.. math::  J_0 = [W_0, R_0], \qquad J_l = W_l \Sigma_{l-1} J_{l-1} + [0, R_l],

with residual sums adding Jacobians and concatenations stacking them.  Because every piece
is positively homogeneous in the extended input, ``c_l(x) = J_l [x; x_b]`` exactly (Eq. 3)
and ``J`` evaluated at ``z = k·[x; x_b]`` (any ``k > 0``) is the same matrix.

Representation: *compressed windows* (per-unit receptive-field windows)
-----------------------------------------------------------------------
Row ``u`` of ``J_l`` (w.r.t. the image) is supported on ``u``'s receptive field, a window of
the image.  For every node we compute, once per network and from the operators' structural
sparsity (``Operator.to_sparse``), a bounding box of each unit's support, and a uniform
window size ``r = (r_y, r_x)`` per node (the largest box, capped at the image).  The image
part of the Jacobian of a node is stored *compressed with period* ``P >= r`` (Curtis–Powell–
Reid colouring): tangent ``(c, a, b)`` is the sum of the image columns ``(c, y, x)`` with
``y ≡ a (mod P_y)``, ``x ≡ b (mod P_x)``, i.e. ``T = J S_P``.  Since ``u``'s window holds every
residue class at most once, ``J[u, (c, y, x)] = T[(c, y mod P_y, x mod P_x), u]`` inside the
window and 0 outside: the compression is lossless.  ``T`` propagates *exactly* like any
batch of forward-mode tangents (every node's own ``apply``), with ``C·P_y·P_x`` tangents
instead of the ``C·H·W`` of the identity batch (75 instead of 3,072 at VGG7's Conv1).
Before a node whose period exceeds its input's, the input is *recoloured* (one exact gather
with an x-independent, cached ``(P², S)`` index shared by all feature channels).  Which period
each node gets is a *schedule* (:meth:`Linearisation.periods`): a cost model (conv MACs vs
gathered elements) may skip intermediate raises, or jump to ``P = (H, W)`` — the paper's dense
identity-batch Jacobian — where the gathers would cost more than the extra tangents; a
recoloured residual input is kept for its later consumers, so no gather is repeated.  The bias
part (``n_b`` columns) is kept dense, as forward-mode tangents that start at the node where each
bias enters (the bias part of layer ``l`` involves only biases of layers ``< l``).

Densification (:meth:`LayerJacobian.image`, the RM2 layout ``(U, C, H, W)``) is one 2-D
transposed copy of the tangents plus, while ``P < (H, W)``, one gather with a cached colour
index (pixels outside a window read an exact structural zero), optionally into a reused
preallocated ``out`` buffer.  In the dense regime it is the transposed copy alone.

The reverse mode (vector–Jacobian products through the same linearised graph, adjoints
``apply_adjoint``) is provided too: it is what a few units (sampled rows, FC outputs, RM1 /
RM3 / RM4) need, and it cross-checks the forward representation.
"""
from __future__ import annotations

import math
import weakref
from dataclasses import dataclass, field
from typing import Any, Iterable, Iterator, Sequence

import numpy as np
import torch

from ..network.graph import (
    ActivationNode,
    AddNode,
    BiasNode,
    CatNode,
    EquivalentNetwork,
    InputNode,
    LinearNode,
    MaxPoolNode,
    Node,
)
from ..operators.base import Operator, torch_dtype
from ..utils import gib, parse_memory

__all__ = [
    "linearise",
    "Linearisation",
    "LayerJacobian",
    "parse_memory",
    "check_piecewise_linear",
]

# ----------------------------------------------------------------------------- helpers

def check_piecewise_linear(net: EquivalentNetwork) -> None:
    """Refuse networks with a smooth activation: the exact identity of Eq. 3 needs them
    piecewise linear (seed 000 §3.3, 'Premise')."""
    bad = [f"{n.name} ({n.kind})" for n in net.nodes if isinstance(n, ActivationNode) and not n.piecewise_linear]
    if bad:
        raise ValueError(
            "AdjointBackMapV2 needs a piecewise-linear network (ReLU / LeakyReLU / PReLU): the identity "
            "c(x) = <[x; x_b], H> (seed 000 Eq. 3) rests on the activation slopes being constant on the "
            "linear region that contains the ray {k·[x; x_b], k > 0}; a smooth activation such as tanh or "
            "sigmoid has slopes that change with k, so the Jacobian is not scale invariant and "
            "J(z)·[x; x_b] != c(x) (seed 000 §3.3). Non-piecewise-linear activations in this network: "
            + ", ".join(bad)
        )


def _image_shape(net: EquivalentNetwork) -> tuple[int, int, int]:
    s = net.input_shape
    if len(s) == 3:
        return tuple(int(v) for v in s)  # type: ignore[return-value]
    # flat / other inputs: every input entry is its own "channel" of a 1x1 image (dense)
    return (int(np.prod(s)), 1, 1)


# ----------------------------------------------------------------------------- geometry

_BIG = np.iinfo(np.int64).max // 4

# structural CSR (indptr, indices) per operator: the pattern depends on the geometry only
_STRUCT: "weakref.WeakKeyDictionary[Operator, tuple[np.ndarray, np.ndarray]]" = weakref.WeakKeyDictionary()
# per-network geometry, keyed by the identities of its nodes (validated through weakrefs)
_GEOM_CACHE: dict[tuple[int, ...], tuple[list, dict]] = {}


def _structure(op: Operator) -> tuple[np.ndarray, np.ndarray]:
    try:
        return _STRUCT[op]
    except (KeyError, TypeError):
        pass
    A = op.to_sparse()
    A = A.tocsr() if not hasattr(A, "indptr") else A
    out = (np.asarray(A.indptr), np.asarray(A.indices))
    try:
        _STRUCT[op] = out
    except TypeError:
        pass
    return out


@dataclass
class _Geom:
    """Per-unit support boxes (image rows/cols, inclusive; empty rows have lo > hi) and the
    node's uniform window ``(ry, rx)`` with per-unit origins ``(oy, ox)``."""

    box: np.ndarray  # (4, U) int64: ymin, ymax, xmin, xmax
    ry: int
    rx: int
    oy: torch.Tensor  # (U,) int64
    ox: torch.Tensor
    #: x-independent index tensors (recolour gathers, densify masks), keyed by periods/device
    cache: dict = field(default_factory=dict, repr=False)


def _finish_geom(box: np.ndarray, H: int, W: int) -> _Geom:
    ymin, ymax, xmin, xmax = box
    nonempty = ymin <= ymax
    ry = int(min(H, max(1, int((ymax - ymin + 1)[nonempty].max(initial=1)))))
    rx = int(min(W, max(1, int((xmax - xmin + 1)[nonempty].max(initial=1)))))
    oy = np.where(nonempty, np.clip(ymin, 0, H - ry), 0)
    ox = np.where(nonempty, np.clip(xmin, 0, W - rx), 0)
    return _Geom(box, ry, rx, torch.from_numpy(oy.astype(np.int64)), torch.from_numpy(ox.astype(np.int64)))


def _reduce_rows(vals: np.ndarray, indptr: np.ndarray, ufunc, empty: int) -> np.ndarray:
    n = len(indptr) - 1
    out = np.full(n, empty, dtype=np.int64)
    counts = np.diff(indptr)
    nz = counts > 0
    if nz.any():
        out[nz] = ufunc.reduceat(vals, indptr[:-1][nz])
    return out


def _network_geometry(net: EquivalentNetwork) -> dict[str, _Geom]:
    key = tuple(id(n) for n in net.nodes)
    hit = _GEOM_CACHE.get(key)
    if hit is not None and all(r() is n for r, n in zip(hit[0], net.nodes)):
        return hit[1]
    C, H, W = _image_shape(net)
    boxes: dict[str, np.ndarray] = {}
    geoms: dict[str, _Geom] = {}
    for n in net.nodes:
        if isinstance(n, InputNode):
            c, y, x = np.meshgrid(np.arange(C), np.arange(H), np.arange(W), indexing="ij")
            b = np.stack([y.ravel(), y.ravel(), x.ravel(), x.ravel()]).astype(np.int64)
        elif isinstance(n, LinearNode):
            indptr, indices = _structure(n.op)
            src = boxes[n.inputs[0]]
            b = np.stack([
                _reduce_rows(src[0][indices], indptr, np.minimum, _BIG),
                _reduce_rows(src[1][indices], indptr, np.maximum, -1),
                _reduce_rows(src[2][indices], indptr, np.minimum, _BIG),
                _reduce_rows(src[3][indices], indptr, np.maximum, -1),
            ])
        elif isinstance(n, (BiasNode, ActivationNode)):
            b = boxes[n.inputs[0]]
        elif isinstance(n, MaxPoolNode):
            # structural window (a superset of any argmax selection): x-independent geometry
            src = torch.from_numpy(boxes[n.inputs[0]].astype(np.float64)).reshape((4,) + tuple(net.node(n.inputs[0]).out_shape))
            pool = lambda t: torch.nn.functional.max_pool2d(t, n.kernel_size, n.stride, n.padding, n.dilation)  # noqa: E731
            b = torch.stack([-pool(-src[0]), pool(src[1]), -pool(-src[2]), pool(src[3])]).reshape(4, -1)
            b = b.numpy().astype(np.int64)
        elif isinstance(n, AddNode):
            bs = [boxes[i] for i in n.inputs]
            b = bs[0].copy()
            for o in bs[1:]:
                b[0] = np.minimum(b[0], o[0]); b[1] = np.maximum(b[1], o[1])  # noqa: E702
                b[2] = np.minimum(b[2], o[2]); b[3] = np.maximum(b[3], o[3])  # noqa: E702
        elif isinstance(n, CatNode):
            parts = [boxes[i].reshape((4,) + tuple(net.node(i).out_shape)) for i in n.inputs]
            b = np.concatenate(parts, axis=n.dim).reshape(4, -1)  # batch axis of the node <-> box axis
        else:
            raise NotImplementedError(f"linearisation of node kind {type(n).__name__} ({n.name}) is not implemented")
        if b.shape[1] != int(np.prod(n.out_shape)):
            raise ValueError(f"node {n.name}: geometry has {b.shape[1]} units, out_shape {n.out_shape}")
        boxes[n.name] = b
        geoms[n.name] = _finish_geom(b, H, W)
    if len(_GEOM_CACHE) > 16:
        _GEOM_CACHE.clear()
    _GEOM_CACHE[key] = ([weakref.ref(n) for n in net.nodes], geoms)
    return geoms


# ----------------------------------------------------------------------------- state


@dataclass
class _State:
    """Forward-mode state of one node: compressed image tangents and dense bias tangents."""

    Ti: torch.Tensor  # (nc·Py·Px, *shape)
    P: tuple[int, int]
    Tb: torch.Tensor  # (nb, *shape)
    cols: torch.Tensor  # (nb,) int64, sorted indices into x_b


def _spatial_groups(g: _Geom, shape: tuple[int, ...]) -> tuple[int, int]:
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


def _recolour_index(g: _Geom, P: tuple[int, int], Pn: tuple[int, int], S: int, dev: torch.device) -> torch.Tensor:
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


def _recolour(Ti: torch.Tensor, nc: int, P: tuple[int, int], Pn: tuple[int, int], g: _Geom) -> torch.Tensor:
    """Re-compress tangents from period ``P`` to ``Pn >= P`` (exact; needs ``g.r <= P``).

    One gather along the colour axis with a cached ``(Pn², S)`` index broadcast over image
    channels and feature channels (no per-call index arithmetic, no ``Pn²·U`` index)."""
    if P == Pn:
        return Ti
    shape = tuple(Ti.shape[1:])
    G, S = _spatial_groups(g, shape)
    idx = _recolour_index(g, P, Pn, S, Ti.device)
    T = Ti.reshape(nc, P[0] * P[1], G, S)
    Tp = torch.cat([T, T.new_zeros(nc, 1, G, S)], 1)  # colour P_y·P_x is the zero slot
    out = torch.gather(Tp, 1, idx.view(1, -1, 1, S).expand(nc, -1, G, S))
    return out.reshape((nc * Pn[0] * Pn[1],) + shape)


def _merge_bias(parts: Sequence[tuple[torch.Tensor, torch.Tensor]], like: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
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


# ----------------------------------------------------------------------------- layer result


def _out_view(out: torch.Tensor | None, shape: tuple[int, ...], like: torch.Tensor) -> torch.Tensor:
    """A contiguous ``shape`` view of the preallocated ``out`` (or a new tensor)."""
    n = int(np.prod(shape))
    if out is None:
        return like.new_empty(shape)
    if not isinstance(out, torch.Tensor) or out.dtype != like.dtype or out.device != like.device \
            or not out.is_contiguous() or out.numel() < n:
        got = (f"{tuple(out.shape)} {out.dtype} on {out.device}, contiguous={out.is_contiguous()}"
               if isinstance(out, torch.Tensor) else type(out).__name__)
        raise ValueError(f"out must be a contiguous {like.dtype} tensor on {like.device} with at least "
                         f"{n:,} elements for shape {shape}; got {got}")
    return out.reshape(-1)[:n].view(shape)


@dataclass
class LayerJacobian:
    r"""Jacobian of one node's output (a unit layer's *pre-bias* value ``c_l``) w.r.t. ``[x; x_b]``.

    Row ``u`` (flat C-order index into ``out_shape``) is the effective hypersurface
    ``H_u = (W_l Σ_{l-1} J_{l-1})ᵀ e_u`` (seed 000 Eq. 4/5), stored compressed: image part
    ``Ti[c, a, b, u]`` with period ``P`` and per-unit windows (origin ``oy, ox``, size ``ry, rx``),
    bias part ``Tb[k, u]`` for the bias entries ``cols`` (all other bias entries are 0).
    ``channels`` lists the image channels this object covers (all, unless computed in
    column groups).  Use :meth:`image`, :meth:`bias`, :meth:`dot`, :meth:`windows`.
    """

    name: str
    out_shape: tuple[int, ...]
    image_shape: tuple[int, int, int]
    n_bias: int
    channels: torch.Tensor
    P: tuple[int, int]
    ry: int
    rx: int
    oy: torch.Tensor
    ox: torch.Tensor
    Ti: torch.Tensor  # (nc, Py, Px, U)
    Tb: torch.Tensor  # (nb, U)
    cols: torch.Tensor
    #: the node's x-independent geometry (index caches); None when built by hand
    geom: Any = field(default=None, repr=False, compare=False)

    @property
    def n_units(self) -> int:
        return int(self.Ti.shape[-1])

    def _units(self, units: Any) -> torch.Tensor:
        if units is None:
            return torch.arange(self.n_units, device=self.Ti.device)
        u = torch.as_tensor(units, dtype=torch.long, device=self.Ti.device).reshape(-1)
        if u.numel() and (int(u.min()) < 0 or int(u.max()) >= self.n_units):
            raise ValueError(f"{self.name}: units must be flat indices in [0, {self.n_units}), got min {int(u.min())}, max {int(u.max())}")
        return u

    def _window_index(self, o: torch.Tensor, n: int, P: int, r: int) -> torch.Tensor:
        """(k, n): residue of image row y for units with origins ``o``, or P (zero) outside the window."""
        y = torch.arange(n, device=o.device)[None, :]
        inside = (y >= o[:, None]) & (y < o[:, None] + r)
        return torch.where(inside, torch.remainder(y, P), torch.full_like(y, P))

    def image(self, units: Any = None, out: torch.Tensor | None = None) -> torch.Tensor:
        """Dense image parts ``H^I``, shape ``(k, C, H, W)`` for the selected units (RM2 layout).

        ``out``: optional preallocated contiguous tensor of the Jacobian's dtype/device with at
        least ``k·C·H·W`` elements (e.g. one buffer reused across layers, which avoids paying
        the first-touch page faults of a fresh multi-hundred-MB array per layer); the result is
        a view of its first ``k·C·H·W`` entries.

        One pass over the output: ``H^I[u, c, y, x] = T[c, (y mod P_y, x mod P_x), u]`` inside
        ``u``'s window and 0 outside is a single gather from the unit-major compressed tangents
        with an x-independent ``(S, H·W)`` colour index (cached per node), the zero outside the
        window being an extra zero colour.
        """
        u = self._units(units)
        C, H, W = self.image_shape
        nc = self.channels.numel()
        k = u.numel()
        Py, Px = self.P
        full_chans = nc == C and torch.equal(self.channels.cpu(), torch.arange(C))
        dst = _out_view(out, (k, C, H, W), self.Ti) if full_chans else self.Ti.new_empty((k, nc, H, W))
        all_units = k == self.n_units and bool((u == torch.arange(self.n_units, device=u.device)).all())
        L = Py * Px
        T2 = self.Ti.reshape(nc * L, self.n_units)  # tangent-major; its 2-D transpose is a fast copy
        if (Py, Px) == (H, W):
            # dense regime: colour (c, a, b) is pixel (c, a, b); outside a unit's window the
            # tangents are exact zeros already (structurally zero Jacobian entries), so H^I is
            # the transposed tangent batch — one 2-D transposed copy
            dst.view(k, nc * L).copy_(T2.t() if all_units else T2.index_select(1, u).t())
        else:
            G, S = (_spatial_groups(self.geom, self.out_shape) if self.geom is not None else (1, self.n_units))
            idx, mask = self._colour_index(S)  # (S, nc·H·W) colours, (S, H·W) window mask or None
            chunk = k if all_units else max(1, (1 << 22) // max(1, nc * H * W))  # bounds the per-unit index
            for a0 in range(0, k, chunk):
                uu = u[a0:a0 + chunk]
                kk = uu.numel()
                Tt = T2.new_empty((kk, nc * L))
                Tt.copy_(T2.t() if all_units else T2.index_select(1, uu).t())  # unit-major, colour last
                d = dst[a0:a0 + kk]
                if all_units:
                    torch.gather(Tt.view(G, S, nc * L), 2, idx.view(1, S, nc * H * W).expand(G, S, nc * H * W),
                                 out=d.view(G, S, nc * H * W))
                    if mask is not None:
                        d.view(G, S, nc, H * W).mul_(mask.view(1, S, 1, H * W))
                else:
                    s_u = torch.remainder(uu, S).to(idx.device)
                    torch.gather(Tt, 1, idx.index_select(0, s_u), out=d.view(kk, nc * H * W))
                    if mask is not None:
                        d.view(kk, nc, H * W).mul_(mask.index_select(0, s_u)[:, None, :])
        if full_chans:
            return dst
        fullo = _out_view(out, (k, C, H, W), self.Ti)
        fullo.zero_()
        fullo[:, self.channels.to(u.device)] = dst
        return fullo

    def _colour_index(self, S: int) -> tuple[torch.Tensor, torch.Tensor | None]:
        """x-independent gather index of the densification, cached per node: ``(S, nc·H·W)``,
        the column ``c·P_y·P_x + (y mod P_y)·P_x + x mod P_x`` of the unit-major compressed
        tangents for pixel (c, y, x) of the unit at spatial position s.  Outside the unit's
        window the pixel must read 0: where the period exceeds the window (``P_y > r_y`` or
        ``P_x > r_x``) it reads a residue row/column that holds no window pixel, whose colour is
        an exact structural zero, and no mask is needed; otherwise a ``(S, H·W)`` 0/1 mask is
        returned to multiply by."""
        C, H, W = self.image_shape
        nc = self.channels.numel()
        Py, Px = self.P
        key = ("colour", self.P, (self.ry, self.rx), S, nc, str(self.Ti.device), self.Ti.dtype)
        cache = self.geom.cache if self.geom is not None else {}
        hit = cache.get(key)
        if hit is None:
            dev = self.Ti.device
            oy, ox = self.oy[:S].to(dev), self.ox[:S].to(dev)
            y = torch.arange(H, device=dev)
            xx = torch.arange(W, device=dev)
            iny = (y[None] >= oy[:, None]) & (y[None] < oy[:, None] + self.ry)  # (S, H)
            inx = (xx[None] >= ox[:, None]) & (xx[None] < ox[:, None] + self.rx)  # (S, W)
            ry = torch.remainder(y, Py)[None].expand(S, H)
            rx = torch.remainder(xx, Px)[None].expand(S, W)
            mask = None
            if Py > self.ry:  # residue (oy + ry) mod Py holds no window row: a zero colour row
                zy = torch.remainder(oy + self.ry, Py)[:, None]
                col = torch.where(iny[:, :, None] & inx[:, None, :], ry[:, :, None] * Px + rx[:, None, :],
                                  (zy * Px)[:, :, None].expand(S, H, W))
            elif Px > self.rx:
                zx = torch.remainder(ox + self.rx, Px)[:, None]
                col = torch.where(iny[:, :, None] & inx[:, None, :], ry[:, :, None] * Px + rx[:, None, :],
                                  zx[:, :, None].expand(S, H, W))
            else:
                col = (ry[:, :, None] * Px + rx[:, None, :])
                mask = (iny[:, :, None] & inx[:, None, :]).reshape(S, H * W).to(self.Ti.dtype)
            col = col.reshape(S, 1, H * W) + (torch.arange(nc, device=dev) * (Py * Px))[None, :, None]
            hit = (col.reshape(S, nc * H * W).contiguous(), mask)
            cache[key] = hit
        return hit

    def bias(self, units: Any = None, out: torch.Tensor | None = None) -> torch.Tensor:
        """Dense bias parts ``H^b``, shape ``(k, n_b)`` (``out``: optional buffer, as in :meth:`image`)."""
        u = self._units(units)
        k = u.numel()
        dst = _out_view(out, (k, self.n_bias), self.Tb)
        n = self.cols.numel()
        all_units = k == self.n_units and bool((u == torch.arange(self.n_units, device=u.device)).all())
        Tb = self.Tb if all_units else self.Tb.index_select(1, u)
        if n and n == self.n_bias:  # cols is sorted and unique: all of x_b
            dst.copy_(Tb.T)
            return dst
        dst.zero_()
        if n:
            c0 = int(self.cols[0])
            if int(self.cols[-1]) - c0 + 1 == n:  # a contiguous block of x_b (the usual case)
                dst[:, c0:c0 + n].copy_(Tb.T)
            else:
                dst[:, self.cols.to(u.device)] = Tb.T
        return dst

    def _take(self, u: torch.Tensor) -> torch.Tensor:
        """``Ti`` restricted to units ``u`` as a (k, nc, Py, Px) view/copy (no copy for all units)."""
        if u.numel() == self.n_units and bool((u == torch.arange(self.n_units, device=u.device)).all()):
            return self.Ti.permute(3, 0, 1, 2)
        return self.Ti.index_select(3, u).permute(3, 0, 1, 2)

    def windows(self, units: Any = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Per-unit windows of the image part: ``(patches (k, C, ry, rx), oy (k,), ox (k,))``."""
        u = self._units(units)
        oy, ox = self.oy.to(u.device)[u], self.ox.to(u.device)[u]
        dy = torch.remainder(oy[:, None] + torch.arange(self.ry, device=u.device)[None], self.P[0])
        dx = torch.remainder(ox[:, None] + torch.arange(self.rx, device=u.device)[None], self.P[1])
        T = self._take(u)  # (k, nc, Py, Px)
        k, nc = T.shape[:2]
        T = T.gather(2, dy[:, None, :, None].expand(k, nc, self.ry, self.P[1]))
        return T.gather(3, dx[:, None, None, :].expand(k, nc, self.ry, self.rx)), oy, ox

    def dot(self, x: torch.Tensor, x_b: torch.Tensor | None = None) -> torch.Tensor:
        """``<x, H^I_u> + <x_b, H^b_u>`` for every unit (flat, C-order), without forming H."""
        C, H, W = self.image_shape
        x = x.reshape(C, H, W).to(self.Ti)
        xc = x.index_select(0, self.channels.to(x.device))
        xp = xc.new_zeros(xc.shape[0], H + 1, W + 1)
        xp[:, :H, :W] = xc

        U = self.n_units
        Py, Px = self.P
        if (Py, Px) == (H, W):
            # dense regime: colour (c, a, b) is pixel (c, a, b), and outside a unit's window the
            # tangents are exact structural zeros: a matrix-vector product
            out = self.Ti.reshape(-1, U).T @ xc.reshape(-1)
        else:
            G, S = (_spatial_groups(self.geom, self.out_shape) if self.geom is not None else (1, U))
            key = ("dot", self.P, (self.ry, self.rx), S, str(x.device))
            cache = self.geom.cache if self.geom is not None else {}
            flat = cache.get(key)
            if flat is None:
                def pix(o: torch.Tensor, P: int, r: int, n: int) -> torch.Tensor:
                    a = torch.arange(P, device=o.device)[:, None]
                    d = torch.remainder(a - o[None, :], P)
                    return torch.where(d < r, o[None, :] + d, torch.full_like(d, n))  # (P, S) pixel or n (zero)

                Y = pix(self.oy[:S].to(x.device), Py, self.ry, H)
                X = pix(self.ox[:S].to(x.device), Px, self.rx, W)
                flat = (Y[:, None, :] * (W + 1) + X[None, :, :]).reshape(-1)  # (Py·Px·S,), x-independent
                cache[key] = flat
            nc = xp.shape[0]
            xg = xp.reshape(nc, -1).index_select(1, flat).reshape(nc, Py * Px, 1, S)
            out = (self.Ti.reshape(nc, Py * Px, G, S) * xg).sum(dim=(0, 1)).reshape(U)
        if x_b is not None and self.cols.numel():
            out = out + self.Tb.T @ x_b.to(self.Tb).reshape(-1)[self.cols.to(x.device)]
        return out


# ----------------------------------------------------------------------------- linearisation


class Linearisation:
    """An equivalent network linearised at ``z = k·[x; x_b]`` (seed 000 Eq. 3, appendix C).

    Holds the activation pattern (slopes of every activation, argmax of every max pool)
    and produces, per unit layer, the Jacobian of its pre-bias output w.r.t. ``[x; x_b]``:
    forward (:meth:`sweep`, all units of many layers in one pass, compressed-window
    representation) or reverse (:meth:`vjp`, for a few units).  Build with :func:`linearise`.
    """

    def __init__(self, net: EquivalentNetwork, x: torch.Tensor, scale: float = 1.0, dtype: Any = None,
                 memory_budget: Any = "2GiB"):
        check_piecewise_linear(net)
        if not (isinstance(scale, (int, float, np.floating, np.integer)) and not isinstance(scale, bool)
                and math.isfinite(float(scale)) and float(scale) > 0):
            raise ValueError(f"scale must be a finite positive number (k of z = k·[x; x_b], seed 000 Eq. 3), got {scale!r}")
        dt = torch_dtype(dtype) if dtype is not None else net.dtype
        self.net = net.to(dt)
        x = torch.as_tensor(x).to(dt)
        if x.dim() == len(net.input_shape) + 1:
            if x.shape[0] != 1:
                raise ValueError(f"linearise takes a single input (or a batch of 1), got a batch of {x.shape[0]}")
            x = x[0]
        if tuple(x.shape) != tuple(net.input_shape):
            raise ValueError(f"x must have shape {tuple(net.input_shape)} (or (1, ...)), got {tuple(x.shape)}")
        self.x = x
        self.dtype = dt
        self.scale = float(scale)
        self.memory_budget = parse_memory(memory_budget)
        self.x_b = self.net.x_b
        k = self.scale
        # the activation pattern at z = k·[x; x_b]; positively homogeneous => same as at [x; x_b]
        self.pattern = self.net.activation_pattern((k * x).unsqueeze(0), k * self.x_b)
        self.image_shape = _image_shape(net)
        self._geom: dict[str, _Geom] | None = None

    # ---------------------------------------------------------------- structure
    @property
    def unit_layers(self) -> list[str]:
        return self.net.unit_layers

    def geometry(self) -> dict[str, _Geom]:
        if self._geom is None:
            self._geom = _network_geometry(self.net)
        return self._geom

    def _node_of(self, layer_or_node: str) -> Node:
        if layer_or_node in self.net.unit_layers:
            return self.net.unit_node(layer_or_node)
        return self.net.node(layer_or_node)

    def _ancestors(self, targets: Iterable[str]) -> set[str]:
        need = set(targets)
        for n in reversed(self.net.nodes):
            if n.name in need:
                need.update(n.inputs)
        return need

    # ---------------------------------------------------------------- planning / memory
    def plan(self, targets: Sequence[str] | None = None, schedule: str = "auto") -> dict[str, Any]:
        """Periods and an estimate of the peak memory (bytes) of a forward sweep.

        ``schedule``: "auto" (the cost-model period schedule of :meth:`periods`, unless its
        peak exceeds the memory budget, then "lazy") or "lazy" (every node at the smallest
        period its windows allow)."""
        self.geometry()  # build (and cache) the window geometry before planning
        names = [self._node_of(t).name for t in (targets or self.unit_layers)]
        need = self._ancestors(names)
        if schedule not in ("auto", "lazy"):
            raise ValueError(f"schedule must be 'auto' or 'lazy', got {schedule!r}")
        sched = self.periods(names, lazy=schedule == "lazy")
        C = self.image_shape[0]
        P: dict[str, tuple[int, int]] = {}
        nb: dict[str, int] = {}
        size: dict[str, int] = {}
        item = torch.empty(0, dtype=self.dtype).element_size()
        for n in self.net.nodes:
            if n.name not in need:
                continue
            if isinstance(n, InputNode):
                P[n.name] = (1, 1)
                nb[n.name] = 0
            else:
                P[n.name] = sched[n.name]
                b = sum(nb[i] for i in n.inputs) if isinstance(n, (AddNode, CatNode)) else nb[n.inputs[0]]
                if isinstance(n, BiasNode):
                    b += n.bias_slice.stop - n.bias_slice.start
                nb[n.name] = min(b, self.net.n_bias)
            U = int(np.prod(n.out_shape))
            size[n.name] = (C * P[n.name][0] * P[n.name][1] + nb[n.name]) * U * item
        # liveness: a node's state lives until its last consumer has run
        last = {}
        for i, n in enumerate(self.net.nodes):
            for j in n.inputs:
                last[j] = i
        live, peak = 0, 0
        alive: dict[str, int] = {}
        for i, n in enumerate(self.net.nodes):
            if n.name not in need:
                continue
            # inputs may be recoloured to this node's period: a temporary of the recoloured size
            tmp = sum(size[j] * max(1, (P[n.name][0] * P[n.name][1]) // max(1, P[j][0] * P[j][1])) for j in n.inputs
                      if P[j] != P[n.name])
            live += size[n.name]
            alive[n.name] = size[n.name]
            peak = max(peak, live + tmp)
            for j in n.inputs:
                if last.get(j) == i and j in alive:
                    live -= alive.pop(j)
        out = {"period": P, "n_bias_cols": nb, "state_bytes": size, "peak_bytes": peak, "schedule": schedule}
        if schedule == "auto" and peak > self.memory_budget:
            lazy = self.plan(targets, schedule="lazy")  # jumping ahead costs memory: fall back
            if lazy["peak_bytes"] < peak:
                return lazy
        return out

    # cost model of the period schedule, relative to one multiply-add of a convolution.
    # Micro-benchmarks on a 2-core CPU (VGG7 / ResNet20 tangent batches) give ~150 MACs per
    # gathered element and ~60 per elementwise op; timing whole sweeps under several constant
    # pairs put the optimum (flat within ~5%) near 300 / 100, which we use.
    _COST_GATHER = 300.0
    _COST_ELEMENTWISE = 100.0

    def periods(self, targets: Sequence[str] | None = None, lazy: bool = False) -> dict[str, tuple[int, int]]:
        """Compression period of every needed node (its tangents are ``C·P_y·P_x`` image columns).

        A node's period must cover its windows (``P >= r``, lossless) and its inputs' periods
        (recolouring only raises it).  ``lazy`` takes the smallest such period everywhere,
        i.e. raises the period before every node whose windows grow.  Otherwise a dynamic
        programme over the nodes in topological order (periods non-decreasing along it)
        chooses, among the window sizes of the nodes and the full image (the paper's identity
        batch), the schedule of least estimated cost: tangents × structural non-zeros for
        linear nodes, tangents × units for elementwise nodes and densification, new elements
        for every recolour (gather) — so it skips intermediate raises, or switches to the
        dense identity layout, where the gathers would cost more than the extra tangents.
        Inputs other than the previous node (residual skips) are costed with the previous
        round's periods; a few rounds, and the lazy schedule, are compared on the full model,
        and a final pass lowers nodes (e.g. a ResNet shortcut) where the model prefers their
        consumers to recolour.
        """
        geom = self.geometry()
        names = [self._node_of(t).name for t in (targets or self.unit_layers)]
        need = self._ancestors(names)
        nodes = [n for n in self.net.nodes if n.name in need]
        key = ("periods", tuple(n.name for n in nodes), tuple(names), bool(lazy), self._COST_GATHER, self._COST_ELEMENTWISE)
        g0 = geom[nodes[0].name]
        hit = g0.cache.get(key)
        if hit is not None:
            return hit
        C, H, W = self.image_shape
        lazy_p: dict[str, tuple[int, int]] = {}
        for n in nodes:
            g = geom[n.name]
            lazy_p[n.name] = (1, 1) if isinstance(n, InputNode) else (
                max([lazy_p[i][0] for i in n.inputs] + [g.ry]), max([lazy_p[i][1] for i in n.inputs] + [g.rx]))
        if lazy:
            g0.cache[key] = lazy_p
            return lazy_p
        size = {n.name: int(np.prod(n.out_shape)) for n in nodes}
        tset = set(names)
        per_t: dict[str, float] = {}
        for n in nodes:
            if isinstance(n, InputNode):
                continue
            if isinstance(n, LinearNode):
                per_t[n.name] = float(_structure(n.op)[0][-1])
            else:
                per_t[n.name] = self._COST_ELEMENTWISE * size[n.name]
            if n.name in tset:
                per_t[n.name] += self._COST_ELEMENTWISE * size[n.name]  # densify: transposed copy

        def cost(assign: dict[str, tuple[int, int]]) -> float:
            tot = 0.0
            for n in nodes:
                if isinstance(n, InputNode):
                    continue
                q = assign[n.name]
                tot += q[0] * q[1] * per_t[n.name]
                tot += sum(self._COST_GATHER * q[0] * q[1] * size[i] for i in n.inputs if assign[i] != q)
            return tot

        cand = sorted({(geom[n.name].ry, geom[n.name].rx) for n in nodes if not isinstance(n, InputNode)} | {(H, W)})
        K = len(cand)
        INF = float("inf")
        order = [n for n in nodes if not isinstance(n, InputNode)]
        best_assign, best_cost = lazy_p, cost(lazy_p)
        prev_assign = lazy_p
        for _round in range(3):
            best = [INF] * K
            back: list[list[int]] = []
            prev_name = None
            for n in order:
                g = geom[n.name]
                new = [INF] * K
                bk = [0] * K
                for k, q in enumerate(cand):
                    if q[0] < g.ry or q[1] < g.rx:
                        continue
                    nt = q[0] * q[1]
                    base = nt * per_t[n.name] + sum(self._COST_GATHER * nt * size[i] for i in n.inputs
                                                    if i != prev_name and prev_assign[i] != q)
                    if prev_name is None:
                        new[k] = base
                        continue
                    lin_in = prev_name in n.inputs
                    for j in range(K):
                        if best[j] == INF or cand[j][0] > q[0] or cand[j][1] > q[1]:
                            continue
                        c = best[j] + base + (self._COST_GATHER * nt * size[prev_name] if lin_in and j != k else 0.0)
                        if c < new[k]:
                            new[k], bk[k] = c, j
                best, prev_name = new, n.name
                back.append(bk)
            k = int(np.argmin(best))
            assign: dict[str, tuple[int, int]] = {}
            for n, bk in zip(reversed(order), reversed(back)):
                assign[n.name] = cand[k]
                k = bk[k]
            for n in nodes:
                if isinstance(n, InputNode):
                    assign[n.name] = (1, 1)
            # repair: a node's period must cover its inputs' (monotone along the order covers it)
            for n in order:
                q = assign[n.name]
                assign[n.name] = (max([q[0]] + [assign[i][0] for i in n.inputs]), max([q[1]] + [assign[i][1] for i in n.inputs]))
            c = cost(assign)
            if c < best_cost:
                best_assign, best_cost = assign, c
            if assign == prev_assign:
                break
            prev_assign = assign
        # local improvement: the order-monotone programme may hold a side branch (e.g. a
        # ResNet shortcut before its subsampling) at the main branch's period; lower a node to
        # the least period its windows and inputs allow where the model says so — its
        # consumers then recolour the (often smaller) output instead
        assign = dict(best_assign)
        for n in order:
            g = geom[n.name]
            low = (max([g.ry] + [assign[i][0] for i in n.inputs]), max([g.rx] + [assign[i][1] for i in n.inputs]))
            if low != assign[n.name]:
                trial = dict(assign)
                trial[n.name] = low
                c = cost(trial)
                if c < best_cost:
                    assign, best_cost = trial, c
        out = {n.name: assign[n.name] for n in nodes}
        g0.cache[key] = out
        return out

    # ---------------------------------------------------------------- forward sweep
    def sweep(self, layers: Sequence[str] | None = None, channels: Sequence[int] | None = None,
              bias: bool = True, check_memory: bool = True, schedule: str = "auto") -> Iterator[LayerJacobian]:
        """Forward pass of compressed tangents; yields a :class:`LayerJacobian` for every
        requested unit layer (or node name), in topological order.

        Parameters
        ----------
        layers : unit-layer or node names (default: every unit layer).
        channels : image channels to include (column groups; default all).
        bias : include the bias columns.
        check_memory : refuse (ValueError) when the estimated peak exceeds the budget.
        schedule : "auto" (cost-model periods, see :meth:`periods`) or "lazy" (smallest
            periods); both give the same Jacobians, they differ only in speed and memory.
        """
        targets = list(layers) if layers is not None else self.unit_layers
        tnodes = {self._node_of(t).name: t for t in targets}
        need = self._ancestors(tnodes)
        C, H, W = self.image_shape
        chans = torch.arange(C) if channels is None else torch.as_tensor(list(channels), dtype=torch.long)
        nc = chans.numel()
        plan = self.plan(list(tnodes), schedule=schedule)
        sched = plan["period"]
        if check_memory:
            est = plan["peak_bytes"] * nc / C
            if est > self.memory_budget:
                raise ValueError(
                    f"linearisation sweep needs ~{gib(est)} (compressed Jacobians of the layers up to "
                    f"{targets[-1]!r}) > memory_budget={gib(self.memory_budget)}; raise memory_budget, or "
                    f"process fewer image channels at a time (channels=[...]), or use the reverse mode "
                    f"(Linearisation.vjp) for a few units"
                )
        geom = self.geometry()
        dt = self.dtype
        dev = self.x.device
        last = {}
        for i, n in enumerate(self.net.nodes):
            for j in n.inputs:
                last[j] = i
        states: dict[str, _State] = {}
        pos = {nn.name: k for k, nn in enumerate(self.net.nodes)}
        consumers: dict[str, list[str]] = {}
        for nn in self.net.nodes:
            if nn.name in need:
                for j in nn.inputs:
                    consumers.setdefault(j, []).append(nn.name)
        empty_cols = torch.zeros(0, dtype=torch.long, device=dev)
        for i, n in enumerate(self.net.nodes):
            if n.name not in need:
                continue
            g = geom[n.name]
            if isinstance(n, InputNode):
                Ti = torch.zeros((nc, C, H, W), dtype=dt, device=dev)
                Ti[torch.arange(nc), chans.to(dev)] = 1.0
                Ti = Ti.reshape((nc,) + tuple(n.out_shape))
                st = _State(Ti, (1, 1), Ti.new_zeros((0,) + tuple(n.out_shape)), empty_cols)
            else:
                ins = [states[j] for j in n.inputs]
                Pn = sched[n.name]
                Tis = [_recolour(s.Ti, nc, s.P, Pn, geom[j]) for s, j in zip(ins, n.inputs)]
                for j, s, T in zip(n.inputs, ins, Tis):
                    if s.P != Pn and last.get(j, -1) > i and all(
                            sched[c][0] >= Pn[0] and sched[c][1] >= Pn[1] for c in consumers[j] if pos[c] > i):
                        # every later consumer (a residual skip) reads j at a period >= Pn: keep
                        # the recoloured state instead, so the same gather is never done twice
                        states[j] = _State(T, Pn, s.Tb, s.cols)
                st = self._step(n, Tis, ins, Pn, bias)
            states[n.name] = st
            if n.name in tnodes:
                U = int(np.prod(n.out_shape))
                yield LayerJacobian(
                    name=tnodes[n.name], out_shape=tuple(n.out_shape), image_shape=(C, H, W),
                    n_bias=self.net.n_bias, channels=chans, P=st.P, ry=g.ry, rx=g.rx, oy=g.oy, ox=g.ox,
                    Ti=st.Ti.reshape(nc, st.P[0], st.P[1], U), Tb=st.Tb.reshape(-1, U), cols=st.cols, geom=g,
                )
            for j in n.inputs:
                if last.get(j) == i:
                    states.pop(j, None)

    def _step(self, n: Node, Tis: list[torch.Tensor], ins: list[_State], Pn: tuple[int, int], bias: bool) -> _State:
        if isinstance(n, LinearNode):
            s = ins[0]
            Tb = n.op.apply(s.Tb) if s.Tb.shape[0] else s.Tb.new_zeros((0,) + tuple(n.out_shape))
            return _State(n.op.apply(Tis[0]), Pn, Tb, s.cols)
        if isinstance(n, BiasNode):
            s = ins[0]
            if not bias:
                return _State(Tis[0], Pn, s.Tb, s.cols)
            sl = n.bias_slice
            k = sl.stop - sl.start
            if k == 0:
                return _State(Tis[0], Pn, s.Tb, s.cols)
            eye = torch.eye(k, dtype=Tis[0].dtype, device=Tis[0].device)
            Rb = n.restriction.apply(eye)  # (k, *out_shape): R applied to unit bias vectors
            newc = torch.arange(sl.start, sl.stop, device=Tis[0].device)
            if s.cols.numel() == 0 or int(s.cols.max()) < sl.start:  # the usual case: append
                return _State(Tis[0], Pn, torch.cat([s.Tb, Rb]) if s.cols.numel() else Rb, torch.cat([s.cols, newc]))
            cols, (A, B) = _merge_bias([(s.Tb, s.cols), (Rb, newc)], Tis[0])
            return _State(Tis[0], Pn, A + B, cols)
        if isinstance(n, ActivationNode):
            s = ins[0]
            sl = self.pattern[n.name][0].to(Tis[0])  # slopes (Σ of appendix C), shape out_shape
            Tb = s.Tb * sl if s.Tb.shape[0] else s.Tb
            return _State(Tis[0] * sl, Pn, Tb, s.cols)
        if isinstance(n, MaxPoolNode):
            s = ins[0]
            idx = self.pattern[n.name][0].reshape(-1).to(Tis[0].device)  # argmax selection
            shape = tuple(n.out_shape)
            Ti = Tis[0].reshape(Tis[0].shape[0], -1).index_select(1, idx).reshape((-1,) + shape)
            Tb = s.Tb.reshape(s.Tb.shape[0], -1).index_select(1, idx).reshape((-1,) + shape)
            return _State(Ti, Pn, Tb, s.cols)
        if isinstance(n, AddNode):
            Ti = Tis[0]
            for t in Tis[1:]:
                Ti = Ti + t
            cols, Tbs = _merge_bias([(s.Tb, s.cols) for s in ins], Ti)
            Tb = Tbs[0]
            for t in Tbs[1:]:
                Tb = Tb + t
            return _State(Ti, Pn, Tb, cols)
        if isinstance(n, CatNode):
            cols, Tbs = _merge_bias([(s.Tb, s.cols) for s in ins], Tis[0])
            return _State(torch.cat(Tis, dim=n.dim), Pn, torch.cat(Tbs, dim=n.dim), cols)
        raise NotImplementedError(f"linearisation of node kind {type(n).__name__} ({n.name}) is not implemented")

    def layer(self, layer: str, channels: Sequence[int] | None = None, bias: bool = True) -> LayerJacobian:
        """The :class:`LayerJacobian` of one unit layer (a sweep that stops there)."""
        return next(iter(self.sweep([layer], channels=channels, bias=bias)))

    # ---------------------------------------------------------------- reverse mode
    def vjp(self, layer: str, seeds: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``J_lᵀ s`` for a batch of cotangents ``s`` of shape ``(k, *out_shape)`` at the output of
        unit layer (or node) ``layer``.  Returns ``(H^I (k, *input_shape), H^b (k, n_b))``.

        With ``s = e_u`` this is the effective hypersurface of unit ``u`` (seed 000 Eq. 4:
        the adjoint ``J_Fᵀ`` applied to the kernel/weight row)."""
        target = self._node_of(layer)
        seeds = torch.as_tensor(seeds).to(device=self.x.device, dtype=self.dtype)
        if tuple(seeds.shape[1:]) != tuple(target.out_shape):
            raise ValueError(f"seeds must have shape (k, {', '.join(map(str, target.out_shape))}), got {tuple(seeds.shape)}")
        k = seeds.shape[0]
        need = self._ancestors([target.name])
        cot: dict[str, torch.Tensor] = {target.name: seeds}
        Hb = seeds.new_zeros(k, self.net.n_bias)
        HI = None

        def add(name: str, t: torch.Tensor) -> None:
            cot[name] = cot[name] + t if name in cot else t

        for n in reversed(self.net.nodes):
            if n.name not in need or n.name not in cot:
                continue
            g = cot.pop(n.name)
            if isinstance(n, InputNode):
                HI = g
            elif isinstance(n, LinearNode):
                add(n.inputs[0], n.op.apply_adjoint(g))
            elif isinstance(n, BiasNode):
                sl = n.bias_slice
                if sl.stop > sl.start:
                    Hb[:, sl] += n.restriction.apply_adjoint(g)
                add(n.inputs[0], g)
            elif isinstance(n, ActivationNode):
                add(n.inputs[0], g * self.pattern[n.name][0].to(g))
            elif isinstance(n, MaxPoolNode):
                src = self.net.node(n.inputs[0])
                idx = self.pattern[n.name][0].reshape(1, -1).to(g.device).expand(k, -1)
                z = g.new_zeros(k, int(np.prod(src.out_shape)))
                z.scatter_add_(1, idx, g.reshape(k, -1))
                add(n.inputs[0], z.reshape((k,) + tuple(src.out_shape)))
            elif isinstance(n, AddNode):
                for j in n.inputs:
                    add(j, g)
            elif isinstance(n, CatNode):
                sizes = [self.net.node(j).out_shape[n.dim - 1] for j in n.inputs]
                for j, part in zip(n.inputs, torch.split(g, sizes, dim=n.dim)):
                    add(j, part)
            else:
                raise NotImplementedError(f"reverse linearisation of node kind {type(n).__name__} ({n.name})")
        if HI is None:
            HI = seeds.new_zeros((k,) + tuple(self.net.input_shape))
        return HI, Hb

    def unit_vjp(self, layer: str, units: Any) -> tuple[torch.Tensor, torch.Tensor]:
        """Effective hypersurfaces of the given flat units of ``layer`` by reverse mode."""
        target = self._node_of(layer)
        U = int(np.prod(target.out_shape))
        u = torch.as_tensor(units, dtype=torch.long).reshape(-1)
        seeds = torch.zeros((u.numel(), U), dtype=self.dtype, device=self.x.device)
        seeds[torch.arange(u.numel()), u.to(seeds.device)] = 1.0
        return self.vjp(layer, seeds.reshape((u.numel(),) + tuple(target.out_shape)))

    def preactivations(self) -> dict[str, torch.Tensor]:
        """True pre-bias values ``c_l`` at the *unscaled* input (flat, C-order)."""
        pre = self.net.preactivations(self.x.unsqueeze(0))
        return {k: v[0].reshape(-1) for k, v in pre.items()}


def linearise(net: EquivalentNetwork, x: Any, scale: float = 1.0, dtype: Any = None,
              memory_budget: Any = "2GiB") -> Linearisation:
    """Linearise ``net`` at ``z = scale·[x; x_b]`` (seed 000 Eq. 3 with ``k = scale``).

    Parameters
    ----------
    net : EquivalentNetwork
        Must be piecewise linear (ReLU / LeakyReLU / PReLU); tanh / sigmoid raise ValueError.
    x : tensor, shape ``input_shape`` or ``(1, *input_shape)``
        One input.
    scale : float > 0
        ``k``; provably irrelevant (positive homogeneity), accepted for fidelity to the paper.
    dtype : compute dtype (float32 / float64; default: the network's, ``net.dtype``).
    memory_budget : bytes or a string like ``"2GiB"``; sweeps estimate their peak first.

    Returns
    -------
    Linearisation
    """
    return Linearisation(net, x, scale=scale, dtype=dtype, memory_budget=memory_budget)
