"""Reverse linear step a* = â + W⁺(z* − b − W â) (seed 001 §3.1): dense, sparse, batched CG."""
import numpy as np
import pytest
import scipy.sparse
import scipy.sparse.linalg as spla
import torch
from hypothesis import given
from hypothesis import strategies as st

from linop.operators.conv import Conv2d
from linop.operators.dense import Linear
from linop.solvers import DenseSolver, solve

EPS = np.finfo(np.float64).eps


def pinv_solution(Wd, z, a, b=0.0, rcond=1e-10):
    """Reference: numpy pinv (rcond 1e-10 so exactly-constructed zero singular values are cut)."""
    return a + (np.linalg.pinv(Wd, rcond=rcond) @ (z - b - a @ Wd.T).T).T


def rel_err(a, ref, a_hat):
    """||a − a*|| / ||a* − â|| per sample: the error relative to the size of the correction."""
    return np.linalg.norm(a - ref, axis=1) / np.linalg.norm(ref - a_hat, axis=1)


def matrix_with_spectrum(rng, m, n, rank, smin=0.1, smax=10.0):
    """W = U diag(s) Vᵀ with `rank` singular values in [smin, smax] (cond ≤ smax/smin = 100), rest 0."""
    U, _ = np.linalg.qr(rng.standard_normal((m, m)))
    V, _ = np.linalg.qr(rng.standard_normal((n, n)))
    s = np.exp(rng.uniform(np.log(smin), np.log(smax), rank))
    if rank >= 2:
        s[0], s[-1] = smax, smin  # cond = smax / smin exactly
    return (U[:, :rank] * s) @ V[:, :rank].T


shapes = st.tuples(st.integers(1, 12), st.integers(1, 12), st.integers(0, 10_000))


@given(shapes, st.sampled_from(["row", "col", "deficient"]))
def test_dense_equals_pinv(shape, kind):
    m, n, seed = shape
    rng = np.random.default_rng(seed)
    k = min(m, n)
    if kind == "deficient":
        if k < 2:
            return
        rank = int(rng.integers(1, k))
    else:
        rank = k
    W = matrix_with_spectrum(rng, m, n, rank)
    N = 3
    a, z = rng.standard_normal((N, n)), rng.standard_normal((N, m))
    b = rng.standard_normal(m)
    res = solve(W, z, a, b=b, method="dense")
    ref = pinv_solution(W, z, a, b)
    # cond(W) ≤ 100: Cholesky-of-WWᵀ error ~ eps·cond² ≈ 2e-12, QR / SVD ~ eps·cond; 1e-10 leaves margin
    err = np.linalg.norm(res.a - ref, axis=1) / (np.linalg.norm(ref - a, axis=1) + np.linalg.norm(a, axis=1))
    assert err.max() <= 1e-10
    expect = "MDP" if rank == m else ("CCP" if rank == n else "rank-deficient")
    assert res.case == expect
    assert res.info["rank"] == rank
    if expect == "MDP":
        assert res.residual.max() <= 1e-12  # constraint holds to rounding (~ cond·eps)
    if expect == "rank-deficient":
        assert res.info["factorization"] == "svd" and np.isfinite(res.info["cond_effective"])


def test_dense_solver_reused_across_batches_and_types():
    rng = np.random.default_rng(1)
    W = rng.standard_normal((6, 10))
    ds = DenseSolver(W)
    assert ds.factorization == "cholesky" and ds.case == "MDP"
    for N in (1, 5):
        a, z = rng.standard_normal((N, 10)), rng.standard_normal((N, 6))
        r1 = solve(W, z, a, method="dense", solver=ds)
        r2 = solve(torch.tensor(W), torch.tensor(z), torch.tensor(a), method="dense", solver=ds)
        assert isinstance(r2.a, torch.Tensor) and r2.a.dtype == torch.float64
        np.testing.assert_allclose(r1.a, pinv_solution(W, z, a), rtol=0, atol=1e-12)
        np.testing.assert_allclose(r2.a.numpy(), r1.a, rtol=0, atol=1e-14)
    # Linear operator and a generic LinearOperator give the same answer
    a, z = rng.standard_normal((2, 10)), rng.standard_normal((2, 6))
    ref = pinv_solution(W, z, a)
    for Wform in (Linear(torch.tensor(W)), spla.aslinearoperator(W), scipy.sparse.csr_matrix(W)):
        for method in ("dense", "cg", "lsmr"):
            # cg / lsmr stop at the default tol 1e-10 on a well-conditioned 6x10 W: 1e-9 absolute
            np.testing.assert_allclose(solve(Wform, z, a, method=method).a, ref, rtol=0, atol=1e-9)


def test_ill_conditioned_mdp_falls_back_to_svd_and_reports_condition():
    rng = np.random.default_rng(2)
    W = matrix_with_spectrum(rng, 5, 9, 5, smin=1e-6, smax=1.0)  # cond 1e6 > cond_limit 1e4
    a, z = rng.standard_normal((2, 9)), rng.standard_normal((2, 5))
    res = solve(W, z, a, method="dense")
    assert res.info["factorization"] == "svd" and res.case == "MDP"
    assert 1e5 < res.info["cond"] < 1e7
    # SVD error ~ eps·cond relative to ||W⁺ r|| ≈ 1e6 ⇒ absolute 1e-10·1e6 margin
    np.testing.assert_allclose(res.a, pinv_solution(W, z, a, rcond=1e-12), rtol=1e-8)


def im2col_conv(w, H, Wd, stride=1, pad=0):
    """Independent reference: the dense conv matrix built from unit inputs through torch conv2d."""
    cin = w.shape[1]
    n = cin * H * Wd
    eye = torch.eye(n, dtype=torch.float64).reshape(n, cin, H, Wd)
    out = torch.nn.functional.conv2d(eye, w, stride=stride, padding=pad)
    return out.reshape(n, -1).T.numpy()


@pytest.mark.parametrize("cin,cout,stride,pad", [(3, 2, 1, 0), (2, 4, 1, 0), (2, 3, 2, 1), (1, 5, 2, 0), (2, 2, 1, 1)])
@pytest.mark.parametrize("method", ["lsmr", "lsqr", "cg"])
def test_sparse_conv_solve_equals_dense_pinv(cin, cout, stride, pad, method):
    rng = np.random.default_rng(cin * 10 + cout + stride)
    H = 7
    w = torch.tensor(rng.standard_normal((cout, cin, 3, 3)))
    op = Conv2d(w, (cin, H, H), stride=stride, padding=pad)
    Wd = im2col_conv(w, H, H, stride, pad)
    np.testing.assert_allclose(op.to_sparse().toarray(), Wd, rtol=0, atol=1e-14)
    N = 3
    a = rng.standard_normal((N, cin, H, H))
    z = rng.standard_normal((N,) + op.out_shape)
    bias = rng.standard_normal(cout)
    tol = 1e-12
    res = solve(op, z, a, b=bias, method=method, tol=tol)
    assert res.a.shape == a.shape
    b_full = np.repeat(bias, np.prod(op.out_shape[1:]))
    ref = pinv_solution(Wd, z.reshape(N, -1), a.reshape(N, -1), b_full)
    s = np.linalg.svd(Wd, compute_uv=False)
    s = s[s > 1e-10 * s[0]]
    kappa = s[0] / s[-1]
    # Stopping at relative residual tol bounds the solution error by κ·tol (consistent MDP)
    # or κ²·tol (least squares, CCP); ×100 for the recurred-vs-true residual gap.
    bound = 100 * kappa**2 * tol + 1e-12
    assert rel_err(res.a.reshape(N, -1), ref, a.reshape(N, -1)).max() <= bound
    assert res.info["converged_all"]
    if Wd.shape[0] <= Wd.shape[1] and np.linalg.matrix_rank(Wd) == Wd.shape[0]:
        assert res.case == "MDP"
        # MDP: the constraint holds; lsmr/lsqr may stop on their normal-equation test
        # ||Wᵀs|| ≤ tol·||W||·||s||, which only bounds the constraint residual by ~κ·tol.
        assert res.residual.max() <= max(1e-10, 100 * kappa * tol)


def test_mdp_constraint_residual_all_exact_methods():
    rng = np.random.default_rng(5)
    op = Conv2d(torch.tensor(rng.standard_normal((4, 6, 3, 3))), (6, 10, 10))
    a = rng.standard_normal((4, 6, 10, 10))
    z = rng.standard_normal((4,) + op.out_shape)
    Wd = op.to_sparse().toarray()
    r = (z - 0.5).reshape(4, -1) - a.reshape(4, -1) @ Wd.T
    ratio = np.linalg.norm(r, axis=1) / np.linalg.norm((z - 0.5).reshape(4, -1), axis=1)
    for method in ("dense", "lsmr", "cg", "fft-pcg"):
        res = solve(op, z, a, b=0.5, method=method, tol=1e-11 if method in ("cg", "fft-pcg") else None)
        assert res.case == "MDP"
        if method in ("cg", "fft-pcg"):
            # CG stops at ||r − Wδ|| ≤ tol·||r||, i.e. a residual relative to ||z* − b|| of
            # tol·||r||/||z* − b||; ×2 for recurred-vs-true residual drift.
            assert np.all(res.residual <= 2e-11 * ratio + 1e-13), (method, res.residual, ratio)
        # dense: rounding only; lsmr (atol = btol = 1e-12 default): scipy's consistent-system test
        assert res.residual.max() <= 1e-10, (method, res.residual)


def test_cg_on_cuda_style_path_runs_on_torch_and_reports():
    rng = np.random.default_rng(6)
    op = Conv2d(torch.tensor(rng.standard_normal((2, 3, 3, 3))), (3, 6, 6))
    a = torch.tensor(rng.standard_normal((5, 3, 6, 6)))
    z = torch.tensor(rng.standard_normal((5, 2, 4, 4)))
    res = solve(op, z, a, method="cg", tol=1e-11, maxiter=500)
    assert isinstance(res.a, torch.Tensor) and res.a.shape == a.shape
    assert res.info["tol"] == 1e-11 and res.info["iterations"].shape == (5,) and res.info["converged_all"]
    ref = solve(op, z, a, method="dense")
    res2 = solve(op, z, a, method="cg", reference=ref.a)
    assert res2.info["dist_to_exact"].max() <= 1e-8  # κ·tol with κ ≈ 5, tol 1e-10 (+ margin)


def test_errors():
    rng = np.random.default_rng(7)
    W = rng.standard_normal((3, 5))
    a, z = rng.standard_normal((2, 5)), rng.standard_normal((2, 3))
    with pytest.raises(ValueError, match="method"):
        solve(W, z, a, method="qr")
    with pytest.raises(ValueError, match="a_hat"):
        solve(W, z, rng.standard_normal((2, 4)))
    with pytest.raises(ValueError, match="samples"):
        solve(W, z[:1], a)
    with pytest.raises(ValueError, match="NaN"):
        solve(W, np.full((2, 3), np.nan), a)
    with pytest.raises(ValueError, match="bias"):
        solve(W, z, a, b=np.ones(4))
    with pytest.raises(ValueError, match="tol"):
        solve(W, z, a, method="cg", tol=2.0)
    with pytest.raises(MemoryError, match="GiB"):
        solve(W, z, a, method="dense", max_bytes=10)
    op = Conv2d(torch.tensor(rng.standard_normal((2, 3, 3, 3))), (3, 8, 8), stride=2)
    a4, z4 = rng.standard_normal((1, 3, 8, 8)), rng.standard_normal((1,) + op.out_shape)
    with pytest.raises(NotImplementedError, match="stride"):
        solve(op, z4, a4, method="fft")
    op = Conv2d(torch.tensor(rng.standard_normal((2, 3, 3, 3))), (3, 8, 8), padding=1)
    with pytest.raises(NotImplementedError, match="padding"):  # the paper's path; fft-pcg / fft-exact cover it
        solve(op, rng.standard_normal((1,) + op.out_shape), a4, method="fft")
    with pytest.raises(ValueError, match="Conv2d"):
        solve(W, z, a, method="fft")


def test_auto_picks_dense_small_and_fft_pcg_for_large_convs():
    rng = np.random.default_rng(8)
    op = Conv2d(torch.tensor(rng.standard_normal((2, 3, 3, 3))), (3, 8, 8))
    a, z = rng.standard_normal((1, 3, 8, 8)), rng.standard_normal((1,) + op.out_shape)
    assert solve(op, z, a).method == "dense"
    assert solve(op, z, a, max_bytes=1000).method == "fft-pcg"
    op2 = Conv2d(torch.tensor(rng.standard_normal((2, 3, 3, 3))), (3, 8, 8), stride=2)
    # strided: over every factorisation budget, the (polyphase) torus-preconditioned CG
    assert solve(op2, rng.standard_normal((1,) + op2.out_shape), a, max_bytes=1000).method == "fft-pcg"


@pytest.mark.gpu
def test_cg_and_dense_on_cupy():
    import cupy  # noqa: F401  (only reached when cupy and a device exist)

    from linop import backend

    rng = np.random.default_rng(9)
    op = Conv2d(torch.tensor(rng.standard_normal((3, 4, 3, 3))), (4, 9, 9))
    a = rng.standard_normal((4, 4, 9, 9))
    z = rng.standard_normal((4,) + op.out_shape)
    ref = solve(op, z, a, method="dense").a
    ag, zg = backend.asarray_like(a, backend._cupy.empty(1)), backend.asarray_like(z, backend._cupy.empty(1))
    for method in ("cg", "dense", "fft-pcg"):
        res = solve(op, zg, ag, method=method)
        assert backend.is_cupy(res.a)
        np.testing.assert_allclose(backend.to_numpy(res.a), ref, rtol=0, atol=1e-8)
    Wg = op.to_sparse(gpu=True)
    res = solve(Wg, zg.reshape(4, -1), ag.reshape(4, -1), method="cg")
    np.testing.assert_allclose(backend.to_numpy(res.a).reshape(a.shape), ref, rtol=0, atol=1e-8)


def test_register_method_is_used_by_solve():
    """A user method (here: the normal equations of the second kind, dense) is dispatched to,
    listed in METHODS, and its result goes through the same result building."""
    from linop.solvers import METHODS, register_method
    from linop.solvers.registry import _REGISTRY

    calls = []

    def normal_equations(prob, opts):
        calls.append(opts.extra.pop("marker", None))
        Wd = torch.as_tensor(prob.op.to_sparse(dtype=np.float64).toarray()).to(prob.a_hat)
        y = torch.linalg.solve(Wd @ Wd.T, prob.rhs().T)
        return prob.a_hat + (Wd.T @ y).T, {"tol": None, "algorithm": "W Wᵀ y = r"}

    def only_wide(op):
        if op.shape[0] > op.shape[1]:
            raise ValueError("toy method: W must be wide")

    register_method("toy-ne", normal_equations, applicable=only_wide, summary="test")
    try:
        assert "toy-ne" in METHODS and METHODS[-1] == "toy-ne"
        with pytest.raises(ValueError, match="already registered"):
            register_method("toy-ne", normal_equations)
        rng = np.random.default_rng(11)
        W = rng.standard_normal((4, 9))
        a, z = rng.standard_normal((3, 9)), rng.standard_normal((3, 4))
        res = solve(W, z, a, method="toy-ne", marker=1)
        assert calls == [1] and res.method == "toy-ne" and res.case == "MDP"
        # cond(W) ~ 3 for a random 4x9 Gaussian: the normal equations lose ~eps·cond², 1e-12 is ample
        np.testing.assert_allclose(res.a, pinv_solution(W, z, a), rtol=0, atol=1e-12)
        with pytest.raises(ValueError, match="wide"):
            solve(W.T.copy(), a, z, method="toy-ne")
    finally:
        del _REGISTRY["toy-ne"]
    assert "toy-ne" not in METHODS
    with pytest.raises(ValueError, match="auto"):
        register_method("auto", normal_equations)


@pytest.mark.parametrize("kind", ["row", "col", "deficient", "square"])
def test_every_method_reports_the_same_case_for_the_same_W(kind):
    """The case is a property of W (shape and numerical rank), not of the method that ran."""
    rng = np.random.default_rng(12)
    m, n, rank = {"row": (5, 9, 5), "col": (9, 5, 5), "deficient": (6, 8, 3), "square": (6, 6, 6)}[kind]
    W = matrix_with_spectrum(rng, m, n, rank)
    a, z = rng.standard_normal((2, n)), rng.standard_normal((2, m))
    expect = {"row": "MDP", "col": "CCP", "deficient": "rank-deficient", "square": "MDP"}[kind]
    for method in ("dense", "lsmr", "lsqr", "cg"):
        res = solve(W, z, a, method=method)
        assert (res.case, res.info["case_from"]) == (expect, "rank"), method
    if kind == "row":  # beyond the rank probe's budget every method falls back to the same shape rule
        for method in ("cg", "lsmr"):
            res = solve(W, z, a, method=method, max_bytes=10)
            assert (res.case, res.info["case_from"]) == ("MDP", "shape"), method


def test_rank_deficient_conv_is_labelled_alike_by_exact_and_fft_methods():
    """A single-tap kernel never reads part of the input: W is rank-deficient, whatever runs."""
    rng = np.random.default_rng(14)
    w = np.zeros((3, 2, 3, 3))
    w[:, :, 1, 1] = rng.standard_normal((3, 2))
    op = Conv2d(torch.tensor(w), (2, 6, 6))
    a, z = rng.standard_normal((2, 2, 6, 6)), rng.standard_normal((2, 3, 4, 4))
    cases = {m: solve(op, z, a, method=m, maxiter=20).case for m in ("dense", "lsmr", "cg", "fft", "fft-exact")}
    assert set(cases.values()) == {"rank-deficient"}, cases


def test_one_sample_in_one_sample_out():
    """The return rule: a single 1-D (or per-sample-shaped) input gives a single output."""
    rng = np.random.default_rng(13)
    W = rng.standard_normal((4, 7))
    a, z = rng.standard_normal(7), rng.standard_normal(4)
    res = solve(W, z, a, method="dense")
    assert res.a.shape == (7,) and res.residual.shape == (1,)
    np.testing.assert_array_equal(res.a, solve(W, z[None], a[None], method="dense").a[0])
    rt = solve(torch.tensor(W), torch.tensor(z), torch.tensor(a), method="cg")
    assert isinstance(rt.a, torch.Tensor) and rt.a.shape == (7,)
    op = Conv2d(torch.tensor(rng.standard_normal((2, 3, 3, 3))), (3, 6, 6))
    r4 = solve(op, rng.standard_normal(op.out_shape), rng.standard_normal(op.in_shape), method="lsmr")
    assert r4.a.shape == op.in_shape
    with pytest.raises(TypeError, match="W must be"):
        solve([[1.0]], z, a)


def test_finite_check_is_exact_including_overflowing_sums():
    """The one-reduction finiteness test of solve's inputs: a finite sum proves every entry
    finite; entries whose sum overflows (1e308 + 1e308) are still finite and accepted, while one
    NaN / ±inf entry anywhere is refused."""
    from linop.solvers.result import _all_finite

    big = torch.full((4, 3), 1e308, dtype=torch.float64)
    assert _all_finite(big) and not bool(torch.isfinite(big.sum()))
    for bad in (float("nan"), float("inf"), -float("inf")):
        x = torch.zeros(4, 3, dtype=torch.float64)
        x[2, 1] = bad
        assert not _all_finite(x)
    x = torch.zeros(4, 3, dtype=torch.float64)
    x[0, 0], x[3, 2] = float("inf"), -float("inf")  # inf − inf = nan: still refused
    assert not _all_finite(x)
