"""The equivalent network: a trained CNN as a graph of explicit operators on [x; x_b].

Seed 000 (§3.2, Fig. 2, Eq. 7) rewrites a trained CNN as an *equivalent model*: BatchNorm
folded into the convolutions, Fixup multipliers folded into the weights, and every bias
moved into one extra input vector ``x_b`` that each layer reads its slice of through a
restriction operator ``R_l``.  This module holds that data model; ``linop.convert``
builds it from a torch module (``from_torch``), ``linop.jacobian`` linearises it.

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
from dataclasses import dataclass, field
from typing import Any, Iterable, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from ..operators.base import Operator, torch_dtype
from .reverse import ReverseOptions, StepReport

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

PIECEWISE_LINEAR = {"relu", "leaky_relu", "prelu", "identity"}


@dataclass
class Node:
    """A node of the equivalent network.  ``inputs`` are names of earlier nodes."""

    name: str
    inputs: tuple[str, ...]
    out_shape: tuple[int, ...]
    source: str = ""  # where it came from in the torch model (module path / fx node), for messages

    def forward(self, xs: Sequence[torch.Tensor], x_b: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def reverse(self, z_star: torch.Tensor, z_hat: torch.Tensor, a_hats: Sequence[torch.Tensor],
                x_b: torch.Tensor, options: ReverseOptions) -> tuple[list[torch.Tensor], StepReport]:
        """Seed 001 §3: map the target ``z_star`` of this node's output (forward value ``z_hat``,
        inputs ``a_hats``) back to one target per input; returns ``(targets, report)``."""
        raise NotImplementedError(f"no reverse step for node {self.name!r} of type {type(self).__name__}")

    def _report(self) -> StepReport:
        return StepReport(self.name, type(self).__name__)


@dataclass
class InputNode(Node):
    def forward(self, xs, x_b):
        return xs[0]


@dataclass
class LinearNode(Node):
    op: Operator | None = None
    unit_layer: str | None = None  # "Conv0" … / "FC" when this is a unit layer's pre-bias output
    _pattern: Any = field(default=None, init=False, repr=False, compare=False)

    def forward(self, xs, x_b):
        return self.op.apply(xs[0])

    @property
    def structural_pattern(self) -> Any:
        """The closed-form pseudo-inverse pattern of an operator with at most one non-zero per
        row and column (flatten, channel pad, subsample, scale, identity, diagonal, average
        pooling), or None — computed once per node.  Only those families are examined, so a
        convolution's or dense layer's matrix is never assembled for it."""
        if self._pattern is None:
            from ..operators import AvgPool2d, ChannelPad, Diagonal, Flatten, Identity, Scale, Subsample
            from ..reverse.steps import structural_pinv

            kinds = (Flatten, ChannelPad, Subsample, Scale, Identity, Diagonal, AvgPool2d)
            self._pattern = (structural_pinv(self.op) if isinstance(self.op, kinds) else None,)
        return self._pattern[0]

    def reverse(self, z_star, z_hat, a_hats, x_b, options):
        """Minimum-norm correction ``a* = â + W⁺(z* − W â)`` (MDP Eqs. 4–6 / CCP Eq. 7);
        one-non-zero-per-row-and-column operators by their closed form, average pooling with
        stride = kernel copied back (§3.4(b)) unless ``options.avgpool == "exact"``."""
        from ..operators import AvgPool2d
        from ..reverse import steps

        report = self._report()
        a_hat, op = a_hats[0], self.op
        N = z_star.shape[0]
        changed = ((z_star != z_hat).reshape(N, -1).any(1) if options.keep_unchanged
                   else torch.ones(N, dtype=torch.bool, device=z_star.device))
        report.n_solved = int(changed.sum())
        if not bool(changed.any()):
            report.case, report.method = "unchanged", "none"
            return [a_hat.clone()], report
        pattern = self.structural_pattern
        a = None
        if pattern is not None:
            a, report.case = steps.structural_step(pattern, op.shape, z_star, a_hat)
            report.method = "structural"
        elif (options.avgpool == "copy" and isinstance(op, AvgPool2d) and not op.ceil_mode
              and op.divisor_override is None):
            try:
                a = steps.unpool_avg(z_star, op.kernel_size, op.in_shape, mode="copy", a_hat=a_hat,
                                     stride=op.stride, padding=op.padding,
                                     p_hat=z_hat if options.keep_unchanged else None)
                report.case, report.method = "MDP", "copy"
            except NotImplementedError:
                a = None
        if a is None:
            return [self._solve(z_star, a_hat, changed, options, report)], report
        if options.keep_unchanged:
            a = torch.where(changed.reshape((N,) + (1,) * (a.dim() - 1)), a, a_hat)
        return [a], report

    def _solve(self, z_star, a_hat, changed, options, report) -> torch.Tensor:
        from ..solvers import solve
        from ..solvers.fft import conv_spec

        idx = changed.nonzero().flatten()
        sub_a, sub_z = a_hat[idx], z_star[idx]
        method, fallback = options.solver, None
        if method in ("fft", "fft-pcg", "fft-exact"):
            try:  # the FFT path covers stride-1 unpadded convs only (seed 001 §3.2)
                conv_spec(self.op)
            except (ValueError, NotImplementedError) as exc:
                method, fallback = "auto", f"{options.solver} not applicable ({exc}); used auto"
        res = solve(self.op, sub_z, sub_a, method=method, tol=options.tol, maxiter=options.maxiter)
        a = a_hat.clone()
        a[idx] = torch.as_tensor(res.a).to(device=a.device, dtype=a.dtype).reshape(sub_a.shape)
        report.case, report.method, report.solve_info = res.case, res.method, dict(res.info)
        if fallback:
            report.solve_info["fallback"] = fallback
        return a


@dataclass
class BiasNode(Node):
    """``y = x + R x_b[bias_slice]``; ``restriction`` maps the slice to ``out_shape``."""

    bias_name: str = ""
    bias_slice: slice = field(default_factory=lambda: slice(0, 0))
    restriction: Operator | None = None
    unit_layer: str | None = None  # set when this is the own bias of a unit layer

    def bias_term(self, x_b: torch.Tensor) -> torch.Tensor:
        """``R x_b[slice]`` as a tensor of shape ``(1, *out_shape)``."""
        return self.restriction.apply(x_b[self.bias_slice].reshape(1, -1))

    def forward(self, xs, x_b):
        return xs[0] + self.bias_term(x_b)

    def reverse(self, z_star, z_hat, a_hats, x_b, options):
        """``c* = z* − R b``."""
        from ..reverse import steps

        report = self._report()
        report.method = "subtract"
        c = steps.subtract_bias(z_star, self.bias_term(x_b), z_hat=z_hat, c_hat=a_hats[0],
                                keep_unchanged=options.keep_unchanged)
        return [c], report


@dataclass
class ActivationNode(Node):
    """Elementwise activation.  ``kind`` in relu, leaky_relu, prelu, tanh, sigmoid, identity.

    ``negative_slope``: float (leaky_relu) or a per-channel tensor (prelu).
    """

    kind: str = "relu"
    negative_slope: Any = 0.0

    @property
    def piecewise_linear(self) -> bool:
        return self.kind in PIECEWISE_LINEAR

    def _slope_tensor(self, like: torch.Tensor) -> torch.Tensor:
        g = self.negative_slope
        if isinstance(g, torch.Tensor):
            g = g.to(device=like.device, dtype=like.dtype)
            if g.numel() > 1:  # per-channel PReLU
                g = g.reshape((1, -1) + (1,) * (like.dim() - 2))
        return g

    def forward(self, xs, x_b):
        x = xs[0]
        if self.kind == "relu":
            return torch.relu(x)
        if self.kind in ("leaky_relu", "prelu"):
            return torch.where(x >= 0, x, x * self._slope_tensor(x))
        if self.kind == "tanh":
            return torch.tanh(x)
        if self.kind == "sigmoid":
            return torch.sigmoid(x)
        if self.kind == "identity":
            return x
        raise ValueError(f"unknown activation kind {self.kind!r} at node {self.name}")

    def slopes(self, x: torch.Tensor) -> torch.Tensor:
        """Diagonal of dσ/dc at pre-activation ``x`` (Σ of seed 000 appendix C).

        At c = 0 exactly the slope of the *negative* side is used (0 for ReLU, γ for
        LeakyReLU/PReLU), torch autograd's convention (its backward tests ``c > 0``) and
        that of ``linop.operators.elementwise``; the exact identity holds either way because
        the unit's value is 0 there."""
        if self.kind == "relu":
            return (x > 0).to(x.dtype)
        if self.kind in ("leaky_relu", "prelu"):
            one = torch.ones_like(x)
            return torch.where(x > 0, one, one * self._slope_tensor(x))
        if self.kind == "tanh":
            return 1 - torch.tanh(x) ** 2
        if self.kind == "sigmoid":
            s = torch.sigmoid(x)
            return s * (1 - s)
        if self.kind == "identity":
            return torch.ones_like(x)
        raise ValueError(f"unknown activation kind {self.kind!r} at node {self.name}")

    def reverse(self, z_star, z_hat, a_hats, x_b, options):
        """Inverse activation (seed 001 §3.4(a)); clipped entries are counted in the report."""
        from ..reverse import steps

        report = self._report()
        z, clipped = steps.inverse_activation(
            z_star, self.kind, self.negative_slope, clip_margin=options.clip_margin, relu=options.relu,
            a_hat=z_hat, z_hat=a_hats[0], keep_unchanged=options.keep_unchanged, return_clipped=True,
        )
        report.method = f"inverse {self.kind}" + (f" ({options.relu})" if self.kind == "relu" else "")
        report.n_clipped = clipped.cpu().numpy()
        return [z], report


@dataclass
class MaxPoolNode(Node):
    kernel_size: tuple[int, int] = (2, 2)
    stride: tuple[int, int] = (2, 2)
    padding: tuple[int, int] = (0, 0)
    dilation: tuple[int, int] = (1, 1)
    ceil_mode: bool = False

    def forward(self, xs, x_b):
        return F.max_pool2d(xs[0], self.kernel_size, self.stride, self.padding, self.dilation,
                            ceil_mode=self.ceil_mode)

    def argmax(self, x: torch.Tensor) -> torch.Tensor:
        """Flat per-sample input index selected for every output (N, *out_shape)."""
        _, idx = F.max_pool2d(
            x, self.kernel_size, self.stride, self.padding, self.dilation,
            ceil_mode=self.ceil_mode, return_indices=True,
        )
        # torch returns indices within each (H, W) plane; make them flat over (C, H, W).
        C, H, W = x.shape[1:]
        offs = (torch.arange(C, device=x.device) * (H * W)).reshape(1, C, 1, 1)
        return idx + offs

    def reverse(self, z_star, z_hat, a_hats, x_b, options):
        """Copy back into the pooling window (seed 001 §3.4(b)), or argmax / nearest."""
        from ..operators.conv import pair
        from ..reverse import steps

        in_shape = tuple(a_hats[0].shape[1:])
        H, W = in_shape[1:]
        k = pair(self.kernel_size, "kernel_size")
        if self.ceil_mode and (H % k[0] or W % k[1]):
            raise NotImplementedError(
                f"max pooling {self.name!r} uses ceil_mode with partial windows ({H}x{W} by {k}); "
                f"the copy-back reverse step of seed 001 §3.4(b) covers full windows only"
            )
        report = self._report()
        report.method = options.maxpool
        a = steps.unpool_max(
            z_star, self.kernel_size, in_shape, mode=options.maxpool, a_hat=a_hats[0], stride=self.stride,
            padding=self.padding, dilation=self.dilation, p_hat=z_hat if options.keep_unchanged else None,
        )
        return [a], report


@dataclass
class AddNode(Node):
    def forward(self, xs, x_b):
        out = xs[0]
        for t in xs[1:]:
            out = out + t
        return out

    def reverse(self, z_star, z_hat, a_hats, x_b, options):
        """The MDP split ``a_i* = â_i + (z* − ẑ)/k``: the closest inputs whose sum is z*."""
        report = self._report()
        report.case, report.method = "MDP", "split"
        corr = (z_star - z_hat) / len(self.inputs)
        return [a + corr for a in a_hats], report


@dataclass
class CatNode(Node):
    dim: int = 1  # channel axis of the batched tensor

    def forward(self, xs, x_b):
        return torch.cat(list(xs), dim=self.dim)

    def reverse(self, z_star, z_hat, a_hats, x_b, options):
        """Split the target along the concatenated axis."""
        report = self._report()
        report.method = "split"
        sizes = [a.shape[self.dim] for a in a_hats]
        return list(torch.split(z_star, sizes, dim=self.dim)), report


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
        return all(n.piecewise_linear for n in self.nodes if isinstance(n, ActivationNode))

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
        with torch.no_grad() if not x.requires_grad and not x_b.requires_grad else _nullcontext():
            for i, n in enumerate(self.nodes):
                v = x if isinstance(n, InputNode) else n.forward([vals[j] for j in n.inputs], x_b)
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
                if isinstance(n, InputNode):
                    vals[n.name] = x.unsqueeze(0)
                else:
                    vals[n.name] = n.forward([vals[j] for j in n.inputs], x_b)
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
        """The linearisation data at x: activation slopes (per ActivationNode) and max-pool
        argmax indices (per MaxPoolNode), batched."""
        want = {}
        for n in self.nodes:
            if isinstance(n, (ActivationNode, MaxPoolNode)):
                want[n.inputs[0]] = want.get(n.inputs[0], []) + [n]
        vals = self.run(x, x_b, keep=want)
        pattern = {}
        for src, ns in want.items():
            for n in ns:
                pattern[n.name] = n.slopes(vals[src]) if isinstance(n, ActivationNode) else n.argmax(vals[src])
        return pattern

    # ------------------------------------------------------------------ conversion
    def to(self, dtype: Any) -> "EquivalentNetwork":
        """A copy computing in ``dtype`` (float32 / float64).  Operators cast lazily."""
        net = copy.copy(self)
        net.x_b = self.x_b.to(torch_dtype(dtype))
        return net

    def summary(self) -> str:
        lines = [f"EquivalentNetwork {self.name}: input {self.input_shape}, |x_b| = {self.n_bias}"]
        for n in self.nodes:
            extra = ""
            if isinstance(n, LinearNode):
                extra = f"{type(n.op).__name__}" + (f"  [{n.unit_layer}]" if n.unit_layer else "")
            elif isinstance(n, BiasNode):
                extra = f"bias {n.bias_name} x_b[{n.bias_slice.start}:{n.bias_slice.stop}]"
            elif isinstance(n, ActivationNode):
                extra = n.kind
            lines.append(f"  {n.name:<24} {type(n).__name__:<15} {str(n.out_shape):<16} {extra}")
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


class _nullcontext:
    def __enter__(self):
        return self

    def __exit__(self, *a):
        return False
