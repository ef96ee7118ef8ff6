"""``--device`` of every benchmark and ``bench/gpu_check.sh`` on a machine without CUDA (issue 10).

A CUDA device where CUDA is missing, or a device kind the library does not support, is bad
input: each benchmark must refuse it up front with exactly one line on stderr naming
``--device`` and exit 2, before any work or any file is written.  ``bench/gpu_check.sh`` must
say there is no GPU and exit 0 without writing anything.
"""
from __future__ import annotations

import importlib
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
BENCHMARKS = ("study", "backmap", "reconstruct", "reconstruct_layers", "reconstruct_padded", "operators")

pytestmark = pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a machine without CUDA")


def _run(args: list[str], cwd: Path, timeout: float = 60) -> subprocess.CompletedProcess:
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    return subprocess.run(args, cwd=str(cwd), env=env, capture_output=True, text=True, timeout=timeout, check=False)


@pytest.mark.parametrize("device", ["cuda", "cuda:1", "tpu"])
@pytest.mark.parametrize("name", BENCHMARKS)
def test_bench_device_refused(name: str, device: str, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    """``main(argv)``: one line naming --device on stderr, exit status 2, nothing on stdout and
    no output file."""
    mod = importlib.import_module(f"bench.{name}")
    out = tmp_path / "out.json"
    rc = mod.main(["--device", device, "--out", str(out)])
    cap = capsys.readouterr()
    lines = cap.err.strip().splitlines()
    assert rc == 2, (rc, cap.err)
    assert len(lines) == 1, cap.err
    assert "--device" in lines[0] and lines[0].startswith(f"bench.{name}: error:"), lines[0]
    assert cap.out == ""
    assert not out.exists()


def test_reconstruct_models_route_validates_device(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    """``bench.reconstruct --models ...`` hands over to bench.reconstruct_layers, which refuses too."""
    from bench import reconstruct

    out = tmp_path / "out.json"
    rc = reconstruct.main(["--models", "vgg7", "--device", "cuda", "--out", str(out)])
    err = capsys.readouterr().err
    assert rc == 2 and len(err.strip().splitlines()) == 1 and "--device" in err, err
    assert not out.exists()


@pytest.mark.parametrize("name", ["backmap", "reconstruct_padded"])
def test_bench_device_exit_status(name: str, tmp_path: Path) -> None:
    """``python -m bench.X --device cuda`` from the repo root: the process itself exits 2."""
    out = tmp_path / "out.json"
    p = _run([sys.executable, "-m", f"bench.{name}", "--device", "cuda", "--out", str(out)], ROOT)
    assert p.returncode == 2, (p.returncode, p.stderr)
    assert len(p.stderr.strip().splitlines()) == 1 and "--device" in p.stderr, p.stderr
    assert not out.exists()


@pytest.mark.skipif(shutil.which("nvidia-smi") is not None, reason="a GPU driver is present: the script would run")
def test_gpu_check_without_gpu(tmp_path: Path) -> None:
    """Run from another directory: it finds the repo from $0, says there is no GPU, exits 0 and
    writes nothing under $OUT."""
    res = tmp_path / "gpu_check"
    env = dict(os.environ, OUT=str(res))
    p = subprocess.run(["bash", str(ROOT / "bench" / "gpu_check.sh")], cwd=str(tmp_path), env=env,
                       capture_output=True, text=True, timeout=60, check=False)
    assert p.returncode == 0, p.stdout + p.stderr
    assert "no CUDA GPU" in p.stdout
    assert "torch.cuda.is_available() = False" in p.stdout
    assert not res.exists()


def test_gpu_check_syntax() -> None:
    """``bash -n``: the script parses (it cannot be run to the end without a GPU)."""
    p = subprocess.run(["bash", "-n", str(ROOT / "bench" / "gpu_check.sh")], capture_output=True, text=True,
                       timeout=30, check=False)
    assert p.returncode == 0, p.stderr
