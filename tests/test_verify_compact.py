"""Issue 10, the verification study's compact result files, image ranges, signed view and device.

Facts checked:

* the compact record (signed fine histogram + exact stats) loses no count: decoding it gives
  exactly ``np.bincount`` of the slots of every ε, and the |ε| histogram is the sum of the two
  signs (hypothesis, including 0, ±inf, nan, subnormals and values outside 1e-20..1e20);
* on the real back-map, the compact study's counts and maxima equal those of the full ε
  (``keep_eps``), its median lies inside the stated bounds around ``np.median(|ε|)`` and within
  the stated relative uncertainty; ``keep_eps``'s median *is* ``np.median``;
* shards over ``A:M`` and ``M:B`` plus a run over ``A:B`` leave the same files and summary as
  one run over ``A:B`` (bit for bit);
* bad ranges, indices and devices are refused before anything is written.
"""
from __future__ import annotations

import importlib
import json

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp
from torch import nn

from linop import hypersurface
from linop.studies import errors as E
from linop.studies import report as R

from kit_files import assert_same_npz, npz_payload

V = importlib.import_module("linop.studies.verify")

torch.set_num_threads(1)


def _model(seed: int = 0) -> nn.Module:
    g = torch.Generator().manual_seed(seed)
    m = nn.Sequential(nn.Conv2d(1, 3, 3, padding=1), nn.ReLU(), nn.Conv2d(3, 4, 3, padding=1), nn.LeakyReLU(0.1),
                      nn.AvgPool2d(2), nn.Conv2d(4, 4, 3, padding=1), nn.ReLU(), nn.Flatten(),
                      nn.Linear(4 * 3 * 3, 5)).double().eval()
    with torch.no_grad():
        for p in m.parameters():
            p.copy_(torch.randn(p.shape, generator=g, dtype=torch.float64) * 0.6)
    return m


def _images(n: int, seed: int = 1) -> torch.Tensor:
    return torch.randn(n, 1, 6, 6, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


# ---------------------------------------------------------------------------- the record
_special = st.sampled_from([0.0, -0.0, np.inf, -np.inf, np.nan, 1e-300, -5e-324, 1e-20, 1e20, -1e25, 0.01, -0.01])
_eps = hnp.arrays(np.float64, st.integers(0, 300),
                  elements=st.one_of(st.floats(allow_nan=True, allow_infinity=True, width=64), _special))


@settings(max_examples=150, deadline=None)
@given(_eps, st.floats(1e-6, 1.0))
def test_compact_record_is_lossless(eps, thr):
    c = np.where(np.isfinite(eps), eps, 0.0)  # any c: only its zeros are counted
    rec = E.layer_record(eps, c, thr)
    assert set(rec) == {"stats", "shead", "scount"}
    dense = E.decode_signed(rec["shead"], rec["scount"])
    assert np.array_equal(dense, np.bincount(E.signed_bins(eps), minlength=E.N_SIGNED))
    assert np.array_equal(E.abs_histogram(dense), np.bincount(E.error_bins(np.abs(eps)), minlength=E.N_HIST))
    a = np.abs(eps)
    units, zeros, within, mx, nan = rec["stats"]
    assert (units, zeros, within, nan) == (a.size, (c == 0).sum(), (a <= thr).sum(), np.isnan(a).sum())
    assert (np.isnan(mx) and np.isnan(a).any()) or mx == (a.max() if a.size else 0.0)
    assert dense[0] == (eps == 0).sum() and dense[1] == np.isnan(eps).sum()
    # counts are stored in the smallest unsigned type that holds them
    assert rec["scount"].dtype == np.uint8 or rec["scount"].max() > 255


def test_median_uncertainty_constant():
    # a value v of bin [10^a, 10^(a+s)) and the centre g = 10^(a+s/2): |v/g − 1| ≤ 10^(s/2) − 1
    assert E.LOG10_STEP == 0.001 and E.MEDIAN_REL_UNCERTAINTY == 10 ** 0.0005 - 1


def test_damaged_record_is_refused():
    rec = E.layer_record(np.array([1e-7, -2e-7]), np.ones(2), 0.01)
    with pytest.raises(ValueError, match="damaged"):
        E.decode_signed(rec["shead"], rec["scount"][:1])


# ---------------------------------------------------------------------------- compact vs full ε
@pytest.fixture(scope="module")
def two_modes(tmp_path_factory):
    base = tmp_path_factory.mktemp("modes")
    kw = {"progress": False, "figures": False, "skip_first_conv": False}
    full = V.verify(_model(), _images(5), out_dir=base / "full", keep_eps=True, **kw)
    compact = V.verify(_model(), _images(5), out_dir=base / "compact", **kw)
    return base, full, compact


def test_compact_counts_equal_full_eps_and_median_within_stated_bin(two_modes):
    base, full, compact = two_modes
    exact_keys = ("units", "zeros", "n_within", "share_within", "n_exact", "n_nan", "n_neg", "n_pos", "max_abs")
    for d in ("float32", "float64"):
        for layer in full.layers:
            e = np.concatenate([npz_payload(base / "full" / "images" / d / f"{i:05d}.npz")[f"eps:{layer}"]
                                for i in range(5)])
            a = np.abs(e)
            rf, rc = full.row(layer, d), compact.row(layer, d)
            assert [rc[k] for k in exact_keys] == [rf[k] for k in exact_keys]
            assert rc["n_within"] == (a <= 0.01).sum() and rc["max_abs"] == a.max()
            assert (rc["n_neg"], rc["n_pos"], rc["n_exact"]) == ((e < 0).sum(), (e > 0).sum(), (e == 0).sum())
            # keep_eps: exactly np.median; compact: inside the proven bounds, within the stated uncertainty
            assert rf["median_abs"] == np.median(a) and rf["median_exact"]
            m = np.median(a)
            assert rc["median_lo"] <= m <= rc["median_hi"]
            if m > 0:
                assert not rc["median_exact"]
                assert abs(rc["median_abs"] / m - 1) <= rc["median_rel_uncertainty"] * (1 + 1e-9)
                assert rc["median_rel_uncertainty"] == pytest.approx(E.MEDIAN_REL_UNCERTAINTY, rel=1e-9)


def test_compact_files_hold_the_same_records_and_say_their_mode(two_modes):
    base, _full, _ = two_modes
    for d in ("float32", "float64"):
        for i in range(5):
            pf = npz_payload(base / "full" / "images" / d / f"{i:05d}.npz")
            pc = npz_payload(base / "compact" / "images" / d / f"{i:05d}.npz")
            assert not any(k.startswith("eps:") for k in pc)  # no per-unit ε in compact files
            for k in pc:
                if k != "meta":
                    assert np.array_equal(pc[k], pf[k]) and pc[k].dtype == pf[k].dtype, k
            assert json.loads(str(pc["meta"]))["storage"] == "compact"
    s_full = json.loads((base / "full" / "summary.json").read_text())
    s_comp = json.loads((base / "compact" / "summary.json").read_text())
    assert s_full["storage"] == "keep_eps" and s_full["median"].startswith("exact")
    assert s_comp["storage"] == "compact" and "bin centre" in s_comp["median"]
    assert s_comp["median_rel_uncertainty"] == E.MEDIAN_REL_UNCERTAINTY
    assert s_comp["histogram"]["log10_step"] == 0.001


def test_exact_median_refused_on_compact_files(two_modes):
    base, full, _ = two_modes
    files = sorted((base / "compact" / "images" / "float64").glob("*.npz"))
    with pytest.raises(ValueError, match="keep_eps"):
        V.aggregate(files, full.layers, "float64", exact_median=True)


# ---------------------------------------------------------------------------- image ranges
def test_two_shards_and_a_third_run_equal_one_run(tmp_path):
    x = _images(10, seed=3)
    kw = {"progress": False, "figures": False, "dtypes": ["float64", "float32"]}
    A, M, B = 3, 6, 9
    shard = tmp_path / "shards"
    r1 = V.verify(_model(), x[A:M], indices=range(A, M), out_dir=shard, **kw)
    r2 = V.verify(_model(), x[M:B], indices=range(M, B), out_dir=shard, **kw)
    r3 = V.verify(_model(), x[A:B], indices=range(A, B), out_dir=shard, **kw)
    assert (r1.computed, r2.computed, r3.computed, r3.cached) == (6, 6, 0, 12)
    one = V.verify(_model(), x[A:B], indices=range(A, B), out_dir=tmp_path / "one", **kw)
    assert one.rows == r3.rows and one.indices == list(range(A, B))
    for d in ("float32", "float64"):
        names = sorted(p.name for p in (tmp_path / "one" / "images" / d).iterdir())
        assert names == [f"{i:05d}.npz" for i in range(A, B)]  # named by absolute image number
        for n in names:
            assert_same_npz(tmp_path / "one" / "images" / d / n, shard / "images" / d / n)
    for f in ("summary.json", "summary.csv"):
        assert (tmp_path / "one" / f).read_bytes() == (shard / f).read_bytes(), f
    assert_same_npz(tmp_path / "one" / "histograms.npz", shard / "histograms.npz")
    assert json.loads((shard / "summary.json").read_text())["images"] == f"{A}:{B}"
    idx = json.loads((shard / "index.json").read_text())
    assert sorted(map(int, idx["entries"]["float32"])) == list(range(A, B))  # merged over the shards


def test_bad_indices_refused(tmp_path):
    x = _images(3)
    kw = {"out_dir": tmp_path / "o", "progress": False, "figures": False}
    for bad, msg in (([0, 1], "3"), ([0, 0, 1], "distinct"), ([0, -1, 2], "non-negative"), ([0, True, 2], "non-negative"),
                     ("012", "sequence")):
        with pytest.raises((ValueError, TypeError), match=msg):
            V.verify(_model(), x, indices=bad, **kw)
    with pytest.raises(ValueError, match="figure_image"):
        V.verify(_model(), x, indices=[5, 6, 7], figure_image=0, **kw)
    assert not (tmp_path / "o").exists()


def _cli(argv, capsys):
    from linop.cli import main

    rc = main(["verify"] + argv)
    out = capsys.readouterr()
    return rc, out.out, out.err


@pytest.mark.parametrize("rng, msg", [("5:3", "reversed"), ("4:4", "reversed"), ("x:3", "integers"),
                                      ("-1:3", "≥ 0"), ("1", "A:B"), ("1:2:3", "A:B")])
def test_cli_images_syntax_refused(tmp_path, capsys, rng, msg):
    out = tmp_path / "o"
    rc, _, err = _cli([f"--images={rng}", "--out", str(out)], capsys)
    assert rc == 2 and msg in err and err.count("\n") == 1 and "Traceback" not in err
    assert not out.exists()


def _exact_standin(net, x, layers=None, scale=1.0, dtype=None, memory_budget=None):
    # ĉ = c: enough to check which files a CLI run writes (the study's maths is tested above)
    c = net.to(dtype).preactivations(x.to(dtype).unsqueeze(0))
    return {l: (c[l].reshape(-1), c[l].reshape(-1).clone()) for l in layers}


def test_cli_images_range(tmp_path, capsys, monkeypatch, vgg7_checkpoint):
    monkeypatch.setattr(hypersurface, "reconstructed_activations", _exact_standin)
    out = tmp_path / "o"
    ck = ["--checkpoint", str(vgg7_checkpoint), "--out", str(out), "--no-progress", "--layers", "FC",
          "--dtypes", "float64"]
    rc, _, err = _cli(ck + ["--images", "0:100000"], capsys)
    assert rc == 2 and "test images" in err and err.count("\n") == 1
    assert not (out / "images").exists()
    rc, stdout, err = _cli(ck + ["--images", "2:4"], capsys)
    assert rc == 0, err
    assert "test images 2:4 (2)" in stdout and "| FC | float64 | 2 | 20 |" in stdout
    assert sorted(p.name for p in (out / "images" / "float64").iterdir()) == ["00002.npz", "00003.npz"]
    with pytest.raises(SystemExit) as exc:  # argparse: the two selections exclude each other
        _cli(ck + ["--images", "2:4", "--n-images", "3"], capsys)
    assert exc.value.code == 2 and "not allowed with" in capsys.readouterr().err


# ---------------------------------------------------------------------------- device
def test_device_refused_without_cuda(tmp_path, capsys):
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    with pytest.raises(ValueError, match="CUDA is not available"):
        V.verify(_model(), _images(1), out_dir=tmp_path / "o", progress=False, device="cuda")
    with pytest.raises(ValueError, match="device must be"):
        V.verify(_model(), _images(1), out_dir=tmp_path / "o", progress=False, device="tpu")
    assert not (tmp_path / "o").exists()
    for dev in ("cuda", "cuda:1", "gpu"):
        rc, _, err = _cli(["--device", dev, "--out", str(tmp_path / "o")], capsys)
        assert rc == 2 and "--device" in err and err.count("\n") == 1


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_matches_float64_criterion(tmp_path):
    rep = V.verify(_model(), _images(2), out_dir=tmp_path, progress=False, figures=False, device="cuda")
    assert rep.device.startswith("cuda") and rep.passed["float64"]
    for layer in rep.layers:
        assert rep.row(layer, "float64")["share_within"] == 1.0


# ---------------------------------------------------------------------------- signed view
def test_signed_figure(tmp_path, monkeypatch, two_modes):
    _, full, _ = two_modes
    titles = []
    real = R._savefig
    monkeypatch.setattr(R, "_savefig", lambda fig, path, dpi=110: (titles.append(fig._suptitle.get_text()),
                                                                    real(fig, path, dpi))[1])
    sig = full.signed_histograms["float32"]
    p = R.plot_signed_errors(tmp_path / "s.png", sig, E.LOG10_EDGES, "float32", 0.01)
    assert p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "±0.01 lines lie off this ±0.0001 axis" in titles[-1]  # the paper's axis is ±1e-4
    R.plot_signed_errors(tmp_path / "s2.png", sig, E.LOG10_EDGES, "float32", threshold=5e-5)
    assert "red: ε = ±5e-05" in titles[-1]
    with pytest.raises(ValueError, match="xlim"):
        R.plot_signed_errors(tmp_path / "s3.png", sig, E.LOG10_EDGES, "float32", xlim=0)
    with pytest.raises(ValueError, match="slots"):
        R.plot_signed_errors(tmp_path / "s3.png", {"L": np.zeros(5)}, E.LOG10_EDGES, "float32")
