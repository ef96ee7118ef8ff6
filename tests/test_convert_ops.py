"""Converter rules for the ops of issue 13 (uneven adaptive average and max pooling,
upsampling incl. bicubic, 1-D max pooling, conv-transpose, spatial padding, padded convs, channel shuffle; ReLU6 / Hardtanh / Hardsigmoid /
clamp / maximum / minimum, whose breakpoints are slices of ``x_b``) and the honest refusals.

Each op is checked inside a small piecewise-linear model, float64, three ways (:func:`kit_forms.check_network`):

1. forward == torch: norm-wise relative error <= 1e-12.  The network applies the same maps
   through different roundings (BN folded into weights, biases from ``x_b``, sparse taps), a
   few ulps per layer: eps = 2.2e-16 times a generous 4500 for depth x accumulation length.
2. ``<[x; x_b], H> = c`` for every unit of every unit layer
   (:func:`linop.hypersurface.reconstructed_activations`): max |c − ĉ| <= 1e-12 · max |c| —
   ĉ sums the same products as c in another order, so they differ by ~n·eps of the summed
   magnitudes (n ≲ 10^3 products along a path); a wrong tap / mask / bias slice is of the
   order of c itself.
3. rows of H (``linearise(net, x).operator(layer)``, applied adjointly to unit selectors) ==
   torch.func.jacrev / jacfwd rows of the extended function ``f(x, x_b)`` for sampled units
   of every unit layer, relative to each row's largest entry <= 1e-12 (same argument as 2).

The tests fail on a wrong tap table, a wrong fold (e.g. a BN folded along the wrong axis of a
transposed kernel), a bias missing from ``x_b`` (2 and 3 then disagree) or a refusal that
names the wrong kind.
"""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from linop.convert import ConversionError, from_torch
from linop.convert.errors import NOT_PIECEWISE_LINEAR, UNSUPPORTED
from linop.network import BiasNode, LinearNode
from models.zoo import randomise  # noqa: F401  (He init, random BN statistics, eval, float64)

from kit_forms import RTOL, check_network  # see module docstring


pytestmark = pytest.mark.usefixtures("one_thread")


def ops(net) -> list[str]:
    return [type(n.op).__name__ for n in net.nodes if isinstance(n, LinearNode)]


class Seq(nn.Module):
    """conv -> relu -> op -> conv -> relu -> flatten -> linear (a unit layer on either side)."""

    def __init__(self, op: nn.Module | None, c_mid: int = 4, c_op_out: int | None = None,
                 fn=None):
        super().__init__()
        self.c1 = nn.Conv2d(3, c_mid, 3, padding=1)
        self.op, self.fn = op, fn
        self.c2 = nn.Conv2d(c_op_out or c_mid, 5, 3, padding=1)
        self.fc = nn.LazyLinear(3)

    def forward(self, x):
        x = torch.relu(self.c1(x))
        x = self.op(x) if self.op is not None else self.fn(x)
        return self.fc(torch.relu(self.c2(x)).flatten(1))


def seq(op=None, shape=(3, 6, 6), fn=None, **kw) -> nn.Module:
    m = Seq(op, fn=fn, **kw)
    m(torch.zeros((1,) + shape))  # materialise the lazy linear
    return randomise(m)


# ---------------------------------------------------------------------------- resampling
@pytest.mark.parametrize("hw, osz", [((6, 6), (4, 4)), ((5, 7), (3, 2)), ((3, 3), (7, 7)),
                                     ((1, 1), (7, 7)), ((6, 6), (None, 4))])
def test_adaptive_avg_pool_uneven(hw, osz):
    net = check_network(seq(nn.AdaptiveAvgPool2d(osz), (3,) + hw), (3,) + hw)
    assert "AdaptiveAvgPool2d" in ops(net)


def test_adaptive_avg_pool_even_keeps_ordinary_pools():
    assert "AvgPool2d" in ops(check_network(seq(nn.AdaptiveAvgPool2d(3)), (3, 6, 6)))
    assert "GlobalAvgPool2d" in ops(from_torch(seq(nn.AdaptiveAvgPool2d(1)), (3, 6, 6)))
    net = check_network(seq(fn=lambda x: F.adaptive_avg_pool2d(x, (4, 5))), (3, 6, 6))
    assert "AdaptiveAvgPool2d" in ops(net)


@pytest.mark.parametrize("kw", [
    {"scale_factor": 2, "mode": "nearest"}, {"size": (9, 7), "mode": "nearest"},
    {"scale_factor": 1.5, "mode": "nearest-exact"}, {"scale_factor": 2, "mode": "bilinear"},
    {"scale_factor": 2, "mode": "bilinear", "align_corners": True},
    {"size": (8, 11), "mode": "bilinear", "align_corners": False}, {"size": (3, 4), "mode": "area"},
])
def test_upsample_module_and_interpolate(kw):
    net = check_network(seq(nn.Upsample(**kw), (3, 5, 6)), (3, 5, 6))
    assert "Upsample2d" in ops(net)
    check_network(seq(fn=lambda x: F.interpolate(x, **kw), shape=(3, 5, 6)), (3, 5, 6), n_units=3,
           every_unit=False)


def test_upsample_aliases():
    check_network(seq(nn.UpsamplingBilinear2d(scale_factor=2), (3, 4, 4)), (3, 4, 4))
    check_network(seq(nn.UpsamplingNearest2d(size=(7, 9)), (3, 4, 4)), (3, 4, 4))


@pytest.mark.parametrize("kw", [
    {"scale_factor": 0.5, "mode": "bilinear", "antialias": True},
    {"size": (4, 3), "mode": "bicubic", "antialias": True, "align_corners": True},
    {"scale_factor": 2, "mode": "bilinear", "antialias": True},
])
def test_interpolate_antialias(kw):
    """antialias=True: torch's normalised, scale-widened filter taps (Upsample2d)."""
    net = check_network(seq(fn=lambda x: F.interpolate(x, **kw), shape=(3, 9, 7)), (3, 9, 7), n_units=None)
    assert "Upsample2d" in ops(net)


def test_interpolate_refusals():
    """1-D interpolation has no rule: refused as not implemented, naming the shape."""
    model = Pool1d(lambda x: F.interpolate(x, scale_factor=2, mode="linear"))
    with pytest.raises(ConversionError, match=r"\(N, C, H, W\)") as e:
        from_torch(model.eval(), (2, 13))
    assert e.value.problems[0].kind == UNSUPPORTED


# ---------------------------------------------------------------------------- conv-transpose
class Decoder(nn.Module):
    def __init__(self, bn: bool, **kw):
        super().__init__()
        self.c1 = nn.Conv2d(3, 4, 3, stride=2, padding=1)
        self.up = nn.ConvTranspose2d(4, 6, 3, **kw)
        self.bn = nn.BatchNorm2d(6) if bn else nn.Identity()
        self.c2 = nn.Conv2d(6, 2, 1)

    def forward(self, x):
        return self.c2(F.leaky_relu(self.bn(self.up(torch.relu(self.c1(x)))), 0.1))


@pytest.mark.parametrize("kw", [
    {"stride": 2, "padding": 1, "output_padding": 1}, {"stride": 2, "groups": 2, "bias": False},
    {"stride": 1, "padding": 2, "dilation": 2}, {"stride": 3, "padding": 1, "output_padding": 2},
])
@pytest.mark.parametrize("bn", [False, True])
def test_conv_transpose_is_a_unit_layer(kw, bn):
    net = check_network(randomise(Decoder(bn, **kw)), (3, 7, 7), n_units=None)
    assert net.unit_layers == ["Conv0", "Conv1", "Conv2"]
    assert type(net.unit_node("Conv1").op).__name__ == "ConvTranspose2d"
    has_bias = bn or kw.get("bias", True)
    assert ("Conv1.bias" in net.bias_slices) == has_bias
    assert not any(type(n.op).__name__ == "Scale" for n in net.nodes
                   if isinstance(n, LinearNode))  # the BN folded (Eq. 7)


# ---------------------------------------------------------------------------- padding
@pytest.mark.parametrize("mod", [
    nn.ZeroPad2d((1, 2, 0, 3)), nn.ReflectionPad2d((2, 1, 1, 2)), nn.ReplicationPad2d(2),
    nn.CircularPad2d((1, 0, 2, 3)), nn.ConstantPad2d((1, 1, 2, 0), 0.7),
])
def test_pad_modules(mod):
    net = check_network(seq(mod, (3, 5, 6)), (3, 5, 6), n_units=None)
    assert "Pad2d" in ops(net)
    if isinstance(mod, nn.ConstantPad2d) and mod.value:
        assert any(n.bias_name == "op.value" for n in net.nodes if isinstance(n, BiasNode))


@pytest.mark.parametrize("pad, kw", [
    ((1, 2, 3, 0), {"mode": "reflect"}), ((2, 2, 1, 1), {"mode": "replicate"}),
    ((1, 1, 1, 1), {"mode": "circular"}), ((1, 0, 0, 2), {"value": -0.3}),
    ((0, 0, 0, 0, 1, 2), {}), ((1, 1, 0, 0, 2, 0), {}),
])
def test_functional_pad(pad, kw):
    c = 4 + (pad[4] + pad[5] if len(pad) == 6 else 0)
    check_network(seq(fn=lambda x: F.pad(x, pad, **kw), shape=(3, 5, 6), c_op_out=c), (3, 5, 6),
           n_units=None)


@pytest.mark.parametrize("mode", ["reflect", "replicate", "circular"])
def test_conv_padding_modes(mode):
    m = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1, padding_mode=mode), nn.BatchNorm2d(4),
                      nn.ReLU(), nn.Conv2d(4, 3, (3, 2), padding="same", padding_mode=mode),
                      nn.ReLU(), nn.Conv2d(3, 2, 3, stride=2, padding=(2, 1), padding_mode=mode))
    net = check_network(randomise(m), (3, 6, 7), n_units=None)
    assert net.unit_layers == ["Conv0", "Conv1", "Conv2"]  # the pads are not unit layers
    assert ops(net).count("Pad2d") == 3
    assert all(net.unit_node(l).op.padding == (0, 0, 0, 0) if len(net.unit_node(l).op.padding) == 4
               else tuple(net.unit_node(l).op.padding) == (0, 0) for l in net.unit_layers)


# ---------------------------------------------------------------------------- shuffle, identity
@pytest.mark.parametrize("fn", [nn.ChannelShuffle(2), lambda x: torch.channel_shuffle(x, 4)])
def test_channel_shuffle(fn):
    net = check_network(seq(fn if isinstance(fn, nn.Module) else None, (3, 4, 4), fn=fn, c_mid=8),
                 (3, 4, 4))
    assert "ChannelShuffle" in ops(net)


@pytest.mark.parametrize("op, c_out, kind", [
    (nn.PixelUnshuffle(2), 16, "Polyphase"),
    (nn.PixelShuffle(2), 1, "AdjointOperator"),
    (lambda x: F.pixel_unshuffle(x, 2), 16, "Polyphase"),
    (lambda x: F.pixel_shuffle(x, 2), 1, "AdjointOperator"),
])
def test_pixel_shuffle_and_unshuffle(op, c_out, kind):
    """Space-to-depth is the polyphase permutation Π, depth-to-space its adjoint (= inverse)."""
    mod = op if isinstance(op, nn.Module) else None
    net = check_network(seq(mod, (3, 4, 4), fn=None if mod is not None else op, c_mid=4, c_op_out=c_out),
                        (3, 4, 4))
    assert kind in ops(net)


class Head(nn.Module):
    """Linear -> BatchNorm1d -> Dropout -> ReLU -> Identity -> Linear (BN folds)."""

    def __init__(self):
        super().__init__()
        self.c = nn.Conv2d(2, 3, 3)
        self.net = nn.Sequential(nn.Flatten(), nn.Identity(), nn.Dropout(0.3), nn.Linear(12, 6),
                                 nn.BatchNorm1d(6), nn.Dropout(), nn.ReLU(), nn.Identity(),
                                 nn.Linear(6, 2))

    def forward(self, x):
        return self.net(F.dropout(torch.relu(self.c(x)), 0.2, training=self.training))


def test_identity_dropout_and_bn1d_after_linear():
    net = check_network(randomise(Head()), (2, 4, 4), n_units=None)
    assert net.unit_layers == ["Conv0", "FC0", "FC1"]
    assert ops(net).count("Scale") == 0  # BatchNorm1d folded into FC0 (Eq. 7)


def test_clamp_min_zero_is_relu():
    net = check_network(seq(fn=lambda x: x.clamp(min=0) - 0.2, shape=(3, 4, 4)), (3, 4, 4))
    assert not any("breakpoint" in k for k in net.bias_slices)  # a zero bound is no bias


# ---------------------------------------------------------------------------- breakpoints
T_LO = torch.tensor([-0.5, 0.25, 1.0], dtype=torch.float64).reshape(3, 1, 1)  # per-channel
T_HI = T_LO + 1.5
# every bound used below, so the input puts units exactly at each breakpoint
KINKS = (-3.0, -1.0, -0.5, 0.0, 0.25, 1.0, 1.75, 2.0, 2.5, 3.0, 6.0)


class Twice(nn.Module):
    """``op`` on the input itself (values set exactly at its breakpoints), then a conv, ``op``
    again on the conv's output, a conv, ReLU and a linear."""

    def __init__(self, op: nn.Module | None = None, fn=None):
        super().__init__()
        self.op, self.fn = op, fn
        self.c1, self.c2 = nn.Conv2d(3, 3, 3, padding=1), nn.Conv2d(3, 4, 3, padding=1)
        self.fc = nn.Linear(4 * 6 * 6, 3)

    def forward(self, x):
        f = self.op if self.op is not None else self.fn
        return self.fc(torch.relu(self.c2(f(self.c1(f(x))))).flatten(1))


def kink_inputs(seed: int = 0) -> torch.Tensor:
    """Sample 0: every value of :data:`KINKS`, 1e-3 either side of it and ±8, in each channel
    (shuffled); sample 1: 4·N(0, 1), so that the second application crosses the bounds."""
    g = torch.Generator().manual_seed(seed)
    k = torch.tensor(KINKS, dtype=torch.float64)
    vals = torch.cat([k, k - 1e-3, k + 1e-3, torch.tensor([-8.0, 8.0], dtype=torch.float64)])
    x0 = torch.stack([vals[torch.randperm(36, generator=g) % vals.numel()] for _ in range(3)])
    return torch.stack([x0.reshape(3, 6, 6), 4 * torch.randn((3, 6, 6), generator=g,
                                                             dtype=torch.float64)])


# (op module, fn, slices of x_b it must add: sign + name suffix -> values)
_LO = {"-breakpoint_lo": (-T_LO).flatten().tolist(), "+breakpoint_lo": T_LO.flatten().tolist()}
BREAKPOINT_FORMS = {
    "nn.ReLU6": (nn.ReLU6(), None, {"-breakpoint_hi": [-6.0]}),
    "nn.ReLU6_inplace": (nn.ReLU6(inplace=True), None, {"-breakpoint_hi": [-6.0]}),
    "F.relu6": (None, F.relu6, {"-breakpoint_hi": [-6.0]}),
    "nn.Hardtanh": (nn.Hardtanh(-0.5, 2.0), None,
                    {"-breakpoint_lo": [0.5], "+breakpoint_lo": [-0.5], "-breakpoint_hi": [-2.0]}),
    "F.hardtanh": (None, F.hardtanh, {"-breakpoint_hi": [-1.0]}),
    "F.hardtanh_lo_hi": (None, lambda x: F.hardtanh(x, 0.25, 3.0), {"-breakpoint_hi": [-3.0]}),
    "F.hardtanh_": (None, lambda x: F.hardtanh_(x.clone(), -1.0, 2.5), {"-breakpoint_hi": [-2.5]}),
    "nn.Hardsigmoid": (nn.Hardsigmoid(), None, {"+offset": [3.0], "-breakpoint_hi": [-6.0]}),
    "F.hardsigmoid": (None, F.hardsigmoid, {"-breakpoint_hi": [-6.0]}),
    "torch.clamp": (None, lambda x: torch.clamp(x, -0.5, 2.0), {"-breakpoint_hi": [-2.0]}),
    "torch.clamp_min": (None, lambda x: torch.clamp(x, min=1.0), {"-breakpoint_lo": [-1.0]}),
    "torch.clamp_max": (None, lambda x: torch.clamp(x, max=0.25), {"-breakpoint_hi": [-0.25]}),
    "x.clamp": (None, lambda x: x.clamp(-1.0, 1.0), {"-breakpoint_hi": [-1.0]}),
    "x.clamp_min": (None, lambda x: x.clamp(min=-0.5), {"-breakpoint_lo": [0.5]}),
    "x.clamp_max": (None, lambda x: x.clamp(max=2.0), {"-breakpoint_hi": [-2.0]}),
    "x.clip": (None, lambda x: x.clip(0.0, 6.0), {"-breakpoint_hi": [-6.0]}),
    "x.clip_min": (None, lambda x: x.clip(min=0.25), {"-breakpoint_lo": [-0.25]}),
    "x.clip_max": (None, lambda x: x.clip(max=1.75), {"-breakpoint_hi": [-1.75]}),
    "torch.clip": (None, lambda x: torch.clip(x, max=3.0, min=-3.0), {"-breakpoint_hi": [-3.0]}),
    "clamp_min_fn": (None, lambda x: torch.clamp_min(x, 2.0), {"-breakpoint_lo": [-2.0]}),
    "x.clamp_max_method": (None, lambda x: x.clamp_max(1.0), {"-breakpoint_hi": [-1.0]}),
    "x.clamp_": (None, lambda x: (x + 0.0).clamp_(min=-1.0, max=1.75), {"-breakpoint_hi": [-1.75]}),
    "clamp_per_channel": (None, lambda x: torch.clamp(x, T_LO, T_HI),
                          {**_LO, "-breakpoint_hi": (-T_HI).flatten().tolist()}),
    "clamp_min_gt_max": (None, lambda x: torch.clamp(x, 2.0, -0.5), {"-breakpoint_hi": [0.5]}),
    "torch.maximum": (None, lambda x: torch.maximum(x, T_LO), _LO),
    "torch.maximum_const_first": (None, lambda x: torch.maximum(T_LO, x), _LO),
    "x.maximum_scalar_tensor": (None, lambda x: x.maximum(torch.tensor(1.0, dtype=torch.float64)),
                                {"-breakpoint_lo": [-1.0]}),
    "torch.minimum": (None, lambda x: torch.minimum(x, T_HI),
                      {"-breakpoint_hi": (-T_HI).flatten().tolist()}),
    "x.minimum_full_shape": (None, lambda x: x.minimum(torch.full((3, 6, 6), 0.25).double()),
                             {"-breakpoint_hi": [-0.25] * 108}),
    "maximum_of_two_tensors": (None, lambda x: torch.maximum(x, 0.5 * x), {}),
    "minimum_of_two_tensors": (None, lambda x: torch.minimum(-1.0 * x, x), {}),
}


@pytest.mark.parametrize("form", list(BREAKPOINT_FORMS))
def test_breakpoint_forms_are_exact(form):
    """Forward, ``<[x; x_b], H> = c`` on every unit and H == jacfwd rows with units exactly at,
    and 1e-3 either side of, every breakpoint; each constant bound is a slice of ``x_b``."""
    op, fn, want = BREAKPOINT_FORMS[form]
    net = check_network(randomise(Twice(op, fn)), (3, 6, 6), inputs=kink_inputs())
    assert net.unit_layers == ["Conv0", "Conv1", "FC"]  # the rewrite adds no unit layer
    kinds = {n.kind for n in net.nodes if hasattr(n, "kind")}
    assert kinds <= {"relu"}, kinds  # only ReLUs: the network is piecewise linear
    xb = net.x_b
    for suffix, vals in want.items():
        hits = [k for k in net.bias_slices
                if k.endswith(suffix[1:]) and k.startswith("-") == (suffix[0] == "-")]
        assert hits, (suffix, list(net.bias_slices))
        for k in hits:  # the same value at every application (two fx nodes, or one module)
            assert xb[net.bias_slices[k]].tolist() == vals, (k, xb[net.bias_slices[k]])
    if not want:  # bounds that are network tensors add sums, no slice
        assert not any("breakpoint" in k for k in net.bias_slices)


def test_breakpoint_lives_in_x_b():
    """``relu6`` with its breakpoint slice of ``x_b`` set to −1e300 is ``relu``: the 6 enters the
    network only through ``x_b`` (one slice, shared by the two calls of the module)."""
    m6, m0 = randomise(Twice(nn.ReLU6())), randomise(Twice(nn.ReLU()))
    net = from_torch(m6, (3, 6, 6))
    assert [k for k in net.bias_slices if "breakpoint" in k] == ["-op.breakpoint_hi"]
    xb = net.x_b.clone()
    xb[net.bias_slices["-op.breakpoint_hi"]] = -1e300
    x = kink_inputs()
    got = net.run(x, x_b=xb, keep=[net.output])[net.output]
    with torch.no_grad():
        want = m0(x)
    assert float((got - want).norm() / want.norm()) <= RTOL  # same maps as in check_network


def test_breakpoint_refusals():
    with pytest.raises(ValueError, match="min is NaN"):
        from_torch(seq(fn=lambda x: x.clamp(min=float("nan"))), (3, 6, 6))
    with pytest.raises(ConversionError, match="in-place op on 'x', which is read again"):
        from_torch(Twice(fn=lambda x: x.clamp_(0.0, 1.0) + x).double().eval(), (3, 6, 6))
    net = from_torch(seq(fn=lambda x: x.clamp(-math.inf, 2.0)), (3, 6, 6))
    assert [k for k in net.bias_slices if "breakpoint" in k] == ["-clamp.breakpoint_hi"]


# ---------------------------------------------------------------------------- refusals
class Mixed(nn.Module):
    """Every kind of refusal in one model."""

    def __init__(self):
        super().__init__()
        self.c = nn.Conv2d(3, 4, 3, padding=1)
        self.gelu, self.ln, self.gn = nn.GELU(), nn.LayerNorm([4, 6, 6]), nn.GroupNorm(2, 4)
        self.r6, self.hs, self.mish = nn.ReLU6(), nn.Hardswish(), nn.Mish()
        self.fc = nn.Linear(144, 3)

    def forward(self, x):
        x = self.gelu(self.c(x))
        x = F.silu(self.ln(x))
        x = self.r6(self.gn(x))
        x = F.elu(self.hs(x)) + F.softplus(self.mish(x))
        x = torch.clamp(F.hardtanh(x), -1, 2)  # piecewise linear: converted
        x = torch.flip(torch.cumsum(x, 1), [3])
        x = F.group_norm(F.layer_norm(x, [6]), 1)
        y = self.fc(x.flatten(1))
        return torch.softmax(y, -1) + F.softmax(y, 1)


def test_refusals_list_every_op_by_kind():
    with pytest.raises(ConversionError) as e:
        from_torch(Mixed().eval(), (3, 6, 6))
    kinds = {}
    for p in e.value.problems:
        kinds.setdefault(p.kind, []).append(p.node)
    assert sorted(kinds[NOT_PIECEWISE_LINEAR]) == sorted(
        ["gelu", "ln", "silu", "gn", "hs", "elu", "mish", "softplus", "layer_norm",
         "group_norm", "softmax", "softmax_1"])
    assert sorted(kinds[UNSUPPORTED]) == ["cumsum", "flip"]  # not r6, hardtanh, clamp
    msg = str(e.value)
    i, j = msg.index("12 not piecewise linear"), msg.index("2 not implemented (no rule")
    assert i < j and "no hypersurface H" in msg[i:j] and "no hypersurface H" not in msg[j:]
    assert "flip" in msg[j:]


def test_single_refusal_keeps_its_reason():
    with pytest.raises(ConversionError, match=r"(?s)1 not piecewise linear.*no hypersurface H "
                                              r"reproduces c exactly.*SiLU is smooth"):
        from_torch(nn.Sequential(nn.Conv2d(1, 2, 3), nn.SiLU()).eval(), (1, 5, 5))


# ---------------------------------------------------------------------------- ShuffleNet forms
def tv_channel_shuffle(x, groups: int):
    """torchvision's ``channel_shuffle`` (view / transpose / contiguous / view)."""
    b, c, h, w = x.size()
    x = x.view(b, groups, c // groups, h, w)
    x = torch.transpose(x, 1, 2).contiguous()
    return x.view(b, -1, h, w)


class ShuffleUnit(nn.Module):
    """ShuffleNet-V2's stride-1 unit: ``chunk`` the channels, transform one half, concat,
    torchvision's channel shuffle; then a channel slice and a split."""

    def __init__(self):
        super().__init__()
        self.c0 = nn.Conv2d(3, 8, 3, padding=1)
        self.b = nn.Sequential(nn.Conv2d(4, 4, 1), nn.BatchNorm2d(4), nn.ReLU(),
                               nn.Conv2d(4, 4, 3, padding=1, groups=4), nn.Conv2d(4, 4, 1),
                               nn.ReLU())
        self.c1 = nn.Conv2d(5, 2, 1)

    def forward(self, x):
        x = torch.relu(self.c0(x))
        x1, x2 = x.chunk(2, dim=1)
        y = tv_channel_shuffle(torch.cat([x1, self.b(x2)], 1), 2)
        _, b = torch.split(y, [3, 5], dim=1)
        return self.c1(b + y[:, 2:7])


def test_shufflenet_stride1_unit_forms():
    net = check_network(randomise(ShuffleUnit()), (3, 5, 5), n_units=None)
    kinds = ops(net)
    assert "ChannelShuffle" in kinds and kinds.count("AdjointOperator") >= 2


# ---------------------------------------------------------------------------- 1-D
class Net1d(nn.Module):
    def __init__(self):
        super().__init__()
        self.c0 = nn.Conv1d(2, 4, 3, padding=1)
        self.bn0 = nn.BatchNorm1d(4)
        self.pool = nn.AvgPool1d(3, 2, padding=1, count_include_pad=False)
        self.c1 = nn.Conv1d(4, 6, 3, stride=2, dilation=2, groups=2, padding=2, bias=False)
        self.bn1 = nn.BatchNorm1d(6)
        self.fc = nn.Linear(6 * 2, 3)

    def forward(self, x):
        x = self.pool(torch.relu(self.bn0(self.c0(x))))
        x = F.leaky_relu(self.bn1(self.c1(x)), 0.2)
        return self.fc(F.avg_pool1d(x, 2, ceil_mode=True).flatten(1))


def test_conv1d_bn1d_avgpool1d():
    net = check_network(randomise(Net1d()), (2, 13), n_units=None)
    assert net.unit_layers == ["Conv0", "Conv1", "FC"]
    assert ops(net).count("Scale") == 0  # both BatchNorm1d fold into their Conv1d (Eq. 7)
    assert ops(net).count("AvgPool1d") == 2


# ---------------------------------------------------------------------------- MaxPool1d
class Pool1d(nn.Module):
    """conv1d -> relu -> 1-D max pool -> conv1d -> FC: the pool between two unit layers."""

    def __init__(self, pool):
        super().__init__()
        self.c1, self.pool, self.c2 = nn.Conv1d(2, 4, 3, padding=1), pool, nn.Conv1d(4, 3, 3)
        self.fc = nn.LazyLinear(2)

    def forward(self, x):
        return self.fc(self.c2(self.pool(F.relu(self.c1(x)))).flatten(1))


@pytest.mark.parametrize("pool", [
    nn.MaxPool1d(2), nn.MaxPool1d(3, 2, 1), nn.MaxPool1d(3, 2, 1, ceil_mode=True),
    nn.MaxPool1d(2, 1, dilation=2),
    lambda x: F.max_pool1d(x, 3, stride=2, padding=1, ceil_mode=True)])
def test_max_pool_1d(pool):
    """A MaxPoolNode on the (C, 1, L) view, UnitAxis in and out: exact (module docstring)."""
    model = Pool1d(pool)
    model(torch.zeros(1, 2, 13))  # materialise the lazy FC
    net = check_network(randomise(model, seed=3), (2, 13), n_units=None)
    assert {"UnitAxis", "MaxPoolNode"} <= set(ops(net)) | {type(n).__name__ for n in net.nodes}


# ---------------------------------------------------------------------------- uneven adaptive max
@pytest.mark.parametrize("hw, osz", [((6, 6), (4, 4)), ((5, 7), (3, 2)), ((3, 3), (7, 7)),
                                     ((7, 5), (None, 3)), ((5, 5), 1)])
def test_adaptive_max_pool_uneven(hw, osz):
    """Uneven (overlapping / repeated) windows: the AdaptiveWindows gather + a max pool."""
    shape = (3,) + hw
    for m in (seq(nn.AdaptiveMaxPool2d(osz), shape),
              seq(fn=lambda x: F.adaptive_max_pool2d(x, osz), shape=shape)):
        net = check_network(m, shape, n_units=None)
        uneven = any(h % o for h, o in zip(hw, (osz, osz) if isinstance(osz, int) else
                                           tuple(h if o is None else o for h, o in zip(hw, osz))))
        assert ("AdaptiveWindows" in ops(net)) == uneven


def test_adaptive_windows_gather_is_torchs_windows():
    """Every K_h x K_w block of the gather holds exactly the inputs of torch's window (a set:
    max over it equals torch's adaptive max for any input, ties included)."""
    from linop.operators.resample import AdaptiveWindows

    C, H, W, osz = 2, 7, 5, (3, 4)
    g = AdaptiveWindows((C, H, W), osz)
    kh, kw = g.kernel_size
    x = torch.arange(C * H * W, dtype=torch.float64).reshape(1, C, H, W)
    blocks = g.apply(x).reshape(C, osz[0], kh, osz[1], kw)
    for i in range(osz[0]):
        for j in range(osz[1]):
            s, e = (i * H) // osz[0], -((-(i + 1) * H) // osz[0])
            t, f = (j * W) // osz[1], -((-(j + 1) * W) // osz[1])
            want = set(x[0, :, s:e, t:f].reshape(C, -1)[0].tolist())
            assert set(blocks[0, i, :, j, :].reshape(-1).tolist()) == want


# ---------------------------------------------------------------------------- bicubic
@pytest.mark.parametrize("kw", [
    {"scale_factor": 2, "mode": "bicubic"},
    {"scale_factor": 2, "mode": "bicubic", "align_corners": True},
    {"size": (7, 4), "mode": "bicubic"},
    {"scale_factor": 0.6, "mode": "bicubic", "align_corners": False},
    {"scale_factor": 1.7, "mode": "bicubic", "recompute_scale_factor": True}])
def test_bicubic_interpolate(kw):
    check_network(seq(fn=lambda x: F.interpolate(x, **kw), shape=(3, 5, 6)), (3, 5, 6), n_units=None)


def test_bicubic_upsample_module():
    net = check_network(seq(nn.Upsample(scale_factor=2, mode="bicubic", align_corners=True), (3, 4, 4)),
                 (3, 4, 4))
    assert "Upsample2d" in ops(net)
