"""Benchmark of the reverse conv step (seed 001 §3.2): exact solvers vs the FFT fast path.

One conv layer at CIFAR size (``--size`` 32, 3×3, stride 1, no padding), a shrinking (MDP,
e.g. 64→32) and an expanding (CCP, e.g. 32→64) channel count, a batch of ``--batch`` (256)
float64 samples.  For each method: wall time, constraint residual ``||W a + b − z*||/||z* − b||``
and distance to the exact solution ``||a − a*||/||a* − â||``; ratios against the FFT time.

* ``fft``      the paper's approximation (per-layer factorisation timed separately);
* ``fft-exact`` exact, direct: FFT + boundary capacitance matrix (Schur complement / Woodbury),
               its once-per-layer factorisation (gather + Cholesky) timed separately;
* ``fft-pcg``  exact, Fourier-domain CG preconditioned by the FFT solve (beyond the paper) —
               on ``--iter-samples`` samples, time extrapolated linearly to the batch;
* ``cg``       exact, batched Craig / CGLS with the direct torch conv (same subset);
* ``lsmr``     exact, scipy per sample — run on ``--lsmr-samples`` samples and extrapolated
               linearly to the batch (marked "extrapolated");
* ``dense``    exact KKT via :class:`~linop.solvers.DenseSolver` — only if it fits ``--max-gib``;
               otherwise reported as skipped with its size, and run at ``--dense-size`` instead.

The exact reference for the distances is ``fft-exact`` (cross-checked: fft-pcg / cg / lsmr
distances to it, and fft-exact vs dense KKT at ``--dense-size``).  The load average is printed
(shared machine).  Writes JSON incrementally to ``--out``.

    python -m bench.reconstruct --batch 256 --out bench_reconstruct.json

``--device cuda[:k]`` (validated up front: one line, exit 2, where CUDA is missing) puts the data
— ``â``, ``z*``, ``b`` — on that device; :func:`linop.solvers.solve` keeps the data's device, and
the FFT / capacitance factors are built there.  ``lsmr`` (scipy, host only) is skipped with the
note "cpu-only"; ``dense`` factors W on the host (numpy) and applies ``W⁺`` on the device.
Timings are bracketed by ``torch.cuda.synchronize()``; the JSON records the device and, on CUDA,
``cuda_peak_mib`` (``torch.cuda.max_memory_allocated``).

``--models vgg7,resnet20[,fixup_resnet20]`` runs :mod:`bench.reconstruct_layers` instead: every
conv layer of the models at CIFAR size (padded, strided), exact solve vs the paper's FFT path
and CG (issue 14); its options (``--layers``, ``--cg-samples``, ...) are passed through.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

import numpy as np
import torch

from bench._device import check_device, clock
from linop.operators import Conv2d
from linop.solvers import CapacitanceSolver, FFTConvSolver, dense_bytes, solve


def make_layer(cin: int, cout: int, size: int, batch: int, seed: int, device: torch.device | str = "cpu"):
    """(weight, operator, â, b, z*): the data on ``device`` (the operator follows the data)."""
    rng = np.random.default_rng(seed)
    w = torch.tensor(rng.standard_normal((cout, cin, 3, 3)) * np.sqrt(2.0 / (cin * 9)))  # He init
    op = Conv2d(w, (cin, size, size))
    a_hat = torch.relu(torch.tensor(rng.standard_normal((batch, cin, size, size)))).to(device)  # activation-like
    b = torch.tensor(rng.standard_normal(cout) * 0.1).to(device)
    z = op.apply(a_hat) + b[:, None, None]
    z_star = z + 0.1 * z.std() * torch.tensor(rng.standard_normal(tuple(z.shape))).to(device)  # a perturbed target
    return w, op, a_hat, b, z_star


def dist(a, ref, a_hat) -> float:
    N = a.shape[0]
    d = torch.linalg.vector_norm((a - ref).reshape(N, -1), dim=1)
    return float((d / torch.linalg.vector_norm((ref - a_hat).reshape(N, -1), dim=1)).max())


def run_case(cin, cout, args, rows, out):
    dev = torch.device(args.device)
    w, op, a_hat, b, z_star = make_layer(cin, cout, args.size, args.batch, args.seed, dev)
    tag = f"{cin}->{cout}"
    t = clock(dev)
    fs = FFTConvSolver(w, op.in_shape, device=dev)
    fs.precondition("MDP" if op.shape[0] <= op.shape[1] else "CCP")  # timed with the factorisation
    t_factor = clock(dev) - t
    t = clock(dev)
    cs = CapacitanceSolver(w, op.in_shape, fft_solver=fs)
    t_cap = clock(dev) - t

    def record(method, res, seconds, ref, note="", a0=None):
        a0 = a_hat if a0 is None else a0
        row = {"layer": tag, "method": method, "case": res.case if res is not None else "-", "seconds": seconds,
               "residual_max": float(np.max(res.residual)) if res is not None else None,
               "dist_to_exact": dist(torch.as_tensor(res.a), ref, a0) if (res is not None and ref is not None) else None,
               "iterations": int(np.max(res.info["iterations"])) if res is not None and "iterations" in res.info else None,
               "note": note}
        rows.append(row)
        out_json(out, rows, args)
        print(f"  {tag:8s} {method:10s} {seconds:9.2f} s  residual {row['residual_max']}  dist {row['dist_to_exact']}  {note}",
              flush=True)
        return row

    def factor_row(method, seconds, note):
        rows.append({"layer": tag, "method": method, "case": "-", "seconds": seconds, "residual_max": None,
                     "dist_to_exact": None, "iterations": None, "note": note})
        print(f"  {tag:8s} {method:10s} {seconds:9.2f} s  {note}", flush=True)

    print(f"layer {tag}: W is {op.shape[0]}x{op.shape[1]}, batch {args.batch}, load average {os.getloadavg()}", flush=True)
    factor_row("fft factor (once per layer)", t_factor, "SVD per frequency")
    factor_row("fft-exact factor (once per layer)", t_cap,
               f"capacitance {cs.m}x{cs.m} gathered + Cholesky, cond est {cs.cond_est:.1e}, λ={cs.lam:g}")
    t = clock(dev)
    fft = solve(op, z_star, a_hat, b=b, method="fft", fft_solver=fs)
    t_fft = clock(dev) - t
    t = clock(dev)
    ex = solve(op, z_star, a_hat, b=b, method="fft-exact", capacitance_solver=cs)
    t_ex = clock(dev) - t
    ref = torch.as_tensor(ex.a)  # the exact reference (cross-checked against dense / fft-pcg / lsmr below)
    record("fft", fft, t_fft, ref, "approximate (paper §3.2)")
    record("fft-exact", ex, t_ex, None, "exact, direct (capacitance); the reference for 'dist'")
    k = max(1, min(args.iter_samples, args.batch))
    x = args.batch / k
    ext = f"{k} samples, time extrapolated x{x:g} (linear)" if k < args.batch else ""
    t = clock(dev)
    pcg = solve(op, z_star[:k], a_hat[:k], b=b, method="fft-pcg", fft_solver=fs, tol=args.tol)
    record("fft-pcg", pcg, (clock(dev) - t) * x, ref[:k], f"tol {args.tol}; {ext}", a0=a_hat[:k])
    if not args.skip_cg:
        t = clock(dev)
        cg = solve(op, z_star[:k], a_hat[:k], b=b, method="cg", tol=args.tol)
        record("cg", cg, (clock(dev) - t) * x, ref[:k], f"tol {args.tol}; {ext}", a0=a_hat[:k])
    k = min(args.lsmr_samples, args.batch)
    if k > 0 and dev.type != "cpu":  # scipy's lsmr runs on the host only: not a device figure
        rows.append({"layer": tag, "method": "lsmr", "case": "-", "seconds": None, "residual_max": None,
                     "dist_to_exact": None, "iterations": None, "note": "skipped: cpu-only (scipy)"})
        print(f"  {tag:8s} lsmr       skipped: cpu-only (scipy)", flush=True)
    elif k > 0:
        t = time.perf_counter()
        ls = solve(op, z_star[:k], a_hat[:k], b=b, method="lsmr")
        sec = (time.perf_counter() - t) * args.batch / k
        record("lsmr", ls, sec, ref[:k], f"{k} samples, time extrapolated x{args.batch / k:.0f}", a0=a_hat[:k])
    need = dense_bytes(op.shape)
    if need <= args.max_gib * 2**30:
        t = clock(dev)
        de = solve(op, z_star, a_hat, b=b, method="dense", max_bytes=int(args.max_gib * 2**30))
        record("dense", de, clock(dev) - t, ref, "" if dev.type == "cpu" else "W factored on the host")
    else:
        rows.append({"layer": tag, "method": "dense KKT", "case": "-", "seconds": None, "residual_max": None,
                     "dist_to_exact": None, "iterations": None,
                     "note": f"skipped: W is {op.shape[0]}x{op.shape[1]}, needs ~{need / 2**30:.0f} GiB > {args.max_gib} GiB"})
        print(f"  {tag:8s} dense      skipped: W is {op.shape[0]}x{op.shape[1]}, needs ~{need / 2**30:.0f} GiB", flush=True)
        if args.dense_size:
            s = args.dense_size
            w2, op2, a2, b2, z2 = make_layer(cin, cout, s, args.batch, args.seed, dev)
            t = clock(dev)
            fs2 = FFTConvSolver(w2, op2.in_shape, device=dev)
            f2 = solve(op2, z2, a2, b=b2, method="fft", fft_solver=fs2)
            t_f2 = clock(dev) - t
            t = clock(dev)
            e2 = solve(op2, z2, a2, b=b2, method="fft-exact", fft_solver=fs2)
            t_e2 = clock(dev) - t
            t = clock(dev)
            de = solve(op2, z2, a2, b=b2, method="dense")
            t_de = clock(dev) - t
            r = record(f"dense@{s}", de, t_de, torch.as_tensor(e2.a),
                       f"{s}x{s} input; there fft {t_f2:.2f} s, fft-exact {t_e2:.2f} s (incl. factors); "
                       "dist = fft-exact vs dense", a0=a2)
            r["dist_fft_to_dense"] = dist(torch.as_tensor(f2.a), torch.as_tensor(de.a), a2)
    for r in rows:
        if r["layer"] == tag and r["seconds"] is not None and not r["method"].startswith("dense@"):
            r["ratio_to_fft"] = r["seconds"] / t_fft
    print(f"  {tag:8s} exact/FFT: fft-exact per batch {t_ex / t_fft:.2f}x; with its once-per-layer factor "
          f"{(t_ex + t_cap) / (t_fft + t_factor):.2f}x (fft incl. its factor)", flush=True)
    rows.append({"layer": tag, "method": "fft-exact incl. factor", "case": "-", "seconds": t_ex + t_cap,
                 "residual_max": None, "dist_to_exact": None, "iterations": None,
                 "ratio_to_fft": (t_ex + t_cap) / (t_fft + t_factor), "note": "ratio vs fft incl. its factor"})
    out_json(out, rows, args)


def out_json(path, rows, args):
    if path:
        tmp = path + ".tmp"
        with open(tmp, "w") as f:
            doc = {"args": vars(args), "rows": rows, "threads": torch.get_num_threads(),
                   "loadavg": os.getloadavg(), "device": args.device}
            if torch.device(args.device).type == "cuda":
                doc["cuda_peak_mib"] = torch.cuda.max_memory_allocated(args.device) / 2**20
            json.dump(doc, f, indent=1, default=float)
        os.replace(tmp, path)


def table(rows) -> str:
    fmt = lambda v, f: "–" if v is None else format(v, f)  # noqa: E731
    lines = ["| layer | method | case | time (s) | × FFT | max residual | max dist to exact | iters | note |",
             "|---|---|---|---:|---:|---:|---:|---:|---|"]
    for r in rows:
        lines.append(f"| {r['layer']} | {r['method']} | {r['case']} | {fmt(r['seconds'], '.2f')} | "
                     f"{fmt(r.get('ratio_to_fft'), '.1f')} | {fmt(r['residual_max'], '.1e')} | "
                     f"{fmt(r['dist_to_exact'], '.1e')} | {fmt(r['iterations'], 'd')} | {r['note']} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if any(a == "--models" or a.startswith("--models=") for a in argv):
        from bench import reconstruct_layers

        return reconstruct_layers.main(argv)
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--batch", type=int, default=256)
    p.add_argument("--size", type=int, default=32)
    p.add_argument("--cases", default="64:32,32:64", help="comma-separated C_in:C_out pairs")
    p.add_argument("--tol", type=float, default=1e-10)
    p.add_argument("--lsmr-samples", type=int, default=2, help="samples for lsmr (0: skip it)")
    p.add_argument("--iter-samples", type=int, default=32,
                   help="samples for fft-pcg and cg (time extrapolated linearly to --batch)")
    p.add_argument("--max-gib", type=float, default=4.0)
    p.add_argument("--dense-size", type=int, default=10, help="input size for the dense run when full size does not fit (0: none)")
    p.add_argument("--skip-cg", action="store_true")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cpu", help="cpu (default), cuda or cuda:k: where the data and the solves live")
    p.add_argument("--out", default="bench_reconstruct.json")
    args = p.parse_args(argv)
    dev = check_device(args.device, "bench.reconstruct")
    if dev is None:
        return 2
    args.device = str(dev)
    if args.batch < 1 or args.size < 3:
        p.error(f"--batch must be ≥ 1 and --size ≥ 3, got {args.batch}, {args.size}")
    for opt, val in (("--threads", args.threads), ("--iter-samples", args.iter_samples)):
        if val < 1:
            p.error(f"{opt} must be >= 1, got {val}")
    if args.lsmr_samples < 0:
        p.error(f"--lsmr-samples must be >= 0 (0: skip lsmr), got {args.lsmr_samples}")
    if not (args.max_gib > 0):
        p.error(f"--max-gib must be > 0, got {args.max_gib}")
    if args.dense_size < 0 or 0 < args.dense_size < 3:
        p.error(f"--dense-size must be 0 (none) or >= 3, got {args.dense_size}")
    if not (0 < args.tol < 1):
        p.error(f"--tol must lie in (0, 1), got {args.tol}")
    cases = []
    for pair in args.cases.split(","):
        try:
            cin, cout = (int(x) for x in pair.split(":"))
        except ValueError:
            p.error(f"--cases={args.cases!r}: {pair!r} is not C_in:C_out (two integers)")
        if cin < 1 or cout < 1:
            p.error(f"--cases={args.cases!r}: channel counts must be >= 1, got {pair!r}")
        cases.append((cin, cout))
    torch.set_num_threads(args.threads)
    rows: list = []
    for cin, cout in cases:
        run_case(cin, cout, args, rows, args.out)
    print()
    print(f"load average at the end: {os.getloadavg()}")
    print(table(rows))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
