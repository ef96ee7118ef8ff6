"""The FR-PT vs BP-PT study driver (seed 001 §4, Tables 1–6, Figs. 5–6).

For every pair ``(l_S, l_R)`` and run ``r`` the study post-trains a copy of the baseline by
FR-PT (seed 001 Eq. 3 with the reconstructed targets ``a*_{l_R}``) and by BP-PT (CE alone),
both from seed ``seed + r``; test accuracy is recorded after every epoch and the table reports
mean ± std over the runs at the reported epochs.  Every finished run is appended to
``results.jsonl`` at once (:func:`linop.studies.store.append_jsonl`), so an interrupted study
resumes where it stopped; a record is reused only under the same configuration hash (model
weights, data, every training setting).

**Mode.**  ``paper=False`` ("linop") reconstructs ``a*`` with our exact variants;
``paper=True`` ("paper") with seed 001's method (pooling copied back in every window, the
§3.2 FFT solve, MDP / CCP by channels: :func:`linop.reverse.reconstruct`).  The mode is part
of the configuration hash and is written into every results file: each record of
``results.jsonl``, ``config.json``, ``table.json`` / ``table.csv`` (a ``mode`` column) and the
title line of ``table.md``.

**α.**  ``alpha=None`` takes the loss coefficient seed 001 used for the data set
(:data:`PAPER_ALPHA`, Tables 1–6), in both modes; ``config.json`` says where α came from.

**Reported epochs.**  ``report_epochs=None``: ``{1, 5, 10} ∩ [1, epochs] ∪ {epochs}`` — the
final epoch is always a column.

The study takes objects — a baseline ``nn.Module`` (with ``.blocks`` or an ``nn.Sequential``)
and a mapping of data tensors; finding, training or loading a baseline checkpoint and a data
set is the command line's job (``linop posttrain``, :mod:`linop.cli.posttrain`).
"""
from __future__ import annotations

import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ... import validate
from .. import report, store
from .blocks import (
    accuracy_percent,
    check_block_decomposition,
    default_pairs,
    model_blocks,
    trainable_parameter_count,
    validate_pairs,
)
from .features import EMBEDDINGS, Reconstructor, reconstruct_features
from .loss import REC_LOSSES, rec_loss_for_embedding
from .summary import compare_methods, summarize
from .training import METHODS, OPTIMIZERS, posttrain_run, training_memory

__all__ = ["PAIRS_FIGURE", "PAPER_ALPHA", "StudyResult", "check_options", "default_report_epochs", "paper_alpha",
           "posttrain_study", "resolve_alpha"]

_DATA_KEYS = ("x_train", "y_train", "x_test", "y_test")

#: seed 001's loss coefficient α of Eq. 3 per data set (Tables 1–6: MNIST 0.1, CIFAR-10 0.1,
#: CIFAR-100 0.7, Tiny ImageNet 0.7, ImageNette 0.3, ImageWoof 0.1).  Our MNIST stand-ins
#: (mnist5k: 5,000 real MNIST digits; digits / digits32: 8×8 handwritten digits) take Table 1's.
PAPER_ALPHA = {
    "mnist": (0.1, "Table 1 (MNIST)"),
    "mnist5k": (0.1, "Table 1 (MNIST)"),
    "digits": (0.1, "Table 1 (MNIST; digits stands in for it)"),
    "digits32": (0.1, "Table 1 (MNIST; digits32 stands in for it)"),
    "cifar10": (0.1, "Table 2 (CIFAR-10)"),
    "cifar100": (0.7, "Table 3 (CIFAR-100)"),
    "tinyimagenet": (0.7, "Table 4 (Tiny ImageNet)"),
    "imagenette": (0.3, "Table 5 (ImageNette)"),
    "imagewoof": (0.1, "Table 6 (ImageWoof)"),
}
#: α when neither given nor known for the data set (Table 1's, the paper's most common value)
FALLBACK_ALPHA = 0.1
#: The figure of FR-PT box plots vs the BP-PT mean per (l_S, l_R) pair (not seed 001 Fig. 6,
#: which is over training stages).
PAIRS_FIGURE = "frpt_vs_bppt_pairs.png"
_DEFAULT_REPORT_EPOCHS = (1, 5, 10)


def paper_alpha(data_name: str) -> float | None:
    """Seed 001's α for ``data_name`` (:data:`PAPER_ALPHA`), None if the paper has no table for it."""
    entry = PAPER_ALPHA.get(str(data_name).lower())
    return entry[0] if entry else None


def resolve_alpha(alpha: float | None, data_name: str) -> tuple[float, str]:
    """``(α, where it came from)``: the given α, else the paper's for the data set, else
    :data:`FALLBACK_ALPHA` (said so)."""
    if alpha is not None:
        return float(alpha), "given"
    entry = PAPER_ALPHA.get(str(data_name).lower())
    if entry is not None:
        return entry[0], f"seed 001 {entry[1]}"
    return FALLBACK_ALPHA, f"default {FALLBACK_ALPHA} (data set {data_name!r} is not in seed 001 Tables 1-6)"


def default_report_epochs(epochs: int, report_epochs: Sequence[int] | None = None) -> list[int]:
    """The table's epoch columns: ``report_epochs ∩ [1, epochs]`` (default ``{1, 5, 10}``), plus
    ``epochs`` itself when ``report_epochs`` is None — the final epoch is never dropped.
    ValueError for an explicit epoch outside ``[1, epochs]`` (it would be silently lost)."""
    epochs = int(epochs)
    if report_epochs is None:
        return sorted({e for e in _DEFAULT_REPORT_EPOCHS if e <= epochs} | {epochs})
    rep = sorted({int(e) for e in report_epochs})
    bad = [e for e in rep if not 1 <= e <= epochs]
    if bad or not rep:
        raise ValueError(f"report_epochs={list(report_epochs)}: every epoch must lie in [1, epochs={epochs}]"
                         + (f"; {bad} do not" if bad else "; got none"))
    return rep


@dataclass
class StudyResult:
    """What :func:`posttrain_study` returns (and writes to ``out_dir``)."""

    rows: list[dict]
    baseline_acc: float
    records: list[dict]
    config: dict
    markdown: str
    files: dict = field(default_factory=dict)


def check_options(*, optimizer: str = "adam", embedding: str = "ne", solver: str = "auto", rec_loss: str = "auto",
                  alpha: float | None = 0.1, lr: float = 1e-3, epochs: int = 10, runs: int = 10, batch_size: int = 256,
                  chunk_size: int = 256) -> None:
    """Raise ``ValueError`` naming the first bad option (before any work is done)."""
    if optimizer not in OPTIMIZERS:
        raise ValueError(f"optimizer={optimizer!r}: expected one of {OPTIMIZERS}")
    if embedding not in EMBEDDINGS:
        raise ValueError(f"embedding={embedding!r}: expected one of {EMBEDDINGS}")
    from ...solvers import METHODS as SOLVE_METHODS

    if solver not in SOLVE_METHODS:  # else only noticed at the first reconstruction with a solve
        raise ValueError(f"solver={solver!r}: expected one of {SOLVE_METHODS}")
    if rec_loss not in ("auto",) + REC_LOSSES:
        raise ValueError(f"rec_loss={rec_loss!r}: expected 'auto', 'mse' or 'l1'")
    if alpha is not None and not 0.0 <= float(alpha) <= 1.0:
        raise ValueError(f"alpha={alpha!r}: must lie in [0, 1]")
    for name, v in (("epochs", epochs), ("runs", runs), ("batch_size", batch_size), ("chunk_size", chunk_size)):
        if int(v) < 1:
            raise ValueError(f"{name}={v}: must be >= 1")
    if not lr > 0:
        raise ValueError(f"lr={lr}: must be > 0")


def _task_key(method: str, l_S: int, l_R: int, embedding: str, run_index: int) -> str:
    return f"{method}|{l_S}|{l_R}|{embedding if method == 'FR' else '-'}|{run_index}"


def _tasks(pairs: list[tuple[int, int]], runs: int, embedding: str, ablation: bool,
           n_layers: int) -> list[tuple[str, tuple]]:
    """``(key, (l_S, l_R, method, embedding, run))`` of every run, in order, without repeats;
    the §4.2 ablation adds FR-PT and BP-PT of the last layer with every embedding."""
    tasks = [(s, r, m, embedding, k) for (s, r) in pairs for m in METHODS for k in range(runs)]
    if ablation:
        tasks += [(n_layers - 1, n_layers, m, emb, k) for emb in EMBEDDINGS for k in range(runs) for m in ("FR", "BP")]
    uniq = {}
    for t in tasks:
        uniq.setdefault(_task_key(t[2], t[0], t[1], t[3], t[4]), t)
    return list(uniq.items())


@dataclass
class _Runner:
    """Runs the tasks of one study; owns the per-study caches of ``a*`` and memory figures."""

    base: nn.Module
    data: dict
    settings: dict  # alpha, epochs, lr, optimizer, momentum, batch_size
    seed: int
    solver: str
    rec_loss: str
    cache: Path
    chunk_size: int
    progress: bool
    reconstructor: Reconstructor | None
    paper: bool = False
    a_star: dict = field(default_factory=dict)
    steps: dict = field(default_factory=dict)
    memory: dict = field(default_factory=dict)

    @property
    def mode(self) -> str:
        return "paper" if self.paper else "linop"

    def targets(self, l_R: int, emb: str) -> torch.Tensor:
        if (l_R, emb) not in self.a_star:
            info: dict = {}
            self.a_star[(l_R, emb)] = reconstruct_features(
                self.base, l_R, self.data["x_train"], self.data["y_train"], embedding=emb, solver=self.solver,
                cache_dir=self.cache, chunk_size=self.chunk_size, progress=self.progress,
                reconstructor=self.reconstructor, paper=self.paper, info=info)
            self.steps[(l_R, emb)] = info.get("steps", [])
        return self.a_star[(l_R, emb)]

    def mem(self, l_S: int, l_R: int, method: str, emb: str, a_star: torch.Tensor | None, rec: str) -> dict:
        mkey = (l_S, l_R, method, emb if method == "FR" else "-")
        if mkey not in self.memory:
            s, d = self.settings, self.data
            nb = min(s["batch_size"], int(d["x_train"].shape[0]))
            self.memory[mkey] = training_memory(
                self.base, l_S, l_R, method, d["x_train"][:nb], d["y_train"][:nb],
                a_star[:nb] if a_star is not None else None, optimizer=s["optimizer"], momentum=s["momentum"],
                alpha=s["alpha"], rec=rec)
        return self.memory[mkey]

    def rec_for(self, emb: str) -> str:
        """The reconstruction loss of an FR-PT run with embedding ``emb``."""
        return self.rec_loss if self.rec_loss != "auto" else rec_loss_for_embedding(emb)

    def run(self, key: str, task: tuple, config_hash: str) -> dict:
        """One FR-PT / BP-PT run as a results record."""
        l_S, l_R, method, emb, k = task
        rec = self.rec_for(emb)
        a_star = self.targets(l_R, emb) if method == "FR" else None
        mem = self.mem(l_S, l_R, method, emb, a_star, rec)
        d = self.data
        result = posttrain_run(self.base, l_S, l_R, method, d["x_train"], d["y_train"], d["x_test"], d["y_test"],
                               a_star=a_star, rec=rec, seed=self.seed + k, **self.settings)
        return {
            "key": key, "config_hash": config_hash, "mode": self.mode, "l_S": l_S, "l_R": l_R, "method": method,
            "embedding": emb if method == "FR" else "-", "rec_loss": rec if method == "FR" else None,
            "run": k, "seed": self.seed + k, "n_params": trainable_parameter_count(self.base, l_S, l_R),
            "mem_mb": mem["mem_mb"], "mem_terms_bytes": mem["mem_terms_bytes"],
            # the reverse walk behind a*: per step both MDP/CCP labels and the solver that ran
            "reverse_steps": self.steps.get((l_R, emb), []) if method == "FR" else [],
            **{kk: v for kk, v in result.items() if kk != "model"},
        }


def _prepare(model: nn.Module, data: Mapping[str, torch.Tensor],
             device: torch.device = torch.device("cpu")) -> tuple[nn.Module, dict]:
    """The baseline in eval mode on ``device`` and the data there in its parameter dtype
    (labels int64)."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module (the converged baseline), got {type(model).__name__}")
    if not isinstance(data, Mapping) or any(k not in data for k in _DATA_KEYS):
        raise TypeError(f"data must be a mapping with tensors {_DATA_KEYS}, got {type(data).__name__}")
    base = model.to(device).eval()
    dtype = next(base.parameters()).dtype
    d = {"x_train": data["x_train"].to(device, dtype), "y_train": data["y_train"].to(device).long(),
         "x_test": data["x_test"].to(device, dtype), "y_test": data["y_test"].to(device).long()}
    check_block_decomposition(base, d["x_test"][:4])
    return base, d


def _label(task: tuple) -> str:
    l_S, l_R, method, emb, k = task
    return f"{method}({l_S},{l_R}) {emb if method == 'FR' else ''} run {k}"


def _keep(record: dict, done: dict, res_path: Path, on_run_end: Callable[[dict], None] | None) -> None:
    """Append a finished run's record at once (unique: a concurrent run on the same out_dir
    that finished this key first wins) and report it."""
    store.append_jsonl(res_path, record, unique=("key", "config_hash"))
    done[record["key"]] = record
    if on_run_end is not None:
        on_run_end(record)


def _execute(runner: _Runner, uniq: list, done: dict, res_path: Path, config_hash: str,
             on_run_end: Callable[[dict], None] | None) -> None:
    """Run every task not in ``done``; append each record as soon as it is finished."""
    pending = [(key, t) for key, t in uniq if key not in done]
    bar = None
    if runner.progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=len(uniq), initial=len(uniq) - len(pending), desc="post-training runs", unit="run")
    for key, task in pending:
        if bar is not None:
            bar.set_postfix_str(_label(task))
        record = runner.run(key, task, config_hash)
        if bar is not None:
            bar.update(1)
        _keep(record, done, res_path, on_run_end)
    if bar is not None:
        bar.close()


def _run_task(shared: dict, key: str, task: tuple, config_hash: str) -> dict:
    """One post-training run on a worker: the runner arrives with every ``a*`` and memory
    figure it needs already computed by the driver, so a worker only trains."""
    old = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(shared["deterministic"], warn_only=True)
    try:
        return shared["runner"].run(key, task, config_hash)
    finally:
        torch.use_deterministic_algorithms(old)


def _execute_distributed(runner: _Runner, uniq: list, done: dict, res_path: Path, config_hash: str,
                         on_run_end: Callable[[dict], None] | None, executor: Any, workers: int | None,
                         deterministic: bool) -> None:
    """The runs not in ``done`` as one Dask task each (:mod:`linop.studies.execute`).

    The reconstructed feature sets ``a*_{l_R}`` (and the memory figures) are computed once,
    here in the driver, for every (l_R, embedding) a pending FR-PT run needs, and shipped to
    the workers once with the runner; every task is keyed by the study's configuration hash
    and the run's key, so a rerun or a shard computes only what is missing.  The driver alone
    appends records to ``results.jsonl``."""
    from ..execute import Task, run_tasks

    pending = [(key, t) for key, t in uniq if key not in done]
    if not pending:
        return
    for _, (l_S, l_R, method, emb, _k) in pending:
        a_star = runner.targets(l_R, emb) if method == "FR" else None
        runner.mem(l_S, l_R, method, emb, a_star, runner.rec_for(emb))
    shipped = _Runner(**{**runner.__dict__, "progress": False, "reconstructor": None})
    tasks = [Task(key=f"linop-posttrain-{config_hash}-{key}", label=_label(t), args=(key, t, config_hash))
             for key, t in pending]

    def on_result(task: Task, record: dict) -> None:
        _keep(record, done, res_path, on_run_end)

    run_tasks(_run_task, {"runner": shipped, "deterministic": deterministic},
              f"linop-posttrain-runner-{config_hash}-{store.content_hash(shipped.a_star)[:16]}", tasks, on_result,
              executor, workers, progress=runner.progress, desc="post-training runs")


def _write_outputs(out: Path, records: list[dict], pair_list: list, rep: list[int], baseline_acc: float,
                   config: dict, embedding: str, ablation: bool, n_layers: int, title: str) -> tuple[list, str, dict]:
    """table.json / .csv / .md, the FR-PT vs BP-PT pairs figure (:data:`PAIRS_FIGURE`) and,
    with the ablation, ablation.json and the Fig. 5 figure.  Every row carries the ``mode``.
    Returns (rows, markdown, files)."""
    mode = config["mode"]
    main = [r for r in records if (r["method"] == "BP" or r["embedding"] == embedding)
            and (r["l_S"], r["l_R"]) in pair_list]
    rows = [{"mode": mode, **row} for row in summarize(main, rep, baseline_acc)]
    md = report.posttrain_markdown(rows, rep, baseline_acc, title)
    comparison = compare_methods(main, rep[-1], embedding)
    if comparison:
        md += (f"\n\nFR-PT − BP-PT after epoch {rep[-1]} (mean, percentage points; Welch t-test p): "
               + "; ".join(f"({c['l_S']},{c['l_R']}) {c['fr_minus_bp']:+.3f} (p={c['welch_p']:.2g})" for c in comparison))
    files = {"results": str(out / "results.jsonl")}
    files["table_json"] = str(store.write_json(out / "table.json", {"config": config, "baseline_acc": baseline_acc,
                                                                     "rows": rows, "fr_vs_bp": comparison}))
    files["table_csv"] = str(report.write_csv(out / "table.csv", rows))
    if ablation:
        abl_rows = [{"mode": mode, **row} for row in summarize([r for r in records if (r["l_S"], r["l_R"]) == (n_layers - 1, n_layers)], rep, baseline_acc)]
        md += "\n\n" + report.posttrain_markdown(abl_rows, rep, baseline_acc,
                                                 f"Embedding ablation (seed 001 §4.2), pair ({n_layers - 1},{n_layers}), "
                                                 f"mode {mode}")
        store.write_json(out / "ablation.json", abl_rows)
        if report.plot_embeddings(records, baseline_acc, n_layers - 1, n_layers, rep[-1], out / "fig5_embeddings.png",
                                  EMBEDDINGS):
            files["fig5"] = str(out / "fig5_embeddings.png")
    files["table_md"] = str(store.atomic_write_bytes(out / "table.md", (md + "\n").encode("utf-8")))
    if report.plot_pairs(main, baseline_acc, rep, out / PAIRS_FIGURE, embedding, mode=mode) is not None:
        files["pairs_figure"] = str(out / PAIRS_FIGURE)
    return rows, md, files


def posttrain_study(
    model: nn.Module,
    data: Mapping[str, torch.Tensor],
    pairs: Sequence[Sequence[int]] | None = None,
    alpha: float | None = None,
    epochs: int = 10,
    lr: float = 1e-3,
    optimizer: str = "adam",
    momentum: float = 0.0,
    runs: int = 10,
    embedding: str = "ne",
    solver: str = "auto",
    batch_size: int = 256,
    seed: int = 0,
    out_dir: str | os.PathLike = "results/posttrain",
    cache_dir: str | os.PathLike | None = None,
    resume: bool = True,
    progress: bool = True,
    report_epochs: Sequence[int] | None = None,
    ablation: bool = False,
    rec_loss: str = "auto",
    chunk_size: int = 256,
    on_run_end: Callable[[dict], None] | None = None,
    reconstructor: Reconstructor | None = None,
    deterministic: bool = True,
    print_table: bool = True,
    name: str | None = None,
    data_name: str = "custom",
    baseline_meta: Mapping[str, Any] | None = None,
    paper: bool = False,
    executor: Any = None,
    workers: int | None = None,
    device: Any = None,
) -> StudyResult:
    """Run the FR-PT vs BP-PT study of seed 001 §4 and write its tables and figures.

    Parameters
    ----------
    model : the converged baseline, an ``nn.Module`` with ``.blocks`` (``models.baselines``)
        or an ``nn.Sequential``; it is not modified (every run trains a copy).
    data : mapping with ``x_train, y_train, x_test, y_test`` tensors.
    pairs : ``(l_S, l_R)`` pairs, ``0 ≤ l_S < l_R ≤ L``; default every pair (as the paper).
    alpha : loss coefficient of Eq. 3; None (default): seed 001's for ``data_name``
        (:data:`PAPER_ALPHA`, Tables 1–6), else 0.1 — config.json records the source.
    epochs, lr, optimizer, momentum, batch_size : post-training settings (paper: Adam, 1e-3, 256).
    runs : repetitions; run ``r`` uses seed ``seed + r`` for both methods.
    embedding : output embedding of the reconstruction ("ne", "ma", "onehot").
    solver : passed to ``linop.reverse.reconstruct``.
    rec_loss : "auto" (MSE, or L1 for MA as in §4.2), "mse" or "l1".
    ablation : also run the §4.2 embedding ablation (Fig. 5): FR-PT of the last layer only,
        pair ``(L-1, L)``, with each of MA, NE and one-hot.
    out_dir : results.jsonl (one line per finished run), config.json, table.json/.csv/.md, fig_*.png.
    cache_dir : reconstruction cache (default ``out_dir/cache``).
    resume : skip the (pair, method, embedding, run) keys already in results.jsonl for the same
        configuration; False starts the results file afresh.
    on_run_end : called with each record right after it is appended (e.g. to stop a study).
    name, data_name : how the configuration and the tables name the model and the data
        (default: the module's class, ``"custom"``).
    baseline_meta : what is known about the baseline (e.g. its checkpoint metadata), recorded
        in config.json.
    report_epochs : the table's epoch columns; default ``{1, 5, 10} ∩ [1, epochs] ∪ {epochs}``.
    paper : reconstruct ``a*`` by seed 001's method instead of our exact variants (module
        docstring); every results file names the mode.
    executor, workers : where the runs go (:func:`linop.studies.execute.make_executor`):
        None / ``"serial"`` in this process (default), ``"local"`` a LocalCluster of
        ``workers`` single-threaded processes, a scheduler address or a ``distributed.Client``.
        One task per (pair, method, embedding, run); ``a*`` is computed once in this process
        and shared.  Runs are bit-identical to in-process runs with one torch thread.
    device : where the baseline, the data and the runs live (``"cpu"``, ``"cuda[:k]"``;
        default CPU); validated before any work (:func:`linop.validate.device`).
    """
    check_options(optimizer=optimizer, embedding=embedding, solver=solver, rec_loss=rec_loss, alpha=alpha, lr=lr,
                  epochs=epochs, runs=runs, batch_size=batch_size, chunk_size=chunk_size)
    if not isinstance(paper, bool):
        raise TypeError(f"paper={paper!r}: must be True or False")
    dev = validate.device(device)
    rep = default_report_epochs(epochs, report_epochs)
    alpha, alpha_source = resolve_alpha(alpha, data_name)
    mode = "paper" if paper else "linop"
    out = store.output_dir(out_dir, "out_dir")
    old_det = torch.are_deterministic_algorithms_enabled()
    if deterministic:
        torch.use_deterministic_algorithms(True, warn_only=True)
    try:
        base, d = _prepare(model, data, dev)
        n_layers = len(model_blocks(base))
        pair_list = validate_pairs(pairs if pairs is not None else default_pairs(n_layers), n_layers)
        baseline_acc = accuracy_percent(base, d["x_test"], d["y_test"])
        settings = {"alpha": float(alpha), "epochs": int(epochs), "lr": float(lr), "optimizer": optimizer,
                    "momentum": float(momentum), "batch_size": int(batch_size)}
        config = {"model": name or type(model).__name__, "model_hash": store.content_hash(base.state_dict()),
                  "data": data_name, "data_hash": store.content_hash(*(d[k] for k in _DATA_KEYS)),
                  **settings, "seed": int(seed), "solver": solver, "rec_loss": rec_loss, "mode": mode,
                  # a GPU run is another computation (other kernels, other roundings): its own key
                  **({"device": str(dev)} if dev.type != "cpu" else {})}
        config_hash = store.key_of(config)[:16]
        store.write_json(out / "config.json", {
            **config, "config_hash": config_hash, "embedding": embedding, "pairs": pair_list, "runs": runs,
            "baseline_acc": baseline_acc, "baseline": dict(baseline_meta or {"source": "module given by the caller"}),
            "n_layers": n_layers, "alpha_source": alpha_source, "report_epochs": rep}, sort_keys=True)
        res_path = out / "results.jsonl"
        if not resume:
            res_path.unlink(missing_ok=True)
        done = {r["key"]: r for r in store.read_jsonl(res_path) if r.get("config_hash") == config_hash} if resume else {}
        uniq = _tasks(pair_list, runs, embedding, ablation, n_layers)
        runner = _Runner(base, d, {k: v for k, v in settings.items()}, int(seed), solver, rec_loss,
                         Path(cache_dir) if cache_dir is not None else out / "cache", chunk_size, progress,
                         reconstructor, paper)
        if executor is None or executor == "serial":
            if workers not in (None, 1):
                raise ValueError(f"workers={workers} needs executor='local' (serial runs one task at a time)")
            _execute(runner, uniq, done, res_path, config_hash, on_run_end)
        else:
            _execute_distributed(runner, uniq, done, res_path, config_hash, on_run_end, executor, workers,
                                 deterministic)
    finally:
        torch.use_deterministic_algorithms(old_det)

    records = [done[key] for key, _ in uniq]
    title = (f"FR-PT vs BP-PT, {config['model']} on {data_name}, mode {mode}: alpha={alpha} ({alpha_source}), "
             f"{optimizer} lr={lr}, batch {batch_size}, {runs} runs, embedding {embedding.upper()}")
    # where α came from is reported, not hashed: --alpha 0.1 and the default 0.1 are one configuration
    config = {**config, "alpha_source": alpha_source}
    rows, md, files = _write_outputs(out, records, pair_list, rep, baseline_acc, config, embedding, ablation,
                                     n_layers, title)
    if print_table:
        print(md)
    return StudyResult(rows=rows, baseline_acc=baseline_acc, records=records, config=config, markdown=md, files=files)
