"""Train a reference model on a supported data set and save a checkpoint.

Usage::

    python -m models.train --model vgg7 --data digits32 --epochs 15 --out vgg7.pt
    linop train --model conv2_fc1 --data digits --optimizer adam --lr 1e-3 --out c.pt

The run is deterministic for a given seed, torch version and thread count (seeded init, seeded
shuffling, deterministic CPU kernels).  Training follows seed 000 §4.1 in spirit: cross-entropy
(+ optional L1 on the kernels, ``--l1``), validation every epoch, and the model with the best
validation accuracy is kept -- the checkpoint file is rewritten each time the validation accuracy
improves, so an interrupted run still leaves its best model on disk.

Checkpoint format (``torch.save`` of a dict, loadable with ``weights_only=True``)::

    {"state_dict": ..., "meta": {"model": name, "kwargs": {...}, "data": data_name,
     "input_shape": [C, H, W], "normalize": ..., "mean": ..., "std": ..., "test_accuracy": ...,
     "val_accuracy": ..., "epochs": ..., "best_epoch": ..., "seed": ..., "torch": version, ...}}
"""
from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import tempfile
import sys
import time
from pathlib import Path
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import nn

from .baselines import conv2_fc1, conv3_fc2, conv4_fc2, conv5_fc2, conv_channel_decreasing
from .data import DATASETS, NORMALIZATIONS, Dataset, load_dataset
from .fixup_resnet20 import fixup_resnet20
from .resnet20 import resnet20
from .vgg7 import vgg7
from .zoo import ZOO

__all__ = ["MODELS", "build_model", "default_model_kwargs", "train", "evaluate",
           "load_checkpoint", "save_checkpoint", "add_arguments", "run", "main"]

#: name -> factory
MODELS: dict[str, Callable[..., nn.Module]] = {
    "vgg7": vgg7,
    "resnet20": resnet20,
    "fixup_resnet20": fixup_resnet20,
    "conv2_fc1": conv2_fc1,
    "conv3_fc2": conv3_fc2,
    "conv4_fc2": conv4_fc2,
    "conv5_fc2": conv5_fc2,
    "conv_channel_decreasing": conv_channel_decreasing,
    # the zoo of torchvision-style CNNs (issue 13; models.zoo): random-weight checkpoints by
    # models.zoo.make_checkpoint, or trained here like the others
    **ZOO,
}
_BASELINES = ("conv2_fc1", "conv3_fc2", "conv4_fc2", "conv5_fc2", "conv_channel_decreasing")


def build_model(name: str, **kwargs: Any) -> nn.Module:
    """Instantiate a registered model by name (see :data:`MODELS`) with factory kwargs."""
    if name not in MODELS:
        raise ValueError(f"build_model: model={name!r} not registered; choose one of "
                         f"{sorted(MODELS)}")
    try:
        return MODELS[name](**kwargs)
    except TypeError as exc:  # an unknown / missing factory kwarg: name it, not a deep traceback
        raise ValueError(f"build_model: model={name!r} does not accept kwargs {sorted(kwargs)} "
                         f"({exc})") from exc


def default_model_kwargs(name: str, data: Dataset, activation: str | None = None) -> dict:
    """Factory kwargs fitting ``data``: class count and input channels / shape."""
    if name not in MODELS:
        raise ValueError(f"model={name!r} not registered; choose one of {sorted(MODELS)}")
    if name in _BASELINES:
        kw = {"in_shape": list(data.input_shape), "num_classes": data.num_classes}
        if activation is not None:
            kw["activation"] = activation
        return kw
    if activation is not None:
        raise ValueError(f"--activation={activation!r} applies to the seed 001 baselines "
                         f"{_BASELINES}, not to {name!r}")
    return {"num_classes": data.num_classes, "in_channels": data.input_shape[0]}


@torch.no_grad()
def evaluate(model: nn.Module, x: torch.Tensor, y: torch.Tensor, batch_size: int = 256,
             device: str | torch.device = "cpu") -> float:
    """Top-1 accuracy of ``model`` (put in eval mode) on ``(x, y)``."""
    if x.shape[0] == 0:
        return float("nan")
    model.eval()
    correct = 0
    for i in range(0, x.shape[0], batch_size):
        xb = x[i:i + batch_size].to(device)
        correct += (model(xb).argmax(1).cpu() == y[i:i + batch_size]).sum().item()
    return correct / x.shape[0]


def save_checkpoint(path: str | os.PathLike, model: nn.Module, meta: dict) -> None:
    """Atomically write ``{"state_dict", "meta"}`` (tmp file + rename: never half-written)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}
    # a uniquely named temporary file (concurrent writers never share one), removed on any error
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as fh:
            torch.save({"state_dict": state, "meta": meta}, fh)
        # mkstemp creates 0600; give the checkpoint the mode a plain open() would (umask)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def load_checkpoint(path: str | os.PathLike,
                    map_location: str | torch.device = "cpu") -> tuple[nn.Module, dict]:
    """Rebuild the model saved by :func:`train` and return ``(model.eval(), meta)``."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"load_checkpoint: no file {path}")
    try:
        ck = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as exc:
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:200]
        raise ValueError(f"load_checkpoint: {path} is not a readable torch checkpoint written by "
                         f"models.train (torch.load: {first})") from exc
    if not isinstance(ck, dict) or "state_dict" not in ck or "meta" not in ck:
        raise ValueError(f"load_checkpoint: {path} lacks 'state_dict'/'meta'; expected a file "
                         "written by models.train")
    meta = ck["meta"]
    if not isinstance(meta, dict) or not isinstance(meta.get("model"), str):
        raise ValueError(f"load_checkpoint: {path}: its meta names no model (expected {{'model': name, ...}})")
    try:
        model = build_model(meta["model"], **meta.get("kwargs", {}))
    except (TypeError, KeyError) as exc:
        raise ValueError(f"load_checkpoint: {path}: cannot build model {meta['model']!r} from its meta "
                         f"({exc})") from None
    _load_weights(model, ck["state_dict"], path, meta["model"])
    return model.to(map_location).eval(), meta


def _load_weights(model: nn.Module, state: dict, path: Path, name: str) -> None:
    """``model.load_state_dict(state)``, or one ValueError naming the checkpoint and the
    mismatch (missing / unexpected keys, shape differences) instead of torch's traceback."""
    if not isinstance(state, dict):
        raise ValueError(f"load_checkpoint: {path}: 'state_dict' is a {type(state).__name__}, not a dict")
    own = model.state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    shapes = [f"{k} {tuple(state[k].shape)} vs {tuple(own[k].shape)}" for k in own
              if k in state and hasattr(state[k], "shape") and tuple(state[k].shape) != tuple(own[k].shape)]
    if missing or unexpected or shapes:
        parts = [f"{len(missing)} missing (e.g. {missing[:3]})" if missing else "",
                 f"{len(unexpected)} unexpected (e.g. {unexpected[:3]})" if unexpected else "",
                 f"{len(shapes)} of another shape (e.g. {shapes[:2]})" if shapes else ""]
        raise ValueError(f"load_checkpoint: {path}: the weights do not belong to model {name!r}: "
                         + "; ".join(p for p in parts if p) + " — a checkpoint of another model or a damaged file")
    model.load_state_dict(state)


@contextlib.contextmanager
def _deterministic(num_threads: int | None):
    old_threads = torch.get_num_threads()
    old_det = torch.are_deterministic_algorithms_enabled()
    if num_threads:
        torch.set_num_threads(num_threads)
    torch.use_deterministic_algorithms(True, warn_only=True)
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(old_det)
        torch.set_num_threads(old_threads)


def _check_train_args(model_name: str, epochs: int, lr: float, batch_size: int, optimizer: str,
                      schedule: str, device: str, num_threads: int | None) -> None:
    """Reject bad options of :func:`train` (``ValueError`` naming the option) before any work."""
    if epochs < 1 or batch_size < 1 or not math.isfinite(lr) or lr <= 0:
        raise ValueError(f"train: epochs={epochs}, batch_size={batch_size} must be >= 1 and "
                         f"lr={lr} finite and > 0")
    if optimizer not in ("sgd", "adam"):
        raise ValueError(f"train: optimizer={optimizer!r}; choose 'sgd' or 'adam'")
    if schedule not in ("cosine", "constant"):
        raise ValueError(f"train: schedule={schedule!r}; choose 'cosine' or 'constant'")
    if model_name not in MODELS:
        raise ValueError(f"train: model={model_name!r} not registered; choose one of "
                         f"{sorted(MODELS)}")
    try:
        dev = torch.device(device)
    except RuntimeError as exc:
        raise ValueError(f"train: device={device!r} is not a torch device ({exc})") from exc
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"train: device={device!r} but torch reports no CUDA device "
                         f"(torch {torch.__version__}); use device='cpu'")
    if num_threads is not None and num_threads < 1:
        raise ValueError(f"train: num_threads={num_threads} must be >= 1")


def _make_optimizer(model: nn.Module, optimizer: str, lr: float, momentum: float,
                    weight_decay: float, scalar_lr_mult: float) -> torch.optim.Optimizer:
    """SGD (with momentum) or Adam over the model's trainable parameters."""
    # Fixup practice: scalar biases / multipliers learn at a tenth of the base rate (their
    # gradients sum over every position and channel of the layer they shift)
    scalars = [p for p in model.parameters() if p.requires_grad and p.numel() == 1]
    tensors = [p for p in model.parameters() if p.requires_grad and p.numel() > 1]
    params = [{"params": tensors}]
    if scalars:
        params.append({"params": scalars, "lr": lr * scalar_lr_mult})
    if optimizer == "sgd":
        return torch.optim.SGD(params, lr=lr, momentum=momentum, weight_decay=weight_decay)
    return torch.optim.Adam(params, lr=lr, weight_decay=weight_decay)


def train(model_name: str, data_name: str, epochs: int, lr: float, batch_size: int, seed: int,
          out: str | os.PathLike, root: str | os.PathLike | None = None, device: str = "cpu",
          *, optimizer: str = "sgd", momentum: float = 0.9, weight_decay: float = 5e-4,
          l1: float = 0.0, scalar_lr_mult: float = 0.1, schedule: str = "cosine",
          normalize="none",
          activation: str | None = None, model_kwargs: dict | None = None,
          num_threads: int | None = None, progress: bool = True,
          data: Dataset | None = None) -> dict:
    """Train ``model_name`` on ``data_name`` and save the best-validation checkpoint to ``out``.

    Parameters
    ----------
    model_name : str
        One of :data:`MODELS`.
    data_name : str
        One of ``models.data.DATASETS`` (``root`` for CIFAR / MNIST).
    epochs, lr, batch_size, seed : int, float, int, int
        Epochs, initial learning rate, mini-batch size, seed of init / shuffling / split.
    out : path
        Checkpoint file (rewritten whenever validation accuracy improves).
    device : str
        Torch device (``"cpu"``, ``"cuda"``...).
    optimizer : {"sgd", "adam"}
        SGD with momentum / Adam.
    weight_decay, l1 : float
        L2 decay in the optimiser; L1 coefficient on conv / FC weights in the loss (seed 000).
    scalar_lr_mult : float
        Learning-rate factor of one-element parameters (Fixup's scalar biases and multipliers;
        the Fixup reference code uses 0.1).
    schedule : {"cosine", "constant"}
        Learning-rate schedule over the run.
    normalize : str or (mean, std)
        Input normalisation, see :func:`models.data.load_dataset`; stored in the metadata.
    activation : str, optional
        Activation of the seed 001 baselines (``"tanh"`` default, ``"relu"``).
    model_kwargs : dict, optional
        Extra factory kwargs (override the defaults derived from the data).
    num_threads : int, optional
        torch CPU threads during the run.
    data : Dataset, optional
        Already-loaded data (skips ``load_dataset``; ``data_name`` is still recorded).

    Returns
    -------
    dict
        The checkpoint metadata (also saved in ``out``).
    """
    _check_train_args(model_name, epochs, lr, batch_size, optimizer, schedule, device, num_threads)
    from tqdm.auto import tqdm

    with _deterministic(num_threads):
        ds = data if data is not None else load_dataset(data_name, root, normalize=normalize,
                                                        seed=seed)
        kwargs = default_model_kwargs(model_name, ds, activation)
        kwargs.update(model_kwargs or {})
        torch.manual_seed(seed)
        model = build_model(model_name, **kwargs).to(device)
        opt = _make_optimizer(model, optimizer, lr, momentum, weight_decay, scalar_lr_mult)
        n = ds.x_train.shape[0]
        steps_per_epoch = (n + batch_size - 1) // batch_size
        sched = (torch.optim.lr_scheduler.CosineAnnealingLR(opt, epochs * steps_per_epoch)
                 if schedule == "cosine" else None)
        weights = [m.weight for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
        gen = torch.Generator().manual_seed(seed)
        meta = {
            "model": model_name, "kwargs": kwargs, "data": data_name,
            "input_shape": list(ds.input_shape), "classes": list(ds.classes),
            "normalize": ds.normalize if isinstance(normalize, str) else "custom",
            "mean": list(ds.mean) if ds.mean else None, "std": list(ds.std) if ds.std else None,
            "epochs": epochs, "lr": lr, "batch_size": batch_size, "seed": seed,
            "optimizer": optimizer, "momentum": momentum, "weight_decay": weight_decay,
            "l1": l1, "scalar_lr_mult": scalar_lr_mult, "schedule": schedule, "device": str(device),
            "num_threads": torch.get_num_threads(), "torch": str(torch.__version__),
            "best_epoch": None, "val_accuracy": None, "test_accuracy": None, "history": [],
        }
        best = -1.0
        best_state = None
        t0 = time.perf_counter()
        bar = tqdm(total=epochs * steps_per_epoch, desc=f"{model_name}/{data_name}",
                   disable=not progress, unit="batch")
        for epoch in range(1, epochs + 1):
            model.train()
            perm = torch.randperm(n, generator=gen)
            tot_loss = 0.0
            for i in range(0, n, batch_size):
                idx = perm[i:i + batch_size]
                xb, yb = ds.x_train[idx].to(device), ds.y_train[idx].to(device)
                loss = F.cross_entropy(model(xb), yb)
                if l1:
                    loss = loss + l1 * sum(w.abs().sum() for w in weights)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                if sched is not None:
                    sched.step()
                tot_loss += loss.item() * idx.numel()
                bar.update(1)
            val = evaluate(model, ds.x_val, ds.y_val, device=device)
            meta["history"].append({"epoch": epoch, "train_loss": tot_loss / n,
                                    "val_accuracy": val})
            bar.set_postfix(loss=f"{tot_loss / n:.3f}", val=f"{val:.3f}")
            # keep the best-validation model and write it at once; with no validation split
            # (NaN accuracy) the latest epoch is kept
            if val > best or (math.isnan(val) and epoch == epochs) or best_state is None:
                best, meta["best_epoch"], meta["val_accuracy"] = val, epoch, val
                best_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
                meta["train_seconds"] = time.perf_counter() - t0
                save_checkpoint(out, model, meta)
        bar.close()
        model.load_state_dict(best_state)
        meta["train_seconds"] = round(time.perf_counter() - t0, 1)
        meta["test_accuracy"] = evaluate(model, ds.x_test, ds.y_test, device=device)
        save_checkpoint(out, model, meta)
    return meta


# ----------------------------------------------------------------------------- CLI
def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of ``linop train`` / ``python -m models.train``."""
    parser.add_argument("--model", required=True, choices=sorted(MODELS))
    parser.add_argument("--data", default="digits32", choices=DATASETS)
    parser.add_argument("--root", default=None, help="directory of CIFAR / MNIST files")
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--lr", type=float, default=0.05)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", required=True, help="checkpoint path (.pt)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--optimizer", default="sgd", choices=("sgd", "adam"))
    parser.add_argument("--momentum", type=float, default=0.9)
    parser.add_argument("--weight-decay", type=float, default=5e-4)
    parser.add_argument("--l1", type=float, default=0.0, help="L1 coefficient on the kernels")
    parser.add_argument("--scalar-lr-mult", type=float, default=0.1,
                        help="lr factor of scalar parameters (Fixup biases / multipliers)")
    parser.add_argument("--schedule", default="cosine", choices=("cosine", "constant"))
    parser.add_argument("--normalize", default="none", choices=NORMALIZATIONS)
    parser.add_argument("--activation", default=None, choices=("tanh", "relu"),
                        help="seed 001 baselines only (default tanh)")
    parser.add_argument("--model-kwargs", default=None,
                        help='extra factory kwargs as JSON, e.g. \'{"negative_slope": 0.1}\'')
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    parser.add_argument("--no-progress", action="store_true")


def run(args: argparse.Namespace) -> int:
    model_kwargs = None
    if args.model_kwargs:
        try:
            model_kwargs = json.loads(args.model_kwargs)
        except json.JSONDecodeError as exc:
            raise ValueError(f"--model-kwargs={args.model_kwargs!r} is not JSON ({exc})") from exc
        if not isinstance(model_kwargs, dict):
            raise ValueError(f"--model-kwargs={args.model_kwargs!r} must be a JSON object")
    meta = train(args.model, args.data, args.epochs, args.lr, args.batch_size, args.seed,
                 args.out, root=args.root, device=args.device, optimizer=args.optimizer,
                 momentum=args.momentum, weight_decay=args.weight_decay, l1=args.l1,
                 scalar_lr_mult=args.scalar_lr_mult,
                 schedule=args.schedule, normalize=args.normalize, activation=args.activation,
                 model_kwargs=model_kwargs, num_threads=args.threads,
                 progress=not args.no_progress)
    print(f"{meta['model']} on {meta['data']}: test accuracy {meta['test_accuracy']:.4f} "
          f"(best val {meta['val_accuracy']:.4f} at epoch {meta['best_epoch']}/"
          f"{meta['epochs']}), {meta['train_seconds']} s, {meta['num_threads']} thread(s) "
          f"-> {args.out}")
    return 0


def main(argv: list[str] | None = None) -> int:
    """``python -m models.train``: bad input is reported as one argparse error (exit 2)."""
    parser = argparse.ArgumentParser(prog="python -m models.train", description=__doc__.split("\n")[0])
    add_arguments(parser)
    args = parser.parse_args(argv)
    try:
        return run(args)
    except (ValueError, FileNotFoundError) as exc:
        parser.error((str(exc).strip().splitlines() or [type(exc).__name__])[0])  # exits with status 2


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
