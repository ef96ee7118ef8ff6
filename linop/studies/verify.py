"""The exact verification study of AdjointBackMapV2 (seed 000 §4.2–4.3, Tables 3–4, Figs. 6–11, E.1).

For every image x_n and every unit u of every verified unit layer l, the study compares the
unit's true pre-bias value ``c`` (computed by the network directly, first line of seed 000
Eq. 14 / Eq. 15) with its reconstruction from the effective hypersurface,
``ĉ = <x_n, H^I> + <x_b, H^b>`` (second line; ``linop.backmap`` computes it), through the
relative error of Eq. 16::

    ε = (ĉ − c) / c_{≠0},

where ``c_{≠0}`` replaces zeros of c by the smallest positive *normal* float of the compute
dtype (``np.finfo(dtype).tiny``).  Per layer and dtype it reports, like Tables 3–4, the share
of units with |ε| ≤ 1 % together with max and median |ε| and the counts (units, zeros in c).
The paper skips the first conv layer (§3.3: its kernels already live in the input space, so
its hypersurface is the kernel itself); so does the study unless asked otherwise.

The study takes objects — an :class:`~linop.network.EquivalentNetwork` or a piecewise-linear
``torch.nn.Module`` and a batch of images; loading checkpoints and data sets is the command
line's job (``linop verify``, :mod:`linop.cli.verify`).

Storage and resumption
----------------------
Each (image, dtype) result is written, as soon as it arrives, to
``out_dir/images/{dtype}/{i:05d}.npz`` where ``i`` is the absolute test-image number (so
shards over different image ranges share one directory).  By default a file holds per layer
the exact counts and maximum and a compact *signed* histogram of ε in 0.001-decade bins of
log10|ε| (:mod:`linop.studies.errors`; ~0.01–0.1 MB per image); with ``keep_eps=True`` also the
signed ε of every unit in float64 (the old format, 0.5–2.4 MB per image) for an exact median.
The Fig. E.1 arrays c and ĉ of the figure layer are stored for the figure image only, in
``out_dir/maps/{dtype}/{i:05d}.npz``.  Each file carries a cache key — a hash of the model
(every parameter of the equivalent network), of the image, the dtype, the scale k, the
threshold, the storage mode and the device kind — and is reused on resume only when the key
matches, so a changed model never reuses stale results.  ``out_dir/index.json`` maps the
entries (merged across runs).  Files are replaced atomically (:mod:`linop.studies.store`), so
an interruption loses at most the images in flight.

Execution
---------
One task per (image, dtype) on the executor of ``executor=`` (:mod:`linop.studies.execute`):
in-process by default, or on a Dask cluster (``"local"``, an address, a Client).  Workers
return arrays; the driver alone writes files.  A task is a pure function of its inputs, so
serial and distributed runs write the same arrays (torch single-threaded in Dask tasks; a
serial run uses the process's torch thread setting).
"""
from __future__ import annotations

import json
import math
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .. import hypersurface, validate
from ..utils import parse_memory
from . import report as _report
from . import store
from .errors import (
    HIST_LAYOUT,
    LOG10_EDGES,
    LOG10_HI,
    LOG10_LO,
    LOG10_STEP,
    MEDIAN_REL_UNCERTAINTY,
    N_FINE,
    N_HIST,
    SIGNED_LAYOUT,
    _as_f64,
    aggregate,
    error_bins,
    layer_record,
    relative_error,
    storage_note,
)
from . import heap as _heap
from .execute import Task, WorkerLost, make_executor, run_tasks

__all__ = [
    "CRITERIA",
    "VerifyReport",
    "relative_error",
    "error_bins",
    "aggregate",
    "verify",
    "model_hash",
    "image_hash",
    "parse_size",
    # the histogram layout of linop.studies.errors, re-exported for readers of the files
    "LOG10_EDGES",
    "LOG10_STEP",
    "N_FINE",
    "N_HIST",
    "SIGNED_LAYOUT",
    "MEDIAN_REL_UNCERTAINTY",
    "WorkerLost",
]

#: bump when the per-image file layout or the meaning of its numbers changes
CACHE_VERSION = 2

#: the paper's criteria (seed 000 §4.3): share of units with |ε| ≤ 1 % in every layer
CRITERIA: dict[str, float] = {"float64": 1.0, "float32": 0.9997}

_DTYPES = {"float32": torch.float32, "float64": torch.float64}

# one size parser for the whole library ("2GiB", "512MB", a byte count)
parse_size = parse_memory


# ============================================================================ report
@dataclass
class VerifyReport:
    """Result of :func:`verify`.

    Attributes
    ----------
    rows : one dict per (dtype, layer): ``layer, dtype, n_images, units, zeros, n_within,
        share_within, n_exact (ε = 0), n_nan, n_neg, n_pos, max_abs, median_abs,
        median_exact, median_lo, median_hi, median_rel_uncertainty``
        (:func:`linop.studies.errors.aggregate`).
    passed : dtype -> whether every layer met :data:`CRITERIA`.
    criteria_lines : the PASS/FAIL lines.
    files : name -> path of every output written.
    computed, cached : (image, dtype) results computed in this call / reused from disk.
    histograms, signed_histograms : dtype -> layer -> summed |ε| / signed histogram.
    indices : the absolute image numbers aggregated.
    keep_eps : the storage mode (True: ε kept, exact median).
    executor, device : where it ran; wall_s : seconds of the whole call; compute_s : of the
        (image, dtype) tasks alone, from submission to the last file written (a LocalCluster's
        start included).
    """

    rows: list[dict]
    passed: dict[str, bool]
    criteria_lines: list[str]
    files: dict[str, Path]
    layers: list[str]
    dtypes: list[str]
    n_images: int
    computed: int
    cached: int
    model_hash: str
    threshold: float
    scale: float
    out_dir: Path
    histograms: dict[str, dict[str, np.ndarray]] = field(default_factory=dict)
    signed_histograms: dict[str, dict[str, np.ndarray]] = field(default_factory=dict)
    indices: list[int] = field(default_factory=list)
    keep_eps: bool = False
    executor: str = "serial (in-process)"
    device: str = "cpu"
    wall_s: float = 0.0
    compute_s: float = 0.0

    def markdown(self) -> str:
        return _report.markdown_table(self.rows, self.threshold)

    def row(self, layer: str, dtype: str) -> dict:
        for r in self.rows:
            if r["layer"] == layer and r["dtype"] == dtype:
                return r
        raise KeyError(f"no row for layer {layer!r}, dtype {dtype!r}")


# ============================================================================ keys
def model_hash(net: Any, source: Any = None) -> str:
    """Content hash of the equivalent network (every node, operator parameter and x_b) and,
    when given, of the torch module it came from (:func:`linop.studies.store.content_hash`)."""
    objs = (net,) if source is None else (net, source)
    return store.content_hash(*objs, salt=f"linop.verify v{CACHE_VERSION}")


def image_hash(x: torch.Tensor) -> str:
    """Content hash of one image (its float64 values and shape)."""
    return store.content_hash(x.detach().cpu().to(torch.float64).contiguous())


def _cache_key(mhash: str, ihash: str, dtype: str, opts: dict) -> str:
    return store.key_of({"v": CACHE_VERSION, "model": mhash, "image": ihash, "dtype": dtype,
                         "scale": float(opts["scale"]).hex(), "threshold": float(opts["threshold"]).hex(),
                         "storage": opts["storage"], "device": opts["device_kind"]})


# ============================================================================ inputs
def _dtype_name(d: Any) -> str:
    if isinstance(d, torch.dtype):
        d = str(d).replace("torch.", "")
    try:
        name = np.dtype(d).name
    except TypeError:
        name = str(d)
    if name not in _DTYPES:
        raise ValueError(f"dtypes: unsupported dtype {d!r}; choose from {sorted(_DTYPES)}")
    return name


def _resolve_network(model: Any, input_shape: tuple[int, ...] | None, name: str | None):
    """(EquivalentNetwork in float64, hash, description) of a network or a torch module."""
    from ..network import EquivalentNetwork

    if isinstance(model, EquivalentNetwork):
        return model.to(torch.float64), model_hash(model), name or getattr(model, "name", "network")
    if isinstance(model, torch.nn.Module):
        from ..convert import from_torch

        if input_shape is None:
            raise ValueError("images: an (N, C, H, W) batch is needed to convert a torch module")
        net = from_torch(model, tuple(input_shape), torch.float64)
        return net, model_hash(net, model), name or type(model).__name__
    raise TypeError(
        "model must be a torch.nn.Module or an EquivalentNetwork, got "
        f"{type(model).__name__} (a checkpoint is loaded by the command line: `linop verify --checkpoint`)"
    )


def _select_layers(net, layers: Sequence[str] | None, skip_first_conv: bool) -> list[str]:
    available = list(net.unit_layers)
    if not available:
        raise ValueError("the network has no unit layers (conv / FC) to verify")
    if layers is None:
        chosen = available
        if skip_first_conv and len(net.unit_node(available[0]).out_shape) == 3 and len(available) > 1:
            chosen = available[1:]  # seed 000 §3.3: the first conv's kernels already live in X
        return chosen
    if isinstance(layers, str):
        layers = [layers]
    chosen = list(dict.fromkeys(layers))
    bad = [l for l in chosen if l not in available]
    if bad or not chosen:
        raise ValueError(f"layers: unknown unit layer(s) {bad or chosen!r}; this network has {available}")
    return [l for l in available if l in chosen]  # network order


def _prepare_images(images: Any, input_shape: tuple[int, ...] | None) -> torch.Tensor:
    # finite, real, non-empty, not half precision (linop.validate); integers cast to float64
    floating = np.asarray(images).dtype.kind == "f" if not torch.is_tensor(images) else images.is_floating_point()
    x = validate.image(images, None if floating else torch.float64, "images")
    if input_shape is not None and x.dim() == len(input_shape) and tuple(x.shape) == tuple(input_shape):
        x = x.unsqueeze(0)
    if x.dim() < 2 or x.shape[0] < 1:
        raise ValueError(f"images must be a batch (N, C, H, W) with N ≥ 1, got shape {tuple(x.shape)}")
    if input_shape is not None and tuple(x.shape[1:]) != tuple(input_shape):
        raise ValueError(f"images must have shape (N, {', '.join(map(str, input_shape))}), got {tuple(x.shape)}")
    return x.detach().cpu()


def _check_options(scale: Any, threshold: Any, memory_budget: Any, dtypes: Any) -> list[str]:
    """Validate the scalar options; return the dtype names (deduplicated, in order)."""
    if not (isinstance(scale, (int, float, np.number)) and math.isfinite(scale) and scale > 0):
        raise ValueError(f"scale must be a positive finite number (seed 000 Eq. 3 needs k > 0), got {scale!r}")
    if not (isinstance(threshold, (int, float, np.number)) and math.isfinite(threshold) and threshold > 0):
        raise ValueError(f"threshold must be a positive finite number, got {threshold!r}")
    parse_size(memory_budget)
    if isinstance(dtypes, (str, torch.dtype)):
        dtypes = [dtypes]
    dts = list(dict.fromkeys(_dtype_name(d) for d in dtypes))
    if not dts:
        raise ValueError("dtypes: give at least one of float32, float64")
    return dts


def _check_indices(indices: Any, n: int) -> list[int]:
    """The absolute image numbers of a batch of ``n`` images: distinct integers ≥ 0."""
    if indices is None:
        return list(range(n))
    if isinstance(indices, (str, bytes)) or not hasattr(indices, "__len__"):
        raise TypeError(f"indices must be a sequence of image numbers (e.g. range(100, 200)), got {indices!r}")
    idx = []
    for v in indices:
        if isinstance(v, (bool, np.bool_)) or not isinstance(v, (int, np.integer)) or v < 0:
            raise ValueError(f"indices must be non-negative integers, got {v!r}")
        idx.append(int(v))
    if len(idx) != n:
        raise ValueError(f"indices has {len(idx)} entries but images has {n}")
    if len(set(idx)) != n:
        raise ValueError("indices must be distinct (each names one test image's result file)")
    return idx


def _describe_indices(idx: list[int]) -> Any:
    """``"A:B"`` for a contiguous ascending range, else the list."""
    if idx == list(range(idx[0], idx[0] + len(idx))):
        return f"{idx[0]}:{idx[0] + len(idx)}"
    return idx


def _figure_choice(net, vlayers: list[str], figure_layer: str | None,
                   figure_channels: Sequence[int] | None) -> tuple[str | None, list[int]]:
    """The Fig. E.1 layer (default: the first verified conv layer) and its channels."""
    conv_layers = [l for l in vlayers if len(net.unit_node(l).out_shape) == 3]
    if figure_layer is not None and figure_layer not in conv_layers:
        raise ValueError(f"figure_layer must be one of the verified conv layers {conv_layers}, got {figure_layer!r}")
    fig_layer = figure_layer or (conv_layers[0] if conv_layers else None)
    if fig_layer is None:
        return None, []
    C = net.unit_node(fig_layer).out_shape[0]
    fig_ch = list(range(min(8, C))) if figure_channels is None else [int(c) for c in figure_channels]
    if not fig_ch or min(fig_ch) < 0 or max(fig_ch) >= C:
        raise ValueError(f"figure_channels must be in [0, {C}) for layer {fig_layer}, got {figure_channels!r}")
    return fig_layer, fig_ch


# ============================================================================ per image
#: per worker process: the network in each compute dtype / device, built once from the shared
#: float64 network (keyed by model hash, so a worker serving two studies keeps them apart)
_NETS: dict[tuple[str, str, str], Any] = {}


def _network_for(shared: dict, dtype: str):
    key = (shared["model_hash"], dtype, shared["device"])
    net = _NETS.get(key)
    if net is None:
        if len(_NETS) >= 4:  # a long-lived worker serving many models: bounded
            _NETS.clear()
        net = _NETS[key] = shared["net"].to(_DTYPES[dtype])
    return net


def _compute_image(net_d, x: torch.Tensor, layers: list[str], dtype: str, scale: float, threshold: float,
                   memory_budget: Any, keep_eps: bool, map_layer: str | None) -> dict[str, np.ndarray]:
    """Records (stats, compact signed histogram, optionally ε) of every layer for one image in
    one compute dtype, plus c and ĉ of ``map_layer`` (the Fig. E.1 image only).

    Everything runs on the device of ``x``; the only transfer to the host is that of the
    final c and ĉ of each layer."""
    tdt = _DTYPES[dtype]
    xd = x.to(tdt)
    # the true c: the network's own forward pass in the compute dtype (first line of Eq. 14)
    c_true = net_d.preactivations(xd.unsqueeze(0))
    # ĉ from the effective hypersurfaces (second line), looked up on the module at call time
    rec = hypersurface.reconstructed_activations(net_d, xd, layers=list(layers), scale=scale, dtype=tdt,
                                                 memory_budget=memory_budget)
    arrays: dict[str, np.ndarray] = {}
    for layer in layers:
        if layer not in rec:
            raise RuntimeError(f"linop.backmap returned no reconstruction for layer {layer!r}")
        c = _as_f64(c_true[layer])
        c_hat = _as_f64(rec[layer][1])
        if c_hat.shape != c.shape:
            raise RuntimeError(f"layer {layer}: reconstruction has {c_hat.size} units, the network {c.size}")
        eps = relative_error(c, c_hat, dtype)
        for name, a in layer_record(eps, c, threshold, keep_eps).items():
            arrays[f"{name}:{layer}"] = a
        if layer == map_layer:  # exact in the compute dtype (c, ĉ were computed in it)
            arrays[f"c:{layer}"] = c.astype(np.dtype(dtype))
            arrays[f"chat:{layer}"] = c_hat.astype(np.dtype(dtype))
    return arrays


def _verify_task(shared: dict, i: int, dtype: str, x: np.ndarray, want_maps: bool) -> dict[str, np.ndarray]:
    """One (image, dtype) task (run by :mod:`linop.studies.execute`, in-process or on a
    worker): the image's arrays, returned to the driver, which alone writes files."""
    _heap.apply(shared.get("heap", "system"))  # once per process (a worker's first task)
    device = torch.device(shared["device"])
    xt = torch.from_numpy(np.ascontiguousarray(x)).to(device)
    return _compute_image(_network_for(shared, dtype), xt, shared["layers"], dtype, shared["scale"],
                          shared["threshold"], shared["memory_budget"], shared["keep_eps"],
                          shared["map_layer"] if want_maps else None)


class _Index:
    """``out_dir/index.json``: (dtype, image) -> file, key, image hash, merged with what is on
    disk (shards of one study share the directory) and rewritten at most every few seconds
    and at the end — the files, which carry their keys, are the record; the index is a map."""

    def __init__(self, out: Path, header: dict, interval: float = 2.0):
        self.path, self.header, self.interval = out / "index.json", header, interval
        self.entries: dict[str, dict[str, dict]] = {}
        self.last = 0.0

    def add(self, dtype: str, i: int, entry: dict) -> None:
        self.entries.setdefault(dtype, {})[str(i)] = entry
        if time.monotonic() - self.last >= self.interval:
            self.write()

    def write(self) -> None:
        try:
            old = json.loads(self.path.read_text())
            merged = old["entries"] if isinstance(old, dict) and isinstance(old.get("entries"), dict) else {}
        except (OSError, ValueError, KeyError, TypeError):
            merged = {}  # missing or damaged: rebuilt from this run's entries
        for d, ents in self.entries.items():
            if not isinstance(merged.get(d), dict):
                merged[d] = {}
            merged[d].update(ents)
        merged = {d: dict(sorted(e.items(), key=lambda kv: int(kv[0]) if kv[0].isdigit() else -1))
                  for d, e in sorted(merged.items())}
        store.write_json(self.path, {**self.header, "entries": merged})
        self.last = time.monotonic()


def _run_images(net, x_all: torch.Tensor, indices: list[int], dts: list[str], vlayers: list[str], mhash: str,
                desc: str, opts: dict, out: Path, resume: bool, progress: bool, executor: Any, workers: Any,
                fig: tuple[str | None, int | None]) -> tuple[dict[str, list[Path]], list[str], int, int, float]:
    """Compute (or reuse from the cache) every (image, dtype) result; write and index each as
    it arrives.  Returns the per-dtype result files (in ``indices`` order), the image hashes,
    the computed / cached counts and the wall time of the computation."""
    ihashes = [image_hash(x_all[j]) for j in range(len(indices))]
    needed = [f"{p}:{l}" for l in vlayers for p in (("stats", "shead", "scount", "eps") if opts["keep_eps"]
                                                     else ("stats", "shead", "scount"))]
    fig_layer, fig_image = fig
    index = _Index(out, {"model_hash": mhash, "model": desc, "scale": opts["scale"],
                         "threshold": opts["threshold"], "storage": opts["storage"], "layers": vlayers})
    files: dict[str, list[Path]] = {d: [] for d in dts}
    tasks: list[Task] = []
    todo: dict[str, dict] = {}
    cached = 0
    for j, i in enumerate(indices):
        for d in dts:
            key = _cache_key(mhash, ihashes[j], d, opts)
            path = out / "images" / d / f"{i:05d}.npz"
            files[d].append(path)
            entry = {"file": str(path.relative_to(out)), "key": key, "image_hash": ihashes[j]}
            have = resume and store.npz_has(path, key, needed)
            want_maps = fig_layer is not None and i == fig_image and not (
                resume and store.npz_has(_maps_path(out, d, i), key, [f"c:{fig_layer}", f"chat:{fig_layer}"]))
            if have:
                cached += 1
                index.add(d, i, entry)
            if have and not want_maps:
                continue
            t = Task(key=f"linop-verify-{d}-{i:05d}-{key[:24]}" + ("-maps" if want_maps else ""),
                     label=f"image {i} ({d})", args=(i, d, x_all[j].numpy(), want_maps))
            tasks.append(t)
            todo[t.key] = {"i": i, "d": d, "key": key, "path": path, "entry": entry, "image_hash": ihashes[j],
                           "write_image": not have}
    computed = 0

    def on_result(t: Task, arrays: dict[str, np.ndarray]) -> None:
        nonlocal computed
        job = todo[t.key]
        i, d = job["i"], job["d"]
        meta = {"key": job["key"], "version": CACHE_VERSION, "image": i, "image_hash": job["image_hash"],
                "dtype": d, "scale": opts["scale"], "threshold": opts["threshold"], "model_hash": mhash,
                "layers": vlayers, "storage": opts["storage"], "device": opts["device_kind"]}
        maps = {k: arrays.pop(k) for k in [k for k in arrays if k.startswith(("c:", "chat:"))]}
        if maps:
            store.save_npz(_maps_path(out, d, i), maps, meta)
        if job["write_image"]:
            store.save_npz(job["path"], arrays, meta)
            computed += 1
            index.add(d, i, job["entry"])

    # computing fills lazy memos of the network's operators; store.content_hash skips them, so
    # the caller's object keeps its hash (and every later cache key)
    shared = {"net": net, "model_hash": mhash, "layers": vlayers, "scale": opts["scale"],
              "threshold": opts["threshold"], "memory_budget": opts["memory_budget"], "keep_eps": opts["keep_eps"],
              "map_layer": fig_layer, "device": opts["device"], "heap": opts["heap"]}
    shared_key = "linop-verify-net-" + store.key_of({"model": mhash, "opts": {k: str(v) for k, v in shared.items()
                                                                              if k != "net"}})[:24]
    try:
        wall = run_tasks(_verify_task, shared, shared_key, tasks, on_result, executor, workers,
                         progress=progress, desc="verify")
    finally:
        index.write()  # progress survives an interruption
    return files, ihashes, computed, cached, wall


def _maps_path(out: Path, dtype: str, i: int) -> Path:
    return out / "maps" / dtype / f"{i:05d}.npz"


def _write_figures(out: Path, net, hists: dict, signed: dict, dts: list[str], desc: str, n_images: int,
                   scale: float, threshold: float, fig_layer: str | None, fig_image: int | None,
                   fig_ch: list[int]) -> dict[str, Path]:
    """The error histograms (log10|ε| and signed ε, Figs. 6–11) and the feature maps of the
    figure image (Fig. E.1)."""
    written: dict[str, Path] = {}
    for d in dts:
        written[f"hist_{d}.png"] = _report.plot_error_histograms(
            out / f"hist_{d}.png", hists[d], LOG10_EDGES, d, threshold,
            title=f"{desc}: ε (seed 000 Eq. 16), {d}, {n_images} image(s), k = {scale:g}")
        written[f"signed_{d}.png"] = _report.plot_signed_errors(
            out / f"signed_{d}.png", signed[d], LOG10_EDGES, d, threshold,
            title=f"{desc}: signed ε (seed 000 Eq. 16), {d}, {n_images} image(s), k = {scale:g}")
        if fig_layer is None:
            continue
        shape = net.unit_node(fig_layer).out_shape
        with np.load(_maps_path(out, d, fig_image), allow_pickle=False) as z:
            c, c_hat = z[f"c:{fig_layer}"].reshape(shape), z[f"chat:{fig_layer}"].reshape(shape)
        name = f"feature_maps_{fig_layer}_{d}.png"
        written[name] = _report.plot_feature_maps(out / name, c, c_hat, fig_ch, fig_layer, d,
                                                  title=f"{desc}: {fig_layer}, image {fig_image}, {d} (seed 000 Fig. E.1)")
    return written


# ============================================================================ the study
def verify(
    model: Any,
    images: Any,
    dtypes: Sequence[Any] = ("float32", "float64"),
    layers: Sequence[str] | None = None,
    scale: float = 1 / 8,
    out_dir: str | os.PathLike = "results/verify",
    resume: bool = True,
    progress: bool = True,
    threshold: float = 0.01,
    skip_first_conv: bool = True,
    memory_budget: int | str = "2GiB",
    figure_layer: str | None = None,
    figure_channels: Sequence[int] | None = None,
    figures: bool = True,
    name: str | None = None,
    *,
    indices: Sequence[int] | None = None,
    keep_eps: bool = False,
    executor: Any = None,
    workers: int | None = None,
    device: Any = None,
    figure_image: int | None = None,
    heap: str = "system",
) -> VerifyReport:
    """Run the verification study of seed 000 §4.2 (Eqs. 14–16) on ``images``.

    Parameters
    ----------
    model : a piecewise-linear ``torch.nn.Module`` in eval mode (converted with
        ``linop.convert.from_torch``) or an :class:`~linop.network.EquivalentNetwork`.
    images : (N, C, H, W) tensor or array (the network's input normalisation applied).
    dtypes : compute dtypes, ``"float32"`` and / or ``"float64"``.
    layers : unit layers to verify; default every unit layer except the first conv
        (``skip_first_conv``, seed 000 §3.3) — the FC outputs included.
    scale : k of the scaling ``z = k·[x; x_b]`` (seed 000 Eq. 3; the paper uses 1/8).
    out_dir : where per-image results, ``summary.json``, ``summary.csv``, ``histograms.npz``
        and the figures go.
    resume : reuse per-image results whose cache key matches (model, image, dtype, scale,
        threshold, storage mode, device kind); ``False`` recomputes everything.
    threshold : |ε| bound of the table (the paper's 1 %).
    memory_budget : passed to ``linop.backmap`` (chunking of the hypersurfaces) and bounding
        the exact-median pass here.
    figure_layer, figure_channels : the Fig. E.1 layer (default: the first verified conv
        layer) and channels (default: the first 8).
    name : how tables and figure titles name the model (default: the network's name or the
        module's class).
    indices : the absolute test-image numbers of ``images`` (distinct, ≥ 0; default
        ``range(N)``).  Result files are named by them, so runs over different ranges
        (shards) share one ``out_dir``; the summary aggregates exactly the images given.
    keep_eps : also store the signed ε of every unit (float64, 8 B per unit) and report the
        exact median; default: the compact record only (exact counts and maximum, the median
        located to a 0.001-decade bin, see :mod:`linop.studies.errors`).
    executor : ``None`` / ``"serial"`` (in-process), ``"local"`` (a Dask ``LocalCluster`` of
        ``workers`` single-threaded processes), a scheduler address or a
        ``distributed.Client`` (:func:`linop.studies.execute.make_executor`).
    workers : worker processes for ``executor="local"`` (default: the CPU cores).
    device : ``"cpu"`` (default) or ``"cuda"`` / ``"cuda:k"``: where the network runs.
    figure_image : the absolute image number of the Fig. E.1 maps (default: the smallest
        of ``indices``).
    heap : ``"system"`` (default: the C library's allocator defaults) or ``"retain"``: the
        computing processes keep freed tangent batches in their heap instead of handing them
        back to the kernel — 1.4–1.5× less CPU per image on ResNet20, but the resident size
        stays at its high-water mark plus fragmentation, beyond what ``memory_budget``
        bounds; see :mod:`linop.studies.heap`.  It changes no number.

    Returns
    -------
    VerifyReport (with ``computed``, ``cached`` and ``wall_s``).

    Raises
    ------
    TypeError
        ``model`` is neither a torch module nor an equivalent network.
    ValueError
        Any bad option or image batch, before any work is done.
    ImportError
        A Dask executor without Dask installed.
    ConnectionError
        A scheduler address where no scheduler answers.
    WorkerLost
        A task whose worker died repeatedly (every other result is written).
    """
    t_start = time.perf_counter()
    dts = _check_options(scale, threshold, memory_budget, dtypes)
    heap_mode = _heap.check_heap(heap)
    dev = validate.device(device)
    if not isinstance(keep_eps, (bool, np.bool_)):
        raise TypeError(f"keep_eps must be True or False, got {keep_eps!r}")
    pre_shape = tuple(images.shape[1:]) if isinstance(images, (torch.Tensor, np.ndarray)) and np.ndim(images) >= 2 else None
    net, mhash, desc = _resolve_network(model, pre_shape, name)
    if not net.piecewise_linear:
        kinds = sorted({n.kind for n in net.nodes if getattr(n, "kind", None) and not n.piecewise_linear})
        raise ValueError(
            f"the network has non-piecewise-linear activations {kinds}: the identity "
            "c = <x, H^I> + <x_b, H^b> of seed 000 Eq. 3 holds only for piecewise-linear networks "
            "(ReLU / LeakyReLU / PReLU, max / average pooling)"
        )
    x_all = _prepare_images(images, net.input_shape)
    idx = _check_indices(indices, x_all.shape[0])
    vlayers = _select_layers(net, layers, skip_first_conv)
    fig_layer, fig_ch = _figure_choice(net, vlayers, figure_layer, figure_channels)
    if figure_image is not None and figure_image not in idx:
        raise ValueError(f"figure_image {figure_image!r} is not one of the images of this run (indices)")
    fig_image = (min(idx) if figure_image is None else int(figure_image)) if (figures and fig_layer) else None
    fig_layer = fig_layer if fig_image is not None else None
    ex = make_executor(executor, workers, environ=_heap.worker_environ(heap_mode))  # a bad choice fails here

    storage = "keep_eps" if keep_eps else "compact"
    opts = {"scale": scale, "threshold": threshold, "memory_budget": memory_budget, "keep_eps": bool(keep_eps),
            "storage": storage, "device": str(dev), "device_kind": dev.type, "heap": heap_mode}
    try:
        out = store.output_dir(out_dir, "out_dir")
        (out / "images").mkdir(parents=True, exist_ok=True)
        files, ihashes, computed, cached, compute_s = _run_images(net, x_all, idx, dts, vlayers, mhash, desc, opts, out,
                                                          resume, progress, ex, None, (fig_layer, fig_image))
    finally:
        if ex is not executor:
            ex.close()
    N = len(idx)
    rows: list[dict] = []
    hists: dict[str, dict[str, np.ndarray]] = {}
    signed: dict[str, dict[str, np.ndarray]] = {}
    for d in dts:
        r, hists[d], signed[d] = aggregate(files[d], vlayers, d, memory_budget, progress=progress and N > 50,
                                           exact_median=bool(keep_eps))
        rows += r
    lines, passed = _report.criteria_lines(rows, CRITERIA, threshold)
    summary = {
        "model": desc, "model_hash": mhash, "n_images": N, "images": _describe_indices(idx),
        "image_hashes": ihashes, "dtypes": dts, "layers": vlayers, "scale": scale, "threshold": threshold,
        "device": dev.type, "criteria": {d: CRITERIA.get(d) for d in dts},
        "passed": passed, "criteria_lines": lines, **storage_note(bool(keep_eps)), "rows": rows,
        "histogram": {"layout": HIST_LAYOUT, "signed_layout": SIGNED_LAYOUT, "log10_lo": LOG10_LO,
                      "log10_hi": LOG10_HI, "log10_step": LOG10_STEP, "file": "histograms.npz"},
    }
    written = {"summary.json": store.write_json(out / "summary.json", summary),
               "summary.csv": _report.write_csv(out / "summary.csv", rows)}
    # the summed histograms (int64 counts, mostly zero bins) deflated at the caches' level: a
    # ResNet20 float32 set (18.5 MB) in 30 ms and 364 kB instead of numpy's default level's 80 ms, 252 kB
    hist_arrays = {"log10_edges": LOG10_EDGES, **{f"{d}:{l}": h for d in dts for l, h in hists[d].items()},
                   **{f"{d}:{l}:signed": h for d in dts for l, h in signed[d].items()}}
    written["histograms.npz"] = store.atomic_write_bytes(out / "histograms.npz", store.npz_bytes(hist_arrays))
    if figures:
        written.update(_write_figures(out, net, hists, signed, dts, desc, N, scale, threshold, fig_layer, fig_image,
                                      fig_ch))
    return VerifyReport(rows=rows, passed=passed, criteria_lines=lines, files=written, layers=vlayers, dtypes=dts,
                        n_images=N, computed=computed, cached=cached, model_hash=mhash, threshold=threshold,
                        scale=scale, out_dir=out, histograms=hists, signed_histograms=signed, indices=idx,
                        keep_eps=bool(keep_eps), executor=ex.describe(), device=str(dev),
                        wall_s=time.perf_counter() - t_start, compute_s=compute_s)
