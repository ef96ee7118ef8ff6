"""Seed 001 Tables 1-6: the baselines' trainable-parameter counts for every (l_S, l_R).

The "#paras" columns below are copied from seed 001 (all pairs of every table); each preset must
reproduce every entry exactly -- integer counts, so equality is the only tolerance.
"""
from __future__ import annotations

import pytest
import torch

from linop.studies.posttrain.blocks import trainable_parameter_count
from models.baselines import conv2_fc1, conv3_fc2, conv4_fc2, conv5_fc2


def _table(rows: str) -> dict[tuple[int, int], int]:
    """``"l_S l_R count; ..."`` -> {(l_S, l_R): count}."""
    out = {}
    for row in rows.split(";"):
        s, r, n = (int(v) for v in row.split())
        out[(s, r)] = n
    return out


TABLE1 = _table("0 1 52; 0 2 256; 1 2 204; 0 3 2826; 1 3 2774; 2 3 2570")
TABLE2 = _table("0 1 380; 0 2 840; 1 2 460; 0 3 2205; 1 3 1825; 2 3 1365; 0 4 33053; "
                "1 4 32673; 2 4 32213; 3 4 30848; 0 5 34343; 1 5 33963; 2 5 33503; "
                "3 5 32138; 4 5 1290")
TABLE3 = _table("0 1 760; 0 2 2125; 1 2 1365; 0 3 4845; 1 3 4085; 2 3 2720; 0 4 87021; "
                "1 4 86261; 2 4 84896; 3 4 82176; 0 5 112721; 1 5 111961; 2 5 110596; "
                "3 5 107876; 4 5 25700")
TABLE4 = _table("0 1 760; 0 2 3035; 1 2 2275; 0 3 10945; 1 3 10185; 2 3 7910; 0 4 25165; "
                "1 4 24405; 2 4 22130; 3 4 14220; 0 5 394317; 1 5 393557; 2 5 391282; "
                "3 5 383372; 4 5 369152; 0 6 496917; 1 6 496157; 2 6 493882; 3 6 485972; "
                "4 6 471752; 5 6 102600")
# Tables 5 (ImageNette) and 6 (ImageWoof) print identical #paras columns
TABLE5 = TABLE6 = _table(
    "0 1 18760; 0 2 62125; 1 2 43365; 0 3 98445; 1 3 79685; 2 3 36320; 0 4 110970; "
    "1 4 92210; 2 4 48845; 3 4 12525; 0 5 117750; 1 5 98990; 2 5 55625; 3 5 19305; "
    "4 5 6780; 0 6 179318; 1 6 160558; 2 6 117193; 3 6 80873; 4 6 68348; 5 6 61568; "
    "0 7 180608; 1 7 161848; 2 7 118483; 3 7 82163; 4 7 69638; 5 7 62858; 6 7 1290")

CASES = {
    "table1_mnist": (lambda: conv2_fc1((1, 28, 28), 10), TABLE1),
    "table2_cifar10": (lambda: conv3_fc2((3, 32, 32), 10), TABLE2),
    "table3_cifar100": (lambda: conv3_fc2((3, 32, 32), 100), TABLE3),
    "table4_tinyimagenet": (lambda: conv4_fc2((3, 64, 64), 200), TABLE4),
    "table5_imagenette": (lambda: conv5_fc2((3, 224, 224), 10), TABLE5),
    "table6_imagewoof": (lambda: conv5_fc2((3, 224, 224), 10), TABLE6),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_every_pair_matches_the_paper(case):
    build, table = CASES[case]
    net = build()
    L = net.num_layers
    # the table lists every pair 0 <= l_S < l_R <= L, no more, no fewer
    assert set(table) == {(s, r) for r in range(1, L + 1) for s in range(r)}
    got = {pair: trainable_parameter_count(net, *pair) for pair in table}
    assert got == table


def _square_factorisations(counts, c_in):
    """All (channels, kernel) chains with counts[i] = c_i (k_i^2 c_{i-1} + 1)."""
    chains = [((), c_in)]
    for n in counts:
        nxt = []
        for chain, c in chains:
            for k in range(1, 64):
                d = k * k * c + 1
                if d > n:
                    break
                if n % d == 0:
                    nxt.append((chain + ((n // d, k),), n // d))
        chains = nxt
    return [chain for chain, _ in chains]


@pytest.mark.parametrize("counts, fc, classifier, expect", [
    ((760, 2275, 7910, 14220), 369152, 102600, ((10, 5), (25, 3), (35, 3), (45, 3))),
    ((18760, 43365, 36320, 12525, 6780), 61568, 1290,
     ((10, 25), (15, 17), (20, 11), (25, 5), (30, 3))),
])
def test_conv_counts_admit_one_square_architecture(counts, fc, classifier, expect):
    # the derivation of conv4_fc2 / conv5_fc2: classifier = classes (u + 1) gives the hidden
    # width u, fc = u (fan_in + 1) the flattened fan_in = c_last * h * w; among the chains from
    # 3 RGB channels exactly one has c_last dividing fan_in (Table 4 also factors with a 1x1
    # last conv of 395 channels, which no feature map of 720 values can have)
    classes = {102600: 200, 1290: 10}[classifier]
    u = classifier // classes - 1
    fan_in = fc // u - 1
    assert u * (fan_in + 1) == fc
    chains = [ch for ch in _square_factorisations(counts, 3) if fan_in % ch[-1][0] == 0]
    assert chains == [expect]


def test_paper_sizes_forward_shapes():
    torch.manual_seed(0)
    net4 = conv4_fc2()
    assert net4.feature_shape == (45, 4, 4) and net4.pooled == (True, True, True, False)
    assert net4(torch.randn(2, 3, 64, 64)).shape == (2, 200)
    net5 = conv5_fc2()
    assert net5.feature_shape == (30, 4, 4) and net5.pooled == (True,) * 4 + (False,)
    outs = net5.layer_outputs(torch.randn(1, 3, 224, 224))
    assert [tuple(o.shape[1:]) for o in outs[1:]] == [
        (10, 100, 100), (15, 42, 42), (20, 16, 16), (25, 6, 6), (30, 4, 4), (128,), (10,)]


@pytest.mark.parametrize("build", [conv4_fc2, conv5_fc2])
@pytest.mark.parametrize("shape", [(1, 8, 8), (3, 32, 32), (1, 28, 28)])
def test_small_inputs_fall_back_to_small_kernels(build, shape):
    net = build(shape, num_classes=10)
    assert max(net.kernel_sizes) <= 5
    assert net(torch.randn(3, *shape)).shape == (3, 10)


def test_registered_in_train():
    from models.train import MODELS, build_model

    assert MODELS["conv4_fc2"] is conv4_fc2 and MODELS["conv5_fc2"] is conv5_fc2
    net = build_model("conv4_fc2", in_shape=(1, 8, 8), num_classes=10)
    assert net.num_layers == 6
