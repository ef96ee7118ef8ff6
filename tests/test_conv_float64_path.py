"""The shifted-GEMM evaluation of ``Conv2d`` (issue 10: a faster CPU float64 convolution).

It is an evaluation strategy of the same operator, so it must equal torch's ``F.conv2d`` /
``F.conv_transpose2d`` and the operator's explicit CSR matrix, pass the dottest, and be chosen
by a rule of the shapes / dtype / device only.

Tolerance.  Both paths form each output as a sum of the same ``K = C·k_h·k_w`` products
``w·x`` (the adjoint: ``C_out·k_h·k_w``), in different orders (torch: im2col dot products; this
path: per tap a ``C``-term GEMM dot, then the taps).  A float64 sum of K terms is within
``K·u·Σ|terms|`` of the exact value (u = 2^-53), so the two differ by at most
``2·K·u·(|A||x|)`` entrywise — at most ~3e-14 of ``|A||x|`` here (K ≤ 150).  Any wrong, missing
or shifted tap is an O(1) error relative to that scale.
"""
from __future__ import annotations

import contextlib

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from linop.operators import Conv2d, conv_gemm, conv_nhwc, dottest

U = 2.0 ** -53


@contextlib.contextmanager
def conv64(mode: str):
    """Temporarily set the module switch (a function-scoped fixture would not reset per example)."""
    old = conv_gemm.CONV64
    conv_gemm.CONV64 = mode
    try:
        yield
    finally:
        conv_gemm.CONV64 = old


@st.composite
def cases(draw):
    kh, kw = draw(st.integers(1, 5)), draw(st.integers(1, 5))
    dh, dw = draw(st.integers(1, 2)), draw(st.integers(1, 2))
    kind = draw(st.sampled_from(["int", "pair", "four", "same", "valid"]))
    if kind == "int":
        p = draw(st.integers(0, 3))
        pad = p
    elif kind == "pair":
        pad = (draw(st.integers(0, 3)), draw(st.integers(0, 3)))
    elif kind == "four":
        pad = tuple(draw(st.integers(0, 4)) for _ in range(4))
    else:
        pad = kind
    # an input at least as large as the dilated kernel (padding may make up the rest)
    H = dh * (kh - 1) + 1 + draw(st.integers(0, 5))
    W = dw * (kw - 1) + 1 + draw(st.integers(0, 5))
    return dict(c_in=draw(st.integers(1, 6)), c_out=draw(st.integers(1, 6)), k=(kh, kw), dilation=(dh, dw),
                padding=pad, H=H, W=W, n=draw(st.integers(1, 5)))


def _close(a: torch.Tensor, b: torch.Tensor, scale: torch.Tensor, K: int, what: str) -> None:
    bound = 2 * K * U * scale + 1e-300
    err = ((a - b).abs() / bound).max().item()
    assert err <= 1.0, f"{what}: difference {err:.2f}× the 2·K·u·|A||x| bound"


def _torch_forward(op: Conv2d, x: torch.Tensor) -> torch.Tensor:
    pt, pb, pl, pr = op.padding
    return F.conv2d(F.pad(x, (pl, pr, pt, pb)), op.weight, None, 1, 0, op.dilation)


@given(cases())
def test_shifted_gemm_equals_torch_sparse_and_dottest(case):
    g = torch.Generator().manual_seed(11)
    w = torch.randn(case["c_out"], case["c_in"], *case["k"], generator=g, dtype=torch.float64)
    op = Conv2d(w, (case["c_in"], case["H"], case["W"]), padding=case["padding"], dilation=case["dilation"])
    x = torch.randn((case["n"],) + op.in_shape, generator=g, dtype=torch.float64)
    y = torch.randn((case["n"],) + op.out_shape, generator=g, dtype=torch.float64)
    kh, kw = op.kernel_size
    with conv64("gemm"):
        assert conv_gemm.use_gemm(x, op.out_shape[0], op.kernel_size, op.stride, op.groups, op.padding)
        got = op.apply(x)
        got_t = op.apply_adjoint(y)
        dottest(op, rng=5)
        dottest(op.T, rng=6)
    # apply *is* the strategy (not torch's path by accident): bit for bit the direct call
    direct = conv_gemm.conv2d_shifted_gemm(x, conv_gemm.tap_weights(w), op.kernel_size, op.padding, op.dilation)
    assert torch.equal(got, direct)
    ref = _torch_forward(op, x)
    absop = Conv2d(w.abs(), op.in_shape, padding=op.padding, dilation=op.dilation)
    with conv64("torch"):
        scale = absop.apply(x.abs())
        ref_t = op.apply_adjoint(y)  # torch's F.conv_transpose2d
        scale_t = absop.apply_adjoint(y.abs())
    _close(got, ref, scale, case["c_in"] * kh * kw, "forward vs F.conv2d")
    _close(got_t, ref_t, scale_t, case["c_out"] * kh * kw, "adjoint vs F.conv_transpose2d")
    A = op.to_sparse()
    xs = x.reshape(case["n"], -1).numpy().T
    _close(got.reshape(case["n"], -1).T, torch.from_numpy(A @ xs), scale.reshape(case["n"], -1).T,
           case["c_in"] * kh * kw, "forward vs to_sparse()")
    ys = y.reshape(case["n"], -1).numpy().T
    _close(got_t.reshape(case["n"], -1).T, torch.from_numpy(A.T @ ys), scale_t.reshape(case["n"], -1).T,
           case["c_out"] * kh * kw, "adjoint vs to_sparse().T")


def test_channels_last_input_is_bit_identical():
    """The padded copy is the only read of x: its memory format cannot change a bit of either
    layout's result (the layout *chosen* follows the memory format: conv_gemm.choose)."""
    g = torch.Generator().manual_seed(2)
    w = torch.randn(8, 5, 3, 3, generator=g, dtype=torch.float64)
    x = torch.randn(3, 5, 9, 7, generator=g, dtype=torch.float64)
    xc = x.contiguous(memory_format=torch.channels_last)
    t, P, one = conv_gemm.tap_weights(w), (1, 1, 1, 1), (1, 1)
    assert torch.equal(conv_gemm.conv2d_shifted_gemm(x, t, (3, 3), P, one),
                       conv_gemm.conv2d_shifted_gemm(xc, t, (3, 3), P, one))
    tn, wm = conv_nhwc.nhwc_taps(t), conv_nhwc.patch_weight(w)
    assert torch.equal(conv_nhwc.conv2d_nhwc_shifted(x, tn, (3, 3), P, one),
                       conv_nhwc.conv2d_nhwc_shifted(xc, tn, (3, 3), P, one))
    assert torch.equal(conv_nhwc.conv2d_nhwc_im2col(x, wm, (3, 3), one, P, one),
                       conv_nhwc.conv2d_nhwc_im2col(xc, wm, (3, 3), one, P, one))
    op = Conv2d(w, (5, 9, 7), padding=1)
    with conv64("gemm"):
        assert conv_gemm.choose(x, 8, (3, 3), padding=P) == "cnhw"
        assert conv_gemm.choose(xc, 8, (3, 3), padding=P) in ("nhwc", "patch")
        assert op.apply(xc).stride(1) == 1  # channels-last in, channels-last out


def test_auto_rule():
    x64 = torch.zeros(2, 16, 32, 32, dtype=torch.float64)  # 16·32·32·16 = 262,144 ≥ MIN_MACS per image and tap
    use = conv_gemm.use_gemm
    with conv64("auto"):
        assert use(x64, 16, (3, 3))
        assert not use(x64.float(), 16, (3, 3))  # float32 stays on oneDNN
        assert not use(x64, 16, (3, 3), groups=2)  # groups > 1: torch
        assert not use(x64, 16, (3, 3), stride=(2, 2))  # stride > 1: torch
        assert not use(x64, 16, (3, 3), stride=(1, 2))
        assert not use(x64, 16, (1, 1))  # 1×1: torch measured faster
        assert not use(x64.to("meta"), 16, (3, 3))  # not the CPU (CUDA alike)
        assert not use(x64, 16, (3, 3), padding=(-1, 0, 0, 0))  # adjoint of over-padding
        assert not use(x64[:, :2], 3, (3, 3))  # tiny GEMMs (2·32·32·3): the per-call cost loses
        assert use(x64[:1], 16, (3, 3))  # per image: the batch size never changes the choice
        assert not use(torch.zeros(2, 96, 8, 8, dtype=torch.float64), 96, (3, 3))  # 8×8: too few columns
        assert use(x64, 8, (3, 3), adjoint=True)  # adjoints: only when 2·c_out >= C
        assert not use(x64, 7, (3, 3), adjoint=True)
        g = torch.Generator().manual_seed(1)
        op = Conv2d(torch.randn(32, 3, 3, 3, generator=g, dtype=torch.float64), (3, 32, 32), padding=1)
        y = torch.randn(2, 32, 32, 32, generator=g, dtype=torch.float64)
        assert torch.equal(op.apply_adjoint(y), F.conv_transpose2d(y, op.weight, None, 1, 1))
    with conv64("gemm"):
        assert use(x64[:1, :1].float(), 1, (1, 1))
        assert not use(x64, 16, (3, 3), stride=(2, 2))
        assert not use(x64.to("meta"), 16, (3, 3))
    with conv64("torch"):
        assert not use(x64, 16, (3, 3))
    # the tensor-free form (memory plans) agrees with use_gemm on plain CPU tensors
    for m in conv_gemm.MODES:
        with conv64(m):
            for t, co, kw in [(x64, 16, {}), (x64[:, :2], 3, {}), (x64, 7, dict(adjoint=True)),
                              (x64.float(), 16, {}), (x64, 16, dict(stride=(2, 2))), (x64, 16, dict(groups=2))]:
                assert conv_gemm.rule(tuple(t.shape[1:]), co, (3, 3), dtype=t.dtype, **kw) == use(t, co, (3, 3), **kw)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_torch_mode_and_float32_are_torch_bit_for_bit(dtype):
    g = torch.Generator().manual_seed(4)
    w = torch.randn(6, 4, 3, 3, generator=g, dtype=dtype)
    op = Conv2d(w, (4, 64, 64), padding=1)
    x = torch.randn(2, 4, 64, 64, generator=g, dtype=dtype)  # 4·4096·6 ≥ MIN_MACS: auto float64 is the GEMM path
    y = torch.randn(2, 6, 64, 64, generator=g, dtype=dtype)
    modes = ["torch"] + (["auto"] if dtype == torch.float32 else [])
    for m in modes:
        with conv64(m):
            assert torch.equal(op.apply(x), F.conv2d(x, w, None, 1, 1))
            assert torch.equal(op.apply_adjoint(y), F.conv_transpose2d(y, w, None, 1, 1))
    with conv64("auto"):  # and auto float64 is the other strategy: equal to rounding, not bitwise here
        assert conv_gemm.use_gemm(x.double(), 6, (3, 3), padding=op.padding)
        assert torch.allclose(op.apply(x.double()), F.conv2d(x.double(), w.double(), None, 1, 1), rtol=0, atol=1e-12)


def test_groups_and_stride_keep_torch():
    g = torch.Generator().manual_seed(8)
    x = torch.randn(2, 4, 9, 9, generator=g, dtype=torch.float64)
    for kw in (dict(groups=2, w=torch.randn(6, 2, 3, 3, generator=g, dtype=torch.float64), stride=1),
               dict(groups=1, w=torch.randn(6, 4, 3, 3, generator=g, dtype=torch.float64), stride=2)):
        op = Conv2d(kw["w"], (4, 9, 9), padding=1, stride=kw["stride"], groups=kw["groups"])
        with conv64("auto"):
            assert torch.equal(op.apply(x), F.conv2d(x, kw["w"], None, kw["stride"], 1, 1, kw["groups"]))


def test_env_switch(monkeypatch):
    for m in ("torch", "gemm", "auto", " AUTO ", ""):
        monkeypatch.setenv("LINOP_CONV64", m)
        assert conv_gemm._env_mode() == (m.strip().lower() or "auto")
    monkeypatch.setenv("LINOP_CONV64", "fast")
    with conv64(conv_gemm._env_mode()), pytest.raises(ValueError, match="LINOP_CONV64.*'fast'"):
        conv_gemm.use_gemm(torch.zeros(1, 1, 3, 3, dtype=torch.float64), 1, (3, 3))


def test_workspace_formula():
    """(C_in + C_out)·G per image: the shared frame of a 3×3 'same' conv on 8×8 is 9×9, its slot
    81 columns rounded up to 88 (64 bytes)."""
    assert conv_gemm.grid(8, 8, (1, 1, 1, 1), (3, 3), (1, 1)) == (9, 9, 8, 8)
    assert conv_gemm.workspace(16, 32, 8, 8, (1, 1, 1, 1), (3, 3), (1, 1)) == 48 * 88
    # padding wider than the kernel reaches: the grid must hold the larger output
    assert conv_gemm.grid(4, 4, (3, 3, 0, 0), (3, 1), (1, 1)) == (8, 4, 8, 4)


def test_autograd_and_torch_func_keep_torch():
    """The path writes into preallocated blocks (no autograd): differentiated calls keep torch's path."""
    g = torch.Generator().manual_seed(9)
    w = torch.randn(5, 4, 3, 3, generator=g, dtype=torch.float64)
    op = Conv2d(w, (4, 6, 6), padding=1)
    x = torch.randn(2, 4, 6, 6, generator=g, dtype=torch.float64)
    with conv64("gemm"):
        assert conv_gemm.use_gemm(x, 5, (3, 3))
        xr = x.clone().requires_grad_(True)
        out = op.apply(xr)
        assert torch.equal(out, F.conv2d(x, w, None, 1, 1))
        out.sum().backward()
        assert torch.equal(xr.grad, F.conv_transpose2d(torch.ones_like(out), w, None, 1, 1))
        with torch.no_grad():  # no history to record: the fast path
            assert conv_gemm.use_gemm(xr, 5, (3, 3))
        J = torch.func.jacfwd(lambda v: op.apply(v))(x[:1])
        assert torch.allclose(J.reshape(op.shape[0], -1), torch.from_numpy(op.to_sparse().toarray()), rtol=0, atol=0)


def test_batch_invariance():
    """An image's values do not depend on the batch it is evaluated in (streamed / chunked sweeps
    and back-maps must equal the whole batch bit for bit): every sub-batch equals its rows."""
    g = torch.Generator().manual_seed(12)
    op = Conv2d(torch.randn(7, 6, 3, 3, generator=g, dtype=torch.float64), (6, 10, 9), padding=(1, 2, 0, 1),
                dilation=(1, 2))
    x = torch.randn(9, 6, 10, 9, generator=g, dtype=torch.float64)
    y = torch.randn((9,) + op.out_shape, generator=g, dtype=torch.float64)
    with conv64("gemm"):
        full, full_t = op.apply(x), op.apply_adjoint(y)
        for i, n in [(0, 1), (1, 1), (2, 3), (3, 4), (5, 4), (8, 1)]:
            assert torch.equal(op.apply(x[i:i + n]), full[i:i + n])
            assert torch.equal(op.apply_adjoint(y[i:i + n]), full_t[i:i + n])


# --------------------------------------------------------------------------- channels-last (NHWC) layouts
CL = torch.channels_last


@contextlib.contextmanager
def shift_pixels(n: int | None, channels: int | None = None):
    """Temporarily set the image size (and channels) from which stride-1 channels-last convs use
    NHWC shifted GEMMs (0: always; None: never — the patch GEMM), so small shapes exercise both."""
    old = conv_gemm.NHWC_SHIFT_PIXELS, conv_gemm.NHWC_SHIFT_CHANNELS
    conv_gemm.NHWC_SHIFT_PIXELS = n
    conv_gemm.NHWC_SHIFT_CHANNELS = (n or 0) if channels is None else channels
    try:
        yield
    finally:
        conv_gemm.NHWC_SHIFT_PIXELS, conv_gemm.NHWC_SHIFT_CHANNELS = old


@contextlib.contextmanager
def patch_transposed(on: bool):
    """Temporarily run every patch GEMM transposed (``Y_nᵀ = Wᵀ Pᵀ``) or none."""
    old = conv_nhwc.T_MIN_PIXELS, conv_nhwc.T_MIN_CHANNELS
    conv_nhwc.T_MIN_PIXELS = conv_nhwc.T_MIN_CHANNELS = 0 if on else 10**9
    try:
        yield
    finally:
        conv_nhwc.T_MIN_PIXELS, conv_nhwc.T_MIN_CHANNELS = old


@st.composite
def nhwc_cases(draw):
    case = draw(cases())
    s = (draw(st.integers(1, 3)), draw(st.integers(1, 3)))
    if s != (1, 1) and case["padding"] == "same":  # torch refuses 'same' with stride
        case["padding"] = 1
    case.update(stride=s, c_in=draw(st.integers(2, 6)), H=case["H"] + 1, W=case["W"] + 1,
                shifted=draw(st.booleans()), transposed=draw(st.booleans()))
    return case


def _as_linear_operator(op: Conv2d):
    """``op``'s matvec / rmatvec on one channels-last image: ``dottest`` of the NHWC strategies
    (the Operator's own matvec reshapes to NCHW, which takes the CNHW / torch path)."""
    import scipy.sparse.linalg as spla

    def fwd(v):
        return op.apply(torch.from_numpy(v.reshape((1,) + op.in_shape)).contiguous(memory_format=CL)).reshape(-1).numpy()

    def adj(v):
        return op.apply_adjoint(torch.from_numpy(v.reshape((1,) + op.out_shape)).contiguous(memory_format=CL)
                                ).reshape(-1).numpy()

    return spla.LinearOperator(op.shape, matvec=fwd, rmatvec=adj, dtype=float)


@given(nhwc_cases())
def test_nhwc_paths_equal_torch_sparse_and_dottest(case):
    """Both channels-last strategies (stride 1: NHWC shifted GEMMs or the patch GEMM, in either
    orientation; stride > 1: the patch GEMM; adjoints of stride 1) equal F.conv2d / F.conv_transpose2d and to_sparse()
    within the 2·K·u·|A||x| bound of the module docstring (K = C_in·k_h·k_w products per output,
    C_out·k_h·k_w per adjoint output), return channels-last, and pass the dottest."""
    g = torch.Generator().manual_seed(13)
    w = torch.randn(case["c_out"], case["c_in"], *case["k"], generator=g, dtype=torch.float64)
    op = Conv2d(w, (case["c_in"], case["H"], case["W"]), stride=case["stride"], padding=case["padding"],
                dilation=case["dilation"])
    n = case["n"]
    x = torch.randn((n,) + op.in_shape, generator=g, dtype=torch.float64).contiguous(memory_format=CL)
    y = torch.randn((n,) + op.out_shape, generator=g, dtype=torch.float64).contiguous(memory_format=CL)
    kh, kw = op.kernel_size
    s1 = op.stride == (1, 1)
    with conv64("gemm"), shift_pixels(0 if case["shifted"] else None), patch_transposed(case["transposed"]):
        how = conv_gemm.choose(x, op.out_shape[0], op.kernel_size, op.stride, op.groups, op.padding)
        assert how == ("nhwc" if s1 and case["shifted"] else "patch")
        got = op.apply(x)
        got_t = op.apply_adjoint(y)
        dottest(_as_linear_operator(op), rng=7)
    if op.out_shape[0] > 1:
        assert got.stride(1) == 1  # channels-last out: no transpose for the next step
    if how == "patch":
        assert got.is_contiguous(memory_format=CL)
    pt, pb, pl, pr = op.padding
    ref = F.conv2d(F.pad(x, (pl, pr, pt, pb)), w, None, op.stride, 0, op.dilation)
    absop = Conv2d(w.abs(), op.in_shape, stride=op.stride, padding=op.padding, dilation=op.dilation)
    with conv64("torch"):
        scale = absop.apply(x.abs())
        ref_t = op.apply_adjoint(y)  # F.conv_transpose2d
        scale_t = absop.apply_adjoint(y.abs())
    _close(got, ref, scale, case["c_in"] * kh * kw, "forward vs F.conv2d")
    _close(got_t, ref_t, scale_t, case["c_out"] * kh * kw, "adjoint vs F.conv_transpose2d")
    A = op.to_sparse()
    _close(got.reshape(n, -1).T, torch.from_numpy(A @ x.reshape(n, -1).numpy().T), scale.reshape(n, -1).T,
           case["c_in"] * kh * kw, "forward vs to_sparse()")
    _close(got_t.reshape(n, -1).T, torch.from_numpy(A.T @ y.reshape(n, -1).numpy().T), scale_t.reshape(n, -1).T,
           case["c_out"] * kh * kw, "adjoint vs to_sparse().T")


def _nhwc_ops():
    g = torch.Generator().manual_seed(21)
    mk = lambda co, ci, k, shape, **kw: Conv2d(torch.randn(co, ci, k, k, generator=g, dtype=torch.float64), shape, **kw)
    return [mk(7, 6, 3, (6, 10, 9), padding=(1, 2, 0, 1), dilation=(1, 2)),
            mk(8, 5, 3, (5, 11, 9), stride=2, padding=1),
            mk(6, 4, 5, (4, 12, 10), stride=(3, 1), padding=2)]


@pytest.mark.parametrize("shifted, transposed", [(True, False), (False, False), (False, True)])
def test_nhwc_batch_invariance(shifted, transposed):
    """An image's values do not depend on the batch it is evaluated in: every sub-batch of a
    channels-last batch equals its rows of the whole batch, bit for bit (one GEMM per image)."""
    g = torch.Generator().manual_seed(22)
    with conv64("gemm"), shift_pixels(0 if shifted else None), patch_transposed(transposed):
        for op in _nhwc_ops():
            x = torch.randn((9,) + op.in_shape, generator=g, dtype=torch.float64).contiguous(memory_format=CL)
            y = torch.randn((9,) + op.out_shape, generator=g, dtype=torch.float64).contiguous(memory_format=CL)
            full, full_t = op.apply(x), op.apply_adjoint(y)
            for i, n in [(0, 1), (1, 1), (2, 3), (3, 4), (5, 4), (8, 1)]:
                assert torch.equal(op.apply(x[i:i + n]), full[i:i + n])
                assert torch.equal(op.apply_adjoint(y[i:i + n]), full_t[i:i + n])


def test_nhwc_thread_count_invariance():
    """1 and 2 torch threads give the same bits (serial studies may run 2 threads, Dask workers 1):
    the per-image GEMMs' entries are summed alike whatever MKL's thread split of the output.  Shapes of the reference
    models (96→96 @8², stride-2 32→64 @16², 32→32 @32², 64→64 @16²: both orientations of the
    patch GEMM) so MKL's real blocking is exercised."""
    g = torch.Generator().manual_seed(23)
    mk = lambda co, ci, H, **kw: Conv2d(torch.randn(co, ci, 3, 3, generator=g, dtype=torch.float64), (ci, H, H),
                                        padding=1, **kw)
    ops = [mk(96, 96, 8), mk(64, 32, 16, stride=2), mk(32, 32, 32), mk(64, 64, 16)]
    old = torch.get_num_threads()
    try:
        with conv64("auto"):
            for op in ops:
                x = torch.randn((3,) + op.in_shape, generator=g, dtype=torch.float64).contiguous(memory_format=CL)
                y = torch.randn((3,) + op.out_shape, generator=g, dtype=torch.float64).contiguous(memory_format=CL)
                assert conv_gemm.choose(x, op.out_shape[0], (3, 3), op.stride, 1, op.padding) != "torch"
                res = []
                for t in (1, 2):
                    torch.set_num_threads(t)
                    res.append((op.apply(x), op.apply_adjoint(y)))
                assert torch.equal(res[0][0], res[1][0]) and torch.equal(res[0][1], res[1][1]), op
    finally:
        torch.set_num_threads(old)


def test_nhwc_auto_rule():
    """Channels-last choices under auto: a rule of shapes / dtype / layout / device only."""
    z = lambda c, h, dt=torch.float64: torch.zeros(2, c, h, h, dtype=dt).contiguous(memory_format=CL)
    ch = conv_gemm.choose
    with conv64("auto"):
        assert ch(z(32, 32), 32, (3, 3), padding=(1,) * 4) == "patch"  # measured faster than shifted NHWC
        assert ch(z(96, 8), 96, (3, 3), padding=(1,) * 4) == "patch"  # 8² now qualifies
        assert ch(z(64, 16), 64, (3, 3), padding=(1,) * 4) == "patch"
        assert ch(z(32, 32), 64, (3, 3), (2, 2), padding=(1,) * 4) == "patch"  # stride 2
        assert ch(z(3, 32), 32, (3, 3), padding=(1,) * 4) == "patch"  # 3·1024·32 = NHWC_MIN_MACS; few channels
        assert ch(z(32, 32), 3, (3, 3), padding=(1,) * 4, adjoint=True) == "torch"  # adjoint of 3→32
        assert ch(z(64, 16), 32, (3, 3), (2, 2), padding=(1,) * 4, adjoint=True) == "torch"  # strided adjoint
        assert ch(z(64, 16), 64, (3, 3), padding=(1,) * 4, adjoint=True) == "patch"
        assert ch(z(2, 8), 2, (3, 3)) == "torch"  # tiny GEMMs
        assert ch(z(32, 32, torch.float32), 32, (3, 3)) == "torch"  # float32: oneDNN
        assert ch(z(32, 32), 32, (3, 3), groups=2) == "torch"
        assert ch(z(32, 32), 32, (1, 1)) == "torch"
        assert ch(z(32, 32).to("meta"), 32, (3, 3)) == "torch"  # not the CPU (CUDA alike)
        assert ch(z(32, 32)[:1], 32, (3, 3)) == "patch"  # per image: the batch size never changes it
        with shift_pixels(1024, 16):
            assert ch(z(32, 32), 32, (3, 3)) == "nhwc" and ch(z(64, 16), 64, (3, 3)) == "patch"
            assert ch(z(3, 32), 32, (3, 3)) == "patch"  # fewer than NHWC_SHIFT_CHANNELS
        assert ch(torch.zeros(2, 96, 8, 8, dtype=torch.float64), 96, (3, 3)) == "torch"  # NCHW keeps rule()
    with conv64("torch"):
        assert ch(z(32, 32), 32, (3, 3)) == "torch"
    for m in conv_gemm.MODES:  # the tensor-free form agrees
        with conv64(m):
            for c, h, co, kw in [(32, 32, 32, {}), (96, 8, 96, dict(stride=(2, 2))), (3, 32, 32, dict(adjoint=True))]:
                assert conv_gemm.strategy((c, h, h), co, (3, 3), nhwc=True, **kw) == ch(z(c, h), co, (3, 3), **kw)


@pytest.mark.parametrize("stride", [1, 2])
def test_nhwc_torch_mode_and_float32_are_torch_bit_for_bit(stride):
    g = torch.Generator().manual_seed(24)
    for dtype, modes in ((torch.float32, ("torch", "auto")), (torch.float64, ("torch",))):
        w = torch.randn(32, 32, 3, 3, generator=g, dtype=dtype)
        op = Conv2d(w, (32, 16, 16), padding=1, stride=stride)
        x = torch.randn(2, 32, 16, 16, generator=g, dtype=dtype).contiguous(memory_format=CL)
        y = torch.randn((2,) + op.out_shape, generator=g, dtype=dtype).contiguous(memory_format=CL)
        for m in modes:
            with conv64(m):
                assert torch.equal(op.apply(x), F.conv2d(x, w, None, stride, 1))
                assert torch.equal(op.apply_adjoint(y), F.conv_transpose2d(y, w, None, stride, 1, stride - 1))


def test_nhwc_workspace_formula():
    """Shifted NHWC: (C_in + C_out)·G as CNHW; patch: the padded copy C_in·(H+2)(W+2) plus the
    output C_out·H_out·W_out; schedule.conv_workspace follows the sweep's (channels-last) choice."""
    from linop.linearize import schedule, tangents

    assert conv_nhwc.workspace(16, 32, 8, 8, (1, 1, 1, 1), (3, 3), (1, 1)) == 48 * 88
    assert conv_nhwc.im2col_workspace(64, 96, 16, 16, (1, 1, 1, 1), 8, 8) == 64 * 18 * 18 + 96 * 64
    g = torch.Generator().manual_seed(25)
    with conv64("auto"):
        op = Conv2d(torch.randn(96, 64, 3, 3, generator=g, dtype=torch.float64), (64, 16, 16), stride=2, padding=1)
        want = 64 * 18 * 18 + 96 * 64 if tangents.CHANNELS_LAST else 64 * 9 * 64  # patch / slow_conv2d columns
        assert schedule.conv_workspace(op, 8) == want
        op = Conv2d(torch.randn(32, 32, 3, 3, generator=g, dtype=torch.float64), (32, 32, 32), padding=1)
        want = 32 * 34 * 34 + 32 * 1024 if tangents.CHANNELS_LAST else 64 * conv_gemm.slot(33, 33)  # patch / cnhw
        assert schedule.conv_workspace(op, 8) == want
        with shift_pixels(1024, 16):  # NHWC shifted GEMMs: (C_in + C_out)·G as CNHW
            assert schedule.conv_workspace(op, 8) == 64 * conv_gemm.slot(33, 33)


@settings(max_examples=30, deadline=None)
@given(pads=st.tuples(*[st.integers(0, 3)] * 4), n=st.integers(1, 3), c=st.integers(1, 5),
       h=st.integers(1, 6), w=st.integers(1, 6))
def test_padded_copy_frame_is_zero_interior_is_x(pads, n, c, h, w) -> None:
    # the patch GEMM's zero-framed NHWC copy zero-fills only the frame: every entry must still be
    # written (a fresh buffer holds whatever memory held before: NaNs put there just now)
    pt, pb, pl, pr = pads
    x = torch.randn(n, c, h, w, dtype=torch.float64).to(memory_format=torch.channels_last)
    junk = torch.full((n, h + pt + pb, w + pl + pr, c), float("nan"), dtype=torch.float64)
    del junk
    got = conv_nhwc._padded_nhwc(x, pt, pb, pl, pr)
    want = F.pad(x, (pl, pr, pt, pb)).permute(0, 2, 3, 1)
    assert got.shape == want.shape and torch.equal(got, want)
