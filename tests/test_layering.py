"""Layers one way: command line (``linop.cli``) → studies → core; ``models`` is an
application package the core never imports, and it never imports ``linop``.  The command
line starts without heavy imports and runs from any directory, even one holding another
``models`` package."""
from __future__ import annotations

import json
import subprocess
import sys
import textwrap
import types
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def _python(code: str, cwd: Path) -> str:
    """Run ``code`` in a fresh interpreter in ``cwd``; its stdout (it must succeed)."""
    res = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], cwd=cwd, capture_output=True, text=True,
                         timeout=300)
    assert res.returncode == 0, res.stderr
    return res.stdout


def test_core_never_imports_models(tmp_path):
    out = _python("""
        import importlib, json, pkgutil, sys
        import linop
        names = [m.name for m in pkgutil.walk_packages(linop.__path__, "linop.")
                 if not (m.name == "linop.cli" or m.name.startswith("linop.cli.") or m.name == "linop.__main__")]
        for name in names:
            importlib.import_module(name)
        bad = sorted(m for m in sys.modules if m.split(".")[0] in ("models", "_linop_models"))
        print(json.dumps({"imported": names, "models": bad}))
    """, tmp_path)
    res = json.loads(out.splitlines()[-1])
    assert "linop.studies.verify" in res["imported"] and "linop.studies.posttrain.study" in res["imported"]
    assert res["models"] == []


def test_models_never_imports_linop(tmp_path):
    out = _python(f"""
        import importlib, json, pkgutil, sys
        sys.path.insert(0, {str(REPO)!r})
        import models
        names = [m.name for m in pkgutil.walk_packages(models.__path__, "models.")]
        for name in names:
            importlib.import_module(name)
        print(json.dumps({{"imported": names, "linop": sorted(m for m in sys.modules if m.split(".")[0] == "linop")}}))
    """, tmp_path)
    res = json.loads(out.splitlines()[-1])
    assert "models.train" in res["imported"] and "models.data" in res["imported"]
    assert res["linop"] == []


def test_help_imports_nothing_heavy(tmp_path):
    # `linop --help` must answer at once: building the parser imports no command module
    out = _python("""
        import json, sys
        from linop.cli import build_parser
        build_parser([]).format_help()
        heavy = ("torch", "numpy", "scipy", "matplotlib", "models", "_linop_models")
        print(json.dumps(sorted(m for m in sys.modules if m.split(".")[0] in heavy)))
    """, tmp_path)
    assert json.loads(out.splitlines()[-1]) == []
    res = subprocess.run([sys.executable, "-m", "linop", "--help"], cwd=tmp_path, capture_output=True, text=True,
                         timeout=60)
    assert res.returncode == 0 and "reconstruct" in res.stdout and "posttrain" in res.stdout


def test_models_loader_under_a_taken_name(monkeypatch):
    """Another package already imported as ``models``: ours loads under a private name."""
    from linop.cli import _models

    fake = types.ModuleType("models")
    fake.__file__ = "/somewhere/else/models/__init__.py"
    monkeypatch.setitem(sys.modules, "models", fake)
    for name in [m for m in sys.modules if m.split(".")[0] == "_linop_models"]:
        monkeypatch.delitem(sys.modules, name)
    pkg = _models.models_package()
    try:
        assert pkg.__name__ == "_linop_models" and Path(pkg.__file__).resolve() == REPO / "models" / "__init__.py"
        train = _models.models_module("train")
        assert train.__name__ == "_linop_models.train" and "vgg7" in train.MODELS
        assert sys.modules["models"] is fake  # the other package is left alone
        assert _models.checkpoint_dir() == REPO / "models" / "checkpoints"
    finally:
        for name in [m for m in sys.modules if m.split(".")[0] == "_linop_models"]:
            del sys.modules[name]


@pytest.mark.skipif(not (REPO / "models" / "checkpoints" / "conv2_fc1_digits.pt").exists(),
                    reason="shipped checkpoint missing")
def test_cli_runs_from_another_directory_with_its_own_models(tmp_path):
    """``python -m linop reconstruct`` with its defaults, from a directory that holds a user's
    ``models`` package (first on sys.path): our shipped checkpoint and models are used."""
    (tmp_path / "models").mkdir()
    (tmp_path / "models" / "__init__.py").write_text("raise ImportError('the user\\'s own models package')\n")
    res = subprocess.run([sys.executable, "-m", "linop", "reconstruct", "--n", "2", "--out", "out"], cwd=tmp_path,
                         capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr
    summ = json.loads((tmp_path / "out" / "reconstruct.json").read_text())
    assert summ["n"] == 2 and Path(summ["checkpoint"]) == REPO / "models" / "checkpoints" / "conv2_fc1_digits.pt"
