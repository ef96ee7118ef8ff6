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

__all__ = ["ReverseOptions", "StepReport", "relative_misfit"]


@dataclass(frozen=True)
class ReverseOptions:
    """Options of the reverse steps (see :func:`linop.reverse.reconstruct` for each)."""

    solver: str = "auto"
    tol: float = 1e-10
    maxiter: int | None = None
    clip_margin: float = 1e-6
    maxpool: str = "copy"
    avgpool: str = "copy"
    relu: str = "identity"
    keep_unchanged: bool = True


@dataclass
class StepReport:
    """One reverse step: node ``node`` of type ``kind`` mapped its target back to its inputs.

    ``consistency`` (N,): ``||f(a*_in) − z*|| / ||z*||`` — the node's forward map applied to the
    reconstructed input(s) against the target it was given (the per-step constraint; ~1e-15
    for exact steps, the least-squares misfit for CCP).  For linear steps ``case`` /
    ``method`` / ``solve_info`` come from :func:`linop.solve` (or "structural", "copy").
    ``n_solved``: samples whose target differed from the forward value (the solved ones)."""

    node: str
    kind: str
    consistency: np.ndarray = field(default_factory=lambda: np.zeros(0))
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
