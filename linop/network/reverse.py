"""The reverse-step interface of the equivalent network's nodes (seed 001 §3).

Every node kind owns its reverse step, ``node.reverse(z_star, z_hat, a_hats, x_b, options)``:
it maps the target ``z*`` of the node's output back to targets for its inputs and returns a
:class:`StepReport`.  The walk (:func:`linop.reverse.reconstruct`) loops over the nodes and
never branches on their kind; this module holds what the two share.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

from ..utils import jsonable

__all__ = ["MODES", "POOL_RULES", "ReverseOptions", "StepReport", "relative_misfit"]

#: How the numbers were produced: our exact variants ("linop") or seed 001's method ("paper").
MODES = ("linop", "paper")
#: Pooling windows whose pooled target equals its forward value: keep â ("exact") or copy the
#: pooled value back into the whole window like every other window (seed 001 §3.4(b): "copy").
POOL_RULES = ("exact", "copy")


@dataclass(frozen=True)
class ReverseOptions:
    """Options of the reverse steps (see :func:`linop.reverse.reconstruct` for each).

    ``pool_rule``: "exact" — a pooling window whose target equals its forward pooled value
    keeps its forward input â (zero deviation, and a pre-image: the MDP answer); "copy" — the
    paper's §3.4(b) rule for every window, so a window of a correctly classified sample also
    becomes its pooled value copied ``kh·kw`` times (a* ≠ â even where nothing changed).

    ``paper``: linear steps as seed 001 does them — the §3.2 FFT solve (``method="fft"``) for
    every conv it covers (stride 1, no padding, dilation 1, groups 1), ``solver`` for the
    others, and the MDP/CCP principle chosen by the paper's channel / width rule
    (:func:`linop.solvers.case.channel_case`) instead of W's rank.
    """

    solver: str = "auto"
    tol: float = 1e-10
    maxiter: int | None = None
    clip_margin: float = 1e-6
    maxpool: str = "copy"
    avgpool: str = "copy"
    relu: str = "identity"
    keep_unchanged: bool = True
    pool_rule: str = "exact"
    paper: bool = False

    @property
    def mode(self) -> str:
        """"paper" or "linop" (:data:`MODES`)."""
        return "paper" if self.paper else "linop"


@dataclass
class StepReport:
    """One reverse step: node ``node`` of type ``kind`` mapped its target back to its inputs.

    ``consistency`` (N,): ``||f(a*_in) − z*|| / ||z*||`` — the node's forward map applied to the
    reconstructed input(s) against the target it was given (the per-step constraint; ~1e-15
    for exact steps, the least-squares misfit for CCP).  For linear steps ``case`` /
    ``method`` / ``solve_info`` come from :func:`linop.solve` (or "structural", "copy").
    ``n_solved``: samples whose target differed from the forward value (the solved ones).

    ``case`` is the library's label (W's numerical rank, :func:`linop.solvers.case.problem_case`),
    ``paper_case`` seed 001's (channels for convs, widths otherwise:
    :func:`linop.solvers.case.channel_case`); ``solved_as`` the principle the step applied:
    "lsq-closest" (``â + W⁺(z* − W â)``, every linop-mode solve), "MDP" (the same formula,
    paper mode) or "CCP" (paper mode: ``W⁺(z* − b)``, the minimum-norm least-squares point,
    â not used — on a W with a null space it drops â's null-space component),
    "fft-MDP" / "fft-CCP" (the §3.2 FFT solve, which applies the channel rule itself) or
    "copy" (average pooling copied back, §3.4(b)).  Structural steps (flatten, pads, ...) are
    "lsq-closest" in both modes: their closed form is that formula."""

    node: str
    kind: str
    consistency: np.ndarray = field(default_factory=lambda: np.zeros(0))
    case: str | None = None
    paper_case: str | None = None
    solved_as: str | None = None
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
            "paper_case": self.paper_case,
            "solved_as": self.solved_as,
            "method": self.method,
            "consistency_max": float(c.max()) if c.size else 0.0,
            "consistency_mean": float(c.mean()) if c.size else 0.0,
            "n_solved": int(self.n_solved),
            "seconds": round(self.seconds, 6),
        }
        if self.n_clipped is not None:
            out["n_clipped"] = int(self.n_clipped.sum())
        info = jsonable(self.solve_info, max_items=64)
        if info:
            out["solve_info"] = info
        return out


def relative_misfit(diff: torch.Tensor, ref: torch.Tensor) -> np.ndarray:
    """``||diff_n|| / ||ref_n||`` per sample (the denominator floored at the dtype's tiny)."""
    def norm(t: torch.Tensor) -> torch.Tensor:
        return torch.linalg.vector_norm(t.reshape(t.shape[0], -1), dim=1)

    tiny = torch.finfo(ref.dtype).tiny
    return (norm(diff) / norm(ref).clamp_min(tiny)).cpu().numpy().astype(np.float64)
