"""The FR-PT targets ``a*_{l_R}`` (seed 001 §3–4): reconstructed from the labels, cached.

``a*_{l_R}`` is the feature map of layer ``l_R`` reconstructed from the embedding of the true
label (NE / MA, seed 001 §3.3, or the one-hot code) through the frozen layers above ``l_R``
(the reverse steps of §3: MDP/CCP through the linear maps, inverse activations, pooling by
copying).  :func:`reconstruct_features` computes it once per ``(model, l_R, embedding,
solver, data)`` for every training instance and caches it on disk
(:mod:`linop.studies.store`): chunk by chunk while it runs (so an interrupted reconstruction
resumes), as one validated file when done.

``paper=True`` reconstructs by seed 001's method (:func:`linop.reverse.reconstruct`'s paper
mode: pooling copied back in every window, the §3.2 FFT solve, MDP / CCP by channels); the
mode is part of the cache key, and the per-step reports of the reverse walk (both MDP/CCP
labels, the solver of every step) are kept with the cached tensor.
"""
from __future__ import annotations

import json
import os
import shutil
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from torch import nn

from .. import store
from .blocks import layer_features, model_blocks

__all__ = [
    "CACHE_VERSION",
    "EMBEDDINGS",
    "Reconstructor",
    "default_reconstructor",
    "output_target",
    "reconstruct_features",
]

EMBEDDINGS = ("ne", "ma", "onehot")
CACHE_VERSION = 2  # bump when the reconstruction changes in a way that invalidates caches

#: (upper module, shape of â_{l_R} without batch, embedding, solver) -> f(â_{l_R}, y) -> a*_{l_R};
#: called with ``paper=True`` as well in paper mode.  ``f.steps`` (optional): the reverse-step
#: summaries of the last chunk, recorded with the cache.
Reconstructor = Callable[[nn.Module, tuple, str, str], Callable[[torch.Tensor, torch.Tensor], torch.Tensor]]


def output_target(a_hat_L: torch.Tensor, y: torch.Tensor, embedding: str) -> torch.Tensor:
    """``a*_L`` from the label: NE / MA (seed 001 §3.3) or the one-hot code (§4.2), one dispatch
    (``linop.reverse.embed``)."""
    from ...reverse.embed import embed

    return embed(a_hat_L, y, norm=embedding)


def default_reconstructor(upper: nn.Module, in_shape: tuple, embedding: str, solver: str, paper: bool = False):
    """Reconstruct ``a*_{l_R}`` through the frozen ``upper`` part with linop (seed 001 §3).

    ``upper`` maps ``â_{l_R}`` to ``â_L``; it is converted once to an equivalent network in
    float64 (``linop.convert.from_torch``) and every chunk is reconstructed from its labels to
    that network's input (``linop.reverse.reconstruct(..., to_layer="input")``).  With nothing
    above ``l_R`` (``l_R = L``) the target is the output embedding itself.  ``paper``: seed
    001's method (``reconstruct(..., paper=True)``).  The returned function's ``steps`` holds
    the step summaries of the last chunk (node, kind, case, paper_case, solved_as, method).
    """
    if len(list(upper.children())) == 0:

        def output_embedding(a_hat: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
            return output_target(a_hat.to(torch.float64), y, embedding)

        output_embedding.steps = []
        return output_embedding

    from ...convert import from_torch
    from ...reverse.walk import reconstruct

    net = from_torch(upper, tuple(in_shape), dtype=torch.float64)

    def reconstruct_chunk(a_hat: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        # keep=() : only a*_{to_layer} and the output are kept (bounded memory per chunk)
        rec = reconstruct(net, a_hat.to(torch.float64), y, to_layer="input", embedding=embedding,
                          solver=solver, keep=(), paper=paper)
        reconstruct_chunk.steps = _merge_steps(reconstruct_chunk.steps, [st.summary() for st in rec.steps])
        return rec.a_star.reshape(a_hat.shape)

    reconstruct_chunk.steps = []
    return reconstruct_chunk


def _merge_steps(seen: list[dict], new: list[dict]) -> list[dict]:
    """The labels of the reverse steps over all chunks so far (no timings): per step the labels
    of a chunk where it solved something (a chunk whose samples were all unchanged reports
    "unchanged" / "none"), and ``n_solved`` summed over the chunks."""
    keys = ("node", "kind", "case", "paper_case", "solved_as", "method")
    out = []
    for i, st in enumerate(new):
        old = seen[i] if i < len(seen) and seen[i]["node"] == st.get("node") else None
        label = {k: st.get(k) for k in keys}
        n = int(st.get("n_solved", 0))
        if old is not None:
            if old.get("case") != "unchanged" or st.get("case") == "unchanged":
                label = {k: old.get(k) for k in keys}
            n += int(old.get("n_solved", 0))
        out.append({**label, "n_solved": n})
    return out


def _cache_fields(model: nn.Module, l_R: int, embedding: str, solver: str, x: torch.Tensor, y: torch.Tensor,
                  dtype: torch.dtype, mode: str = "linop") -> dict:
    """What the cached ``a*`` depends on: the weights, the layer, the embedding, the solver,
    the mode ("linop" / "paper"), the data and the stored dtype (digests, not data)."""
    return {"version": CACHE_VERSION, "state": store.content_hash(model.state_dict()), "layer": int(l_R),
            "embedding": embedding, "solver": solver, "mode": mode, "data": store.content_hash(x, y),
            "dtype": str(dtype)}


def _reconstruct_chunks(model: nn.Module, l_R: int, x: torch.Tensor, y: torch.Tensor, f, chunk_size: int,
                        partial: Path | None, progress: str | None) -> torch.Tensor:
    """``a*`` chunk by chunk; with ``partial``, finished chunks are saved there and reused."""
    dtype = next(model.parameters()).dtype
    starts = list(range(0, int(x.shape[0]), chunk_size))
    if progress:
        from tqdm.auto import tqdm

        starts = tqdm(starts, desc=progress, unit="chunk", leave=False)
    chunks = []
    for i in starts:
        cfile = partial / f"chunk_{i:09d}_{chunk_size}.pt" if partial is not None else None
        if cfile is not None and (done := store.load_pt(cfile)) is not None:
            chunks.append(done)
            continue
        a_hat = layer_features(model, x[i : i + chunk_size], l_R)
        a_star = f(a_hat, y[i : i + chunk_size]).detach().cpu().to(dtype).reshape(a_hat.shape)
        if not torch.isfinite(a_star).all():
            raise FloatingPointError(f"reconstruction of a*_{l_R} produced non-finite values (chunk at {i})")
        chunks.append(a_star)
        if cfile is not None:
            store.save_pt(a_star, cfile)
    return torch.cat(chunks).contiguous()


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
    paper: bool = False,
    info: dict | None = None,
) -> torch.Tensor:
    """``a*_{l_R}`` for every row of ``x`` (seed 001 §4: layers above ``l_R`` frozen), cached.

    The cache file is keyed by the content hash of the model's state dict, ``l_R``, the
    embedding, the solver and the data (``x`` and ``y``); a repeated call loads it instead of
    recomputing and returns a bit-identical tensor.  Chunks are written as they finish
    (``<file>.partial/``), so an interrupted reconstruction resumes.  The result is stored in
    the model's parameter dtype (the dtype training uses); the solves run in float64.

    ``paper=True``: seed 001's reconstruction (paper mode of :func:`linop.reverse.reconstruct`);
    a custom ``reconstructor`` is then called with ``paper=True``.  ``info``, when given, is
    filled with ``mode`` and ``steps`` (the reverse-step labels, from the cache on a hit).

    Raises
    ------
    ValueError
        Unknown embedding, ``l_R`` outside ``[1, L]`` or ``chunk_size < 1``.
    MemoryError
        ``a*`` for every instance would exceed ``max_bytes``.
    """
    if embedding not in EMBEDDINGS:
        raise ValueError(f"embedding={embedding!r}: expected one of {EMBEDDINGS}")
    blocks = model_blocks(model)
    if not 1 <= l_R <= len(blocks):
        raise ValueError(f"l_R={l_R}: need 1 <= l_R <= L={len(blocks)}")
    if chunk_size < 1:
        raise ValueError(f"chunk_size={chunk_size}: must be >= 1")
    dtype = next(model.parameters()).dtype
    feat_shape = tuple(layer_features(model, x[:1], l_R).shape[1:])
    nbytes = int(x.shape[0]) * int(np.prod(feat_shape)) * torch.empty((), dtype=dtype).element_size()
    if nbytes > max_bytes:
        raise MemoryError(
            f"a*_{l_R} for {int(x.shape[0])} instances of shape {feat_shape} needs {nbytes / 2**30:.2f} GiB "
            f"(> max_bytes={max_bytes / 2**30:.2f} GiB); select fewer training instances or a later l_R"
        )
    mode = "paper" if paper else "linop"
    fields = _cache_fields(model, l_R, embedding, solver, x, y, dtype, mode)
    key = store.key_of(fields)
    info = info if info is not None else {}
    info["mode"] = mode
    path = partial = None
    if cache_dir is not None:
        path = Path(cache_dir) / f"astar_l{l_R}_{embedding}_{solver}_{mode}_{key[:20]}.pt"
        if (payload := store.load_pt(path, key)) is not None:
            info["steps"] = list(payload.get("steps", []))
            return payload["a_star"]
        partial = path.parent / f"{path.stem}.partial"
        partial.mkdir(parents=True, exist_ok=True)
    factory = reconstructor or default_reconstructor
    upper = nn.Sequential(*blocks[l_R:]).eval()
    f = factory(upper, feat_shape, embedding, solver, paper=True) if paper else factory(upper, feat_shape, embedding,
                                                                                           solver)
    out = _reconstruct_chunks(model, l_R, x, y, f, chunk_size, partial,
                              f"reconstruct a*_{l_R} ({embedding}, {mode})" if progress else None)
    info["steps"] = list(getattr(f, "steps", None) or [])
    if path is not None:
        store.save_pt({"key": key, "meta": json.loads(json.dumps(fields)), "a_star": out, "steps": info["steps"]},
                      path)
        shutil.rmtree(partial, ignore_errors=True)
    return out
