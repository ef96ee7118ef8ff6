"""Transposed 2-D convolution (``nn.ConvTranspose2d`` without bias) as an explicit operator.

A transposed convolution *is* the adjoint of a convolution: with the same weight tensor,

.. math::

    \\mathrm{conv\\_transpose2d}(x; w, s, p, o_p, d, g) = K^{\\mathsf T} x ,

where ``K`` is ``conv2d(·; w, s, p, d, g)`` acting on inputs of the transposed layer's output size
``H_out = (H-1)s - 2p + d(k-1) + o_p + 1``.  :class:`ConvTranspose2d` therefore holds a
:class:`~linop.operators.conv.Conv2d` ``K`` and uses its compiled CSR assembly (transposed) and
its forward as the adjoint — the convolution logic lives in one place.  The bias enters seed
000's equivalent network through ``R_l`` (Eq. 3, C.6), as for ``Conv2d``.
"""
from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from .base import Operator, as_shape, numpy_dtype
from .conv import Conv2d, as_cpu_tensor, finish_csr, pair

__all__ = ["ConvTranspose2d"]


class ConvTranspose2d(Operator):
    r"""``F.conv_transpose2d`` without bias, as a linear operator.

    Parameters
    ----------
    weight : array or tensor, shape ``(C_in, C_out / groups, kh, kw)``
        torch's ``ConvTranspose2d.weight`` layout.
    input_shape : (C_in, H, W)
    stride, padding, output_padding, dilation : int or (int, int)
        As torch; ``output_padding`` must be smaller than the stride or the dilation of its axis.
    groups : int

    Notes
    -----
    ``A = Kᵀ`` restricted to the rows of ``K`` that exist: ``K`` is built as ``Conv2d(weight,
    (C_out, H_out, W_out), stride, padding=(p, p_b, p, p_r), dilation, groups)`` with
    ``p_b = max(0, p - o_p)``.  Only the top/left padding fixes the entries; the bottom/right
    one only fixes how many outputs ``K`` has, ``H`` in all cases but ``o_p ≥ s + p`` (possible
    when ``d > o_p ≥ s``), where ``K`` has a few extra rows that the transposed layer never
    reads — they are cropped.  Entry ``[(co, oh, ow), (ci, ih, iw)] = w[ci, co - g·C_out/groups,
    ki, kj]`` with ``oh = ih·s_h - p_h + ki·d_h`` (and likewise in W); one stored entry per tap.
    """

    def __init__(
        self,
        weight: Any,
        input_shape: Sequence[int],
        stride: int | Sequence[int] = 1,
        padding: int | Sequence[int] = 0,
        output_padding: int | Sequence[int] = 0,
        dilation: int | Sequence[int] = 1,
        groups: int = 1,
    ):
        w = as_cpu_tensor(weight, "weight")
        if w.dim() != 4:
            raise ValueError(f"ConvTranspose2d: weight must have shape (C_in, C_out/groups, kh, kw), got {tuple(w.shape)}")
        in_shape = as_shape(input_shape, "input_shape")
        if len(in_shape) != 3:
            raise ValueError(f"ConvTranspose2d: input_shape must be (C, H, W), got {tuple(input_shape)}")
        if isinstance(groups, bool) or not isinstance(groups, (int, np.integer)) or groups < 1:
            raise ValueError(f"ConvTranspose2d: groups must be a positive int, got {groups!r}")
        c_in, H, W = in_shape
        if int(w.shape[0]) != c_in:
            raise ValueError(f"ConvTranspose2d: input_shape has C_in={c_in} channels but weight has "
                             f"{int(w.shape[0])} (weight layout is (C_in, C_out/groups, kh, kw))")
        if c_in % groups:
            raise ValueError(f"ConvTranspose2d: input channels {c_in} not divisible by groups={groups}")
        s, p, d = pair(stride, "stride"), pair(padding, "padding", minimum=0), pair(dilation, "dilation")
        op = pair(output_padding, "output_padding", minimum=0)
        for a in range(2):
            if op[a] >= max(s[a], d[a]):
                raise ValueError(f"ConvTranspose2d: output_padding={op} must be smaller than stride={s} "
                                 f"or dilation={d} on each axis (like torch)")
        kh, kw = int(w.shape[2]), int(w.shape[3])
        out_hw = [(n - 1) * s[a] - 2 * p[a] + d[a] * (k - 1) + op[a] + 1 for a, (n, k) in enumerate(((H, kh), (W, kw)))]
        if min(out_hw) < 1:
            raise ValueError(f"ConvTranspose2d: padding={p} leaves an empty output {tuple(out_hw)} "
                             f"for input_shape={in_shape}")
        c_out = int(w.shape[1]) * int(groups)
        pb = [max(0, p[a] - op[a]) for a in range(2)]
        # the convolution this layer transposes (its input = our output); it validates groups etc.
        self.conv = Conv2d(w, (c_out, out_hw[0], out_hw[1]), stride=s, padding=(p[0], pb[0], p[1], pb[1]),
                           dilation=d, groups=int(groups))
        self.weight = self.conv.weight
        self.stride, self.padding, self.output_padding, self.dilation, self.groups = s, p, op, d, int(groups)
        self._rows = tuple(self.conv.out_shape[1:])  # (H_c, W_c) >= (H, W); the extra rows are cropped
        super().__init__(in_shape, (c_out, out_hw[0], out_hw[1]), dtype=numpy_dtype(w.dtype))

    @property
    def _cropped(self) -> bool:
        return self._rows != self.in_shape[1:]

    # ------------------------------------------------------------------ torch path
    def _apply(self, x: torch.Tensor) -> torch.Tensor:
        w = self._param("weight", x)
        return F.conv_transpose2d(x, w, None, self.stride, self.padding, self.output_padding, self.groups,
                                  self.dilation)

    def _apply_adjoint(self, y: torch.Tensor) -> torch.Tensor:
        z = self.conv._apply(y)
        if self._cropped:
            _, H, W = self.in_shape
            z = z[:, :, :H, :W].contiguous()
        return z

    # ------------------------------------------------------------------ sparse form
    def _conv_rows(self) -> np.ndarray | None:
        """Rows of ``K`` that are kept (``None``: all)."""
        if not self._cropped:
            return None
        C, H, W = self.in_shape
        Hc, Wc = self._rows
        c, i, j = np.meshgrid(np.arange(C), np.arange(H), np.arange(W), indexing="ij")
        return ((c * Hc + i) * Wc + j).ravel()

    @property
    def nnz(self) -> int:
        """Entries ``to_sparse()`` stores (one per tap that lands inside the output)."""
        rows = self._conv_rows()
        if rows is None:
            return self.conv.nnz
        return int(self.conv._row_nnz()[rows].sum())

    def to_sparse(self, gpu: bool = False, dtype: Any = None, max_bytes: int | None = None):
        """Explicit CSR ``Kᵀ`` from the convolution's compiled CSR (a linear-time transpose).

        Parameters are those of :meth:`Conv2d.to_sparse`.
        """
        K = self.conv.to_sparse(dtype=dtype, max_bytes=max_bytes)
        rows = self._conv_rows()
        if rows is not None:
            K = K[rows]
        A = K.T.tocsr()
        A.sort_indices()
        return finish_csr(A, gpu)

    def _coo(self):
        A = self.to_sparse().tocoo()
        return A.row, A.col, A.data

    def __repr__(self) -> str:
        return (f"<ConvTranspose2d {self.in_shape} -> {self.out_shape}, kernel={self.conv.kernel_size}, "
                f"stride={self.stride}, padding={self.padding}, output_padding={self.output_padding}, "
                f"dilation={self.dilation}, groups={self.groups}, dtype={self.dtype}>")
