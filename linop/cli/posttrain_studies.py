"""``linop posttrain --study stages | architectures | embeddings``: the seed 001 studies beyond
Tables 1–6.

* ``stages`` — Fig. 6 (§4.3): the baseline (``--model``) is trained here by the paper's protocol
  (instance normalisation, tanh, Adam 1e-3, batch 256) and saved after each of
  ``--stage-epochs``; every stage is post-trained on one pair (``--pairs``, default
  ``(1, L−1)``) by BP-PT and FR-PT; plus Fig. 4 at three stages (under-fit, converged,
  over-fit) unless ``--no-fig4``.
* ``architectures`` — Fig. 7 (§4.4): ``conv3_fc2`` (channels 5/10/15) and
  ``conv_channel_decreasing`` (15/10/5), each trained for ``--baseline-epochs``, then FR-PT vs
  BP-PT over the post-training epochs.
* ``embeddings`` — Fig. 5 (§4.2) on every data set present: ``digits`` and ``mnist5k`` always
  (the shipped checkpoints), the directory benchmarks when ``--root`` holds them.

The studies themselves are :mod:`linop.studies.posttrain.stages`, ``.architectures`` and
``.datasets``; this module only loads models and data and hands them over.
"""
from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import Any

from ._models import models_module

__all__ = ["STUDIES", "add_study_arguments", "run_study"]

STUDIES = ("pairs", "stages", "architectures", "embeddings")
#: ``--out`` default of ``linop posttrain``; each study then writes to ``results/posttrain_<study>``
_DEFAULT_OUT = "results/posttrain"
#: seed 001 Tables 1–6: data set -> baseline preset (α: the paper's per data set, unless --alpha)
_PAPER_SETUP = {"digits": ("conv2_fc1",), "mnist5k": ("conv2_fc1",), "mnist": ("conv2_fc1",),
                "cifar10": ("conv3_fc2",), "cifar100": ("conv3_fc2",), "tinyimagenet": ("conv4_fc2",),
                "imagenette": ("conv5_fc2",), "imagewoof": ("conv5_fc2",)}
_DEFAULT_STAGES = "1,2,3,5,10,20,40,70,100,150"


def add_study_arguments(p: argparse.ArgumentParser) -> None:
    """The options of the studies other than ``pairs`` (added to ``linop posttrain``)."""
    g = p.add_argument_group("studies beyond Tables 1-6 (--study stages | architectures | embeddings)")
    g.add_argument("--study", choices=STUDIES, default="pairs",
                   help="pairs: Tables 1-6 (default); stages: Fig. 6 + Fig. 4 over stages; architectures: "
                        "Fig. 7; embeddings: Fig. 5 on every data set present")
    g.add_argument("--stage-epochs", default=_DEFAULT_STAGES,
                   help=f"stages: BP epochs after which the baseline is saved and post-trained, comma-separated "
                        f"[{_DEFAULT_STAGES}]; the paper: 1,2,...,30 (CIFAR-100)")
    g.add_argument("--stage-runs", type=int, default=None,
                   help="stages / architectures / embeddings: runs per configuration [5; paper 10] "
                        "(--runs is the pairs study's)")
    g.add_argument("--baseline-normalize", default="instance", choices=("none", "instance", "dataset", "paper"),
                   help="stages / architectures: input normalisation of the baselines trained here "
                        "[instance, the paper's]")
    g.add_argument("--arch-epochs", type=int, default=30,
                   help="architectures: BP epochs of each baseline [30]")
    g.add_argument("--fig4-samples", type=int, default=256, help="stages: test images of Fig. 4 [256]")
    g.add_argument("--no-fig4", action="store_true", help="stages: skip Fig. 4 over stages")
    g.add_argument("--datasets", nargs="+", default=None, metavar="NAME",
                   help="embeddings: data sets [digits mnist5k + those under --root]")


def _stage_epochs(text: str) -> list[int]:
    try:
        eps = [int(t) for t in str(text).replace(" ", "").split(",") if t]
    except ValueError:
        raise ValueError(f"--stage-epochs={text!r}: expected comma-separated epochs, e.g. 1,2,5,10") from None
    if not eps or min(eps) < 0:
        raise ValueError(f"--stage-epochs={text!r}: expected epochs >= 0")
    return eps


def _out(args: argparse.Namespace) -> Path:
    return Path(f"{_DEFAULT_OUT}_{args.study}" if args.out == _DEFAULT_OUT else args.out)


def _dataset(name: str, root: str | None, normalize: Any, seed: int) -> tuple[Any, dict]:
    ds = models_module("data").load_dataset(name, root=root, normalize=normalize, seed=seed)
    keys = ("x_train", "y_train", "x_val", "y_val", "x_test", "y_test")
    return ds, {k: getattr(ds, k) for k in keys if getattr(ds, k, None) is not None}


def _factory(model: str, ds: Any):
    train = models_module("train")
    kwargs = train.default_model_kwargs(model, ds, "tanh")
    return lambda: train.build_model(model, **kwargs)


def _common(args: argparse.Namespace) -> dict:
    return {"alpha": args.alpha, "epochs": args.epochs, "lr": args.lr, "batch_size": args.batch_size,
            "solver": args.solver, "paper": bool(getattr(args, "paper", False)), "seed": args.seed,
            "resume": not args.no_resume, "progress": not args.no_progress}


def _info(args: argparse.Namespace) -> dict:
    return {"normalize": args.baseline_normalize, "activation": "tanh", "root": args.root}


def _runs(args: argparse.Namespace) -> int:
    r = args.stage_runs if args.stage_runs is not None else 5
    if r < 1:
        raise ValueError(f"--stage-runs must be >= 1, got {r}")
    return r


def _stages(args: argparse.Namespace, out: Path) -> dict:
    from ..studies.posttrain import parse_pair
    from ..studies.posttrain.stages import stages_study

    pairs = [parse_pair(s) for s in args.pairs] if args.pairs else None
    if pairs is not None and len(pairs) != 1:
        raise ValueError(f"--study stages post-trains one representative pair; got --pairs {' '.join(args.pairs)}")
    if args.fig4_samples < 1:
        raise ValueError(f"--fig4-samples must be >= 1, got {args.fig4_samples}")
    ds, data = _dataset(args.data, args.root, args.baseline_normalize, args.seed)
    res = stages_study(_factory(args.model, ds), data, stage_epochs=_stage_epochs(args.stage_epochs),
                       pair=pairs[0] if pairs else None, runs=_runs(args), report_epochs=args.report_epochs,
                       embedding=args.embedding, out_dir=out, fig4=not args.no_fig4, fig4_samples=args.fig4_samples,
                       name=args.model, data_name=args.data, info=_info(args), **_common(args))
    return res.files


def _architectures(args: argparse.Namespace, out: Path) -> dict:
    from ..studies.posttrain import parse_pair
    from ..studies.posttrain.architectures import architectures_study

    if args.arch_epochs < 1:
        raise ValueError(f"--arch-epochs must be >= 1, got {args.arch_epochs}")
    ds, data = _dataset(args.data, args.root, args.baseline_normalize, args.seed)
    factories = {"(a) conv3_fc2, channels increasing": _factory("conv3_fc2", ds),
                 "(b) conv_channel_decreasing, channels decreasing": _factory("conv_channel_decreasing", ds)}
    res = architectures_study(factories, data, baseline_epochs=args.arch_epochs,
                              pairs=[parse_pair(s) for s in args.pairs] if args.pairs else None, runs=_runs(args),
                              report_epochs=args.report_epochs, embedding=args.embedding, out_dir=out,
                              data_name=args.data, info=_info(args), **_common(args))
    return res.files


def _embeddings(args: argparse.Namespace, out: Path) -> dict:
    from ..studies.posttrain.datasets import embedding_ablation_across
    from .posttrain import load_baseline

    names = args.datasets or ["digits", "mnist5k"] + [d for d in _PAPER_SETUP if d not in ("digits", "mnist5k")]
    unknown = [n for n in names if n not in _PAPER_SETUP]
    if unknown:
        raise ValueError(f"--datasets {unknown}: expected names among {list(_PAPER_SETUP)}")
    baselines, notes = {}, {}
    for name in names:
        bundled = name in ("digits", "mnist5k")
        if not bundled and args.root is None:
            notes[name] = "no --root (nothing is downloaded)"
            continue
        model = args.model if bundled else _PAPER_SETUP[name][0]
        try:
            net, _meta, data = load_baseline(model, None, name, args.root, args.seed, out, not args.no_progress,
                                             args.baseline_epochs)
        except (FileNotFoundError, ImportError) as exc:  # a benchmark whose files are not here
            notes[name] = (str(exc).splitlines() or [type(exc).__name__])[0]
            continue
        baselines[name] = (net, data)
    if not baselines:
        raise FileNotFoundError("--study embeddings: no data set could be loaded: "
                                + "; ".join(f"{k}: {v}" for k, v in notes.items()))
    res = embedding_ablation_across(baselines, runs=_runs(args), out_dir=out, notes=notes, **_common(args))
    return res["files"]


def run_study(args: argparse.Namespace) -> int:
    """Run the study named by ``args.study`` (not ``pairs``: that is ``linop.cli.posttrain.run``)."""
    import torch

    from . import check_out

    runners = {"stages": _stages, "architectures": _architectures, "embeddings": _embeddings}
    if args.study not in runners:
        raise ValueError(f"--study {args.study!r}: expected one of {sorted(runners)}")
    out = _out(args)
    check_out(str(out))
    if args.threads is not None:
        if args.threads < 1:
            raise ValueError(f"--threads must be >= 1, got {args.threads}")
        torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    files = runners[args.study](args, out)
    flat = [v for f in files.values() for v in (f if isinstance(f, list) else [f])]
    print(f"\nwrote {', '.join(flat)}  ({time.perf_counter() - t0:.1f} s)")
    return 0
