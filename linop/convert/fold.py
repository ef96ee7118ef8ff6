"""The folding pass: BatchNorm and Fixup multipliers into the preceding conv / linear.

Contract
--------
:func:`plan_folds` reads the traced graph *before* conversion and returns, for every conv /
linear ``call_module`` node (the *head*), the :class:`Fold` of the chain of nodes directly
after it that it can absorb exactly (``nn.ConvTranspose2d`` heads too, their weight in
torch's transposed layout):

* an eval-mode ``BatchNorm1d`` / ``BatchNorm2d`` with running statistics over as many
  features as the head has outputs (seed 000 Eq. 7)::

      BN(y) = g ⊙ y + shift,   g = γ / √(σ² + ε),   shift = β − g ⊙ μ

* a multiplication ``y * s`` / ``s * y`` or division ``y / s`` by a constant scalar ``s``
  (a number, or a one-element parameter / buffer; Fixup's multiplier ``M``, Table D.4).

Each chain link must be the only consumer of the previous value (otherwise the unfolded value
is needed elsewhere).  Nothing else is folded: a BatchNorm the pass leaves alone is converted
on its own (and reports why it cannot be, if it cannot).  The pass does not modify the graph;
the conv / linear handler applies :meth:`Fold.apply` to its weights and bias, and marks the
chain nodes as converted.

All arithmetic is float64: ``W' = diag(a) W`` and ``b' = t`` with ``a``, ``t`` composed link
by link, ``a ← g·a``, ``t ← g·t + shift`` (BN) or ``a ← s·a``, ``t ← s·t`` (multiplier).
"""
from __future__ import annotations

import operator
from dataclasses import dataclass
from typing import Any

import torch
from torch import fx, nn

__all__ = ["Fold", "FoldStep", "bn_affine", "plan_folds"]

_MUL = {operator.mul, operator.imul, torch.mul}
_DIV = {operator.truediv, operator.itruediv, torch.div}
_F64 = {"device": "cpu", "dtype": torch.float64}


@dataclass(frozen=True)
class FoldStep:
    """One absorbed node: ``y ↦ gain·y + shift`` per output channel (``shift`` None for a
    multiplier, which adds no bias)."""

    node: fx.Node
    gain: torch.Tensor | float
    shift: torch.Tensor | None = None


@dataclass(frozen=True)
class Fold:
    """The chain of nodes folded into one conv / linear ``head``, in execution order."""

    head: fx.Node
    steps: tuple[FoldStep, ...]

    @property
    def chain(self) -> tuple[fx.Node, ...]:
        return tuple(s.node for s in self.steps)

    @property
    def tail(self) -> fx.Node:
        """The node whose torch value the folded layer (with its bias) computes."""
        return self.steps[-1].node if self.steps else self.head

    def apply(self, weight: torch.Tensor, bias: torch.Tensor | None,
              transposed_groups: int | None = None) -> tuple[torch.Tensor, torch.Tensor, bool]:
        """``(W', b', has_bias)``: folded float64 weight and bias.

        The weight has its output channels first (conv, linear), or, with
        ``transposed_groups = g``, torch's transposed-conv layout ``(C_in, C_out/g, kh, kw)``
        where output channel ``k·C_out/g + j`` is column ``j`` of input group ``k``.
        ``b'`` is zeros and ``has_bias`` False when neither the head nor a BatchNorm of the
        chain has a bias (a multiplier alone adds none)."""
        W = weight.detach().to(**_F64)
        g = transposed_groups
        n_out = W.shape[0] if g is None else W.shape[1] * g
        a = torch.ones(n_out, dtype=torch.float64)
        has_bias = bias is not None
        t = bias.detach().to(**_F64).clone() if has_bias else torch.zeros(n_out, dtype=torch.float64)
        for s in self.steps:
            if s.shift is None:
                a, t = a * s.gain, t * s.gain
            else:  # BN(a·Wx + t) = g·a·Wx + (g·t + β − g·μ)
                a, t = a * s.gain, s.gain * t + s.shift
                has_bias = True
        if g is None:
            return W * a.reshape((-1,) + (1,) * (W.dim() - 1)), t, has_bias
        # group k's input rows scale by a[k·C_out/g : (k+1)·C_out/g] along their columns
        Wg = W.reshape((g, W.shape[0] // g) + tuple(W.shape[1:]))
        Wg = Wg * a.reshape((g, 1, -1) + (1,) * (W.dim() - 2))
        return Wg.reshape(W.shape), t, has_bias


def bn_affine(m: nn.Module, name: str = "BatchNorm") -> tuple[torch.Tensor, torch.Tensor]:
    """``g = γ/√(σ²+ε)``, ``shift = β − g·μ`` of an eval-mode BatchNorm (Eq. 7), float64.

    Refuses (ValueError naming the module ``name``) statistics that make the fold meaningless:
    ``running_var + eps ≤ 0`` (a square root of a negative number) or non-finite values —
    otherwise they would surface later as a NaN weight of the wrong layer."""
    var = m.running_var.detach().to(**_F64)
    mu = m.running_mean.detach().to(**_F64)
    bad_var = ~torch.isfinite(var) | (var + float(m.eps) <= 0)
    if bool(bad_var.any()):
        i = int(bad_var.nonzero()[0])
        raise ValueError(
            f"BatchNorm {name!r}: running_var + eps must be finite and > 0 for every channel (the fold "
            f"w' = γ·w/√(σ²+ε) of seed 000 Eq. 7); channel {i} has running_var={float(var[i])!r}, "
            f"eps={float(m.eps)!r} ({int(bad_var.sum())} bad channel(s))")
    others = [(k, t) for k, t in (("running_mean", mu), ("weight", m.weight), ("bias", m.bias)) if t is not None]
    for k, t in others:
        if not bool(torch.isfinite(t.detach()).all()):
            raise ValueError(f"BatchNorm {name!r}: {k} contains NaN or inf")
    g = 1.0 / torch.sqrt(var + float(m.eps))
    if m.weight is not None:
        g = m.weight.detach().to(**_F64) * g
    shift = -g * mu
    if m.bias is not None:
        shift = shift + m.bias.detach().to(**_F64)
    return g, shift


def _constant(gm: fx.GraphModule, a: Any) -> torch.Tensor | None:
    """Value of a constant operand: a number, a parameter / buffer, or an index into one."""
    if isinstance(a, bool):
        return None
    if isinstance(a, (int, float)):
        return torch.tensor(float(a), dtype=torch.float64)
    if not isinstance(a, fx.Node):
        return None
    if a.op == "get_attr":
        t = gm
        for part in str(a.target).split("."):
            t = getattr(t, part, None)
        return t if isinstance(t, torch.Tensor) else None
    if a.op == "call_function" and a.target is operator.getitem:
        base = _constant(gm, a.args[0])
        return None if base is None else base[a.args[1]]
    return None


def _scalar_factor(gm: fx.GraphModule, node: fx.Node, src: fx.Node) -> float | None:
    """``s`` if ``node`` computes ``src * s``, ``s * src`` or ``src / s`` (``1/s`` returned)
    with a constant scalar ``s``; else None."""
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
        c = _constant(gm, b)
    else:
        if (a is src) == (b is src):
            return None
        c = _constant(gm, b if a is src else a)
    if c is None or c.numel() != 1:
        return None
    s = float(c.detach().to(torch.float64).reshape(()))
    if is_div:
        return None if s == 0.0 else 1.0 / s
    return s


def _bn_step(gm: fx.GraphModule, node: fx.Node, src: fx.Node, n_out: int) -> FoldStep | None:
    """The step of a foldable BatchNorm applied to ``src`` alone, else None."""
    if node.op != "call_module":
        return None
    m = gm.get_submodule(node.target)
    if not isinstance(m, (nn.BatchNorm1d, nn.BatchNorm2d)):
        return None
    if len(node.args) != 1 or node.args[0] is not src or node.kwargs:
        return None
    if m.running_mean is None or m.running_var is None or m.num_features != n_out:
        return None  # left to the standalone rule, which says why it cannot convert it
    g, shift = bn_affine(m, str(node.target))
    return FoldStep(node, g, shift)


def _fold(gm: fx.GraphModule, head: fx.Node, n_out: int) -> Fold:
    steps, cur = [], head
    while len(cur.users) == 1:
        u = next(iter(cur.users))
        step = _bn_step(gm, u, cur, n_out)
        if step is None:
            s = _scalar_factor(gm, u, cur)
            if s is None:
                break
            step = FoldStep(u, s)
        steps.append(step)
        cur = u
    return Fold(head, tuple(steps))


def plan_folds(gm: fx.GraphModule) -> dict[fx.Node, Fold]:
    """The fold of every conv / linear node that absorbs at least one BN / multiplier.

    Parameters
    ----------
    gm : torch.fx.GraphModule
        The traced module (not modified).

    Returns
    -------
    dict
        ``head node -> Fold``; heads with nothing to fold are absent.
    """
    plan = {}
    for node in gm.graph.nodes:
        if node.op != "call_module":
            continue
        m = gm.get_submodule(node.target)
        if isinstance(m, (nn.Conv1d, nn.Conv2d, nn.Linear, nn.ConvTranspose2d)):
            n_out = (int(m.weight.shape[1]) * m.groups if isinstance(m, nn.ConvTranspose2d)
                     else int(m.weight.shape[0]))
            fold = _fold(gm, node, n_out)
            if fold.steps:
                plan[node] = fold
    return plan
