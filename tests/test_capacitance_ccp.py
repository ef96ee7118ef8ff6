"""The direct CCP form of ``fft-exact`` on unpadded stride-1 convs (:class:`.CapacitanceSolver`).

Where the capacitance factorisation certifies full column rank (:attr:`.CapacitanceSolver.ccp_direct`),
``solve`` returns ``a* = W⁺ (z* − b)`` instead of ``â + W⁺(z* − b − W â)`` (the same point:
``W⁺W = I``, seed 001 Eq. 7).  References: the dense pseudo-inverse of the explicit sparse matrix
(``Conv2d(...).to_sparse()``, by SVD: ``tests/test_fft_padded.dense``), float64.
"""
import numpy as np
import pytest
import torch
from hypothesis import assume, given
from hypothesis import strategies as st
from test_fft_padded import dense

from linop.operators.conv import Conv2d
from linop.solvers import CapacitanceSolver, solve

from kit_convs import check_direct_ccp, rows  # test kit

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny problems: threads only add contention


@st.composite
def unpadded_ccp(draw):
    """Unpadded stride-1 convs with C_out > C_in, kernels 1–3, small maps (H, W ≥ k)."""
    cin = draw(st.integers(1, 3))
    cout = cin * draw(st.integers(2, 4))
    k = (draw(st.integers(1, 3)), draw(st.integers(1, 3)))
    H, W = draw(st.integers(max(3, k[0]), 8)), draw(st.integers(max(3, k[1]), 8))
    return {"cin": cin, "cout": cout, "k": k, "H": H, "W": W, "seed": draw(st.integers(0, 2**16))}


def _problem(c, n=3):
    rng = np.random.default_rng(c["seed"])
    w = torch.tensor(rng.standard_normal((c["cout"], c["cin"]) + c["k"]))
    op = Conv2d(w, (c["cin"], c["H"], c["W"]))
    a_hat = torch.tensor(rng.standard_normal((n,) + op.in_shape))
    b = torch.tensor(rng.standard_normal(c["cout"]))
    z = op.apply(a_hat) + b[:, None, None]
    z_star = z + 0.3 * torch.tensor(rng.standard_normal(tuple(z.shape)))  # inconsistent: a true LS problem
    return w, op, a_hat, b, z_star


@given(unpadded_ccp())
def test_direct_form_equals_dense_pinv_and_the_correction_form(c):
    """Tolerances: the direct form's error is ≲ eps·cond_est ≤ 1e-12 relative to ‖a*‖ (``ccp_direct``
    requires eps·cond_est ≤ 1e-12; the estimate is pessimistic), and the pinv reference's own error
    is ~eps·cond(W) ≤ 2e-12 (cond(W) < 1e4 assumed): 1e-12 relative to ‖a*‖ — a formula error (â
    kept where it should not be, a lost bias, a wrong scale) is O(1).  The correction form differs
    from the direct one by the rounding of each (the same bound)."""
    w, op, a_hat, b, z_star = _problem(c)
    A, pinv, rank, cond = dense(op)
    assume(rank == A.shape[1] and cond < 1e4)  # full column rank, moderately conditioned
    cs = CapacitanceSolver(w, op.in_shape)
    assume(cs.ccp_direct)  # certified (a near-singular frequency goes to the Tikhonov path instead)
    n = a_hat.shape[0]
    res = solve(op, z_star, a_hat, b=b, method="fft-exact", capacitance_solver=cs)
    a, ref, t = check_direct_ccp(res, z_star, b, pinv, n)  # W⁺ t, the unique least-squares point
    r = (z_star - b[:, None, None]) - op.apply(a_hat)  # the correction form â + W⁺ r
    d, _ = cs.solve(r)
    a_corr = rows(a_hat + d, n)
    assert np.max(np.linalg.norm(a - a_corr, axis=1) / np.linalg.norm(ref, axis=1)) <= 1e-12
    # â plays no part in the direct form: another â gives the same bits
    other = solve(op, z_star, torch.zeros_like(a_hat), b=b, method="fft-exact", capacitance_solver=cs)
    assert torch.equal(torch.as_tensor(other.a), torch.as_tensor(res.a))


def test_certified_on_a_well_conditioned_layer_and_equal_to_the_padded_solver():
    """A 3→12 3×3 valid conv at 9×8: certified; the same point as the padded solver's direct form
    (its unpadded case, P = ∅; both are W⁺t to ~eps·cond: 1e-12 of ‖a*‖ as above)."""
    c = {"cin": 3, "cout": 12, "k": (3, 3), "H": 9, "W": 8, "seed": 3}
    w, op, a_hat, b, z_star = _problem(c)
    cs = CapacitanceSolver(w, op.in_shape)
    assert cs.case == "CCP" and cs.lam == 0.0 and cs.ccp_direct
    res = solve(op, z_star, a_hat, b=b, method="fft-exact")  # the auto-built CapacitanceSolver
    assert res.info["form"].startswith("direct") and res.info["algorithm"].startswith("capacitance")
    from linop.solvers.fft_padded import ExactConvSolver
    es = ExactConvSolver(op)
    assert es.ccp_direct
    pad = solve(op, z_star, a_hat, b=b, method="fft-exact", padded_solver=es)
    a, ap = rows(res.a, 3), rows(pad.a, 3)
    assert np.max(np.linalg.norm(a - ap, axis=1) / np.linalg.norm(ap, axis=1)) <= 1e-12


def test_one_by_one_kernel_is_direct():
    """No boundary (m = 0): W = C, full column rank exactly when no frequency is singular."""
    c = {"cin": 2, "cout": 5, "k": (1, 1), "H": 4, "W": 5, "seed": 4}
    w, op, a_hat, b, z_star = _problem(c)
    cs = CapacitanceSolver(w, op.in_shape)
    assert cs.m == 0 and cs.ccp_direct
    A, pinv, rank, _ = dense(op)
    assert rank == A.shape[1]
    res = solve(op, z_star, a_hat, b=b, method="fft-exact", capacitance_solver=cs)
    ref = rows(z_star - b[:, None, None], 3) @ pinv.T
    assert res.info["form"].startswith("direct")
    assert np.max(np.linalg.norm(rows(res.a, 3) - ref, axis=1) / np.linalg.norm(ref, axis=1)) <= 1e-12


@pytest.mark.parametrize("cin,cout,H,W,k,zero_mean", [(4, 2, 7, 9, 3, False),   # MDP: W has a null space
                                                      (3, 5, 10, 8, 5, False),  # CCP-shaped, W wide: λ > 0
                                                      (2, 4, 8, 6, 3, True)])   # singular frequency: λ > 0
def test_not_certified_keeps_the_correction_form(cin, cout, H, W, k, zero_mean):
    """MDP, rank-deficient or singular-frequency layers keep ``â + W⁺ r`` (``â`` matters there)."""
    rng = np.random.default_rng(cin + cout + k)
    w = rng.standard_normal((cout, cin, k, k))
    if zero_mean:
        w -= w.mean(axis=(2, 3), keepdims=True)
    op = Conv2d(torch.tensor(w), (cin, H, W))
    cs = CapacitanceSolver(op.weight, op.in_shape)
    assert not cs.ccp_direct
    a_hat = torch.tensor(rng.standard_normal((2,) + op.in_shape))
    z_star = torch.tensor(rng.standard_normal((2,) + op.out_shape))
    res = solve(op, z_star, a_hat, method="fft-exact", capacitance_solver=cs)
    assert res.info["form"] == "correction"
