"""Benchmark: the exact reverse step of every conv layer of VGG7 / ResNet20 / Fixup-ResNet20 (issue 14).

``python -m bench.reconstruct --models vgg7,resnet20 --batch 256`` (or ``python -m
bench.reconstruct_layers``).  The conv geometries are read from the models at CIFAR size
(3×32×32 input, forward hooks); layers of identical geometry (C_in, C_out, kernel, stride,
padding, input size) share one row — the solvers' cost depends on the geometry, not on the
weights' values, so each geometry gets fresh He-init weights (Fixup's zero-initialised convs
would be W = 0).  Float64, batch ``--batch``; per geometry:

* ``exact``  what ``auto`` picks (:func:`linop.solvers.auto_method`; ``fft-exact`` —
  :class:`~linop.solvers.fft_padded.ExactConvSolver`, padding / polyphase / groups): the
  once-per-layer factorisation and the per-batch solve (median of ``--repeat`` calls) timed
  separately; ``exact_form`` in the JSON: ``direct`` (full-column-rank CCP, ``a* = W⁺(z* − b)``)
  or ``correction``; ``m`` is the size of
  the system factored, ``(sq)`` marks square layers solved by the complementary block of ``C⁻¹``
  (:mod:`linop.solvers.fft_padded.square`; ``exact_algorithm`` in the JSON);
* ``fft``    the paper's FFT path (seed 001 §3.2, approximate) where it applies — stride-1
  convs — on the same-size *unpadded* problem (input ``H + k − 1`` → output ``H``), as today's
  reference; factor and solve (median of ``--repeat``) timed separately;
* ``cg``     the method ``auto`` used before (batched Craig / CGLS, tol ``--tol``) on
  ``--cg-samples`` samples, at most ``--cg-maxiter`` iterations, time **extrapolated** linearly
  to the batch (a lower bound when it did not converge: marked);
* ``dense``  agreement with the dense pseudo-inverse answer of the same explicit sparse matrix
  ``Conv2d(...).to_sparse()`` (``numpy.linalg.lstsq``: SVD-based minimum-norm least squares) at
  the reduced input size ``--dense-size``;
* residual   MDP-shaped W: ``max ||W a + b − z*|| / ||z* − b||``; CCP-shaped W: the normal
  equations ``max ||Wᵀ(W a + b − z*)|| / ||Wᵀ(z* − b)||``.

``--device cuda[:k]`` (validated up front: one line, exit 2, where CUDA is missing): the data and
every solve on that device (the factors are built there; the dense check's ``lstsq`` runs on
the host and its answer is compared on the device); timings bracketed by
``torch.cuda.synchronize()``; the JSON records the device and, on CUDA, each row's
``cuda_peak_mib`` (``torch.cuda.max_memory_allocated``, reset per geometry).
"""
from __future__ import annotations

import argparse
import json
import os

import numpy as np
import torch

from bench._device import check_device, clock
from linop.operators import Conv2d
from linop.solvers import FFTConvSolver, auto_method, solve
from linop.solvers.fft_padded import ExactConvSolver
from linop.solvers.result import DEFAULT_MAX_BYTES

MODELS = ("vgg7", "resnet20", "fixup_resnet20")


def conv_geometries(names: list[str], size: int = 32) -> list[dict]:
    """Every ``nn.Conv2d`` of the named models at ``size``: one dict per distinct geometry."""
    import models  # bench only: the core never imports models/

    geos: dict = {}
    for name in names:
        net = getattr(models, name)(in_channels=3).eval()
        seen: list = []
        hooks = [m.register_forward_hook(lambda m, i, o, n=n: seen.append((n, m, tuple(i[0].shape[1:]))))
                 for n, m in net.named_modules() if isinstance(m, torch.nn.Conv2d)]
        with torch.no_grad():
            net(torch.zeros(1, 3, size, size))
        for h in hooks:
            h.remove()
        for lname, m, shp in seen:
            key = (m.in_channels, m.out_channels, m.kernel_size, m.stride, m.padding, m.groups, m.dilation, shp[1:])
            geos.setdefault(key, []).append(f"{name}.{lname}")
    return [dict(cin=k[0], cout=k[1], kernel=k[2], stride=k[3], padding=k[4], groups=k[5], dilation=k[6],
                 hw=k[7], layers=v) for k, v in geos.items()]


def make(g: dict, hw: tuple[int, int], batch: int, seed: int, device: torch.device | str = "cpu"):
    """(weight, operator, â, b, z*) of geometry ``g`` at input size ``hw``: the data on ``device``."""
    rng = np.random.default_rng(seed)
    cig = g["cin"] // g["groups"]
    w = torch.tensor(rng.standard_normal((g["cout"], cig) + g["kernel"]) * np.sqrt(2.0 / (cig * np.prod(g["kernel"]))))
    op = Conv2d(w, (g["cin"],) + hw, padding=g["padding"], stride=g["stride"], groups=g["groups"],
                dilation=g["dilation"])
    a_hat = torch.relu(torch.tensor(rng.standard_normal((batch,) + op.in_shape))).to(device)  # activation-like
    b = torch.tensor(rng.standard_normal(g["cout"]) * 0.1).to(device)
    z = op.apply(a_hat) + b[:, None, None]
    z_star = z + 0.1 * z.std() * torch.tensor(rng.standard_normal(tuple(z.shape))).to(device)  # a perturbed target
    return w, op, a_hat, b, z_star


def rel(x, ref, base) -> float:
    N = x.shape[0]
    x, ref, base = (torch.as_tensor(t).reshape(N, -1) for t in (x, ref, base))
    return float((torch.linalg.vector_norm(x - ref, dim=1) / torch.linalg.vector_norm(ref - base, dim=1)).max())


def residual(op, a, b, z_star) -> tuple[str, float]:
    """MDP constraint residual, or the CCP normal-equations residual (module docstring)."""
    N = a.shape[0]
    t = (z_star - b[:, None, None]).reshape((N,) + op.out_shape)
    e = op.apply(torch.as_tensor(a).reshape((N,) + op.in_shape)) - t
    if op.shape[0] <= op.shape[1]:
        return "MDP", float((torch.linalg.vector_norm(e.reshape(N, -1), dim=1)
                             / torch.linalg.vector_norm(t.reshape(N, -1), dim=1)).max())
    ne, nt = op.apply_adjoint(e), op.apply_adjoint(t)
    return "CCP", float((torch.linalg.vector_norm(ne.reshape(N, -1), dim=1)
                         / torch.linalg.vector_norm(nt.reshape(N, -1), dim=1)).max())


def _timed(fn, dev, repeat: int):
    """``(median seconds of repeat calls, last result)``: one call of a 0.1 s solve is at the
    mercy of a noisy machine; the median of a few is not (CG's seconds-long run averages itself)."""
    ts, out = [], None
    for _ in range(max(1, int(repeat))):
        t = clock(dev)
        out = fn()
        ts.append(clock(dev) - t)
    return float(np.median(ts)), out


def run_geometry(g: dict, args) -> dict:
    dev = torch.device(args.device)
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats(dev)
    _, op, a_hat, b, z_star = make(g, g["hw"], args.batch, args.seed, dev)
    row: dict = {k: (list(v) if isinstance(v, tuple) else v) for k, v in g.items()}
    row["device"] = str(dev)
    row["auto"] = auto_method(op, DEFAULT_MAX_BYTES)
    t = clock(dev)
    es = ExactConvSolver(op, device=dev)
    row["exact_factor_s"] = clock(dev) - t
    row["exact_solve_s"], ex = _timed(lambda: solve(op, z_star, a_hat, b=b, method="fft-exact", padded_solver=es),
                                      dev, args.repeat)
    row["exact_form"] = ex.info.get("form", "correction")
    a_ex = torch.as_tensor(ex.a)
    row["case"], row["residual"] = residual(op, a_ex, b, z_star)
    row["capacitance_size"], row["refine_steps"] = ex.info["capacitance_size"], int(np.max(ex.info["iterations"]))
    row["exact_algorithm"] = "square" if "square_system_size" in ex.info else "lifted"
    if row["exact_algorithm"] == "square":  # the LU system factored instead of the lifted one
        row["capacitance_size"] = ex.info["square_system_size"]
    if g["stride"] == (1, 1) and g["groups"] == 1 and g["dilation"] == (1, 1):  # the paper's path applies
        (H, W), (kh, kw) = g["hw"], g["kernel"]
        wu, opu, au, bu, zu = make(dict(g, padding=0), (H + kh - 1, W + kw - 1), args.batch, args.seed, dev)
        t = clock(dev)
        fs = FFTConvSolver(wu, opu.in_shape, device=dev)
        row["fft_factor_s"] = clock(dev) - t
        row["fft_solve_s"], _ = _timed(lambda: solve(opu, zu, au, b=bu, method="fft", fft_solver=fs), dev, args.repeat)
        row["exact_over_fft"] = row["exact_solve_s"] / row["fft_solve_s"]
        row["exact_over_fft_incl_factor"] = ((row["exact_solve_s"] + row["exact_factor_s"])
                                             / (row["fft_solve_s"] + row["fft_factor_s"]))
    k = min(args.cg_samples, args.batch)
    if k > 0:
        t = clock(dev)
        cg = solve(op, z_star[:k], a_hat[:k], b=b, method="cg", tol=args.tol, maxiter=args.cg_maxiter)
        row["cg_s_extrapolated"] = (clock(dev) - t) * args.batch / k
        row["cg_samples"], row["cg_iterations"] = k, int(np.max(cg.info["iterations"]))
        row["cg_converged"] = bool(np.all(cg.info["converged"]))
        row["cg_dist_to_exact"] = rel(torch.as_tensor(cg.a), a_ex[:k], a_hat[:k].reshape(k, -1))
        row["cg_over_exact"] = row["cg_s_extrapolated"] / (row["exact_solve_s"] + row["exact_factor_s"])
    if args.dense_size:
        s = args.dense_size
        _, ops, as_, bs, zs = make(g, (s, s), 4, args.seed + 1, dev)
        A = ops.to_sparse(dtype=np.float64).toarray()
        r = (zs - bs[:, None, None]).reshape(4, -1) - ops.apply(as_).reshape(4, -1)
        ref = as_.reshape(4, -1) + torch.as_tensor(np.linalg.lstsq(A, r.cpu().numpy().T, rcond=None)[0].T).to(dev)
        es_s = solve(ops, zs, as_, b=bs, method="fft-exact")
        row["dense_size"], row["dense_dist"] = s, rel(torch.as_tensor(es_s.a), ref, as_.reshape(4, -1))
    if dev.type == "cuda":
        row["cuda_peak_mib"] = torch.cuda.max_memory_allocated(dev) / 2**20
    return row


def table(rows: list[dict]) -> str:
    f = lambda v, fmt: "–" if v is None else format(v, fmt)
    out = ["| layers | C_in→C_out, H, stride | case | auto | m | exact factor / solve (s) | fft factor / solve (s) "
           "| exact/fft (incl. factors) | cg (s, extrapolated) | cg/exact | dense dist | residual |",
           "|---|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        cg = "–" if "cg_s_extrapolated" not in r else (
            f"{'≥' if not r['cg_converged'] else ''}{r['cg_s_extrapolated']:.1f} ({r['cg_iterations']} it, "
            f"{r['cg_samples']} smp)")
        fft = ("–" if "fft_solve_s" not in r else f"{r['fft_factor_s']:.2f} / {r['fft_solve_s']:.2f}")
        ratio = ("–" if "exact_over_fft" not in r else
                 f"{r['exact_over_fft']:.2f} ({r['exact_over_fft_incl_factor']:.2f})")
        names = ", ".join(r["layers"][:2]) + (f" +{len(r['layers']) - 2}" if len(r["layers"]) > 2 else "")
        out.append(f"| {names} | {r['cin']}→{r['cout']}, {r['hw'][0]}, {r['stride'][0]} | {r['case']} | {r['auto']} | "
                   f"{r['capacitance_size']}{' (sq)' if r.get('exact_algorithm') == 'square' else ''} | "
                   f"{r['exact_factor_s']:.2f} / {r['exact_solve_s']:.2f} | {fft} | {ratio} | "
                   f"{cg} | {f(r.get('cg_over_exact'), '.0f')} | {f(r.get('dense_dist'), '.1e')} | "
                   f"{r['residual']:.1e} |")
    return "\n".join(out)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", default="vgg7,resnet20", help=f"comma-separated, from {MODELS}")
    p.add_argument("--layers", default="", help="comma-separated row indices of the distinct geometries (default all)")
    p.add_argument("--batch", type=int, default=256)
    p.add_argument("--size", type=int, default=32)
    p.add_argument("--tol", type=float, default=1e-10)
    p.add_argument("--cg-samples", type=int, default=2, help="samples for cg (0: skip; time extrapolated)")
    p.add_argument("--cg-maxiter", type=int, default=3000)
    p.add_argument("--dense-size", type=int, default=6, help="input size of the dense pinv check (0: skip)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--repeat", type=int, default=3, help="exact and paper-FFT solves: median of this many calls")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cpu", help="cpu (default), cuda or cuda:k: where the data and the solves live")
    p.add_argument("--out", default="bench_reconstruct_layers.json")
    args = p.parse_args(argv)
    dev = check_device(args.device, "bench.reconstruct_layers")
    if dev is None:
        return 2
    args.device = str(dev)
    names = [m.strip() for m in args.models.split(",") if m.strip()]
    bad = [m for m in names if m not in MODELS]
    if bad or not names:
        p.error(f"--models must name some of {MODELS}, got {args.models!r}")
    for opt, val, lo in (("--batch", args.batch, 1), ("--size", args.size, 4), ("--threads", args.threads, 1),
                         ("--cg-samples", args.cg_samples, 0), ("--cg-maxiter", args.cg_maxiter, 1),
                         ("--repeat", args.repeat, 1)):
        if val < lo:
            p.error(f"{opt} must be >= {lo}, got {val}")
    if args.dense_size < 0 or 0 < args.dense_size < 4:
        p.error(f"--dense-size must be 0 (skip) or >= 4, got {args.dense_size}")
    if not (0 < args.tol < 1):
        p.error(f"--tol must lie in (0, 1), got {args.tol}")
    torch.set_num_threads(args.threads)
    geos = conv_geometries(names, args.size)
    try:
        pick = [int(i) for i in args.layers.split(",") if i.strip()] or list(range(len(geos)))
    except ValueError:
        p.error(f"--layers must be comma-separated integers, got {args.layers!r}")
    if any(not 0 <= i < len(geos) for i in pick):
        p.error(f"--layers: indices must lie in [0, {len(geos) - 1}] ({len(geos)} distinct geometries), got {pick}")
    print(f"{len(geos)} distinct conv geometries in {names}; running {pick}; load average {os.getloadavg()}")
    rows = []
    for i in pick:
        rows.append(run_geometry(geos[i], args))
        print(table(rows[-1:]).splitlines()[-1], flush=True)
        if args.out:
            with open(args.out, "w") as fh:
                json.dump({"args": vars(args), "rows": rows, "threads": torch.get_num_threads(),
                           "loadavg": os.getloadavg(), "device": args.device}, fh, indent=1, default=float)
    print(f"\nload average at the end: {os.getloadavg()}\n")
    print(table(rows))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
