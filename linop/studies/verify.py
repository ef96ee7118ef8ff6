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

Storage and resumption
----------------------
Each (image, dtype) result is written, as soon as it is computed, to
``out_dir/images/{dtype}/{i:05d}.npz``: per layer the signed ε (float64, 8 bytes per unit,
compressed), a fine histogram of |ε| and the per-image counts; for image 0 also c and ĉ of
every conv layer (for the Fig. E.1 figure).  Each file carries a cache key — a hash of the
model (every parameter of the equivalent network), of the image, the dtype, the scale k and
the threshold — and is reused on resume only when the key matches, so a changed model never
reuses stale results.  ``out_dir/index.json`` lists the entries.  Files are replaced
atomically, so an interruption loses at most the image in flight.

Aggregation is exact: counts and maxima add up over images; the median |ε| is found in two
passes (the fine histogram locates the bin of the middle order statistics, then only the
values in that bin are read back and selected), so memory stays bounded by one bin, not by
the number of units × images.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import sys
import types
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
import torch

from . import report as _report
from ..utils import parse_memory

__all__ = [
    "CRITERIA",
    "VerifyReport",
    "relative_error",
    "error_bins",
    "aggregate",
    "verify",
    "parse_size",
    "add_arguments",
    "run",
]

#: bump when the per-image file layout or the meaning of its numbers changes
CACHE_VERSION = 1

#: the paper's criteria (seed 000 §4.3): share of units with |ε| ≤ 1 % in every layer
CRITERIA: dict[str, float] = {"float64": 1.0, "float32": 0.9997}

_DTYPES = {"float32": torch.float32, "float64": torch.float64}

# Fine histogram of |ε| on a log scale: bins of 0.01 decade from 1e-20 to 1e20.  The fine
# bins exist so that the exact median needs to re-read only the values of one bin.
LOG10_LO, LOG10_HI, LOG10_STEP = -20.0, 20.0, 0.01
N_FINE = int(round((LOG10_HI - LOG10_LO) / LOG10_STEP))
LOG10_EDGES = LOG10_LO + LOG10_STEP * np.arange(N_FINE + 1)
_LIN_EDGES = 10.0 ** LOG10_EDGES
#: histogram layout: [ε = 0, 0 < |ε| < 1e-20, N_FINE bins, |ε| ≥ 1e20 (incl. inf), nan]
N_HIST = N_FINE + 4
_STATS = ("units", "zeros", "n_within", "max_abs", "n_nan")


# ============================================================================ the numbers
def relative_error(c: Any, c_hat: Any, dtype: Any) -> np.ndarray:
    """Seed 000 Eq. 16: ``ε = (ĉ − c) / c_{≠0}`` with zeros of c replaced by the smallest
    positive normal float of ``dtype`` (the compute dtype).

    Evaluated in float64: c and ĉ of a float32 / float64 computation are exact in float64, so
    the only rounding added is that of one float64 subtraction and division.
    """
    c = _as_f64(c)
    c_hat = _as_f64(c_hat)
    if c.shape != c_hat.shape:
        raise ValueError(f"relative_error: c has shape {c.shape} but c_hat has shape {c_hat.shape}")
    tiny = np.finfo(_numpy_dtype(dtype)).tiny
    denom = np.where(c == 0, tiny, c)
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        return (c_hat - c) / denom


def error_bins(abs_eps: np.ndarray) -> np.ndarray:
    """Histogram slot of every |ε| (layout of ``N_HIST`` above).  Monotone in |ε| by
    construction (a ``searchsorted`` on fixed edges), which the exact median relies on."""
    a = np.asarray(abs_eps, dtype=np.float64)
    idx = 1 + np.searchsorted(_LIN_EDGES, a, side="right")  # under -> 1, bin b -> 2+b, over -> N_FINE+2
    idx[a == 0] = 0
    idx[np.isnan(a)] = N_FINE + 3
    return idx.astype(np.int64)


def _image_layer_record(eps: np.ndarray, c: np.ndarray, threshold: float) -> tuple[np.ndarray, np.ndarray]:
    """Per-image, per-layer histogram counts and stats ``[units, zeros, n_within, max_abs, n_nan]``."""
    a = np.abs(eps)
    hist = np.bincount(error_bins(a), minlength=N_HIST).astype(np.int64)
    n_nan = int(np.isnan(a).sum())
    stats = np.array(
        [a.size, int((c == 0).sum()), int((a <= threshold).sum()), float(a.max()) if a.size else 0.0, n_nan],
        dtype=np.float64,
    )
    return hist, stats


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


# ============================================================================ helpers
def _as_f64(a: Any) -> np.ndarray:
    if isinstance(a, torch.Tensor):
        a = a.detach().cpu().to(torch.float64).numpy()
    return np.asarray(a, dtype=np.float64).reshape(-1)


def _numpy_dtype(dtype: Any) -> np.dtype:
    if isinstance(dtype, torch.dtype):
        return np.dtype(str(dtype).replace("torch.", ""))
    return np.dtype(dtype)


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


# one size parser for the whole library ("2GiB", "512MB", a byte count)
parse_size = parse_memory


def _hash_update(h, obj: Any, depth: int = 0, seen: set | None = None) -> None:
    """Feed a structural description of ``obj`` (tensors by value) into hash ``h``."""
    seen = set() if seen is None else seen
    h.update(type(obj).__name__.encode())
    if isinstance(obj, torch.Tensor):
        t = obj.detach().cpu().contiguous()
        h.update(f"{t.dtype}{tuple(t.shape)}".encode())
        h.update(t.numpy().tobytes() if t.dtype != torch.bfloat16 else t.float().numpy().tobytes())
    elif isinstance(obj, np.ndarray):
        h.update(f"{obj.dtype}{obj.shape}".encode())
        h.update(np.ascontiguousarray(obj).tobytes() if obj.dtype != object else repr(obj).encode())
    elif obj is None or isinstance(obj, (bool, int, float, str, bytes, complex, np.generic, np.dtype, torch.dtype, slice)):
        h.update(repr(obj).encode())
    elif isinstance(obj, (list, tuple)):
        h.update(str(len(obj)).encode())
        for v in obj:
            _hash_update(h, v, depth + 1, seen)
    elif isinstance(obj, dict):
        for k in sorted(obj, key=str):
            if "cache" in str(k):  # lazily filled caches (e.g. Operator._param_cache) carry no new information
                continue
            h.update(str(k).encode())
            _hash_update(h, obj[k], depth + 1, seen)
    elif hasattr(obj, "__dict__") and not isinstance(obj, (type, types.FunctionType, types.MethodType, types.ModuleType)):
        if id(obj) in seen or depth > 8:
            return
        seen.add(id(obj))
        if isinstance(obj, torch.nn.Module):
            h.update(repr(obj).encode())
            _hash_update(h, dict(obj.state_dict()), depth + 1, seen)
        else:
            _hash_update(h, vars(obj), depth + 1, seen)
    # functions, modules, …: the type name above is all we use


def model_hash(net: Any, source: Any = None) -> str:
    """SHA-256 over the equivalent network (every node, operator parameter and x_b) and,
    when given, the torch module it came from."""
    h = hashlib.sha256(f"linop.verify v{CACHE_VERSION}".encode())
    _hash_update(h, net)
    if source is not None:
        _hash_update(h, source)
    return h.hexdigest()


def image_hash(x: torch.Tensor) -> str:
    t = x.detach().cpu().to(torch.float64).contiguous()
    return hashlib.sha256(f"{tuple(t.shape)}".encode() + t.numpy().tobytes()).hexdigest()


def _cache_key(mhash: str, ihash: str, dtype: str, scale: float, threshold: float) -> str:
    s = json.dumps({"v": CACHE_VERSION, "model": mhash, "image": ihash, "dtype": dtype,
                    "scale": float(scale).hex(), "threshold": float(threshold).hex()}, sort_keys=True)
    return hashlib.sha256(s.encode()).hexdigest()


def _reconstruct(net, x, **kwargs) -> dict:
    """ĉ (and c) per layer from the effective hypersurfaces: ``linop.backmap``.  A module-level
    function so that tests can count calls."""
    from ..hypersurface import reconstructed_activations

    return reconstructed_activations(net, x, **kwargs)


# ============================================================================ model / images
def _resolve_network(model_or_checkpoint: Any, input_shape: tuple[int, ...] | None):
    """(EquivalentNetwork in float64, hash, description)."""
    from ..network.graph import EquivalentNetwork

    obj = model_or_checkpoint
    if isinstance(obj, EquivalentNetwork):
        return obj.to(torch.float64), model_hash(obj), getattr(obj, "name", "network")
    source = obj
    desc = type(obj).__name__
    if isinstance(obj, (str, os.PathLike)):
        path = Path(obj)
        if not path.is_file():
            raise FileNotFoundError(f"checkpoint {str(path)!r} does not exist (or is not a file)")
        from models.train import load_checkpoint

        model, meta = load_checkpoint(path)
        ishape = tuple(meta.get("input_shape") or ()) or input_shape
        model.eval()  # our own freshly loaded copy: BN folding uses the running statistics (Eq. 7)
        source, desc = model, f"{Path(path).name} ({meta.get('model', type(model).__name__)})"
        if input_shape is not None and ishape and tuple(ishape) != tuple(input_shape):
            raise ValueError(f"images have shape {tuple(input_shape)} per sample but checkpoint {path} expects {tuple(ishape)}")
        input_shape = tuple(ishape)
    if isinstance(source, torch.nn.Module):
        from ..convert import from_torch

        if input_shape is None:
            raise ValueError("an input shape is needed to convert a torch module")
        net = from_torch(source, tuple(input_shape), torch.float64)
        return net, model_hash(net, source), desc
    raise ValueError(
        "model_or_checkpoint must be a checkpoint path, a torch.nn.Module or an EquivalentNetwork, "
        f"got {type(obj).__name__}"
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
    x = torch.as_tensor(np.asarray(images) if not isinstance(images, torch.Tensor) else images)
    if not x.is_floating_point():
        x = x.to(torch.float64)
    if input_shape is not None and x.dim() == len(input_shape) and tuple(x.shape) == tuple(input_shape):
        x = x.unsqueeze(0)
    if x.dim() < 2 or x.shape[0] < 1:
        raise ValueError(f"images must be a batch (N, C, H, W) with N ≥ 1, got shape {tuple(x.shape)}")
    if input_shape is not None and tuple(x.shape[1:]) != tuple(input_shape):
        raise ValueError(f"images must have shape (N, {', '.join(map(str, input_shape))}), got {tuple(x.shape)}")
    if not torch.isfinite(x).all():
        raise ValueError("images contain nan or inf")
    return x.detach().cpu()


# ============================================================================ per image
def _compute_image(net_d, x: torch.Tensor, layers: list[str], dtype: str, scale: float, threshold: float,
                   memory_budget: Any, keep_maps: bool) -> dict[str, np.ndarray]:
    tdt = _DTYPES[dtype]
    xd = x.to(tdt)
    # the true c: the network's own forward pass in the compute dtype (first line of Eq. 14)
    c_true = net_d.preactivations(xd.unsqueeze(0))
    rec = _reconstruct(net_d, xd, layers=list(layers), scale=scale, dtype=tdt, memory_budget=memory_budget)
    arrays: dict[str, np.ndarray] = {}
    for layer in layers:
        if layer not in rec:
            raise RuntimeError(f"linop.backmap returned no reconstruction for layer {layer!r}")
        c = _as_f64(c_true[layer])
        c_hat = _as_f64(rec[layer][1])
        if c_hat.shape != c.shape:
            raise RuntimeError(f"layer {layer}: reconstruction has {c_hat.size} units, the network {c.size}")
        eps = relative_error(c, c_hat, dtype)
        hist, stats = _image_layer_record(eps, c, threshold)
        arrays[f"eps:{layer}"] = eps
        arrays[f"hist:{layer}"] = hist
        arrays[f"stats:{layer}"] = stats
        if keep_maps and len(net_d.unit_node(layer).out_shape) == 3:
            arrays[f"c:{layer}"] = c
            arrays[f"chat:{layer}"] = c_hat
    return arrays


def _save_npz(path: Path, arrays: Mapping[str, np.ndarray], meta: dict) -> None:
    import io

    buf = io.BytesIO()
    np.savez_compressed(buf, meta=np.array(json.dumps(meta)), **arrays)
    _report.atomic_write_bytes(path, buf.getvalue())


def _load_valid(path: Path, key: str, layers: list[str]) -> bool:
    """True when ``path`` holds a complete result for ``key`` covering ``layers``."""
    if not path.is_file():
        return False
    try:
        with np.load(path, allow_pickle=False) as z:
            meta = json.loads(str(z["meta"]))
            names = set(z.files)
    except Exception:  # a corrupt / foreign file is simply recomputed
        return False
    return meta.get("key") == key and all(f"stats:{l}" in names and f"eps:{l}" in names for l in layers)


# ============================================================================ aggregation
def aggregate(files: Sequence[Path], layers: Sequence[str], dtype: str, memory_budget: Any = "2GiB",
              progress: bool = False) -> tuple[list[dict], dict[str, np.ndarray]]:
    """Aggregate per-image files of one dtype into per-layer summary rows (exact).

    Counts and maxima add over images; the median |ε| is the exact order statistic
    (mean of the two middle values for an even count, as ``np.median``), found by locating
    its fine-histogram bin and selecting among the values of that bin only (a second pass
    over the files).  If those bins alone exceed ``memory_budget`` the median is the bin's
    geometric centre and the row says ``median_exact: False``.
    """
    from tqdm.auto import tqdm

    budget = parse_size(memory_budget)
    L = list(layers)
    hist = {l: np.zeros(N_HIST, dtype=np.int64) for l in L}
    stats = {l: np.zeros(5, dtype=np.float64) for l in L}  # units, zeros, n_within, max, n_nan
    for f in tqdm(files, desc=f"aggregate {dtype}", unit="img", disable=not progress, file=sys.stderr):
        with np.load(f, allow_pickle=False) as z:
            for l in L:
                hist[l] += z[f"hist:{l}"]
                s = z[f"stats:{l}"]
                st = stats[l]
                st[[0, 1, 2, 4]] += s[[0, 1, 2, 4]]  # integer counts: exact in float64 below 2^53
                st[3] = np.nan if (np.isnan(s[3]) or np.isnan(st[3])) else max(st[3], s[3])
    # ---- exact medians: which fine bins hold the middle order statistics
    plan = {l: _median_plan(hist[l], int(stats[l][0])) for l in L}
    need = {l: p["need"] for l, p in plan.items() if p["need"]}
    exact = {l: True for l in L}
    for l in list(need):
        if int(hist[l][need[l]].sum()) * 8 > budget:  # those bins alone would not fit
            exact[l] = False
            del need[l]
    if need:
        chunks = {l: {b: [] for b in bins} for l, bins in need.items()}
        for f in tqdm(files, desc=f"median {dtype}", unit="img", disable=not progress, file=sys.stderr):
            with np.load(f, allow_pickle=False) as z:
                for l, bins in need.items():
                    a = np.abs(z[f"eps:{l}"])
                    idx = error_bins(a)
                    for b in bins:
                        chunks[l][b].append(a[idx == b])
        for l, bins in need.items():
            cum = np.cumsum(hist[l])
            for b in bins:
                v = np.sort(np.concatenate(chunks[l][b]))
                start = int(cum[b] - hist[l][b])  # rank of the bin's smallest value
                for k, bk in plan[l]["bin_of"].items():
                    if bk == b:
                        plan[l]["found"][k] = float(v[k - start])
    rows = []
    for l in L:
        p = plan[l]
        for k, b in p["bin_of"].items():  # only when not exact: the bin's geometric centre
            p["found"].setdefault(k, 10.0 ** (LOG10_LO + LOG10_STEP * (b - 2 + 0.5)) if 2 <= b < N_FINE + 2 else float("nan"))
        vals = [p["found"][k] for k in p["ranks"]]
        # np.median's convention: mean of the two middle values for an even count
        median = float("nan") if not vals else (float(np.mean(vals)) if len(vals) == 2 else vals[0])
        units, zeros, within, mx, nan = stats[l]
        rows.append({
            "layer": l, "dtype": dtype, "n_images": len(files), "units": int(units), "zeros": int(zeros),
            "n_within": int(within), "share_within": within / units if units else float("nan"),
            "n_exact": int(hist[l][0]), "n_nan": int(nan), "max_abs": float(mx), "median_abs": median,
            "median_exact": exact[l],
        })
    return rows, hist


def _median_plan(hist: np.ndarray, n: int) -> dict:
    """Ranks of the middle order statistics, their histogram slots, and the slots whose values
    must be read back (ε = 0 and nan slots determine the value by themselves)."""
    if n == 0:
        return {"ranks": [], "bin_of": {}, "found": {}, "need": []}
    cum = np.cumsum(hist)
    ranks = sorted({(n - 1) // 2, n // 2})  # 0-based
    bin_of = {k: int(np.searchsorted(cum, k, side="right")) for k in ranks}
    found: dict[int, float] = {}
    for k, b in bin_of.items():
        if b == 0:
            found[k] = 0.0
        elif b == N_FINE + 3:
            found[k] = float("nan")
    need = sorted({b for k, b in bin_of.items() if k not in found})
    return {"ranks": ranks, "bin_of": bin_of, "found": found, "need": need}


# ============================================================================ the study
def verify(
    model_or_checkpoint: Any,
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
) -> VerifyReport:
    """Run the verification study of seed 000 §4.2 (Eqs. 14–16) on ``images``.

    Parameters
    ----------
    model_or_checkpoint : checkpoint path (``models.train.load_checkpoint``), a piecewise-linear
        ``torch.nn.Module`` (converted with ``linop.convert.from_torch``) or an
        :class:`~linop.graph.EquivalentNetwork`.
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

    Returns
    -------
    VerifyReport
    """
    # ---- validate everything before any work
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
    pre_shape = None
    if isinstance(images, (torch.Tensor, np.ndarray)) and np.ndim(images) >= 2:
        pre_shape = tuple(images.shape[1:])
    net, mhash, desc = _resolve_network(model_or_checkpoint, pre_shape)
    if not net.piecewise_linear:
        kinds = sorted({n.kind for n in net.nodes if getattr(n, "kind", None) and not n.piecewise_linear})
        raise ValueError(
            f"the network has non-piecewise-linear activations {kinds}: the identity "
            "c = <x, H^I> + <x_b, H^b> of seed 000 Eq. 3 holds only for piecewise-linear networks "
            "(ReLU / LeakyReLU / PReLU, max / average pooling)"
        )
    x_all = _prepare_images(images, net.input_shape)
    vlayers = _select_layers(net, layers, skip_first_conv)
    conv_layers = [l for l in vlayers if len(net.unit_node(l).out_shape) == 3]
    if figure_layer is not None and figure_layer not in conv_layers:
        raise ValueError(f"figure_layer must be one of the verified conv layers {conv_layers}, got {figure_layer!r}")
    fig_layer = figure_layer or (conv_layers[0] if conv_layers else None)
    if fig_layer is not None:
        C = net.unit_node(fig_layer).out_shape[0]
        fig_ch = list(range(min(8, C))) if figure_channels is None else [int(c) for c in figure_channels]
        if not fig_ch or min(fig_ch) < 0 or max(fig_ch) >= C:
            raise ValueError(f"figure_channels must be in [0, {C}) for layer {fig_layer}, got {figure_channels!r}")

    out = Path(out_dir)
    (out / "images").mkdir(parents=True, exist_ok=True)
    nets = {d: net.to(_DTYPES[d]) for d in dts}
    N = x_all.shape[0]
    ihashes = [image_hash(x_all[i]) for i in range(N)]
    index: dict[str, Any] = {"model_hash": mhash, "model": desc, "scale": scale, "threshold": threshold,
                             "layers": vlayers, "entries": {d: {} for d in dts}}
    files: dict[str, list[Path]] = {d: [] for d in dts}
    computed = cached = 0

    from tqdm.auto import tqdm

    bar = tqdm(range(N), desc="verify", unit="img", disable=not progress, file=sys.stderr)
    for i in bar:
        for d in dts:
            key = _cache_key(mhash, ihashes[i], d, scale, threshold)
            path = out / "images" / d / f"{i:05d}.npz"
            if resume and _load_valid(path, key, vlayers):
                cached += 1
            else:
                arrays = _compute_image(nets[d], x_all[i], vlayers, d, scale, threshold, memory_budget, keep_maps=(i == 0))
                meta = {"key": key, "version": CACHE_VERSION, "image": i, "image_hash": ihashes[i], "dtype": d,
                        "scale": scale, "threshold": threshold, "model_hash": mhash, "layers": vlayers}
                _save_npz(path, arrays, meta)
                computed += 1
            files[d].append(path)
            index["entries"][d][str(i)] = {"file": str(path.relative_to(out)), "key": key, "image_hash": ihashes[i]}
        _report.write_json(out / "index.json", index)  # progress survives an interruption
        bar.set_postfix(computed=computed, cached=cached)
    bar.close()

    # ---- aggregate and report
    rows: list[dict] = []
    hists: dict[str, dict[str, np.ndarray]] = {}
    for d in dts:
        r, h = aggregate(files[d], vlayers, d, memory_budget, progress=progress and N > 50)
        rows += r
        hists[d] = h
    lines, passed = _report.criteria_lines(rows, CRITERIA, threshold)
    written: dict[str, Path] = {}
    summary = {
        "model": desc, "model_hash": mhash, "n_images": N, "image_hashes": ihashes, "dtypes": dts,
        "layers": vlayers, "scale": scale, "threshold": threshold, "criteria": {d: CRITERIA.get(d) for d in dts},
        "passed": passed, "criteria_lines": lines, "rows": rows,
        "histogram": {"layout": "[eps==0, 0<|eps|<1e-20, fine bins, |eps|>=1e20, nan]",
                      "log10_lo": LOG10_LO, "log10_hi": LOG10_HI, "log10_step": LOG10_STEP,
                      "file": "histograms.npz"},
    }
    written["summary.json"] = _report.write_json(out / "summary.json", summary)
    written["summary.csv"] = _report.write_csv(out / "summary.csv", rows)
    import io

    buf = io.BytesIO()
    np.savez_compressed(buf, log10_edges=LOG10_EDGES, **{f"{d}:{l}": h for d in dts for l, h in hists[d].items()})
    written["histograms.npz"] = _report.atomic_write_bytes(out / "histograms.npz", buf.getvalue())
    if figures:
        for d in dts:
            written[f"hist_{d}.png"] = _report.plot_error_histograms(
                out / f"hist_{d}.png", hists[d], LOG10_EDGES, d, threshold,
                title=f"{desc}: ε (seed 000 Eq. 16), {d}, {N} image(s), k = {scale:g}")
            if fig_layer is not None:
                shape = net.unit_node(fig_layer).out_shape
                with np.load(files[d][0], allow_pickle=False) as z:
                    c, c_hat = z[f"c:{fig_layer}"].reshape(shape), z[f"chat:{fig_layer}"].reshape(shape)
                name = f"feature_maps_{fig_layer}_{d}.png"
                written[name] = _report.plot_feature_maps(out / name, c, c_hat, fig_ch, fig_layer, d,
                                                          title=f"{desc}: {fig_layer}, image 0, {d} (seed 000 Fig. E.1)")
    return VerifyReport(rows=rows, passed=passed, criteria_lines=lines, files=written, layers=vlayers, dtypes=dts,
                        n_images=N, computed=computed, cached=cached, model_hash=mhash, threshold=threshold,
                        scale=scale, out_dir=out, histograms=hists)


# ============================================================================ CLI
_DEFAULT_MODEL, _DEFAULT_DATA = "vgg7", "digits32"


def _checkpoint_dir() -> Path:
    import models

    return Path(models.__file__).resolve().parent / "checkpoints"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """``linop verify`` options (defaults: the embedded study — shipped VGG7 on digits32)."""
    src = parser.add_mutually_exclusive_group()
    src.add_argument("--checkpoint", type=str, default=None,
                     help="checkpoint file (default: the shipped models/checkpoints/vgg7_digits32.pt)")
    src.add_argument("--model", type=str, default=None,
                     help="reference model name (vgg7, resnet20, fixup_resnet20): its shipped checkpoint "
                          "for --data if there is one, else freshly initialised weights")
    parser.add_argument("--data", type=str, default=None,
                        help="data set: digits, digits32, cifar10, cifar100, mnist (default: the checkpoint's)")
    parser.add_argument("--root", type=str, default=None, help="directory of cifar10 / cifar100 / mnist files")
    parser.add_argument("--n-images", type=int, default=4, help="first N test images (default 4)")
    parser.add_argument("--dtypes", nargs="+", default=["float32", "float64"], help="compute dtypes")
    parser.add_argument("--layers", nargs="+", default=None, help="unit layers (default: all but the first conv)")
    parser.add_argument("--scale", type=float, default=0.125, help="k of z = k·[x; x_b] (seed 000 Eq. 3)")
    parser.add_argument("--threshold", type=float, default=0.01, help="|ε| bound of the table (default 1%%)")
    parser.add_argument("--out", type=str, default="results/verify", help="output directory")
    parser.add_argument("--no-resume", action="store_true", help="recompute cached per-image results")
    parser.add_argument("--memory-budget", type=str, default="2GiB", help="e.g. 2GiB, 512MiB")
    parser.add_argument("--include-first-conv", action="store_true", help="also verify the first conv layer")
    parser.add_argument("--figure-layer", type=str, default=None, help="layer of the Fig. E.1 figure")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")


def _normalize_arg(meta: Mapping[str, Any]) -> Any:
    """The input normalisation the checkpoint was trained with (``models.data.load_dataset``)."""
    mode = meta.get("normalize", "none") or "none"
    if mode == "custom":
        if meta.get("mean") is None or meta.get("std") is None:
            raise ValueError("the checkpoint used a custom normalisation but stores no mean / std")
        return (tuple(meta["mean"]), tuple(meta["std"]))
    return mode


def _load_source(args) -> tuple[Any, Any, str]:
    """(model or checkpoint path, data set, description) for the CLI."""
    from models.data import DATASETS, load_dataset

    if args.data is not None and args.data not in DATASETS:  # before looking for its checkpoint
        raise ValueError(f"--data {args.data!r} is not a data set; choose one of {list(DATASETS)}")
    meta: dict = {}
    if args.checkpoint is not None or args.model is None:
        if args.checkpoint is not None:
            ck = Path(args.checkpoint)
            if not ck.is_file():
                raise FileNotFoundError(f"--checkpoint {args.checkpoint!r}: no such file")
        else:
            ck = _checkpoint_dir() / f"{_DEFAULT_MODEL}_{args.data or _DEFAULT_DATA}.pt"
            if not ck.is_file():
                raise FileNotFoundError(f"the default checkpoint {ck} is missing; create it with "
                                        "`linop train` or pass --checkpoint / --model")
        from models.train import load_checkpoint

        _, meta = load_checkpoint(ck)
        source, desc = str(ck), f"{ck.name} ({meta.get('model', '?')})"
        data = args.data or meta.get("data") or _DEFAULT_DATA
        ds = load_dataset(data, root=args.root, normalize=_normalize_arg(meta))
        return source, ds, desc
    data = args.data or _DEFAULT_DATA
    ck = _checkpoint_dir() / f"{args.model}_{data}.pt"
    if ck.is_file():
        args.checkpoint = str(ck)
        return _load_source(args)
    from models.train import build_model, default_model_kwargs

    ds = load_dataset(data, root=args.root)
    model = build_model(args.model, **default_model_kwargs(args.model, ds)).eval()
    print(f"note: no shipped checkpoint {ck.name}; verifying freshly initialised {args.model} weights "
          "(the identity of seed 000 Eq. 3 holds for any weights)", file=sys.stderr)
    return model, ds, f"{args.model} (untrained)"


def run(args: argparse.Namespace) -> int:
    """``linop verify``: print the Markdown table and PASS/FAIL lines; exit 0 unless the input
    was invalid (the criteria are reported, not enforced through the exit status)."""
    try:
        if args.n_images < 1:
            raise ValueError(f"--n-images must be ≥ 1, got {args.n_images}")
        parse_size(args.memory_budget, "--memory-budget")
        for d in args.dtypes:
            _dtype_name(d)
        source, ds, desc = _load_source(args)
        data = ds.name
        n_test = int(ds.x_test.shape[0])
        if args.n_images > n_test:
            raise ValueError(f"--n-images {args.n_images} is more than the {n_test} test images of {data}")
        rep = verify(source, ds.x_test[: args.n_images], dtypes=args.dtypes, layers=args.layers, scale=args.scale,
                     out_dir=args.out, resume=not args.no_resume, progress=not args.no_progress,
                     threshold=args.threshold, skip_first_conv=not args.include_first_conv,
                     memory_budget=args.memory_budget, figure_layer=args.figure_layer)
    except (ValueError, FileNotFoundError, NotImplementedError, KeyError) as exc:
        msg = exc.args[0] if isinstance(exc, KeyError) and exc.args else exc
        print(f"linop verify: error: {msg}", file=sys.stderr)
        return 2
    print(f"# verification study: {desc} on {data}, {rep.n_images} test image(s), k = {rep.scale:g} "
          f"({rep.computed} computed, {rep.cached} from cache)\n")
    print(rep.markdown())
    print()
    for line in rep.criteria_lines:
        print(line)
    print(f"\nwritten to {rep.out_dir}: " + ", ".join(sorted(rep.files)))
    return 0
