"""Reference models (seed 000 Tables D.1/D.3/D.4), seed 001 baselines, training, checkpoints."""
from __future__ import annotations

import operator

import pytest
import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn

from models import (CHECKPOINTS_DIR, KConvMFC, build_model, conv2_fc1, conv3_fc2,
                    conv_channel_decreasing, fixup_resnet20, load_checkpoint, load_dataset,
                    resnet20, shipped_checkpoint, vgg7)
from models.resnet20 import BasicBlock
from models.train import evaluate, train


def n_params(m: nn.Module) -> int:
    return sum(p.numel() for p in m.parameters())


def conv_outputs(model: nn.Module, x: torch.Tensor) -> list[tuple[int, ...]]:
    """Shapes of every Conv2d output, in execution order (captured by forward hooks)."""
    shapes = []
    hooks = [m.register_forward_hook(lambda m, i, o: shapes.append(tuple(o.shape[1:])))
             for m in model.modules() if isinstance(m, nn.Conv2d)]
    with torch.no_grad():
        model(x)
    for h in hooks:
        h.remove()
    return shapes


# ----------------------------------------------------------------------------- shapes
@pytest.mark.parametrize("factory", [vgg7, resnet20, fixup_resnet20])
@pytest.mark.parametrize("num_classes,in_channels", [(10, 3), (100, 3), (10, 1)])
def test_reference_forward_shapes(factory, num_classes, in_channels):
    m = factory(num_classes=num_classes, in_channels=in_channels).eval()
    assert m(torch.randn(2, in_channels, 32, 32)).shape == (2, num_classes)


def test_vgg7_feature_maps_table_d1():
    # Table D.1 "Out-ch Feature Maps": Conv0/1 32x32x32, Conv2/3 16x16x64, Conv4/5 8x8x96
    got = conv_outputs(vgg7().eval(), torch.zeros(1, 3, 32, 32))
    assert got == [(32, 32, 32), (32, 32, 32), (64, 16, 16), (64, 16, 16), (96, 8, 8), (96, 8, 8)]


def test_resnet20_feature_maps_table_d3():
    # Table D.3: Conv0..Conv6 32x32x32, Conv7..Conv12 16x16x64 (Conv7 s=2), Conv13..18 8x8x96
    got = conv_outputs(resnet20().eval(), torch.zeros(1, 3, 32, 32))
    assert got == [(32, 32, 32)] * 7 + [(64, 16, 16)] * 6 + [(96, 8, 8)] * 6
    got_fixup = conv_outputs(fixup_resnet20().eval(), torch.zeros(1, 3, 32, 32))
    assert got_fixup == got  # Table D.4 refers to Table D.3 for the shapes


# ----------------------------------------------------------------------------- parameter counts
def test_vgg7_param_count():
    conv = 3 * 3 * (3 * 32 + 32 * 32 + 32 * 64 + 64 * 64 + 64 * 96 + 96 * 96)  # = 203,616
    bn = 2 * (32 + 32 + 64 + 64 + 96 + 96)  # gamma + beta = 768 (b' has 384 = (32+64+96)*2)
    fc = 96 * 10 + 10
    assert conv == 203_616 and n_params(vgg7()) == conv + bn + fc == 205_354
    assert n_params(vgg7(num_classes=100)) == conv + bn + 96 * 100 + 100


def test_resnet20_param_count():
    conv = 9 * (3 * 32                  # Conv0
                + 6 * 32 * 32           # Conv1..Conv6
                + 32 * 64 + 5 * 64 * 64  # Conv7 (s=2) .. Conv12
                + 64 * 96 + 5 * 96 * 96)  # Conv13 (s=2) .. Conv18
    bn = 2 * (7 * 32 + 6 * 64 + 6 * 96)  # 19 BNs
    fc = 96 * 10 + 10
    assert conv == 728_928
    assert n_params(resnet20()) == conv + bn + fc == 732_266


def test_fixup_param_count_and_scalars():
    m = fixup_resnet20()
    conv = 728_928  # same convs as ResNet20, no BN
    biases = 1 + 4 * 9  # B0 + (bias1a, bias1b, bias2a, bias2b) x 9 blocks = 37 (Table D.5)
    scales = 9          # one multiplier M per block
    fc = 96 * 10 + 10 + 1  # FC + the scalar bias in front of it (bias_fc)
    assert n_params(m) == conv + biases + scales + fc == 729_945
    names = [n for n, p in m.named_parameters() if p.numel() == 1]
    conv_biases = [n for n in names if n.split(".")[-1] in
                   ("bias0", "bias1a", "bias1b", "bias2a", "bias2b")]
    assert len(conv_biases) == 37 and sum(n.endswith("scale") for n in names) == 9
    assert not any(isinstance(mod, nn.BatchNorm2d) for mod in m.modules())


def _block_params(net: KConvMFC) -> list[int]:
    return [n_params(b) for b in net.blocks] + [n_params(net.classifier)]


def test_conv2_fc1_matches_seed001_table1_mnist():
    # Table 1 "#paras": (0,1)=52, (0,2)=256, (1,2)=204, (0,3)=2826, (2,3)=2570
    # layer 1 = 2 x (5*5*1 + 1) = 52;  layer 2 = 4 x (5*5*2 + 1) = 204
    # layer 3 = classifier on 4 x 8 x 8 (28 -conv5-> 24 -pool-> 12 -conv5-> 8): 10 x 257 = 2570
    net = conv2_fc1((1, 28, 28))
    assert _block_params(net) == [52, 204, 2570]
    assert net.pooled == (True, False) and net.feature_shape == (4, 8, 8)


def test_conv3_fc2_matches_seed001_tables_2_3():
    # Table 2 (CIFAR-10): 380 = 5(5*5*3+1); 460 = 10(3*3*5+1); 1365 = 15(3*3*10+1);
    # 30848 = 128(15*4*4+1) [32 -c5-> 28 -p-> 14 -c3-> 12 -p-> 6 -c3-> 4]; 1290 = 10(128+1)
    # and (0,5) = 34343 is their sum
    p10 = _block_params(conv3_fc2((3, 32, 32), num_classes=10))
    assert p10 == [380, 460, 1365, 30848, 1290] and sum(p10) == 34343
    # Table 3 (CIFAR-100): 760 = 10*76; 1365 = 15*91; 2720 = 20*136; 82176 = 256*321;
    # 25700 = 100*257; (0,5) = 112721
    p100 = _block_params(conv3_fc2((3, 32, 32), num_classes=100))
    assert p100 == [760, 1365, 2720, 82176, 25700] and sum(p100) == 112721


def test_conv_channel_decreasing_param_count():
    # Fig. 7(b): channels 15, 10, 5:  15(75+1) = 1140, 10(135+1) = 1360, 5(90+1) = 455,
    # FC 128(5*4*4 + 1) = 10368, classifier 10(128 + 1) = 1290
    net = conv_channel_decreasing((3, 32, 32))
    assert _block_params(net) == [1140, 1360, 455, 10368, 1290]
    assert net.conv_channels == (15, 10, 5)


def test_baselines_on_digits_sizes():
    # 8x8: conv2_fc1: 8 -c3-> 6 -pool-> 3 -c3-> 1: 16(9+1)=160, 32(144+1)=4640, 10(32+1)=330
    net = conv2_fc1((1, 8, 8))
    assert net.pooled == (True, False) and _block_params(net) == [160, 4640, 330]
    # conv3_fc2 on 8x8: pooling would leave no room for the next valid convs -> skipped
    net3 = conv3_fc2((1, 8, 8))
    assert net3.pooled == (False, False, False) and net3.feature_shape == (32, 2, 2)
    for f in (conv2_fc1, conv3_fc2, conv_channel_decreasing):
        for shape in ((1, 8, 8), (1, 28, 28), (3, 32, 32)):
            assert f(shape)(torch.zeros(3, *shape)).shape == (3, 10)


def test_kconv_layer_outputs_and_blocks():
    torch.manual_seed(0)
    net = conv3_fc2((3, 32, 32)).double().eval()
    x = torch.randn(2, 3, 32, 32, dtype=torch.float64)
    outs = net.layer_outputs(x)
    assert len(outs) == net.num_layers + 1 == 6
    assert outs[0] is x and torch.equal(outs[-1], net(x))
    assert [tuple(o.shape[1:]) for o in outs[1:]] == [(5, 14, 14), (10, 6, 6), (15, 4, 4),
                                                      (128,), (10,)]
    # tanh bounds every hidden layer output in (-1, 1)
    assert all(o.abs().max() < 1 for o in outs[1:-1])
    blk = net.blocks[0]
    assert [type(m) for m in blk] == [nn.Conv2d, nn.Tanh, nn.MaxPool2d]
    assert blk[2].kernel_size == blk[2].stride == 2


def test_kconv_bad_options():
    with pytest.raises(ValueError, match="activation='gelu'"):
        KConvMFC((1, 8, 8), activation="gelu")
    with pytest.raises(ValueError, match="too small"):
        KConvMFC((1, 8, 8), conv_channels=(4, 4, 4, 4), kernel_size=3)
    with pytest.raises(ValueError, match="kernel_size"):
        KConvMFC((1, 8, 8), conv_channels=(4, 4), kernel_size=(3, 3, 3))
    with pytest.raises(ValueError, match="negative_slope"):
        resnet20(negative_slope=1.5)
    with pytest.raises(ValueError, match="not registered"):
        build_model("vgg19")  # (vgg16 is a zoo model: models.zoo)


# ----------------------------------------------------------------------------- block semantics
def test_resnet20_stage_change_shortcut_is_subsample_plus_zero_channels():
    # With the residual branch silenced (conv2 = 0, BN2 = identity shift 0), a stage-change
    # block must output LeakyReLU(pad(x[:, :, ::2, ::2])) exactly: AvgPool2d(1, 2) is a pure
    # subsampling and the extra channels are zeros (Table D.3 "avg-pool+pad").
    torch.manual_seed(0)
    blk = BasicBlock(32, 64, 2, 0.2).double().eval()
    nn.init.zeros_(blk.conv2.weight)
    x = torch.randn(2, 32, 8, 8, dtype=torch.float64)
    want = F.leaky_relu(torch.cat([x[:, :, ::2, ::2], torch.zeros(2, 32, 4, 4,
                                                                 dtype=torch.float64)], 1), 0.2)
    assert torch.equal(blk(x), want)


def test_resnet20_uses_leaky_relu_slope():
    m = resnet20(negative_slope=0.1)
    acts = [a for a in m.modules() if isinstance(a, nn.LeakyReLU)]
    assert len(acts) == 19 and all(a.negative_slope == 0.1 for a in acts)
    assert resnet20().act0.negative_slope == 0.2


def test_fixup_block_formula():
    # out = relu(conv2(relu(conv1(x + b1a) + b1b) + b2a) * M + b2b + shortcut(x + b1a))
    torch.manual_seed(1)
    m = fixup_resnet20(zero_init=False).double().eval()
    with torch.no_grad():
        for p in m.parameters():
            if p.numel() == 1:
                p.copy_(torch.randn(1, dtype=torch.float64))
    blk = m.layer2[0]  # stage change 32 -> 64, stride 2
    x = torch.randn(2, 32, 8, 8, dtype=torch.float64)
    xa = x + blk.bias1a
    h = F.relu(F.conv2d(xa, blk.conv1.weight, stride=2, padding=1) + blk.bias1b)
    r = F.conv2d(h + blk.bias2a, blk.conv2.weight, padding=1) * blk.scale + blk.bias2b
    sc = torch.cat([xa[:, :, ::2, ::2], torch.zeros_like(xa[:, :, ::2, ::2])], 1)
    # same float64 operations in the same order: bit-identical
    assert torch.equal(blk(x), F.relu(r + sc))
    blk1 = m.layer1[1]  # identity shortcut reads x itself
    y = torch.randn(2, 32, 8, 8, dtype=torch.float64)
    h = F.relu(F.conv2d(y + blk1.bias1a, blk1.conv1.weight, padding=1) + blk1.bias1b)
    r = F.conv2d(h + blk1.bias2a, blk1.conv2.weight, padding=1) * blk1.scale + blk1.bias2b
    assert torch.equal(blk1(y), F.relu(r + y))


def test_fixup_zero_init_blocks_are_relu():
    # Fixup init: conv2 = 0, biases 0, scale 1 => every identity block maps x to relu(x) = x
    # for x >= 0 (the stem output is already >= 0)
    m = fixup_resnet20().eval()
    assert all(torch.count_nonzero(b.conv2.weight) == 0 for b in m.layer1)
    x = torch.rand(2, 32, 8, 8)
    assert torch.equal(m.layer1(x), x)


# ----------------------------------------------------------------------------- fx traceability
_ALLOWED_MODULES = (nn.Conv2d, nn.Linear, nn.BatchNorm2d, nn.ReLU, nn.LeakyReLU, nn.Tanh,
                    nn.AvgPool2d, nn.MaxPool2d, nn.AdaptiveAvgPool2d, nn.Flatten, nn.Identity)
_ALLOWED_FUNCTIONS = {operator.add, operator.mul, F.pad}


@pytest.mark.parametrize("name", ["vgg7", "resnet20", "fixup_resnet20", "conv2_fc1",
                                  "conv3_fc2", "conv_channel_decreasing"])
def test_models_trace_with_fx_using_supported_ops(name):
    kw = {"in_shape": (3, 32, 32)} if name.startswith("conv") else {}
    torch.manual_seed(0)
    m = build_model(name, **kw).double().eval()
    gm = fx.symbolic_trace(m)
    mods = dict(gm.named_modules())
    for node in gm.graph.nodes:
        if node.op == "call_module":
            assert isinstance(mods[node.target], _ALLOWED_MODULES), node.format_node()
        elif node.op == "call_function":
            assert node.target in _ALLOWED_FUNCTIONS, node.format_node()
        elif node.op == "call_method":
            pytest.fail(f"unexpected tensor method {node.format_node()}")
    x = torch.randn(2, 3, 32, 32, dtype=torch.float64)
    assert torch.equal(gm(x), m(x))  # the traced graph is the same computation


# ----------------------------------------------------------------------------- training
def _tiny_digits():
    ds = load_dataset("digits")
    ds.x_train, ds.y_train = ds.x_train[:256], ds.y_train[:256]
    return ds


def test_train_checkpoint_roundtrip_and_determinism(tmp_path):
    ds = _tiny_digits()
    kw = dict(optimizer="adam", weight_decay=0.0, num_threads=1, progress=False, data=ds)
    meta = train("conv2_fc1", "digits", 2, 3e-3, 32, 7, tmp_path / "a.pt", **kw)
    train("conv2_fc1", "digits", 2, 3e-3, 32, 7, tmp_path / "b.pt", **kw)
    ma, meta_a = load_checkpoint(tmp_path / "a.pt")
    mb, _ = load_checkpoint(tmp_path / "b.pt")
    assert not ma.training and meta_a["model"] == "conv2_fc1" and meta_a["seed"] == 7
    assert meta_a["input_shape"] == [1, 8, 8] and meta_a["kwargs"]["num_classes"] == 10
    # same seed, same thread count -> bit-identical weights
    sa, sb = ma.state_dict(), mb.state_dict()
    assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)
    # the stored accuracy is the accuracy of the stored weights
    assert evaluate(ma, ds.x_test, ds.y_test) == meta["test_accuracy"] == meta_a["test_accuracy"]
    # a different seed gives different weights
    train("conv2_fc1", "digits", 1, 3e-3, 32, 8, tmp_path / "c.pt", **kw)
    mc, _ = load_checkpoint(tmp_path / "c.pt")
    assert not torch.equal(mc.state_dict()["blocks.0.0.weight"], sa["blocks.0.0.weight"])


def test_train_bn_model_roundtrip_identical_outputs(tmp_path):
    # BN running statistics must travel with the checkpoint: outputs identical after reload
    ds = _tiny_digits()
    train("vgg7", "digits", 1, 0.05, 64, 0, tmp_path / "v.pt", num_threads=1, progress=False,
          data=ds)
    m, meta = load_checkpoint(tmp_path / "v.pt")
    assert meta["kwargs"] == {"num_classes": 10, "in_channels": 1}
    assert m.bn0.running_var.ne(1).any()  # running stats were updated by training
    m2, _ = load_checkpoint(tmp_path / "v.pt")
    x = ds.x_test[:16]
    with torch.no_grad():
        assert torch.equal(m(x), m2(x))


def test_train_cli(tmp_path):
    from linop.cli import main

    out = tmp_path / "cli.pt"
    rc = main(["train", "--model", "conv2_fc1", "--data", "digits", "--epochs", "1",
               "--optimizer", "adam", "--lr", "0.003", "--threads", "1", "--no-progress",
               "--model-kwargs", '{"activation": "relu"}', "--out", str(out)])
    assert rc == 0
    m, meta = load_checkpoint(out)  # rebuilt from the stored kwargs
    assert m.activation == "relu" and meta["kwargs"]["activation"] == "relu"
    assert isinstance(m.blocks[0][1], nn.ReLU)
    assert 0.0 <= meta["test_accuracy"] <= 1.0 and len(meta["history"]) == 1


def test_train_bad_options(tmp_path):
    with pytest.raises(ValueError, match="optimizer='rmsprop'"):
        train("vgg7", "digits", 1, 0.1, 8, 0, tmp_path / "x.pt", optimizer="rmsprop")
    with pytest.raises(ValueError, match="activation"):
        train("vgg7", "digits", 1, 0.1, 8, 0, tmp_path / "x.pt", activation="tanh",
              progress=False)
    with pytest.raises(FileNotFoundError, match="no file"):
        load_checkpoint(tmp_path / "missing.pt")


# ----------------------------------------------------------------------------- shipped files
SHIPPED = {"vgg7_digits32": "digits32", "resnet20_digits32": "digits32",
           "fixup_resnet20_digits32": "digits32", "conv2_fc1_digits": "digits"}


@pytest.mark.parametrize("name", sorted(SHIPPED))
def test_shipped_checkpoints_reproduce_recorded_accuracy(name):
    path = shipped_checkpoint(name)
    assert path.stat().st_size < 3_000_000
    m, meta = load_checkpoint(path)
    assert meta["data"] == SHIPPED[name]
    ds = load_dataset(meta["data"], normalize=meta["normalize"])
    # recomputed on the fixed test split: the recorded number is the weights' real accuracy
    acc = evaluate(m, ds.x_test, ds.y_test)
    assert acc == meta["test_accuracy"] and acc > 0.9
    assert path.parent == CHECKPOINTS_DIR


def _tf_same_avg_pool(x, k=3, s=2):
    """TensorFlow's 'SAME' average pooling written out from its definition: output size
    ceil(n / s), total padding max((out − 1)·s + k − n, 0) split with the odd pixel AFTER the
    image, each window averaged over its in-image entries only."""
    import numpy as np

    N, C, H, W = x.shape
    oh, ow = -(-H // s), -(-W // s)
    ph, pw = max((oh - 1) * s + k - H, 0), max((ow - 1) * s + k - W, 0)
    t, l = ph // 2, pw // 2
    xp = np.pad(x, ((0, 0), (0, 0), (t, ph - t), (l, pw - l)))
    inside = np.pad(np.ones((H, W)), ((t, ph - t), (l, pw - l)))
    out = np.zeros((N, C, oh, ow))
    for i in range(oh):
        for j in range(ow):
            win = (slice(i * s, i * s + k), slice(j * s, j * s + k))
            out[:, :, i, j] = xp[(...,) + win].sum((2, 3)) / inside[win].sum()
    return out


@pytest.mark.parametrize("hw", [(32, 32), (16, 16), (12, 20), (8, 8)])  # even sizes: see vgg7's docstring
def test_vgg7_tf_pool_alignment_is_tf_same_pooling(hw):
    """pool_alignment="tf" is TF 'SAME' average pooling exactly (float64: one sum of ≤ 9
    values and one division per window, so agreement to a few ulps); "torch" is shifted by a
    pixel and differs."""
    from models.vgg7 import avg_pool_3x3_s2

    x = torch.randn(2, 3, *hw, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    ref = torch.from_numpy(_tf_same_avg_pool(x.numpy()))
    assert torch.allclose(avg_pool_3x3_s2("tf")(x), ref, rtol=0, atol=1e-15)
    torch_aligned = avg_pool_3x3_s2("torch")(x)
    assert torch_aligned.shape == ref.shape and not torch.allclose(torch_aligned, ref)
    with pytest.raises(ValueError, match="pool_alignment='same'"):
        avg_pool_3x3_s2("same")


def test_vgg7_tf_alignment_converts_and_reconstructs_exactly():
    """The TF-aligned VGG7 is still piecewise linear with fixed pooling operators: the
    equivalent network's forward equals torch and ĉ = <[x; x_b], H> = c for every unit
    (float64, 1e-12 of max|c|: sums of ~10^3 rounded products)."""
    import linop
    from linop.hypersurface import reconstructed_activations

    torch.manual_seed(0)
    model = build_model("vgg7", num_classes=10, pool_alignment="tf").double().eval()
    assert model.pool_alignment == "tf" and model.pool1.ceil_mode and not model.pool1.count_include_pad
    net = linop.from_torch(model, (3, 32, 32))
    x = torch.rand(3, 32, 32, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    assert torch.allclose(net.forward(x.unsqueeze(0)), model(x.unsqueeze(0)), rtol=1e-12, atol=1e-12)
    for layer, (c, chat) in reconstructed_activations(net, x, dtype=torch.float64).items():
        assert float((c - chat).abs().max()) <= 1e-12 * float(c.abs().max()), layer
