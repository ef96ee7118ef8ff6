"""The zoo: piecewise-linear torchvision-style CNNs (issue 13), and random-weight checkpoints
of any of them.

No torchvision build imports beside the pinned torch here (the registry's wheels are CUDA
builds of other torch versions), so the architectures are written out following torchvision's
definitions, each with a width multiplier ``width`` (every channel count × ``width``; 1 is
torchvision's), ``num_classes`` and ``in_channels``:

=================  =====================================================================
name               architecture
=================  =====================================================================
resnet18, resnet34 ResNet, basic blocks (2,2,2,2) / (3,4,6,3)            (:mod:`.resnet`)
vgg11, vgg11_bn    VGG config A without / with BatchNorm                 (:mod:`.vgg`)
vgg16, vgg16_bn    VGG config D without / with BatchNorm
alexnet            AlexNet (``small_input=True`` for inputs below 63x63)
squeezenet1_0/1_1  SqueezeNet 1.0 / 1.1                                  (:mod:`.squeezenet`)
densenet121        DenseNet-BC, blocks 6-12-24-16, growth 32·width       (:mod:`.densenet`)
shufflenet_v2      ShuffleNet-V2 1.0x, stages (4, 8, 4)                  (:mod:`.mobile`)
mobilenet_v2       MobileNet-V2 (ReLU6, inverted residuals)
unet_bilinear ...  two-level U-Nets upsampling bilinear / nearest /       (:mod:`.unet`)
unet_bicubic       bicubic / transposed conv, with skip concatenation
=================  =====================================================================

:func:`randomise` gives a model random He-initialised weights, small random biases and
BatchNorm layers with random running statistics and affine parameters (so BN folding is
exercised), in eval mode; :func:`make_checkpoint` (and ``python -m models.zoo``) saves such a
model with :func:`models.train.save_checkpoint`, with metadata from which
:func:`models.train.load_checkpoint` rebuilds it, and names the bundled ``photos<size>`` data
set (:mod:`models.data`) of its input size, so ``linop verify --checkpoint FILE`` runs on it.
"""
from __future__ import annotations

import functools
import math
import os
from typing import Any, Callable

import torch
from torch import nn

from .densenet import densenet121
from .mobile import channel_shuffle, mobilenet_v2, shufflenet_v2
from .resnet import resnet18, resnet34
from .squeezenet import squeezenet1_0, squeezenet1_1
from .unet import UP_MODES, unet
from .vgg import alexnet, vgg11, vgg11_bn, vgg16, vgg16_bn

__all__ = ["ZOO", "WEIGHTS", "randomise", "make_checkpoint", "channel_shuffle", "alexnet",
           "densenet121", "mobilenet_v2", "resnet18", "resnet34", "shufflenet_v2",
           "squeezenet1_0", "squeezenet1_1", "unet", "vgg11", "vgg11_bn", "vgg16", "vgg16_bn"]

#: name -> factory(num_classes=..., width=..., in_channels=..., **extra)
ZOO: dict[str, Callable[..., nn.Module]] = {
    "resnet18": resnet18, "resnet34": resnet34,
    "vgg11": vgg11, "vgg11_bn": vgg11_bn, "vgg16": vgg16, "vgg16_bn": vgg16_bn,
    "alexnet": alexnet, "squeezenet1_0": squeezenet1_0, "squeezenet1_1": squeezenet1_1,
    "densenet121": densenet121, "shufflenet_v2": shufflenet_v2, "mobilenet_v2": mobilenet_v2,
    **{f"unet_{m}": functools.partial(unet, m) for m in UP_MODES},
}

#: the "weights" entry of a zoo checkpoint's metadata
WEIGHTS = "random init (He), BN random running statistics"


def randomise(model: nn.Module, seed: int = 0) -> nn.Module:
    """Random weights for ``model``, in place; returns it in eval mode and float64.

    Convolutions (also transposed and 1-D) and linear layers: He-normal weights,
    ``N(0, 2 / fan_in)``, and biases ``N(0, 0.1²)``.  BatchNorm: running mean ``N(0, 0.5²)``,
    running variance ``U(0.5, 2)``, weight ``N(1, 0.3²)``, bias ``N(0, 0.2²)`` — so the folding
    of seed 000 Eq. 7 is exercised with non-trivial statistics.  Deterministic in ``seed``
    (a private generator; torch's global one is untouched).
    """
    g = torch.Generator().manual_seed(int(seed))
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, (nn.Conv1d, nn.Conv2d, nn.ConvTranspose2d, nn.Linear)):
                w = m.weight
                fan_in = (w.shape[1] * math.prod(w.shape[2:]) if isinstance(m, nn.ConvTranspose2d)
                          else w[0].numel())
                w.copy_(torch.randn(w.shape, generator=g) * math.sqrt(2 / fan_in))
                if m.bias is not None:
                    m.bias.copy_(0.1 * torch.randn(m.bias.shape, generator=g))
            elif isinstance(m, (nn.BatchNorm1d, nn.BatchNorm2d)):
                n = m.num_features
                m.running_mean.copy_(0.5 * torch.randn(n, generator=g))
                m.running_var.copy_(0.5 + 1.5 * torch.rand(n, generator=g))
                m.weight.copy_(1 + 0.3 * torch.randn(n, generator=g))
                m.bias.copy_(0.2 * torch.randn(n, generator=g))
    return model.double().eval()


def _check_args(name: str, input_size: Any, width: Any, seed: Any, num_classes: Any) -> None:
    if name not in ZOO:
        raise ValueError(f"make_checkpoint: name={name!r} is not a zoo model; choose one of {sorted(ZOO)}")
    for arg, v, lo in (("input_size", input_size, 1), ("num_classes", num_classes, 1), ("seed", seed, 0)):
        if isinstance(v, bool) or not isinstance(v, int) or v < lo:
            raise ValueError(f"make_checkpoint: {arg}={v!r} must be an int >= {lo}")
    if width is not None and (isinstance(width, bool) or not isinstance(width, (int, float))
                              or not math.isfinite(width) or width <= 0):
        raise ValueError(f"make_checkpoint: width={width!r} must be a positive number")


def make_checkpoint(name: str, path: str | os.PathLike, input_size: int = 32,
                    width: float | None = None, seed: int = 0, data: str | None = None,
                    num_classes: int = 10, **kwargs: Any) -> dict:
    """Save a random-weight checkpoint of zoo model ``name`` to ``path``; returns its metadata.

    Parameters
    ----------
    name : str
        A key of :data:`ZOO`.
    path : path
        The ``.pt`` file (written atomically by :func:`models.train.save_checkpoint`).
    input_size : int
        Side of the square 3-channel input the checkpoint is meant for (checked by a forward
        pass: a model whose maps would vanish is refused with the reason).
    width : float, optional
        Width multiplier (default: the factory's, 1 = torchvision's widths).
    seed : int
        Seed of :func:`randomise`.
    data : str, optional
        Data set recorded for ``linop verify`` (default ``f"photos{input_size}"``: crops of
        scikit-learn's sample photos at that size).
    num_classes : int
        Outputs of the classifier (per-pixel classes for the U-Nets).
    **kwargs
        Further factory arguments (e.g. ``small_input=True`` for AlexNet, ``hidden=`` for the
        VGG / AlexNet classifier width, ``block_config=`` for DenseNet).

    Returns
    -------
    dict
        The metadata: ``model``, ``kwargs`` (the factory's, so ``load_checkpoint`` rebuilds
        it), ``input_shape``, ``data``, ``normalize`` ("none"), ``weights``, ``seed``, ``torch``.
    """
    from ..train import save_checkpoint

    _check_args(name, input_size, width, seed, num_classes)
    fkw = {"num_classes": num_classes, "in_channels": 3, **kwargs}
    if width is not None:
        fkw["width"] = float(width)
    try:
        model = ZOO[name](**fkw)
    except TypeError as exc:
        raise ValueError(f"make_checkpoint: {name} does not accept kwargs {sorted(fkw)} ({exc})") from exc
    model = randomise(model, seed).float()
    try:
        with torch.no_grad():
            model(torch.zeros(1, 3, input_size, input_size))
    except RuntimeError as exc:
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:200]
        raise ValueError(f"make_checkpoint: {name} does not run on {input_size}x{input_size} inputs "
                         f"({first}); use a larger input_size"
                         + (" or small_input=True" if name == "alexnet" else "")) from None
    meta = {"model": name, "kwargs": fkw, "input_shape": [3, input_size, input_size],
            "data": data or f"photos{input_size}", "normalize": "none", "mean": None, "std": None,
            "weights": WEIGHTS, "seed": seed, "torch": str(torch.__version__),
            "parameters": sum(p.numel() for p in model.parameters())}
    save_checkpoint(path, model, meta)
    return meta
