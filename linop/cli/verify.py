"""``linop verify``: the AdjointBackMapV2 verification study (seed 000 Tables 3–4, Fig. 6, E.1).

Loads the model (a checkpoint, a shipped reference model or freshly initialised weights) and
the test images, runs :func:`linop.studies.verify.verify` and prints its Markdown table and
PASS/FAIL lines.  Defaults: the shipped VGG7 on digits32, resolved from the package location
(so the command works from any directory).
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from ._execution import add_execution_arguments, check_execution_args, execution_error_line, runtime_errors
from ._models import checkpoint_dir, models_module, normalization

__all__ = ["add_arguments", "parse_range", "run"]

_DEFAULT_MODEL, _DEFAULT_DATA = "vgg7", "digits32"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """``linop verify`` options (defaults: the embedded study — shipped VGG7 on digits32)."""
    src = parser.add_mutually_exclusive_group()
    src.add_argument("--checkpoint", type=str, default=None,
                     help="checkpoint file (default: the shipped models/checkpoints/vgg7_digits32.pt)")
    src.add_argument("--model", type=str, default=None,
                     help="reference model name (vgg7, resnet20, fixup_resnet20): its shipped checkpoint "
                          "for --data if there is one, else freshly initialised weights")
    parser.add_argument("--data", type=str, default=None,
                        help="data set: digits, digits32, cifar10, cifar100, mnist (default: the checkpoint's)")
    parser.add_argument("--root", type=str, default=None, help="directory of cifar10 / cifar100 / mnist files")
    rng = parser.add_mutually_exclusive_group()
    rng.add_argument("--n-images", type=int, default=None, help="the first N test images (= --images 0:N; default 4)")
    rng.add_argument("--images", type=str, default=None, metavar="A:B",
                     help="test images A..B-1 (absolute numbers, Python slice without step; ':B' = '0:B', "
                          "'A:' = to the end). Result files are named by image number, so shards share --out")
    parser.add_argument("--dtypes", nargs="+", default=["float32", "float64"], help="compute dtypes")
    parser.add_argument("--layers", nargs="+", default=None, help="unit layers (default: all but the first conv)")
    parser.add_argument("--scale", type=float, default=0.125, help="k of z = k·[x; x_b] (seed 000 Eq. 3)")
    parser.add_argument("--threshold", type=float, default=0.01, help="|ε| bound of the table (default 1%%)")
    parser.add_argument("--out", type=str, default="results/verify", help="output directory")
    parser.add_argument("--no-resume", action="store_true", help="recompute cached per-image results")
    parser.add_argument("--keep-eps", action="store_true",
                        help="also store the signed ε of every unit (float64, 8 B/unit) for an exact median "
                             "(default: compact files, median located to a 0.001-decade bin)")
    add_execution_arguments(parser, "(image, dtype)")
    parser.add_argument("--memory-budget", type=str, default="2GiB", help="e.g. 2GiB, 512MiB")
    parser.add_argument("--heap", choices=("system", "retain"), default="system",
                        help="system (default): the C library's allocator defaults; retain: the computing "
                             "processes keep freed tangent batches (~1.4x less CPU per image on ResNet20, but "
                             "the resident size stays at its high-water mark plus fragmentation)")
    parser.add_argument("--include-first-conv", action="store_true", help="also verify the first conv layer")
    parser.add_argument("--figure-layer", type=str, default=None, help="layer of the Fig. E.1 figure")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    parser.add_argument("--no-strict", action="store_true",
                        help="exit 0 even when a criterion fails (default: exit 1 on FAIL)")


def _from_checkpoint(ck: Path, args: argparse.Namespace) -> tuple[Any, Any, str]:
    """(model in eval mode, data set, description) of a checkpoint file."""
    model, meta = models_module("train").load_checkpoint(ck)
    model.eval()  # BN folding uses the running statistics (seed 000 Eq. 7)
    data = args.data or meta.get("data") or _DEFAULT_DATA
    ds = models_module("data").load_dataset(data, root=args.root, normalize=normalization(meta))
    ishape = tuple(meta.get("input_shape") or ())
    if ishape and tuple(ds.x_test.shape[1:]) != ishape:
        raise ValueError(f"data set {data!r} has images of shape {tuple(ds.x_test.shape[1:])} but "
                         f"checkpoint {ck} expects {ishape}")
    return model, ds, f"{ck.name} ({meta.get('model', type(model).__name__)})"


def _load_source(args: argparse.Namespace) -> tuple[Any, Any, str]:
    """(model, data set, description) for the study, from the options."""
    datasets = models_module("data").DATASETS
    if args.data is not None and args.data not in datasets:  # before looking for its checkpoint
        raise ValueError(f"--data {args.data!r} is not a data set; choose one of {list(datasets)}")
    if args.checkpoint is not None:
        ck = Path(args.checkpoint)
        if not ck.is_file():
            raise FileNotFoundError(f"--checkpoint {args.checkpoint!r}: no such file")
        return _from_checkpoint(ck, args)
    name, data = args.model or _DEFAULT_MODEL, args.data or _DEFAULT_DATA
    ck = checkpoint_dir() / f"{name}_{data}.pt"
    if ck.is_file():
        return _from_checkpoint(ck, args)
    if args.model is None:
        raise FileNotFoundError(f"the default checkpoint {ck} is missing; create it with "
                                "`linop train` or pass --checkpoint / --model")
    train = models_module("train")
    ds = models_module("data").load_dataset(data, root=args.root)
    model = train.build_model(args.model, **train.default_model_kwargs(args.model, ds)).eval()
    print(f"note: no shipped checkpoint {ck.name}; verifying freshly initialised {args.model} weights "
          "(the identity of seed 000 Eq. 3 holds for any weights)", file=sys.stderr)
    return model, ds, f"{args.model} (untrained)"


def _check_args(args: argparse.Namespace) -> None:
    """Reject bad scalar options before loading anything."""
    from ..studies.verify import _dtype_name, parse_size
    from . import check_out

    check_out(args.out)
    if args.n_images is not None and args.n_images < 1:
        raise ValueError(f"--n-images must be ≥ 1, got {args.n_images}")
    if args.images is not None:
        parse_range(args.images, None)
    parse_size(args.memory_budget, "--memory-budget")
    for d in args.dtypes:
        _dtype_name(d)
    check_execution_args(args)


def parse_range(text: str, n_test: int | None) -> range:
    """``--images A:B`` as a range of absolute test-image numbers (Python slice semantics
    without a step: A included, B excluded; ``:B`` = ``0:B``, ``A:`` = to the end).  Refused:
    anything else, negative numbers, an empty or reversed range, B beyond the ``n_test``
    images (when known)."""
    parts = str(text).split(":")
    if len(parts) != 2:
        raise ValueError(f"--images {text!r}: give a range A:B (e.g. 0:100)")
    try:
        a = int(parts[0]) if parts[0].strip() else 0
        b = int(parts[1]) if parts[1].strip() else None
    except ValueError:
        raise ValueError(f"--images {text!r}: A and B must be integers (A:B, e.g. 100:200)") from None
    if a < 0 or (b is not None and b < 0):
        raise ValueError(f"--images {text!r}: image numbers must be ≥ 0")
    if b is None:
        if n_test is None:
            return range(a, a + 1)  # syntax checked; the end is known once the data set is
        b = n_test
    if b <= a:
        raise ValueError(f"--images {text!r}: empty or reversed range (need A < B)")
    if n_test is not None and b > n_test:
        raise ValueError(f"--images {text!r}: the data set has {n_test} test images (0:{n_test})")
    return range(a, b)


def run(args: argparse.Namespace) -> int:
    """Print the Markdown table and PASS/FAIL lines; exit 1 when a criterion fails (0 with
    ``--no-strict``), 2 when the input was invalid."""
    from ..studies.verify import verify

    try:
        _check_args(args)
        model, ds, desc = _load_source(args)
        n_test = int(ds.x_test.shape[0])
        if args.images is not None:
            idx = parse_range(args.images, n_test)
        else:
            n = 4 if args.n_images is None else args.n_images
            if n > n_test:
                raise ValueError(f"--n-images {n} is more than the {n_test} test images of {ds.name}")
            idx = range(n)
        rep = verify(model, ds.x_test[idx.start: idx.stop], dtypes=args.dtypes, layers=args.layers,
                     scale=args.scale, out_dir=args.out, resume=not args.no_resume, progress=not args.no_progress,
                     threshold=args.threshold, skip_first_conv=not args.include_first_conv,
                     memory_budget=args.memory_budget, figure_layer=args.figure_layer, name=desc,
                     indices=idx, keep_eps=args.keep_eps, executor=args.scheduler, workers=args.workers,
                     device=args.device, heap=args.heap)
    except (KeyError, *runtime_errors()) as exc:
        # a key missing from a checkpoint's metadata, Dask missing, no scheduler at the address,
        # a worker that died repeatedly (finished results are kept): one line, exit 2
        print(f"linop verify: error: {execution_error_line(exc)}", file=sys.stderr)
        return 2
    where = f"{rep.executor}, {rep.device}"
    print(f"# verification study: {desc} on {ds.name}, test images {idx.start}:{idx.stop} "
          f"({rep.n_images}), k = {rep.scale:g} ({rep.computed} computed, {rep.cached} from cache; "
          f"{where}; {rep.wall_s:.1f} s; {'ε kept, exact median' if rep.keep_eps else 'compact files'})\n")
    print(rep.markdown())
    if not rep.keep_eps:
        from ..studies.errors import MEDIAN_REL_UNCERTAINTY

        print(f"\nmedian |ε|: the geometric centre of its 0.001-decade bin (relative uncertainty ≤ "
              f"{MEDIAN_REL_UNCERTAINTY:.2e}; bounds in summary.json); counts and max are exact. "
              "--keep-eps gives the exact median.")
    print()
    for line in rep.criteria_lines:
        print(line)
    print(f"\nwritten to {rep.out_dir}: " + ", ".join(sorted(rep.files)))
    failed = [d for d, ok in rep.passed.items() if not ok]
    if failed and not getattr(args, "no_strict", False):
        print(f"linop verify: criteria FAILED for {', '.join(failed)} (exit 1; --no-strict exits 0)", file=sys.stderr)
        return 1
    return 0
