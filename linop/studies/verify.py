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
Each (image, dtype) result is written, as soon as it is computed, to
``out_dir/images/{dtype}/{i:05d}.npz``: per layer the signed ε (float64, 8 bytes per unit,
compressed), a fine histogram of |ε| and the per-image counts; for image 0 also c and ĉ of
every conv layer (for the Fig. E.1 figure).  Each file carries a cache key — a hash of the
model (every parameter of the equivalent network), of the image, the dtype, the scale k and
the threshold — and is reused on resume only when the key matches, so a changed model never
reuses stale results.  ``out_dir/index.json`` lists the entries.  Files are replaced
atomically (:mod:`linop.studies.store`), so an interruption loses at most the image in
flight.  Aggregation over images is exact (:mod:`linop.studies.errors`).
"""
from __future__ import annotations

import io
import math
import os
import sys
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
    N_FINE,
    N_HIST,
    _as_f64,
    aggregate,
    error_bins,
    layer_record,
    relative_error,
)

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
]

#: bump when the per-image file layout or the meaning of its numbers changes
CACHE_VERSION = 1

#: the paper's criteria (seed 000 §4.3): share of units with |ε| ≤ 1 % in every layer
CRITERIA: dict[str, float] = {"float64": 1.0, "float32": 0.9997}

_DTYPES = {"float32": torch.float32, "float64": torch.float64}

# one size parser for the whole library ("2GiB", "512MB", a byte count)
parse_size = parse_memory

# the per-image record (kept under its historical private name for the aggregation tests)
_image_layer_record = layer_record


# ============================================================================ report
@dataclass
class VerifyReport:
    """Result of :func:`verify`.

    Attributes
    ----------
    rows : one dict per (dtype, layer): ``layer, dtype, n_images, units, zeros, n_within,
        share_within, n_exact (ε = 0), n_nan, max_abs, median_abs, median_exact``.
    passed : dtype -> whether every layer met :data:`CRITERIA`.
    criteria_lines : the PASS/FAIL lines.
    files : name -> path of every output written.
    computed, cached : (image, dtype) results computed in this call / reused from disk.
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


def _cache_key(mhash: str, ihash: str, dtype: str, scale: float, threshold: float) -> str:
    return store.key_of({"v": CACHE_VERSION, "model": mhash, "image": ihash, "dtype": dtype,
                         "scale": float(scale).hex(), "threshold": float(threshold).hex()})


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
def _compute_image(net_d, x: torch.Tensor, layers: list[str], dtype: str, scale: float, threshold: float,
                   memory_budget: Any, keep_maps: bool) -> dict[str, np.ndarray]:
    """ε, histogram and stats of every layer for one image in one compute dtype."""
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
        arrays[f"eps:{layer}"] = eps
        arrays[f"hist:{layer}"], arrays[f"stats:{layer}"] = layer_record(eps, c, threshold)
        if keep_maps and len(net_d.unit_node(layer).out_shape) == 3:
            arrays[f"c:{layer}"] = c
            arrays[f"chat:{layer}"] = c_hat
    return arrays


def _run_images(net, x_all: torch.Tensor, dts: list[str], vlayers: list[str], mhash: str, desc: str,
                scale: float, threshold: float, memory_budget: Any, out: Path, resume: bool,
                progress: bool) -> tuple[dict[str, list[Path]], list[str], int, int]:
    """Compute (or reuse from the cache) every (image, dtype) result; index them as they land.

    Returns the per-dtype result files, the image hashes and the computed / cached counts."""
    from tqdm.auto import tqdm

    nets = {d: net.to(_DTYPES[d]) for d in dts}
    N = x_all.shape[0]
    ihashes = [image_hash(x_all[i]) for i in range(N)]
    index: dict[str, Any] = {"model_hash": mhash, "model": desc, "scale": scale, "threshold": threshold,
                             "layers": vlayers, "entries": {d: {} for d in dts}}
    files: dict[str, list[Path]] = {d: [] for d in dts}
    needed = [f"{p}:{l}" for l in vlayers for p in ("stats", "eps")]
    computed = cached = 0
    bar = tqdm(range(N), desc="verify", unit="img", disable=not progress, file=sys.stderr)
    for i in bar:
        for d in dts:
            key = _cache_key(mhash, ihashes[i], d, scale, threshold)
            path = out / "images" / d / f"{i:05d}.npz"
            if resume and store.npz_has(path, key, needed):
                cached += 1
            else:
                arrays = _compute_image(nets[d], x_all[i], vlayers, d, scale, threshold, memory_budget,
                                        keep_maps=(i == 0))
                meta = {"key": key, "version": CACHE_VERSION, "image": i, "image_hash": ihashes[i], "dtype": d,
                        "scale": scale, "threshold": threshold, "model_hash": mhash, "layers": vlayers}
                store.save_npz(path, arrays, meta)
                computed += 1
            files[d].append(path)
            index["entries"][d][str(i)] = {"file": str(path.relative_to(out)), "key": key, "image_hash": ihashes[i]}
        store.write_json(out / "index.json", index)  # progress survives an interruption
        bar.set_postfix(computed=computed, cached=cached)
    bar.close()
    return files, ihashes, computed, cached


def _write_figures(out: Path, net, hists: dict, files: dict[str, list[Path]], dts: list[str], desc: str,
                   n_images: int, scale: float, threshold: float, fig_layer: str | None,
                   fig_ch: list[int]) -> dict[str, Path]:
    """The error histograms (Figs. 6–11) and the feature maps of image 0 (Fig. E.1)."""
    written: dict[str, Path] = {}
    for d in dts:
        written[f"hist_{d}.png"] = _report.plot_error_histograms(
            out / f"hist_{d}.png", hists[d], LOG10_EDGES, d, threshold,
            title=f"{desc}: ε (seed 000 Eq. 16), {d}, {n_images} image(s), k = {scale:g}")
        if fig_layer is None:
            continue
        shape = net.unit_node(fig_layer).out_shape
        with np.load(files[d][0], allow_pickle=False) as z:
            c, c_hat = z[f"c:{fig_layer}"].reshape(shape), z[f"chat:{fig_layer}"].reshape(shape)
        name = f"feature_maps_{fig_layer}_{d}.png"
        written[name] = _report.plot_feature_maps(out / name, c, c_hat, fig_ch, fig_layer, d,
                                                  title=f"{desc}: {fig_layer}, image 0, {d} (seed 000 Fig. E.1)")
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
        threshold); ``False`` recomputes everything.
    threshold : |ε| bound of the table (the paper's 1 %).
    memory_budget : passed to ``linop.backmap`` (chunking of the hypersurfaces) and bounding
        the exact-median pass here.
    figure_layer, figure_channels : the Fig. E.1 layer (default: the first verified conv
        layer) and channels (default: the first 8) for image 0.
    name : how tables and figure titles name the model (default: the network's name or the
        module's class).

    Returns
    -------
    VerifyReport

    Raises
    ------
    TypeError
        ``model`` is neither a torch module nor an equivalent network.
    ValueError
        Any bad option or image batch, before any work is done.
    """
    dts = _check_options(scale, threshold, memory_budget, dtypes)
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
    vlayers = _select_layers(net, layers, skip_first_conv)
    fig_layer, fig_ch = _figure_choice(net, vlayers, figure_layer, figure_channels)

    out = store.output_dir(out_dir, "out_dir")
    (out / "images").mkdir(parents=True, exist_ok=True)
    files, ihashes, computed, cached = _run_images(net, x_all, dts, vlayers, mhash, desc, scale, threshold,
                                                   memory_budget, out, resume, progress)
    N = x_all.shape[0]
    rows: list[dict] = []
    hists: dict[str, dict[str, np.ndarray]] = {}
    for d in dts:
        r, hists[d] = aggregate(files[d], vlayers, d, memory_budget, progress=progress and N > 50)
        rows += r
    lines, passed = _report.criteria_lines(rows, CRITERIA, threshold)
    summary = {
        "model": desc, "model_hash": mhash, "n_images": N, "image_hashes": ihashes, "dtypes": dts,
        "layers": vlayers, "scale": scale, "threshold": threshold, "criteria": {d: CRITERIA.get(d) for d in dts},
        "passed": passed, "criteria_lines": lines, "rows": rows,
        "histogram": {"layout": HIST_LAYOUT, "log10_lo": LOG10_LO, "log10_hi": LOG10_HI,
                      "log10_step": LOG10_STEP, "file": "histograms.npz"},
    }
    written = {"summary.json": store.write_json(out / "summary.json", summary),
               "summary.csv": _report.write_csv(out / "summary.csv", rows)}
    buf = io.BytesIO()
    np.savez_compressed(buf, log10_edges=LOG10_EDGES, **{f"{d}:{l}": h for d in dts for l, h in hists[d].items()})
    written["histograms.npz"] = store.atomic_write_bytes(out / "histograms.npz", buf.getvalue())
    if figures:
        written.update(_write_figures(out, net, hists, files, dts, desc, N, scale, threshold, fig_layer, fig_ch))
    return VerifyReport(rows=rows, passed=passed, criteria_lines=lines, files=written, layers=vlayers, dtypes=dts,
                        n_images=N, computed=computed, cached=cached, model_hash=mhash, threshold=threshold,
                        scale=scale, out_dir=out, histograms=hists)
