"""Checkpoints of zoo models (issue 13): ``models.zoo.make_checkpoint`` / ``python -m
models.zoo`` write a random-weight checkpoint that ``models.train.load_checkpoint`` rebuilds
and ``linop verify --checkpoint`` verifies on the bundled ``photos<size>`` data set.

The end-to-end test runs the real command line (``linop.cli.main``) on one image in float64
for a ResNet, a DenseNet (concatenation) and a U-Net (upsampling + concatenation): exit status
0 and the float64 criterion (every unit of every verified layer within |ε| ≤ 1 %, seed 000
§4.3) recorded as passed.  CI uses widths 1/8 and a DenseNet of four 2-layer blocks;
``LINOP_ZOO_FULL=1`` uses DenseNet-121's depth.
"""
from __future__ import annotations

import json
import os

import pytest
import torch

from models.data import load_dataset, photo_crops
from models.train import MODELS, build_model, load_checkpoint
from models.zoo import WEIGHTS, ZOO, make_checkpoint
from models.zoo.__main__ import main as zoo_main

FULL = os.environ.get("LINOP_ZOO_FULL", "") == "1"


pytestmark = pytest.mark.usefixtures("one_thread")


def test_zoo_is_registered_for_build_model():
    assert set(ZOO) <= set(MODELS)
    m = build_model("resnet34", num_classes=7, width=0.125).eval()
    assert m(torch.zeros(1, 3, 32, 32)).shape == (1, 7)


@pytest.mark.parametrize("name, size, kw", [
    ("resnet18", 32, {}), ("densenet121", 32, {"block_config": (2, 2, 2, 2)}),
    ("unet_bicubic", 16, {}), ("alexnet", 32, {"small_input": True, "hidden": 16}),
    ("shufflenet_v2", 32, {"stages_repeats": (1, 1, 1)})])
def test_make_checkpoint_round_trip(tmp_path, name, size, kw):
    """load_checkpoint rebuilds the same function from the metadata alone (same outputs on the
    checkpoint's own data, bit for bit: same float32 weights, same kernels)."""
    path = tmp_path / f"{name}.pt"
    meta = make_checkpoint(name, path, input_size=size, width=0.125, seed=3, **kw)
    model, m2 = load_checkpoint(path)
    assert m2 == meta and meta["model"] == name and meta["input_shape"] == [3, size, size]
    assert meta["data"] == f"photos{size}" and meta["weights"] == WEIGHTS
    assert meta["normalize"] == "none" and meta["kwargs"]["width"] == 0.125
    x = load_dataset(meta["data"]).x_test[:2]
    ref = ZOO[name](**meta["kwargs"])
    ref.load_state_dict(torch.load(path, weights_only=True)["state_dict"])
    with torch.no_grad():
        assert torch.equal(model(x), ref.eval()(x))
    # BatchNorm running statistics are random, not torch's defaults (0, 1)
    bns = [b for b in model.modules() if isinstance(b, torch.nn.BatchNorm2d)]
    assert all(b.running_var.min() >= 0.5 and b.running_mean.abs().sum() > 0 for b in bns)


def test_make_checkpoint_is_deterministic(tmp_path):
    a, b = tmp_path / "a.pt", tmp_path / "b.pt"
    for p in (a, b):
        make_checkpoint("squeezenet1_1", p, width=0.125, seed=5)
    sa, sb = (torch.load(p, weights_only=True)["state_dict"] for p in (a, b))
    assert all(torch.equal(sa[k], sb[k]) for k in sa)


@pytest.mark.parametrize("args, word", [
    (("nope",), "name"), (("resnet18",), "input_size"), (("alexnet",), "small_input"),
])
def test_make_checkpoint_refusals(tmp_path, args, word):
    kw = {"input_size": 0} if word == "input_size" else {}
    with pytest.raises(ValueError, match=word):
        make_checkpoint(args[0], tmp_path / "x.pt", width=0.125, **kw)
    with pytest.raises(ValueError, match="width"):
        make_checkpoint("resnet18", tmp_path / "x.pt", width=-1.0)
    assert not (tmp_path / "x.pt").exists()


def test_zoo_command_line(tmp_path, capsys):
    out = tmp_path / "m.pt"
    assert zoo_main(["mobilenet_v2", str(out), "--size", "32", "--width", "0.125"]) == 0
    assert "mobilenet_v2" in capsys.readouterr().out and load_checkpoint(out)[1]["model"] == "mobilenet_v2"
    for bad in (["nope", str(out)], ["alexnet", str(out), "--width", "0.125"],
                ["resnet18", str(out), "--kwargs", "[1]"], ["resnet18", str(out), "--kwargs", "{x"]):
        with pytest.raises(SystemExit) as e:
            zoo_main(bad)
        assert e.value.code == 2
    err = capsys.readouterr().err
    assert "small_input" in err and "JSON" in err


def test_photos_data_set():
    """120 crops of the two sample photos, 80 / 20 / 20, labels = source photo, any size."""
    for size in (16, 37):
        ds = load_dataset(f"photos{size}")
        assert ds.x_train.shape == (80, 3, size, size) and ds.x_val.shape == ds.x_test.shape == (20, 3, size, size)
        assert ds.input_shape == (3, size, size) and ds.classes == ["china", "flower"]
        for x, y in ds.splits().values():
            assert x.min() >= 0 and x.max() <= 1 and set(y.tolist()) == {0, 1}
    x, y = photo_crops(16)
    assert torch.equal(x, photo_crops(16)[0]) and (y == 0).sum() == (y == 1).sum() == 60
    # distinct crops (no two images equal) and natural-image statistics (not constant)
    assert torch.unique(x.reshape(120, -1), dim=0).shape[0] == 120 and x.std() > 0.1
    for bad in ("photos", "photos7", "photos0", "photos08", "photos513", "photos²"):
        with pytest.raises(ValueError, match="photos|name"):
            load_dataset(bad)


VERIFY_CASES = [("resnet18", 32, {}), ("unet_bilinear", 16, {}),
                ("densenet121", 32, {} if FULL else {"block_config": (2, 2, 2, 2)})]


@pytest.mark.parametrize("name, size, kw", VERIFY_CASES)
def test_linop_verify_accepts_zoo_checkpoint(tmp_path, capsys, name, size, kw):
    """``linop verify --checkpoint X.pt`` on the checkpoint's own data: exit 0, float64 PASS."""
    from linop.cli import main

    ck = tmp_path / f"{name}.pt"
    make_checkpoint(name, ck, input_size=size, width=0.125, **kw)
    out = tmp_path / "out"
    rc = main(["verify", "--checkpoint", str(ck), "--n-images", "1", "--dtypes", "float64",
               "--out", str(out), "--no-progress"])
    text = capsys.readouterr().out
    assert rc == 0, text
    summary = json.loads((out / "summary.json").read_text())
    assert summary["passed"] == {"float64": True}
    assert f"photos{size}" in text and "PASS float64" in text
