r"""The compressed-window forward sweep: the fast evaluation of a linearisation's Jacobians.

One forward pass of compressed tangents (:mod:`linop.linearize.tangents`) through the
linearised network evaluates the rows of ``lin.operator(layer)`` for every unit of many
layers at once: ``C·P_y·P_x`` image tangents instead of the ``C·H·W`` of the identity batch
(75 instead of 3,072 at VGG7's Conv1).  Every node's step applies the node's own local
operator; before a node whose period exceeds its input's, the input is *recoloured* (one
exact gather with an x-independent, cached index); a recoloured residual input is kept for its
later consumers, so no gather is repeated.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Iterator, Sequence

import numpy as np
import torch

from ..network.geometry import full_window
from ..utils import gib
from .layer_jacobian import LayerJacobian
from .tangents import State, input_state, recolour, step

if TYPE_CHECKING:  # pragma: no cover
    from .linearisation import Linearisation

__all__ = ["sweep"]


def sweep(lin: "Linearisation", layers: Sequence[str] | None = None, channels: Sequence[int] | None = None,
          bias: bool = True, check_memory: bool = True, schedule: str = "auto") -> Iterator[LayerJacobian]:
    """See :meth:`Linearisation.sweep`."""
    targets = list(layers) if layers is not None else lin.unit_layers
    tnodes = {lin.node_of(t).name: t for t in targets}
    C, H, W = lin.image_shape
    chans = torch.arange(C) if channels is None else torch.as_tensor(list(channels), dtype=torch.long)
    nc = chans.numel()
    plan = lin.plan(list(tnodes), schedule=schedule)
    sched = plan["period"]
    if check_memory:
        est = plan["peak_bytes"] * nc / C
        if est > lin.memory_budget:
            raise ValueError(
                f"linearisation sweep needs ~{gib(est)} (compressed Jacobians of the layers up to "
                f"{targets[-1]!r}) > memory_budget={gib(lin.memory_budget)}; raise memory_budget, or "
                f"process fewer image channels at a time (channels=[...]), or use the reverse mode "
                f"(Linearisation.vjp) for a few units"
            )
    # the identity batch needs no receptive fields: every window is the whole image
    return _run(lin, tnodes, chans, sched, bias, None if plan["schedule"] == "identity" else lin.net.geometry())


def _run(lin: "Linearisation", tnodes: dict[str, str], chans: torch.Tensor, sched: dict, bias: bool,
         geom: dict | None) -> Iterator[LayerJacobian]:
    nodes = [n for n in lin.net.nodes if n.name in sched]
    _, H, W = lin.image_shape
    dev = lin.x.device
    nc = chans.numel()
    last = {j: i for i, n in enumerate(nodes) for j in n.inputs}
    pos = {n.name: k for k, n in enumerate(nodes)}
    consumers: dict[str, list[str]] = {}
    for n in nodes:
        for j in n.inputs:
            consumers.setdefault(j, []).append(n.name)
    states: dict[str, State] = {}
    for i, n in enumerate(nodes):
        Pn = sched[n.name]
        if not n.inputs:
            st = input_state(tuple(n.out_shape), lin.image_shape, chans, Pn, lin.dtype, dev)
        else:
            ins = [states[j] for j in n.inputs]
            Tis = [recolour(s.Ti, nc, s.P, Pn, geom[j]) if s.P != Pn else s.Ti for s, j in zip(ins, n.inputs)]
            for j, s, T in zip(n.inputs, ins, Tis):
                if s.P != Pn and last[j] > i and all(
                        sched[c][0] >= Pn[0] and sched[c][1] >= Pn[1] for c in consumers[j] if pos[c] > i):
                    # every later consumer (a residual skip) reads j at a period >= Pn: keep
                    # the recoloured state instead, so the same gather is never done twice
                    states[j] = State(T, Pn, s.Tb, s.cols)
            st = step(lin.node_operator(n.name), len(n.inputs), n.reads_bias, Tis, ins, Pn, lin.net.n_bias, bias)
        states[n.name] = st
        if n.name in tnodes:
            U = int(np.prod(n.out_shape))
            g = geom[n.name] if geom is not None else full_window(U, H, W)
            yield LayerJacobian(
                name=tnodes[n.name], out_shape=tuple(n.out_shape), image_shape=lin.image_shape,
                n_bias=lin.net.n_bias, channels=chans, P=st.P, ry=g.ry, rx=g.rx, oy=g.oy, ox=g.ox,
                T=st.Ti, B=st.Tb, cols=st.cols, geom=g,
            )
        for j in n.inputs:
            if last[j] == i:
                states.pop(j, None)
