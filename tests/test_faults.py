"""Issue 12, step 2: fault tests for the studies' output directories (verify, posttrain,
reconstruct).

A study's output directory must survive what happens to long runs: a SIGKILL at any point, a
rerun, damaged / swapped / foreign cache files, two runs on one directory, a directory it may
not write.  After a rerun the results are bit-identical to an uninterrupted run's, no record is
duplicated, no temporary file is left, and every damaged file was detected and recomputed
(never trusted: a trusted damaged file would differ from the reference).

The kill points are drawn from ``random.Random(LINOP_FAULT_SEED)`` (default 0; CI is
deterministic, ``LINOP_FAULT_SEED=<n>`` explores others).  The runs are tiny (a 2-conv ReLU
network on 8x8 images; the posttrain test's stand-in reconstructor), ~60 s on 2 cores in all.
"""
from __future__ import annotations

import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from linop.cli import main
from linop.studies import store

ROOT = Path(__file__).resolve().parents[1]
RNG = random.Random(int(os.environ.get("LINOP_FAULT_SEED", "0")))

VERIFY = """
import sys, torch
from torch import nn
import linop
torch.manual_seed(0); torch.set_num_threads(1)
m = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.Conv2d(4, 4, 3, padding=1), nn.ReLU(),
                  nn.Flatten(), nn.Linear(4 * 8 * 8, 10)).eval()
x = torch.rand(int(sys.argv[2]), 1, 8, 8, generator=torch.Generator().manual_seed(1))
linop.verify(m, x, dtypes=["float32", "float64"], out_dir=sys.argv[1], progress=False, figures=False)
"""

POSTTRAIN = """
import sys, torch
sys.path.insert(0, sys.argv[2])
from kit_posttrain import CountingReconstructor, tiny_data, tiny_model
from linop.studies.posttrain import posttrain_study
torch.set_num_threads(1)
posttrain_study(tiny_model(), tiny_data(), pairs=[(1, 3), (2, 3)], epochs=1, runs=3, batch_size=32,
                progress=False, print_table=False, reconstructor=CountingReconstructor(), out_dir=sys.argv[1],
                seed=0)
"""

N_IMAGES = 30  # x 2 dtypes = 60 per-image files


def _cmd(script: str, *args: str) -> list[str]:
    return [sys.executable, "-c", script, *args]


def _env() -> dict:
    return {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}


def _run(cmd: list[str]) -> None:
    r = subprocess.run(cmd, cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]


def _kill_after(cmd: list[str], ready, timeout: float = 60.0) -> bool:
    """Start ``cmd``; SIGKILL it as soon as ``ready()`` holds. True when it was killed mid-run."""
    p = subprocess.Popen(cmd, cwd=ROOT, env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    t0 = time.monotonic()
    try:
        while p.poll() is None and time.monotonic() - t0 < timeout:
            if ready():
                p.send_signal(signal.SIGKILL)
                p.wait()
                return True
            time.sleep(0.005)
        return False
    finally:
        if p.poll() is None:
            p.kill()
            p.wait()


def _files(d: Path) -> dict[str, Path]:
    return {p.relative_to(d).as_posix(): p for p in sorted(d.rglob("*")) if p.is_file()}


def _no_temporaries(d: Path) -> None:
    left = [k for k in _files(d) if Path(k).name.startswith(".") or k.endswith((".tmp", ".partial", ".lock"))]
    assert not left, f"temporary files left: {left}"


def _same_npz(a: Path, b: Path) -> None:
    with np.load(a, allow_pickle=False) as za, np.load(b, allow_pickle=False) as zb:
        assert sorted(za.files) == sorted(zb.files), a
        for k in za.files:
            assert np.array_equal(za[k], zb[k]) and za[k].dtype == zb[k].dtype, (a, k)


def _same_verify(ref: Path, out: Path) -> None:
    """Every file of an uninterrupted verify run, bit-identical (npz: every array)."""
    fr, fo = _files(ref), _files(out)
    assert fr.keys() == fo.keys(), set(fr) ^ set(fo)
    for k in fr:
        if k.endswith(".npz"):
            _same_npz(fr[k], fo[k])
        else:
            assert fr[k].read_bytes() == fo[k].read_bytes(), k


@pytest.fixture(scope="module")
def verify_ref(tmp_path_factory) -> Path:
    ref = tmp_path_factory.mktemp("verify") / "ref"
    _run(_cmd(VERIFY, str(ref), str(N_IMAGES)))
    return ref


# ------------------------------------------------------------------------------------ verify
def test_verify_sigkill_then_rerun_is_bit_identical(verify_ref, tmp_path):
    out = tmp_path / "out"
    images = out / "images"
    for _ in range(2):  # killed twice at random points, then finished
        have = len(list(images.rglob("*.npz"))) if images.exists() else 0
        k = RNG.randint(have + 1, have + 20)
        _kill_after(_cmd(VERIFY, str(out), str(N_IMAGES)),
                    lambda: images.exists() and len(list(images.rglob("*.npz"))) >= k)
    assert len(list(images.rglob("*.npz"))) < 2 * N_IMAGES  # the kills did land mid-run
    _run(_cmd(VERIFY, str(out), str(N_IMAGES)))
    _same_verify(verify_ref, out)
    _no_temporaries(out)


def _truncate(p: Path) -> None:
    p.write_bytes(p.read_bytes()[: p.stat().st_size // 2])


def test_verify_damaged_swapped_foreign_files_are_recomputed(verify_ref, tmp_path):
    out = tmp_path / "out"
    shutil.copytree(verify_ref, out)
    f64, f32 = out / "images" / "float64", out / "images" / "float32"
    _truncate(f64 / "00003.npz")
    a, b = (f64 / "00005.npz").read_bytes(), (f64 / "00006.npz").read_bytes()
    (f64 / "00005.npz").write_bytes(b)  # swapped: each a valid file of another image
    (f64 / "00006.npz").write_bytes(a)
    shutil.copy(f32 / "00007.npz", f64 / "00007.npz")  # foreign: the other dtype's result
    (f32 / "00001.npz").write_bytes(b"")
    (f32 / "00002.npz").write_bytes(os.urandom(2000))
    (out / "summary.json").write_text("{not json")
    (out / "index.json").write_bytes(b"\0" * 10)
    _run(_cmd(VERIFY, str(out), str(N_IMAGES)))
    _same_verify(verify_ref, out)
    _no_temporaries(out)


def test_two_verify_runs_on_one_directory(verify_ref, tmp_path):
    out = tmp_path / "out"
    procs = [subprocess.Popen(_cmd(VERIFY, str(out), str(N_IMAGES)), cwd=ROOT, env=_env(),
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True) for _ in range(2)]
    for p in procs:
        _, err = p.communicate(timeout=120)
        assert p.returncode == 0, err[-2000:]
    _same_verify(verify_ref, out)
    _no_temporaries(out)


# ------------------------------------------------------------------------------------ posttrain
def _same_payload(a, b) -> None:
    assert a is not None and b is not None  # both checksums verified by load_pt
    if isinstance(a, torch.Tensor):
        assert torch.equal(a, b) and a.dtype == b.dtype
    elif isinstance(a, dict):
        assert a.keys() == b.keys()
        for k in a:
            _same_payload(a[k], b[k])
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b)
        for u, v in zip(a, b):
            _same_payload(u, v)
    else:
        assert a == b


_VOLATILE = {"seconds"}  # wall-clock timings: the only fields two identical runs may differ in


def _records(d: Path) -> list[dict]:
    return [{k: v for k, v in json.loads(line).items() if k not in _VOLATILE}
            for line in (d / "results.jsonl").read_text().splitlines() if line.strip()]


def test_posttrain_sigkill_then_rerun_has_every_record_once(tmp_path):
    tests = str(ROOT / "tests")
    ref, out = tmp_path / "ref", tmp_path / "out"
    _run(_cmd(POSTTRAIN, str(ref), tests))
    want = _records(ref)
    results = out / "results.jsonl"

    def n_records() -> int:
        try:
            return sum(1 for line in results.read_text().splitlines() if line.strip())
        except FileNotFoundError:
            return 0

    k = RNG.randint(1, len(want) - 1)
    _kill_after(_cmd(POSTTRAIN, str(out), tests), lambda: n_records() >= k)
    assert 0 < n_records() < len(want)  # killed mid-run, after writing something
    _run(_cmd(POSTTRAIN, str(out), tests))
    got = _records(out)
    keys = [(r["key"], r["config_hash"]) for r in got]
    assert len(keys) == len(set(keys)), "duplicate records"
    assert sorted(got, key=lambda r: r["key"]) == sorted(want, key=lambda r: r["key"])
    # the rest of the directory: the same files, the cached a* bit-identical
    assert _files(ref).keys() == _files(out).keys()
    for name, p in _files(ref).items():
        if name.startswith("cache/"):
            _same_payload(store.load_pt(p), store.load_pt(out / name))
    _no_temporaries(out)


# ------------------------------------------------------------------------------------ reconstruct
def _drop_timings(obj):
    if isinstance(obj, dict):
        return {k: _drop_timings(v) for k, v in obj.items() if k not in _VOLATILE}
    if isinstance(obj, list):
        return [_drop_timings(v) for v in obj]
    return obj


def test_reconstruct_sigkill_then_rerun_is_identical(tiny_checkpoint, tmp_path):
    def cmd(out: Path) -> list[str]:
        return [sys.executable, "-m", "linop", "reconstruct", "--checkpoint", str(tiny_checkpoint), "--n", "3",
                "--out", str(out)]

    ref, out = tmp_path / "ref", tmp_path / "out"
    _run(cmd(ref))
    k = RNG.randint(1, len(_files(ref)) - 1)
    _kill_after(cmd(out), lambda: out.exists() and len(_files(out)) >= k)
    assert 0 < len(_files(out)) < len(_files(ref))  # killed after writing something, before the end
    _run(cmd(out))
    fr, fo = _files(ref), _files(out)
    assert fr.keys() == fo.keys()
    for name in fr:
        if name.endswith(".json"):
            a, b = (json.loads(p.read_text()) for p in (fr[name], fo[name]))
            assert _drop_timings(a) == _drop_timings(b), name
        else:
            assert fr[name].read_bytes() == fo[name].read_bytes(), name
        # results are ordinary files: the mode open() gives (mkstemp's 0600 used to stay)
        umask = os.umask(0o022)
        os.umask(umask)
        assert fo[name].stat().st_mode & 0o777 == 0o666 & ~umask, (name, oct(fo[name].stat().st_mode))
    _no_temporaries(out)


# ------------------------------------------------------------------------------------ read-only
@pytest.fixture(scope="module")
def tiny_checkpoint(tmp_path_factory) -> Path:
    train = pytest.importorskip("models.train")
    torch.manual_seed(0)
    kw = {"in_shape": [1, 8, 8], "num_classes": 10, "activation": "relu"}
    meta = {"model": "conv2_fc1", "kwargs": kw, "data": "digits", "input_shape": [1, 8, 8], "normalize": "none"}
    path = tmp_path_factory.mktemp("ck") / "tiny.pt"
    train.save_checkpoint(path, train.build_model("conv2_fc1", **kw).eval(), meta)
    return path


def _cli_one_line(argv: list[str], capsys) -> tuple[int, str]:
    capsys.readouterr()
    rc = main(argv)
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "Traceback" not in err, err
    return rc, err


@pytest.mark.skipif(hasattr(os, "geteuid") and os.geteuid() == 0,
                    reason="root ignores permission bits (the simulated test below covers it)")
@pytest.mark.parametrize("cmd", ["verify", "reconstruct"])
def test_read_only_directory_is_one_line_exit_2(cmd, tiny_checkpoint, tmp_path, capsys):
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o555)
    try:
        extra = ["--n-images", "1", "--dtypes", "float64", "--no-progress"] if cmd == "verify" else ["--n", "1"]
        rc, err = _cli_one_line([cmd, "--checkpoint", str(tiny_checkpoint), *extra, "--out", str(ro / "o")], capsys)
        assert rc == 2 and err.startswith(f"linop {cmd}: error: ") and str(ro) in err, err
    finally:
        ro.chmod(0o755)


@pytest.mark.parametrize("cmd", ["verify", "reconstruct"])
def test_unwritable_directory_simulated_is_one_line_exit_2(cmd, tiny_checkpoint, tmp_path, capsys, monkeypatch):
    """What a read-only directory does to a write (EACCES from the kernel), for any user."""
    import errno
    import tempfile

    real = tempfile.mkstemp

    def refuse(*a, dir=None, **k):
        if dir is not None and str(tmp_path) in str(dir):
            raise PermissionError(errno.EACCES, "Permission denied", str(dir))
        return real(*a, dir=dir, **k)

    monkeypatch.setattr(tempfile, "mkstemp", refuse)
    extra = ["--n-images", "1", "--dtypes", "float64", "--no-progress"] if cmd == "verify" else ["--n", "1"]
    out = tmp_path / "o"
    rc, err = _cli_one_line([cmd, "--checkpoint", str(tiny_checkpoint), *extra, "--out", str(out)], capsys)
    assert rc == 2 and err == f"linop {cmd}: error: {out}: Permission denied" or \
        (rc == 2 and "Permission denied" in err and str(tmp_path) in err), (rc, err)
    _no_temporaries(tmp_path)
