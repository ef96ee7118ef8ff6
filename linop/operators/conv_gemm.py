r"""Shifted-GEMM evaluation of a stride-1 convolution: the CPU float64 strategy of :class:`Conv2d`.

torch's CPU float64 convolution (``slow_conv2d``: per-sample im2col and small GEMMs) runs at
1/3 of the float64 GEMM rate here.  A stride-1 convolution is a sum of ``k_h·k_w`` GEMMs over
*shifted* views of one padded copy of the batch, with no im2col at all.  The batch is stored
once in the CNHW layout ``X[c, n·G + i·S_w + j]`` (``C_in × N·G``: image ``n`` in a slot of
``G ≥ S_h·S_w`` columns, with a zero frame).  With output position ``(n, h, w)`` at column
``q = n·G + h·S_w + w`` of the same grid, tap ``(a, b)`` reads the input at ``q + o_{ab}``,
``o_{ab} = d_h·a·S_w + d_w·b``, so per image (``q_0 = n·G``, ``M = (H_out-1)·S_w + W_out``)

.. math::

    Y[:, q_0:q_0 + M] = \sum_{a, b} W[:, :, a, b]\; X[:, q_0 + o_{ab} : q_0 + o_{ab} + M]

— ``k_h·k_w`` GEMMs ``(C_out × C_in) @ (C_in × M)`` (``addmm_`` on strided views, no copies).
It is the same operator (the same products ``w·x``), summed in a different order: per output
the ``C_in`` products of one tap, then the taps in order, so it agrees with torch's to the
rounding of a sum of ``C_in·k_h·k_w`` products (``~1e-15`` relative here).

*Geometry.*  Neighbouring images / rows share their zero frame: with padding ``(t, b, l, r)``
the grid has ``S_w = max(W + max(l, r), W_out)`` columns and ``S_h = max(H + max(t, b), H_out)``
rows per image — the top rows of image ``n + 1``'s slot are the bottom padding of image ``n``,
and the right padding of a row is the left one of the next.  A read ``q + o`` of a valid output
then lands on the image or on a zero (never on a neighbour's data): columns
``w + d_w·b < W + l + r`` with ``S_w ≥ W + max(l, r)``, likewise for rows; the buffer has a zero
tail for the last image's reads.  Grid positions with ``h ≥ H_out`` or ``w ≥ W_out`` are
computed or left unset and cropped.

*Workspace* (elements): the padded input ``C_in·(N·G + tail)`` and the output grid ``C_out·N·G``,
of which the returned tensor is a view (:func:`workspace`).

*Batch invariance.*  The GEMMs run one image at a time (``M`` columns each, the images ``G``
columns apart, ``G`` = ``S_h·S_w`` rounded up to 64 bytes): every image meets GEMMs of the same
shape and alignment, so its values are bit for bit the same whatever batch or chunk it is
evaluated in (as with torch's per-sample ``slow_conv2d``) — one GEMM over many images measured up
to ~1.3× faster but rounds a row differently by its place in the GEMM.

*Channels-last batches* (the sweep's) are summed in their own layout instead, with no transpose
in or out (:mod:`linop.operators.conv_nhwc`: one patch GEMM per image, any stride; NHWC shifted GEMMs
where :data:`NHWC_SHIFT_PIXELS` asks); :func:`choose` / :func:`strategy` pick among the layouts.

*Choice.*  :func:`use_gemm` decides by the shapes, dtype, memory format and device only — the same choice in
every process, so serial and distributed studies stay bit-identical.  :data:`CONV64` (from the
environment variable ``LINOP_CONV64 = auto | torch | gemm``, default ``auto``) switches it.
"""
from __future__ import annotations

import os
from typing import Sequence

import torch
import torch.autograd.forward_ad as fwAD

try:  # torch.func's wrapped tensors (private API: without it such tensors fail loudly in mm(out=))
    from torch._C._functorch import is_functorch_wrapped_tensor as _is_wrapped
except ImportError:  # pragma: no cover - older / newer torch
    _is_wrapped = None

__all__ = ["CONV64", "MODES", "mode", "use_gemm", "choose", "strategy", "conv2d_shifted_gemm", "tap_weights", "adjoint_padding",
           "grid", "rule", "shift_plan", "slot", "workspace", "MIN_MACS", "MIN_PIXELS", "NHWC_MIN_MACS", "NHWC_SHIFT_PIXELS",
           "NHWC_SHIFT_CHANNELS",
           "STRATEGIES"]

MODES = ("auto", "torch", "gemm")


def _env_mode() -> str:
    """``LINOP_CONV64`` normalised (validated by :func:`mode` at use: a typo never breaks the import)."""
    return os.environ.get("LINOP_CONV64", "auto").strip().lower() or "auto"


#: ``"auto"``: the shifted-GEMM path where :func:`use_gemm` measured it faster (CPU float64,
#: stride 1, groups 1, kernels > 1×1, not tiny; adjoints only when ``2·C_in >= C_out``);
#: ``"torch"``: always torch (``F.conv2d`` / ``F.conv_transpose2d``); ``"gemm"``: the path for
#: every CPU stride-1, groups-1 convolution, any dtype and kernel (tests).  Read from the
#: environment variable ``LINOP_CONV64`` at import; assign to change.
CONV64: str = _env_mode()

#: smallest GEMM (multiply-adds ``C·C_out·H·W`` of one image and tap) that ``auto`` runs here:
#: measured (64 images, one thread) 0.61–0.94× torch at 65,536 (32→32 @8², 16→16 @16²), 1.07–1.5×
#: at 98,304 (3→32 @32²) — the ~4 µs per GEMM call must stay small against the GEMM
MIN_MACS = 98_304

#: smallest image (``H·W`` of the convolution's input) that ``auto`` runs here: on 8×8 the per-image
#: GEMMs have 71 columns — measured 1.04–1.07× torch forward, 0.92–0.93× for the adjoint
MIN_PIXELS = 128


#: smallest per-image, per-tap GEMM ``C·H·W·c_out`` that ``auto`` runs on channels-last input
#: (:mod:`conv_nhwc`): measured (one thread, batch 256, the patch GEMM vs ``slow_conv2d``) 1.6–2.5×
#: at 65,536 (16→16 @16², 32→32 @8², forward and adjoint), 0.5–1.5× at 32,768 (16→32 @8²,
#: 8→16 @16²), 0.6–0.8× at 16,384 (16→16 @8²)
NHWC_MIN_MACS = 65_536

#: ``None``, or the image size (pixels) from which channels-last stride-1 convolutions with at least
#: :data:`NHWC_SHIFT_CHANNELS` input channels run as NHWC shifted GEMMs instead of the patch GEMM.
#: ``None`` (never) under ``auto``: measured (one thread, batch 256) the patch GEMM faster on every
#: reference shape — 14.7 vs 11.9 GMAC/s for 64→64 @16², 19.7 vs 16.5 for 96→96 @8², 11.4 vs 8.5
#: for 32→32 @32², 3.6 vs 2.9 for 3→32 @32²
NHWC_SHIFT_PIXELS: int | None = None

#: the fewest input channels for the NHWC shifted GEMMs (their inner dimension is ``C_in``)
NHWC_SHIFT_CHANNELS = 16

#: the evaluation strategies of :func:`strategy`
STRATEGIES = ("torch", "cnhw", "nhwc", "patch")


def mode() -> str:
    """The current :data:`CONV64` mode (validated)."""
    if CONV64 not in MODES:
        raise ValueError(f"LINOP_CONV64 (linop.operators.conv_gemm.CONV64) must be one of {', '.join(MODES)}; "
                         f"got {CONV64!r}")
    return CONV64


def _plain(x: torch.Tensor) -> bool:
    """``x`` carries no autograd history to record, no forward-mode tangent and no torch.func
    wrapper (vmap / jacfwd / jacrev): those keep torch's differentiable path."""
    if x.requires_grad and torch.is_grad_enabled():
        return False
    if _is_wrapped is not None and _is_wrapped(x):
        return False
    return fwAD.unpack_dual(x).tangent is None


def use_gemm(x: torch.Tensor, c_out: int, kernel: tuple[int, int], stride: tuple[int, int] = (1, 1),
             groups: int = 1, padding: Sequence[int] = (0, 0, 0, 0), adjoint: bool = False) -> bool:
    """Whether the convolution of ``x`` ``(N, C, H, W)`` into ``c_out`` channels runs by a GEMM
    strategy (:func:`choose` is not ``"torch"``) — a rule of the mode, device, dtype, layout and
    shapes only, so every process makes the same choice for the same call.  For channels-last
    ``x`` see :func:`strategy`; the rest of this note is the NCHW rule (:func:`conv2d_shifted_gemm`).

    ``padding`` is the ``(top, bottom, left, right)`` padding of the convolution actually
    evaluated; a negative entry (an adjoint whose forward padding exceeds the dilated kernel)
    keeps torch, as do stride > 1, groups > 1, non-CPU tensors and differentiated calls.  Under
    ``auto`` (measured one thread, batch 500, against ``slow_conv2d``): float64 only; kernels
    > 1×1 (a 1×1 is one GEMM without reuse across taps: torch 1.4–1.6× faster); at least
    :data:`MIN_MACS` multiply-adds ``C·H·W·c_out`` per image and tap (below, the per-GEMM cost
    loses; a rule per image, never of the batch size, so chunking cannot change the choice) on
    images of at least :data:`MIN_PIXELS` pixels; and for an ``adjoint`` (``x`` is then the
    forward's output, ``c_out`` its input channels; compared with ``F.conv_transpose2d``, whose
    col2im GEMM has ``k_h·k_w·c_out`` rows) only when ``2·c_out >= C`` — 1.1–1.8× faster there,
    0.4–0.7× for the adjoints of 3→16, 3→32, 8→32 layers, whose GEMMs here have few rows."""
    # (_plain in choose: the GEMMs write into preallocated blocks, out= / addmm_: no autograd)
    return choose(x, c_out, kernel, stride, groups, padding, adjoint) != "torch"


def choose(x: torch.Tensor, c_out: int, kernel: tuple[int, int], stride: tuple[int, int] = (1, 1),
           groups: int = 1, padding: Sequence[int] = (0, 0, 0, 0), adjoint: bool = False) -> str:
    """The strategy (one of :data:`STRATEGIES`) that evaluates the convolution of ``x``: torch for
    non-CPU, differentiated or wrapped tensors, else :func:`strategy` of its per-image shape,
    dtype and layout (:func:`linop.operators.conv_nhwc.is_nhwc`)."""
    from .conv_nhwc import is_nhwc

    if mode() == "torch" or x.device.type != "cpu" or not _plain(x):
        return "torch"
    return strategy(tuple(x.shape[1:]), c_out, kernel, stride, groups, padding, x.dtype, adjoint, is_nhwc(x))


def strategy(in_shape: Sequence[int], c_out: int, kernel: tuple[int, int], stride: tuple[int, int] = (1, 1),
             groups: int = 1, padding: Sequence[int] = (0, 0, 0, 0), dtype: torch.dtype = torch.float64,
             adjoint: bool = False, nhwc: bool = False) -> str:
    """``"torch"``, ``"cnhw"`` (:func:`conv2d_shifted_gemm`), ``"nhwc"``
    (:func:`~linop.operators.conv_nhwc.conv2d_nhwc_shifted`) or ``"patch"``
    (:func:`~linop.operators.conv_nhwc.conv2d_nhwc_im2col`) for a plain CPU batch of per-image
    shape ``in_shape = (C, H, W)``, ``dtype`` and layout (``nhwc``: unit channel stride) — a rule
    of these only, so every process and every sub-batch makes the same choice.

    NCHW input: :func:`rule` (``"cnhw"`` or torch).  Channels-last input (the sweep's): under
    ``auto`` float64, kernels > 1×1, at least :data:`NHWC_MIN_MACS` multiply-adds ``C·H·W·c_out``
    per image and tap, and for an adjoint (stride 1 only: a strided adjoint is not a convolution)
    ``2·c_out >= C`` as for :func:`rule`; then ``"patch"``, or ``"nhwc"`` for stride-1
    convolutions on images of at least :data:`NHWC_SHIFT_PIXELS` pixels (``None``: never) with
    at least :data:`NHWC_SHIFT_CHANNELS` channels.
    ``gemm`` mode drops the ``auto`` conditions.  Groups > 1 and negative padding keep torch."""
    m = mode()
    if not nhwc:
        return "cnhw" if rule(in_shape, c_out, kernel, stride, groups, padding, dtype, adjoint) else "torch"
    s1 = tuple(stride) == (1, 1)
    if m == "torch" or groups != 1 or min(padding) < 0 or (adjoint and not s1):
        return "torch"
    C, H, W = in_shape
    if m == "auto" and (dtype != torch.float64 or kernel[0] * kernel[1] == 1 or (adjoint and 2 * c_out < C)
                        or C * H * W * c_out < NHWC_MIN_MACS):
        return "torch"
    px = NHWC_SHIFT_PIXELS
    return "nhwc" if s1 and px is not None and H * W >= px and C >= NHWC_SHIFT_CHANNELS else "patch"


def rule(in_shape: Sequence[int], c_out: int, kernel: tuple[int, int], stride: tuple[int, int] = (1, 1),
         groups: int = 1, padding: Sequence[int] = (0, 0, 0, 0), dtype: torch.dtype = torch.float64,
         adjoint: bool = False) -> bool:
    """:func:`use_gemm` for a plain CPU tensor of per-image shape ``in_shape = (C, H, W)`` and
    ``dtype``, without a tensor (e.g. for a memory plan: the path's workspace is :func:`workspace`)."""
    m = mode()
    if m == "torch" or tuple(stride) != (1, 1) or groups != 1 or min(padding) < 0:
        return False
    if m == "gemm":
        return True
    C, H, W = in_shape
    if dtype != torch.float64 or kernel[0] * kernel[1] == 1 or (adjoint and 2 * c_out < C):
        return False
    return H * W >= MIN_PIXELS and C * H * W * c_out >= MIN_MACS


def grid(H: int, W: int, padding: Sequence[int], kernel: tuple[int, int], dilation: tuple[int, int]
         ) -> tuple[int, int, int, int]:
    """``(S_h, S_w, H_out, W_out)``: rows / columns per image of the shared-frame grid and the
    output size of the stride-1 convolution."""
    pt, pb, pl, pr = padding
    Ho = H + pt + pb - dilation[0] * (kernel[0] - 1)
    Wo = W + pl + pr - dilation[1] * (kernel[1] - 1)
    return max(H + max(pt, pb), Ho), max(W + max(pl, pr), Wo), Ho, Wo


def slot(Sh: int, Sw: int) -> int:
    """Columns per image in the buffers: ``S_h·S_w`` rounded up to 8 (64 bytes in float64), so
    every image's views have the same alignment."""
    return -(-Sh * Sw // 8) * 8


def shift_plan(H: int, W: int, padding: Sequence[int], kernel: tuple[int, int], dilation: tuple[int, int]
               ) -> tuple[int, int, int, int, int, int, list[int], int]:
    """``(S_h, S_w, H_out, W_out, G, M, offs, tail)`` of the shifted GEMMs (either layout): the
    grid (:func:`grid`), the slot ``G`` per image (:func:`slot`), ``M`` grid positions up to an
    image's last valid output, the tap offsets ``o_ab = d_h·a·S_w + d_w·b`` in tap order and the
    ``tail`` of zero positions after the last image's slot that its reads reach."""
    Sh, Sw, Ho, Wo = grid(H, W, padding, kernel, dilation)
    G = slot(Sh, Sw)
    M = (Ho - 1) * Sw + Wo
    offs = [dilation[0] * a * Sw + dilation[1] * b for a in range(kernel[0]) for b in range(kernel[1])]
    return Sh, Sw, Ho, Wo, G, M, offs, max(0, M + offs[-1] - G)


def workspace(c_in: int, c_out: int, H: int, W: int, padding: Sequence[int], kernel: tuple[int, int],
              dilation: tuple[int, int]) -> int:
    """Elements per batch entry that the path allocates: ``(C_in + C_out)·G``, ``G`` =
    :func:`slot` ``(S_h, S_w)`` (the padded input and the output grid, of which the result is a
    view) — plus, once per batch, at most ``C_in·(d_w(k_w-1) + W_out)`` tail columns of the input
    buffer (not counted here)."""
    Sh, Sw, _, _ = grid(H, W, padding, kernel, dilation)
    return (c_in + c_out) * slot(Sh, Sw)


def tap_weights(weight: torch.Tensor, adjoint: bool = False) -> torch.Tensor:
    """``(k_h·k_w, rows, cols)`` per-tap matrices in tap order ``(a, b)``: ``W[:, :, a, b]``
    (``C_out × C_in``), or for the adjoint the flipped transpose ``W[:, :, k_h-1-a, k_w-1-b]ᵀ``
    (``C_in × C_out``: a transposed stride-1 convolution is the convolution of the output with
    the flipped, transposed kernel)."""
    co, ci, kh, kw = weight.shape
    if adjoint:
        return weight.flip(2, 3).permute(2, 3, 1, 0).reshape(kh * kw, ci, co).contiguous()
    return weight.permute(2, 3, 0, 1).reshape(kh * kw, co, ci).contiguous()


def adjoint_padding(padding: Sequence[int], kernel: tuple[int, int], dilation: tuple[int, int]) -> tuple[int, ...]:
    """Padding of the convolution that evaluates the adjoint of a stride-1 one: ``d·(k-1) - p``
    per side, since ``x[i] = Σ_a y[i + t - d·a]·w[a] = Σ_a' y[i - (d(k-1) - t) + d·a']·w[k-1-a']``."""
    eh, ew = dilation[0] * (kernel[0] - 1), dilation[1] * (kernel[1] - 1)
    pt, pb, pl, pr = padding
    return (eh - pt, eh - pb, ew - pl, ew - pr)


def conv2d_shifted_gemm(x: torch.Tensor, taps: torch.Tensor, kernel: tuple[int, int], padding: Sequence[int],
                        dilation: tuple[int, int]) -> torch.Tensor:
    r"""Stride-1, groups-1 cross-correlation ``y = Σ_{a,b} W_{ab} x(· + d·(a, b) - (t, l))`` of a
    batch ``x`` ``(N, C_in, H, W)`` (any memory format) by shifted GEMMs in the CNHW layout.

    Parameters
    ----------
    x : tensor ``(N, C_in, H, W)``
    taps : tensor ``(k_h·k_w, C_out, C_in)``
        Per-tap matrices in tap order (:func:`tap_weights`), on ``x``'s device and dtype.
    kernel, dilation : (int, int)
    padding : (top, bottom, left, right), non-negative

    Returns
    -------
    tensor ``(N, C_out, H_out, W_out)``
        A strided view (CNHW storage) of the output grid; values as ``F.conv2d`` up to the
        summation order (see the module notes), each image's bit for bit the same whatever the
        batch it is in.
    """
    N, C, H, W = x.shape
    T, Co, Ci = taps.shape
    if Ci != C or T != kernel[0] * kernel[1]:
        raise ValueError(f"conv2d_shifted_gemm: taps {tuple(taps.shape)} do not match x {tuple(x.shape)} "
                         f"and kernel {kernel}")
    pt, _, pl, _ = padding
    Sh, Sw, Ho, Wo, G, M, offs, tail = shift_plan(H, W, padding, kernel, dilation)
    xp = x.new_zeros((C, N * G + tail))
    xp[:, :N * G].view(C, N, G)[:, :, :Sh * Sw].view(C, N, Sh, Sw)[:, :, pt:pt + H, pl:pl + W].copy_(
        x.permute(1, 0, 2, 3))
    out = x.new_empty((Co, N * G))
    # one GEMM per image and tap, all of one shape and alignment: an image's values cannot depend
    # on the batch around it (MKL rounds a row differently by its place in a larger GEMM)
    w0, o0, rest = taps[0], offs[0], list(zip(taps[1:], offs[1:]))
    for q in range(0, N * G, G):
        o = out[:, q:q + M]
        torch.mm(w0, xp[:, q + o0:q + o0 + M], out=o)
        for wt, off in rest:
            o.addmm_(wt, xp[:, q + off:q + off + M])
    return out.view(Co, N, G)[:, :, :Sh * Sw].view(Co, N, Sh, Sw)[:, :, :Ho, :Wo].permute(1, 0, 2, 3)
