"""The error statistics of the verification study (seed 000 Eq. 16, Tables 3–4).

``ε = (ĉ − c) / c_{≠0}`` per unit (:func:`relative_error`) is recorded per image and layer
(:func:`layer_record`) as

* exact integer counts and the exact maximum — ``[units, zeros in c, n_within (|ε| ≤ thr),
  max |ε|, n_nan]`` (:data:`STATS`);
* a *signed* fine histogram of ε: bins of log10|ε| of :data:`LOG10_STEP` = 0.001 decade from
  1e-20 to 1e20, counted separately for ε < 0 and ε > 0, plus slots for ε = 0, nan and
  |ε| below / above that range (:data:`SIGNED_LAYOUT`).  Stored compactly: per sign only the
  occupied range of bins, as counts in the smallest unsigned integer type;
* optionally (``keep_eps``) the signed ε of every unit in float64 — 8 bytes per unit, the
  format of earlier versions.

:func:`aggregate` adds the records of any number of images.  Counts, shares and maxima are
exact in both storage modes.  The median |ε| is

* **compact (default)**: located to one fine bin by the summed histogram and reported as the
  bin's geometric centre ``10^(a + step/2)``; a value v of the bin ``[10^a, 10^(a+step))``
  differs from the centre by a factor within ``10^(±step/2)``, so the reported median's
  relative uncertainty is ``10^(step/2) − 1`` ≈ 1.15e-3 (``median_rel_uncertainty``), and
  the row gives the bounds ``median_lo ≤ median ≤ median_hi`` that ``np.median`` of all |ε|
  provably satisfies (``median_exact: False`` unless those bounds coincide, e.g. at 0);
* **keep_eps**: the exact order statistic (``np.median``'s convention: the mean of the two
  middle values for an even count), found in two passes — the histogram locates the bin of
  the middle ranks, then only that bin's values are read back — so memory stays bounded by
  one bin, not by units × images.
"""
from __future__ import annotations

import math
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
    "MEDIAN_REL_UNCERTAINTY",
    "N_FINE",
    "N_HIST",
    "N_SIGNED",
    "SIGNED_LAYOUT",
    "STATS",
    "abs_histogram",
    "aggregate",
    "decode_signed",
    "error_bins",
    "layer_record",
    "relative_error",
    "signed_bins",
    "storage_note",
]

# Fine bins of log10|ε|: 0.001 decade from 1e-20 to 1e20.  Fine enough that the median's
# bin pins it to ±0.115 % (the compact mode), and in keep_eps mode that the exact median needs
# to re-read only the values of one small bin.
LOG10_LO, LOG10_HI, LOG10_STEP = -20.0, 20.0, 0.001
N_FINE = int(round((LOG10_HI - LOG10_LO) / LOG10_STEP))
LOG10_EDGES = LOG10_LO + LOG10_STEP * np.arange(N_FINE + 1)
_LIN_EDGES = 10.0 ** LOG10_EDGES
#: relative uncertainty of a median reported as the geometric centre of its fine bin
MEDIAN_REL_UNCERTAINTY = float(10.0 ** (LOG10_STEP / 2) - 1.0)
#: |ε| histogram layout: [ε = 0, 0 < |ε| < 1e-20, N_FINE bins, |ε| ≥ 1e20 (incl. inf), nan]
N_HIST = N_FINE + 4
HIST_LAYOUT = "[eps==0, 0<|eps|<1e-20, fine bins, |eps|>=1e20, nan]"
#: one sign's part: [0 < |ε| < 1e-20, N_FINE bins, |ε| ≥ 1e20 (incl. inf)]
_N_SIDE = N_FINE + 2
#: signed histogram layout (aggregated, dense): [ε = 0, nan, ε < 0 part, ε > 0 part]
N_SIGNED = 2 + 2 * _N_SIDE
SIGNED_LAYOUT = ("[eps==0, nan, eps<0: (|eps|<1e-20, fine bins of log10|eps|, |eps|>=1e20), "
                 "eps>0: (|eps|<1e-20, fine bins, |eps|>=1e20)]")
#: per-image, per-layer stats vector (float64; the counts are integers, exact below 2^53)
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
    construction (a ``searchsorted`` on fixed edges), which the exact median relies on:
    fine bin b holds ``_LIN_EDGES[b] ≤ |ε| < _LIN_EDGES[b + 1]``."""
    a = np.asarray(abs_eps, dtype=np.float64)
    idx = 1 + np.searchsorted(_LIN_EDGES, a, side="right")  # under -> 1, bin b -> 2+b, over -> N_FINE+2
    idx[a == 0] = 0
    idx[np.isnan(a)] = N_FINE + 3
    return idx.astype(np.int64)


def signed_bins(eps: np.ndarray) -> np.ndarray:
    """Slot of every ε in the signed layout :data:`SIGNED_LAYOUT` (same fine bins of |ε| as
    :func:`error_bins`, one set per sign)."""
    e = np.asarray(eps, dtype=np.float64)
    side = np.searchsorted(_LIN_EDGES, np.abs(e), side="right")  # 0 under, 1+b bin b, N_FINE+1 over
    idx = np.where(e < 0, 2 + side, 2 + _N_SIDE + side)
    idx[e == 0] = 0
    idx[np.isnan(e)] = 1
    return idx.astype(np.int64)


def _uint(counts: np.ndarray) -> np.ndarray:
    """``counts`` in the smallest unsigned type that holds them (lossless)."""
    m = int(counts.max()) if counts.size else 0
    for t in (np.uint8, np.uint16, np.uint32):
        if m <= np.iinfo(t).max:
            return counts.astype(t)
    return counts.astype(np.uint64)


def _encode_signed(dense: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Compact form of one dense signed histogram: a header ``[zero, nan, lo_neg, n_neg,
    lo_pos, n_pos]`` (int64) and the counts of the occupied range of each sign (negative
    range first), in the smallest unsigned type."""
    head = [int(dense[0]), int(dense[1])]
    parts = []
    for side in (dense[2: 2 + _N_SIDE], dense[2 + _N_SIDE:]):
        nz = np.flatnonzero(side)
        lo, n = (int(nz[0]), int(nz[-1] - nz[0] + 1)) if nz.size else (0, 0)
        head += [lo, n]
        parts.append(side[lo: lo + n])
    return np.array(head, dtype=np.int64), _uint(np.concatenate(parts))


def _add_signed(dense: np.ndarray, head: np.ndarray, counts: np.ndarray) -> np.ndarray:
    """Add a compact record into a dense signed histogram in place (only the occupied ranges
    are touched, so summing 10^4 images costs their records, not 10^4 dense arrays)."""
    zero, nan, lo_n, n_n, lo_p, n_p = (int(v) for v in np.asarray(head).reshape(-1)[:6])
    if (np.asarray(head).size != 6 or counts.ndim != 1 or counts.size != n_n + n_p
            or min(lo_n, n_n, lo_p, n_p, zero, nan) < 0 or lo_n + n_n > _N_SIDE or lo_p + n_p > _N_SIDE):
        raise ValueError("damaged signed histogram record: header and counts disagree")
    counts = counts.astype(np.int64, copy=False)
    dense[0] += zero
    dense[1] += nan
    dense[2 + lo_n: 2 + lo_n + n_n] += counts[:n_n]
    dense[2 + _N_SIDE + lo_p: 2 + _N_SIDE + lo_p + n_p] += counts[n_n:]
    return dense


def decode_signed(head: np.ndarray, counts: np.ndarray) -> np.ndarray:
    """The dense signed histogram (layout :data:`SIGNED_LAYOUT`, int64) of a compact record."""
    return _add_signed(np.zeros(N_SIGNED, dtype=np.int64), head, counts)


def abs_histogram(signed: np.ndarray) -> np.ndarray:
    """The |ε| histogram (layout :data:`HIST_LAYOUT`) of a dense signed histogram: the two
    signs' bins added (exact integer sums)."""
    s = np.asarray(signed, dtype=np.int64)
    both = s[2: 2 + _N_SIDE] + s[2 + _N_SIDE:]  # [under, fine…, over]
    return np.concatenate([s[:1], both, s[1:2]])


def layer_record(eps: np.ndarray, c: np.ndarray, threshold: float, keep_eps: bool = False) -> dict[str, np.ndarray]:
    """Per-image, per-layer record: ``stats`` (:data:`STATS`), the compact signed histogram
    (``shead``, ``scount``; :func:`decode_signed`) and, with ``keep_eps``, ``eps`` itself."""
    e = np.asarray(eps, dtype=np.float64).reshape(-1)
    a = np.abs(e)
    n_nan = int(np.isnan(a).sum())
    mx = float(np.max(a)) if a.size else 0.0  # nan when any ε is nan, as before
    stats = np.array([a.size, int((np.asarray(c) == 0).sum()), int((a <= threshold).sum()), mx, n_nan],
                     dtype=np.float64)
    head, counts = _encode_signed(np.bincount(signed_bins(e), minlength=N_SIGNED).astype(np.int64))
    rec = {"stats": stats, "shead": head, "scount": counts}
    if keep_eps:
        rec["eps"] = e
    return rec


# ============================================================================ aggregation
def _progress(files: Sequence[Path], desc: str, progress: bool):
    from tqdm.auto import tqdm

    return tqdm(files, desc=desc, unit="img", disable=not progress, file=sys.stderr)


def _sum_records(files: Sequence[Path], layers: list[str], desc: str, progress: bool):
    """First pass: per layer the summed signed histogram and stats of every file, and whether
    every file kept its ε (keep_eps)."""
    signed = {l: np.zeros(N_SIGNED, dtype=np.int64) for l in layers}
    stats = {l: np.zeros(len(STATS), dtype=np.float64) for l in layers}
    all_eps = True
    for f in _progress(files, desc, progress):
        with np.load(f, allow_pickle=False) as z:
            names = set(z.files)
            for l in layers:
                _add_signed(signed[l], z[f"shead:{l}"], z[f"scount:{l}"])
                all_eps &= f"eps:{l}" in names
                s = z[f"stats:{l}"]
                st = stats[l]
                st[[0, 1, 2, 4]] += s[[0, 1, 2, 4]]  # integer counts: exact in float64 below 2^53
                st[3] = np.nan if (np.isnan(s[3]) or np.isnan(st[3])) else max(st[3], s[3])
    return signed, stats, all_eps


def _median_plan(hist: np.ndarray, n: int) -> dict:
    """Ranks of the middle order statistics, their |ε| histogram slots, and the slots whose
    values must be read back (ε = 0 and nan slots determine the value by themselves)."""
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
    """Second pass (keep_eps files): read back only the |ε| of the bins in ``need`` and select
    the middle order statistics exactly (into ``plan[layer]["found"]``)."""
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


def _slot_bounds(b: int) -> tuple[float, float, float]:
    """(lower bound, geometric centre, upper bound) of the |ε| values in slot ``b``."""
    if b == 0:
        return 0.0, 0.0, 0.0
    if b == 1:
        return 0.0, float("nan"), float(_LIN_EDGES[0])
    if b == N_FINE + 2:
        return float(_LIN_EDGES[-1]), float("nan"), float("inf")
    if b == N_FINE + 3:
        return float("nan"), float("nan"), float("nan")
    k = b - 2
    return float(_LIN_EDGES[k]), float(10.0 ** (LOG10_LO + LOG10_STEP * (k + 0.5))), float(_LIN_EDGES[k + 1])


def _median(p: dict) -> tuple[float, float, float]:
    """(median, lower bound, upper bound): exact where the plan found the values, else the
    geometric centre of each middle rank's bin; ``np.median``'s convention (mean of the two
    middle values for an even count)."""
    if not p["ranks"]:
        nan = float("nan")
        return nan, nan, nan
    vals, los, his = [], [], []
    for k in p["ranks"]:
        lo, centre, hi = _slot_bounds(p["bin_of"][k])
        if k in p["found"]:
            lo = centre = hi = p["found"][k]
        vals.append(centre)
        los.append(lo)
        his.append(hi)
    return float(np.mean(vals)), float(np.mean(los)), float(np.mean(his))


def aggregate(files: Sequence[Path], layers: Sequence[str], dtype: str, memory_budget: Any = "2GiB",
              progress: bool = False, exact_median: bool | None = None
              ) -> tuple[list[dict], dict[str, np.ndarray], dict[str, np.ndarray]]:
    """Aggregate per-image files of one dtype into per-layer summary rows.

    Counts, shares and maxima are exact.  The median |ε| is exact (a second pass over the
    ε of the median's bin) when ``exact_median`` — default: when every file kept its ε
    (``keep_eps``) — and those bins fit ``memory_budget``; otherwise it is the geometric
    centre of the median's fine bin, with bounds (see the module docstring).

    Returns
    -------
    rows : one dict per layer: ``layer, dtype, n_images, units, zeros, n_within,
        share_within, n_exact (ε = 0), n_nan, n_neg, n_pos, max_abs, median_abs,
        median_exact, median_lo, median_hi, median_rel_uncertainty``.
    hists : layer -> summed |ε| histogram (layout :data:`HIST_LAYOUT`).
    signed : layer -> summed signed histogram (layout :data:`SIGNED_LAYOUT`).
    """
    budget = parse_memory(memory_budget)
    L = list(layers)
    signed, stats, all_eps = _sum_records(files, L, f"aggregate {dtype}", progress)
    if exact_median and not all_eps:
        raise ValueError("exact_median needs per-image files written with keep_eps=True")
    exact_wanted = all_eps if exact_median is None else bool(exact_median)
    hist = {l: abs_histogram(signed[l]) for l in L}
    plan = {l: _median_plan(hist[l], int(stats[l][0])) for l in L}
    need = {l: p["need"] for l, p in plan.items() if p["need"]} if exact_wanted else {}
    for l in list(need):
        if int(hist[l][need[l]].sum()) * 8 > budget:  # those bins alone would not fit
            del need[l]
    if need:
        _read_medians(files, hist, plan, need, f"median {dtype}", progress)
    rows = []
    for l in L:
        units, zeros, within, mx, nan = stats[l]
        med, lo, hi = _median(plan[l])
        exact = bool(lo == hi)  # found values, or both middle ranks at ε = 0 (nan: never exact)
        if exact:
            rel = 0.0
        elif med > 0 and math.isfinite(hi):  # fine bins: 10^(step/2) − 1
            rel = max(hi / med - 1.0, 1.0 - lo / med)
        else:  # under- / overflow or nan slot: not located
            rel = float("inf")
        s = signed[l]
        rows.append({
            "layer": l, "dtype": dtype, "n_images": len(files), "units": int(units), "zeros": int(zeros),
            "n_within": int(within), "share_within": within / units if units else float("nan"),
            "n_exact": int(s[0]), "n_nan": int(nan), "n_neg": int(s[2: 2 + _N_SIDE].sum()),
            "n_pos": int(s[2 + _N_SIDE:].sum()), "max_abs": float(mx), "median_abs": med,
            "median_exact": exact, "median_lo": lo, "median_hi": hi, "median_rel_uncertainty": rel,
        })
    return rows, hist, signed


def storage_note(keep_eps: bool) -> dict[str, Any]:
    """What a results file says about how its per-image records were stored and how its
    median was found (written into ``summary.json``)."""
    if keep_eps:
        return {"storage": "keep_eps", "median": "exact (np.median of all |eps|, two-pass selection)",
                "per_image": "signed eps float64 per unit + compact signed histogram + exact stats"}
    return {"storage": "compact", "median": "bin centre of the fine log10|eps| histogram",
            "median_rel_uncertainty": MEDIAN_REL_UNCERTAINTY,
            "per_image": "compact signed histogram (occupied bin range, smallest uint) + exact stats"}
