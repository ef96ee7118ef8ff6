"""Tracing a torch module with ``torch.fx`` and propagating shapes on a dummy batch.

Modules that have a registered converter (:mod:`linop.convert.registry`) are kept as leaves,
so their handler sees one ``call_module`` node; everything else is traced through.  Shapes come
from :class:`torch.fx.passes.shape_prop.ShapeProp` on a dummy batch of :data:`DUMMY_BATCH`
samples (not 1, so a reshape that mixes samples of the batch shows).

Every node records the Python stack that created it (``node.stack_trace``, read by
:func:`linop.convert.errors.source_frame` to point a conversion error at the user's line).
torch's own recorder (``Tracer.record_stack_traces``) symbolises through its profiler, which
imports ``torch._inductor`` / ``torch._dynamo`` (~2.7 s on a process's first conversion, paid
by every study worker); :class:`_Tracer` records the same frames with :mod:`traceback`.
"""
from __future__ import annotations

import traceback

import torch
from torch import fx, nn
from torch.fx.passes.shape_prop import ShapeProp

from .errors import ConversionError
from .registry import has_module_rule

__all__ = ["DUMMY_BATCH", "check_eval", "trace"]

DUMMY_BATCH = 2  # batch of the shape-propagation dummy; != 1 so batch-mixing reshapes show


class _Tracer(fx.Tracer):
    """fx tracer recording stack traces, with the registered module types as leaves."""

    def __init__(self):
        super().__init__()
        self.record_stack_traces = False  # torch's recorder imports torch._inductor (slow)

    def create_node(self, *args, **kwargs) -> fx.Node:
        """torch's node, with ``stack_trace`` set from :func:`traceback.extract_stack`
        (``File "...", line N, in fn`` / code lines, innermost last, as torch writes it)."""
        node = super().create_node(*args, **kwargs)
        if not node.stack_trace:
            node.stack_trace = "".join(traceback.format_list(traceback.extract_stack()[:-1])).strip()
        return node

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        return has_module_rule(m) or super().is_leaf_module(m, module_qualified_name)


def check_eval(module: nn.Module, name: str) -> None:
    """``ValueError`` if ``module`` or a submodule is in training mode."""
    for path, m in module.named_modules():
        if m.training:
            raise ValueError(
                f"from_torch({name}): {'the module' if not path else 'submodule ' + repr(path)} "
                f"({type(m).__name__}) is in training mode; call module.eval() first "
                "(BatchNorm would use batch statistics and dropout would be random)")


def trace(module: nn.Module, input_shape: tuple[int, ...], name: str) -> fx.GraphModule:
    """``module`` as an fx graph module with ``node.meta["tensor_meta"]`` set.

    Raises
    ------
    ConversionError
        The module cannot be traced (data-dependent control flow), or its ``forward`` does
        not take exactly one tensor.
    ValueError
        Running it on a dummy batch of ``input_shape`` fails.
    """
    try:
        graph = _Tracer().trace(module)
    except Exception as exc:  # fx raises TraceError, TypeError, ... on untraceable code
        raise ConversionError(
            f"from_torch({name}): torch.fx could not trace {type(module).__name__}: "
            f"{type(exc).__name__}: {exc}. Data-dependent Python control flow and "
            "non-tensor logic are not traceable; rewrite it with tensor ops."
        ) from exc
    gm = fx.GraphModule(module, graph)
    p = next(iter(module.parameters()), None)
    if p is None:
        p = next(iter(module.buffers()), None)
    like = p if p is not None and p.is_floating_point() else torch.zeros((), dtype=torch.float32)
    dummy = torch.zeros((DUMMY_BATCH,) + tuple(input_shape), dtype=like.dtype, device=like.device)
    try:
        with torch.no_grad():
            gm(dummy)  # a plain call first: ShapeProp prints a traceback to stderr on failure
            ShapeProp(gm).propagate(dummy)
    except Exception as exc:
        root = exc
        while root.__cause__ is not None:  # ShapeProp wraps the real error verbosely
            root = root.__cause__
        msg = (str(root).strip().splitlines() or [""])[0]
        raise ValueError(
            f"from_torch({name}): running the module on a dummy batch of shape "
            f"{tuple(dummy.shape)} failed ({type(root).__name__}: {msg}); is input_shape="
            f"{tuple(input_shape)} the per-sample shape the module expects?"
        ) from exc
    placeholders = [n for n in graph.nodes if n.op == "placeholder"]
    if len(placeholders) != 1:
        raise ConversionError(
            f"from_torch({name}): the module's forward must take exactly one tensor "
            f"argument, got {[n.name for n in placeholders]}")
    return gm
