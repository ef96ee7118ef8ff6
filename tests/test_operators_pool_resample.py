"""Operators of issue 13 step 4: bicubic and anti-aliased ``Upsample2d``, the ``AdaptiveWindows`` gather of
uneven adaptive max pooling, and ``UnitAxis`` (the (C, L) <-> (C, 1, L) view of 1-D max
pooling) — three agreeing forms, the torch op, dottest (``check_forms`` of
``test_operators_linear_ops``; its module docstring justifies the tolerances: outputs at
1e-12·(|A||x|), matrix entries at 1e-14 relative).
"""
from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given
from hypothesis import strategies as st
from kit_forms import check_forms

from linop.operators.base import dottest
from linop.operators.layers1d import MaxPool1d, UnitAxis
from linop.operators.pool import MaxPool2d
from linop.operators.resample import AdaptiveWindows, Upsample2d, cubic_weights

pytestmark = pytest.mark.usefixtures("one_thread")


# ============================================================================ bicubic
@st.composite
def bicubic_cases(draw):
    C, H, W = draw(st.integers(1, 2)), draw(st.integers(1, 8)), draw(st.integers(1, 8))
    kw = {"mode": "bicubic", "align_corners": draw(st.booleans())}
    if draw(st.booleans()):
        kw["size"] = (draw(st.integers(1, 15)), draw(st.integers(1, 15)))
    else:
        sf = draw(st.sampled_from([0.5, 0.7, 1.0, 1.3, 1.5, 2.0, 2.2, 3.0, 1 / 3]))
        sf2 = draw(st.sampled_from([sf, 2.0, 1.7]))
        if int(H * sf) < 1 or int(W * sf2) < 1:
            sf = sf2 = 2.0
        kw["scale_factor"] = (sf, sf2)
        kw["recompute_scale_factor"] = draw(st.sampled_from([None, False, True]))
    return (C, H, W), kw


@given(bicubic_cases())
def test_bicubic_matches_interpolate(case):
    """CSR == matvec == apply == F.interpolate(mode="bicubic") (1e-12), adjoint == autograd's
    VJP, dottest; the matrix's pattern and entries equal torch's (pushed identity basis)."""
    shape, kw = case
    op = Upsample2d(shape, **kw)
    A = check_forms(op, lambda t: F.interpolate(t, **kw), pattern=False)
    assert A.nnz == op.nnz
    # entries against torch's matrix (the identity basis pushed through F.interpolate).  Taps
    # clamped to an edge add up to 3 weights of magnitude <= 1.3 on one pixel, in another order
    # than torch, and an entry is a product of two such sums: its rounding error is a few ulps
    # of O(1) terms, not of the (possibly much smaller, cancelled) entry — hence an absolute
    # 1e-14 (~45 ulps of 1); a wrong tap or weight errs by >= 1e-3 here.
    eye = torch.eye(op.shape[1], dtype=torch.float64).reshape((op.shape[1],) + op.in_shape)
    dense = F.interpolate(eye, **kw).reshape(op.shape[1], -1).numpy().T
    assert np.abs(A.toarray() - dense).max() <= 1e-14


def test_bicubic_weights_are_keys_kernel():
    """The four weights sum to 1 for every fraction t (partition of unity: a constant image
    stays constant), give the copy (0, 1, 0, 0) at t = 0, and equal the Keys kernel K(s),
    A = -0.75, at its defining points: K(1/2) = 0.5625 + ... computed independently."""
    t = np.linspace(0, 1, 101)
    w = cubic_weights(t)
    # Horner evaluation: ~10 roundings of intermediate terms up to |8A| = 6 in magnitude,
    # i.e. <= ~10 * 6 * 1.1e-16 ≈ 7e-15 absolute; a wrong coefficient errs by >= 1e-2
    assert np.allclose(w.sum(1), 1.0, rtol=0, atol=1e-14)
    assert np.array_equal(cubic_weights(np.zeros(1))[0], [0.0, 1.0, 0.0, 0.0])
    # K(s) for |s| <= 1: (A+2)|s|^3 - (A+3)|s|^2 + 1; 1 < |s| < 2: A|s|^3 - 5A|s|^2 + 8A|s| - 4A
    a = -0.75
    K = lambda s: np.where(np.abs(s) <= 1, (a + 2) * abs(s) ** 3 - (a + 3) * s ** 2 + 1,  # noqa: E731
                           a * abs(s) ** 3 - 5 * a * s ** 2 + 8 * a * abs(s) - 4 * a)
    ref = np.stack([K(t + 1), K(t), K(1 - t), K(2 - t)], 1)
    assert np.allclose(w, ref, rtol=0, atol=1e-14)  # same bound as above


def test_bicubic_float32_input():
    x = torch.randn(2, 3, 5, 6)
    op = Upsample2d((3, 5, 6), scale_factor=2, mode="bicubic")
    y = op.apply(x)
    assert y.dtype == torch.float32
    # float32 data: torch computes the weights in float, the operator in double, then casts;
    # both round O(16) products of O(1) values: agree to a few float32 ulps
    assert torch.allclose(y, F.interpolate(x, scale_factor=2, mode="bicubic"), rtol=0, atol=2e-6)


# ============================================================================ antialias
@st.composite
def antialias_cases(draw):
    C, H, W = draw(st.integers(1, 2)), draw(st.integers(2, 12)), draw(st.integers(2, 12))
    kw = {"mode": draw(st.sampled_from(["bilinear", "bicubic"])), "antialias": True,
          "align_corners": draw(st.booleans())}
    if draw(st.booleans()):
        # torch's CPU kernel is wrong for a 1-wide output when the height changes too (see
        # test_antialias_width_one_output): sizes from 2 up here
        kw["size"] = (draw(st.integers(2, 14)), draw(st.integers(2, 14)))
    else:
        kw["scale_factor"] = (draw(st.sampled_from([0.25, 0.4, 0.5, 0.7, 1.0, 1.5, 2.0])),
                              draw(st.sampled_from([0.3, 0.5, 0.8, 2.0])))
        if int(H * kw["scale_factor"][0]) < 2 or int(W * kw["scale_factor"][1]) < 2:
            kw["scale_factor"] = (0.5, 0.5)
            H, W = max(H, 4), max(W, 4)
        kw["recompute_scale_factor"] = draw(st.sampled_from([None, True]))
    return (C, H, W), kw


@given(antialias_cases())
def test_antialias_matches_interpolate(case):
    """antialias=True (PIL-style taps, filter widened by the downsampling factor): CSR ==
    matvec == apply == F.interpolate (1e-12 of |A||x|), adjoint == autograd VJP, dottest.
    The normalised weights are quotients computed in another order than torch's, so the
    matrix is compared at the output tolerance, not entry by entry."""
    shape, kw = case
    op = Upsample2d(shape, **kw)
    A = check_forms(op, lambda t: F.interpolate(t, **kw), pattern=False)
    assert A.nnz == op.nnz
    assert np.allclose(np.asarray(A.sum(axis=1)).ravel(), 1.0, rtol=0, atol=1e-14)  # rows sum to 1


def test_antialias_width_one_output():
    """Known torch 2.13 CPU defect: F.interpolate(antialias=True) to a width-1 output while the
    height also changes repeats the first output row in every row.  The operator computes the
    separable definition, which torch's own two passes (height, then width) reproduce."""
    x = torch.randn(1, 2, 9, 7, dtype=torch.float64)
    kw = {"mode": "bilinear", "antialias": True}
    op = Upsample2d((2, 9, 7), size=(3, 1), **kw)
    two_pass = F.interpolate(F.interpolate(x, size=(3, 7), **kw), size=(3, 1), **kw)
    assert torch.allclose(op.apply(x), two_pass, rtol=0, atol=1e-14)
    direct = F.interpolate(x, size=(3, 1), **kw)
    if torch.allclose(direct, two_pass, rtol=0, atol=1e-14):  # fixed in this torch build
        return
    assert torch.equal(direct, direct[:, :, :1].expand_as(direct))  # the defect as described


def test_antialias_refuses_other_modes():
    with pytest.raises(ValueError, match="antialias"):
        Upsample2d((1, 4, 4), scale_factor=0.5, mode="nearest", antialias=True)


# ============================================================================ AdaptiveWindows
@given(st.integers(1, 2), st.integers(1, 9), st.integers(1, 9), st.one_of(st.none(), st.integers(1, 11)),
       st.integers(1, 11), st.integers(0, 2 ** 16))
def test_adaptive_windows_then_max_pool_is_adaptive_max_pool(C, H, W, ho, wo, seed):
    """The gather has three agreeing forms (a selection: every row one 1), and a max pool of
    kernel = stride = its kernel_size after it equals F.adaptive_max_pool2d exactly — the
    composed argmax selection picks torch's value (ties only among copies of one input)."""
    op = AdaptiveWindows((C, H, W), (ho, wo))
    A = check_forms(op, op.apply, pattern=False)  # the torch form is the reference here
    assert np.all(A.data == 1.0) and np.array_equal(A.getnnz(axis=1), np.ones(A.shape[0]))
    x = torch.randn((1, C, H, W), generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    g = op.apply(x)
    want = F.adaptive_max_pool2d(x, (ho, wo))
    assert torch.equal(F.max_pool2d(g, op.kernel_size, op.kernel_size), want)
    S = MaxPool2d(g[0], op.kernel_size)
    assert torch.equal(S.apply(op.apply(x)), want)  # the Jacobian at x reproduces the output
    dottest(op, rng=seed)


def test_adaptive_windows_sizes():
    op = AdaptiveWindows((2, 5, 7), (3, 2))
    # H: windows [0,2) [1,4) [3,5) -> K_h = 3; W: [0,4) [3,7) -> K_w = 4
    assert op.kernel_size == (3, 4) and op.out_shape == (2, 9, 8)
    # 3 -> 7: windows [⌊3o/7⌋, ⌈3(o+1)/7⌉) hold one or two inputs (o = 2: [0, 2))
    assert AdaptiveWindows((1, 3, 3), 7).kernel_size == (2, 2)
    assert AdaptiveWindows((1, 1, 1), 7).kernel_size == (1, 1)  # 1 -> 7: one input each


@pytest.mark.parametrize("build, word", [
    (lambda: AdaptiveWindows((1, 4), 2), "input_shape"),
    (lambda: AdaptiveWindows((1, 4, 4), 0), "output_size"),
    (lambda: UnitAxis((2, 3, 4)), "input_shape"),
    (lambda: UnitAxis((2, 3), squeeze=True), "input_shape"),
])
def test_bad_input_names_the_argument(build, word):
    with pytest.raises(ValueError, match=word):
        build()


# ============================================================================ UnitAxis
@pytest.mark.parametrize("shape, squeeze", [((3, 7), False), ((3, 1, 7), True)])
def test_unit_axis_forms(shape, squeeze):
    op = UnitAxis(shape, squeeze=squeeze)
    ref = (lambda t: t.unsqueeze(2)) if not squeeze else (lambda t: t.squeeze(2))
    A = check_forms(op, ref)
    assert np.array_equal(A.toarray(), np.eye(21))


def test_unit_axis_composes_to_max_pool_1d():
    """UnitAxis, the 2-D selection with a 1 x k window, UnitAxis back == the MaxPool1d
    operator (the Jacobian of the converted 1-D max pool) == F.max_pool1d."""
    x = torch.randn(3, 11, dtype=torch.float64)
    up, down = UnitAxis((3, 11)), UnitAxis((3, 1, 6), squeeze=True)
    S2 = MaxPool2d(up.apply(x[None])[0], (1, 3), (1, 2), (0, 1))
    y = down.apply(S2.apply(up.apply(x[None])))
    assert torch.equal(y, F.max_pool1d(x[None], 3, 2, 1))
    assert torch.equal(y, MaxPool1d(x, 3, 2, 1).apply(x[None]))
