"""The one edge adapter ``linop.operators.as_operator`` (issue 9).

Every accepted form of a matrix — dense numpy / torch, scipy sparse, a foreign scipy
``LinearOperator``, an ``Operator`` — becomes an ``Operator`` whose explicit matrix *is* the
given one and whose three forms agree (``dottest``).

Tolerances.  ``to_sparse()`` copies the given entries, so it equals the matrix exactly
(``atol = 0``).  ``apply`` / ``matvec`` compute ``M x`` in float64 with a different summation
order than the reference ``M @ x`` (BLAS vs CSR vs torch): n ≤ 12 terms of size ≤ |M||x|
give at most ~12·u·|M||x| ≈ 3e-15·|M||x|; we compare at 1e-14 relative to that scale.
"""
import numpy as np
import pytest
import scipy.sparse
import scipy.sparse.linalg as spla
import torch

from linop import backend
from linop.operators import Conv2d, Linear, LinearOperatorAdapter, MatrixOperator, Operator, as_operator, dottest
from linop.operators.adapt import dense_array, scipy_form

RNG = np.random.default_rng(0)
M = RNG.standard_normal((7, 12))
M[M < -1.0] = 0.0  # some exact zeros for the sparse forms


def forms():
    yield "numpy", M
    yield "torch", torch.tensor(M)
    yield "scipy-csr", scipy.sparse.csr_matrix(M)
    yield "scipy-coo", scipy.sparse.coo_matrix(M)
    yield "linear-operator", spla.aslinearoperator(M)
    yield "operator", Linear(torch.tensor(M))
    if backend.cupy_available():  # pragma: no cover - GPU machines only
        import cupy

        yield "cupy", cupy.asarray(M)


@pytest.mark.parametrize("kind,W", list(forms()), ids=[k for k, _ in forms()])
def test_as_operator_is_the_given_matrix(kind, W):
    op = as_operator(W)
    assert isinstance(op, Operator) and op.shape == M.shape
    np.testing.assert_array_equal(op.to_sparse(dtype=np.float64).toarray(), M)  # exact copy of the entries
    np.testing.assert_array_equal(dense_array(W), M)
    x = RNG.standard_normal((3, M.shape[1]))
    y = RNG.standard_normal((3, M.shape[0]))
    scale_f = np.abs(M) @ np.abs(x).T
    scale_a = np.abs(M).T @ np.abs(y).T
    fx = op.apply(torch.tensor(x)).numpy()
    aty = op.apply_adjoint(torch.tensor(y)).numpy()
    assert np.all(np.abs(fx - x @ M.T) <= 1e-14 * scale_f.T)
    assert np.all(np.abs(aty - y @ M) <= 1e-14 * scale_a.T)
    assert np.all(np.abs(op.matvec(x[0]) - M @ x[0]) <= 1e-14 * scale_f[:, 0])
    dottest(op, rng=1)
    dottest(op.T, rng=2)


def test_as_operator_passes_operators_through_and_keeps_shapes():
    conv = Conv2d(torch.tensor(RNG.standard_normal((2, 3, 3, 3))), (3, 6, 6))
    assert as_operator(conv) is conv
    A = spla.aslinearoperator(conv.to_sparse())
    A.in_shape, A.out_shape = conv.in_shape, conv.out_shape
    wrapped = as_operator(A)
    assert isinstance(wrapped, LinearOperatorAdapter) and wrapped.in_shape == (3, 6, 6)
    x = torch.tensor(RNG.standard_normal((2, 3, 6, 6)))
    torch.testing.assert_close(wrapped.apply(x), conv.apply(x), rtol=0, atol=1e-13)
    dottest(wrapped, rng=3)


def test_scipy_form_does_not_densify():
    S = scipy.sparse.csr_matrix(M)
    assert scipy_form(S) is as_operator(S).matrix
    assert isinstance(scipy_form(M), np.ndarray)
    A = spla.aslinearoperator(M)
    assert scipy_form(A) is A
    assert scipy.sparse.issparse(scipy_form(Linear(torch.tensor(M))))


def test_as_operator_errors_name_the_argument():
    with pytest.raises(TypeError, match="W must be"):
        as_operator([[1.0, 2.0]])
    with pytest.raises(TypeError, match="weights must be"):
        as_operator("matrix", name="weights")
    with pytest.raises(ValueError, match="2-D"):
        as_operator(np.ones(3))
    with pytest.raises(ValueError, match="real"):
        as_operator(np.ones((2, 2), dtype=complex))
    with pytest.raises(ValueError, match="empty"):
        MatrixOperator(np.ones((0, 3)))
    assert as_operator(np.ones((2, 3), dtype=np.int64)).dtype == np.float64  # integers promoted
