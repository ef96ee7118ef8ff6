"""The throughput paths of the per-image verification (issue 10): every one evaluates the
same operators as the reference path, and these tests say so.

* the float64 sweep on channels-last batches against the operator's sparse rows
  (``lin.operator(layer).to_sparse()``) and against the sweep with the switch off (standard
  layout), densified (``image``/``bias``) and contracted (``dot``, i.e. ĉ);
* the fx trace records stack traces without importing ``torch._inductor``.
"""
from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
import torch
from torch import nn

from linop.convert import from_torch
from linop.convert.errors import source_frame
from linop.convert.trace import trace
from linop.linearize import linearise, tangents

EPS64 = float(np.finfo(np.float64).eps)


class _Small(nn.Module):
    """Stride-1 and stride-2 convs, a residual sum, BN biases, LeakyReLU, max pool, FC."""

    def __init__(self):
        super().__init__()
        self.c0 = nn.Conv2d(2, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(4)
        self.c1 = nn.Conv2d(4, 4, 3, padding=1)
        self.c2 = nn.Conv2d(4, 5, (3, 1), padding=(1, 0), stride=2)
        self.act = nn.LeakyReLU(0.1)
        self.fc = nn.Linear(5 * 2 * 2, 3)

    def forward(self, x):
        a = self.act(self.bn(self.c0(x)))
        a = self.act(self.c1(a) + a)
        a = nn.functional.max_pool2d(self.act(self.c2(a)), 2)
        return self.fc(torch.flatten(a, 1))


@pytest.fixture(scope="module")
def small():
    torch.manual_seed(0)
    m = _Small().eval()
    with torch.no_grad():
        m.bn.running_mean.uniform_(-0.3, 0.3)
        m.bn.running_var.uniform_(0.5, 1.5)
        m.bn.bias.uniform_(-0.3, 0.3)
    net = from_torch(m, (2, 8, 10), torch.float64)
    x = torch.rand(2, 8, 10, generator=torch.Generator().manual_seed(1), dtype=torch.float64) - 0.3
    return net, x


def _dense_rows(lin, layer):
    J = lin.operator(layer).to_sparse().toarray()
    n_in = lin.x.numel()
    return torch.from_numpy(J[:, :n_in]), torch.from_numpy(J[:, n_in:])


def test_float64_sweep_channels_last_equals_operator_rows(small, monkeypatch):
    """The float64 sweep on channels-last batches equals the operator's exact sparse rows and
    the sweep on standard-layout batches, per row to 1e-13 of the row's largest entry (sums of
    ≤ 10^2 products in other orders: ~10^2 ε; no structural error survives this)."""
    net, x = small
    lin = linearise(net, x)
    fast, dots = {}, {}
    for LJ in lin.sweep():
        fast[LJ.name] = (LJ.image(), LJ.bias())
        dots[LJ.name] = LJ.dot(lin.x, lin.x_b)
        sub = torch.arange(LJ.n_units - 1, -1, -3)  # a subset, reversed: the materialised (nc, P, U) path
        assert torch.equal(LJ.image(sub), fast[LJ.name][0][sub]) and torch.equal(LJ.bias(sub), fast[LJ.name][1][sub])
    assert any(LJ.T.dim() == 4 and not LJ.T.is_contiguous() for LJ in lin.sweep()), "no channels-last batch"
    # the reference: standard-layout batches (the pre-issue-10 evaluation)
    monkeypatch.setattr(tangents, "CHANNELS_LAST", False)
    slow = {LJ.name: (LJ.image(), LJ.bias()) for LJ in lin.sweep()}
    assert all(LJ.T.is_contiguous() for LJ in lin.sweep())
    for LJ in lin.sweep():  # ĉ from the channels-last views vs the standard layout: ~10^3-term sums
        ref = LJ.dot(lin.x, lin.x_b)
        assert float((dots[LJ.name] - ref).abs().max()) <= 1e-13 * float(ref.abs().max()), LJ.name
    for layer, (HI, Hb) in fast.items():
        RI, Rb = _dense_rows(lin, layer)
        for a, b, what in ((HI, RI, "image"), (Hb, Rb, "bias"), (HI, slow[layer][0], "image vs standard layout"),
                           (Hb, slow[layer][1], "bias vs standard layout")):
            a, b = a.reshape(a.shape[0], -1), b.reshape(b.shape[0], -1)
            scale = torch.maximum(a.abs().amax(1, keepdim=True), b.abs().amax(1, keepdim=True)).clamp_min(1e-300)
            err = float(((a - b).abs() / scale).max()) if a.numel() else 0.0
            assert err <= 1e-13, f"{layer} {what}: {err:.2e}"


def test_reconstruction_identity_on_channels_last_path(small):
    """ĉ = <[x; x_b], H> from the float64 sweep equals the network's c (seed 000 Eq. 3) to
    1e-12 of max|c| (the two are different sums of ~10^3 rounded products)."""
    from linop.hypersurface import reconstructed_activations

    net, x = small
    for layer, (c, chat) in reconstructed_activations(net, x, dtype=torch.float64).items():
        assert float((c - chat).abs().max()) <= 1e-12 * float(c.abs().max()), layer


class _Traced(nn.Module):
    def forward(self, x):
        return torch.relu(x) * 2.0  # the source line the trace must point at


def test_trace_records_user_frames():
    """The fx trace's own stack recorder: the node points at the user's source line."""
    gm = trace(_Traced().eval(), (2, 3, 3), "t")
    node = next(n for n in gm.graph.nodes if n.op == "call_function" and n.target is torch.relu)
    fr = source_frame(node)
    assert fr is not None and fr[0] == __file__ and "torch.relu(x)" in fr[2]


def test_from_torch_does_not_import_inductor():
    """Converting a model must not pay torch._inductor's import (seconds per worker)."""
    code = ("import sys, torch\nfrom torch import nn\nfrom linop.convert import from_torch\n"
            "from_torch(nn.Sequential(nn.Conv2d(1, 2, 3), nn.ReLU()).eval(), (1, 5, 5))\n"
            "print(sorted(m for m in sys.modules if m.startswith(('torch._inductor', 'torch._dynamo')))[:3])")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, check=False)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip() == "[]", out.stdout


def test_channels_last_slopes_are_the_same_products():
    """The sweep multiplies channels-last batches by the slopes in the same layout: the same
    elementwise products as the operator's own ``x * d``, so bit-identical."""
    from linop.operators.elementwise import LeakyReLUMask

    g = torch.Generator().manual_seed(3)
    pre = torch.randn(4, 5, 6, generator=g, dtype=torch.float64)
    op = LeakyReLUMask(pre, negative_slope=0.2)
    x = torch.randn(7, 4, 5, 6, generator=g, dtype=torch.float64).contiguous(memory_format=torch.channels_last)
    got = tangents.apply_parts(op, [x])
    assert got.is_contiguous(memory_format=torch.channels_last)
    assert torch.equal(got, op._apply(x.contiguous()))
