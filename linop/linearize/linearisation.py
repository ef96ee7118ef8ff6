r"""An equivalent network linearised at a point, and its Jacobians as operators.

Seed 000, appendix C: at a fixed input the network is the composition of fixed linear maps
(convolutions, pooling, pads, restrictions ``R_l``) and fixed diagonal / selection maps (the
activation slopes ``Σ_l`` and the max-pool argmax selections), so

.. math::  J_0 = [W_0, R_0], \qquad J_l = W_l \Sigma_{l-1} J_{l-1} + [0, R_l],

with residual sums adding Jacobians and concatenations stacking them.  Because every piece
is positively homogeneous in the extended input, ``c_l(x) = J_l [x; x_b]`` exactly (Eq. 3)
and ``J`` evaluated at ``z = k·[x; x_b]`` (any ``k > 0``) is the same matrix.

:class:`Linearisation` holds every node's local Jacobian (:meth:`Node.linearize
<linop.network.Node.linearize>`) and offers three evaluations of the same operator:

* :meth:`Linearisation.operator` — ``J_l`` as a :class:`~linop.operators.GraphOperator` from
  the flattened ``[x; x_b]`` to the layer's flattened pre-bias output (``J.T`` maps unit
  selectors to hypersurfaces, ``J.to_sparse()`` is its CSR, scipy solvers take it as is);
* :meth:`Linearisation.sweep` — all rows of many layers by one forward pass of compressed
  tangents (:mod:`linop.linearize.sweep`; tested equal to ``J.to_sparse()``);
* :meth:`Linearisation.vjp` — a few rows by reverse mode (``J.apply_adjoint``).
"""
from __future__ import annotations

import math
from typing import Any, Iterable, Iterator, Sequence

import numpy as np
import torch

from ..network.graph import EquivalentNetwork
from ..network.node import Node, image_shape
from ..operators.base import Operator
from ..operators.composite import GraphOperator
from .. import validate
from ..utils import parse_memory
from . import schedule as _schedule
from .layer_jacobian import LayerJacobian
from .sweep import sweep as _sweep
from .tangents import bias_columns

__all__ = ["linearise", "Linearisation", "check_piecewise_linear"]


def check_piecewise_linear(net: EquivalentNetwork) -> None:
    """Refuse networks with a smooth activation: the exact identity of Eq. 3 needs them
    piecewise linear (seed 000 §3.3, 'Premise')."""
    bad = [f"{n.name} ({n.detail})" for n in net.nodes if not n.piecewise_linear]
    if bad:
        raise ValueError(
            "AdjointBackMapV2 needs a piecewise-linear network (ReLU / LeakyReLU / PReLU): the identity "
            "c(x) = <[x; x_b], H> (seed 000 Eq. 3) rests on the activation slopes being constant on the "
            "linear region that contains the ray {k·[x; x_b], k > 0}; a smooth activation such as tanh or "
            "sigmoid has slopes that change with k, so the Jacobian is not scale invariant and "
            "J(z)·[x; x_b] != c(x) (seed 000 §3.3). Non-piecewise-linear activations in this network: "
            + ", ".join(bad)
        )


class Linearisation:
    """An equivalent network linearised at ``z = k·[x; x_b]`` (seed 000 Eq. 3, appendix C).

    Build with :func:`linearise`.  Holds every node's local Jacobian at the point and
    produces, per unit layer (or node), the Jacobian of its pre-bias output w.r.t.
    ``[x; x_b]``: as an operator (:meth:`operator`), all rows by the compressed forward
    sweep (:meth:`sweep`, :meth:`layer`) or a few rows by reverse mode (:meth:`vjp`).
    """

    def __init__(self, net: EquivalentNetwork, x: Any, scale: float = 1.0, dtype: Any = None,
                 memory_budget: Any = "2GiB"):
        check_piecewise_linear(net)
        if not (isinstance(scale, (int, float, np.floating, np.integer)) and not isinstance(scale, bool)
                and math.isfinite(float(scale)) and float(scale) > 0):
            raise ValueError(f"scale must be a finite positive number (k of z = k·[x; x_b], seed 000 Eq. 3), got {scale!r}")
        dt = validate.dtype(dtype) if dtype is not None else net.dtype
        self.net = net.to(dt)
        x = validate.image(x, dt, "x")  # finite, real, not half precision (linop.validate)
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
        self.image_shape = image_shape(net.input_shape)
        k = self.scale
        # every node's Jacobian at z = k·[x; x_b]; positively homogeneous => the same as at [x; x_b]
        self._local = self.net.linearize((k * x).unsqueeze(0), k * self.x_b)
        self._operators: dict[str, GraphOperator] = {}

    # ---------------------------------------------------------------- structure
    @property
    def unit_layers(self) -> list[str]:
        return self.net.unit_layers

    def geometry(self) -> dict:
        """Receptive-field windows per node (x-independent; cached on the network)."""
        return self.net.geometry()

    def node_of(self, layer_or_node: str) -> Node:
        """The node of a unit-layer name (its pre-bias output) or of a node name."""
        if layer_or_node in self.net.unit_layers:
            return self.net.unit_node(layer_or_node)
        return self.net.node(layer_or_node)

    def node_operator(self, name: str) -> Operator:
        """Node ``name``'s local Jacobian at the point (from its stacked inputs, and ``x_b``
        last when it reads it)."""
        try:
            return self._local[name]
        except KeyError:
            raise KeyError(f"no linearised node {name!r} (the input has none)") from None

    def _needed(self, targets: Iterable[str]) -> list[Node]:
        need = set(targets)
        for n in reversed(self.net.nodes):
            if n.name in need:
                need.update(n.inputs)
        return [n for n in self.net.nodes if n.name in need]

    # ---------------------------------------------------------------- the operator
    def operator(self, layer: str) -> GraphOperator:
        r"""``J_l``: the Jacobian of ``layer``'s output w.r.t. the extended input, an Operator.

        ``layer`` is a unit-layer name (its *pre-bias* output ``c_l``) or a node name.  Maps
        the flattened ``[x; x_b]`` (length ``n_in + n_bias``) to the flattened output: a DAG of
        the nodes' local operators, every node evaluated once.  ``J.apply`` /
        ``apply_adjoint`` (batched torch), ``matvec`` / ``rmatvec`` (numpy), ``J.T`` (rows =
        effective hypersurfaces ``H_u = J^T e_u``, seed 000 Eq. 4), ``J.to_sparse()`` (the CSR,
        by the sparse recurrence, after a size estimate); scipy's ``lsqr``, ``lsmr``, ``svds``
        take it as is.  ``J @ [x; x_b] = c_l`` (Eq. 3).  Cached per layer."""
        target = self.node_of(layer)
        hit = self._operators.get(target.name)
        if hit is None:
            nodes = self._needed([target.name])
            n_b = self.net.n_bias
            sources = [tuple(self.net.input_shape)] + ([(n_b,)] if n_b else [])
            index = {}
            entries = []
            for n in nodes:
                if not n.inputs:
                    index[n.name] = 0
                    continue
                ins = [index[i] for i in n.inputs] + ([1] if n.reads_bias else [])
                index[n.name] = len(sources) + len(entries)
                entries.append((ins, self._local[n.name]))
            hit = GraphOperator(sources, entries, output=index[target.name])
            self._operators[target.name] = hit
        return hit

    # ---------------------------------------------------------------- planning / memory
    def periods(self, targets: Sequence[str] | None = None, lazy: bool = False,
                schedule: str | None = None) -> dict[str, tuple[int, int]]:
        """Compression period of every needed node (see :mod:`linop.linearize.schedule`);
        ``schedule`` is "auto" (default), "lazy" (also ``lazy=True``) or "identity"."""
        names = [self.node_of(t).name for t in (targets or self.unit_layers)]
        mode = schedule or ("lazy" if lazy else "auto")
        geom = None if mode == "identity" else self.geometry()
        return _schedule.periods(self._needed(names), names, geom, self.image_shape, mode)

    def plan(self, targets: Sequence[str] | None = None, schedule: str = "auto", channels: Any = None,
             bias: bool = True, bias_cols: Any = None) -> dict[str, Any]:
        """Periods, chunk sizes and the peak memory (bytes) of a forward sweep under the budget.

        ``schedule``: "auto" (the cost-model schedule, unless its peak exceeds the memory
        budget, then "lazy" if that needs less), "lazy" or "identity" (the dense identity
        batch, seed 000 Algorithm 1).  ``channels``: the image channels of the pass (a count or
        a list; default all); ``bias`` / ``bias_cols``: whether bias tangents start, and which
        columns of ``x_b`` (default all).  The terms of the estimate and how the chunk sizes
        bound it: :func:`linop.linearize.schedule.memory_plan`, planned within
        ``(1 - PLAN_RESERVE)·memory_budget`` (:data:`linop.linearize.schedule.PLAN_RESERVE`:
        10 % left for what the plan does not count).  ``fits``: False when the states alone
        exceed that (a sweep refuses; use fewer channels / columns per pass)."""
        if schedule not in _schedule.SCHEDULES:
            raise ValueError(f"schedule must be one of {_schedule.SCHEDULES}, got {schedule!r}")
        names = [self.node_of(t).name for t in (targets or self.unit_layers)]
        nodes = self._needed(names)
        geom = None if schedule == "identity" else self.geometry()
        period = _schedule.periods(nodes, names, geom, self.image_shape, schedule)
        nc = self.image_shape[0] if channels is None else (
            int(channels) if isinstance(channels, (int, np.integer)) else len(list(channels)))
        allowed = None if bias_cols is None else np.unique(np.asarray(list(bias_cols), dtype=np.int64))
        new_cols: dict[str, np.ndarray] = {}
        if bias:
            for n in nodes:
                if n.reads_bias:
                    c = np.asarray(bias_columns(self._local[n.name]), dtype=np.int64)
                    new_cols[n.name] = c if allowed is None else np.intersect1d(c, allowed)
        item = torch.empty(0, dtype=self.dtype).element_size()
        budget = int(self.memory_budget * (1.0 - _schedule.PLAN_RESERVE))  # the rest: what the plan does not count
        out = _schedule.memory_plan(nodes, period, new_cols, self.net.n_bias, nc, item, budget=budget,
                                    targets=names, ops={n.name: self._local[n.name] for n in nodes if n.inputs})
        out["schedule"] = schedule
        out["new_cols"] = new_cols
        out["n_bias"] = int(sum(c.size for c in new_cols.values()))
        if schedule == "auto" and not out["fits"]:
            lazy = self.plan(targets, "lazy", channels, bias, bias_cols)  # jumping ahead costs memory: fall back
            if lazy["peak_bytes"] < out["peak_bytes"]:
                return lazy
        return out

    # ---------------------------------------------------------------- forward sweep
    def sweep(self, layers: Sequence[str] | None = None, channels: Sequence[int] | None = None,
              bias: bool = True, check_memory: bool = True, schedule: str = "auto",
              bias_cols: Sequence[int] | None = None, transient: bool = False) -> Iterator[LayerJacobian]:
        """Forward pass of compressed tangents; yields a :class:`LayerJacobian` for every
        requested unit layer (or node name), in topological order.

        Parameters
        ----------
        layers : unit-layer or node names (default: every unit layer).
        channels : image channels to include (column groups; default all; ``[]``: none — a
            bias-only pass).
        bias : include the bias columns.
        check_memory : refuse (ValueError) when the states alone exceed the budget (every
            temporary is bounded by the plan's chunk sizes, :meth:`plan`).
        schedule : "auto" (cost-model periods), "lazy" (smallest periods) or "identity"
            (``P = (H, W)`` everywhere: the paper's identity-batch Jacobian, seed 000
            Algorithm 1); all give the same Jacobians, they differ only in speed and memory.
        bias_cols : with ``bias``, the columns of ``x_b`` whose tangents to include (default
            all); the Jacobian's other bias columns come back as zero.  Column groups of a pass
            add up: ``J = Σ_passes J_pass`` exactly, since each column is in one pass.
        transient : the caller uses each yielded Jacobian before asking for the next and keeps
            none of them (e.g. contracts it with :meth:`LayerJacobian.dot`): later steps may then
            overwrite its batches in place (a slope after a unit layer multiplies the tangents
            it passes on in place — no new state).  False (default): yielded batches stay intact.
        """
        return _sweep(self, layers, channels, bias, check_memory, schedule, bias_cols, transient)

    def layer(self, layer: str, channels: Sequence[int] | None = None, bias: bool = True) -> LayerJacobian:
        """The :class:`LayerJacobian` of one unit layer (a sweep that stops there)."""
        return next(iter(self.sweep([layer], channels=channels, bias=bias)))

    # ---------------------------------------------------------------- reverse mode
    def vjp(self, layer: str, seeds: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``J_lᵀ s`` for a batch of cotangents ``s`` of shape ``(k, *out_shape)`` at the output of
        unit layer (or node) ``layer``.  Returns ``(H^I (k, *input_shape), H^b (k, n_b))``.

        With ``s = e_u`` this is the effective hypersurface of unit ``u`` (seed 000 Eq. 4:
        the adjoint ``J_Fᵀ`` applied to the kernel/weight row): ``operator(layer).apply_adjoint``."""
        target = self.node_of(layer)
        seeds = torch.as_tensor(seeds).to(device=self.x.device, dtype=self.dtype)
        if tuple(seeds.shape[1:]) != tuple(target.out_shape):
            raise ValueError(f"seeds must have shape (k, {', '.join(map(str, target.out_shape))}), got {tuple(seeds.shape)}")
        k = seeds.shape[0]
        H = self.operator(layer).apply_adjoint(seeds)
        n_in = self.x.numel()
        return H[:, :n_in].reshape((k,) + tuple(self.net.input_shape)), H[:, n_in:]

    def unit_vjp(self, layer: str, units: Any) -> tuple[torch.Tensor, torch.Tensor]:
        """Effective hypersurfaces of the given flat units of ``layer`` by reverse mode."""
        target = self.node_of(layer)
        U = int(np.prod(target.out_shape))
        u = torch.as_tensor(units, dtype=torch.long).reshape(-1)
        seeds = torch.zeros((u.numel(), U), dtype=self.dtype, device=self.x.device)
        seeds[torch.arange(u.numel()), u.to(seeds.device)] = 1.0
        return self.vjp(layer, seeds.reshape((u.numel(),) + tuple(target.out_shape)))

    def preactivations(self) -> dict[str, torch.Tensor]:
        """True pre-bias values ``c_l`` at the *unscaled* input (flat, C-order)."""
        pre = self.net.preactivations(self.x.unsqueeze(0))
        return {k: v[0].reshape(-1) for k, v in pre.items()}

    def extended_input(self) -> torch.Tensor:
        """``[x; x_b]`` flattened (the domain point of :meth:`operator`)."""
        return torch.cat([self.x.reshape(-1), self.x_b.reshape(-1)])


def linearise(net: EquivalentNetwork, x: Any, scale: float = 1.0, dtype: Any = None,
              memory_budget: Any = "2GiB") -> Linearisation:
    """Linearise ``net`` at ``z = scale·[x; x_b]`` (seed 000 Eq. 3 with ``k = scale``).

    Parameters
    ----------
    net : EquivalentNetwork
        Must be piecewise linear (ReLU / LeakyReLU / PReLU); tanh / sigmoid raise ValueError.
    x : tensor, shape ``input_shape`` or ``(1, *input_shape)``; finite (NaN / Inf raise
        ValueError: the activation pattern of a non-finite input means nothing); integer
        images are cast exactly to ``dtype``, float16 / bfloat16 are refused.
        One input (the batch rule of single-sample APIs).
    scale : float > 0
        ``k``; provably irrelevant (positive homogeneity), accepted for fidelity to the paper.
    dtype : compute dtype (float32 / float64; default: the network's, ``net.dtype``); float16 /
        bfloat16 raise ValueError (:func:`linop.validate.dtype`).
    memory_budget : bytes or a string like ``"2GiB"``; sweeps estimate their peak first.

    Returns
    -------
    Linearisation
    """
    return Linearisation(net, x, scale=scale, dtype=dtype, memory_budget=memory_budget)
