"""Exactness of torch model -> equivalent network (``linop.from_torch``, seed 000 §3.2-3.3).

Tolerances.  The equivalent network computes the same function as the torch module, but
through different rounding: BN is folded into the weights (Eq. 7), multipliers into the
kernels, biases are added from ``x_b``.  Every difference is therefore a few roundings per
layer, so in float64 we ask for a norm-wise relative error <= 1e-12 (eps = 2.2e-16 times a
generous 4500 for depth x accumulation length), and in float32 <= 2e-5 (eps = 1.2e-7 times
~170).  Comparisons are norm-wise (‖a − b‖ / ‖b‖) because a single unit near zero can have a
large relative error from cancellation without anything being wrong.
"""
from __future__ import annotations

import copy
import re
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given
from hypothesis import strategies as st
from torch import nn

from linop.convert import (
    ConversionError,
    check_conversion,
    from_torch,
    register_converter,
    unregister_converter,
)
from linop.network import EquivalentNetwork, LinearNode

RTOL64 = 1e-12  # see module docstring
RTOL32 = 2e-5


pytestmark = pytest.mark.usefixtures("one_thread")


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.detach().double(), b.detach().double()
    return float((a - b).norm() / b.norm().clamp_min(1e-300))


def randomise_bn(model: nn.Module, seed: int = 0) -> nn.Module:
    """Random running statistics and affine parameters, so BN folding (Eq. 7) is exercised."""
    g = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, (nn.BatchNorm1d, nn.BatchNorm2d)):
            n = m.num_features
            with torch.no_grad():
                m.running_mean.copy_(0.5 * torch.randn(n, generator=g))
                m.running_var.copy_(0.5 + 1.5 * torch.rand(n, generator=g))
                if m.weight is not None:
                    m.weight.copy_(1 + 0.5 * torch.randn(n, generator=g))
                    m.bias.copy_(0.5 * torch.randn(n, generator=g))
    return model


def randomise_scalars(model: nn.Module, seed: int = 0) -> nn.Module:
    """Random values for every scalar (shape (1,)) parameter: the Fixup biases and scales."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.numel() == 1:
                p.copy_(0.8 + 0.4 * torch.rand(1, generator=g) if name.endswith("scale")
                        else 0.3 * torch.randn(1, generator=g))
    return model


def digits_batch(n: int, shape: tuple[int, ...]) -> torch.Tensor:
    """Real images: sklearn's bundled 8x8 digits, tiled to ``shape`` (C, H, W)."""
    from sklearn.datasets import load_digits

    x = torch.tensor(load_digits().images[:n] / 16.0, dtype=torch.float64)  # (n, 8, 8)
    C, H, W = shape
    x = x.repeat_interleave(H // 8, 1).repeat_interleave(W // 8, 2)
    return (x.unsqueeze(1).expand(n, C, H, W) - 0.3).contiguous()


def hooked_outputs(model: nn.Module, x: torch.Tensor, paths) -> dict[str, torch.Tensor]:
    out, handles = {}, []
    mods = dict(model.named_modules())
    for p in paths:
        handles.append(mods[p].register_forward_hook(
            lambda m, i, o, p=p: out.__setitem__(p, o.detach().clone())))
    with torch.no_grad():
        model(x)
    for h in handles:
        h.remove()
    return out


# ---------------------------------------------------------------------------- reference models
def _vgg7():
    from models.vgg7 import vgg7

    return randomise_bn(vgg7(10, 3)), (3, 32, 32)


def _resnet20():
    from models.resnet20 import resnet20

    return randomise_bn(resnet20(10, 3)), (3, 32, 32)


def _fixup():
    from models.fixup_resnet20 import fixup_resnet20

    return randomise_scalars(fixup_resnet20(10, 3, zero_init=False)), (3, 32, 32)


def _conv2_fc1():
    from models.baselines import conv2_fc1

    return conv2_fc1((1, 8, 8), 10), (1, 8, 8)


def _conv3_fc2():
    from models.baselines import conv3_fc2

    return conv3_fc2((3, 32, 32), 10), (3, 32, 32)


def _decreasing():
    from models.baselines import conv_channel_decreasing

    return conv_channel_decreasing((1, 8, 8), 10, activation="relu"), (1, 8, 8)


REFERENCE = {"vgg7": _vgg7, "resnet20": _resnet20, "fixup_resnet20": _fixup,
             "conv2_fc1": _conv2_fc1, "conv3_fc2": _conv3_fc2, "decreasing": _decreasing}


# fully convolutional models (global pooling) also run at 16x16: 4x cheaper, same graph
SMALL = {"vgg7": (3, 16, 16), "resnet20": (3, 16, 16), "fixup_resnet20": (3, 16, 16)}


@pytest.fixture(scope="module", params=sorted(REFERENCE))
def reference(request):
    torch.manual_seed(0)
    model, shape = REFERENCE[request.param]()
    model = model.eval()
    net = from_torch(model, shape)
    assert isinstance(net, EquivalentNetwork)
    return request.param, model.double(), shape, net


def test_reference_forward_float64(reference):
    _, model, shape, net = reference
    x = digits_batch(4, shape)
    with torch.no_grad():
        want = model(x)
    got = net.forward(x)
    assert got.dtype == torch.float64
    assert rel(got, want) <= RTOL64
    # same predicted classes on real images
    assert torch.equal(got.argmax(1), want.argmax(1))


def test_reference_forward_float32(reference):
    key, _, shape, _ = reference
    shape = SMALL.get(key, shape)
    torch.manual_seed(0)
    model32, _ = REFERENCE[key]()
    model32 = model32.eval().float()
    net32 = from_torch(model32, shape, dtype=torch.float32)
    x = digits_batch(2, shape).float()
    with torch.no_grad():
        want = model32(x)
    got = net32.forward(x)
    assert got.dtype == torch.float32
    assert rel(got, want) <= RTOL32
    # a float64 network cast down computes in float32 too (operators cast lazily)
    assert rel(from_torch(model32, shape).to(torch.float32).forward(x), want) <= RTOL32


def test_reference_preactivations_match_hooks(reference):
    """Seed 000 Eq. 3: the unit layer's pre-bias value plus its own bias R x_b[b_l] is the
    torch layer output (for BN models the BN output; for Fixup, conv × M + b)."""
    key, model, shape, net = reference
    if key in SMALL:
        shape = SMALL[key]
        net = from_torch(model, shape)
    x = digits_batch(2, shape)
    pre = net.preactivations(x)
    assert list(pre) == net.unit_layers
    paths = {}
    for layer in net.unit_layers:
        own = net.own_bias(layer)
        # module whose output equals pre + own bias: the BN (folded), else the conv/fc
        paths[layer] = own.source if own is not None and own.source in dict(
            model.named_modules()) else net.unit_modules[layer]
    hooks = hooked_outputs(model, x, set(paths.values()))
    for layer in net.unit_layers:
        own = net.own_bias(layer)
        value = pre[layer] + (own.bias_term(net.x_b) if own is not None else 0)
        want = hooks[paths[layer]]
        if key == "fixup_resnet20" and paths[layer].endswith("conv2"):
            blk = model.get_submodule(paths[layer].rsplit(".", 1)[0])
            # Fixup: the multiplier M is folded into w' = w × M, the own bias is bias2b
            want = want * blk.scale + blk.bias2b
        elif key == "fixup_resnet20" and paths[layer].endswith("conv1"):
            blk = model.get_submodule(paths[layer].rsplit(".", 1)[0])
            want = want + blk.bias1b
        elif key == "fixup_resnet20" and paths[layer] == "conv0":
            want = want + model.bias0
        assert value.shape == want.shape, layer
        assert rel(value, want) <= RTOL64, layer


def test_reference_structure(reference):
    key, model, shape, net = reference
    n_conv = sum(isinstance(m, nn.Conv2d) for m in model.modules())
    n_fc = sum(isinstance(m, nn.Linear) for m in model.modules())
    convs = [f"Conv{i}" for i in range(n_conv)]
    fcs = ["FC"] if n_fc == 1 else [f"FC{i}" for i in range(n_fc)]
    assert net.unit_layers == convs + fcs
    # x_b: contiguous, non-overlapping slices covering it exactly (seed 000 Fig. 2)
    sl = sorted(net.bias_slices.values(), key=lambda s: s.start)
    assert sl[0].start == 0 and sl[-1].stop == net.n_bias
    assert all(a.stop == b.start for a, b in zip(sl, sl[1:]))
    assert net.x_b.dim() == 1
    if key == "vgg7":
        # Table D.2: (32+64+96)·2 = 384 conv biases, plus the FC's 10
        assert net.n_bias == 384 + 10
        assert all(net.own_bias(f"Conv{i}").bias_name == f"Conv{i}.bias" for i in range(6))
    if key == "resnet20":
        assert net.n_bias == 32 * 7 + 64 * 6 + 96 * 6 + 10
        assert net.unit_modules["Conv7"] == "layer2.0.conv1"
    if key == "fixup_resnet20":
        # Table D.5: 1 + 9 × 4 = 37 scalar biases of the conv part, + bias_fc + FC bias (10)
        scalars = [k for k in net.bias_slices if not k.startswith("FC")]
        assert len(scalars) == 38 and "layer2.0.bias1a" in scalars
        assert all(net.bias_slices[k].stop - net.bias_slices[k].start == 1 for k in scalars)
        # every multiplier was folded: no Scale node left
        assert not any(isinstance(n, LinearNode) and type(n.op).__name__ == "Scale"
                       for n in net.nodes)
        assert net.own_bias("Conv2").bias_name == "layer1.0.bias2b"
        assert net.own_bias("Conv1").bias_name == "layer1.0.bias1b"
    if key in ("conv2_fc1", "conv3_fc2", "decreasing"):
        assert all(net.own_bias(u).bias_name == f"{u}.bias" for u in net.unit_layers)
    text = net.describe()
    assert all(u in text for u in net.unit_layers) and "x_b[0:" in text


def test_bn_fold_matches_eq7():
    """Folded bias of Conv0 in VGG7 is b' = β − γ·μ/√(σ²+ε) exactly as Eq. 7 states."""
    model, _ = _vgg7()
    model.eval()
    net = from_torch(model, SMALL["vgg7"])
    bn = model.bn0
    want = bn.bias.double() - bn.weight.double() * bn.running_mean.double() / torch.sqrt(
        bn.running_var.double() + bn.eps)
    got = net.bias_values("Conv0.bias")
    # same formula, different association order: a couple of ulps
    assert torch.allclose(got, want.detach(), rtol=1e-14, atol=1e-15)


def test_node_for_module_resnet_block():
    model, _ = _resnet20()
    model, shape = model.eval().double(), SMALL["resnet20"]
    net = from_torch(model, shape)
    x = digits_batch(2, shape)
    paths = ["layer1.0", "layer2.0", "layer3.2.bn1", "gap", "act0"]
    hooks = hooked_outputs(model, x, paths)
    names = [net.node_for_module(p).name for p in paths]
    vals = net.run(x, keep=names)
    for p, nm in zip(paths, names):
        assert rel(vals[nm], hooks[p]) <= RTOL64, p
    with pytest.raises(KeyError, match="no node"):
        net.node_for_module("not.a.module")


def test_positive_homogeneity_reference():
    """Seed 000 Eq. 3 / appendix C: a piecewise-linear net through the origin of [x; x_b]
    is positively homogeneous, forward(k·x, k·x_b) = k·forward(x)."""
    model, _ = _resnet20()
    shape = SMALL["resnet20"]
    net = from_torch(model.eval(), shape)
    x = digits_batch(2, shape)
    y = net.forward(x)
    k = 3.7
    assert rel(net.forward(k * x, x_b=k * net.x_b), k * y) <= RTOL64
    # scaling by a power of two commutes with every rounding: bitwise equal
    assert torch.equal(net.forward(x / 8, x_b=net.x_b / 8), y / 8)
    # and the bias is really an input: dropping it changes the function
    assert rel(net.forward(x, x_b=torch.zeros_like(net.x_b)), y) > 1e-3


def test_activation_pattern_resnet():
    model, _ = _resnet20()
    shape = SMALL["resnet20"]
    net = from_torch(model.eval(), shape)
    x = digits_batch(1, shape)
    pat = net.activation_pattern(x)
    slope = model.negative_slope
    for name, s in pat.items():
        vals = set(torch.unique(s).tolist())
        assert vals <= {1.0, slope}, name


CHECKPOINTS = sorted((Path(__file__).resolve().parents[1] / "models" / "checkpoints").glob("*.pt"))


@pytest.mark.parametrize("path", CHECKPOINTS or [None], ids=lambda p: getattr(p, "name", "none"))
def test_trained_checkpoint_same_accuracy(path):
    """A model trained on the digits set converts and keeps its accuracy on the test split.

    float64: logits agree to 1e-12, hence identical predicted classes.  float32 (as trained):
    the two computations differ by rounding only (~1e-6 relative), so a prediction may differ
    only at a near-tie of the top two logits; we assert exactly that, and equal accuracy up
    to those near-ties."""
    if path is None:
        pytest.skip("no shipped checkpoint in models/checkpoints (made by models.train)")
    from models.data import load_dataset
    from models.train import load_checkpoint

    model, meta = load_checkpoint(path)
    ds = load_dataset(meta["data"], normalize=meta.get("normalize", "none"))
    net32 = from_torch(model, ds.input_shape, dtype=torch.float32)
    with torch.no_grad():
        logits = model(ds.x_test)
    p_torch, p_net = logits.argmax(1), net32(ds.x_test).argmax(1)
    top2 = logits.topk(2, dim=1).values
    gap = (top2[:, 0] - top2[:, 1]) / logits.abs().amax(1).clamp_min(1e-30)
    differ = p_net != p_torch
    assert bool((gap[differ] < 1e-4).all()), "a float32 prediction flipped away from a near-tie"
    acc_torch = (p_torch == ds.y_test).double().mean().item()
    acc_net = (p_net == ds.y_test).double().mean().item()
    assert abs(acc_net - acc_torch) <= differ.double().mean().item()
    # float64: same function to rounding, same classes (first 32 test images: cost)
    net64 = from_torch(model, ds.input_shape)
    x = ds.x_test[:32].double()
    with torch.no_grad():
        want = copy.deepcopy(model).double()(x)
    got = net64(x)
    assert rel(got, want) <= RTOL64
    assert torch.equal(got.argmax(1), want.argmax(1))


# ---------------------------------------------------------------------------- small cases
class FixupBlock(nn.Module):
    def __init__(self):
        super().__init__()
        self.bias1a = nn.Parameter(torch.tensor([0.1]))
        self.conv1 = nn.Conv2d(3, 3, 3, padding=1, bias=False)
        self.bias1b = nn.Parameter(torch.tensor([-0.2]))
        self.bias2a = nn.Parameter(torch.tensor([0.3]))
        self.conv2 = nn.Conv2d(3, 3, 3, padding=1, bias=False)
        self.scale = nn.Parameter(torch.tensor([1.7]))
        self.bias2b = nn.Parameter(torch.tensor([0.05]))

    def forward(self, x):
        out = torch.relu(self.conv1(x + self.bias1a) + self.bias1b)
        out = self.conv2(out + self.bias2a) * self.scale + self.bias2b
        return F.relu(out + x)


def test_fixup_scalars_and_multiplier_fold():
    torch.manual_seed(1)
    m = FixupBlock().eval().double()
    net = from_torch(m, (3, 5, 5))
    x = torch.randn(3, 3, 5, 5, dtype=torch.float64)
    with torch.no_grad():
        want = m(x)
    assert rel(net(x), want) <= RTOL64
    assert list(net.bias_slices) == ["bias1a", "bias1b", "bias2a", "bias2b"]
    # x_b holds the parameters themselves, in execution order (seed 000 Fig. 2)
    assert torch.equal(net.x_b, torch.cat([m.bias1a, m.bias1b, m.bias2a, m.bias2b]).detach())
    # multiplier folded into Conv1's kernel (Table D.4: w' = w × M)
    w = net.unit_node("Conv1").op.weight
    assert torch.allclose(w, m.conv2.weight.detach() * m.scale.detach(), rtol=1e-15, atol=0)
    assert net.own_bias("Conv1").bias_name == "bias2b"
    assert net.node_for_module("conv2").name == net.unit_node("Conv1").name


class Functional(nn.Module):
    """Functional / method forms: F.relu, x.view(x.size(0), -1), x.mean, strided slicing,
    F.pad on channels, torch.cat, F.leaky_relu, sigmoid, a standalone BN, a number
    multiplier and a per-channel buffer bias."""

    def __init__(self):
        super().__init__()
        self.bn_in = nn.BatchNorm2d(2)
        self.conv = nn.Conv2d(2, 4, 3, stride=2, padding=1, dilation=1, groups=2)
        self.conv_b = nn.Conv2d(2, 5, 1, bias=False)
        self.register_buffer("shift", torch.linspace(-1, 1, 9).reshape(1, 9, 1, 1))
        self.bn1d = nn.BatchNorm1d(9)
        self.fc = nn.Linear(9, 5)
        self.fc2 = nn.Linear(5, 3)
        self.prelu = nn.PReLU(9)

    def forward(self, x):
        x = self.bn_in(x)
        a = F.relu(self.conv(x))
        b = F.leaky_relu(self.conv_b(x[:, :, ::2, ::2]), 0.1)
        y = torch.cat([a, b], dim=1) * 0.5 + self.shift
        y = self.prelu(y)
        y = F.pad(y, (0, 0, 0, 0, 0, 0))
        z = y.mean((2, 3), keepdim=True)
        z = z.view(z.size(0), -1)
        z = torch.sigmoid(self.fc(self.bn1d(z)))
        return self.fc2(z) / 2.0


def _rand_bn(m):
    return randomise_bn(m, seed=3)


def test_functional_forms():
    torch.manual_seed(2)
    m = _rand_bn(Functional()).eval().double()
    net = from_torch(m, (2, 6, 6))
    x = torch.randn(4, 2, 6, 6, dtype=torch.float64)
    with torch.no_grad():
        want = m(x)
    assert rel(net(x), want) <= RTOL64
    assert net.unit_layers == ["Conv0", "Conv1", "FC0", "FC1"]
    # standalone BN -> Scale + BiasNode; BN1d after flatten-mean is *not* after a linear
    kinds = [type(n.op).__name__ for n in net.nodes if isinstance(n, LinearNode)]
    assert "ChannelPad" not in kinds and "Flatten" in kinds
    assert kinds.count("Scale") >= 3 and "Subsample" in kinds and "GlobalAvgPool2d" in kinds
    assert "shift" in net.bias_slices and "bn_in.bias" in net.bias_slices
    assert check_conversion(m, net, x) <= RTOL64
    # the zero-width F.pad made no node; the smooth sigmoid is reported
    assert not net.piecewise_linear


def test_bn1d_folds_into_linear_and_maxpool():
    torch.manual_seed(3)
    m = nn.Sequential(nn.Conv2d(1, 4, 3), nn.MaxPool2d(2, ceil_mode=True), nn.Tanh(),
                      nn.Flatten(), nn.Linear(64, 8), nn.BatchNorm1d(8), nn.ReLU(),
                      nn.Dropout(0.3), nn.Identity(), nn.Linear(8, 2))
    m = _rand_bn(m).eval().double()
    net = from_torch(m, (1, 9, 9))
    x = torch.randn(5, 1, 9, 9, dtype=torch.float64)
    with torch.no_grad():
        want = m(x)
    assert rel(net(x), want) <= RTOL64
    assert not any(type(getattr(n, "op", None)).__name__ == "Scale" for n in net.nodes)
    assert net.own_bias("FC0").source == "5"  # the BN's output carries FC0's own bias


class Misc(nn.Module):
    """The remaining forms: subtraction both ways, per-channel multiplier, functional pools,
    'same' padding, dilation, offset slicing with Ellipsis, adaptive pools, torch.add."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(2, 4, 3, padding="same", dilation=2)
        self.gain = nn.Parameter(torch.rand(1, 4, 1, 1) + 0.5)
        self.offset = nn.Parameter(torch.tensor([0.25]))
        self.full = nn.Parameter(torch.randn(4, 4, 4))

    def forward(self, x):
        y = self.conv(x)
        y = torch.add(1.5 - y * self.gain, y)  # c - x, per-channel scale, residual sum
        y = F.dropout(y, 0.5, training=False)
        y = F.max_pool2d(F.relu(y - self.offset), 2, 1, 1)  # (4, 9, 9)
        y = F.avg_pool2d(y, 3, 2, ceil_mode=True, count_include_pad=False)  # (4, 5, 5)
        y = y[..., 1::2, :4:1][:, :, :, ::1]  # (4, 2, 4): offset 1 on H
        y = F.adaptive_max_pool2d(y, (1, 2)) - F.adaptive_avg_pool2d(y, (1, 2))  # (4, 1, 2)
        z = y.mean((-2, -1), keepdim=True).reshape(-1, 4)
        return torch.cat([y.add(self.full[:, :1, :2]).flatten(1), z], 1)


def test_misc_forms():
    torch.manual_seed(4)
    m = Misc().eval().double()
    net = from_torch(m, (2, 8, 8))
    x = torch.randn(3, 2, 8, 8, dtype=torch.float64)
    with torch.no_grad():
        want = m(x)
    assert rel(net(x), want) <= RTOL64
    assert "-offset" in net.bias_slices and "gain" not in net.bias_slices
    sliced = [k for k in net.bias_slices if k.startswith("full[")]  # a sliced parameter
    assert len(sliced) == 1 and net.bias_values(sliced[0]).shape == (8,)
    assert torch.equal(net.bias_values(sliced[0]), m.full[:, :1, :2].detach().reshape(-1))


class DeadBranch(nn.Module):
    def __init__(self):
        super().__init__()
        self.unused = nn.Conv2d(1, 2, 3)
        self.conv = nn.Conv2d(1, 2, 3)
        self.fc = nn.Linear(18, 2)

    def forward(self, x):
        self.unused(x) + 1.0  # traced but not used: no nodes, no bias in x_b
        return self.fc(torch.flatten(self.conv(x), 1))


def test_dead_code_is_dropped():
    torch.manual_seed(5)
    m = DeadBranch().eval().double()
    net = from_torch(m, (1, 5, 5))
    assert net.unit_layers == ["Conv0", "FC"]
    assert list(net.bias_slices) == ["Conv0.bias", "FC.bias"] and net.n_bias == 4
    assert net.unit_modules == {"Conv0": "conv", "FC": "fc"}
    x = torch.randn(2, 1, 5, 5, dtype=torch.float64)
    with torch.no_grad():
        assert rel(net(x), m(x)) <= RTOL64


# ---------------------------------------------------------------------------- errors
class Custom(nn.Module):
    def __init__(self, act):
        super().__init__()
        self.conv = nn.Conv2d(1, 2, 3)
        self.act = act

    def forward(self, x):
        return self.act(self.conv(x))


class PyOp(nn.Module):
    def forward(self, x):
        return torch.sin(x) * 2.0


def my_custom_op(x):
    return x.clamp(min=0) ** 2


torch.fx.wrap("my_custom_op")  # fx records it as one opaque call_function


class WrappedOp(nn.Module):
    def forward(self, x):
        return my_custom_op(x)


@pytest.mark.parametrize("mod,pattern", [
    (Custom(nn.GELU()), r"fx node 'act'.*call_module.*GELU.*test_convert\.py:\d+"),
    (Custom(nn.LocalResponseNorm(2)), r"fx node 'act'.*LocalResponseNorm.*test_convert\.py:\d+"),
    (PyOp(), r"fx node 'sin'.*call_function.*sin.*test_convert\.py:\d+ `return torch\.sin"),
    (WrappedOp(), r"fx node 'my_custom_op'.*call_function.*my_custom_op.*test_convert\.py:\d+"),
])
def test_unsupported_names_node_and_line(mod, pattern):
    with pytest.raises(NotImplementedError, match=pattern):
        from_torch(mod.eval(), (1, 6, 6))


def test_unsupported_forms():
    class Prod(nn.Module):
        def forward(self, x):
            return x * x

    with pytest.raises(ConversionError, match="product of two network tensors"):
        from_torch(Prod().eval(), (2, 3, 3))

    class CatH(nn.Module):
        def forward(self, x):
            return torch.cat([x, x], dim=2)

    with pytest.raises(ConversionError, match="dim=2"):
        from_torch(CatH().eval(), (2, 3, 3))

    class PadW(nn.Module):
        def forward(self, x):
            return F.pad(x, (0, 0, 0, 0, 1, 1), value=1.0)  # a fill on the channel axis

    with pytest.raises(ConversionError, match="channel axis"):
        from_torch(PadW().eval(), (2, 3, 3))

    class InPlace(nn.Module):
        def forward(self, x):
            y = F.relu(x, inplace=True)
            return x + y  # torch: x was overwritten by relu

    with pytest.raises(ConversionError, match="in-place op on 'x'"):
        from_torch(InPlace().eval(), (2, 3, 3))

    class Branchy(nn.Module):
        def forward(self, x):
            return x if x.sum() > 0 else -x

    with pytest.raises(NotImplementedError, match="could not trace"):
        from_torch(Branchy().eval(), (2, 3, 3))


def test_training_mode_and_bad_arguments():
    model = nn.Sequential(nn.Conv2d(1, 2, 3), nn.BatchNorm2d(2))
    with pytest.raises(ValueError, match=r"training mode.*eval\(\)"):
        from_torch(model, (1, 5, 5))
    model.eval()
    model[1].train()
    with pytest.raises(ValueError, match=r"submodule '1'"):
        from_torch(model, (1, 5, 5))
    model.eval()
    with pytest.raises(ValueError, match="input_shape"):
        from_torch(model, (2, 5, 5))
    with pytest.raises(ValueError, match="dtype"):
        from_torch(model, (1, 5, 5), dtype=np.float16)


# ---------------------------------------------------------------------------- random nets
class Block(nn.Module):
    """conv [+BN] + activation."""

    def __init__(self, c_in, c_out, k, stride, pad, dil, groups, bias, bn, act):
        super().__init__()
        self.conv = nn.Conv2d(c_in, c_out, k, stride, pad, dil, groups, bias=bias)
        self.bn = nn.BatchNorm2d(c_out) if bn else nn.Identity()
        self.act = act

    def forward(self, x):
        return self.act(self.bn(self.conv(x)))


class Residual(nn.Module):
    """conv-BN-act-conv-BN + shortcut (identity, or avgpool(1, s) + zero channels), act."""

    def __init__(self, c_in, c_out, stride, slope):
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(c_out)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(c_out)
        self.slope = slope
        self.extra = c_out - c_in
        self.pool = nn.AvgPool2d(1, stride) if stride > 1 else nn.Identity()

    def forward(self, x):
        out = F.leaky_relu(self.bn1(self.conv1(x)), self.slope)
        out = self.bn2(self.conv2(out))
        sc = self.pool(x)
        if self.extra:
            sc = F.pad(sc, (0, 0, 0, 0, 0, self.extra))
        return F.leaky_relu(out + sc, self.slope)


class Concat(nn.Module):
    def __init__(self, c_in, c1, c2):
        super().__init__()
        self.a = nn.Conv2d(c_in, c1, 1)
        self.b = nn.Conv2d(c_in, c2, 3, padding=1)

    def forward(self, x):
        return torch.relu(torch.cat((self.a(x), self.b(x)), 1))


class RandomNet(nn.Module):
    def __init__(self, body, head_in, n_out, hidden):
        super().__init__()
        self.body = nn.ModuleList(body)
        self.fc1 = nn.Linear(head_in, hidden)
        self.fc2 = nn.Linear(hidden, n_out)

    def forward(self, x):
        for b in self.body:
            x = b(x)
        x = torch.flatten(F.adaptive_avg_pool2d(x, 1), 1)
        return self.fc2(F.relu(self.fc1(x)))


def _build(data):
    """Draw an architecture and return (model, input_shape, piecewise_linear)."""
    c = data.draw(st.integers(1, 3), label="in_channels")
    hw0 = hw = data.draw(st.integers(5, 9), label="size")
    in_c = c
    body, pl = [], True
    for _ in range(data.draw(st.integers(1, 4), label="depth")):
        kind = data.draw(st.sampled_from(["conv", "residual", "concat", "pool"]))
        if kind == "conv":
            k = data.draw(st.integers(1, 3), label="k")
            dil = data.draw(st.integers(1, 2), label="dil") if k > 1 else 1
            pad = data.draw(st.integers(0, dil * (k - 1) // 2 + 1), label="pad")
            if dil * (k - 1) + 1 > hw + 2 * pad:
                continue
            stride = data.draw(st.integers(1, 2), label="stride")
            groups = data.draw(st.sampled_from([g for g in (1, 2) if c % g == 0]), label="g")
            c_out = groups * data.draw(st.integers(1, 3), label="c_out")
            act = data.draw(st.sampled_from(["relu", "leaky", "prelu", "tanh"]), label="act")
            slope = data.draw(st.floats(0.01, 0.9), label="slope")
            pl = pl and act != "tanh"
            a = {"relu": nn.ReLU(), "leaky": nn.LeakyReLU(slope), "prelu": nn.PReLU(c_out),
                 "tanh": nn.Tanh()}[act]
            body.append(Block(c, c_out, k, stride, pad, dil, groups,
                              data.draw(st.booleans(), label="bias"),
                              data.draw(st.booleans(), label="bn"), a))
            hw = (hw + 2 * pad - dil * (k - 1) - 1) // stride + 1
            c = c_out
        elif kind == "residual":
            stride = data.draw(st.integers(1, 2), label="rstride") if hw >= 2 else 1
            c_out = c + (data.draw(st.integers(0, 2), label="extra") if stride == 2 else 0)
            body.append(Residual(c, c_out, stride, data.draw(st.floats(0.0, 0.5), label="rs")))
            hw = (hw - 1) // stride + 1
            c = c_out
        elif kind == "concat":
            c1 = data.draw(st.integers(1, 2), label="c1")
            c2 = data.draw(st.integers(1, 2), label="c2")
            body.append(Concat(c, c1, c2))
            c = c1 + c2
        elif hw >= 2:
            if data.draw(st.booleans(), label="max"):
                body.append(nn.MaxPool2d(2, 2))
                hw = hw // 2
            else:
                body.append(nn.AvgPool2d(3, 2, 1, count_include_pad=data.draw(
                    st.booleans(), label="cip")))
                hw = (hw - 1) // 2 + 1
    torch.manual_seed(data.draw(st.integers(0, 2 ** 16), label="seed"))
    model = RandomNet(body, c, 3, data.draw(st.integers(1, 4), label="hidden"))
    return randomise_bn(model, seed=1), (in_c, hw0, hw0), pl


@given(data=st.data())
def test_random_architectures_match_torch(data):
    model, shape, pl = _build(data)
    model = model.eval().double()
    net = from_torch(model, shape)
    x = torch.randn((3,) + shape, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want = model(x)
    assert rel(net(x), want) <= RTOL64
    n_conv = sum(isinstance(m, nn.Conv2d) for m in model.modules())
    assert net.unit_layers == [f"Conv{i}" for i in range(n_conv)] + ["FC0", "FC1"]
    if pl:
        assert net.piecewise_linear
        y = net(x)
        assert rel(net.forward(2.5 * x, x_b=2.5 * net.x_b), 2.5 * y) <= RTOL64


# ---------------------------------------------------------------------------- every problem at once
class ManyProblems(nn.Module):
    """Four unsupported operations; the unbind's tuple has no tensor shape, its items do."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(1, 2, 3)
        self.act = nn.GELU()

    def forward(self, x):
        y = self.act(self.conv(x))
        a, b = y.unbind(1)
        z = torch.sin(a + b)
        return torch.cat([z, z], dim=2)


def test_every_unsupported_op_in_one_error():
    with pytest.raises(ConversionError) as info:
        from_torch(ManyProblems().eval(), (1, 6, 6))
    err = info.value
    assert [p.node for p in err.problems] == ["act", "unbind", "sin", "cat"]
    assert [p.op for p in err.problems] == ["call_module", "call_method", "call_function",
                                            "call_function"]
    assert all(re.search(r"test_convert\.py:\d+ `", p.where) for p in err.problems)
    text = str(err)
    assert "cannot convert 4 fx nodes" in text
    for pattern in [r"'act' .*\[GELU\].*`y = self\.act", r"'unbind' .*unbind.*tensor method",
                    r"'sin' .*torch\.sin.*unsupported function", r"'cat' .*dim=2"]:
        assert re.search(pattern, text), pattern


def test_consequences_of_a_failure_are_not_reported():
    class Ret(nn.Module):
        def forward(self, x):
            return x.unbind(1)[0]  # the output is only "not a tensor" because unbind failed

    with pytest.raises(ConversionError) as info:
        from_torch(Ret().eval(), (2, 3, 3))
    assert [p.node for p in info.value.problems] == ["unbind"]


# ---------------------------------------------------------------------------- the registry
class Negate(nn.Module):
    """``torch.neg`` has no built-in rule: converting it needs a registered handler."""

    def forward(self, x):
        return torch.neg(x)


def _negate_handler(ctx, node):
    from linop.operators.structural import Scale

    x = ctx.tensor(node, node.args[0])
    return ctx.linear(node, x, Scale(x.shape, -1.0))


class UsesNegate(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(2, 3, 3)
        self.neg = Negate()

    def forward(self, x):
        return F.relu(self.neg(self.conv(x)))


def test_register_converter_for_a_custom_module():
    torch.manual_seed(6)
    m = UsesNegate().eval().double()
    with pytest.raises(ConversionError, match=r"fx node 'neg'.*torch\.neg"):
        from_torch(m, (2, 5, 5))  # traced through Negate.forward: torch.neg is unsupported
    register_converter(Negate, _negate_handler)
    try:
        net = from_torch(m, (2, 5, 5))
    finally:
        unregister_converter(Negate)
    # the registered module is one leaf: one node, named by the module path
    node = net.node_for_module("neg")
    assert node.source == "neg" and type(node.op).__name__ == "Scale"
    x = torch.randn(3, 2, 5, 5, dtype=torch.float64)
    with torch.no_grad():
        assert rel(net(x), m(x)) <= RTOL64
    with pytest.raises(ConversionError):
        from_torch(m, (2, 5, 5))  # unregistered again


def test_register_converter_for_a_function_and_a_method():
    class Both(nn.Module):
        def forward(self, x):
            return torch.neg(x) + x.neg()

    m = Both().eval()
    register_converter(torch.neg, _negate_handler)
    register_converter("neg", _negate_handler)
    try:
        net = from_torch(m, (2, 3, 3))
    finally:
        unregister_converter(torch.neg)
        unregister_converter("neg")
    x = torch.randn(2, 2, 3, 3, dtype=torch.float64)
    assert rel(net(x), -2 * x) <= RTOL64


def test_register_converter_decorator_and_errors():
    import linop

    assert linop.register_converter is register_converter

    @register_converter(Negate)
    def handler(ctx, node):
        return _negate_handler(ctx, node)

    try:
        with pytest.raises(ValueError, match="already has a converter"):
            register_converter(Negate, _negate_handler)
        assert register_converter(Negate, _negate_handler, replace=True) is _negate_handler
    finally:
        unregister_converter(Negate)
    with pytest.raises(KeyError, match="no converter"):
        unregister_converter(Negate)
    with pytest.raises(TypeError, match="target"):
        register_converter(42, _negate_handler)
    with pytest.raises(TypeError, match="nn.Module"):
        register_converter(int, _negate_handler)
    with pytest.raises(TypeError, match="handler"):
        register_converter(Negate, "not callable")
    with pytest.raises(ValueError, match="already has a converter"):
        register_converter(nn.ReLU, _negate_handler)  # built-ins are protected too


def test_subclasses_use_their_base_rule_unless_they_override_forward():
    class MyReLU(nn.ReLU):
        pass

    class ShiftedReLU(nn.ReLU):
        def forward(self, x):
            return super().forward(x) - 1.0

    m = nn.Sequential(nn.Conv2d(1, 2, 3), MyReLU(), nn.Conv2d(2, 2, 1), ShiftedReLU()).eval()
    net = from_torch(m.double(), (1, 5, 5))
    assert net.node_for_module("1").kind == "relu"  # MyReLU: the nn.ReLU rule, one leaf
    x = torch.randn(2, 1, 5, 5, dtype=torch.float64)
    with torch.no_grad():
        assert rel(net(x), m(x)) <= RTOL64  # ShiftedReLU traced through: the -1 is kept


# ---------------------------------------------------------------------------- the folding pass
class FoldChain(nn.Module):
    def __init__(self, bias=True, track=True):
        super().__init__()
        self.conv = nn.Conv2d(2, 3, 3, bias=bias)
        self.bn = nn.BatchNorm2d(3, track_running_stats=track)
        self.register_buffer("m", torch.tensor([4.0]))
        self.side = nn.Conv2d(2, 3, 3)

    def forward(self, x):
        y = self.bn(self.conv(x)) * 2.5 / self.m
        s = self.side(x)
        return F.relu(y + s) + s  # `side` has two consumers: nothing folds into it


def test_fold_plan_bn_and_multipliers():
    from linop.convert.fold import plan_folds
    from linop.convert.trace import trace

    m = randomise_bn(FoldChain()).eval().double()
    gm = trace(m, (2, 5, 5), "FoldChain")
    plan = plan_folds(gm)
    (head,) = plan
    fold = plan[head]
    assert head.target == "conv" and [n.name for n in fold.chain] == ["bn", "mul", "truediv"]
    assert fold.tail.name == "truediv"
    # Eq. 7 then the two multipliers, composed in float64
    W, b, has_bias = fold.apply(m.conv.weight, m.conv.bias)
    g = m.bn.weight / torch.sqrt(m.bn.running_var + m.bn.eps)
    want_W = m.conv.weight * (g * 2.5 / 4.0).reshape(-1, 1, 1, 1)
    want_b = (g * (m.conv.bias - m.bn.running_mean) + m.bn.bias) * 2.5 / 4.0
    # same formulas, different association order: a few ulps
    assert torch.allclose(W, want_W.detach(), rtol=1e-14, atol=0) and has_bias
    assert torch.allclose(b, want_b.detach(), rtol=1e-14, atol=1e-15)
    # the folded network: one Conv LinearNode for conv+bn+mul+div, its bias after the div
    net = from_torch(m, (2, 5, 5))
    assert not any(type(getattr(n, "op", None)).__name__ == "Scale" for n in net.nodes)
    assert net.own_bias("Conv0").name == "truediv"
    x = torch.randn(2, 2, 5, 5, dtype=torch.float64)
    with torch.no_grad():
        assert rel(net(x), m(x)) <= RTOL64


def test_fold_plan_multiplier_alone_adds_no_bias():
    from linop.convert.fold import plan_folds
    from linop.convert.trace import trace

    class Scaled(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(2, 3, 3, bias=False)
            self.m = nn.Parameter(torch.tensor([4.0]))

        def forward(self, x):
            return self.conv(x) * 2.5 / self.m[0]  # an index into a parameter is a constant

    m = Scaled().eval()
    fold = next(iter(plan_folds(trace(m, (2, 5, 5), "f")).values()))
    assert [n.name for n in fold.chain] == ["mul", "truediv"]
    W, b, has_bias = fold.apply(m.conv.weight, None)
    assert not has_bias and torch.equal(b, torch.zeros(3, dtype=torch.float64))
    assert torch.equal(W, m.conv.weight.double() * 2.5 / 4.0)  # a power-of-two ratio: exact


def test_bn_without_running_stats_is_not_folded():
    from linop.convert.fold import plan_folds
    from linop.convert.trace import trace

    m = FoldChain(track=False).eval()
    assert plan_folds(trace(m, (2, 5, 5), "f")) == {}
    with pytest.raises(ConversionError, match=r"fx node 'bn'.*running statistics"):
        from_torch(m, (2, 5, 5))
