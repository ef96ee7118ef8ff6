"""Issue 10: the verification study on a real Dask cluster (``linop.studies.execute``).

A ``LocalCluster`` of 2 single-threaded worker processes runs the study of a small conv net
(float32 and float64, 12 images) while one worker is killed with SIGKILL mid-run.  The facts
checked: every task finished; every per-image file holds the same arrays, bit for bit, as
the in-process run's (a task is a pure function of model, image and settings, computed
single-threaded on both sides); the summaries are equal; a rerun computes nothing; no
temporary file is left.  Skipped without Dask (``pip install linop-cnn[distributed]``).
"""
from __future__ import annotations

import importlib
import os
import signal
import threading
import time
from pathlib import Path

import pytest
import torch
from kit_files import assert_same_npz  # one bit-for-bit npz comparison
from torch import nn

distributed = pytest.importorskip("distributed")

V = importlib.import_module("linop.studies.verify")
X = importlib.import_module("linop.studies.execute")

torch.set_num_threads(1)  # the in-process reference computes single-threaded, like a worker task

N_IMAGES = 12


def _net() -> nn.Module:
    g = torch.Generator().manual_seed(0)
    C = 4
    m = nn.Sequential(nn.Conv2d(1, C, 3, padding=1), nn.ReLU(), nn.Conv2d(C, C, 3, padding=1), nn.ReLU(),
                      nn.MaxPool2d(2), nn.Conv2d(C, C, 3, padding=1), nn.ReLU(), nn.Flatten(),
                      nn.Linear(C * 6 * 6, 10)).double().eval()
    with torch.no_grad():
        for p in m.parameters():
            p.copy_(torch.randn(p.shape, generator=g, dtype=torch.float64) * 0.5)
    return m


def _images() -> torch.Tensor:
    return torch.randn(N_IMAGES, 1, 12, 12, generator=torch.Generator().manual_seed(1), dtype=torch.float64)


@pytest.fixture(scope="module")
def client():
    cluster = distributed.LocalCluster(n_workers=2, threads_per_worker=1, processes=True,
                                       dashboard_address=":0", silence_logs=50)
    c = distributed.Client(cluster, set_as_default=False)
    yield c
    c.close()
    cluster.close()


@pytest.fixture(scope="module")
def serial_ref(tmp_path_factory):
    out = tmp_path_factory.mktemp("serial")
    rep = V.verify(_net(), _images(), out_dir=out, progress=False, figures=False)
    return out, rep


def _no_temporaries(d: Path) -> None:
    left = [p for p in d.rglob("*") if p.name.startswith(".") or p.name.endswith((".tmp", ".partial", ".lock"))]
    assert not left, left


def test_sigkill_one_worker_mid_run_then_rerun(client, serial_ref, tmp_path):
    ref, ref_rep = serial_ref
    out = tmp_path / "dask"
    pids = list(client.run(os.getpid).values())
    assert len(pids) == 2
    state: dict = {}
    stop = threading.Event()

    def killer():  # SIGKILL one worker once ≥ 2 results were written by the driver
        while not stop.is_set():
            done = len(list((out / "images").rglob("*.npz"))) if (out / "images").exists() else 0
            if done >= 2:
                os.kill(pids[0], signal.SIGKILL)
                state["done_at_kill"] = done
                return
            time.sleep(0.005)

    th = threading.Thread(target=killer, daemon=True)
    th.start()
    try:
        rep = V.verify(_net(), _images(), out_dir=out, progress=False, figures=False, executor=client)
    finally:
        stop.set()
        th.join()
    assert "done_at_kill" in state and state["done_at_kill"] < 2 * N_IMAGES  # the kill landed mid-run
    assert rep.computed == 2 * N_IMAGES and rep.cached == 0  # every task finished
    for d in ("float32", "float64"):
        for i in range(N_IMAGES):
            assert_same_npz(ref / "images" / d / f"{i:05d}.npz", out / "images" / d / f"{i:05d}.npz")
    assert rep.rows == ref_rep.rows
    assert (out / "summary.json").read_bytes() == (ref / "summary.json").read_bytes()
    assert (out / "summary.csv").read_bytes() == (ref / "summary.csv").read_bytes()
    assert_same_npz(ref / "histograms.npz", out / "histograms.npz")
    for ex in (client, None):  # a rerun, distributed or serial, computes nothing
        again = V.verify(_net(), _images(), out_dir=out, progress=False, figures=False, executor=ex)
        assert again.computed == 0 and again.cached == 2 * N_IMAGES and again.rows == ref_rep.rows
    _no_temporaries(out)


def test_scheduler_address(client, serial_ref, tmp_path):
    # an address: verify connects its own client to the running scheduler and closes it after
    addr = client.scheduler.address
    rep = V.verify(_net(), _images()[:2], indices=range(2), dtypes=["float64"], out_dir=tmp_path, progress=False,
                   figures=False, executor=addr)
    assert rep.computed == 2 and rep.executor == f"dask (scheduler {addr})"
    for i in range(2):
        assert_same_npz(serial_ref[0] / "images" / "float64" / f"{i:05d}.npz", tmp_path / "images" / "float64" / f"{i:05d}.npz")
    with pytest.raises(ValueError, match="workers applies to executor='local' only"):
        V.verify(_net(), _images()[:1], out_dir=tmp_path, executor=addr, workers=2)


def test_worker_that_dies_repeatedly_is_named_and_finished_results_kept(client):
    # allowed-failures 0 on this scheduler: the first death of the task's worker is final
    old = client.run_on_scheduler(lambda dask_scheduler: dask_scheduler.allowed_failures)
    client.run_on_scheduler(lambda dask_scheduler: setattr(dask_scheduler, "allowed_failures", 0))
    got = {}

    def die_on_image_3(shared, i):  # a local function: cloudpickle sends it to the workers by value
        if i == 3:
            os.kill(os.getpid(), signal.SIGKILL)
        return i * 10

    try:
        tasks = [X.Task(key=f"linop-test-die-{i}-{time.time_ns()}", label=f"image {i} (float32)", args=(i,))
                 for i in range(6)]
        ex = X.make_executor(client)
        with pytest.raises(X.WorkerLost, match=r"died repeatedly") as err:
            ex.run(die_on_image_3, 0, f"linop-test-shared-{time.time_ns()}", tasks,
                   lambda t, r: got.__setitem__(t.args[0], r))
    finally:
        client.run_on_scheduler(lambda dask_scheduler, v=old: setattr(dask_scheduler, "allowed_failures", v))
    # the error names image 3 and any task that shared its worker's queue when it died (with
    # allowed-failures 0 those fail too); every other result reached the driver
    named = {i for i in range(6) if f"image {i} (float32)" in str(err.value)}
    assert 3 in named and 3 not in got
    assert got == {i: 10 * i for i in range(6) if i not in named} and len(got) + len(named) == 6
    client.wait_for_workers(2, timeout=60)


def test_unreachable_scheduler_is_one_clear_error_fast(tmp_path, monkeypatch):
    monkeypatch.setattr(X, "CONNECT_TIMEOUT", 1.0)
    t0 = time.monotonic()
    with pytest.raises(ConnectionError, match=r"scheduler 'tcp://127.0.0.1:9': no Dask scheduler reachable"):
        V.verify(_net(), _images()[:1], out_dir=tmp_path / "o", progress=False, executor="tcp://127.0.0.1:9")
    assert time.monotonic() - t0 < 10
    assert not (tmp_path / "o").exists()  # nothing written


def test_cli_scheduler_errors(tmp_path, capsys, monkeypatch):
    from linop.cli import main

    monkeypatch.setattr(X, "CONNECT_TIMEOUT", 1.0)
    out = tmp_path / "o"
    rc = main(["verify", "--model", "vgg7", "--data", "digits32", "--n-images", "1", "--out", str(out),
               "--scheduler", "tcp://127.0.0.1:9", "--no-progress"])
    err = capsys.readouterr().err
    assert rc == 2 and err.count("\n") == 1 and "no Dask scheduler reachable" in err and "Traceback" not in err
    assert not (out / "images").exists() or not any((out / "images").rglob("*.npz"))
    rc = main(["verify", "--scheduler", "nowhere", "--out", str(out)])
    assert rc == 2 and "--scheduler 'nowhere'" in capsys.readouterr().err
    rc = main(["verify", "--workers", "2", "--out", str(out)])
    assert rc == 2 and "--workers needs --scheduler local" in capsys.readouterr().err


def test_cli_scheduler_without_dask_says_how_to_install(tmp_path, capsys, monkeypatch):
    import builtins

    from linop.cli import main

    real = builtins.__import__

    def no_dask(name, *a, **k):
        if name.split(".")[0] in ("distributed", "dask"):
            raise ImportError(f"No module named {name!r}")
        return real(name, *a, **k)

    monkeypatch.setattr(builtins, "__import__", no_dask)
    rc = main(["verify", "--scheduler", "local", "--out", str(tmp_path / "o")])
    err = capsys.readouterr().err
    assert rc == 2 and "install linop-cnn[distributed]" in err and err.count("\n") == 1
    with pytest.raises(ImportError, match=r"linop-cnn\[distributed\]"):
        X.make_executor("local", 2)


# ------------------------------------------------------------------------------------ posttrain
def test_posttrain_runs_on_the_cluster_equal_the_serial_runs(client, tmp_path):
    """FR-PT / BP-PT on 2 workers: one task per (pair, method, run), a* computed once in the
    driver and shipped; the records (accuracy and loss histories, every epoch) equal the
    in-process runs' exactly (same seeds, one torch thread on both sides, deterministic
    algorithms), and a rerun on the cluster computes nothing."""
    from models.baselines import KConvMFC

    from linop.studies.posttrain import posttrain_study

    torch.manual_seed(0)
    model = KConvMFC((1, 8, 8), (3, 4), (), 10, "tanh", kernel_size=3)
    g = torch.Generator().manual_seed(0)
    x = torch.rand(160, 1, 8, 8, generator=g)
    y = torch.randint(0, 10, (160,), generator=g)
    data = {"x_train": x[:96], "y_train": y[:96], "x_test": x[96:], "y_test": y[96:]}
    kw = dict(pairs=[(1, 2), (2, 3)], alpha=0.5, epochs=2, lr=1e-2, runs=2, batch_size=32, seed=3,
              progress=False, print_table=False)
    ser = posttrain_study(model, data, out_dir=tmp_path / "serial", **kw)
    seen: list[dict] = []
    par = posttrain_study(model, data, out_dir=tmp_path / "dask", executor=client, on_run_end=seen.append, **kw)
    assert len(seen) == len(ser.records) == 2 * 2 * 2  # pairs x methods x runs, every one on the cluster
    strip = ("mem_mb", "mem_terms_bytes", "time_s", "seconds", "wall_s")
    for a, b in zip(ser.records, par.records):
        assert {k: v for k, v in a.items() if k not in strip and "time" not in k} == \
               {k: v for k, v in b.items() if k not in strip and "time" not in k}, a["key"]
    assert ser.rows == par.rows
    again: list[dict] = []
    posttrain_study(model, data, out_dir=tmp_path / "dask", executor=client, on_run_end=again.append, **kw)
    assert again == []
    _no_temporaries(tmp_path / "dask")


def test_posttrain_cli_scheduler_errors_are_one_line(tmp_path, capsys):
    """`linop posttrain --scheduler/--workers/--device`: a bad choice is refused before any work,
    an unreachable scheduler after the driver's a* (nothing trained, no records): one line, exit 2."""
    from linop.cli import main

    out = tmp_path / "pt"
    base = ["posttrain", "--data", "digits", "--model", "conv2_fc1", "--pairs", "2:3", "--runs", "1",
            "--epochs", "1", "--no-progress", "--out", str(out)]
    rc = main(base + ["--scheduler", "tcp://127.0.0.1:9"])
    err = capsys.readouterr().err
    assert rc == 2 and err.count("\n") == 1 and "--scheduler" in err and "Traceback" not in err, err
    assert not (out / "results.jsonl").exists() or (out / "results.jsonl").read_text() == ""
    for extra, words in ((["--workers", "2"], "--workers needs --scheduler local"),
                         (["--scheduler", "nowhere"], "--scheduler 'nowhere'"),
                         (["--device", "tpu"], "--device must be")):
        rc = main(base + extra)
        err = capsys.readouterr().err
        assert rc == 2 and err.count("\n") == 1 and words in err, (extra, err)
