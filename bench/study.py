"""Benchmark: verification-study throughput (images per hour) per reference model and dtype.

``python -m bench.study [--images 1] [--models vgg7 resnet20 fixup] [--dtypes float32 float64]
[--workers 2] [--baseline 8abf75a] [--device cpu|cuda|cuda:k] [--out results/bench_study.json]``

What is timed is the public study API, :func:`linop.studies.verify.verify` — per image and
compute dtype: the network's forward pass, the effective hypersurfaces of *every* unit of every
verified layer (image part ``H^I`` and bias part ``H^b``, in the compressed-window form) and
``ĉ = <[x; x_b], H>`` contracted from them, ε (seed 000 Eq. 16), the per-image result file —
on the first ``--images`` test images of the shipped ``digits32`` checkpoints (VGG7, ResNet20,
ResNet20-Fixup; ``models/checkpoints``), with ``figures=False`` and ``resume=False``.

Every measurement runs in a fresh subprocess with one thread (``OMP_NUM_THREADS=1``, the
configuration of one study worker); the model is converted once (not timed) and one warm-up
image is verified first (timed separately as ``warmup_s``: the x-independent geometry and
index caches are built there, once per process), then ``--images`` images are verified into a
fresh directory and timed (wall and process CPU time).  ``images_per_hour`` is
``3600 · images / wall``; ``cpu_s_per_image`` is less sensitive to a shared machine's load.
``peak_mib`` is the process's ``ru_maxrss`` (the resident high-water mark, warm-up included).

Columns
-------
* ``inprocess`` — ``verify(...)`` in the subprocess (today's only mode).
* ``dask`` — ``verify(..., executor=client)`` on a ``LocalCluster`` of ``--workers``
  single-threaded worker processes started in the subprocess (its start-up, ``cluster_start_s``,
  and one warm-up image are not timed; ``--workers × --images`` images are), measured only when
  ``verify`` accepts ``executor`` (checked with :func:`inspect.signature`); otherwise reported
  as ``"n/a (executor not available)"``.  ``worker_peak_mib`` is each worker process's own
  ``ru_maxrss`` (read on the worker), ``cpu_s_per_image`` includes the workers' CPU time.
* ``--baseline REV`` — the in-process measurement with the code of git revision ``REV``
  (exported with ``git archive`` into a temporary directory, run with ``PYTHONPATH`` set to it;
  the subprocess checks that it imported that tree's ``linop``), in the same run, so
  "today" and "now" share the machine's load.

The projected time of the full Table 3 (seed 000: 3 models × 10,000 images, float32) is
``Σ_models 10,000 / images_per_hour`` for one worker, and that divided by the measured dask
speed-up where measured.  ``uptime``'s load average is recorded before and after every
measurement: on a shared machine the wall-clock figures are only comparable within one run.
The JSON is written after every measurement.

``--device cuda[:k]`` (validated up front: one line, exit 2, where CUDA is missing) is passed to
``verify(..., device=...)``: the network runs on that device in every column (dask workers
included); ``peak_mib`` stays the host's ``ru_maxrss`` and ``cuda_peak_mib`` adds
``torch.cuda.max_memory_allocated`` of the in-process measurement (a worker's own device memory
is not read back).  A ``--baseline`` tree whose ``verify`` has no ``device`` argument is
reported as skipped on a CUDA device.  Every result records its device.
"""
from __future__ import annotations

import argparse
import inspect
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
CHECKPOINTS = {"vgg7": "vgg7_digits32", "resnet20": "resnet20_digits32", "fixup": "fixup_resnet20_digits32"}
DTYPES = ("float32", "float64")
TABLE3_IMAGES = 10_000


# ----------------------------------------------------------------------------- the child
def _child(spec: dict) -> dict:
    """One measurement (runs in its own process; ``spec`` from :func:`_measure`)."""
    import torch

    torch.set_num_threads(1)
    import linop
    from linop.convert import from_torch
    from linop.studies import verify as verify_mod
    from models import load_checkpoint, load_dataset, shipped_checkpoint

    out: dict[str, Any] = {"linop_file": str(Path(linop.__file__).resolve()), "threads": torch.get_num_threads()}
    model, meta = load_checkpoint(shipped_checkpoint(CHECKPOINTS[spec["model"]]))
    norm = meta.get("normalize", "none") or "none"
    if norm in ("dataset", "custom") and meta.get("mean") and meta.get("std"):
        norm = (tuple(meta["mean"]), tuple(meta["std"]))
    data = load_dataset(meta["data"], normalize=norm)
    n = int(spec["images"])
    x = data.x_test[: n + 1]
    t = time.perf_counter()
    net = from_torch(model, tuple(meta["input_shape"]), torch.float64)
    out["convert_s"] = time.perf_counter() - t
    kw: dict[str, Any] = dict(dtypes=[spec["dtype"]], resume=False, progress=False, figures=False)
    device = spec.get("device", "cpu")
    out["device"] = device
    if device != "cpu":
        if "device" not in inspect.signature(verify_mod.verify).parameters:
            out["skipped"] = "n/a (verify has no device argument)"
            return out
        kw.update(device=device)
    client = cluster = None
    if spec["mode"] == "dask":
        if "executor" not in inspect.signature(verify_mod.verify).parameters:
            out["skipped"] = "n/a (executor not available)"
            return out
        from distributed import Client, LocalCluster

        t = time.perf_counter()
        cluster = LocalCluster(n_workers=int(spec["workers"]), threads_per_worker=1, processes=True,
                               dashboard_address=None)
        client = Client(cluster)
        out["cluster_start_s"] = time.perf_counter() - t
        kw.update(executor=client)
        n = n * int(spec["workers"])  # every worker gets --images images
        x = data.x_test[: n + 1]
    try:
        with tempfile.TemporaryDirectory(prefix="bench_study_") as tmp:
            t = time.perf_counter()
            verify_mod.verify(net, x[n: n + 1], out_dir=Path(tmp) / "warmup", **kw)  # an image not timed below
            out["warmup_s"] = time.perf_counter() - t
            w0 = client.run(_worker_usage) if client is not None else {}
            cuda = torch.device(device).type == "cuda"
            if cuda:
                torch.cuda.synchronize(device)
                torch.cuda.reset_peak_memory_stats(device)
            c0, t0 = time.process_time(), time.perf_counter()
            verify_mod.verify(net, x[:n], out_dir=Path(tmp) / "run", **kw)
            if cuda:
                torch.cuda.synchronize(device)
                out["cuda_peak_mib"] = torch.cuda.max_memory_allocated(device) / 2**20
            wall = time.perf_counter() - t0
            cpu = time.process_time() - c0
            w1 = client.run(_worker_usage) if client is not None else {}
            sizes = [p.stat().st_size for p in (Path(tmp) / "run").rglob("images/**/*") if p.is_file()]
    finally:
        if client is not None:
            client.close()
            cluster.close()
    wcpu = sum(w1[k][0] - w0[k][0] for k in w1 if k in w0)
    out.update(images=n, wall_s=wall, s_per_image=wall / n, images_per_hour=3600.0 * n / wall,
               cpu_s_per_image=(cpu + wcpu) / n, peak_mib=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0,
               result_file_mb=(sum(sizes) / len(sizes) / 1e6) if sizes else None)
    if client is not None:
        out["worker_peak_mib"] = {str(k): v[1] for k, v in w1.items()}
    return out


def _worker_usage() -> tuple[float, float]:
    """(CPU seconds, ru_maxrss in MiB) of the calling process (run on every Dask worker)."""
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime, r.ru_maxrss / 1024.0


# ----------------------------------------------------------------------------- the parent
def _load() -> list[float]:
    return [round(v, 2) for v in os.getloadavg()]


def _uptime() -> str:
    try:
        return subprocess.run(["uptime"], capture_output=True, text=True, timeout=10, check=False).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return f"load average: {', '.join(map(str, _load()))}"


def _measure(spec: dict, tree: Path, timeout: float) -> dict:
    """Run :func:`_child` in a subprocess with ``tree`` first on ``PYTHONPATH``."""
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", PYTHONPATH=str(tree))
    res: dict[str, Any] = dict(spec, load_before=_load())
    t = time.perf_counter()
    try:
        code = "import sys, json; from bench.study import _child; print('@@' + json.dumps(_child(json.loads(sys.argv[1]))))"
        p = subprocess.run([sys.executable, "-c", code, json.dumps(spec)],
                           cwd=str(tree), env=env, capture_output=True, text=True, timeout=timeout, check=False)
    except subprocess.TimeoutExpired:
        res.update(error=f"timed out after {timeout:.0f} s")
        return res
    res["total_s"] = time.perf_counter() - t
    res["load_after"] = _load()
    line = [ln for ln in p.stdout.splitlines() if ln.startswith("@@")]
    if p.returncode != 0 or not line:
        tail = (p.stderr.strip().splitlines() or ["(no output)"])[-1]
        res["error"] = f"exit {p.returncode}: {tail}"
        return res
    res.update(json.loads(line[-1][2:]))
    want = (tree / "linop").resolve()
    if not res["linop_file"].startswith(str(want)):
        res["error"] = f"imported {res['linop_file']}, not the tree {want}"
    return res


def _export(rev: str, dest: Path) -> Path:
    """The tree of git revision ``rev`` in ``dest`` (``git archive``; the checkout is untouched),
    with this version of ``bench/study.py`` (the child's code must be the same in both)."""
    try:
        arch = subprocess.run(["git", "-C", str(ROOT), "archive", "--format=tar", rev], capture_output=True, check=True)
    except subprocess.CalledProcessError as exc:
        msg = (exc.stderr.decode(errors="replace").strip().splitlines() or ["(no message)"])[0]
        print(f"bench.study: error: --baseline {rev!r}: git archive failed: {msg}", file=sys.stderr)
        raise SystemExit(2) from None
    dest.mkdir(parents=True, exist_ok=True)
    subprocess.run(["tar", "-x", "-C", str(dest)], input=arch.stdout, check=True)
    (dest / "bench").mkdir(exist_ok=True)
    (dest / "bench" / "study.py").write_text((ROOT / "bench" / "study.py").read_text())
    if not (dest / "bench" / "__init__.py").exists():
        (dest / "bench" / "__init__.py").write_text("")
    return dest


def _fmt(r: dict | None) -> str:
    if r is None:
        return "—"
    if r.get("skipped"):
        return r["skipped"]
    if r.get("error"):
        return f"error: {r['error']}"
    return f"{r['images_per_hour']:.0f}/h ({r['s_per_image']:.2f} s, cpu {r['cpu_s_per_image']:.2f} s)"


def table(results: list[dict], models: list[str], dtypes: list[str]) -> tuple[str, dict]:
    """Markdown table of images/hour and the Table 3 projection."""
    def get(m, d, col):
        hit = [r for r in results if r["model"] == m and r["dtype"] == d and r["column"] == col]
        return hit[-1] if hit else None

    def ok(r):
        return r is not None and not r.get("error") and not r.get("skipped")

    cols = sorted({r["column"] for r in results}, key=lambda c: ("baseline" in c, c != "inprocess", c))
    lines = ["| model | dtype | " + " | ".join(cols) + " | speed-up vs baseline | f64/f32 time | peak MiB (in-process) |",
             "|---|---|" + "---|" * len(cols) + "---|---|---|"]
    proj: dict[str, Any] = {}
    for m in models:
        for d in dtypes:
            cur, base = get(m, d, "inprocess"), next((get(m, d, c) for c in cols if c.startswith("baseline")), None)
            sp = f"{base['s_per_image'] / cur['s_per_image']:.2f}× (cpu {base['cpu_s_per_image'] / cur['cpu_s_per_image']:.2f}×)" \
                if ok(cur) and ok(base) else "—"
            r32, r64 = get(m, "float32", "inprocess"), get(m, "float64", "inprocess")
            ratio = f"{r64['s_per_image'] / r32['s_per_image']:.2f}" if d == "float64" and ok(r32) and ok(r64) else ""
            peak = f"{cur['peak_mib']:.0f}" if ok(cur) else "—"
            lines.append(f"| {m} | {d} | " + " | ".join(_fmt(get(m, d, c)) for c in cols) + f" | {sp} | {ratio} | {peak} |")
    for col in cols:
        rows = [get(m, "float32", col) for m in models]
        if all(ok(r) for r in rows):
            h = sum(TABLE3_IMAGES / r["images_per_hour"] for r in rows)
            # CPU-time projection: what the wall time would be with the cores to the study alone
            hc = sum(TABLE3_IMAGES * r["cpu_s_per_image"] / 3600.0 for r in rows)
            proj[col] = {"hours": h, "cpu_hours": hc, "models": models}
            if col == "dask" and all(ok(get(m, "float32", "inprocess")) for m in models):
                proj[col]["per_worker_hours"] = h * int(rows[0].get("workers", 2))
    return "\n".join(lines), proj


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.study", description=__doc__.split("\n")[0])
    ap.add_argument("--images", type=int, default=1, help="timed images per measurement (default 1)")
    ap.add_argument("--models", nargs="+", default=list(CHECKPOINTS), help=f"from {list(CHECKPOINTS)}")
    ap.add_argument("--dtypes", nargs="+", default=list(DTYPES), help=f"from {list(DTYPES)}")
    ap.add_argument("--workers", type=int, default=2, help="LocalCluster workers of the dask column (default 2)")
    ap.add_argument("--no-dask", action="store_true", help="skip the dask column")
    ap.add_argument("--baseline", default=None, metavar="REV", help="also measure git revision REV in-process")
    ap.add_argument("--device", default="cpu", help="cpu (default), cuda or cuda:k: passed to verify(device=...)")
    ap.add_argument("--timeout", type=float, default=1800.0, help="seconds per measurement (default 1800)")
    ap.add_argument("--out", default="results/bench_study.json")
    ap.add_argument("--show", metavar="JSON", help="print the table of an earlier run's JSON and exit")
    a = ap.parse_args(argv)
    if a.show:
        try:
            doc = json.loads(Path(a.show).read_text())
        except (OSError, ValueError) as exc:
            print(f"bench.study: error: --show {a.show}: {exc}", file=sys.stderr)
            return 2
        ms = list(dict.fromkeys(r["model"] for r in doc["results"]))
        ds = list(dict.fromkeys(r["dtype"] for r in doc["results"]))
        tab, proj = table(doc["results"], ms, ds)
        print(f"# {doc.get('command')}\n# {doc.get('uptime_start')}\n{tab}")
        for col, p in proj.items():
            print(f"Table 3, {col}: {p['hours']:.1f} h at this load; {p['cpu_hours']:.1f} CPU-hours")
        print(f"# {doc.get('uptime_end')}")
        return 0
    bad = ([f"--models: unknown {m!r} (choose from {list(CHECKPOINTS)})" for m in a.models if m not in CHECKPOINTS]
           + [f"--dtypes: unknown {d!r} (choose from {list(DTYPES)})" for d in a.dtypes if d not in DTYPES]
           + ([f"--images must be >= 1, got {a.images}"] if a.images < 1 else [])
           + ([f"--workers must be >= 1, got {a.workers}"] if a.workers < 1 else [])
           + ([f"--timeout must be > 0, got {a.timeout}"] if not a.timeout > 0 else []))
    if bad:
        print(f"bench.study: error: {bad[0]}", file=sys.stderr)
        return 2
    from linop import validate

    try:
        device = str(validate.device(a.device, "--device"))
    except ValueError as exc:
        print(f"bench.study: error: {exc}", file=sys.stderr)
        return 2
    out = Path(a.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    head = _uptime()
    print(f"# bench.study: {a.images} image(s), models {a.models}, dtypes {a.dtypes}\n# {head}", flush=True)
    doc: dict[str, Any] = {"command": " ".join(["python -m bench.study"] + (argv if argv is not None else sys.argv[1:])),
                           "uptime_start": head, "images": a.images, "device": device, "results": []}
    with tempfile.TemporaryDirectory(prefix="bench_study_base_") as tmp:
        trees = [("inprocess", ROOT, "inprocess")]
        if a.baseline:
            rev = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short", a.baseline], capture_output=True,
                                 text=True, check=False).stdout.strip() or a.baseline
            trees.append((f"baseline {rev}", _export(a.baseline, Path(tmp) / "tree"), "inprocess"))
            doc["baseline"] = rev
        if not a.no_dask:
            trees.append(("dask", ROOT, "dask"))
        for m in a.models:
            for d in a.dtypes:
                for col, tree, mode in trees:
                    spec = {"model": m, "dtype": d, "images": a.images, "mode": mode, "workers": a.workers,
                            "device": device}
                    r = _measure(spec, tree, a.timeout)
                    r["column"] = col
                    doc["results"].append(r)
                    print(f"{m:9s} {d:8s} {col:18s} {_fmt(r)}  load {r['load_before']} -> {r.get('load_after')}",
                          flush=True)
                    out.write_text(json.dumps(doc, indent=1))
    doc["uptime_end"] = _uptime()
    tab, proj = table(doc["results"], a.models, a.dtypes)
    doc["table"], doc["table3_projection"] = tab, proj
    out.write_text(json.dumps(doc, indent=1))
    print("\n" + tab)
    for col, p in proj.items():
        extra = f"; {p['per_worker_hours']:.1f} h of one worker" if "per_worker_hours" in p else ""
        print(f"Table 3 ({len(p['models'])} × {TABLE3_IMAGES:,} images, float32), {col}: {p['hours']:.1f} h on this "
              f"machine at this load{extra}; {p['cpu_hours']:.1f} CPU-hours")
    print(f"# {doc['uptime_end']}\n# written {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
