"""FR-PT vs BP-PT: the post-training study of seed 001 §4 (Tables 1-6, Figures 5-6).

A converged baseline CNN is split into ``L`` *layers*: layer ``l`` (1 ≤ l ≤ L) is the output
of ``model.blocks[l - 1]`` (a conv block — conv, tanh, max pooling — or a fully connected
layer; layer ``L`` is the output vector ``â_L``); layer 0 is the input.  For a pair
``(l_S, l_R)`` with ``0 ≤ l_S < l_R ≤ L`` the first ``l_S`` layers and every layer above
``l_R`` are frozen and the modules ``l_S+1 … l_R`` are post-trained (the paper's
"#paras" column counts exactly those parameters):

* **FR-PT** minimises seed 001 Eq. 3, ``(1−α)·CE(y*, â_L) + α·MSE(a*_{l_R}, â_{l_R})``, where
  ``a*_{l_R}`` is the feature map reconstructed from the label (nearest embedding, then the
  reverse steps of §3: MDP/CCP through the linear maps, inverse tanh, pooling by copying)
  through the frozen layers above ``l_R``.  It is computed once per ``l_R`` for every training
  instance and cached on disk (:func:`reconstruct_features`).
* **BP-PT** trains the same modules with CE alone.

Both use the same optimiser, the same initial weights (the baseline), the same data order
and the same seeds: run ``r`` uses seed ``seed + r`` for both methods.  Test accuracy is
recorded after every epoch; the table reports mean ± std over the runs at epochs 1, 5 and 10
(the columns of seed 001 Tables 1-6).  Every finished run is appended to ``results.jsonl`` as
soon as it completes, so an interrupted study resumes where it stopped.

Memory column: this runs on CPU, so the paper's "GPU Mem" (``torch.cuda`` peak) is replaced
by a *tensor-accounting estimate* of the training step's peak: all parameters + gradients of
the trained ones + optimiser state + the batch (+ the batch of ``a*`` targets for FR) + every
tensor autograd saves for the backward pass, the last one *measured* with
``torch.autograd.graph.saved_tensors_hooks`` on one forward pass of a full batch.  It is not
an allocator peak (no allocator statistics exist on CPU); it counts the tensors that must be
alive together at the start of the backward pass.

Entry points: :func:`posttrain_study` (Python) and ``linop posttrain`` /
``python -m models.posttrain`` (CLI, :func:`add_arguments` / :func:`run`).
"""
from __future__ import annotations

import argparse
import copy
import hashlib
import json
import math
import os
import shutil
import sys
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping, Sequence

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from .fr_loss import fr_pt_loss, rec_loss_for_embedding

__all__ = [
    "EMBEDDINGS",
    "OPTIMIZERS",
    "model_blocks",
    "default_pairs",
    "parse_pair",
    "set_trainable",
    "trainable_parameter_count",
    "state_dict_hash",
    "reconstruct_features",
    "default_reconstructor",
    "posttrain_run",
    "training_memory",
    "summarize",
    "format_markdown",
    "StudyResult",
    "posttrain_study",
    "add_arguments",
    "run",
]

EMBEDDINGS = ("ne", "ma", "onehot")
OPTIMIZERS = ("sgd", "adam")
METHODS = ("BP", "FR")
CACHE_VERSION = 1  # bump when the reconstruction changes in a way that invalidates caches

# (upper module, shape of â_{l_R} without batch, embedding, solver) -> f(â_{l_R}, y) -> a*_{l_R}
Reconstructor = Callable[[nn.Module, tuple, str, str], Callable[[torch.Tensor, torch.Tensor], torch.Tensor]]


# ----------------------------------------------------------------------------------------
# layers, pairs, freezing
# ----------------------------------------------------------------------------------------
def model_blocks(model: nn.Module) -> list[nn.Module]:
    """The layers of ``model`` in forward order: ``model.blocks`` or the children of a Sequential."""
    blocks = getattr(model, "blocks", None)
    if isinstance(blocks, nn.ModuleList):
        head = getattr(model, "classifier", None)  # KConvMFC: a_L = classifier(a_{L-1})
        return list(blocks) + ([head] if isinstance(head, nn.Module) else [])
    if isinstance(model, nn.Sequential):
        return list(model)
    raise ValueError(
        f"model of type {type(model).__name__}: post-training needs the layers in forward order, "
        "as an nn.ModuleList attribute `blocks` (seed 001 baselines in models.baselines) or an "
        "nn.Sequential"
    )


def check_block_decomposition(model: nn.Module, x: torch.Tensor) -> None:
    """Raise if running the blocks one after another does not reproduce ``model(x)``."""
    with torch.no_grad():
        ref = model(x)
        h = x
        for b in model_blocks(model):
            h = b(h)
    if ref.shape != h.shape or not torch.allclose(ref, h, rtol=0, atol=0):
        raise ValueError(
            f"{type(model).__name__}: composing model.blocks does not reproduce model(x) "
            "(the study needs forward == blocks applied in order)"
        )


def default_pairs(n_layers: int) -> list[tuple[int, int]]:
    """Every ``(l_S, l_R)`` with ``0 ≤ l_S < l_R ≤ L``, ordered as in seed 001 Tables 1-6."""
    return [(s, r) for r in range(1, n_layers + 1) for s in range(r)]


def parse_pair(text: str) -> tuple[int, int]:
    """``"1:3"`` (or ``"1,3"``) -> ``(1, 3)``."""
    for sep in (":", ","):
        if sep in text:
            a, b = text.split(sep, 1)
            try:
                return int(a), int(b)
            except ValueError:
                break
    raise ValueError(f"pair {text!r}: expected 'l_S:l_R', e.g. '1:3'")


def _validate_pairs(pairs: Iterable[Sequence[int]], n_layers: int) -> list[tuple[int, int]]:
    out = []
    for p in pairs:
        s, r = (int(v) for v in p)
        if not 0 <= s < r <= n_layers:
            raise ValueError(
                f"pair (l_S, l_R)=({s}, {r}): need 0 <= l_S < l_R <= L={n_layers} "
                "(layers l_S+1..l_R are post-trained)"
            )
        if (s, r) not in out:
            out.append((s, r))
    if not out:
        raise ValueError("pairs: no (l_S, l_R) pair selected")
    return out


def _unique_params(modules: Iterable[nn.Module]) -> list[nn.Parameter]:
    seen, out = set(), []
    for m in modules:
        for p in m.parameters():
            if id(p) not in seen:
                seen.add(id(p))
                out.append(p)
    return out


def set_trainable(model: nn.Module, l_S: int, l_R: int) -> list[nn.Parameter]:
    """Freeze every parameter except those of layers ``l_S+1 … l_R``; return the trainable ones."""
    blocks = model_blocks(model)
    _validate_pairs([(l_S, l_R)], len(blocks))
    for p in model.parameters():
        p.requires_grad_(False)
    params = _unique_params(blocks[l_S:l_R])
    for p in params:
        p.requires_grad_(True)
    return params


def trainable_parameter_count(model: nn.Module, l_S: int, l_R: int) -> int:
    """Number of scalars post-trained for ``(l_S, l_R)`` (the "#paras" column)."""
    blocks = model_blocks(model)
    _validate_pairs([(l_S, l_R)], len(blocks))
    return int(sum(p.numel() for p in _unique_params(blocks[l_S:l_R])))


def forward_split(
    blocks: Sequence[nn.Module], x: torch.Tensor, l_S: int, l_R: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(â_L, â_{l_R})``; the frozen layers below ``l_S`` run without building a graph."""
    h = x
    with torch.no_grad():
        for b in blocks[:l_S]:
            h = b(h)
    for b in blocks[l_S:l_R]:
        h = b(h)
    a_hat = h
    for b in blocks[l_R:]:
        h = b(h)
    return h, a_hat


@torch.no_grad()
def layer_features(model: nn.Module, x: torch.Tensor, layer: int, chunk: int = 1024) -> torch.Tensor:
    """Forward feature map ``â_layer`` for every row of ``x`` (chunked)."""
    blocks = model_blocks(model)
    outs = []
    for i in range(0, x.shape[0], chunk):
        h = x[i : i + chunk]
        for b in blocks[:layer]:
            h = b(h)
        outs.append(h)
    return torch.cat(outs)


@torch.no_grad()
def accuracy_percent(model: nn.Module, x: torch.Tensor, y: torch.Tensor, chunk: int = 2048) -> float:
    """Test accuracy in percent."""
    was = model.training
    model.eval()
    correct = 0
    for i in range(0, x.shape[0], chunk):
        correct += int((model(x[i : i + chunk]).argmax(1) == y[i : i + chunk]).sum())
    model.train(was)
    return 100.0 * correct / int(x.shape[0])


# ----------------------------------------------------------------------------------------
# hashing and the reconstruction cache
# ----------------------------------------------------------------------------------------
def _hash_tensor(h: "hashlib._Hash", t: torch.Tensor) -> None:
    t = t.detach().cpu().contiguous()
    h.update(f"{t.dtype}|{tuple(t.shape)}|".encode())
    h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")


def state_dict_hash(model: nn.Module) -> str:
    """sha256 of the model's state dict (names, dtypes, shapes and bytes, in sorted name order)."""
    h = hashlib.sha256()
    sd = model.state_dict()
    for k in sorted(sd):
        h.update(k.encode() + b"\0")
        _hash_tensor(h, sd[k])
    return h.hexdigest()


def tensors_hash(*tensors: torch.Tensor) -> str:
    h = hashlib.sha256()
    for t in tensors:
        _hash_tensor(h, t)
    return h.hexdigest()


def default_reconstructor(upper: nn.Module, in_shape: tuple, embedding: str, solver: str):
    """Reconstruct ``a*_{l_R}`` through the frozen ``upper`` part with linop (seed 001 §3).

    ``upper`` maps ``â_{l_R}`` to ``â_L``; it is converted once to an equivalent network in
    float64 (``linop.convert.from_torch``) and every chunk is reconstructed from its labels to
    that network's input (``linop.reconstruct.reconstruct(..., to_layer="input")``).  With
    nothing above ``l_R`` (``l_R = L``) the target is the output embedding itself.
    """
    if len(list(upper.children())) == 0:

        def output_embedding(a_hat: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
            return output_target(a_hat.to(torch.float64), y, embedding)

        return output_embedding

    from linop.convert import from_torch
    from linop.reverse.walk import reconstruct

    net = from_torch(upper, tuple(in_shape), dtype=torch.float64)

    def reconstruct_chunk(a_hat: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        # keep=() : only a*_{to_layer} and the output are kept (bounded memory per chunk)
        rec = reconstruct(net, a_hat.to(torch.float64), y, to_layer="input", embedding=embedding,
                          solver=solver, keep=())
        return rec.a_star.reshape(a_hat.shape)

    return reconstruct_chunk


def output_target(a_hat_L: torch.Tensor, y: torch.Tensor, embedding: str) -> torch.Tensor:
    """``a*_L`` from the label: NE / MA (seed 001 §3.3, ``linop.embed``) or the one-hot code."""
    if embedding == "onehot":
        return F.one_hot(y.long(), a_hat_L.shape[1]).to(a_hat_L.dtype)
    from linop.reverse.embed import embed

    return embed(a_hat_L, y, norm=embedding)


def reconstruct_features(
    model: nn.Module,
    l_R: int,
    x: torch.Tensor,
    y: torch.Tensor,
    *,
    embedding: str = "ne",
    solver: str = "auto",
    cache_dir: str | os.PathLike | None = None,
    chunk_size: int = 256,
    progress: bool = True,
    reconstructor: Reconstructor | None = None,
    max_bytes: int = 4 << 30,
) -> torch.Tensor:
    """``a*_{l_R}`` for every row of ``x`` (seed 001 §4: layers above ``l_R`` frozen), cached.

    The cache file is keyed by the sha256 of the model's state dict, ``l_R``, the embedding,
    the solver and the data (sha256 of ``x`` and ``y``); a repeated call loads it instead of
    recomputing and returns a bit-identical tensor.  Chunks are written as they finish
    (``<key>.partial/``), so an interrupted reconstruction resumes.  The result is stored in
    the model's parameter dtype (the dtype training uses); the solves run in float64.
    """
    if embedding not in EMBEDDINGS:
        raise ValueError(f"embedding={embedding!r}: expected one of {EMBEDDINGS}")
    blocks = model_blocks(model)
    if not 1 <= l_R <= len(blocks):
        raise ValueError(f"l_R={l_R}: need 1 <= l_R <= L={len(blocks)}")
    if chunk_size < 1:
        raise ValueError(f"chunk_size={chunk_size}: must be >= 1")
    dtype = next(model.parameters()).dtype
    with torch.no_grad():
        probe = layer_features(model, x[:1], l_R)
    feat_shape = tuple(probe.shape[1:])
    n = int(x.shape[0])
    nbytes = n * int(np.prod(feat_shape)) * torch.empty((), dtype=dtype).element_size()
    if nbytes > max_bytes:
        raise MemoryError(
            f"a*_{l_R} for {n} instances of shape {feat_shape} needs {nbytes / 2**30:.2f} GiB "
            f"(> max_bytes={max_bytes / 2**30:.2f} GiB); select fewer training instances or a later l_R"
        )
    key_src = json.dumps(
        {
            "version": CACHE_VERSION,
            "state": state_dict_hash(model),
            "layer": int(l_R),
            "embedding": embedding,
            "solver": solver,
            "data": tensors_hash(x, y),
            "dtype": str(dtype),
        },
        sort_keys=True,
    )
    key = hashlib.sha256(key_src.encode()).hexdigest()
    path = partial = None
    if cache_dir is not None:
        cache_dir = Path(cache_dir)
        cache_dir.mkdir(parents=True, exist_ok=True)
        path = cache_dir / f"astar_l{l_R}_{embedding}_{solver}_{key[:20]}.pt"
        if path.exists():
            payload = torch.load(path, map_location="cpu", weights_only=True)
            if payload.get("key") == key:
                return payload["a_star"]
        partial = cache_dir / f"{path.stem}.partial"
        partial.mkdir(exist_ok=True)

    upper = nn.Sequential(*blocks[l_R:]).eval()
    make = reconstructor or default_reconstructor
    f = make(upper, feat_shape, embedding, solver)
    chunks = []
    starts = list(range(0, n, chunk_size))
    it = starts
    if progress:
        from tqdm.auto import tqdm

        it = tqdm(starts, desc=f"reconstruct a*_{l_R} ({embedding})", unit="chunk", leave=False)
    for i in it:
        cfile = partial / f"chunk_{i:09d}_{chunk_size}.pt" if partial is not None else None
        if cfile is not None and cfile.exists():
            chunks.append(torch.load(cfile, map_location="cpu", weights_only=True))
            continue
        a_hat = layer_features(model, x[i : i + chunk_size], l_R)
        a_star = f(a_hat, y[i : i + chunk_size]).detach().cpu().to(dtype).reshape(a_hat.shape)
        if not torch.isfinite(a_star).all():
            raise FloatingPointError(f"reconstruction of a*_{l_R} produced non-finite values (chunk at {i})")
        chunks.append(a_star)
        if cfile is not None:
            _atomic_save(a_star, cfile)
    out = torch.cat(chunks).contiguous()
    if path is not None:
        _atomic_save({"key": key, "meta": json.loads(key_src), "a_star": out}, path)
        shutil.rmtree(partial, ignore_errors=True)
    return out


def _atomic_save(obj: Any, path: Path) -> None:
    tmp = path.with_name(path.name + ".tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)


# ----------------------------------------------------------------------------------------
# one post-training run
# ----------------------------------------------------------------------------------------
def _make_optimizer(params: list[nn.Parameter], optimizer: str, lr: float, momentum: float):
    if optimizer == "adam":
        return torch.optim.Adam(params, lr=lr)
    if optimizer == "sgd":
        return torch.optim.SGD(params, lr=lr, momentum=momentum)
    raise ValueError(f"optimizer={optimizer!r}: expected one of {OPTIMIZERS}")


def _loss(method, logits, yb, a_hat, a_star_b, alpha, rec):
    if method == "FR":
        return fr_pt_loss(logits, yb, a_hat, a_star_b, alpha, rec)[0]
    return F.cross_entropy(logits, yb)


def posttrain_run(
    baseline: nn.Module,
    l_S: int,
    l_R: int,
    method: str,
    x_train: torch.Tensor,
    y_train: torch.Tensor,
    x_test: torch.Tensor,
    y_test: torch.Tensor,
    *,
    a_star: torch.Tensor | None = None,
    alpha: float = 0.1,
    rec: str = "mse",
    epochs: int = 10,
    lr: float = 1e-3,
    optimizer: str = "adam",
    momentum: float = 0.0,
    batch_size: int = 256,
    seed: int = 0,
    return_model: bool = False,
) -> dict:
    """Post-train layers ``l_S+1 … l_R`` of a copy of ``baseline`` by FR-PT or BP-PT.

    The data order of epoch ``e`` is ``randperm`` of a generator seeded with ``seed`` — the
    same for both methods.  Returns ``{"test_acc": [acc after epoch 1, …], "train_loss": […],
    "frozen_unchanged": True, ...}``; raises if a frozen parameter changed (checked bitwise).
    """
    if method not in METHODS:
        raise ValueError(f"method={method!r}: expected one of {METHODS}")
    if method == "FR" and a_star is None:
        raise ValueError("method='FR' needs a_star (the reconstructed a*_{l_R} of every training instance)")
    if epochs < 1 or batch_size < 1:
        raise ValueError(f"epochs={epochs}, batch_size={batch_size}: both must be >= 1")
    model = copy.deepcopy(baseline)
    params = set_trainable(model, l_S, l_R)
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    opt = _make_optimizer(params, optimizer, lr, momentum)
    blocks = model_blocks(model)
    n = int(x_train.shape[0])
    gen = torch.Generator().manual_seed(int(seed))
    torch.manual_seed(int(seed))  # any stochastic module (none in the seed 001 baselines)
    accs, losses = [], []
    t0 = time.perf_counter()
    for _ in range(epochs):
        model.train()
        perm = torch.randperm(n, generator=gen)
        total, count = 0.0, 0
        for i in range(0, n, batch_size):
            idx = perm[i : i + batch_size]
            xb, yb = x_train[idx], y_train[idx]
            logits, a_hat = forward_split(blocks, xb, l_S, l_R)
            loss = _loss(method, logits, yb, a_hat, a_star[idx] if a_star is not None else None, alpha, rec)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            total += float(loss.detach()) * int(idx.numel())
            count += int(idx.numel())
        losses.append(total / count)
        accs.append(accuracy_percent(model, x_test, y_test))
    changed = [n_ for n_, p in model.named_parameters() if n_ in frozen and not torch.equal(p.detach(), frozen[n_])]
    if changed:
        raise RuntimeError(f"frozen parameters changed during post-training of ({l_S}, {l_R}): {changed}")
    out = {
        "test_acc": accs,
        "train_loss": losses,
        "frozen_unchanged": True,
        "seconds": time.perf_counter() - t0,
    }
    if return_model:
        out["model"] = model
    return out


def training_memory(
    baseline: nn.Module,
    l_S: int,
    l_R: int,
    method: str,
    xb: torch.Tensor,
    yb: torch.Tensor,
    a_star_b: torch.Tensor | None,
    *,
    optimizer: str = "adam",
    momentum: float = 0.0,
    alpha: float = 0.1,
    rec: str = "mse",
) -> dict:
    """Peak tensor memory of one training step (MB = 2**20 bytes), by tensor accounting.

    ``saved`` — the bytes of the tensors autograd keeps for backward — is measured with
    ``saved_tensors_hooks`` on one forward pass of the batch (storages deduplicated, parameter
    and batch storages excluded because they are counted in their own terms); the other terms
    are exact sizes: all parameters, gradients of the trained ones, optimiser state (Adam: 2
    per trained parameter, SGD with momentum: 1, plain SGD: 0), the batch, and for FR the batch
    of ``a*`` targets.
    """
    model = copy.deepcopy(baseline)
    params = set_trainable(model, l_S, l_R)
    blocks = model_blocks(model)
    param_ptrs = {p.untyped_storage().data_ptr() for p in model.parameters()}
    batch = [xb, yb] + ([a_star_b] if (method == "FR" and a_star_b is not None) else [])
    batch_ptrs = {t.untyped_storage().data_ptr() for t in batch}
    saved: dict[int, int] = {}

    def pack(t):
        st = t.untyped_storage()
        ptr = st.data_ptr()
        if ptr not in param_ptrs and ptr not in batch_ptrs:
            saved[ptr] = st.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        logits, a_hat = forward_split(blocks, xb, l_S, l_R)
        loss = _loss(method, logits, yb, a_hat, a_star_b, alpha, rec)
    loss.backward()
    nb = lambda ts: sum(t.numel() * t.element_size() for t in ts)  # noqa: E731
    trained = nb(params)
    states = {"adam": 2, "sgd": 1 if momentum else 0}[optimizer]
    terms = {
        "params": nb(list(model.parameters())),
        "grads": trained,
        "optimizer_state": states * trained,
        "batch": nb(batch),
        "saved_activations": sum(saved.values()),
    }
    total = sum(terms.values())
    return {"mem_mb": total / 2**20, "mem_terms_bytes": terms}


# ----------------------------------------------------------------------------------------
# the study
# ----------------------------------------------------------------------------------------
@dataclass
class StudyResult:
    """What :func:`posttrain_study` returns (and writes to ``out_dir``)."""

    rows: list[dict]
    baseline_acc: float
    records: list[dict]
    config: dict
    markdown: str
    files: dict = field(default_factory=dict)


def _task_key(method: str, l_S: int, l_R: int, embedding: str, run_index: int) -> str:
    return f"{method}|{l_S}|{l_R}|{embedding if method == 'FR' else '-'}|{run_index}"


def _load_records(path: Path, config_hash: str) -> dict[str, dict]:
    """Completed runs of this configuration; a torn last line (killed mid-write) is dropped."""
    done: dict[str, dict] = {}
    if not path.exists():
        return done
    lines = path.read_text().splitlines()
    good = []
    for i, line in enumerate(lines):
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            if i == len(lines) - 1:  # interrupted while appending; rewrite without it
                path.write_text("".join(g + "\n" for g in good))
                break
            raise ValueError(f"{path}: line {i + 1} is not JSON; remove it or run with resume=False")
        good.append(line)
        if rec.get("config_hash") == config_hash:
            done[rec["key"]] = rec
    return done


def _append_record(path: Path, rec: dict) -> None:
    with open(path, "a") as fh:
        fh.write(json.dumps(rec, sort_keys=True) + "\n")
        fh.flush()
        os.fsync(fh.fileno())


def _mean_std(values: Sequence[float]) -> tuple[float, float]:
    a = np.asarray(values, dtype=np.float64)
    std = float(a.std(ddof=1)) if a.size > 1 else 0.0  # sample std over runs
    return float(a.mean()), std


def summarize(records: Iterable[dict], report_epochs: Sequence[int], baseline_acc: float) -> list[dict]:
    """Table rows (one per pair, method and embedding): #paras, memory, mean ± std per epoch."""
    groups: dict[tuple, list[dict]] = {}
    for r in records:
        groups.setdefault((r["l_R"], r["l_S"], r["embedding"], r["method"]), []).append(r)
    rows = []
    order = {"BP": 0, "FR": 1}
    emb_order = {"-": -1, **{e: i for i, e in enumerate(EMBEDDINGS)}}
    for k in sorted(groups, key=lambda k: (k[0], k[1], emb_order.get(k[2], 9), order[k[3]])):
        l_R, l_S, emb, method = k
        recs = sorted(groups[k], key=lambda r: r["run"])
        row = {
            "pt": f"{method}({l_S},{l_R})" + (f"[{emb}]" if method == "FR" else ""),
            "method": method,
            "l_S": l_S,
            "l_R": l_R,
            "embedding": emb,
            "n_params": recs[0]["n_params"],
            "mem_mb": recs[0]["mem_mb"],
            "runs": len(recs),
            "baseline_acc": baseline_acc,
        }
        for e in report_epochs:
            m, s = _mean_std([r["test_acc"][e - 1] for r in recs])
            row[f"epoch{e}_mean"], row[f"epoch{e}_std"] = m, s
        rows.append(row)
    return rows


def compare_methods(records: Iterable[dict], epoch: int, embedding: str) -> list[dict]:
    """Per pair: mean FR-PT − BP-PT test accuracy after ``epoch`` and Welch's t-test p-value
    (NaN when both samples are constant or a method has < 2 runs)."""
    from scipy import stats

    recs = list(records)
    out = []
    for s, r in sorted({(x["l_S"], x["l_R"]) for x in recs}, key=lambda p: (p[1], p[0])):
        bp = [x["test_acc"][epoch - 1] for x in recs if x["method"] == "BP" and (x["l_S"], x["l_R"]) == (s, r)]
        fr = [x["test_acc"][epoch - 1] for x in recs
              if x["method"] == "FR" and x["embedding"] == embedding and (x["l_S"], x["l_R"]) == (s, r)]
        if not bp or not fr:
            continue
        p = float("nan")
        if len(bp) > 1 and len(fr) > 1 and (np.ptp(bp) > 0 or np.ptp(fr) > 0):
            # One constant sample (e.g. FR pinned at the baseline) is legitimate input: Welch's
            # test stays defined; silence scipy's moment-precision warning about it.
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", RuntimeWarning)
                p = float(stats.ttest_ind(fr, bp, equal_var=False).pvalue)
        out.append({"l_S": s, "l_R": r, "epoch": epoch, "fr_minus_bp": float(np.mean(fr) - np.mean(bp)), "welch_p": p})
    return out


def format_markdown(rows: Sequence[dict], report_epochs: Sequence[int], baseline_acc: float, title: str = "") -> str:
    """Seed 001 Table 1-6 layout; the better method per pair and epoch is in bold."""
    best: dict[tuple, float] = {}
    for r in rows:
        for e in report_epochs:
            best_k = (r["l_S"], r["l_R"], e)
            best[best_k] = max(best.get(best_k, -1.0), r[f"epoch{e}_mean"])
    head = "| PT (l_S, l_R) | #paras | Mem (MB, est.) | " + " | ".join(f"epoch{e}" for e in report_epochs) + " |"
    sep = "|" + "---|" * (3 + len(report_epochs))
    lines = []
    if title:
        lines += [title, ""]
    lines += [f"Baseline test accuracy: {baseline_acc:.3f}%", "", head, sep]
    for r in rows:
        cells = []
        for e in report_epochs:
            m, s = r[f"epoch{e}_mean"], r[f"epoch{e}_std"]
            txt = f"{m:.3f} ± {s:.3f}"
            cells.append(f"**{txt}**" if m == best[(r["l_S"], r["l_R"], e)] else txt)
        lines.append(f"| {r['pt']} | {r['n_params']} | {r['mem_mb']:.3f} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _write_csv(rows: Sequence[dict], path: Path) -> None:
    import csv

    cols = list(rows[0]) if rows else []
    with open(path, "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=cols)
        w.writeheader()
        for r in rows:
            w.writerow(r)


def plot_pairs(records: Sequence[dict], baseline_acc: float, report_epochs: Sequence[int], path: Path, embedding: str) -> None:
    """Seed 001 Fig. 6 layout with the (l_S, l_R) pairs as columns: FR-PT box plots at the
    reported epochs (green/blue/red), BP-PT mean at the last epoch (gray), baseline (black)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    pairs = sorted({(r["l_R"], r["l_S"]) for r in records if r["method"] == "FR" and r["embedding"] == embedding})
    if not pairs:
        return
    colours = ["tab:green", "tab:blue", "tab:red", "tab:purple", "tab:orange"]
    fig, ax = plt.subplots(figsize=(max(5.0, 1.2 * len(pairs) + 2), 4.0))
    width = 0.8 / max(1, len(report_epochs))
    for j, e in enumerate(report_epochs):
        data = [
            [r["test_acc"][e - 1] for r in records if r["method"] == "FR" and r["embedding"] == embedding and (r["l_R"], r["l_S"]) == p]
            for p in pairs
        ]
        pos = [i + (j - (len(report_epochs) - 1) / 2) * width for i in range(len(pairs))]
        bp = ax.boxplot(data, positions=pos, widths=width * 0.9, patch_artist=True, manage_ticks=False)
        for b in bp["boxes"]:
            b.set_facecolor(colours[j % len(colours)])
            b.set_alpha(0.6)
        ax.plot([], [], color=colours[j % len(colours)], lw=6, alpha=0.6, label=f"FR-PT epoch {e}")
    last = report_epochs[-1]
    bp_means = []
    for p in pairs:
        v = [r["test_acc"][last - 1] for r in records if r["method"] == "BP" and (r["l_R"], r["l_S"]) == p]
        bp_means.append(np.mean(v) if v else np.nan)
    ax.plot(range(len(pairs)), bp_means, "o-", color="gray", label=f"BP-PT epoch {last} (mean)")
    ax.axhline(baseline_acc, color="black", lw=1.5, label="baseline")
    ax.set_xticks(range(len(pairs)))
    ax.set_xticklabels([f"({s},{r})" for r, s in pairs])
    ax.set_xlabel("(l_S, l_R)")
    ax.set_ylabel("test accuracy (%)")
    ax.set_title(f"FR-PT ({embedding.upper()}) vs BP-PT per (l_S, l_R)")
    ax.legend(fontsize=7, loc="best")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_embeddings(records: Sequence[dict], baseline_acc: float, l_S: int, l_R: int, epoch: int, path: Path) -> bool:
    """Seed 001 Fig. 5: mean test accuracy with a 95 % confidence interval (Student t) per
    output embedding (MA, NE, one-hot) for the pair ``(l_S, l_R)``; BP-PT as reference."""
    from scipy import stats

    groups = {}
    for emb in EMBEDDINGS:
        v = [r["test_acc"][epoch - 1] for r in records if r["method"] == "FR" and r["embedding"] == emb and (r["l_S"], r["l_R"]) == (l_S, l_R)]
        if v:
            groups[emb.upper() if emb != "onehot" else "one-hot"] = v
    if len(groups) < 2:
        return False
    bp = [r["test_acc"][epoch - 1] for r in records if r["method"] == "BP" and (r["l_S"], r["l_R"]) == (l_S, l_R)]
    if bp:
        groups["BP-PT"] = bp
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(groups)
    means = [float(np.mean(groups[k])) for k in names]
    half = []
    for k in names:
        v = np.asarray(groups[k], dtype=np.float64)
        half.append(float(stats.t.ppf(0.975, v.size - 1) * v.std(ddof=1) / math.sqrt(v.size)) if v.size > 1 else 0.0)
    fig, ax = plt.subplots(figsize=(4.5, 3.5))
    ax.bar(names, means, yerr=half, capsize=5, color=["tab:red", "tab:blue", "tab:gray", "silver"][: len(names)])
    ax.axhline(baseline_acc, color="black", lw=1.2, label="baseline")
    lo = min(m - h for m, h in zip(means, half))
    hi = max(m + h for m, h in zip(means, half))
    pad = max(0.05, 0.5 * (hi - lo))
    ax.set_ylim(min(lo, baseline_acc) - pad, max(hi, baseline_acc) + pad)
    ax.set_ylabel(f"test accuracy (%) after epoch {epoch}")
    ax.set_title(f"Output embedding ablation, FR-PT({l_S},{l_R}), 95% CI", fontsize=9)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


def _normalize_from_meta(meta: Mapping) -> Any:
    """The input normalisation the baseline was trained with (models.train metadata)."""
    mode = meta.get("normalize", "none") or "none"
    if mode in ("dataset", "custom") and meta.get("mean") and meta.get("std"):
        return (tuple(meta["mean"]), tuple(meta["std"]))  # the training split's statistics
    return mode


def _load_data(data: str | Mapping[str, torch.Tensor], root: str | None, normalize: Any, seed: int) -> tuple[dict, str]:
    if isinstance(data, Mapping):
        return {k: data[k] for k in ("x_train", "y_train", "x_test", "y_test")}, "custom"
    from .data import load_dataset

    ds = load_dataset(data, root=root, normalize=normalize, seed=seed)
    return {k: getattr(ds, k) for k in ("x_train", "y_train", "x_test", "y_test")}, str(data)


def _find_checkpoint(model: str, checkpoint, data_name: str, seed: int, out_dir: Path) -> Path | None:
    if checkpoint is not None:
        if not Path(checkpoint).exists():
            raise FileNotFoundError(f"checkpoint={str(checkpoint)!r}: no such file")
        return Path(checkpoint)
    shipped = Path(__file__).resolve().parent / "checkpoints" / f"{model}_{data_name}.pt"
    local = out_dir / f"baseline_{model}_{data_name}_seed{seed}.pt"
    for p in (shipped, local):
        if p.exists():
            return p
    return None


def load_baseline_and_data(
    model: str | nn.Module,
    checkpoint: str | os.PathLike | None,
    data: str | Mapping[str, torch.Tensor],
    root: str | None,
    seed: int,
    out_dir: Path,
    progress: bool,
    baseline_epochs: int = 40,
) -> tuple[nn.Module, dict, dict, str]:
    """The converged baseline and the data it is post-trained on.

    ``model`` may be a module (used as is), or a preset name: then ``checkpoint``, else the
    shipped ``models/checkpoints/<model>_<data>.pt``, else a checkpoint trained earlier by this
    function under ``out_dir``, else the preset is trained here (seeded; Adam without weight
    decay, the recipe of ``models/checkpoints/make_checkpoints.sh``) and saved under ``out_dir``.
    The data are loaded with the normalisation recorded in the checkpoint.
    """
    if isinstance(model, nn.Module):
        if not isinstance(data, Mapping) and checkpoint is not None:
            raise ValueError("pass either a module or checkpoint=, not both")
        d, name = _load_data(data, root, "none", 0)
        return model, {"source": "module given by the caller"}, d, name
    import importlib

    # `models.train` the module (models/__init__ re-exports the function `train` under that name)
    train_mod = importlib.import_module(".train", __package__)
    data_name = data if isinstance(data, str) else "custom"
    path = _find_checkpoint(model, checkpoint, data_name, seed, out_dir)
    if path is None:
        if not isinstance(data, str):
            raise ValueError("training a baseline preset needs a data set name, not tensors; pass checkpoint=")
        path = out_dir / f"baseline_{model}_{data_name}_seed{seed}.pt"
        digits = data_name.startswith("digits")
        train_mod.train(
            model, data_name, epochs=baseline_epochs, lr=3e-3 if digits else 1e-3, batch_size=32 if digits else 256,
            seed=seed, out=path, root=root, optimizer="adam", weight_decay=0.0, activation="tanh"
            if model in ("conv2_fc1", "conv3_fc2", "conv_channel_decreasing") else None,
            progress=progress,
        )
    # allowlist TorchVersion for weights_only loading: models.train writes meta["torch"] =
    # torch.__version__, a TorchVersion (a str subclass), which torch.load otherwise refuses
    with torch.serialization.safe_globals([torch.torch_version.TorchVersion]):
        net, meta = train_mod.load_checkpoint(path)
    meta = {"source": str(path), **_jsonable(meta)}
    meta.pop("history", None)
    if meta.get("model") not in (None, model) and checkpoint is None:
        raise ValueError(f"{path}: holds model {meta.get('model')!r}, not {model!r}")
    # the train/val/test split must be the one the baseline was trained on: its seed
    d, name = _load_data(data, root, _normalize_from_meta(meta), int(meta.get("seed", 0)))
    shape = tuple(d["x_train"].shape[1:])
    if meta.get("input_shape") and tuple(meta["input_shape"]) != shape:
        raise ValueError(f"{path}: the model takes inputs of shape {tuple(meta['input_shape'])}, "
                         f"data {name!r} has {shape}")
    return net, meta, d, name


def _jsonable(meta: Any) -> dict:
    if not isinstance(meta, Mapping):
        return {}
    out = {}
    for k, v in meta.items():
        try:
            json.dumps(v)
            out[str(k)] = v
        except TypeError:
            pass
    return out


def posttrain_study(
    model: str | nn.Module = "conv2_fc1",
    checkpoint: str | os.PathLike | None = None,
    data: str | Mapping[str, torch.Tensor] = "digits",
    root: str | None = None,
    pairs: Sequence[Sequence[int]] | None = None,
    alpha: float = 0.1,
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
    report_epochs: Sequence[int] = (1, 5, 10),
    ablation: bool = False,
    rec_loss: str = "auto",
    chunk_size: int = 256,
    on_run_end: Callable[[dict], None] | None = None,
    reconstructor: Reconstructor | None = None,
    deterministic: bool = True,
    print_table: bool = True,
    baseline_epochs: int = 40,
) -> StudyResult:
    """Run the FR-PT vs BP-PT study of seed 001 §4 and write its tables and figures.

    Parameters
    ----------
    model : preset name (``models.baselines``: "conv2_fc1", "conv3_fc2", ...) or an nn.Module
        with ``.blocks`` (or an nn.Sequential).  With a name and no ``checkpoint``, the shipped
        ``models/checkpoints/<model>_<data>.pt`` is used, else the preset is trained (seeded).
    data : data set name for ``models.data.load_dataset`` or a mapping with x_train, y_train,
        x_test, y_test tensors.
    pairs : ``(l_S, l_R)`` pairs, ``0 ≤ l_S < l_R ≤ L``; default every pair (as the paper).
    alpha : loss coefficient of Eq. 3 (seed 001 uses 0.1 for its 2Conv+1fc MNIST baseline).
    epochs, lr, optimizer, momentum, batch_size : post-training settings (paper: Adam, 1e-3, 256).
    runs : repetitions; run ``r`` uses seed ``seed + r`` for both methods.
    embedding : output embedding of the reconstruction ("ne", "ma", "onehot").
    solver : passed to ``linop.reconstruct.reconstruct``.
    rec_loss : "auto" (MSE, or L1 for MA as in §4.2), "mse" or "l1".
    ablation : also run the §4.2 embedding ablation (Fig. 5): FR-PT of the last layer only,
        pair ``(L-1, L)``, with each of MA, NE and one-hot.
    out_dir : results.jsonl (one line per finished run), table.json/.csv/.md, fig_*.png.
    cache_dir : reconstruction cache (default ``out_dir/cache``).
    resume : skip the (pair, method, embedding, run) keys already in results.jsonl for the same
        configuration; False starts the results file afresh.
    on_run_end : called with each record right after it is appended (e.g. to stop a study).
    """
    # ---- validate early --------------------------------------------------------------------
    if optimizer not in OPTIMIZERS:
        raise ValueError(f"optimizer={optimizer!r}: expected one of {OPTIMIZERS}")
    if embedding not in EMBEDDINGS:
        raise ValueError(f"embedding={embedding!r}: expected one of {EMBEDDINGS}")
    from linop.solvers import METHODS as SOLVE_METHODS

    if solver not in SOLVE_METHODS:  # else only noticed at the first reconstruction with a solve
        raise ValueError(f"solver={solver!r}: expected one of {SOLVE_METHODS}")
    if rec_loss not in ("auto", "mse", "l1"):
        raise ValueError(f"rec_loss={rec_loss!r}: expected 'auto', 'mse' or 'l1'")
    if not 0.0 <= float(alpha) <= 1.0:
        raise ValueError(f"alpha={alpha!r}: must lie in [0, 1]")
    for name, v in (("epochs", epochs), ("runs", runs), ("batch_size", batch_size), ("chunk_size", chunk_size)):
        if int(v) < 1:
            raise ValueError(f"{name}={v}: must be >= 1")
    if not lr > 0:
        raise ValueError(f"lr={lr}: must be > 0")
    rep = sorted({int(e) for e in report_epochs if 1 <= int(e) <= epochs}) or [int(epochs)]

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    cache = Path(cache_dir) if cache_dir is not None else out / "cache"
    old_det = torch.are_deterministic_algorithms_enabled()
    if deterministic:
        torch.use_deterministic_algorithms(True, warn_only=True)
    try:
        base, meta, d, data_name = load_baseline_and_data(model, checkpoint, data, root, seed, out, progress,
                                                          baseline_epochs)
        x_train, y_train = d["x_train"], d["y_train"].long()
        x_test, y_test = d["x_test"], d["y_test"].long()
        base = base.cpu().eval()
        dtype = next(base.parameters()).dtype
        x_train, x_test = x_train.to(dtype), x_test.to(dtype)
        check_block_decomposition(base, x_test[:4])
        n_layers = len(model_blocks(base))
        pair_list = _validate_pairs(pairs if pairs is not None else default_pairs(n_layers), n_layers)
        baseline_acc = accuracy_percent(base, x_test, y_test)

        config = {
            "model": model if isinstance(model, str) else type(model).__name__,
            "model_hash": state_dict_hash(base),
            "data": data_name,
            "data_hash": tensors_hash(x_train, y_train, x_test, y_test),
            "alpha": float(alpha),
            "epochs": int(epochs),
            "lr": float(lr),
            "optimizer": optimizer,
            "momentum": float(momentum),
            "batch_size": int(batch_size),
            "seed": int(seed),
            "solver": solver,
            "rec_loss": rec_loss,
        }
        config_hash = hashlib.sha256(json.dumps(config, sort_keys=True).encode()).hexdigest()[:16]
        (out / "config.json").write_text(
            json.dumps({**config, "config_hash": config_hash, "embedding": embedding, "pairs": pair_list,
                        "runs": runs, "baseline_acc": baseline_acc, "baseline": meta, "n_layers": n_layers},
                       indent=2, sort_keys=True)
        )
        res_path = out / "results.jsonl"
        if not resume and res_path.exists():
            res_path.unlink()
        done = _load_records(res_path, config_hash) if resume else {}

        # ---- tasks: (l_S, l_R, method, embedding, run) ------------------------------------
        tasks = [(s, r, m, embedding, k) for (s, r) in pair_list for m in METHODS for k in range(runs)]
        if ablation:
            for emb in EMBEDDINGS:
                for k in range(runs):
                    tasks.append((n_layers - 1, n_layers, "FR", emb, k))
                    tasks.append((n_layers - 1, n_layers, "BP", emb, k))
        seen, uniq = set(), []
        for t in tasks:
            key = _task_key(t[2], t[0], t[1], t[3], t[4])
            if key not in seen:
                seen.add(key)
                uniq.append((key, t))
        pending = [(key, t) for key, t in uniq if key not in done]

        a_star_cache: dict[tuple[int, str], torch.Tensor] = {}
        mem_cache: dict[tuple, dict] = {}
        bar = None
        if progress:
            from tqdm.auto import tqdm

            bar = tqdm(total=len(uniq), initial=len(uniq) - len(pending), desc="post-training runs", unit="run")
        for key, (l_S, l_R, method, emb, k) in pending:
            a_star = None
            rec = rec_loss if rec_loss != "auto" else rec_loss_for_embedding(emb)
            if method == "FR":
                if (l_R, emb) not in a_star_cache:
                    a_star_cache[(l_R, emb)] = reconstruct_features(
                        base, l_R, x_train, y_train, embedding=emb, solver=solver, cache_dir=cache,
                        chunk_size=chunk_size, progress=progress, reconstructor=reconstructor,
                    )
                a_star = a_star_cache[(l_R, emb)]
            mkey = (l_S, l_R, method, emb if method == "FR" else "-")
            if mkey not in mem_cache:
                nb = min(batch_size, int(x_train.shape[0]))
                mem_cache[mkey] = training_memory(
                    base, l_S, l_R, method, x_train[:nb], y_train[:nb],
                    a_star[:nb] if a_star is not None else None,
                    optimizer=optimizer, momentum=momentum, alpha=alpha, rec=rec,
                )
            if bar is not None:
                bar.set_postfix_str(f"{method}({l_S},{l_R}) {emb if method == 'FR' else ''} run {k}")
            result = posttrain_run(
                base, l_S, l_R, method, x_train, y_train, x_test, y_test, a_star=a_star, alpha=alpha,
                rec=rec, epochs=epochs, lr=lr, optimizer=optimizer, momentum=momentum,
                batch_size=batch_size, seed=seed + k,
            )
            record = {
                "key": key,
                "config_hash": config_hash,
                "l_S": l_S,
                "l_R": l_R,
                "method": method,
                "embedding": emb if method == "FR" else "-",
                "rec_loss": rec if method == "FR" else None,
                "run": k,
                "seed": seed + k,
                "n_params": trainable_parameter_count(base, l_S, l_R),
                "mem_mb": mem_cache[mkey]["mem_mb"],
                "mem_terms_bytes": mem_cache[mkey]["mem_terms_bytes"],
                **{kk: v for kk, v in result.items() if kk != "model"},
            }
            _append_record(res_path, record)
            done[key] = record
            if bar is not None:
                bar.update(1)
            if on_run_end is not None:
                on_run_end(record)
        if bar is not None:
            bar.close()
    finally:
        torch.use_deterministic_algorithms(old_det)

    records = [done[key] for key, _ in uniq]
    main_records = [r for r in records if r["method"] == "BP" or r["embedding"] == embedding]
    main_records = [r for r in main_records if (r["l_S"], r["l_R"]) in pair_list]
    rows = summarize(main_records, rep, baseline_acc)
    title = (f"FR-PT vs BP-PT, {config['model']} on {data_name}: alpha={alpha}, {optimizer} lr={lr}, "
             f"batch {batch_size}, {runs} runs, embedding {embedding.upper()}")
    md = format_markdown(rows, rep, baseline_acc, title)
    comparison = compare_methods(main_records, rep[-1], embedding)
    if comparison:
        md += (f"\n\nFR-PT − BP-PT after epoch {rep[-1]} (mean, percentage points; Welch t-test p): "
               + "; ".join(f"({c['l_S']},{c['l_R']}) {c['fr_minus_bp']:+.3f} (p={c['welch_p']:.2g})" for c in comparison))
    files = {"results": str(res_path)}
    (out / "table.json").write_text(json.dumps(
        {"config": config, "baseline_acc": baseline_acc, "rows": rows, "fr_vs_bp": comparison}, indent=2))
    _write_csv(rows, out / "table.csv")
    files.update(table_json=str(out / "table.json"), table_csv=str(out / "table.csv"))
    if ablation:
        abl = [r for r in records if (r["l_S"], r["l_R"]) == (n_layers - 1, n_layers)]
        abl_rows = summarize(abl, rep, baseline_acc)
        md += "\n\n" + format_markdown(abl_rows, rep, baseline_acc, f"Embedding ablation (seed 001 §4.2), pair ({n_layers - 1},{n_layers})")
        (out / "ablation.json").write_text(json.dumps(abl_rows, indent=2))
        if plot_embeddings(records, baseline_acc, n_layers - 1, n_layers, rep[-1], out / "fig5_embeddings.png"):
            files["fig5"] = str(out / "fig5_embeddings.png")
    (out / "table.md").write_text(md + "\n")
    files["table_md"] = str(out / "table.md")
    plot_pairs(main_records, baseline_acc, rep, out / "fig6_pairs.png", embedding)
    files["fig6"] = str(out / "fig6_pairs.png")
    if print_table:
        print(md)
    return StudyResult(rows=rows, baseline_acc=baseline_acc, records=records, config=config, markdown=md, files=files)


# ----------------------------------------------------------------------------------------
# CLI
# ----------------------------------------------------------------------------------------
def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default="conv2_fc1", help="baseline preset (models.baselines) [conv2_fc1]")
    p.add_argument("--checkpoint", default=None, help="checkpoint of a trained model (models.train format)")
    p.add_argument("--data", default="digits", help="digits | digits32 | mnist | cifar10 | cifar100 [digits]")
    p.add_argument("--root", default=None, help="directory holding MNIST / CIFAR files")
    p.add_argument("--pairs", nargs="+", default=None, metavar="LS:LR", help="(l_S, l_R) pairs, e.g. 0:1 1:3 [all]")
    p.add_argument("--alpha", type=float, default=0.1, help="loss coefficient of seed 001 Eq. 3 [0.1]")
    p.add_argument("--epochs", type=int, default=10)
    p.add_argument("--runs", type=int, default=10)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--optimizer", choices=OPTIMIZERS, default="adam")
    p.add_argument("--momentum", type=float, default=0.0, help="SGD momentum [0]")
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--embedding", choices=EMBEDDINGS, default="ne")
    p.add_argument("--solver", default="auto", help="reconstruction solver (linop.reconstruct) [auto]")
    p.add_argument("--rec-loss", choices=("auto", "mse", "l1"), default="auto")
    p.add_argument("--ablation", action="store_true", help="also run the §4.2 embedding ablation (Fig. 5)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="results/posttrain", help="output directory [results/posttrain]")
    p.add_argument("--cache-dir", default=None, help="reconstruction cache [OUT/cache]")
    p.add_argument("--no-resume", action="store_true", help="start the results file afresh")
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads")
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("--baseline-epochs", type=int, default=40, help="epochs when the baseline must be trained [40]")


def run(args: argparse.Namespace) -> int:
    if args.threads:
        torch.set_num_threads(args.threads)
    pairs = [parse_pair(s) for s in args.pairs] if args.pairs else None
    t0 = time.perf_counter()
    res = posttrain_study(
        model=args.model, checkpoint=args.checkpoint, data=args.data, root=args.root, pairs=pairs,
        alpha=args.alpha, epochs=args.epochs, lr=args.lr, optimizer=args.optimizer, momentum=args.momentum,
        runs=args.runs, embedding=args.embedding, solver=args.solver, batch_size=args.batch_size,
        seed=args.seed, out_dir=args.out, cache_dir=args.cache_dir, resume=not args.no_resume,
        progress=not args.no_progress, ablation=args.ablation, rec_loss=args.rec_loss,
        baseline_epochs=args.baseline_epochs,
    )
    print(f"\nwrote {', '.join(res.files.values())}  ({time.perf_counter() - t0:.1f} s)")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m models.posttrain", description=__doc__.splitlines()[0])
    add_arguments(parser)
    from linop.cli import run_command

    return run_command("python -m models.posttrain", run, parser.parse_args(argv))


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
