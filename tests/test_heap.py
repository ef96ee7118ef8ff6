"""The allocator policy of study processes (:mod:`linop.studies.heap`).

What ``heap="retain"`` does is an allocator fact, checked in a fresh subprocess (so this test
process keeps its own allocator): after ``apply("retain")`` a 64 MiB tensor is carved from the
heap, not given an ``mmap`` of its own — glibc's ``mallinfo2().hblkhd`` (bytes in mmapped
blocks) grows by less than 1 MiB while it is alive, against ≥ 64 MiB with the C library's
defaults (whose mmapped blocks are unmapped on ``free`` and fault in, zeroed, next time: the
system time the policy saves — a benchmark figure, ``bench.study --heap``, not a unit test).
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from linop.studies import heap

ROOT = Path(__file__).resolve().parents[1]

_PROBE = r'''
import ctypes, json, sys
import torch
from linop.studies import heap

class MallInfo2(ctypes.Structure):
    _fields_ = [(n, ctypes.c_size_t) for n in ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks",
                                               "fsmblks", "uordblks", "fordblks", "keepcost")]

libc = ctypes.CDLL("libc.so.6")
libc.mallinfo2.restype = MallInfo2
ok = heap.apply(sys.argv[1])
h0 = libc.mallinfo2().hblkhd
t = torch.ones(16 * 2**20, dtype=torch.float32)  # 64 MiB alive
grew = libc.mallinfo2().hblkhd - h0
from linop.linearize import sweep
print(json.dumps({"ok": ok, "mmapped": grew, "trim": sweep.TRIM_WHEN_TIGHT}))
'''


def _probe(mode: str) -> dict:
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    for k in heap.RETAIN_ENV:
        env.pop(k, None)
    out = subprocess.run([sys.executable, "-c", _PROBE, mode], env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.mark.skipif(heap._glibc() is None, reason="the retain policy is glibc's mallopt")
def test_retain_serves_large_blocks_from_the_heap() -> None:
    kept, fresh = _probe("retain"), _probe("system")
    assert kept["ok"] is True and fresh["ok"] is False
    assert kept["mmapped"] < 2**20, kept  # carved from the (retained) heap
    assert fresh["mmapped"] >= 64 * 2**20, fresh  # a block of its own, unmapped on free
    # a budget-bound sweep trims the heap after freed states, except in a retaining process
    assert kept["trim"] is False and fresh["trim"] is True


def test_modes_and_worker_environment() -> None:
    assert heap.check_heap("retain") == "retain" and heap.check_heap("system") == "system"
    with pytest.raises(ValueError, match="heap must be one of"):
        heap.check_heap("retian")
    assert heap.worker_environ("retain") == heap.RETAIN_ENV
    assert heap.worker_environ("system") == {k: None for k in heap.RETAIN_ENV}  # unset in the workers


def test_verify_rejects_a_bad_heap_before_writing(tmp_path: Path) -> None:
    from torch import nn

    from linop.studies.verify import verify

    m = nn.Sequential(nn.Conv2d(1, 2, 3), nn.ReLU(), nn.Flatten(), nn.Linear(8, 3)).eval()
    with pytest.raises(ValueError, match="heap must be one of"):
        verify(m, torch.rand(1, 1, 4, 4), out_dir=tmp_path / "out", heap="bogus", progress=False)
    assert not (tmp_path / "out").exists()


def _worker_malloc_env() -> dict:
    return {k: os.environ.get(k) for k in heap.RETAIN_ENV}


def test_local_cluster_workers_get_the_retain_environment() -> None:
    pytest.importorskip("distributed")
    from linop.studies.execute import DaskExecutor

    before = {k: os.environ.get(k) for k in heap.RETAIN_ENV}
    ex = DaskExecutor.local(1, environ=heap.worker_environ("retain"))
    try:
        got = list(ex.start().run(_worker_malloc_env).values())
    finally:
        ex.close()
    assert got == [heap.RETAIN_ENV]
    assert {k: os.environ.get(k) for k in heap.RETAIN_ENV} == before  # the driver's own values are back
