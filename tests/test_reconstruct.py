"""Reverse pass of seed 001 §3: inverse steps (linop.reverse.steps) and linop.reconstruct.

Everything is float64.  Tolerances: a reverse step that is exact in exact arithmetic
(inverse activation, copy-back, MDP solve) is checked to ~1e-10 relative — a few thousand
ulps, the accumulated rounding of the small dense / sparse solves and of atanh near its
poles — or bit for bit where no arithmetic happens (copies, unchanged samples).
"""
from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given
from hypothesis import strategies as st
from torch import nn

from linop.reverse import steps as inverse
from linop.convert import from_torch
from linop.network import AddNode, CatNode, EquivalentNetwork, InputNode, LinearNode
from linop.operators import AvgPool2d, Linear
from linop.reverse.walk import reconstruct, resolve_to_layer
from linop.studies.reconstruct import plot_discrepancy

torch.set_num_threads(1)
DT = torch.float64
EXACT = 1e-10  # relative tolerance of an exact step (see module docstring)


# ----------------------------------------------------------------------------- helpers
def _net(module: nn.Module, shape) -> EquivalentNetwork:
    return from_torch(module.eval(), shape, dtype=DT)


def _mlp(act: nn.Module, widths=(12, 8, 6, 4), seed=0, scale=1.0, bias=True) -> nn.Module:
    torch.manual_seed(seed)
    layers = []
    for i, (a, b) in enumerate(zip(widths[:-1], widths[1:])):
        lin = nn.Linear(a, b).double()
        with torch.no_grad():
            lin.weight.mul_(scale)
            if not bias:
                lin.bias.zero_()
        layers.append(lin)
        if i < len(widths) - 2:
            layers.append(act)
    return nn.Sequential(*layers).double()


def _convnet(act: nn.Module, seed=0) -> nn.Module:
    """conv 3->2 (valid 3x3, contracts: MDP) + act + maxpool 2 + flatten + FC 8->3 (MDP)."""
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Conv2d(3, 2, 3), act, nn.MaxPool2d(2), nn.Flatten(), nn.Linear(8, 3)
    ).double()


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm().clamp_min(1e-300))


def _wrong_labels(logits: torch.Tensor) -> torch.Tensor:
    """A label that is not the argmax for every sample (the embedding must change it)."""
    return (logits.argmax(1) + 1) % logits.shape[1]


def _linear_nodes(net, rec):
    return [n for n in net.nodes if isinstance(n, LinearNode) and n.name in rec.features and n.name != rec.to_layer]


def _pinv_step(op, a_hat: torch.Tensor, z_star: torch.Tensor) -> torch.Tensor:
    """Independent reference: â + pinv(W)(z* − W â) with numpy's SVD pseudo-inverse."""
    W = op.to_sparse().toarray()
    N = a_hat.shape[0]
    A = a_hat.reshape(N, -1).numpy()
    Z = z_star.reshape(N, -1).numpy()
    return torch.from_numpy(A + (Z - A @ W.T) @ np.linalg.pinv(W).T).reshape(a_hat.shape)


# ----------------------------------------------------------------------------- inverse activations
@given(st.integers(0, 2**31 - 1), st.sampled_from(["leaky_relu", "tanh", "sigmoid", "identity"]))
def test_inverse_activation_inverts_forward(seed, kind):
    # σ⁻¹(σ(z)) = z for bijections; z drawn where tanh/sigmoid stay clear of the clip margin
    g = torch.Generator().manual_seed(seed)
    z = (torch.randn(4, 3, 5, 5, generator=g, dtype=DT) * 3).clamp(-6, 6)  # |tanh| ≤ 1 − 1.2e-5
    fwd = {"leaky_relu": lambda t: F.leaky_relu(t, 0.13), "tanh": torch.tanh, "sigmoid": torch.sigmoid,
           "identity": lambda t: t}[kind]
    zz, n_clip = inverse.inverse_activation(fwd(z), kind, 0.13, return_clipped=True, keep_unchanged=False)
    assert int(n_clip.sum()) == 0
    # atanh / logit amplify the rounding of tanh / sigmoid by 1/σ'(z) ≤ 1/σ'(6) ≈ 4e4: ≲1e-11 abs
    assert torch.allclose(zz, z, rtol=0, atol=1e-8 if kind in ("tanh", "sigmoid") else 1e-15)


def test_inverse_prelu_per_channel_and_zero_slope_is_relu():
    z = torch.randn(3, 4, 2, 2, dtype=DT)
    slope = torch.tensor([0.1, 0.5, 2.0, 0.0], dtype=DT)
    a = torch.where(z >= 0, z, z * slope.reshape(1, 4, 1, 1))
    zz = inverse.inverse_activation(a, "prelu", slope, keep_unchanged=False)
    assert torch.allclose(zz[:, :3], z[:, :3], rtol=1e-15, atol=0)
    assert torch.equal(zz[:, 3], a[:, 3])  # slope 0: ReLU, reversed by the identity (§3.4(iii))


def test_inverse_relu_identity_and_nearest():
    z = torch.tensor([[-2.0, -0.5, 0.0, 1.5]], dtype=DT)
    a_star = torch.tensor([[0.3, -0.2, 0.0, 2.0]], dtype=DT)
    assert torch.equal(inverse.inverse_activation(a_star, "relu", keep_unchanged=False), a_star)
    near = inverse.inverse_activation(a_star, "relu", relu="nearest", z_hat=z, keep_unchanged=False)
    # positive a*: itself; a* ≤ 0: the forward pre-activation clipped to ≤ 0 (nearest pre-image)
    assert torch.equal(near, torch.tensor([[0.3, -0.5, 0.0, 2.0]], dtype=DT))
    assert torch.equal(torch.relu(near), a_star.clamp_min(0))


@pytest.mark.parametrize("kind,lo,hi", [("tanh", -1.0, 1.0), ("sigmoid", 0.0, 1.0)])
def test_inverse_bounded_clips_into_open_range(kind, lo, hi):
    m = 1e-4
    a = torch.tensor([[lo - 0.5, lo, 0.5 * (lo + hi), hi, hi + 3.0]], dtype=DT)
    z, n = inverse.inverse_activation(a, kind, clip_margin=m, return_clipped=True)
    assert torch.isfinite(z).all() and int(n[0]) == 4
    back = torch.tanh(z) if kind == "tanh" else torch.sigmoid(z)
    # the clipped entries land exactly on the margin (up to the rounding of atanh/logit: 1e-12)
    expect = torch.tensor([[lo + m, lo + m, 0.5 * (lo + hi), hi - m, hi - m]], dtype=DT)
    assert torch.allclose(back, expect, rtol=0, atol=1e-12)


def test_inverse_keep_unchanged_returns_forward_preactivation():
    z = torch.tensor([[30.0, -0.3, 2.0]], dtype=DT)  # tanh(30) == 1.0 in float64: would clip
    a = torch.tanh(z)
    a_star = a.clone()
    a_star[0, 2] = 0.5
    out = inverse.inverse_activation(a_star, "tanh", a_hat=a, z_hat=z)
    assert out[0, 0] == 30.0 and out[0, 1] == -0.3  # bit-exact forward pre-image
    assert abs(float(out[0, 2]) - math.atanh(0.5)) < 1e-15


def test_inverse_activation_errors():
    a = torch.zeros(2, 3, dtype=DT)
    with pytest.raises(ValueError, match="kind"):
        inverse.inverse_activation(a, "softplus")
    with pytest.raises(ValueError, match="negative_slope"):
        inverse.inverse_activation(a, "leaky_relu", -0.1)
    with pytest.raises(ValueError, match="clip_margin"):
        inverse.inverse_activation(a, "tanh", clip_margin=1.5)
    with pytest.raises(ValueError, match="clip_margin"):
        inverse.inverse_activation(a, "sigmoid", clip_margin=0.0)
    with pytest.raises(ValueError, match="non-finite"):
        inverse.inverse_activation(torch.full((1, 2), float("nan"), dtype=DT), "tanh")


# ----------------------------------------------------------------------------- pooling
def _pool_case(seed=0, shape=(2, 3, 7, 6)):
    g = torch.Generator().manual_seed(seed)
    a = torch.randn(*shape, generator=g, dtype=DT)
    p = F.max_pool2d(a, 2)
    p_star = p + 0.8 * torch.randn(p.shape, generator=g, dtype=DT)
    return a, p, p_star


def test_unpool_max_copy_is_the_paper_and_exact():
    a, p, p_star = _pool_case()
    r = inverse.unpool_max(p_star, 2, a.shape[1:], mode="copy", a_hat=a)
    assert torch.equal(F.max_pool2d(r, 2), p_star)  # a window of copies has max = the copy
    assert torch.equal(r[:, :, :6, :6], p_star.repeat_interleave(2, 2).repeat_interleave(2, 3))
    assert torch.equal(r[:, :, 6, :], a[:, :, 6, :])  # floor mode: the uncovered row keeps â


def test_unpool_max_argmax_puts_value_at_forward_argmax():
    a, p, p_star = _pool_case()
    r = inverse.unpool_max(p_star, 2, a.shape[1:], mode="argmax", a_hat=a)
    _, idx = F.max_pool2d(a, 2, return_indices=True)
    flat = r.reshape(2, 3, -1)
    assert torch.equal(flat.gather(2, idx.reshape(2, 3, -1)), p_star.reshape(2, 3, -1))
    changed = (r != a).reshape(2, 3, -1).sum(2)
    assert int(changed.max()) <= p.shape[2] * p.shape[3]  # only the argmax entries move


def test_unpool_max_nearest_is_the_projection():
    a, p, p_star = _pool_case(seed=3)
    r = inverse.unpool_max(p_star, 2, a.shape[1:], mode="nearest", a_hat=a)
    assert torch.equal(F.max_pool2d(r, 2), p_star)
    # independent reference: enumerate which window entry attains the max (4 candidates)
    v = inverse.pool_windows(a, (2, 2))
    t = p_star.unsqueeze(-1)
    best = None
    for j in range(4):
        cand = torch.minimum(v, t).clone()
        cand[..., j] = p_star
        d = ((cand - v) ** 2).sum(-1)
        best = d if best is None else torch.minimum(best, d)
    got = ((inverse.pool_windows(r, (2, 2)) - v) ** 2).sum(-1)
    assert torch.allclose(got, best, rtol=1e-14, atol=0)
    # unchanged targets leave the window untouched
    same = inverse.unpool_max(p, 2, a.shape[1:], mode="nearest", a_hat=a)
    assert torch.equal(same, a)


def test_unpool_keep_unchanged_windows():
    a, p, p_star = _pool_case(seed=5)
    p_star[:, 0] = p[:, 0]  # channel 0 unchanged
    r = inverse.unpool_max(p_star, 2, a.shape[1:], mode="copy", a_hat=a, p_hat=p)
    assert torch.equal(r[:, 0], a[:, 0])
    assert torch.equal(F.max_pool2d(r, 2), p_star)


def test_unpool_avg_copy_and_exact_min_norm():
    g = torch.Generator().manual_seed(1)
    a = torch.randn(2, 2, 6, 4, generator=g, dtype=DT)
    op = AvgPool2d((2, 6, 4), 2)
    q = op.apply(a)
    q_star = q + torch.randn(q.shape, generator=g, dtype=DT)
    c = inverse.unpool_avg(q_star, 2, (2, 6, 4), mode="copy", a_hat=a)
    assert _rel(op.apply(c), q_star) < 1e-15  # mean of 4 copies: exact up to one rounding
    e = inverse.unpool_avg(q_star, 2, (2, 6, 4), mode="exact", a_hat=a)
    ref = _pinv_step(op, a, q_star)
    assert _rel(e, ref) < EXACT
    from linop.solvers import solve

    s = solve(op, q_star, a, method="auto", tol=1e-12)
    assert _rel(torch.as_tensor(s.a).reshape(a.shape), ref) < EXACT
    assert (e - a).norm() <= (c - a).norm()  # the exact version is the minimum-deviation one


def test_unpool_rejects_overlapping_windows():
    p = torch.zeros(1, 1, 2, 2, dtype=DT)
    with pytest.raises(NotImplementedError, match="stride"):
        inverse.unpool_max(p, 3, (1, 5, 5), stride=2)
    with pytest.raises(ValueError, match="mode"):
        inverse.unpool_max(p, 2, (1, 4, 4), mode="spread")
    with pytest.raises(ValueError, match="shape"):
        inverse.unpool_avg(p, 2, (1, 6, 6))


# ----------------------------------------------------------------------------- structural
@pytest.mark.parametrize("m,n", [(6, 9), (9, 6), (7, 7)])
def test_structural_step_equals_pinv(m, n):
    rng = np.random.default_rng(m * 10 + n)
    k = min(m, n) - (1 if m == n else 0)  # square case: one empty row & column (rank-deficient)
    r = rng.permutation(m)[:k]
    c = rng.permutation(n)[:k]
    v = rng.uniform(0.5, 2.0, k)
    W = np.zeros((m, n))
    W[r, c] = v
    a = torch.from_numpy(rng.standard_normal((3, n)))
    z = torch.from_numpy(rng.standard_normal((3, m)))
    got, case = inverse.structural_step((r, c, v), (m, n), z, a)
    ref = a.numpy() + (z.numpy() - a.numpy() @ W.T) @ np.linalg.pinv(W).T
    assert np.allclose(got.numpy(), ref, rtol=0, atol=1e-14)
    assert case == {(6, 9): "MDP", (9, 6): "CCP", (7, 7): "rank-deficient"}[(m, n)]


# ----------------------------------------------------------------------------- reconstruct: exact chains
@pytest.mark.parametrize("embedding", ["ne", "ma", "onehot"])
def test_leaky_mlp_chain_is_exact(embedding):
    # widths 12 > 8 > 6 > 4: every linear step is MDP and LeakyReLU is a bijection, so the
    # forward pass from a*_input reproduces the embedded target z*_L
    net = _net(_mlp(nn.LeakyReLU(0.2)), (12,))
    x = torch.randn(5, 12, dtype=DT, generator=torch.Generator().manual_seed(1))
    y = _wrong_labels(net(x))
    rec = reconstruct(net, x, y, embedding=embedding)
    assert _rel(net(rec.a_star), rec.target) < EXACT
    for s in rec.steps:
        assert s.consistency.max() < EXACT, s.summary()
    for n in _linear_nodes(net, rec):
        assert rec.step(n.name).case == "MDP"
    if embedding != "onehot":  # the label's entry is a maximum (ties allowed), exactly
        assert bool((rec.target.gather(1, y[:, None]) >= rec.target).all())
    else:
        assert torch.equal(rec.target, F.one_hot(y, 4).to(DT))


def test_each_linear_step_is_the_pinv_solution():
    net = _net(_convnet(nn.LeakyReLU(0.1)), (3, 6, 6))
    x = torch.randn(3, 3, 6, 6, dtype=DT, generator=torch.Generator().manual_seed(2))
    rec = reconstruct(net, x, _wrong_labels(net(x)))
    for n in _linear_nodes(net, rec):
        a_hat = rec.forward[n.inputs[0]]
        ref = _pinv_step(n.op, a_hat, rec.features[n.name])
        assert _rel(rec.features[n.inputs[0]], ref) < EXACT, n.name


def test_conv_maxpool_leaky_chain_is_exact():
    net = _net(_convnet(nn.LeakyReLU(0.1)), (3, 6, 6))
    x = torch.randn(4, 3, 6, 6, dtype=DT, generator=torch.Generator().manual_seed(3))
    y = _wrong_labels(net(x))
    rec = reconstruct(net, x, y)  # max pooling copied back (the paper): maxpool(copy) = p*
    assert _rel(net(rec.a_star), rec.target) < EXACT
    assert all(s.consistency.max() < EXACT for s in rec.steps)
    dev = rec.deviation[rec.to_layer]
    assert dev["abs"].shape == (4,) and (dev["abs"] > 0).all()
    assert np.allclose(dev["rel"], dev["abs"] / x.reshape(4, -1).norm(dim=1).numpy(), rtol=1e-14)


def test_tanh_chain_exact_without_clipping():
    # No biases and a small input keep every tanh unit near 0, and the corrections scale with
    # the logit gap, so no entry of a* leaves (-1, 1): the inverse tanh is exact and the chain
    # reproduces z*_L (the condition stated in the docs; on random nets at ordinary scale the
    # minimum-norm corrections do push some a* out of range — see the clipping test below)
    net = _net(_mlp(nn.Tanh(), seed=4, bias=False), (12,))
    x = 0.05 * torch.randn(6, 12, dtype=DT, generator=torch.Generator().manual_seed(4))
    rec = reconstruct(net, x, _wrong_labels(net(x)))
    clipped = sum(int(s.n_clipped.sum()) for s in rec.steps if s.n_clipped is not None)
    assert clipped == 0
    assert _rel(net(rec.a_star), rec.target) < EXACT


def test_tanh_clipping_is_reported_and_breaks_only_that_step():
    net = _net(_mlp(nn.Tanh(), scale=4.0, seed=5), (12,))
    x = 3 * torch.randn(6, 12, dtype=DT, generator=torch.Generator().manual_seed(5))
    rec = reconstruct(net, x, _wrong_labels(net(x)), clip_margin=1e-3)
    acts = [s for s in rec.steps if s.kind == "ActivationNode"]
    assert sum(int(s.n_clipped.sum()) for s in acts) > 0
    for s in rec.steps:
        if s.kind == "ActivationNode" and int(s.n_clipped.sum()) > 0:
            assert s.consistency.max() > 1e-6  # tanh(atanh(clip(a*))) ≠ a*: reported, not hidden
        elif s.kind != "ActivationNode":
            assert s.consistency.max() < EXACT


def test_ccp_step_is_least_squares():
    # conv 1 -> 4 channels expands (64 outputs from 36 inputs): CCP, Wᵀ(W a* − z*) = 0
    torch.manual_seed(6)
    model = nn.Sequential(nn.Conv2d(1, 4, 3), nn.LeakyReLU(0.2), nn.Flatten(), nn.Linear(64, 5)).double()
    net = _net(model, (1, 6, 6))
    x = torch.randn(3, 1, 6, 6, dtype=DT, generator=torch.Generator().manual_seed(6))
    rec = reconstruct(net, x, _wrong_labels(net(x)))
    conv = net.unit_node("Conv0")
    s = rec.step(conv.name)
    assert s.case == "CCP"
    a = rec.features[conv.inputs[0]]
    r = conv.op.apply(a) - rec.features[conv.name]
    g = conv.op.apply_adjoint(r)
    ref = conv.op.apply_adjoint(rec.features[conv.name])
    assert float(g.norm() / ref.norm()) < EXACT  # normal equations of Eq. 7: Wᵀ r = 0
    assert s.consistency.max() > 1e-6  # an expanding layer cannot meet its target exactly


def test_label_already_max_changes_nothing():
    net = _net(_convnet(nn.Tanh()), (3, 6, 6))
    x = torch.randn(4, 3, 6, 6, dtype=DT, generator=torch.Generator().manual_seed(7))
    y = net(x).argmax(1)
    for emb in ("ne", "ma"):
        for mp in ("copy", "argmax", "nearest"):
            rec = reconstruct(net, x, y, embedding=emb, maxpool=mp)
            for name, a in rec.features.items():
                assert torch.equal(a, rec.forward[name]), (emb, mp, name)
            assert all(s.case == "unchanged" for s in rec.steps if s.kind == "LinearNode")


def test_mixed_batch_only_changed_samples_move():
    net = _net(_mlp(nn.LeakyReLU(0.2)), (12,))
    x = torch.randn(6, 12, dtype=DT, generator=torch.Generator().manual_seed(8))
    y = net(x).argmax(1)
    y[::2] = _wrong_labels(net(x))[::2]
    rec = reconstruct(net, x, y)
    assert torch.equal(rec.a_star[1::2], x[1::2])
    assert (rec.deviation[rec.to_layer]["abs"][::2] > 0).all()
    assert _rel(net(rec.a_star), rec.target) < EXACT


# ----------------------------------------------------------------------------- to_layer, graphs, errors
def test_to_layer_resolution_and_partial_walk():
    from models.baselines import conv2_fc1

    torch.manual_seed(9)
    net = _net(conv2_fc1(), (1, 8, 8))
    assert resolve_to_layer(net, "input") == net.nodes[0].name
    assert resolve_to_layer(net, "FC") == net.unit_node("FC").inputs[0]
    assert resolve_to_layer(net, "Conv1:in") == net.unit_node("Conv1").inputs[0]  # pooled a_1
    assert resolve_to_layer(net, "Conv0:out") == net.unit_node("Conv1").inputs[0]
    assert resolve_to_layer(net, "FC:out") == net.output
    x = torch.randn(3, 1, 8, 8, dtype=DT, generator=torch.Generator().manual_seed(9))
    rec = reconstruct(net, x, _wrong_labels(net(x)), to_layer="Conv1")
    assert rec.to_layer == net.unit_node("Conv1").inputs[0]
    assert net.nodes[0].name not in rec.features
    # the upper part (Conv1 -> FC) is MDP with tanh: forward from a*_{Conv1:in} hits z*_L
    assert sum(int(s.n_clipped.sum()) for s in rec.steps if s.n_clipped is not None) == 0
    vals = _forward_from(net, rec.to_layer, rec.a_star)
    assert _rel(vals, rec.target) < EXACT


def _forward_from(net: EquivalentNetwork, start: str, a: torch.Tensor) -> torch.Tensor:
    """Run the (sequential) network from node ``start`` with value ``a``."""
    vals = {start: a}
    idx = [n.name for n in net.nodes].index(start)
    for n in net.nodes[idx + 1:]:
        vals[n.name] = n.forward([vals[i] for i in n.inputs], net.x_b)
    return vals[net.output]


def test_reconstruct_errors():
    net = _net(_mlp(nn.LeakyReLU(0.2)), (12,))
    x = torch.randn(3, 12, dtype=DT)
    y = torch.tensor([0, 1, 2])
    with pytest.raises(ValueError, match="to_layer"):
        reconstruct(net, x, y, to_layer="Conv7")
    with pytest.raises(ValueError, match="out of range"):
        reconstruct(net, x, torch.tensor([0, 1, 4]))
    with pytest.raises(ValueError, match="out of range"):
        reconstruct(net, x, torch.tensor([0, -1, 2]))
    with pytest.raises(ValueError, match="integers"):
        reconstruct(net, x, torch.tensor([0.0, 1.0, 2.0]))
    with pytest.raises(ValueError, match=r"shape \(3,\)"):
        reconstruct(net, x, torch.tensor([0, 1]))
    with pytest.raises(ValueError, match="embedding"):
        reconstruct(net, x, y, embedding="softmax")
    with pytest.raises(ValueError, match="maxpool"):
        reconstruct(net, x, y, maxpool="spread")
    with pytest.raises(MemoryError, match=r"bytes.*> max_bytes=100 bytes"):
        reconstruct(net, x, y, max_bytes=100)


def _branchy(kind: str) -> EquivalentNetwork:
    """x (4,) -> [A x, B x] -> add or cat -> FC: a fan-out at x."""
    g = torch.Generator().manual_seed(11)
    A = Linear(torch.randn(3, 4, generator=g, dtype=DT))
    B = Linear(torch.randn(3, 4, generator=g, dtype=DT))
    join = AddNode("join", ("a", "b"), (3,)) if kind == "add" else CatNode("join", ("a", "b"), (6,), dim=1)
    C = Linear(torch.randn(2, 3 if kind == "add" else 6, generator=g, dtype=DT))
    nodes = [InputNode("x", (), (4,)), LinearNode("a", ("x",), (3,), op=A), LinearNode("b", ("x",), (3,), op=B),
             join, LinearNode("out", ("join",), (2,), op=C, unit_layer="FC")]
    return EquivalentNetwork(nodes, "out", torch.zeros(0, dtype=DT))


@pytest.mark.parametrize("kind", ["add", "cat"])
def test_fanout_add_and_cat(kind):
    net = _branchy(kind)
    x = torch.randn(3, 4, dtype=DT, generator=torch.Generator().manual_seed(12))
    y = _wrong_labels(net(x))
    with pytest.raises(NotImplementedError, match="fanout"):
        reconstruct(net, x, y)
    rec = reconstruct(net, x, y, fanout="mean")
    join = rec.step("join")
    assert join.consistency.max() < EXACT  # add: a*+b* = z*; cat: the split concatenates back
    if kind == "add":  # MDP split: both inputs move by the same half of the correction
        assert _rel(rec.features["a"] - rec.forward["a"], rec.features["b"] - rec.forward["b"]) < 1e-14
    # to_layer inside one branch: no fan-out on that path, so no merge is needed
    rec_a = reconstruct(net, x, y, to_layer="a")
    assert torch.equal(rec_a.a_star, rec.features["a"])


# ----------------------------------------------------------------------------- baseline, figure, CLI
CKPT = Path(__file__).resolve().parents[1] / "models" / "checkpoints" / "conv2_fc1_digits.pt"


def test_baseline_digits_reconstruction_and_figure(tmp_path):
    from models.baselines import conv2_fc1

    torch.manual_seed(13)
    net = _net(conv2_fc1(), (1, 8, 8))
    x = torch.rand(4, 1, 8, 8, dtype=DT, generator=torch.Generator().manual_seed(13)) * 16
    rec = reconstruct(net, x, _wrong_labels(net(x)))
    cases = {s.node: s.case for s in rec.steps if s.kind == "LinearNode"}
    # conv2_fc1 on 8x8: FC 32->10 and Conv1 144->32 contract (MDP); Conv0 64->576 expands (CCP)
    assert cases[net.unit_node("FC").name] == "MDP"
    assert cases[net.unit_node("Conv1").name] == "MDP"
    assert cases[net.unit_node("Conv0").name] == "CCP"
    for s in rec.steps:
        if s.kind == "LinearNode" and s.case == "MDP":
            assert s.consistency.max() < EXACT
    png = plot_discrepancy(rec, net.unit_node("Conv1").inputs[0], tmp_path / "fig.png", sample=1)
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 2000
    with pytest.raises(ValueError, match="sample"):
        plot_discrepancy(rec, rec.to_layer, tmp_path / "bad.png", sample=9)
    summ = json.loads(json.dumps(rec.summary()))  # JSON-able
    assert summ["n"] == 4 and len(summ["steps"]) == len(rec.steps)


def _run_cli(ckpt: Path, out: Path, capsys, *extra: str) -> dict:
    from linop.cli import main

    rc = main(["reconstruct", "--checkpoint", str(ckpt), "--n", "6", "--out", str(out), *extra])
    assert rc == 0
    summ = json.loads((out / "reconstruct.json").read_text())
    assert summ["n"] == 6 and summ["to_layer"]
    assert any(p.name.startswith("discrepancy_") for p in out.glob("*.png"))
    assert "consist." in capsys.readouterr().out
    return summ


def test_cli_reconstruct_on_a_checkpoint(tmp_path, capsys):
    # a checkpoint in the models.train format (state_dict + meta), untrained weights
    from models.baselines import conv2_fc1

    torch.manual_seed(17)
    model = conv2_fc1()
    meta = {"model": "conv2_fc1", "kwargs": {"in_shape": [1, 8, 8], "num_classes": 10, "activation": "tanh"},
            "data": "digits", "normalize": "none", "input_shape": [1, 8, 8]}
    ckpt = tmp_path / "ck.pt"
    torch.save({"state_dict": model.state_dict(), "meta": meta}, ckpt)
    summ = _run_cli(ckpt, tmp_path / "out", capsys, "--to-layer", "Conv1", "--embedding", "ma")
    assert summ["embedding"] == "ma" and summ["dtype"] == "float64"
    kinds = [s["kind"] for s in summ["steps"]]
    assert kinds[0] == "BiasNode" and "MaxPoolNode" not in kinds  # walk stopped above the pooling


@pytest.mark.skipif(not CKPT.exists(), reason="shipped checkpoint models/checkpoints/conv2_fc1_digits.pt missing")
def test_cli_reconstruct_trained_baseline(tmp_path, capsys):
    summ = _run_cli(CKPT, tmp_path, capsys)
    for s in summ["steps"]:
        if s["kind"] == "LinearNode" and s["case"] == "MDP":
            assert s["consistency_max"] < EXACT


@pytest.mark.parametrize("solver", ["lsmr", "cg", "fft-pcg"])
def test_iterative_solvers_agree_with_dense(solver):
    net = _net(_convnet(nn.LeakyReLU(0.1)), (3, 6, 6))
    x = torch.randn(3, 3, 6, 6, dtype=DT, generator=torch.Generator().manual_seed(14))
    y = _wrong_labels(net(x))
    ref = reconstruct(net, x, y, solver="dense")
    rec = reconstruct(net, x, y, solver=solver, tol=1e-12, keep=())
    assert set(rec.features) == {rec.to_layer, rec.output}  # keep=(): bounded memory
    # iterative solves stop at tol=1e-12 on the residual; through two well-conditioned layers
    # the answer agrees with the direct one to ~1e-9 relative
    assert _rel(rec.a_star, ref.a_star) < 1e-8
    if solver == "fft-pcg":  # the FC layer has no FFT path: it falls back, and says so
        fc = rec.step(net.unit_node("FC").name)
        assert "fallback" in fc.solve_info


def test_fft_solver_is_reported_approximate():
    net = _net(_convnet(nn.LeakyReLU(0.1)), (3, 6, 6))
    x = torch.randn(3, 3, 6, 6, dtype=DT, generator=torch.Generator().manual_seed(15))
    rec = reconstruct(net, x, _wrong_labels(net(x)), solver="fft")
    conv = rec.step(net.unit_node("Conv0").name)
    assert conv.method == "fft" and conv.consistency.shape == (3,)  # its residual is measured


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA build of torch")
def test_reconstruct_on_cuda_matches_cpu():
    net = _net(_convnet(nn.LeakyReLU(0.1)), (3, 6, 6))
    x = torch.randn(4, 3, 6, 6, dtype=DT, generator=torch.Generator().manual_seed(16))
    y = _wrong_labels(net(x))
    cpu = reconstruct(net, x, y)
    gpu = reconstruct(net, x.cuda(), y.cuda())
    assert gpu.a_star.is_cuda
    assert _rel(gpu.a_star.cpu(), cpu.a_star) < EXACT
