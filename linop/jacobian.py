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
Before a node whose windows outgrow the current period, its input is *recoloured* (an
exact gather) to the larger period.  Once ``r`` covers the image, ``P = (H, W)`` and the
representation is the dense identity-batch Jacobian.  The bias part (``n_b`` columns) is
kept dense, as forward-mode tangents that start at the node where each bias enters.

The reverse mode (vector–Jacobian products through the same linearised graph, adjoints
``apply_adjoint``) is provided too: it is what a few units (sampled rows, FC outputs, RM1 /
RM3 / RM4) need, and it cross-checks the forward representation.
"""
from __future__ import annotations

import math
import re
import weakref
from dataclasses import dataclass, field
from typing import Any, Iterable, Iterator, Sequence

import numpy as np
import torch

from .graph import (
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
from .operators.base import Operator, torch_dtype

__all__ = [
    "linearise",
    "Linearisation",
    "LayerJacobian",
    "parse_memory",
    "check_piecewise_linear",
]

# ----------------------------------------------------------------------------- helpers

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
    return f"{nbytes / 2**30:.3g} GiB"


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


def _recolour(Ti: torch.Tensor, nc: int, P: tuple[int, int], Pn: tuple[int, int], g: _Geom) -> torch.Tensor:
    """Re-compress tangents from period ``P`` to ``Pn >= P`` (exact; needs ``g.r <= P``)."""
    if P == Pn:
        return Ti
    shape = Ti.shape[1:]
    U = int(np.prod(shape))
    T = Ti.reshape(nc, P[0], P[1], U)
    Tp = T.new_zeros(nc, P[0] + 1, P[1] + 1, U)
    Tp[:, : P[0], : P[1]] = T
    dev = Ti.device

    def idx(Pold: int, Pnew: int, o: torch.Tensor, r: int) -> torch.Tensor:
        a = torch.arange(Pnew, device=dev)[:, None]
        o = o.to(dev)[None, :]
        d = torch.remainder(a - o, Pnew)  # offset in the window of the pixel with residue a
        return torch.where(d < r, torch.remainder(o + d, Pold), torch.full_like(d, Pold))

    IY = idx(P[0], Pn[0], g.oy, g.ry)
    IX = idx(P[1], Pn[1], g.ox, g.rx)
    u = torch.arange(U, device=dev)
    # one flat gather (index_select is much faster than broadcast advanced indexing)
    flat = ((IY[:, None, :] * (P[1] + 1) + IX[None, :, :]) * U + u[None, None, :]).reshape(-1)
    out = Tp.reshape(nc, -1).index_select(1, flat)
    return out.reshape((nc * Pn[0] * Pn[1],) + tuple(shape))


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

    def image(self, units: Any = None) -> torch.Tensor:
        """Dense image parts ``H^I``, shape ``(k, C, H, W)`` for the selected units."""
        u = self._units(units)
        C, H, W = self.image_shape
        nc = self.channels.numel()
        k = u.numel()
        Py, Px = self.P
        if 4 * self.ry * self.rx <= H * W:
            # small windows: zeros + scatter of each unit's window (reads only k·C·r² values)
            patches, oy, ox = self.windows(u)
            out = patches.new_zeros(k, nc, H * W)
            pos = ((oy[:, None, None] + torch.arange(self.ry, device=u.device)[None, :, None]) * W
                   + ox[:, None, None] + torch.arange(self.rx, device=u.device)[None, None, :])
            out.scatter_(2, pos.reshape(k, 1, -1).expand(k, nc, -1), patches.reshape(k, nc, -1))
            out = out.reshape(k, nc, H, W)
        else:
            T = self._take(u)  # (k, nc, Py, Px)
            if (Py, Px) != (H, W):
                # H^I[u, c, y, x] = T[u, c, y mod Py, x mod Px] inside u's window, 0 outside
                T = T.repeat(1, 1, -(-H // Py), -(-W // Px))[:, :, :H, :W]
            out = T.contiguous()
            if out.data_ptr() == self.Ti.data_ptr():
                out = out.clone()  # never mask the stored Jacobian in place
            if self.ry < H:
                y = torch.arange(H, device=u.device)[None, :]
                oy = self.oy.to(u.device)[u][:, None]
                out.mul_(((y >= oy) & (y < oy + self.ry)).to(out.dtype)[:, None, :, None])
            if self.rx < W:
                xx = torch.arange(W, device=u.device)[None, :]
                ox = self.ox.to(u.device)[u][:, None]
                out.mul_(((xx >= ox) & (xx < ox + self.rx)).to(out.dtype)[:, None, None, :])
        if nc == C and torch.equal(self.channels.cpu(), torch.arange(C)):
            return out
        full = out.new_zeros(k, C, H, W)
        full[:, self.channels.to(u.device)] = out
        return full

    def bias(self, units: Any = None) -> torch.Tensor:
        """Dense bias parts ``H^b``, shape ``(k, n_b)``."""
        u = self._units(units)
        out = self.Tb.new_zeros(u.numel(), self.n_bias)
        if self.cols.numel():
            out[:, self.cols.to(u.device)] = self.Tb.index_select(1, u).T
        return out

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

        def pix(o: torch.Tensor, P: int, r: int, n: int) -> torch.Tensor:
            a = torch.arange(P, device=o.device)[:, None]
            d = torch.remainder(a - o[None, :], P)
            return torch.where(d < r, o[None, :] + d, torch.full_like(d, n))  # (P, U) pixel or n (zero)

        U = self.n_units
        if self.P == (H, W) and (self.ry, self.rx) == (H, W):
            xg = xc[:, :, :, None]  # dense regime: colour (c, a, b) is pixel (c, a, b)
        else:
            Y = pix(self.oy.to(x.device), self.P[0], self.ry, H)
            X = pix(self.ox.to(x.device), self.P[1], self.rx, W)
            flat = (Y[:, None, :] * (W + 1) + X[None, :, :]).reshape(-1)
            xg = xp.reshape(xp.shape[0], -1).index_select(1, flat).reshape(xp.shape[0], self.P[0], self.P[1], U)
        out = (self.Ti * xg).sum(dim=(0, 1, 2))
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
    def plan(self, targets: Sequence[str] | None = None) -> dict[str, Any]:
        """Periods and an estimate of the peak memory (bytes) of a forward sweep."""
        geom = self.geometry()
        names = [self._node_of(t).name for t in (targets or self.unit_layers)]
        need = self._ancestors(names)
        C = self.image_shape[0]
        P: dict[str, tuple[int, int]] = {}
        nb: dict[str, int] = {}
        size: dict[str, int] = {}
        item = torch.empty(0, dtype=self.dtype).element_size()
        for n in self.net.nodes:
            if n.name not in need:
                continue
            g = geom[n.name]
            if isinstance(n, InputNode):
                P[n.name] = (1, 1)
                nb[n.name] = 0
            else:
                py = max([P[i][0] for i in n.inputs] + [g.ry])
                px = max([P[i][1] for i in n.inputs] + [g.rx])
                P[n.name] = (py, px)
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
        return {"period": P, "n_bias_cols": nb, "state_bytes": size, "peak_bytes": peak}

    # ---------------------------------------------------------------- forward sweep
    def sweep(self, layers: Sequence[str] | None = None, channels: Sequence[int] | None = None,
              bias: bool = True, check_memory: bool = True) -> Iterator[LayerJacobian]:
        """Forward pass of compressed tangents; yields a :class:`LayerJacobian` for every
        requested unit layer (or node name), in topological order.

        Parameters
        ----------
        layers : unit-layer or node names (default: every unit layer).
        channels : image channels to include (column groups; default all).
        bias : include the bias columns.
        check_memory : refuse (ValueError) when the estimated peak exceeds the budget.
        """
        targets = list(layers) if layers is not None else self.unit_layers
        tnodes = {self._node_of(t).name: t for t in targets}
        need = self._ancestors(tnodes)
        C, H, W = self.image_shape
        chans = torch.arange(C) if channels is None else torch.as_tensor(list(channels), dtype=torch.long)
        nc = chans.numel()
        if check_memory:
            plan = self.plan(list(tnodes))
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
                Pn = (max([s.P[0] for s in ins] + [g.ry]), max([s.P[1] for s in ins] + [g.rx]))
                Tis = [_recolour(s.Ti, nc, s.P, Pn, geom[j]) for s, j in zip(ins, n.inputs)]
                st = self._step(n, Tis, ins, Pn, bias)
            states[n.name] = st
            if n.name in tnodes:
                U = int(np.prod(n.out_shape))
                yield LayerJacobian(
                    name=tnodes[n.name], out_shape=tuple(n.out_shape), image_shape=(C, H, W),
                    n_bias=self.net.n_bias, channels=chans, P=st.P, ry=g.ry, rx=g.rx, oy=g.oy, ox=g.ox,
                    Ti=st.Ti.reshape(nc, st.P[0], st.P[1], U), Tb=st.Tb.reshape(-1, U), cols=st.cols,
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
