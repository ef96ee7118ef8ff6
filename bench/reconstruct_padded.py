"""Benchmark: exact FFT reconstruction of a *padded* conv (PaddedConvSolver) vs the paper's FFT path and CG.

One 3×3 ``'same'`` conv at ``--size`` (32), float64, batch ``--batch`` (256), a shrinking
(MDP, 64→32) and an expanding (CCP, 32→64) channel count.  Rows:

* ``fft (paper)``  the paper's approximate FFT solve (seed 001 §3.2, Eqs. 17–20) of the same-size
  *unpadded* problem (input ``size + 2`` → output ``size``): the path whose cost we compare to;
  it does not apply to padded convs (``NotImplementedError``), so this is the cost reference;
* ``exact``        :class:`~linop.solvers.fft_padded.PaddedConvSolver`: ``r = z* − b − W â``,
  ``a = â + W⁺ r`` (FFT + ring/boundary capacitance), its factorisation timed separately;
* ``pcg``          the same class's fallback (Fourier-preconditioned Craig / CGLS) on
  ``--iter-samples`` samples, time extrapolated linearly to the batch;
* ``cg``           today's exact method for these layers (``auto`` → batched Craig / CGLS with
  the torch conv, tol ``--tol``), same subset, extrapolated;
* ``dense@N``      agreement with the dense pseudo-inverse of ``Conv2d(...).to_sparse()`` at
  ``--dense-size`` (10): the exact solve vs ``W⁺ r`` by Householder QR of the full-rank W
  (``--dense-method pinv``: by SVD, slower).

    python -m bench.reconstruct_padded --batch 256 --out bench_reconstruct_padded.json

``--device cuda[:k]`` (validated up front: one line, exit 2, where CUDA is missing): the data,
the factors and every solve on that device (the dense reference at ``--dense-size`` is computed
on the host and compared on the device); timings bracketed by ``torch.cuda.synchronize()``; the
JSON records the device and, on CUDA, ``cuda_peak_mib`` (``torch.cuda.max_memory_allocated``).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

import numpy as np
import scipy.linalg
import torch

from bench._device import check_device, clock
from linop.operators.conv import Conv2d
from linop.solvers.fft import FFTConvSolver
from linop.solvers.fft_padded import PaddedConvSolver
from linop.solvers.iterative import cgls, craig


def make_layer(cin: int, cout: int, size: int, batch: int, seed: int, device: torch.device | str = "cpu"):
    """(weight, 'same' conv, â, b, z*): the data on ``device`` (the operator follows the data)."""
    rng = np.random.default_rng(seed)
    w = torch.tensor(rng.standard_normal((cout, cin, 3, 3)) * np.sqrt(2.0 / (cin * 9)))  # He init
    op = Conv2d(w, (cin, size, size), padding="same")
    a_hat = torch.relu(torch.tensor(rng.standard_normal((batch, cin, size, size)))).to(device)  # activation-like
    b = torch.tensor(rng.standard_normal(cout) * 0.1).to(device)
    z = op.apply(a_hat) + b[:, None, None]
    z_star = z + 0.1 * z.std() * torch.tensor(rng.standard_normal(tuple(z.shape))).to(device)  # a perturbed target
    return w, op, a_hat, b, z_star


def rel(x: torch.Tensor, ref: torch.Tensor) -> float:
    N = x.shape[0]
    return float((torch.linalg.vector_norm((x - ref).reshape(N, -1), dim=1)
                  / torch.linalg.vector_norm(ref.reshape(N, -1), dim=1)).max())


def run_case(cin: int, cout: int, args, rows: list) -> None:
    tag = f"{cin}->{cout}"
    dev = torch.device(args.device)
    w, op, a_hat, b, z_star = make_layer(cin, cout, args.size, args.batch, args.seed, dev)
    target = z_star - b[:, None, None]
    N, n = args.batch, args.size

    def row(method, seconds, **kw):
        rows.append({"layer": tag, "method": method, "seconds": seconds, **kw})
        extra = "  ".join(f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}" for k, v in kw.items())
        print(f"  {tag:7s} {method:26s} {seconds:9.3f} s  {extra}", flush=True)

    print(f"layer {tag} 3x3 'same' at {n}x{n}: W is {op.shape[0]}x{op.shape[1]}, batch {N}, "
          f"load average {os.getloadavg()}", flush=True)
    # the paper's FFT path on the same-size unpadded problem (input n+2 → output n)
    a_pad = torch.nn.functional.pad(a_hat, (1, 1, 1, 1))
    t = clock(dev)
    fs = FFTConvSolver(w, (cin, n + 2, n + 2), device=dev)
    row("fft (paper) factor", clock(dev) - t)
    t = clock(dev)
    ps = PaddedConvSolver(op, device=dev)
    inf = ps.info()
    row("exact factor", clock(dev) - t, m=inf["capacitance_size"], torus=str(inf["torus"]),
        cond_est=inf.get("capacitance_cond_est", float("nan")), refine=inf["refine"], lam=inf["tikhonov_lambda"])

    def exact():
        r = target - op.apply(a_hat)
        delta, info = ps.solve(r)
        return r, a_hat + delta, delta, info

    # shared, loaded machine: alternate the two solves --repeat times, report the minimum and the median
    t_f, t_e = [], []
    for _ in range(args.repeat):
        t = clock(dev)
        fs.solve(a_pad, target)
        t_f.append(clock(dev) - t)
        t = clock(dev)
        r, a, delta, info = exact()
        t_e.append(clock(dev) - t)
    t_fft, t_ex = min(t_f), min(t_e)
    row("fft (paper) solve", t_fft, median=float(np.median(t_f)), note="approximate; unpadded analogue, cost reference")
    resid = rel(op.apply(a), target) if ps.case == "MDP" else float("nan")
    row("exact solve", t_ex, median=float(np.median(t_e)), ratio_to_fft=t_ex / t_fft,
        ratio_of_medians=float(np.median(t_e) / np.median(t_f)), case=ps.case, mdp_constraint_residual=resid,
        refine_steps=int(info["iterations"].max()))

    k = max(1, min(args.iter_samples, N))
    x = N / k
    rf = r[:k].reshape(k, -1)
    fwd = lambda v: op.apply(v.reshape((-1,) + op.in_shape)).reshape(v.shape[0], -1)
    adj = lambda v: op.apply_adjoint(v.reshape((-1,) + op.out_shape)).reshape(v.shape[0], -1)
    ps_pcg = PaddedConvSolver(op, method="pcg", device=dev)  # spectra + SVDs: the same per-layer work as the fft factor
    ps_pcg.fs._precond("mdp" if ps.case == "MDP" else "ccp")
    t = clock(dev)
    d_pcg, i_pcg = ps_pcg.solve(r[:k], tol=args.tol)
    t_pcg = (clock(dev) - t) * x
    row("pcg (fallback)", t_pcg, ratio_to_fft=t_pcg / t_fft, samples=k, extrapolated=x,
        iterations=int(i_pcg["iterations"].max()), dist_to_exact=rel(d_pcg, delta[:k]))
    if not args.skip_cg:
        t = clock(dev)
        if ps.case == "MDP":
            d_cg, i_cg = craig(fwd, adj, rf, args.tol, args.cg_maxiter)
        else:
            d_cg, i_cg = cgls(fwd, adj, rf, args.tol, args.cg_maxiter)
        t_cg = (clock(dev) - t) * x
        row("cg (today's auto)", t_cg, speedup_exact=t_cg / t_ex, samples=k, extrapolated=x,
            iterations=int(i_cg["iterations"].max()), converged=bool(i_cg["converged"].all()),
            dist_to_exact=rel(d_cg.reshape(delta[:k].shape), delta[:k]))

    if args.dense_size:
        s = args.dense_size
        _, op2, a2, b2, z2 = make_layer(cin, cout, s, 4, args.seed, dev)
        r2 = (z2 - b2[:, None, None]) - op2.apply(a2)
        A = op2.to_sparse(dtype=np.float64).toarray()
        rr = r2.reshape(4, -1).cpu().numpy()  # the dense reference is a host computation
        t = time.perf_counter()
        if args.dense_method == "pinv":
            ref, how = rr @ np.linalg.pinv(A).T, "SVD pinv"
        else:  # Householder QR of the full-rank W (checked): the min-norm LS solution = W⁺ r
            wide = A.shape[0] <= A.shape[1]
            Q, R = scipy.linalg.qr(A.T if wide else A, mode="economic")
            dR = np.abs(np.diag(R))
            if dR.min() <= 1e-10 * dR.max():
                raise RuntimeError("dense reference: W is numerically rank deficient; use --dense-method pinv")
            if wide:  # W = Rᵀ Qᵀ: δ = Q R⁻ᵀ r
                ref = (Q @ scipy.linalg.solve_triangular(R, rr.T, trans="T")).T
            else:  # W = Q R: δ = R⁻¹ Qᵀ r
                ref = scipy.linalg.solve_triangular(R, Q.T @ rr.T).T
            how = "QR min-norm LS (= W⁺ r, full rank)"
        t_ref = time.perf_counter() - t
        d2, _ = PaddedConvSolver(op2, device=dev).solve(r2)
        row(f"dense @{s}x{s}", t_ref, W=f"{A.shape[0]}x{A.shape[1]}", reference=how,
            exact_vs_dense=rel(d2.reshape(4, -1), torch.as_tensor(ref).to(d2)))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--batch", type=int, default=256)
    p.add_argument("--size", type=int, default=32)
    p.add_argument("--cases", default="64:32,32:64", help="C_in:C_out pairs")
    p.add_argument("--iter-samples", type=int, default=4)
    p.add_argument("--repeat", type=int, default=3, help="timed repetitions of the fft and exact solves")
    p.add_argument("--tol", type=float, default=1e-10)
    p.add_argument("--cg-maxiter", type=int, default=10_000)
    p.add_argument("--skip-cg", action="store_true")
    p.add_argument("--dense-size", type=int, default=10)
    p.add_argument("--dense-method", choices=("qr", "pinv"), default="qr",
                   help="dense reference at --dense-size: Householder QR (fast) or SVD pinv")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cpu", help="cpu (default), cuda or cuda:k: where the data and the solves live")
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)
    dev = check_device(args.device, "bench.reconstruct_padded")
    if dev is None:
        return 2
    args.device = str(dev)
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats(dev)
    torch.set_num_threads(args.threads)
    rows: list = []
    for pair in args.cases.split(","):
        cin, cout = (int(v) for v in pair.split(":"))
        run_case(cin, cout, args, rows)
    print(f"load average at the end {os.getloadavg()}")
    if args.out:
        doc = {"args": vars(args), "rows": rows, "loadavg_end": os.getloadavg(), "device": args.device}
        if dev.type == "cuda":
            doc["cuda_peak_mib"] = torch.cuda.max_memory_allocated(dev) / 2**20
        with open(args.out, "w") as f:
            json.dump(doc, f, indent=1, default=str)
    return 0


if __name__ == "__main__":
    sys.exit(main())
