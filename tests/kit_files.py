"""Test kit: bit-for-bit comparison of result files (not a test module)."""
from __future__ import annotations

from pathlib import Path

import numpy as np

__all__ = ["npz_payload", "assert_same_npz"]


def npz_payload(path: Path) -> dict[str, np.ndarray]:
    with np.load(path, allow_pickle=False) as z:
        return {k: z[k] for k in z.files}


def assert_same_npz(a: Path, b: Path) -> None:
    pa, pb = npz_payload(a), npz_payload(b)
    assert sorted(pa) == sorted(pb), a
    for k in pa:
        assert pa[k].dtype == pb[k].dtype and np.array_equal(pa[k], pb[k]), (a, k)
