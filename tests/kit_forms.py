"""Test kit: the "three agreeing forms" checks shared by the operator and converter tests.

Not a test module (several test modules use these; none imports another).

* :func:`check_forms` — an :class:`~linop.operators.Operator` against a torch function:
  ``to_sparse() @ x == matvec == matmat == apply ==`` torch, ``rmatvec == rmatmat ==
  apply_adjoint ==`` autograd's VJP, ``dottest`` both ways, and (``pattern``) the CSR's
  non-zero pattern and entries equal the identity basis pushed through torch.
* :func:`check_network` — a converted model: forward == torch, ``<[x; x_b], H> = c`` on every
  unit, H rows == ``torch.func`` rows of ``f(x, x_b)`` for sampled units.

Tolerances (float64, unit roundoff u = 2^-53 ≈ 1.1e-16).  An output is a sum of K ≲ 10^3
rounded products, off by at most ~K·u·Σ|terms|; ``RTOL = 1e-12`` of the summed magnitudes
(``|A||x|`` for operators, the row's largest entry or max |c| for networks) is immune to
summation order yet fails for any wrong entry, tap, mask or bias slice (which errs by the
order of the values themselves).  Matrix entries of separable ops are a product of two rounded
1-D weights that torch rounds in its own order: a few ulps apart, compared at ``1e-14``.
"""
from __future__ import annotations

import numpy as np
import scipy.sparse
import torch
from torch import nn
from torch.func import jacfwd, jacrev

from linop import backend
from linop.convert import from_torch
from linop.hypersurface import reconstructed_activations
from linop.linearize import linearise
from linop.operators.base import Operator, dottest

__all__ = ["RTOL", "ENTRY_RTOL", "check_forms", "check_network"]

RTOL = 1e-12
ENTRY_RTOL = 1e-14
TINY = 1e-300  # keeps the bound positive where |A||x| is exactly 0 (both sides are then exactly 0)
JAC_BLOCK = 1024  # columns of [x; x_b] per jacfwd call / rows per jacrev chunk (bounds memory)


def _close(actual, expected, scale, what):
    actual, expected, scale = (np.asarray(backend.to_numpy(a), dtype=np.float64) for a in (actual, expected, scale))
    assert actual.shape == expected.shape, (what, actual.shape, expected.shape)
    err = np.abs(actual - expected)
    bound = RTOL * np.abs(scale) + TINY
    assert np.all(err <= bound), f"{what}: worst err {err.max():.3e}, {(err > bound).sum()} entries off"


def check_forms(op: Operator, ref, n: int = 2, seed: int = 0, pattern: bool = True) -> scipy.sparse.csr_matrix:
    """All forms of ``op`` against the torch function ``ref`` (float64, batched).

    With ``pattern``, the CSR also equals the matrix obtained by pushing the identity basis
    through ``ref`` (entry-wise to ``ENTRY_RTOL``), with the same non-zero pattern — so it
    stores no entry the torch op lacks and misses none (an independent nnz count)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn((n,) + op.in_shape, generator=g, dtype=torch.float64)
    v = torch.randn((n,) + op.out_shape, generator=g, dtype=torch.float64)
    A = op.to_sparse()
    assert isinstance(A, scipy.sparse.csr_matrix) and A.shape == op.shape and A.has_canonical_format
    assert np.all(A.data != 0), "explicit zeros stored"
    X, V = x.reshape(n, -1).numpy().T, v.reshape(n, -1).numpy().T
    fscale, ascale = abs(A) @ np.abs(X), abs(A).T @ np.abs(V)

    y_ref = ref(x).detach().reshape(n, -1).numpy().T
    _close(op.apply(x).reshape(n, -1).numpy().T, y_ref, fscale, "apply")
    _close(A @ X, y_ref, fscale, "to_sparse @ x")
    _close(op.matvec(X[:, 0]), y_ref[:, 0], fscale[:, 0], "matvec")
    _close(op.matmat(X), y_ref, fscale, "matmat")

    xg = x.clone().requires_grad_(True)
    (vjp,) = torch.autograd.grad(ref(xg), xg, v)
    vjp = vjp.reshape(n, -1).numpy().T
    _close(op.apply_adjoint(v).reshape(n, -1).numpy().T, vjp, ascale, "apply_adjoint")
    _close(A.T @ V, vjp, ascale, "to_sparse.T @ v")
    _close(op.rmatvec(V[:, 0]), vjp[:, 0], ascale[:, 0], "rmatvec")
    _close(op.rmatmat(V), vjp, ascale, "rmatmat")

    if pattern:
        eye = torch.eye(op.shape[1], dtype=torch.float64).reshape((op.shape[1],) + op.in_shape)
        dense = ref(eye).detach().reshape(op.shape[1], -1).numpy().T
        assert A.nnz == np.count_nonzero(dense), "nnz differs from the torch op's non-zero count"
        D = A.toarray()
        assert np.array_equal(D != 0, dense != 0), "sparsity pattern differs from the torch op's"
        assert np.all(np.abs(D - dense) <= ENTRY_RTOL * np.abs(dense)), "entries differ from the torch op's"
    dottest(op, rng=seed)
    dottest(op.T, rng=seed + 1)
    return A


def _unit_rows(net, x, samples: dict[str, np.ndarray]) -> torch.Tensor:
    """Autodiff rows ``[∂c_u/∂x, ∂c_u/∂x_b]`` of the sampled units of all layers, in one pass:
    ``torch.func.jacrev`` (one forward, a batched backward per sampled row) when there are
    fewer rows than columns of ``[x; x_b]`` — the deep zoo models — else ``jacfwd`` over
    blocks of columns.  Either is torch's autodiff of the network's own node functions,
    independent of the linearisation whose H rows it checks."""
    nodes = {net.unit_node(l).name: (l, torch.as_tensor(u)) for l, u in samples.items()}

    def f(xi, xb):
        vals, out = {}, []
        for n in net.nodes:
            vals[n.name] = n.forward([vals[j] for j in n.inputs] if n.inputs else [xi.unsqueeze(0)], xb)
            if n.name in nodes:
                out.append(vals[n.name][0].reshape(-1)[nodes[n.name][1]])
        return torch.cat(out)

    nx, xb = x.numel(), net.x_b
    n = nx + xb.numel()
    if sum(len(u) for u in samples.values()) < n:
        def whole(z):
            return f(x + z[:nx].reshape(x.shape), xb + z[nx:])

        return jacrev(whole, chunk_size=JAC_BLOCK)(x.new_zeros(n))
    # jacfwd over blocks of the columns of [x; x_b] (jacfwd has no chunk_size; one block
    # of every column would hold n_columns copies of every activation at once)
    cols = []
    for a in range(0, n, JAC_BLOCK):
        b = min(n, a + JAC_BLOCK)

        def g(t, a=a, b=b):
            z = torch.cat([t.new_zeros(a), t, t.new_zeros(n - b)])
            return f(x + z[:nx].reshape(x.shape), xb + z[nx:])

        cols.append(jacfwd(g)(x.new_zeros(b - a)))
    return torch.cat(cols, dim=1)


def check_network(model: nn.Module, shape: tuple[int, ...], n_units: int | None = 6, seed: int = 0,
           every_unit: bool = True, inputs: torch.Tensor | None = None):
    """The three checks of the module docstring; returns the network.

    ``n_units``: units per layer whose H rows are compared with jacfwd (None: every unit).
    ``every_unit``: check ``<[x; x_b], H> = c`` on every unit (else the sampled ones).
    ``inputs``: the batch to check (default: two standard normal samples); checks 2 and 3
    use its first sample."""
    net = from_torch(model, shape)
    g = torch.Generator().manual_seed(seed)
    xb = torch.randn((2,) + tuple(shape), generator=g, dtype=torch.float64) if inputs is None \
        else inputs.to(torch.float64)
    with torch.no_grad():
        want = model(xb)
    got = net.forward(xb)
    err = float((got - want).norm() / want.norm())
    assert err <= RTOL, f"forward: relative error {err:.3e}"
    x = xb[0]
    lin = linearise(net, x)
    rng = np.random.default_rng(seed)
    samples = {}
    for layer in net.unit_layers:
        U = int(np.prod(net.unit_node(layer).out_shape))
        k = U if n_units is None else min(U, n_units)
        samples[layer] = np.sort(rng.choice(U, size=k, replace=False))
    if every_unit:
        for layer, (c, c_hat) in reconstructed_activations(net, x, linearisation=lin).items():
            e = float((c - c_hat).abs().max() / c.abs().max())
            assert e <= RTOL, f"{layer}: <[x; x_b], H> != c (max rel {e:.3e})"
    ref = _unit_rows(net, x, samples)
    rows, z = [], lin.extended_input()
    for layer, u in samples.items():
        J = lin.operator(layer)
        E = torch.zeros((u.size, J.shape[0]), dtype=torch.float64)
        E[torch.arange(u.size), torch.as_tensor(u)] = 1.0
        H = J.apply_adjoint(E.reshape((u.size,) + tuple(J.out_shape))).reshape(u.size, -1)
        rows.append(H)
        if not every_unit:
            c = lin.preactivations()[layer].reshape(-1)[torch.as_tensor(u)]
            assert (H @ z.reshape(-1) - c).abs().max() <= RTOL * c.abs().max().clamp_min(1e-300)
    H = torch.cat(rows)
    scale = ref.abs().amax(dim=1, keepdim=True).clamp_min(1e-300)
    e = float(((H - ref).abs() / scale).max())
    assert e <= RTOL, f"H rows vs jacfwd rows: max relative row error {e:.3e}"
    return net
