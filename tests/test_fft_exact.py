"""fft-exact: the FFT + boundary-capacitance direct solve equals W⁺ (beyond seed 001 §3.2)."""
import importlib

import numpy as np
import pytest
import torch

from linop.operators.conv import Conv2d
from linop.solvers import CapacitanceSolver, FFTConvSolver, solve
from linop.solvers.capacitance import boundary_positions

# the package itself: the attribute ``linop.solve`` is the function
ls = importlib.import_module("linop.solvers")


def layer(cin, cout, H, W, k, seed, zero_mean=False):
    rng = np.random.default_rng(seed)
    w = rng.standard_normal((cout, cin, k, k))
    if zero_mean:  # every kernel sums to 0: K̂(0, 0) = 0, so C Cᵀ and Cᵀ C are singular at DC
        w -= w.mean(axis=(2, 3), keepdims=True)
    w = torch.tensor(w)
    op = Conv2d(w, (cin, H, W))
    a = torch.tensor(rng.standard_normal((3, cin, H, W)))
    z = torch.tensor(rng.standard_normal((3,) + op.out_shape))
    b = torch.tensor(rng.standard_normal(cout))
    return w, op, a, z, b


def pinv_solution(op, z, a, b):
    A = op.to_sparse(dtype=np.float64).toarray()
    r = (z - b[:, None, None]).reshape(z.shape[0], -1).numpy() - a.reshape(a.shape[0], -1).numpy() @ A.T
    return a.reshape(a.shape[0], -1).numpy() + r @ np.linalg.pinv(A).T, A


def rel(x, ref, a):
    a = a.reshape(a.shape[0], -1).numpy()
    return np.max(np.linalg.norm(np.asarray(x).reshape(a.shape) - ref, axis=1) / np.linalg.norm(ref - a, axis=1))


# (C_in, C_out, H, W, k): MDP (C_out ≤ C_in) and CCP (C_out > C_in), kernels 3 and 5, H ≠ W
CASES = [(4, 2, 7, 9, 3), (3, 3, 9, 8, 5), (5, 3, 6, 11, 3), (2, 4, 8, 6, 3), (2, 6, 12, 10, 5), (1, 3, 7, 10, 3)]


@pytest.mark.parametrize("cin,cout,H,W,k", CASES)
def test_fft_exact_equals_dense_pinv(cin, cout, H, W, k):
    _, op, a, z, b = layer(cin, cout, H, W, k, seed=cin * 100 + cout * 10 + k)
    ref, A = pinv_solution(op, z, a, b)
    res = solve(op, z, a, b=b, method="fft-exact")
    # A direct solve: the error is rounding amplified by cond(capacitance)·cond(K̂) — measured
    # 1e-15..1e-12 here (cond_est ≤ ~2e5); 1e-10 leaves two orders of margin.
    assert rel(res.a, ref, a) <= 1e-10
    assert res.info["tikhonov_lambda"] == 0.0 and res.info["singular_frequencies"] == 0
    assert res.info["capacitance_size"] == boundary_positions(H, W, k, k).size * cout == (H * W - (H - k + 1) * (W - k + 1)) * cout
    assert np.isfinite(res.info["capacitance_cond_est"]) and res.info["capacitance_cond_est"] >= 1.0
    r = (z - b[:, None, None]).reshape(3, -1).numpy()
    aw = np.asarray(res.a).reshape(3, -1) @ A.T
    if cout <= cin:
        # MDP (A has full row rank here): the constraint holds to rounding (eps·cond ≈ 1e-13)
        # the case is W's (its numerical rank, the same for every method); the capacitance
        # factorisation's own channel-rule case agrees here
        assert res.case == "MDP" and res.info["case_from"] == "rank" and res.info["exact_case"] == "MDP"
        assert np.max(res.residual) <= 1e-10
        assert np.max(np.linalg.norm(aw - r, axis=1) / np.linalg.norm(r, axis=1)) <= 1e-10
    else:
        # CCP: normal equations Wᵀ(W a + b − z*) = 0, relative to ‖W‖·‖z* − b‖ (backward-stable scale)
        # W's case as every method reports it (a square W of full rank is "MDP", the constraint holds)
        assert res.info["exact_case"] == "CCP" and res.case == solve(op, z, a, b=b, method="dense").case
        ne = (aw - r) @ A
        assert np.max(np.linalg.norm(ne, axis=1) / (np.linalg.norm(A, 2) * np.linalg.norm(r, axis=1))) <= 1e-12


@pytest.mark.parametrize("cin,cout", [(3, 2), (1, 3)])
def test_capacitance_is_the_boundary_block_of_the_circulant(cin, cout):
    """Q_BB gathered from one inverse FFT equals the principal submatrix of the explicit
    (C Cᵀ)⁻¹ (MDP) or I − C C⁺ (CCP) on the torus — the identity the method rests on."""
    H, W, k = 8, 7, 3
    w, op, *_ = layer(cin, cout, H, W, k, seed=7)
    assert (op.shape[0] < op.shape[1]) == (cout <= cin)  # MDP wide, CCP tall: no fallback
    fs = FFTConvSolver(w, (cin, H, W))
    n = cin * H * W
    C = fs.circular(torch.eye(n, dtype=torch.float64).reshape(n, cin, H, W)).reshape(n, -1).T.numpy()
    Q = np.linalg.inv(C @ C.T) if cout <= cin else np.eye(C.shape[0]) - C @ np.linalg.pinv(C)
    B = boundary_positions(H, W, k, k)
    idx = (np.arange(cout)[:, None] * H * W + B[None, :]).ravel()  # (channel, position) order
    cs = CapacitanceSolver(w, (cin, H, W), fft_solver=fs, device="cpu")
    assert cs.lam == 0.0
    Qbb = Q[np.ix_(idx, idx)]
    Qbb = Qbb * (cs.s_max**2 if cout <= cin else 1.0)  # the MDP Q is scaled by s_max² (cancels in s)
    L = cs.L.numpy()
    # the Cholesky factor reproduces the explicit block to rounding (eps·cond(K̂)·‖Q_BB‖ ≲ 1e-13)
    np.testing.assert_allclose(L @ L.T, Qbb, rtol=0, atol=1e-12 * np.abs(Qbb).max())


def test_singular_frequency_uses_tikhonov_refinement_and_stays_exact():
    _, op, a, z, b = layer(4, 2, 7, 8, 3, seed=5, zero_mean=True)
    ref, A = pinv_solution(op, z, a, b)
    res = solve(op, z, a, b=b, method="fft-exact")
    assert res.info["singular_frequencies"] >= 1 and res.info["tikhonov_lambda"] > 0
    assert res.info["converged_all"] and 1 <= np.max(res.info["iterations"]) <= 10
    # rounding leaves ~eps/reg = 1e-10 of null-space component (reg = 1e-6); measured 2e-12
    assert rel(res.a, ref, a) <= 1e-9
    assert np.max(res.residual) <= 1e-9  # W is still of full row rank: the constraint holds


def test_channel_rule_disagrees_with_shape_falls_back_exactly():
    """C_out > C_in but n_out < n_in (5×5 kernel on a small map): Cᵀ C is invertible but W is wide,
    so the CCP capacitance is singular; the Tikhonov lifting still converges to W⁺ r."""
    _, op, a, z, b = layer(3, 5, 10, 8, 5, seed=2)
    assert op.shape[0] < op.shape[1]
    ref, _ = pinv_solution(op, z, a, b)
    res = solve(op, z, a, b=b, method="fft-exact")
    assert res.info["tikhonov_lambda"] > 0 and res.info["converged_all"]
    assert rel(res.a, ref, a) <= 1e-9  # ~eps·cond(capacitance) ≈ 1e-16·1.5e7, measured 1e-10
    assert res.case == "MDP" and res.info["case_from"] == "rank"  # W is wide and of full row rank


def test_prebuilt_solver_is_reused_and_checked():
    w, op, a, z, b = layer(4, 3, 8, 8, 3, seed=11)
    cs = CapacitanceSolver(w, op.in_shape)
    r1 = solve(op, z, a, b=b, method="fft-exact", capacitance_solver=cs)
    r2 = solve(op, z[:1], a[:1], b=b, method="fft-exact", capacitance_solver=cs)
    # the same factor applied to a sub-batch: identical up to BLAS blocking (≤ a few ulps)
    np.testing.assert_allclose(np.asarray(r2.a), np.asarray(r1.a)[:1], rtol=0, atol=1e-13)
    _, op2, a2, z2, _ = layer(4, 3, 9, 8, 3, seed=11)
    with pytest.raises(ValueError, match="CapacitanceSolver"):
        solve(op2, z2, a2, method="fft-exact", capacitance_solver=cs)


def test_memory_refusal_names_size_and_alternative():
    w, op, a, z, b = layer(4, 3, 8, 8, 3, seed=1)
    m = boundary_positions(8, 8, 3, 3).size * 3
    with pytest.raises(MemoryError, match=rf"{m}x{m} \(28 boundary positions x 3 output channels\).*fft-pcg"):
        solve(op, z, a, method="fft-exact", max_bytes=10_000)


def test_strided_convs_are_exact():
    """Strided convs (any input size) go to the polyphase solver: the dense answer to ~eps·cond."""
    rng = np.random.default_rng(0)
    w = torch.tensor(rng.standard_normal((2, 3, 3, 3)))
    op = Conv2d(w, (3, 9, 8), stride=2)
    z, a = rng.standard_normal((1,) + op.out_shape), rng.standard_normal((1, 3, 9, 8))
    res, de = solve(op, z, a, method="fft-exact"), solve(op, z, a, method="dense")
    assert "polyphase" in res.info["algorithm"]
    assert np.abs(np.asarray(res.a) - np.asarray(de.a)).max() <= 1e-10 * np.abs(np.asarray(de.a)).max()


@pytest.mark.parametrize("c_out, c_in, padding", [(3, 5, 1), (5, 3, "same"), (4, 4, (0, 2, 1, 0))])
def test_fft_exact_routes_padded_convs_to_the_exact_padded_solver(c_out, c_in, padding):
    """Padded stride-1 convs: fft-exact (PaddedConvSolver) == the dense pseudo-inverse answer of the
    same explicit conv matrix. 1e-10: both are direct solves of conditioning ~1e2 in float64."""
    rng = np.random.default_rng(c_out * 10 + c_in)
    op = Conv2d(torch.tensor(rng.standard_normal((c_out, c_in, 3, 3))), (c_in, 7, 6), padding=padding)
    a = rng.standard_normal((2, op.shape[1]))
    z = rng.standard_normal((2, op.shape[0]))
    fe, de = solve(op, z, a, method="fft-exact"), solve(op, z, a, method="dense")
    assert fe.method == "fft-exact" and fe.info["algorithm"]
    assert fe.case == de.case
    assert np.abs(np.asarray(fe.a) - np.asarray(de.a)).max() <= 1e-10 * np.abs(np.asarray(de.a)).max()


def test_auto_prefers_fft_exact_for_stride1_and_dense_for_strided_layers():
    rng = np.random.default_rng(3)
    op = Conv2d(torch.tensor(rng.standard_normal((8, 16, 3, 3))), (16, 32, 32))  # dense ≈ 2.5 GiB
    assert ls.auto_method(op, ls.DEFAULT_MAX_BYTES) == "fft-exact"
    assert ls.auto_method(op, 2**20) == "fft-pcg"  # capacitance (992² · 8 B) over a 1 MiB budget
    # ResNet20's 96→96 'same' conv on 8×8: the padded FFT + capacitance path (m = 3,264) fits
    same = Conv2d(torch.tensor(rng.standard_normal((96, 96, 3, 3))), (96, 8, 8), padding=1)
    assert ls.auto_method(same, ls.DEFAULT_MAX_BYTES) == "fft-exact"
    # a stride-2 conv: polyphase fft-exact (capacitance smaller than the dense factor), else the
    # torus-preconditioned CG (also when 9 is not a multiple of the stride)
    for size in (8, 9):
        strided = Conv2d(torch.tensor(rng.standard_normal((96, 32, 3, 3))), (32, size, size), padding=1, stride=2)
        assert ls.auto_method(strided, ls.DEFAULT_MAX_BYTES) == "fft-exact"
        assert ls.auto_method(strided, 2**20) == "fft-pcg"


@pytest.mark.gpu
def test_fft_exact_on_cupy():
    import cupy  # noqa: F401  (only reached when cupy and a device exist)

    from linop import backend

    _, op, a, z, b = layer(4, 3, 9, 8, 3, seed=4)
    ref, _ = pinv_solution(op, z, a, b)
    ag = backend.asarray_like(a.numpy(), backend._cupy.empty(1))
    zg = backend.asarray_like(z.numpy(), backend._cupy.empty(1))
    res = solve(op, zg, ag, b=b.numpy(), method="fft-exact")
    assert backend.is_cupy(res.a)
    # same algorithm in float64 on the device (cuFFT / cuSOLVER rounding): as on the CPU
    assert rel(backend.to_numpy(res.a), ref, a) <= 1e-10
