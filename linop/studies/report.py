"""Reports of the three studies: tables (Markdown / CSV) and figures.

This module only *presents* numbers that the studies computed; files are written through
:mod:`linop.studies.store` (atomically: an interrupted run never leaves half a table).

Verification (seed 000, :mod:`linop.studies.verify`):

* :func:`markdown_table` — the layer × dtype table of Tables 3–4 (units, zeros, share of
  units with |ε| ≤ 1 %, max and median |ε|);
* :func:`criteria_lines` — one PASS/FAIL line per dtype against the paper's criteria;
* :func:`plot_error_histograms` — per-layer histograms of log10|ε| (Figs. 6–11);
* :func:`plot_signed_errors` — per-layer histograms of the signed ε on the paper's ±1e-4 axis;
* :func:`plot_feature_maps` — c, ĉ, ĉ − c and the normalised difference (Fig. E.1).

Reconstruction (seed 001 §3, :mod:`linop.studies.reconstruct`):

* :func:`reconstruction_table` — one line per reverse step (case, method, consistency,
  deviation of a* from â);
* :func:`plot_discrepancy` — |â_l − a*_l| per channel (Fig. 4).

Post-training (seed 001 §4, :mod:`linop.studies.posttrain`):

* :func:`posttrain_markdown` — the layout of Tables 1–6 (mean ± std per reported epoch);
* :func:`plot_pairs` — FR-PT box plots vs the BP-PT mean per (l_S, l_R) (the layout of
  Fig. 6, over pairs instead of training stages);
* :func:`plot_embeddings` — the output-embedding ablation with 95 % intervals (Fig. 5).

Shared: :func:`write_csv`.  Figures are drawn on matplotlib's Agg canvas (no display, no
global backend change).
"""
from __future__ import annotations

import csv
import io
import math
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from .store import atomic_write_bytes

__all__ = [
    "TABLE_COLUMNS",
    "criteria_lines",
    "markdown_table",
    "plot_discrepancy",
    "plot_embeddings",
    "plot_error_histograms",
    "plot_feature_maps",
    "plot_pairs",
    "plot_signed_errors",
    "posttrain_markdown",
    "reconstruction_table",
    "write_csv",
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
def _figure(figsize: tuple[float, float]):
    """A matplotlib Figure on its own Agg canvas (no pyplot state, no global backend change)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=figsize)
    FigureCanvasAgg(fig)
    return fig


def _fixed_layout(fig, nrow: int) -> None:
    """Margins for a grid of small panels with a suptitle: what ``tight_layout`` finds, without
    its cost (it draws every tick label of every panel twice: seconds for a 20-layer network)."""
    h = fig.get_figheight()
    fig.subplots_adjust(left=0.07, right=0.98, bottom=0.5 / h, top=1 - 0.75 / h, wspace=0.32,
                        hspace=0.5 if nrow > 1 else 0.2)


def plot_error_histograms(
    path: str | os.PathLike,
    hists: Mapping[str, np.ndarray],
    log10_edges: np.ndarray,
    dtype: str,
    threshold: float = 0.01,
    title: str = "",
    rebin: int | None = None,
) -> Path:
    """Per-layer histograms of log10|ε| (seed 000 Figs. 6–11), one subplot per layer.

    Parameters
    ----------
    hists : layer -> counts laid out as ``[ε = 0, |ε| below the first edge, bins…,
        |ε| ≥ last edge (incl. inf), nan]`` (the layout of ``linop.verify``).
    log10_edges : edges of the regular bins in log10|ε|.
    rebin : merge this many fine bins per bar (default: bars of 0.1 decade; the fine bins
        exist for the median).
    """
    layers = list(hists)
    ncol = min(3, max(1, len(layers)))
    nrow = math.ceil(len(layers) / ncol)
    fig = _figure((4.2 * ncol, 3.0 * nrow))
    axes = fig.subplots(nrow, ncol, squeeze=False)
    edges = np.asarray(log10_edges, dtype=np.float64)
    nb = len(edges) - 1
    if rebin is None:
        rebin = max(1, int(round(0.1 / (edges[1] - edges[0]))))
    if not isinstance(rebin, (int, np.integer)) or rebin < 1:
        raise ValueError(f"rebin must be a positive integer, got {rebin!r}")
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
            # one step artist per panel (not one patch per bar: a many-layer figure draws in ~1 s)
            ax.stairs(coarse, np.append(left, left[-1] + rebin * step), fill=True, color="tab:blue")
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
    _fixed_layout(fig, nrow)
    return _savefig(fig, path)


def plot_signed_errors(
    path: str | os.PathLike,
    signed: Mapping[str, np.ndarray],
    log10_edges: np.ndarray,
    dtype: str,
    threshold: float = 0.01,
    xlim: float = 1e-4,
    bins: int = 101,
    title: str = "",
) -> Path:
    """Per-layer histograms of the *signed* ε on a linear axis ``[−xlim, xlim]`` (the paper's
    ±1e-4 axis of seed 000 Figs. 6–11), one subplot per layer, built from the signed fine
    histogram of the verification study.

    Each fine bin of log10|ε| (0.001 decade wide) is placed at its geometric centre; a bin
    straddling a bar edge is put wholly on one side — a display rounding of ≤ 0.12 % of |ε|,
    the counts themselves are exact.  Units outside the axis are counted in the box.  The
    ±``threshold`` lines are drawn when they fall on the axis; otherwise the title says so.

    Parameters
    ----------
    signed : layer -> counts in the layout ``[ε = 0, nan, ε < 0: (under, fine bins…, over),
        ε > 0: (under, fine bins…, over)]`` (``linop.studies.errors.SIGNED_LAYOUT``).
    log10_edges : edges of the fine bins in log10|ε|.
    xlim : half-width of the axis; bins : number of bars over it (odd: one centred on 0).
    """
    if not (isinstance(xlim, (int, float)) and math.isfinite(xlim) and xlim > 0):
        raise ValueError(f"xlim must be a positive finite number, got {xlim!r}")
    if not isinstance(bins, (int, np.integer)) or bins < 1:
        raise ValueError(f"bins must be a positive integer, got {bins!r}")
    edges = np.asarray(log10_edges, dtype=np.float64)
    nb = len(edges) - 1
    side = nb + 2
    centres = np.concatenate([[10.0 ** edges[0] / 2],  # below the first edge: drawn at half of it
                              10.0 ** ((edges[:-1] + edges[1:]) / 2), [np.inf]])
    layers = list(signed)
    ncol = min(3, max(1, len(layers)))
    nrow = math.ceil(len(layers) / ncol)
    fig = _figure((4.2 * ncol, 3.0 * nrow))
    axes = fig.subplots(nrow, ncol, squeeze=False)
    bar_edges = np.linspace(-xlim, xlim, bins + 1)
    on_axis = threshold <= xlim
    for ax, layer in zip(axes.flat, layers):
        h = np.asarray(signed[layer], dtype=np.int64)
        if h.shape != (2 + 2 * side,):
            raise ValueError(f"signed histogram of {layer!r} has {h.size} slots, expected {2 + 2 * side}")
        neg, pos = h[2: 2 + side], h[2 + side:]
        vals = np.concatenate([[0.0], -centres, centres])
        counts = np.concatenate([h[:1], neg, pos])
        keep = counts > 0
        vals, counts = vals[keep], counts[keep]
        inside = np.abs(vals) <= xlim
        bar, _ = np.histogram(vals[inside], bins=bar_edges, weights=counts[inside])
        ax.stairs(bar, bar_edges, fill=True, color="tab:blue")
        if on_axis:
            for t in (-threshold, threshold):
                ax.axvline(t, color="tab:red", lw=1, ls="--")
            ax.text(threshold, 0.5, f" {threshold:g}", transform=ax.get_xaxis_transform(), color="tab:red", fontsize=7)
        n_out = int(counts[~inside].sum())
        notes = [f"units {int(h.sum())}", f"ε < 0: {int(neg.sum())}", f"ε > 0: {int(pos.sum())}",
                 f"ε = 0: {int(h[0])}"]
        if n_out:
            notes.append(f"|ε| > {xlim:g}: {n_out}")
        if h[1]:
            notes.append(f"nan: {int(h[1])}")
        ax.text(0.97, 0.97, "\n".join(notes), transform=ax.transAxes, va="top", ha="right", fontsize=7,
                bbox=dict(facecolor="white", alpha=0.85, edgecolor="none"))
        ax.set_xlim(-xlim, xlim)
        ax.set_title(layer, fontsize=9)
        ax.set_xlabel("ε", fontsize=8)
        ax.set_ylabel("units", fontsize=8)
        ax.tick_params(labelsize=7)
        ax.ticklabel_format(axis="x", style="sci", scilimits=(0, 0))
    for ax in list(axes.flat)[len(layers):]:
        ax.axis("off")
    line = (f"red: ε = ±{threshold:g}" if on_axis
            else f"the ±{threshold:g} lines lie off this ±{xlim:g} axis")
    fig.suptitle((title or f"signed relative errors ε (seed 000 Eq. 16), {dtype}") + f"; {line}", fontsize=10)
    _fixed_layout(fig, nrow)
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
    fig = _figure((16, 4.4))
    axes = fig.subplots(1, 4)
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


def _savefig(fig, path: str | os.PathLike, dpi: int = 110) -> Path:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi)
    return atomic_write_bytes(path, buf.getvalue())


# ---------------------------------------------------------------------------- reconstruction
def reconstruction_table(summary: Mapping[str, Any], to_layer: str) -> str:
    """One line per reverse step of a reconstruction summary (``Reconstruction.summary()``):
    node, step kind, MDP/CCP case by W's rank ("case") and by the paper's channel rule
    ("paper"), the principle applied ("solved as"), solver method, consistency, clipped units
    and the deviation of a* from â at that node; then the ``to_layer`` line and a legend.  The
    first line names the mode ("linop" or "paper")."""
    header = (f"{'node':<22}{'step':<16}{'case':<16}{'paper':<7}{'solved as':<13}{'method':<16}{'consist. max':>13}"
              f"{'clipped':>9}{'rel dev mean':>14}{'rel dev max':>13}")
    lines = [f"mode: {summary.get('mode', 'linop')}", header]
    nan = float("nan")
    for s in summary["steps"]:
        dv = summary["deviation"].get(s["node"], {})
        clip = str(s["n_clipped"]) if "n_clipped" in s else "-"
        lines.append(f"{s['node']:<22}{s['kind']:<16}{s['case'] or '-'!s:<16}{s.get('paper_case') or '-'!s:<7}"
                     f"{s.get('solved_as') or '-'!s:<13}{s['method'] or '-'!s:<16}"
                     f"{s['consistency_max']:>13.2e}{clip:>9}{dv.get('rel_mean', nan):>14.3e}"
                     f"{dv.get('rel_max', nan):>13.3e}")
    dv = summary["deviation"][to_layer]
    lines.append(f"{to_layer:<22}{'(to_layer)':<16}{'':<16}{'':<7}{'':<13}{'':<16}{'':>13}{'':>9}"
                 f"{dv['rel_mean']:>14.3e}{dv['rel_max']:>13.3e}")
    lines.append("consist. = ||f(a*_in) - z*|| / ||z*|| per step (0 / ~1e-15: exact; CCP steps, the approximate "
                 "fft solve and clipped activations need not be exact); rel dev = ||a* - â|| / ||â|| of the "
                 "node's feature; case: by W's rank, paper: by channels (seed 001 §3.1-3.2)")
    return "\n".join(lines)


def plot_discrepancy(rec: Any, node: str, path: str | os.PathLike, sample: int = 0, max_channels: int = 32) -> Path:
    """|â_l − a*_l| per channel for one sample of a ``Reconstruction`` (seed 001 Fig. 4).

    A (C, H, W) feature gives one panel per channel (up to ``max_channels``) on a shared
    colour scale; a vector gives a single strip."""
    if node not in rec.features:
        raise ValueError(f"node {node!r} was not reconstructed/kept; available: {sorted(rec.features)}")
    N = rec.features[node].shape[0]
    if not (0 <= sample < N):
        raise ValueError(f"sample must be in [0, {N}), got {sample}")
    d = (rec.forward[node][sample] - rec.features[node][sample]).abs().detach().cpu().double().numpy()
    if d.ndim == 1:
        d = d[None, None, :]
    elif d.ndim == 2:
        d = d[None]
    C = min(d.shape[0], max_channels)
    cols = min(C, 8)
    rows = -(-C // cols)
    size = (max(1.8 * cols + 1.0, 5.5), 1.8 * rows + 0.8) if d.shape[1] > 1 else (8.0, 2.4)
    fig = _figure(size)
    fig.subplots_adjust(top=1.0 - 0.7 / size[1], right=0.85)  # room for the two-line title
    vmax = float(d[:C].max()) or 1.0
    im = None
    for c in range(C):  # one panel per channel (a few dozen at most)
        ax = fig.add_subplot(rows, cols, c + 1)
        im = ax.imshow(d[c], cmap="jet", vmin=0.0, vmax=vmax, interpolation="nearest",
                       aspect="auto" if d.shape[1] == 1 else "equal")
        ax.set_xticks([])
        ax.set_yticks([])
        if C > 1:
            ax.set_title(f"ch {c}", fontsize=7)
    fig.colorbar(im, cax=fig.add_axes((0.88, 0.15, 0.02, 0.6)))
    rel = float(rec.deviation[node]["rel"][sample])
    mode = getattr(rec, "mode", "linop")
    fig.suptitle(f"|â − a*| at {node}, {mode} mode\n(sample {sample}, label {int(rec.labels[sample])}, "
                 f"rel. dev. {rel:.3g})", fontsize=9)
    return _savefig(fig, path)


# ---------------------------------------------------------------------------- post-training
MODE_TEXT = {
    "linop": "linop — our exact variants: unchanged pooling windows keep â, W's rank decides MDP/CCP, exact solvers",
    "paper": "paper — seed 001's method: pooling copied back in every window (§3.4(b)), the FFT solve of §3.2 for "
             "unpadded stride-1 convs, MDP/CCP by channels",
}


def posttrain_markdown(rows: Sequence[Mapping[str, Any]], report_epochs: Sequence[int], baseline_acc: float,
                       title: str = "", mode: str | None = None) -> str:
    """Seed 001 Tables 1–6: one row per (method, l_S, l_R), mean ± std test accuracy per
    reported epoch; the better method per pair and epoch in bold.  ``mode`` ("linop" /
    "paper", default: the rows' ``mode``) is stated on its own line under the title."""
    best: dict[tuple, float] = {}
    for r in rows:
        for e in report_epochs:
            k = (r["l_S"], r["l_R"], e)
            best[k] = max(best.get(k, -1.0), r[f"epoch{e}_mean"])
    head = "| PT (l_S, l_R) | #paras | Mem (MB, est.) | " + " | ".join(f"epoch{e}" for e in report_epochs) + " |"
    sep = "|" + "---|" * (3 + len(report_epochs))
    lines = [title, ""] if title else []
    mode = mode or next((r["mode"] for r in rows if r.get("mode")), None)
    if mode:
        lines += [f"Mode: {MODE_TEXT.get(mode, mode)}", ""]
    lines += [f"Baseline test accuracy: {baseline_acc:.3f}%", "", head, sep]
    for r in rows:
        cells = []
        for e in report_epochs:
            m, s = r[f"epoch{e}_mean"], r[f"epoch{e}_std"]
            txt = f"{m:.3f} ± {s:.3f}"
            cells.append(f"**{txt}**" if m == best[(r["l_S"], r["l_R"], e)] else txt)
        lines.append(f"| {r['pt']} | {r['n_params']} | {r['mem_mb']:.3f} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _accuracies(records: Sequence[Mapping[str, Any]], epoch: int, method: str, pair: tuple[int, int],
                embedding: str | None = None) -> list[float]:
    """Test accuracies after ``epoch`` of the runs of one method (and embedding) on ``pair``."""
    return [r["test_acc"][epoch - 1] for r in records
            if r["method"] == method and (r["l_S"], r["l_R"]) == pair
            and (embedding is None or r["embedding"] == embedding)]


def plot_pairs(records: Sequence[Mapping[str, Any]], baseline_acc: float, report_epochs: Sequence[int],
               path: str | os.PathLike, embedding: str, mode: str | None = None) -> Path | None:
    """FR-PT vs BP-PT per (l_S, l_R) pair: FR-PT box plots at the reported epochs, the BP-PT
    mean at the last epoch (gray) and the baseline (black).  (Seed 001 Fig. 6 has this
    layout over *training stages* of one pair; this figure is over pairs.)  ``mode`` goes in
    the title.  ``None`` (no file) when there is no FR-PT run with ``embedding``."""
    pairs = sorted({(r["l_S"], r["l_R"]) for r in records if r["method"] == "FR" and r["embedding"] == embedding},
                   key=lambda p: (p[1], p[0]))
    if not pairs:
        return None
    colours = ["tab:green", "tab:blue", "tab:red", "tab:purple", "tab:orange"]
    fig = _figure((max(5.0, 1.2 * len(pairs) + 2), 4.0))
    ax = fig.subplots()
    width = 0.8 / max(1, len(report_epochs))
    for j, e in enumerate(report_epochs):
        data = [_accuracies(records, e, "FR", p, embedding) for p in pairs]
        pos = [i + (j - (len(report_epochs) - 1) / 2) * width for i in range(len(pairs))]
        bp = ax.boxplot(data, positions=pos, widths=width * 0.9, patch_artist=True, manage_ticks=False)
        for b in bp["boxes"]:
            b.set_facecolor(colours[j % len(colours)])
            b.set_alpha(0.6)
        ax.plot([], [], color=colours[j % len(colours)], lw=6, alpha=0.6, label=f"FR-PT epoch {e}")
    last = report_epochs[-1]
    bp_means = [np.mean(v) if (v := _accuracies(records, last, "BP", p)) else np.nan for p in pairs]
    ax.plot(range(len(pairs)), bp_means, "o-", color="gray", label=f"BP-PT epoch {last} (mean)")
    ax.axhline(baseline_acc, color="black", lw=1.5, label="baseline")
    ax.set_xticks(range(len(pairs)))
    ax.set_xticklabels([f"({s},{r})" for s, r in pairs])
    ax.set_xlabel("(l_S, l_R)")
    ax.set_ylabel("test accuracy (%)")
    ax.set_title(f"FR-PT ({embedding.upper()}) vs BP-PT per (l_S, l_R): test accuracy over runs"
                 + (f"\n({mode} mode)" if mode else ""), fontsize=9)
    ax.legend(fontsize=7, loc="best")
    fig.tight_layout()
    return _savefig(fig, path, dpi=120)


def plot_embeddings(records: Sequence[Mapping[str, Any]], baseline_acc: float, l_S: int, l_R: int, epoch: int,
                    path: str | os.PathLike, embeddings: Sequence[str] = ("ma", "ne", "onehot")) -> Path | None:
    """Seed 001 Fig. 5: mean test accuracy with a 95 % Student-t interval per output embedding
    for the pair ``(l_S, l_R)``, BP-PT as reference.  ``None`` (no file) with fewer than two
    embeddings to compare."""
    from scipy import stats

    groups = {}
    for emb in embeddings:
        if v := _accuracies(records, epoch, "FR", (l_S, l_R), emb):
            groups[emb.upper() if emb != "onehot" else "one-hot"] = v
    if len(groups) < 2:
        return None
    if bp := _accuracies(records, epoch, "BP", (l_S, l_R)):
        groups["BP-PT"] = bp
    names = list(groups)
    means = [float(np.mean(groups[k])) for k in names]
    half = []
    for k in names:
        v = np.asarray(groups[k], dtype=np.float64)
        half.append(float(stats.t.ppf(0.975, v.size - 1) * v.std(ddof=1) / math.sqrt(v.size)) if v.size > 1 else 0.0)
    fig = _figure((4.5, 3.5))
    ax = fig.subplots()
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
    return _savefig(fig, path, dpi=120)
