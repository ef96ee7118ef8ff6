"""End-to-end feature reconstruction from labels (seed 001 §3, the reverse pass).

Seed 001 reconstructs intermediate feature maps from a label, backwards through a trained
network, greedily, layer by layer (§3: "each reconstruction step from z*_{l+1} and
parameters at the l-th layer pursues the 'best' a*_l without considering other feature
maps"):

1. forward pass, keeping every node's value ``â`` (``EquivalentNetwork.run``);
2. optimal embedding of the label into the output space, ``z*_L = embed(â_L, y)`` — NE (L2,
   Algorithm 1), MA (L1, Eq. 22) or the one-hot code of the ablation (§4.2);
3. walk the equivalent network backwards, node by node, down to ``to_layer``:

   ==================  ======================================================================
   node                reverse step
   ==================  ======================================================================
   LinearNode          minimum-norm correction ``a* = â + W⁺(z* − W â)`` (:func:`linop.solvers.solve`):
                       MDP (Eqs. 4–6) for full row rank, CCP (Eq. 7) for full column rank.
                       Matrices with one non-zero per row and column (flatten, channel pad,
                       subsample, scale) use the closed form of :func:`steps.structural_step`;
                       average pooling with stride = kernel is copied back (§3.4(b)) unless
                       ``avgpool="exact"``.
   BiasNode            ``c* = z* − R b``.
   ActivationNode      inverse activation (§3.4(a)), :func:`steps.inverse_activation`.
   MaxPoolNode         copy back (§3.4(b)), :func:`steps.unpool_max`.
   AddNode             the MDP split ``a_i* = â_i + (z* − ẑ)/k`` (closest inputs whose sum is z*).
   CatNode             split by channels.
   ==================  ======================================================================

When a node feeds several consumers on the path (residual networks) it receives several
targets; ``fanout="mean"`` averages them (the least-squares consensus), the default refuses.

**When is it exact?**  Running the network forward from ``a*_{to_layer}`` reproduces the
embedded target ``z*_L`` exactly (to rounding) when every step is: linear steps in the MDP
case (full row rank: the constraint ``W a* = z*`` holds), invertible activations
(LeakyReLU/PReLU with slope > 0; tanh/sigmoid while no entry needed clipping; not ReLU when
a* has negative entries), pooling reversed by copying (or "nearest").  A CCP step (the layer
expands) only matches its target in least squares; a clipped tanh unit or ReLU of a
negative a* breaks the chain there.  Every step's consistency ``||f(a*_in) − z*|| / ||z*||``
is reported, so a user sees exactly where the chain is not exact.

**Exactness convention** (``keep_unchanged=True``): a target equal to its forward value
(per sample for linear layers, per entry for elementwise layers, per window for pooling)
passes the forward input back bit for bit — zero deviation and exact feasibility, so it *is*
the MDP answer.  Samples whose label is already the maximum then give ``a* = â`` at every
layer.

**Paper mode** (``paper=True``): seed 001's method where ours departs from it — pooling
windows are copied back everywhere (``pool_rule="copy"``, §3.4(b)), so a* moves even for a
sample whose label was already the maximum; every stride-1 unpadded conv is solved by the
§3.2 FFT path (``method="fft"``, approximate: boundary frozen at â) and the other linear
steps choose MDP / CCP by the paper's channel / width rule instead of W's rank; the paper's
formulas run on every sample (``keep_unchanged=False``).  ``Reconstruction.mode`` and every
summary say which mode produced the numbers.

``to_layer`` (where the walk stops):

* ``"input"`` — the network input (which may itself be a feature map: an upper part of a
  network converted from layer ``l_R`` on, the FR-PT setting of seed 001 §4);
* a node name — that node's output;
* a unit-layer name ``U`` (``"Conv1"``, ``"FC0"``…) or ``"U:in"`` — the feature ``a_l`` that
  layer U's weights act on (``z_{l+1} = W_l a_l + b_l`` in seed 001's notation), i.e. the
  input of U's LinearNode;
* ``"U:out"`` — the output of layer U's block (after its bias, activation and pooling): the
  input of the next unit layer, or the network output for the last one.
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Any, Iterable

import numpy as np
import torch

from . import steps as inverse
from .. import validate
from .embed import EMBEDDINGS, embed
from ..solvers import METHODS as SOLVE_METHODS
from ..network.graph import EquivalentNetwork
from ..utils import gib
from ..network.reverse import MODES, POOL_RULES, ReverseOptions, StepReport, relative_misfit

__all__ = [
    "EMBEDDINGS",
    "MODES",
    "POOL_RULES",
    "StepReport",
    "Reconstruction",
    "reconstruct",
    "resolve_to_layer",
]

FANOUT = ("error", "mean")
#: Refuse a reconstruction whose kept tensors (a* and â of every kept node) exceed this.
DEFAULT_MAX_BYTES = 4 * 2**30


# ----------------------------------------------------------------------------- results
@dataclass
class Reconstruction:
    """Result of :func:`reconstruct`.

    Attributes
    ----------
    to_layer : name of the node the walk stopped at; ``a_star`` is its reconstruction.
    output : name of the network output node (holds the embedded target ``z*_L``).
    features : node name -> reconstructed ``a*`` (N, *shape), every node passed.
    forward : node name -> forward ``â`` (same nodes).
    deviation : node name -> {"abs": ||a* − â|| (N,), "rel": ||a* − â|| / ||â|| (N,),
        "max": max |a* − â| (N,)}.
    steps : the reverse steps, output first.
    labels : the labels y (N,).
    embedding : "ne", "ma" or "onehot".
    mode : "linop" (our exact variants) or "paper" (seed 001's method, ``paper=True``).
    options : the reverse-step options the walk ran with.
    """

    to_layer: str
    output: str
    features: dict[str, torch.Tensor]
    forward: dict[str, torch.Tensor]
    deviation: dict[str, dict[str, np.ndarray]]
    steps: list[StepReport]
    labels: torch.Tensor
    embedding: str
    mode: str = "linop"
    options: ReverseOptions | None = None

    @property
    def a_star(self) -> torch.Tensor:
        return self.features[self.to_layer]

    @property
    def target(self) -> torch.Tensor:
        """The embedded output ``z*_L``."""
        return self.features[self.output]

    def step(self, node: str) -> StepReport:
        for s in self.steps:
            if s.node == node:
                return s
        raise KeyError(f"no reverse step at node {node!r}; steps: {[s.node for s in self.steps]}")

    def summary(self) -> dict:
        """A JSON-able summary: per-node deviation statistics and per-step reports."""
        dev = {
            k: {
                "abs_mean": float(v["abs"].mean()),
                "rel_mean": float(v["rel"].mean()),
                "rel_max": float(v["rel"].max()),
                "max_abs": float(v["max"].max()),
                "shape": list(self.features[k].shape[1:]),
            }
            for k, v in self.deviation.items()
        }
        o = self.options or ReverseOptions()
        return {
            "mode": self.mode,
            "to_layer": self.to_layer,
            "output": self.output,
            "embedding": self.embedding,
            "pool_rule": o.pool_rule,
            "keep_unchanged": o.keep_unchanged,
            "n": int(self.labels.shape[0]),
            "deviation": dev,
            "steps": [s.summary() for s in self.steps],
        }


# ----------------------------------------------------------------------------- helpers
def resolve_to_layer(net: EquivalentNetwork, to_layer: str) -> str:
    """The node name ``to_layer`` refers to (see the module docstring); ValueError if none."""
    if not isinstance(to_layer, str):
        raise ValueError(f"to_layer must be a string, got {to_layer!r}")
    if to_layer == "input":
        return net.nodes[0].name
    names = {n.name for n in net.nodes}
    if to_layer in names:
        return to_layer
    layer, _, side = to_layer.partition(":")
    units = net.unit_layers
    if layer in units and side in ("", "in", "out"):
        lin = net.unit_node(layer)
        if side in ("", "in"):
            return lin.inputs[0]
        nxt = units.index(layer) + 1
        return net.unit_node(units[nxt]).inputs[0] if nxt < len(units) else net.output
    raise ValueError(
        f"to_layer {to_layer!r} is neither 'input', a node name nor a unit layer "
        f"('U', 'U:in', 'U:out' with U in {units}); nodes: {sorted(names)}"
    )


def _ancestors(net: EquivalentNetwork, name: str) -> set[str]:
    seen, stack = {name}, [name]
    while stack:
        for i in net.node(stack.pop()).inputs:
            if i not in seen:
                seen.add(i)
                stack.append(i)
    return seen


def _descendants(net: EquivalentNetwork, name: str) -> set[str]:
    seen = {name}
    for n in net.nodes:  # topological order
        if any(i in seen for i in n.inputs):
            seen.add(n.name)
    return seen


def _flat_norm(t: torch.Tensor) -> torch.Tensor:
    return torch.linalg.vector_norm(t.reshape(t.shape[0], -1), dim=1)


_rel = relative_misfit


def _labels(y: Any, N: int, n_classes: int, device) -> torch.Tensor:
    return validate.labels(y, N, n_classes, "y").to(device)


# ----------------------------------------------------------------------------- the pass
@dataclass
class _Plan:
    """What the walk visits: the nodes between ``target`` and the output, in topological order."""

    target: str
    output: str
    order: list  # nodes on the path, topological
    on_path: set[str]
    kept: set[str]  # nodes whose a* / â are returned
    need: set[str]  # nodes whose forward value the walk reads


def _check_options(net: Any, embedding: str, solver: str, tol: Any, maxiter: Any, maxpool: str, avgpool: str,
                   relu: str, fanout: str, clip_margin: Any = inverse.DEFAULT_CLIP_MARGIN) -> None:
    """ValueError naming the argument for every bad option, before any work."""
    if not isinstance(net, EquivalentNetwork):
        raise ValueError(f"net must be an EquivalentNetwork (see linop.from_torch), got {type(net).__name__}")
    for arg, val, allowed in (("embedding", embedding, EMBEDDINGS), ("maxpool", maxpool, inverse.MAXPOOL_MODES),
                              ("avgpool", avgpool, inverse.AVGPOOL_MODES), ("fanout", fanout, FANOUT),
                              ("relu", relu, inverse.RELU_MODES)):
        if val not in allowed:
            raise ValueError(f"{arg} must be one of {allowed}, got {val!r}")
    if not (isinstance(tol, (int, float)) and tol > 0):
        raise ValueError(f"tol must be a positive number, got {tol!r}")
    # checked here, not at the first linear step: a chain without one would accept anything
    if solver not in SOLVE_METHODS:
        raise ValueError(f"solver must be one of {tuple(SOLVE_METHODS)}, got {solver!r}")
    if maxiter is not None and (isinstance(maxiter, bool) or not isinstance(maxiter, (int, np.integer))
                                or maxiter < 1):
        raise ValueError(f"maxiter must be a positive integer or None, got {maxiter!r}")
    # up front, whatever the path: only tanh / sigmoid steps read it (with their own, tighter
    # upper bound), so a NaN / negative margin used to pass silently on ReLU networks
    if isinstance(clip_margin, bool) or not isinstance(clip_margin, (int, float, np.integer, np.floating)) \
            or not 0.0 < float(clip_margin) < 1.0:
        raise ValueError(f"clip_margin must be a number in (0, 1), got {clip_margin!r}")


def _mode_options(paper: Any, pool_rule: Any, keep_unchanged: Any, **kw: Any) -> ReverseOptions:
    """The :class:`ReverseOptions` of linop mode or paper mode; ValueError naming the option that
    contradicts paper mode (the paper's pooling / ReLU rules are fixed), TypeError for a
    non-boolean ``paper`` / ``keep_unchanged``."""
    if not isinstance(paper, (bool, np.bool_)):
        raise TypeError(f"paper must be True or False, got {paper!r}")
    if pool_rule is not None and pool_rule not in POOL_RULES:
        raise ValueError(f"pool_rule must be one of {POOL_RULES} or None, got {pool_rule!r}")
    if keep_unchanged is not None and not isinstance(keep_unchanged, (bool, np.bool_)):
        raise TypeError(f"keep_unchanged must be True, False or None, got {keep_unchanged!r}")
    if paper:
        for arg, want in (("maxpool", "copy"), ("avgpool", "copy"), ("relu", "identity")):
            if kw[arg] != want:
                raise ValueError(f"paper=True uses seed 001's rule {arg}={want!r}; got {arg}={kw[arg]!r} "
                                 f"(drop paper=True to use it)")
    return ReverseOptions(**kw, keep_unchanged=(not paper) if keep_unchanged is None else bool(keep_unchanged),
                          pool_rule=pool_rule or ("copy" if paper else "exact"), paper=bool(paper))


def _plan(net: EquivalentNetwork, to_layer: str, fanout: str, keep: Iterable[str] | None) -> _Plan:
    """The reverse path from the output down to ``to_layer``; refuses branches unless averaged."""
    target = resolve_to_layer(net, to_layer)
    out_name = net.output
    out_node = net.node(out_name)
    if len(out_node.out_shape) != 1:
        raise ValueError(f"the output node {out_name!r} must be a vector of class scores, has shape {out_node.out_shape}")
    ancestors = _ancestors(net, out_name)
    if target not in ancestors:
        raise ValueError(f"to_layer {to_layer!r} (node {target!r}) does not feed the output {out_name!r}")
    on_path = ancestors & _descendants(net, target)
    order = [n for n in net.nodes if n.name in on_path]  # topological
    if fanout == "error":
        for n in order:
            cs = [m.name for m in order if n.name in m.inputs]
            if len(cs) > 1:
                raise NotImplementedError(
                    f"node {n.name!r} feeds {len(cs)} nodes on the reverse path ({cs}); the greedy "
                    f"reverse pass of seed 001 §3 is defined for chains — pass fanout='mean' to "
                    f"average the reconstructed targets, or reconstruct to a layer above the branch"
                )
    kept = on_path if keep is None else set(keep) | {target, out_name}
    unknown = kept - on_path
    if unknown:
        raise ValueError(f"keep names nodes not on the reverse path: {sorted(unknown)}")
    need = set(on_path) | {i for n in order for i in n.inputs}
    return _Plan(target, out_name, order, on_path, set(kept), need)


def _check_memory(net: EquivalentNetwork, plan: _Plan, x: torch.Tensor, max_bytes: int | None) -> None:
    """Refuse a walk whose live tensors (forward values on the path + kept a*) exceed ``max_bytes``."""
    if max_bytes is not None and (isinstance(max_bytes, bool) or not isinstance(max_bytes, (int, np.integer))
                                  or max_bytes <= 0):
        raise ValueError(f"max_bytes must be a positive number of bytes or None, got {max_bytes!r}")
    N = x.shape[0] if x.dim() > len(net.input_shape) else 1
    per_sample = (sum(math.prod(net.node(k).out_shape) for k in plan.need)
                  + sum(math.prod(net.node(k).out_shape) for k in plan.kept)) * x.element_size()
    if max_bytes is not None and N * per_sample > max_bytes:
        raise MemoryError(
            f"reconstruct: the forward values of {len(plan.need)} nodes and a* of {len(plan.kept)} for {N} samples "
            f"need {N * per_sample:,} bytes ({gib(N * per_sample)}) > max_bytes={int(max_bytes):,} bytes; pass "
            f"fewer samples (at most {max_bytes // per_sample}), fewer nodes in keep=, or raise max_bytes"
        )


def _walk(plan: _Plan, fwd: dict, z_L: torch.Tensor, x_b: torch.Tensor, options: ReverseOptions,
          progress: bool) -> tuple[dict[str, torch.Tensor], list[StepReport]]:
    """The greedy reverse pass: each node's ``reverse`` step, output first, down to the target.

    A node's target is the one its consumer produced (the mean of several with
    ``fanout="mean"``); only kept features outlive their step."""
    from tqdm.auto import tqdm

    star: dict[str, torch.Tensor] = {plan.output: z_L}
    pending: dict[str, list[torch.Tensor]] = {}
    steps: list[StepReport] = []
    features: dict[str, torch.Tensor] = {}
    bar = tqdm(total=len(plan.order) - 1, desc="reconstruct", disable=not progress, leave=False)
    for node in reversed(plan.order):
        name = node.name
        if name != plan.output:
            parts = pending.pop(name)
            star[name] = parts[0] if len(parts) == 1 else torch.stack(parts).mean(0)
        if name in plan.kept:
            features[name] = star[name]
        if name == plan.target:
            break
        t0 = time.perf_counter()
        ins, report = node.reverse(star[name], fwd[name], [fwd[i] for i in node.inputs], x_b, options)
        with torch.no_grad():
            again = node.forward(ins, x_b)
        report.consistency = _rel(again - star[name], star[name])
        report.seconds = time.perf_counter() - t0
        steps.append(report)
        for inp, val in zip(node.inputs, ins):
            if inp in plan.on_path:
                pending.setdefault(inp, []).append(val)
        if name not in plan.kept and name != plan.output:
            del star[name]  # bounded memory: only kept features survive the walk
        bar.update(1)
    bar.close()
    return features, steps


def _deviation(features: dict[str, torch.Tensor], forward: dict[str, torch.Tensor]) -> dict:
    """Per node: ``||a* − â||`` (abs), relative to ``||â||`` (rel), and ``max |a* − â|`` (max), (N,) each."""
    out = {}
    for k, a in features.items():
        d = a - forward[k]
        N = d.shape[0]
        out[k] = {
            "abs": _flat_norm(d).cpu().numpy().astype(np.float64),
            "rel": _rel(d, forward[k]),
            "max": d.reshape(N, -1).abs().amax(1).cpu().numpy().astype(np.float64) if d[0].numel() else np.zeros(N),
        }
    return out


def reconstruct(
    net: EquivalentNetwork,
    x: Any,
    y: Any,
    to_layer: str = "input",
    embedding: str = "ne",
    solver: str = "auto",
    tol: float = 1e-10,
    maxiter: int | None = None,
    clip_margin: float = inverse.DEFAULT_CLIP_MARGIN,
    maxpool: str = "copy",
    avgpool: str = "copy",
    relu: str = "identity",
    fanout: str = "error",
    keep_unchanged: bool | None = None,
    keep: Iterable[str] | None = None,
    max_bytes: int | None = DEFAULT_MAX_BYTES,
    progress: bool = False,
    *,
    paper: bool = False,
    pool_rule: str | None = None,
) -> Reconstruction:
    """Reconstruct feature maps from labels, backwards through ``net`` (seed 001 §3).

    Parameters
    ----------
    net : EquivalentNetwork
        Sequential (or residual, with ``fanout="mean"``) equivalent network; computation runs
        in ``net.dtype`` (``net.to(torch.float64)`` for float64) on ``x``'s device.
    x : array (N, *input_shape)
        Network input batch (an image, or a feature map for an upper part of a network), N ≥ 1,
        finite; cast to ``net.dtype`` (float16 / bfloat16 and NaN / Inf raise ValueError).
    y : int array (N,)
        Labels ``y*``; the output node must be a vector of class scores.
    to_layer : str
        Where to stop: ``"input"``, a node name, ``"U"`` / ``"U:in"`` / ``"U:out"`` for a unit
        layer U (module docstring).
    embedding : {"ne", "ma", "onehot"}
        Output embedding (:func:`linop.reverse.embed`): nearest embedding (L2, Algorithm 1),
        maximum assignment (L1, Eq. 22) or the one-hot code (§4.2 ablation).
    solver, tol, maxiter :
        Passed to :func:`linop.solvers.solve` for every linear step (``solver`` is its ``method``).
    clip_margin, relu :
        Inverse activations (:func:`steps.inverse_activation`).
    maxpool : {"copy", "argmax", "nearest"}
        Max-pooling reverse (:func:`steps.unpool_max`; "copy" is the paper's).
    avgpool : {"copy", "exact"}
        Average pooling with stride = kernel: copy back (the paper) or the exact MDP solve
        (other geometries are always solved exactly).
    fanout : {"error", "mean"}
        How a node with several consumers on the path combines their targets.
    keep_unchanged : bool, optional
        The exactness convention of the module docstring (default: True; False in paper mode,
        where the paper's formulas run on every sample).
    keep : iterable of node names, optional
        Nodes whose ``a*`` / ``â`` are returned (all nodes passed by default; ``to_layer`` and
        the output are always kept).  Use it to bound memory for large batches.
    max_bytes : int or None
        Refuse (ValueError) when the kept tensors would exceed this many bytes.
    progress : bool
        tqdm progress bar over the reverse steps.
    paper : bool
        Seed 001's method (module docstring, "Paper mode"): ``pool_rule="copy"``, the §3.2 FFT
        solve for every conv it covers (``solver`` for the other linear steps), MDP / CCP by the
        paper's channel rule, ``keep_unchanged=False``.  Needs ``maxpool="copy"``,
        ``avgpool="copy"`` and ``relu="identity"`` (the paper's rules; ValueError otherwise).
    pool_rule : {"exact", "copy"}, optional
        Pooling windows whose target equals their forward pooled value: keep â ("exact", the
        default in linop mode) or copy the pooled value back like every window ("copy", the
        paper's §3.4(b); the default in paper mode).

    Returns
    -------
    Reconstruction
    """
    _check_options(net, embedding, solver, tol, maxiter, maxpool, avgpool, relu, fanout, clip_margin)
    options = _mode_options(paper, pool_rule, keep_unchanged, solver=solver, tol=tol, maxiter=maxiter,
                            clip_margin=clip_margin, maxpool=maxpool, avgpool=avgpool, relu=relu)
    plan = _plan(net, to_layer, fanout, keep)
    # finite, real, non-empty, not half precision; cast to the network's dtype (linop.validate)
    x = validate.batch(x, net.dtype, "x", sample_ndim=len(net.input_shape))
    shape = tuple(net.input_shape)
    if tuple(x.shape) != shape and tuple(x.shape[1:]) != shape:  # else the network's message names no argument
        raise ValueError(f"x must have shape (N, {', '.join(map(str, shape))}) or {shape}, got {tuple(x.shape)}")
    _check_memory(net, plan, x, max_bytes)
    fwd = net.run(x, keep=plan.need)
    a_L = fwd[plan.output]
    yt = _labels(y, a_L.shape[0], a_L.shape[1], a_L.device)
    x_b = net.x_b.to(device=a_L.device, dtype=a_L.dtype)
    z_L = embed(a_L, yt, norm=embedding).to(a_L.dtype)
    features, steps = _walk(plan, fwd, z_L, x_b, options, progress)
    forward = {k: fwd[k] for k in features}
    return Reconstruction(plan.target, plan.output, features, forward, _deviation(features, forward), steps, yt,
                          embedding, options.mode, options)
