"""The network Jacobian as an Operator: ``J = lin.operator(layer)`` (seed 000 appendix C).

Float64 throughout.  Tolerances: two evaluations of the same row that differ only in the
order of their floating-point sums (torch's forward-mode AD vs our node-by-node operators vs
scipy's sparse products) agree to about ``n · eps`` of the summed magnitudes, with ``n`` the
number of products along a path (~10^3 here); relative to the row's largest entry that is
below 1e-12 (~ 5000 ulps), while any structural error (a wrong tap, mask or bias slice) is
of the order of the entries themselves.  Values computed by the *same* sequence of float
operations are compared exactly.
"""
from __future__ import annotations

import numpy as np
import pytest
import scipy.sparse.linalg as spla
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch.func import jacfwd

from linop.linearize import linearise
from linop.operators import GraphOperator, dottest

from kit_nets import RandomGraph, equivalent_net, reference_net, sample_input

RTOL = 1e-12


def _rows_close(A, B, what, rtol=RTOL):
    A = torch.as_tensor(np.asarray(A)).reshape(A.shape[0], -1)
    B = torch.as_tensor(np.asarray(B)).reshape(B.shape[0], -1)
    scale = B.abs().amax(dim=1, keepdim=True).clamp_min(1e-300)
    err = ((A - B).abs() / scale).max().item()
    assert err <= rtol, f"{what}: max relative row error {err:.3e} > {rtol}"


def _reference(net, layer, x):
    """Rows of torch's forward-mode Jacobian of f(x, x_b) (every unit), as (U, n_in + n_b)."""
    f = net.extended_function(net.unit_node(layer).name)
    JI, Jb = jacfwd(f, argnums=(0, 1))(x, net.x_b)
    return torch.cat([JI.reshape(JI.shape[0], -1), Jb.reshape(Jb.shape[0], -1)], dim=1)


def _operator_rows(J):
    """Every row of J from the operator itself: ``J.T`` applied to the unit selectors."""
    U = J.shape[0]
    return J.apply_adjoint(torch.eye(U, dtype=torch.float64).reshape((U,) + J.out_shape))


def check_network(net, x, sparse_layers=None):
    """Every unit of every layer against jacfwd; dottest; ``J @ [x; x_b] = c``; and, for
    ``sparse_layers`` (default all), CSR == operator == compressed sweep."""
    lin = linearise(net, x)
    z = lin.extended_input().numpy()
    pre = lin.preactivations()
    sparse_layers = net.unit_layers if sparse_layers is None else sparse_layers
    sweep = {LJ.name: LJ for LJ in lin.sweep(sparse_layers)}
    for layer in net.unit_layers:
        J = lin.operator(layer)
        assert isinstance(J, GraphOperator) and J.shape == (pre[layer].numel(), z.size)
        rows = _operator_rows(J)
        _rows_close(rows, _reference(net, layer, x), f"{layer}: operator rows vs jacfwd")
        dottest(J, rng=0)
        c = pre[layer].numpy()
        assert np.abs(J.matvec(z) - c).max() <= RTOL * np.abs(c).max(), f"{layer}: J [x; x_b] != c"
        if layer in sparse_layers:
            A = J.to_sparse()
            if layer in (sparse_layers[0], sparse_layers[-1]):  # forward mode: the costliest check
                _rows_close(A.toarray(), J.matmat(np.eye(z.size)), f"{layer}: to_sparse vs matmat(I)")
            _rows_close(A.toarray(), rows, f"{layer}: to_sparse vs J.T rows")
            LJ = sweep[layer]
            dense = torch.cat([LJ.image().reshape(LJ.n_units, -1), LJ.bias()], dim=1)
            _rows_close(dense, A.toarray(), f"{layer}: sweep rows vs to_sparse rows")
    return lin


@pytest.fixture(scope="module")
def vgg():
    return reference_net("vgg7", (3, 8, 8), 0)


@pytest.fixture(scope="module")
def resnet():
    return reference_net("resnet20", (3, 4, 4), 1)


@pytest.fixture(scope="module")
def fixup():
    return reference_net("fixup", (3, 4, 4), 2)


def test_operator_vgg7_every_unit(vgg):
    lin = check_network(vgg, sample_input(vgg))
    J = lin.operator("Conv3")
    c = lin.preactivations()["Conv3"].numpy()
    sol = spla.lsmr(J, c, maxiter=100)[0]  # scipy takes J as is (a consistent system, J z = c)
    assert np.linalg.norm(J.matvec(sol) - c) <= 1e-2 * np.linalg.norm(c)
    # J.T maps unit selectors to effective hypersurfaces (seed 000 Eq. 4), as lin.unit_vjp
    u = np.array([0, 17, J.shape[0] - 1])
    HI, Hb = lin.unit_vjp("Conv3", u)
    E = np.zeros((J.shape[0], u.size))
    E[u, np.arange(u.size)] = 1.0
    H = J.T.matmat(E).T
    assert np.array_equal(H, torch.cat([HI.reshape(u.size, -1), Hb], 1).numpy())  # same operations


@pytest.mark.parametrize("which", ["resnet", "fixup"])
def test_operator_resnets_every_unit(which, request):
    net = request.getfixturevalue(which)
    # the CSR of every layer would repeat the sparse recurrence 20 times: a few layers suffice
    check_network(net, sample_input(net, 1), sparse_layers=["Conv0", "Conv7", "Conv13", "FC"])


def test_svds_accepts_the_operator(vgg):
    J = linearise(vgg, sample_input(vgg)).operator("FC")
    s = spla.svds(J, k=3, return_singular_vectors=False)
    ref = np.linalg.svd(J.to_sparse().toarray(), compute_uv=False)[:3]
    assert np.allclose(np.sort(s)[::-1], ref, rtol=1e-10)


@given(
    c=st.sampled_from([2, 3]),
    stride=st.sampled_from([1, 2]),
    pool=st.sampled_from(["max", "avg"]),
    slope=st.sampled_from([0.0, 0.1]),
    cat=st.booleans(),
    k=st.sampled_from([1, 3]),
    hw=st.sampled_from([(6, 6), (8, 5)]),
    seed=st.integers(0, 2**16),
)
@settings(max_examples=8)
def test_operator_random_graphs(c, stride, pool, slope, cat, k, hw, seed):
    """Residual sums, concatenations, max / avg pooling, LeakyReLU: every unit, every layer."""
    net = equivalent_net(RandomGraph(c, stride, pool, slope, cat, k), (2,) + hw, seed)
    check_network(net, sample_input(net, seed))


def test_to_sparse_refuses_beyond_max_bytes(vgg):
    J = linearise(vgg, sample_input(vgg)).operator("Conv2")
    with pytest.raises(MemoryError, match=r"GiB > max_bytes.*matvec"):
        J.to_sparse(max_bytes=10_000)
    assert J.sparse_bytes() >= J.to_sparse().nnz * 8  # the estimate bounds the result


def test_identity_schedule_is_the_same_operator(vgg):
    """The paper's identity batch (P = (H, W) everywhere) is one more schedule of the sweep."""
    lin = linearise(vgg, sample_input(vgg))
    assert set(lin.periods(schedule="identity").values()) == {(8, 8)}
    for A, B in zip(lin.sweep(schedule="identity"), lin.sweep()):
        _rows_close(A.image(), B.image(), f"{A.name}: identity vs auto, image")
        _rows_close(A.bias(), B.bias(), f"{A.name}: identity vs auto, bias")


def test_node_operators_are_the_library_operators(vgg):
    """The local Jacobians are linop.operators (dottest each)."""
    from linop.operators import HStack, MaxPool2d, ReLUMask

    lin = linearise(vgg, sample_input(vgg))
    kinds = set()
    for n in vgg.nodes[1:]:
        op = lin.node_operator(n.name)
        dottest(op, rng=1)
        kinds.add(type(op))
    assert {HStack, ReLUMask, MaxPool2d} <= kinds or {HStack, ReLUMask} <= kinds


def test_backmap_reuses_a_linearisation(vgg):
    from linop.hypersurface import backmap, reconstructed_activations

    x = sample_input(vgg)
    lin = linearise(vgg, x)
    a = backmap(vgg, None, "Conv2", units=[3, 5], linearisation=lin)
    b = backmap(vgg, x, "Conv2", units=[3, 5])
    assert torch.equal(a.image, b.image) and torch.equal(a.bias, b.bias)
    r = reconstructed_activations(vgg, None, ["Conv1"], linearisation=lin)
    assert torch.equal(r["Conv1"][1], reconstructed_activations(vgg, x, ["Conv1"])["Conv1"][1])
    with pytest.raises(ValueError, match="x differs"):
        backmap(vgg, x + 1, "Conv2", linearisation=lin)
    with pytest.raises(ValueError, match="x is required"):
        backmap(vgg, None, "Conv2")
