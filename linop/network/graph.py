"""The equivalent network: a trained CNN as a graph of explicit operators on [x; x_b].

Seed 000 (§3.2, Fig. 2, Eq. 7) rewrites a trained CNN as an *equivalent model*: BatchNorm
folded into the convolutions, Fixup multipliers folded into the weights, and every bias
moved into one extra input vector ``x_b`` that each layer reads its slice of through a
restriction operator ``R_l``.  This module holds that data model; ``linop.convert``
builds it from a torch module (``from_torch``), ``linop.linearize`` linearises it.  Each
node kind is one class that owns its rules (:mod:`linop.network.node` documents the
protocol); the engines here loop over nodes and never branch on their type.

Node kinds (all act on batched tensors ``(N, *shape)``):

* :class:`InputNode`      — the image x.
* :class:`LinearNode`     — ``y = A x`` with ``A`` an :class:`~linop.operators.Operator`
  (conv, linear, average pooling, channel pad, subsample, flatten, scale).  Conv / FC
  nodes carry ``unit_layer`` (``"Conv0"`` … ``"FC"``): their output is that unit layer's
  *pre-bias* value c (seed 000 Eq. 3).
* :class:`BiasNode`       — ``y = x + R x_b[slice]`` (the layer's own bias; Fixup scalars).
* :class:`ActivationNode` — elementwise σ; piecewise linear (ReLU, LeakyReLU, PReLU) or
  smooth (tanh, sigmoid; these break the exact identity of seed 000).
* :class:`MaxPoolNode`    — max pooling; at a point it is the argmax selection operator.
* :class:`AddNode`        — residual sum.
* :class:`CatNode`        — channel concatenation.
"""
from __future__ import annotations

import copy
from contextlib import nullcontext
from dataclasses import dataclass, field
from typing import Any, Iterable

import numpy as np
import torch

from ..operators.base import Operator, torch_dtype
from .activation import PIECEWISE_LINEAR, ActivationNode
from .geometry import Window, window_of
from .linear import BiasNode, LinearNode
from .merge import AddNode, CatNode
from .node import InputNode, Node, image_shape
from .pool import MaxPoolNode

__all__ = [
    "Node",
    "InputNode",
    "LinearNode",
    "BiasNode",
    "ActivationNode",
    "MaxPoolNode",
    "AddNode",
    "CatNode",
    "EquivalentNetwork",
    "PIECEWISE_LINEAR",
]

@dataclass
class EquivalentNetwork:
    """A piecewise-linear (or not) CNN as a graph of operators on the extended input [x; x_b].

    Attributes
    ----------
    nodes : list of Node, in topological order; ``nodes[0]`` is the input.
    output : name of the output node.
    x_b : 1-D tensor, every bias of the network concatenated (seed 000 Fig. 2).
    bias_slices : name -> slice of ``x_b`` (the paper's b'[b_i]).
    unit_layers : ordered names of the unit layers (every conv and FC output).
    module_nodes : torch module path -> name of the last node that module produced (filled by
        ``linop.convert.from_torch``; see :meth:`node_for_module`).
    unit_modules : unit layer -> torch module path of its conv / linear.
    """

    nodes: list[Node]
    output: str
    x_b: torch.Tensor
    bias_slices: dict[str, slice] = field(default_factory=dict)
    name: str = "network"
    module_nodes: dict[str, str] = field(default_factory=dict)
    unit_modules: dict[str, str] = field(default_factory=dict)
    #: x-independent derived structure (geometry), owned by the network; copies share it
    _cache: dict = field(default_factory=dict, init=False, repr=False, compare=False)

    def __post_init__(self):
        self._index = {n.name: i for i, n in enumerate(self.nodes)}
        if len(self._index) != len(self.nodes):
            raise ValueError("duplicate node names in the equivalent network")
        for n in self.nodes:
            for i in n.inputs:
                if self._index.get(i, len(self.nodes)) >= self._index[n.name]:
                    raise ValueError(f"node {n.name} reads {i!r}, which is not an earlier node")

    # ------------------------------------------------------------------ structure
    @property
    def input_shape(self) -> tuple[int, ...]:
        return self.nodes[0].out_shape

    @property
    def dtype(self) -> torch.dtype:
        return self.x_b.dtype

    @property
    def n_bias(self) -> int:
        return int(self.x_b.numel())

    def node(self, name: str) -> Node:
        try:
            return self.nodes[self._index[name]]
        except KeyError:
            raise KeyError(f"no node named {name!r}; nodes: {[n.name for n in self.nodes]}") from None

    @property
    def unit_layers(self) -> list[str]:
        return [n.unit_layer for n in self.nodes if isinstance(n, LinearNode) and n.unit_layer]

    def unit_node(self, layer: str) -> LinearNode:
        """The LinearNode whose output is unit layer ``layer``'s pre-bias value."""
        for n in self.nodes:
            if isinstance(n, LinearNode) and n.unit_layer == layer:
                return n
        raise ValueError(f"unknown unit layer {layer!r}; this network has {self.unit_layers}")

    def own_bias(self, layer: str) -> BiasNode | None:
        """The BiasNode holding unit layer ``layer``'s own bias, if any."""
        for n in self.nodes:
            if isinstance(n, BiasNode) and n.unit_layer == layer:
                return n
        return None

    def node_for_module(self, path: str) -> Node:
        """The last node produced by torch submodule ``path`` (e.g. ``"layer1.0"``, ``"bn3"``).

        Its output equals that submodule's output, except where the converter folded the
        module away: a conv / linear whose BatchNorm or Fixup multiplier was folded into it
        (seed 000 Eq. 7) maps to its unit layer's LinearNode, i.e. the *folded* pre-bias value;
        the BatchNorm itself maps to the BiasNode after it (the BN output)."""
        if path in self.module_nodes:
            return self.node(self.module_nodes[path])
        hits = [n for n in self.nodes if n.source == path]
        if hits:
            return hits[-1]
        known = sorted(self.module_nodes) or sorted({n.source for n in self.nodes if n.source})
        raise KeyError(f"no node of {self.name} comes from module {path!r}; known modules: {known}")

    def bias_values(self, name: str) -> torch.Tensor:
        """The bias called ``name`` (a view of ``x_b[bias_slices[name]]``)."""
        if name not in self.bias_slices:
            raise KeyError(f"no bias named {name!r}; biases: {list(self.bias_slices)}")
        return self.x_b[self.bias_slices[name]]

    @property
    def piecewise_linear(self) -> bool:
        return all(n.piecewise_linear for n in self.nodes)

    def consumers(self, name: str) -> list[str]:
        return [n.name for n in self.nodes if name in n.inputs]

    # ------------------------------------------------------------------ evaluation
    def _prepare(self, x: Any) -> torch.Tensor:
        x = torch.as_tensor(x)
        if x.dim() == len(self.input_shape):
            x = x.unsqueeze(0)
        if tuple(x.shape[1:]) != self.input_shape:
            raise ValueError(
                f"{self.name}: input must have shape (N, {', '.join(map(str, self.input_shape))}), "
                f"got {tuple(x.shape)}"
            )
        if not x.is_floating_point():
            x = x.to(self.dtype)
        return x

    def run(self, x: Any, x_b: torch.Tensor | None = None, keep: Iterable[str] | None = None) -> dict[str, torch.Tensor]:
        """Evaluate the graph; return the outputs of the nodes named in ``keep`` (all if None).

        ``x`` is batched ``(N, *input_shape)`` (a single sample is accepted).  ``x_b``
        replaces the network's own bias vector (e.g. a scaled ``k·x_b``)."""
        x = self._prepare(x)
        x_b = self.x_b if x_b is None else torch.as_tensor(x_b)
        x_b = x_b.to(device=x.device, dtype=x.dtype)
        keep = None if keep is None else set(keep)
        # free intermediate values as soon as their last consumer has run
        last_use = {}
        for i, n in enumerate(self.nodes):
            for j in n.inputs:
                last_use[j] = i
        vals: dict[str, torch.Tensor] = {}
        out: dict[str, torch.Tensor] = {}
        with torch.no_grad() if not x.requires_grad and not x_b.requires_grad else nullcontext():
            for i, n in enumerate(self.nodes):
                v = n.forward([vals[j] for j in n.inputs] if n.inputs else [x], x_b)
                vals[n.name] = v
                if keep is None or n.name in keep:
                    out[n.name] = v
                for j in n.inputs:
                    if last_use[j] == i and j != self.output:
                        vals.pop(j, None)
        return out

    def extended_function(self, node: str):
        """``f(x, x_b) -> flat output of node`` for ONE sample ``x`` of ``input_shape``.

        The bias-extended function of seed 000 Eq. 3, evaluated node by node with no
        ``no_grad`` and no caching, so ``torch.func.jacrev`` / ``jacfwd`` / autograd can
        differentiate it w.r.t. both ``x`` and ``x_b`` (the reference the back-map is
        cross-checked against)."""
        self.node(node)  # clear error for an unknown name

        def f(x: torch.Tensor, x_b: torch.Tensor) -> torch.Tensor:
            vals: dict[str, torch.Tensor] = {}
            for n in self.nodes:
                vals[n.name] = n.forward([vals[j] for j in n.inputs] if n.inputs else [x.unsqueeze(0)], x_b)
                if n.name == node:
                    return vals[n.name][0].reshape(-1)
            raise AssertionError("unreachable: node was checked above")

        return f

    def forward(self, x: Any, x_b: torch.Tensor | None = None) -> torch.Tensor:
        """Network output for a batch ``x`` (logits for a classifier)."""
        return self.run(x, x_b, keep=[self.output])[self.output]

    __call__ = forward

    def preactivations(self, x: Any, x_b: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        """For every unit layer, its value *before its own bias is added* (seed 000 Eq. 3)."""
        names = {n.name: n.unit_layer for n in self.nodes if isinstance(n, LinearNode) and n.unit_layer}
        vals = self.run(x, x_b, keep=names)
        return {names[k]: vals[k] for k in names}

    def activation_pattern(self, x: Any, x_b: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        """The x-dependent linearisation data at x, batched: per node whose linearisation
        depends on the point, its :meth:`Node.pattern` (activation slopes, max-pool argmax)."""
        want = {n.name: n for n in self.nodes if type(n).pattern is not Node.pattern}
        keep = {j for n in want.values() for j in n.inputs}
        vals = self.run(x, x_b, keep=keep)
        pattern = {}
        for name, n in want.items():
            p = n.pattern([vals[j] for j in n.inputs])
            if p is not None:
                pattern[name] = p
        return pattern

    def linearize(self, x: Any, x_b: torch.Tensor | None = None,
                  nodes: Iterable[str] | None = None) -> dict[str, Operator]:
        """Every node's Jacobian at the point ``(x, x_b)`` (:meth:`Node.linearize`).

        One forward run; ``x`` is one sample, shape ``input_shape`` or ``(1, *input_shape)``.
        ``nodes`` restricts the result (default: every node but the input).  Returns
        name -> operator from the node's stacked inputs (and ``x_b`` when it reads it)."""
        x = self._prepare(x)
        if x.shape[0] != 1:
            raise ValueError(f"{self.name}: linearize takes one sample (or a batch of 1), got a batch of {x.shape[0]}")
        x_b = (self.x_b if x_b is None else torch.as_tensor(x_b)).to(device=x.device, dtype=x.dtype)
        want = {n.name for n in self.nodes if n.inputs} if nodes is None else set(nodes)
        need = set(want)
        for n in reversed(self.nodes):
            if n.name in need:
                need.update(n.inputs)
        keep = {j for n in self.nodes if n.name in want for j in n.inputs}
        vals = self.run(x, x_b, keep=keep | (want & {self.output}))
        return {n.name: n.linearize([vals[j] for j in n.inputs], x_b) for n in self.nodes if n.name in want}

    def geometry(self) -> dict[str, Window]:
        """Per node, the receptive-field :class:`~linop.network.geometry.Window` of its units
        in the input image (x-independent; computed once and kept on the network)."""
        hit = self._cache.get("geometry")
        if hit is not None:
            return hit
        C, H, W = image_shape(self.input_shape)
        boxes: dict[str, np.ndarray] = {}
        geoms: dict[str, Window] = {}
        for n in self.nodes:
            b = n.geometry([boxes[i] for i in n.inputs], [tuple(self.node(i).out_shape) for i in n.inputs])
            if b.shape != (4, int(np.prod(n.out_shape))):
                raise ValueError(f"node {n.name}: geometry has shape {b.shape}, expected (4, {int(np.prod(n.out_shape))})")
            boxes[n.name] = b
            geoms[n.name] = window_of(b, H, W)
        self._cache["geometry"] = geoms
        return geoms

    # ------------------------------------------------------------------ conversion
    def to(self, dtype: Any) -> "EquivalentNetwork":
        """A copy computing in ``dtype`` (float32 / float64).  Operators cast lazily."""
        net = copy.copy(self)
        net.x_b = self.x_b.to(torch_dtype(dtype))
        return net

    def summary(self) -> str:
        lines = [f"EquivalentNetwork {self.name}: input {self.input_shape}, |x_b| = {self.n_bias}"]
        for n in self.nodes:
            lines.append(f"  {n.name:<24} {type(n).__name__:<15} {str(n.out_shape):<16} {n.detail}")
        return "\n".join(lines)

    def describe(self) -> str:
        """The unit layers (seed 000 Tables D.1/D.3/D.4): operator, output shape, number of
        units, torch module, own bias and its slice of ``x_b``; then every other bias."""
        lines = [
            f"EquivalentNetwork {self.name}: input {self.input_shape}, dtype {self.dtype}, "
            f"|x_b| = {self.n_bias}, {len(self.unit_layers)} unit layers, "
            f"piecewise linear: {self.piecewise_linear}",
            f"  {'layer':<8} {'operator':<16} {'out shape':<16} {'units':>8}  {'module':<20} own bias",
        ]
        own = set()
        for layer in self.unit_layers:
            n = self.unit_node(layer)
            b = self.own_bias(layer)
            if b is not None:
                own.add(b.bias_name)
                bias = f"{b.bias_name} x_b[{b.bias_slice.start}:{b.bias_slice.stop}]"
            else:
                bias = "-"
            units = int(np.prod(n.out_shape))
            lines.append(
                f"  {layer:<8} {type(n.op).__name__:<16} {str(n.out_shape):<16} {units:>8}  "
                f"{self.unit_modules.get(layer, n.source):<20} {bias}"
            )
        others = [(k, s) for k, s in self.bias_slices.items() if k not in own]
        if others:
            lines.append("  other biases: " + ", ".join(f"{k} x_b[{s.start}:{s.stop}]" for k, s in others))
        return "\n".join(lines)

    __str__ = describe
