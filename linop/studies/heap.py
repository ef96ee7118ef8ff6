"""The allocator policy of a verification study's processes: keep freed tangent batches.

A verification sweep allocates and frees tangent batches of tens to hundreds of MiB node after
node, image after image.  glibc serves every block above its mmap threshold (≤ 32 MiB) with a
fresh ``mmap`` and unmaps it on ``free``, so each batch's pages fault in and are zeroed by the
kernel again: measured on the shipped ResNet20, float32, one thread, ~1.5 M minor page faults
and ~3 s of system time per image (of ~10 s).  ``"retain"`` makes the process keep its heap
instead — one arena, no mmap for large blocks, no trimming — so the next image reuses the pages
(system time ~0.1 s, 1.4–1.5× less CPU per image).  The price: the process's resident size
stays at its high-water mark plus fragmentation (measured +0.7 GiB on ResNet20 float32; in a
synthetic loop of one 64 MiB tensor, torch's 64-byte aligned blocks grew the heap to 9× before
it settled), which ``memory_budget`` — a bound on live tensors — does not cover.  Hence an
option, not the default.

* ``retain`` (``verify(..., heap="retain")``, ``linop verify --heap retain``): :func:`apply` calls glibc's
  ``mallopt`` in the running process (``M_ARENA_MAX = 1``, ``M_MMAP_MAX = 0``,
  ``M_TRIM_THRESHOLD`` = 2 GiB − 1), turns off the ``malloc_trim`` a budget-bound sweep does
  after each freed state (:func:`linop.linearize.sweep.trim_when_tight`), and
  :data:`RETAIN_ENV` is the environment of worker processes linop starts (a Dask
  ``LocalCluster``), the same settings read at start-up.
* ``system`` (default): the C library's defaults (what a process gets without linop).

Elsewhere than glibc (macOS, Windows, musl) ``retain`` is a no-op (:func:`apply` returns False).
"""
from __future__ import annotations

import ctypes
import ctypes.util
import sys
from typing import Any

__all__ = ["HEAP_MODES", "RETAIN_ENV", "apply", "check_heap", "worker_environ"]

HEAP_MODES = ("retain", "system")

#: glibc's start-up tunables with the same effect as :func:`apply` (for spawned workers)
RETAIN_ENV = {"MALLOC_ARENA_MAX": "1", "MALLOC_MMAP_MAX_": "0", "MALLOC_TRIM_THRESHOLD_": str(2**31 - 1)}

# mallopt parameters (glibc <malloc.h>)
_M_TRIM_THRESHOLD, _M_MMAP_MAX, _M_ARENA_MAX = -1, -4, -8

_applied: str | None = None


def check_heap(mode: Any) -> str:
    """``mode`` if it is one of :data:`HEAP_MODES`, else ``ValueError`` naming the option."""
    if mode not in HEAP_MODES:
        raise ValueError(f"heap must be one of {HEAP_MODES}, got {mode!r}")
    return mode


def _glibc() -> Any:
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        libc.gnu_get_libc_version  # glibc only (musl has mallopt as a stub)
        return libc
    except (OSError, AttributeError):
        return None


def apply(mode: str) -> bool:
    """Put this process's allocator in ``mode`` (once per process; later calls are no-ops).

    Returns True when glibc took the ``retain`` settings, False for ``system`` or where the C
    library is not glibc."""
    global _applied
    check_heap(mode)
    if mode == "system":
        return False
    if _applied == "retain":
        return True
    libc = _glibc()
    if libc is None:
        return False
    ok = all(libc.mallopt(p, v) == 1 for p, v in ((_M_ARENA_MAX, 1), (_M_MMAP_MAX, 0),
                                                  (_M_TRIM_THRESHOLD, 2**31 - 1)))
    if ok:
        _applied = "retain"
        from ..linearize import sweep as _sweep

        _sweep.trim_when_tight(False)  # a budget-bound sweep would hand the pages back again
    return ok


def worker_environ(mode: str) -> dict[str, Any]:
    """Environment of worker processes linop starts for ``mode`` (``None`` unsets a variable)."""
    check_heap(mode)
    return dict(RETAIN_ENV) if mode == "retain" else {k: None for k in RETAIN_ENV}
