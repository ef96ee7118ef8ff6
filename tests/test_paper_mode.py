"""Paper mode (issue 11): seed 001's method beside our exact variants, named in every result.

* pooling: ``pool_rule="copy"`` copies the pooled value into every window (§3.4(b)), also for
  windows (and samples) the label left unchanged — checked against hand-computed a*;
* MDP / CCP: the paper's channel / width rule (§3.1(a)/(b), §3.2(a)/(b)) next to the rank rule;
  paper mode solves CCP steps as ``W⁺ z*`` (â not used);
* solver: the §3.2 FFT path for every unpadded stride-1 conv, recorded per step;
* α per data set (Tables 1–6), the reported epochs, and the ``mode`` field of every file.
"""
from __future__ import annotations

import csv
import json

import numpy as np
import pytest
import torch
from torch import nn

import linop
from linop.operators import Conv2d, Linear
from linop.reverse import reconstruct
from linop.solvers.case import channel_case
from linop.studies.posttrain import posttrain_study
from linop.studies.posttrain.study import default_report_epochs, paper_alpha, resolve_alpha

DT = torch.float64
torch.set_num_threads(1)


def _net(model: nn.Module, shape: tuple) -> linop.EquivalentNetwork:
    return linop.from_torch(model.double().eval(), shape, dtype=DT)


# ----------------------------------------------------------------------------- pooling
def _pool_net() -> nn.Sequential:
    """maxpool 2 on 1×4×4 → flatten → the scores of classes 0 / 1 are pooled entries 0 / 1."""
    m = nn.Sequential(nn.MaxPool2d(2), nn.Flatten(), nn.Linear(4, 2))
    with torch.no_grad():
        m[2].weight.copy_(torch.tensor([[1.0, 0, 0, 0], [0, 1.0, 0, 0]]))
        m[2].bias.zero_()
    return m


X_POOL = torch.tensor([[[[1.0, 2, 5, 0], [3, 4, 1, 1], [0, 0, -1, -2], [7, 0, -3, -4]]]], dtype=DT)


def _windows(v: list[list[float]]) -> torch.Tensor:
    """A 4×4 map whose 2×2 windows hold the four given values (v[i][j] fills window (i, j))."""
    return torch.tensor(v, dtype=DT).repeat_interleave(2, 0).repeat_interleave(2, 1)[None, None]


def test_copy_back_of_a_correctly_classified_sample():
    # pooled maxima [[4, 5], [7, -1]]: scores (4, 5), label 1 is already the maximum, so the
    # embedding leaves the output unchanged.  linop: a* = â exactly.  Paper (§3.4(b)): every
    # window becomes its pooled value, a* ≠ â although nothing was asked to change.
    net = _net(_pool_net(), (1, 4, 4))
    y = torch.tensor([1])
    exact = reconstruct(net, X_POOL, y)
    assert exact.mode == "linop" and torch.equal(exact.a_star, X_POOL)
    paper = reconstruct(net, X_POOL, y, paper=True)
    assert paper.mode == "paper" and paper.summary()["pool_rule"] == "copy"
    # the FC step solves â + W⁺(z* − Wâ) with z* = ẑ on every sample (paper: no shortcut), so
    # the pooled targets carry at most a few ulps of rounding: 1e-13 on entries of size ≤ 7
    assert torch.allclose(paper.a_star, _windows([[4, 5], [7, -1]]), rtol=0, atol=1e-13)
    # the paper's rule alone, with our exactness convention elsewhere
    pool_only = reconstruct(net, X_POOL, y, pool_rule="copy")
    assert pool_only.mode == "linop" and torch.equal(pool_only.a_star, _windows([[4, 5], [7, -1]]))


def test_copy_back_of_a_misclassified_sample():
    # label 0 with scores (4, 5): NE moves both scores to their mean 4.5 (Algorithm 1), the FC
    # step (MDP, W = [I₂ 0]) moves pooled entries 0, 1 to 4.5 and leaves 7, −1 alone.
    net = _net(_pool_net(), (1, 4, 4))
    y = torch.tensor([0])
    want_paper = _windows([[4.5, 4.5], [7, -1]])  # every window copied back
    want_exact = want_paper.clone()
    want_exact[..., 2:, :] = X_POOL[..., 2:, :]  # unchanged windows keep â
    # rounding of one 2×4 dense solve on entries ≤ 7: 1e-13
    exact = reconstruct(net, X_POOL, y)
    assert torch.allclose(exact.a_star, want_exact, rtol=0, atol=1e-13)
    assert torch.equal(exact.a_star[..., 2:, :], X_POOL[..., 2:, :])  # bit for bit
    paper = reconstruct(net, X_POOL, y, paper=True)
    assert torch.allclose(paper.a_star, want_paper, rtol=0, atol=1e-13)


def test_avg_pool_copy_rule():
    # average pooling with stride = kernel is a LinearNode; the copy rule applies there too
    m = nn.Sequential(nn.AvgPool2d(2), nn.Flatten(), nn.Linear(4, 2))
    with torch.no_grad():
        m[2].weight.copy_(torch.tensor([[1.0, 0, 0, 0], [0, 1.0, 0, 0]]))
        m[2].bias.zero_()
    net = _net(m, (1, 4, 4))
    means = [[2.5, 1.75], [1.75, -2.5]]  # window means of X_POOL
    rec = reconstruct(net, X_POOL, torch.tensor([0]), pool_rule="copy")  # 2.5 > 1.75: unchanged
    assert torch.equal(rec.a_star, _windows(means))
    assert torch.equal(reconstruct(net, X_POOL, torch.tensor([0])).a_star, X_POOL)


def test_paper_mode_refuses_non_paper_rules():
    net = _net(_pool_net(), (1, 4, 4))
    for kw in ({"maxpool": "nearest"}, {"avgpool": "exact"}, {"relu": "nearest"}):
        with pytest.raises(ValueError, match=next(iter(kw))):
            reconstruct(net, X_POOL, torch.tensor([1]), paper=True, **kw)
    with pytest.raises(ValueError, match="pool_rule"):
        reconstruct(net, X_POOL, torch.tensor([1]), pool_rule="spread")
    with pytest.raises(TypeError, match="paper"):
        reconstruct(net, X_POOL, torch.tensor([1]), paper="yes")


# ----------------------------------------------------------------------------- MDP / CCP labels
@pytest.mark.parametrize("c_in,c_out,want", [(4, 2, "MDP"), (2, 4, "CCP"), (3, 3, "MDP")])
def test_channel_rule(c_in, c_out, want):
    # seed 001 §3.2: (a) C_l ≥ C_{l+1} → MDP, (b) C_l < C_{l+1} → CCP; equal channels are (a)
    op = Conv2d(torch.randn(c_out, c_in, 3, 3, dtype=DT), (c_in, 6, 6))
    assert channel_case(op) == (want, "channels")


def test_width_rule_for_fc_layers():
    # §3.1: (a) n_l ≥ n_{l+1} → MDP, (b) n_l < n_{l+1} → CCP
    assert channel_case(Linear(torch.randn(3, 5))) == ("MDP", "units")
    assert channel_case(Linear(torch.randn(5, 3))) == ("CCP", "units")
    assert channel_case(Linear(torch.randn(4, 4))) == ("MDP", "units")


def test_both_labels_are_reported_and_can_differ():
    # conv 2 → 3 channels, 3×3 on 6×6: W is 48 × 72 of full row rank (rank rule: MDP) while
    # C_l < C_{l+1} (the paper's rule: CCP)
    torch.manual_seed(3)
    m = nn.Sequential(nn.Conv2d(2, 3, 3), nn.Tanh(), nn.Flatten(), nn.Linear(48, 4))
    net = _net(m, (2, 6, 6))
    x = torch.randn(3, 2, 6, 6, dtype=DT)
    for paper in (False, True):
        summ = reconstruct(net, x, torch.tensor([0, 1, 2]), paper=paper).summary()
        conv = next(s for s in summ["steps"] if s["node"] == net.unit_node("Conv0").name)
        assert (conv["case"], conv["paper_case"]) == ("MDP", "CCP")
        fc = next(s for s in summ["steps"] if s["node"] == net.unit_node("FC").name)
        assert (fc["case"], fc["paper_case"]) == ("MDP", "MDP")
        assert summ["mode"] == ("paper" if paper else "linop")


def test_paper_ccp_drops_the_null_space_of_a_hat():
    # a strided conv (no FFT path) with C_l = 2 < C_{l+1} = 3 but W 27 × 98 (a null space):
    # linop solves â + W⁺(z* − Wâ); paper mode, by its CCP label, W⁺ z*.  The two differ by
    # exactly the null-space component (I − W⁺W) â — the same targets reach the conv in both
    # modes (the FC step above is MDP with a full-row-rank W).
    torch.manual_seed(5)
    m = nn.Sequential(nn.Conv2d(2, 3, 3, stride=2), nn.Flatten(), nn.Linear(27, 4))
    net = _net(m, (2, 7, 7))
    x = torch.randn(4, 2, 7, 7, dtype=DT)
    y = torch.tensor([0, 1, 2, 3])
    lin = reconstruct(net, x, y)
    pap = reconstruct(net, x, y, paper=True)
    conv = net.unit_node("Conv0")
    step = pap.step(conv.name)
    assert step.paper_case == "CCP" and step.solved_as == "CCP" and step.case == "MDP"
    assert "fft not applicable" in step.solve_info["fallback"]
    W = conv.op.to_dense() if hasattr(conv.op, "to_dense") else None
    if W is None:
        W = conv.op.apply(torch.eye(98, dtype=DT).reshape(98, 2, 7, 7)).reshape(98, -1).T
    W = np.asarray(W, dtype=np.float64).reshape(27, 98)
    P_null = np.eye(98) - np.linalg.pinv(W) @ W
    a_hat = x.reshape(4, -1).numpy()
    diff = (lin.a_star - pap.a_star).reshape(4, -1).numpy()
    # two dense solves and an SVD pseudo-inverse of a 27 × 98 W with |â| ~ 1: 1e-10 absolute
    np.testing.assert_allclose(diff, a_hat @ P_null.T, rtol=0, atol=1e-10)
    # both meet the constraint (full row rank): W a* = z*
    for rec in (lin, pap):
        assert rec.step(conv.name).consistency.max() < 1e-12


# ----------------------------------------------------------------------------- solver
def test_paper_mode_uses_fft_for_unpadded_stride1_convs():
    torch.manual_seed(7)
    m = nn.Sequential(nn.Conv2d(3, 2, 3), nn.Tanh(), nn.Conv2d(2, 2, 3, padding=1), nn.Tanh(),
                      nn.Flatten(), nn.Linear(2 * 4 * 4, 4))
    net = _net(m, (3, 6, 6))
    x = torch.randn(2, 3, 6, 6, dtype=DT)
    y = torch.tensor([1, 3])
    pap = reconstruct(net, x, y, paper=True)
    c0, c1 = pap.step(net.unit_node("Conv0").name), pap.step(net.unit_node("Conv1").name)
    assert c0.method == "fft" and c0.solved_as == "fft-MDP" and c0.paper_case == "MDP"
    assert c1.method != "fft" and "padding" in c1.solve_info["fallback"]  # padded: the exact solver
    # C_l ≥ C_{l+1} with every per-frequency K̂(u, v) of full row rank: the FFT answer meets
    # the constraint (linop.solvers.fft docstring), to the rounding of FFTs of a 6×6 map
    assert c0.consistency.max() < 1e-10
    lin = reconstruct(net, x, y)
    assert all(s.method != "fft" for s in lin.steps)
    assert pap.summary()["mode"] == "paper" and lin.summary()["mode"] == "linop"


def test_cli_reconstruct_paper(tmp_path, capsys):
    from linop.cli import main
    from models.baselines import conv2_fc1

    torch.manual_seed(17)
    meta = {"model": "conv2_fc1", "kwargs": {"in_shape": [1, 8, 8], "num_classes": 10, "activation": "tanh"},
            "data": "digits", "normalize": "none", "input_shape": [1, 8, 8]}
    ckpt = tmp_path / "ck.pt"
    torch.save({"state_dict": conv2_fc1().state_dict(), "meta": meta}, ckpt)
    assert main(["reconstruct", "--checkpoint", str(ckpt), "--n", "4", "--out", str(tmp_path / "o"), "--paper"]) == 0
    summ = json.loads((tmp_path / "o" / "reconstruct.json").read_text())
    assert summ["mode"] == "paper" and "fft" in summ["solvers_used"]
    assert all("paper_case" in s for s in summ["steps"])
    out = capsys.readouterr().out
    assert "mode: paper" in out


# ----------------------------------------------------------------------------- α and epochs
def test_alpha_per_data_set():
    # seed 001 Tables 1–6: MNIST 0.1, CIFAR-10 0.1, CIFAR-100 0.7, Tiny ImageNet 0.7,
    # ImageNette 0.3, ImageWoof 0.1
    want = {"mnist": 0.1, "mnist5k": 0.1, "digits": 0.1, "cifar10": 0.1, "cifar100": 0.7, "tinyimagenet": 0.7,
            "imagenette": 0.3, "imagewoof": 0.1}
    assert {k: paper_alpha(k) for k in want} == want
    from models.data import DATASETS

    assert set(want) <= set(DATASETS)  # the keys are our loaders' names (models.data)
    assert resolve_alpha(None, "cifar100") == (0.7, "seed 001 Table 3 (CIFAR-100)")
    assert resolve_alpha(0.25, "cifar100") == (0.25, "given")
    a, src = resolve_alpha(None, "custom")
    assert a == 0.1 and "not in seed 001" in src


def test_report_epochs():
    assert default_report_epochs(2) == [1, 2]  # the final epoch is a column (was dropped)
    assert default_report_epochs(10) == [1, 5, 10]
    assert default_report_epochs(7) == [1, 5, 7]
    assert default_report_epochs(1) == [1]
    assert default_report_epochs(30) == [1, 5, 10, 30]
    assert default_report_epochs(10, [10, 1]) == [1, 10]
    with pytest.raises(ValueError, match="report_epochs"):
        default_report_epochs(5, [1, 10])


def test_cli_options():
    import argparse

    from linop.cli.posttrain import add_arguments, baseline_recipe

    p = argparse.ArgumentParser()
    add_arguments(p)
    a = p.parse_args([])
    assert a.data == "mnist5k" and a.alpha is None and not a.paper and a.report_epochs is None
    a = p.parse_args(["--paper", "--report-epochs", "1", "5", "10"])
    assert a.paper and a.report_epochs == [1, 5, 10]
    # seed 001 §4's protocol for a baseline trained by the command on mnist5k
    r = baseline_recipe("mnist5k", 40)
    assert (r["normalize"], r["optimizer"], r["lr"], r["batch_size"], r["schedule"]) == (
        "instance", "adam", 1e-3, 256, "constant")


# ----------------------------------------------------------------------------- results files
def _tiny():
    from kit_posttrain import tiny_data, tiny_model

    return tiny_model(), tiny_data(n_train=48, n_test=32)


@pytest.mark.parametrize("paper", [False, True])
def test_results_files_carry_the_mode(tmp_path, paper):
    model, data = _tiny()
    res = posttrain_study(model, data, pairs=[(0, 1)], epochs=2, runs=1, batch_size=32, seed=1, progress=False,
                          print_table=False, out_dir=tmp_path, data_name="mnist5k", paper=paper)
    mode = "paper" if paper else "linop"
    recs = [json.loads(line) for line in (tmp_path / "results.jsonl").read_text().splitlines()]
    assert recs and all(r["mode"] == mode for r in recs)
    cfg = json.loads((tmp_path / "config.json").read_text())
    assert cfg["mode"] == mode and cfg["alpha"] == 0.1 and cfg["alpha_source"].startswith("seed 001 Table 1")
    assert cfg["report_epochs"] == [1, 2]
    table = json.loads((tmp_path / "table.json").read_text())
    assert all(r["mode"] == mode for r in table["rows"]) and all("epoch2_mean" in r for r in table["rows"])
    with open(tmp_path / "table.csv") as fh:
        rows = list(csv.DictReader(fh))
    assert rows and all(r["mode"] == mode for r in rows)
    md = (tmp_path / "table.md").read_text()
    assert f"Mode: {mode}" in md and "epoch2" in md
    assert (tmp_path / "frpt_vs_bppt_pairs.png").exists() and not (tmp_path / "fig6_pairs.png").exists()
    # the reverse walk behind a*_1: both labels and the solver per step; paper mode runs the
    # FFT path on the unpadded stride-1 conv 3 -> 4 of the tiny model
    fr = next(r for r in recs if r["method"] == "FR")
    convs = [s for s in fr["reverse_steps"] if s["kind"] == "LinearNode" and s["paper_case"] is not None]
    assert convs and all({"case", "paper_case", "solved_as", "method"} <= set(s) for s in convs)
    assert any(s["method"] == "fft" for s in convs) == paper
    assert res.config["mode"] == mode and table["config"]["alpha_source"] == cfg["alpha_source"]


def test_cli_posttrain_refuses_report_epochs_outside_the_run(tmp_path, capsys):
    from linop.cli import main

    rc = main(["posttrain", "--epochs", "2", "--report-epochs", "1", "5", "--no-progress", "--out", str(tmp_path)])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and "--report-epochs" in err and "\n" not in err
