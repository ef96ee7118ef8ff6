"""Test kit: random conv geometries for the hypothesis tests of strided / padded convolutions.

Not a test module: a strategy that several test modules draw from, so no test module imports
another.
"""
from __future__ import annotations

import numpy as np
import torch
from hypothesis import assume
from hypothesis import strategies as st

from linop.operators.conv import Conv2d

__all__ = ["conv_geometries", "conv_from", "rows", "check_direct_ccp"]


@st.composite
def conv_geometries(draw) -> dict:
    """Random conv geometry: channels (MDP- and CCP-shaped), groups 1–2, kernel 1–3, stride 1–3,
    dilation 1–2, padding int / pair / 4-sided / 'same' (stride 1 only, as torch); H, W 2–10
    (multiples of the stride or not); a weight seed."""
    groups = draw(st.integers(1, 2))
    cin, cout = groups * draw(st.integers(1, 3)), groups * draw(st.integers(1, 3))
    k = (draw(st.integers(1, 3)), draw(st.integers(1, 3)))
    s = (draw(st.integers(1, 3)), draw(st.integers(1, 3)))
    d = (draw(st.integers(1, 2)), draw(st.integers(1, 2)))
    H, W = draw(st.integers(2, 10)), draw(st.integers(2, 10))
    kind = draw(st.sampled_from(["int", "pair", "four", "same"] if s == (1, 1) else ["int", "pair", "four"]))
    if kind == "int":
        pad = draw(st.integers(0, 2))
    elif kind == "pair":
        pad = (draw(st.integers(0, 2)), draw(st.integers(0, 2)))
    elif kind == "four":
        pad = tuple(draw(st.integers(0, 2)) for _ in range(4))
    else:
        pad = "same"
    return dict(cin=cin, cout=cout, k=k, H=H, W=W, stride=s, dilation=d, padding=pad, groups=groups,
                seed=draw(st.integers(0, 2**16)))


def conv_from(c: dict) -> tuple[torch.Tensor, Conv2d]:
    """``(w, Conv2d)`` of a drawn geometry (float64 weights from its seed); rejects the example
    (``assume``) when the dilated kernel is larger than the padded input: not a conv."""
    w = torch.tensor(np.random.default_rng(c["seed"]).standard_normal((c["cout"], c["cin"] // c["groups"]) + c["k"]))
    try:
        op = Conv2d(w, (c["cin"], c["H"], c["W"]), stride=c["stride"], dilation=c["dilation"],
                    padding=c["padding"], groups=c["groups"])
    except ValueError:
        assume(False)
    return w, op


def rows(x, n: int) -> np.ndarray:
    """``x`` (a tensor or array of ``n`` samples) as an ``(n, -1)`` numpy array of its rows."""
    return np.asarray(torch.as_tensor(x)).reshape(n, -1)


def check_direct_ccp(res, z_star, b, pinv: np.ndarray, n: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Assert that a CCP solve ``res`` took the direct form and returned ``W⁺ t`` (``t = z* − b``, the
    unique least-squares point where W has full column rank) within 1e-12 of ``‖a*‖`` (the callers'
    docstrings say why); returns ``(a, ref, t)`` as ``(n, -1)`` rows."""
    t = rows(z_star - b[:, None, None], n)
    ref = t @ pinv.T
    assert res.info["form"].startswith("direct")
    a = rows(res.a, n)
    assert np.max(np.linalg.norm(a - ref, axis=1) / np.linalg.norm(ref, axis=1)) <= 1e-12
    return a, ref, t
