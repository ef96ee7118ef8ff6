"""FR-PT on different architectures (seed 001 §4.4, Fig. 7).

Two "3Conv+2fc" baselines that differ only in the order of their conv widths — (a) channels
increasing 5, 10, 15 (every reverse conv step a least-squares CCP solve: the reconstructed
features cannot satisfy the network exactly) and (b) decreasing 15, 10, 5 (every reverse conv
step an MDP solve, exact) — are each trained (or given), then post-trained by FR-PT and BP-PT
on the same pair(s); the figure shows test accuracy over the post-training epochs for both
(:func:`.figures.plot_architectures`).  The case of every reverse linear step of each baseline
is recorded (:func:`reverse_cases`), so the table shows that (a) really is CCP and (b) MDP.

Every post-training goes through :func:`~linop.studies.posttrain.posttrain_study` (one
sub-directory per architecture: resumable, cached ``a*``); baselines are trained by
:func:`.stages.train_stages` (the paper's protocol, saved and resumed the same way).
"""
from __future__ import annotations

import os
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import nn

from .. import report, store
from .blocks import model_blocks, validate_pairs
from .stages import load_stage, train_stages
from .study import check_options, default_report_epochs, posttrain_study, resolve_alpha
from .summary import compare_methods, summarize

__all__ = ["ArchitecturesResult", "architectures_study", "reverse_cases"]


def reverse_cases(model: nn.Module, x: torch.Tensor, y: torch.Tensor, solver: str = "auto") -> list[dict]:
    """The reverse linear steps of ``model`` from the label down to the input, each with its
    case (MDP / CCP / rank-deficient, decided from W) — from a float64 reconstruction of the
    few samples ``x`` (every step solved, ``keep_unchanged=False``).  Every field a step reports about its case is kept (e.g. the paper's
    channel-count label where the library gives it)."""
    from ...convert import from_torch
    from ...reverse.walk import reconstruct

    net = from_torch(model, tuple(x.shape[1:]), dtype=torch.float64)
    # keep_unchanged=False: every step is solved even for samples the embedding leaves as they are
    rec = reconstruct(net, x.double(), y, solver=solver, keep_unchanged=False)
    out = []
    for s in rec.steps:
        summ = s.summary()
        if summ.get("case"):
            out.append({k: v for k, v in summ.items() if k in ("node", "kind", "method", "consistency_max")
                        or "case" in k})
    return out


@dataclass
class ArchitecturesResult:
    """What :func:`architectures_study` returns (and writes to ``out_dir``)."""

    rows: list[dict]
    curves: dict
    cases: dict
    config: dict
    markdown: str
    files: dict = field(default_factory=dict)


def _curves(records: list[dict], pairs: list[tuple[int, int]], embedding: str) -> dict:
    out = {}
    for p in pairs:
        m = {}
        for method in ("BP", "FR"):
            acc = np.asarray([r["test_acc"] for r in records if r["method"] == method and (r["l_S"], r["l_R"]) == p
                              and (method == "BP" or r["embedding"] == embedding)], dtype=np.float64)
            m[method] = (acc.mean(0).tolist(), (acc.std(0, ddof=1) if acc.shape[0] > 1 else 0 * acc[0]).tolist())
        out[p] = m
    return out


def architectures_study(
    factories: Mapping[str, Callable[[], nn.Module]],
    data: Mapping[str, torch.Tensor],
    baselines: Mapping[str, nn.Module] | None = None,
    baseline_epochs: int = 30,
    pairs: Sequence[Sequence[int]] | None = None,
    epochs: int = 10,
    runs: int = 5,
    report_epochs: Sequence[int] | None = None,
    alpha: float | None = None,
    lr: float = 1e-3,
    batch_size: int = 256,
    embedding: str = "ne",
    solver: str = "auto",
    paper: bool = False,
    seed: int = 0,
    out_dir: str | os.PathLike = "results/posttrain_architectures",
    resume: bool = True,
    progress: bool = False,
    data_name: str = "custom",
    print_table: bool = True,
    on_run_end: Callable[[dict], None] | None = None,
    info: Mapping[str, Any] | None = None,
    **study_kwargs: Any,
) -> ArchitecturesResult:
    """Seed 001 §4.4 / Fig. 7: FR-PT vs BP-PT over epochs on each architecture.

    Parameters
    ----------
    factories : label → factory of the untrained baseline, e.g. ``{"(a) 5/10/15": …,
        "(b) 15/10/5": …}``; every architecture must have the same number of layers.
    data : ``x_train, y_train, x_test, y_test`` tensors.
    baselines : label → an already trained baseline (skips its training).
    baseline_epochs : BP epochs of a baseline trained here (:func:`.stages.train_stages`,
        saved under ``out_dir/<label>/``).
    pairs : the ``(l_S, l_R)`` pairs post-trained; default ``(1, 2)`` — layer 2 trained,
        ``a*_2`` reconstructed through the last conv (the step whose case differs between the
        architectures) and the FC layers.
    epochs, runs, report_epochs, alpha, lr, batch_size, embedding, solver, paper, seed : as
        :func:`posttrain_study` (``lr``, ``batch_size`` and ``seed`` also train the baselines;
        ``alpha=None``: the paper's for ``data_name``).
    info : extra JSON-able fields of ``config.json`` (e.g. the data's normalisation).
    study_kwargs : passed on to :func:`posttrain_study`.

    Writes ``config.json``, per architecture ``<slug>/`` (baseline stages and its study),
    ``table.md`` / ``.csv`` / ``.json`` and ``fig7_architectures.png``.
    """
    check_options(embedding=embedding, solver=solver, alpha=alpha, lr=lr, epochs=epochs, runs=runs,
                  batch_size=batch_size)
    if not isinstance(factories, Mapping) or not factories:
        raise ValueError("factories must be a non-empty mapping label -> model factory")
    if int(baseline_epochs) < 1:
        raise ValueError(f"baseline_epochs={baseline_epochs}: must be >= 1")
    rep = default_report_epochs(epochs, report_epochs)
    alpha = resolve_alpha(alpha, data_name)[0]
    out = store.output_dir(out_dir, "out_dir")
    t0 = time.perf_counter()
    n_layers = {lab: len(model_blocks(f())) for lab, f in factories.items()}
    if len(set(n_layers.values())) != 1:
        raise ValueError(f"the architectures must have the same number of layers, got {n_layers}")
    L = next(iter(n_layers.values()))
    pair_list = validate_pairs(pairs if pairs is not None else [(1, 2)], L)
    config = {"study": "architectures (seed 001 §4.4, Fig. 7)", "architectures": list(factories), "data": data_name,
              "baseline_epochs": int(baseline_epochs), "pairs": [list(p) for p in pair_list], "epochs": int(epochs),
              "runs": int(runs), "report_epochs": rep, "alpha": float(alpha), "lr": float(lr),
              "batch_size": int(batch_size), "embedding": embedding, "solver": solver, "seed": int(seed),
              "mode": "paper" if paper else "linop",
              **dict(info or {}),
              **{k: v for k, v in study_kwargs.items() if isinstance(v, (str, int, float, bool, type(None)))}}
    store.write_json(out / "config.json", config, sort_keys=True)
    all_rows, curves, cases, md, files = [], {}, {}, [], {"config": str(out / "config.json")}
    for lab, factory in factories.items():
        slug = "".join(ch if ch.isalnum() else "_" for ch in lab).strip("_") or "arch"
        sub = out / slug
        if baselines is not None and lab in baselines:
            model, source = baselines[lab].cpu().eval(), {"source": "module given by the caller"}
        else:
            st = train_stages(factory, data, [int(baseline_epochs)], sub, lr=lr, batch_size=batch_size, seed=seed,
                              name=lab, resume=resume, progress=progress)[-1]
            model, source = load_stage(factory, st["path"]), {"source": st["path"], "epochs": int(baseline_epochs)}
        cases[lab] = reverse_cases(model, data["x_test"][:2], data["y_test"][:2], solver=solver)
        res = posttrain_study(
            model, data, pairs=pair_list, alpha=alpha, epochs=epochs, lr=lr, runs=runs, embedding=embedding,
            solver=solver, paper=paper, batch_size=batch_size, seed=seed, out_dir=sub / "posttrain", resume=resume,
            progress=progress, report_epochs=rep, print_table=False, name=lab, data_name=data_name,
            baseline_meta={**source, "study": "architectures"}, on_run_end=on_run_end, **study_kwargs)
        rows = summarize(res.records, rep, res.baseline_acc)
        for r in rows:
            r["architecture"] = lab
        all_rows += rows
        curves[lab] = {"title": f"{lab}: baseline {res.baseline_acc:.2f} %", "baseline_acc": res.baseline_acc,
                       "pairs": _curves(res.records, pair_list, embedding)}
        cmp = compare_methods(res.records, int(epochs), embedding)
        steps = ", ".join(f"{c['node']} {c['case']}" + (f" (paper's rule: {c['paper_case']})"
                                                        if c.get("paper_case") not in (None, c["case"]) else "")
                          for c in cases[lab])
        md.append(report.posttrain_markdown(rows, rep, res.baseline_acc, f"### {lab}\n\nreverse steps: {steps}"))
        md.append(f"\nFR-PT − BP-PT after epoch {epochs}: "
                  + "; ".join(f"({c['l_S']},{c['l_R']}) {c['fr_minus_bp']:+.3f} (Welch p={c['welch_p']:.2g})"
                              for c in cmp))
    head = (f"FR-PT vs BP-PT on different architectures (seed 001 §4.4 / Fig. 7) on {data_name}: alpha={alpha}, "
            f"{runs} runs, embedding {embedding.upper()}, baselines {baseline_epochs} BP epochs, mode {config['mode']}")
    text = head + "\n\n" + "\n\n".join(md)
    files["table_json"] = str(store.write_json(out / "table.json", {
        "config": config, "rows": all_rows, "cases": cases,
        "curves": {lab: {**c, "pairs": {f"{p[0]},{p[1]}": m for p, m in c["pairs"].items()}}
                   for lab, c in curves.items()}}))
    files["table_csv"] = str(report.write_csv(out / "table.csv", all_rows))
    from .figures import plot_architectures

    if plot_architectures(curves, out / "fig7_architectures.png") is not None:
        files["fig7"] = str(out / "fig7_architectures.png")
    files["table_md"] = str(store.atomic_write_bytes(out / "table.md", (text + "\n").encode("utf-8")))
    config["seconds"] = round(time.perf_counter() - t0, 1)
    if print_table:
        print(text)
    return ArchitecturesResult(rows=all_rows, curves=curves, cases=cases, config=config, markdown=text, files=files)
