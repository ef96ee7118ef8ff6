"""The padded conv ``W = S C E`` as maps on the torus, and ``W`` / ``Wᵀ`` themselves (a mixin).

:class:`TorusMaps` holds the evaluation of the operator the solver inverts: the embedding ``E``
of an input batch on the torus, the selection ``S`` of the valid outputs and its transpose, the
circular conv ``C`` by FFTs (``W = S C E`` exactly, package docstring), and ``W a`` / ``Wᵀ y``
with the ``fixed_zero`` mask ``D`` (by the torus FFTs or the direct conv, whichever is cheaper).
:class:`.PaddedConvSolver` mixes it in; the attributes it reads are set by its ``_init_geometry``
/ ``_init_constraints``.
"""
from __future__ import annotations

import torch

from .lift import torus_forward

__all__ = ["TorusMaps"]


class TorusMaps:
    """``E``, ``S``, ``Sᵀ``, ``W = S C E``, ``Wᵀ = Eᵀ Cᵀ Sᵀ`` and ``W`` / ``Wᵀ`` (with ``D``) on batches.

    Needs, from the class it is mixed into: ``fs`` (the circular conv ``C``:
    :class:`~linop.solvers.fft.FFTConvSolver`), ``torus`` (T_h, T_w), ``H``, ``W``, ``_rows`` /
    ``_cols`` (the outputs' torus rows / columns), ``_mask`` (``D`` or ``None``), ``fft_forward``
    and ``_KF`` (the offset spectrum of :func:`.torus_forward`), ``_op`` (the direct conv),
    ``device``, ``dtype``, ``out_shape``.
    """

    def _mul(self, M: torch.Tensor, X: torch.Tensor) -> torch.Tensor:
        return self.fs._mul(M, X)

    def _rfft(self, x: torch.Tensor) -> torch.Tensor:
        return torch.fft.rfft2(x)

    def _irfft(self, X: torch.Tensor) -> torch.Tensor:
        return torch.fft.irfft2(X, s=self.torus)

    def select(self, c: torch.Tensor) -> torch.Tensor:
        """``S``: the outputs of a torus batch (N, C, T_h, T_w) → (N, C, H_out, W_out)."""
        return c[:, :, self._rows[:, None], self._cols[None, :]]

    def place(self, y: torch.Tensor) -> torch.Tensor:
        """``Sᵀ``: an output batch on a zero torus."""
        out = y.new_zeros((y.shape[0], y.shape[1]) + self.torus)
        out[:, :, self._rows[:, None], self._cols[None, :]] = y
        return out

    def embed(self, a: torch.Tensor) -> torch.Tensor:
        """``E``: an input batch at the top-left of a zero torus."""
        out = a.new_zeros((a.shape[0], a.shape[1]) + self.torus)
        out[:, :, : self.H, : self.W] = a
        return out

    def forward_torus(self, a: torch.Tensor) -> torch.Tensor:
        """``W a = S C E a`` on the torus — equals the padded conv (no bias); tested identity."""
        return self.select(self.fs.circular(self.embed(a)))

    def adjoint_torus(self, y: torch.Tensor) -> torch.Tensor:
        """``Wᵀ y = Eᵀ Cᵀ Sᵀ y`` on the torus."""
        c = self._irfft(self._mul(self.fs.khat.mH, self._rfft(self.place(y))))
        return c[:, :, : self.H, : self.W]

    def forward(self, a: torch.Tensor) -> torch.Tensor:
        """``W a`` — with ``fixed_zero``, ``W D`` (``D`` the diagonal 0/1 mask of the free entries).

        By the torus FFTs (:func:`.torus_forward`) or the direct torch conv, whichever the
        flop model says is cheaper (:attr:`fft_forward`); both are exact to rounding.
        """
        a = a if self._mask is None else a * self._mask
        if self.fft_forward:
            return torus_forward(self._KF, a.to(device=self.device, dtype=self.dtype), self.torus, self.out_shape[1:])
        return self._op.apply(a)

    def adjoint(self, y: torch.Tensor) -> torch.Tensor:
        """``Wᵀ y`` (``D Wᵀ y`` with ``fixed_zero``) by the direct transposed conv."""
        x = self._op.apply_adjoint(y)
        return x if self._mask is None else x * self._mask
