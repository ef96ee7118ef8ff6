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

from ._models import checkpoint_dir, models_module, normalization

__all__ = ["add_arguments", "run"]

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
    parser.add_argument("--n-images", type=int, default=4, help="first N test images (default 4)")
    parser.add_argument("--dtypes", nargs="+", default=["float32", "float64"], help="compute dtypes")
    parser.add_argument("--layers", nargs="+", default=None, help="unit layers (default: all but the first conv)")
    parser.add_argument("--scale", type=float, default=0.125, help="k of z = k·[x; x_b] (seed 000 Eq. 3)")
    parser.add_argument("--threshold", type=float, default=0.01, help="|ε| bound of the table (default 1%%)")
    parser.add_argument("--out", type=str, default="results/verify", help="output directory")
    parser.add_argument("--no-resume", action="store_true", help="recompute cached per-image results")
    parser.add_argument("--memory-budget", type=str, default="2GiB", help="e.g. 2GiB, 512MiB")
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
    if args.n_images < 1:
        raise ValueError(f"--n-images must be ≥ 1, got {args.n_images}")
    parse_size(args.memory_budget, "--memory-budget")
    for d in args.dtypes:
        _dtype_name(d)


def run(args: argparse.Namespace) -> int:
    """Print the Markdown table and PASS/FAIL lines; exit 1 when a criterion fails (0 with
    ``--no-strict``), 2 when the input was invalid."""
    from ..studies.verify import verify

    try:
        _check_args(args)
        model, ds, desc = _load_source(args)
        n_test = int(ds.x_test.shape[0])
        if args.n_images > n_test:
            raise ValueError(f"--n-images {args.n_images} is more than the {n_test} test images of {ds.name}")
        rep = verify(model, ds.x_test[: args.n_images], dtypes=args.dtypes, layers=args.layers, scale=args.scale,
                     out_dir=args.out, resume=not args.no_resume, progress=not args.no_progress,
                     threshold=args.threshold, skip_first_conv=not args.include_first_conv,
                     memory_budget=args.memory_budget, figure_layer=args.figure_layer, name=desc)
    except KeyError as exc:  # a key missing from a checkpoint's metadata: bad input, one line
        print(f"linop verify: error: {exc.args[0] if exc.args else exc}", file=sys.stderr)
        return 2
    print(f"# verification study: {desc} on {ds.name}, {rep.n_images} test image(s), k = {rep.scale:g} "
          f"({rep.computed} computed, {rep.cached} from cache)\n")
    print(rep.markdown())
    print()
    for line in rep.criteria_lines:
        print(line)
    print(f"\nwritten to {rep.out_dir}: " + ", ".join(sorted(rep.files)))
    failed = [d for d, ok in rep.passed.items() if not ok]
    if failed and not getattr(args, "no_strict", False):
        print(f"linop verify: criteria FAILED for {', '.join(failed)} (exit 1; --no-strict exits 0)", file=sys.stderr)
        return 1
    return 0
