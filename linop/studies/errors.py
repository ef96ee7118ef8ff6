"""The error statistics of the verification study (seed 000 Eq. 16, Tables 3–4).

``ε = (ĉ − c) / c_{≠0}`` per unit (:func:`relative_error`), recorded per image and layer as a
fine histogram of |ε| plus counts (:func:`layer_record`), and aggregated exactly over any
number of images (:func:`aggregate`): counts and maxima add up; the median |ε| is found in
two passes — the fine histogram locates the bin of the middle order statistics, then only
the values in that bin are read back and selected — so memory stays bounded by one bin, not
by units × images.
"""
from __future__ import annotations

import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from ..utils import parse_memory

__all__ = [
    "HIST_LAYOUT",
    "LOG10_EDGES",
    "LOG10_HI",
    "LOG10_LO",
    "LOG10_STEP",
    "N_FINE",
    "N_HIST",
    "aggregate",
    "error_bins",
    "layer_record",
    "relative_error",
]

# Fine histogram of |ε| on a log scale: bins of 0.01 decade from 1e-20 to 1e20.  The fine
# bins exist so that the exact median needs to re-read only the values of one bin.
LOG10_LO, LOG10_HI, LOG10_STEP = -20.0, 20.0, 0.01
N_FINE = int(round((LOG10_HI - LOG10_LO) / LOG10_STEP))
LOG10_EDGES = LOG10_LO + LOG10_STEP * np.arange(N_FINE + 1)
_LIN_EDGES = 10.0 ** LOG10_EDGES
#: histogram layout: [ε = 0, 0 < |ε| < 1e-20, N_FINE bins, |ε| ≥ 1e20 (incl. inf), nan]
N_HIST = N_FINE + 4
HIST_LAYOUT = "[eps==0, 0<|eps|<1e-20, fine bins, |eps|>=1e20, nan]"
#: per-image, per-layer stats vector
STATS = ("units", "zeros", "n_within", "max_abs", "n_nan")


def _as_f64(a: Any) -> np.ndarray:
    if type(a).__module__ == "torch":
        a = a.detach().cpu().double().numpy()
    return np.asarray(a, dtype=np.float64).reshape(-1)


def _numpy_dtype(dtype: Any) -> np.dtype:
    return np.dtype(str(dtype).replace("torch.", "") if type(dtype).__module__ == "torch" else dtype)


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
    """Histogram slot of every |ε| (layout :data:`HIST_LAYOUT`).  Monotone in |ε| by
    construction (a ``searchsorted`` on fixed edges), which the exact median relies on."""
    a = np.asarray(abs_eps, dtype=np.float64)
    idx = 1 + np.searchsorted(_LIN_EDGES, a, side="right")  # under -> 1, bin b -> 2+b, over -> N_FINE+2
    idx[a == 0] = 0
    idx[np.isnan(a)] = N_FINE + 3
    return idx.astype(np.int64)


def layer_record(eps: np.ndarray, c: np.ndarray, threshold: float) -> tuple[np.ndarray, np.ndarray]:
    """Per-image, per-layer histogram counts and stats ``[units, zeros, n_within, max_abs, n_nan]``."""
    a = np.abs(eps)
    hist = np.bincount(error_bins(a), minlength=N_HIST).astype(np.int64)
    n_nan = int(np.isnan(a).sum())
    stats = np.array(
        [a.size, int((c == 0).sum()), int((a <= threshold).sum()), float(a.max()) if a.size else 0.0, n_nan],
        dtype=np.float64,
    )
    return hist, stats


# ============================================================================ aggregation
def _progress(files: Sequence[Path], desc: str, progress: bool):
    from tqdm.auto import tqdm

    return tqdm(files, desc=desc, unit="img", disable=not progress, file=sys.stderr)


def _sum_records(files: Sequence[Path], layers: list[str], desc: str, progress: bool):
    """First pass: per layer the summed histogram and stats of every file."""
    hist = {l: np.zeros(N_HIST, dtype=np.int64) for l in layers}
    stats = {l: np.zeros(len(STATS), dtype=np.float64) for l in layers}
    for f in _progress(files, desc, progress):
        with np.load(f, allow_pickle=False) as z:
            for l in layers:
                hist[l] += z[f"hist:{l}"]
                s = z[f"stats:{l}"]
                st = stats[l]
                st[[0, 1, 2, 4]] += s[[0, 1, 2, 4]]  # integer counts: exact in float64 below 2^53
                st[3] = np.nan if (np.isnan(s[3]) or np.isnan(st[3])) else max(st[3], s[3])
    return hist, stats


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


def _read_medians(files: Sequence[Path], hist: dict, plan: dict, need: dict, desc: str, progress: bool) -> None:
    """Second pass: read back only the |ε| of the bins in ``need`` and select the middle
    order statistics exactly (into ``plan[layer]["found"]``)."""
    chunks = {l: {b: [] for b in bins} for l, bins in need.items()}
    for f in _progress(files, desc, progress):
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


def _median(p: dict) -> float:
    for k, b in p["bin_of"].items():  # only when not exact: the bin's geometric centre
        p["found"].setdefault(k, 10.0 ** (LOG10_LO + LOG10_STEP * (b - 2 + 0.5)) if 2 <= b < N_FINE + 2 else float("nan"))
    vals = [p["found"][k] for k in p["ranks"]]
    # np.median's convention: mean of the two middle values for an even count
    return float("nan") if not vals else (float(np.mean(vals)) if len(vals) == 2 else vals[0])


def aggregate(files: Sequence[Path], layers: Sequence[str], dtype: str, memory_budget: Any = "2GiB",
              progress: bool = False) -> tuple[list[dict], dict[str, np.ndarray]]:
    """Aggregate per-image files of one dtype into per-layer summary rows (exact).

    Counts and maxima add over images; the median |ε| is the exact order statistic
    (mean of the two middle values for an even count, as ``np.median``), found by locating
    its fine-histogram bin and selecting among the values of that bin only (a second pass
    over the files).  If those bins alone exceed ``memory_budget`` the median is the bin's
    geometric centre and the row says ``median_exact: False``.

    Returns
    -------
    rows : one dict per layer: ``layer, dtype, n_images, units, zeros, n_within,
        share_within, n_exact (ε = 0), n_nan, max_abs, median_abs, median_exact``.
    hists : layer -> summed histogram (layout :data:`HIST_LAYOUT`).
    """
    budget = parse_memory(memory_budget)
    L = list(layers)
    hist, stats = _sum_records(files, L, f"aggregate {dtype}", progress)
    plan = {l: _median_plan(hist[l], int(stats[l][0])) for l in L}
    need = {l: p["need"] for l, p in plan.items() if p["need"]}
    exact = {l: True for l in L}
    for l in list(need):
        if int(hist[l][need[l]].sum()) * 8 > budget:  # those bins alone would not fit
            exact[l] = False
            del need[l]
    if need:
        _read_medians(files, hist, plan, need, f"median {dtype}", progress)
    rows = []
    for l in L:
        units, zeros, within, mx, nan = stats[l]
        rows.append({
            "layer": l, "dtype": dtype, "n_images": len(files), "units": int(units), "zeros": int(zeros),
            "n_within": int(within), "share_within": within / units if units else float("nan"),
            "n_exact": int(hist[l][0]), "n_nan": int(nan), "max_abs": float(mx), "median_abs": _median(plan[l]),
            "median_exact": exact[l],
        })
    return rows, hist
