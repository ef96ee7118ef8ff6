"""AdjointBackMapV2 (seed 000 Eqs. 3–13, Algorithm 1): RM0–RM4 layouts and relations.

float64 throughout.  Relations between modes are sums of the same numbers taken in another
order, so they hold to a few ulps of the summed magnitudes: we use 1e-12 relative to the
largest entry (~ 5000 ulps).  Comparisons with autograd use 1e-10 (different code paths).
"""
from __future__ import annotations

import pytest
import torch
from torch import nn

from linop.hypersurface import BackMap, backmap, reconstructed_activations
from linop.convert import from_torch

from kit_nets import perturb_bn

REL = 1e-12


def close(a, b, rel=REL):
    scale = max(b.abs().max().item(), 1e-300)
    err = (a - b).abs().max().item() / scale
    assert err <= rel, f"relative error {err:.3e} > {rel}"


@pytest.fixture(scope="module")
def net():
    from models.vgg7 import vgg7

    torch.manual_seed(0)
    return from_torch(perturb_bn(vgg7(), 0), (3, 12, 12), torch.float64)


@pytest.fixture(scope="module")
def x(net):
    return torch.rand(net.input_shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64) - 0.2


def test_rm2_layout_and_identity(net, x):
    bm = backmap(net, x, "Conv2")
    Co, Ho, Wo = net.unit_node("Conv2").out_shape
    assert isinstance(bm, BackMap) and bm.layout == ("unit", "C", "H", "W")
    assert bm.image.shape == (Co * Ho * Wo, 3, 12, 12) and bm.bias.shape == (Co * Ho * Wo, net.n_bias)
    c = net.preactivations(x.unsqueeze(0))["Conv2"][0].reshape(-1)
    close(bm.reconstruct(x, net.x_b), c)
    # the bias part only involves the biases of layers below Conv2 (Conv0, Conv1 slices)
    own = net.bias_slices["Conv2.bias"]
    assert torch.count_nonzero(bm.bias[:, own.start:]) == 0
    assert torch.count_nonzero(bm.bias[:, : own.start]) > 0


def test_first_layer_is_its_kernel(net, x):
    """Conv0's hypersurfaces are its kernels placed at the unit's window; H^b = 0."""
    bm = backmap(net, x, "Conv0", units=[0, 40])  # unit 40 = channel 0, row 3, col 4
    w = net.unit_node("Conv0").op.weight.to(torch.float64)
    assert torch.count_nonzero(bm.bias) == 0
    assert torch.equal(bm.image[1][:, 2:5, 3:6], w[0])  # padding 1: window rows 2..4, cols 3..5
    assert torch.equal(bm.image[0][:, 0:2, 0:2], w[0][:, 1:, 1:])


def test_forward_and_reverse_agree(net, x):
    u = [0, 7, 100, 577]
    a = backmap(net, x, "Conv3", units=u, method="forward")
    b = backmap(net, x, "Conv3", units=u, method="reverse")
    close(a.image, b.image)
    close(a.bias, b.bias)


def test_rm_relations(net, x):
    """RM3 = Σ_s RM4, RM2 = Σ_j RM4, RM1 = Σ_s RM2 = Σ_j RM3 (Eqs. 10–12)."""
    layer = "Conv2"
    Co, Ho, Wo = net.unit_node(layer).out_shape
    S = Ho * Wo
    chans = torch.tensor([1, 5])
    units = (chans[:, None] * S + torch.arange(S)[None, :]).reshape(-1)  # every position of 2 channels
    rm4 = backmap(net, x, layer, "RM4", units=units)
    rm2 = backmap(net, x, layer, "RM2", units=units)
    rm3 = backmap(net, x, layer, "RM3", units=chans)
    rm1 = backmap(net, x, layer, "RM1", units=chans)
    C_in = net.node(net.unit_node(layer).inputs[0]).out_shape[0]
    assert rm4.image.shape == (units.numel(), C_in, 3, 12, 12) and rm4.bias.shape == (units.numel(), C_in, net.n_bias)
    assert rm3.image.shape == (2, C_in, 3, 12, 12) and rm1.image.shape == (2, 3, 12, 12)
    assert rm3.layout == ("out_channel", "in_channel", "C", "H", "W")
    close(rm4.image.sum(1), rm2.image)
    close(rm4.bias.sum(1), rm2.bias)
    close(rm4.image.reshape(2, S, C_in, 3, 12, 12).sum(1), rm3.image)
    close(rm4.bias.reshape(2, S, C_in, -1).sum(1), rm3.bias)
    close(rm2.image.reshape(2, S, 3, 12, 12).sum(1), rm1.image)
    close(rm3.image.sum(1), rm1.image)
    close(rm3.bias.sum(1), rm1.bias)
    # RM4 rows reconstruct the in-channel contributions: Σ_j <z, RM4_j> = c
    c = net.preactivations(x.unsqueeze(0))[layer][0].reshape(-1)[units]
    close(rm4.reconstruct(x, net.x_b).sum(1), c)


def test_rm0_fc_rows_gradient_and_bias_gap(net, x):
    """RM0 = FC rows = RM2 on FC; its image part is the input gradient; the completeness gap
    of input×gradient attribution equals <x_b, H^b> (plus the FC's own bias for the logit)."""
    rm0 = backmap(net, x, "FC", "RM0")
    rm2 = backmap(net, x, "FC", "RM2", method="forward")
    assert rm0.image.shape == (10, 3, 12, 12)
    close(rm0.image, rm2.image)
    close(rm0.bias, rm2.bias)
    f = net.extended_function(net.unit_node("FC").name)
    grad = torch.autograd.functional.jacobian(lambda xx: f(xx, net.x_b), x)  # (10, C, H, W)
    close(rm0.image, grad, 1e-10)
    c = f(x, net.x_b)
    ixg = (grad * x).reshape(10, -1).sum(1)  # InputXGradient summed: Σ x·∂c/∂x
    close(c - ixg, rm0.bias @ net.x_b, 1e-10)
    logits = net(x.unsqueeze(0))[0]
    b_fc = net.x_b[net.bias_slices["FC.bias"]]
    close(logits - ixg, rm0.bias @ net.x_b + b_fc, 1e-10)


def test_scale_invariance(net, x):
    a = backmap(net, x, "Conv4", units=list(range(0, 200, 3)))
    b = backmap(net, x, "Conv4", units=list(range(0, 200, 3)), scale=1 / 8)
    assert torch.equal(a.image, b.image) and torch.equal(a.bias, b.bias)  # 1/8 is exact in binary
    c = backmap(net, x, "Conv4", units=list(range(0, 200, 3)), scale=0.37)
    close(c.image, a.image)
    close(c.bias, a.bias)


def test_reconstructed_activations_all_layers(net, x):
    out = reconstructed_activations(net, x)
    assert list(out) == net.unit_layers
    for layer, (c, ch) in out.items():
        assert c.shape == ch.shape == (int(torch.tensor(net.unit_node(layer).out_shape).prod()),)
        close(ch, c)
    f32 = reconstructed_activations(net, x, layers=["Conv3"], dtype="float32")
    c, ch = f32["Conv3"]
    assert ch.dtype == torch.float32
    close(ch.double(), c.double(), 1e-4)  # float32 rounding of short sums


def test_memory_refusal_and_stream(net, x):
    with pytest.raises(ValueError, match=r"needs [0-9.]+ GiB.*units=.*stream=True"):
        backmap(net, x, "Conv1", "RM4", memory_budget="64MB")
    full = backmap(net, x, "Conv1")  # 4,608 units x 826 values x 8 B = 30 MB
    chunks = list(backmap(net, x, "Conv1", memory_budget="16MB", stream=True))
    assert len(chunks) > 1
    assert torch.equal(torch.cat([c.image for c in chunks]), full.image)
    assert torch.equal(torch.cat([c.bias for c in chunks]), full.bias)


def test_bad_arguments(net, x):
    with pytest.raises(ValueError, match="mode"):
        backmap(net, x, "Conv1", "RM5")
    with pytest.raises(ValueError, match="unit layer"):
        backmap(net, x, "Conv9")
    with pytest.raises(ValueError, match="RM0"):
        backmap(net, x, "Conv1", "RM0")
    with pytest.raises(ValueError, match="RM4 needs a conv layer"):
        backmap(net, x, "FC", "RM4")
    with pytest.raises(ValueError, match="units"):
        backmap(net, x, "Conv1", units=[10**7])


def test_tanh_network_refused():
    m = nn.Sequential(nn.Conv2d(1, 2, 3), nn.Sigmoid(), nn.Flatten(), nn.Linear(8, 2)).eval()
    tnet = from_torch(m, (1, 4, 4), torch.float64)
    with pytest.raises(ValueError, match="sigmoid"):
        backmap(tnet, torch.zeros(1, 4, 4, dtype=torch.float64), "FC")


def test_fc_only_network_flat_input():
    """A flat-input MLP (no image geometry): RM0 keeps the input's shape and the identity holds."""
    torch.manual_seed(4)
    m = nn.Sequential(nn.Linear(6, 5), nn.LeakyReLU(0.1), nn.Linear(5, 3)).eval()
    mnet = from_torch(m, (6,), torch.float64)
    xx = torch.randn(6, dtype=torch.float64)
    last = mnet.unit_layers[-1]
    bm = backmap(mnet, xx, last, "RM0", method="forward")
    assert bm.image.shape == (3, 6)
    close(bm.reconstruct(xx, mnet.x_b), mnet.preactivations(xx.unsqueeze(0))[last][0])
    close(bm.image, backmap(mnet, xx, last, "RM0", method="reverse").image)
