"""``linop demo``: a small operator demo on an embedded default input.

Builds a convolution (random seeded weights) as an explicit operator, feeds it a real
image (one of scikit-learn's bundled handwritten digits, upsampled), and shows that the
three forms agree: the CSR matrix, the torch-backed ``LinearOperator`` and
``torch.nn.functional.conv2d``; checks the adjoint identity and the torch autograd VJP;
then linearises a tiny conv → ReLU → avg-pool block at that input (seed 000's
``J = P Σ W``) and shows ``J x`` reproduces the block's output exactly.
"""
from __future__ import annotations

import argparse
import time

import numpy as np
import torch
import torch.nn.functional as F

from ..operators import AvgPool2d, Chain, Conv2d, ReLUMask, dottest

__all__ = ["add_arguments", "demo_input", "run"]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--in-channels", type=int, default=3, help="input channels (default 3)")
    parser.add_argument("--out-channels", type=int, default=32, help="output channels (default 32)")
    parser.add_argument("--size", type=int, default=32, help="input height = width (default 32)")
    parser.add_argument("--kernel", type=int, default=3, help="kernel size (default 3)")
    parser.add_argument("--stride", type=int, default=1, help="stride (default 1)")
    parser.add_argument("--padding", default="same", help="int, 'same' or 'valid' (default 'same')")
    parser.add_argument("--dilation", type=int, default=1)
    parser.add_argument("--groups", type=int, default=1)
    parser.add_argument("--dtype", choices=["float64", "float32"], default="float64")
    parser.add_argument("--input", choices=["digits", "random"], default="digits",
                        help="digits: a bundled scikit-learn handwritten digit, upsampled (default)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--memory-budget", default="2GiB",
                        help="refuse a demo whose operators and vectors would exceed this (default 2GiB)")


def demo_bytes(C: int, C_out: int, size: int, kernel: int, groups: int, itemsize: int) -> int:
    """An upper estimate of the demo's peak memory: a few dense vectors of the input and the
    output, and the CSR matrices (conv, its |A|, the linearised block: values + column indices)."""
    n_in, n_out = C * size * size, C_out * size * size  # stride 1 / 'same' is the largest output
    nnz = n_out * (C // max(groups, 1)) * kernel * kernel
    return 8 * (n_in + n_out) * itemsize + 4 * nnz * (itemsize + 8)


def demo_input(kind: str, channels: int, size: int, seed: int, dtype: torch.dtype) -> torch.Tensor:
    """One (1, C, size, size) input: a real digit image (bilinear upsampling of the 8x8
    scan, scaled to [0, 1], centred) repeated over channels, or Gaussian noise."""
    if kind == "random":
        return torch.randn(1, channels, size, size, generator=torch.Generator().manual_seed(seed), dtype=dtype)
    from sklearn.datasets import load_digits  # bundled with scikit-learn: no download

    img = load_digits().images[seed % 1797] / 16.0
    t = torch.as_tensor(img, dtype=dtype)[None, None]
    t = F.interpolate(t, size=(size, size), mode="bilinear", align_corners=False)
    return (t - t.mean()).expand(1, channels, size, size).contiguous()


def _parse_padding(p: str):
    if p in ("same", "valid"):
        return p
    try:
        return int(p)
    except ValueError:
        raise ValueError(f"--padding must be an int, 'same' or 'valid', got {p!r}") from None


def run(args: argparse.Namespace) -> int:
    torch.set_num_threads(1)
    dt = torch.float64 if args.dtype == "float64" else torch.float32
    # machine-precision tolerance: a few hundred ulps of |W||x| covers any summation order
    rtol = 1e-12 if dt == torch.float64 else 3e-5
    g = torch.Generator().manual_seed(args.seed)
    C, K = args.in_channels, args.kernel
    for opt in ("in_channels", "out_channels", "size", "kernel", "stride", "dilation"):
        if getattr(args, opt) < 1:
            raise ValueError(f"--{opt.replace('_', '-')} must be >= 1, got {getattr(args, opt)}")
    from ..utils import gib, parse_memory

    budget = parse_memory(getattr(args, "memory_budget", "2GiB"))
    need = demo_bytes(C, args.out_channels, args.size, K, max(args.groups, 1), 8 if dt == torch.float64 else 4)
    if need > budget:
        raise MemoryError(f"the demo with --size {args.size}, --in-channels {C}, --out-channels {args.out_channels}, "
                          f"--kernel {K} needs about {gib(need)} > --memory-budget {gib(budget)}; choose a smaller "
                          "--size / fewer channels, or raise --memory-budget")
    if args.groups < 1 or C % args.groups:
        raise ValueError(f"--groups={args.groups} must divide --in-channels={C}")
    w = torch.randn(args.out_channels, C // args.groups, K, K, generator=g, dtype=dt) / np.sqrt(C * K * K)
    op = Conv2d(w, (C, args.size, args.size), stride=args.stride, padding=_parse_padding(args.padding),
                dilation=args.dilation, groups=args.groups)
    x = demo_input(args.input, C, args.size, args.seed, dt)
    print(f"operator: {op!r}")
    print(f"matrix shape {op.shape[0]:,} x {op.shape[1]:,}")

    op.to_sparse()  # warm-up (first use may load / compile the numba kernel)
    t0 = time.perf_counter()
    A = op.to_sparse()
    t_csr = time.perf_counter() - t0
    density = A.nnz / (op.shape[0] * op.shape[1])
    print(f"CSR assembly: {t_csr * 1e3:.1f} ms, nnz = {A.nnz:,} (density {density:.2e}, in-bounds taps only)")

    def layer(t: torch.Tensor) -> torch.Tensor:  # the torch layer itself (4-sided padding via F.pad)
        pt, pb, pl, pr = op.padding
        return F.conv2d(F.pad(t, (pl, pr, pt, pb)), w, None, op.stride, 0, op.dilation, op.groups)

    xf = x.reshape(-1).numpy()
    t0 = time.perf_counter()
    y_torch = layer(x)
    t_torch = time.perf_counter() - t0
    y_torch = y_torch.reshape(-1).numpy()
    t0 = time.perf_counter()
    y_sparse = A @ xf
    t_spmv = time.perf_counter() - t0
    t0 = time.perf_counter()
    y_mv = op.matvec(xf)
    t_mv = time.perf_counter() - t0
    scale = np.abs(A) @ np.abs(xf) + np.finfo(np.float64).tiny
    err_sparse = float(np.max(np.abs(y_sparse - y_torch) / scale))
    err_mv = float(np.max(np.abs(y_mv - y_torch) / scale))
    print(f"sparse @ x vs F.conv2d: max err / (|A||x|) = {err_sparse:.2e}   ({t_spmv * 1e3:.2f} ms vs torch {t_torch * 1e3:.2f} ms)")
    print(f"matvec     vs F.conv2d: max err / (|A||x|) = {err_mv:.2e}   ({t_mv * 1e3:.2f} ms)")

    v = torch.randn((1,) + op.out_shape, generator=g, dtype=dt)
    xg = x.clone().requires_grad_(True)
    (vjp,) = torch.autograd.grad(layer(xg), xg, v)
    vf = v.reshape(-1).numpy()
    ascale = np.abs(A).T @ np.abs(vf) + np.finfo(np.float64).tiny
    err_adj = float(np.max(np.abs(op.rmatvec(vf) - vjp.reshape(-1).numpy()) / ascale))
    err_adj_sp = float(np.max(np.abs(A.T @ vf - vjp.reshape(-1).numpy()) / ascale))
    yAx, xAty = dottest(op, rng=args.seed, dtype=np.dtype(args.dtype))
    print(f"rmatvec vs autograd VJP: {err_adj:.2e}; A.T @ v vs VJP: {err_adj_sp:.2e}")
    print(f"dottest: <Ax,y> = {yAx:.15e}, <x,A^T y> = {xAty:.15e}")

    # seed 000's linearisation at a point: pool(relu(conv(x))) == (P Σ W) x exactly
    mask = ReLUMask(op.apply(x)[0])
    pool = AvgPool2d(op.out_shape, 3, 2) if min(op.out_shape[1:]) >= 3 else AvgPool2d(op.out_shape, 1, 1)
    J = Chain([op, mask, pool])
    y_block = F.avg_pool2d(torch.relu(op.apply(x)), pool.kernel_size, pool.stride).reshape(-1).numpy()
    Jm = J.to_sparse()
    jscale = np.abs(Jm) @ np.abs(xf) + np.finfo(np.float64).tiny
    err_j = float(np.max(np.abs(Jm @ xf - y_block) / jscale))
    print(f"conv -> ReLU -> avgpool linearised at x: J nnz = {Jm.nnz:,}, active units {int(mask.diag.sum())}/{mask.shape[0]}, "
          f"max err of J x vs block(x) = {err_j:.2e}")

    ok = max(err_sparse, err_mv, err_adj, err_adj_sp, err_j) <= rtol
    print("PASS" if ok else f"FAIL (tolerance {rtol:g})")
    return 0 if ok else 1
