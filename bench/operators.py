"""Benchmark: CSR assembly of the conv layers of VGG7 and ResNet20 (CIFAR shapes).

For every distinct conv layer shape of VGG7 (seed 000 Table D.1) and ResNet20 (Table D.3:
3 stages of 32/64/96 channels on 32x32 / 16x16 / 8x8, stride-2 convs at stage changes),
measure in one run

* ``Conv2d.to_sparse()`` — the compiled assembly straight into CSR order (best of
  ``--repeat``, after one warm-up call that may load / compile the numba kernel);
* the anchor: the obvious alternative, pushing an identity basis through
  ``torch.nn.functional.conv2d`` in memory-bounded chunks and collecting the non-zeros of
  the columns into a CSR matrix;

checks both matrices are identical, and prints a Markdown table (nnz, times, ratio).
Results are written to ``--out`` (JSON) after every layer, so an interrupted run keeps
what it measured.  Weights are random: the sparsity pattern and the cost depend only on
the layer geometry.

Run: ``python -m bench.operators [--device cpu|cuda|cuda:k] [--out results/bench_operators.json]``.

``--device cuda[:k]`` (validated up front: one line, exit 2, where CUDA is missing) runs the
anchor's ``F.conv2d`` on that device (timed with ``torch.cuda.synchronize()``; its non-zeros are
gathered into a host CSR matrix as on the CPU).  The CSR assembly itself is a host kernel
(numba, cpu-only: ``to_sparse(gpu=True)`` assembles on the host and copies to cupy), so its
column is a host figure on every device.  The JSON's ``meta`` records the device.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import scipy.sparse
import torch
import torch.nn.functional as F
from tqdm import tqdm

from bench._device import check_device, clock
from linop.operators import Conv2d


@dataclass
class Layer:
    model: str
    name: str
    c_in: int
    c_out: int
    size: int
    stride: int = 1
    count: int = 1  # how many layers of the model have this shape
    baseline: bool = True


LAYERS = [
    Layer("VGG7", "Conv0", 3, 32, 32),
    Layer("VGG7", "Conv1", 32, 32, 32),
    Layer("VGG7", "Conv2", 32, 64, 16),
    Layer("VGG7", "Conv3", 64, 64, 16),
    Layer("VGG7", "Conv4", 64, 96, 8),
    Layer("VGG7", "Conv5", 96, 96, 8),
    Layer("ResNet20", "Conv0", 3, 32, 32),
    Layer("ResNet20", "Conv1-6", 32, 32, 32, count=6),
    Layer("ResNet20", "Conv7 (s=2)", 32, 64, 32, stride=2),
    Layer("ResNet20", "Conv8-12", 64, 64, 16, count=5),
    Layer("ResNet20", "Conv13 (s=2)", 64, 96, 16, stride=2),
    Layer("ResNet20", "Conv14-18", 96, 96, 8, count=5),
    # the requirement ("well under a second"); the identity-basis anchor would push
    # 65,536 basis images through a 64->64 conv, so it is skipped unless --all-baselines
    Layer("check", "3x3 64->64 on 32x32", 64, 64, 32, baseline=False),
]


def identity_basis_csr(w: torch.Tensor, layer: Layer, chunk_bytes: int, progress: bool) -> scipy.sparse.csr_matrix:
    """The anchor: columns ``A e_j`` from ``F.conv2d`` on one-hot images (on ``w``'s device),
    chunked so one chunk's dense output stays under ``chunk_bytes``; non-zeros gathered into a
    host CSR matrix."""
    C, S = layer.c_in, layer.size
    n_in = C * S * S
    dev = w.device
    with torch.no_grad():
        n_out = F.conv2d(torch.zeros(1, C, S, S, dtype=w.dtype, device=dev), w, stride=layer.stride, padding=1).numel()
        b = max(1, min(n_in, chunk_bytes // (n_out * w.element_size())))
        rows, cols, vals = [], [], []
        for j0 in tqdm(range(0, n_in, b), desc=f"  identity basis {layer.model} {layer.name}", leave=False,
                       disable=not progress):
            j1 = min(n_in, j0 + b)
            e = torch.zeros(j1 - j0, n_in, dtype=w.dtype, device=dev)
            e[torch.arange(j1 - j0, device=dev), torch.arange(j0, j1, device=dev)] = 1
            y = F.conv2d(e.reshape(-1, C, S, S), w, stride=layer.stride, padding=1).reshape(j1 - j0, n_out)
            jj, ii = torch.nonzero(y, as_tuple=True)
            rows.append(ii.cpu().numpy())
            cols.append((jj + j0).cpu().numpy())
            vals.append(y[jj, ii].cpu().numpy())
    A = scipy.sparse.csr_matrix((np.concatenate(vals), (np.concatenate(rows), np.concatenate(cols))), shape=(n_out, n_in))
    A.sum_duplicates()
    return A


def bench_layer(layer: Layer, dtype: torch.dtype, repeat: int, chunk_bytes: int, baseline: bool, progress: bool,
                device: torch.device | None = None) -> dict:
    g = torch.Generator().manual_seed(0)
    w = torch.randn(layer.c_out, layer.c_in, 3, 3, generator=g, dtype=dtype)
    op = Conv2d(w, (layer.c_in, layer.size, layer.size), stride=layer.stride, padding=1)
    t0 = time.perf_counter()
    A = op.to_sparse()
    t_first = time.perf_counter() - t0
    best = best_cpu = np.inf
    for _ in range(repeat):
        del A
        t0, c0 = time.perf_counter(), time.process_time()
        A = op.to_sparse()
        best_cpu = min(best_cpu, time.process_time() - c0)
        best = min(best, time.perf_counter() - t0)
    rec = dict(asdict(layer), in_shape=list(op.in_shape), out_shape=list(op.out_shape), rows=op.shape[0],
               cols=op.shape[1], nnz=int(A.nnz), density=A.nnz / (op.shape[0] * op.shape[1]),
               csr_first_s=t_first, csr_s=best, csr_cpu_s=best_cpu, baseline_s=None, baseline_cpu_s=None,
               ratio=None, ratio_cpu=None, identical=None)
    if baseline and layer.baseline:
        device = torch.device("cpu") if device is None else device
        wd = w.to(device)
        t0, c0 = clock(device), time.process_time()
        B = identity_basis_csr(wd, layer, chunk_bytes, progress)
        rec["baseline_cpu_s"] = time.process_time() - c0
        rec["baseline_s"] = clock(device) - t0
        rec["ratio"] = rec["baseline_s"] / best
        rec["ratio_cpu"] = rec["baseline_cpu_s"] / max(best_cpu, 1e-9)
        rec["identical"] = bool(B.shape == A.shape and B.nnz == A.nnz and (B != A).nnz == 0)
    return rec


def markdown(records: list[dict]) -> str:
    lines = [
        "| model | layer | in → out | nnz | CSR assembly (wall / CPU) | identity basis + F.conv2d (wall / CPU) "
        "| ratio (wall / CPU) | identical |",
        "|---|---|---|---:|---:|---:|---:|:---:|",
    ]
    for r in records:
        shape = f"{'x'.join(map(str, r['in_shape']))} → {'x'.join(map(str, r['out_shape']))}"
        base = f"{r['baseline_s']:.2f} s / {r['baseline_cpu_s']:.2f} s" if r["baseline_s"] is not None else "—"
        ratio = f"{r['ratio']:.0f}x / {r['ratio_cpu']:.0f}x" if r["ratio"] is not None else "—"
        ident = {True: "yes", False: "NO", None: "—"}[r["identical"]]
        lines.append(f"| {r['model']} | {r['name']} | {shape} | {r['nnz']:,} | {r['csr_s'] * 1e3:.1f} / {r['csr_cpu_s'] * 1e3:.1f} ms | {base} | {ratio} | {ident} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default="results/bench_operators.json", help="JSON output path")
    p.add_argument("--dtype", choices=["float32", "float64"], default="float32")
    p.add_argument("--repeat", type=int, default=3, help="timed repeats of the CSR assembly (best is kept)")
    p.add_argument("--threads", type=int, default=1, help="torch intra-op threads (the numba kernel is serial)")
    p.add_argument("--chunk-mb", type=int, default=64, help="memory bound of one identity-basis chunk")
    p.add_argument("--no-baseline", action="store_true", help="skip the identity-basis anchor")
    p.add_argument("--all-baselines", action="store_true", help="also run the anchor on the 64->64 32x32 check layer")
    p.add_argument("--models", default="VGG7,ResNet20,check", help="comma-separated subset")
    p.add_argument("--device", default="cpu",
                   help="cpu (default), cuda or cuda:k: where the anchor's F.conv2d runs (the CSR assembly is host-only)")
    args = p.parse_args(argv)
    dev = check_device(args.device, "bench.operators")
    if dev is None:
        return 2
    for opt, val in (("--repeat", args.repeat), ("--threads", args.threads), ("--chunk-mb", args.chunk_mb)):
        if val < 1:
            p.error(f"{opt} must be >= 1, got {val}")
    torch.set_num_threads(args.threads)
    dtype = torch.float32 if args.dtype == "float32" else torch.float64
    known = {lay.model.lower(): lay.model for lay in LAYERS}
    wanted = {m.strip().lower() for m in args.models.split(",") if m.strip()}
    unknown = sorted(wanted - set(known))
    if unknown or not wanted:
        p.error(f"--models={args.models!r}: unknown {unknown}; choose a comma-separated subset of "
                f"{', '.join(dict.fromkeys(known.values()))} (case-insensitive)")
    layers = [lay for lay in LAYERS if lay.model.lower() in wanted]
    if args.all_baselines:
        for lay in layers:
            lay.baseline = True
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    meta = dict(dtype=args.dtype, threads=args.threads, repeat=args.repeat, torch=torch.__version__,
                cpu_count=os.cpu_count(), machine=platform.machine(), python=platform.python_version(),
                device=str(dev), csr_assembly="host (cpu-only)",
                date=time.strftime("%Y-%m-%d %H:%M:%S"))
    records: list[dict] = []
    for layer in tqdm(layers, desc="layers"):
        records.append(bench_layer(layer, dtype, args.repeat, args.chunk_mb * 2**20, not args.no_baseline, True,
                                   dev))
        out.write_text(json.dumps(dict(meta=meta, layers=records), indent=1))  # incremental
    print()
    print(f"Conv2d CSR assembly vs identity basis through F.conv2d ({args.dtype}, {args.threads} thread(s), "
          f"3x3 kernels, padding 1, best of {args.repeat}):")
    print()
    print(markdown(records))
    print("\n(wall = elapsed time; CPU = process time, less sensitive to other load on a shared machine)")
    print(f"JSON: {out}")
    return 0 if all(r["identical"] in (True, None) for r in records) else 1


if __name__ == "__main__":
    raise SystemExit(main())
