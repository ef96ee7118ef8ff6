"""The unit-major copy of a channels-last tangent batch (``LayerJacobian.image``'s transposed copy).

``unit_major_copy`` is an evaluation strategy of ``buf.copy_(Tcl.permute(2, 1, 0))`` (blocks of
tangents through torch's blocked 2-D transposed copy): it moves values, so it must equal the
direct copy bit for bit, for every block split (fewer tangents than a block, an exact multiple,
a ragged last block), both dtypes, and whatever the buffer held before.
"""
from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from linop.linearize import layer_jacobian as lj


@settings(max_examples=40, deadline=None)
@given(n=st.integers(1, 3 * lj.UNIT_MAJOR_BLOCK + 5), S=st.integers(1, 40), G=st.integers(1, 9),
       f64=st.booleans(), seed=st.integers(0, 2**31 - 1))
def test_unit_major_copy_is_the_permuted_copy(n: int, S: int, G: int, f64: bool, seed: int) -> None:
    dt = torch.float64 if f64 else torch.float32
    T = torch.randn(n, S, G, generator=torch.Generator().manual_seed(seed), dtype=dt)
    want = T.permute(2, 1, 0).contiguous()
    buf = torch.full((G * S * n + 7,), float("nan"), dtype=dt)  # stale contents must not leak
    got = lj.unit_major_copy(buf[: G * S * n], T)
    assert got.shape == (G, S, n) and torch.equal(got, want)
    assert torch.isnan(buf[G * S * n:]).all()  # nothing written past the view


def test_layer_jacobian_image_unchanged_by_the_strategy(monkeypatch) -> None:
    # the dense RM2 image parts of a small channels-last sweep, with the blocked copy and with the
    # direct permuted copy: the same bits (the block size forced below the tangent count)
    from torch import nn

    from linop import from_torch
    from linop.linearize import linearise

    g = torch.Generator().manual_seed(0)
    m = nn.Sequential(nn.Conv2d(2, 3, 3, padding=1), nn.ReLU(), nn.Conv2d(3, 4, 3, padding=1)).double().eval()
    with torch.no_grad():
        for p in m.parameters():
            p.copy_(torch.randn(p.shape, generator=g, dtype=torch.float64))
    net = from_torch(m, (2, 6, 6))
    x = torch.randn(2, 6, 6, generator=g, dtype=torch.float64)
    monkeypatch.setattr(lj, "UNIT_MAJOR_BLOCK", 5)
    calls = []
    blocked = lj.unit_major_copy
    monkeypatch.setattr(lj, "unit_major_copy", lambda buf, T: calls.append(T.shape) or blocked(buf, T))
    fast = {J.name: J.image() for J in linearise(net, x).sweep()}
    assert calls and all(n > 5 for n, _, _ in calls)  # the blocked path ran, over more than one block
    monkeypatch.setattr(lj, "unit_major_copy", lambda buf, T: buf.view(T.shape[2], T.shape[1], T.shape[0])
                        .copy_(T.permute(2, 1, 0)))
    plain = {J.name: J.image() for J in linearise(net, x).sweep()}
    assert fast.keys() == plain.keys() and all(torch.equal(fast[k], plain[k]) for k in fast)
