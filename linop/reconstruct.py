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
   LinearNode          minimum-norm correction ``a* = â + W⁺(z* − W â)`` (:func:`linop.solve`):
                       MDP (Eqs. 4–6) for full row rank, CCP (Eq. 7) for full column rank.
                       Matrices with one non-zero per row and column (flatten, channel pad,
                       subsample, scale) use the closed form of :func:`inverse.structural_step`;
                       average pooling with stride = kernel is copied back (§3.4(b)) unless
                       ``avgpool="exact"``.
   BiasNode            ``c* = z* − R b``.
   ActivationNode      inverse activation (§3.4(a)), :func:`inverse.inverse_activation`.
   MaxPoolNode         copy back (§3.4(b)), :func:`inverse.unpool_max`.
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

import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable

import numpy as np
import torch

from . import inverse
from .solve import METHODS as SOLVE_METHODS
from .graph import (
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

__all__ = [
    "EMBEDDINGS",
    "StepReport",
    "Reconstruction",
    "reconstruct",
    "resolve_to_layer",
    "plot_discrepancy",
    "add_arguments",
    "run",
]

EMBEDDINGS = ("ne", "ma", "onehot")
FANOUT = ("error", "mean")
#: Refuse a reconstruction whose kept tensors (a* and â of every kept node) exceed this.
DEFAULT_MAX_BYTES = 4 * 2**30


# ----------------------------------------------------------------------------- results
@dataclass
class StepReport:
    """One reverse step: node ``node`` of type ``kind`` mapped its target back to its inputs.

    ``consistency`` (N,): ``||f(a*_in) − z*|| / ||z*||`` — the node's forward map applied to the
    reconstructed input(s) against the target it was given (the per-step constraint; ~1e-15
    for exact steps, the least-squares misfit for CCP).  For linear steps ``case`` /
    ``method`` / ``solve_info`` come from :func:`linop.solve` (or "structural", "copy").
    ``n_changed`` (N,): entries whose target differs from the forward value."""

    node: str
    kind: str
    consistency: np.ndarray
    case: str | None = None
    method: str | None = None
    solve_info: dict = field(default_factory=dict)
    n_clipped: np.ndarray | None = None
    n_solved: int = 0
    seconds: float = 0.0

    def summary(self) -> dict:
        c = self.consistency
        out = {
            "node": self.node,
            "kind": self.kind,
            "case": self.case,
            "method": self.method,
            "consistency_max": float(c.max()) if c.size else 0.0,
            "consistency_mean": float(c.mean()) if c.size else 0.0,
            "n_solved": int(self.n_solved),
            "seconds": round(self.seconds, 6),
        }
        if self.n_clipped is not None:
            out["n_clipped"] = int(self.n_clipped.sum())
        info = {k: _jsonable(v) for k, v in self.solve_info.items()}
        if info:
            out["solve_info"] = info
        return out


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
    """

    to_layer: str
    output: str
    features: dict[str, torch.Tensor]
    forward: dict[str, torch.Tensor]
    deviation: dict[str, dict[str, np.ndarray]]
    steps: list[StepReport]
    labels: torch.Tensor
    embedding: str

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
        return {
            "to_layer": self.to_layer,
            "output": self.output,
            "embedding": self.embedding,
            "n": int(self.labels.shape[0]),
            "deviation": dev,
            "steps": [s.summary() for s in self.steps],
        }


def _jsonable(v: Any) -> Any:
    if isinstance(v, (np.ndarray, torch.Tensor)):
        a = np.asarray(v.detach().cpu() if isinstance(v, torch.Tensor) else v)
        return a.tolist() if a.size <= 64 else {"mean": float(a.mean()), "max": float(a.max())}
    if isinstance(v, (np.floating, np.integer)):
        return v.item()
    if isinstance(v, (str, int, float, bool)) or v is None:
        return v
    if isinstance(v, (list, tuple)):
        return [_jsonable(u) for u in v][:64]
    if isinstance(v, dict):
        return {str(k): _jsonable(u) for k, u in v.items()}
    return repr(v)


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


def _rel(diff: torch.Tensor, ref: torch.Tensor) -> np.ndarray:
    tiny = torch.finfo(ref.dtype).tiny
    return (_flat_norm(diff) / _flat_norm(ref).clamp_min(tiny)).cpu().numpy().astype(np.float64)


def _labels(y: Any, N: int, n_classes: int, device) -> torch.Tensor:
    yt = torch.as_tensor(np.asarray(y) if not isinstance(y, torch.Tensor) else y)
    if yt.is_floating_point() or yt.is_complex() or yt.dtype == torch.bool:
        raise ValueError(f"labels y must be integers, got dtype {yt.dtype}")
    if yt.ndim != 1 or yt.shape[0] != N:
        raise ValueError(f"labels y must have shape ({N},) to match the batch, got {tuple(yt.shape)}")
    if N and (int(yt.min()) < 0 or int(yt.max()) >= n_classes):
        bad = int(yt[(yt < 0) | (yt >= n_classes)][0])
        raise ValueError(f"label {bad} out of range [0, {n_classes}) for an output of {n_classes} classes")
    return yt.to(device=device, dtype=torch.int64)


def _embed(a_hat_L: torch.Tensor, y: torch.Tensor, embedding: str) -> torch.Tensor:
    if embedding == "onehot":  # the ablation baseline of seed 001 §4.2
        out = torch.zeros_like(a_hat_L)
        return out.scatter_(1, y[:, None], 1.0)
    from .embed import embed

    return embed(a_hat_L, y, norm="l2" if embedding == "ne" else "l1")


def _pool_geometry(op: Any) -> tuple[Any, Any, Any] | None:
    """(kernel, stride, padding) of an AvgPool2d-like operator, or None."""
    from .operators import AvgPool2d

    if not isinstance(op, AvgPool2d) or op.ceil_mode or op.divisor_override is not None:
        return None
    return op.kernel_size, op.stride, op.padding


# ----------------------------------------------------------------------------- the pass
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
    keep_unchanged: bool = True,
    keep: Iterable[str] | None = None,
    max_bytes: int | None = DEFAULT_MAX_BYTES,
    progress: bool = False,
) -> Reconstruction:
    """Reconstruct feature maps from labels, backwards through ``net`` (seed 001 §3).

    Parameters
    ----------
    net : EquivalentNetwork
        Sequential (or residual, with ``fanout="mean"``) equivalent network; computation runs
        in ``net.dtype`` (``net.to(torch.float64)`` for float64) on ``x``'s device.
    x : array (N, *input_shape)
        Network input batch (an image, or a feature map for an upper part of a network).
    y : int array (N,)
        Labels ``y*``; the output node must be a vector of class scores.
    to_layer : str
        Where to stop: ``"input"``, a node name, ``"U"`` / ``"U:in"`` / ``"U:out"`` for a unit
        layer U (module docstring).
    embedding : {"ne", "ma", "onehot"}
        Output embedding: nearest embedding (L2, Algorithm 1), maximum assignment (L1,
        Eq. 22) or the one-hot code (§4.2 ablation).
    solver, tol, maxiter :
        Passed to :func:`linop.solve` for every linear step (``solver`` is its ``method``).
    clip_margin, relu :
        Inverse activations (:func:`inverse.inverse_activation`).
    maxpool : {"copy", "argmax", "nearest"}
        Max-pooling reverse (:func:`inverse.unpool_max`; "copy" is the paper's).
    avgpool : {"copy", "exact"}
        Average pooling with stride = kernel: copy back (the paper) or the exact MDP solve
        (other geometries are always solved exactly).
    fanout : {"error", "mean"}
        How a node with several consumers on the path combines their targets.
    keep_unchanged : bool
        The exactness convention of the module docstring.
    keep : iterable of node names, optional
        Nodes whose ``a*`` / ``â`` are returned (all nodes passed by default; ``to_layer`` and
        the output are always kept).  Use it to bound memory for large batches.
    max_bytes : int or None
        Refuse (ValueError) when the kept tensors would exceed this many bytes.
    progress : bool
        tqdm progress bar over the reverse steps.

    Returns
    -------
    Reconstruction
    """
    if not isinstance(net, EquivalentNetwork):
        raise ValueError(f"net must be an EquivalentNetwork (see linop.from_torch), got {type(net).__name__}")
    if embedding not in EMBEDDINGS:
        raise ValueError(f"embedding must be one of {EMBEDDINGS}, got {embedding!r}")
    if maxpool not in inverse.MAXPOOL_MODES:
        raise ValueError(f"maxpool must be one of {inverse.MAXPOOL_MODES}, got {maxpool!r}")
    if avgpool not in inverse.AVGPOOL_MODES:
        raise ValueError(f"avgpool must be one of {inverse.AVGPOOL_MODES}, got {avgpool!r}")
    if fanout not in FANOUT:
        raise ValueError(f"fanout must be one of {FANOUT}, got {fanout!r}")
    if relu not in inverse.RELU_MODES:
        raise ValueError(f"relu must be one of {inverse.RELU_MODES}, got {relu!r}")
    if not (isinstance(tol, (int, float)) and tol > 0):
        raise ValueError(f"tol must be a positive number, got {tol!r}")
    # checked here, not at the first linear step: a chain without one would accept anything
    if solver not in SOLVE_METHODS:
        raise ValueError(f"solver must be one of {SOLVE_METHODS}, got {solver!r}")
    if maxiter is not None and (isinstance(maxiter, bool) or not isinstance(maxiter, (int, np.integer))
                                or maxiter < 1):
        raise ValueError(f"maxiter must be a positive integer or None, got {maxiter!r}")
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
    consumers = {n.name: [m.name for m in order if n.name in m.inputs] for n in order}
    if fanout == "error":
        for name, cs in consumers.items():
            if len(cs) > 1:
                raise NotImplementedError(
                    f"node {name!r} feeds {len(cs)} nodes on the reverse path ({cs}); the greedy "
                    f"reverse pass of seed 001 §3 is defined for chains — pass fanout='mean' to "
                    f"average the reconstructed targets, or reconstruct to a layer above the branch"
                )

    x = torch.as_tensor(x)
    if not x.is_floating_point() or x.dtype != net.dtype:
        x = x.to(net.dtype)
    kept = {n.name for n in order} if keep is None else set(keep) | {target, out_name}
    unknown = kept - {n.name for n in order}
    if unknown:
        raise ValueError(f"keep names nodes not on the reverse path: {sorted(unknown)}")
    N = x.shape[0] if x.dim() > len(net.input_shape) else 1
    need = {n.name for n in order} | {i for n in order for i in n.inputs}
    # forward values of every node on the path live through the walk, plus the kept a*
    per_sample = (sum(math.prod(net.node(k).out_shape) for k in need)
                  + sum(math.prod(net.node(k).out_shape) for k in kept)) * x.element_size()
    if max_bytes is not None and N * per_sample > max_bytes:
        raise ValueError(
            f"reconstruct: the forward values of {len(need)} nodes and a* of {len(kept)} for {N} samples need "
            f"{N * per_sample / 2**30:.2f} GiB > max_bytes={max_bytes / 2**30:.2f} GiB; pass fewer "
            f"samples (at most {max(1, max_bytes // per_sample)}), fewer nodes in keep=, or raise max_bytes"
        )

    fwd = net.run(x, keep=need)
    N = fwd[target].shape[0]
    a_L = fwd[out_name]
    yt = _labels(y, N, a_L.shape[1], a_L.device)
    x_b = net.x_b.to(device=a_L.device, dtype=a_L.dtype)

    star: dict[str, torch.Tensor] = {out_name: _embed(a_L, yt, embedding).to(a_L.dtype)}
    pending: dict[str, list[torch.Tensor]] = {}
    steps: list[StepReport] = []
    features: dict[str, torch.Tensor] = {}
    from tqdm.auto import tqdm

    bar = tqdm(total=len(order) - 1, desc="reconstruct", disable=not progress, leave=False)
    for node in reversed(order):
        name = node.name
        if name != out_name:
            parts = pending.pop(name)
            star[name] = parts[0] if len(parts) == 1 else torch.stack(parts).mean(0)
        if name in kept:
            features[name] = star[name]
        if name == target:
            break
        t0 = time.perf_counter()
        ins, report = _reverse_node(
            net, node, star[name], fwd, x_b,
            solver=solver, tol=tol, maxiter=maxiter, clip_margin=clip_margin, maxpool=maxpool,
            avgpool=avgpool, relu=relu, keep_unchanged=keep_unchanged,
        )
        report.seconds = time.perf_counter() - t0
        steps.append(report)
        for inp, val in zip(node.inputs, ins):
            if inp in on_path:
                pending.setdefault(inp, []).append(val)
        if name not in kept and name != out_name:
            del star[name]  # bounded memory: only kept features survive the walk
        bar.update(1)
    bar.close()

    forward = {k: fwd[k] for k in features}
    deviation = {}
    for k, a in features.items():
        d = a - forward[k]
        deviation[k] = {
            "abs": _flat_norm(d).cpu().numpy().astype(np.float64),
            "rel": _rel(d, forward[k]),
            "max": d.reshape(N, -1).abs().amax(1).cpu().numpy().astype(np.float64) if d[0].numel() else np.zeros(N),
        }
    return Reconstruction(target, out_name, features, forward, deviation, steps, yt, embedding)


def _reverse_node(net, node: Node, z_star, fwd, x_b, *, solver, tol, maxiter, clip_margin, maxpool,
                  avgpool, relu, keep_unchanged) -> tuple[list[torch.Tensor], StepReport]:
    """One reverse step: the target ``z_star`` of ``node`` mapped to its input(s)."""
    z_hat = fwd[node.name]
    a_hats = [fwd[i] for i in node.inputs]
    kind = type(node).__name__
    report = StepReport(node.name, kind, np.zeros(0))
    if isinstance(node, LinearNode):
        a = _reverse_linear(node, z_star, z_hat, a_hats[0], report, solver=solver, tol=tol,
                            maxiter=maxiter, avgpool=avgpool, keep_unchanged=keep_unchanged)
        ins = [a]
    elif isinstance(node, BiasNode):
        ins = [inverse.subtract_bias(z_star, node.bias_term(x_b), z_hat=z_hat, c_hat=a_hats[0],
                                     keep_unchanged=keep_unchanged)]
        report.method = "subtract"
    elif isinstance(node, ActivationNode):
        z, clipped = inverse.inverse_activation(
            z_star, node.kind, node.negative_slope, clip_margin=clip_margin, relu=relu,
            a_hat=z_hat, z_hat=a_hats[0], keep_unchanged=keep_unchanged, return_clipped=True,
        )
        ins = [z]
        report.method = f"inverse {node.kind}" + (f" ({relu})" if node.kind == "relu" else "")
        report.n_clipped = clipped.cpu().numpy()
    elif isinstance(node, MaxPoolNode):
        H, W = net.node(node.inputs[0]).out_shape[1:]
        k = inverse._pair(node.kernel_size, "kernel_size")
        if getattr(node, "ceil_mode", False) and (H % k[0] or W % k[1]):
            raise NotImplementedError(
                f"max pooling {node.name!r} uses ceil_mode with partial windows ({H}x{W} by {k}); "
                f"the copy-back reverse step of seed 001 §3.4(b) covers full windows only"
            )
        ins = [inverse.unpool_max(
            z_star, node.kernel_size, net.node(node.inputs[0]).out_shape, mode=maxpool,
            a_hat=a_hats[0], stride=node.stride, padding=node.padding, dilation=node.dilation,
            p_hat=z_hat if keep_unchanged else None,
        )]
        report.method = maxpool
    elif isinstance(node, AddNode):
        k = len(node.inputs)
        corr = (z_star - z_hat) / k  # MDP: min Σ||a_i − â_i||² s.t. Σ a_i = z*
        ins = [a + corr for a in a_hats]
        report.case, report.method = "MDP", "split"
    elif isinstance(node, CatNode):
        sizes = [a.shape[node.dim] for a in a_hats]
        ins = list(torch.split(z_star, sizes, dim=node.dim))
        report.method = "split"
    elif isinstance(node, InputNode):  # pragma: no cover - the walk stops at the target
        return [], report
    else:
        raise NotImplementedError(f"no reverse step for node {node.name!r} of type {kind}")
    with torch.no_grad():
        again = node.forward(ins, x_b)
    report.consistency = _rel(again - z_star, z_star)
    return ins, report


def _reverse_linear(node: LinearNode, z_star, z_hat, a_hat, report: StepReport, *, solver, tol, maxiter,
                    avgpool, keep_unchanged) -> torch.Tensor:
    op = node.op
    N = z_star.shape[0]
    changed = (z_star != z_hat).reshape(N, -1).any(1) if keep_unchanged else torch.ones(N, dtype=torch.bool)
    report.n_solved = int(changed.sum())
    if not bool(changed.any()):
        report.case, report.method = "unchanged", "none"
        return a_hat.clone()
    # closed forms first: one non-zero per row and column, then stride = kernel avg pooling
    pattern = _structural_cache(op)
    if pattern is not None:
        a, report.case = inverse.structural_step(pattern, op.shape, z_star, a_hat)
        report.method = "structural"
    else:
        geom = _pool_geometry(op)
        if geom is not None and avgpool == "copy":
            try:
                a = inverse.unpool_avg(z_star, geom[0], op.in_shape, mode="copy", a_hat=a_hat, stride=geom[1],
                                       padding=geom[2], p_hat=z_hat if keep_unchanged else None)
                report.case, report.method = "MDP", "copy"
            except NotImplementedError:
                geom = None
        if geom is None or avgpool != "copy":
            from .solve import solve

            idx = changed.nonzero().flatten()
            sub_a, sub_z = a_hat[idx], z_star[idx]
            method, fallback = solver, None
            if solver in ("fft", "fft-pcg", "fft-exact"):
                from .solve.fft import conv_spec

                try:  # the FFT path covers stride-1 unpadded convs only (seed 001 §3.2)
                    conv_spec(op)
                except (ValueError, NotImplementedError) as exc:
                    method, fallback = "auto", f"{solver} not applicable ({exc}); used auto"
            res = solve(op, sub_z, sub_a, method=method, tol=tol, maxiter=maxiter)
            a = a_hat.clone()
            a[idx] = torch.as_tensor(res.a).to(device=a.device, dtype=a.dtype).reshape(sub_a.shape)
            report.case, report.method, report.solve_info = res.case, res.method, dict(res.info)
            if fallback:
                report.solve_info["fallback"] = fallback
            return a
    if keep_unchanged:
        a = torch.where(changed.reshape((N,) + (1,) * (a.dim() - 1)), a, a_hat)
    return a


_STRUCTURAL: dict[int, Any] = {}


def _structural_cache(op: Any):
    """Pattern of a one-non-zero-per-row-and-column operator (cached per operator), or None.

    Only the structural operator families (flatten, channel pad, subsample, scale, identity,
    diagonal, average pooling — whose CSR has at most one entry per input) are examined, so
    the test never assembles the matrix of a convolution or a dense layer."""
    from .operators import AvgPool2d, ChannelPad, Diagonal, Flatten, Identity, Scale, Subsample

    key = id(op)
    if key not in _STRUCTURAL:
        kinds = (Flatten, ChannelPad, Subsample, Scale, Identity, Diagonal, AvgPool2d)
        pattern = inverse.structural_pinv(op) if isinstance(op, kinds) else None
        _STRUCTURAL[key] = (op, pattern)  # holding op keeps its id unique
    return _STRUCTURAL[key][1]


# ----------------------------------------------------------------------------- figure
def plot_discrepancy(rec: Reconstruction, node: str, path: str | Path, sample: int = 0, max_channels: int = 32) -> Path:
    """|â_l − a*_l| per channel for one sample (seed 001 Fig. 4), written as a PNG.

    A (C, H, W) feature gives one panel per channel (up to ``max_channels``) on a shared
    colour scale; a vector gives a single strip.  Uses the Agg canvas directly (no global
    matplotlib backend change)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    if node not in rec.features:
        raise ValueError(f"node {node!r} was not reconstructed/kept; available: {sorted(rec.features)}")
    N = rec.features[node].shape[0]
    if not (0 <= sample < N):
        raise ValueError(f"sample must be in [0, {N}), got {sample}")
    d = (rec.forward[node][sample] - rec.features[node][sample]).abs().detach().cpu().double().numpy()
    if d.ndim == 1:
        d = d[None, None, :]
    elif d.ndim == 2:
        d = d[None]
    C = min(d.shape[0], max_channels)
    cols = min(C, 8)
    rows = -(-C // cols)
    size = (max(1.8 * cols + 1.0, 5.5), 1.8 * rows + 0.8) if d.shape[1] > 1 else (8.0, 2.4)
    fig = Figure(figsize=size)
    FigureCanvasAgg(fig)
    fig.subplots_adjust(top=1.0 - 0.7 / size[1], right=0.85)  # room for the two-line title
    vmax = float(d[:C].max()) or 1.0
    im = None
    for c in range(C):
        ax = fig.add_subplot(rows, cols, c + 1)
        im = ax.imshow(d[c], cmap="jet", vmin=0.0, vmax=vmax, interpolation="nearest", aspect="auto" if d.shape[1] == 1 else "equal")
        ax.set_xticks([])
        ax.set_yticks([])
        if C > 1:
            ax.set_title(f"ch {c}", fontsize=7)
    fig.colorbar(im, cax=fig.add_axes((0.88, 0.15, 0.02, 0.6)))
    rel = float(rec.deviation[node]["rel"][sample])
    fig.suptitle(f"|â − a*| at {node}\n(sample {sample}, label {int(rec.labels[sample])}, rel. dev. {rel:.3g})", fontsize=9)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    return path


# ----------------------------------------------------------------------------- CLI
def add_arguments(parser) -> None:
    parser.add_argument("--checkpoint", default="models/checkpoints/conv2_fc1_digits.pt",
                        help="trained seed 001 baseline (models.train checkpoint)")
    parser.add_argument("--data", default=None,
                        help="data set name for models.data.load_dataset (default: the checkpoint's)")
    parser.add_argument("--root", default=None, help="directory of cifar10 / cifar100 / mnist files")
    parser.add_argument("--n", type=int, default=16, help="number of test samples to reconstruct")
    parser.add_argument("--to-layer", default="input", help="'input', a node name, or U / U:in / U:out for a unit layer U")
    parser.add_argument("--embedding", default="ne", choices=EMBEDDINGS)
    parser.add_argument("--solver", default="auto", help="linop.solve method (auto, dense, lsmr, cg, fft, fft-pcg, fft-exact)")
    parser.add_argument("--tol", type=float, default=1e-10)
    parser.add_argument("--maxiter", type=int, default=None)
    parser.add_argument("--maxpool", default="copy", choices=inverse.MAXPOOL_MODES)
    parser.add_argument("--avgpool", default="copy", choices=inverse.AVGPOOL_MODES)
    parser.add_argument("--clip-margin", type=float, default=inverse.DEFAULT_CLIP_MARGIN)
    parser.add_argument("--dtype", default="float64", choices=("float32", "float64"))
    parser.add_argument("--sample", type=int, default=None,
                        help="sample drawn in the discrepancy figures (default: the first one the embedding changed)")
    parser.add_argument("--out", default="results/reconstruct", help="output directory (JSON + PNG)")


def run(args) -> int:
    from .convert import from_torch
    from models.data import load_dataset
    from models.train import load_checkpoint

    torch.set_num_threads(max(1, min(2, torch.get_num_threads())))
    if args.n < 1:
        raise ValueError(f"--n must be >= 1, got {args.n}")
    if args.solver not in SOLVE_METHODS:  # else only the first linear step would notice
        raise ValueError(f"--solver must be one of {SOLVE_METHODS}, got {args.solver!r}")
    if args.sample is not None and not 0 <= args.sample < args.n:
        raise ValueError(f"--sample must lie in [0, --n={args.n}), got {args.sample}")
    model, meta = load_checkpoint(args.checkpoint)
    model.eval()
    if args.data is None:
        args.data = meta.get("data", "digits")
    norm = meta.get("normalize", "none")
    if norm == "custom":  # the checkpoint's own (mean, std)
        norm = (meta["mean"], meta["std"])
    data = load_dataset(args.data, root=args.root, normalize=norm)
    x_test, y_test = _test_split(data)
    if args.n > len(x_test):
        raise ValueError(f"--n {args.n} is more than the {len(x_test)} test samples of {args.data}")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    x = torch.as_tensor(np.asarray(x_test[: args.n]))
    y = torch.as_tensor(np.asarray(y_test[: args.n])).long()
    dtype = getattr(torch, args.dtype)
    net = from_torch(model, tuple(x.shape[1:]), dtype=dtype)
    t0 = time.perf_counter()
    rec = reconstruct(net, x.to(dtype), y, to_layer=args.to_layer, embedding=args.embedding, solver=args.solver,
                      tol=args.tol, maxiter=args.maxiter, clip_margin=args.clip_margin, maxpool=args.maxpool,
                      avgpool=args.avgpool, progress=True)
    secs = time.perf_counter() - t0
    summ = rec.summary()
    summ.update(checkpoint=str(args.checkpoint), data=args.data, dtype=args.dtype, seconds=round(secs, 3),
                solver=args.solver, maxpool=args.maxpool, avgpool=args.avgpool,
                n_changed_at_output=int((rec.target != rec.forward[rec.output]).any(1).sum()))
    with open(out / "reconstruct.json", "w") as fh:
        json.dump(summ, fh, indent=2)
    print(f"reconstructed {summ['n']} samples of {args.data} to {rec.to_layer!r} ({args.embedding}, "
          f"{args.dtype}) in {secs:.2f} s; {summ['n_changed_at_output']} changed by the embedding")
    print(f"{'node':<22}{'step':<16}{'case':<12}{'method':<16}{'consist. max':>13}{'clipped':>9}"
          f"{'rel dev mean':>14}{'rel dev max':>13}")
    for s in summ["steps"]:
        dv = summ["deviation"].get(s["node"], {})
        clip = str(s["n_clipped"]) if "n_clipped" in s else "-"
        print(f"{s['node']:<22}{s['kind']:<16}{str(s['case'] or '-'):<12}{str(s['method'] or '-'):<16}"
              f"{s['consistency_max']:>13.2e}{clip:>9}{dv.get('rel_mean', float('nan')):>14.3e}"
              f"{dv.get('rel_max', float('nan')):>13.3e}")
    dv = summ["deviation"][rec.to_layer]
    print(f"{rec.to_layer:<22}{'(to_layer)':<16}{'':<12}{'':<16}{'':>13}{'':>9}{dv['rel_mean']:>14.3e}{dv['rel_max']:>13.3e}")
    print("consist. = ||f(a*_in) - z*|| / ||z*|| per step (0 / ~1e-15: exact; CCP steps and clipped "
          "activations cannot be exact); rel dev = ||a* - â|| / ||â|| of the node's feature")
    changed = np.flatnonzero((rec.target != rec.forward[rec.output]).any(1).cpu().numpy())
    if args.sample is None:  # draw a sample the label actually moved (else nothing to see)
        sample = int(changed[0]) if changed.size else 0
    else:
        sample = args.sample
    figs = []
    for name in _figure_nodes(net, rec):
        figs.append(str(plot_discrepancy(rec, name, out / f"discrepancy_{name}.png", sample=sample)))
    print(f"wrote {out / 'reconstruct.json'} and {len(figs)} figure(s) of sample {sample}: {', '.join(figs)}")
    return 0


def _test_split(data: Any) -> tuple[Any, Any]:
    """(x_test, y_test) from what models.data.load_dataset returns (tuple or mapping)."""
    if isinstance(data, dict):
        return data["x_test"], data["y_test"]
    for a, b in (("x_test", "y_test"),):
        if hasattr(data, a):
            return getattr(data, a), getattr(data, b)
    if isinstance(data, (tuple, list)) and len(data) >= 4:
        return data[2], data[3]
    raise ValueError(f"cannot find the test split in what load_dataset returned ({type(data).__name__})")


def _figure_nodes(net: EquivalentNetwork, rec: Reconstruction) -> list[str]:
    """The features a_l drawn in Fig. 4: the inputs of the unit layers (and to_layer), if kept."""
    names = [net.unit_node(u).inputs[0] for u in net.unit_layers] + [rec.to_layer]
    seen, out = set(), []
    for n in names:
        if n in rec.features and n not in seen:
            seen.add(n)
            out.append(n)
    return out
