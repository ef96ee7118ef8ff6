"""torch model -> equivalent network (seed 000 §3.2-3.3, Fig. 2, Fig. 4, Eq. 3, Eq. 7).

:func:`from_torch` traces a torch module with ``torch.fx`` (shapes from a dummy batch) and
rebuilds it as an :class:`~linop.network.EquivalentNetwork`: a graph of explicit operators
acting on the extended input ``[x; x_b]``.  Nothing is matched by model class name; every fx
node is converted by the handler registered for what it computes
(:func:`register_converter`, protocol in :mod:`linop.convert.registry`).

Modules: ``trace`` (fx tracing, shape propagation) · ``fold`` (the BatchNorm / Fixup folding
pass) · ``registry`` (target -> handler) · ``context`` (what a handler sees) · ``rules/`` (the
built-in handlers, one family per module) · ``converter`` (the engine) · ``assemble`` (dead
code, unit-layer names, ``x_b``) · ``errors``.

The equivalent model (seed 000 Fig. 2 / Fig. 4, Tables D.1, D.3, D.4)
--------------------------------------------------------------------
* Every conv and FC output is a *unit layer*, named ``Conv0, Conv1, ...`` in execution order
  and ``FC`` (``FC0, FC1, ...`` when there are several linears), as in the paper's tables.
  Its :class:`~linop.network.LinearNode` holds the value **before its own bias** (Eq. 3).
* BatchNorm in eval mode directly after a conv / linear (whose output has no other consumer)
  is folded into it (Eq. 7): ``w' = γ·w/√(σ²+ε)``, ``b' = β − γ·μ/√(σ²+ε)`` (+ the layer's own
  bias, scaled by ``γ/√(σ²+ε)``).  A Fixup multiplier directly after a conv / linear is folded
  into its weights (Table D.4, ``w' = w × M``), scaling its bias as well.
* The own bias of a unit layer becomes a :class:`~linop.network.BiasNode` named in
  ``bias_slices`` as ``f"{unit_layer}.bias"``; scalar (Fixup) biases are BiasNodes with mode
  ``"scalar"`` named by their parameter path (``layer1.0.bias1a``).  A scalar bias added
  directly to a bias-free conv output (Fixup's ``bias1b``/``bias2b``, Table D.4 "B2 after
  Conv1") is that unit layer's own bias (``unit_layer`` set on the BiasNode).
* ``x_b`` is the concatenation of all biases in execution order (a parameter used twice
  keeps one slice).  Every computation is done in ``dtype`` (float64 by default); weights are
  folded in float64 and then cast.

Supported operations (module, functional and method forms) -> equivalent network
---------------------------------------------------------------------------------
* ``nn.Conv2d`` (any stride / padding incl. ``'same'``/``'valid'`` / dilation / groups, with or
  without bias) -> LinearNode ``Conv2d`` [``ConvK``] + own BiasNode; with ``padding_mode``
  ``'reflect'`` / ``'replicate'`` / ``'circular'`` a ``Pad2d`` LinearNode first (the conv then
  pads nothing; still one unit layer).
* ``nn.ConvTranspose2d`` (stride / padding / output_padding / dilation / groups) -> LinearNode
  ``ConvTranspose2d`` [``ConvK``] + own BiasNode (a following BatchNorm folds, Eq. 7).
* ``nn.Conv1d`` (zero padding) on ``(N, C, L)`` -> LinearNode ``Conv1d`` [``ConvK``] + own
  BiasNode; ``nn.AvgPool1d`` / ``F.avg_pool1d`` -> ``AvgPool1d``.
* ``nn.Linear`` on ``(N, F)`` -> LinearNode ``Linear`` [``FC``] + own BiasNode.
* ``nn.BatchNorm2d`` / ``nn.BatchNorm1d`` in eval mode with running statistics -> folded into
  the preceding conv / conv-transpose / linear (Eq. 7); otherwise a per-channel ``Scale`` LinearNode + BiasNode
  (``f"{bn_path}.bias"``).
* ``nn.ReLU``, ``F.relu``, ``torch.relu``, ``x.relu()`` -> ActivationNode ``relu``;
  ``nn.LeakyReLU``, ``F.leaky_relu`` -> ``leaky_relu`` (its slope); ``nn.PReLU`` -> ``prelu``
  (per-channel slopes); ``nn.Tanh`` / ``torch.tanh`` / ``F.tanh`` / ``x.tanh()`` and
  ``nn.Sigmoid`` / ``torch.sigmoid`` / ``F.sigmoid`` -> ``tanh`` / ``sigmoid`` (smooth: outside
  the exact identity of seed 000, but converted for the seed 001 baselines).
* Breakpoints off zero (beyond seed 000; :mod:`.rules.breakpoint`): ``nn.ReLU6`` /
  ``F.relu6``, ``nn.Hardtanh`` / ``F.hardtanh``, ``nn.Hardsigmoid`` / ``F.hardsigmoid``,
  ``torch.clamp`` / ``clip`` / ``clamp_min`` / ``clamp_max`` (functions and methods),
  ``torch.maximum`` / ``minimum`` with a constant or a network tensor -> ``relu``
  ActivationNodes, ``Scale(-1)`` + AddNode and BiasNodes: ``max(c, t) = t + relu(c − t)``,
  ``min(c, t) = c − relu(c − t)``, ``clamp = min(max(c, lo), hi)``, so
  ``relu6(c) = relu(c) − relu(c − 6)``.  Each constant bound is a slice of ``x_b`` of its
  own (``f"-{owner}.breakpoint_hi"`` = −hi, ``"-….breakpoint_lo"`` / ``"….breakpoint_lo"`` =
  ∓lo, ``owner`` the module path or the fx node; none for a zero bound); ``x.clamp(min=0)``
  is one ``relu``.
* ``nn.AvgPool2d``, ``F.avg_pool2d`` (all options) -> LinearNode ``AvgPool2d``.
* ``nn.MaxPool2d``, ``F.max_pool2d`` (no ``return_indices``) -> MaxPoolNode.
* ``nn.AdaptiveAvgPool2d`` / ``F.adaptive_avg_pool2d`` -> ``GlobalAvgPool2d`` for output 1,
  ``AvgPool2d`` when the input size divides evenly, else ``AdaptiveAvgPool2d`` (uneven,
  overlapping or repeated windows, e.g. 1×1 -> 7×7); ``nn.AdaptiveMaxPool2d`` -> MaxPoolNode
  (uneven windows: after the gather ``AdaptiveWindows``); ``nn.MaxPool1d`` / ``F.max_pool1d``
  -> MaxPoolNode on a ``(C, 1, L)`` view (``UnitAxis`` in and out).
* ``nn.Upsample`` / ``UpsamplingNearest2d`` / ``UpsamplingBilinear2d``, ``F.interpolate``,
  ``F.upsample`` (``nearest``, ``nearest-exact``, ``bilinear`` / ``bicubic`` with
  ``align_corners`` either way, ``area``; ``size`` or ``scale_factor``) -> LinearNode
  ``Upsample2d`` (also with ``antialias=True``).
* ``x.mean((2, 3))`` / ``torch.mean(x, (-2, -1), keepdim=...)`` -> ``GlobalAvgPool2d``.
* ``nn.Flatten``, ``torch.flatten(x, 1)``, ``x.flatten(1)``, ``x.view(x.size(0), -1)``,
  ``x.reshape(N, -1)``, ``squeeze`` to ``(N, F)`` -> LinearNode ``Flatten`` (a reshape that
  keeps the shape makes no node; other reshapes are refused).
* ``nn.Identity``, ``nn.Dropout*`` (eval), ``F.dropout(training=False)``, ``contiguous``,
  ``clone`` -> no node (the value is passed through).
* ``a + b``, ``torch.add``, ``x.add(y)`` of two network tensors -> AddNode; ``a - b`` ->
  ``Scale(-1)`` + AddNode.
* ``torch.cat(..., dim=1)`` -> CatNode; ``x[:, a:b]``, ``x.chunk(k, 1)``, ``x.split(s, 1)``
  -> channel crops (LinearNode ``ChannelPad(...).T``).
* ``F.pad`` with zeros on the channel axis -> LinearNode ``ChannelPad``; ``F.pad`` of the two
  spatial axes (constant / reflect / replicate / circular), ``nn.ZeroPad2d`` /
  ``ConstantPad2d`` / ``ReflectionPad2d`` / ``ReplicationPad2d`` / ``CircularPad2d`` ->
  ``Pad2d`` (a non-zero constant fill is a bias: a ``unit`` BiasNode on the border, its own
  slice of ``x_b``).
* ``nn.ChannelShuffle``, ``torch.channel_shuffle``, torchvision's view / transpose / view
  shuffle -> LinearNode ``ChannelShuffle`` (a permutation).
* ``nn.PixelUnshuffle`` / ``F.pixel_unshuffle`` -> LinearNode ``Polyphase`` (the space-to-depth
  permutation ``Π``); ``nn.PixelShuffle`` / ``F.pixel_shuffle`` -> its adjoint ``Πᵀ``.
* ``x[:, :, o::s, o::s]`` (also with ``...``) -> LinearNode ``Subsample``.
* ``x * c``, ``c * x``, ``x / c``, ``torch.mul`` with ``c`` a python number or a scalar /
  per-channel parameter or buffer -> folded into a preceding conv / linear (Fixup ``M``),
  else a ``Scale`` LinearNode.
* ``x + c``, ``x - c`` with ``c`` a python number or a scalar / per-channel / full-shape
  parameter or buffer -> BiasNode (mode ``scalar`` / ``channel`` / ``unit``) with its own
  slice of ``x_b`` named by the parameter path (``f"{fx_node}.const"`` for numbers,
  ``"-path"`` for a subtracted parameter).
* Subclasses of these modules that keep their ``forward``; anything registered with
  :func:`register_converter`.

Anything else raises one :class:`ConversionError` (a :class:`NotImplementedError`) listing
*every* unsupported fx node with its op, target and the user source line that produced it.
Ops that are not piecewise linear (GELU, SiLU, Mish, ELU, CELU, SELU, Softplus, Hardswish,
LogSigmoid, Softsign; LayerNorm, GroupNorm, InstanceNorm, softmax, log_softmax, softmin —
module and functional forms) are listed in a section of their own (``Problem.kind ==
"not piecewise linear"``) with the reason the identity cannot be exact for them, apart from
ops that are only not implemented.  A
module (or any submodule) in training mode raises :class:`ValueError` (call ``.eval()``
first): BatchNorm then uses batch statistics and dropout is random, neither of which is a
fixed operator.
"""
from .context import Constant, Context, Opaque, TensorValue
from .converter import check_conversion, from_torch
from .errors import ConversionError, Problem
from .registry import register_converter, unregister_converter

__all__ = [
    "Constant",
    "Context",
    "ConversionError",
    "Opaque",
    "Problem",
    "TensorValue",
    "check_conversion",
    "from_torch",
    "register_converter",
    "unregister_converter",
]
