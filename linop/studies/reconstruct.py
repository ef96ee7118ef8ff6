"""The reconstruction study (seed 001 §3, Fig. 4): labels → feature maps, with its files.

:func:`reconstruction_study` takes a torch model and a batch of labelled images, converts the
model (``linop.convert.from_torch``), reconstructs every sample from its label
(``linop.reverse.reconstruct``: embedding, then the reverse steps down to ``to_layer``) and
writes ``reconstruct.json`` (per-step reports and the deviation of a* from â per node) and one
Fig. 4 discrepancy figure per unit-layer input.  Loading checkpoints and data sets is the
command line's job (``linop reconstruct``, :mod:`linop.cli.reconstruct`).

``paper=True`` runs seed 001's method instead of our exact variants (pooling copied back in
every window, the §3.2 FFT solve for unpadded stride-1 convs, MDP / CCP by channels: see
:func:`linop.reverse.reconstruct`); ``reconstruct.json`` names the ``mode`` either way, and
every step reports both MDP/CCP labels (``case`` by W's rank, ``paper_case`` by channels).
"""
from __future__ import annotations

import os
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .. import validate
from ..network import EquivalentNetwork
from ..reverse import steps as _steps
from ..reverse.walk import Reconstruction, reconstruct
from . import store
from .report import plot_discrepancy, reconstruction_table

__all__ = ["ReconstructionStudy", "plot_discrepancy", "reconstruction_study", "reconstruction_table"]


@dataclass
class ReconstructionStudy:
    """What :func:`reconstruction_study` returns (and wrote to ``out_dir``).

    Attributes
    ----------
    rec : the :class:`~linop.reverse.walk.Reconstruction` itself.
    net : the equivalent network it ran on.
    summary : the JSON-able summary written to ``reconstruct.json``.
    sample : the sample drawn in the figures.
    files : the JSON file and the figures, in that order.
    seconds : wall time of the reconstruction.
    """

    rec: Reconstruction
    net: EquivalentNetwork
    summary: dict
    sample: int
    files: list[Path] = field(default_factory=list)
    seconds: float = 0.0

    def table(self) -> str:
        """The per-step table (:func:`linop.studies.report.reconstruction_table`)."""
        return reconstruction_table(self.summary, self.rec.to_layer)


def reconstruction_study(
    model: torch.nn.Module,
    x: Any,
    y: Any,
    out_dir: str | os.PathLike = "results/reconstruct",
    *,
    to_layer: str = "input",
    embedding: str = "ne",
    solver: str = "auto",
    tol: float = 1e-10,
    maxiter: int | None = None,
    maxpool: str = "copy",
    avgpool: str = "copy",
    clip_margin: float = _steps.DEFAULT_CLIP_MARGIN,
    dtype: str = "float64",
    sample: int | None = None,
    progress: bool = True,
    info: Mapping[str, Any] | None = None,
    paper: bool = False,
    pool_rule: str | None = None,
) -> ReconstructionStudy:
    """Reconstruct the features of ``x`` from the labels ``y`` and write the study's files.

    Parameters
    ----------
    model : the torch model (eval mode), converted with ``from_torch`` in ``dtype``.
    x, y : (N, C, H, W) inputs (the model's normalisation applied) and (N,) labels.
    out_dir : where ``reconstruct.json`` and ``discrepancy_<node>.png`` go.
    to_layer, embedding, solver, tol, maxiter, maxpool, avgpool, clip_margin : passed to
        :func:`linop.reverse.reconstruct` (seed 001 §3).
    dtype : ``"float32"`` or ``"float64"`` (the compute dtype).
    sample : the sample drawn in the figures (default: the first one the embedding changed,
        else 0).
    info : extra fields of ``reconstruct.json`` (e.g. the checkpoint and data set names).
    paper, pool_rule : seed 001's method / the pooling rule (:func:`linop.reverse.reconstruct`).
    """
    if dtype not in ("float32", "float64"):
        raise ValueError(f"dtype must be 'float32' or 'float64', got {dtype!r}")
    # finite, real, non-empty, not half precision; labels integral and one per sample
    x = validate.batch(x, getattr(torch, dtype), "x")
    y = validate.labels(y, int(x.shape[0]), 2**62, "y")
    out = store.output_dir(out_dir, "out_dir")  # before the work: a bad path fails at once
    if sample is not None and not 0 <= sample < x.shape[0]:
        raise ValueError(f"sample must lie in [0, {x.shape[0]}), got {sample}")
    from ..convert import from_torch

    tdt = getattr(torch, dtype)
    net = from_torch(model, tuple(x.shape[1:]), dtype=tdt)
    t0 = time.perf_counter()
    rec = reconstruct(net, x.to(tdt), y, to_layer=to_layer, embedding=embedding, solver=solver, tol=tol,
                      maxiter=maxiter, clip_margin=clip_margin, maxpool=maxpool, avgpool=avgpool,
                      progress=progress, paper=paper, pool_rule=pool_rule)
    secs = time.perf_counter() - t0
    changed = np.flatnonzero((rec.target != rec.forward[rec.output]).any(1).cpu().numpy())
    summ = rec.summary()
    summ.update(**dict(info or {}), dtype=dtype, seconds=round(secs, 3), solver=solver, maxpool=maxpool,
                avgpool=avgpool, n_changed_at_output=int(changed.size),
                solvers_used=sorted({st["method"] for st in summ["steps"]
                                     if st["kind"] == "LinearNode" and st["method"] not in (None, "none")}))
    files = [store.write_json(out / "reconstruct.json", summ)]
    if sample is None:  # draw a sample the label actually moved (else nothing to see)
        sample = int(changed[0]) if changed.size else 0
    for name in _figure_nodes(net, rec):
        files.append(plot_discrepancy(rec, name, out / f"discrepancy_{name}.png", sample=sample))
    return ReconstructionStudy(rec=rec, net=net, summary=summ, sample=sample, files=files, seconds=secs)


def _figure_nodes(net: EquivalentNetwork, rec: Reconstruction) -> list[str]:
    """The features a_l drawn in Fig. 4: the inputs of the unit layers (and to_layer), if kept."""
    names = [net.unit_node(u).inputs[0] for u in net.unit_layers] + [rec.to_layer]
    return [n for n in dict.fromkeys(names) if n in rec.features]
