"""The converter registry: fx target -> handler (users register their own modules here).

Every fx node that ``from_torch`` meets is converted by the handler registered for its
target; the conversion engine never branches on the kind of operation.

Targets
-------
* an ``nn.Module`` subclass, for ``call_module`` nodes.  A module whose type is registered
  (directly, or through a base class whose ``forward`` it does not override) is kept as one
  opaque leaf by the tracer, so a handler sees the call, not the module's internals.
* a function (``F.relu``, ``torch.cat``, ``operator.add``), for ``call_function`` nodes,
  looked up by identity.
* a string, the name of a tensor method (``"relu"``, ``"view"``), for ``call_method`` nodes.

Handler protocol
----------------
``handler(ctx, node) -> value`` with ``ctx`` a :class:`linop.convert.context.Context` and
``node`` the ``torch.fx.Node``.  The handler reads its operands through ``ctx``
(``ctx.tensor(node, node.args[0])`` for a network tensor, ``ctx.const(a)`` for a number /
parameter / buffer, ``ctx.args(node, names, defaults)`` for the remaining arguments,
``ctx.module(node)`` for the called module, ``ctx.shape_of(node)`` for the per-sample output
shape torch computed) and returns the node's value:

* the :class:`~linop.convert.context.TensorValue` returned by ``ctx.linear(node, x, op)``
  (a linear operator from :mod:`linop.operators`), ``ctx.bias(...)`` (a slice of ``x_b``) or
  ``ctx.add(Node)`` (any node of :mod:`linop.network`), or an operand ``x`` itself when the
  op is the identity on the network;
* a :class:`~linop.convert.context.Constant` or :class:`~linop.convert.context.Opaque`
  for values that are not network tensors (``x.shape``).

A handler that cannot convert its node calls ``ctx.fail(node, "why")``: the conversion goes
on, and one :class:`~linop.convert.errors.ConversionError` lists every such node at the end.
``ctx.fail(node, "why", ValueError)`` stops at once (bad input rather than an unsupported op).

Example (``torch.neg`` has no built-in rule; a module computing it is converted as one
``Scale(-1)`` node)::

    from linop.convert import register_converter
    from linop.operators.structural import Scale

    class Negate(nn.Module):
        def forward(self, x):
            return torch.neg(x)

    def negate(ctx, node):
        x = ctx.tensor(node, node.args[0])
        return ctx.linear(node, x, Scale(x.shape, -1.0))

    register_converter(Negate, negate)   # or torch.neg, or "neg" for x.neg()
"""
from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Any

from torch import fx, nn

__all__ = ["has_module_rule", "lookup", "register_converter", "rule", "unregister_converter"]

Handler = Callable[[Any, fx.Node], Any]

_MODULES: dict[type, Handler] = {}
_FUNCTIONS: dict[Any, Handler] = {}
_METHODS: dict[str, Handler] = {}


def _table(target: Any) -> dict:
    if isinstance(target, type):
        if not issubclass(target, nn.Module):
            raise TypeError(f"register_converter: target class {target.__name__} is not an "
                            "nn.Module subclass")
        return _MODULES
    if isinstance(target, str):
        if not target.isidentifier():
            raise ValueError(f"register_converter: target {target!r} is not a method name")
        return _METHODS
    if callable(target):
        return _FUNCTIONS
    raise TypeError("register_converter: target must be an nn.Module subclass, a function or "
                    f"a tensor method name, got {type(target).__name__}")


def register_converter(target: Any, handler: Handler | None = None, *,
                       replace: bool = False) -> Any:
    """Register ``handler`` as the converter of ``target`` (see the module docstring).

    Parameters
    ----------
    target : type, callable or str
        An ``nn.Module`` subclass, a function, or the name of a tensor method.
    handler : callable, optional
        ``handler(ctx, node) -> value``.  Omitted: returns a decorator.
    replace : bool
        Allow replacing an existing handler (a built-in one included).

    Returns
    -------
    The handler (or, without ``handler``, a decorator that registers and returns it).

    Raises
    ------
    TypeError
        ``target`` of an unsupported kind, or ``handler`` not callable.
    ValueError
        ``target`` already has a handler and ``replace`` is False.
    """
    if handler is None:
        return lambda h: register_converter(target, h, replace=replace)
    if not callable(handler):
        raise TypeError(f"register_converter: handler must be callable, got {type(handler).__name__}")
    table = _table(target)
    if target in table and not replace:
        raise ValueError(f"register_converter: {target!r} already has a converter "
                         f"({table[target].__qualname__}); pass replace=True to replace it")
    table[target] = handler
    return handler


def unregister_converter(target: Any) -> None:
    """Remove the handler of ``target`` (``KeyError`` if it has none)."""
    table = _table(target)
    if target not in table:
        raise KeyError(f"unregister_converter: {target!r} has no converter")
    del table[target]


def rule(*targets: Any) -> Callable[[Handler], Handler]:
    """Decorator registering one built-in handler for several targets."""
    def deco(h: Handler) -> Handler:
        for t in dict.fromkeys(targets):  # aliases (F.relu_ is torch.relu_) count once
            register_converter(t, h)
        return h
    return deco


def _module_handler(cls: type) -> Handler | None:
    """Handler of the nearest registered class in ``cls``'s MRO whose ``forward`` ``cls``
    still uses: a subclass that overrides ``forward`` computes something else."""
    fwd = getattr(cls, "forward", None)
    for base in inspect.getmro(cls):
        h = _MODULES.get(base)
        if h is not None:
            return h if base is cls or getattr(base, "forward", None) is fwd else None
    return None


def has_module_rule(module: nn.Module) -> bool:
    """Whether ``module`` has a handler (the tracer keeps such modules as leaves)."""
    return _module_handler(type(module)) is not None


def lookup(gm: fx.GraphModule, node: fx.Node) -> Handler | None:
    """The handler of an fx ``call_module`` / ``call_function`` / ``call_method`` node, or
    None when its target has none."""
    if node.op == "call_module":
        return _module_handler(type(gm.get_submodule(node.target)))
    if node.op == "call_method":
        return _METHODS.get(node.target)
    if node.op == "call_function":
        try:
            return _FUNCTIONS.get(node.target)
        except TypeError:  # an unhashable callable cannot have been registered
            return None
    return None

