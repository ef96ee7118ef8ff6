"""Pooling layers as explicit linear operators.

* :class:`AvgPool2d` / :class:`GlobalAvgPool2d` are linear maps (the VGG7 pooling, the
  ResNet20 shortcut "avg-pool with window 1, stride 2", and the channel-wise mean before
  the FC layer; seed 000 Table D.1/D.3).
* :class:`MaxPool2d` is piecewise linear: at a given input it *is* the selection matrix of
  the argmax (seed 000 appendix C; seed 001's baselines use max pooling with stride =
  kernel).  It is built at a point and is exact in a neighbourhood where the argmax does
  not change.
"""
from __future__ import annotations

from typing import Any, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from .base import Operator, as_shape, numpy_dtype
from .conv import Conv2d, pair, sample_tensor

__all__ = ["AvgPool2d", "GlobalAvgPool2d", "MaxPool2d"]


def _pool_out_size(n: int, k: int, s: int, p: int, d: int, ceil_mode: bool) -> int:
    """torch's ``pooling_output_shape``: in ceil mode the last window must start inside
    the input or the left padding."""
    eff = d * (k - 1) + 1
    out = (n + 2 * p - eff + (s - 1 if ceil_mode else 0)) // s + 1
    if ceil_mode and (out - 1) * s >= n + p:
        out -= 1
    return out


def _check_image_shape(shape: Sequence[int], who: str) -> tuple[int, int, int]:
    s = as_shape(shape, "input_shape")
    if len(s) != 3:
        raise ValueError(f"{who}: input_shape must be (C, H, W), got {tuple(shape)}")
    return s  # type: ignore[return-value]


def _check_pool_padding(padding: tuple[int, int], kernel: tuple[int, int], who: str):
    # torch's rule (independent of dilation): pad <= kernel_size // 2
    for p, k in zip(padding, kernel):
        if p > k // 2:
            raise ValueError(f"{who}: padding={padding} must be at most half the kernel size {kernel}, like torch")


class AvgPool2d(Operator):
    """Average pooling (torch ``avg_pool2d`` conventions), a linear operator.

    Parameters
    ----------
    input_shape : (C, H, W)
    kernel_size, stride, padding : int or (int, int)
        ``stride`` defaults to ``kernel_size``; ``padding`` at most half the kernel.
    count_include_pad : bool
        Divide by the window size including zero padding (torch's default) or by the
        number of in-bounds taps.
    ceil_mode : bool
        Ceil instead of floor for the output size (windows running past the padded input
        are clipped, with torch's divisor rule).
    divisor_override : int, optional
        Divide every window sum by this instead.
    dtype : dtype
        Nominal dtype (``apply`` works in the dtype of its input).

    Notes
    -----
    Implemented as a depthwise :class:`~linop.operators.conv.Conv2d` with a kernel of ones
    followed by a per-position division, so the explicit matrix stores exactly the
    in-bounds taps, each with value ``1 / divisor(oh, ow)``.  The torch forward is
    ``F.avg_pool2d`` (the same window sums up to their order, divided by the same divisors);
    with non-overlapping whole windows (:attr:`disjoint_windows`) the adjoint is a strided copy
    of ``y / (k_h·k_w)`` into the windows — the transposed conv's single term per entry — else
    the transposed ones-kernel conv.
    """

    pinv_by_pattern = True  # a window-1 pool selects (and a general one is checked, not assumed)

    def average_windows(self) -> tuple[Any, Any, Any] | None:
        """``(kernel_size, stride, padding)`` in floor mode without a divisor override (the
        windows seed 001 §3.4(b) copies a pooled target back into); None otherwise."""
        if self.ceil_mode or self.divisor_override is not None:
            return None
        return self.kernel_size, self.stride, self.padding

    def __init__(
        self,
        input_shape: Sequence[int],
        kernel_size: int | Sequence[int],
        stride: int | Sequence[int] | None = None,
        padding: int | Sequence[int] = 0,
        count_include_pad: bool = True,
        ceil_mode: bool = False,
        divisor_override: int | None = None,
        dtype: Any = np.float64,
    ):
        C, H, W = _check_image_shape(input_shape, "AvgPool2d")
        k = pair(kernel_size, "kernel_size")
        s = k if stride is None else pair(stride, "stride")
        p = pair(padding, "padding", minimum=0)
        _check_pool_padding(p, k, "AvgPool2d")
        if divisor_override is not None and (isinstance(divisor_override, bool) or int(divisor_override) != divisor_override or divisor_override < 1):
            raise ValueError(f"AvgPool2d: divisor_override must be a positive int or None, got {divisor_override!r}")
        Ho = _pool_out_size(H, k[0], s[0], p[0], 1, ceil_mode)
        Wo = _pool_out_size(W, k[1], s[1], p[1], 1, ceil_mode)
        if Ho < 1 or Wo < 1:
            raise ValueError(
                f"AvgPool2d: kernel_size={k} with padding={p} does not fit input_shape={(C, H, W)} (output {Ho}x{Wo})"
            )
        self.kernel_size, self.stride, self.padding = k, s, p
        self.count_include_pad, self.ceil_mode, self.divisor_override = bool(count_include_pad), bool(ceil_mode), divisor_override
        # extra right/bottom zero padding so the ones-conv sees every (clipped) ceil-mode window
        ex_h = max(0, (Ho - 1) * s[0] + k[0] - (H + 2 * p[0]))
        ex_w = max(0, (Wo - 1) * s[1] + k[1] - (W + 2 * p[1]))
        ones = torch.ones((C, 1) + k, dtype=torch.float64)
        self._conv = Conv2d(ones, (C, H, W), stride=s, padding=(p[0], p[0] + ex_h, p[1], p[1] + ex_w), groups=C)
        assert self._conv.out_shape == (C, Ho, Wo)
        self.divisor = torch.from_numpy(self._divisors(H, W, Ho, Wo)).reshape(1, 1, Ho, Wo)
        #: no padding, floor mode, no divisor override: every window lies inside the input, its
        #: divisor k_h·k_w (the ResNet shortcuts AvgPool2d(1, 2))
        self.whole_windows = p == (0, 0) and not self.ceil_mode and divisor_override is None
        #: whole windows that do not overlap (stride >= kernel): every input entry lies in at most
        #: one window, so the adjoint copies ``y / (k_h·k_w)`` into the windows (no sums at all)
        self.disjoint_windows = self.whole_windows and s[0] >= k[0] and s[1] >= k[1]
        super().__init__((C, H, W), (C, Ho, Wo), dtype=numpy_dtype(dtype))

    def _divisors(self, H: int, W: int, Ho: int, Wo: int) -> np.ndarray:
        if self.divisor_override is not None:
            return np.full((Ho, Wo), float(self.divisor_override))

        def axis(n, n_out, k, s, p):
            start = np.arange(n_out) * s - p
            end = np.minimum(start + k, n + p)  # window clipped to the padded input
            if self.count_include_pad:
                return end - start
            return np.minimum(end, n) - np.maximum(start, 0)

        dh = axis(H, Ho, self.kernel_size[0], self.stride[0], self.padding[0])
        dw = axis(W, Wo, self.kernel_size[1], self.stride[1], self.padding[1])
        return (dh[:, None] * dw[None, :]).astype(np.float64)

    def _apply(self, x):
        # torch's pooling kernel evaluates the operator's map (its conventions are torch's: the
        # same window sums up to their order, divided by the same divisors), in any layout and
        # dtype — the ones-kernel depthwise conv runs channel by channel in float64 (VGG7's
        # 3×3 / 2 pools: 0.53 s of a 3.0 s float64 image)
        return F.avg_pool2d(x, self.kernel_size, self.stride, self.padding, self.ceil_mode,
                            self.count_include_pad, self.divisor_override)

    def _apply_adjoint(self, y):
        yd = y / self._param("divisor", y)
        if self.disjoint_windows:
            # the transposed ones-kernel conv adds one term per input entry: the copy of y/divisor
            # into each of its window's k_h·k_w offsets, the rest zero (bit for bit the same)
            (kh, kw), (sh, sw), (_, Ho, Wo) = self.kernel_size, self.stride, self.out_shape
            fmt = torch.channels_last if y.dim() == 4 and not y.is_contiguous() \
                and y.is_contiguous(memory_format=torch.channels_last) else torch.contiguous_format
            out = torch.empty((y.shape[0],) + tuple(self.in_shape), dtype=yd.dtype, device=yd.device,
                              memory_format=fmt).zero_()
            for a in range(kh):  # (loops over the kernel's taps, not over pixels)
                for b in range(kw):
                    out[:, :, a:a + sh * (Ho - 1) + 1:sh, b:b + sw * (Wo - 1) + 1:sw] = yd
            return out
        return self._conv._apply_adjoint(yd)

    def _coo(self):
        rows, cols, vals = self._conv._coo()
        inv = 1.0 / self.divisor.numpy().ravel()
        vals = inv[rows % inv.size]  # the ones-kernel entries scaled by 1/divisor(oh, ow)
        return rows, cols, vals


class GlobalAvgPool2d(Operator):
    """Global average pooling ``x.mean((H, W))`` (= ``AdaptiveAvgPool2d(1)``).

    Parameters
    ----------
    input_shape : (C, H, W)
    keepdim : bool
        Output ``(C, 1, 1)`` (AdaptiveAvgPool2d(1)) or ``(C,)`` (the channel-wise mean
        fed to the FC layer).
    """

    def __init__(self, input_shape: Sequence[int], keepdim: bool = True, dtype: Any = np.float64):
        C, H, W = _check_image_shape(input_shape, "GlobalAvgPool2d")
        self.keepdim = bool(keepdim)
        super().__init__((C, H, W), (C, 1, 1) if self.keepdim else (C,), dtype=numpy_dtype(dtype))

    def _apply(self, x):
        return x.mean(dim=(2, 3), keepdim=self.keepdim)

    def _apply_adjoint(self, y):
        C, H, W = self.in_shape
        return (y.reshape(-1, C, 1, 1) / (H * W)).expand(-1, C, H, W).contiguous()

    def _coo(self):
        C, H, W = self.in_shape
        cols = np.arange(C * H * W)
        return cols // (H * W), cols, np.full(cols.size, 1.0 / (H * W))


class MaxPool2d(Operator):
    """Max pooling at a point: the argmax selection matrix (piecewise-linear selection).

    ``S[(c, oh, ow), idx] = 1`` where ``idx`` is the input the max of that window came
    from at the point ``x`` — torch's ``return_indices`` (ties: torch's choice, the first
    maximum in scan order; NaN wins).  ``S x' = max_pool2d(x')`` for every ``x'`` with the
    same argmax pattern, in particular ``S x = max_pool2d(x)``.

    Parameters
    ----------
    x : tensor or array, shape (C, H, W) or (1, C, H, W)
        The point the selection is taken at: one sample, with or without a batch axis of 1
        (the batch rule of every single-sample API); a larger batch raises ValueError.
    kernel_size, stride, padding, dilation, ceil_mode :
        As ``torch.nn.functional.max_pool2d`` (``stride`` defaults to ``kernel_size``).
    """

    def __init__(
        self,
        x: Any,
        kernel_size: int | Sequence[int],
        stride: int | Sequence[int] | None = None,
        padding: int | Sequence[int] = 0,
        dilation: int | Sequence[int] = 1,
        ceil_mode: bool = False,
    ):
        t = sample_tensor(x, 3, "MaxPool2d: x")
        k = pair(kernel_size, "kernel_size")
        s = k if stride is None else pair(stride, "stride")
        p = pair(padding, "padding", minimum=0)
        d = pair(dilation, "dilation")
        _check_pool_padding(p, k, "MaxPool2d")
        C, H, W = t.shape
        Ho = _pool_out_size(H, k[0], s[0], p[0], d[0], ceil_mode)
        Wo = _pool_out_size(W, k[1], s[1], p[1], d[1], ceil_mode)
        if Ho < 1 or Wo < 1:
            raise ValueError(
                f"MaxPool2d: kernel_size={k}, dilation={d}, padding={p} does not fit input of shape {(C, H, W)}"
            )
        _, idx = F.max_pool2d(t[None], k, s, p, d, ceil_mode=ceil_mode, return_indices=True)
        if idx.numel() and (int(idx.min()) < 0 or int(idx.max()) >= H * W):
            # torch yields -inf and an out-of-range index for windows with no real input
            raise ValueError(
                f"MaxPool2d: with kernel_size={k}, stride={s}, padding={p}, dilation={d}, ceil_mode={ceil_mode} "
                f"some windows of the {(H, W)} input lie entirely in the padding (torch returns -inf there); "
                f"that is not a selection"
            )
        self.kernel_size, self.stride, self.padding, self.dilation, self.ceil_mode = k, s, p, d, bool(ceil_mode)
        self._init_from(idx[0], (C, H, W), planar=True, dtype=t.dtype)

    @classmethod
    def from_indices(cls, indices: Any, input_shape: Sequence[int], planar: bool = True,
                     dtype: Any = np.float64) -> "MaxPool2d":
        """Selection operator from argmax indices.

        Parameters
        ----------
        indices : int array / tensor, shape (C, H_out, W_out) (or (1, C, H_out, W_out))
            ``planar=True``: torch's ``return_indices`` convention, flat within each
            (H, W) plane; ``planar=False``: flat over (C, H, W) (as
            ``linop.network.MaxPoolNode.argmax`` returns them).
        input_shape : (C, H, W)
        """
        C, H, W = _check_image_shape(input_shape, "MaxPool2d.from_indices")
        idx = torch.as_tensor(np.asarray(indices) if not isinstance(indices, torch.Tensor) else indices)
        if idx.dim() == 4 and idx.shape[0] == 1:
            idx = idx[0]
        if idx.dim() != 3 or idx.shape[0] != C:
            raise ValueError(f"MaxPool2d.from_indices: indices must have shape ({C}, H_out, W_out), got {tuple(idx.shape)}")
        if idx.is_floating_point() or idx.dtype == torch.bool:
            raise ValueError(f"MaxPool2d.from_indices: indices must be integers, got dtype {idx.dtype}")
        op = cls.__new__(cls)
        op.kernel_size = op.stride = op.padding = op.dilation = None
        op.ceil_mode = None
        op._init_from(idx.detach().cpu(), (C, H, W), planar=bool(planar), dtype=dtype)
        return op

    def _init_from(self, idx: torch.Tensor, in_shape: tuple[int, int, int], planar: bool, dtype: Any) -> None:
        C, H, W = in_shape
        idx = idx.to(torch.int64)
        limit = H * W if planar else C * H * W
        if idx.numel() and (int(idx.min()) < 0 or int(idx.max()) >= limit):
            raise ValueError(
                f"MaxPool2d: indices must lie in [0, {limit}) ({'per (H, W) plane' if planar else 'flat over (C, H, W)'}), "
                f"got range [{int(idx.min())}, {int(idx.max())}]"
            )
        if planar:
            idx = idx + (torch.arange(C) * (H * W)).reshape(C, 1, 1)
        self.index = idx.reshape(-1).contiguous()  # flat (C, H, W) input index of every output
        self.indices = (idx - (torch.arange(C) * (H * W)).reshape(C, 1, 1))  # torch's planar form
        Operator.__init__(self, in_shape, tuple(idx.shape), dtype=numpy_dtype(dtype))

    def _apply(self, x):
        n = x.shape[0]
        return x.reshape(n, -1).index_select(1, self._index("index", x)).reshape((n,) + self.out_shape)

    def _apply_adjoint(self, y):
        n = y.shape[0]
        z = y.new_zeros((n, self.shape[1]))
        # overlapping windows may select the same input twice: accumulate
        z.index_add_(1, self._index("index", y), y.reshape(n, -1))
        return z.reshape((n,) + self.in_shape)

    def _coo(self):
        n = self.shape[0]
        return np.arange(n), self.index.numpy(), np.ones(n)
