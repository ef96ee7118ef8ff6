"""``linop posttrain``: the FR-PT vs BP-PT post-training study (seed 001 §4, Tables 1–6, Figs. 5–6).

Finds the converged baseline — ``--checkpoint``, else the shipped
``models/checkpoints/<model>_<data>.pt`` (resolved from the package location), else one
trained earlier by this command under ``--out``, else it trains the preset here (seeded) —
loads the data set with the normalisation and split the baseline was trained with, and runs
:func:`linop.studies.posttrain.posttrain_study`.

A baseline trained here follows seed 001's protocol (§4: instance normalisation, tanh, max
pooling with stride = kernel — the presets' layout —, Adam at a constant 1e-3, batch 256) on
every data set but the 8×8 ``digits`` / ``digits32`` stand-ins, which keep the recipe of
``models/checkpoints/make_checkpoints.sh`` (no normalisation, Adam 3e-3, batch 32).

``--study stages | architectures | embeddings`` runs seed 001's Fig. 6 (+ Fig. 4 over stages),
Fig. 7 and Fig. 5 over data sets instead (:mod:`linop.cli.posttrain_studies`).

``--paper`` reconstructs the FR-PT targets by seed 001's method instead of our exact variants
(README "Paper mode"); ``--alpha`` defaults to the paper's α for the data set (Tables 1–6).
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from ._execution import add_execution_arguments, check_execution_args, execution_error_line, runtime_errors
from ._models import checkpoint_dir, models_module, normalization

__all__ = ["add_arguments", "baseline_recipe", "load_baseline", "load_data", "prepare", "run", "run_pairs"]

_BASELINES = ("conv2_fc1", "conv3_fc2", "conv_channel_decreasing")
_DATA_KEYS = ("x_train", "y_train", "x_test", "y_test")


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default="conv2_fc1", help="baseline preset (models.baselines) [conv2_fc1]")
    p.add_argument("--checkpoint", default=None, help="checkpoint of a trained model (models.train format)")
    p.add_argument("--data", default="mnist5k",
                   help="mnist5k | digits | digits32 | mnist | cifar10 | cifar100 | tinyimagenet | imagenette | "
                        "imagewoof [mnist5k: 5,000 real MNIST digits]")
    p.add_argument("--root", default=None, help="directory holding MNIST / CIFAR files")
    p.add_argument("--pairs", nargs="+", default=None, metavar="LS:LR", help="(l_S, l_R) pairs, e.g. 0:1 1:3 [all]")
    p.add_argument("--alpha", type=float, default=None,
                   help="loss coefficient of seed 001 Eq. 3 [the paper's for the data set: 0.1 MNIST / CIFAR-10 / "
                        "ImageWoof, 0.7 CIFAR-100 / Tiny ImageNet, 0.3 ImageNette]")
    p.add_argument("--epochs", type=int, default=10)
    p.add_argument("--report-epochs", type=int, nargs="+", default=None, metavar="E",
                   help="epoch columns of the tables, each in [1, --epochs] [1 5 10 up to --epochs, and --epochs]")
    p.add_argument("--paper", action="store_true",
                   help="reconstruct a* by seed 001's method (pooling copied back in every window, the §3.2 FFT "
                        "solve, MDP/CCP by channels) instead of our exact variants; results name the mode")
    p.add_argument("--runs", type=int, default=10)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--optimizer", choices=("sgd", "adam"), default="adam")
    p.add_argument("--momentum", type=float, default=0.0, help="SGD momentum [0]")
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--embedding", choices=("ne", "ma", "onehot"), default="ne")
    p.add_argument("--solver", default="auto", help="reconstruction solver (linop.reverse.reconstruct) [auto]")
    p.add_argument("--rec-loss", choices=("auto", "mse", "l1"), default="auto")
    p.add_argument("--ablation", action="store_true", help="also run the §4.2 embedding ablation (Fig. 5)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="results/posttrain", help="output directory [results/posttrain]")
    p.add_argument("--cache-dir", default=None, help="reconstruction cache [OUT/cache]")
    p.add_argument("--no-resume", action="store_true", help="start the results file afresh")
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads")
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("--baseline-epochs", type=int, default=40, help="epochs when the baseline must be trained [40]")
    add_execution_arguments(p, "(pair, method, run) of the pairs study")
    from .posttrain_studies import add_study_arguments  # --study stages | architectures | embeddings (H5)

    add_study_arguments(p)


def load_data(name: str, root: str | None, normalize: Any, seed: int) -> dict:
    """The four tensors of data set ``name`` (``models.data.load_dataset``)."""
    ds = models_module("data").load_dataset(name, root=root, normalize=normalize, seed=seed)
    return {k: getattr(ds, k) for k in _DATA_KEYS}


def _find_checkpoint(model: str, checkpoint: str | None, data_name: str, seed: int, out_dir: Path) -> Path | None:
    if checkpoint is not None:
        if not Path(checkpoint).exists():
            raise FileNotFoundError(f"checkpoint={str(checkpoint)!r}: no such file")
        return Path(checkpoint)
    for p in (checkpoint_dir() / f"{model}_{data_name}.pt", out_dir / f"baseline_{model}_{data_name}_seed{seed}.pt"):
        if p.exists():
            return p
    return None


def _plain_meta(meta: Any) -> dict:
    """The JSON-able entries of checkpoint metadata (without the training history)."""
    out = {}
    for k, v in (meta.items() if isinstance(meta, Mapping) else ()):
        try:
            json.dumps(v)
        except TypeError:
            continue
        out[str(k)] = v
    out.pop("history", None)
    return out


def baseline_recipe(data_name: str, epochs: int) -> dict:
    """The training settings of a baseline this command trains (``models.train.train`` keywords).

    Seed 001 §4: "Data sets are all instance normalized ... All nonlinear activation functions
    are tanh. The pooling layers are configured as max-pooling, with their stride equal to the
    kernel size. The optimizer for BP is Adam with a learning rate 0.001. The batch size is set
    to 256" — for every data set but the 8×8 digits stand-ins, which keep the shipped digits
    checkpoint's recipe (no normalisation, Adam 3e-3, batch 32: 1,077 training images)."""
    if data_name.startswith("digits"):
        return {"epochs": epochs, "lr": 3e-3, "batch_size": 32, "optimizer": "adam", "weight_decay": 0.0}
    return {"epochs": epochs, "lr": 1e-3, "batch_size": 256, "optimizer": "adam", "weight_decay": 0.0,
            "normalize": "instance", "schedule": "constant"}


def load_baseline(model: str, checkpoint: str | None, data_name: str, root: str | None, seed: int, out_dir: Path,
                  progress: bool, baseline_epochs: int = 40) -> tuple[Any, dict, dict]:
    """(baseline module, its metadata, data tensors): see the module docstring for the order
    in which a baseline is looked for.  The data split is the one the baseline was trained on
    (its seed) with its normalisation."""
    import torch

    train_mod = models_module("train")
    path = _find_checkpoint(model, checkpoint, data_name, seed, out_dir)
    if path is None:
        path = out_dir / f"baseline_{model}_{data_name}_seed{seed}.pt"
        train_mod.train(model, data_name, seed=seed, out=path, root=root,
                        activation="tanh" if model in _BASELINES else None, progress=progress,
                        **baseline_recipe(data_name, baseline_epochs))
    # allowlist TorchVersion for weights_only loading: models.train writes meta["torch"] =
    # torch.__version__, a TorchVersion (a str subclass), which torch.load otherwise refuses
    with torch.serialization.safe_globals([torch.torch_version.TorchVersion]):
        net, meta = train_mod.load_checkpoint(path)
    meta = {"source": str(path), **_plain_meta(meta)}
    if meta.get("model") not in (None, model) and checkpoint is None:
        raise ValueError(f"{path}: holds model {meta.get('model')!r}, not {model!r}")
    d = load_data(data_name, root, normalization(meta), int(meta.get("seed", 0)))
    shape = tuple(d["x_train"].shape[1:])
    if meta.get("input_shape") and tuple(meta["input_shape"]) != shape:
        raise ValueError(f"{path}: the model takes inputs of shape {tuple(meta['input_shape'])}, "
                         f"data {data_name!r} has {shape}")
    return net, meta, d


def prepare(args: argparse.Namespace) -> None:
    """Checks shared by every study of this command, before any work (ValueError names the option)."""
    import torch

    from ..studies.posttrain import check_options
    from ..studies.posttrain.study import default_report_epochs
    from . import check_out

    check_out(args.out)
    if args.cache_dir is not None:
        check_out(args.cache_dir, "--cache-dir")
    if args.threads is not None:
        if args.threads < 1:  # 0 was silently ignored, a negative count a RuntimeError from torch
            raise ValueError(f"--threads must be >= 1, got {args.threads}")
        torch.set_num_threads(args.threads)
    check_options(optimizer=args.optimizer, embedding=args.embedding, solver=args.solver, rec_loss=args.rec_loss,
                  alpha=args.alpha, lr=args.lr, epochs=args.epochs, runs=args.runs, batch_size=args.batch_size)
    check_execution_args(args)
    if getattr(args, "study", "pairs") != "pairs" and (args.scheduler is not None or args.device != "cpu"):
        raise ValueError(f"--scheduler / --device apply to --study pairs; --study {args.study} runs in-process on the CPU")
    if args.report_epochs is not None:
        try:
            default_report_epochs(args.epochs, args.report_epochs)
        except ValueError as exc:
            raise ValueError(f"--report-epochs: {exc}") from None


def run_pairs(args: argparse.Namespace) -> int:
    """The FR-PT vs BP-PT table over (l_S, l_R) pairs (seed 001 Tables 1–6)."""
    from ..studies.posttrain import parse_pair, posttrain_study

    pairs = [parse_pair(s) for s in args.pairs] if args.pairs else None
    t0 = time.perf_counter()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    base, meta, data = load_baseline(args.model, args.checkpoint, args.data, args.root, args.seed, out,
                                     not args.no_progress, args.baseline_epochs)
    res = posttrain_study(
        base, data, pairs=pairs, alpha=args.alpha, epochs=args.epochs, lr=args.lr, optimizer=args.optimizer,
        momentum=args.momentum, runs=args.runs, embedding=args.embedding, solver=args.solver,
        batch_size=args.batch_size, seed=args.seed, out_dir=out, cache_dir=args.cache_dir,
        resume=not args.no_resume, progress=not args.no_progress, ablation=args.ablation, rec_loss=args.rec_loss,
        name=args.model, data_name=args.data, baseline_meta=meta, report_epochs=args.report_epochs,
        paper=args.paper, executor=args.scheduler, workers=args.workers, device=args.device,
    )
    print(f"\nmode: {res.config['mode']}; alpha={res.config['alpha']}")
    print(f"wrote {', '.join(res.files.values())}  ({time.perf_counter() - t0:.1f} s)")
    return 0


def run(args: argparse.Namespace) -> int:
    """``linop posttrain``: checks, then the study."""
    prepare(args)
    if getattr(args, "study", "pairs") != "pairs":  # Figs. 4-7: linop.cli.posttrain_studies
        from .posttrain_studies import run_study

        return run_study(args)
    try:
        return run_pairs(args)
    except runtime_errors() as exc:  # Dask missing, no scheduler, a worker lost: finished runs are kept
        print(f"linop posttrain: error: {execution_error_line(exc)}", file=sys.stderr)
        return 2
