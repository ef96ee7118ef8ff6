"""Exact FFT reconstruction for padded stride-1 convs (PaddedConvSolver, issue 14 step 1).

The reference is always the dense pseudo-inverse of the SAME explicit sparse matrix
``Conv2d(...).to_sparse()``, computed by SVD in float64.
"""
import numpy as np
import pytest
import torch
from hypothesis import assume, given
from hypothesis import strategies as st

from linop.operators.conv import Conv2d
from linop.solvers.capacitance import CapacitanceSolver
from linop.solvers.fft_padded import PaddedConvSolver, padded_conv_bytes, padded_torus

# a numerically zero singular value: ≤ 1e-10 σ_max (structural rank deficiency measures ~1e-16)
RANK_CUT = 1e-10


def dense(op):
    A = op.to_sparse(dtype=np.float64).toarray()
    U, s, Vt = np.linalg.svd(A, full_matrices=False)
    rank = int((s > RANK_CUT * s[0]).sum())
    pinv = (Vt[:rank].T / s[:rank]) @ U[:, :rank].T
    return A, pinv, rank, s[0] / s[rank - 1]


def rel_err(x, ref):
    x = np.asarray(x).reshape(ref.shape)
    return float(np.max(np.linalg.norm(x - ref, axis=1) / np.linalg.norm(ref, axis=1)))


def make(cin, cout, k, H, W, seed, n=3, **conv):
    rng = np.random.default_rng(seed)
    groups = conv.get("groups", 1)
    w = torch.tensor(rng.standard_normal((cout, cin // groups) + tuple(k)))
    op = Conv2d(w, (cin, H, W), **conv)
    r = torch.tensor(rng.standard_normal((n,) + op.out_shape))
    return w, op, r


@st.composite
def padded_convs(draw):
    cin, cout = draw(st.integers(1, 4)), draw(st.integers(1, 4))
    kh, kw = draw(st.integers(1, 5)), draw(st.integers(1, 5))
    H, W = draw(st.integers(max(5, kh), 10)), draw(st.integers(max(5, kw), 10))
    kind = draw(st.sampled_from(["int", "pair", "four", "same"]))
    if kind == "int":
        pad = draw(st.integers(0, min(kh, kw) - 1))
    elif kind == "pair":
        pad = (draw(st.integers(0, kh - 1)), draw(st.integers(0, kw - 1)))
    elif kind == "four":
        pad = tuple(draw(st.integers(0, k - 1)) for k in (kh, kh, kw, kw))
    else:
        pad = "same"
    return cin, cout, (kh, kw), H, W, pad, draw(st.integers(0, 2**16))


@given(padded_convs())
def test_equals_dense_pinv_of_the_sparse_conv(case):
    cin, cout, k, H, W, pad, seed = case
    _, op, r = make(cin, cout, k, H, W, seed, padding=pad)
    A, pinv, rank, cond = dense(op)
    # pinv itself is only accurate to ~eps·cond(W); beyond 1e4 a 1e-10 comparison is meaningless
    assume(cond <= 1e4)
    ps = PaddedConvSolver(op)
    if ps.lam > 0.0:  # Tikhonov refinement contracts by λ/(σ²+λ): needs σ_min(W)² ≫ 1e-6 σ_max²
        assume(cond <= 300)
    d, info = ps.solve(r)
    assert info["converged"].all()
    rf = r.reshape(r.shape[0], -1).numpy()
    ref = rf @ pinv.T
    # λ = 0: direct solve (+ refinement when cond_est is large) ≈ eps·cond(W) ≤ 2e-12.
    # λ > 0 (singular frequency or channel rule ≠ shape): rounding leaves ~eps/reg ≈ 2e-10 of
    # null-space component that no refinement removes (measured ≤ 2.2e-10).
    assert rel_err(d, ref) <= (1e-10 if ps.lam == 0.0 else 1e-9)
    Ad = np.asarray(d).reshape(r.shape[0], -1) @ A.T
    if rank == A.shape[0]:  # full row rank: the MDP constraint holds (backward error ~eps·cond)
        assert np.max(np.linalg.norm(Ad - rf, axis=1) / np.linalg.norm(rf, axis=1)) <= 1e-10
    if rank == A.shape[1]:  # full column rank: the CCP normal equations, relative to ‖W‖‖r‖
        ne = (Ad - rf) @ A
        assert np.max(np.linalg.norm(ne, axis=1) / (np.linalg.norm(A, 2) * np.linalg.norm(rf, axis=1))) <= 1e-10


@pytest.mark.parametrize("pad", [1, (1, 2), (2, 0, 1, 3), "same", 0])
def test_torus_operator_is_the_padded_conv(pad):
    """W = S C E exactly: forward equals the torch conv, adjoint its transpose (to rounding)."""
    _, op, r = make(3, 2, (3, 4), 7, 9, seed=4, padding=pad)
    ps = PaddedConvSolver(op)
    a = torch.randn((2,) + op.in_shape, dtype=torch.float64)
    y = op.apply(a)
    # FFT round trip vs direct conv: a few ulps times the number of taps (≤ 1e-13 relative)
    assert torch.linalg.vector_norm(ps.forward_torus(a) - y) <= 1e-13 * torch.linalg.vector_norm(y)
    assert ps.forward_torus(a).shape == y.shape
    lhs = (ps.adjoint_torus(r[:2]) * a).sum()
    assert abs(float(lhs - (r[:2] * y).sum())) <= 1e-12 * float(torch.linalg.vector_norm(r[:2]) * torch.linalg.vector_norm(y))


def test_same_padding_smallest_torus():
    """3×3 'same': the torus is (H+1)×(W+1); boundary and ring both have H + W + 1 positions."""
    g = padded_torus((8, 6), (3, 3), (1, 1, 1, 1))
    assert g.torus == (9, 7) and g.out_hw == (8, 6)
    assert g.boundary.size == g.ring.size == 8 + 6 + 1
    with pytest.raises(ValueError, match="torus"):
        padded_torus((8, 6), (3, 3), (1, 1, 1, 1), torus=(8, 8))


@pytest.mark.parametrize("cin,cout,k", [(4, 2, (3, 3)), (2, 4, (3, 3)), (3, 3, (5, 3)), (1, 3, (3, 2)), (3, 1, (2, 3))])
def test_padding_zero_reduces_to_fft_exact(cin, cout, k):
    w, op, r = make(cin, cout, k, 8, 9, seed=cin + 10 * cout)
    ps = PaddedConvSolver(w, op.in_shape, padding=0, refine=False)
    cs = CapacitanceSolver(w, op.in_shape)
    assert ps.mP == 0 and ps.mB == cs.m and ps.lam == cs.lam == 0.0
    d1, _ = ps.solve(r)
    d2, _ = cs.solve(r)
    # the same capacitance system, factored in a different order: rounding × cond_est (≤ 1e3 here)
    assert rel_err(d1.reshape(3, -1), d2.reshape(3, -1).numpy()) <= 1e-12


@pytest.mark.parametrize("conv", [{"padding": 1, "dilation": 2}, {"padding": "same", "groups": 2},
                                  {"padding": (2, 1, 0, 1), "dilation": (1, 2), "groups": 2}])
def test_dilation_and_groups(conv):
    _, op, r = make(4, 2, (3, 3), 9, 8, seed=3, **conv)
    _, pinv, _, _ = dense(op)
    d, _ = PaddedConvSolver(op).solve(r)
    assert rel_err(d.reshape(3, -1), r.reshape(3, -1).numpy() @ pinv.T) <= 1e-10  # cond(W) < 100 here


def test_ill_conditioned_square_layer_is_refined():
    """Square channels, 'same': W square with cond 4e6.  The capacitance system is of normal-
    equations type (direct error ~eps·cond² ≈ 3e-5, measured); refinement brings it to the
    pinv's own accuracy ~eps·cond(W) ≈ 1e-9."""
    _, op, r = make(3, 3, (3, 2), 7, 9, seed=0, padding="same")
    _, pinv, _, cond = dense(op)
    assert 1e6 < cond < 1e7
    ps = PaddedConvSolver(op)
    assert ps.refine and ps.lam == 0.0
    d, info = ps.solve(r)
    assert info["iterations"].max() >= 2
    assert rel_err(d.reshape(3, -1), r.reshape(3, -1).numpy() @ pinv.T) <= 1e-8


def test_zero_rows_join_the_boundary_exactly():
    """Padding 3 ≥ kernel 3: outputs reading padding only are zero rows of W (W tall, rank
    deficient).  They join the boundary (W⁺ ignores them): a direct solve at λ = 0, no Tikhonov."""
    _, op, r = make(4, 2, (3, 3), 7, 9, seed=0, padding=3)
    _, pinv, _, cond = dense(op)
    ps = PaddedConvSolver(op)
    assert ps.lam == 0.0 and ps.boundary.size > ps.geo.boundary.size
    d, _ = ps.solve(r)
    assert rel_err(d.reshape(3, -1), r.reshape(3, -1).numpy() @ pinv.T) <= 1e-10  # cond(W) on its range < 1e2


@pytest.mark.parametrize("kind", ["zero_mean", "rank_deficient"])
def test_singular_cases_use_tikhonov_refinement(kind):
    if kind == "zero_mean":  # every kernel sums to 0: K̂(0,0) = 0, a singular frequency
        rng = np.random.default_rng(5)
        w = rng.standard_normal((2, 4, 3, 3))
        w -= w.mean(axis=(2, 3), keepdims=True)
        op = Conv2d(torch.tensor(w), (4, 7, 8), padding="same")
        r = torch.tensor(rng.standard_normal((3,) + op.out_shape))
    else:  # 2×2 kernel, padding 1: W has 2 structural zero singular values
        _, op, r = make(2, 1, (2, 2), 8, 11, seed=0, padding=1)
    _, pinv, _, _ = dense(op)
    ps = PaddedConvSolver(op)
    assert ps.lam > 0.0
    d, info = ps.solve(r)
    assert info["converged"].all() and info["iterations"].min() >= 1
    # rounding floor eps/reg ≈ 2e-10 of null-space component (measured 1e-11 .. 2.2e-10)
    assert rel_err(d.reshape(3, -1), r.reshape(3, -1).numpy() @ pinv.T) <= 1e-9


def test_over_budget_falls_back_to_preconditioned_cg():
    _, op, r = make(3, 2, (3, 3), 8, 8, seed=9, padding="same")
    _, pinv, *_ = dense(op)
    need = padded_conv_bytes(2, 3, (8, 8), 3, padding="same")
    ps = PaddedConvSolver(op, max_bytes=need - 1)
    assert ps.method == "pcg" and ps.info()["solver_method"] == "pcg"
    d, info = ps.solve(r)
    assert info["converged"].all() and 1 <= info["iterations"].max() < 200
    # CG to 1e-12 relative constraint residual; cond(W) < 1e2 → error ≤ 1e-10
    assert rel_err(d.reshape(3, -1), r.reshape(3, -1).numpy() @ pinv.T) <= 1e-10
    with pytest.raises(MemoryError, match="method='pcg'"):
        PaddedConvSolver(op, method="capacitance", max_bytes=need - 1)


def test_bytes_estimate_matches_solver_and_scales():
    _, op, _ = make(4, 2, (3, 3), 9, 9, seed=1, padding="same")
    ps = PaddedConvSolver(op)
    assert ps.need_bytes == padded_conv_bytes(2, 4, (9, 9), 3, padding="same")
    assert ps.info()["capacitance_size"] == 19 * 2 + 19 * 4
    # the benchmark layer: m = 65·32 + 65·64 = 6240; the factors ≈ 0.4 GB (< the 2 GiB default)
    big = padded_conv_bytes(32, 64, (32, 32), 3, padding="same")
    assert 0.3e9 < big < 0.5e9


def test_bad_input_names_the_option():
    w, op, r = make(3, 2, (3, 3), 8, 8, seed=2, padding=1)
    with pytest.raises(NotImplementedError, match="stride"):
        PaddedConvSolver(Conv2d(w, (3, 8, 8), stride=2, padding=1))
    with pytest.raises(NotImplementedError, match="stride"):
        PaddedConvSolver(w, (3, 8, 8), stride=(1, 2))
    with pytest.raises(ValueError, match="in_shape"):
        PaddedConvSolver(w, (4, 8, 8))
    with pytest.raises(ValueError, match="in_shape"):
        PaddedConvSolver(w)
    with pytest.raises(ValueError, match="padding"):
        PaddedConvSolver(w, (3, 8, 8), padding=-1)
    with pytest.raises(ValueError, match="method"):
        PaddedConvSolver(op, method="lu")
    with pytest.raises(ValueError, match="refine"):
        PaddedConvSolver(op, refine="sometimes")
    with pytest.raises(ValueError, match="rcond"):
        PaddedConvSolver(op, rcond=0.0)
    ps = PaddedConvSolver(op)
    with pytest.raises(ValueError, match="r must have shape"):
        ps.solve(r[:, :, :-1])
    with pytest.raises(ValueError, match="chunk"):
        ps.solve(r, chunk=0)
    with pytest.raises(ValueError, match="identically zero"):
        PaddedConvSolver(torch.zeros(2, 3, 3, 3, dtype=torch.float64), (3, 8, 8), padding=1)
