"""FR-PT vs BP-PT post-training study (seed 001 §4): loss, freezing, counts, cache, resume."""
from __future__ import annotations

import copy
import json
import math

import pytest
import torch

from linop.cli.posttrain import add_arguments
from linop.studies.posttrain import (
    compare_methods,
    default_pairs,
    fr_pt_loss,
    model_blocks,
    output_target,
    parse_pair,
    posttrain_run,
    posttrain_study,
    rec_loss_for_embedding,
    reconstruct_features,
    trainable_parameter_count,
    training_memory,
)
from models.baselines import KConvMFC, conv2_fc1

from kit_posttrain import CountingReconstructor, tiny_data, tiny_model

torch.set_num_threads(1)


# ---------------------------------------------------------------------------- the loss
def test_fr_loss_equals_hand_computed_formula():
    # CE: row 1 logits (0, 0), y=0 -> ln 2; row 2 logits (ln 3, 0), y=1 -> -ln(1/4) = ln 4;
    # mean = 1.5 ln 2.  MSE over all 4 entries of (1,2,0,-2)^2 = 9/4; L1 = 5/4.
    logits = torch.tensor([[0.0, 0.0], [math.log(3.0), 0.0]], dtype=torch.float64)
    y = torch.tensor([0, 1])
    a_hat = torch.tensor([[1.0, 2.0], [0.0, -1.0]], dtype=torch.float64)
    a_star = torch.tensor([[0.0, 0.0], [0.0, 1.0]], dtype=torch.float64)
    ce = 1.5 * math.log(2.0)
    total, cls, rec = fr_pt_loss(logits, y, a_hat, a_star, alpha=0.25)
    # float64 arithmetic on a handful of terms: a few ulps
    assert cls.item() == pytest.approx(ce, rel=1e-15, abs=1e-15)
    assert rec.item() == 2.25
    assert total.item() == pytest.approx(0.75 * ce + 0.25 * 2.25, rel=1e-15)
    total1, _, rec1 = fr_pt_loss(logits, y, a_hat, a_star, alpha=0.25, rec="l1")
    assert rec1.item() == 1.25
    assert total1.item() == pytest.approx(0.75 * ce + 0.25 * 1.25, rel=1e-15)
    # the end points of Eq. 3 are the two losses alone, exactly
    assert fr_pt_loss(logits, y, a_hat, a_star, alpha=0.0)[0].item() == cls.item()
    assert fr_pt_loss(logits, y, a_hat, a_star, alpha=1.0)[0].item() == 2.25


def test_fr_loss_rejects_bad_options():
    z = torch.zeros(2, 3)
    y = torch.zeros(2, dtype=torch.long)
    with pytest.raises(ValueError, match="alpha"):
        fr_pt_loss(z, y, z, z, alpha=1.5)
    with pytest.raises(ValueError, match="rec"):
        fr_pt_loss(z, y, z, z, alpha=0.5, rec="huber")
    with pytest.raises(ValueError, match="shape"):
        fr_pt_loss(z, y, z, torch.zeros(2, 4), alpha=0.5)
    assert rec_loss_for_embedding("ma") == "l1" and rec_loss_for_embedding("ne") == "mse"


# ---------------------------------------------------------------------------- layers, counts
def test_parameter_counts_match_seed001_table1():
    # seed 001 Table 1 (MNIST 2Conv+1fc): #paras per (l_S, l_R) pair
    table1 = {(0, 1): 52, (0, 2): 256, (1, 2): 204, (0, 3): 2826, (1, 3): 2774, (2, 3): 2570}
    net = conv2_fc1((1, 28, 28))
    assert len(model_blocks(net)) == 3
    assert default_pairs(3) == list(table1)
    assert {p: trainable_parameter_count(net, *p) for p in table1} == table1


def test_parameter_counts_sum_of_trained_layers():
    net = tiny_model()
    per_layer = [3 * 9 + 3, 4 * 3 * 9 + 4, 10 * 4 + 10]  # conv1, conv2, FC
    for s, r in default_pairs(3):
        assert trainable_parameter_count(net, s, r) == sum(per_layer[s:r])
    with pytest.raises(ValueError, match="l_S"):
        trainable_parameter_count(net, 2, 2)
    with pytest.raises(ValueError, match="l_S"):
        trainable_parameter_count(net, 0, 4)


@pytest.mark.parametrize("pair", [(0, 1), (1, 2), (1, 3), (2, 3)])
@pytest.mark.parametrize("method", ["BP", "FR"])
def test_frozen_layers_do_not_change(pair, method):
    net, d = tiny_model(), tiny_data()
    l_S, l_R = pair
    a_star = None
    if method == "FR":
        a_star = reconstruct_features(net, l_R, d["x_train"], d["y_train"], reconstructor=CountingReconstructor(), progress=False)
    out = posttrain_run(net, l_S, l_R, method, d["x_train"], d["y_train"], d["x_test"], d["y_test"],
                        a_star=a_star, alpha=0.5, epochs=2, lr=1e-2, batch_size=32, seed=3, return_model=True)
    assert out["frozen_unchanged"] and len(out["test_acc"]) == 2
    trained = out["model"]
    before, after = model_blocks(net), model_blocks(trained)
    for i, (b0, b1) in enumerate(zip(before, after)):
        for p0, p1 in zip(b0.parameters(), b1.parameters()):
            if l_S <= i < l_R:
                assert not torch.equal(p0, p1), f"layer {i + 1} should have been trained"
            else:
                assert torch.equal(p0, p1), f"frozen layer {i + 1} changed"
    # the baseline itself is untouched (training works on a copy)
    assert all(p.requires_grad for p in net.parameters())


def test_fr_with_alpha_zero_is_bp_bitwise():
    # same optimiser, seeds and data order: with alpha = 0, Eq. 3 is CE alone, so FR-PT and
    # BP-PT must produce bit-identical weights and accuracies
    net, d = tiny_model(), tiny_data()
    a_star = reconstruct_features(net, 2, d["x_train"], d["y_train"], reconstructor=CountingReconstructor(), progress=False)
    kw = dict(alpha=0.0, epochs=2, lr=1e-2, batch_size=32, seed=7, return_model=True)
    bp = posttrain_run(net, 0, 2, "BP", d["x_train"], d["y_train"], d["x_test"], d["y_test"], **kw)
    fr = posttrain_run(net, 0, 2, "FR", d["x_train"], d["y_train"], d["x_test"], d["y_test"], a_star=a_star, **kw)
    assert bp["test_acc"] == fr["test_acc"]
    for p, q in zip(bp["model"].parameters(), fr["model"].parameters()):
        assert torch.equal(p, q)
    fr_half = posttrain_run(net, 0, 2, "FR", d["x_train"], d["y_train"], d["x_test"], d["y_test"], a_star=a_star,
                            **{**kw, "alpha": 0.5})
    assert any(not torch.equal(p, q) for p, q in zip(bp["model"].parameters(), fr_half["model"].parameters()))


def test_memory_estimate_orders():
    net, d = tiny_model(), tiny_data()
    xb, yb = d["x_train"][:32], d["y_train"][:32]
    a2 = torch.zeros(32, 4, 1, 1)
    bp02 = training_memory(net, 0, 2, "BP", xb, yb, None)
    fr02 = training_memory(net, 0, 2, "FR", xb, yb, a2)
    bp12 = training_memory(net, 1, 2, "BP", xb, yb, None)
    # FR stores the batch of reconstructed targets on top of BP's tensors
    assert fr02["mem_terms_bytes"]["batch"] - bp02["mem_terms_bytes"]["batch"] == a2.numel() * 4
    # freezing layer 1 drops its saved activations, gradients and Adam moments
    assert bp12["mem_terms_bytes"]["saved_activations"] < bp02["mem_terms_bytes"]["saved_activations"]
    assert bp12["mem_terms_bytes"]["grads"] == 4 * trainable_parameter_count(net, 1, 2)
    assert bp12["mem_terms_bytes"]["optimizer_state"] == 2 * bp12["mem_terms_bytes"]["grads"]
    assert bp12["mem_mb"] < bp02["mem_mb"] < fr02["mem_mb"]


# ---------------------------------------------------------------------------- the cache
def test_cache_returns_identical_tensors_without_recomputing(tmp_path):
    net, d = tiny_model(), tiny_data()
    rc = CountingReconstructor()
    kw = dict(cache_dir=tmp_path, chunk_size=40, progress=False, reconstructor=rc)
    a1 = reconstruct_features(net, 2, d["x_train"], d["y_train"], **kw)
    assert (rc.factory_calls, rc.chunk_calls) == (1, 3)  # 96 rows in chunks of 40
    a2 = reconstruct_features(net, 2, d["x_train"], d["y_train"], **kw)
    assert (rc.factory_calls, rc.chunk_calls) == (1, 3)  # loaded, not recomputed
    assert torch.equal(a1, a2) and a1.dtype == a2.dtype == torch.float32
    # every key ingredient invalidates: layer, embedding, solver, data, weights
    reconstruct_features(net, 1, d["x_train"], d["y_train"], **kw)
    reconstruct_features(net, 2, d["x_train"], d["y_train"], **{**kw, "embedding": "ma"})
    reconstruct_features(net, 2, d["x_train"], d["y_train"], **{**kw, "solver": "dense"})
    reconstruct_features(net, 2, d["x_train"], (d["y_train"] + 1) % 10, **kw)
    other = tiny_model()
    with torch.no_grad():
        next(other.parameters())[0, 0, 0, 0] += 1e-7
    reconstruct_features(other, 2, d["x_train"], d["y_train"], **kw)
    assert rc.factory_calls == 6
    assert len(list(tmp_path.glob("astar_*.pt"))) == 6


def test_cache_resumes_interrupted_reconstruction(tmp_path):
    net, d = tiny_model(), tiny_data()
    ref = reconstruct_features(net, 2, d["x_train"], d["y_train"], chunk_size=40, progress=False,
                               reconstructor=CountingReconstructor())
    failing = CountingReconstructor(fail_at_chunk=2)
    with pytest.raises(KeyboardInterrupt):
        reconstruct_features(net, 2, d["x_train"], d["y_train"], cache_dir=tmp_path, chunk_size=40,
                             progress=False, reconstructor=failing)
    rc = CountingReconstructor()
    out = reconstruct_features(net, 2, d["x_train"], d["y_train"], cache_dir=tmp_path, chunk_size=40,
                               progress=False, reconstructor=rc)
    assert rc.chunk_calls == 1  # only the chunk that was not finished
    assert torch.equal(out, ref)
    assert not list(tmp_path.glob("*.partial"))


def test_output_layer_target_is_the_embedding():
    net, d = tiny_model(), tiny_data()
    a_L = reconstruct_features(net, 3, d["x_train"], d["y_train"], embedding="onehot", progress=False)
    assert torch.equal(a_L, torch.nn.functional.one_hot(d["y_train"], 10).float())
    ne = reconstruct_features(net, 3, d["x_train"], d["y_train"], embedding="ne", progress=False)
    with torch.no_grad():
        logits = net(d["x_train"])
    assert bool((ne.gather(1, d["y_train"][:, None]) >= ne).all())  # y* is a maximum of a*_L
    assert torch.allclose(ne, output_target(logits.double(), d["y_train"], "ne").float(), rtol=0, atol=0)


# ---------------------------------------------------------------------------- the study
class _Stop(Exception):
    pass


def _study(tmp_path, name, **kw):
    base = dict(model=tiny_model(), data=tiny_data(), pairs=[(1, 2), (2, 3)], alpha=0.5, epochs=2,
                lr=1e-2, runs=2, batch_size=32, seed=11, report_epochs=(1, 2), progress=False,
                reconstructor=CountingReconstructor(), print_table=False, out_dir=tmp_path / name)
    base.update(kw)
    return posttrain_study(**base)


def test_resumed_study_equals_uninterrupted(tmp_path):
    full = _study(tmp_path, "full")
    assert len(full.records) == 2 * 2 * 2  # pairs x methods x runs
    assert {(r["method"], r["l_S"], r["l_R"]) for r in full.rows} == {
        ("BP", 1, 2), ("FR", 1, 2), ("BP", 2, 3), ("FR", 2, 3)}

    seen = []

    def stop_after_three(rec):
        seen.append(rec["key"])
        if len(seen) == 3:
            raise _Stop

    with pytest.raises(_Stop):
        _study(tmp_path, "cut", on_run_end=stop_after_three)
    lines = (tmp_path / "cut" / "results.jsonl").read_text().splitlines()
    assert len(lines) == 3  # every finished run was written before the interruption
    # a torn half line (killed mid-append) is dropped on resume
    with open(tmp_path / "cut" / "results.jsonl", "a") as fh:
        fh.write('{"key": "BP|1|2|-|1", "config_ha')
    resumed_calls = []
    resumed = _study(tmp_path, "cut", on_run_end=lambda r: resumed_calls.append(r["key"]))
    assert len(resumed_calls) == 8 - 3 and not set(resumed_calls) & set(seen)
    assert resumed.rows == full.rows
    assert resumed.baseline_acc == full.baseline_acc
    for a, b in zip(full.records, resumed.records):
        assert a["test_acc"] == b["test_acc"] and a["key"] == b["key"]
    table = json.loads((tmp_path / "cut" / "table.json").read_text())
    assert table["rows"] == json.loads((tmp_path / "full" / "table.json").read_text())["rows"]
    for f in ("table.csv", "table.md", "frpt_vs_bppt_pairs.png", "results.jsonl"):
        assert (tmp_path / "cut" / f).stat().st_size > 0
    # a completed study re-run does no training; --no-resume starts afresh
    again = []
    _study(tmp_path, "cut", on_run_end=lambda r: again.append(r))
    assert again == []


def test_study_runs_use_seed_plus_r_for_both_methods(tmp_path):
    res = _study(tmp_path, "seeds", pairs=[(2, 3)], alpha=0.0)
    by = {(r["method"], r["run"]): r for r in res.records}
    for k in range(2):
        assert by[("BP", k)]["seed"] == by[("FR", k)]["seed"] == 11 + k
        # alpha = 0: identical training, so identical accuracy curves
        assert by[("BP", k)]["test_acc"] == by[("FR", k)]["test_acc"]
        assert by[("FR", k)]["n_params"] == trainable_parameter_count(tiny_model(), 2, 3)


def test_ablation_rows_and_figure(tmp_path):
    res = _study(tmp_path, "abl", pairs=[(2, 3)], runs=2, ablation=True)
    embs = {r["embedding"] for r in res.records if r["method"] == "FR"}
    assert embs == {"ne", "ma", "onehot"}
    assert {r["rec_loss"] for r in res.records if r["embedding"] == "ma"} == {"l1"}
    assert (tmp_path / "abl" / "fig5_embeddings.png").exists()


def test_study_rejects_bad_options(tmp_path):
    with pytest.raises(ValueError, match="optimizer"):
        _study(tmp_path, "bad", optimizer="rmsprop")
    with pytest.raises(ValueError, match="embedding"):
        _study(tmp_path, "bad", embedding="softmax")
    with pytest.raises(ValueError, match="l_S"):
        _study(tmp_path, "bad", pairs=[(2, 2)])


def test_cli_arguments():
    import argparse

    p = argparse.ArgumentParser()
    add_arguments(p)
    a = p.parse_args(["--pairs", "0:1", "1:3", "--alpha", "0.3", "--optimizer", "sgd", "--no-resume"])
    assert [parse_pair(s) for s in a.pairs] == [(0, 1), (1, 3)]
    assert a.alpha == 0.3 and a.optimizer == "sgd" and a.no_resume
    with pytest.raises(ValueError, match="l_S:l_R"):
        parse_pair("3")


# ---------------------------------------------------------------------------- with linop
def test_default_reconstructor_meets_the_mdp_constraint():
    """With the real reverse pass (linop.reconstruct): the FC 16 -> 10 layer contracts, so
    a*_{L-1} is the MDP solution and classifier(a*_{L-1}) equals the embedded target z*_L."""
    from linop.reverse.embed import embed

    torch.manual_seed(1)
    net = KConvMFC((1, 8, 8), (3, 16), (), 10, "tanh", kernel_size=3).eval()
    d = tiny_data(n_train=40)
    x, y = d["x_train"], d["y_train"]
    a2 = reconstruct_features(net, 2, x, y, chunk_size=16, progress=False)
    head = copy.deepcopy(net.classifier).double()
    a2_hat = model_blocks(net)[1](model_blocks(net)[0](x)).double()
    with torch.no_grad():
        z_star = embed(head(a2_hat), y, norm="ne")
        got = head(a2.double())
    # a* is solved in float64 and stored in float32: |W| |a*| * 2^-24 ~ 1e-7 per entry
    assert torch.allclose(got, z_star, rtol=0, atol=1e-5)
    assert bool((got.gather(1, y[:, None]) >= got - 1e-5).all())  # y* is the top class
    # the earlier layer: finite, right shape, deterministic
    a1 = reconstruct_features(net, 1, x, y, chunk_size=16, progress=False)
    assert a1.shape == (40, 3, 3, 3) and torch.isfinite(a1).all()
    assert torch.equal(a1, reconstruct_features(net, 1, x, y, chunk_size=16, progress=False))


def test_compare_methods_mean_difference():
    def rec(method, run, acc):
        return {"method": method, "embedding": "ne" if method == "FR" else "-", "l_S": 1, "l_R": 2,
                "run": run, "test_acc": [acc]}

    recs = [rec("BP", 0, 90.0), rec("BP", 1, 91.0), rec("FR", 0, 92.0), rec("FR", 1, 94.0)]
    (c,) = compare_methods(recs, 1, "ne")
    assert c["fr_minus_bp"] == 2.5  # (92 + 94)/2 − (90 + 91)/2, exact in binary floating point
    assert 0.0 < c["welch_p"] < 1.0
    (c0,) = compare_methods([rec("BP", 0, 90.0), rec("BP", 1, 90.0), rec("FR", 0, 90.0), rec("FR", 1, 90.0)], 1, "ne")
    assert c0["fr_minus_bp"] == 0.0 and math.isnan(c0["welch_p"])  # constant samples: no test


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a machine without CUDA")
def test_study_refuses_a_missing_device_before_any_work(tmp_path):
    with pytest.raises(ValueError, match="device 'cuda'.*CUDA is not available"):
        _study(tmp_path, "cuda", device="cuda")
    with pytest.raises(ValueError, match="device must be 'cpu', 'cuda' or 'cuda:k'"):
        _study(tmp_path, "tpu", device="tpu")
    assert not (tmp_path / "cuda").exists() and not (tmp_path / "tpu").exists()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA build of torch and a device")
def test_study_on_cuda_matches_cpu(tmp_path):
    """Same seeds on both devices: GPU kernels round differently, so accuracies agree to a few
    test samples' worth, not bit for bit (1 sample of 64 = 1.5625 points)."""
    cpu = _study(tmp_path, "cpu")
    gpu = _study(tmp_path, "gpu", device="cuda")
    for a, b in zip(cpu.records, gpu.records):
        assert abs(a["test_acc"][-1] - b["test_acc"][-1]) <= 2 * 1.5625
