"""The ``linop`` command line: ``linop COMMAND [options]``.

One module per command under ``linop.cli`` (``demo``, ``train``, ``verify``, ``reconstruct``,
``posttrain``), each exposing ``add_arguments(parser)`` and ``run(args) -> int``.  This is the
application layer: it alone loads checkpoints and data sets (from the ``models`` package
shipped beside ``linop``, see :mod:`linop.cli._models`) and hands objects to the studies
(:mod:`linop.studies`).  A command's module — and with it torch, numpy and the rest — is
imported only when that command runs, so ``linop --help`` answers at once.
"""
from __future__ import annotations

import argparse
import importlib
import os
import sys
from collections.abc import Callable
from typing import Any

__all__ = ["COMMANDS", "USER_ERRORS", "build_parser", "check_out", "main", "run_command"]

# name -> (module, one-line help)
COMMANDS = {
    "demo": ("linop.cli.demo", "small operator demo: sparse conv == torch conv, adjoint check"),
    "train": ("linop.cli.train", "train a reference model on a data set and save a checkpoint"),
    "verify": ("linop.cli.verify", "AdjointBackMapV2 verification study (seed 000 Tables 3-4, Fig. 6)"),
    "reconstruct": ("linop.cli.reconstruct", "reconstruct feature maps from labels (seed 001 §3)"),
    "posttrain": ("linop.cli.posttrain", "FR-PT vs BP-PT post-training study (seed 001 §4)"),
}


# Errors that mean "bad input" (every option is validated with one of these, naming the option
# and its value): shown as one line, exit status 2, like argparse's own errors.  Anything else
# is a bug and keeps its traceback.  LINOP_TRACEBACK=1 shows the traceback of input errors too.
USER_ERRORS = (ValueError, NotImplementedError, FileNotFoundError, IsADirectoryError,
               NotADirectoryError, PermissionError, FileExistsError, MemoryError)
#: the exit status of an interrupted run (128 + SIGINT, as shells report it)
EXIT_INTERRUPTED = 130


def check_out(path: str, option: str = "--out") -> str:
    """Refuse an empty ``--out`` (it would mean the current directory) or one that is an
    existing file, before any work (ValueError / NotADirectoryError: one line, exit 2)."""
    if not path or not path.strip():
        raise ValueError(f"{option} is empty; give an output directory (e.g. {option} results/run1)")
    if os.path.exists(path) and not os.path.isdir(path):
        raise NotADirectoryError(f"{option} {path!r} is an existing file, not a directory; choose another path")
    return path


def _interrupted(prog: str, args: Any) -> int:
    """One line on Ctrl-C: what was kept (every study writes each finished result at once)."""
    out = getattr(args, "out", None)
    kept = (f"finished results are kept in {out}; rerun the same command to resume"
            if out else "nothing was written")
    print(f"\n{prog}: interrupted; {kept}", file=sys.stderr)
    return EXIT_INTERRUPTED


def run_command(prog: str, run: Callable[[Any], Any], args: Any) -> int:
    """Call a subcommand's ``run(args)``; a bad-input error becomes ``prog: error: ...`` (exit 2),
    Ctrl-C one line saying what was kept (exit 130)."""
    if os.environ.get("LINOP_TRACEBACK"):
        return int(run(args) or 0)
    try:
        return int(run(args) or 0)
    except KeyboardInterrupt:
        return _interrupted(prog, args)
    except USER_ERRORS as exc:
        text = str(exc).strip()
        if isinstance(exc, OSError) and exc.filename is not None and exc.strerror:
            text = f"{exc.filename}: {exc.strerror}"
        msg = text.splitlines()[0] if text else type(exc).__name__
        print(f"{prog}: error: {msg}", file=sys.stderr)
        return 2


def build_parser(argv: list[str] | None = None) -> argparse.ArgumentParser:
    """The parser; only the module of the subcommand named first in ``argv`` is imported."""
    parser = argparse.ArgumentParser(prog="linop", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    argv = sys.argv[1:] if argv is None else list(argv)
    for name, (module, help_) in COMMANDS.items():
        p = sub.add_parser(name, help=help_, description=help_)
        if argv and argv[0] == name:
            importlib.import_module(module).add_arguments(p)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``linop`` / ``python -m linop``; returns the exit status."""
    parser = build_parser(argv)  # argv, not sys.argv, when given: no global side effect
    args = parser.parse_args(argv)
    if not args.command:
        parser.print_help()
        return 2
    module = importlib.import_module(COMMANDS[args.command][0])
    return run_command(f"linop {args.command}", module.run, args)
