"""The seed 001 studies beyond Tables 1–6 (issue 11): Fig. 6 training stages (+ Fig. 4 over
stages), Fig. 7 architectures, Fig. 5 across data sets — end to end on tiny settings, resume,
the stage trainer's protocol, and the command line."""
from __future__ import annotations

import json

import pytest
import torch

from linop.cli import main
from linop.studies.posttrain.architectures import architectures_study
from linop.studies.posttrain.datasets import embedding_ablation_across
from linop.studies.posttrain.stages import (
    default_stage_pair,
    load_stage,
    pick_fig4_stages,
    stages_study,
    train_stages,
)
from models.baselines import KConvMFC, conv2_fc1
from models.data import load_dataset

torch.set_num_threads(1)


def _digits(n_train: int = 240, n_test: int = 60) -> dict:
    ds = load_dataset("digits")
    return {"x_train": ds.x_train[:n_train], "y_train": ds.y_train[:n_train], "x_val": ds.x_val[:60],
            "y_val": ds.y_val[:60], "x_test": ds.x_test[:n_test], "y_test": ds.y_test[:n_test]}


def _small(channels=(3, 4)) -> KConvMFC:
    # conv 3x3 + tanh + pool 2 -> 3x3, conv 3x3 + tanh -> 1x1, FC -> 10: L = 3
    return KConvMFC((1, 8, 8), channels, (), 10, "tanh", kernel_size=3)


def _counter():
    calls = []
    return calls, calls.append


def test_stages_study_end_to_end_and_resume(tmp_path):
    data = _digits()
    calls, on_end = _counter()
    kw = dict(stage_epochs=(0, 1, 3), epochs=2, runs=2, report_epochs=(1, 2), out_dir=tmp_path, fig4_samples=6,
              name="small", data_name="digits-sub", print_table=False, batch_size=64, on_run_end=on_end)
    res = stages_study(_small, data, **kw)
    # stage 0 (the initialisation) feeds Fig. 4 only: 2 post-trained stages x 2 methods x 2 runs
    assert len(calls) == 8
    assert [r["stage_epoch"] for r in res.rows] == [1, 3]
    for key in ("table_md", "table_csv", "table_json", "fig6", "config"):
        assert (tmp_path / res.files[key].split("/")[-1]).is_file(), key
    assert res.files["fig4"] and all(p.endswith(".png") for p in res.files["fig4"])
    cfg = json.loads((tmp_path / "config.json").read_text())
    assert cfg["stage_epochs"] == [0, 1, 3] and cfg["pair"] == [1, 2] and cfg["runs"] == 2 and cfg["epochs"] == 2
    assert cfg["data"] == "digits-sub" and "alpha" in cfg and "embedding" in cfg
    # every stage's own results name the stage they post-train
    stage_cfg = json.loads((tmp_path / "stage_0003" / "config.json").read_text())
    assert stage_cfg["baseline"]["stage_epoch"] == 3 and stage_cfg["model"] == "small@epoch3"
    # the table rows are the records' statistics (mean over the 2 runs after epoch 2)
    recs = res.records[3]
    fr = [r["test_acc"][1] for r in recs if r["method"] == "FR"]
    assert res.rows[1]["fr2_mean"] == pytest.approx(sum(fr) / 2, abs=1e-12)
    before = {p.name: p.stat().st_mtime_ns for p in (tmp_path / "stages").iterdir()}
    calls.clear()
    again = stages_study(_small, data, **kw)
    assert calls == []  # resume: nothing recomputed
    assert {p.name: p.stat().st_mtime_ns for p in (tmp_path / "stages").iterdir()} == before  # no retraining
    assert again.rows == res.rows


def test_train_stages_continues_exactly(tmp_path):
    """Training to epoch 3 in one go and training to epoch 1, then rerunning with stages (1, 3),
    give bit-identical weights: the saved optimiser and data-order states continue the run."""
    data = _digits()
    one = train_stages(_small, data, [1, 3], tmp_path / "a", batch_size=64, seed=3)
    train_stages(_small, data, [1], tmp_path / "b", batch_size=64, seed=3)
    two = train_stages(_small, data, [1, 3], tmp_path / "b", batch_size=64, seed=3)
    a, b = load_stage(_small, one[-1]["path"]), load_stage(_small, two[-1]["path"])
    for (ka, va), (kb, vb) in zip(a.state_dict().items(), b.state_dict().items()):
        assert ka == kb and torch.equal(va, vb), ka
    assert one[-1]["test_acc"] == two[-1]["test_acc"]


def test_train_stages_is_models_train_protocol(tmp_path):
    """One epoch of the stage trainer == one epoch of ``models.train.train`` with Adam, no
    weight decay and a constant rate (same seed, data order, initialisation): bit-identical."""
    from models.train import load_checkpoint, train

    meta = train("conv2_fc1", "digits", 1, 1e-3, 256, 0, tmp_path / "m.pt", optimizer="adam", weight_decay=0.0,
                 schedule="constant", activation="tanh", progress=False)
    ref, _ = load_checkpoint(tmp_path / "m.pt")
    ds = load_dataset("digits")
    data = {k: getattr(ds, k) for k in ("x_train", "y_train", "x_test", "y_test")}
    st = train_stages(lambda: conv2_fc1((1, 8, 8), 10, "tanh"), data, [1], tmp_path / "s", lr=1e-3,
                      batch_size=256, seed=0)
    mine = load_stage(lambda: conv2_fc1((1, 8, 8), 10, "tanh"), st[0]["path"])
    for (k, v), (_, w) in zip(ref.state_dict().items(), mine.state_dict().items()):
        assert torch.equal(v, w), k
    assert st[0]["test_acc"] == pytest.approx(100 * meta["test_accuracy"], abs=1e-9)


def test_damaged_stage_is_retrained(tmp_path):
    data = _digits()
    train_stages(_small, data, [1, 2], tmp_path, batch_size=64)
    good = (tmp_path / "stages" / "epoch_0002.pt").read_bytes()
    (tmp_path / "stages" / "epoch_0002.pt").write_bytes(good[: len(good) // 2])  # torn file
    train_stages(_small, data, [1, 2], tmp_path, batch_size=64)
    assert (tmp_path / "stages" / "epoch_0002.pt").read_bytes() != good[: len(good) // 2]
    m = load_stage(_small, tmp_path / "stages" / "epoch_0002.pt")
    assert isinstance(m, KConvMFC)


def test_pick_fig4_stages_and_default_pair():
    curve = [{"epoch": 0, "val_acc": 10.0, "test_acc": 9.0}, {"epoch": 5, "val_acc": 90.0, "test_acc": 89.0},
             {"epoch": 9, "val_acc": 90.0, "test_acc": 91.0}, {"epoch": 20, "val_acc": 85.0, "test_acc": 88.0}]
    assert pick_fig4_stages(curve) == [0, 5, 20]  # earliest best validation on ties
    assert pick_fig4_stages([{k: v for k, v in c.items() if k != "val_acc"} for c in curve]) == [0, 9, 20]
    assert default_stage_pair(5) == (1, 4)  # the paper's Fig. 6 pair on its CIFAR-100 net
    assert default_stage_pair(3) == (1, 2)


@pytest.mark.parametrize("bad", [(), (-1, 2), ("a",)])
def test_bad_stage_epochs(tmp_path, bad):
    with pytest.raises(ValueError, match="stage_epochs"):
        train_stages(_small, _digits(), bad, tmp_path)


def test_architectures_study_end_to_end_and_resume(tmp_path):
    data = _digits()
    calls, on_end = _counter()
    facs = {"(a) 3/4": lambda: _small((3, 4)), "(b) 4/3": lambda: _small((4, 3))}
    kw = dict(baseline_epochs=2, pairs=[(0, 1)], epochs=2, runs=2, report_epochs=(1, 2), out_dir=tmp_path,
              batch_size=64, print_table=False, on_run_end=on_end, data_name="digits-sub")
    res = architectures_study(facs, data, **kw)
    assert len(calls) == 8  # 2 architectures x 2 methods x 2 runs
    for key in ("table_md", "table_csv", "table_json", "fig7"):
        assert (tmp_path / res.files[key].split("/")[-1]).is_file(), key
    assert set(res.curves) == set(facs) and {r["architecture"] for r in res.rows} == set(facs)
    # the reverse steps of both are recorded, each with its case
    for lab in facs:
        assert res.cases[lab] and all(c["case"] in ("MDP", "CCP", "rank-deficient") for c in res.cases[lab])
    # the curve is the mean over the runs of every epoch's accuracy
    table = json.loads((tmp_path / "table.json").read_text())
    assert table["config"]["baseline_epochs"] == 2 and table["config"]["pairs"] == [[0, 1]]
    calls.clear()
    architectures_study(facs, data, **kw)
    assert calls == []


def test_embedding_ablation_across_data_sets(tmp_path):
    torch.manual_seed(0)
    a, b = _small(), _small((4, 3))
    calls, on_end = _counter()
    res = embedding_ablation_across({"d1": (a, _digits()), "d2": (b, _digits(200, 40))}, alpha={"d1": 0.1, "d2": 0.7},
                                    epochs=1, runs=2, out_dir=tmp_path, print_table=False, on_run_end=on_end,
                                    notes={"cifar10": "no --root"})
    assert len(calls) == 2 * 2 * 4  # per data set: FR with MA / NE / one-hot and BP, 2 runs each
    assert {(r["data"], r["method"]) for r in res["rows"]} == {(d, m) for d in ("d1", "d2")
                                                               for m in ("MA", "NE", "one-hot", "BP-PT")}
    assert (tmp_path / "fig5_embeddings_datasets.png").is_file() and (tmp_path / "table.md").is_file()
    assert "cifar10: skipped" in res["markdown"]
    assert json.loads((tmp_path / "config.json").read_text())["alpha"] == {"d1": 0.1, "d2": 0.7}


@pytest.mark.parametrize("argv, msg", [
    (["--study", "stages", "--stage-epochs", "1,x"], "--stage-epochs"),
    (["--study", "stages", "--pairs", "0:1", "1:2"], "one representative pair"),
    (["--study", "architectures", "--arch-epochs", "0"], "--arch-epochs"),
    (["--study", "embeddings", "--datasets", "svhn"], "--datasets"),
])
def test_cli_bad_options(tmp_path, capsys, argv, msg):
    assert main(["posttrain", "--data", "digits", "--out", str(tmp_path), "--no-progress"] + argv) == 2
    err = capsys.readouterr().err
    assert msg in err and len(err.strip().splitlines()) == 1


def test_cli_stages_runs(tmp_path, capsys):
    rc = main(["posttrain", "--study", "stages", "--data", "digits", "--stage-epochs", "1,2", "--epochs", "1",
               "--stage-runs", "1", "--fig4-samples", "4", "--out", str(tmp_path), "--no-progress", "--threads", "1"])
    assert rc == 0
    assert (tmp_path / "fig6_stages.png").is_file() and (tmp_path / "table.md").is_file()
    cfg = json.loads((tmp_path / "config.json").read_text())
    assert cfg["model"] == "conv2_fc1" and cfg["stage_epochs"] == [1, 2]


def test_shipped_mnist5k_baseline():
    """The shipped seed 001 Table 1 baseline: Table 1's #paras per layer (52, 204, 2570), the
    paper's protocol in its metadata, and the recorded test accuracy recomputed from the weights."""
    from models import shipped_checkpoint
    from models.train import evaluate, load_checkpoint

    path = shipped_checkpoint("conv2_fc1_mnist5k")
    assert path.stat().st_size < 100_000
    m, meta = load_checkpoint(path)
    assert [sum(p.numel() for p in blk.parameters()) for blk in [*m.blocks, m.classifier]] == [52, 204, 2570]
    assert (meta["data"], meta["normalize"], meta["optimizer"], meta["lr"], meta["batch_size"]) == \
        ("mnist5k", "instance", "adam", 1e-3, 256)
    assert meta["weight_decay"] == 0.0 and meta["kwargs"]["activation"] == "tanh"
    ds = load_dataset("mnist5k", normalize=meta["normalize"], seed=meta["seed"])
    acc = evaluate(m, ds.x_test, ds.y_test)
    assert acc == meta["test_accuracy"] and acc > 0.93


def test_paper_mode_is_named_in_every_results_file(tmp_path):
    res = stages_study(_small, _digits(), stage_epochs=(1,), epochs=1, runs=1, out_dir=tmp_path, fig4=False,
                       paper=True, batch_size=64, print_table=False, data_name="digits")
    assert json.loads((tmp_path / "config.json").read_text())["mode"] == "paper"
    assert json.loads((tmp_path / "stage_0001" / "config.json").read_text())["mode"] == "paper"
    assert all(r["mode"] == "paper" for r in res.records[1])
    assert "mode paper" in (tmp_path / "table.md").read_text()
    # alpha=None took the paper's α for the data set (Table 1: 0.1), and says so
    assert res.config["alpha"] == 0.1


@pytest.mark.parametrize("kw, msg", [({"pair": (2, 1)}, "(2, 1)"), ({"fig4_epochs": (7,)}, "fig4_epochs"),
                                     ({"fig4_samples": 0}, "fig4_samples")])
def test_stages_bad_options_fail_before_training(tmp_path, kw, msg):
    with pytest.raises(ValueError, match=msg.replace("(", r"\(").replace(")", r"\)")):
        stages_study(_small, _digits(), stage_epochs=(1,), out_dir=tmp_path / "o", print_table=False, **kw)
    assert not (tmp_path / "o" / "stages").exists()  # nothing was trained


def test_cli_embeddings_skips_absent_data_sets(tmp_path):
    rc = main(["posttrain", "--study", "embeddings", "--datasets", "digits", "cifar10", "--epochs", "1",
               "--stage-runs", "1", "--out", str(tmp_path), "--no-progress", "--threads", "1"])
    assert rc == 0
    md = (tmp_path / "table.md").read_text()
    assert "| digits (0.1) |" in md and "cifar10: skipped" in md
    assert json.loads((tmp_path / "config.json").read_text())["skipped"]["cifar10"].startswith("no --root")
