"""The output-embedding ablation across data sets (seed 001 §4.2, Fig. 5).

For every data set given (a trained baseline and its data), the last layer alone is
post-trained — pair ``(L−1, L)`` — by FR-PT with each output embedding (MA with an L1
reconstruction loss, NE and one-hot with MSE) and by BP-PT, over ``runs`` runs
(:func:`~linop.studies.posttrain.posttrain_study` with ``ablation=True``, one resumable
sub-directory per data set).  One table and one figure (accuracy relative to each baseline,
95 % Student-t intervals: :func:`.figures.plot_embeddings_across`) hold every data set.
Finding the data sets that are present is the command line's job.
"""
from __future__ import annotations

import math
import os
import time
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np
import torch
from scipy import stats
from torch import nn

from .. import report, store
from .blocks import model_blocks
from .features import EMBEDDINGS
from .study import check_options, posttrain_study, resolve_alpha

__all__ = ["embedding_ablation_across"]

_LABELS = {"ma": "MA", "ne": "NE", "onehot": "one-hot"}


def embedding_ablation_across(
    baselines: Mapping[str, tuple[nn.Module, Mapping[str, torch.Tensor]]],
    alpha: float | Mapping[str, float] | None = None,
    epochs: int = 10,
    runs: int = 5,
    lr: float = 1e-3,
    batch_size: int = 256,
    solver: str = "auto",
    paper: bool = False,
    seed: int = 0,
    out_dir: str | os.PathLike = "results/posttrain_embeddings",
    resume: bool = True,
    progress: bool = False,
    print_table: bool = True,
    on_run_end: Callable[[dict], None] | None = None,
    notes: Mapping[str, str] | None = None,
    **study_kwargs: Any,
) -> dict:
    """Seed 001 Fig. 5 over several data sets.

    Parameters
    ----------
    baselines : data-set name → (trained baseline, data mapping ``x_train, y_train, x_test,
        y_test``).
    alpha : Eq. 3's coefficient, one for all or per data set; None (or a data set missing from
        the mapping): the paper's for that data set (Tables 1–6).
    paper : seed 001's reconstruction method (named in every results file).
    epochs : post-training epochs; the figure and table use the last one.
    notes : data-set name → why it was skipped (written into the table).
    Other parameters as :func:`posttrain_study`.

    Returns ``{"rows", "markdown", "files", "config"}``; writes ``config.json``,
    ``table.md`` / ``.csv`` / ``.json``, ``fig5_embeddings_datasets.png`` and ``<data set>/``.
    """
    if not isinstance(baselines, Mapping) or not baselines:
        raise ValueError("baselines must be a non-empty mapping data-set name -> (model, data)")
    alphas = {ds: resolve_alpha(alpha.get(ds) if isinstance(alpha, Mapping) else alpha, ds)[0] for ds in baselines}
    for ds, a in alphas.items():
        check_options(alpha=a, solver=solver, lr=lr, epochs=epochs, runs=runs, batch_size=batch_size)
    out = store.output_dir(out_dir, "out_dir")
    t0 = time.perf_counter()
    config = {"study": "embedding ablation across data sets (seed 001 §4.2, Fig. 5)", "data_sets": list(baselines),
              "alpha": alphas, "epochs": int(epochs), "runs": int(runs), "lr": float(lr), "batch_size": int(batch_size),
              "solver": solver, "seed": int(seed), "mode": "paper" if paper else "linop", "skipped": dict(notes or {}),
              **{k: v for k, v in study_kwargs.items() if isinstance(v, (str, int, float, bool, type(None)))}}
    store.write_json(out / "config.json", config, sort_keys=True)
    groups, base_acc, rows = {}, {}, []
    for ds, (model, data) in baselines.items():
        L = len(model_blocks(model))
        res = posttrain_study(model, data, pairs=[(L - 1, L)], alpha=alphas[ds], epochs=epochs, lr=lr, runs=runs,
                              solver=solver, paper=paper, batch_size=batch_size, seed=seed, out_dir=out / ds, resume=resume,
                              progress=progress, report_epochs=(epochs,), ablation=True, print_table=False,
                              name=f"baseline on {ds}", data_name=ds, on_run_end=on_run_end, **study_kwargs)
        base_acc[ds] = res.baseline_acc
        g = {}
        for emb in EMBEDDINGS:
            g[_LABELS.get(emb, emb)] = [r["test_acc"][-1] for r in res.records
                                        if r["method"] == "FR" and r["embedding"] == emb and (r["l_S"], r["l_R"]) == (L - 1, L)]
        g["BP-PT"] = [r["test_acc"][-1] for r in res.records if r["method"] == "BP" and (r["l_S"], r["l_R"]) == (L - 1, L)]
        groups[ds] = g
        for lab, v in g.items():
            a = np.asarray(v, dtype=np.float64)
            sd = float(a.std(ddof=1)) if a.size > 1 else 0.0
            half = float(stats.t.ppf(0.975, a.size - 1) * sd / math.sqrt(a.size)) if a.size > 1 else 0.0
            rows.append({"data": ds, "pair": f"({L - 1},{L})", "method": lab, "runs": int(a.size),
                         "baseline_acc": res.baseline_acc, "mean": float(a.mean()), "std": sd, "ci95_half": half,
                         "alpha": alphas[ds]})
    labels = list(dict.fromkeys(r["method"] for r in rows))
    md = [f"Output embedding ablation across data sets (seed 001 §4.2 / Fig. 5): last layer post-trained, "
          f"{epochs} epochs, {runs} runs, mode {config['mode']}; mean ± std (95 % CI half-width) test accuracy in %", "",
          "| data set (α) | baseline | " + " | ".join(labels) + " |", "|" + "---|" * (len(labels) + 2)]
    for ds in groups:
        cells = [f"{r['mean']:.3f} ± {r['std']:.3f} (±{r['ci95_half']:.3f})" for lab in labels for r in rows
                 if r["data"] == ds and r["method"] == lab]
        md.append(f"| {ds} ({alphas[ds]}) | {base_acc[ds]:.3f} | " + " | ".join(cells) + " |")
    for ds, why in (notes or {}).items():
        md.append(f"\n{ds}: skipped — {why}")
    text = "\n".join(md)
    files = {"config": str(out / "config.json"),
             "table_json": str(store.write_json(out / "table.json", {"config": config, "rows": rows})),
             "table_csv": str(report.write_csv(out / "table.csv", rows))}
    from .figures import plot_embeddings_across

    if plot_embeddings_across(groups, base_acc, out / "fig5_embeddings_datasets.png") is not None:
        files["fig5"] = str(out / "fig5_embeddings_datasets.png")
    files["table_md"] = str(store.atomic_write_bytes(out / "table.md", (text + "\n").encode("utf-8")))
    config["seconds"] = round(time.perf_counter() - t0, 1)
    if print_table:
        print(text)
    return {"rows": rows, "markdown": text, "files": files, "config": config}
