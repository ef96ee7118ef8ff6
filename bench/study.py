"""Benchmark: verification-study throughput (images per hour) per reference model and dtype.

``python -m bench.study [--images 1] [--models vgg7 resnet20 fixup] [--dtypes float32 float64]
[--workers 2] [--no-indep] [--no-dask] [--keep-heap] [--baseline 8abf75a] [--device cpu|cuda|cuda:k]
[--out results/bench_study.json]``

What is timed is the public study API, :func:`linop.studies.verify.verify` — per image and
compute dtype: the network's forward pass, the effective hypersurfaces of *every* unit of every
verified layer (image part ``H^I`` and bias part ``H^b``, in the compressed-window form) and
``ĉ = <[x; x_b], H>`` contracted from them, ε (seed 000 Eq. 16), the per-image result file —
on test images of the shipped ``digits32`` checkpoints (VGG7, ResNet20, ResNet20-Fixup;
``models/checkpoints``), with ``figures=False`` and ``resume=False``.

Steady state.  Every measurement runs in fresh subprocesses with one thread each
(``OMP_NUM_THREADS=1``, the configuration of one study worker); the model is converted once
(not timed) and **every process that computes timed images first verifies a warm-up image of
its own** (timed separately as ``warmup_s``: the network in the compute dtype, the
x-independent geometry and index caches are built there, once per process); then the timed
images are verified into a fresh directory (wall and CPU time).  ``--images`` is the number of
timed images *per process / per worker* (default 1 for a quick check; 6 or more for a steady
state, where the per-call fixed costs — index, summary — weigh little).  ``images_per_hour``
is ``3600 · images / wall``; ``cpu_s_per_image`` is less sensitive to a shared machine's load.
``peak_mib`` is the process's ``ru_maxrss`` (the resident high-water mark, warm-up included).

Columns (K = ``--workers``)
---------------------------
* ``inprocess`` ("1 process") — ``verify(...)`` on images ``0 … n−1`` in one process.
* ``indep`` ("K independent processes") — K such processes started together, process k on
  images ``k·n … (k+1)·n − 1``, each warmed up on its own image; they wait at a barrier (a
  line on stdin) until all are warm and are released together (``start_spread_s`` records how
  close their starts were).  ``images_per_hour = 3600 · K·n / (last end − first start)`` on the
  processes' own clocks.  No scheduler: the hardware's own K-core scaling (the processes share
  memory bandwidth, the last-level cache — and the machine with whatever else runs).
* ``dask`` ("K-worker LocalCluster") — ``verify(..., executor=DaskExecutor.local(K))``, the
  cluster ``linop verify --scheduler local --workers K`` starts (K single-threaded worker
  processes and :data:`linop.studies.execute.LOCAL_CLUSTER_CONFIG`); start-up
  (``cluster_start_s``) not timed; warm-up: K images in one call, one per worker, repeated
  (≤ ``WARMUP_ROUNDS``) until every worker holds the network in the compute dtype — checked on
  the workers, ``workers_warm`` records it; then the K·n images ``0 … K·n − 1`` are timed.
  ``worker_peak_mib`` is each worker process's own ``ru_maxrss``; ``cpu_s_per_image`` includes
  the workers' CPU time, ``driver_cpu_s_per_image`` is the driver's alone (scheduler, client,
  file writes).  Measured only when ``verify`` accepts ``executor``.
* **scheduler overhead** = ``1 − dask / indep`` (images per hour): what the Dask layout costs
  beyond running K processes by hand.  ``× 1 process``: a column's images per hour over the
  one process's.
* ``--keep-heap`` — an experiment, every column: the measured processes (and so the Dask
  workers) run with :data:`KEEP_HEAP_ENV` (glibc: one arena, no ``mmap`` for large blocks, no
  trimming), so freed tangent batches are reused instead of unmapped and faulted in again.
  The library itself does not set these; ``worker_malloc_env`` records what the workers had.
* ``--baseline REV`` — the in-process measurement with the code of git revision ``REV``
  (exported with ``git archive`` into a temporary directory, run with ``PYTHONPATH`` set to it;
  the subprocess checks that it imported that tree's ``linop``), in the same run, so
  "today" and "now" share the machine's load.

The projected time of the full Table 3 (seed 000: 3 models × 10,000 images, float32) is
``Σ_models 10,000 / images_per_hour`` per column.  ``uptime``'s load average is recorded
before and after every measurement: on a shared machine the wall-clock figures are only
comparable within one run, and a K-process scaling figure means something only on a machine
with K otherwise idle cores.  The JSON is written after every measurement.

``--device cuda[:k]`` (validated up front: one line, exit 2, where CUDA is missing) is passed to
``verify(..., device=...)``: the network runs on that device in every column (dask workers
included); ``peak_mib`` stays the host's ``ru_maxrss`` and ``cuda_peak_mib`` adds
``torch.cuda.max_memory_allocated`` of the timed region (a worker's own device memory is not
read back).  A ``--baseline`` tree whose ``verify`` has no ``device`` argument is reported as
skipped on a CUDA device.  Every result records its device.
"""
from __future__ import annotations

import argparse
import inspect
import json
import os
import queue
import resource
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
CHECKPOINTS = {"vgg7": "vgg7_digits32", "resnet20": "resnet20_digits32", "fixup": "fixup_resnet20_digits32"}
DTYPES = ("float32", "float64")
TABLE3_IMAGES = 10_000
#: ``--keep-heap``: glibc malloc settings of every measured process (Dask workers inherit them):
#: one arena for all threads, no ``mmap`` for large blocks, no trimming — freed tangent batches
#: are reused from the heap instead of being unmapped and faulted in again (an experiment: the
#: library does not set them)
KEEP_HEAP_ENV = {"MALLOC_ARENA_MAX": "1", "MALLOC_MMAP_MAX_": "0", "MALLOC_TRIM_THRESHOLD_": str(2**40)}
#: warm-up rounds of the dask column (one image per worker each) before giving up on a cold worker
WARMUP_ROUNDS = 3


# ----------------------------------------------------------------------------- the child
def _setup(spec: dict) -> tuple[dict, Any, Any, Any, dict]:
    """Load the checkpoint and its test images, convert the model (timed as ``convert_s``)."""
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
    t = time.perf_counter()
    net = from_torch(model, tuple(meta["input_shape"]), torch.float64)
    out["convert_s"] = time.perf_counter() - t
    kw: dict[str, Any] = {"dtypes": [spec["dtype"]], "resume": False, "progress": False, "figures": False}
    device = spec.get("device", "cpu")
    out["device"] = device
    if device != "cpu":
        if "device" not in inspect.signature(verify_mod.verify).parameters:
            out["skipped"] = "n/a (verify has no device argument)"
        kw.update(device=device)
    params = inspect.signature(verify_mod.verify).parameters
    for opt in ("heap", "memory_budget"):  # the library's options, where this tree's verify has them
        if spec.get(opt) is not None and opt in params:
            kw[opt] = spec[opt]
    out["verify_options"] = {k: kw[k] for k in ("heap", "memory_budget") if k in kw}
    need = int(spec["images"]) * int(spec["workers"]) + WARMUP_ROUNDS * int(spec["workers"])
    if need > len(data.x_test):
        out["skipped"] = f"n/a ({need} test images needed, the data set has {len(data.x_test)})"
    return out, verify_mod, net, data.x_test, kw


def _timed(verify_mod: Any, net: Any, x: Any, out_dir: Path, kw: dict, device: str) -> dict:
    """``verify`` on ``x`` into ``out_dir``: wall, process CPU, epoch start / end, file sizes."""
    import torch

    cuda = torch.device(device).type == "cuda"
    if cuda:
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
    c0, e0, t0 = time.process_time(), time.time(), time.perf_counter()
    verify_mod.verify(net, x, out_dir=out_dir, **kw)
    r: dict[str, Any] = {}
    if cuda:
        torch.cuda.synchronize(device)
        r["cuda_peak_mib"] = torch.cuda.max_memory_allocated(device) / 2**20
    r.update(wall_s=time.perf_counter() - t0, cpu_s=time.process_time() - c0, epoch_start=e0, epoch_end=time.time())
    sizes = [p.stat().st_size for p in out_dir.rglob("images/**/*") if p.is_file()]
    r["result_file_mb"] = (sum(sizes) / len(sizes) / 1e6) if sizes else None
    return r


def _child(spec: dict) -> dict:
    """One measurement (runs in its own process; ``spec`` from :func:`_measure` or
    :func:`_measure_together`).  ``mode`` ``"inprocess"`` and ``"indep"`` verify ``--images``
    images in this process (``"indep"``: images ``rank·n …``, after a barrier on stdin);
    ``"dask"`` drives a LocalCluster (:func:`_child_dask`)."""
    out, verify_mod, net, x_test, kw = _setup(spec)
    if out.get("skipped"):
        return out
    if spec["mode"] == "dask":
        return _child_dask(spec, out, verify_mod, net, x_test, kw)
    n, k = int(spec["images"]), int(spec.get("rank", 0))
    first, warm = (k * n, int(spec["workers"]) * n + k) if spec["mode"] == "indep" else (0, n)
    with tempfile.TemporaryDirectory(prefix="bench_study_") as tmp:
        t = time.perf_counter()
        verify_mod.verify(net, x_test[warm: warm + 1], out_dir=Path(tmp) / "warmup", **kw)  # not timed below
        out["warmup_s"] = time.perf_counter() - t
        if spec["mode"] == "indep":  # the barrier: the parent starts every process's timed run at once
            print("@@ready", flush=True)
            sys.stdin.readline()
        r = _timed(verify_mod, net, x_test[first: first + n], Path(tmp) / "run", kw, out["device"])
    out.update(r, images=n, first_image=first, s_per_image=r["wall_s"] / n, images_per_hour=3600.0 * n / r["wall_s"],
               cpu_s_per_image=r["cpu_s"] / n, peak_mib=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0)
    return out


def _child_dask(spec: dict, out: dict, verify_mod: Any, net: Any, x_test: Any, kw: dict) -> dict:
    """The ``dask`` column: a LocalCluster of ``workers`` single-threaded processes, every worker
    warmed up (one image each, repeated until each holds the network in the compute dtype),
    then ``workers × images`` images timed."""
    if "executor" not in inspect.signature(verify_mod.verify).parameters:
        out["skipped"] = "n/a (executor not available)"
        return out
    from linop.studies import execute

    K, n = int(spec["workers"]), int(spec["images"])
    t = time.perf_counter()
    environ = None
    if spec.get("heap") and "heap" in inspect.signature(verify_mod.verify).parameters:
        from linop.studies import heap as heap_mod

        environ = heap_mod.worker_environ(spec["heap"])  # as verify(executor="local", heap=...) sets it
    ex = execute.DaskExecutor.local(K, environ=environ)  # the layout of `linop verify --scheduler local --workers K`
    client = ex.start()
    out["cluster_start_s"] = time.perf_counter() - t
    kw.update(executor=ex)
    try:
        with tempfile.TemporaryDirectory(prefix="bench_study_") as tmp:
            t = time.perf_counter()
            for rnd in range(WARMUP_ROUNDS):  # K tasks on K idle workers: Dask spreads them, checked here
                a = K * n + rnd * K
                verify_mod.verify(net, x_test[a: a + K], out_dir=Path(tmp) / f"warmup{rnd}", **kw)
                warm = client.run(_worker_warm, spec["dtype"])
                if all(warm.values()):
                    break
            out.update(warmup_s=time.perf_counter() - t, warmup_rounds=rnd + 1,
                       workers_warm=f"{sum(map(bool, warm.values()))}/{len(warm)}")
            out["worker_malloc_env"] = sorted({str(v) for v in client.run(_malloc_env).values()})
            w0, c0 = client.run(_worker_usage), client.run(_worker_tasks)
            r = _timed(verify_mod, net, x_test[: K * n], Path(tmp) / "run", kw, out["device"])
            w1, c1 = client.run(_worker_usage), client.run(_worker_tasks)
    finally:
        ex.close()
    wcpu = sum(w1[a][0] - w0[a][0] for a in w1 if a in w0)
    N = K * n
    out.update(r, images=N, s_per_image=r["wall_s"] / N, images_per_hour=3600.0 * N / r["wall_s"],
               cpu_s_per_image=(r["cpu_s"] + wcpu) / N, driver_cpu_s_per_image=r["cpu_s"] / N,
               peak_mib=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0,
               worker_peak_mib={str(a): v[1] for a, v in w1.items()},
               # a worker that ran more of the timed tasks than the others sets the wall time
               worker_tasks=sorted(c1[a] - c0.get(a, 0) for a in c1))
    return out


def _worker_warm(dtype: str) -> bool:
    """Whether this worker holds a study network in ``dtype`` (run on every Dask worker)."""
    mod = sys.modules.get("linop.studies.verify")
    return any(key[1] == dtype for key in getattr(mod, "_NETS", {}))


def _worker_tasks(dask_worker: Any) -> int:
    """Tasks this Dask worker has executed so far (run on every Dask worker)."""
    return int(dask_worker.state.executed_count)


def _malloc_env() -> dict[str, str | None]:
    """The glibc malloc variables of the calling process (run on every Dask worker)."""
    return {k: os.environ.get(k) for k in KEEP_HEAP_ENV}


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


_CODE = ("import sys, json; from bench.study import _child; "
         "print('@@' + json.dumps(_child(json.loads(sys.argv[1]))), flush=True)")


def _env(tree: Path, spec: dict) -> dict:
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", PYTHONPATH=str(tree))
    if spec.get("keep_heap"):
        env.update(KEEP_HEAP_ENV)
    return env


def _check_tree(res: dict, tree: Path) -> None:
    want = (tree / "linop").resolve()
    if not res.get("error") and not res["linop_file"].startswith(str(want)):
        res["error"] = f"imported {res['linop_file']}, not the tree {want}"


def _measure(spec: dict, tree: Path, timeout: float) -> dict:
    """Run :func:`_child` in a subprocess with ``tree`` first on ``PYTHONPATH``."""
    res: dict[str, Any] = dict(spec, load_before=_load())
    t = time.perf_counter()
    try:
        p = subprocess.run([sys.executable, "-c", _CODE, json.dumps(spec)], cwd=str(tree), env=_env(tree, spec),
                           capture_output=True, text=True, timeout=timeout, check=False)
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
    _check_tree(res, tree)
    return res


def _measure_together(spec: dict, tree: Path, timeout: float) -> dict:
    """The ``indep`` column: ``workers`` subprocesses of :func:`_child` (``rank`` 0 … K−1), each
    warmed up; once all are ready, released together (one line on each stdin).  Throughput:
    ``K·n / (last end − first start)``, on the processes' own (system-wide) clocks."""
    K = int(spec["workers"])
    res: dict[str, Any] = dict(spec, load_before=_load())
    t = time.perf_counter()
    deadline = time.monotonic() + timeout
    lines: queue.Queue = queue.Queue()
    procs: list[subprocess.Popen] = []
    with tempfile.TemporaryDirectory(prefix="bench_study_logs_") as logs:
        errs = [open(Path(logs) / f"{k}.err", "w+") for k in range(K)]  # noqa: SIM115 (closed below)
        try:
            for k in range(K):
                procs.append(subprocess.Popen([sys.executable, "-c", _CODE, json.dumps(dict(spec, rank=k))],
                                              cwd=str(tree), env=_env(tree, spec), stdin=subprocess.PIPE,
                                              stdout=subprocess.PIPE, stderr=errs[k], text=True))
                threading.Thread(target=_pump, args=(k, procs[k], lines), daemon=True).start()
            ready, done, final = set(), set(), {}
            released = False
            while len(done) < K:
                try:
                    k, line = lines.get(timeout=max(deadline - time.monotonic(), 0.01))
                except queue.Empty:
                    res["error"] = f"timed out after {timeout:.0f} s"
                    return res
                if line is None:
                    done.add(k)
                elif line.startswith("@@ready"):
                    ready.add(k)
                elif line.startswith("@@"):
                    final[k] = json.loads(line[2:])
                if not released and len(ready | done) == K:
                    if done - ready and not all(final.get(j, {}).get("skipped") for j in done - ready):
                        break  # one process failed before the barrier: do not time the others alone
                    for p in procs:
                        try:
                            if p.stdin is not None and p.poll() is None:
                                p.stdin.write("go\n")
                                p.stdin.flush()
                        except BrokenPipeError:  # it died just now: reported below as failed
                            pass
                    released = True
            failed = sorted((k for k in range(K) if k not in final), key=lambda k: k not in done)
            if failed:  # the one that exited on its own first (the others were waiting at the barrier)
                k = failed[0]
                if k not in done:
                    procs[k].kill()
                procs[k].wait(timeout=10)
                errs[k].seek(0)
                tail = (errs[k].read().strip().splitlines() or ["(no output)"])[-1]
                res["error"] = f"process {k}: exit {procs[k].poll()}: {tail}"
                return res
            for p in procs:
                p.wait()
        finally:
            for p in procs:
                if p.poll() is None:
                    p.kill()
                    p.wait()
            for f in errs:
                f.close()
    res["total_s"] = time.perf_counter() - t
    res["load_after"] = _load()
    rs = [final[k] for k in range(K)]
    res.update({key: rs[0][key] for key in ("linop_file", "threads", "device", "convert_s") if key in rs[0]})
    if any(r.get("skipped") for r in rs):
        res["skipped"] = next(r["skipped"] for r in rs if r.get("skipped"))
        return res
    N = sum(r["images"] for r in rs)
    wall = max(r["epoch_end"] for r in rs) - min(r["epoch_start"] for r in rs)
    sizes = [r["result_file_mb"] for r in rs if r.get("result_file_mb") is not None]
    res.update(images=N, wall_s=wall, s_per_image=wall / N, images_per_hour=3600.0 * N / wall,
               cpu_s_per_image=sum(r["cpu_s"] for r in rs) / N, peak_mib=max(r["peak_mib"] for r in rs),
               start_spread_s=max(r["epoch_start"] for r in rs) - min(r["epoch_start"] for r in rs),
               result_file_mb=sum(sizes) / len(sizes) if sizes else None,
               processes=[{key: r[key] for key in ("first_image", "images", "warmup_s", "wall_s", "s_per_image",
                                                   "cpu_s_per_image", "peak_mib")} for r in rs])
    _check_tree(res, tree)
    return res


def _pump(k: int, p: subprocess.Popen, lines: queue.Queue) -> None:
    """Hand every stdout line of process ``k`` to ``lines``; ``None`` when it closes."""
    assert p.stdout is not None
    for line in p.stdout:
        lines.put((k, line))
    lines.put((k, None))


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


def _label(col: str, k: int) -> str:
    return {"inprocess": "1 process", "indep": f"{k} independent processes",
            "dask": f"{k}-worker LocalCluster"}.get(col, col)


def table(results: list[dict], models: list[str], dtypes: list[str]) -> tuple[str, dict]:
    """Markdown table of images/hour, the K-process ratios, the scheduler overhead and the Table 3
    projection.

    ``×`` columns: images per hour over the ``1 process`` column's; ``scheduler overhead`` =
    ``1 − dask / indep`` (images per hour of the K-worker LocalCluster over K independent
    processes): what Dask costs beyond the hardware's own K-core scaling.
    """
    def get(m, d, col):
        hit = [r for r in results if r["model"] == m and r["dtype"] == d and r["column"] == col]
        return hit[-1] if hit else None

    def ok(r):
        return r is not None and not r.get("error") and not r.get("skipped")

    def ratio(a, b):
        return f"{a['images_per_hour'] / b['images_per_hour']:.2f}×" if ok(a) and ok(b) else "—"

    present = {r["column"] for r in results}
    k = int(next((r.get("workers", 2) for r in results if r["column"] in ("indep", "dask")), 2))
    cols = ["inprocess"] + sorted(c for c in present if c.startswith("baseline")) \
        + [c for c in ("indep", "dask") if c in present]
    head = []
    for c in cols:
        head.append(_label(c, k))
        if c in ("indep", "dask"):
            head.append("× 1 process")
    if "indep" in present and "dask" in present:
        head.append("scheduler overhead")
    lines = ["| model | dtype | " + " | ".join(head) + " | speed-up vs baseline | f64/f32 time | peak MiB (1 process) |",
             "|---|---|" + "---|" * len(head) + "---|---|---|"]
    proj: dict[str, Any] = {}
    for m in models:
        for d in dtypes:
            cur = get(m, d, "inprocess")
            base = next((get(m, d, c) for c in cols if c.startswith("baseline")), None)
            cells = []
            for c in cols:
                cells.append(_fmt(get(m, d, c)))
                if c in ("indep", "dask"):
                    cells.append(ratio(get(m, d, c), cur))
            if "indep" in present and "dask" in present:
                dk, ind = get(m, d, "dask"), get(m, d, "indep")
                cells.append(f"{1.0 - dk['images_per_hour'] / ind['images_per_hour']:+.1%}" if ok(dk) and ok(ind)
                             else "—")
            sp = f"{base['s_per_image'] / cur['s_per_image']:.2f}× (cpu {base['cpu_s_per_image'] / cur['cpu_s_per_image']:.2f}×)" \
                if ok(cur) and ok(base) else "—"
            r32, r64 = get(m, "float32", "inprocess"), get(m, "float64", "inprocess")
            f64 = f"{r64['s_per_image'] / r32['s_per_image']:.2f}" if d == "float64" and ok(r32) and ok(r64) else ""
            peak = f"{cur['peak_mib']:.0f}" if ok(cur) else "—"
            lines.append(f"| {m} | {d} | " + " | ".join(cells) + f" | {sp} | {f64} | {peak} |")
    for col in cols:
        rows = [get(m, "float32", col) for m in models]
        if all(ok(r) for r in rows):
            h = sum(TABLE3_IMAGES / r["images_per_hour"] for r in rows)
            # CPU-time projection: what the wall time would be with the cores to the study alone
            hc = sum(TABLE3_IMAGES * r["cpu_s_per_image"] / 3600.0 for r in rows)
            proj[col] = {"hours": h, "cpu_hours": hc, "models": models, "label": _label(col, k)}
            if col in ("indep", "dask"):
                proj[col]["per_worker_hours"] = h * k
    return "\n".join(lines), proj


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.study", description=__doc__.split("\n")[0])
    ap.add_argument("--images", type=int, default=1,
                    help="timed images per process / per worker, after every process's warm-up image (default 1; "
                         "6 for a steady state)")
    ap.add_argument("--models", nargs="+", default=list(CHECKPOINTS), help=f"from {list(CHECKPOINTS)}")
    ap.add_argument("--dtypes", nargs="+", default=list(DTYPES), help=f"from {list(DTYPES)}")
    ap.add_argument("--workers", type=int, default=2,
                    help="K: workers of the dask column, processes of the independent column (default 2)")
    ap.add_argument("--no-indep", action="store_true", help="skip the independent-processes column")
    ap.add_argument("--no-dask", action="store_true", help="skip the dask column")
    ap.add_argument("--keep-heap", action="store_true",
                    help=f"run every measured process with {' '.join(f'{k}={v}' for k, v in KEEP_HEAP_ENV.items())}")
    ap.add_argument("--heap", choices=("system", "retain"), default=None,
                    help="verify(heap=...) of the code under test (default: verify's own default); a "
                         "--baseline tree without the option runs as it is")
    ap.add_argument("--memory-budget", default=None, help="verify(memory_budget=...) of the code under test (e.g. 4GiB)")
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
        print(f"# {doc.get('command')}\n# {doc.get('uptime_start')}\n# malloc: {doc.get('malloc_env', 'default')}\n{tab}")
        for col, p in proj.items():
            print(f"Table 3, {p.get('label', col)}: {p['hours']:.1f} h at this load; {p['cpu_hours']:.1f} CPU-hours")
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
    print(f"# bench.study: {a.images} image(s) per process / worker, models {a.models}, dtypes {a.dtypes}, "
          f"malloc {'--keep-heap' if a.keep_heap else 'default'}\n# {head}", flush=True)
    doc: dict[str, Any] = {"command": " ".join(["python -m bench.study"] + (argv if argv is not None else sys.argv[1:])),
                           "uptime_start": head, "images": a.images, "device": device, "results": [],
                           "malloc_env": KEEP_HEAP_ENV if a.keep_heap else "default"}
    with tempfile.TemporaryDirectory(prefix="bench_study_base_") as tmp:
        trees = [("inprocess", ROOT, "inprocess")]
        if a.baseline:
            rev = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short", a.baseline], capture_output=True,
                                 text=True, check=False).stdout.strip() or a.baseline
            trees.append((f"baseline {rev}", _export(a.baseline, Path(tmp) / "tree"), "inprocess"))
            doc["baseline"] = rev
        if not a.no_indep:
            trees.append(("indep", ROOT, "indep"))
        if not a.no_dask:
            trees.append(("dask", ROOT, "dask"))
        for m in a.models:
            for d in a.dtypes:
                for col, tree, mode in trees:
                    spec = {"model": m, "dtype": d, "images": a.images, "mode": mode, "workers": a.workers,
                            "device": device, "keep_heap": a.keep_heap, "heap": a.heap,
                            "memory_budget": a.memory_budget}
                    r = (_measure_together if mode == "indep" else _measure)(spec, tree, a.timeout)
                    r["column"] = col
                    doc["results"].append(r)
                    print(f"{m:9s} {d:8s} {_label(col, a.workers):24s} {_fmt(r)}  load {r['load_before']} -> "
                          f"{r.get('load_after')}", flush=True)
                    out.write_text(json.dumps(doc, indent=1))
    doc["uptime_end"] = _uptime()
    tab, proj = table(doc["results"], a.models, a.dtypes)
    doc["table"], doc["table3_projection"] = tab, proj
    out.write_text(json.dumps(doc, indent=1))
    print("\n" + tab)
    for col, p in proj.items():
        extra = f"; {p['per_worker_hours']:.1f} h of one worker" if "per_worker_hours" in p else ""
        print(f"Table 3 ({len(p['models'])} × {TABLE3_IMAGES:,} images, float32), {p['label']}: {p['hours']:.1f} h on this "
              f"machine at this load{extra}; {p['cpu_hours']:.1f} CPU-hours")
    print(f"# {doc['uptime_end']}\n# written {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
