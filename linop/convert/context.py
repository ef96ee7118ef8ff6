"""The conversion context: what a converter handler sees (seed 000 §3.2-3.3, Fig. 2).

A :class:`Context` holds the equivalent network under construction (its nodes in execution
order, the bias values that will form ``x_b``) and the values of the fx nodes converted so far,
and offers the handlers their helpers: operands as network tensors or constants, the shape
torch computed for a node, and the constructors of nodes (:meth:`Context.add`,
:meth:`Context.linear`, :meth:`Context.bias`).  The handler protocol is described in
:mod:`linop.convert.registry`.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import fx, nn

from ..network import BiasNode, LinearNode, Node
from .errors import UNSUPPORTED, ConversionError, node_source, problem
from .fold import Fold
from .trace import DUMMY_BATCH

__all__ = ["Constant", "Context", "Opaque", "TensorValue"]


@dataclass
class TensorValue:
    """A tensor of the equivalent network: node ``name``, per-sample ``shape``."""

    name: str
    shape: tuple[int, ...]


@dataclass
class Constant:
    """A constant operand: a python number, or a parameter / buffer (``path`` set)."""

    value: torch.Tensor
    path: str | None = None


class Opaque:
    """A non-tensor value (``x.size(0)``, ``x.shape``): usable only as a reshape argument."""


class Context:
    """State and helpers of one conversion (one per :func:`~linop.convert.from_torch` call).

    Parameters
    ----------
    gm : torch.fx.GraphModule
        The traced module, shapes propagated (``node.meta["tensor_meta"]``).
    input_shape : tuple of int
        Per-sample input shape.
    dtype : torch.dtype
        Dtype of the network's operators.
    name : str
        The model's name, for messages.
    folds : dict
        Fold plan of :func:`linop.convert.fold.plan_folds`, by head (conv / linear) node.
    """

    def __init__(self, gm: fx.GraphModule, input_shape: tuple[int, ...], dtype: torch.dtype,
                 name: str, folds: dict[fx.Node, Fold]):
        self.gm = gm
        self.input_shape = tuple(input_shape)
        self.dtype = dtype
        self.name = name
        self.folds = folds
        self.nodes: list[Node] = []
        self.by_name: dict[str, Node] = {}
        self.env: dict[fx.Node, Any] = {}
        self.bias_values: dict[str, torch.Tensor] = {}  # name -> float64 values, in order
        self.unit_modules: dict[str, str] = {}
        self.order = {n: i for i, n in enumerate(gm.graph.nodes)}
        self._used = {n.name for n in gm.graph.nodes}
        self._n_units = {"Conv": 0, "FC": 0}

    # ------------------------------------------------------------------ errors
    def fail(self, node: fx.Node, why: str, exc: type = ConversionError,
             kind: str = UNSUPPORTED):
        """Report that ``node`` cannot be converted: a :class:`ConversionError` is collected
        with the others; any other ``exc`` (ValueError, RuntimeError) stops the conversion.
        ``kind``: :data:`~linop.convert.errors.NOT_PIECEWISE_LINEAR` for an op outside the
        exact identity (listed apart), else ``UNSUPPORTED``."""
        mt = type(self.module(node)).__name__ if node.op == "call_module" else None
        p = problem(node, why, mt, kind)
        if exc is ConversionError:
            raise ConversionError.from_problems(self.name, [p])
        raise exc(ConversionError.from_problems(self.name, [p]).args[0])

    # ------------------------------------------------------------------ operands
    def module(self, node: fx.Node) -> nn.Module | None:
        """The module a ``call_module`` node calls (None for other nodes)."""
        return self.gm.get_submodule(node.target) if node.op == "call_module" else None

    def module_call(self, node: fx.Node) -> nn.Module:
        """The called module, after checking it is called with a single tensor."""
        if len(node.args) != 1 or node.kwargs:
            self.fail(node, "only modules called with a single tensor are supported")
        return self.module(node)

    def shape_of(self, node: fx.Node) -> tuple[int, ...]:
        """Per-sample shape torch computed for ``node`` (batch axis dropped)."""
        tm = node.meta.get("tensor_meta")
        shape = getattr(tm, "shape", None)
        if shape is None:
            self.fail(node, "shape propagation gave no single tensor for this node")
        shape = tuple(int(s) for s in shape)
        if not shape or shape[0] != DUMMY_BATCH:
            self.fail(node, f"the result {shape} does not keep the batch dimension first")
        return shape[1:]

    def tensor(self, node: fx.Node, a: Any, what: str = "input") -> TensorValue:
        """Operand ``a`` of ``node`` as a network tensor (fails if it is not one)."""
        v = self.env.get(a) if isinstance(a, fx.Node) else None
        if not isinstance(v, TensorValue):
            self.fail(node, f"its {what} {a!r} is not a tensor of the network")
        return v

    def const(self, a: Any) -> Constant | None:
        """A constant operand (number, parameter, buffer) or None."""
        if isinstance(a, bool):
            return None
        if isinstance(a, (int, float)):
            return Constant(torch.tensor(float(a), dtype=torch.float64))
        if isinstance(a, fx.Node):
            if a.op == "get_attr":  # may come later in the graph than its user's operand
                return Constant(self.get_attr(a), str(a.target))
            v = self.env.get(a)
            if isinstance(v, Constant):
                return v
        return None

    def get_attr(self, node: fx.Node) -> torch.Tensor:
        """The tensor a ``get_attr`` node reads."""
        t = self.gm
        for part in str(node.target).split("."):
            t = getattr(t, part)
        if not isinstance(t, torch.Tensor):
            self.fail(node, f"attribute of type {type(t).__name__} is not a tensor")
        return t

    def args(self, node: fx.Node, names: Sequence[str], defaults: Sequence[Any]) -> list[Any]:
        """Arguments after the first (the tensor), by position or keyword."""
        out = []
        for i, (nm, d) in enumerate(zip(names, defaults)):
            out.append(node.args[i + 1] if len(node.args) > i + 1 else node.kwargs.get(nm, d))
        return out

    def param(self, t: torch.Tensor) -> torch.Tensor:
        """A parameter for an operator: detached CPU copy in the network dtype."""
        return t.detach().to(device="cpu", dtype=self.dtype).clone()

    def channel_values(self, node: fx.Node, c: Constant,
                       shape: tuple[int, ...]) -> tuple[str, torch.Tensor]:
        """``(mode, flat float64 values)`` of a constant broadcast against ``shape``: mode
        ``"scalar"``, ``"channel"`` (one value per channel) or ``"unit"`` (full shape)."""
        v = c.value.detach().to(device="cpu", dtype=torch.float64)
        if v.numel() == 1:
            return "scalar", v.reshape(1)
        full = (1,) + tuple(shape)
        try:
            b = torch.broadcast_shapes(tuple(v.shape), full)
        except RuntimeError:
            b = None
        if b != full:
            self.fail(node, f"constant of shape {tuple(v.shape)} does not broadcast to {full}")
        vs = (1,) * (len(full) - v.dim()) + tuple(v.shape)  # right-aligned
        if all(s == 1 for i, s in enumerate(vs) if i != 1) and vs[1] == shape[0]:
            return "channel", v.reshape(-1)
        if tuple(vs[1:]) == tuple(shape):
            return "unit", v.reshape(-1)
        self.fail(node, f"constant of shape {tuple(v.shape)} is neither scalar, per-channel "
                  f"nor full-shape for {shape}")

    # ------------------------------------------------------------------ building
    def unique(self, base: str) -> str:
        """A node name not used yet (``base``, else ``base_1``, ...)."""
        name, k = base, 1
        while name in self._used:
            name = f"{base}_{k}"
            k += 1
        self._used.add(name)
        return name

    def new_unit_layer(self, kind: str, module_path: str) -> str:
        """Name of the next unit layer of ``kind`` ``"Conv"`` / ``"FC"`` (renumbered over the
        live layers when the network is assembled)."""
        name = f"{kind}{self._n_units[kind]}"
        self._n_units[kind] += 1
        self.unit_modules[name] = module_path
        return name

    def add(self, node: Node) -> TensorValue:
        """Append a node of the equivalent network; its value."""
        self.nodes.append(node)
        self.by_name[node.name] = node
        return TensorValue(node.name, tuple(node.out_shape))

    def linear(self, node: fx.Node, inp: TensorValue, op, name: str | None = None,
               unit_layer: str | None = None) -> TensorValue:
        """A :class:`LinearNode` applying operator ``op`` to ``inp`` (its output shape is
        checked against the one torch computed for ``node``)."""
        want = self.shape_of(node)
        if tuple(op.out_shape) != tuple(want):
            self.fail(node, f"internal: operator {op!r} gives {op.out_shape}, torch gives {want}",
                      RuntimeError)
        return self.add(LinearNode(name or node.name, (inp.name,), tuple(op.out_shape),
                                   node_source(node), op=op, unit_layer=unit_layer))

    def bias(self, node: fx.Node, inp: TensorValue, bname: str, values: torch.Tensor, shape,
             mode: str, out_name: str, unit_layer: str | None = None) -> TensorValue:
        """A :class:`BiasNode` adding the slice ``bname`` of ``x_b`` (``values``, restricted
        by mode ``"scalar"`` / ``"channel"`` / ``"unit"`` to ``shape``) to ``inp``."""
        from ..operators.structural import BiasRestriction

        values = values.detach().to(device="cpu", dtype=torch.float64).reshape(-1)
        if bname in self.bias_values:
            if not torch.equal(self.bias_values[bname], values):
                self.fail(node, f"two different biases named {bname!r}", RuntimeError)
        else:
            self.bias_values[bname] = values
        R = BiasRestriction(shape, mode=mode)
        if R.in_shape != (values.numel(),):
            self.fail(node, f"internal: bias {bname} has {values.numel()} values, restriction "
                      f"expects {R.in_shape}", RuntimeError)
        return self.add(BiasNode(out_name, (inp.name,), tuple(shape), node_source(node),
                                 bias_name=bname, restriction=R, unit_layer=unit_layer))

    def own_bias_free(self, layer: str) -> bool:
        """Whether unit layer ``layer`` has no own bias yet."""
        return not any(isinstance(n, BiasNode) and n.unit_layer == layer for n in self.nodes)
