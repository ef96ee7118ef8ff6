"""Where a study's tasks run, as command-line options shared by ``linop verify`` and ``linop
posttrain``: ``--scheduler local|ADDRESS``, ``--workers N`` and ``--device cpu|cuda[:k]``
(:mod:`linop.studies.execute`, :func:`linop.validate.device`).

Every bad choice is a ``ValueError`` naming the option, before any work: ``--workers``
without ``--scheduler local``, a scheduler that is neither ``local`` nor an address, Dask not
installed, a device this machine does not have.  The run-time failures of a distributed run —
no scheduler at the address, a worker that died repeatedly — are turned into one line by
:func:`execution_error_line` (the command exits 2; finished results are kept).
"""
from __future__ import annotations

import argparse

__all__ = ["add_execution_arguments", "check_execution_args", "execution_error_line", "runtime_errors"]


def add_execution_arguments(parser: argparse.ArgumentParser, unit: str) -> None:
    """``--scheduler``, ``--workers``, ``--device``; ``unit`` names a task in the help."""
    parser.add_argument("--scheduler", type=str, default=None, metavar="local|ADDRESS",
                        help=f"run one Dask task per {unit}: 'local' starts a LocalCluster, tcp://host:8786 "
                             "connects to a running scheduler (default: in-process; needs linop-cnn[distributed])")
    parser.add_argument("--workers", type=int, default=None,
                        help="single-threaded worker processes of --scheduler local (default: the CPU cores)")
    parser.add_argument("--device", type=str, default="cpu", help="cpu, cuda or cuda:k (default cpu)")


def check_execution_args(args: argparse.Namespace) -> None:
    """Refuse bad ``--scheduler`` / ``--workers`` / ``--device`` values (ValueError, one line)."""
    from .. import validate

    if args.workers is not None and args.workers < 1:
        raise ValueError(f"--workers must be ≥ 1, got {args.workers}")
    if args.workers is not None and args.scheduler != "local":
        raise ValueError("--workers needs --scheduler local (a running scheduler has its own workers)")
    if args.scheduler is not None:
        if args.scheduler != "local" and ":" not in args.scheduler:
            raise ValueError(f"--scheduler {args.scheduler!r}: give 'local' or an address such as tcp://host:8786")
        try:
            import distributed  # noqa: F401
        except ImportError:
            raise ValueError("--scheduler needs Dask: install linop-cnn[distributed]") from None
    validate.device(args.device, "--device")


def runtime_errors() -> tuple[type[BaseException], ...]:
    """The exceptions of a distributed run that are reported as one line (exit 2)."""
    from ..studies.execute import WorkerLost

    return (ImportError, ConnectionError, WorkerLost)



def execution_error_line(exc: BaseException) -> str:
    """The one line for a run-time failure of :func:`runtime_errors` (no scheduler at the
    address names ``--scheduler``)."""
    text = str(exc.args[0] if exc.args else type(exc).__name__)
    if isinstance(exc, ConnectionError):
        text = f"--scheduler: {text}"
    return text.splitlines()[0]
