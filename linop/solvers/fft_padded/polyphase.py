"""Polyphase rewrite of a strided conv as a stride-1 padded conv: ``W = W_poly Π`` exactly.

Beyond seed 001 (stride 1 only).  Let the input rows be split by their residue modulo the
stride ``s``: ``x_a[i'] = x[s i' + a]`` (``a < s``, ``i' < H / s``; columns likewise), and
stack the ``s_h s_w`` phases of every input channel as channels, ``(c, a, b) ↦ c s_h s_w +
a s_w + b``.  This is a permutation ``Π`` of the input entries (``Πᵀ Π = I``).

Output row ``o`` of the conv reads input row ``s o − p_t + d k`` for the taps ``k < k_h``
(dilation ``d``).  Write the offset ``d k − p_t = s t + a`` with ``a = (d k − p_t) mod s``:
tap ``k`` reads phase ``a`` at row ``o + t`` — a stride-1 correlation on the phase.  With
``P = max(0, −min_k t)`` (the phase conv's top padding) every phase becomes the same
stride-1 conv with kernel length ``K' = max_k t + P + 1`` and phase kernel

    k_poly[o, (c, a, b), u', v'] = w[o, c, k, l]   where  d k − p_t = s (u' − P) + a,
                                                          d l − p_l = s (v' − P_l) + b,

zero where no tap lands.  Its bottom padding ``p_b' = H_out + K' − 1 − P − H/s`` (``K'``
is lengthened by zero taps when that would be negative, i.e. when the last input rows are
never read) makes its output size ``H/s + P + p_b' − K' + 1 = H_out``; out-of-image reads
(``s i' + a < 0`` or ``≥ H``) are exactly the phase conv's padding.  Hence ``W = W_poly Π``
and, ``Π`` being orthogonal, **``W⁺ = Πᵀ W_poly⁺``** — the stride-``s`` problem is solved
exactly by the padded stride-1 machinery on ``s_h s_w C_in`` channels of size ``H/s × W/s``.

**Sizes not divisible by the stride.**  With ``H/s`` rounded up, phase ``a`` has only
``⌈(H − a)/s⌉`` rows: the input is zero-extended to ``s⌈H/s⌉`` rows, ``W = W_poly D Π_e``
with ``Π_e`` the (isometric) embedding and ``D`` the 0/1 diagonal of the existing phase
entries; :class:`.PaddedConvSolver` solves ``(W_poly D)⁺`` exactly by holding the missing
entries at zero (``fixed_zero``: more ring constraints), and ``W⁺ = Π_eᵀ (W_poly D)⁺``.

``Π`` / ``Π_e`` is the operator :class:`linop.operators.Polyphase`; :func:`to_polyphase` /
:func:`from_polyphase` are its torch forward / adjoint (the same functions), and
:func:`polyphase_factors` gives both factors of ``W = W_poly Π`` as operators.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from ...operators.conv import Conv2d, conv_out_size
from ...operators.polyphase import (  # Π: the operator's torch path
    Polyphase,
    from_polyphase,
    to_polyphase,
)

__all__ = [
    "PolyphaseGeometry",
    "from_polyphase",
    "missing_entries",
    "polyphase_factors",
    "polyphase_geometry",
    "polyphase_kernel",
    "to_polyphase",
]


@dataclass(frozen=True)
class PolyphaseGeometry:
    """The stride-1 phase conv of a strided conv (module docstring).

    Attributes
    ----------
    stride : (s_h, s_w)
    in_hw : (H, W), the input
    phase_hw : (⌈H / s_h⌉, ⌈W / s_w⌉), the phase images
    kernel : (K'_h, K'_w), the phase kernel
    padding : (P_t, p_b', P_l, p_r'), the phase conv's 4-sided padding
    out_hw : (H_out, W_out), as the strided conv's
    taps_h, taps_w : (s, K') int arrays, the original tap feeding phase ``a`` at ``u'`` (−1: none)
    """

    stride: tuple[int, int]
    in_hw: tuple[int, int]
    phase_hw: tuple[int, int]
    kernel: tuple[int, int]
    padding: tuple[int, int, int, int]
    out_hw: tuple[int, int]
    taps_h: np.ndarray
    taps_w: np.ndarray


def _axis(n: int, k: int, s: int, d: int, p_lo: int, p_hi: int, what: str) -> tuple[int, int, int, int, np.ndarray]:
    """One axis: (phase size, K', P, p_hi', taps (s, K'))."""
    n_out = conv_out_size(n, p_lo, p_hi, k, d, s)
    off = d * np.arange(k) - p_lo
    a, t = off % s, off // s
    P = max(0, -int(t.min()))
    K = int(t.max()) + P + 1
    hi = n_out + K - 1 - P - -(-n // s)
    if hi < 0:  # the last input rows are never read: lengthen the kernel by zero taps
        K, hi = K - hi, 0
    taps = np.full((s, K), -1, dtype=np.int64)
    taps[a, t + P] = np.arange(k)
    return -(-n // s), K, P, hi, taps


def polyphase_geometry(in_hw: tuple[int, int], kernel: tuple[int, int], padding: tuple[int, int, int, int],
                       stride: tuple[int, int], dilation: tuple[int, int] = (1, 1)) -> PolyphaseGeometry:
    """The phase conv of a conv with the given geometry (``padding`` 4-sided: top, bottom, left, right)."""
    (H, W), (kh, kw), (sh, sw), (dh, dw) = in_hw, kernel, stride, dilation
    pt, pb, pl, pr = padding
    Hp, Kh, Pt, Pb, th = _axis(H, kh, sh, dh, pt, pb, "height")
    Wp, Kw, Pl, Pr, tw = _axis(W, kw, sw, dw, pl, pr, "width")
    out = (conv_out_size(H, pt, pb, kh, dh, sh), conv_out_size(W, pl, pr, kw, dw, sw))
    return PolyphaseGeometry((sh, sw), (H, W), (Hp, Wp), (Kh, Kw), (Pt, Pb, Pl, Pr), out, th, tw)


def missing_entries(geo: PolyphaseGeometry, channels: int) -> np.ndarray | None:
    """Bool (C s_h s_w, H', W'): the phase entries that do not exist (``s a' + a ≥ H``; the zeros
    of ``D = Π_e Π_eᵀ``, :attr:`.Polyphase.existing`); None if none."""
    pi = Polyphase((channels,) + tuple(geo.in_hw), geo.stride)
    return None if pi.divisible else ~pi.existing


def polyphase_kernel(weight: torch.Tensor, geo: PolyphaseGeometry) -> torch.Tensor:
    """``k_poly`` (C_out, C_in s_h s_w, K'_h, K'_w) from ``weight`` (C_out, C_in, k_h, k_w): one gather."""
    c_out, c_in, kh, kw = weight.shape
    wz = torch.nn.functional.pad(weight, (0, 1, 0, 1))  # index k_h / k_w (= −1 mod size+1) is a zero tap
    ih = torch.as_tensor(np.where(geo.taps_h < 0, kh, geo.taps_h), device=weight.device)
    iw = torch.as_tensor(np.where(geo.taps_w < 0, kw, geo.taps_w), device=weight.device)
    sh, sw = geo.stride
    (Kh, Kw) = geo.kernel
    kp = wz[:, :, ih[:, :, None, None], iw[None, None, :, :]]  # (C_out, C_in, s_h, K'_h, s_w, K'_w)
    return kp.permute(0, 1, 2, 4, 3, 5).reshape(c_out, c_in * sh * sw, Kh, Kw).contiguous()


def polyphase_factors(conv: Conv2d) -> tuple[Conv2d, Polyphase]:
    """``(W_poly, Π)`` with ``conv = W_poly Π`` exactly, both as operators.

    ``W_poly`` is the stride-1 phase conv of the module docstring: kernel
    :func:`polyphase_kernel`, 4-sided padding ``geo.padding``, on ``C_in s_h s_w`` channels of
    ``⌈H/s_h⌉ × ⌈W/s_w⌉`` with the conv's ``groups`` (channel ``c s_h s_w + a s_w + b`` keeps each
    group's phases contiguous); ``Π`` the :class:`~linop.operators.Polyphase` of the conv's input.
    Where the stride does not divide ``H`` / ``W``, ``W_poly`` reads the zero extension, which
    ``Π_e`` leaves at zero: ``W_poly Π_e = W_poly D Π_e = W``.
    """
    if not isinstance(conv, Conv2d):
        raise TypeError(f"polyphase_factors: conv must be a linop Conv2d, got {type(conv).__name__}")
    geo = polyphase_geometry(conv.in_shape[1:], conv.kernel_size, conv.padding, conv.stride, conv.dilation)
    sh, sw = geo.stride
    w_poly = Conv2d(polyphase_kernel(conv.weight, geo), (conv.in_shape[0] * sh * sw,) + geo.phase_hw,
                    padding=geo.padding, groups=conv.groups)
    return w_poly, Polyphase(conv.in_shape, geo.stride, dtype=conv.dtype)
