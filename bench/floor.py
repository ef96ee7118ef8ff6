"""Benchmark: the multiply-add floor of the all-unit verification sweep (issue 10).

``python -m bench.floor [--models vgg7 resnet20 fixup] [--batch 512] [--out results/bench_floor.json]``

How fast *can* one image's verification be on this machine, whatever the evaluation strategy?
The sweep must form every effective hypersurface ``H`` (image part and bias part) of every unit,
so its multiply-adds are fixed by the schedule: a node with period ``P`` carries ``C·P_y·P_x``
image tangents plus its bias tangents, each costing the node's structural non-zeros
(:meth:`linop.network.Node.tangent_cost` with no elementwise charge).  Per shipped digits32
checkpoint this script counts them for the ``auto`` schedule (what ``linop verify`` runs) and for
the ``identity`` schedule (seed 000's identity batch, ``P = (H, W)``), and — in the same run,
single-threaded, float32 and float64 — measures

* the machine's GEMM rate (``torch.mm`` of 2048², the ceiling of any dense multiply-add), and
* torch's convolution rate on the model's own tangent batches at its full-window layers
  (``--batch`` tangents, channels-last, the layout of the sweep);

and prints the floor ``multiply-adds / rate`` per image.  Two consequences are exact, not
measured: the ``identity / auto`` multiply-add ratio bounds what *any* shared evaluation strategy
can make of the back-map's speed-up over the identity batch (both run the same node operators),
and the float64 / float32 floor ratio is the ratio of the two rates.  Winograd / FFT convolutions,
which change the count of multiplications, are outside this floor (they would lower both
schedules alike).  ``uptime`` is recorded before and after.
"""
from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import torch

CHECKPOINTS = {"vgg7": "vgg7_digits32", "resnet20": "resnet20_digits32", "fixup": "fixup_resnet20_digits32"}


def _load() -> str:
    return ", ".join(f"{v:.2f}" for v in os.getloadavg())


def sweep_macs(lin, schedule: str) -> dict:
    """Multiply-adds of one all-unit sweep: image and bias tangents (see module docstring)."""
    per = lin.periods(schedule=schedule)
    plan = lin.plan(schedule=schedule)
    C = lin.image_shape[0]
    img = bias = 0.0
    for n in lin.net.nodes:
        if n.name not in per or not n.inputs:
            continue
        c = n.tangent_cost(0.0)
        img += C * per[n.name][0] * per[n.name][1] * c
        bias += plan["n_bias_cols"][n.name] * c
    return {"image": img, "bias": bias, "total": img + bias}


def gemm_rate(dtype: torch.dtype, n: int = 2048, reps: int = 3) -> float:
    a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
    a @ b
    t = time.perf_counter()
    for _ in range(reps):
        a @ b
    return reps * n**3 / (time.perf_counter() - t)


def conv_rate(lin, dtype: torch.dtype, batch: int, reps: int = 2) -> float:
    """torch's conv rate (MAC/s) over the model's 2-D convs whose windows cover the image,
    on ``batch`` channels-last tangents of each layer's input shape."""
    from linop.operators.conv import Conv2d

    H, W = lin.image_shape[1:]
    per = lin.periods(schedule="auto")
    macs = secs = 0.0
    for n in lin.net.nodes:
        op = getattr(n, "op", None)
        if not isinstance(op, Conv2d) or per.get(n.name) != (H, W):
            continue
        x = torch.randn((batch,) + tuple(op.in_shape), dtype=dtype).contiguous(memory_format=torch.channels_last)
        op.apply(x)  # the operator's own torch path, as the sweep evaluates it
        t = time.perf_counter()
        for _ in range(reps):
            op.apply(x)
        secs += time.perf_counter() - t
        macs += reps * batch * n.tangent_cost(0.0)
    return macs / secs if secs else float("nan")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", nargs="+", default=list(CHECKPOINTS), choices=list(CHECKPOINTS))
    p.add_argument("--batch", type=int, default=512, help="tangents per timed convolution")
    p.add_argument("--out", default="results/bench_floor.json")
    a = p.parse_args(argv)
    if a.batch < 1:
        p.error(f"--batch must be >= 1, got {a.batch}")
    torch.set_num_threads(1)
    import linop
    from models import shipped_checkpoint
    from models.train import load_checkpoint

    out: dict = {"load_before": _load(), "threads": 1, "rows": []}
    rates = {str(d).split(".")[-1]: gemm_rate(d) for d in (torch.float32, torch.float64)}
    out["gemm_mac_per_s"] = rates
    print(f"GEMM (1 thread): float32 {rates['float32'] / 1e9:.1f} GMAC/s, float64 {rates['float64'] / 1e9:.1f} GMAC/s")
    print("| model | MACs / image (auto) | bias share | identity / auto MACs | conv rate f32 / f64 (GMAC/s) "
          "| floor f32 at conv rate | floor f64 at conv rate | floor f32 at GEMM peak |")
    print("|---|---|---|---|---|---|---|---|")
    for name in a.models:
        model, _ = load_checkpoint(shipped_checkpoint(CHECKPOINTS[name]))
        net = linop.from_torch(model, (3, 32, 32))
        row: dict = {"model": name}
        for d in (torch.float32, torch.float64):
            lin = linop.linearise(net, torch.rand(3, 32, 32), dtype=d)
            row[f"conv_rate_{str(d)[6:]}"] = conv_rate(lin, d, a.batch)
        # the periods (hence the multiply-adds) depend on the geometry only, not on the dtype
        auto, ident = sweep_macs(lin, "auto"), sweep_macs(lin, "identity")
        row.update(auto=auto, identity=ident, identity_over_auto=ident["total"] / auto["total"])
        row["floor_s"] = {"float32_conv": auto["total"] / row["conv_rate_float32"],
                          "float64_conv": auto["total"] / row["conv_rate_float64"],
                          "float32_gemm": auto["total"] / rates["float32"]}
        out["rows"].append(row)
        f = row["floor_s"]
        print(f"| {name} | {auto['total'] / 1e9:.1f} G | {auto['bias'] / auto['total']:.0%} | "
              f"{row['identity_over_auto']:.2f} | {row['conv_rate_float32'] / 1e9:.1f} / "
              f"{row['conv_rate_float64'] / 1e9:.1f} | {f['float32_conv']:.2f} s | {f['float64_conv']:.2f} s | "
              f"{f['float32_gemm']:.2f} s |")
        Path(a.out).parent.mkdir(parents=True, exist_ok=True)
        Path(a.out).write_text(json.dumps(out, indent=1))
    out["load_after"] = _load()
    Path(a.out).write_text(json.dumps(out, indent=1))
    print(f"load average before {out['load_before']}, after {out['load_after']}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
