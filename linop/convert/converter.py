"""torch model -> equivalent network (seed 000 §3.2-3.3, Fig. 2, Fig. 4, Eq. 3, Eq. 7).

:func:`from_torch` traces a torch module with ``torch.fx`` (``symbolic_trace``-style tracing,
shapes from :class:`torch.fx.passes.shape_prop.ShapeProp` on a dummy batch) and rebuilds it as
an :class:`~linop.graph.EquivalentNetwork`: a graph of explicit operators acting on the
extended input ``[x; x_b]``.  Nothing is matched by model class name; every fx node is
converted by what it computes.

The equivalent model (seed 000 Fig. 2 / Fig. 4, Tables D.1, D.3, D.4)
--------------------------------------------------------------------
* Every conv and FC output is a *unit layer*, named ``Conv0, Conv1, ...`` in execution order
  and ``FC`` (``FC0, FC1, ...`` when there are several linears), as in the paper's tables.
  Its :class:`~linop.graph.LinearNode` holds the value **before its own bias** (Eq. 3).
* BatchNorm in eval mode directly after a conv / linear (whose output has no other consumer)
  is folded into it (Eq. 7): ``w' = γ·w/√(σ²+ε)``, ``b' = β − γ·μ/√(σ²+ε)`` (+ the layer's own
  bias, scaled by ``γ/√(σ²+ε)``).  A Fixup multiplier directly after a conv / linear is folded
  into its weights (Table D.4, ``w' = w × M``), scaling its bias as well.
* The own bias of a unit layer becomes a :class:`~linop.graph.BiasNode` named in
  ``bias_slices`` as ``f"{unit_layer}.bias"``; scalar (Fixup) biases are BiasNodes with mode
  ``"scalar"`` named by their parameter path (``layer1.0.bias1a``).  A scalar bias added
  directly to a bias-free conv output (Fixup's ``bias1b``/``bias2b``, Table D.4 "B2 after
  Conv1") is that unit layer's own bias (``unit_layer`` set on the BiasNode).
* ``x_b`` is the concatenation of all biases in execution order (a parameter used twice
  keeps one slice).  Every computation is done in ``dtype`` (float64 by default); weights are
  folded in float64 and then cast.

Supported operations (module, functional and method forms) -> equivalent network
---------------------------------------------------------------------------------
* ``nn.Conv2d`` (any stride / padding incl. ``'same'``/``'valid'`` / dilation / groups, with or
  without bias; ``padding_mode='zeros'``) -> LinearNode ``Conv2d`` [``ConvK``] + own BiasNode.
* ``nn.Linear`` on ``(N, F)`` -> LinearNode ``Linear`` [``FC``] + own BiasNode.
* ``nn.BatchNorm2d`` / ``nn.BatchNorm1d`` in eval mode with running statistics -> folded into
  the preceding conv / linear (Eq. 7); otherwise a per-channel ``Scale`` LinearNode + BiasNode
  (``f"{bn_path}.bias"``).
* ``nn.ReLU``, ``F.relu``, ``torch.relu``, ``x.relu()`` -> ActivationNode ``relu``;
  ``nn.LeakyReLU``, ``F.leaky_relu`` -> ``leaky_relu`` (its slope); ``nn.PReLU`` -> ``prelu``
  (per-channel slopes); ``nn.Tanh`` / ``torch.tanh`` / ``F.tanh`` / ``x.tanh()`` and
  ``nn.Sigmoid`` / ``torch.sigmoid`` / ``F.sigmoid`` -> ``tanh`` / ``sigmoid`` (smooth: outside
  the exact identity of seed 000, but converted for the seed 001 baselines).
* ``nn.AvgPool2d``, ``F.avg_pool2d`` (all options) -> LinearNode ``AvgPool2d``.
* ``nn.MaxPool2d``, ``F.max_pool2d`` (no ``return_indices``) -> MaxPoolNode.
* ``nn.AdaptiveAvgPool2d`` / ``F.adaptive_avg_pool2d`` -> ``GlobalAvgPool2d`` for output 1,
  ``AvgPool2d`` when the input size divides evenly; ``nn.AdaptiveMaxPool2d`` (even division)
  -> MaxPoolNode.
* ``x.mean((2, 3))`` / ``torch.mean(x, (-2, -1), keepdim=...)`` -> ``GlobalAvgPool2d``.
* ``nn.Flatten``, ``torch.flatten(x, 1)``, ``x.flatten(1)``, ``x.view(x.size(0), -1)``,
  ``x.reshape(N, -1)``, ``squeeze`` to ``(N, F)`` -> LinearNode ``Flatten`` (a reshape that
  keeps the shape makes no node; other reshapes are refused).
* ``nn.Identity``, ``nn.Dropout*`` (eval), ``F.dropout(training=False)``, ``contiguous``,
  ``clone`` -> no node (the value is passed through).
* ``a + b``, ``torch.add``, ``x.add(y)`` of two network tensors -> AddNode; ``a - b`` ->
  ``Scale(-1)`` + AddNode.
* ``torch.cat(..., dim=1)`` -> CatNode.
* ``F.pad`` with zeros on the channel axis only -> LinearNode ``ChannelPad``.
* ``x[:, :, o::s, o::s]`` (also with ``...``) -> LinearNode ``Subsample``.
* ``x * c``, ``c * x``, ``x / c``, ``torch.mul`` with ``c`` a python number or a scalar /
  per-channel parameter or buffer -> folded into a preceding conv / linear (Fixup ``M``),
  else a ``Scale`` LinearNode.
* ``x + c``, ``x - c`` with ``c`` a python number or a scalar / per-channel / full-shape
  parameter or buffer -> BiasNode (mode ``scalar`` / ``channel`` / ``unit``) with its own
  slice of ``x_b`` named by the parameter path (``f"{fx_node}.const"`` for numbers,
  ``"-path"`` for a subtracted parameter).

Anything else raises :class:`NotImplementedError` naming the fx node, its op and target and
the user source line that produced it.  A module (or any submodule) in training mode raises
:class:`ValueError` (call ``.eval()`` first): BatchNorm then uses batch statistics and dropout
is random, neither of which is a fixed operator.
"""
from __future__ import annotations

import math
import operator
import os
import re
from dataclasses import dataclass
from typing import Any, Sequence

import torch
import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F
from torch.fx.passes.shape_prop import ShapeProp

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
from ..operators.base import as_shape, torch_dtype

__all__ = ["from_torch", "check_conversion", "ConversionError"]

_DUMMY_BATCH = 2  # batch of the shape-propagation dummy; != 1 so batch-mixing reshapes show
_TORCH_DIR = os.path.dirname(torch.__file__)


class ConversionError(NotImplementedError):
    """An fx node that has no equivalent-network counterpart (subclass of NotImplementedError)."""


# ---------------------------------------------------------------------------- op tables
_RELU = {F.relu, torch.relu, torch.relu_, F.relu_}
_TANH = {torch.tanh, F.tanh}
_SIGMOID = {torch.sigmoid, F.sigmoid}
_ADD = {operator.add, operator.iadd, torch.add}
_SUB = {operator.sub, operator.isub, torch.sub}
_MUL = {operator.mul, operator.imul, torch.mul}
_DIV = {operator.truediv, operator.itruediv, torch.div}
_CAT = {torch.cat, torch.concat, torch.concatenate}
_FLATTEN_FN = {torch.flatten, torch.reshape, torch.squeeze}
_DROPOUT_FN = {F.dropout, F.dropout2d, F.dropout1d, F.alpha_dropout, F.feature_alpha_dropout}
_METHOD_KIND = {
    "relu": "relu", "relu_": "relu", "tanh": "tanh", "tanh_": "tanh",
    "sigmoid": "sigmoid", "sigmoid_": "sigmoid",
}
_DROPOUT_MODULES = (nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d, nn.AlphaDropout,
                    nn.FeatureAlphaDropout)


# ---------------------------------------------------------------------------- values
@dataclass
class _T:
    """A tensor value of the equivalent network: node ``name``, per-sample ``shape``."""

    name: str
    shape: tuple[int, ...]


@dataclass
class _Const:
    """A constant operand: python number, or a parameter / buffer (``path`` set)."""

    value: torch.Tensor
    path: str | None = None


class _Opaque:
    """A non-tensor value (``x.size(0)``, ``x.shape``): usable only as a reshape argument."""


def _src_frame(node: fx.Node) -> tuple[str, int, str] | None:
    """Innermost user (non-torch) frame ``(file, line, code)`` of the node's stack trace."""
    st = getattr(node, "stack_trace", None) or node.meta.get("stack_trace")
    if not st:
        return None
    frames = re.findall(r'File "([^"]+)", line (\d+), in [^\n]*\n([^\n]*)', st)
    user = [f for f in frames if not os.path.abspath(f[0]).startswith(_TORCH_DIR)]
    if not user:
        return None
    f, line, code = user[-1]
    return f, int(line), code.strip()


def _target_name(node: fx.Node) -> str:
    t = node.target
    if isinstance(t, str):
        return t
    mod = getattr(t, "__module__", None) or ""
    return f"{mod + '.' if mod else ''}{getattr(t, '__name__', repr(t))}"


def _source(node: fx.Node) -> str:
    """``Node.source``: the module path for call_module, else ``"fn @ file:line"``."""
    if node.op == "call_module":
        return str(node.target)
    fr = _src_frame(node)
    where = f" @ {fr[0]}:{fr[1]}" if fr else ""
    return f"{_target_name(node)}{where}"


def _module_paths(node: fx.Node) -> list[str]:
    """Torch submodule paths the node belongs to (outermost first)."""
    paths = []
    stack = node.meta.get("nn_module_stack") or {}
    for key, val in stack.items():
        p = val[0] if isinstance(val, tuple) else key
        if p:
            paths.append(str(p))
    if node.op == "call_module" and str(node.target) not in paths:
        paths.append(str(node.target))
    return paths


def _pair(v: Any, what: str) -> tuple[int, int]:
    if isinstance(v, (tuple, list)):
        if len(v) == 1:
            return int(v[0]), int(v[0])
        if len(v) != 2:
            raise ValueError(f"{what} must be an int or a pair, got {v!r}")
        return int(v[0]), int(v[1])
    return int(v), int(v)


# ---------------------------------------------------------------------------- converter
class _Converter:
    def __init__(self, module: nn.Module, input_shape: tuple[int, ...], dtype: torch.dtype,
                 name: str):
        self.root = module
        self.input_shape = input_shape
        self.dtype = dtype
        self.name = name
        self.nodes: list[Node] = []
        self.by_name: dict[str, Node] = {}
        self.env: dict[fx.Node, Any] = {}
        self.bias_values: dict[str, torch.Tensor] = {}  # name -> float64 values, in order
        self.module_nodes: dict[str, str] = {}
        self.unit_modules: dict[str, str] = {}
        self.n_conv = 0
        self.n_fc_seen = 0

    # ------------------------------------------------------------------ helpers
    def fail(self, node: fx.Node, why: str, exc: type = ConversionError):
        fr = _src_frame(node)
        where = f" at {fr[0]}:{fr[1]} `{fr[2]}`" if fr else ""
        kind = ""
        if node.op == "call_module":
            kind = f" [{type(self.gm.get_submodule(node.target)).__name__}]"
        raise exc(
            f"from_torch({self.name}): cannot convert fx node '{node.name}' "
            f"(op={node.op}, target={_target_name(node)}{kind}){where}: {why}. "
            "Supported operations are listed in the linop.convert module docstring."
        )

    def shape_of(self, node: fx.Node) -> tuple[int, ...]:
        tm = node.meta.get("tensor_meta")
        shape = getattr(tm, "shape", None)
        if shape is None:
            self.fail(node, "shape propagation gave no single tensor for this node")
        shape = tuple(int(s) for s in shape)
        if not shape or shape[0] != _DUMMY_BATCH:
            self.fail(node, f"the result {shape} does not keep the batch dimension first")
        return shape[1:]

    def tensor(self, node: fx.Node, a: Any, what: str = "input") -> _T:
        v = self.env.get(a) if isinstance(a, fx.Node) else None
        if not isinstance(v, _T):
            self.fail(node, f"its {what} {a!r} is not a tensor of the network")
        return v

    def const(self, a: Any) -> _Const | None:
        """A constant operand (number, parameter, buffer) or None."""
        if isinstance(a, bool):
            return None
        if isinstance(a, (int, float)):
            return _Const(torch.tensor(float(a), dtype=torch.float64))
        if isinstance(a, fx.Node):
            if a.op == "get_attr":  # may come later in the graph than a fold-chain head
                return _Const(self.get_attr(a), str(a.target))
            v = self.env.get(a)
            if isinstance(v, _Const):
                return v
        return None

    def get_attr(self, node: fx.Node) -> torch.Tensor:
        t = self.gm
        for part in str(node.target).split("."):
            t = getattr(t, part)
        if not isinstance(t, torch.Tensor):
            self.fail(node, f"attribute of type {type(t).__name__} is not a tensor")
        return t

    def unique(self, base: str) -> str:
        name, k = base, 1
        while name in self.used:
            name = f"{base}_{k}"
            k += 1
        self.used.add(name)
        return name

    def add(self, node: Node) -> _T:
        self.nodes.append(node)
        self.by_name[node.name] = node
        return _T(node.name, tuple(node.out_shape))

    def check_op(self, node: fx.Node, op, want: tuple[int, ...]):
        if tuple(op.out_shape) != tuple(want):
            self.fail(node, f"internal: operator {op!r} gives {op.out_shape}, torch gives {want}",
                      RuntimeError)
        return op

    def bias(self, node: fx.Node, inp: _T, bname: str, values: torch.Tensor, shape, mode: str,
             out_name: str, unit_layer: str | None = None) -> _T:
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
        return self.add(BiasNode(out_name, (inp.name,), tuple(shape), _source(node),
                                 bias_name=bname, restriction=R, unit_layer=unit_layer))

    def linear(self, node: fx.Node, inp: _T, op, name: str | None = None,
               unit_layer: str | None = None) -> _T:
        self.check_op(node, op, self.shape_of(node))
        return self.add(LinearNode(name or node.name, (inp.name,), tuple(op.out_shape),
                                   _source(node), op=op, unit_layer=unit_layer))

    def param(self, t: torch.Tensor) -> torch.Tensor:
        """A parameter for an operator: detached CPU copy in the network dtype."""
        return t.detach().to(device="cpu", dtype=self.dtype).clone()

    # ------------------------------------------------------------------ classification
    def mod(self, node: fx.Node) -> nn.Module | None:
        return self.gm.get_submodule(node.target) if node.op == "call_module" else None

    def is_bn(self, node: fx.Node) -> bool:
        return isinstance(self.mod(node), (nn.BatchNorm1d, nn.BatchNorm2d))

    def scalar_factor(self, node: fx.Node, src: fx.Node) -> float | None:
        """``s`` if ``node`` computes ``src * s`` or ``src / s`` with a constant scalar s."""
        tgt = node.target
        is_mul = (node.op == "call_function" and tgt in _MUL) or (
            node.op == "call_method" and tgt in ("mul", "mul_"))
        is_div = (node.op == "call_function" and tgt in _DIV) or (
            node.op == "call_method" and tgt in ("div", "div_"))
        if not (is_mul or is_div) or node.kwargs.get("rounding_mode") is not None:
            return None
        if len(node.args) != 2 or node.kwargs.get("out") is not None:
            return None
        a, b = node.args
        if is_div:
            if a is not src or b is src:
                return None
            c = self.const(b)
        else:
            if (a is src) == (b is src):
                return None
            c = self.const(b if a is src else a)
        if c is None or c.value.numel() != 1:
            return None
        s = float(c.value.detach().to(torch.float64).reshape(()))
        if is_div:
            if s == 0.0:
                return None
            return 1.0 / s
        return s

    def fold_chain(self, head: fx.Node) -> list[fx.Node]:
        """BN / scalar multipliers directly after ``head`` (single consumers), in order."""
        chain, cur = [], head
        while len(cur.users) == 1:
            u = next(iter(cur.users))
            if self.is_bn(u) and len(u.args) == 1 and u.args[0] is cur and not u.kwargs:
                chain.append(u)
            elif self.scalar_factor(u, cur) is not None:
                chain.append(u)
            else:
                break
            cur = u
        return chain

    # ------------------------------------------------------------------ main
    def convert(self) -> EquivalentNetwork:
        tracer = fx.Tracer()
        tracer.record_stack_traces = True
        try:
            graph = tracer.trace(self.root)
        except Exception as exc:  # fx raises TraceError, TypeError, ... on untraceable code
            raise ConversionError(
                f"from_torch({self.name}): torch.fx could not trace {type(self.root).__name__}: "
                f"{type(exc).__name__}: {exc}. Data-dependent Python control flow and "
                "non-tensor logic are not traceable; rewrite it with tensor ops."
            ) from exc
        self.gm = fx.GraphModule(self.root, graph)
        p = next(iter(self.root.parameters()), None)
        if p is None:
            p = next(iter(self.root.buffers()), None)
        like = p if p is not None and p.is_floating_point() else torch.zeros(
            (), dtype=torch.float32)
        dummy = torch.zeros((_DUMMY_BATCH,) + self.input_shape, dtype=like.dtype,
                            device=like.device)
        try:
            with torch.no_grad():
                # a plain call first: ShapeProp prints a traceback to stderr on failure
                self.gm(dummy)
                ShapeProp(self.gm).propagate(dummy)
        except Exception as exc:
            root = exc
            while root.__cause__ is not None:  # ShapeProp wraps the real error verbosely
                root = root.__cause__
            msg = (str(root).strip().splitlines() or [""])[0]
            raise ValueError(
                f"from_torch({self.name}): running the module on a dummy batch of shape "
                f"{tuple(dummy.shape)} failed ({type(root).__name__}: {msg}); is input_shape="
                f"{self.input_shape} the per-sample shape the module expects?"
            ) from exc
        self.used = {n.name for n in graph.nodes}
        self.order = {n: i for i, n in enumerate(graph.nodes)}
        self.n_fc = sum(1 for n in graph.nodes if isinstance(self.mod(n), nn.Linear))
        placeholders = [n for n in graph.nodes if n.op == "placeholder"]
        if len(placeholders) != 1:
            raise ConversionError(
                f"from_torch({self.name}): the module's forward must take exactly one tensor "
                f"argument, got {[n.name for n in placeholders]}")

        self.absorbed: set[fx.Node] = set()
        output = None
        for node in graph.nodes:
            if node in self.absorbed:
                pass  # value set when its chain head was converted
            elif node.op == "placeholder":
                shape = self.shape_of(node)
                if shape != self.input_shape:
                    self.fail(node, f"input shape {shape} != {self.input_shape}", ValueError)
                self.env[node] = self.add(InputNode(node.name, (), shape, "input"))
            elif node.op == "get_attr":
                self.env[node] = _Const(self.get_attr(node), str(node.target))
            elif node.op == "output":
                output = node
                continue
            else:
                self.env[node] = self.convert_node(node)
            v = self.env.get(node)
            if isinstance(v, _T):
                for path in _module_paths(node):
                    self.module_nodes[path] = v.name

        out = output.args[0]
        if not isinstance(out, fx.Node) or not isinstance(self.env.get(out), _T):
            self.fail(output, "the module must return a single tensor")
        return self.finish(self.env[out].name)

    def finish(self, out_name: str) -> EquivalentNetwork:
        # drop nodes the output does not depend on (dead code in forward)
        index = {n.name: n for n in self.nodes}
        live, stack = set(), [out_name]
        while stack:
            nm = stack.pop()
            if nm not in live:
                live.add(nm)
                stack.extend(index[nm].inputs)
        nodes = [n for n in self.nodes if n.name in live or isinstance(n, InputNode)]
        self.renumber_units(nodes)
        # x_b: the live biases concatenated in execution order (seed 000 Fig. 2)
        slices, parts, off = {}, [], 0
        for n in nodes:
            if isinstance(n, BiasNode):
                if n.bias_name not in slices:
                    v = self.bias_values[n.bias_name]
                    slices[n.bias_name] = slice(off, off + v.numel())
                    parts.append(v)
                    off += v.numel()
                n.bias_slice = slices[n.bias_name]
        x_b = torch.cat(parts) if parts else torch.zeros(0, dtype=torch.float64)
        names = {n.name for n in nodes}
        module_nodes = {k: v for k, v in self.module_nodes.items() if v in names}
        unit_modules = {k: v for k, v in self.unit_modules.items()
                        if any(getattr(n, "unit_layer", None) == k for n in nodes)}
        return EquivalentNetwork(nodes, out_name, x_b.to(self.dtype), slices, name=self.name,
                                 module_nodes=module_nodes, unit_modules=unit_modules)

    def renumber_units(self, nodes: list[Node]) -> None:
        """Conv0.. / FC names over the *live* unit layers (dead code may have held some)."""
        units = [n for n in nodes if isinstance(n, LinearNode) and n.unit_layer]
        convs = [n for n in units if n.unit_layer.startswith("Conv")]
        fcs = [n for n in units if n.unit_layer.startswith("FC")]
        new = {n.unit_layer: f"Conv{i}" for i, n in enumerate(convs)}
        new.update({n.unit_layer: ("FC" if len(fcs) == 1 else f"FC{i}") for i, n in enumerate(fcs)})
        if all(k == v for k, v in new.items()):
            return
        for n in nodes:
            if isinstance(n, (LinearNode, BiasNode)) and n.unit_layer in new:
                old = n.unit_layer
                n.unit_layer = new[old]
                if isinstance(n, BiasNode) and n.bias_name == f"{old}.bias":
                    n.bias_name = f"{new[old]}.bias"
                    self.bias_values[n.bias_name] = self.bias_values.pop(f"{old}.bias")
        self.unit_modules = {new[k]: v for k, v in self.unit_modules.items() if k in new}

    # ------------------------------------------------------------------ per node
    def convert_node(self, node: fx.Node) -> Any:
        op, tgt = node.op, node.target
        if op == "call_module":
            return self.convert_module(node, self.gm.get_submodule(tgt))
        if op == "call_function":
            if tgt is operator.getitem:
                return self.getitem(node)
            if tgt is getattr:  # x.shape
                return _Opaque()
            if tgt in _RELU:
                return self.activation(node, "relu")
            if tgt is F.leaky_relu:
                slope = node.args[1] if len(node.args) > 1 else node.kwargs.get(
                    "negative_slope", 0.01)
                return self.activation(node, "leaky_relu", float(slope))
            if tgt in _TANH:
                return self.activation(node, "tanh")
            if tgt in _SIGMOID:
                return self.activation(node, "sigmoid")
            if tgt in _ADD:
                return self.add_op(node, sign=1.0)
            if tgt in _SUB:
                return self.add_op(node, sign=-1.0)
            if tgt in _MUL or tgt in _DIV:
                return self.mul_op(node, div=tgt in _DIV)
            if tgt in _CAT:
                return self.cat(node)
            if tgt is F.pad:
                return self.pad(node)
            if tgt is F.avg_pool2d:
                return self.avg_pool(node, *self.args(node, ["kernel_size", "stride", "padding",
                                     "ceil_mode", "count_include_pad", "divisor_override"],
                                     [None, None, 0, False, True, None]))
            if tgt is F.max_pool2d:
                return self.max_pool(node, *self.args(node, ["kernel_size", "stride", "padding",
                                     "dilation", "ceil_mode", "return_indices"],
                                     [None, None, 0, 1, False, False]))
            if tgt is F.adaptive_avg_pool2d:
                return self.adaptive(node, self.args(node, ["output_size"], [None])[0], "avg")
            if tgt is F.adaptive_max_pool2d:
                (osz, ri) = self.args(node, ["output_size", "return_indices"], [None, False])
                if ri:
                    self.fail(node, "return_indices=True is not supported")
                return self.adaptive(node, osz, "max")
            if tgt in _FLATTEN_FN:
                return self.reshape(node)
            if tgt is torch.mean:
                return self.mean(node)
            if tgt in _DROPOUT_FN:
                (p, training) = self.args(node, ["p", "training"], [0.5, True])
                if training and p != 0:
                    self.fail(node, "functional dropout with training=True is random even in "
                              "eval mode; pass training=self.training", ValueError)
                return self.tensor(node, node.args[0])
            self.fail(node, "unsupported function")
        if op == "call_method":
            if tgt == "size" or tgt == "dim":
                return _Opaque()
            if tgt in _METHOD_KIND:
                return self.activation(node, _METHOD_KIND[tgt])
            if tgt in ("add", "add_"):
                return self.add_op(node, sign=1.0)
            if tgt in ("sub", "sub_"):
                return self.add_op(node, sign=-1.0)
            if tgt in ("mul", "mul_", "div", "div_"):
                return self.mul_op(node, div=tgt.startswith("div"))
            if tgt in ("view", "reshape", "flatten", "squeeze"):
                return self.reshape(node)
            if tgt == "mean":
                return self.mean(node)
            if tgt in ("contiguous", "clone"):
                return self.tensor(node, node.args[0])
            self.fail(node, "unsupported tensor method")
        self.fail(node, "unsupported fx op")

    def args(self, node: fx.Node, names: Sequence[str], defaults: Sequence[Any]) -> list[Any]:
        """Arguments after the first (the tensor), by position or keyword."""
        out = []
        for i, (nm, d) in enumerate(zip(names, defaults)):
            if len(node.args) > i + 1:
                out.append(node.args[i + 1])
            else:
                out.append(node.kwargs.get(nm, d))
        return out

    # ------------------------------------------------------------------ modules
    def convert_module(self, node: fx.Node, m: nn.Module) -> Any:
        if len(node.args) != 1 or node.kwargs:
            if not isinstance(m, (nn.Identity,)):
                self.fail(node, "only modules called with a single tensor are supported")
        if isinstance(m, (nn.Conv2d, nn.Linear)) and type(m) in (nn.Conv2d, nn.Linear):
            return self.unit_layer(node, m)
        if isinstance(m, (nn.BatchNorm1d, nn.BatchNorm2d)):
            return self.standalone_bn(node, m)
        if isinstance(m, nn.ReLU):
            return self.activation(node, "relu")
        if isinstance(m, nn.LeakyReLU):
            return self.activation(node, "leaky_relu", float(m.negative_slope))
        if isinstance(m, nn.PReLU):
            return self.activation(node, "prelu", self.param(m.weight).reshape(-1))
        if isinstance(m, nn.Tanh):
            return self.activation(node, "tanh")
        if isinstance(m, nn.Sigmoid):
            return self.activation(node, "sigmoid")
        if isinstance(m, nn.AvgPool2d):
            return self.avg_pool(node, m.kernel_size, m.stride, m.padding, m.ceil_mode,
                                 m.count_include_pad, m.divisor_override)
        if isinstance(m, nn.MaxPool2d):
            return self.max_pool(node, m.kernel_size, m.stride, m.padding, m.dilation,
                                 m.ceil_mode, m.return_indices)
        if isinstance(m, nn.AdaptiveAvgPool2d):
            return self.adaptive(node, m.output_size, "avg")
        if isinstance(m, nn.AdaptiveMaxPool2d):
            if m.return_indices:
                self.fail(node, "return_indices=True is not supported")
            return self.adaptive(node, m.output_size, "max")
        if isinstance(m, nn.Flatten):
            return self.reshape(node)
        if isinstance(m, (nn.Identity,) + _DROPOUT_MODULES):
            return self.tensor(node, node.args[0])
        self.fail(node, f"module type {type(m).__name__} is not supported")

    def unit_layer(self, node: fx.Node, m: nn.Module) -> _T:
        """Conv / linear with its folded BN / multiplier chain (Eq. 7, Table D.4)."""
        inp = self.tensor(node, node.args[0])
        is_conv = isinstance(m, nn.Conv2d)
        if is_conv:
            if m.padding_mode != "zeros":
                self.fail(node, f"padding_mode={m.padding_mode!r} (only 'zeros')")
            if len(inp.shape) != 3:
                self.fail(node, f"Conv2d needs a (C, H, W) input, got {inp.shape}")
        elif len(inp.shape) != 1:
            self.fail(node, f"Linear is supported on (N, F) inputs, got per-sample {inp.shape}")
        chain = self.fold_chain(node)
        W = m.weight.detach().to(device="cpu", dtype=torch.float64)
        n_out = W.shape[0]
        a = torch.ones(n_out, dtype=torch.float64)
        t = torch.zeros(n_out, dtype=torch.float64)
        has_bias = m.bias is not None
        if has_bias:
            t = m.bias.detach().to(device="cpu", dtype=torch.float64).clone()
        prev = node
        for c in chain:
            if self.is_bn(c):
                g, shift = self.bn_affine(c, self.mod(c), n_out)
                a, t = a * g, g * t + shift  # BN(a·Wx + t) = g·a·Wx + (g·t + β − g·μ)
                has_bias = True
            else:
                s = self.scalar_factor(c, prev)
                a, t = a * s, t * s
            prev = c
        Wf = W * a.reshape((-1,) + (1,) * (W.dim() - 1))
        if is_conv:
            from ..operators.conv import Conv2d

            op = Conv2d(self.param(Wf), inp.shape, stride=m.stride, padding=m.padding,
                        dilation=m.dilation, groups=m.groups)
            layer = f"Conv{self.n_conv}"
            self.n_conv += 1
        else:
            from ..operators.dense import Linear

            op = Linear(self.param(Wf))
            layer = "FC" if self.n_fc == 1 else f"FC{self.n_fc_seen}"
            self.n_fc_seen += 1
        lin = self.linear(node, inp, op, unit_layer=layer)
        self.unit_modules[layer] = str(node.target)
        res = lin
        tail = chain[-1] if chain else node
        if has_bias:
            bname = tail.name if chain else self.unique(f"{node.name}_bias")
            self.used.add(bname)
            res = self.bias(tail, lin, f"{layer}.bias", t, lin.shape, "channel", bname,
                            unit_layer=layer)
        for c in chain:  # values of the absorbed nodes (for module mapping)
            self.absorbed.add(c)
            self.env[c] = res if c is tail else lin
            for path in _module_paths(c):
                self.module_nodes[path] = self.env[c].name
        # the head's own torch value is conv(x) + bias when nothing was folded; with a chain
        # it is only seen by the chain, whose tail carries the result
        return lin if chain else res

    def bn_affine(self, node: fx.Node, m: nn.Module, n: int) -> tuple[torch.Tensor, torch.Tensor]:
        """``g = γ/√(σ²+ε)``, ``shift = β − g·μ`` of an eval-mode BatchNorm (Eq. 7)."""
        if m.running_mean is None or m.running_var is None:
            self.fail(node, "BatchNorm without running statistics (track_running_stats=False) "
                      "normalises with batch statistics even in eval mode")
        if m.num_features != n:
            self.fail(node, f"BatchNorm over {m.num_features} features applied to {n} channels")
        f64 = dict(device="cpu", dtype=torch.float64)
        var = m.running_var.detach().to(**f64)
        mu = m.running_mean.detach().to(**f64)
        g = 1.0 / torch.sqrt(var + float(m.eps))
        if m.weight is not None:
            g = m.weight.detach().to(**f64) * g
        shift = -g * mu
        if m.bias is not None:
            shift = shift + m.bias.detach().to(**f64)
        return g, shift

    def standalone_bn(self, node: fx.Node, m: nn.Module) -> _T:
        from ..operators.structural import Scale

        inp = self.tensor(node, node.args[0])
        if isinstance(m, nn.BatchNorm2d) and len(inp.shape) != 3:
            self.fail(node, f"BatchNorm2d needs (C, H, W), got {inp.shape}")
        if isinstance(m, nn.BatchNorm1d) and len(inp.shape) != 1:
            self.fail(node, f"BatchNorm1d is supported on (N, C) inputs, got {inp.shape}")
        g, shift = self.bn_affine(node, m, inp.shape[0])
        lin = self.linear(node, inp, Scale(inp.shape, self.param(g)),
                          name=self.unique(f"{node.name}_scale"))
        return self.bias(node, lin, f"{node.target}.bias", shift, inp.shape, "channel", node.name)

    # ------------------------------------------------------------------ elementwise
    def activation(self, node: fx.Node, kind: str, slope: Any = 0.0) -> _T:
        inp = self.tensor(node, node.args[0])
        self.check_inplace(node)
        if kind == "leaky_relu" and slope < 0:
            self.fail(node, f"negative_slope={slope} < 0 is not monotone", ValueError)
        if kind == "prelu" and slope.numel() not in (1, inp.shape[0]):
            self.fail(node, f"PReLU with {slope.numel()} slopes on {inp.shape[0]} channels")
        return self.add(ActivationNode(node.name, (inp.name,), inp.shape, _source(node),
                                       kind=kind, negative_slope=slope))

    def check_inplace(self, node: fx.Node) -> None:
        """An in-place op whose input is read again later would change that later value in
        torch but not here (the graph is functional): refuse it."""
        m = self.mod(node)
        inplace = bool(getattr(m, "inplace", False)) if m is not None else (
            bool(node.kwargs.get("inplace", False)) or str(getattr(node.target, "__name__",
                                                                   node.target)).endswith("_"))
        src = node.args[0]
        if inplace and isinstance(src, fx.Node):
            later = [u.name for u in src.users if self.order[u] > self.order[node]]
            if later:
                self.fail(node, f"in-place op on '{src.name}', which is read again later by "
                          f"{later}; use the out-of-place form")

    def channel_values(self, node: fx.Node, c: _Const, shape: tuple[int, ...]):
        """(mode, flat values) of a constant broadcast against a tensor of ``shape``."""
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

    def add_op(self, node: fx.Node, sign: float) -> _T:
        if node.kwargs.get("alpha", 1) != 1 or len(node.args) != 2:
            self.fail(node, "only a + b / a - b (alpha=1) is supported")
        a, b = node.args
        va = self.env.get(a) if isinstance(a, fx.Node) else None
        vb = self.env.get(b) if isinstance(b, fx.Node) else None
        if isinstance(va, _T) and isinstance(vb, _T):
            if va.shape != vb.shape:
                self.fail(node, f"broadcasting sum of shapes {va.shape} and {vb.shape}")
            if sign < 0:
                from ..operators.structural import Scale

                vb = self.linear(node, vb, Scale(vb.shape, -1.0),
                                 name=self.unique(f"{node.name}_neg"))
            return self.add(AddNode(node.name, (va.name, vb.name), va.shape, _source(node)))
        if isinstance(va, _T) or isinstance(vb, _T):
            x, cst, x_first = (va, b, True) if isinstance(va, _T) else (vb, a, False)
            c = self.const(cst)
            if c is None:
                self.fail(node, f"the other operand {cst!r} is neither a tensor of the network "
                          "nor a constant")
            if not x_first and sign < 0:  # c - x = c + (-1)·x
                from ..operators.structural import Scale

                x = self.linear(node, x, Scale(x.shape, -1.0),
                                name=self.unique(f"{node.name}_neg"))
                sign = 1.0
            mode, vals = self.channel_values(node, c, x.shape)
            base = c.path if c.path is not None else f"{node.name}.const"
            bname = base if sign > 0 else f"-{base}"
            # own bias of a bias-free conv/linear whose only consumer is this add (Fixup)
            unit = None
            src = a if x_first else b
            prod_node = self.by_name.get(x.name)
            if (isinstance(prod_node, LinearNode) and prod_node.unit_layer
                    and len(src.users) == 1 and self.own_bias_free(prod_node.unit_layer)):
                unit = prod_node.unit_layer
            return self.bias(node, x, bname, sign * vals, x.shape, mode, node.name,
                             unit_layer=unit)
        self.fail(node, "neither operand is a tensor of the network")

    def own_bias_free(self, layer: str) -> bool:
        return not any(isinstance(n, BiasNode) and n.unit_layer == layer for n in self.nodes)

    def mul_op(self, node: fx.Node, div: bool) -> _T:
        from ..operators.structural import Scale

        if len(node.args) != 2 or set(node.kwargs) - {"rounding_mode"} or node.kwargs.get(
                "rounding_mode") is not None:
            self.fail(node, "only x * c and x / c with a constant c are supported")
        a, b = node.args
        va = self.env.get(a) if isinstance(a, fx.Node) else None
        vb = self.env.get(b) if isinstance(b, fx.Node) else None
        if isinstance(va, _T) and isinstance(vb, _T):
            self.fail(node, "the product of two network tensors is not linear")
        if div and not isinstance(va, _T):
            self.fail(node, "division by a network tensor is not linear")
        x, cst = (va, b) if isinstance(va, _T) else (vb, a)
        if not isinstance(x, _T):
            self.fail(node, "neither operand is a tensor of the network")
        c = self.const(cst)
        if c is None:
            self.fail(node, f"the factor {cst!r} is not a constant")
        mode, vals = self.channel_values(node, c, x.shape)
        if mode == "unit":
            self.fail(node, "a full-shape elementwise factor is not supported (scalar or "
                      "per-channel only)")
        if div:
            if torch.any(vals == 0):
                self.fail(node, "division by zero", ValueError)
            vals = 1.0 / vals
        alpha = float(vals[0]) if mode == "scalar" else self.param(vals)
        return self.linear(node, x, Scale(x.shape, alpha))

    # ------------------------------------------------------------------ structure
    def cat(self, node: fx.Node) -> _T:
        tensors = node.args[0]
        dim = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim", 0)
        ins = [self.tensor(node, t) for t in tensors]
        nd = len(ins[0].shape) + 1
        if dim not in (1, 1 - nd):
            self.fail(node, f"concatenation along dim={dim} (only the channel axis, dim=1)")
        if any(v.shape[1:] != ins[0].shape[1:] for v in ins):
            self.fail(node, f"inputs of shapes {[v.shape for v in ins]} differ off the channel axis")
        return self.add(CatNode(node.name, tuple(v.name for v in ins), self.shape_of(node),
                                _source(node), dim=1))

    def pad(self, node: fx.Node) -> _T:
        from ..operators.structural import ChannelPad

        x = self.tensor(node, node.args[0])
        (pad, mode, value) = self.args(node, ["pad", "mode", "value"], [None, "constant", None])
        if mode != "constant" or value not in (None, 0, 0.0):
            self.fail(node, f"F.pad mode={mode!r}, value={value!r} (only constant zeros)")
        pad = [int(p) for p in pad]
        nd = len(x.shape)
        if len(pad) % 2 or len(pad) > 2 * nd:
            self.fail(node, f"pad={pad} reaches the batch axis")
        pad = pad + [0] * (2 * nd - len(pad))
        ch = pad[2 * (nd - 1): 2 * nd]  # pairs run from the last dim backwards
        if any(pad[: 2 * (nd - 1)]) or min(ch) < 0:
            self.fail(node, f"pad={pad}: only non-negative zero padding of the channel axis is "
                      "supported")
        if not any(ch):
            return x
        return self.linear(node, x, ChannelPad(x.shape, ch[0], ch[1]))

    def getitem(self, node: fx.Node) -> Any:
        src, idx = node.args
        v = self.env.get(src) if isinstance(src, fx.Node) else None
        if isinstance(v, _Const) and isinstance(v.value, torch.Tensor):
            # a slice of a parameter / buffer is still a constant (e.g. ``self.b[0]``)
            path = None if v.path is None else f"{v.path}[{node.name}]"
            return _Const(v.value[idx], path)
        if not isinstance(v, _T):
            if isinstance(v, _Opaque) or (isinstance(src, fx.Node)
                                          and src.meta.get("tensor_meta") is None):
                return _Opaque()  # x.shape[0] and the like
            self.fail(node, "indexing of a value that is not a tensor of the network")
        from ..operators.structural import Subsample

        if not isinstance(idx, tuple):
            idx = (idx,)
        nd = len(v.shape) + 1
        if any(i is Ellipsis for i in idx):
            k = idx.index(Ellipsis)
            idx = idx[:k] + (slice(None),) * (nd - len(idx) + 1) + idx[k + 1:]
        idx = idx + (slice(None),) * (nd - len(idx))
        if len(idx) != nd or not all(isinstance(i, slice) for i in idx):
            self.fail(node, f"index {node.args[1]!r}: only slices are supported")
        full = [i == slice(None) or i == slice(None, None, 1) for i in idx]
        if not (full[0] and (nd < 2 or full[1])):
            self.fail(node, "slicing the batch or channel axis is not supported")
        if all(full):
            return v
        if nd != 4:
            self.fail(node, "strided slicing is supported on (N, C, H, W) tensors")
        stride, offset = [], []
        for i, size in zip(idx[2:], v.shape[1:]):
            step = 1 if i.step is None else int(i.step)
            start = 0 if i.start is None else int(i.start)
            if step < 1 or start < 0 or (i.stop is not None and int(i.stop) < size):
                self.fail(node, f"slice {i}: only x[..., start::step] with start >= 0, step >= 1")
            stride.append(step)
            offset.append(start)
        return self.linear(node, v, Subsample(v.shape, tuple(stride), tuple(offset)))

    def reshape(self, node: fx.Node) -> _T:
        from ..operators.structural import Flatten

        x = self.tensor(node, node.args[0])
        out = self.shape_of(node)
        if math.prod(out) != math.prod(x.shape):
            self.fail(node, f"reshape {x.shape} -> {out} mixes samples of the batch")
        if out == x.shape:
            return x
        if len(out) != 1:
            self.fail(node, f"reshape {x.shape} -> {out}: only flattening to (N, -1) is supported")
        return self.linear(node, x, Flatten(x.shape))

    def mean(self, node: fx.Node) -> _T:
        from ..operators.pool import GlobalAvgPool2d

        x = self.tensor(node, node.args[0])
        (dim, keepdim) = self.args(node, ["dim", "keepdim"], [None, False])
        if node.kwargs.get("dtype") is not None:
            self.fail(node, "mean with a dtype argument")
        if len(x.shape) != 3 or dim is None:
            self.fail(node, "only the spatial mean x.mean((2, 3)) of (N, C, H, W) is supported")
        dims = sorted(int(d) % 4 for d in (dim if isinstance(dim, (tuple, list)) else (dim,)))
        if dims != [2, 3]:
            self.fail(node, f"mean over dims {dim} (only the spatial axes (2, 3))")
        return self.linear(node, x, GlobalAvgPool2d(x.shape, keepdim=bool(keepdim)))

    def avg_pool(self, node, kernel_size, stride, padding, ceil_mode, count_include_pad,
                 divisor_override) -> _T:
        from ..operators.pool import AvgPool2d

        x = self.tensor(node, node.args[0])
        if len(x.shape) != 3:
            self.fail(node, f"AvgPool2d needs (C, H, W), got {x.shape}")
        k = _pair(kernel_size, "kernel_size")
        s = k if stride is None or stride == [] or stride == () else _pair(stride, "stride")
        op = AvgPool2d(x.shape, k, s, _pair(padding, "padding"),
                       count_include_pad=bool(count_include_pad), ceil_mode=bool(ceil_mode),
                       divisor_override=divisor_override)
        return self.linear(node, x, op)

    def max_pool(self, node, kernel_size, stride, padding, dilation, ceil_mode,
                 return_indices) -> _T:
        x = self.tensor(node, node.args[0])
        if return_indices:
            self.fail(node, "max pooling with return_indices=True")
        if len(x.shape) != 3:
            self.fail(node, f"MaxPool2d needs (C, H, W), got {x.shape}")
        k = _pair(kernel_size, "kernel_size")
        s = k if stride is None or stride == [] or stride == () else _pair(stride, "stride")
        mp = MaxPoolNode(node.name, (x.name,), self.shape_of(node), _source(node),
                         kernel_size=k, stride=s, padding=_pair(padding, "padding"),
                         dilation=_pair(dilation, "dilation"), ceil_mode=bool(ceil_mode))
        return self.add(mp)

    def adaptive(self, node: fx.Node, output_size: Any, kind: str) -> _T:
        x = self.tensor(node, node.args[0])
        if len(x.shape) != 3:
            self.fail(node, f"adaptive pooling needs (C, H, W), got {x.shape}")
        osz = output_size if isinstance(output_size, (tuple, list)) else (output_size,) * 2
        osz = tuple(x.shape[1 + i] if o is None else int(o) for i, o in enumerate(osz))
        H, W = x.shape[1:]
        if H % osz[0] or W % osz[1]:
            self.fail(node, f"adaptive pooling {H}x{W} -> {osz[0]}x{osz[1]} with uneven windows")
        k = (H // osz[0], W // osz[1])
        if kind == "avg":
            from ..operators.pool import AvgPool2d, GlobalAvgPool2d

            if osz == (1, 1):
                return self.linear(node, x, GlobalAvgPool2d(x.shape, keepdim=True))
            return self.linear(node, x, AvgPool2d(x.shape, k, k, (0, 0)))
        return self.max_pool(node, k, k, 0, 1, False, False)


# ---------------------------------------------------------------------------- public API
def _check_eval(module: nn.Module, name: str) -> None:
    for path, m in module.named_modules():
        if m.training:
            raise ValueError(
                f"from_torch({name}): {'the module' if not path else 'submodule ' + repr(path)} "
                f"({type(m).__name__}) is in training mode; call module.eval() first "
                "(BatchNorm would use batch statistics and dropout would be random)")


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
    ValueError
        Module in training mode, bad ``input_shape`` / ``dtype``.
    NotImplementedError
        (:class:`ConversionError`) an operation with no equivalent-network counterpart; the
        message names the fx node, its op / target and the source line.
    """
    if not isinstance(module, nn.Module):
        raise ValueError(f"from_torch: module must be a torch.nn.Module, got {type(module).__name__}")
    name = name or type(module).__name__
    input_shape = as_shape(input_shape, "input_shape")
    dt = torch_dtype(dtype)
    if dt not in (torch.float32, torch.float64):
        raise ValueError(f"from_torch: dtype must be float32 or float64, got {dt}")
    _check_eval(module, name)
    return _Converter(module, input_shape, dt, name).convert()


def check_conversion(module: nn.Module, net: EquivalentNetwork, x: torch.Tensor) -> float:
    """Relative error ``‖net(x) − module(x)‖ / ‖module(x)‖`` (module cast to ``net.dtype``
    on a copy), a quick self-check of a conversion on a batch ``x``."""
    import copy

    ref = copy.deepcopy(module).to(net.dtype).eval()
    x = torch.as_tensor(x).to(net.dtype)
    with torch.no_grad():
        want = ref(x)
        got = net.forward(x)
    return float((got - want).norm() / want.norm().clamp_min(torch.finfo(net.dtype).tiny))
