"""The conversion engine: :func:`from_torch` (seed 000 §3.2-3.3, Fig. 2, Fig. 4, Eq. 3, Eq. 7).

1. :func:`~linop.convert.trace.trace` the module with ``torch.fx`` (registered module types
   are leaves) and propagate shapes on a dummy batch;
2. :func:`~linop.convert.fold.plan_folds`: which BatchNorm / multiplier nodes fold into which
   conv / linear;
3. convert every fx node, in graph order, with the handler the registry
   (:mod:`linop.convert.registry`) holds for its target, collecting every node that cannot be
   converted;
4. :func:`~linop.convert.assemble.assemble` the live nodes into an
   :class:`~linop.network.EquivalentNetwork` — or raise one
   :class:`~linop.convert.errors.ConversionError` listing every unsupported node.
"""
from __future__ import annotations

import copy
from collections.abc import Sequence
from typing import Any

import torch
from torch import fx, nn

from ..network import EquivalentNetwork, InputNode
from ..operators.base import as_shape, torch_dtype
from . import rules  # noqa: F401  (registers the built-in handlers)
from .assemble import assemble
from .context import Constant, Context, Opaque, TensorValue
from .errors import ConversionError, Problem
from .fold import plan_folds
from .registry import lookup
from .trace import check_eval, trace

__all__ = ["check_conversion", "from_torch"]


def _module_paths(node: fx.Node) -> list[str]:
    """Torch submodule paths the node belongs to (outermost first)."""
    paths = []
    for key, val in (node.meta.get("nn_module_stack") or {}).items():
        p = val[0] if isinstance(val, tuple) else key
        if p:
            paths.append(str(p))
    if node.op == "call_module" and str(node.target) not in paths:
        paths.append(str(node.target))
    return paths


def _unsupported(ctx: Context, node: fx.Node) -> str:
    if node.op == "call_module":
        return f"module type {type(ctx.module(node)).__name__} is not supported"
    return {"call_function": "unsupported function",
            "call_method": "unsupported tensor method"}.get(node.op, "unsupported fx op")


def _placeholder(ctx: Context, node: fx.Node) -> TensorValue:
    """The network input node."""
    shape = ctx.shape_of(node)
    if shape != ctx.input_shape:
        ctx.fail(node, f"input shape {shape} != {ctx.input_shape}", ValueError)
    return ctx.add(InputNode(node.name, (), shape, "input"))


def _get_attr(ctx: Context, node: fx.Node) -> Constant:
    """A parameter / buffer read: a constant named by its path."""
    return Constant(ctx.get_attr(node), str(node.target))


# the handlers of the fx graph's own ops (the targets of these are not operations)
_GRAPH_OPS = {"placeholder": _placeholder, "get_attr": _get_attr}


def _stand_in(node: fx.Node) -> Any:
    """A value for a node that failed, so its consumers can still be checked: a tensor of the
    shape torch computed (no network node behind it), else an opaque value."""
    shape = getattr(node.meta.get("tensor_meta"), "shape", None)
    if shape is not None and len(shape) > 0:
        return TensorValue(node.name, tuple(int(s) for s in shape[1:]))
    return Opaque()


def _convert_node(ctx: Context, node: fx.Node, problems: list[Problem],
                  tainted: set[fx.Node]) -> Any:
    """The node's value by its registered handler.

    A failure is recorded in ``problems`` and the node gets a stand-in value, so that every
    unsupported node of the model is found in one pass.  A node is *tainted* when it depends
    on a failed node whose value is not even a tensor of known shape: its own failure may be
    only a consequence, so it is not recorded (unless no handler exists at all)."""
    handler = _GRAPH_OPS.get(node.op) or lookup(ctx.gm, node)
    after_failure = any(a in tainted for a in node.all_input_nodes)
    failed = False
    try:
        if handler is None:
            ctx.fail(node, _unsupported(ctx, node))
        value = handler(ctx, node)
    except ConversionError as exc:
        if not exc.problems:
            raise
        if handler is None or not after_failure:
            problems.extend(exc.problems)
        failed = True
    if failed or after_failure:
        value = _stand_in(node)
        if not isinstance(value, TensorValue):
            tainted.add(node)
    return value


def _convert(ctx: Context) -> EquivalentNetwork:
    problems: list[Problem] = []
    tainted: set[fx.Node] = set()
    module_nodes: dict[str, str] = {}
    output = None
    for node in ctx.gm.graph.nodes:
        if node.op == "output":
            output = node
            continue
        if node not in ctx.env:  # else folded into a conv / linear by its handler
            ctx.env[node] = _convert_node(ctx, node, problems, tainted)
        v = ctx.env.get(node)
        if isinstance(v, TensorValue):
            for path in _module_paths(node):
                module_nodes[path] = v.name
    out = output.args[0]
    single = isinstance(out, fx.Node)
    if not isinstance(ctx.env.get(out) if single else None, TensorValue) and not (
            single and out in tainted):  # a tainted output already has its cause reported
        try:
            ctx.fail(output, "the module must return a single tensor")
        except ConversionError as exc:
            problems.extend(exc.problems)
    if problems:
        raise ConversionError.from_problems(ctx.name, problems)
    return assemble(ctx, ctx.env[out].name, module_nodes)


def from_torch(module: nn.Module, input_shape: Sequence[int], dtype: Any = torch.float64,
               name: str | None = None) -> EquivalentNetwork:
    """Convert a torch module into its equivalent network (seed 000 Fig. 2, Eq. 7).

    Parameters
    ----------
    module : torch.nn.Module
        The trained model, in eval mode.  Its ``forward`` must take one tensor and be
        traceable by ``torch.fx``.  The module is not modified.
    input_shape : sequence of int
        Per-sample input shape, e.g. ``(3, 32, 32)`` (no batch axis).
    dtype : torch.float64 (default) or torch.float32
        Dtype of the network's parameters and of ``x_b``.  Folding (Eq. 7) is always done in
        float64 first.
    name : str, optional
        Name of the network (default: the module's class name).

    Returns
    -------
    EquivalentNetwork
        Nodes in topological order (``Node.name`` = fx node name), unit layers ``Conv0..``,
        ``FC``; ``x_b`` and ``bias_slices``; ``module_nodes`` (torch module path -> node) and
        ``unit_modules`` (unit layer -> torch module path).

    Raises
    ------
    TypeError
        ``module`` is not a ``torch.nn.Module``.
    ValueError
        Module in training mode, bad ``input_shape`` / ``dtype``.
    NotImplementedError
        (:class:`ConversionError`) operations with no equivalent-network counterpart; one
        error lists every such fx node with its op / target and source line.
    """
    if not isinstance(module, nn.Module):
        raise TypeError(f"from_torch: module must be a torch.nn.Module, got {type(module).__name__}")
    name = name or type(module).__name__
    input_shape = as_shape(input_shape, "input_shape")
    dt = torch_dtype(dtype)
    if dt not in (torch.float32, torch.float64):
        raise ValueError(f"from_torch: dtype must be float32 or float64, got {dt}")
    check_eval(module, name)
    gm = trace(module, input_shape, name)
    return _convert(Context(gm, input_shape, dt, name, plan_folds(gm)))


def check_conversion(module: nn.Module, net: EquivalentNetwork, x: torch.Tensor) -> float:
    """Relative error ``‖net(x) − module(x)‖ / ‖module(x)‖`` (module cast to ``net.dtype``
    on a copy), a quick self-check of a conversion on a batch ``x``."""
    ref = copy.deepcopy(module).to(net.dtype).eval()
    x = torch.as_tensor(x).to(net.dtype)
    with torch.no_grad():
        want = ref(x)
        got = net.forward(x)
    return float((got - want).norm() / want.norm().clamp_min(torch.finfo(net.dtype).tiny))
