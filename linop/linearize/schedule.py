r"""The period schedule and the memory plan of a compressed-window sweep.

Every node of a sweep carries its image tangents compressed with a period ``P`` that covers
its windows (``P >= r``, lossless) and its inputs' periods (recolouring only raises it).
Which period each node gets is a *schedule*:

* ``"lazy"`` — the smallest such period everywhere (a raise before every node whose windows
  grow);
* ``"identity"`` — ``P = (H, W)`` everywhere: the dense identity batch of seed 000
  Algorithm 1 (``C·H·W`` tangents from the input on), the paper's baseline;
* ``"auto"`` — a dynamic programme over a cost model (below) that may skip intermediate
  raises or switch to the identity layout where the gathers would cost more than the extra
  tangents.

All give the same Jacobian; they differ in speed and memory only.  The cost figure of a node
is its own (:meth:`linop.network.Node.tangent_cost`: structural non-zeros of a linear node,
units of an elementwise one).
"""
from __future__ import annotations

from typing import Any, Sequence

import numpy as np

from ..network.geometry import Window
from ..network.node import Node

__all__ = ["SCHEDULES", "COST_GATHER", "COST_ELEMENTWISE", "PLAN_RESERVE", "periods", "memory_plan", "recolour_walk",
           "conv_workspace"]

SCHEDULES = ("auto", "lazy", "identity")

# cost model of the period schedule, relative to one multiply-add of a convolution.
# Micro-benchmarks on a 2-core CPU (VGG7 / ResNet20 tangent batches) give ~150 MACs per
# gathered element and ~60 per elementwise op; timing whole sweeps under several constant
# pairs put the optimum (flat within ~5%) near 300 / 100, which we use.
COST_GATHER = 300.0
COST_ELEMENTWISE = 100.0

Period = tuple[int, int]

#: share of ``memory_budget`` the sweep's plan leaves unplanned: what :func:`memory_plan` does
#: not count — the allocator's fragmentation between chunk-sized blocks (glibc keeps blocks below
#: its mmap threshold in the heap), the linearisation's local operators, the network's geometry,
#: the import-time and first-call state of torch — up to ~9 % of a 1 GiB budget on ResNet20 float64
#: (``python -m bench.memory``)
PLAN_RESERVE = 0.10


def periods(nodes: Sequence[Node], targets: Sequence[str], geom: dict[str, Window] | None,
            image: tuple[int, int, int], schedule: str = "auto") -> dict[str, Period]:
    """Compression period of every node in ``nodes`` (the needed ones, in topological order).

    ``"auto"``: a dynamic programme over the nodes in topological order (periods
    non-decreasing along it) chooses, among the window sizes of the nodes and the full image,
    the schedule of least estimated cost: tangents × the node's cost figure, plus tangents ×
    units for the densification of targets, plus new elements for every recolour (gather).
    Inputs other than the previous node (residual skips) are costed with the previous round's
    periods; a few rounds, and the lazy schedule, are compared on the full model, and a final
    pass lowers nodes (e.g. a ResNet shortcut) where the model prefers their consumers to
    recolour.  Cached on the first node's window (x-independent).  ``"identity"`` needs no
    geometry.
    """
    if schedule not in SCHEDULES:
        raise ValueError(f"schedule must be one of {SCHEDULES}, got {schedule!r}")
    if schedule == "identity":  # needs no geometry (``geom`` may be None)
        return {n.name: tuple(image[1:]) for n in nodes}  # type: ignore[misc]
    key = ("periods", tuple(n.name for n in nodes), tuple(targets), schedule, COST_GATHER, COST_ELEMENTWISE)
    cache = geom[nodes[0].name].cache
    hit = cache.get(key)
    if hit is None:
        _, H, W = image
        hit = _lazy(nodes, geom)
        if schedule == "auto":
            hit = _cheapest(nodes, set(targets), geom, (H, W), hit)
        cache[key] = hit
    return hit


def _lazy(nodes: Sequence[Node], geom: dict[str, Window]) -> dict[str, Period]:
    out: dict[str, Period] = {}
    for n in nodes:
        g = geom[n.name]
        out[n.name] = (max([out[i][0] for i in n.inputs] + [g.ry]), max([out[i][1] for i in n.inputs] + [g.rx]))
    return out


class _Cost:
    """The cost model of one sweep (see :func:`periods`)."""

    def __init__(self, nodes: Sequence[Node], targets: set[str]):
        self.nodes = nodes
        self.size = {n.name: int(np.prod(n.out_shape)) for n in nodes}
        self.per_t = {n.name: n.tangent_cost(COST_ELEMENTWISE)
                      + (COST_ELEMENTWISE * self.size[n.name] if n.name in targets else 0.0)  # densify
                      for n in nodes if n.inputs}

    def total(self, assign: dict[str, Period]) -> float:
        tot = 0.0
        for n in self.nodes:
            if not n.inputs:
                continue
            q = assign[n.name]
            tot += q[0] * q[1] * self.per_t[n.name]
            tot += sum(COST_GATHER * q[0] * q[1] * self.size[i] for i in n.inputs if assign[i] != q)
        return tot


def _cheapest(nodes: Sequence[Node], targets: set[str], geom: dict[str, Window], full: Period,
              lazy: dict[str, Period]) -> dict[str, Period]:
    model = _Cost(nodes, targets)
    cand = sorted({(geom[n.name].ry, geom[n.name].rx) for n in nodes if n.inputs} | {full})
    order = [n for n in nodes if n.inputs]
    best_assign, best_cost = lazy, model.total(lazy)
    prev = lazy
    for _round in range(3):
        assign = _dp_round(order, nodes, geom, cand, model, prev)
        c = model.total(assign)
        if c < best_cost:
            best_assign, best_cost = assign, c
        if assign == prev:
            break
        prev = assign
    # local improvement: the order-monotone programme may hold a side branch (e.g. a ResNet
    # shortcut before its subsampling) at the main branch's period; lower a node to the least
    # period its windows and inputs allow where the model says so — its consumers then
    # recolour the (often smaller) output instead
    assign = dict(best_assign)
    for n in order:
        g = geom[n.name]
        low = (max([g.ry] + [assign[i][0] for i in n.inputs]), max([g.rx] + [assign[i][1] for i in n.inputs]))
        if low != assign[n.name]:
            trial = dict(assign)
            trial[n.name] = low
            c = model.total(trial)
            if c < best_cost:
                assign, best_cost = trial, c
    return {n.name: assign[n.name] for n in nodes}


def _dp_round(order: Sequence[Node], nodes: Sequence[Node], geom: dict[str, Window], cand: list[Period],
              model: _Cost, prev_assign: dict[str, Period]) -> dict[str, Period]:
    """One round of the order-monotone programme; skip inputs costed at ``prev_assign``."""
    K = len(cand)
    INF = float("inf")
    best = [INF] * K
    back: list[list[int]] = []
    prev_name = None
    for n in order:
        g = geom[n.name]
        new, bk = [INF] * K, [0] * K
        for k, q in enumerate(cand):
            if q[0] < g.ry or q[1] < g.rx:
                continue
            nt = q[0] * q[1]
            base = nt * model.per_t[n.name] + sum(COST_GATHER * nt * model.size[i] for i in n.inputs
                                                  if i != prev_name and prev_assign[i] != q)
            if prev_name is None:
                new[k] = base
                continue
            lin_in = prev_name in n.inputs
            for j in range(K):
                if best[j] == INF or cand[j][0] > q[0] or cand[j][1] > q[1]:
                    continue
                c = best[j] + base + (COST_GATHER * nt * model.size[prev_name] if lin_in and j != k else 0.0)
                if c < new[k]:
                    new[k], bk[k] = c, j
        best, prev_name = new, n.name
        back.append(bk)
    k = int(np.argmin(best))
    assign: dict[str, Period] = {}
    for n, bk in zip(reversed(order), reversed(back)):
        assign[n.name] = cand[k]
        k = bk[k]
    for n in nodes:
        if not n.inputs:
            assign[n.name] = (geom[n.name].ry, geom[n.name].rx)
    # repair: a node's period must cover its inputs' (monotone along the order covers it)
    for n in order:
        q = assign[n.name]
        assign[n.name] = (max([q[0]] + [assign[i][0] for i in n.inputs]), max([q[1]] + [assign[i][1] for i in n.inputs]))
    return assign


def recolour_walk(nodes: Sequence[Node], period: dict[str, Period]) -> list[list[tuple[str, Period, bool]]]:
    """Per node (in order), per input ``j``: ``(j, period of j's state when the node runs, keep)``.

    Before a node whose period ``Pn`` exceeds an input's, the input is recoloured; ``keep``: the
    recoloured state replaces the input's for its later consumers (every later consumer — a
    residual skip — reads ``j`` at a period ``>= Pn``), so the same gather is never done twice.
    The one rule the sweep (:mod:`linop.linearize.sweep`) and the memory plan both follow."""
    pos = {n.name: k for k, n in enumerate(nodes)}
    last = {j: i for i, n in enumerate(nodes) for j in n.inputs}
    consumers: dict[str, list[str]] = {}
    for n in nodes:
        for j in n.inputs:
            consumers.setdefault(j, []).append(n.name)
    cur = {n.name: period[n.name] for n in nodes}
    out: list[list[tuple[str, Period, bool]]] = []
    for i, n in enumerate(nodes):
        Pn = period[n.name]
        row = []
        for j in n.inputs:
            Pj = cur[j]
            keep = Pj != Pn and last[j] > i and all(
                period[c][0] >= Pn[0] and period[c][1] >= Pn[1] for c in consumers[j] if pos[c] > i)
            row.append((j, Pj, keep))
        for j, Pj, keep in row:
            if keep:
                cur[j] = Pn
        out.append(row)
    return out


def conv_workspace(op: Any, itemsize: int) -> int:
    """Elements per tangent of the workspace ``op``'s own torch path allocates in the sweep,
    beyond its input and output: the operator's :meth:`~linop.operators.base.Operator.sweep_workspace`
    for the sweep's layout (:data:`linop.linearize.tangents.CHANNELS_LAST`); 0 without an
    operator.  (A convolution's column buffers / GEMM workspace; no operator type is tested here.)"""
    from . import tangents

    ws = getattr(op, "sweep_workspace", None)
    return 0 if ws is None else int(ws(itemsize, bool(tangents.CHANNELS_LAST)))


def memory_plan(nodes: Sequence[Node], period: dict[str, Period], new_cols: dict[str, np.ndarray], n_bias: int,
                channels: int, itemsize: int, budget: int | None = None, targets: Sequence[str] = (),
                ops: dict[str, Any] | None = None) -> dict[str, Any]:
    r"""Peak memory (bytes) of a sweep with the given periods, and the chunk sizes that bound it.

    A node's *state* is its tangent batch, ``R_n = channels·P_y·P_x + b_n`` rows of
    ``O_n = prod(out_shape)`` entries (``b_n``: the bias columns that reach it in this pass, from
    ``new_cols`` — per bias-reading node, the columns of ``x_b`` whose tangents start there).
    States live until their last consumer has run.  While node ``n`` runs, alive are

    * ``L_n``: every live state (its inputs included),
    * its output state ``R_n·O_n`` (preallocated; the chunks are written into it),
    * the full recoloured image part of an input kept at the new period (``keep`` of
      :func:`recolour_walk`: ``channels·P_n·O_j``; it replaces the input's afterwards),

    and the temporaries of one chunk of ``k`` tangents, ``k·t_n`` entries with

    .. math:: t_n = \sum_j O_j\,[\text{recoloured / expanded input rows}]
                   + 2\,O_n\,[\text{the chunk's result, a second term of a sum}]
                   + \sum_j O_j + O_n\,[\text{layout / padding copies}]
                   + w_n,

    ``w_n`` the convolution's own workspace per tangent (:func:`conv_workspace`: the im2col
    columns, ``k_h·k_w·C_in·H_out·W_out``, of torch's non-oneDNN CPU convolution — a factor
    ``k_h·k_w`` on the input, 9 for a 3×3 conv, the largest single term of a float64 sweep).
    A recoloured input adds its chunk's gather index and mask, ``9·S_j`` bytes per tangent
    (``S_j`` the spatial positions).  At a target node,
    :meth:`LayerJacobian.dot <linop.linearize.LayerJacobian.dot>` adds a product of ``k·O_n``
    entries per chunk and, below the full period, the gathered image pixels (``channels·P_n·S_n``
    entries).  Throughout, the x-independent index caches that the geometry keeps (the recolour
    index ``P_n·S_j`` of every raise and dot's pixel index ``P_n·S_n`` of every target below the
    full period, int64) count as live.  With a ``budget`` the chunk is the largest ``k``
    (at most ``R_n``) with ``L_n + R_n·O_n + keep + k·t_n <= budget``; without one, or when every
    row fits, ``k = R_n`` (one chunk, no copy).  ``fits`` is False when even ``k = 1`` exceeds
    the budget (the states alone do not fit: fewer channels / bias columns per pass).

    The fused evaluation strategies only lower what this counts: a recolour or residual sum
    written straight into its chunk's slot of the state makes no result temporary, a slope of
    in place makes no new state
    (:func:`linop.linearize.tangents.step_in_place`), ``dot``'s batched GEMM no product.

    Returns ``{"period", "n_bias_cols", "state_bytes", "rows", "chunk", "node_peak", "peak_bytes",
    "fits"}`` (per node: periods, bias columns, state bytes, tangents ``R_n``, chunk ``k``, the
    planned bytes while it runs).
    """
    item = itemsize
    cols: dict[str, np.ndarray] = {}
    size: dict[str, int] = {}
    rows: dict[str, int] = {}
    outn = {n.name: int(np.prod(n.out_shape)) for n in nodes}
    empty = np.zeros(0, dtype=np.int64)
    for n in nodes:
        c = empty
        for i in n.inputs:
            c = np.union1d(c, cols[i])
        c = np.union1d(c, new_cols.get(n.name, empty))
        cols[n.name] = c
        P = period[n.name]
        rows[n.name] = channels * P[0] * P[1] + c.size
        size[n.name] = rows[n.name] * outn[n.name] * item
    walk = recolour_walk(nodes, period)
    last = {j: i for i, n in enumerate(nodes) for j in n.inputs}
    tset = set(targets)
    spatial = {n.name: (int(n.out_shape[1]) * int(n.out_shape[2]) if len(n.out_shape) == 3 else outn[n.name])
               for n in nodes}
    # x-independent index caches kept on the geometry (they outlive the sweep): the recolour
    # index (P_n², S_j) of every raise, and dot's (P², S) pixel index of every target below full size
    cache = sum(period[n.name][0] * period[n.name][1] * spatial[j] * 8
                for i, n in enumerate(nodes) for j, Pj, _ in walk[i] if Pj != period[n.name])
    full = max(period.values())
    cache += sum(period[t][0] * period[t][1] * spatial[t] * 8 for t in tset if t in period and period[t] != full)
    live = cache
    alive: dict[str, int] = {}
    live, peak, fits = 0, 0, True
    chunk: dict[str, int] = {}
    node_peak: dict[str, int] = {}
    for i, n in enumerate(nodes):
        P = period[n.name]
        O = outn[n.name]
        R = rows[n.name]
        if not n.inputs:  # the input state: built dense, then laid out (two copies at once)
            fixed, t = live + 2 * size[n.name], 0
        else:
            keep = sum(channels * P[0] * P[1] * outn[j] * item for j, Pj, kp in walk[i] if kp)
            ins = sum(outn[j] for j in n.inputs)
            ws = conv_workspace(ops.get(n.name) if ops else getattr(n, "op", None), item)
            t = (2 * ins + 3 * O + ws + (O if n.name in tset else 0)) * item
            t += sum(9 * spatial[j] for j, Pj, _ in walk[i] if Pj != P)  # a chunk's gather index and mask
            fixed = live + size[n.name] + keep
            if n.name in tset and P != full:  # dot's gathered image pixels, (channels·P², S)
                fixed += channels * P[0] * P[1] * spatial[n.name] * item
        k = R
        if budget is not None and t and fixed + R * t > budget:
            k = int((budget - fixed) // t)
            if k < 1:
                k, fits = 1, False
        chunk[n.name] = max(1, min(k, R)) if n.inputs else rows[n.name]
        node_peak[n.name] = int(fixed + chunk[n.name] * t)
        peak = max(peak, node_peak[n.name])
        for j, Pj, kp in walk[i]:  # a kept recoloured input replaces the input's state
            if kp:
                alive[j] = (channels * P[0] * P[1] + cols[j].size) * outn[j] * item
        alive[n.name] = size[n.name]
        for j in n.inputs:
            if last.get(j) == i:
                alive.pop(j, None)
        live = cache + sum(alive.values())
    return {"period": dict(period), "n_bias_cols": {k: int(v.size) for k, v in cols.items()}, "state_bytes": size,
            "rows": rows, "chunk": chunk, "node_peak": node_peak, "peak_bytes": int(peak), "fits": fits}
