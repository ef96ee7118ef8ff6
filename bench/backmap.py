"""Benchmark: effective hypersurfaces of *all* units of *all* layers (RM2), one 32x32x3 image.

``python -m bench.backmap [--models vgg7 resnet20] [--dtypes float32 float64]
[--methods linop identity jacfwd jacrev] [--max-seconds 300] [--device cpu|cuda|cuda:k]
[--out results/bench_backmap.json]``

Every method delivers the same product: per unit layer, one layer at a time, the full
Jacobian of the layer's pre-bias output w.r.t. ``[x; x_b]`` — all units' RM2 hypersurfaces,
image part and bias part — as dense tensors in the library's documented RM2 layout
``(U, C, H, W)`` / ``(U, n_b)`` (unit-major).  Every method is charged for producing that
layout (transposes included):

* ``linop``    — this library: one forward sweep of compressed-window tangents
  (:mod:`linop.linearize`, with its cost-model period schedule), then each layer's dense RM2
  arrays via :meth:`LayerJacobian.image` / ``bias``, i.e. including the densification.
* ``identity`` — the paper's method (seed 000 Algorithm 1): forward-mode convolution of an
  identity batch of ``C·H·W`` image tangents (3,072) plus one tangent per bias entry (only
  from the node where each bias enters), through the linearised network — the public
  ``lin.sweep(schedule="identity")`` (period ``(H, W)`` everywhere); the tangent batch is
  ``(n_in, U)`` (tangent-major) and is transposed into the RM2 layout (charged).

``--out-buffer reuse`` (default): ``linop`` and ``identity`` both write each layer's RM2 arrays
into one preallocated, pre-touched buffer (largest layer's size) reused across layers — what a
consumer that keeps one layer at a time does; it removes ~0.2 s of first-touch page faults per
400 MB layer from *both*.  ``--out-buffer fresh`` allocates new arrays per layer for both.
``jacfwd`` / ``jacrev`` always return fresh arrays (their API has no ``out``).
* ``jacfwd``   — ``torch.func.jacfwd`` of the bias-extended function, separately per layer.
* ``jacrev``   — ``torch.func.jacrev`` (chunked, ``chunk_size`` = ``--jacrev-chunk``) per layer.
* ``linop_sweep`` (extra, ``--methods linop_sweep``) — the compressed Jacobians of every layer and
  ``ĉ = <[x; x_b], H>`` from them, without densifying (what the verification study needs).

Each (model, dtype, method) runs in its own subprocess; peak memory is the growth of that
process's ``ru_maxrss`` (resident set high-water mark) during the timed run over the level
after setup — it sees torch's allocations, unlike tracemalloc; it is page-granular and counts
freed-and-reused memory once.  Every method's result is checked: ``<[x; x_b], H_u> = c_u`` for
all units (max relative error reported).  A method that exceeds ``--max-seconds`` stops after
the current layer and its total is reported as a lower bound (">").  Results are written to
the JSON file after every run.  The machine may be shared: timings are wall-clock.

``--device cuda[:k]`` (validated up front: one line and exit 2 without CUDA) puts the image,
``x_b``, the output buffers and hence every operator's work on that device for all methods;
the timed regions are bracketed by ``torch.cuda.synchronize()`` and ``peak_mib`` is then
``torch.cuda.max_memory_allocated`` over the timed run (reset after setup; the reused output
buffer is excluded, as on the CPU), with the host's ``ru_maxrss`` growth kept as
``host_peak_mib``.  Each result records its device.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from bench._device import check_device, clock

METHODS = ("linop", "identity", "jacfwd", "jacrev")
#: extra, not a baseline: the compressed Jacobians + ĉ only (what reconstructed_activations does)
EXTRA = ("linop_sweep",)
CHECKPOINTS = {"vgg7": "models/checkpoints/vgg7_digits32.pt", "resnet20": "models/checkpoints/resnet20_digits32.pt"}


# ----------------------------------------------------------------------------- setup
def build(model: str, dtype: torch.dtype, device: str | torch.device = "cpu"):
    """(EquivalentNetwork, image on ``device``, description of the weights, of the image); the
    network's operators follow the device of the tensors they are given."""
    from linop.convert import from_torch

    torch.manual_seed(0)
    ckpt = Path(CHECKPOINTS.get(model, ""))
    if model == "vgg7":
        from models.vgg7 import vgg7 as ctor
    elif model == "resnet20":
        from models.resnet20 import resnet20 as ctor
    else:
        raise ValueError(f"--models: unknown model {model!r}; choose from {sorted(CHECKPOINTS)}")
    module, weights = None, "random init (seed 0)"
    if ckpt.is_file():
        try:
            from models.train import load_checkpoint

            module = load_checkpoint(str(ckpt))
            module = module[0] if isinstance(module, tuple) else module
            weights = f"checkpoint {ckpt}"
        except Exception as exc:  # noqa: BLE001 - fall back, but say so
            weights = f"random init (seed 0; loading {ckpt} failed: {type(exc).__name__}: {exc})"
            module = None
    if module is None:
        module = ctor()
    module.eval()
    net = from_torch(module, (3, 32, 32), dtype)
    try:
        from models.data import sample_images

        x = sample_images(32)[0].to(dtype)
        image = "sklearn sample image, 32x32"
    except Exception:  # noqa: BLE001
        x = torch.rand(3, 32, 32, generator=torch.Generator().manual_seed(0)).to(dtype)
        image = "uniform random image (seed 0)"
    return net, x.reshape(3, 32, 32).to(device), weights, image


def _maxrss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # Linux: KiB


def _check(HI, Hb, x, x_b, c, unit_major: bool) -> float:
    """max_u |<[x;x_b], H_u> - c_u| / max|c| (outside the timed region)."""
    if unit_major:
        ch = HI.reshape(HI.shape[0], -1) @ x.reshape(-1) + Hb @ x_b
    else:  # (n_in, U) tangent-major
        ch = x.reshape(-1) @ HI.reshape(x.numel(), -1) + x_b @ Hb.reshape(x_b.numel(), -1)
    return float(((ch.reshape(-1) - c).abs().max() / c.abs().max().clamp_min(1e-30)).item())


# ----------------------------------------------------------------------------- methods
def run_method(method: str, model: str, dtype_name: str, max_seconds: float, jacrev_chunk: int,
               out_buffer: str = "reuse", device: str = "cpu") -> dict:
    from linop import linearise, validate

    dev = validate.device(device, "--device")
    dtype = getattr(torch, dtype_name)
    net, x, weights, image = build(model, dtype, dev)
    x_b = net.x_b.to(device=dev, dtype=dtype)
    pre = {k: v[0].reshape(-1) for k, v in net.preactivations(x.unsqueeze(0)).items()}
    layers = net.unit_layers
    res: dict[str, Any] = {"model": model, "dtype": dtype_name, "method": method, "weights": weights,
                           "image": image, "layers": {}, "threads": torch.get_num_threads(), "complete": True,
                           "out_buffer": out_buffer if method in ("linop", "identity") else "fresh",
                           "load_avg_start": os.getloadavg(), "device": str(dev)}
    setup = 0.0
    C, H, W = 3, 32, 32
    n_in = C * H * W
    bufI = bufB = None
    if out_buffer == "reuse" and method in ("linop", "identity"):
        # one RM2 output buffer for the largest layer, touched once here (outside the timing)
        Umax = max(int(np.prod(net.unit_node(l).out_shape)) for l in layers)
        bufI = torch.zeros(Umax * n_in, dtype=dtype, device=dev)
        bufB = torch.zeros(Umax * net.n_bias, dtype=dtype, device=dev)
        res["out_buffer_mib"] = (bufI.numel() + bufB.numel()) * bufI.element_size() / 2**20  # not in peak_mib
    if method in ("linop", "linop_sweep"):
        t = time.perf_counter()
        linearise(net, x).geometry()  # x-independent structure (cached per network)
        setup = clock(dev) - t
    res["setup_s"] = setup
    rss0 = _maxrss_mib()
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)
        torch.cuda.reset_peak_memory_stats(dev)
        cuda0 = torch.cuda.memory_allocated(dev)  # image, network constants, the reused buffer
    t_all = time.perf_counter()
    if method == "linop":
        lin = linearise(net, x, memory_budget="8GiB")
        t = clock(dev)
        for LJ in lin.sweep():
            HI, Hb = LJ.image(out=bufI), LJ.bias(out=bufB)
            el = clock(dev) - t
            res["layers"][LJ.name] = {"time_s": el, "rel_err": _check(HI, Hb, x, x_b, pre[LJ.name], True)}
            del HI, Hb
            t = clock(dev)
    elif method == "linop_sweep":
        lin = linearise(net, x, memory_budget="8GiB")
        t = clock(dev)
        for LJ in lin.sweep():
            ch = LJ.dot(x, x_b)
            el = clock(dev) - t
            c = pre[LJ.name]
            res["layers"][LJ.name] = {"time_s": el, "rel_err": float(((ch - c).abs().max() / c.abs().max()).item())}
            t = clock(dev)
    elif method == "identity":
        # the paper's identity batch is the sweep's "identity" schedule: P = (H, W) at every node
        lin = linearise(net, x, memory_budget="64GiB")
        t = clock(dev)
        for LJ in lin.sweep(schedule="identity"):
            HI, Hb = LJ.image(out=bufI), LJ.bias(out=bufB)  # dense regime: one transposed copy
            el = clock(dev) - t
            res["layers"][LJ.name] = {"time_s": el, "rel_err": _check(HI, Hb, x, x_b, pre[LJ.name], True)}
            del HI, Hb
            if time.perf_counter() - t_all > max_seconds:
                res["complete"] = False
                break
            t = clock(dev)
    else:
        from torch.func import jacfwd, jacrev

        for layer in layers:
            f = net.extended_function(net.unit_node(layer).name)
            t = clock(dev)
            if method == "jacfwd":
                HI, Hb = jacfwd(f, argnums=(0, 1))(x, x_b)
            else:
                HI, Hb = jacrev(f, argnums=(0, 1), chunk_size=jacrev_chunk)(x, x_b)
            el = clock(dev) - t
            res["layers"][layer] = {"time_s": el, "rel_err": _check(HI, Hb, x, x_b, pre[layer], True)}
            del HI, Hb
            if time.perf_counter() - t_all > max_seconds:
                res["complete"] = len(res["layers"]) == len(layers)
                break
    res["total_s"] = sum(v["time_s"] for v in res["layers"].values())
    res["load_avg_end"] = os.getloadavg()
    res["peak_mib"] = _maxrss_mib() - rss0
    res["peak_abs_mib"] = _maxrss_mib()
    if dev.type == "cuda":  # device memory: growth over the level after setup, as on the CPU
        res["host_peak_mib"] = res["peak_mib"]
        res["peak_abs_mib"] = torch.cuda.max_memory_allocated(dev) / 2**20
        res["peak_mib"] = (torch.cuda.max_memory_allocated(dev) - cuda0) / 2**20
        res["peak_memory"] = "torch.cuda.max_memory_allocated"
    return res


# ----------------------------------------------------------------------------- driver
def _fmt_t(r: dict | None) -> str:
    if r is None:
        return "—"
    if "error" in r:
        return "failed"
    return ("" if r["complete"] else ">") + f"{r['total_s']:.2f}"


def markdown(results: list[dict]) -> str:
    lines = []
    keys = sorted({(r["model"], r["dtype"]) for r in results})
    lines.append("| model | dtype | " + " | ".join(f"{m} (s)" for m in METHODS) +
                 " | best baseline / linop | linop peak MiB | best-baseline peak MiB | max rel. err (linop) |")
    lines.append("|" + "---|" * (len(METHODS) + 6))
    for model, dt in keys:
        by = {r["method"]: r for r in results if r["model"] == model and r["dtype"] == dt}
        lin = by.get("linop")
        base = [by[m] for m in METHODS[1:] if m in by and "error" not in by[m]]
        best = min(base, key=lambda r: r["total_s"], default=None)
        ratio = "—"
        if lin and "error" not in lin and best is not None:
            ratio = f"{'>' if not best['complete'] else ''}{best['total_s'] / lin['total_s']:.1f}x ({best['method']})"
        err = max((v["rel_err"] for v in lin["layers"].values()), default=float("nan")) if lin and "error" not in lin else float("nan")
        lines.append(f"| {model} | {dt} | " + " | ".join(_fmt_t(by.get(m)) for m in METHODS) +
                     f" | {ratio} | {lin['peak_mib']:.0f} | {best['peak_mib'] if best else float('nan'):.0f} | {err:.1e} |"
                     if lin and "error" not in lin else f"| {model} | {dt} | " + " | ".join(_fmt_t(by.get(m)) for m in METHODS) + " | — | — | — | — |")
    layers_tbl = []
    for model, dt in keys:
        by = {r["method"]: r for r in results if r["model"] == model and r["dtype"] == dt and "error" not in r}
        names = []
        for r in by.values():
            for l in r["layers"]:
                if l not in names:
                    names.append(l)
        layers_tbl.append(f"\nPer-layer seconds, {model} {dt}:\n")
        layers_tbl.append("| layer | " + " | ".join(m for m in METHODS if m in by) + " |")
        layers_tbl.append("|---|" + "---|" * len([m for m in METHODS if m in by]))
        for l in names:
            layers_tbl.append(f"| {l} | " + " | ".join(
                f"{by[m]['layers'][l]['time_s']:.3f}" if l in by[m]["layers"] else "—" for m in METHODS if m in by) + " |")
    return "\n".join(lines + layers_tbl)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.backmap", description=__doc__.split("\n\n")[0])
    p.add_argument("--models", nargs="+", default=["vgg7", "resnet20"], choices=sorted(CHECKPOINTS))
    p.add_argument("--dtypes", nargs="+", default=["float32", "float64"], choices=["float32", "float64"])
    p.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS + EXTRA)
    p.add_argument("--max-seconds", type=float, default=300.0, help="per-method time cap (lower bound reported)")
    p.add_argument("--jacrev-chunk", type=int, default=512)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", default="results/bench_backmap.json")
    p.add_argument("--out-buffer", choices=["reuse", "fresh"], default="reuse",
                   help="linop and identity: write each layer's RM2 arrays into one reused preallocated buffer, "
                        "or allocate fresh arrays per layer")
    p.add_argument("--device", default="cpu", help="cpu (default), cuda or cuda:k: where every method runs")
    p.add_argument("--worker", nargs=3, metavar=("METHOD", "MODEL", "DTYPE"), help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if check_device(args.device, "bench.backmap") is None:
        return 2
    torch.set_num_threads(args.threads)
    if args.worker:
        m, model, dt = args.worker
        print(json.dumps(run_method(m, model, dt, args.max_seconds, args.jacrev_chunk, args.out_buffer,
                                    args.device)))
        return 0
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    results: list[dict] = []
    for model in args.models:
        for dt in args.dtypes:
            for m in args.methods:
                cmd = [sys.executable, "-m", "bench.backmap", "--worker", m, model, dt, "--threads", str(args.threads),
                       "--max-seconds", str(args.max_seconds), "--jacrev-chunk", str(args.jacrev_chunk),
                       "--out-buffer", args.out_buffer, "--device", args.device]
                t = time.perf_counter()
                proc = subprocess.run(cmd, capture_output=True, text=True, env=dict(os.environ))
                if proc.returncode != 0 or not proc.stdout.strip():
                    r = {"model": model, "dtype": dt, "method": m, "error": proc.stderr.strip().splitlines()[-1:] or ["?"]}
                    print(f"{model:9s} {dt:8s} {m:9s} FAILED: {r['error']}", flush=True)
                else:
                    r = json.loads(proc.stdout.strip().splitlines()[-1])
                    print(f"{model:9s} {dt:8s} {m:9s} {_fmt_t(r):>8s} s  peak +{r['peak_mib']:.0f} MiB  "
                          f"max rel err {max(v['rel_err'] for v in r['layers'].values()):.1e}  "
                          f"load {r['load_avg_start'][0]:.1f}->{r['load_avg_end'][0]:.1f}  "
                          f"(wall {time.perf_counter() - t:.0f} s)", flush=True)
                results.append(r)
                out.write_text(json.dumps({"results": results, "command": "python -m bench.backmap " + " ".join(argv or sys.argv[1:]),
                                           "device": args.device, "cpu_count": os.cpu_count(), "load_avg_at_end": os.getloadavg()}, indent=1))
    md = markdown(results)
    print("\n" + md)
    out.with_suffix(".md").write_text(md + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
