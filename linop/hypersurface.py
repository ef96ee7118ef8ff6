r"""AdjointBackMapV2: effective hypersurfaces of CNN units, reconstruction modes RM0–RM4.

Seed 000 §3.2–3.3, Eqs. 3–13, Algorithm 1, Fig. 5.  For a unit ``u`` of a unit layer ``l``
(a conv output or an FC output) of a piecewise-linear network at input ``x``, its *effective
hypersurface* ``H_u = (W_l Σ_{l-1} J_{l-1})ᵀ e_u`` — the row of the Jacobian of the unit's
pre-bias value ``c_u`` w.r.t. the extended input ``[x; x_b]`` — has an image part ``H^I``
(shape of ``x``) and a bias part ``H^b`` (length of ``x_b``) with

.. math::  c_u(x) = \langle x, H^I_u \rangle + \langle x_b, H^b_u \rangle   \quad\text{(Eq. 3/4)}.

Layouts (Tables D.2 / D.5; ``C, H, W`` = input shape, ``n_b = len(x_b)``)
----------------------------------------------------------------------------
Let the layer have ``C_out`` out-channels at ``S = H_out·W_out`` stride positions ``s``,
reading ``C_in`` in-channels ``j``.  ``units`` are flat C-order indices into the layer's
``(C_out, H_out, W_out)`` (i.e. ``u = i·S + s``) for RM2 / RM4 / RM0, and out-channel indices
``i`` for RM3 / RM1 (those modes sum over all positions).

====  =========================================  ==============================  =============
mode  image                                      bias                            layout names
====  =========================================  ==============================  =============
RM2   ``(U, C, H, W)``: ``H_{l,s,i}`` (Eq. 11)    ``(U, n_b)``                    unit, C, H, W
RM4   ``(U, C_in, C, H, W)``: ``H_{l,s,j,i}``,    ``(U, C_in, n_b)``              unit, in_channel, C, H, W
      the contribution of in-channel ``j``
      before the in-channel sum (Eq. 8)
RM3   ``(I, C_in, C, H, W)``: ``Σ_s RM4``        ``(I, C_in, n_b)``              out_channel, in_channel, C, H, W
      (Eq. 10)
RM1   ``(I, C, H, W)``: ``Σ_s Σ_j RM4`` (Eq. 12)  ``(I, n_b)``                    out_channel, C, H, W
RM0   ``(K, C, H, W)``: FC output ``k`` (Eq. 13)  ``(K, n_b)``                    unit, C, H, W
====  =========================================  ==============================  =============

The paper orders RM4 as ``s × j × i``; here the selected ``(i, s)`` units come first (in the
order given) and ``j`` second, so that ``RM2 = RM4.sum(1)``, ``RM1 = RM3.sum(1)``.  RM2 of an FC
layer is RM0.  RM1/RM3/RM4 need a layer whose input is a ``(C_in, H, W)`` feature map.
The first conv layer's kernels already live in the input space (``H^b = 0`` there); they are
computed like any other layer.

``scale`` is ``k`` of ``z = k·[x; x_b]`` (Eq. 3; the paper uses ``k = 1/8``).  The network is
positively homogeneous in ``[x; x_b]``, so the activation pattern, hence ``H``, does not
depend on ``k`` (tested).

Memory: the output size is estimated before anything is allocated; over ``memory_budget``
a ValueError gives the size and how to select fewer units, unless ``stream=True``, which
returns an iterator of :class:`BackMap` chunks of units that each fit the budget.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Iterator, Sequence

import numpy as np
import torch

from .network.graph import EquivalentNetwork, LinearNode
from .linearize import Linearisation, check_piecewise_linear, linearise
from .linearize.schedule import PLAN_RESERVE
from .linearize.sweep import release_memory
from . import validate
from .utils import gib, parse_memory

__all__ = ["BackMap", "backmap", "reconstructed_activations", "verification_plan", "verification_passes", "MODES"]

MODES = ("RM0", "RM1", "RM2", "RM3", "RM4")
#: below this many selected RM2/RM0 units the reverse mode (one VJP per unit) is used
REVERSE_MAX_UNITS = 32


@dataclass
class BackMap:
    """Effective hypersurfaces of the selected units in a reconstruction mode's layout.

    Attributes
    ----------
    image : tensor, leading axes per ``layout`` then the input's ``(C, H, W)``
    bias : tensor, the same leading axes then ``n_b``
    layer : unit layer name
    mode : "RM0" … "RM4"
    units : LongTensor of the selected units (flat indices, or out-channels for RM1/RM3)
    layout : axis names of ``image``
    scale : k of z = k·[x; x_b]
    """

    image: torch.Tensor
    bias: torch.Tensor
    layer: str
    mode: str
    units: torch.Tensor
    layout: tuple[str, ...]
    scale: float

    def reconstruct(self, x: Any, x_b: Any) -> torch.Tensor:
        """``<x, H^I> + <x_b, H^b>`` over the trailing axes (the reconstructed activations)."""
        x = torch.as_tensor(x).to(self.image)
        x_b = torch.as_tensor(x_b).to(self.bias).reshape(-1)
        lead = self.bias.shape[:-1]
        return self.image.reshape(lead + (-1,)) @ x.reshape(-1) + self.bias @ x_b


def _conv_like(net: EquivalentNetwork, layer: str) -> tuple[LinearNode, tuple[int, ...], tuple[int, ...]]:
    node = net.unit_node(layer)
    in_shape = tuple(net.node(node.inputs[0]).out_shape)
    return node, in_shape, tuple(node.out_shape)


def _select(units: Any, n: int, what: str) -> torch.Tensor:
    """The selection through the one validation of unit selections (:func:`linop.validate.units`)."""
    return validate.units(units, n, "units", what)


def backmap(
    net: EquivalentNetwork,
    x: Any,
    layer: str,
    mode: str = "RM2",
    units: Any = None,
    scale: float = 1.0,
    dtype: Any = None,
    memory_budget: Any = "2GiB",
    stream: bool = False,
    method: str = "auto",
    linearisation: Linearisation | None = None,
) -> BackMap | Iterator[BackMap]:
    """Effective hypersurfaces (AdjointBackMapV2, seed 000 Algorithm 1) of a unit layer.

    Parameters
    ----------
    net : EquivalentNetwork (piecewise linear; tanh / sigmoid raise ValueError)
    x : one input, shape ``input_shape`` or ``(1, *input_shape)`` (None with ``linearisation``)
    layer : unit layer name (``net.unit_layers``: "Conv0" … "FC")
    mode : "RM0" … "RM4" (see the module docstring for the layouts)
    units : selection (flat unit indices for RM2/RM4/RM0, out-channels for RM3/RM1; None = all):
        integer indices (each at most once; rows come back in the given order), a slice, or a
        boolean mask with one entry per selectable unit.  Floats, out-of-range / duplicate
        indices and an empty selection raise ValueError (:func:`linop.validate.units`).
    scale : k > 0 of z = k·[x; x_b] (Eq. 3; changes nothing)
    dtype : compute dtype (float32 / float64; default the network's; float16 / bfloat16 raise
        ValueError, like ``from_torch``).  ``x`` must be finite (NaN / Inf raise ValueError).
    memory_budget : bytes or "2GiB"-style string, bounds the output (and the linearisation)
    stream : return an iterator of BackMap chunks (of units) each within the budget
    method : "auto" | "forward" | "reverse" — forward compressed-window sweep (many units)
        or one VJP per unit (few units).  Both are exact; "auto" picks by the unit count.
    linearisation : an existing ``linearise(net, x, ...)`` to reuse (no forward pass is run
        again); then ``x`` may be None, and ``scale`` / ``dtype`` are the linearisation's.

    Returns
    -------
    BackMap, or an iterator of BackMap when ``stream=True``.
    """
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    if method not in ("auto", "forward", "reverse"):
        raise ValueError(f"method must be 'auto', 'forward' or 'reverse', got {method!r}")
    if layer not in net.unit_layers:
        raise ValueError(f"unknown unit layer {layer!r}; this network has {net.unit_layers}")
    check_piecewise_linear(net)
    if dtype is not None:
        dtype = validate.dtype(dtype)
    budget = parse_memory(memory_budget)
    node, in_shape, out_shape = _conv_like(net, layer)
    fc = len(out_shape) == 1
    if mode == "RM0" and not fc:
        raise ValueError(f"RM0 maps FC weight rows back (Eq. 13); {layer} is a conv layer with output {out_shape}: use RM1–RM4")
    if mode in ("RM1", "RM3", "RM4") and (fc or len(in_shape) != 3 or len(out_shape) != 3):
        raise ValueError(
            f"{mode} needs a conv layer reading a (C_in, H, W) feature map and producing (C_out, H_out, W_out); "
            f"{layer} maps {in_shape} -> {out_shape} (use RM0/RM2 for FC outputs)")
    lin = _linearisation(net, x, scale, dtype, budget, linearisation)
    item = torch.empty(0, dtype=lin.dtype).element_size()
    d_in = int(np.prod(net.input_shape)) + net.n_bias
    U = int(np.prod(out_shape))
    if mode in ("RM0", "RM2", "RM4"):
        sel = _select(units, U, f"flat unit indices of {layer}'s {out_shape}")
    else:
        sel = _select(units, out_shape[0], f"out-channel indices of {layer} ({out_shape[0]} channels)")
    per = d_in * item * (in_shape[0] if mode in ("RM3", "RM4") else 1)
    need = sel.numel() * per
    if need > budget and not stream:
        fit = max(0, budget // per)
        what = "out-channels" if mode in ("RM1", "RM3") else "units"
        raise ValueError(
            f"backmap {mode} of {layer} for {sel.numel():,} {what} needs {gib(need)} "
            f"({sel.numel():,} x {per // item:,} values of {item} bytes) > memory_budget={gib(budget)}; "
            f"select fewer {what} (units=..., at most {fit:,} fit), pass stream=True to get chunks, "
            f"or raise memory_budget")
    if not stream:
        return _compute(lin, layer, mode, sel, method, in_shape, out_shape)
    # the forward sweep's peak is bounded by the budget on its own (chunked steps); while the
    # chunks are formed, what stays of it is the layer's compressed Jacobian (its state)
    sweep = 0
    if mode in ("RM0", "RM2") and _use_forward(method, sel.numel()):
        sweep = lin.plan([layer])["state_bytes"][lin.net.unit_node(layer).name]
    if per > budget - sweep:
        raise ValueError(f"one {mode} row of {layer} needs {gib(per)} (+ {gib(sweep)} for the linearisation) "
                         f"> memory_budget={gib(budget)}; raise memory_budget")
    chunk = int((budget - sweep) // per)
    return _stream(lin, layer, mode, sel, method, in_shape, out_shape, chunk)


def _linearisation(net: EquivalentNetwork, x: Any, scale: float, dtype: Any, budget: int,
                   lin: Linearisation | None) -> Linearisation:
    """``lin`` checked against ``net`` / ``x``, or a new linearisation of ``net`` at ``x``."""
    if lin is None:
        if x is None:
            raise ValueError("x is required unless an existing linearisation= is given")
        return linearise(net, x, scale=scale, dtype=dtype, memory_budget=budget)
    if not isinstance(lin, Linearisation):
        raise TypeError(f"linearisation must be a Linearisation (from linop.linearise), got {type(lin).__name__}")
    if lin.net.nodes is not net.nodes:
        raise ValueError("linearisation was built for another network than net")
    if x is not None:
        xt = validate.image(x, lin.dtype, "x").to(lin.x.device)
        if xt.numel() != lin.x.numel():
            raise ValueError(f"x has shape {tuple(xt.shape)}; the linearisation was taken at {tuple(lin.x.shape)}")
        xt = xt.reshape(lin.x.shape)
        if not torch.equal(xt, lin.x):
            raise ValueError("x differs from the point the linearisation was taken at; pass x=None to use it")
    return lin


def _stream(lin, layer, mode, sel, method, in_shape, out_shape, chunk) -> Iterator[BackMap]:
    LJ = None
    if mode in ("RM0", "RM2") and _use_forward(method, sel.numel()):
        LJ = lin.layer(layer)  # one sweep, shared by all chunks
    for a in range(0, sel.numel(), chunk):
        yield _compute(lin, layer, mode, sel[a: a + chunk], method, in_shape, out_shape, LJ=LJ)


def _use_forward(method: str, k: int) -> bool:
    return method == "forward" or (method == "auto" and k > REVERSE_MAX_UNITS)


def _compute(lin: Linearisation, layer: str, mode: str, sel: torch.Tensor, method: str,
             in_shape: tuple[int, ...], out_shape: tuple[int, ...], LJ=None) -> BackMap:
    node = lin.net.unit_node(layer)
    src = node.inputs[0]
    op = node.op
    k = sel.numel()
    dev = lin.x.device
    if mode in ("RM0", "RM2"):
        if LJ is not None or _use_forward(method, k):  # a stream's chunks all read its one sweep
            LJ = LJ if LJ is not None else lin.layer(layer)
            HI, Hb = LJ.image(sel).reshape((k,) + tuple(lin.net.input_shape)), LJ.bias(sel)
        else:
            HI, Hb = lin.unit_vjp(layer, sel)
        layout = ("unit",) + ("C", "H", "W")
        return BackMap(HI, Hb, layer, mode, sel, layout, lin.scale)

    C_in = in_shape[0]
    C_out, Ho, Wo = out_shape
    S = Ho * Wo
    if mode == "RM1":
        # H_{l,i} = J_lᵀ Σ_s e_{i,s}: one VJP per out-channel (Eq. 12)
        seeds = torch.zeros((k, C_out, S), dtype=lin.dtype, device=dev)
        seeds[torch.arange(k), sel.to(dev)] = 1.0
        HI, Hb = lin.vjp(layer, seeds.reshape((k,) + out_shape))
        return BackMap(HI, Hb, layer, mode, sel, ("out_channel", "C", "H", "W"), lin.scale)

    # RM4 / RM3: the contribution of in-channel j is J_{l-1}ᵀ P_j W_lᵀ e (P_j keeps channel j of
    # the layer's input): back-propagate W_lᵀ e to the layer's input, split it by channel,
    # and pull each piece back through the linearised network below (Eqs. 8, 10).
    if mode == "RM4":
        seeds = torch.zeros((k, int(np.prod(out_shape))), dtype=lin.dtype, device=dev)
        seeds[torch.arange(k), sel.to(dev)] = 1.0
        seeds = seeds.reshape((k,) + out_shape)
        layout = ("unit", "in_channel", "C", "H", "W")
    else:
        seeds = torch.zeros((k, C_out, S), dtype=lin.dtype, device=dev)
        seeds[torch.arange(k), sel.to(dev)] = 1.0
        seeds = seeds.reshape((k,) + out_shape)
        layout = ("out_channel", "in_channel", "C", "H", "W")
    g = op.apply_adjoint(seeds)  # (k, C_in, H, W)
    split = torch.zeros((k, C_in) + tuple(in_shape), dtype=g.dtype, device=dev)
    j = torch.arange(C_in, device=dev)
    split[:, j, j] = g[:, j]  # split[u, j] = P_j g[u]
    HI, Hb = lin.vjp(src, split.reshape((k * C_in,) + tuple(in_shape)))
    HI = HI.reshape((k, C_in) + tuple(lin.net.input_shape))
    Hb = Hb.reshape(k, C_in, -1)
    return BackMap(HI, Hb, layer, mode, sel, layout, lin.scale)


def verification_passes(lin: Linearisation, layers: Sequence[str]) -> dict[str, Any]:
    r"""Split the forward sweep of ``layers`` into passes whose memory plans fit the budget.

    A pass is ``(channels, bias, bias_cols)`` of :meth:`Linearisation.sweep`; the passes cover
    every image channel and every bias column exactly once, so
    ``ĉ = Σ_passes <[x; x_b], H_pass>`` — exact in exact arithmetic (the Jacobian is the sum of
    its column blocks; in floating point the sums are regrouped, which changes ĉ by rounding only).
    In order of preference:

    1. one pass (every temporary is already bounded by the chunk sizes of
       :func:`linop.linearize.schedule.memory_plan`; only the states can exceed the budget);
    2. groups of ``m`` image channels (``m`` as large as fits), the bias columns in group 0 —
       whose plan is estimated with its bias tangents;
    3. when one channel with the bias tangents does not fit: image passes without bias
       (``bias=False``), then bias-only passes (``channels=[]``) over ``q`` contiguous
       blocks of ``x_b``'s columns (``q`` doubled until every block fits).

    Raises ValueError, naming the size and the way out, when one channel or one bias column
    alone does not fit.  Returns ``{"passes": [...], "peak_bytes": max over the passes}``."""
    C = lin.image_shape[0]
    nb = lin.net.n_bias
    allc = list(range(C))
    budget = lin.memory_budget

    def refuse(what: str, p: dict) -> ValueError:
        need = p["peak_bytes"] / (1.0 - PLAN_RESERVE)
        return ValueError(
            f"verification of {len(layers)} layer(s) up to {layers[-1]!r} needs ~{gib(need)} with {what} "
            f"per pass (the compressed tangent states alone, evaluated one tangent at a time, and a "
            f"{PLAN_RESERVE:.0%} reserve) > memory_budget={gib(budget)}; raise memory_budget to at least "
            f"{gib(need)}, or verify fewer layers at a time (layers=[...])")

    one = lin.plan(layers)
    if one["fits"]:
        return {"passes": [(None, True, None)], "peak_bytes": one["peak_bytes"]}
    for m in range(C - 1, 0, -1):
        g0 = lin.plan(layers, channels=m, bias=True)
        if g0["fits"]:
            groups = [allc[a:a + m] for a in range(0, C, m)]
            peak = g0["peak_bytes"]
            if len(groups) > 1:
                peak = max(peak, lin.plan(layers, channels=m, bias=False)["peak_bytes"])
            return {"passes": [(groups[0], True, None)] + [(g, False, None) for g in groups[1:]], "peak_bytes": peak}
    # the bias tangents in passes of their own
    img = None
    for m in range(C, 0, -1):
        img = lin.plan(layers, channels=m, bias=False)
        if img["fits"]:
            break
    if img is None or not img["fits"]:
        raise refuse("one image channel", img if img is not None else one)
    passes: list = [(allc[a:a + m], False, None) for a in range(0, C, m)]
    peak = img["peak_bytes"]
    q = 1
    while True:
        blocks = [b for b in np.array_split(np.arange(nb), q) if b.size]
        plans = [lin.plan(layers, channels=[], bias=True, bias_cols=b) for b in blocks]
        if all(p["fits"] for p in plans):
            return {"passes": passes + [([], True, b.tolist()) for b in blocks],
                    "peak_bytes": max([peak] + [p["peak_bytes"] for p in plans])}
        if q >= nb:
            raise refuse("one bias column", max(plans, key=lambda p: p["peak_bytes"]))
        q = min(nb, 2 * q)


def verification_plan(net: EquivalentNetwork, x: Any, layers: Sequence[str] | None = None, scale: float = 1.0,
                      dtype: Any = None, memory_budget: Any = "2GiB",
                      linearisation: Linearisation | None = None) -> dict[str, Any]:
    """The passes and the planned peak memory (bytes) of :func:`reconstructed_activations` with
    the same arguments (:func:`verification_passes`); raises its ValueError when nothing fits."""
    lin = _linearisation(net, x, scale, dtype, parse_memory(memory_budget), linearisation)
    return verification_passes(lin, _check_layers(lin, layers))


def _check_layers(lin: Linearisation, layers: Sequence[str] | None) -> list[str]:
    layers = list(layers) if layers is not None else lin.unit_layers
    for l in layers:
        if l not in lin.unit_layers:
            raise ValueError(f"unknown unit layer {l!r}; this network has {lin.unit_layers}")
    return layers


def reconstructed_activations(
    net: EquivalentNetwork,
    x: Any,
    layers: Sequence[str] | None = None,
    scale: float = 1.0,
    dtype: Any = None,
    memory_budget: Any = "2GiB",
    linearisation: Linearisation | None = None,
) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """True and reconstructed pre-bias activations of every unit of the given unit layers.

    For each layer ``l`` (all unit layers if None): ``c`` from the network's forward pass and
    ``ĉ = <x, H^I> + <x_b, H^b>`` from the effective hypersurfaces of *all* units (seed 000
    Eq. 14), both flat in C-order of the layer's output, in the compute ``dtype``.  The
    hypersurfaces are never materialised densely: ``ĉ`` is contracted from the compressed
    window representation of one forward sweep (see :mod:`linop.linearize.sweep`).
    ``linearisation``: an existing ``linearise(net, x, ...)`` to reuse (``x`` may then be
    None; its ``scale`` / ``dtype`` / ``memory_budget`` apply).

    Memory: the sweep's peak is planned before anything is allocated and bounded by
    ``memory_budget`` — chunked evaluation inside each node's step, and, when the tangent
    states themselves do not fit, several passes over image-channel groups and bias-column
    blocks whose contributions add up (:func:`verification_passes`); ValueError with the
    size when even one channel or one bias column does not fit.

    Returns
    -------
    dict layer -> (c, c_hat)
    """
    lin = _linearisation(net, x, scale, dtype, parse_memory(memory_budget), linearisation)
    layers = _check_layers(lin, layers)
    plan = verification_passes(lin, layers)
    c = lin.preactivations()
    out: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    x_b = lin.x_b
    acc: dict[str, torch.Tensor] = {}
    for ch, bias, cols in plan["passes"]:
        # transient: each Jacobian is contracted before the sweep goes on, so slopes may overwrite its batches
        for LJ in lin.sweep(layers, channels=ch, bias=bias, bias_cols=cols, transient=True):
            part = LJ.dot(lin.x, x_b if bias else None)
            acc[LJ.name] = acc[LJ.name] + part if LJ.name in acc else part
            del LJ  # the sweep frees states its later nodes no longer read: hold none of them here
        if len(plan["passes"]) > 1:
            release_memory()  # the pass's states are gone: give their pages back before the next
    for l in layers:
        out[l] = (c[l], acc[l])
    return out
