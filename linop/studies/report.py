"""Reports of the verification study: tables, JSON / CSV files and figures.

This module only *presents* numbers that :mod:`linop.verify` computed:

* :func:`markdown_table` — the layer × dtype table of seed 000 Tables 3–4 (units, zeros,
  share of units with |ε| ≤ 1 %, max and median |ε|);
* :func:`criteria_lines` — one PASS/FAIL line per dtype against the paper's criteria;
* :func:`write_json` / :func:`write_csv` — atomic writes (an interrupted run never leaves a
  half-written summary behind);
* :func:`plot_error_histograms` — per-layer histograms of log10|ε| (seed 000 Figs. 6–11);
* :func:`plot_feature_maps` — original c, reconstructed ĉ, difference and normalised
  difference of a few channels of one layer for one image (seed 000 Fig. E.1).

Figures use matplotlib's Agg backend (no display needed).
"""
from __future__ import annotations

import csv
import io
import json
import math
import os
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np

__all__ = [
    "TABLE_COLUMNS",
    "atomic_write_bytes",
    "write_json",
    "write_csv",
    "markdown_table",
    "criteria_lines",
    "plot_error_histograms",
    "plot_feature_maps",
]

# (key in a summary row, header in the Markdown / CSV table)
TABLE_COLUMNS: tuple[tuple[str, str], ...] = (
    ("layer", "layer"),
    ("dtype", "dtype"),
    ("n_images", "images"),
    ("units", "units"),
    ("zeros", "zeros in c"),
    ("share_within", "share |ε| ≤ thr (%)"),
    ("max_abs", "max |ε|"),
    ("median_abs", "median |ε|"),
)


# ---------------------------------------------------------------------------- files
def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    """Write ``data`` to ``path`` through a temporary file and ``os.replace`` (atomic on
    POSIX), so a reader or an interrupted run sees either the old or the new file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    with open(tmp, "wb") as fh:
        fh.write(data)
    os.replace(tmp, path)
    return path


def _jsonable(obj: Any) -> Any:
    if isinstance(obj, Mapping):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, np.ndarray):
        return _jsonable(obj.tolist())
    if isinstance(obj, (np.integer,)):
        return int(obj)
    if isinstance(obj, (float, np.floating)):
        f = float(obj)
        # JSON has no inf / nan: write them as strings rather than invalid JSON
        return f if math.isfinite(f) else str(f)
    if isinstance(obj, (np.bool_,)):
        return bool(obj)
    if isinstance(obj, Path):
        return str(obj)
    return obj


def write_json(path: str | os.PathLike, obj: Any) -> Path:
    """Atomically write ``obj`` as indented JSON (inf / nan become strings)."""
    text = json.dumps(_jsonable(obj), indent=2, ensure_ascii=False, allow_nan=False)
    return atomic_write_bytes(path, (text + "\n").encode("utf-8"))


def write_csv(path: str | os.PathLike, rows: Sequence[Mapping[str, Any]], columns: Sequence[str] | None = None) -> Path:
    """Atomically write summary rows as CSV (full float precision, ``repr`` of floats)."""
    if columns is None:
        columns = []
        for r in rows:
            columns += [k for k in r if k not in columns and not isinstance(r[k], (list, dict, np.ndarray))]
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(columns)
    for r in rows:
        w.writerow([_csv_cell(r.get(c, "")) for c in columns])
    return atomic_write_bytes(path, buf.getvalue().encode("utf-8"))


def _csv_cell(v: Any) -> str:
    if isinstance(v, (float, np.floating)):
        return repr(float(v))
    return str(v)


# ---------------------------------------------------------------------------- tables
def _fmt_share(share: float) -> str:
    # enough digits to tell 99.97 % from 100 % and to show a single miss among millions
    if share == 1.0:
        return "100"
    return f"{100.0 * share:.4f}"


def _fmt_err(v: float) -> str:
    if v is None:
        return "—"
    v = float(v)
    if v == 0.0:
        return "0"
    if not math.isfinite(v):
        return str(v)
    return f"{v:.3e}"


def markdown_table(rows: Sequence[Mapping[str, Any]], threshold: float = 0.01) -> str:
    """The layer × dtype table of the study (seed 000 Tables 3–4 plus max / median |ε|)."""
    thr = f"{100 * threshold:g}%"
    # a literal "|" would split a Markdown cell: escape the ones in |ε|
    header = [h.replace("thr", thr).replace("|", "\\|") for _, h in TABLE_COLUMNS]
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join(["---"] * len(header)) + "|"]
    for r in rows:
        cells = [
            str(r["layer"]),
            str(r["dtype"]),
            str(r["n_images"]),
            str(r["units"]),
            str(r["zeros"]),
            _fmt_share(r["share_within"]),
            _fmt_err(r["max_abs"]),
            _fmt_err(r["median_abs"]) + ("" if r.get("median_exact", True) else " (≈)"),
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def criteria_lines(rows: Sequence[Mapping[str, Any]], criteria: Mapping[str, float], threshold: float = 0.01) -> tuple[list[str], dict[str, bool]]:
    """One PASS/FAIL line per dtype: every layer's share of units with |ε| ≤ threshold must
    reach ``criteria[dtype]`` (the paper: float64 100 %, float32 ≥ 99.97 %)."""
    lines, passed = [], {}
    dtypes = list(dict.fromkeys(r["dtype"] for r in rows))
    for dt in dtypes:
        rs = [r for r in rows if r["dtype"] == dt]
        need = criteria.get(dt)
        worst = min(rs, key=lambda r: r["share_within"])
        if need is None:
            lines.append(f"{dt}: no criterion; worst layer {worst['layer']} {_fmt_share(worst['share_within'])}%")
            continue
        ok = all(r["share_within"] >= need for r in rs)
        passed[dt] = ok
        lines.append(
            f"{'PASS' if ok else 'FAIL'} {dt}: every layer needs ≥ {_fmt_share(need)}% of units with "
            f"|ε| ≤ {100 * threshold:g}%; worst layer {worst['layer']}: {_fmt_share(worst['share_within'])}% "
            f"({worst['units'] - worst['n_within']} of {worst['units']} units outside)"
        )
    return lines, passed


# ---------------------------------------------------------------------------- figures
def _pyplot():
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt


def plot_error_histograms(
    path: str | os.PathLike,
    hists: Mapping[str, np.ndarray],
    log10_edges: np.ndarray,
    dtype: str,
    threshold: float = 0.01,
    title: str = "",
    rebin: int = 10,
) -> Path:
    """Per-layer histograms of log10|ε| (seed 000 Figs. 6–11), one subplot per layer.

    Parameters
    ----------
    hists : layer -> counts laid out as ``[ε = 0, |ε| below the first edge, bins…,
        |ε| ≥ last edge (incl. inf), nan]`` (the layout of ``linop.verify``).
    log10_edges : edges of the regular bins in log10|ε|.
    rebin : merge this many fine bins per bar (the fine bins exist for the exact median).
    """
    plt = _pyplot()
    layers = list(hists)
    ncol = min(3, max(1, len(layers)))
    nrow = math.ceil(len(layers) / ncol)
    fig, axes = plt.subplots(nrow, ncol, figsize=(4.2 * ncol, 3.0 * nrow), squeeze=False)
    edges = np.asarray(log10_edges, dtype=np.float64)
    nb = len(edges) - 1
    for ax, layer in zip(axes.flat, layers):
        h = np.asarray(hists[layer], dtype=np.int64)
        n_zero, n_under, fine, n_over, n_nan = h[0], h[1], h[2 : 2 + nb], h[2 + nb], h[3 + nb]
        total = int(h.sum())
        nz = np.flatnonzero(fine)
        if nz.size:
            # show the occupied range only (padded by one coarse bar either side)
            lo = max(0, (nz[0] // rebin - 1) * rebin)
            hi = min(nb, (nz[-1] // rebin + 2) * rebin)
            sub = fine[lo:hi]
            pad = (-len(sub)) % rebin
            sub = np.concatenate([sub, np.zeros(pad, dtype=np.int64)])
            coarse = sub.reshape(-1, rebin).sum(axis=1)
            step = edges[1] - edges[0]
            left = edges[lo] + np.arange(len(coarse)) * rebin * step
            ax.bar(left, coarse, width=rebin * step, align="edge", color="tab:blue", edgecolor="none")
        ax.axvline(math.log10(threshold), color="tab:red", lw=1, ls="--")
        ax.set_yscale("log") if nz.size and fine.max() > 0 else None
        notes = [f"units {total}", f"ε = 0: {n_zero}"]
        if n_under:
            notes.append(f"|ε|<1e{edges[0]:g}: {n_under}")
        if n_over:
            notes.append(f"|ε|≥1e{edges[-1]:g}: {n_over}")
        if n_nan:
            notes.append(f"nan: {n_nan}")
        ax.text(0.97, 0.97, "\n".join(notes), transform=ax.transAxes, va="top", ha="right", fontsize=7,
                bbox=dict(facecolor="white", alpha=0.85, edgecolor="none"))
        ax.set_title(layer, fontsize=9)
        ax.set_xlabel("log10 |ε|", fontsize=8)
        ax.set_ylabel("units", fontsize=8)
        ax.tick_params(labelsize=7)
    for ax in list(axes.flat)[len(layers) :]:
        ax.axis("off")
    fig.suptitle(title or f"relative errors ε (seed 000 Eq. 16), {dtype}; red: |ε| = {threshold:g}", fontsize=10)
    fig.tight_layout()
    return _savefig(fig, path)


def _mosaic(maps: np.ndarray, per_row: int) -> np.ndarray:
    """(K, H, W) -> one image with ``per_row`` maps per row, a 1-pixel nan gutter."""
    K, H, W = maps.shape
    rows = math.ceil(K / per_row)
    out = np.full((rows * (H + 1) - 1, per_row * (W + 1) - 1), np.nan)
    for k in range(K):  # K is a handful of channels: this loop is over figure tiles
        r, c = divmod(k, per_row)
        out[r * (H + 1) : r * (H + 1) + H, c * (W + 1) : c * (W + 1) + W] = maps[k]
    return out


def plot_feature_maps(
    path: str | os.PathLike,
    c: np.ndarray,
    c_hat: np.ndarray,
    channels: Sequence[int],
    layer: str,
    dtype: str,
    per_row: int = 4,
    title: str = "",
) -> Path:
    """Seed 000 Fig. E.1: original feature maps c, reconstructed ĉ, their difference ĉ − c
    (the first three on one colour scale) and the normalised difference (ĉ − c) / max|c|
    on its own scale (for float32 its maximum is typically around 1e-7).

    ``c`` and ``c_hat`` have the layer's shape (C, H, W); ``channels`` selects the maps.
    """
    plt = _pyplot()
    c = np.asarray(c, dtype=np.float64)
    c_hat = np.asarray(c_hat, dtype=np.float64)
    if c.ndim != 3 or c.shape != c_hat.shape:
        raise ValueError(f"plot_feature_maps needs two (C, H, W) arrays of one shape, got {c.shape} and {c_hat.shape}")
    ch = np.asarray(list(channels), dtype=np.int64)
    if ch.size == 0 or ch.min() < 0 or ch.max() >= c.shape[0]:
        raise ValueError(f"channels must be in [0, {c.shape[0]}), got {list(channels)}")
    diff = c_hat - c
    scale = float(np.abs(c).max()) or 1.0
    panels = [c[ch], c_hat[ch], diff[ch], diff[ch] / scale]
    names = ["original c", "reconstructed ĉ", "difference ĉ − c", "normalised (ĉ − c) / max|c|"]
    per_row = max(1, min(per_row, ch.size))
    vmin, vmax = float(min(c[ch].min(), c_hat[ch].min())), float(max(c[ch].max(), c_hat[ch].max()))
    fig, axes = plt.subplots(1, 4, figsize=(16, 4.4))
    for i, (ax, p, name) in enumerate(zip(axes, panels, names)):
        img = _mosaic(p, per_row)
        if i < 3:
            im = ax.imshow(img, cmap="gray", vmin=vmin, vmax=vmax, interpolation="nearest")
        else:
            m = float(np.nanmax(np.abs(img))) or 1.0
            im = ax.imshow(img, cmap="coolwarm", vmin=-m, vmax=m, interpolation="nearest")
            name += f"\nmax {m:.2e}"
        ax.set_title(name, fontsize=9)
        ax.set_xticks([])
        ax.set_yticks([])
        fig.colorbar(im, ax=ax, fraction=0.046, pad=0.02).ax.tick_params(labelsize=7)
    fig.suptitle(title or f"{layer} ({dtype}), channels {ch.tolist()}: seed 000 Eq. 14", fontsize=10)
    fig.tight_layout()
    return _savefig(fig, path)


def _savefig(fig, path) -> Path:
    plt = _pyplot()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    plt.close(fig)
    return atomic_write_bytes(path, buf.getvalue())
