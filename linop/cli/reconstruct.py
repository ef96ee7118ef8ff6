"""``linop reconstruct``: reconstruct feature maps from labels (seed 001 §3, Fig. 4).

Loads a checkpoint (default: the shipped 2Conv+1fc tanh baseline on digits, resolved from
the package location) and its data set's first ``--n`` test samples, runs
:func:`linop.studies.reconstruct.reconstruction_study` and prints one line per reverse step.
"""
from __future__ import annotations

import argparse
from pathlib import Path

from ._models import checkpoint_dir, models_module, normalization

__all__ = ["add_arguments", "run"]

_DEFAULT_CHECKPOINT = "conv2_fc1_digits.pt"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from ..reverse import steps
    from ..reverse.walk import EMBEDDINGS

    parser.add_argument("--checkpoint", default=None,
                        help=f"trained seed 001 baseline (models.train checkpoint; default: the shipped "
                             f"models/checkpoints/{_DEFAULT_CHECKPOINT})")
    parser.add_argument("--data", default=None,
                        help="data set name for models.data.load_dataset (default: the checkpoint's)")
    parser.add_argument("--root", default=None, help="directory of cifar10 / cifar100 / mnist files")
    parser.add_argument("--n", type=int, default=16, help="number of test samples to reconstruct")
    parser.add_argument("--to-layer", default="input", help="'input', a node name, or U / U:in / U:out for a unit layer U")
    parser.add_argument("--embedding", default="ne", choices=EMBEDDINGS)
    parser.add_argument("--solver", default="auto", help="linop.solve method: auto or a registered one (dense, lsmr, lsqr, cg, fft, fft-pcg, fft-exact, …)")
    parser.add_argument("--tol", type=float, default=1e-10)
    parser.add_argument("--maxiter", type=int, default=None)
    parser.add_argument("--maxpool", default="copy", choices=steps.MAXPOOL_MODES)
    parser.add_argument("--avgpool", default="copy", choices=steps.AVGPOOL_MODES)
    parser.add_argument("--clip-margin", type=float, default=steps.DEFAULT_CLIP_MARGIN)
    parser.add_argument("--dtype", default="float64", choices=("float32", "float64"))
    parser.add_argument("--sample", type=int, default=None,
                        help="sample drawn in the discrepancy figures (default: the first one the embedding changed)")
    parser.add_argument("--out", default="results/reconstruct", help="output directory (JSON + PNG)")
    parser.add_argument("--paper", action="store_true",
                        help="seed 001's method: pooling copied back in every window, the §3.2 FFT solve for "
                             "unpadded stride-1 convs, MDP/CCP by channels (README 'Paper mode')")
    parser.add_argument("--pool-rule", default=None, choices=("exact", "copy"),
                        help="unchanged pooling windows: keep â (exact) or copy back (the paper) "
                             "[exact; copy with --paper]")


def run(args: argparse.Namespace) -> int:
    import torch

    from ..solvers import METHODS
    from ..studies.reconstruct import reconstruction_study

    from . import check_out

    torch.set_num_threads(max(1, min(2, torch.get_num_threads())))
    check_out(args.out)
    if args.n < 1:
        raise ValueError(f"--n must be >= 1, got {args.n}")
    if args.solver not in METHODS:  # else only the first linear step would notice
        raise ValueError(f"--solver must be one of {METHODS}, got {args.solver!r}")
    if args.sample is not None and not 0 <= args.sample < args.n:
        raise ValueError(f"--sample must lie in [0, --n={args.n}), got {args.sample}")
    checkpoint = Path(args.checkpoint) if args.checkpoint is not None else checkpoint_dir() / _DEFAULT_CHECKPOINT
    model, meta = models_module("train").load_checkpoint(checkpoint)
    model.eval()
    data_name = args.data if args.data is not None else meta.get("data", "digits")
    ds = models_module("data").load_dataset(data_name, root=args.root, normalize=normalization(meta))
    x_test, y_test = ds.x_test, ds.y_test
    if args.n > len(x_test):
        raise ValueError(f"--n {args.n} is more than the {len(x_test)} test samples of {data_name}")
    study = reconstruction_study(
        model, x_test[: args.n], y_test[: args.n], args.out, to_layer=args.to_layer, embedding=args.embedding,
        solver=args.solver, tol=args.tol, maxiter=args.maxiter, maxpool=args.maxpool, avgpool=args.avgpool,
        clip_margin=args.clip_margin, dtype=args.dtype, sample=args.sample, progress=True,
        info={"checkpoint": str(checkpoint), "data": data_name}, paper=args.paper, pool_rule=args.pool_rule)
    summ = study.summary
    print(f"reconstructed {summ['n']} samples of {data_name} to {study.rec.to_layer!r} ({args.embedding}, "
          f"{args.dtype}) in {study.seconds:.2f} s; {summ['n_changed_at_output']} changed by the embedding; "
          f"pool_rule={summ['pool_rule']}, solvers used: {', '.join(summ['solvers_used']) or '-'}")
    print(study.table())
    figs = [str(f) for f in study.files[1:]]
    print(f"wrote {study.files[0]} and {len(figs)} figure(s) of sample {study.sample}: {', '.join(figs)}")
    return 0
