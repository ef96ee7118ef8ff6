"""FR-PT at different training stages (seed 001 §4.3, Fig. 6) and Fig. 4 over those stages.

One baseline is trained by back-propagation and its weights are saved at the *stage* epochs
(the paper: every epoch of 30 on CIFAR-100).  Every stage is then post-trained on one
representative pair ``(l_S, l_R)`` — BP-PT for ``E`` epochs and FR-PT with the accuracy read
after 1, 5 and ``E`` epochs, over ``R`` runs (:func:`~linop.studies.posttrain.posttrain_study`
per stage, so each stage is resumable on its own).  The figure puts the baseline's test
accuracy per stage (black), the mean BP-PT accuracy after ``E`` epochs (gray) and FR-PT box
plots per stage side by side (:func:`.figures.plot_stages`).

The baseline is trained here (:func:`train_stages`) with the paper's protocol — seeded
initialisation, Adam without weight decay at a constant learning rate, cross-entropy, a seeded
``randperm`` data order per epoch — because the stage weights, the optimiser state and the
data-order generator must be saved after *every* stage epoch (and a rerun must continue from the
last saved stage); the model comes from a factory (the core never imports ``models``; the
command line passes ``models.train.build_model``).  Each stage file is written atomically with a
checksum and the training configuration's key (:func:`linop.studies.store.save_pt`): a damaged
or foreign file is retrained, never trusted.

:func:`discrepancy_over_stages` is seed 001 Fig. 4 over the stages: the reconstruction of ``linop
reconstruct`` (:func:`linop.reverse.reconstruct`, float64) of the same test images for the
baseline at an under-fitted, a converged and an over-fitted stage, with one figure per feature
map holding the three stages on one colour scale (:func:`.figures.plot_discrepancy_stages`).
"""
from __future__ import annotations

import os
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .. import report, store
from .blocks import accuracy_percent, model_blocks, validate_pairs
from .study import check_options, default_report_epochs, posttrain_study, resolve_alpha

__all__ = ["StagesResult", "default_stage_pair", "discrepancy_over_stages", "load_stage", "pick_fig4_stages",
           "stages_study", "train_stages"]

_DATA_KEYS = ("x_train", "y_train", "x_test", "y_test")
_VERSION = "stages-v1"


def default_stage_pair(n_layers: int) -> tuple[int, int]:
    """The representative pair of Fig. 6: ``(1, L−1)`` — the paper's ``(1, 4)`` on its
    five-layer CIFAR-100 net (layers 2–4 trained, ``a*_4`` reconstructed through the last FC);
    ``(0, 1)`` for a two-layer net."""
    return (1, n_layers - 1) if n_layers >= 3 else (0, 1)


def _check_data(data: Mapping[str, torch.Tensor]) -> None:
    if not isinstance(data, Mapping) or any(k not in data for k in _DATA_KEYS):
        raise TypeError(f"data must be a mapping with tensors {_DATA_KEYS} (x_val, y_val optional), "
                        f"got {type(data).__name__}")


def _stage_epochs(stage_epochs: Sequence[int]) -> list[int]:
    try:
        eps = sorted({int(e) for e in stage_epochs})
    except (TypeError, ValueError):
        raise ValueError(f"stage_epochs={stage_epochs!r}: expected epoch numbers >= 0") from None
    if not eps or eps[0] < 0 or any(int(e) != e for e in stage_epochs):
        raise ValueError(f"stage_epochs={list(stage_epochs)!r}: expected a non-empty list of epochs >= 0")
    return eps


def _stage_path(out: Path, epoch: int) -> Path:
    return out / "stages" / f"epoch_{epoch:04d}.pt"


def _accuracies(model: nn.Module, data: Mapping[str, torch.Tensor]) -> dict:
    accs = {"train_acc": accuracy_percent(model, data["x_train"], data["y_train"]),
            "test_acc": accuracy_percent(model, data["x_test"], data["y_test"])}
    if "x_val" in data and "y_val" in data and len(data["x_val"]):
        accs["val_acc"] = accuracy_percent(model, data["x_val"], data["y_val"])
    return accs


def train_stages(
    factory: Callable[[], nn.Module],
    data: Mapping[str, torch.Tensor],
    stage_epochs: Sequence[int],
    out_dir: str | os.PathLike,
    *,
    lr: float = 1e-3,
    batch_size: int = 256,
    seed: int = 0,
    name: str = "model",
    resume: bool = True,
    progress: bool = False,
) -> list[dict]:
    """Train ``factory()`` by BP and save it after every epoch in ``stage_epochs``.

    Protocol (seed 001 §4): ``torch.manual_seed(seed)`` before ``factory()``, Adam (``lr``, no
    weight decay, constant rate), cross-entropy, mini-batches of ``batch_size`` in the order
    ``randperm`` of a generator seeded with ``seed`` — the loop of ``models.train.train`` with
    ``optimizer="adam", weight_decay=0, schedule="constant"``, except that every stage is kept
    (``models.train`` keeps the best-validation epoch only).  Epoch 0 is the initialisation.

    Each stage goes to ``out_dir/stages/epoch_NNNN.pt`` with the model, optimiser and
    generator states; a rerun loads the stages already there (same configuration key) and
    continues training from the last one.  Returns one dict per stage: ``epoch``, ``path``,
    ``train_acc``, ``test_acc`` (and ``val_acc`` when ``data`` has ``x_val``), ``train_loss``.
    """
    _check_data(data)
    eps = _stage_epochs(stage_epochs)
    if not (lr > 0 and int(batch_size) >= 1):
        raise ValueError(f"lr={lr}, batch_size={batch_size}: lr must be > 0 and batch_size >= 1")
    out = store.output_dir(out_dir, "out_dir")
    (out / "stages").mkdir(exist_ok=True)
    torch.manual_seed(int(seed))
    model = factory()
    if not isinstance(model, nn.Module):
        raise TypeError(f"factory must return a torch.nn.Module, got {type(model).__name__}")
    model = model.cpu()
    dtype = next(model.parameters()).dtype
    x, y = data["x_train"].to(dtype), data["y_train"].long()
    d = {k: (v.to(dtype) if k.startswith("x") else v.long()) for k, v in data.items() if k[:2] in ("x_", "y_")}
    key = store.key_of({"v": _VERSION, "name": name, "init": store.content_hash(model.state_dict()),
                        "data": store.content_hash(*(data[k] for k in _DATA_KEYS)), "lr": float(lr),
                        "batch_size": int(batch_size), "seed": int(seed)})
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    gen = torch.Generator().manual_seed(int(seed))
    stages: dict[int, dict] = {}
    start = 0
    if resume:  # the saved stages of this configuration; continue after the last one
        for e in eps:
            st = store.load_pt(_stage_path(out, e), key=key)
            if st is None:
                break
            stages[e] = st
        if stages:
            last = stages[max(stages)]
            model.load_state_dict(last["model"])
            opt.load_state_dict(last["optim"])
            gen.set_state(last["generator"])
            start = int(last["epoch"])
    n = int(x.shape[0])
    t0 = time.perf_counter()
    old_det = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True, warn_only=True)
    try:
        for epoch in range(start + 1 if stages else 0, eps[-1] + 1):
            loss_sum = float("nan")
            if epoch > 0:
                model.train()
                perm = torch.randperm(n, generator=gen)
                loss_sum = 0.0
                for i in range(0, n, int(batch_size)):
                    idx = perm[i:i + int(batch_size)]
                    loss = F.cross_entropy(model(x[idx]), y[idx])
                    opt.zero_grad(set_to_none=True)
                    loss.backward()
                    opt.step()
                    loss_sum += float(loss.detach()) * int(idx.numel())
            if epoch in eps and epoch not in stages:
                model.eval()
                rec = {"key": key, "epoch": epoch, "model": {k: v.detach().clone() for k, v in model.state_dict().items()},
                       "optim": opt.state_dict(), "generator": gen.get_state(),
                       "train_loss": loss_sum / n if epoch > 0 else float("nan"), **_accuracies(model, d)}
                store.save_pt(rec, _stage_path(out, epoch))
                stages[epoch] = rec
                if progress:
                    print(f"stage epoch {epoch}: test {rec['test_acc']:.2f} %  ({time.perf_counter() - t0:.1f} s)")
    finally:
        torch.use_deterministic_algorithms(old_det)
    return [{"epoch": e, "path": str(_stage_path(out, e)), "train_loss": stages[e]["train_loss"],
             **{k: stages[e][k] for k in ("train_acc", "val_acc", "test_acc") if k in stages[e]}} for e in eps]


def load_stage(factory: Callable[[], nn.Module], path: str | os.PathLike) -> nn.Module:
    """The baseline saved at one stage (a file of :func:`train_stages`), in eval mode."""
    st = store.load_pt(path)
    if st is None or "model" not in st:
        raise ValueError(f"{path}: not a readable stage file of train_stages (missing or damaged)")
    model = factory()
    model.load_state_dict(st["model"])
    return model.cpu().eval()


def pick_fig4_stages(curve: Sequence[Mapping[str, Any]]) -> list[int]:
    """Under-fitted, converged and over-fitted stages for Fig. 4: the first stage, the stage
    with the best validation accuracy (test accuracy when there is no validation split; the
    earliest on ties) and the last stage — without repeats, in epoch order."""
    if not curve:
        raise ValueError("pick_fig4_stages: no stages")
    score = "val_acc" if all("val_acc" in c for c in curve) else "test_acc"
    best = max(curve, key=lambda c: (c[score], -c["epoch"]))["epoch"]
    return sorted({curve[0]["epoch"], best, curve[-1]["epoch"]})


@dataclass
class StagesResult:
    """What :func:`stages_study` returns (and writes to ``out_dir``)."""

    rows: list[dict]
    curve: list[dict]
    records: dict[int, list[dict]]
    config: dict
    markdown: str
    files: dict = field(default_factory=dict)
    fig4: dict = field(default_factory=dict)


def _stage_row(stage: Mapping[str, Any], recs: list[dict], pair: tuple[int, int], epochs: int,
               report_epochs: Sequence[int], embedding: str) -> dict:
    def stats(method: str, e: int) -> tuple[float, float]:
        v = np.asarray([r["test_acc"][e - 1] for r in recs if r["method"] == method
                        and (r["l_S"], r["l_R"]) == pair and (method == "BP" or r["embedding"] == embedding)])
        return (float(v.mean()), float(v.std(ddof=1)) if v.size > 1 else 0.0) if v.size else (float("nan"),) * 2

    row = {"stage_epoch": stage["epoch"], "baseline_test": stage["test_acc"], "baseline_train": stage["train_acc"]}
    if "val_acc" in stage:
        row["baseline_val"] = stage["val_acc"]
    row["bp_mean"], row["bp_std"] = stats("BP", epochs)
    for e in report_epochs:
        row[f"fr{e}_mean"], row[f"fr{e}_std"] = stats("FR", e)
    row["fr_minus_bp"] = row[f"fr{epochs}_mean"] - row["bp_mean"]
    cand = [("BP-PT", row["bp_mean"])] + [(f"FR-PT {e}", row[f"fr{e}_mean"]) for e in report_epochs]
    top = max(v for _, v in cand)
    row["best"] = " = ".join(k for k, v in cand if v == top)  # ties named together
    return row


def _markdown(rows: list[dict], report_epochs: Sequence[int], epochs: int, title: str) -> str:
    has_val = all("baseline_val" in r for r in rows)
    head = ("| stage (epoch) | baseline train | " + ("baseline val | " if has_val else "") + "baseline test | "
            f"BP-PT {epochs} ep. | " + " | ".join(f"FR-PT {e} ep." for e in report_epochs)
            + f" | FR({epochs}) − BP({epochs}) | best |")
    lines = [title, "", head, "|" + "---|" * (head.count("|") - 1)]
    for r in rows:
        cells = [str(r["stage_epoch"]), f"{r['baseline_train']:.2f}"] + ([f"{r['baseline_val']:.2f}"] if has_val else [])
        cells += [f"{r['baseline_test']:.2f}", f"{r['bp_mean']:.3f} ± {r['bp_std']:.3f}"]
        cells += [f"{r[f'fr{e}_mean']:.3f} ± {r[f'fr{e}_std']:.3f}" for e in report_epochs]
        cells += [f"{r['fr_minus_bp']:+.3f}", r["best"]]
        lines.append("| " + " | ".join(cells) + " |")
    lines.append("")
    lines.append("Accuracies in %, mean ± std over the runs; the baseline columns are the BP-trained model at that "
                 "stage (train split / validation / test).")
    return "\n".join(lines)


def stages_study(
    factory: Callable[[], nn.Module],
    data: Mapping[str, torch.Tensor],
    stage_epochs: Sequence[int] = (1, 2, 3, 5, 10, 20, 40, 70, 100, 150),
    pair: Sequence[int] | None = None,
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
    out_dir: str | os.PathLike = "results/posttrain_stages",
    resume: bool = True,
    progress: bool = False,
    fig4: bool = True,
    fig4_epochs: Sequence[int] | None = None,
    fig4_samples: int = 256,
    name: str = "model",
    data_name: str = "custom",
    print_table: bool = True,
    on_run_end: Callable[[dict], None] | None = None,
    info: Mapping[str, Any] | None = None,
    **study_kwargs: Any,
) -> StagesResult:
    """Seed 001 §4.3 / Fig. 6: FR-PT and BP-PT of the baseline at every training stage.

    Parameters
    ----------
    factory : builds the (untrained) baseline; called after ``torch.manual_seed(seed)``.
    data : ``x_train, y_train, x_test, y_test`` (and optionally ``x_val, y_val``, used to
        pick the converged stage of Fig. 4).
    stage_epochs : the BP epochs after which the baseline is saved and post-trained (paper:
        1..30 on CIFAR-100).  Default: a spread over 150 epochs, from under-fitted to
        over-fitted on ``mnist5k``.
    pair : the ``(l_S, l_R)`` post-trained at every stage; default :func:`default_stage_pair`.
    epochs : post-training epochs ``E`` of BP-PT and FR-PT (paper: 10).
    runs : repetitions per stage and method (run ``r`` uses seed ``seed + r`` for both).
    report_epochs : the FR-PT epochs reported (default ``{1, 5, 10} ∩ [1, E] ∪ {E}``, the paper's).
    alpha, lr, batch_size, embedding, solver, paper : as :func:`posttrain_study` (``lr`` and
        ``batch_size`` also train the baseline; ``alpha=None``: the paper's for ``data_name``;
        ``paper=True``: seed 001's reconstruction method, named in every results file).
    fig4 : also run :func:`discrepancy_over_stages` on ``fig4_epochs`` (default
        :func:`pick_fig4_stages`) with the first ``fig4_samples`` test images.
    info : extra JSON-able fields of ``config.json`` (e.g. the data's normalisation).
    study_kwargs : passed on to :func:`posttrain_study` (e.g. ``rec_loss``, ``chunk_size``).

    Writes ``out_dir/config.json`` (the study's settings), ``stages/`` (the baselines),
    ``stage_NNNN/`` (each stage's post-training study: ``results.jsonl`` and tables),
    ``table.md`` / ``table.csv`` / ``table.json`` (one row per stage) and
    ``fig6_stages.png``; with ``fig4`` the ``fig4/`` directory.
    """
    check_options(embedding=embedding, solver=solver, alpha=alpha, lr=lr, epochs=epochs, runs=runs,
                  batch_size=batch_size)
    _check_data(data)
    eps = _stage_epochs(stage_epochs)
    rep = default_report_epochs(epochs, report_epochs)
    alpha = resolve_alpha(alpha, data_name)[0]
    n_layers = len(model_blocks(factory()))  # bad pairs / Fig. 4 stages fail before any training
    pr = validate_pairs([tuple(pair) if pair is not None else default_stage_pair(n_layers)], n_layers)[0]
    if fig4 and fig4_epochs is not None and (missing := sorted({int(e) for e in fig4_epochs} - set(eps))):
        raise ValueError(f"fig4_epochs={missing}: not among the stage epochs {eps}")
    if int(fig4_samples) < 1:
        raise ValueError(f"fig4_samples={fig4_samples}: must be >= 1")
    out = store.output_dir(out_dir, "out_dir")
    t0 = time.perf_counter()
    curve = train_stages(factory, data, eps, out, lr=lr, batch_size=batch_size, seed=seed, name=name,
                         resume=resume, progress=progress)
    config = {"study": "stages (seed 001 §4.3, Fig. 6)", "model": name, "data": data_name,
              "stage_epochs": eps, "pair": list(pr), "epochs": int(epochs), "runs": int(runs),
              "report_epochs": rep, "alpha": float(alpha), "lr": float(lr), "batch_size": int(batch_size),
              "embedding": embedding, "solver": solver, "seed": int(seed), "mode": "paper" if paper else "linop",
              "baseline_protocol": "Adam (no weight decay, constant lr), cross-entropy, seeded randperm order",
              **dict(info or {}),
              **{k: v for k, v in study_kwargs.items() if isinstance(v, (str, int, float, bool, type(None)))}}
    store.write_json(out / "config.json", config, sort_keys=True)
    records: dict[int, list[dict]] = {}
    rows = []
    post = [c for c in curve if c["epoch"] > 0]  # epoch 0 (initialisation) serves Fig. 4 only
    for c in post:
        model = load_stage(factory, c["path"])
        res = posttrain_study(
            model, data, pairs=[pr], alpha=alpha, epochs=epochs, lr=lr, runs=runs, embedding=embedding,
            solver=solver, paper=paper, batch_size=batch_size, seed=seed, out_dir=out / f"stage_{c['epoch']:04d}",
            resume=resume, progress=progress, report_epochs=rep, print_table=False,
            name=f"{name}@epoch{c['epoch']}", data_name=data_name, on_run_end=on_run_end,
            baseline_meta={"source": c["path"], "stage_epoch": c["epoch"], "study": "stages"}, **study_kwargs)
        records[c["epoch"]] = res.records
        rows.append(_stage_row(c, res.records, pr, int(epochs), rep, embedding))
    title = (f"FR-PT at different training stages (seed 001 §4.3 / Fig. 6), {name} on {data_name}: pair {pr}, "
             f"alpha={alpha}, BP-PT {epochs} epochs, FR-PT at {', '.join(map(str, rep))} epochs, {runs} runs, "
             f"embedding {embedding.upper()}, mode {config['mode']}")
    md = _markdown(rows, rep, int(epochs), title)
    files = {"config": str(out / "config.json")}
    files["table_json"] = str(store.write_json(out / "table.json", {"config": config, "curve": curve, "rows": rows}))
    files["table_csv"] = str(report.write_csv(out / "table.csv", rows))
    from .figures import plot_stages

    if rows and plot_stages(rows, records, pr, rep, int(epochs), embedding, out / "fig6_stages.png") is not None:
        files["fig6"] = str(out / "fig6_stages.png")
    fig4_res: dict = {}
    if fig4:
        chosen = sorted({int(e) for e in fig4_epochs}) if fig4_epochs is not None else pick_fig4_stages(curve)
        by_epoch = {c["epoch"]: c for c in curve}
        k = min(int(fig4_samples), int(data["x_test"].shape[0]))
        models = {e: load_stage(factory, by_epoch[e]["path"]) for e in chosen}
        labels = {e: f"epoch {e}: test {by_epoch[e]['test_acc']:.1f} %" for e in chosen}
        fig4_res = discrepancy_over_stages(models, data["x_test"][:k], data["y_test"][:k], out / "fig4",
                                           labels=labels, embedding=embedding, solver=solver, progress=progress,
                                           paper=paper)
        md += "\n\n" + fig4_res["markdown"]
        files["fig4"] = fig4_res["files"]
    files["table_md"] = str(store.atomic_write_bytes(out / "table.md", (md + "\n").encode("utf-8")))
    config["seconds"] = round(time.perf_counter() - t0, 1)
    if print_table:
        print(md)
    return StagesResult(rows=rows, curve=curve, records=records, config=config, markdown=md, files=files,
                        fig4=fig4_res)


def discrepancy_over_stages(
    models: Mapping[Any, nn.Module],
    x: torch.Tensor,
    y: torch.Tensor,
    out_dir: str | os.PathLike,
    *,
    labels: Mapping[Any, str] | None = None,
    sample: int | None = None,
    embedding: str = "ne",
    solver: str = "auto",
    progress: bool = False,
    **reconstruct_kwargs: Any,
) -> dict:
    """Seed 001 Fig. 4 over training stages: ``|â_l − a*_l|`` of the same image at each stage.

    Reconstructs ``x`` from ``y`` with every model (:func:`linop.reverse.reconstruct` on the
    float64 equivalent network, as ``linop reconstruct``; ``reconstruct_stage_<stage>.json``
    holds each summary), then draws one figure per feature map with a row per stage on one shared colour scale
    (``fig4_<node>.png``).  ``sample``: default the first of the images the output embedding
    changes at the most stages (a correctly classified image has ``a* = â`` at every layer:
    NE leaves its output unchanged and every minimum-norm correction of a zero residual is 0).  Returns ``{"rows", "markdown", "files", "sample"}``; a row
    per stage and node gives the mean relative deviation ``||a* − â|| / ||â||`` over all images
    and the number of images the embedding changed (the quantitative form of Fig. 4's claim
    that the discrepancy shrinks as the model improves).
    """
    from ...convert import from_torch
    from ...reverse.walk import reconstruct
    from .figures import plot_discrepancy_stages

    if not models:
        raise ValueError("discrepancy_over_stages: no models")
    out = store.output_dir(out_dir, "out_dir")
    recs, nets = {}, {}
    for st, model in models.items():  # float64: the reconstruction study's precision
        nets[st] = from_torch(model.eval(), tuple(x.shape[1:]), dtype=torch.float64)
        recs[st] = reconstruct(nets[st], x.double(), y, embedding=embedding, solver=solver, progress=progress,
                               **reconstruct_kwargs)
        store.write_json(out / f"reconstruct_stage_{st}.json", {"stage": str(st), **recs[st].summary()})
    changed = {}
    for st, rec in recs.items():
        changed[st] = set(np.flatnonzero((rec.target != rec.forward[rec.output]).any(1).cpu().numpy()).tolist())
    if sample is None:  # the image the embedding changes at the most stages (the first such)
        counts: dict[int, int] = {}
        for ch in changed.values():
            for i in ch:
                counts[i] = counts.get(i, 0) + 1
        sample = min(counts, key=lambda i: (-counts[i], i)) if counts else 0
    net0, rec0 = next(iter(nets.values())), next(iter(recs.values()))
    # the features drawn by the reconstruction study: the inputs of the unit layers and to_layer
    drawn = [net0.unit_node(u).inputs[0] for u in net0.unit_layers] + [rec0.to_layer]
    nodes = [n for n in dict.fromkeys(drawn) if all(n in r.features for r in recs.values())]
    rows, files = [], []
    for st, rec in recs.items():
        summ = rec.summary()
        for node in nodes:
            dv = summ["deviation"][node]
            rows.append({"stage": str(st), "label": (labels or {}).get(st, str(st)), "node": node,
                         "rel_mean": dv["rel_mean"], "rel_max": dv["rel_max"], "n_changed": len(changed[st]),
                         "n": int(x.shape[0])})
    for node in nodes:
        p = plot_discrepancy_stages({(labels or {}).get(st, str(st)): r for st, r in recs.items()}, node,
                                    out / f"fig4_{node}.png", sample=sample)
        if p is not None:
            files.append(str(p))
    report.write_csv(out / "fig4_table.csv", rows)
    md = ["Fig. 4 over training stages: mean relative deviation ||a* − â|| / ||â|| per feature map "
          f"({int(x.shape[0])} test images; images the output embedding changed in brackets; figures drawn for "
          f"image {sample})", "",
          "| stage | " + " | ".join(nodes) + " |", "|" + "---|" * (len(nodes) + 1)]
    for st in recs:
        cells = [f"{r['rel_mean']:.3e}" for r in rows if r["stage"] == str(st)]
        md.append(f"| {(labels or {}).get(st, st)} ({len(changed[st])} changed) | " + " | ".join(cells) + " |")
    return {"rows": rows, "markdown": "\n".join(md), "files": files, "sample": int(sample)}
