"""Exact FFT reconstruction for every conv: stride (polyphase), groups, dilation (issue 14).

The reference is always the dense pseudo-inverse of the SAME explicit sparse matrix
``Conv2d(...).to_sparse()``, computed by SVD in float64.
"""
import numpy as np
import pytest
import torch
from hypothesis import assume, given

import linop.solvers as ls
from linop.operators.conv import Conv2d
from linop.solvers import solve
from linop.solvers.capacitance import CapacitanceSolver
from kit_convs import conv_from, conv_geometries
from test_fft_padded import RANK_CUT, dense, rel_err  # noqa: F401  (one dense pinv reference)
from linop.solvers.fft_padded import (
    ExactConvSolver,
    PaddedConvSolver,
    exact_conv_bytes,
    from_polyphase,
    padded_conv_bytes,
    polyphase_geometry,
    polyphase_kernel,
    to_polyphase,
)

convs = conv_geometries  # the shared strategy (kit_convs)


def build(c, n=3):
    w, op = conv_from(c)
    rng = np.random.default_rng(c["seed"])
    rng.standard_normal(w.shape)  # the weight's draws: the data stream continues after them, as before
    return w, op, torch.tensor(rng.standard_normal((n,) + op.out_shape))


@given(convs())
def test_polyphase_identity(c):
    """W = W_poly Π: the phase conv of the polyphase-stacked input equals the strided conv
    (to rounding: the same products, summed in another order) and Πᵀ Π = I exactly."""
    w, op, _ = build(c)
    geo = polyphase_geometry(op.in_shape[1:], c["k"], tuple(op.padding), tuple(op.stride), tuple(op.dilation))
    x = torch.randn((2,) + op.in_shape, dtype=torch.float64)
    assert torch.equal(from_polyphase(to_polyphase(x, geo.stride), geo.stride, op.in_shape[1:]), x)
    cig = c["cin"] // c["groups"]
    for g in range(c["groups"]):  # each group's block
        sl = slice(g * cig, (g + 1) * cig)
        og = slice(g * (c["cout"] // c["groups"]), (g + 1) * (c["cout"] // c["groups"]))
        yg = Conv2d(w[og], (cig,) + op.in_shape[1:], stride=op.stride, dilation=op.dilation,
                    padding=op.padding).apply(x[:, sl])
        yp = Conv2d(polyphase_kernel(w[og], geo), (cig * geo.stride[0] * geo.stride[1],) + geo.phase_hw,
                    padding=geo.padding).apply(to_polyphase(x[:, sl], geo.stride))
        assert yp.shape == yg.shape
        assert torch.allclose(yp, yg, rtol=0, atol=1e-13 * float(yg.abs().max()) + 1e-300)


@given(convs())
def test_equals_dense_pinv_of_the_sparse_conv(c):
    _, op, r = build(c)
    A, pinv, rank, cond = dense(op)
    assume(cond <= 1e4)  # pinv itself is only accurate to ~eps·cond(W)
    es = ExactConvSolver(op)
    if es.lam > 0.0:  # Tikhonov refinement contracts by λ/(σ²+λ): needs σ_min(W)² ≫ 1e-6 σ_max²
        assume(cond <= 300)
    d, info = es.solve(r)
    assert info["converged"].all()
    rf = r.reshape(r.shape[0], -1).numpy()
    # λ = 0: direct solve (+ refinement when the condition estimate is large) ≈ eps·cond(W) ≤ 2e-12.
    # λ > 0 (W rank deficient — e.g. outputs reading only padding, unread input rows — or a
    # singular frequency): rounding leaves ~eps/reg ≈ 2e-10 of null-space component that no
    # refinement removes (measured ≤ 4.6e-10 over 136 random strided/grouped/dilated convs).
    assert rel_err(d, rf @ pinv.T) <= (1e-10 if es.lam == 0.0 else 1e-9)
    Ad = np.asarray(d).reshape(r.shape[0], -1) @ A.T
    if rank == A.shape[0]:  # full row rank: the MDP constraint W δ = r (backward error ~eps·cond)
        assert np.max(np.linalg.norm(Ad - rf, axis=1) / np.linalg.norm(rf, axis=1)) <= 1e-10
    if rank == A.shape[1]:  # full column rank: the CCP normal equations Wᵀ(W δ − r) = 0, relative to ‖W‖‖r‖
        ne = (Ad - rf) @ A
        assert np.max(np.linalg.norm(ne, axis=1) / (np.linalg.norm(A, 2) * np.linalg.norm(rf, axis=1))) <= 1e-10


@pytest.mark.parametrize("cin,cout,k", [(4, 2, (3, 3)), (2, 4, (3, 3)), (3, 1, (2, 3))])
def test_stride1_unpadded_reduces_to_fft_exact(cin, cout, k):
    rng = np.random.default_rng(cin + 10 * cout)
    w = torch.tensor(rng.standard_normal((cout, cin) + k))
    op = Conv2d(w, (cin, 8, 9))
    r = torch.tensor(rng.standard_normal((3,) + op.out_shape))
    es = ExactConvSolver(op, refine=False)
    cs = CapacitanceSolver(w, op.in_shape)
    assert es.info()["ring_positions"] == 0 and es.info()["capacitance_size"] == cs.m
    d1, _ = es.solve(r)
    d2, _ = cs.solve(r)
    # the same capacitance system, factored in a different order: rounding × cond_est (≤ 1e3 here)
    assert rel_err(d1.reshape(3, -1), d2.reshape(3, -1).numpy()) <= 1e-12


@pytest.mark.parametrize("c", [
    dict(cin=4, cout=4, groups=4, k=(3, 3), padding=1, stride=1),   # depthwise
    dict(cin=6, cout=4, groups=2, k=(3, 3), padding="same", stride=1),
    dict(cin=4, cout=8, groups=2, k=(3, 3), padding=1, stride=2),
    dict(cin=3, cout=6, groups=1, k=(1, 1), padding=0, stride=2),    # a 1×1 stride-2 shortcut
])
def test_groups_and_shortcuts_are_exact_without_dense_expansion(c):
    rng = np.random.default_rng(7)
    w = torch.tensor(rng.standard_normal((c["cout"], c["cin"] // c["groups"]) + c["k"]))
    op = Conv2d(w, (c["cin"], 8, 8), padding=c["padding"], stride=c["stride"], groups=c["groups"])
    r = torch.tensor(rng.standard_normal((3,) + op.out_shape))
    _, pinv, _, _ = dense(op)
    es = ExactConvSolver(op)
    assert es.lam == 0.0 and len(es.parts) == c["groups"]
    d, _ = es.solve(r)
    assert rel_err(d.reshape(3, -1), r.reshape(3, -1).numpy() @ pinv.T) <= 1e-10  # cond(W) < 1e2 here
    info = es.info()
    if c["groups"] > 1:  # per-group systems: G blocks of (C/G)-channel capacitance, not one of C channels
        ps = es.parts[0][0]
        assert ps.C_in * c["groups"] == c["cin"] * c["stride"] ** 2 and info["capacitance_size"] == c["groups"] * ps.m
    if c["k"] == (1, 1):  # 3 of the 4 phases are never read: dropped (zero columns of W_poly)
        assert info["polyphase"]["unused_phase_channels"] == 3 * c["cin"]


def test_solve_routes_every_conv_to_fft_exact_and_reports_it():
    rng = np.random.default_rng(11)
    op = Conv2d(torch.tensor(rng.standard_normal((6, 4, 3, 3))), (4, 8, 6), padding=1, stride=2)
    a = rng.standard_normal((2, op.shape[1]))
    z = rng.standard_normal((2, op.shape[0]))
    fe, de = solve(op, z, a, method="fft-exact"), solve(op, z, a, method="dense")
    assert fe.info["polyphase"]["phase_channels"] == 16 and "polyphase" in fe.info["algorithm"]
    # both direct, cond(W) ~ 10: agreement to a few ulps × cond
    assert np.abs(np.asarray(fe.a) - np.asarray(de.a)).max() <= 1e-10 * np.abs(np.asarray(de.a)).max()
    pc = solve(op, z, a, method="fft-pcg", tol=1e-12)  # the torus-preconditioned CG, iterations reported
    assert pc.info["converged"].all() and 1 <= pc.info["iterations"].max() < 100
    assert np.abs(np.asarray(pc.a) - np.asarray(de.a)).max() <= 1e-9 * np.abs(np.asarray(de.a)).max()


# every conv geometry of VGG7 and ResNet20 / Fixup-ResNet20 at CIFAR size (C_in, C_out, H, stride)
MODEL_CONVS = [(3, 32, 32, 1), (32, 32, 32, 1), (32, 64, 16, 1), (64, 64, 16, 1), (64, 96, 8, 1), (96, 96, 8, 1),
               (32, 64, 32, 2), (64, 96, 16, 2)]


@pytest.mark.parametrize("cin,cout,H,s", MODEL_CONVS)
def test_auto_picks_fft_exact_for_every_model_conv(cin, cout, H, s):
    op = Conv2d(torch.zeros(cout, cin, 3, 3, dtype=torch.float64), (cin, H, H), padding=1, stride=s)
    assert ls.auto_method(op, ls.DEFAULT_MAX_BYTES) == "fft-exact"
    assert exact_conv_bytes(op) < 2**30
    assert ls.auto_method(op, exact_conv_bytes(op) - 1) in ("fft-pcg", "dense")  # over budget: never plain CG


def test_bytes_estimate_and_ring_reduction_of_strided_and_grouped_convs():
    op = Conv2d(torch.zeros(64, 32, 3, 3, dtype=torch.float64), (32, 32, 32), padding=1, stride=2)
    # polyphase: 128 phase channels of 16×16, 2×2 phase kernel, padding (1, 0, 1, 0), torus 17×17.
    # Only phases reading the padding keep ring constraints: per input channel 0 + 16 + 16 + 33 = 65
    # of the 4·33 ring entries (MDP: unread ring entries are zero columns of S C).
    full = padded_conv_bytes(64, 128, (16, 16), 2, (1, 0, 1, 0))
    assert exact_conv_bytes(op) == padded_conv_bytes(64, 128, (16, 16), 2, (1, 0, 1, 0),
                                                     support=np.array([[[0, 0], [0, 1]], [[0, 0], [1, 1]],
                                                                       [[0, 1], [0, 1]], [[1, 1], [1, 1]]] * 32,
                                                                      dtype=bool)) < full / 2
    rng = np.random.default_rng(0)
    small = Conv2d(torch.tensor(rng.standard_normal((6, 4, 3, 3))), (4, 8, 8), padding=1, stride=2)
    es = ExactConvSolver(small)
    assert es.need_bytes == exact_conv_bytes(small) and es.parts[0][0].mP == 4 * (0 + 4 + 4 + 9)  # 4×4 phases, torus 5×5
    g = Conv2d(torch.zeros(8, 2, 3, 3, dtype=torch.float64), (8, 10, 10), padding=1, groups=4)
    assert exact_conv_bytes(g) == 4 * padded_conv_bytes(2, 2, (10, 10), 3, 1)


def test_bad_input_names_the_option():
    rng = np.random.default_rng(2)
    w = torch.tensor(rng.standard_normal((2, 3, 3, 3)))
    with pytest.raises(ValueError, match="in_shape"):
        ExactConvSolver(w, (4, 8, 8), stride=2)
    with pytest.raises(ValueError, match="groups"):
        ExactConvSolver(w, (3, 8, 8), groups=0)
    es = ExactConvSolver(w, (3, 8, 8), stride=2, padding=1)
    with pytest.raises(ValueError, match="r must have shape"):
        es.solve(torch.zeros(1, 2, 3, 3, dtype=torch.float64))
    with pytest.raises(ValueError, match="fixed_zero"):
        PaddedConvSolver(w, (3, 8, 8), padding=1, fixed_zero=np.zeros((3, 8, 7), dtype=bool))
    with pytest.raises(TypeError):
        ExactConvSolver(w, (3, 8, 8), stride=2, bogus=1)
