r"""The compressed-window forward sweep: the fast evaluation of a linearisation's Jacobians.

One forward pass of compressed tangents (:mod:`linop.linearize.tangents`) through the
linearised network evaluates the rows of ``lin.operator(layer)`` for every unit of many
layers at once: ``C·P_y·P_x`` image tangents instead of the ``C·H·W`` of the identity batch
(75 instead of 3,072 at VGG7's Conv1).  Every node's step applies the node's own local
operator; before a node whose period exceeds its input's, the input is *recoloured* (one
exact gather with an x-independent, cached index); a recoloured residual input is kept for its
later consumers, so no gather is repeated.

Fused strategies (each tested equal to the plain step, ``tests/test_sweep_fused.py``): recolours
write into the chunk's slot of the preallocated state, and so does every operator that can
(:meth:`Operator.apply_parts <linop.operators.base.Operator.apply_parts>` with ``out``: a residual
sum adds into it, a slope multiplies in the batch's layout); an operator with an in-place form
(:meth:`Operator.apply_ <linop.operators.base.Operator.apply_>`: a slope) whose input batches
nothing else reads (no other live state; no Jacobian handed to the caller, unless the sweep is
``transient`` — the verification's: each Jacobian is contracted before the next node runs)
overwrites them.  The engine asks the operators, never tests their types: a user's operator gets
these paths by implementing the protocol.

Memory: the plan (:func:`linop.linearize.schedule.memory_plan`) sizes, per node, the chunk of
tangents its step evaluates at a time (the operator's own torch path on row slices, written into
the preallocated output state), so that the live states plus one chunk's temporaries stay within
``memory_budget``; a sweep refuses only when the states alone do not fit (then pass fewer image
channels or bias columns: :func:`linop.hypersurface.verification_passes` does).
"""
from __future__ import annotations

import ctypes
from typing import TYPE_CHECKING, Callable, Iterator, Sequence

import numpy as np
import torch

from ..network.geometry import full_window
from ..utils import gib
from .layer_jacobian import LayerJacobian
from .schedule import PLAN_RESERVE, recolour_walk
from .tangents import State, input_state, recolour, step, step_in_place

if TYPE_CHECKING:  # pragma: no cover
    from .linearisation import Linearisation

__all__ = ["sweep"]

_NONE = np.zeros(0, dtype=np.int64)  # no bias column starts at the node in this pass


def _malloc_trim() -> Callable[[], None]:
    """glibc's ``malloc_trim(0)``, or a no-op elsewhere."""
    try:
        f = ctypes.CDLL(None).malloc_trim
    except (OSError, AttributeError):  # not glibc
        return lambda: None
    f.argtypes = [ctypes.c_size_t]
    return lambda: f(0)


#: hands the allocator's free pages back to the system.  glibc keeps freed blocks below its mmap
#: threshold (dynamic, up to 32 MiB) in the heap, where fragmentation lets the RSS climb above the
#: live tangents; when the memory budget binds (some node is chunked), the sweep calls this after
#: every node that freed a state, so the RSS follows the memory plan.
release_memory = _malloc_trim()

#: whether a sweep whose budget binds trims the heap after freeing a state (see
#: :func:`trim_when_tight`); a process that chose to keep its heap (``linop.studies.heap``) turns it off
TRIM_WHEN_TIGHT = True


def trim_when_tight(enabled: bool) -> None:
    """Turn the heap trimming of budget-bound sweeps on or off for this process.  Off, the live
    tangents are still bounded by the plan, but freed pages stay in the process (its resident
    size is then the heap's high-water mark) and are reused without page faults."""
    global TRIM_WHEN_TIGHT
    TRIM_WHEN_TIGHT = bool(enabled)


def sweep(lin: "Linearisation", layers: Sequence[str] | None = None, channels: Sequence[int] | None = None,
          bias: bool = True, check_memory: bool = True, schedule: str = "auto",
          bias_cols: Sequence[int] | None = None, transient: bool = False) -> Iterator[LayerJacobian]:
    """See :meth:`Linearisation.sweep`."""
    targets = list(layers) if layers is not None else lin.unit_layers
    tnodes = {lin.node_of(t).name: t for t in targets}
    C, H, W = lin.image_shape
    chans = torch.arange(C) if channels is None else torch.as_tensor(list(channels), dtype=torch.long).reshape(-1)
    plan = lin.plan(list(tnodes), schedule=schedule, channels=chans.tolist(), bias=bias, bias_cols=bias_cols)
    if check_memory and not plan["fits"]:
        raise ValueError(
            f"linearisation sweep needs ~{gib(plan['peak_bytes'] / (1.0 - PLAN_RESERVE))} (the compressed Jacobians "
            f"of the layers up to {targets[-1]!r} for {chans.numel()} image channel(s) and {plan['n_bias']} bias "
            f"column(s), evaluated one tangent at a time, and a {PLAN_RESERVE:.0%} reserve) > "
            f"memory_budget={gib(lin.memory_budget)}; raise memory_budget, or "
            f"process fewer image channels / bias columns at a time (channels=[...], bias_cols=[...]; "
            f"linop.hypersurface.reconstructed_activations does so itself), or use the reverse mode "
            f"(Linearisation.vjp) for a few units"
        )
    # the identity batch needs no receptive fields: every window is the whole image
    return _run(lin, tnodes, chans, plan, None if plan["schedule"] == "identity" else lin.net.geometry(),
                bool(transient))


def _storages(st: State) -> set[int]:
    """Addresses of the memory behind a state's batches (empty batches own none)."""
    return {T.untyped_storage().data_ptr() for T in (st.Ti, st.Tb) if T.numel()}


def _in_place(lin: "Linearisation", n, i: int, Pn, states: dict[str, State], last: dict[str, int],
              yielded: set[int]) -> State | None:
    """The node's step evaluated in place on its only input's batches
    (:func:`~linop.linearize.tangents.step_in_place`) when nothing else reads them afterwards: the
    input's last consumer, at the input's period, its batches shared with no other live state
    (an identity step passes its input's batches on) and with no Jacobian handed to the caller
    (unless the sweep is ``transient``: ``yielded`` is then empty); else None."""
    if len(n.inputs) != 1 or n.reads_bias:
        return None
    j = n.inputs[0]
    s = states[j]
    if last[j] != i or s.P != Pn:
        return None
    mine = _storages(s)
    if mine & yielded or any(mine & _storages(t) for k, t in states.items() if k != j):
        return None
    return step_in_place(lin.node_operator(n.name), s)


def _run(lin: "Linearisation", tnodes: dict[str, str], chans: torch.Tensor, plan: dict,
         geom: dict | None, transient: bool = False) -> Iterator[LayerJacobian]:
    sched = plan["period"]
    chunk = plan["chunk"]
    new_cols = plan["new_cols"]
    nodes = [n for n in lin.net.nodes if n.name in sched]
    _, H, W = lin.image_shape
    dev = lin.x.device
    nc = chans.numel()
    last = {j: i for i, n in enumerate(nodes) for j in n.inputs}
    walk = recolour_walk(nodes, sched)
    tight = any(plan["chunk"][k] < plan["rows"][k] for k in plan["rows"])  # the budget binds
    states: dict[str, State] = {}
    yielded: set[int] = set()  # storages of the batches handed to the caller
    for i, n in enumerate(nodes):
        Pn = sched[n.name]
        if not n.inputs:
            st = input_state(tuple(n.out_shape), lin.image_shape, chans, Pn, lin.dtype, dev)
        else:
            for j, Pj, keep in walk[i]:
                if keep:  # every later consumer reads j at a period >= Pn: recolour j once, for all
                    s = states[j]
                    states[j] = State(recolour(s.Ti, nc, s.P, Pn, geom[j], chunk[n.name]), Pn, s.Tb, s.cols)
                    del s  # the state at the old period is no longer read: free it now
            st = _in_place(lin, n, i, Pn, states, last, yielded)
            if st is None:
                ins = [states[j] for j in n.inputs]
                geoms = [geom[j] if geom is not None else None for j in n.inputs]
                st = step(lin.node_operator(n.name), len(n.inputs), n.reads_bias, ins, Pn, lin.net.n_bias,
                          tuple(n.out_shape), nc, geoms, bias=True, chunk=chunk[n.name],
                          new_cols=new_cols.get(n.name, _NONE))
                del ins
        states[n.name] = st
        if n.name in tnodes:
            if not transient:  # the caller may keep this Jacobian: its batches are never overwritten
                yielded |= _storages(st)
            U = int(np.prod(n.out_shape))
            g = geom[n.name] if geom is not None else full_window(U, H, W)
            yield LayerJacobian(
                name=tnodes[n.name], out_shape=tuple(n.out_shape), image_shape=lin.image_shape,
                n_bias=lin.net.n_bias, channels=chans, P=st.P, ry=g.ry, rx=g.rx, oy=g.oy, ox=g.ox,
                T=st.Ti, B=st.Tb, cols=st.cols, geom=g, chunk=chunk[n.name],
            )
        freed = False
        for j in n.inputs:
            if last[j] == i:
                freed = states.pop(j, None) is not None or freed
        del st
        if tight and freed and TRIM_WHEN_TIGHT:
            release_memory()
