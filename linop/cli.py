"""The ``linop`` command line.

Each subcommand lives in the module that implements it; that module exposes
``add_arguments(parser)`` and ``run(args) -> int``.  Modules are imported only when their
subcommand is used, so ``linop --help`` stays fast.
"""
from __future__ import annotations

import argparse
import importlib
import sys

# name -> (module, one-line help)
COMMANDS = {
    "demo": ("linop.demo", "small operator demo: sparse conv == torch conv, adjoint check"),
    "train": ("models.train", "train a reference model on a data set and save a checkpoint"),
    "verify": ("linop.verify", "AdjointBackMapV2 verification study (seed 000 Tables 3-4, Fig. 6)"),
    "reconstruct": ("linop.reconstruct", "reconstruct feature maps from labels (seed 001 §3)"),
    "posttrain": ("models.posttrain", "FR-PT vs BP-PT post-training study (seed 001 §4)"),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="linop", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    argv = sys.argv[1:]
    for name, (module, help_) in COMMANDS.items():
        p = sub.add_parser(name, help=help_, description=help_)
        # only import the module of the subcommand actually requested
        if argv and argv[0] == name:
            importlib.import_module(module).add_arguments(p)
    return parser


def main(argv: list[str] | None = None) -> int:
    if argv is not None:
        sys.argv = [sys.argv[0]] + list(argv)
    parser = build_parser()
    args = parser.parse_args(argv)
    if not args.command:
        parser.print_help()
        return 2
    module = importlib.import_module(COMMANDS[args.command][0])
    return int(module.run(args) or 0)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
