"""Benchmark: the shifted-GEMM float64 convolution against torch's (issue 10).

``python -m bench.conv64 [--batch 500] [--reps 3] [--threads 1] [--out results/bench_conv64.json]``

For the convolution shapes of VGG7 / ResNet20 / Fixup-ResNet20 (their stages are 32 / 64 / 96
channels on 32² / 16² / 8²; the stride-2 convs and a 1×1 for comparison) and a tangent batch of
``--batch`` channels-last tensors (the sweep's layout), times in one run, best of ``--reps`` (the variants interleaved):
torch float64 (``LINOP_CONV64=torch``), the pre-NHWC choice (``old64``: CNHW shifted GEMMs where
:func:`linop.operators.conv_gemm.rule` picks them, else torch), the two channels-last strategies
forced (``nhwc``: NHWC shifted GEMMs, stride 1; ``patch``: one patch GEMM per image), ``Conv2d``
float64 under ``auto`` (the strategy :func:`linop.operators.conv_gemm.choose` picks, printed),
torch float32, and the adjoints (``F.conv_transpose2d`` vs ``auto``), and prints GMAC/s and the
ratios.  ``uptime``
is printed before and after (the machine is shared: compare ratios inside one run only).
"""
from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import torch

#: (label, C_in, C_out, H, kernel, stride)
SHAPES = [
    ("3->32 @32 (first conv)", 3, 32, 32, 3, 1),
    ("32->32 @32", 32, 32, 32, 3, 1),
    ("32->64 @32 s2", 32, 64, 32, 3, 2),
    ("32->64 @16 (VGG7)", 32, 64, 16, 3, 1),
    ("64->64 @16", 64, 64, 16, 3, 1),
    ("64->96 @16 s2", 64, 96, 16, 3, 2),
    ("64->96 @8 (VGG7)", 64, 96, 8, 3, 1),
    ("96->96 @8", 96, 96, 8, 3, 1),
    ("32->64 @16 1x1", 32, 64, 16, 1, 1),
]


def _uptime() -> str:
    return os.popen("uptime").read().strip()


def _best(fns: dict, reps: int) -> dict:
    """Best time of each ``(mode, fn)`` of ``fns`` over ``reps`` rounds, the variants interleaved
    in every round (a load change hits them alike); one warm-up call each."""
    from linop.operators import conv_gemm

    old = conv_gemm.CONV64
    best = {key: float("inf") for key in fns}
    try:
        for r in range(reps + 1):
            for key, (mode, fn) in fns.items():
                conv_gemm.CONV64 = mode
                t0 = time.perf_counter()
                fn()
                if r:  # round 0 warms up (allocator, cached tap weights)
                    best[key] = min(best[key], time.perf_counter() - t0)
    finally:
        conv_gemm.CONV64 = old
    return best


def _fixed(fn, mode: str = "auto"):
    """``fn`` as a :func:`_best` entry (the mode only matters to ``Conv2d`` calls)."""
    return (mode, fn)


def run(batch: int, reps: int) -> list[dict]:
    import torch.nn.functional as F

    from linop.operators import Conv2d, conv_gemm, conv_nhwc

    rows = []
    g = torch.Generator().manual_seed(0)
    for label, ci, co, H, k, s in SHAPES:
        w = torch.randn(co, ci, k, k, generator=g, dtype=torch.float64)
        p = k // 2
        P, one, kk = (p,) * 4, (1, 1), (k, k)
        op = Conv2d(w, (ci, H, H), stride=s, padding=p)
        x = torch.randn(batch, ci, H, H, generator=g, dtype=torch.float64).contiguous(memory_format=torch.channels_last)
        y = torch.randn((batch,) + op.out_shape, generator=g, dtype=torch.float64).contiguous(
            memory_format=torch.channels_last)
        x32, op32 = x.float(), Conv2d(w.float(), (ci, H, H), stride=s, padding=p)
        mac = batch * op.nnz  # multiply-adds of the batch (in-bounds taps)
        taps, wm = conv_gemm.tap_weights(w), conv_nhwc.patch_weight(w)
        taps_t = conv_nhwc.nhwc_taps(taps)
        # the pre-NHWC choice: CNHW shifted GEMMs where rule() picks them (channels-last copied in), else torch
        old = conv_gemm.rule((ci, H, H), co, kk, (s, s), 1, P, torch.float64)
        fns = {"torch64": _fixed(lambda: op.apply(x), "torch"), "auto64": _fixed(lambda: op.apply(x)),
               "old64": _fixed((lambda: conv_gemm.conv2d_shifted_gemm(x, taps, kk, P, one)) if old else
                               (lambda: F.conv2d(x, w, None, s, p))),
               "patch64": _fixed(lambda: conv_nhwc.conv2d_nhwc_im2col(x, wm, kk, (s, s), P, one)),
               "torch32": _fixed(lambda: op32.apply(x32)),
               "torch64_adj": _fixed(lambda: op.apply_adjoint(y), "torch"),
               "auto64_adj": _fixed(lambda: op.apply_adjoint(y))}
        if s == 1:
            fns["nhwc64"] = _fixed(lambda: conv_nhwc.conv2d_nhwc_shifted(x, taps_t, kk, P, one))
        t = _best(fns, reps)
        conv_gemm_mode = conv_gemm.CONV64
        conv_gemm.CONV64 = "auto"
        picked = conv_gemm.choose(x, co, op.kernel_size, op.stride, op.groups, op.padding)
        picked_adj = conv_gemm.choose(y, ci, op.kernel_size, op.stride, op.groups,
                                      conv_gemm.adjoint_padding(P, kk, one), adjoint=True)
        conv_gemm.CONV64 = conv_gemm_mode
        row = dict(shape=label, batch=batch, gmac=mac / 1e9, strategy=picked, strategy_adj=picked_adj,
                   **{f"{key}_s": v for key, v in t.items()},
                   **{f"{key}_gmacs": mac / v / 1e9 for key, v in t.items()})
        row["speedup"] = t["torch64"] / t["auto64"]
        row["speedup_vs_old"] = t["old64"] / t["auto64"]
        row["speedup_adj"] = t["torch64_adj"] / t["auto64_adj"]
        row["f64_over_f32_torch"] = t["torch64"] / t["torch32"]
        row["f64_over_f32_old"] = t["old64"] / t["torch32"]
        row["f64_over_f32_auto"] = t["auto64"] / t["torch32"]
        rows.append(row)
        gm = lambda key: f"{row[key + '_gmacs']:5.1f}" if key + "_gmacs" in row else "    -"
        print(f"{label:24s} {picked:5s}/{picked_adj:5s} GMAC/s: torch64 {gm('torch64')} old64 {gm('old64')} "
              f"nhwc {gm('nhwc64')} patch {gm('patch64')} auto64 {gm('auto64')} torch32 {gm('torch32')} | adj "
              f"torch64 {gm('torch64_adj')} auto64 {gm('auto64_adj')} | auto/torch64 {row['speedup']:.2f} "
              f"auto/old {row['speedup_vs_old']:.2f} (adj {row['speedup_adj']:.2f}) | f64/f32 torch "
              f"{row['f64_over_f32_torch']:.1f} old {row['f64_over_f32_old']:.1f} auto {row['f64_over_f32_auto']:.1f}",
              flush=True)
    tot = {key: sum(r["gmac"] / r[f"{key}_gmacs"] for r in rows) for key in ("torch64", "old64", "auto64", "torch32")}
    print(f"all shapes together: float64 torch {tot['torch64']:.2f} s, old {tot['old64']:.2f} s, auto "
          f"{tot['auto64']:.2f} s ({tot['torch64'] / tot['auto64']:.2f}x torch, {tot['old64'] / tot['auto64']:.2f}x old);"
          f" float64/float32: torch {tot['torch64'] / tot['torch32']:.1f}, old {tot['old64'] / tot['torch32']:.1f}, "
          f"auto {tot['auto64'] / tot['torch32']:.1f}")
    return rows


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.conv64", description=__doc__.split("\n\n")[0])
    ap.add_argument("--batch", type=int, default=500, help="tangents per convolution (default 500)")
    ap.add_argument("--reps", type=int, default=3, help="timed repetitions, best taken (default 3)")
    ap.add_argument("--threads", type=int, default=1, help="torch threads (default 1, as a study worker)")
    ap.add_argument("--out", type=Path, default=None, help="write the rows as JSON here")
    a = ap.parse_args(argv)
    if a.batch < 1 or a.reps < 1 or a.threads < 1:
        ap.error("--batch, --reps and --threads must be >= 1")
    torch.set_num_threads(a.threads)
    before = _uptime()
    print("before:", before, flush=True)
    rows = run(a.batch, a.reps)
    after = _uptime()
    print("after: ", after)
    if a.out:
        a.out.parent.mkdir(parents=True, exist_ok=True)
        a.out.write_text(json.dumps(dict(uptime_before=before, uptime_after=after, threads=a.threads, rows=rows),
                                    indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
