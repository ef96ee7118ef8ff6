"""The polyphase permutation ``Π`` (space-to-depth, ``pixel_unshuffle``) as an explicit operator.

Split the rows of a ``(C, H, W)`` image by their residue modulo the stride ``s_h`` and the
columns modulo ``s_w``, and stack the ``s_h s_w`` phases of every channel as channels:

    (Π x)[c s_h s_w + a s_w + b, i, j] = x[c, s_h i + a, s_w j + b]        (a < s_h, b < s_w)

on ``(C s_h s_w, H', W')`` with ``H' = ⌈H / s_h⌉``, ``W' = ⌈W / s_w⌉``.  When ``s_h | H`` and
``s_w | W`` this is a permutation of the entries (``ΠᵀΠ = ΠΠᵀ = I``; for ``s_h = s_w = r`` it is
``F.pixel_unshuffle(x, r)`` and ``Πᵀ`` is ``F.pixel_shuffle``).  Otherwise the phase entries
with ``s_h i + a ≥ H`` or ``s_w j + b ≥ W`` do not exist: ``Π`` is the isometric embedding
``Π_e`` of the input into the zero-extended phase stack, ``Π_eᵀ Π_e = I`` and ``Π_e Π_eᵀ = D``,
the 0/1 diagonal of the existing entries (:attr:`Polyphase.existing`).

A stride-``s`` convolution is a stride-1 convolution of the phase stack, ``W = W_poly Π``
exactly (:mod:`linop.solvers.fft_padded.polyphase`, whose ``to_polyphase`` /
``from_polyphase`` are this module's :func:`to_polyphase` / :func:`from_polyphase`: the
solver's ``Π`` is this operator's torch path).
"""
from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from .base import Operator, as_shape, numpy_dtype
from .conv import pair

__all__ = ["Polyphase", "from_polyphase", "to_polyphase"]


def to_polyphase(x: torch.Tensor, stride: tuple[int, int]) -> torch.Tensor:
    """``Π x``: (N, C, H, W) → (N, C s_h s_w, ⌈H/s_h⌉, ⌈W/s_w⌉), channel ``c s_h s_w + a s_w + b``.

    The input is zero-extended to multiples of the stride (``F.pad``), then one reshape /
    permute / reshape moves the phase axes next to the channel axis (one copy)."""
    N, C, H, W = x.shape
    sh, sw = stride
    Hp, Wp = -(-H // sh), -(-W // sw)
    if (Hp * sh, Wp * sw) != (H, W):
        x = F.pad(x, (0, Wp * sw - W, 0, Hp * sh - H))
    return x.reshape(N, C, Hp, sh, Wp, sw).permute(0, 1, 3, 5, 2, 4).reshape(N, C * sh * sw, Hp, Wp)


def from_polyphase(xp: torch.Tensor, stride: tuple[int, int], in_hw: tuple[int, int] | None = None) -> torch.Tensor:
    """``Πᵀ y``: the adjoint of :func:`to_polyphase` (its inverse on the existing entries).

    The inverse permute gives the zero-extended image ``(N, C, H' s_h, W' s_w)``; the adjoint of
    the zero extension is the crop to ``in_hw`` (a view; ``None``: no crop)."""
    N, Cp, Hp, Wp = xp.shape
    sh, sw = stride
    C = Cp // (sh * sw)
    x = xp.reshape(N, C, sh, sw, Hp, Wp).permute(0, 1, 4, 2, 5, 3).reshape(N, C, Hp * sh, Wp * sw)
    return x if in_hw is None else x[:, :, : in_hw[0], : in_hw[1]]


class Polyphase(Operator):
    r"""The polyphase permutation ``Π`` (or embedding ``Π_e``): ``(C, H, W) → (C s_h s_w, H', W')``.

    Parameters
    ----------
    input_shape : (C, H, W)
    stride : int or (s_h, s_w)
        Positive; ``H`` and ``W`` need not be multiples of it.
    dtype : dtype

    Notes
    -----
    ``Π[(c s_h s_w + a s_w + b, i, j), (c, s_h i + a, s_w j + b)] = 1`` for every existing phase
    entry (``s_h i + a < H``, ``s_w j + b < W``), ``H' = ⌈H/s_h⌉``, ``W' = ⌈W/s_w⌉``: one entry in
    every column and in every existing row, none in the rows of the zero extension.  Hence
    ``ΠᵀΠ = I`` and ``ΠΠᵀ = diag(existing)`` (``= I`` when the stride divides ``H`` and ``W``).
    The torch forward / adjoint are :func:`to_polyphase` / :func:`from_polyphase` (reshapes and
    permutes, no index gathers).
    """

    def __init__(self, input_shape: Sequence[int], stride: int | Sequence[int], dtype: Any = np.float64):
        ins = as_shape(input_shape, "input_shape")
        if len(ins) != 3:
            raise ValueError(f"Polyphase: input_shape must be (C, H, W), got {tuple(input_shape)}")
        self.stride = pair(stride, "stride")
        C, H, W = ins
        sh, sw = self.stride
        self.phase_hw = (-(-H // sh), -(-W // sw))
        super().__init__(ins, (C * sh * sw,) + self.phase_hw, dtype=numpy_dtype(dtype))

    @property
    def divisible(self) -> bool:
        """The stride divides ``H`` and ``W``: ``Π`` is a permutation (else an embedding)."""
        (sh, sw), (Hp, Wp) = self.stride, self.phase_hw
        return (Hp * sh, Wp * sw) == self.in_shape[1:]

    def _phase_sources(self) -> tuple[np.ndarray, np.ndarray]:
        """``(src, ok)`` on ``(s_h, s_w, H', W')``: the flat in-channel index ``h W + w`` each
        phase entry copies, and whether it exists (``h < H``, ``w < W``)."""
        _, H, W = self.in_shape
        (sh, sw), (Hp, Wp) = self.stride, self.phase_hw
        h = sh * np.arange(Hp)[None, :] + np.arange(sh)[:, None]  # (s_h, H'): input row s_h i + a
        w = sw * np.arange(Wp)[None, :] + np.arange(sw)[:, None]  # (s_w, W'): input column s_w j + b
        src = h[:, None, :, None] * W + w[None, :, None, :]
        ok = (h < H)[:, None, :, None] & (w < W)[None, :, None, :]
        return src, ok

    @property
    def existing(self) -> np.ndarray:
        """Bool ``out_shape``: the phase entries that exist (the diagonal ``D`` of ``ΠΠᵀ``)."""
        _, ok = self._phase_sources()
        return np.broadcast_to(ok[None], (self.in_shape[0],) + ok.shape).reshape(self.out_shape).copy()

    def _apply(self, x: torch.Tensor) -> torch.Tensor:
        return to_polyphase(x, self.stride)

    def _apply_adjoint(self, y: torch.Tensor) -> torch.Tensor:
        return from_polyphase(y, self.stride, self.in_shape[1:])

    def _coo(self):
        C, H, W = self.in_shape
        src, ok = self._phase_sources()
        # output rows (c, a, b, i, j) in C order are exactly the flat index of (c s_h s_w + a s_w + b, i, j)
        src = (np.arange(C, dtype=np.int64)[:, None, None, None, None] * (H * W) + src[None]).ravel()
        rows = np.flatnonzero(np.broadcast_to(ok[None], (C,) + ok.shape))
        return rows, src[rows], np.ones(rows.size)

    def __repr__(self) -> str:
        return f"<Polyphase {self.in_shape} -> {self.out_shape}, stride={self.stride}, dtype={self.dtype}>"
