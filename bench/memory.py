"""Peak memory of one verification against its memory budget — ``python -m bench.memory``.

::

    python -m bench.memory [--models resnet20 vgg7] [--dtypes float32 float64]
                           [--budgets 2GiB 1GiB] [--linop-root DIR] [--out results/bench_memory.json]

Per (model, dtype, budget), in a fresh single-threaded subprocess (``OMP_NUM_THREADS=1``):
load the shipped digits32 checkpoint, ``linop.from_torch`` it, take the first test image,
read the resident set size (RSS, ``/proc/self/statm``), then time one
``linop.hypersurface.reconstructed_activations(net, x, dtype=..., memory_budget=B)`` — what
``linop verify`` runs per image — and read the peak RSS
(``resource.getrusage(RUSAGE_SELF).ru_maxrss``).  Reported: the plan's peak estimate and the
passes it chose (``linop.hypersurface.verification_plan``), the measured growth (peak RSS − RSS
after the imports and the network build), the wall and CPU seconds (CPU seconds are the
comparable figure on a shared machine).  ``--linop-root DIR``: measure the
``linop`` package found in ``DIR`` instead (e.g. an exported older revision, for before/after
figures in one run); ``--baseline-root DIR``: both, each configuration measured with the
current code and then with ``DIR``'s, so their time ratio is taken under the same load.  ``uptime``'s load average is printed before and after: memory figures are
robust to load, times are not — compare times as ratios within one run.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

MODELS = {"resnet20": "resnet20_digits32", "vgg7": "vgg7_digits32", "fixup": "fixup_resnet20_digits32"}


def _rss() -> int:
    """Current resident set size in bytes."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def child(model: str, dtype: str, budget: str, root: str | None) -> dict:
    """One measurement in this (fresh) process; returns the figures."""
    if root:
        sys.path.insert(0, root)
    import resource

    import torch

    torch.set_num_threads(1)
    import linop
    from linop import hypersurface
    from linop.utils import parse_memory
    from models import shipped_checkpoint
    from models.data import load_dataset
    from models.train import load_checkpoint

    m, _meta = load_checkpoint(shipped_checkpoint(MODELS[model]))
    net = linop.from_torch(m, (3, 32, 32))
    x = load_dataset("digits32").x_test[0]
    B = parse_memory(budget)
    plan = None
    if hasattr(hypersurface, "verification_plan"):
        vp = hypersurface.verification_plan(net, x, dtype=dtype, memory_budget=B)
        plan = {"peak_bytes": int(vp["peak_bytes"]), "passes": len(vp["passes"]), "chunk": vp.get("chunk")}
    else:  # an older revision: the sweep's plan without grouping
        lin = linop.linearise(net, x, dtype=dtype, memory_budget=B)
        plan = {"peak_bytes": int(lin.plan()["peak_bytes"]), "passes": None, "chunk": None}
        del lin
    import gc

    gc.collect()
    try:  # reset VmHWM to the current RSS (Linux >= 4.0)
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pass
    base = _rss()
    t0, c0 = time.perf_counter(), time.process_time()
    hypersurface.reconstructed_activations(net, x, dtype=dtype, memory_budget=B)
    sec, cpu = time.perf_counter() - t0, time.process_time() - c0
    # this process's own high-water mark (VmHWM); ru_maxrss would also keep the pre-exec image's
    peak = _status_bytes("VmHWM") or resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    return {"model": model, "dtype": dtype, "budget": B, "plan_peak": plan["peak_bytes"], "passes": plan["passes"],
            "chunk": plan["chunk"], "base_rss": base, "peak_rss": peak, "growth": max(0, peak - base),
            "seconds": sec, "cpu_seconds": cpu}


def _status_bytes(key: str) -> int:
    """A kB field of ``/proc/self/status`` in bytes (0 where there is none)."""
    try:
        with open("/proc/self/status") as f:
            return next((int(line.split()[1]) * 1024 for line in f if line.startswith(key + ":")), 0)
    except OSError:
        return 0


def _uptime() -> str:
    try:
        return subprocess.run(["uptime"], capture_output=True, text=True, check=False).stdout.strip()
    except OSError:
        return "uptime unavailable"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.memory", description=__doc__.splitlines()[0])
    ap.add_argument("--models", nargs="+", default=["resnet20", "vgg7"], choices=sorted(MODELS))
    ap.add_argument("--dtypes", nargs="+", default=["float32", "float64"], choices=["float32", "float64"])
    ap.add_argument("--budgets", nargs="+", default=["2GiB", "1GiB"])
    ap.add_argument("--linop-root", default=None, help="measure the linop package in this directory")
    ap.add_argument("--baseline-root", default=None,
                    help="also measure the linop package in this directory right after each row (before/after)")
    ap.add_argument("--out", default=None, help="write the rows as JSON here")
    ap.add_argument("--child", nargs=3, metavar=("MODEL", "DTYPE", "BUDGET"), help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    if a.child:
        print(json.dumps(child(*a.child, a.linop_root)))
        return 0
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    print("load before:", _uptime(), flush=True)
    rows = []
    G = 2**30
    base = " | growth before | CPU s before | CPU s after / before" if a.baseline_root else ""
    print(f"| model | dtype | budget | plan peak | passes | measured growth | growth / budget | wall s | CPU s{base} |")
    print("|---" * (9 + 3 * bool(a.baseline_root)) + "|", flush=True)

    def measure(model: str, dt: str, b: str, root: str | None) -> dict | str:
        cmd = [sys.executable, "-m", "bench.memory", "--child", model, dt, b]
        if root:
            cmd += ["--linop-root", root]
        r = subprocess.run(cmd, capture_output=True, text=True, env=env, check=False)
        if r.returncode != 0:
            return "error: " + (r.stderr.strip().splitlines() or ["?"])[-1]
        return json.loads(r.stdout.strip().splitlines()[-1])

    for model in a.models:
        for dt in a.dtypes:
            for b in a.budgets:
                row = measure(model, dt, b, a.linop_root)
                if isinstance(row, str):
                    print(f"| {model} | {dt} | {b} | {row} |", flush=True)
                    continue
                extra = ""
                if a.baseline_root:  # the same configuration with the baseline code, right after
                    old = measure(model, dt, b, a.baseline_root)
                    row["baseline"] = old
                    extra = (f" | {old} | | " if isinstance(old, str) else
                             f" | {old['growth'] / G:.2f} GiB | {old['cpu_seconds']:.1f} | "
                             f"{row['cpu_seconds'] / old['cpu_seconds']:.2f}")
                rows.append(row)
                print(f"| {model} | {dt} | {b} | {row['plan_peak'] / G:.2f} GiB | {row['passes'] or '-'} | "
                      f"{row['growth'] / G:.2f} GiB | {row['growth'] / row['budget']:.2f} | {row['seconds']:.1f} | "
                      f"{row['cpu_seconds']:.1f}{extra} |", flush=True)
    print("load after:", _uptime(), flush=True)
    if a.out:
        Path(a.out).parent.mkdir(parents=True, exist_ok=True)
        Path(a.out).write_text(json.dumps({"rows": rows, "linop_root": a.linop_root}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
