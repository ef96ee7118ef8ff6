"""The sweep's fused evaluation strategies (issue 10, float32 throughput) equal the plain paths.

* the recolour of a channels-last batch by a row ``index_select`` (whole channel vectors) is
  the elementwise gather of the standard layout, bit for bit (both copy source entries or
  write exact zeros), also written into a chunk's slot of a preallocated batch;
* a residual sum ``[I, I]`` written straight into the chunk's slot is ``HStack``'s own sum,
  bit for bit (the same single addition per entry), and so is any block row's sum into a slot
  (the same additions in the same order; the operators' own ``apply_parts(xs, out)``);
* :meth:`LayerJacobian.dot` on a channels-last batch below the full period (a batched GEMM)
  equals the dense contraction ``<x, H^I> + <x_b, H^b>`` of the densified rows;
* a sweep whose budget binds (chunked steps written into preallocated states) equals the
  unchunked one.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from linop.convert import from_torch
from linop.linearize import linearise
from linop.linearize.tangents import (
    apply_parts,
    recolour,
    recolour_rows,
    spatial_groups,
)
from linop.operators.composite import HStack
from linop.operators.structural import Identity

from kit_nets import residual_net  # test kit

pytestmark = pytest.mark.usefixtures("one_thread")
EPS64 = float(np.finfo(np.float64).eps)


@pytest.fixture(scope="module")
def res():
    return residual_net(5, 4)


def _cl(T: torch.Tensor) -> torch.Tensor:
    return T.contiguous(memory_format=torch.channels_last)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_recolour_rows_channels_last_equals_gather(res, dtype):
    """Every (node, P -> Pn) raise: the channels-last row copy equals the standard-layout gather
    bit for bit (pure copies and exact zeros; the tangents hold no zeros, so every zero of the
    result is a filled one and a missed fill fails), whole and per chunk into a batch's slot."""
    net, x = res
    lin = linearise(net, x)
    geom = lin.geometry()
    g_ = torch.Generator().manual_seed(2)
    nc, tried, zeros = 2, 0, 0
    for n in net.nodes:
        shape = tuple(n.out_shape)
        g = geom[n.name]
        if len(shape) != 3 or spatial_groups(g, shape)[0] != shape[0] or shape[0] < 2:
            continue
        P = (g.ry, g.rx)
        for Pn in {(P[0] + 1, P[1] + 2), (shape[1] + 3, shape[2] + 3)}:
            rows = nc * P[0] * P[1]
            T = torch.rand((rows,) + shape, generator=g_, dtype=torch.float64).to(dtype) + 0.5  # no zeros
            Tc = _cl(T)
            assert not Tc.is_contiguous()
            ref = recolour_rows(T, nc, P, Pn, g, 0, nc * Pn[0] * Pn[1])  # the gather path
            fast = recolour_rows(Tc, nc, P, Pn, g, 0, nc * Pn[0] * Pn[1])
            assert fast.is_contiguous(memory_format=torch.channels_last)
            assert torch.equal(fast, ref), (n.name, P, Pn)
            zeros += int((ref == 0).sum())
            k = max(1, ref.shape[0] // 3)  # chunked, into the slots of one preallocated batch
            assert torch.equal(recolour(Tc, nc, P, Pn, g, chunk=k), ref)
            out = _cl(torch.full_like(ref, float("nan")))
            r0, r1 = k, min(ref.shape[0], 2 * k + 1)
            got = recolour_rows(Tc, nc, P, Pn, g, r0, r1, out=out[r0:r1])
            assert got.data_ptr() == out[r0:r1].data_ptr()  # written in place, no copy
            assert torch.equal(out[r0:r1], ref[r0:r1])
            tried += 1
    assert tried >= 4 and zeros > 0, (tried, zeros)  # zeros: residues outside a window were filled


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_residual_sum_into_slot_equals_hstack(dtype):
    """``[I, I]`` on two row chunks written into the chunk's slot: HStack's sum bit for bit."""
    shape = (4, 5, 3)
    op = HStack([Identity(shape), Identity(shape)])
    g = torch.Generator().manual_seed(3)
    a, b = (_cl(torch.randn((7,) + shape, generator=g, dtype=torch.float64).to(dtype)) for _ in range(2))
    ref = op.apply_parts([a, b])
    out = _cl(torch.full((9,) + shape, float("nan"), dtype=dtype))
    got = apply_parts(op, [a, b], out=out[1:8])
    assert got.data_ptr() == out[1:8].data_ptr()
    assert torch.equal(out[1:8], ref)
    assert torch.equal(apply_parts(op, [a, b]), ref)  # without a slot: the operator's own path


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_block_row_sums_into_slot_equal_the_plain_sum(dtype):
    """``HStack`` with ``out``: the left-to-right sum ``(A_1 x_1 + A_2 x_2) + A_3 x_3`` of its
    plain path bit for bit (the first two terms added into the slot, the rest in place), with
    zero (None) parts skipped and a single live part written by its operator's ``apply_into``
    (a slope) or copied by the caller (an identity); ``Concat`` concatenates into the slot."""
    from linop.operators.composite import Concat
    from linop.operators.elementwise import Diagonal

    shape = (4, 5, 3)
    g = torch.Generator().manual_seed(7)
    rnd = lambda n: _cl(torch.randn((n,) + shape, generator=g, dtype=torch.float64).to(dtype))  # noqa: E731
    D = Diagonal(torch.randn(shape, generator=g, dtype=torch.float64))
    op = HStack([Identity(shape), D, Identity(shape)])
    a, b, c = rnd(6), rnd(6), rnd(6)
    dd = D._param("diag", a)
    for xs, ref in (([a, b, c], (a + b * dd) + c), ([None, b, c], b * dd + c), ([a, None, c], a + c),
                    ([None, b, None], b * dd)):
        assert torch.equal(op.apply_parts(xs), ref)
        out = _cl(torch.full((8,) + shape, float("nan"), dtype=dtype))
        got = apply_parts(op, xs, out=out[1:7])
        assert got.data_ptr() == out[1:7].data_ptr()  # written into the slot
        assert torch.equal(out[1:7], ref)
    got = apply_parts(op, [a, None, None], out=out[1:7])  # an identity alone: returned for the caller to copy
    assert torch.equal(got, a)
    with pytest.raises(ValueError, match="xs has 2 entries"):
        op.apply_parts([a, b])
    cat = Concat([shape, shape])
    out = torch.full((6, 8, 5, 3), float("nan"), dtype=dtype)
    assert cat.apply_parts([a, b], out=out) is out and torch.equal(out, torch.cat([a, b], 1))


def test_dot_below_full_period_equals_dense_rows(res):
    """ĉ from the compressed channels-last tangents (a batched GEMM per position) equals the
    contraction of the densified rows with [x; x_b], per unit to 8·d·ε·Σ_i|x_i·H_ui| (d = C·H·W +
    n_b terms summed in two orders; each within d·ε·Σ|x_i·H_ui| of the exact sum)."""
    net, x = res
    lin = linearise(net, x)
    d = x.numel() + net.n_bias
    seen = 0
    for LJ in lin.sweep():
        HI, Hb = LJ.image(), LJ.bias()
        ref = (HI.reshape(HI.shape[0], -1) @ x.reshape(-1)) + Hb @ lin.x_b
        mag = (HI.reshape(HI.shape[0], -1).abs() @ x.reshape(-1).abs()) + Hb.abs() @ lin.x_b.abs()
        got = LJ.dot(lin.x, lin.x_b)
        assert bool(((got - ref).abs() <= 8 * d * EPS64 * mag + 1e-300).all()), LJ.name
        if LJ.P != tuple(lin.image_shape[1:]) and LJ.T.dim() == 4 and not LJ.T.is_contiguous():
            seen += 1
    assert seen >= 2, "no channels-last target below the full period: the GEMM path is untested"


def test_chunked_sweep_equals_unchunked(res, monkeypatch):
    """A budget that chunks the steps (recolours and sums written into preallocated states)
    gives the densified rows of the unchunked sweep: recolours and sums bit for bit, convs up
    to the rounding of a differently blocked GEMM (≤ 1e-13 of the row's largest entry)."""
    net, x = res
    big = linearise(net, x, memory_budget="8GiB")
    full = big.plan()["peak_bytes"]
    lin = linearise(net, x, memory_budget=int(full * 0.45))
    p = lin.plan()
    assert p["fits"] and any(p["chunk"][k] < p["rows"][k] for k in p["rows"])
    for A, B in zip(big.sweep(), lin.sweep()):
        for a, b in ((A.image(), B.image()), (A.bias(), B.bias())):
            a, b = a.reshape(a.shape[0], -1), b.reshape(b.shape[0], -1)
            scale = a.abs().amax(1, keepdim=True).clamp_min(1e-300)
            assert float(((a - b).abs() / scale).max()) <= 1e-13, A.name


class _Shared(nn.Module):
    """A conv output read twice: through BN and a slope, and by the residual sum after it."""

    def __init__(self):
        super().__init__()
        self.c0 = nn.Conv2d(2, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(4)
        self.c1 = nn.Conv2d(4, 4, 3, padding=1)
        self.act = nn.LeakyReLU(0.1)

    def forward(self, x):
        h = self.c0(x)
        return self.c1(self.act(self.bn(h)) + h)


@pytest.mark.parametrize("which", ["res", "shared"])
def test_transient_sweep_in_place_slopes_equal_plain(res, which, monkeypatch):
    """A transient sweep (the study's: each Jacobian contracted before the next) multiplies the
    slopes in place (also those after a unit layer, unlike a plain sweep); its ĉ equals the plain
    sweep's bit for bit (the same products), and a plain sweep's yielded Jacobians stay intact when kept (all densified after
    the sweep = densified as they come)."""
    from linop.linearize import sweep as sweep_mod

    if which == "res":
        net, x = res
    else:
        torch.manual_seed(4)
        m = _Shared().eval()
        with torch.no_grad():
            m.bn.running_mean.uniform_(-0.3, 0.3)
            m.bn.running_var.uniform_(0.5, 1.5)
        net = from_torch(m, (2, 8, 8), torch.float64)
        x = torch.rand(2, 8, 8, generator=torch.Generator().manual_seed(5), dtype=torch.float64) - 0.3
    lin = linearise(net, x)
    calls = []
    real = sweep_mod.step_in_place

    def counted(op, s):
        st = real(op, s)
        calls.append(st is not None)
        return st

    monkeypatch.setattr(sweep_mod, "step_in_place", counted)
    plain = {LJ.name: LJ.dot(lin.x, lin.x_b) for LJ in lin.sweep()}
    n_plain = sum(calls)  # slopes after a residual sum (not a yielded state) may run in place here too
    fast = {LJ.name: LJ.dot(lin.x, lin.x_b) for LJ in lin.sweep(transient=True)}
    # res: the slope after BN after a unit layer runs in place only when transient; shared: the
    # slope after the BN scale runs in place while the conv output it came from is still live
    assert sum(calls) - n_plain > (n_plain if which == "res" else 0), "no slope ran in place"
    assert plain.keys() == fast.keys()
    for k, v in plain.items():
        assert torch.equal(v, fast[k]), k
    now = {LJ.name: (LJ.image(), LJ.bias()) for LJ in lin.sweep()}
    kept = list(lin.sweep())
    for LJ in kept:
        assert torch.equal(LJ.image(), now[LJ.name][0]) and torch.equal(LJ.bias(), now[LJ.name][1]), LJ.name


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_plain_avg_pool_equals_the_operator(dtype):
    """Average pools evaluate with torch's pooling kernel: the operator's own values (a ones-kernel
    depthwise conv, then the per-window divisor) up to the order of each window's sum — within
    2·k_h·k_w·ε of the window mean of |x| (each sum within (k_h·k_w - 1)·ε·Σ|x_i| of the exact
    one, the division exact to ½ ulp) — for every configuration: whole windows (the ResNet
    shortcut, overlapping), padding with and without counting it (VGG7's 3×3 / 2 / 1), ceil mode,
    a divisor override."""
    from linop.operators import AvgPool2d

    eps = float(torch.finfo(dtype).eps)
    g = torch.Generator().manual_seed(6)
    cases = (((4, 8, 8), dict(kernel_size=2)), ((3, 9, 7), dict(kernel_size=(3, 2))),
             ((4, 8, 8), dict(kernel_size=1, stride=2)), ((3, 9, 7), dict(kernel_size=3, stride=1)),
             ((4, 8, 8), dict(kernel_size=3, stride=2, padding=1)),
             ((3, 9, 7), dict(kernel_size=3, stride=2, padding=1, count_include_pad=False)),
             ((2, 7, 7), dict(kernel_size=2, ceil_mode=True)),
             ((2, 9, 9), dict(kernel_size=3, stride=2, ceil_mode=True, count_include_pad=False)),
             ((2, 6, 6), dict(kernel_size=2, divisor_override=3)))
    for shape, kw in cases:
        op = AvgPool2d(shape, **kw)
        x = torch.randn((5,) + shape, generator=g, dtype=torch.float64).to(dtype)
        for xx in (x, _cl(x)):
            # the ones-kernel depthwise conv and the divisor: the operator's sparse form's map
            ref, got = op._conv._apply(xx) / op._param("divisor", xx), apply_parts(op, [xx])
            kk = int(np.prod(op.kernel_size))
            mean_abs = op._conv._apply(xx.abs()) / op._param("divisor", xx)
            bound = 2 * kk * eps * mean_abs + torch.finfo(dtype).tiny
            assert got.shape == ref.shape and bool(((got - ref).abs() <= bound).all()), kw


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_disjoint_avg_pool_adjoint_is_the_transposed_conv_bit_for_bit(dtype):
    """With non-overlapping whole windows every input entry receives at most one term of the
    transposed ones-kernel conv — ``y/divisor`` itself (times 1) — so the strided copy equals it
    bit for bit, in either layout; overlapping or padded pools keep the conv."""
    from linop.operators import AvgPool2d

    g = torch.Generator().manual_seed(7)
    for shape, k, st in (((4, 8, 8), 1, 2), ((3, 9, 7), 2, None), ((2, 11, 10), (2, 3), (3, 4)), ((3, 6, 6), 1, 1)):
        op = AvgPool2d(shape, k, stride=st)
        assert op.disjoint_windows
        y = torch.randn((5,) + op.out_shape, generator=g, dtype=torch.float64).to(dtype)
        for yy in (y, _cl(y)):
            ref = op._conv._apply_adjoint(yy / op._param("divisor", yy))
            got = op._apply_adjoint(yy)
            assert got.shape == ref.shape and torch.equal(got, ref)
            assert got.is_contiguous(memory_format=torch.channels_last) == (yy is not y)
        x = torch.randn((3,) + shape, generator=g, dtype=torch.float64)
        yd = torch.randn((3,) + op.out_shape, generator=g, dtype=torch.float64)
        # the adjoint identity <A x, y> = <x, Aᵀ y> on the new path (float64: sums of a few
        # hundred products, agreement to 1e-12 relative)
        lhs, rhs = float((op._apply(x) * yd).sum()), float((x * op._apply_adjoint(yd)).sum())
        assert abs(lhs - rhs) <= 1e-12 * max(1.0, abs(lhs))
    assert not AvgPool2d((2, 6, 6), 3, stride=1).disjoint_windows
    assert not AvgPool2d((2, 6, 6), 2, padding=1).disjoint_windows
