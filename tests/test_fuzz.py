"""Issue 12, step 2: a hypothesis fuzz suite over the public API and the command line.

The property, for every public function (``linop.from_torch``, ``linearise``, ``backmap``,
``reconstruct``, ``embed``, ``solve``, ``verify``, ``dottest``, ``as_operator``, operator
constructors and ``apply`` / ``matvec``) and every CLI command: a call on hostile input either

* returns exactly (``torch.equal`` / ``np.array_equal``) what the clean reference call returns
  — the reference is computed on the input as the test itself canonicalises it, so a silent
  cast or a misread selection shows up as a different number — and never NaN / Inf out of
  finite input; or
* raises ``ValueError`` / ``TypeError`` / ``FileNotFoundError`` / ``MemoryError`` whose
  message names the argument (a ``MemoryError`` also states the size);
* CLI: exit status 2 with exactly one line on stderr naming the option.

Any other exception type fails the test.

Profiles: the CI run is bounded by ``tests/conftest.py`` ("ci": 20 derandomised examples per
property; the file takes well under 60 s on 2 cores).  A longer search, e.g. before a release::

    LINOP_FUZZ_EXAMPLES=2000 python -m pytest -q tests/test_fuzz.py

(``LINOP_FUZZ_EXAMPLES`` sets ``max_examples`` of every property here, random rather than
derandomised seeds; ``HYPOTHESIS_PROFILE=thorough`` gives 300.)
"""
from __future__ import annotations

import os
import re

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import nn

import linop
from linop.cli import main
from linop.hypersurface import BackMap

torch.set_num_threads(1)

_N = os.environ.get("LINOP_FUZZ_EXAMPLES")
if _N:  # the long profile documented above
    settings.register_profile("fuzz-long", max_examples=int(_N), deadline=None, derandomize=False,
                              suppress_health_check=list(HealthCheck))
    settings.load_profile("fuzz-long")

ALLOWED = (ValueError, TypeError, FileNotFoundError, MemoryError)
_SIZE = re.compile(r"\d+(\.\d+)?\s*(B|bytes|KiB|MiB|GiB|TiB|kB|MB|GB|TB)\b")


def _refused(fn, names):
    """Call ``fn``; return (True, None) when it raised an allowed error naming one of ``names``,
    (False, result) when it returned; any other exception fails the test."""
    try:
        return False, fn()
    except ALLOWED as exc:
        msg = str(exc)
        assert any(n in msg for n in names), f"{type(exc).__name__} does not name {names}: {msg!r}"
        if isinstance(exc, MemoryError):
            assert _SIZE.search(msg), f"MemoryError without a size: {msg!r}"
        return True, None


def _finite(*ts):
    for t in ts:
        t = torch.as_tensor(t) if not isinstance(t, torch.Tensor) else t
        if t.is_floating_point() or t.is_complex():
            assert bool(torch.isfinite(t).all()), "NaN / Inf out of finite input"


# ------------------------------------------------------------------------------------ fixtures
def _model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(1, 2, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(32, 5)).double().eval()


NET = linop.from_torch(_model(), (1, 4, 4))
X = torch.randn(1, 4, 4, generator=torch.Generator().manual_seed(1), dtype=torch.float64)


# ------------------------------------------------------------------------------------ strategies
def _with_bad_entry(value):
    return st.tuples(st.integers(0, 15), st.sampled_from([float("nan"), float("inf"), -float("inf")])).map(
        lambda p: _poke(value, *p))


def _poke(x, i, v):
    y = x.clone()
    y.reshape(-1)[i] = v
    return y


bad_images = st.one_of(
    st.sampled_from([None, "image", {"x": 1}, 3.0, object()]),
    _with_bad_entry(X),
    st.sampled_from([torch.float16, torch.bfloat16, torch.complex128, torch.float32, torch.int64, torch.int32,
                     torch.bool]).map(lambda dt: (X * 4).round().to(dt) if dt not in (torch.complex128, torch.bool)
                                       else X.to(dt)),
    st.sampled_from([(4, 4), (1, 4), (2, 4, 4), (1, 3, 4), (1, 4, 4, 1), (0, 4, 4), (1, 0, 4), ()]).map(
        lambda s: torch.zeros(s, dtype=torch.float64)),
    st.just(X.numpy().astype(np.float16)),
    st.just([[[1.0, 2.0], [3.0]]]),  # ragged
)

unit_selections = st.one_of(
    st.lists(st.integers(-7, 12), max_size=7),
    st.lists(st.integers(0, 4), max_size=7).map(lambda v: np.asarray(v, dtype=np.int32)),
    st.lists(st.integers(0, 4), max_size=7).map(lambda v: torch.tensor(v, dtype=torch.int64)),
    st.lists(st.booleans(), min_size=0, max_size=8).map(np.asarray),
    st.lists(st.booleans(), min_size=5, max_size=5).map(torch.tensor),
    st.lists(st.one_of(st.floats(-2, 6), st.just(float("nan"))), min_size=1, max_size=3),
    st.integers(-3, 8),
    st.sampled_from([True, False, "0", 1.0, slice(1, 4), slice(None, None, 2), slice(7, 9), 2 ** 70,
                     {0: 1}, [[0, 1], [2, 3]]]),
)


def _expected_units(value, n):
    """The test's own reading of a unit selection (None = must be refused)."""
    if isinstance(value, slice):
        sel = list(range(n))[value]
    elif isinstance(value, (bool, np.bool_, str, dict, float)):
        return None
    elif isinstance(value, int):
        sel = [value]
    else:
        arr = np.asarray(value.tolist() if isinstance(value, torch.Tensor) else value)
        if arr.size == 0:
            return None
        if arr.dtype == bool:
            if arr.size != n:
                return None
            sel = np.flatnonzero(arr).tolist()
        elif arr.dtype.kind in "iu":
            sel = arr.reshape(-1).tolist()
        else:
            return None
    if not sel or len(set(sel)) != len(sel) or min(sel) < 0 or max(sel) >= n:
        return None
    return sel


# ------------------------------------------------------------------------------------ backmap / linearise
@given(units=unit_selections, mode_layer=st.sampled_from([("RM0", "FC"), ("RM2", "Conv0")]))
def test_backmap_units(units, mode_layer):
    mode, layer = mode_layer
    n = 5 if layer == "FC" else 32  # the Linear's outputs; 2 channels x 4 x 4 conv units
    expected = _expected_units(units, n)
    refused, out = _refused(lambda: linop.backmap(NET, X, layer, mode=mode, units=units), ["units"])
    if expected is None:
        assert refused, f"units={units!r} should have been refused"
        return
    assert not refused, f"units={units!r} refused, expected {expected}"
    ref = linop.backmap(NET, X, layer, mode=mode, units=torch.tensor(expected))
    assert out.units.tolist() == expected
    assert torch.equal(out.image, ref.image) and torch.equal(out.bias, ref.bias)
    _finite(out.image, out.bias)


REF_BM = linop.backmap(NET, X, "FC", mode="RM0")


@given(x=bad_images)
def test_backmap_and_linearise_images(x):
    for call in (lambda: linop.backmap(NET, x, "FC", mode="RM0"), lambda: linop.linearise(NET, x)):
        refused, out = _refused(call, ["x"])
        if refused:
            continue
        # accepted: only exactly representable casts of a (1, 4, 4) real image
        t = torch.as_tensor(np.asarray(x)) if not isinstance(x, torch.Tensor) else x
        assert t.shape == (1, 4, 4) and t.dtype in (torch.float32, torch.float64, torch.int32, torch.int64,
                                               torch.bool), x  # ints / bools: exact casts (validate.image)
        if isinstance(out, BackMap):
            ref = linop.backmap(NET, t.double() if not t.is_floating_point() else t, "FC", mode="RM0")
            assert torch.equal(out.image, ref.image) and torch.equal(out.bias, ref.bias)
            _finite(out.image, out.bias)


@given(kw=st.one_of(
    st.fixed_dictionaries({"dtype": st.sampled_from([torch.float16, torch.bfloat16, torch.int32, torch.complex64,
                                                     np.float16, "half", "int8", np.int64, object(), None,
                                                     "float64", np.float64, torch.float64])}),
    st.fixed_dictionaries({"scale": st.sampled_from([float("nan"), float("inf"), 0.0, -1.0, "1", None, 1.0, 2])}),
    st.fixed_dictionaries({"memory_budget": st.sampled_from(["2GiB", "x", -1, 0, "0B", float("nan"), 1, None])}),
    st.fixed_dictionaries({"mode": st.sampled_from(["RM9", "", None, 3, "rm0", "RM0"])}),
    st.fixed_dictionaries({"layer": st.sampled_from(["Nope", "", None, 0, "FC"])}),
))
def test_backmap_options(kw):
    args = {"layer": "FC", "mode": "RM0", **kw}
    names = list(kw) + ([] if "layer" not in kw else ["layer"])
    refused, out = _refused(lambda: linop.backmap(NET, X, **args), names)
    if refused:
        return
    _finite(out.image, out.bias)
    if set(kw) <= {"dtype", "mode", "layer", "memory_budget"} and out.image.dtype == torch.float64:
        # an accepted dtype / name / budget must not change a single number
        assert torch.equal(out.image, REF_BM.image) and torch.equal(out.bias, REF_BM.bias), kw


# ------------------------------------------------------------------------------------ reconstruct / embed
XB = torch.randn(3, 1, 4, 4, generator=torch.Generator().manual_seed(2), dtype=torch.float64)


@given(y=st.one_of(
    st.lists(st.integers(-2, 7), min_size=0, max_size=4),
    st.sampled_from([[0.0, 1.0, 2.0], [True, False, True], "012", None, np.array([[0, 1, 2]]), 1,
                     torch.tensor([0, 1, 2], dtype=torch.int32), np.array([4, 0, 1], dtype=np.uint8)]),
))
def test_reconstruct_labels(y):
    refused, out = _refused(lambda: linop.reconstruct(NET, XB, y), ["y"])
    ok = (isinstance(y, (list, np.ndarray, torch.Tensor)) and len(y) == 3
          and np.asarray(y.tolist() if isinstance(y, torch.Tensor) else y).dtype.kind in "iu"
          and np.asarray(y).ndim == 1 and all(0 <= int(v) < 5 for v in np.asarray(y)))
    assert refused != ok, (y, refused)
    if ok:
        ref = linop.reconstruct(NET, XB, torch.tensor(np.asarray(y).astype(np.int64)))
        a, b = out.features if hasattr(out, "features") else out, ref.features if hasattr(ref, "features") else ref
        for k in (vars(a) if hasattr(a, "__dict__") else {}):
            va, vb = getattr(a, k), getattr(b, k)
            if isinstance(va, torch.Tensor):
                assert torch.equal(va, vb), k
                _finite(va)


@given(x=bad_images.map(lambda v: v.unsqueeze(0) if isinstance(v, torch.Tensor) and v.dim() == 3 else v),
       opt=st.sampled_from([{}, {"to_layer": "nope"}, {"embedding": "zz"}, {"solver": "magic"},
                            {"tol": float("nan")}, {"tol": -1.0}, {"maxiter": -3}, {"maxpool": "x"},
                            {"clip_margin": float("nan")}, {"max_bytes": 10}]))
def test_reconstruct_inputs(x, opt):
    names = ["x"] + list(opt) + (["to_layer", "layer"] if "to_layer" in opt else []) + \
        (["max_bytes", "memory"] if "max_bytes" in opt else []) + (["method", "solver"] if "solver" in opt else [])
    n = int(np.shape(x)[0]) if isinstance(x, (torch.Tensor, np.ndarray)) and np.ndim(x) else 1
    refused, out = _refused(lambda: linop.reconstruct(NET, x, [0] * n, **opt), names)
    if not refused:  # only a clean (N, 1, 4, 4) real batch with no bad option gets through
        assert opt == {}, opt
        t = torch.as_tensor(np.asarray(x)) if not isinstance(x, torch.Tensor) else x
        assert t.dim() == 4 and t.shape[1:] == (1, 4, 4) and t.shape[0] >= 1, x
        assert torch.isfinite(t.double()).all()


@given(a_hat=st.one_of(
    st.just(np.array([0.3, -1.2, 2.0, 0.1])),
    st.sampled_from([np.array([np.nan, 1.0]), np.array([np.inf, 1.0]), np.array([]), "a", None,
                     np.array([1 + 1j, 2.0]), np.array([[1.0, 2.0], [3.0, 4.0]])])),
       y=st.sampled_from([0, 3, 4, -1, 1.5, "0", None, True, [0, 1]]),
       norm=st.sampled_from(["l2", "l1", "bogus", None]))
def test_embed(a_hat, y, norm):
    refused, out = _refused(lambda: linop.embed(a_hat, y, norm=norm), ["a_hat", "y", "norm"])
    if not refused:
        _finite(torch.as_tensor(np.asarray(out)))


# ------------------------------------------------------------------------------------ solve / operators
W0 = np.random.default_rng(3).standard_normal((3, 6))
Z0 = np.random.default_rng(4).standard_normal(3)
A0 = np.random.default_rng(5).standard_normal(6)


@given(which=st.sampled_from(["W", "z_star", "a_hat", "method", "tol", "maxiter"]),
       bad=st.sampled_from(["nan", "inf", "empty", "shape", "str", "none", "complex", "neg", "int"]))
def test_solve(which, bad):
    args = {"W": W0, "z_star": Z0, "a_hat": A0}
    base = args.get(which)

    def corrupt(v):
        if bad == "nan" and isinstance(v, np.ndarray):
            v = v.copy(); v.flat[1] = np.nan; return v
        if bad == "inf" and isinstance(v, np.ndarray):
            v = v.copy(); v.flat[0] = np.inf; return v
        return {"empty": np.zeros((0,)), "shape": np.ones((2, 2, 2)), "str": "abc", "none": None,
                "complex": (np.ones(3) * 1j), "neg": -1, "int": 7}.get(bad, v)

    kw = {}
    if which in args:
        args[which] = corrupt(base)
    else:
        kw[which] = corrupt(None)
    names = [which] + (["method", "solver"] if which == "method" else []) + ["W" if which == "W" else which]
    refused, out = _refused(lambda: linop.solve(args["W"], args["z_star"], args["a_hat"], **kw), names)
    if not refused:
        _finite(np.asarray(out.x) if hasattr(out, "x") else np.zeros(1))


@given(op=st.sampled_from([np.eye(3), np.ones((2, 5)), "op", None, 3, np.array([[np.nan, 1.0]]),
                           np.zeros((0, 3)), np.ones((2, 2, 2)), np.eye(2) * 1j, [[1.0, 2.0]]]),
       rng=st.sampled_from([None, 0, "seed", -1, np.random.default_rng(0)]))
def test_dottest_and_as_operator(op, rng):
    refused, out = _refused(lambda: linop.dottest(op, rng=rng), ["op", "rng", "W"])
    if not refused:
        yAx, xAty = out
        assert np.isfinite(yAx) and np.isfinite(xAty)
    refused, A = _refused(lambda: linop.as_operator(op), ["W"])
    if not refused:
        dense = np.asarray(op)
        assert np.array_equal(A.matvec(np.ones(dense.shape[1])), dense @ np.ones(dense.shape[1]))


@given(kw=st.sampled_from([
    {"weight": torch.ones(2, 1, 3)}, {"weight": torch.full((2, 1, 3, 3), float("nan"))}, {"weight": "w"},
    {"weight": torch.ones(2, 1, 3, 3, dtype=torch.float16)}, {"stride": 0}, {"stride": -1}, {"stride": 1.5},
    {"padding": "bogus"}, {"padding": -2}, {"dilation": 0}, {"groups": 3}, {"in_shape": (1, 0, 4)},
    {"in_shape": (2, 4, 4)}, {"in_shape": "1x4x4"}, {"weight": torch.ones(2, 1, 9, 9)}, {}]),
       v=st.sampled_from(["ok", "nan", "shape", "f16", "str", "complex", "int"]))
def test_conv2d_constructor_and_apply(kw, v):
    from linop.operators import Conv2d

    args = {"weight": torch.ones(2, 1, 3, 3, dtype=torch.float64) / 9, "in_shape": (1, 4, 4), "padding": 1, **kw}
    refused, op = _refused(lambda: Conv2d(args.pop("weight"), args.pop("in_shape"), **args),
                           ["weight", "in_shape", "stride", "padding", "dilation", "groups", "kernel", "shape"])
    if refused:
        return
    x = {"ok": X.clone(), "nan": _poke(X, 3, float("nan")), "shape": torch.ones(2, 4, 4, dtype=torch.float64),
         "f16": X.half(), "str": "x", "complex": X.to(torch.complex128), "int": torch.ones(1, 4, 4, dtype=torch.int64)}[v]
    ref = op.matvec(X.reshape(-1).numpy())
    for call in (lambda: op.apply(x), lambda: op.matvec(x.reshape(-1).numpy() if isinstance(x, torch.Tensor) else x)):
        refused, out = _refused(call, ["x", "shape", "dtype", "input", "vector"])
        if refused:
            continue
        out = np.asarray(out.detach().cpu() if isinstance(out, torch.Tensor) else out).reshape(-1)
        assert v not in ("shape", "str"), f"x={v} accepted"
        if v in ("ok", "int"):  # small integers are cast exactly to the operator's dtype: the same numbers
            xc = x.to(getattr(torch, np.dtype(op.dtype).name))
            clean = np.asarray(op.matvec(xc.reshape(-1).numpy())).reshape(-1)
            assert np.array_equal(out, clean), v
        assert v != "f16", "float16 input accepted: the parameters were rounded to half precision"
        if v == "complex":  # a linear map of a complex vector: real and imaginary parts separately
            assert np.array_equal(out.real, np.asarray(ref).reshape(-1)) and not out.imag.any()
        # "nan": a linear map propagates NaN honestly (no activation pattern is read from it)


@given(w=st.sampled_from([np.ones((3, 4)), np.ones(4), "w", None, np.full((2, 2), np.inf), np.zeros((0, 3)),
                          np.ones((2, 2), dtype=np.float16), np.ones((2, 2), dtype=np.int64)]))
def test_linear_constructor(w):
    from linop.operators import Linear

    refused, op = _refused(lambda: Linear(w), ["weight"])
    if not refused:
        assert np.array_equal(op.matvec(np.ones(op.shape[1])), np.asarray(w, dtype=np.float64) @ np.ones(op.shape[1]))


# ------------------------------------------------------------------------------------ from_torch / verify
@given(shape=st.sampled_from([(1, 4, 4), (4, 4), (2, 4, 4), (1, 0, 4), (1, -4, 4), "1,4,4", None, (1.5, 4, 4)]),
       dtype=st.sampled_from([torch.float64, torch.float32, torch.float16, "int", None]),
       module=st.sampled_from(["ok", "str", "none"]))
def test_from_torch(shape, dtype, module):
    m = {"ok": _model(), "str": "model", "none": None}[module]
    refused, net = _refused(lambda: linop.from_torch(m, shape, dtype=dtype),
                            ["module", "input_shape", "dtype", "shape"])
    if not refused:
        # dtype=None reads as numpy's default, float64: the documented default, no lossy cast
        assert module == "ok" and tuple(shape) == (1, 4, 4) and dtype in (torch.float64, torch.float32, None)


@given(kw=st.sampled_from([{"images": XB[:0]}, {"images": _poke(XB, 5, float("nan"))}, {"images": "imgs"},
                           {"dtypes": ["float16"]}, {"dtypes": []}, {"dtypes": ["int"]}, {"layers": ["Nope"]},
                           {"layers": []}, {"scale": float("nan")}, {"scale": 0.0}, {"threshold": -1.0},
                           {"memory_budget": "lots"}, {"out_dir": ""}]))
def test_verify_bad_arguments(kw, tmp_path_factory):
    args = {"images": XB[:1], "out_dir": tmp_path_factory.mktemp("v"), "progress": False, "figures": False,
            "dtypes": ["float64"], **kw}
    refused, _ = _refused(lambda: linop.verify(NET, **args), list(kw) + ["memory"])
    assert refused, kw


# ------------------------------------------------------------------------------------ CLI
class _Accepted(BaseException):
    """Raised in place of the real work when the CLI accepted a bad value (the test fails)."""


@pytest.fixture
def no_work(monkeypatch):
    """The studies replaced by their own first checks (on the tiny network), then _Accepted:
    a bad value must be refused by the CLI or by the study it is handed to, before any work."""
    import linop.studies.verify as V
    from linop.studies import reconstruct as R
    import linop.studies.posttrain as P
    from linop.studies.posttrain.blocks import validate_pairs

    def refuse(*a, **k):
        raise _Accepted

    def verify_checks(model, images, **kw):
        V._check_options(kw.get("scale", 0.125), kw.get("threshold", 0.01), kw.get("memory_budget", "2GiB"),
                         kw.get("dtypes", ("float32", "float64")))
        raise _Accepted

    def reconstruct_checks(model, x, y, out_dir, **kw):
        opts = {k: kw[k] for k in ("embedding", "solver", "tol", "maxiter", "maxpool", "avgpool", "clip_margin")
                if k in kw}
        linop.reconstruct(NET, XB[:1], [0], **opts)
        raise _Accepted

    def posttrain_checks(base, data, **kw):
        validate_pairs(kw.get("pairs") or [(0, 1)], 99)  # the model's depth is checked later, by the study
        raise _Accepted

    monkeypatch.setattr(V, "verify", verify_checks)
    monkeypatch.setattr(R, "reconstruction_study", reconstruct_checks)
    monkeypatch.setattr(P, "posttrain_study", posttrain_checks)
    train = pytest.importorskip("models.train")
    real = train._make_optimizer

    def make_then_refuse(*a, **k):  # after every option was checked and the data set loaded
        real(*a, **k)
        raise _Accepted

    monkeypatch.setattr(train, "_make_optimizer", make_then_refuse)
    return refuse


CLI_BAD = {
    "demo": [("--size", ["0", "-3", "x", "100000"]), ("--kernel", ["0", "1.5"]), ("--stride", ["0", "-1"]),
             ("--groups", ["0", "7"]), ("--padding", ["bogus", "-1"]), ("--dtype", ["float16"]),
             ("--memory-budget", ["lots", "-1GiB"]), ("--in-channels", ["0"])],
    "verify": [("--n-images", ["0", "-1", "x"]), ("--dtypes", ["float16", "int8"]), ("--scale", ["nan", "0", "x"]),
               ("--threshold", ["-1", "nan"]), ("--memory-budget", ["x"]), ("--checkpoint", ["/nonexistent.pt"]),
               ("--data", ["nope"]), ("--model", ["nope"])],
    "reconstruct": [("--n", ["0", "-2", "x"]), ("--tol", ["nan", "-1"]), ("--maxiter", ["-5"]),
                    ("--solver", ["magic"]), ("--embedding", ["zz"]), ("--checkpoint", ["/nonexistent.pt"]),
                    ("--clip-margin", ["nan"]), ("--dtype", ["float16"])],
    "posttrain": [("--pairs", ["2", "a:b", "3:-1"]), ("--epochs", ["-1", "x"]), ("--runs", ["0"]),
                  ("--lr", ["nan", "-1"]), ("--batch-size", ["0"]), ("--alpha", ["nan"]), ("--data", ["nope"]),
                  ("--checkpoint", ["/nonexistent.pt"]), ("--threads", ["0", "-1"]), ("--model", ["nope"])],
    "train": [("--epochs", ["-1", "x"]), ("--lr", ["nan", "-1"]), ("--batch-size", ["0"]), ("--model", ["nope"]),
              ("--data", ["nope"]), ("--threads", ["0", "-1"]), ("--model-kwargs", ["{bad", "[1]"]), ("--momentum", ["nan"]),
              ("--weight-decay", ["-1"])],
}
_CASES = [(c, o, v) for c, opts in CLI_BAD.items() for o, vals in opts for v in vals]


# every (command, option, bad value) once: the list is the strategy, enumerated (a sample of
# it would leave a refusal untested in CI; each case costs milliseconds)
@pytest.mark.parametrize("cmd, opt, val", _CASES)
def test_cli_bad_option_values(cmd, opt, val, tmp_path_factory, capsys, no_work):
    out = tmp_path_factory.mktemp("o")
    # valid options first, then the bad one (argparse keeps the last value of a repeated option)
    base = {"train": ["--model", "conv2_fc1", "--data", "digits", "--epochs", "1"],
            "verify": ["--n-images", "1", "--layers", "FC", "--no-progress"],
            "reconstruct": ["--n", "1"], "posttrain": ["--no-progress", "--epochs", "1", "--runs", "1"]}.get(cmd, [])
    argv = [cmd, *base, opt, val]
    if cmd != "demo":
        argv += ["--out", str(out / ("m.pt" if cmd == "train" else "r"))]
    capsys.readouterr()
    try:
        rc = main(argv)
    except SystemExit as exc:  # argparse's own refusals: exit 2 and its usage lines
        rc = exc.code
        err = capsys.readouterr().err.strip().splitlines()[-1]
    except _Accepted:
        pytest.fail(f"linop {cmd} {opt} {val!r} was accepted")
    else:
        err = capsys.readouterr().err.strip()
        assert "\n" not in err and "Traceback" not in err, err
    assert rc == 2, (argv, rc, err)
    stem = opt.lstrip("-")
    assert any(s in err for s in (opt, stem, stem.replace("-", "_"), stem.rstrip("s"), val)), (argv, err)
    if cmd == "train":
        assert not (out / "m.pt").exists()
