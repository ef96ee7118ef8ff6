"""The linear ops of issue 13 as explicit operators: three agreeing forms and the torch op.

For every operator (adaptive average pooling, upsampling, transposed convolution, padding,
1-D convolution / pooling, channel shuffle): ``to_sparse() @ x == matvec(x) == apply(x) ==`` the
torch op, ``rmatvec == apply_adjoint ==`` torch autograd's VJP, ``dottest`` both ways, the CSR
holds exactly the structural non-zeros (its pattern and nnz equal an independent count from
torch), and bad arguments raise ``ValueError`` naming the argument.

Tolerances (float64, unit roundoff u = 2^-53 ≈ 1.1e-16).  An output is a sum of K ≤ ~100
rounded products here, off by at most ~K·u·Σ|terms| ≤ 1e-14·(|A||x|) for either side; comparing
at ``RTOL = 1e-12 · (|A||x|)`` is thus immune to summation order yet fails for any wrong entry
or tap (which errs by O(|A||x|)).  Matrix entries of separable ops are a product of two
rounded 1-D weights (torch rounds the same weights in its own order): a few ulps apart, so
entries are compared at ``1e-14`` relative.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given
from hypothesis import strategies as st
from torch import nn

from linop.operators.conv_transpose import ConvTranspose2d
from linop.operators.layers1d import AvgPool1d, Conv1d, MaxPool1d
from linop.operators.padding import Pad2d
from linop.operators.permutation import ChannelPermutation, ChannelShuffle
from linop.operators.resample import AdaptiveAvgPool2d, Upsample2d

from kit_forms import check_forms



pytestmark = pytest.mark.usefixtures("one_thread")


# ============================================================================ AdaptiveAvgPool2d
@given(st.integers(1, 3), st.integers(1, 9), st.integers(1, 9),
       st.one_of(st.none(), st.integers(1, 12)), st.integers(1, 12))
def test_adaptive_avg_pool(C, H, W, ho, wo):
    op = AdaptiveAvgPool2d((C, H, W), (ho, wo))
    layer = nn.AdaptiveAvgPool2d((ho, wo))
    assert op.out_shape == (C, H if ho is None else ho, wo)
    A = check_forms(op, layer)
    assert A.nnz == op.nnz


def test_adaptive_avg_pool_upsamples_1x1_to_7x7():
    """torchvision VGG / AlexNet at CIFAR size: a 1×1 map copied to 7×7; the adjoint sums 49 copies."""
    op = AdaptiveAvgPool2d((4, 1, 1), 7)
    A = check_forms(op, nn.AdaptiveAvgPool2d(7))
    assert A.nnz == 4 * 49 and np.all(A.data == 1.0)
    y = torch.ones(1, 4, 7, 7, dtype=torch.float64)
    assert torch.equal(op.apply_adjoint(y), torch.full((1, 4, 1, 1), 49.0, dtype=torch.float64))


# ============================================================================ Upsample2d
@st.composite
def upsample_cases(draw):
    C, H, W = draw(st.integers(1, 2)), draw(st.integers(1, 7)), draw(st.integers(1, 7))
    mode = draw(st.sampled_from(["nearest", "nearest-exact", "bilinear", "area"]))
    kw = {"mode": mode}
    if mode == "bilinear":
        kw["align_corners"] = draw(st.booleans())
    if draw(st.booleans()):
        kw["size"] = (draw(st.integers(1, 15)), draw(st.integers(1, 15)))
    else:
        sf = draw(st.sampled_from([0.5, 0.7, 1.0, 1.3, 1.5, 2.0, 2.05, 2.2, 2.5, 3.0, 1 / 3]))
        sf2 = draw(st.sampled_from([sf, 2.0, 1.7]))
        if int(H * sf) < 1 or int(W * sf2) < 1:
            sf = sf2 = 2.0
        kw["scale_factor"] = (sf, sf2)
        kw["recompute_scale_factor"] = draw(st.sampled_from([None, False, True]))
    return (C, H, W), kw


@given(upsample_cases())
def test_upsample_matches_interpolate(case):
    shape, kw = case
    op = Upsample2d(shape, **kw)
    A = check_forms(op, lambda t: F.interpolate(t, **kw))
    assert A.nnz == op.nnz


@pytest.mark.parametrize("H, Ho, mode, align", [
    (2, 82, "nearest", None),      # float32 source index differs from the exact ⌊o·H/H_o⌋
    (3, 47, "bilinear", False),    # torch floors the double source index with floorf (float32)
    (2, 50, "bilinear", True),
])
def test_upsample_single_precision_index_quirks(H, Ho, mode, align):
    op = Upsample2d((1, H, 1), size=(Ho, 1), mode=mode, align_corners=align)
    check_forms(op, lambda t: F.interpolate(t, size=(Ho, 1), mode=mode, align_corners=align))


def test_upsample_scale_factor_vs_recompute():
    """``H_out == 2H`` with scale 2.05: torch shifts (``o >> 1``); recompute uses ``H/H_out``."""
    for rec in (None, True):
        kw = {"scale_factor": 2.05, "mode": "nearest", "recompute_scale_factor": rec}
        check_forms(Upsample2d((1, 10, 10), **kw), lambda t, kw=kw: F.interpolate(t, **kw))
    for rec in (None, True):  # 1.3·7 = 9.1 -> 9: the two ratios 1/1.3 and 7/9 pick different pixels
        kw = {"scale_factor": 1.3, "mode": "bilinear", "align_corners": False, "recompute_scale_factor": rec}
        check_forms(Upsample2d((1, 7, 7), **kw), lambda t, kw=kw: F.interpolate(t, **kw))
    a = Upsample2d((1, 7, 7), scale_factor=1.3, mode="bilinear").to_sparse()
    b = Upsample2d((1, 7, 7), scale_factor=1.3, mode="bilinear", recompute_scale_factor=True).to_sparse()
    assert abs(a - b).max() > 1e-3


def test_upsample_float32_input():
    """float32 data: computed in float32 (weights cast once); agrees with torch to float32 rounding."""
    op = Upsample2d((2, 5, 6), scale_factor=2, mode="bilinear", align_corners=False)
    x = torch.randn(3, 2, 5, 6)
    y = op.apply(x)
    assert y.dtype == torch.float32
    assert torch.allclose(y, F.interpolate(x, scale_factor=2, mode="bilinear"), rtol=0, atol=1e-5)


# ============================================================================ ConvTranspose2d
@st.composite
def conv_transpose_cases(draw):
    groups = draw(st.integers(1, 3))
    cig, cog = draw(st.integers(1, 2)), draw(st.integers(1, 2))
    k = (draw(st.integers(1, 4)), draw(st.integers(1, 3)))
    s = (draw(st.integers(1, 3)), draw(st.integers(1, 3)))
    d = (draw(st.integers(1, 3)), draw(st.integers(1, 2)))
    op = tuple(draw(st.integers(0, max(s[a], d[a]) - 1)) for a in range(2))
    p = (draw(st.integers(0, 3)), draw(st.integers(0, 2)))
    HW = []
    for a in range(2):  # smallest input with a non-empty output, plus a little
        n = 1
        while (n - 1) * s[a] - 2 * p[a] + d[a] * (k[a] - 1) + op[a] + 1 < 1:
            n += 1
        HW.append(n + draw(st.integers(0, 3)))
    return {"groups": groups, "cig": cig, "cog": cog, "k": k, "stride": s, "dilation": d, "output_padding": op, "padding": p, "HW": HW}


@given(conv_transpose_cases())
def test_conv_transpose_matches_torch(case):
    g = torch.Generator().manual_seed(5)
    G = case["groups"]
    w = torch.randn(G * case["cig"], case["cog"], *case["k"], generator=g, dtype=torch.float64)
    kw = {key: case[key] for key in ("stride", "padding", "output_padding", "dilation", "groups")}
    in_shape = (G * case["cig"], *case["HW"])
    op = ConvTranspose2d(w, in_shape, **kw)
    layer = lambda t: F.conv_transpose2d(t, w, None, kw["stride"], kw["padding"], kw["output_padding"],
                                         kw["groups"], kw["dilation"])
    A = check_forms(op, layer, pattern=False)
    # independent count: a ones kernel over a ones input counts, per output, the taps landing there
    count = F.conv_transpose2d(torch.ones((1,) + in_shape, dtype=torch.float64), torch.ones_like(w), None,
                               kw["stride"], kw["padding"], kw["output_padding"], kw["groups"], kw["dilation"])
    assert A.nnz == int(count.sum()) == op.nnz


def test_conv_transpose_module_and_crop():
    """``nn.ConvTranspose2d`` itself, including ``output_padding ≥ stride + padding`` (d > o_p ≥ s)."""
    torch.manual_seed(0)
    for kw in ({"stride": 2, "padding": 1, "output_padding": 1}, {"stride": 1, "padding": 0, "output_padding": 2, "dilation": 3}):
        layer = nn.ConvTranspose2d(3, 4, 3, bias=False, **kw).double()
        op = ConvTranspose2d(layer.weight, (3, 4, 5), **kw)
        A = check_forms(op, layer)
        assert A.nnz == op.nnz


# ============================================================================ Pad2d
@st.composite
def pad_cases(draw):
    C, H, W = draw(st.integers(1, 2)), draw(st.integers(1, 5)), draw(st.integers(1, 5))
    mode = draw(st.sampled_from(["constant", "reflect", "replicate", "circular"]))
    lim = {"reflect": (H - 1, W - 1), "circular": (H, W), "replicate": (4, 4), "constant": (3, 3)}[mode]
    lo = -1 if mode == "constant" else 0
    t, b = (draw(st.integers(lo if H > 2 else 0, lim[0])) for _ in range(2))
    left, r = (draw(st.integers(lo if W > 2 else 0, lim[1])) for _ in range(2))
    return (C, H, W), (left, r, t, b), mode


@given(pad_cases())
def test_pad_matches_torch(case):
    shape, pad, mode = case
    op = Pad2d(shape, pad, mode)
    A = check_forms(op, lambda t: F.pad(t, pad, mode=mode))
    # one entry per output that reads an input: every output, less constant mode's zero border
    inside = F.pad(torch.ones((1,) + shape, dtype=torch.float64), pad, mode=mode)
    assert A.nnz == int(inside.count_nonzero()) == op.nnz
    assert np.all(A.data == 1.0)


# ============================================================================ 1-D layers
@given(st.integers(1, 2), st.integers(1, 2), st.integers(1, 2), st.integers(1, 4), st.integers(1, 3),
       st.integers(1, 2), st.sampled_from([0, 1, 2, "same", "valid"]), st.integers(0, 5))
def test_conv1d_matches_torch(groups, cig, cog, k, s, d, padding, extra):
    if padding == "same":
        s = 1
    g = torch.Generator().manual_seed(2)
    w = torch.randn(groups * cog, cig, k, generator=g, dtype=torch.float64)
    p = 0 if isinstance(padding, str) else padding
    L = max(1, d * (k - 1) + 1 - 2 * p) + extra
    op = Conv1d(w, (groups * cig, L), stride=s, padding=padding, dilation=d, groups=groups)
    layer = lambda t: F.conv1d(t, w, None, s, padding, d, groups)
    A = check_forms(op, layer)
    assert A.nnz == op.nnz


@given(st.integers(1, 2), st.integers(1, 4), st.integers(1, 3), st.integers(0, 2), st.booleans(), st.booleans(),
       st.integers(0, 4))
def test_avg_pool1d_matches_torch(C, k, s, p, ceil_mode, include_pad, extra):
    p = min(p, k // 2)
    L = max(1, k - 2 * p) + extra
    op = AvgPool1d((C, L), k, s, p, ceil_mode=ceil_mode, count_include_pad=include_pad)
    check_forms(op, lambda t: F.avg_pool1d(t, k, s, p, ceil_mode, include_pad))


@given(st.integers(1, 2), st.integers(1, 4), st.integers(1, 3), st.integers(0, 2), st.integers(1, 2),
       st.booleans(), st.integers(0, 4))
def test_max_pool1d_selection(C, k, s, p, d, ceil_mode, extra):
    p = min(p, k // 2)
    L = max(1, d * (k - 1) + 1 - 2 * p) + extra
    g = torch.Generator().manual_seed(4)
    x0 = torch.randn(C, L, generator=g, dtype=torch.float64)
    y0, idx = F.max_pool1d(x0[None], k, s, p, d, ceil_mode=ceil_mode, return_indices=True)
    if torch.isinf(y0).any():  # a window entirely in the padding: torch's -inf is not a selection
        with pytest.raises(ValueError, match="padding"):
            MaxPool1d(x0, k, s, p, d, ceil_mode)
        return
    op = MaxPool1d(x0, k, s, p, d, ceil_mode)
    assert torch.equal(op.indices, idx[0])
    assert torch.equal(op.apply(x0[None]), y0)  # a selection: exact
    # the selection matrix at x0 is a gather by torch's indices (at any point)
    ref = lambda t: torch.gather(t, 2, idx.expand(t.shape[0], -1, -1))
    check_forms(op, ref)
    # its adjoint is torch's VJP of max_pool1d at x0
    v = torch.randn(y0.shape, generator=g, dtype=torch.float64)
    xg = x0[None].clone().requires_grad_(True)
    (vjp,) = torch.autograd.grad(F.max_pool1d(xg, k, s, p, d, ceil_mode=ceil_mode), xg, v)
    assert torch.equal(op.apply_adjoint(v), vjp)
    same = MaxPool1d.from_indices(idx, (C, L))
    assert (same.to_sparse() != op.to_sparse()).nnz == 0


# ============================================================================ ChannelShuffle
@given(st.sampled_from([(1, 1), (2, 1), (2, 2), (3, 3), (6, 2), (6, 3), (8, 4), (12, 3)]),
       st.sampled_from([(), (3,), (2, 3)]))
def test_channel_shuffle_matches_torch(cg, spatial):
    C, G = cg
    op = ChannelShuffle((C,) + spatial, G)

    def ref(t):  # ShuffleNet's channel_shuffle: view (g, C/g), transpose, flatten
        n = t.shape[0]
        return t.reshape(n, G, C // G, *spatial).transpose(1, 2).reshape(t.shape)

    A = check_forms(op, ref)
    assert A.nnz == op.shape[0]
    if len(spatial) == 2:
        x = torch.randn((2, C) + spatial, dtype=torch.float64)
        assert torch.equal(op.apply(x), nn.ChannelShuffle(G)(x))
    assert np.array_equal((A @ A.T).toarray(), np.eye(A.shape[0]))  # orthogonal


# ============================================================================ bad input
@pytest.mark.parametrize("build, word", [
    (lambda: AdaptiveAvgPool2d((1, 4), 2), "input_shape"),
    (lambda: AdaptiveAvgPool2d((1, 4, 4), 0), "output_size"),
    (lambda: AdaptiveAvgPool2d((1, 4, 4), (2, 2, 2)), "output_size"),
    (lambda: Upsample2d((1, 4, 4), scale_factor=2, mode="trilinear"), "mode"),
    (lambda: Upsample2d((1, 4, 4), scale_factor=2, mode="nearest", align_corners=True), "align_corners"),
    (lambda: Upsample2d((1, 4, 4)), "size"),
    (lambda: Upsample2d((1, 4, 4), size=8, scale_factor=2), "size"),
    (lambda: Upsample2d((1, 4, 4), scale_factor=-1.0), "scale_factor"),
    (lambda: Upsample2d((1, 4, 4), scale_factor=0.1), "scale_factor"),
    (lambda: Upsample2d((1, 4, 4), size=8, recompute_scale_factor=True), "recompute_scale_factor"),
    (lambda: ConvTranspose2d(torch.ones(2, 1, 3, 3), (3, 4, 4)), "C_in"),
    (lambda: ConvTranspose2d(torch.ones(2, 1, 3, 3), (2, 4, 4), stride=2, output_padding=2), "output_padding"),
    (lambda: ConvTranspose2d(torch.ones(2, 1, 3), (2, 4, 4)), "weight"),
    (lambda: ConvTranspose2d(torch.ones(2, 1, 1, 1), (2, 1, 1), padding=1), "padding"),
    (lambda: ConvTranspose2d(torch.ones(3, 1, 1, 1), (3, 2, 2), groups=2), "groups"),
    (lambda: Pad2d((1, 3, 3), (3, 0, 0, 0), "reflect"), "reflect"),
    (lambda: Pad2d((1, 3, 3), (0, 0, 4, 0), "circular"), "circular"),
    (lambda: Pad2d((1, 3, 3), 1, "symmetric"), "mode"),
    (lambda: Pad2d((1, 3, 3), (1, 1), "constant"), "pad"),
    (lambda: Pad2d((1, 3, 3), -1, "replicate"), "pad"),
    (lambda: Pad2d((1, 3, 3), 1, "constant", value=1.0), "value"),
    (lambda: Pad2d((1, 3, 3), (0, 0, -2, -1), "constant"), "pad"),
    (lambda: Conv1d(torch.ones(2, 1, 3, 3), (1, 5)), "weight"),
    (lambda: Conv1d(torch.ones(2, 1, 3), (1, 5, 5)), "input_shape"),
    (lambda: Conv1d(torch.ones(2, 1, 3), (1, 5), stride=2, padding="same"), "same"),
    (lambda: Conv1d(torch.ones(2, 1, 3), (1, 5), stride=0), "stride"),
    (lambda: AvgPool1d((1, 5), 0), "kernel_size"),
    (lambda: MaxPool1d(torch.ones(1, 2, 3, 4), 2), "x"),
    (lambda: ChannelShuffle((6, 2, 2), 4), "groups"),
    (lambda: ChannelPermutation((3, 2), [0, 0, 1]), "perm"),
])
def test_bad_input_names_the_argument(build, word):
    with pytest.raises(ValueError, match=word):
        build()


def test_wrong_batch_shape_rejected():
    op = Pad2d((1, 3, 3), 1, "reflect")
    with pytest.raises(ValueError, match="input"):
        op.apply(torch.ones(1, 1, 4, 4))
    with pytest.raises(ValueError, match="output"):
        op.apply_adjoint(torch.ones(1, 1, 3, 3))
