"""Tests of the verification study (seed 000 §4.2-4.3, Eq. 16) and its reports.

Most tests isolate the study's own bookkeeping (ε, aggregation, caching, figures, CLI) by
replacing the back-map the study calls (``linop.hypersurface.reconstructed_activations``)
with an independent stand-in: ĉ = J [x; x_b] with J from torch autograd at the scaled point
k·[x; x_b].  ``test_end_to_end_real_backmap`` runs the real
``linop.backmap`` on a random piecewise-linear model.
"""
from __future__ import annotations

import importlib
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from linop import hypersurface
from linop.studies import errors as E
from linop.studies import report as R

# the module itself: the package attribute ``linop.verify`` is the function
V = importlib.import_module("linop.studies.verify")

torch.set_num_threads(1)

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


# ---------------------------------------------------------------------------- fixtures
def _tiny_torch(seed: int = 0, act: nn.Module | None = None) -> nn.Module:
    g = torch.Generator().manual_seed(seed)
    m = nn.Sequential(
        nn.Conv2d(1, 2, 3, padding=1), nn.BatchNorm2d(2), act or nn.ReLU(),
        nn.Conv2d(2, 3, 3, padding=1), nn.LeakyReLU(0.1),
        nn.AvgPool2d(2), nn.Flatten(), nn.Linear(3 * 2 * 2, 4),
    ).double()
    with torch.no_grad():
        for p in m.parameters():
            p.copy_(torch.randn(p.shape, generator=g, dtype=torch.float64) * 0.7)
        m[1].running_mean.copy_(torch.randn(2, generator=g, dtype=torch.float64) * 0.1)
        m[1].running_var.copy_(torch.rand(2, generator=g, dtype=torch.float64) + 0.5)
    return m.eval()


def _tiny_net(seed: int = 0):
    from linop.convert import from_torch

    return from_torch(_tiny_torch(seed), (1, 4, 4), torch.float64)


def _images(n: int, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 1, 4, 4, generator=g, dtype=torch.float64)


class StandIn:
    """Independent ĉ: the autograd Jacobian of the pre-bias value w.r.t. [x; x_b] at
    k·[x; x_b], applied to [x; x_b].  Counts its calls."""

    def __init__(self):
        self.calls = 0

    def __call__(self, net, x, layers=None, scale=1.0, dtype=None, memory_budget=None):
        self.calls += 1
        net = net.to(dtype)
        x = x.to(dtype)
        xb = net.x_b.to(dtype)
        out = {}
        for layer in layers:
            f = lambda xx, bb: net.preactivations(xx.unsqueeze(0), bb)[layer].reshape(-1)  # noqa: E731
            Jx, Jb = torch.autograd.functional.jacobian(f, (scale * x, scale * xb))
            c_hat = Jx.reshape(Jx.shape[0], -1) @ x.reshape(-1) + Jb @ xb
            out[layer] = (f(x, xb).detach(), c_hat.detach())
        return out


@pytest.fixture
def standin(monkeypatch):
    s = StandIn()
    monkeypatch.setattr(hypersurface, "reconstructed_activations", s)
    return s


def _load_eps(out: Path, dtype: str, n: int, layer: str) -> np.ndarray:
    parts = []
    for i in range(n):
        with np.load(out / "images" / dtype / f"{i:05d}.npz") as z:
            parts.append(z[f"eps:{layer}"])
    return np.concatenate(parts)


# ---------------------------------------------------------------------------- Eq. 16
def test_relative_error_hand_checked():
    # binary-exact numbers, so every quotient below is exact in float64
    c = np.array([4.0, -2.0, 0.0, 0.0, 8.0])
    c_hat = np.array([4.0 + 2.0**-20, -2.5, 0.0, 2.0**-100, 8.0])
    e32 = V.relative_error(c, c_hat, "float32")
    # (ĉ−c)/c: 2^-20/4 = 2^-22; (−2.5+2)/(−2) = +0.25; 0/tiny = 0;
    # 2^-100 / tiny32 (= 2^-126, smallest normal float32) = 2^26
    assert e32.tolist() == [2.0**-22, 0.25, 0.0, 2.0**26, 0.0]
    assert np.finfo(np.float32).tiny == 2.0**-126
    e64 = V.relative_error(c, c_hat, torch.float64)
    assert e64[3] == 2.0**-100 / 2.0**-1022 == 2.0**922  # zeros replaced by float64's tiny
    assert e64[[0, 1, 2, 4]].tolist() == [2.0**-22, 0.25, 0.0, 0.0]
    with pytest.raises(ValueError, match="shape"):
        V.relative_error(c, c_hat[:3], "float32")


def test_error_bins_layout_and_monotone():
    a = np.array([0.0, 1e-25, 1e-20, 1.5e-7, 0.01, 1e20, np.inf, np.nan])
    b = V.error_bins(a)
    assert b[0] == 0 and b[1] == 1 and b[2] == 2  # ε = 0, underflow, first fine bin
    assert b[5] == b[6] == V.N_FINE + 2 and b[7] == V.N_FINE + 3  # overflow incl. inf; nan last
    k = b[3] - 2  # 1.5e-7 lies in [10^(lo+k·step), 10^(lo+(k+1)·step))
    assert 10 ** V.LOG10_EDGES[k] <= 1.5e-7 < 10 ** V.LOG10_EDGES[k + 1]
    v = np.sort(np.abs(np.random.default_rng(0).standard_normal(20000)) * 10.0 ** np.random.default_rng(1).integers(-19, 19, 20000))
    assert np.all(np.diff(V.error_bins(v)) >= 0)  # the exact median relies on this


# ---------------------------------------------------------------------------- aggregation
def _write_fake(path: Path, eps: np.ndarray, c: np.ndarray, thr: float = 0.01, keep_eps: bool = True):
    rec = E.layer_record(eps, c, thr, keep_eps=keep_eps)
    np.savez(path, meta=np.array("{}"), **{f"{k}:L": v for k, v in rec.items()})
    return path


@pytest.mark.parametrize("counts", [(5, 4), (6, 4), (1, 0), (3, 3)])
def test_aggregate_equals_direct(tmp_path, counts):
    rng = np.random.default_rng(sum(counts))
    files, all_eps, all_c = [], [], []
    for j, n in enumerate(counts):
        # clusters of values inside one fine bin, exact zeros, signs, a few large errors
        eps = np.concatenate([1e-7 * (1 + 1e-6 * rng.random(n)), np.zeros(n // 2), -3e-2 * rng.random(n // 3 + 1)])
        eps *= rng.choice([-1.0, 1.0], eps.size)
        c = rng.standard_normal(eps.size)
        c[: n // 3] = 0.0
        all_eps.append(eps)
        all_c.append(c)
        files.append(_write_fake(tmp_path / f"{j}.npz", eps, c))
    rows, hists, _ = V.aggregate(files, ["L"], "float32")
    r = rows[0]
    e = np.abs(np.concatenate(all_eps))
    c = np.concatenate(all_c)
    assert r["units"] == e.size and r["zeros"] == int((c == 0).sum())
    assert r["n_within"] == int((e <= 0.01).sum()) and r["share_within"] == (e <= 0.01).mean()
    assert r["max_abs"] == e.max()
    assert r["median_abs"] == np.median(e) and r["median_exact"]  # exact, not a bin estimate
    assert r["n_exact"] == int((e == 0).sum()) and hists["L"].sum() == e.size


def test_aggregate_median_memory_fallback(tmp_path):
    eps = 1e-7 * (1 + 1e-9 * np.arange(101.0))  # all in one fine bin
    f = _write_fake(tmp_path / "a.npz", eps, np.ones_like(eps))
    rows, _, _ = V.aggregate([f], ["L"], "float32", memory_budget=64)  # 101 values · 8 B > 64 B
    r = rows[0]
    assert not r["median_exact"]
    assert r["median_lo"] <= np.median(eps) <= r["median_hi"]
    # the bin's geometric centre is within half a bin (0.0005 decade) of the true median
    assert abs(math.log10(r["median_abs"]) - math.log10(np.median(eps))) <= V.LOG10_STEP / 2 + 1e-12


# ---------------------------------------------------------------------------- the study
def test_study_with_standin_float64_exact_and_direct(tmp_path, standin):
    net = _tiny_net()
    x = _images(3)
    rep = V.verify(net, x, out_dir=tmp_path, progress=False, figures=False, keep_eps=True)
    assert rep.layers == ["Conv1", "FC"]  # first conv skipped (seed 000 §3.3), FC kept
    assert standin.calls == 3 * 2 and rep.computed == 6 and rep.cached == 0
    for layer, units in (("Conv1", 3 * 4 * 4), ("FC", 4)):
        # float64: the autograd stand-in reproduces c to rounding, so 100 % within 1 %
        assert rep.row(layer, "float64")["share_within"] == 1.0
        assert rep.row(layer, "float64")["units"] == 3 * units
        # the stored ε are Eq. 16 of the stand-in's own c, ĉ (recomputed directly here)
        rec = [StandIn()(net, x[i], [layer], 0.125, torch.float32) for i in range(3)]
        c = np.concatenate([np.asarray(net.to(torch.float32).preactivations(x[i:i + 1].float())[layer]).reshape(-1) for i in range(3)])
        direct = V.relative_error(c, np.concatenate([r[layer][1].numpy() for r in rec]), "float32")
        np.testing.assert_array_equal(_load_eps(tmp_path, "float32", 3, layer), direct)
        e = np.abs(direct)
        r32 = rep.row(layer, "float32")
        assert r32["share_within"] == (e <= 0.01).mean() and r32["max_abs"] == e.max() and r32["median_abs"] == np.median(e)
    assert rep.passed == {"float32": True, "float64": True}
    s = json.loads((tmp_path / "summary.json").read_text())
    assert s["rows"][0]["layer"] == "Conv1" and s["passed"]["float64"] is True
    csv = (tmp_path / "summary.csv").read_text().splitlines()
    assert csv[0].startswith("layer,dtype") and len(csv) == 1 + 4
    md = rep.markdown()
    assert md.count("\n") == 2 + 4 - 1 and "| Conv1 | float64 | 3 | 144 |" in md


def test_include_first_conv_and_layer_selection(tmp_path, standin):
    net = _tiny_net()
    rep = V.verify(net, _images(1), dtypes=["float64"], skip_first_conv=False, out_dir=tmp_path, progress=False, figures=False)
    assert rep.layers == ["Conv0", "Conv1", "FC"]
    rep = V.verify(net, _images(1), dtypes=["float64"], layers=["FC"], out_dir=tmp_path / "b", progress=False, figures=False)
    assert rep.layers == ["FC"] and rep.row("FC", "float64")["share_within"] == 1.0


def test_resume_computes_only_new_images(tmp_path, standin):
    net = _tiny_net()
    x = _images(3)
    V.verify(net, x[:2], out_dir=tmp_path / "a", progress=False, figures=False)
    assert standin.calls == 2 * 2
    standin.calls = 0
    rep = V.verify(net, x, out_dir=tmp_path / "a", progress=False, figures=False)
    assert standin.calls == 1 * 2  # one new image, two dtypes
    assert rep.computed == 2 and rep.cached == 4
    fresh = V.verify(net, x, out_dir=tmp_path / "b", resume=False, progress=False, figures=False)
    assert rep.rows == fresh.rows  # identical summary to a fresh 3-image run
    # the same study again: nothing recomputed; --no-resume recomputes everything
    standin.calls = 0
    V.verify(net, x, out_dir=tmp_path / "a", progress=False, figures=False)
    assert standin.calls == 0
    V.verify(net, x, out_dir=tmp_path / "a", resume=False, progress=False, figures=False)
    assert standin.calls == 6


def test_changed_model_or_scale_invalidates_cache(tmp_path, standin):
    x = _images(2)
    V.verify(_tiny_net(0), x, out_dir=tmp_path, progress=False, figures=False)
    standin.calls = 0
    V.verify(_tiny_net(0), x, out_dir=tmp_path, progress=False, figures=False)  # same weights rebuilt
    assert standin.calls == 0
    m = _tiny_torch(0)
    with torch.no_grad():
        m[3].weight[0, 0, 0, 0] += 1e-12  # one weight changed by 1e-12
    from linop.convert import from_torch

    rep = V.verify(from_torch(m, (1, 4, 4)), x, out_dir=tmp_path, progress=False, figures=False)
    assert standin.calls == 4 and rep.cached == 0
    standin.calls = 0
    V.verify(from_torch(m, (1, 4, 4)), x, scale=0.5, out_dir=tmp_path, progress=False, figures=False)
    assert standin.calls == 4
    # a torch module and its checkpoint-free conversion hash the network content
    assert V.model_hash(_tiny_net(0)) == V.model_hash(_tiny_net(0)) != V.model_hash(_tiny_net(1))


def test_interrupted_run_keeps_finished_images(tmp_path, monkeypatch):
    net = _tiny_net()
    x = _images(3)
    inner = StandIn()

    def flaky(*a, **k):
        if inner.calls == 3:  # dies during image 1, dtype float64
            raise KeyboardInterrupt
        return inner(*a, **k)

    monkeypatch.setattr(hypersurface, "reconstructed_activations", flaky)
    with pytest.raises(KeyboardInterrupt):
        V.verify(net, x, out_dir=tmp_path, progress=False, figures=False)
    idx = json.loads((tmp_path / "index.json").read_text())
    # every finished (image, dtype) is indexed: image 0 both dtypes, image 1 float32
    assert set(idx["entries"]["float32"]) == {"0", "1"} and set(idx["entries"]["float64"]) == {"0"}
    inner.calls = 0
    monkeypatch.setattr(hypersurface, "reconstructed_activations", inner)
    rep = V.verify(net, x, out_dir=tmp_path, progress=False, figures=False)
    assert rep.cached == 3 and inner.calls == 3  # image 0 both dtypes + image 1 float32 reused


def test_figures_written(tmp_path, standin):
    rep = V.verify(_tiny_net(), _images(2), out_dir=tmp_path, progress=False, figure_channels=[0, 2])
    for name in ("hist_float32.png", "hist_float64.png", "feature_maps_Conv1_float32.png", "feature_maps_Conv1_float64.png"):
        p = tmp_path / name
        assert rep.files[name] == p
        data = p.read_bytes()
        assert data[:8] == PNG_MAGIC and len(data) > 2000
    with np.load(tmp_path / "histograms.npz") as z:
        assert z["float64:Conv1"].sum() == 2 * 48 and z["float64:Conv1:signed"].sum() == 2 * 48
    for name in ("signed_float32.png", "signed_float64.png"):
        assert (tmp_path / name).read_bytes()[:8] == PNG_MAGIC
    # c, ĉ of the figure layer for the figure image only (absolute image 0 here)
    assert sorted(p.name for p in (tmp_path / "maps" / "float32").iterdir()) == ["00000.npz"]


def test_plot_feature_maps_validates(tmp_path):
    c = np.zeros((2, 3, 3))
    with pytest.raises(ValueError, match="channels"):
        R.plot_feature_maps(tmp_path / "x.png", c, c, [5], "L", "float32")
    with pytest.raises(ValueError, match="C, H, W"):
        R.plot_feature_maps(tmp_path / "x.png", c, c[0], [0], "L", "float32")


def test_criteria_lines():
    rows = [
        {"layer": "A", "dtype": "float32", "units": 10000, "n_within": 9997, "share_within": 0.9997},
        {"layer": "A", "dtype": "float64", "units": 10, "n_within": 9, "share_within": 0.9},
    ]
    lines, passed = R.criteria_lines(rows, V.CRITERIA)
    assert passed == {"float32": True, "float64": False}
    assert lines[0].startswith("PASS float32") and lines[1].startswith("FAIL float64") and "1 of 10" in lines[1]


# ---------------------------------------------------------------------------- bad input
def test_bad_input_raises_early(tmp_path, standin):
    net = _tiny_net()
    x = _images(1)
    kw = dict(out_dir=tmp_path, progress=False)
    with pytest.raises(ValueError, match="unknown unit layer.*'Nope'"):
        V.verify(net, x, layers=["Nope"], **kw)
    with pytest.raises(ValueError, match="dtypes.*float16"):
        V.verify(net, x, dtypes=["float16"], **kw)
    with pytest.raises(ValueError, match="scale"):
        V.verify(net, x, scale=0.0, **kw)
    with pytest.raises(ValueError, match="memory_budget"):
        V.verify(net, x, memory_budget="lots", **kw)
    with pytest.raises(ValueError, match=r"shape \(N, 1, 4, 4\)"):
        V.verify(net, torch.zeros(2, 1, 5, 5), **kw)
    with pytest.raises(TypeError, match="model must be"):  # checkpoints are loaded by the CLI
        V.verify(str(tmp_path / "missing.pt"), x, **kw)
    from linop.convert import from_torch

    tanh = from_torch(_tiny_torch(0, act=nn.Tanh()), (1, 4, 4))
    with pytest.raises(ValueError, match="piecewise-linear"):
        V.verify(tanh, x, **kw)
    assert standin.calls == 0  # nothing was computed for any of these
    assert V.parse_size("2GiB") == 2 * 2**30 and V.parse_size("512MB") == 512 * 10**6


def _cli(argv, capsys):
    from linop.cli import main

    rc = main(["verify"] + argv)
    out = capsys.readouterr()
    return rc, out.out, out.err


def test_cli_errors(tmp_path, capsys):
    rc, _, err = _cli(["--checkpoint", str(tmp_path / "nope.pt"), "--out", str(tmp_path)], capsys)
    assert rc != 0 and "nope.pt" in err and "Traceback" not in err
    rc, _, err = _cli(["--n-images", "0", "--out", str(tmp_path)], capsys)
    assert rc != 0 and "--n-images" in err
    rc, _, err = _cli(["--dtypes", "float16", "--out", str(tmp_path)], capsys)
    assert rc != 0 and "float16" in err
    rc, _, err = _cli(["--memory-budget", "lots", "--out", str(tmp_path)], capsys)
    assert rc != 0 and "--memory-budget" in err


def test_cli_errors_with_checkpoint(tmp_path, capsys, standin, vgg7_checkpoint):
    ck = ["--checkpoint", str(vgg7_checkpoint), "--out", str(tmp_path / "o")]
    rc, _, err = _cli(ck + ["--layers", "Conv9"], capsys)
    assert rc != 0 and "Conv9" in err and "Conv1" in err  # names the bad value and the choices
    rc, _, err = _cli(ck + ["--n-images", "100000"], capsys)
    assert rc != 0 and "100000" in err
    assert standin.calls == 0


def test_cli_runs_and_prints_table(tmp_path, capsys, standin, vgg7_checkpoint):
    ck = ["--checkpoint", str(vgg7_checkpoint), "--out", str(tmp_path / "o"), "--no-progress"]
    rc, out, err = _cli(ck + ["--n-images", "1", "--layers", "FC", "--dtypes", "float64"], capsys)
    assert rc == 0, err
    assert "| FC | float64 | 1 | 10 |" in out and "PASS float64" in out
    assert standin.calls == 1
    rc, out, _ = _cli(ck + ["--n-images", "1", "--layers", "FC", "--dtypes", "float64"], capsys)
    assert rc == 0 and "0 computed, 1 from cache" in out and standin.calls == 1


# ---------------------------------------------------------------------------- end to end
def test_end_to_end_real_backmap(tmp_path, capsys):
    """The real ``linop.backmap`` on a random piecewise-linear model: float64 reproduces every
    unit within 1 % (the paper's float64 criterion: 100 %)."""
    pytest.importorskip("linop.hypersurface")
    from linop.hypersurface import reconstructed_activations  # noqa: F401  (the API the study calls)

    rep = V.verify(_tiny_net(3), _images(2, seed=7), out_dir=tmp_path, progress=False, figures=False)
    for layer in rep.layers:
        assert rep.row(layer, "float64")["share_within"] == 1.0
        # float64 rounding over these tiny sums stays far below 1e-6 relative
        assert rep.row(layer, "float64")["max_abs"] < 1e-6
    assert rep.passed["float64"]
