"""Issue 12, step 1: the rows of its table — no silent wrong number, one-line errors, exit
codes, safe loading, damaged caches rebuilt, no duplicate records, no temporary files left."""
from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

import linop
from linop.cli import main
from linop.studies import store

torch.set_num_threads(1)


def _net():
    torch.manual_seed(0)
    m = nn.Sequential(nn.Conv2d(1, 2, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(32, 5)).double().eval()
    return linop.from_torch(m, (1, 4, 4))


def _x(seed: int = 1) -> torch.Tensor:
    return torch.randn(1, 4, 4, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


# ---------------------------------------------------------------------------- row 1: unit selections
def test_backmap_boolean_mask_is_a_selection_not_indices():
    net, x = _net(), _x()
    mask = np.zeros(5, dtype=bool)
    mask[[1, 3]] = True
    by_mask = linop.backmap(net, x, "FC", mode="RM0", units=mask)
    by_index = linop.backmap(net, x, "FC", mode="RM0", units=[1, 3])
    assert by_mask.units.tolist() == [1, 3]  # before: read as indices [0, 1, 0, 1, 0], 5 rows
    assert torch.equal(by_mask.image, by_index.image) and torch.equal(by_mask.bias, by_index.bias)
    with pytest.raises(ValueError, match="units: a boolean mask must have one entry per unit"):
        linop.backmap(net, x, "FC", mode="RM0", units=np.array([True] + [False] * 9))


@pytest.mark.parametrize("units, needle", [([1.7], "floats"), ([], "selects no unit"), ([1, 1], "repeats")])
def test_backmap_bad_units_raise_value_error(units, needle):
    net, x = _net(), _x()
    for mode, layer in (("RM0", "FC"), ("RM2", "Conv0"), ("RM1", "Conv0")):
        with pytest.raises(ValueError, match=needle):
            linop.backmap(net, x, layer, mode=mode, units=units)


# ---------------------------------------------------------------------------- row 2: images, dtypes
@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_images_are_refused(bad):
    net, x = _net(), _x()
    x[0, 2, 1] = bad
    with pytest.raises(ValueError, match="x holds 1 NaN / Inf"):
        linop.backmap(net, x, "FC", mode="RM0")
    with pytest.raises(ValueError, match="x holds 1 NaN / Inf"):
        linop.linearise(net, x)
    with pytest.raises(ValueError, match="x holds 1 NaN / Inf"):
        linop.reconstruct(net, x.unsqueeze(0), [0])
    with pytest.raises(ValueError, match="images holds 1 NaN / Inf"):
        linop.verify(net, x.unsqueeze(0), out_dir="unused", progress=False)


def test_half_precision_is_refused_like_from_torch():
    net, x = _net(), _x()
    for dt in (torch.float16, torch.bfloat16):
        with pytest.raises(ValueError, match="dtype must be float32 or float64"):
            linop.backmap(net, x, "FC", mode="RM0", dtype=dt)
        with pytest.raises(ValueError, match="dtype must be float32 or float64"):
            linop.linearise(net, x, dtype=dt)
        with pytest.raises(ValueError, match=f"x has dtype {dt}"):
            linop.backmap(net, x.to(dt), "FC", mode="RM0")
        with pytest.raises(ValueError, match=f"x has dtype {dt}"):
            linop.reconstruct(net, x.unsqueeze(0).to(dt), [0])


def test_reconstruct_empty_batch():
    net = _net()
    with pytest.raises(ValueError, match="x is an empty batch"):
        linop.reconstruct(net, torch.zeros(0, 1, 4, 4, dtype=torch.float64), [])


def test_integer_image_is_cast_exactly():
    net = _net()
    xi = torch.arange(16).reshape(1, 4, 4) - 8
    a = linop.backmap(net, xi, "FC", mode="RM0", units=[0, 4])
    b = linop.backmap(net, xi.double(), "FC", mode="RM0", units=[0, 4])
    assert torch.equal(a.image, b.image) and torch.equal(a.bias, b.bias)


# ---------------------------------------------------------------------------- row 3: dottest
def test_dottest_takes_plain_arrays():
    yAx, xAty = linop.dottest(np.eye(3), rng=0)
    assert yAx == xAty  # the identity: both sides are the same three products, summed alike
    with pytest.raises(TypeError, match="^op must be"):
        linop.dottest("not an operator")


# ---------------------------------------------------------------------------- rows 4-6: CLI
def _cli(argv, capsys):
    rc = main(argv)
    err = capsys.readouterr().err.strip()
    return rc, err


@pytest.mark.parametrize("cmd", ["verify", "reconstruct", "posttrain"])
def test_out_empty_or_a_file_is_one_line_exit_2(cmd, tmp_path, capsys):
    afile = tmp_path / "taken"
    afile.write_text("keep me")
    for out, needle in (("", "--out is empty"), (str(afile), "is an existing file")):
        rc, err = _cli([cmd, "--out", out], capsys)
        assert rc == 2 and err.startswith(f"linop {cmd}: error: ") and needle in err, err
        assert "\n" not in err and "Traceback" not in err
    assert afile.read_text() == "keep me"


def test_study_out_dir_refusals(tmp_path):
    afile = tmp_path / "f"
    afile.write_text("")
    with pytest.raises(ValueError, match="out_dir is empty"):
        store.output_dir("")
    with pytest.raises(NotADirectoryError, match="out_dir .* existing file"):
        store.output_dir(afile)
    with pytest.raises(NotADirectoryError, match="is a file"):
        store.output_dir(afile / "sub")
    assert store.output_dir(tmp_path / "a" / "b").is_dir()


def test_demo_huge_size_is_a_memory_refusal(capsys):
    rc, err = _cli(["demo", "--size", "100000"], capsys)
    assert rc == 2 and "GiB" in err and "--memory-budget" in err and "\n" not in err, err


def test_ctrl_c_exits_130_with_one_line(monkeypatch, tmp_path, capsys):
    import linop.studies.verify as V

    def interrupted(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(V, "verify", interrupted)
    monkeypatch.delenv("LINOP_TRACEBACK", raising=False)
    rc, err = _cli(["verify", "--out", str(tmp_path / "o"), "--n-images", "1"], capsys)
    assert rc == 130 and "Traceback" not in err
    assert err == f"linop verify: interrupted; finished results are kept in {tmp_path / 'o'}; rerun the same command to resume"


def test_verify_exits_1_when_a_criterion_fails(monkeypatch, tmp_path, capsys, vgg7_checkpoint):
    import linop.studies.verify as V

    monkeypatch.setattr(V, "CRITERIA", {"float64": 1.01})  # unreachable: > 100 % of units
    ck = ["verify", "--checkpoint", str(vgg7_checkpoint), "--n-images", "1", "--layers", "FC",
          "--dtypes", "float64", "--no-progress"]
    rc, err = _cli(ck + ["--out", str(tmp_path / "a")], capsys)
    assert rc == 1 and "criteria FAILED for float64" in err, err
    rc, err = _cli(ck + ["--out", str(tmp_path / "a"), "--no-strict"], capsys)
    assert rc == 0, err
    monkeypatch.setattr(V, "CRITERIA", {"float64": 1.0})
    rc, err = _cli(ck + ["--out", str(tmp_path / "a")], capsys)
    assert rc == 0, err


# ---------------------------------------------------------------------------- row 7: checkpoints
def test_checkpoint_of_another_model_is_one_line(tmp_path, vgg7_checkpoint, capsys):
    train = pytest.importorskip("models.train")
    ck = torch.load(vgg7_checkpoint, weights_only=True)
    ck["meta"] = {**ck["meta"], "model": "resnet20"}
    bad = tmp_path / "swapped.pt"
    torch.save(ck, bad)
    with pytest.raises(ValueError, match="swapped.pt: the weights do not belong to model 'resnet20'"):
        train.load_checkpoint(bad)
    rc, err = _cli(["verify", "--checkpoint", str(bad), "--out", str(tmp_path / "o")], capsys)
    assert rc == 2 and "swapped.pt" in err and "missing" in err and "\n" not in err, err


def test_checkpoint_write_error_leaves_no_temporary_file(tmp_path, monkeypatch):
    train = pytest.importorskip("models.train")
    model = nn.Linear(3, 2)

    def torn_save(obj, fh, *a, **k):
        fh.write(b"\0" * 1000)  # a partial write, then the failure
        raise OSError("disk full")

    monkeypatch.setattr(train.torch, "save", torn_save)
    with pytest.raises(OSError, match="disk full"):
        train.save_checkpoint(tmp_path / "m.pt", model, {"model": "x"})
    assert list(tmp_path.iterdir()) == []


# ---------------------------------------------------------------------------- row 8: CIFAR pickles
class _Hostile:
    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def test_hostile_cifar_pickle_never_runs(tmp_path):
    data = pytest.importorskip("models.data")
    marker = tmp_path / "PWNED"
    root = tmp_path / "cifar-10-batches-py"
    root.mkdir()
    batch = {b"data": np.zeros((2, 3072), np.uint8), b"labels": [0, 1], b"x": _Hostile(marker)}
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch", "batches.meta"]:
        with open(root / name, "wb") as fh:
            pickle.dump(batch if name != "batches.meta" else {b"label_names": [b"a"], b"x": _Hostile(marker)}, fh,
                        protocol=2)
    with pytest.raises(ValueError, match="refused global"):
        data.load_dataset("cifar10", root=tmp_path)
    assert not marker.exists()


def test_cifar_unpickler_still_reads_arrays(tmp_path):
    data = pytest.importorskip("models.data")
    arr = np.arange(6, dtype=np.uint8).reshape(2, 3)
    for proto in (2, 4):
        p = tmp_path / f"b{proto}"
        p.write_bytes(pickle.dumps({b"data": arr, b"labels": [3, 4]}, protocol=proto))
        d = data._unpickle(p, (b"data", b"labels"))
        assert np.array_equal(d[b"data"], arr) and d[b"labels"] == [3, 4]


# ---------------------------------------------------------------------------- row 9: caches, records
def test_truncated_astar_cache_is_rebuilt(tmp_path):
    from linop.studies.posttrain import reconstruct_features
    from kit_posttrain import CountingReconstructor, tiny_data, tiny_model

    net, d = tiny_model(), tiny_data()
    kw = dict(cache_dir=tmp_path, chunk_size=40, progress=False)
    ref = reconstruct_features(net, 2, d["x_train"], d["y_train"], reconstructor=CountingReconstructor(), **kw)
    (path,) = tmp_path.glob("astar_*.pt")
    torch.save({"key": "foreign", "a_star": torch.zeros(1)}, tmp_path / "other.pt")

    def flip_in_data(b: bytes) -> bytes:  # one bit of a* itself: the file still loads
        at = b.index(ref.numpy().tobytes()[:64]) + 5
        return b[:at] + bytes([b[at] ^ 1]) + b[at + 1:]

    for damage in (lambda b: b[: len(b) // 2], flip_in_data, lambda b: b"",
                   lambda b: (tmp_path / "other.pt").read_bytes()):
        path.write_bytes(damage(path.read_bytes()))
        rc = CountingReconstructor()
        out = reconstruct_features(net, 2, d["x_train"], d["y_train"], reconstructor=rc, **kw)
        assert rc.chunk_calls == 3 and torch.equal(out, ref)  # detected, recomputed, bit-identical
        assert store.load_pt(path) is not None  # and rewritten whole
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporary files


def test_concurrent_appends_write_each_record_once(tmp_path):
    path = tmp_path / "results.jsonl"
    rec = {"key": "a", "config_hash": "h", "acc": 1.0}
    assert store.append_jsonl(path, rec, unique=("key", "config_hash"))
    assert not store.append_jsonl(path, dict(rec), unique=("key", "config_hash"))  # the second run's copy
    assert store.append_jsonl(path, {**rec, "config_hash": "other"}, unique=("key", "config_hash"))
    assert len(store.read_jsonl(path)) == 2


def test_two_studies_on_one_out_dir_write_no_duplicates(tmp_path):
    """The second run finds every record written (here: by the first, sequentially) and the
    locked, keyed append keeps a run that raced it from duplicating them."""
    from kit_posttrain import CountingReconstructor, tiny_data, tiny_model
    from linop.studies.posttrain import posttrain_study
    import linop.studies.posttrain.study as S

    kw = dict(pairs=[(2, 3)], epochs=1, runs=1, batch_size=32, progress=False, print_table=False,
              reconstructor=CountingReconstructor(), out_dir=tmp_path)
    posttrain_study(tiny_model(), tiny_data(), **kw)
    first = store.read_jsonl(tmp_path / "results.jsonl")
    # a racing run: it did not see the records when it started, so it runs every task again
    real = store.read_jsonl
    S.store.read_jsonl = lambda p: []
    try:
        posttrain_study(tiny_model(), tiny_data(), **kw)
    finally:
        S.store.read_jsonl = real
    again = store.read_jsonl(tmp_path / "results.jsonl")
    assert len(again) == len(first) and [r["key"] for r in again] == [r["key"] for r in first]


@pytest.mark.parametrize("folded", [True, False])
def test_batchnorm_with_negative_running_var_names_the_module(folded):
    """Issue 12: a BatchNorm with running_var < 0 used to fail later as 'Conv2d: weight contains
    NaN or inf' (wrong culprit, no layer name); it must name the BatchNorm and the channel."""
    import torch.nn as nn

    from linop.convert import from_torch

    layers = [nn.Conv2d(1, 2, 3), nn.BatchNorm2d(2), nn.ReLU()] if folded else \
        [nn.Conv2d(1, 2, 3), nn.ReLU(), nn.BatchNorm2d(2)]
    m = nn.Sequential(*layers).eval()
    bn = m[1] if folded else m[2]
    with torch.no_grad():
        bn.running_var[1] = -0.5
    with pytest.raises(ValueError, match=r"BatchNorm '[12]'.*running_var.*channel 1"):
        from_torch(m, (1, 5, 5))
