"""Properties of the foundation operators (issue 2).

Every operator must exist in three agreeing forms — batched torch ``apply``, the scipy
``LinearOperator`` matvec/matmat, and the explicit CSR ``to_sparse()`` — that equal the
torch layer, with adjoints equal to torch autograd's VJP and a sparse pattern holding
exactly the structural non-zeros.

Tolerances.  In float64 a dot product of K terms is off by at most ~K·u·Σ|terms|
(u = 2^-53 ≈ 1.1e-16); with K ≤ ~150 here that is ≤ 2e-14 of ``|A||x|``, so comparing
against ``RTOL64 = 1e-12 · (|A| |x|)`` is tight (any wrong entry or missed tap fails) yet
immune to summation order.  In float32 the same bound with u = 2^-24 ≈ 6e-8 is ~9e-6; we
use ``RTOL32 = 3e-5``.
"""
from __future__ import annotations

import time

import numpy as np
import pytest
import scipy.sparse
import torch
import torch.nn.functional as F
from hypothesis import given
from hypothesis import strategies as st

from linop import backend
from linop.operators import (
    AvgPool2d,
    BiasRestriction,
    Chain,
    ChannelPad,
    Concat,
    Conv2d,
    Diagonal,
    Flatten,
    GlobalAvgPool2d,
    GraphOperator,
    HStack,
    Identity,
    LeakyReLUMask,
    Linear,
    MaxPool2d,
    Operator,
    PiecewiseLinearMask,
    PReLUMask,
    ReLUMask,
    Scale,
    SigmoidDerivative,
    Slice,
    Subsample,
    Sum,
    TanhDerivative,
    VStack,
    dottest,
)

pytestmark = pytest.mark.usefixtures("one_thread")


RTOL64 = 1e-12
RTOL32 = 3e-5
TINY = 1e-300  # keeps the bound positive where |A||x| is exactly 0 (then both sides are exactly 0)


def _close(actual, expected, scale, rtol, what=""):
    actual, expected, scale = (np.asarray(backend.to_numpy(a), dtype=np.float64) for a in (actual, expected, scale))
    assert actual.shape == expected.shape, (what, actual.shape, expected.shape)
    err = np.abs(actual - expected)
    bound = rtol * np.abs(scale) + TINY
    bad = err > bound
    assert not bad.any(), f"{what}: {bad.sum()} entries off, worst err {err.max():.3e} vs bound {bound[bad].min():.3e}"


def check_forms(op: Operator, ref, n: int = 2, seed: int = 0, dense_exact: bool = True):
    """All forms of ``op`` against the torch function ``ref`` (batched, float64).

    * ``apply``, ``matvec``, ``matmat`` and ``to_sparse() @ x`` equal ``ref(x)``;
    * ``apply_adjoint``, ``rmatvec``, ``rmatmat`` and ``to_sparse().T @ v`` equal torch
      autograd's VJP of ``ref``;
    * ``to_sparse()`` is canonical CSR and, with ``dense_exact``, equals *exactly* the
      matrix obtained by pushing the identity basis through ``ref`` (products with 1 and
      sums with 0 are exact), so it stores no entry the layer does not have and misses none;
    * ``.T.to_sparse()`` is exactly the transpose; the adjoint identity holds (dottest).
    """
    g = torch.Generator().manual_seed(seed)
    x = torch.randn((n,) + op.in_shape, generator=g, dtype=torch.float64)
    v = torch.randn((n,) + op.out_shape, generator=g, dtype=torch.float64)
    A = op.to_sparse()
    assert isinstance(A, scipy.sparse.csr_matrix) and A.shape == op.shape
    assert A.has_canonical_format
    absA = abs(A)
    X = x.reshape(n, -1).numpy().T  # columns = samples
    V = v.reshape(n, -1).numpy().T
    fscale = absA @ np.abs(X)
    ascale = absA.T @ np.abs(V)

    y_ref = ref(x).reshape(n, -1).numpy().T
    _close(op.apply(x).reshape(n, -1).numpy().T, y_ref, fscale, RTOL64, "apply")
    _close(A @ X, y_ref, fscale, RTOL64, "to_sparse @ x")
    _close(op.matvec(X[:, 0]), y_ref[:, 0], fscale[:, 0], RTOL64, "matvec")
    _close(op.matmat(X), y_ref, fscale, RTOL64, "matmat")
    _close(op @ X, y_ref, fscale, RTOL64, "op @ X")

    xg = x.clone().requires_grad_(True)
    (vjp,) = torch.autograd.grad(ref(xg), xg, v)
    vjp = vjp.reshape(n, -1).numpy().T
    _close(op.apply_adjoint(v).reshape(n, -1).numpy().T, vjp, ascale, RTOL64, "apply_adjoint")
    _close(A.T @ V, vjp, ascale, RTOL64, "to_sparse.T @ v")
    _close(op.rmatvec(V[:, 0]), vjp[:, 0], ascale[:, 0], RTOL64, "rmatvec")
    _close(op.rmatmat(V), vjp, ascale, RTOL64, "rmatmat")
    _close(op.T.matmat(V), vjp, ascale, RTOL64, ".T matmat")
    _close(op.H.matvec(V[:, 0]), vjp[:, 0], ascale[:, 0], RTOL64, ".H matvec")

    if dense_exact:
        eye = torch.eye(op.shape[1], dtype=torch.float64).reshape((op.shape[1],) + op.in_shape)
        dense = ref(eye).reshape(op.shape[1], -1).numpy().T
        assert np.array_equal(A.toarray(), dense), "to_sparse differs from the identity-pushed matrix"
        assert A.nnz == np.count_nonzero(dense), "explicit zeros stored"

    AT = op.T.to_sparse()
    assert AT.shape == A.T.shape and (AT != A.T.tocsr()).nnz == 0
    dottest(op, rng=seed)
    dottest(op.T, rng=seed + 1)
    return A


# ============================================================================ Conv2d
@st.composite
def conv_cases(draw):
    groups = draw(st.integers(1, 3))
    cig, cog = draw(st.integers(1, 3)), draw(st.integers(1, 3))
    kh, kw = draw(st.integers(1, 4)), draw(st.integers(1, 4))
    sh, sw = draw(st.integers(1, 3)), draw(st.integers(1, 3))
    dh, dw = draw(st.integers(1, 3)), draw(st.integers(1, 2))
    kind = draw(st.sampled_from(["int", "pair", "quad", "same", "valid"]))
    if kind == "same":
        sh = sw = 1
        pad = "same"
        th, tw = dh * (kh - 1), dw * (kw - 1)
        pads = (th // 2, th - th // 2, tw // 2, tw - tw // 2)
    elif kind == "valid":
        pad, pads = "valid", (0, 0, 0, 0)
    elif kind == "int":
        p = draw(st.integers(0, 3))
        pad, pads = p, (p, p, p, p)
    elif kind == "pair":
        ph, pw = draw(st.integers(0, 3)), draw(st.integers(0, 3))
        pad, pads = (ph, pw), (ph, ph, pw, pw)
    else:
        pads = tuple(draw(st.integers(0, 3)) for _ in range(4))
        pad = pads
    eh, ew = dh * (kh - 1) + 1, dw * (kw - 1) + 1
    H = max(1, eh - pads[0] - pads[1]) + draw(st.integers(0, 5))
    W = max(1, ew - pads[2] - pads[3]) + draw(st.integers(0, 5))
    return dict(groups=groups, cig=cig, cog=cog, k=(kh, kw), stride=(sh, sw), dilation=(dh, dw),
                padding=pad, pads=pads, H=H, W=W)


def _torch_conv(w, case):
    pad, pads = case["padding"], case["pads"]
    if isinstance(pad, tuple) and len(pad) == 4:  # torch has no 4-sided padding argument
        return lambda x: F.conv2d(F.pad(x, (pads[2], pads[3], pads[0], pads[1])), w, None, case["stride"], 0,
                                  case["dilation"], case["groups"])
    return lambda x: F.conv2d(x, w, None, case["stride"], pad, case["dilation"], case["groups"])


@given(conv_cases())
def test_conv2d_matches_torch(case):
    g = torch.Generator().manual_seed(7)
    G = case["groups"]
    w = torch.randn(G * case["cog"], case["cig"], *case["k"], generator=g, dtype=torch.float64)
    in_shape = (G * case["cig"], case["H"], case["W"])
    op = Conv2d(w, in_shape, stride=case["stride"], padding=case["padding"], dilation=case["dilation"], groups=G)
    assert op.padding == case["pads"]
    ref = _torch_conv(w, case)
    A = check_forms(op, ref)
    # nnz = number of in-bounds taps, counted independently: a ones-kernel over a ones
    # image counts, at every output, the taps that read a real (non-padding) input.
    count = _torch_conv(torch.ones_like(w), case)(torch.ones((1,) + in_shape, dtype=torch.float64))
    assert A.nnz == int(count.sum()) == op.nnz
    assert np.all(A.data != 0)


@given(conv_cases())
def test_conv2d_float32(case):
    """float32 data through a float32 operator: apply / sparse agree with the float64 layer."""
    g = torch.Generator().manual_seed(3)
    G = case["groups"]
    w = torch.randn(G * case["cog"], case["cig"], *case["k"], generator=g).float()
    in_shape = (G * case["cig"], case["H"], case["W"])
    op = Conv2d(w, in_shape, stride=case["stride"], padding=case["padding"], dilation=case["dilation"], groups=G)
    assert op.dtype == np.float32
    x = torch.randn((2,) + in_shape, generator=g).float()
    ref = _torch_conv(w.double(), case)(x.double()).reshape(2, -1).numpy().T
    A = op.to_sparse()
    assert A.dtype == np.float32
    scale = abs(A).astype(np.float64) @ np.abs(x.double().reshape(2, -1).numpy().T)
    y = op.apply(x)
    assert y.dtype == torch.float32
    _close(y.reshape(2, -1).numpy().T, ref, scale, RTOL32, "float32 apply")
    _close(A @ x.reshape(2, -1).numpy().T, ref, scale, RTOL32, "float32 sparse")
    mv = op.matvec(x[0].reshape(-1).numpy())
    assert mv.dtype == np.float32
    dottest(op, dtype=np.float32, rng=1)


def test_conv2d_float64_data_through_float32_operator_is_float64():
    """A float32 operator meeting float64 data computes in float64 (parameters are cast)."""
    w = torch.randn(3, 2, 3, 3)
    op = Conv2d(w, (2, 5, 5), padding=1)
    x = torch.randn(1, 2, 5, 5, dtype=torch.float64)
    y = op.apply(x)
    assert y.dtype == torch.float64
    assert torch.equal(y, F.conv2d(x, w.double(), padding=1))


def test_conv2d_attributes_and_numpy_weight():
    w = np.random.default_rng(0).standard_normal((6, 2, 3, 5))
    op = Conv2d(w, (4, 9, 11), stride=2, padding=(1, 2), dilation=(2, 1), groups=2)
    assert isinstance(op.weight, torch.Tensor) and op.weight.device.type == "cpu"
    assert op.stride == (2, 2) and op.dilation == (2, 1) and op.groups == 2 and op.padding == (1, 1, 2, 2)
    assert op.in_shape == (4, 9, 11)
    assert op.out_shape == tuple(F.conv2d(torch.zeros(1, 4, 9, 11, dtype=torch.float64), torch.from_numpy(w),
                                          stride=2, padding=(1, 2), dilation=(2, 1), groups=2).shape[1:])
    y = op.matvec(np.ones(op.shape[1]))
    assert isinstance(y, np.ndarray) and y.shape == (op.shape[0],)


def test_conv2d_csr_assembly_time():
    """The issue's requirement: CSR of a 3x3, 64->64 conv on 32x32 in well under 1 s."""
    torch.manual_seed(0)
    op = Conv2d(torch.randn(64, 64, 3, 3), (64, 32, 32), padding=1)
    op.to_sparse()  # compile / warm the numba kernel once
    best = np.inf
    for _ in range(3):
        t0 = time.perf_counter()
        A = op.to_sparse()
        best = min(best, time.perf_counter() - t0)
        assert A.nnz == 64 * 64 * (3 * 32 - 2) ** 2  # 94 valid (row, tap) pairs per axis
        del A
    assert best < 1.0, f"CSR assembly took {best:.3f} s"


def test_conv2d_sparse_size_guard():
    op = Conv2d(torch.randn(4, 4, 3, 3), (4, 8, 8), padding=1)
    with pytest.raises(MemoryError, match="nnz=.*max_bytes"):
        op.to_sparse(max_bytes=1000)


# ============================================================================ Linear
def test_linear():
    w = torch.randn(5, 7, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    w[0, 0] = 0.0  # zero weights stay structural entries of a dense layer
    op = Linear(w)
    assert op.in_shape == (7,) and op.out_shape == (5,)
    A = check_forms(op, lambda x: F.linear(x, w), dense_exact=False)
    assert A.nnz == 35 and np.array_equal(A.toarray(), w.numpy())


# ============================================================================ pooling
@st.composite
def avg_cases(draw):
    kh, kw = draw(st.integers(1, 4)), draw(st.integers(1, 4))
    sh, sw = draw(st.integers(1, 3)), draw(st.integers(1, 3))
    ph, pw = draw(st.integers(0, kh // 2)), draw(st.integers(0, kw // 2))
    H = max(1, kh - 2 * ph) + draw(st.integers(0, 5))
    W = max(1, kw - 2 * pw) + draw(st.integers(0, 5))
    return dict(k=(kh, kw), s=(sh, sw), p=(ph, pw), H=H, W=W, C=draw(st.integers(1, 3)),
                cip=draw(st.booleans()), ceil=draw(st.booleans()),
                div=draw(st.sampled_from([None, None, 1, 5])))


@given(avg_cases())
def test_avgpool2d_matches_torch(c):
    op = AvgPool2d((c["C"], c["H"], c["W"]), c["k"], c["s"], c["p"], count_include_pad=c["cip"],
                   ceil_mode=c["ceil"], divisor_override=c["div"])

    def ref(x):
        return F.avg_pool2d(x, c["k"], c["s"], c["p"], ceil_mode=c["ceil"], count_include_pad=c["cip"],
                            divisor_override=c["div"])

    assert op.out_shape == tuple(ref(torch.zeros(1, c["C"], c["H"], c["W"], dtype=torch.float64)).shape[1:])
    # entries 1/divisor: the identity push gives exactly 1.0/divisor as well
    check_forms(op, ref)


def test_avgpool2d_resnet_shortcut_and_vgg_pool():
    """ResNet20's shortcut pooling (window 1, stride 2) and VGG7's (window 3, stride 2)."""
    check_forms(AvgPool2d((3, 8, 8), 1, 2), lambda x: F.avg_pool2d(x, 1, 2))
    check_forms(AvgPool2d((2, 9, 9), 3, 2), lambda x: F.avg_pool2d(x, 3, 2))


@pytest.mark.parametrize("keepdim", [True, False])
def test_global_avgpool(keepdim):
    op = GlobalAvgPool2d((3, 4, 5), keepdim=keepdim)
    if keepdim:
        check_forms(op, lambda x: F.adaptive_avg_pool2d(x, 1), dense_exact=False)
    else:
        check_forms(op, lambda x: x.mean((2, 3)), dense_exact=False)
    A = op.to_sparse()
    assert A.nnz == 60 and np.allclose(A.data, 1 / 20, rtol=0, atol=1e-17)


@st.composite
def max_cases(draw):
    kh, kw = draw(st.integers(1, 4)), draw(st.integers(1, 4))
    dh, dw = draw(st.integers(1, 2)), draw(st.integers(1, 2))
    ph, pw = draw(st.integers(0, kh // 2)), draw(st.integers(0, kw // 2))
    H = max(1, dh * (kh - 1) + 1 - 2 * ph) + draw(st.integers(0, 4))
    W = max(1, dw * (kw - 1) + 1 - 2 * pw) + draw(st.integers(0, 4))
    stride = draw(st.one_of(st.none(), st.tuples(st.integers(1, 3), st.integers(1, 3))))
    return dict(k=(kh, kw), d=(dh, dw), p=(ph, pw), s=stride, H=H, W=W, C=draw(st.integers(1, 3)),
                ties=draw(st.booleans()), ceil=draw(st.booleans()))


@given(max_cases())
def test_maxpool2d_selection_at_point(c):
    g = torch.Generator().manual_seed(5)
    x = torch.randn(c["C"], c["H"], c["W"], generator=g, dtype=torch.float64)
    if c["ties"]:  # few distinct values: many windows with tied maxima
        x = torch.randint(0, 3, x.shape, generator=g).to(torch.float64)
    kw = dict(kernel_size=c["k"], stride=c["s"], padding=c["p"], dilation=c["d"], ceil_mode=c["ceil"])
    y, idx = F.max_pool2d(x[None], return_indices=True, **kw)
    if torch.isinf(y).any():  # a window with no real input (only padding): not a selection
        with pytest.raises(ValueError, match="entirely in the padding"):
            MaxPool2d(x, **kw)
        return
    op = MaxPool2d(x, **kw)
    # the selection reproduces the layer at the point, with torch's tie-breaking
    assert torch.equal(op.apply(x[None]), y)
    assert torch.equal(op.indices, idx[0])
    A = op.to_sparse()
    assert np.array_equal(A @ x.reshape(-1).numpy(), y.reshape(-1).numpy())
    assert A.nnz == op.shape[0] and np.all(A.data == 1)
    # adjoint == torch's max_pool2d backward at x (routes every cotangent to the argmax)
    v = torch.randn((1,) + op.out_shape, generator=g, dtype=torch.float64)
    xg = x[None].clone().requires_grad_(True)
    (vjp,) = torch.autograd.grad(F.max_pool2d(xg, **kw), xg, v)
    assert torch.allclose(op.apply_adjoint(v), vjp, rtol=1e-15, atol=0)
    # the selection is linear and defined anywhere: all forms agree with itself / adjoint
    check_forms(op, lambda t: t.reshape(t.shape[0], -1)[:, op.index].reshape((t.shape[0],) + op.out_shape))
    # rebuilt from torch's indices (planar) and from flat (C,H,W) indices
    op2 = MaxPool2d.from_indices(idx, (c["C"], c["H"], c["W"]))
    op3 = MaxPool2d.from_indices(op.index.reshape(op.out_shape), (c["C"], c["H"], c["W"]), planar=False)
    assert (op2.to_sparse() != A).nnz == 0 and (op3.to_sparse() != A).nnz == 0


# ============================================================================ elementwise
def _point_with_kinks(shape=(3, 4, 5), kinks=(0.0,), seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=g, dtype=torch.float64)
    flat = x.view(-1)
    for i, k in enumerate(kinks):  # plant exact kink values
        flat[i::7 + i] = k
    return x


def _autograd_slopes(f, x):
    xg = x.clone().requires_grad_(True)
    (d,) = torch.autograd.grad(f(xg).sum(), xg)
    return d


@pytest.mark.parametrize(
    "make, f, kinks",
    [
        (lambda x: ReLUMask(x), torch.relu, (0.0,)),
        (lambda x: LeakyReLUMask(x, 0.1), lambda t: F.leaky_relu(t, 0.1), (0.0,)),
        (lambda x: PReLUMask(x, torch.tensor([0.25])), lambda t: F.prelu(t, torch.tensor([0.25], dtype=t.dtype)), (0.0,)),
        (lambda x: PReLUMask(x, np.array([0.1, -0.2, 0.3])),  # float64 slopes, as the float64 reference
         lambda t: F.prelu(t[None], torch.tensor([0.1, -0.2, 0.3], dtype=t.dtype))[0], (0.0,)),
        (lambda x: PiecewiseLinearMask(x, [0.0], [0.0, 1.0]), torch.relu, (0.0,)),
        (lambda x: PiecewiseLinearMask(x, [-1.0, 1.0], [0.0, 1.0, 0.0], at_breakpoint=[0.0, 0.0]),
         F.hardtanh, (-1.0, 1.0, 0.0)),
        (lambda x: PiecewiseLinearMask(3 * x, [0.0, 6.0], [0.0, 1.0, 0.0], at_breakpoint=[0.0, 0.0]),
         lambda t: F.relu6(3 * t) / 3, (0.0, 2.0)),  # slopes of relu6 at 3x (chain rule factor 3 divided out)
        (lambda x: TanhDerivative(x), torch.tanh, ()),
        (lambda x: SigmoidDerivative(x), torch.sigmoid, ()),
    ],
)
def test_activation_masks_equal_autograd(make, f, kinks):
    """The mask's diagonal is torch autograd's elementwise derivative, kinks included."""
    x = _point_with_kinks(kinks=kinks)
    op = make(x)
    d = _autograd_slopes(f, x)
    if isinstance(op, (TanhDerivative, SigmoidDerivative)):
        # same formula, possibly another evaluation order (e.g. fused 1 - y*y): values are
        # <= 1, so the difference is a few rounding errors of 1, i.e. a few eps absolute
        assert torch.allclose(op.diag, d, rtol=0, atol=4 * 2.2e-16), (op.diag - d).abs().max()
    else:  # piecewise-linear slopes are exact values, kinks included
        assert torch.equal(op.diag, d), (op.diag - d).abs().max()
    check_forms(op, lambda t: t * op.diag)


def test_piecewise_linear_identity_at_point():
    """For activations through the origin, σ(x) = Σ(x) x exactly (seed 000 Eq. C.9)."""
    x = _point_with_kinks(kinks=(0.0,))
    assert torch.equal(ReLUMask(x).apply(x[None])[0], torch.relu(x))
    assert torch.equal(LeakyReLUMask(x, 0.2).apply(x[None])[0], F.leaky_relu(x, 0.2))
    m = PiecewiseLinearMask(x, [-0.5, 0.0, 0.7], [0.1, 0.3, 1.0, 2.0], at_breakpoint="right")
    # the piecewise-linear function with those slopes through the origin
    ref = torch.where(x > 0.7, 0.7 + 2 * (x - 0.7), torch.where(x > 0, x, torch.where(x > -0.5, 0.3 * x, -0.15 + 0.1 * (x + 0.5))))
    # value identity holds only on the pieces through 0 (the others have an intercept)
    on = (x > -0.5) & (x <= 0.7)
    assert torch.allclose((m.diag * x)[on], ref[on], rtol=1e-15, atol=0)
    # "right": at the breakpoint 0 the slope of the interval above (1.0)
    assert torch.all(m.diag[x == 0] == 1.0)


def test_relu_mask_drops_inactive_units():
    x = torch.tensor([[-1.0, 0.0, 2.0, 3.0]], dtype=torch.float64)
    A = ReLUMask(x).to_sparse()
    assert A.nnz == 2 and np.array_equal(A.indices, [2, 3])
    assert Diagonal(np.array([0.0, 1.0]), keep_zeros=True).to_sparse().nnz == 2


# ============================================================================ structural
@pytest.mark.parametrize("mode", ["channel", "scalar", "unit"])
@pytest.mark.parametrize("embedded", [False, True])
def test_bias_restriction(mode, embedded):
    out = (3, 2, 4)
    m = {"channel": 3, "scalar": 1, "unit": 24}[mode]
    kw = dict(bias_size=m + 7, offset=5) if embedded else {}
    op = BiasRestriction(out, mode, **kw)
    off = 5 if embedded else 0

    def ref(xb):
        b = xb[:, off:off + m]
        if mode == "unit":
            return b.reshape((-1,) + out)
        # channel: (N, C, 1, 1); scalar: (N, 1, 1, 1) — broadcast by multiplying with ones
        return b[:, :, None, None] * torch.ones(out, dtype=xb.dtype)

    A = check_forms(op, ref)
    assert A.nnz == 24  # every output unit reads exactly one bias entry


def test_bias_restriction_fc_layer():
    op = BiasRestriction((10,), "channel", bias_size=30, offset=20)
    check_forms(op, lambda xb: xb[:, 20:30])


def test_channel_pad_subsample_flatten_identity_scale():
    check_forms(ChannelPad((3, 4, 5), 2, 1), lambda x: F.pad(x, (0, 0, 0, 0, 2, 1)))
    check_forms(ChannelPad((3, 4, 5), 0, 3), lambda x: torch.cat([x, torch.zeros_like(x)], 1))
    check_forms(Subsample((2, 7, 6)), lambda x: x[:, :, ::2, ::2])
    check_forms(Subsample((2, 7, 6), stride=(3, 2), offset=(1, 1)), lambda x: x[:, :, 1::3, 1::2])
    check_forms(Flatten((2, 3, 4)), lambda x: x.flatten(1))
    check_forms(Identity((2, 3)), lambda x: x.clone())
    check_forms(Scale((3, 2, 2), 0.37), lambda x: 0.37 * x)
    alpha = torch.tensor([0.5, -2.0, 0.0], dtype=torch.float64)
    op = Scale((3, 2, 2), alpha)
    check_forms(op, lambda x: x * alpha[:, None, None])
    assert op.to_sparse().nnz == 8  # the zero channel stores nothing


def test_resnet_shortcut_chain():
    """ResNet20 stage-change shortcut: stride-2 subsampling, then zero channels (Table D.3)."""
    op = Chain([Subsample((2, 6, 6)), ChannelPad((2, 3, 3), 1, 1)])
    assert op.out_shape == (4, 3, 3)
    check_forms(op, lambda x: F.pad(x[:, :, ::2, ::2], (0, 0, 0, 0, 1, 1)))


def test_vstack_sum_chain_of_convs():
    g = torch.Generator().manual_seed(11)
    w1 = torch.randn(3, 2, 3, 3, generator=g, dtype=torch.float64)
    w2 = torch.randn(2, 2, 1, 1, generator=g, dtype=torch.float64)
    w3 = torch.randn(4, 5, 3, 3, generator=g, dtype=torch.float64)
    c1, c2 = Conv2d(w1, (2, 5, 5), padding=1), Conv2d(w2, (2, 5, 5))
    cat = VStack([c1, c2])
    assert cat.out_shape == (5, 5, 5)
    check_forms(cat, lambda x: torch.cat([F.conv2d(x, w1, padding=1), F.conv2d(x, w2)], 1), dense_exact=False)
    flat = VStack([c1, Flatten((2, 5, 5))])
    assert flat.out_shape == (75 + 50,)
    check_forms(flat, lambda x: torch.cat([F.conv2d(x, w1, padding=1).flatten(1), x.flatten(1)], 1), dense_exact=False)
    w2b = torch.randn(3, 2, 1, 1, generator=g, dtype=torch.float64)
    s = Sum([c1, Conv2d(w2b, (2, 5, 5)), Conv2d(w1, (2, 5, 5), padding=1)])
    check_forms(s, lambda x: 2 * F.conv2d(x, w1, padding=1) + F.conv2d(x, w2b), dense_exact=False)
    # a small conv net slice: conv -> ReLU mask -> avg pool -> conv, as in J's recurrence
    x0 = torch.randn(1, 2, 5, 5, generator=g, dtype=torch.float64)
    mask = ReLUMask(F.conv2d(x0, w1, padding=1)[0])
    net = Chain([c1, mask, AvgPool2d((3, 5, 5), 3, 1, 1), Chain([ChannelPad((3, 5, 5), 1, 1), Conv2d(w3, (5, 5, 5))])])
    d = mask.diag

    def ref(x):
        y = F.avg_pool2d(F.conv2d(x, w1, padding=1) * d, 3, 1, 1)
        return F.conv2d(F.pad(y, (0, 0, 0, 0, 1, 1)), w3)

    A = check_forms(net, ref, dense_exact=False)
    P = c1.to_sparse()
    for op in net.ops[1:]:
        P = op.to_sparse() @ P
    assert abs(A - P).max() == 0  # the chain's CSR is the product of its parts


# ============================================================================ dottest for every operator
def _all_ops():
    g = torch.Generator().manual_seed(2)
    x = torch.randn(3, 6, 6, generator=g, dtype=torch.float64)
    c = Conv2d(torch.randn(4, 3, 3, 3, generator=g, dtype=torch.float64), (3, 6, 6), stride=2, padding=(0, 1, 1, 2))
    return [
        c,
        Conv2d(torch.randn(6, 1, 2, 3, generator=g, dtype=torch.float64), (3, 6, 6), dilation=2, groups=3),
        Linear(torch.randn(4, 9, generator=g, dtype=torch.float64)),
        AvgPool2d((3, 6, 6), 3, 2, 1, count_include_pad=False, ceil_mode=True),
        GlobalAvgPool2d((3, 6, 6)),
        GlobalAvgPool2d((3, 6, 6), keepdim=False),
        MaxPool2d(x, 2),
        MaxPool2d(x, 3, 1, 1),
        Diagonal(torch.randn(3, 6, 6, generator=g, dtype=torch.float64)),
        ReLUMask(x), LeakyReLUMask(x, 0.1), PReLUMask(x, [0.1, 0.2, 0.3]),
        PiecewiseLinearMask(x, [-1, 1], [0.1, 1, 0.2]), TanhDerivative(x), SigmoidDerivative(x),
        BiasRestriction((3, 6, 6), "channel", bias_size=10, offset=2), BiasRestriction((3, 6, 6), "scalar"),
        BiasRestriction((3, 6, 6), "unit"),
        ChannelPad((3, 6, 6), 1, 2), Subsample((3, 6, 6)), Flatten((3, 6, 6)), Identity((3, 6, 6)),
        Scale((3, 6, 6), [1.0, 2.0, 3.0]),
        VStack([c, c]), Sum([c, c]), Chain([c, Flatten(c.out_shape)]),
        Slice(10, 2, 7), HStack([c, Diagonal(torch.randn(c.out_shape, generator=g, dtype=torch.float64))]),
        Concat([(2, 3, 3), (4, 3, 3)]), Concat([(3, 2, 4), (3, 2, 1)], axis=2),
        _diamond(c, x),
    ]


def _diamond(c, x):
    """A small DAG: y = relu-mask(c x) + c x, concatenated with c x, plus R x_b."""
    m = ReLUMask(c.apply(x[None])[0])
    return GraphOperator(
        [(3, 6, 6), (4,)],
        [([0], c), ([2], m), ([3, 2], HStack([Identity(c.out_shape), Identity(c.out_shape)])),
         ([4, 2], Concat([c.out_shape, c.out_shape])),
         ([5, 1], HStack([Identity((8,) + c.out_shape[1:]), BiasRestriction((8,) + c.out_shape[1:], bias_size=4,
                                                                             offset=0, mode="scalar")]))])


@pytest.mark.parametrize("op", _all_ops(), ids=lambda op: type(op).__name__)
def test_dottest_every_operator(op):
    yAx, xAty = dottest(op, rng=3)
    assert yAx != 0.0  # a vacuous 0 == 0 would not test anything
    dottest(op.T, rng=4)
    dottest(op, rng=5, dtype=np.float32)
    # numpy in -> numpy out; matmat/rmatmat with several columns agree with the CSR
    A = op.to_sparse()
    X = np.random.default_rng(0).standard_normal((op.shape[1], 3))
    Y = np.random.default_rng(1).standard_normal((op.shape[0], 3))
    mm, rm = op.matmat(X), op.rmatmat(Y)
    assert isinstance(mm, np.ndarray) and mm.shape == (op.shape[0], 3)
    _close(mm, A @ X, abs(A) @ np.abs(X), RTOL64, "matmat")
    _close(rm, A.T @ Y, abs(A).T @ np.abs(Y), RTOL64, "rmatmat")


def test_dottest_detects_a_wrong_adjoint():
    class Broken(Conv2d):
        def _apply_adjoint(self, y):
            return 1.001 * super()._apply_adjoint(y)

    op = Broken(torch.randn(2, 2, 3, 3, dtype=torch.float64), (2, 5, 5))
    with pytest.raises(AssertionError, match="dottest failed"):
        dottest(op, rng=0)


# ============================================================================ bad input
W4 = torch.zeros(4, 2, 3, 3)


@pytest.mark.parametrize(
    "make, exc, match",
    [
        (lambda: Conv2d(W4, (2, 8, 8), padding_mode="reflect"), NotImplementedError, "padding_mode='reflect'"),
        (lambda: Conv2d(W4, (3, 8, 8)), ValueError, "C_in=3"),
        (lambda: Conv2d(W4, (2, 8)), ValueError, "input_shape"),
        (lambda: Conv2d(torch.zeros(4, 2, 3), (2, 8, 8)), ValueError, "weight"),
        (lambda: Conv2d(W4, (2, 2, 2)), ValueError, "larger than the padded input"),
        (lambda: Conv2d(W4, (2, 4, 4), dilation=2), ValueError, "larger than the padded input"),
        (lambda: Conv2d(W4, (2, 8, 8), stride=2, padding="same"), ValueError, "padding='same'"),
        (lambda: Conv2d(W4, (2, 8, 8), padding="full"), ValueError, "'full'"),
        (lambda: Conv2d(W4, (2, 8, 8), padding=-1), ValueError, "padding"),
        (lambda: Conv2d(W4, (2, 8, 8), padding=(1, 2, 3)), ValueError, "padding"),
        (lambda: Conv2d(W4, (2, 8, 8), stride=0), ValueError, "stride"),
        (lambda: Conv2d(torch.zeros(3, 2, 3, 3), (4, 8, 8), groups=2), ValueError, "groups=2"),
        (lambda: Conv2d(W4, (6, 8, 8), groups=3), ValueError, "groups=3"),
        (lambda: Linear(torch.zeros(3)), ValueError, "weight"),
        (lambda: AvgPool2d((2, 8, 8), 2, padding=2), ValueError, "padding"),
        (lambda: AvgPool2d((2, 2, 2), 3), ValueError, "kernel_size"),
        (lambda: AvgPool2d((2, 8, 8), 2, divisor_override=0), ValueError, "divisor_override"),
        (lambda: AvgPool2d((2, 8), 2), ValueError, "input_shape"),
        (lambda: MaxPool2d(torch.zeros(2, 8), 2), ValueError, "shape"),
        (lambda: MaxPool2d(torch.zeros(2, 8, 8), 2, padding=2), ValueError, "padding"),
        (lambda: MaxPool2d.from_indices(torch.full((2, 4, 4), 64), (2, 8, 8)), ValueError, "indices"),
        (lambda: PReLUMask(torch.zeros(3, 2, 2), [0.1, 0.2]), ValueError, "weight"),
        (lambda: PiecewiseLinearMask(torch.zeros(3), [0.0], [1.0]), ValueError, "slopes"),
        (lambda: PiecewiseLinearMask(torch.zeros(3), [1.0, 0.0], [1.0, 2.0, 3.0]), ValueError, "increasing"),
        (lambda: PiecewiseLinearMask(torch.zeros(3), [0.0], [0, 1], at_breakpoint="middle"), ValueError, "at_breakpoint"),
        (lambda: Diagonal(np.ones(5), (2, 2)), ValueError, "shape"),
        (lambda: BiasRestriction((3, 4, 4), "row"), ValueError, "mode"),
        (lambda: BiasRestriction((3, 4, 4), "channel", bias_size=4, offset=2), ValueError, "bias_size=4"),
        (lambda: ChannelPad((3, 4, 4), -1, 0), ValueError, "before"),
        (lambda: Subsample((3, 4, 4), offset=(4, 0)), ValueError, "offset"),
        (lambda: Scale((3, 4, 4), [1.0, 2.0]), ValueError, "alpha"),
        (lambda: Chain([Identity((3, 4, 4)), Identity((48,))]), ValueError, "Flatten"),
        (lambda: Sum([Identity((3,)), Identity((4,))]), ValueError, "Sum"),
        (lambda: VStack([Identity((3,)), Identity((4,))]), ValueError, "VStack"),
        (lambda: VStack([]), ValueError, "at least one"),
    ],
)
def test_bad_input_raises_naming_the_option(make, exc, match):
    with pytest.raises(exc, match=match):
        make()


def test_wrong_runtime_shapes_raise():
    op = Conv2d(W4, (2, 8, 8))
    with pytest.raises(ValueError, match=r"input must have shape \(N, 2, 8, 8\)"):
        op.apply(torch.zeros(1, 2, 8, 7))
    with pytest.raises(ValueError):
        op.matvec(np.zeros(op.shape[1] + 1))


def test_integer_inputs_use_the_operator_dtype_and_complex_is_refused():
    # an integer batch must not cast the weights to integers (that truncates them)
    w = torch.randn(4, 2, 3, 3, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    op = Conv2d(w, (2, 8, 8))
    xi = torch.arange(2 * 2 * 8 * 8).reshape(2, 2, 8, 8) % 5 - 2
    y = op.apply(xi)
    assert y.dtype == torch.float64 and torch.equal(y, op.apply(xi.double())) and y.abs().max() > 1
    yi = torch.ones(2, *op.out_shape, dtype=torch.int32)
    assert torch.equal(op.apply_adjoint(yi), op.apply_adjoint(yi.double()))
    assert np.array_equal(op.matvec(xi[0].reshape(-1).numpy()), y[0].reshape(-1).numpy())
    with pytest.raises(ValueError, match="complex"):
        op.matvec(np.zeros(op.shape[1], dtype=complex))
    with pytest.raises(ValueError, match="complex"):
        op.apply(torch.zeros(1, 2, 8, 8, dtype=torch.complex128))


# ============================================================================ GPU
@pytest.mark.gpu
def test_gpu_inputs_give_gpu_outputs():
    import cupy as cp  # only reached with cupy + a device (conftest skips otherwise)

    g = torch.Generator().manual_seed(0)
    w = torch.randn(4, 3, 3, 3, generator=g, dtype=torch.float64)
    x = torch.randn(3, 9, 9, generator=g, dtype=torch.float64)
    ops = [Conv2d(w, (3, 9, 9), stride=2, padding=(1, 0, 2, 1)), AvgPool2d((3, 9, 9), 3, 2, 1),
           MaxPool2d(x, 2), ReLUMask(x), Chain([Subsample((3, 9, 9)), ChannelPad((3, 5, 5), 1, 0)])]
    for op in ops:
        xn = np.random.default_rng(0).standard_normal(op.shape[1])
        yn = np.random.default_rng(1).standard_normal(op.shape[0])
        xc, yc = cp.asarray(xn), cp.asarray(yn)
        y_gpu, z_gpu = op.matvec(xc), op.rmatvec(yc)
        assert isinstance(y_gpu, cp.ndarray) and isinstance(z_gpu, cp.ndarray)
        A = op.to_sparse()
        scale_f, scale_a = abs(A) @ np.abs(xn), abs(A).T @ np.abs(yn)
        _close(y_gpu.get(), op.matvec(xn), scale_f, RTOL64, "gpu matvec")
        _close(z_gpu.get(), op.rmatvec(yn), scale_a, RTOL64, "gpu rmatvec")
        Ag = op.to_sparse(gpu=True)
        assert backend.is_cupy(Ag)
        _close((Ag @ xc).get(), A @ xn, scale_f, RTOL64, "gpu csr")
        assert (Ag.get() != A).nnz == 0
        Xc = cp.asarray(np.random.default_rng(2).standard_normal((op.shape[1], 2)))
        assert isinstance(op.matmat(Xc), cp.ndarray)


def test_composite_block_rows_and_graph():
    """HStack / Concat part-wise evaluation equals the stacked form; a GraphOperator equals
    its hand-written composition, and its CSR is that of the Chain/Sum/VStack tree."""
    g = torch.Generator().manual_seed(7)
    a, b = torch.randn(2, 2, 3, 3, generator=g, dtype=torch.float64), torch.randn(2, 4, 3, 3, generator=g, dtype=torch.float64)
    cat = Concat([(2, 3, 3), (4, 3, 3)])
    assert torch.equal(cat.apply_parts([a, b]), torch.cat([a, b], 1))
    assert torch.equal(cat.apply(torch.cat([a.reshape(2, -1), b.reshape(2, -1)], 1)), torch.cat([a, b], 1))
    assert np.array_equal(cat.to_sparse().toarray(), np.eye(54))  # channel concatenation in C order
    c = Conv2d(torch.randn(3, 2, 3, 3, generator=g, dtype=torch.float64), (2, 5, 5), padding=1)
    d = Conv2d(torch.randn(3, 3, 1, 1, generator=g, dtype=torch.float64), (3, 5, 5))
    # y = d(c x) + c x as a DAG (c evaluated once) and as a tree (Sum of Chains)
    G = GraphOperator([(2, 5, 5)], [([0], c), ([1], d), ([2, 1], HStack([Identity((3, 5, 5))] * 2))])
    T = Sum([Chain([c, d]), c])
    X = torch.randn(4, 50, generator=g, dtype=torch.float64)
    _close(G.apply(X), T.apply(X.reshape(4, 2, 5, 5)), T.apply(X.abs().reshape(4, 2, 5, 5)).abs() + 1, RTOL64, "DAG")
    _close(G.to_sparse().toarray(), T.to_sparse().toarray(), abs(T.to_sparse()).toarray() + 1, RTOL64, "DAG CSR")
    with pytest.raises(ValueError, match="earlier entries"):
        GraphOperator([(2, 5, 5)], [([1], c)])


def test_masks_follow_the_single_sample_batch_rule():
    """One sample, with or without a batch axis of 1 when the shape is known; never silently."""
    x = torch.randn(1, 3, 4, 4, dtype=torch.float64)
    assert ReLUMask(x, shape=(3, 4, 4)).in_shape == (3, 4, 4) == MaxPool2d(x, 2).in_shape
    assert ReLUMask(x).in_shape == (1, 3, 4, 4)  # no shape given: x's own shape is the sample's
    with pytest.raises(ValueError, match="x must have shape"):
        LeakyReLUMask(torch.zeros(2, 3, 4, 4), 0.1, shape=(3, 4, 4))
    with pytest.raises(ValueError, match="one sample"):
        MaxPool2d(torch.zeros(2, 3, 4, 4), 2)


def test_composite_to_sparse_bounds_its_size_before_assembling():
    """Issue 12: a composite's CSR is refused (MemoryError with the size) before any product is
    formed when its non-zero bound exceeds max_bytes; the bound really bounds the assembled nnz."""
    rng = np.random.default_rng(0)
    c1 = Conv2d(rng.standard_normal((4, 3, 3, 3)), input_shape=(3, 8, 8), padding=1)
    c2 = Conv2d(rng.standard_normal((5, 4, 3, 3)), input_shape=(4, 8, 8), padding=1)
    for op in (Chain([c1, c2]), Sum([c1, c1]), VStack([c1, c1])):
        assert op.to_sparse().nnz <= op.nnz_bound()
        with pytest.raises(MemoryError, match=r"non-zeros.*bytes.*max_bytes=1,000 bytes"):
            op.to_sparse(max_bytes=1000)
