"""Assembling the converted nodes into an :class:`~linop.network.EquivalentNetwork`.

Dead code (nodes the output does not depend on) is dropped, the live unit layers are
numbered ``Conv0, Conv1, ...`` / ``FC`` (``FC0, FC1, ...`` for several) in execution order as
in seed 000's tables, and ``x_b`` is the concatenation of the live biases in execution order
(seed 000 Fig. 2; a bias used twice keeps one slice).
"""
from __future__ import annotations

import torch

from ..network import BiasNode, EquivalentNetwork, InputNode, LinearNode, Node
from .context import Context

__all__ = ["assemble"]


def _live(nodes: list[Node], out_name: str) -> list[Node]:
    index = {n.name: n for n in nodes}
    live, stack = set(), [out_name]
    while stack:
        nm = stack.pop()
        if nm not in live:
            live.add(nm)
            stack.extend(index[nm].inputs)
    return [n for n in nodes if n.name in live or isinstance(n, InputNode)]


def _renumber_units(ctx: Context, nodes: list[Node]) -> dict[str, str]:
    """Conv0.. / FC names over the live unit layers (dead code may have held some); renames
    the nodes' ``unit_layer`` and the own-bias names in place; returns ``old -> new``."""
    units = [n for n in nodes if isinstance(n, LinearNode) and n.unit_layer]
    convs = [n for n in units if n.unit_layer.startswith("Conv")]
    fcs = [n for n in units if n.unit_layer.startswith("FC")]
    new = {n.unit_layer: f"Conv{i}" for i, n in enumerate(convs)}
    new.update({n.unit_layer: ("FC" if len(fcs) == 1 else f"FC{i}") for i, n in enumerate(fcs)})
    renamed = {}
    for n in nodes:
        if isinstance(n, (LinearNode, BiasNode)) and n.unit_layer in new:
            old = n.unit_layer
            n.unit_layer = new[old]
            if isinstance(n, BiasNode) and n.bias_name == f"{old}.bias":
                n.bias_name = f"{new[old]}.bias"
                renamed[n.bias_name] = ctx.bias_values[f"{old}.bias"]
    ctx.bias_values.update(renamed)  # after the loop: an old name may be another's new one
    return new


def assemble(ctx: Context, out_name: str, module_nodes: dict[str, str]) -> EquivalentNetwork:
    """The network computing node ``out_name`` from the nodes converted in ``ctx``.

    ``module_nodes`` maps torch module paths to the node computing their output."""
    nodes = _live(ctx.nodes, out_name)
    new = _renumber_units(ctx, nodes)
    slices, parts, off = {}, [], 0
    for n in nodes:
        if isinstance(n, BiasNode):
            if n.bias_name not in slices:
                v = ctx.bias_values[n.bias_name]
                slices[n.bias_name] = slice(off, off + v.numel())
                parts.append(v)
                off += v.numel()
            n.bias_slice = slices[n.bias_name]
    x_b = torch.cat(parts) if parts else torch.zeros(0, dtype=torch.float64)
    names = {n.name for n in nodes}
    module_nodes = {k: v for k, v in module_nodes.items() if v in names}
    unit_modules = {new[k]: v for k, v in ctx.unit_modules.items() if k in new}
    return EquivalentNetwork(nodes, out_name, x_b.to(ctx.dtype), slices, name=ctx.name,
                             module_nodes=module_nodes, unit_modules=unit_modules)
