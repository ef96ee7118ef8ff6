"""The fast paths of the exact padded-conv solve (issue 14): each is compared with the dense
pseudo-inverse of the same explicit sparse conv matrix (float64) or with its direct definition.

* ``square.SquareSchur``: ``W⁻¹ = N_IV − N_IB N_PB⁻¹ N_PV`` for square invertible ``W``;
* ``lift.TorusLift``: right-hand sides / lift back on the small side, both CCP branches (the
  direct transposed conv folded onto the torus, and the FFT one);
* ``torus_forward`` (``W a`` by FFTs with the output offset as a phase), the blocked ``gather``
  and the lower-triangle Schur update ``_syrk_lower``.

Tolerances: the reference ``pinv`` is itself accurate to ~eps·cond(W); with cond(W) ≤ 1e4
(assumed) the comparison at 1e-10 leaves a margin of ~50x over the rounding of either side.
"""
import numpy as np
import pytest
import torch
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from linop.solvers.fft_padded import PaddedConvSolver
from linop.solvers.fft_padded.factor import _sym_norm1, _syrk_lower
from linop.solvers.fft_padded.torus import all_channels, gather
from tests.test_fft_padded import dense, make, rel_err


@st.composite
def square_convs(draw):
    """Equal channels, odd kernels, 'same' padding (optionally dilated): W is square."""
    c = draw(st.integers(1, 4))
    kh, kw = draw(st.sampled_from([1, 3, 5])), draw(st.sampled_from([1, 3, 5]))
    d = draw(st.integers(1, 2))
    H, W = draw(st.integers(max(4, d * (kh - 1) + 1), 9)), draw(st.integers(max(4, d * (kw - 1) + 1), 9))
    return c, (kh, kw), d, H, W, draw(st.integers(0, 2**16))


@given(square_convs())
@settings(max_examples=40, deadline=None)
def test_square_path_equals_dense_pinv(case):
    c, k, d, H, W, seed = case
    _, op, r = make(c, c, k, H, W, seed, padding="same", dilation=d)
    A, pinv, rank, cond = dense(op)
    assume(rank == A.shape[0] == A.shape[1] and cond <= 1e4)  # square, invertible, pinv meaningful
    ps = PaddedConvSolver(op, square=True)
    assert ps._sq is not None and "square W" in ps.info()["algorithm"]
    d_sq, _ = ps.solve(r)
    rf = r.reshape(r.shape[0], -1).numpy()
    # direct error ~eps·cond(N_PB) (not squared); refinement only above eps·cond_est = 1e-8
    assert rel_err(d_sq, rf @ pinv.T) <= 1e-10
    # W square and invertible: W δ = r (backward error ~eps·cond)
    Ad = np.asarray(d_sq).reshape(r.shape[0], -1) @ A.T
    assert np.max(np.linalg.norm(Ad - rf, axis=1) / np.linalg.norm(rf, axis=1)) <= 1e-10
    # the lifted (quasi-definite) path gives the same answer
    d_qd, _ = PaddedConvSolver(op, square=False).solve(r)
    assert rel_err(d_sq, np.asarray(d_qd).reshape(rf.shape)) <= 1e-10


def test_square_path_is_refused_where_it_does_not_apply():
    _, op, _ = make(2, 3, (3, 3), 6, 6, 0, padding="same")  # C_in ≠ C_out
    with pytest.raises(ValueError, match="square=True needs C_in = C_out"):
        PaddedConvSolver(op, square=True)
    with pytest.raises(ValueError, match="square must be"):
        PaddedConvSolver(op, square="yes")
    assert PaddedConvSolver(op)._sq is None


@pytest.mark.parametrize("cin,cout,k,pad", [(1, 4, (3, 3), "same"), (2, 5, (3, 2), (1, 0, 2, 1)),
                                            (3, 6, (5, 5), 2), (3, 8, (3, 3), "same")])
def test_ccp_branches_equal_dense_pinv(cin, cout, k, pad):
    """CCP right-hand side by the direct transposed conv folded onto the torus, or by FFTs:
    both equal the pinv answer (cond(W) small for these shapes; 1e-10 as above)."""
    _, op, r = make(cin, cout, k, 7, 8, 3, padding=pad)
    A, pinv, rank, cond = dense(op)
    assert rank == A.shape[1] and cond < 1e4
    ps = PaddedConvSolver(op)
    assert ps.case == "CCP" and ps._sq is None
    ref = r.reshape(r.shape[0], -1).numpy() @ pinv.T
    for spatial in (True, False):
        ps._maps.spatial_first = spatial
        d, _ = ps.solve(r, refine=False)
        assert rel_err(d, ref) <= 1e-10, spatial


@pytest.mark.parametrize("cin,cout,k,pad", [(4, 2, (3, 3), "same"), (3, 3, (3, 3), 1), (5, 2, (2, 3), (0, 1, 1, 1))])
def test_mdp_lift_equals_dense_pinv(cin, cout, k, pad):
    _, op, r = make(cin, cout, k, 7, 6, 4, padding=pad)
    _, pinv, _, cond = dense(op)
    assume(cond < 1e4)
    ps = PaddedConvSolver(op, square=False)
    assert ps.case == "MDP"
    d, _ = ps.solve(r)
    assert rel_err(d, r.reshape(r.shape[0], -1).numpy() @ pinv.T) <= 1e-10


@pytest.mark.parametrize("cin,cout,k,pad,d", [(3, 5, (3, 3), "same", 1), (4, 4, (2, 3), (1, 0, 0, 2), 1),
                                              (2, 3, (3, 3), 2, 2), (6, 6, (1, 1), 0, 1)])
def test_fft_forward_equals_the_conv(cin, cout, k, pad, d):
    """``W a`` by FFTs (output offset as a phase) equals the torch conv to rounding (‖K‖‖a‖ eps·log T)."""
    _, op, _ = make(cin, cout, k, 7, 9, 1, padding=pad, dilation=d)
    ps = PaddedConvSolver(op)
    a = torch.tensor(np.random.default_rng(2).standard_normal((3,) + op.in_shape))
    y = op.apply(a)
    for fft in (True, False):
        ps.fft_forward = fft
        if fft and not hasattr(ps, "_KF"):
            continue  # the flop model chose the direct conv: no spectrum kept
        assert torch.linalg.vector_norm(ps.forward(a) - y) <= 1e-13 * torch.linalg.vector_norm(y)


@given(st.integers(1, 4), st.integers(1, 4), st.integers(2, 7), st.integers(2, 7), st.integers(0, 2**16))
@settings(max_examples=30, deadline=None)
def test_gather_is_the_block_circulant_matrix(p, r, Th, Tw, seed):
    """``gather`` equals the explicit entries ``q_ij(p − p')`` (integer data: exact equality), for
    full (channel × position) blocks and for irregular subsets of rows / columns."""
    rng = np.random.default_rng(seed)
    q = torch.tensor(rng.integers(-9, 9, (p, r, Th * Tw)), dtype=torch.float64)
    posA = np.sort(rng.choice(Th * Tw, rng.integers(1, Th * Tw + 1), replace=False))
    posB = np.sort(rng.choice(Th * Tw, rng.integers(1, Th * Tw + 1), replace=False))
    rows, cols = all_channels(p, posA), all_channels(r, posB)
    keep_r = rng.random(rows[0].size) < 0.6
    keep_c = rng.random(cols[0].size) < 0.6
    for R, C in [(rows, cols), ((rows[0][keep_r], rows[1][keep_r]), (cols[0][keep_c], cols[1][keep_c]))]:
        (ci, pi), (cj, pj) = R, C
        diff = ((pi[:, None] // Tw - pj[None, :] // Tw) % Th) * Tw + (pi[:, None] % Tw - pj[None, :] % Tw) % Tw
        ref = q.numpy()[ci[:, None], cj[None, :], diff]
        got = gather(q, R, C, (Th, Tw), row_chunk=int(rng.integers(1, 7)))
        assert np.array_equal(got.numpy(), ref)


def test_syrk_lower_and_its_norm():
    """Lower triangle of ``S + XᵀX``, the 1-norm of the symmetric matrix it holds, and its
    Cholesky factor, which reads the lower triangle only (integers: exact up to the Cholesky)."""
    rng = np.random.default_rng(0)
    X = torch.tensor(rng.integers(-5, 5, (40, 300)), dtype=torch.float64)
    S0 = torch.tensor(rng.integers(-5, 5, (300, 300)), dtype=torch.float64)
    S0 = S0 + S0.T
    S = S0.clone()
    _syrk_lower(S, X, blocks=7)
    full = S0 + X.T @ X
    assert torch.equal(torch.tril(S), torch.tril(full))
    assert _sym_norm1(S) == float(full.abs().sum(0).max())
    spd = full + 1e4 * torch.eye(300, dtype=torch.float64)
    S.diagonal().add_(1e4)
    assert torch.equal(torch.linalg.cholesky(S), torch.linalg.cholesky(spd))  # the stale upper part is never read
