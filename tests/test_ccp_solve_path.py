"""The exact CCP path of ``solve(..., method="fft-exact")`` (issue 14, conv0): ``a* = W⁺ (z* − b)``.

With W of full column rank, ``â + W⁺(t − W â) = W⁺ t`` (``W⁺W = I``, seed 001 Eq. 7): the
solve skips ``r = t − W â`` where the factorisation certifies the rank
(:attr:`ExactConvSolver.ccp_direct`), works on row blocks, and reports a residual from a real
evaluation of ``W a*``.  References: the dense pseudo-inverse of the same explicit sparse matrix
(``Conv2d(...).to_sparse()``, by SVD, ``tests/test_fft_padded.dense``), float64.
"""
import itertools

import numpy as np
import pytest
import torch
from hypothesis import assume, given
from hypothesis import strategies as st
from test_fft_padded import dense

from linop.operators.conv import Conv2d
from linop.solvers import solve
from linop.solvers.fft_padded import ExactConvSolver, PaddedConvSolver
from linop.solvers.result import CHUNK_BYTES, prepare

from kit_convs import check_direct_ccp, rows  # test kit


@st.composite
def ccp_convs(draw):
    """CCP-shaped convs (C_out > C_in), kernels 1–3, any zero padding, stride 1–2, small maps."""
    cin = draw(st.integers(1, 3))
    cout = cin * draw(st.integers(2, 4))
    k = (draw(st.integers(1, 3)), draw(st.integers(1, 3)))
    stride = draw(st.sampled_from([(1, 1), (1, 1), (2, 2), (1, 2)]))
    pad = draw(st.sampled_from([0, 1, (1, 0), (0, 1, 2, 1)] + (["same"] if stride == (1, 1) else [])))
    H, W = draw(st.integers(3, 7)), draw(st.integers(3, 7))
    return {"cin": cin, "cout": cout, "k": k, "stride": stride, "padding": pad, "H": H, "W": W,
            "seed": draw(st.integers(0, 2**16))}


def _problem(c, n=3):
    rng = np.random.default_rng(c["seed"])
    w = torch.tensor(rng.standard_normal((c["cout"], c["cin"]) + c["k"]))
    try:
        op = Conv2d(w, (c["cin"], c["H"], c["W"]), padding=c["padding"], stride=c["stride"])
    except ValueError:  # kernel larger than the padded input
        assume(False)
    a_hat = torch.tensor(rng.standard_normal((n,) + op.in_shape))
    b = torch.tensor(rng.standard_normal(c["cout"]))
    z = op.apply(a_hat) + b[:, None, None]
    z_star = z + 0.3 * torch.tensor(rng.standard_normal(tuple(z.shape)))  # inconsistent: a true LS problem
    return op, a_hat, b, z_star


@given(ccp_convs())
def test_direct_ccp_form_equals_dense_pinv_and_the_correction_form(c):
    """Where W has full column rank and the solver certifies it, ``solve`` takes ``a* = W⁺ t``.

    Tolerances: the direct form's error is ≲ eps·cond_est ≤ 1e-12 relative to ‖a*‖ (``ccp_direct``
    requires it), and the pinv reference's own error is ~eps·cond(W) (cond(W) < 1e4 assumed):
    1e-12 relative to ‖a*‖.  Relative to the correction ‖a* − â‖ (the issue's metric, 1e-10):
    here the correction is of the size of a* (noise 0.3 of the target), so the same bound holds
    up to that ratio.  A formula error (â dropped where W has a null space, a lost bias, a wrong
    scale) is O(1)."""
    # unpadded stride-1 convs go to CapacitanceSolver (fft-exact's other solver), not this path
    assume(c["padding"] != 0 or c["stride"] != (1, 1))
    op, a_hat, b, z_star = _problem(c)
    A, pinv, rank, cond = dense(op)
    assume(rank == A.shape[1] and cond < 1e4)  # full column rank, moderately conditioned
    es = ExactConvSolver(op)
    assume(es.ccp_direct)  # certified (a near-singular frequency goes to the Tikhonov path instead)
    n = a_hat.shape[0]
    res = solve(op, z_star, a_hat, b=b, method="fft-exact", padded_solver=es)
    a, ref, t = check_direct_ccp(res, z_star, b, pinv, n)  # W⁺ t, the unique least-squares point
    corr = np.linalg.norm(ref - rows(a_hat, n), axis=1)
    assert np.max(np.linalg.norm(a - ref, axis=1) / corr) <= 1e-10
    # the correction form â + W⁺(t − W â) is the same point (W⁺W = I)
    r = (z_star - b[:, None, None]) - op.apply(a_hat)
    d, _ = es.solve(r)
    a_corr = rows(a_hat + d, n)
    assert np.max(np.linalg.norm(a - a_corr, axis=1) / np.linalg.norm(ref, axis=1)) <= 1e-12
    # CCP normal equations Wᵀ(W a − t) = 0, relative to ‖Wᵀ t‖ (cond(W)·eps·‖W‖‖a‖ scale): 1e-10
    e = A @ a.T - t.T
    assert np.max(np.linalg.norm(A.T @ e, axis=0) / np.linalg.norm(A.T @ t.T, axis=0)) <= 1e-10


def test_direct_form_on_the_benchmark_conv0_geometry():
    """3→32, 3×3, 'same' (conv0 of VGG7 / ResNet20 / Fixup) at 8×8: direct form, equal to the
    dense pinv (1e-12 of ‖a*‖, as above; cond(W) ~ 10 here) and to the correction form."""
    rng = np.random.default_rng(5)
    w = torch.tensor(rng.standard_normal((32, 3, 3, 3)) * np.sqrt(2 / 27))
    op = Conv2d(w, (3, 8, 8), padding=1)
    a_hat = torch.relu(torch.tensor(rng.standard_normal((5, 3, 8, 8))))
    b = torch.tensor(rng.standard_normal(32) * 0.1)
    z = op.apply(a_hat) + b[:, None, None]
    z_star = z + 0.1 * z.std() * torch.tensor(rng.standard_normal(tuple(z.shape)))
    A, pinv, rank, cond = dense(op)
    assert rank == A.shape[1] and cond < 100
    res = solve(op, z_star, a_hat, b=b, method="fft-exact")
    assert res.method == "fft-exact" and res.info["form"].startswith("direct")
    ref = rows(z_star - b[:, None, None], 5) @ pinv.T
    a = rows(res.a, 5)
    assert np.max(np.linalg.norm(a - ref, axis=1) / np.linalg.norm(ref, axis=1)) <= 1e-12
    assert np.max(np.linalg.norm(a - ref, axis=1) / np.linalg.norm(ref - rows(a_hat, 5), axis=1)) <= 1e-10


def test_rank_deficient_ccp_keeps_the_correction_and_a_hat():
    """A 1×1 stride-2 conv reads one phase in four: the other entries are zero columns of W, where
    the closest-to-â point keeps â.  Not of full column rank: the correction form runs, and the
    unread entries equal â exactly (δ is exactly zero there)."""
    rng = np.random.default_rng(1)
    op = Conv2d(torch.tensor(rng.standard_normal((6, 2, 1, 1))), (2, 6, 6), stride=2)
    a_hat = torch.tensor(rng.standard_normal((3, 2, 6, 6)))
    z_star = torch.tensor(rng.standard_normal((3,) + op.out_shape))
    es = ExactConvSolver(op)
    assert not es.ccp_direct
    res = solve(op, z_star, a_hat, method="fft-exact", padded_solver=es)
    assert res.info["form"] == "correction"
    unread = torch.ones(6, 6, dtype=torch.bool)
    unread[::2, ::2] = False
    assert torch.equal(res.a[:, :, unread], a_hat[:, :, unread])
    _, pinv, _, _ = dense(op)
    r = rows(z_star - op.apply(a_hat), 3)
    ref = rows(a_hat, 3) + r @ pinv.T
    assert np.max(np.linalg.norm(rows(res.a, 3) - ref, axis=1) / np.linalg.norm(r @ pinv.T, axis=1)) <= 1e-10


def test_mdp_and_square_layers_keep_the_correction_form():
    """ccp_direct is only for the lifted CCP factorisation: MDP (lifted) and square convs keep
    ``â + W⁺ r`` (their W has a null space, or the square path's looser refinement rule)."""
    rng = np.random.default_rng(2)
    for cin, cout in ((4, 2), (3, 3)):
        op = Conv2d(torch.tensor(rng.standard_normal((cout, cin, 3, 3))), (cin, 6, 6), padding=1)
        es = ExactConvSolver(op)
        assert not es.ccp_direct
        a_hat = torch.tensor(rng.standard_normal((2,) + op.in_shape))
        z_star = torch.tensor(rng.standard_normal((2,) + op.out_shape))
        assert solve(op, z_star, a_hat, method="fft-exact", padded_solver=es).info["form"] == "correction"


def test_full_transposed_equals_torch_conv_transpose():
    """The CCP first stage's GEMM + col2im equals ``conv_transpose2d`` with the scaled kernel: the
    same products summed in a different order, ~eps·k²·C_out relative (1e-14)."""
    rng = np.random.default_rng(3)
    op = Conv2d(torch.tensor(rng.standard_normal((16, 3, 3, 2))), (3, 9, 7), padding=(1, 0, 2, 1))
    ps = PaddedConvSolver(op)
    maps = ps._maps
    assert maps.spatial_first
    r = torch.tensor(rng.standard_normal((4,) + op.out_shape))
    ref = torch.nn.functional.conv_transpose2d(r, ps._weff / maps.s)
    got = maps.full_transposed(r)
    assert got.shape == ref.shape
    assert float((got - ref).abs().max() / ref.abs().max()) <= 1e-14


def test_residual_is_a_real_chunked_measurement():
    """``Problem.residual`` evaluates ``W a`` (in row blocks): equal to the whole-batch formula for
    any ``a`` (a wrong one included) to rounding of the norms (1e-14), over several blocks."""
    rng = np.random.default_rng(4)
    op = Conv2d(torch.tensor(rng.standard_normal((32, 3, 3, 3))), (3, 16, 16), padding=1)
    n = 3 * CHUNK_BYTES // (op.shape[0] * 8) + 5  # more than three blocks, the last one short
    a_hat = torch.tensor(rng.standard_normal((n,) + op.in_shape))
    b = torch.tensor(rng.standard_normal(32))
    z_star = torch.tensor(rng.standard_normal((n,) + op.out_shape))
    prob = prepare(op, z_star, a_hat, b)
    blocks = prob.row_chunks()
    assert len(blocks) >= 4 and blocks[0][0] == 0 and blocks[-1][1] == n
    assert all(k1 == k0n for (_, k1), (k0n, _) in itertools.pairwise(blocks))
    a = torch.tensor(rng.standard_normal((n, op.shape[1])))  # not a solution: a large residual
    t = (z_star - b[:, None, None]).reshape(n, -1)
    ref = (torch.linalg.vector_norm(op.apply(a.reshape((n,) + op.in_shape)).reshape(n, -1) - t, dim=1)
           / torch.linalg.vector_norm(t, dim=1)).numpy()
    got = prob.residual(a)
    assert np.max(np.abs(got - ref) / ref) <= 1e-14
    assert torch.equal(prob.target_rows(3, 7), prob.target[3:7])


def test_solve_residual_is_independent_of_the_answer():
    """The reported residual is recomputed from the returned a*: equal to ``‖W a* + b − z*‖/‖z* − b‖``
    evaluated here with the operator (1e-14, norm rounding)."""
    rng = np.random.default_rng(6)
    op = Conv2d(torch.tensor(rng.standard_normal((12, 2, 3, 3))), (2, 7, 7), padding="same")
    a_hat = torch.tensor(rng.standard_normal((4, 2, 7, 7)))
    z_star = torch.tensor(rng.standard_normal((4,) + op.out_shape))
    b = torch.tensor(rng.standard_normal(12))
    res = solve(op, z_star, a_hat, b=b, method="fft-exact")
    t = (z_star - b[:, None, None]).reshape(4, -1)
    mine = (torch.linalg.vector_norm(op.apply(res.a).reshape(4, -1) - t, dim=1) / torch.linalg.vector_norm(t, dim=1))
    assert np.max(np.abs(res.residual - mine.numpy()) / mine.numpy()) <= 1e-14


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_blocks_and_dtypes_of_the_padded_runner(dtype):
    """Batches over several row blocks (64 rows each) and float32 input through a float64 solver:
    the rows come back in order (each equals its one-sample solve to 1e-13 in float64)."""
    rng = np.random.default_rng(7)
    op = Conv2d(torch.tensor(rng.standard_normal((8, 2, 3, 3))), (2, 5, 5), padding=1)
    n = 150
    a_hat = torch.tensor(rng.standard_normal((n, 2, 5, 5)))
    z_star = torch.tensor(rng.standard_normal((n,) + op.out_shape))
    es = ExactConvSolver(op)
    res = solve(op, z_star.to(dtype), a_hat.to(dtype), method="fft-exact", padded_solver=es)
    assert res.a.dtype == dtype and res.a.shape == a_hat.shape and res.info["iterations"].shape == (n,)
    for i in (0, 63, 64, 149):
        one = solve(op, z_star[i], a_hat[i], method="fft-exact", padded_solver=es).a
        tol = 1e-13 if dtype == torch.float64 else 1e-5  # float32 input rounding (~6e-8) times cond(W)
        assert float((res.a[i].double() - one).norm() / one.norm()) <= tol


@pytest.mark.parametrize("cout,cin", [(2, 1), (1, 2), (3, 3)])
def test_one_by_one_unpadded_conv_has_no_boundary(cout, cin):
    """A 1×1 unpadded conv has no boundary (an empty capacitance matrix): ``fft-exact`` is the
    circulant solve alone, equal to the dense pinv answer (1e-12 of the correction; cond ~ 10)."""
    rng = np.random.default_rng(cout + 3 * cin)
    op = Conv2d(torch.tensor(rng.standard_normal((cout, cin, 1, 1))), (cin, 3, 4))
    a_hat = torch.tensor(rng.standard_normal((2, cin, 3, 4)))
    z_star = torch.tensor(rng.standard_normal((2,) + op.out_shape))
    res = solve(op, z_star, a_hat, method="fft-exact")
    _, pinv, _, _ = dense(op)
    corr = rows(z_star - op.apply(a_hat), 2) @ pinv.T
    err = np.linalg.norm(rows(res.a, 2) - (rows(a_hat, 2) + corr), axis=1) / np.linalg.norm(corr, axis=1)
    assert res.info["capacitance_size"] == 0 and np.max(err) <= 1e-12


def test_solve_blocks_equals_solve_and_refuses_multi_pass_solvers():
    """Row blocks of any sizes through one gathered capacitance solve (``solve_blocks``) equal the
    tensor solve row for row (the same arithmetic per row but BLAS blocking: 1e-13 relative);
    a solver that needs refinement (or several groups) refuses, naming ``solve()``."""
    rng = np.random.default_rng(8)
    op = Conv2d(torch.tensor(rng.standard_normal((6, 2, 3, 3))), (2, 6, 5), padding="same")
    es = ExactConvSolver(op)
    assert es.single_pass
    r = torch.tensor(rng.standard_normal((11,) + op.out_shape))
    ref, _ = es.solve(r)
    got = es.solve_blocks((r[k0:k1] for k0, k1 in ((0, 3), (3, 4), (4, 11))), chunk=5)
    assert float((got - ref).norm() / ref.norm()) <= 1e-13
    es.parts[0][0].refine = True
    with pytest.raises(ValueError, match="solve"):
        es.solve_blocks(iter([r]))
    grouped = ExactConvSolver(Conv2d(torch.tensor(rng.standard_normal((4, 1, 3, 3))), (2, 5, 5), padding=1, groups=2))
    assert not grouped.single_pass
    with pytest.raises(ValueError, match="solve"):
        grouped.solve_blocks(iter([torch.zeros((1,) + grouped.out_shape, dtype=torch.float64)]))
