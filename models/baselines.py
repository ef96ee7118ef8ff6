"""The "kConv + mFC" baseline networks of seed 001 (§4, Tables 1-3, Fig. 7).

Seed 001 trains small tanh CNNs -- valid convolutions, max pooling with stride equal to the
kernel, then fully connected layers -- and post-trains their middle layers by feature-level
reverse propagation (FR-PT).  Its parameter counts pin the architectures down exactly; e.g. on
MNIST (Table 1) layer 1 has 52 parameters = 2 x (5x5x1 + 1), layer 2 has 204 = 4 x (5x5x2 + 1),
layer 3 (the classifier) 2570 = 10 x (4x8x8 + 1).  So the *first* conv is 5x5 and later ones
3x3 on CIFAR (Table 2: 380 = 5 x (5x5x3 + 1), 460 = 10 x (3x3x5 + 1), ...), and pooling
follows every conv except the last.  The presets below reproduce those counts on 28x28 / 32x32
inputs and scale down to 8x8 digits.  Tables 4-6 pin down two deeper nets the same way (each
layer count ``c_out (k^2 c_in + 1)`` factors uniquely into square kernels; see
:func:`conv4_fc2` and :func:`conv5_fc2`).

Layer numbering
---------------
``net.blocks`` is an ``nn.ModuleList``: conv block ``(conv, act[, maxpool])`` or FC block
``([flatten,] fc, act)``; ``net.classifier`` is the final ``([flatten,] fc)``.  Seed 001's
feature map ``a_l`` is ``a_0 = x`` (the input), ``a_l = blocks[l-1](a_{l-1})`` and
``a_L = classifier(a_{L-1})`` with ``L = len(blocks) + 1`` -- so the trainable parameters
between ``a_{l_S}`` and ``a_{l_R}`` are those of ``blocks[l_S:l_R]`` (plus the classifier if
``l_R = L``), matching the "#paras" column of seed 001 Tables 1-3.  ``net.layer_outputs(x)``
returns ``[a_0, ..., a_L]``.

Pooling
-------
``pool_after[i]`` asks for max pooling (kernel = stride = ``pool``) after conv ``i`` (default:
every conv but the last, as in the paper's baselines).  A requested pooling is *skipped* when
the pooled map would be too small for the remaining valid convs to produce at least a 1x1 map
(e.g. on 8x8 digits); ``net.pooled`` records which convs really pool.
"""
from __future__ import annotations

from typing import Sequence

import torch
from torch import nn

__all__ = ["KConvMFC", "conv2_fc1", "conv3_fc2", "conv4_fc2", "conv5_fc2",
           "conv_channel_decreasing"]

_ACTIVATIONS = {"tanh": nn.Tanh, "relu": nn.ReLU}


def _per_conv(value, n: int, name: str) -> tuple:
    if isinstance(value, int) or isinstance(value, bool):
        return (value,) * n
    value = tuple(value)
    if len(value) != n:
        raise ValueError(f"KConvMFC: {name}={value} must have one entry per conv ({n})")
    return value


class KConvMFC(nn.Module):
    """Configurable "kConv + mFC" CNN of seed 001 §4.

    Parameters
    ----------
    in_shape : (C, H, W)
        Input shape (without batch).
    conv_channels : sequence of int
        Out-channels of the k valid convolutions.
    fc_units : sequence of int
        Widths of the hidden FC layers (the classifier is added on top: "mFC" = m - 1 hidden
        layers + classifier, so ``fc_units=()`` is "1fc").
    num_classes : int
        Classifier outputs.
    activation : {"tanh", "relu"}
        Activation after every conv and hidden FC (the paper uses tanh).
    pool : int
        Max-pooling kernel = stride (``1`` or ``0`` disables pooling).
    kernel_size : int or sequence of int
        Square kernel of each conv (valid, stride 1).
    pool_after : bool or sequence of bool, optional
        Which convs are followed by pooling; default every conv but the last.
    """

    def __init__(self, in_shape: Sequence[int] = (1, 8, 8), conv_channels: Sequence[int] = (8, 16),
                 fc_units: Sequence[int] = (), num_classes: int = 10, activation: str = "tanh",
                 pool: int = 2, kernel_size: int | Sequence[int] = 3,
                 pool_after: bool | Sequence[bool] | None = None) -> None:
        super().__init__()
        in_shape = tuple(int(s) for s in in_shape)
        if len(in_shape) != 3 or min(in_shape) < 1:
            raise ValueError(f"KConvMFC: in_shape={in_shape} must be (C, H, W) with positive sizes")
        if activation not in _ACTIVATIONS:
            raise ValueError(f"KConvMFC: activation={activation!r} not supported; "
                             f"choose one of {sorted(_ACTIVATIONS)}")
        conv_channels = tuple(int(c) for c in conv_channels)
        fc_units = tuple(int(u) for u in fc_units)
        if any(c < 1 for c in conv_channels) or any(u < 1 for u in fc_units) or num_classes < 1:
            raise ValueError(f"KConvMFC: conv_channels={conv_channels}, fc_units={fc_units}, "
                             f"num_classes={num_classes} must be positive")
        if pool < 0:
            raise ValueError(f"KConvMFC: pool={pool} must be >= 0")
        k = len(conv_channels)
        kernels = _per_conv(kernel_size, k, "kernel_size")
        if pool_after is None:
            pool_after = tuple(i < k - 1 for i in range(k))
        pool_after = _per_conv(pool_after, k, "pool_after")

        self.in_shape = in_shape
        self.activation = activation
        self.conv_channels, self.fc_units, self.kernel_sizes = conv_channels, fc_units, kernels
        act = _ACTIVATIONS[activation]
        c, h, w = in_shape
        blocks: list[nn.Module] = []
        pooled: list[bool] = []
        for i, (co, ks) in enumerate(zip(conv_channels, kernels)):
            h, w = h - ks + 1, w - ks + 1
            if h < 1 or w < 1:
                raise ValueError(
                    f"KConvMFC: input {in_shape} too small: valid conv {i} (kernel {ks}) "
                    f"would give a {h}x{w} map; use fewer convs or smaller kernels")
            layers: list[nn.Module] = [nn.Conv2d(c, co, ks), act()]
            do_pool = bool(pool_after[i]) and pool > 1
            if do_pool:
                # skip when the remaining valid convs could not run on the pooled map
                rest = sum(kk - 1 for kk in kernels[i + 1:])
                do_pool = h // pool - rest >= 1 and w // pool - rest >= 1
            if do_pool:
                layers.append(nn.MaxPool2d(pool, stride=pool))
                h, w = h // pool, w // pool
            pooled.append(do_pool)
            blocks.append(nn.Sequential(*layers))
            c = co
        self.pooled = tuple(pooled)
        self.feature_shape = (c, h, w)  # shape of the last conv block's output
        n = c * h * w
        first_fc = True
        for u in fc_units:
            layers = ([nn.Flatten()] if first_fc else []) + [nn.Linear(n, u), act()]
            blocks.append(nn.Sequential(*layers))
            first_fc, n = False, u
        self.blocks = nn.ModuleList(blocks)
        self.classifier = nn.Sequential(*(([nn.Flatten()] if first_fc else [])
                                          + [nn.Linear(n, num_classes)]))

    @property
    def num_layers(self) -> int:
        """``L``: number of seed-001 layers (blocks + classifier)."""
        return len(self.blocks) + 1

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for blk in self.blocks:
            x = blk(x)
        return self.classifier(x)

    def layer_outputs(self, x: torch.Tensor) -> list[torch.Tensor]:
        """Seed 001 feature maps ``[a_0 = x, a_1, ..., a_L = logits]``."""
        outs = [x]
        for blk in self.blocks:
            outs.append(blk(outs[-1]))
        outs.append(self.classifier(outs[-1]))
        return outs


def _is_small(in_shape: Sequence[int]) -> bool:
    return min(in_shape[1], in_shape[2]) < 28


def conv2_fc1(in_shape: Sequence[int] = (1, 8, 8), num_classes: int = 10,
              activation: str = "tanh") -> KConvMFC:
    """Seed 001's MNIST baseline "2Conv+1fc".

    For inputs of at least 28x28 this is the paper's net (Table 1): conv 5x5 1->2, pool 2,
    conv 5x5 2->4, FC 4*8*8 -> 10 (52 + 204 + 2570 parameters on MNIST).  For smaller inputs
    (8x8 digits): conv 3x3 ->16, pool 2, conv 3x3 16->32, FC -> classes (8 -> 6 -> 3 -> 1).
    """
    if _is_small(in_shape):
        return KConvMFC(in_shape, (16, 32), (), num_classes, activation, kernel_size=3)
    return KConvMFC(in_shape, (2, 4), (), num_classes, activation, kernel_size=(5, 5))


def conv3_fc2(in_shape: Sequence[int] = (3, 32, 32), num_classes: int = 10,
              activation: str = "tanh") -> KConvMFC:
    """Seed 001's CIFAR baseline "3Conv+2fc" (Fig. 7(a): channels increasing).

    For inputs of at least 28x28: conv 5x5 ->5, pool, conv 3x3 ->10, pool, conv 3x3 ->15,
    FC 128, FC -> classes -- the CIFAR-10 net of Table 2 (380 + 460 + 1365 + 30848 + 1290
    parameters); with ``num_classes=100`` the CIFAR-100 net of Table 3 (channels 10, 15, 20,
    FC 256).  For 8x8 inputs: 3x3 convs with 8, 16, 32 channels, FC 64 (no pooling fits).
    """
    if _is_small(in_shape):
        return KConvMFC(in_shape, (8, 16, 32), (64,), num_classes, activation, kernel_size=3)
    if num_classes >= 100:
        return KConvMFC(in_shape, (10, 15, 20), (256,), num_classes, activation,
                        kernel_size=(5, 3, 3))
    return KConvMFC(in_shape, (5, 10, 15), (128,), num_classes, activation, kernel_size=(5, 3, 3))


def conv_channel_decreasing(in_shape: Sequence[int] = (3, 32, 32), num_classes: int = 10,
                            activation: str = "tanh") -> KConvMFC:
    """Seed 001 Fig. 7(b): "3Conv+2fc" with conv channels decreasing (15, 10, 5), so each
    reverse conv step is an underdetermined MDP solve.  Same kernels/pooling/FC width as
    :func:`conv3_fc2` (8x8 inputs: channels 32, 16, 8, FC 64)."""
    if _is_small(in_shape):
        return KConvMFC(in_shape, (32, 16, 8), (64,), num_classes, activation, kernel_size=3)
    return KConvMFC(in_shape, (15, 10, 5), (128,), num_classes, activation, kernel_size=(5, 3, 3))


def _fitting_kernels(in_shape: Sequence[int], paper: Sequence[int]) -> tuple[int, ...]:
    """The paper's kernels when its valid convs fit the input, else 3x3 (or 2x2) ones: a small
    input (8x8 digits) cannot hold a 25x25 kernel, and KConvMFC skips poolings that do not fit."""
    side = min(in_shape[1], in_shape[2])
    for ks in (tuple(paper), (3,) * len(paper), (2,) * len(paper)):
        if side - sum(k - 1 for k in ks) >= 1:
            return ks
    return tuple(paper)  # nothing fits: KConvMFC names the failing conv


def conv4_fc2(in_shape: Sequence[int] = (3, 64, 64), num_classes: int = 200,
              activation: str = "tanh") -> KConvMFC:
    """Seed 001's Tiny ImageNet baseline "4Conv+2fc" (Table 4).

    On 64x64 RGB: conv 5x5 ->10, pool, conv 3x3 ->25, pool, conv 3x3 ->35, pool, conv 3x3 ->45
    (64 -> 60 -> 30 -> 28 -> 14 -> 12 -> 6 -> 4), FC 45*4*4 -> 512, FC 512 -> 200: layers of
    760 = 10 (5*5*3 + 1), 2275 = 25 (3*3*10 + 1), 7910 = 35 (3*3*25 + 1), 14220 = 45 (3*3*35 + 1),
    369152 = 512 (720 + 1) and 102600 = 200 (512 + 1) parameters, the #paras column of Table 4
    for every (l_S, l_R).  Inputs too small for the 5x5 + 3x3 stack use 3x3 (or 2x2) kernels.
    """
    return KConvMFC(in_shape, (10, 25, 35, 45), (512,), num_classes, activation,
                    kernel_size=_fitting_kernels(in_shape, (5, 3, 3, 3)))


def conv5_fc2(in_shape: Sequence[int] = (3, 224, 224), num_classes: int = 10,
              activation: str = "tanh") -> KConvMFC:
    """Seed 001's ImageNette / ImageWoof baseline "5Conv+2fc" (Tables 5 and 6, same counts).

    The layer counts 18760, 43365, 36320, 12525, 6780 factor as ``c_out (k^2 c_in + 1)`` from
    ``c_in = 3`` in exactly one way with square kernels: channels 10, 15, 20, 25, 30 with kernels
    25, 17, 11, 5, 3.  The FC layers 61568 = 128 (480 + 1) and 1290 = 10 (128 + 1) then need a
    30x4x4 feature map, which 224x224 inputs give with pooling 2 after every conv but the last
    (224 -> 200 -> 100 -> 84 -> 42 -> 32 -> 16 -> 12 -> 6 -> 4).  Inputs too small for the
    stack use 3x3 (or 2x2) kernels.
    """
    return KConvMFC(in_shape, (10, 15, 20, 25, 30), (128,), num_classes, activation,
                    kernel_size=_fitting_kernels(in_shape, (25, 17, 11, 5, 3)))
