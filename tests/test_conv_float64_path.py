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
from hypothesis import given
from hypothesis import strategies as st

from linop.operators import Conv2d, conv_gemm, dottest

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
                padding=pad, H=H, W=W, n=draw(st.integers(1, 5)), cl=draw(st.booleans()))


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
    if case["cl"]:  # the sweep's layout; the path reads any memory format
        x, y = (t.contiguous(memory_format=torch.channels_last) for t in (x, y))
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
    """The padded copy is the only read of x: its memory format cannot change a bit."""
    g = torch.Generator().manual_seed(2)
    op = Conv2d(torch.randn(8, 5, 3, 3, generator=g, dtype=torch.float64), (5, 9, 7), padding=1)
    x = torch.randn(3, 5, 9, 7, generator=g, dtype=torch.float64)
    with conv64("gemm"):
        assert torch.equal(op.apply(x), op.apply(x.contiguous(memory_format=torch.channels_last)))


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
