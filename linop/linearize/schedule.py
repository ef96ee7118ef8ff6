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

__all__ = ["SCHEDULES", "COST_GATHER", "COST_ELEMENTWISE", "periods", "memory_plan"]

SCHEDULES = ("auto", "lazy", "identity")

# cost model of the period schedule, relative to one multiply-add of a convolution.
# Micro-benchmarks on a 2-core CPU (VGG7 / ResNet20 tangent batches) give ~150 MACs per
# gathered element and ~60 per elementwise op; timing whole sweeps under several constant
# pairs put the optimum (flat within ~5%) near 300 / 100, which we use.
COST_GATHER = 300.0
COST_ELEMENTWISE = 100.0

Period = tuple[int, int]


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


def memory_plan(nodes: Sequence[Node], period: dict[str, Period], new_bias: dict[str, int], n_bias: int,
                channels: int, itemsize: int) -> dict[str, Any]:
    """Peak memory (bytes) of a sweep with the given periods: states live until their last
    consumer has run, and recoloured inputs are temporaries of the recoloured size.

    ``new_bias``: per node, the number of bias columns whose tangents start there."""
    nb: dict[str, int] = {}
    size: dict[str, int] = {}
    for n in nodes:
        nb[n.name] = min(sum(nb[i] for i in n.inputs) + new_bias.get(n.name, 0), n_bias)
        P = period[n.name]
        size[n.name] = (channels * P[0] * P[1] + nb[n.name]) * int(np.prod(n.out_shape)) * itemsize
    last = {j: i for i, n in enumerate(nodes) for j in n.inputs}
    live, peak = 0, 0
    alive: dict[str, int] = {}
    for i, n in enumerate(nodes):
        P = period[n.name]
        tmp = sum(size[j] * max(1, (P[0] * P[1]) // max(1, period[j][0] * period[j][1])) for j in n.inputs
                  if period[j] != P)
        live += size[n.name]
        alive[n.name] = size[n.name]
        peak = max(peak, live + tmp)
        for j in n.inputs:
            if last.get(j) == i and j in alive:
                live -= alive.pop(j)
    return {"period": dict(period), "n_bias_cols": nb, "state_bytes": size, "peak_bytes": peak}
