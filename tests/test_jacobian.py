"""Linearisation (seed 000 appendix C): compressed-window Jacobians vs torch autograd.

All checks are float64.  The Jacobian rows are computed along different paths (forward
compressed tangents, reverse VJPs, autograd of the bias-extended function), so agreement is
up to rounding of sums of ~10^2–10^4 products: we use 1e-10 relative to the row's largest
entry (≈ 10^5 ulps of float64 — generous for rounding, hopeless for any structural error).
"""
from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from linop.convert import from_torch
from linop.network import InputNode
from linop.linearize import linearise
from linop.utils import parse_memory

from kit_nets import RandomGraph, equivalent_net, reference_net, sample_input

RTOL = 1e-10


def autograd_rows(net, layer, x, units):
    """Rows ``units`` of autograd's Jacobian of f(x, x_b): one reverse pass per sampled unit."""
    node = net.unit_node(layer)
    xx = x.clone().requires_grad_(True)
    xb = net.x_b.clone().requires_grad_(True)
    out = net.extended_function(node.name)(xx, xb)
    rows = [torch.autograd.grad(out[int(u)], (xx, xb), retain_graph=True, allow_unused=True) for u in units]
    JI = torch.stack([r[0] if r[0] is not None else torch.zeros_like(x) for r in rows])
    Jb = torch.stack([r[1] if r[1] is not None else torch.zeros_like(net.x_b) for r in rows])
    return JI, Jb


def assert_rows_close(A, B, what):
    A = A.reshape(A.shape[0], -1)
    B = B.reshape(B.shape[0], -1)
    scale = B.abs().amax(dim=1, keepdim=True).clamp_min(1e-300)
    err = ((A - B).abs() / scale).max().item()
    assert err <= RTOL, f"{what}: max relative row error {err:.3e} > {RTOL}"


# ----------------------------------------------------------------------------- models


@pytest.fixture(scope="module")
def vgg():
    return reference_net("vgg7", (3, 12, 12), 0)


@pytest.fixture(scope="module")
def resnet():
    return reference_net("resnet20", (3, 8, 8), 1)


@pytest.fixture(scope="module")
def fixup():
    return reference_net("fixup", (3, 8, 8), 2)


# ----------------------------------------------------------------------------- tests


def test_rows_match_autograd_vgg7(vgg):
    """H rows == rows of autograd's Jacobian of f(x, x_b) for sampled units of every layer."""
    x = sample_input(vgg)
    lin = linearise(vgg, x)
    g = torch.Generator().manual_seed(5)
    for LJ in lin.sweep():
        units = torch.randint(0, LJ.n_units, (6,), generator=g)
        JI, Jb = autograd_rows(vgg, LJ.name, x, units)
        assert_rows_close(LJ.image(units), JI, f"{LJ.name} image part")
        assert_rows_close(LJ.bias(units), Jb, f"{LJ.name} bias part")


@pytest.mark.parametrize("which", ["resnet", "fixup"])
def test_rows_match_autograd_resnets(which, request):
    net = request.getfixturevalue(which)
    x = sample_input(net, 1)
    lin = linearise(net, x)
    g = torch.Generator().manual_seed(6)
    for LJ in lin.sweep(net.unit_layers[::3] + ["FC"]):
        units = torch.randint(0, LJ.n_units, (4,), generator=g)
        JI, Jb = autograd_rows(net, LJ.name, x, units)
        assert_rows_close(LJ.image(units), JI, f"{which} {LJ.name} image part")
        assert_rows_close(LJ.bias(units), Jb, f"{which} {LJ.name} bias part")


def _check_identity_all_units(net, x, scale=1.0):
    """<[x; x_b], H_u> == c_u for every unit of every layer.  ĉ and c are computed along
    different paths (sum over the window vs the forward pass): 1e-12 relative to the layer's
    largest |c| (~ 5000 ulps) bounds rounding of these short float64 sums."""
    lin = linearise(net, x, scale=scale)
    pre = lin.preactivations()
    seen = []
    for LJ in lin.sweep():
        c = pre[LJ.name]
        ch = LJ.dot(x, net.x_b)
        err = ((ch - c).abs().max() / c.abs().max().clamp_min(1e-300)).item()
        assert err <= 1e-12, f"{LJ.name}: max |ĉ - c| / max|c| = {err:.3e}"
        seen.append(LJ.name)
    assert seen == net.unit_layers


def test_identity_all_units_reference_models(vgg, resnet, fixup):
    for net, seed in ((vgg, 0), (resnet, 1), (fixup, 2)):
        _check_identity_all_units(net, sample_input(net, seed))


@given(
    c=st.sampled_from([2, 3]),
    stride=st.sampled_from([1, 2]),
    pool=st.sampled_from(["max", "avg"]),
    slope=st.sampled_from([0.0, 0.1]),
    cat=st.booleans(),
    k=st.sampled_from([1, 3, 5]),
    hw=st.sampled_from([(6, 6), (8, 5)]),
    seed=st.integers(0, 2**16),
)
@settings(max_examples=12)
def test_identity_and_reverse_random_graphs(c, stride, pool, slope, cat, k, hw, seed):
    """Random architectures with residuals, concatenations and max pooling: the identity for
    all units, and the forward (compressed) rows equal the reverse-mode (VJP) rows."""
    net = equivalent_net(RandomGraph(c, stride, pool, slope, cat, k), (2,) + hw, seed)
    x = sample_input(net, seed)
    _check_identity_all_units(net, x)
    lin = linearise(net, x)
    for LJ in lin.sweep():
        units = torch.arange(0, LJ.n_units, max(1, LJ.n_units // 7))
        HI, Hb = lin.unit_vjp(LJ.name, units)
        assert_rows_close(LJ.image(units), HI, f"{LJ.name} forward vs reverse, image")
        assert_rows_close(LJ.bias(units), Hb, f"{LJ.name} forward vs reverse, bias")


def test_compressed_windows_are_exact_and_small(vgg):
    """The window representation reproduces the dense row outside the window as exact
    zeros, and the windows grow with the receptive field (3x3 at Conv0, 5x5 at Conv1)."""
    x = sample_input(vgg)
    lin = linearise(vgg, x)
    geo = {LJ.name: (LJ.ry, LJ.rx, LJ.P) for LJ in lin.sweep(["Conv0", "Conv1", "Conv2"])}
    assert geo["Conv0"][:2] == (3, 3) and geo["Conv1"][:2] == (5, 5)
    assert geo["Conv2"][:2] == (11, 11)  # avg pool (3, s2) then a 3x3 conv at jump 2 (< 12)
    LJ = lin.layer("Conv1")
    u = torch.arange(0, LJ.n_units, 97)
    dense = LJ.image(u)
    patches, oy, ox = LJ.windows(u)
    rebuilt = torch.zeros_like(dense)
    for i in range(u.numel()):  # test-only loop over a few units
        rebuilt[i, :, oy[i]:oy[i] + LJ.ry, ox[i]:ox[i] + LJ.rx] = patches[i]
    assert torch.equal(rebuilt, dense)


def test_channel_groups_add_up(vgg):
    """Column groups (one image channel at a time, bias apart) sum to the full Jacobian."""
    x = sample_input(vgg)
    lin = linearise(vgg, x)
    full = lin.layer("Conv3")
    u = torch.arange(0, full.n_units, 53)
    parts = [lin.layer("Conv3", channels=[c], bias=False).image(u) for c in range(3)]
    assert torch.equal(sum(parts), full.image(u))  # disjoint supports: exact
    assert lin.layer("Conv3", channels=[0], bias=False).cols.numel() == 0


def test_scale_invariance_exact_for_power_of_two(vgg):
    """k = 1/8 scales every value exactly in binary floating point, so the activation pattern
    and therefore J are bitwise identical (positive homogeneity, seed 000 appendix C)."""
    x = sample_input(vgg)
    a = linearise(vgg, x).layer("Conv4")
    b = linearise(vgg, x, scale=0.125).layer("Conv4")
    assert torch.equal(a.Ti, b.Ti) and torch.equal(a.Tb, b.Tb)


def test_tanh_is_refused():
    net = from_torch(nn.Sequential(nn.Conv2d(1, 2, 3), nn.Tanh(), nn.Flatten(), nn.Linear(8, 2)).eval(), (1, 4, 4), torch.float64)
    with pytest.raises(ValueError, match="piecewise-linear.*tanh"):
        linearise(net, torch.zeros(1, 4, 4, dtype=torch.float64))


def test_bad_arguments(vgg):
    x = sample_input(vgg)
    with pytest.raises(ValueError, match="scale"):
        linearise(vgg, x, scale=-1.0)
    with pytest.raises(ValueError, match="shape"):
        linearise(vgg, torch.zeros(3, 5, 5, dtype=torch.float64))
    with pytest.raises(ValueError, match="memory_budget"):
        parse_memory("lots")
    assert parse_memory("2GiB") == 2 * 2**30 and parse_memory("500MB") == 500 * 10**6
    lin = linearise(vgg, x, memory_budget="1MB")
    with pytest.raises(ValueError, match=r"GiB.*memory_budget"):
        next(iter(lin.sweep()))


# ----------------------------------------------------------------------------- performance paths
# (period schedule, one-gather densification, preallocated outputs): they must not change a
# single value.  Float64; the forward rows are compared with reverse-mode VJPs at RTOL above.


@pytest.fixture(scope="module")
def vgg20():
    return reference_net("vgg7", (3, 20, 20), 4)


def test_schedules_give_identical_jacobians(vgg20, resnet):
    """The cost-model period schedule ('auto') and the smallest-period one ('lazy') represent
    the same Jacobian: densified rows agree to RTOL (different summation orders only) and match
    reverse mode; every period covers its node's windows and its inputs' periods."""
    for net in (vgg20, resnet):
        x = sample_input(net, 5)
        lin = linearise(net, x)
        auto, lazy = lin.periods(), lin.periods(lazy=True)
        geom = lin.geometry()
        for n in net.nodes:
            if n.name in auto and not isinstance(n, InputNode):
                assert auto[n.name][0] >= geom[n.name].ry and auto[n.name][1] >= geom[n.name].rx
                for i in n.inputs:
                    assert auto[n.name][0] >= auto[i][0] and auto[n.name][1] >= auto[i][1]
        for A, B in zip(lin.sweep(schedule="auto"), lin.sweep(schedule="lazy")):
            u = torch.arange(0, A.n_units, max(1, A.n_units // 23))
            assert_rows_close(A.image(u), B.image(u), f"{A.name}: auto vs lazy schedule, image")
            assert_rows_close(A.bias(u), B.bias(u), f"{A.name}: auto vs lazy schedule, bias")
            HI, Hb = lin.unit_vjp(A.name, u)
            assert_rows_close(A.image(u), HI, f"{A.name}: auto schedule vs reverse, image")
            assert_rows_close(A.bias(u), Hb, f"{A.name}: auto schedule vs reverse, bias")
        assert lin.plan(schedule="auto")["period"] == auto
        if net is vgg20:  # at 20x20 the cost model skips raises (e.g. Conv0 straight at period 5)
            assert auto != lazy


def test_densify_all_units_into_buffer_equals_subsets(vgg20):
    """image()/bias() of all units written into one reused buffer equal, bit for bit, the
    per-subset densification (a different index path: per-unit rows) at every layer — the
    zero-colour, masked and dense (pure transpose) paths all occur among VGG7's layers."""
    x = sample_input(vgg20, 6)
    lin = linearise(vgg20, x)
    C, H, W = vgg20.input_shape
    Umax = max(int(np.prod(vgg20.unit_node(l).out_shape)) for l in vgg20.unit_layers)
    bufI = torch.full((Umax * C * H * W,), float("nan"), dtype=torch.float64)  # stale garbage must be overwritten
    bufB = torch.full((Umax * vgg20.n_bias,), float("nan"), dtype=torch.float64)
    kinds = set()
    for LJ in lin.sweep():
        HI, Hb = LJ.image(out=bufI), LJ.bias(out=bufB)
        assert HI.data_ptr() == bufI.data_ptr() and Hb.data_ptr() == bufB.data_ptr()
        assert HI.shape == (LJ.n_units, C, H, W) and Hb.shape == (LJ.n_units, vgg20.n_bias)
        u = torch.randperm(LJ.n_units, generator=torch.Generator().manual_seed(1))[:37]
        assert torch.equal(HI[u], LJ.image(u)), LJ.name
        assert torch.equal(Hb[u], LJ.bias(u)), LJ.name
        # <[x; x_b], H_u> reproduces every unit (Eq. 3) from the buffered arrays too
        c_hat = HI.reshape(LJ.n_units, -1) @ x.reshape(-1) + Hb @ vgg20.x_b
        assert torch.allclose(c_hat, LJ.dot(x, vgg20.x_b), rtol=1e-12, atol=1e-12 * float(c_hat.abs().max()))
        kinds.add("dense" if LJ.P == (H, W) else ("zero-colour" if LJ.P[0] > LJ.ry or LJ.P[1] > LJ.rx else "mask"))
    assert kinds == {"dense", "zero-colour", "mask"}


def test_out_buffer_is_validated(vgg):
    lin = linearise(vgg, sample_input(vgg))
    LJ = lin.layer("Conv1")
    with pytest.raises(ValueError, match="out must be a contiguous"):
        LJ.image(out=torch.zeros(10, dtype=torch.float64))
    with pytest.raises(ValueError, match="out must be a contiguous"):
        LJ.image(out=torch.zeros(LJ.n_units * 3 * 12 * 12, dtype=torch.float32))
    with pytest.raises(ValueError, match="schedule must be"):
        lin.plan(schedule="eager")
