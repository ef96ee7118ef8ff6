"""Statistics of the post-training runs: table rows (mean ± std over runs per reported epoch,
seed 001 Tables 1–6) and the FR-PT − BP-PT comparison with Welch's t-test."""
from __future__ import annotations

import warnings
from collections.abc import Iterable, Sequence

import numpy as np

from .features import EMBEDDINGS

__all__ = ["compare_methods", "summarize"]


def _mean_std(values: Sequence[float]) -> tuple[float, float]:
    a = np.asarray(values, dtype=np.float64)
    std = float(a.std(ddof=1)) if a.size > 1 else 0.0  # sample std over runs
    return float(a.mean()), std


def summarize(records: Iterable[dict], report_epochs: Sequence[int], baseline_acc: float) -> list[dict]:
    """Table rows (one per pair, method and embedding): #paras, memory, mean ± std per epoch."""
    groups: dict[tuple, list[dict]] = {}
    for r in records:
        groups.setdefault((r["l_R"], r["l_S"], r["embedding"], r["method"]), []).append(r)
    order = {"BP": 0, "FR": 1}
    emb_order = {"-": -1, **{e: i for i, e in enumerate(EMBEDDINGS)}}
    rows = []
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
            row[f"epoch{e}_mean"], row[f"epoch{e}_std"] = _mean_std([r["test_acc"][e - 1] for r in recs])
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
