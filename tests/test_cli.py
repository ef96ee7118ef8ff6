"""The ``linop`` command line on bad input: one line ``linop CMD: error: ...`` naming the
option and its value on stderr, exit status 2, no traceback; all rejected before any work."""
from __future__ import annotations

import sys

import pytest

from linop.cli import main


@pytest.mark.parametrize(
    "argv, needle",
    [
        (["demo", "--padding", "foo"], "--padding"),
        (["demo", "--groups", "2"], "--groups=2"),
        (["reconstruct", "--solver", "foo"], "'foo'"),
        (["reconstruct", "--n", "4", "--sample", "9"], "--sample"),
        (["reconstruct", "--checkpoint", "nope.pt"], "nope.pt"),
        (["train", "--model", "conv2_fc1", "--data", "digits", "--device", "nodevice"], "'nodevice'"),
        (["train", "--model", "conv2_fc1", "--data", "digits", "--model-kwargs", '{"foo": 1}'], "'foo'"),
        (["posttrain", "--solver", "foo"], "solver='foo'"),
        (["posttrain", "--pairs", "3:1"], "(3, 1)"),
    ],
)
def test_bad_input_is_one_line_and_exit_2(argv, needle, tmp_path, capsys):
    if argv[0] != "demo":  # demo writes nothing
        argv = argv + ["--out", str(tmp_path / "out" / ("x.pt" if argv[0] == "train" else ""))]
    before = list(sys.argv)
    rc = main(argv)
    err = capsys.readouterr().err.strip()
    assert rc == 2
    assert err.startswith(f"linop {argv[0]}: error: ") and needle in err, err
    assert "\n" not in err and "Traceback" not in err
    assert sys.argv == before  # main(argv) leaves the process's sys.argv alone
    if argv[0] in ("train", "reconstruct"):  # refused before anything was written
        assert not (tmp_path / "out").exists()


def test_traceback_on_request(monkeypatch):
    monkeypatch.setenv("LINOP_TRACEBACK", "1")
    with pytest.raises(ValueError, match="--padding"):
        main(["demo", "--padding", "foo"])
