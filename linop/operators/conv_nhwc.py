r"""Channels-last (NHWC) layouts of the CPU float64 GEMM strategy of :class:`Conv2d`.

The sweep's tangent batches are channels-last (:data:`linop.linearize.tangents.CHANNELS_LAST`):
the channels of one pixel are adjacent in memory.  :mod:`conv_gemm` sums a stride-1 convolution
as shifted GEMMs in the CNHW layout, which needs a transpose of such a batch on the way in and
returns a CNHW-strided view.  Here the same products are summed in the batch's own layout.

*Shifted GEMMs, NHWC* (stride 1).  The batch is padded once into the rows of
``B[n·G + i·S_w + j, :]`` (``N·G + tail`` rows of ``C_in`` contiguous entries; the shared zero
frame, grid ``S_h × S_w`` and slot ``G`` of :func:`conv_gemm.grid` / :func:`conv_gemm.slot`).
Output position ``(n, h, w)`` is row ``q = n·G + h·S_w + w`` of the output grid and tap
``(a, b)`` reads row ``q + o_{ab}``, ``o_{ab} = d_h·a·S_w + d_w·b``; per image (``q_0 = n·G``,
``M = (H_out-1)·S_w + W_out``)

.. math::

    Y[q_0:q_0 + M, :] = \sum_{a, b} B[q_0 + o_{ab} : q_0 + o_{ab} + M, :]\; W_{ab}^T

— ``k_h·k_w`` GEMMs ``(M × C_in) @ (C_in × C_out)`` on contiguous row slices (no copies).  The
result is a view ``(N, C_out, H_out, W_out)`` of the grid with unit channel stride.

*Patch GEMM, NHWC* (any stride; :func:`conv2d_nhwc_im2col`).  Per image, the
``(H_out·W_out) × (k_h·k_w·C_in)`` patch matrix ``P[(h, w), (a, b, c)] =
X_pad[s_h·h + d_h·a, s_w·w + d_w·b, c]`` is gathered (one ``as_strided`` copy into a buffer
reused by every image) and multiplied once by the ``(k_h·k_w·C_in) × C_out`` weight matrix into
the image's rows of a channels-last output (or, for larger images, transposed into a scratch
``C_out × H_out·W_out`` block then copied there: :data:`T_MIN_PIXELS`).  Measured here it beats
the shifted GEMMs on every ResNet20 / VGG7 / Fixup shape (8²–32²), so ``auto`` runs it for all
channels-last float64 convolutions (:func:`linop.operators.conv_gemm.strategy`).

Both are the operator's products ``w·x``, summed in another order than torch's (each output is
a sum of ``C_in·k_h·k_w`` products either way), so they agree with ``F.conv2d`` to the rounding
of such a sum.  *Batch invariance*: one GEMM per image (and tap), all of one shape — an image's
bits never depend on the batch around it (the shifted GEMMs' operands sit at multiples of 64
bytes; the patch GEMM reads the same patch buffer for every image and writes the image's own
output rows, whose offset only moves the stores — tested on unaligned offsets).
*Thread invariance*: 1 and 2 threads gave the same bits on every shape tried (the reference
models' and larger, ``K`` up to 4,608) — consistent with MKL splitting a GEMM over threads by
blocks of the output rather than along the inner sum; the test suite checks it on the reference
shapes (a future MKL that split ``K`` would fail it).
"""
from __future__ import annotations

from typing import Sequence

import torch

# workspace: the NHWC shifted GEMMs use the CNHW path's buffers transposed, (C_in + C_out)·G per entry
from .conv_gemm import shift_plan, workspace

#: the patch GEMM of an image with at least this many output pixels and :data:`T_MIN_CHANNELS`
#: input channels runs transposed, ``Y_nᵀ = Wᵀ Pᵀ`` into a ``C_out × H_out·W_out`` scratch that is
#: then copied into the image's channels-last rows: MKL is faster with the long pixel dimension as
#: its output's leading one — measured (one thread, batch 256) 14.7 vs 12.4 GMAC/s for 64→64 @16²,
#: 11.4 vs 8.0 for 32→32 @32², 9.0 vs 8.4 for 32→64 @32² stride 2; the other way 19.7 vs 17.4 for
#: 96→96 @8², 12.4 vs 11.3 for 64→96 @16² stride 2 (64 output pixels), 3.6 vs 3.3 for 3→32 @32²
T_MIN_PIXELS = 256
T_MIN_CHANNELS = 16

__all__ = ["is_nhwc", "nhwc_taps", "patch_weight", "conv2d_nhwc_shifted", "conv2d_nhwc_im2col", "workspace",
           "im2col_workspace"]


def is_nhwc(x: torch.Tensor) -> bool:
    """Whether the channels of ``x`` ``(N, C, H, W)`` are unit-stride with ``C > 1`` and more
    than one pixel (channels-last, or a view of an NHWC output grid) — a property of the
    layout and the per-image shape only, kept by any slice of the batch; a tensor for which the
    two layouts coincide (``C = 1`` or ``H·W = 1``) counts as NCHW."""
    return x.dim() == 4 and x.shape[1] > 1 and x.shape[2] * x.shape[3] > 1 and x.stride(1) == 1


def nhwc_taps(taps: torch.Tensor) -> torch.Tensor:
    """``(k_h·k_w, C_in, C_out)``: the transposes of :func:`conv_gemm.tap_weights`' per-tap
    ``(C_out × C_in)`` matrices (the right operand of the NHWC GEMMs), contiguous."""
    return taps.transpose(1, 2).contiguous()


def patch_weight(weight: torch.Tensor) -> torch.Tensor:
    """``(k_h·k_w·C_in, C_out)`` with rows in patch order ``(a, b, c)``: ``W[o, c, a, b]``."""
    co, ci, kh, kw = weight.shape
    return weight.permute(2, 3, 1, 0).reshape(kh * kw * ci, co).contiguous()


def im2col_workspace(c_in: int, c_out: int, H: int, W: int, padding: Sequence[int], H_out: int, W_out: int) -> int:
    """Elements per batch entry of :func:`conv2d_nhwc_im2col`: the padded copy
    ``C_in·(H + t + b)·(W + l + r)`` and the output ``C_out·H_out·W_out`` — plus one patch
    buffer of ``H_out·W_out·k_h·k_w·C_in`` and one ``C_out·H_out·W_out`` scratch for the whole
    batch (not counted)."""
    pt, pb, pl, pr = padding
    return c_in * (H + pt + pb) * (W + pl + pr) + c_out * H_out * W_out


def conv2d_nhwc_shifted(x: torch.Tensor, taps_t: torch.Tensor, kernel: tuple[int, int], padding: Sequence[int],
                        dilation: tuple[int, int]) -> torch.Tensor:
    r"""Stride-1, groups-1 cross-correlation of ``x`` ``(N, C_in, H, W)`` by shifted GEMMs on NHWC rows.

    Parameters
    ----------
    x : tensor ``(N, C_in, H, W)``, any memory format (channels-last reads without a transpose)
    taps_t : tensor ``(k_h·k_w, C_in, C_out)``
        :func:`nhwc_taps` of the per-tap matrices, on ``x``'s device and dtype.
    kernel, dilation : (int, int)
    padding : (top, bottom, left, right), non-negative

    Returns
    -------
    tensor ``(N, C_out, H_out, W_out)``
        A view of the output grid with unit channel stride (channels-last order, rows of
        ``S_w ≥ W_out`` pixels); each image's bits independent of the batch (module notes).
    """
    N, C, H, W = x.shape
    T, Ci, Co = taps_t.shape
    if Ci != C or T != kernel[0] * kernel[1]:
        raise ValueError(f"conv2d_nhwc_shifted: taps_t {tuple(taps_t.shape)} do not match x {tuple(x.shape)} "
                         f"and kernel {kernel}")
    pt, _, pl, _ = padding
    Sh, Sw, Ho, Wo, G, M, offs, tail = shift_plan(H, W, padding, kernel, dilation)
    buf = x.new_zeros((N * G + tail, C))
    buf[:N * G].view(N, G, C)[:, :Sh * Sw].view(N, Sh, Sw, C)[:, pt:pt + H, pl:pl + W].copy_(x.permute(0, 2, 3, 1))
    out = x.new_empty((N * G, Co))
    # one GEMM per image and tap, all of one shape and 64-byte alignment (batch invariance)
    w0, o0, rest = taps_t[0], offs[0], list(zip(taps_t[1:], offs[1:]))
    for q in range(0, N * G, G):
        o = out[q:q + M]
        torch.mm(buf[q + o0:q + o0 + M], w0, out=o)
        for wt, off in rest:
            o.addmm_(buf[q + off:q + off + M], wt)
    return out.view(N, G, Co)[:, :Sh * Sw].view(N, Sh, Sw, Co)[:, :Ho, :Wo].permute(0, 3, 1, 2)


def _padded_nhwc(x: torch.Tensor, pt: int, pb: int, pl: int, pr: int) -> torch.Tensor:
    """``x`` ``(N, C, H, W)`` copied into a zero-framed NHWC ``(N, H + pt + pb, W + pl + pr, C)``
    batch: only the frame is zero-filled (the interior is written once, by the copy — a zero fill
    of the whole batch first was a second pass over it)."""
    N, C, H, W = x.shape
    Hp, Wp = H + pt + pb, W + pl + pr
    xp = x.new_empty((N, Hp, Wp, C))
    xp[:, :pt].zero_()
    xp[:, pt + H:].zero_()
    xp[:, pt:pt + H, :pl].zero_()
    xp[:, pt:pt + H, pl + W:].zero_()
    xp[:, pt:pt + H, pl:pl + W].copy_(x.permute(0, 2, 3, 1))
    return xp


def conv2d_nhwc_im2col(x: torch.Tensor, wmat: torch.Tensor, kernel: tuple[int, int], stride: tuple[int, int],
                       padding: Sequence[int], dilation: tuple[int, int]) -> torch.Tensor:
    r"""Groups-1 cross-correlation of ``x`` ``(N, C_in, H, W)``, any stride, by one patch GEMM per image.

    Parameters
    ----------
    x : tensor ``(N, C_in, H, W)``, any memory format
    wmat : tensor ``(k_h·k_w·C_in, C_out)``
        :func:`patch_weight` of the kernel, on ``x``'s device and dtype.
    kernel, stride, dilation : (int, int)
    padding : (top, bottom, left, right), non-negative

    Returns
    -------
    tensor ``(N, C_out, H_out, W_out)``, channels-last contiguous:
    ``Y[n, :, h, w] = Σ_{a,b,c} X_pad[n, c, s_h·h + d_h·a, s_w·w + d_w·b] · W[:, c, a, b]``.
    """
    N, C, H, W = x.shape
    kh, kw = kernel
    K, Co = wmat.shape
    if K != kh * kw * C:
        raise ValueError(f"conv2d_nhwc_im2col: wmat {tuple(wmat.shape)} does not match x {tuple(x.shape)} "
                         f"and kernel {kernel}")
    pt, pb, pl, pr = padding
    Ho = (H + pt + pb - dilation[0] * (kh - 1) - 1) // stride[0] + 1
    Wo = (W + pl + pr - dilation[1] * (kw - 1) - 1) // stride[1] + 1
    xp = _padded_nhwc(x, pt, pb, pl, pr)
    sn, sh, sw, _ = xp.stride()
    L = Ho * Wo
    out = x.new_empty((N, Ho, Wo, Co))
    cols = x.new_empty((L, K))
    cv = cols.view(Ho, Wo, kh, kw, C)
    shape = (Ho, Wo, kh, kw, C)
    strides = (stride[0] * sh, stride[1] * sw, dilation[0] * sh, dilation[1] * sw, 1)
    transposed = L >= T_MIN_PIXELS and C >= T_MIN_CHANNELS  # a rule of the shapes (every image alike)
    if transposed:
        wt = wmat.t().contiguous()
        st = x.new_empty((Co, L))
    for n in range(N):  # one patch matrix and one GEMM per image (batch invariance)
        cv.copy_(xp.as_strided(shape, strides, xp.storage_offset() + n * sn))
        if transposed:
            torch.mm(wt, cols.t(), out=st)
            out[n].view(L, Co).copy_(st.t())
        else:
            torch.mm(cols, wmat, out=out[n].view(L, Co))
    return out.permute(0, 3, 1, 2)
