"""Figures of the seed 001 studies beyond Tables 1–6: Fig. 6 (training stages), Fig. 7
(architectures), Fig. 4 over stages and Fig. 5 across data sets.

Each function draws on its own Agg canvas (no pyplot state) and writes the PNG atomically;
it returns the path, or ``None`` (no file) when there is nothing to draw.
"""
from __future__ import annotations

import math
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from ..report import _figure, _savefig

__all__ = ["plot_architectures", "plot_discrepancy_stages", "plot_embeddings_across", "plot_stages"]

_FR_COLOURS = ("tab:green", "tab:blue", "tab:red", "tab:purple", "tab:orange")


def _acc(records: Sequence[Mapping[str, Any]], method: str, pair: tuple[int, int], epoch: int,
         embedding: str | None = None) -> list[float]:
    return [r["test_acc"][epoch - 1] for r in records if r["method"] == method and (r["l_S"], r["l_R"]) == tuple(pair)
            and (embedding is None or method == "BP" or r["embedding"] == embedding)]


def plot_stages(rows: Sequence[Mapping[str, Any]], records: Mapping[int, Sequence[Mapping[str, Any]]],
                pair: Sequence[int], report_epochs: Sequence[int], epochs: int, embedding: str,
                path: str | os.PathLike) -> Path | None:
    """Seed 001 Fig. 6: one column per stage — the baseline's test accuracy (black line), the
    mean BP-PT accuracy after ``epochs`` (gray line) and box plots of FR-PT after each of
    ``report_epochs`` (green, blue, red …) over the runs."""
    if not rows:
        return None
    stages = [int(r["stage_epoch"]) for r in rows]
    fig = _figure((max(6.0, 0.9 * len(stages) + 2.5), 4.2))
    ax = fig.subplots()
    xs = np.arange(len(stages))
    width = 0.8 / max(1, len(report_epochs))
    for j, e in enumerate(report_epochs):
        data = [_acc(records[s], "FR", pair, e, embedding) for s in stages]
        pos = xs + (j - (len(report_epochs) - 1) / 2) * width
        keep = [i for i, v in enumerate(data) if v]
        if not keep:
            continue
        bp = ax.boxplot([data[i] for i in keep], positions=pos[keep], widths=width * 0.85, patch_artist=True,
                        manage_ticks=False, flierprops={"markersize": 2})
        colour = _FR_COLOURS[j % len(_FR_COLOURS)]
        for b in bp["boxes"]:
            b.set_facecolor(colour)
            b.set_alpha(0.55)
        ax.plot([], [], color=colour, lw=6, alpha=0.55, label=f"FR-PT {e} epoch{'s' if e > 1 else ''}")
    ax.plot(xs, [r["bp_mean"] for r in rows], "o-", color="gray", ms=3, label=f"BP-PT {epochs} epochs (mean)")
    ax.plot(xs, [r["baseline_test"] for r in rows], "s-", color="black", ms=3, label="baseline (BP stage)")
    ax.set_xticks(xs)
    ax.set_xticklabels([str(s) for s in stages])
    ax.set_xlabel("baseline stage (BP epochs)")
    ax.set_ylabel("test accuracy (%)")
    ax.set_title(f"FR-PT at different training stages, pair ({pair[0]},{pair[1]}) (seed 001 Fig. 6)", fontsize=9)
    ax.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    return _savefig(fig, path, dpi=120)


def plot_discrepancy_stages(recs: Mapping[str, Any], node: str, path: str | os.PathLike, sample: int = 0,
                            max_channels: int = 8) -> Path | None:
    """Seed 001 Fig. 4 over stages: ``|â − a*|`` of one image at feature map ``node``, one row per
    stage (the keys of ``recs`` label the rows), up to ``max_channels`` channels per row, all
    on one colour scale (so a shrinking discrepancy shows as a bluer row)."""
    maps = {}
    for label, rec in recs.items():
        if node not in rec.features or not 0 <= sample < rec.features[node].shape[0]:
            return None
        d = (rec.forward[node][sample] - rec.features[node][sample]).abs().detach().cpu().double().numpy()
        maps[label] = d.reshape(1, 1, -1) if d.ndim == 1 else (d[None] if d.ndim == 2 else d)
    C = min(max_channels, min(m.shape[0] for m in maps.values()))
    vmax = max(float(m[:C].max()) for m in maps.values()) or 1.0
    strip = next(iter(maps.values())).shape[1] == 1
    fig = _figure((max(1.6 * C + 1.8, 6.0), (1.0 if strip else 1.7) * len(maps) + 0.9))
    fig.subplots_adjust(left=0.2, right=0.86, top=0.86, bottom=0.05, hspace=0.5)
    im = None
    for i, (label, d) in enumerate(maps.items()):
        for c in range(C):  # a few panels per stage
            ax = fig.add_subplot(len(maps), C, i * C + c + 1)
            im = ax.imshow(d[c], cmap="jet", vmin=0.0, vmax=vmax, interpolation="nearest",
                           aspect="auto" if strip else "equal")
            ax.set_xticks([])
            ax.set_yticks([])
            if i == 0 and C > 1:
                ax.set_title(f"ch {c}", fontsize=7)
            if c == 0:
                ax.set_ylabel(label, fontsize=7, rotation=0, ha="right", va="center")
    fig.colorbar(im, cax=fig.add_axes((0.89, 0.15, 0.02, 0.65)))
    fig.suptitle(f"|â − a*| at {node}, image {sample}, over training stages (seed 001 Fig. 4)", fontsize=9)
    return _savefig(fig, path)


def plot_architectures(curves: Mapping[str, Mapping[str, Any]], path: str | os.PathLike) -> Path | None:
    """Seed 001 Fig. 7: one panel per architecture; per pair the mean ± std test accuracy of
    BP-PT (black / gray) and FR-PT (red) after every post-training epoch, the baseline dashed.

    ``curves[arch] = {"title", "baseline_acc", "pairs": {(l_S, l_R): {"BP": (mean, std),
    "FR": (mean, std)}}}`` with per-epoch mean and std arrays."""
    if not curves:
        return None
    fig = _figure((4.6 * len(curves), 3.8))
    axes = fig.subplots(1, len(curves), squeeze=False)[0]
    for ax, (arch, c) in zip(axes, curves.items()):
        for k, (pair, m) in enumerate(c["pairs"].items()):
            for method, colour in (("BP", "black" if k == 0 else "gray"), ("FR", _FR_COLOURS[(2 + k) % 5])):
                mean, std = (np.asarray(v, dtype=np.float64) for v in m[method])
                ep = np.arange(1, mean.size + 1)
                ax.plot(ep, mean, "o-", ms=3, color=colour, label=f"{method}-PT ({pair[0]},{pair[1]})")
                ax.fill_between(ep, mean - std, mean + std, color=colour, alpha=0.15)
        ax.axhline(c["baseline_acc"], color="black", ls="--", lw=1, label="baseline")
        ax.set_title(c.get("title", arch), fontsize=8)
        ax.set_xlabel("post-training epoch")
        ax.set_ylabel("test accuracy (%)")
        ax.legend(fontsize=7)
    fig.suptitle("FR-PT vs BP-PT on channel-increasing (a) and -decreasing (b) baselines (seed 001 Fig. 7)",
                 fontsize=9)
    fig.tight_layout()
    return _savefig(fig, path, dpi=120)


def plot_embeddings_across(groups: Mapping[str, Mapping[str, Sequence[float]]], baselines: Mapping[str, float],
                           path: str | os.PathLike) -> Path | None:
    """Seed 001 Fig. 5 across data sets: per data set, the mean test accuracy with a 95 %
    Student-t interval of FR-PT with each output embedding (and BP-PT), relative to the
    baseline (percentage points), so data sets of different accuracy share one axis.

    ``groups[data_set][label] = accuracies over the runs``."""
    from scipy import stats

    if not groups:
        return None
    labels = list(dict.fromkeys(k for g in groups.values() for k in g))
    colours = dict(zip(labels, ["tab:red", "tab:blue", "tab:gray", "silver", "tab:green"]))
    fig = _figure((max(5.0, 1.8 * len(groups) + 2.0), 3.8))
    ax = fig.subplots()
    width = 0.8 / max(1, len(labels))
    for i, (ds, g) in enumerate(groups.items()):
        for j, lab in enumerate(labels):
            if lab not in g or not len(g[lab]):
                continue
            v = np.asarray(g[lab], dtype=np.float64) - baselines[ds]
            half = float(stats.t.ppf(0.975, v.size - 1) * v.std(ddof=1) / math.sqrt(v.size)) if v.size > 1 else 0.0
            ax.bar(i + (j - (len(labels) - 1) / 2) * width, v.mean(), width * 0.9, yerr=half, capsize=3,
                   color=colours[lab], label=lab if i == 0 else None)
    ax.axhline(0.0, color="black", lw=1)
    ax.set_xticks(range(len(groups)))
    ax.set_xticklabels([f"{ds}\n(baseline {baselines[ds]:.2f} %)" for ds in groups], fontsize=8)
    ax.set_ylabel("test accuracy − baseline (points)")
    ax.set_title("Output embedding ablation per data set, last layer, 95 % CI (seed 001 Fig. 5)", fontsize=9)
    ax.legend(fontsize=7)
    fig.tight_layout()
    return _savefig(fig, path, dpi=120)
