"""Max pooling: piecewise linear; at a point, the selection of the argmax (seed 000
appendix C); its reverse step copies back into the window (seed 001 §3.4(b))."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from ..operators.base import Operator
from ..operators.pool import MaxPool2d
from .node import Node

__all__ = ["MaxPoolNode"]


@dataclass
class MaxPoolNode(Node):
    kernel_size: tuple[int, int] = (2, 2)
    stride: tuple[int, int] = (2, 2)
    padding: tuple[int, int] = (0, 0)
    dilation: tuple[int, int] = (1, 1)
    ceil_mode: bool = False

    def forward(self, xs, x_b):
        return F.max_pool2d(xs[0], self.kernel_size, self.stride, self.padding, self.dilation,
                            ceil_mode=self.ceil_mode)

    def argmax(self, x: torch.Tensor) -> torch.Tensor:
        """Flat per-sample input index selected for every output (N, *out_shape)."""
        _, idx = F.max_pool2d(
            x, self.kernel_size, self.stride, self.padding, self.dilation,
            ceil_mode=self.ceil_mode, return_indices=True,
        )
        # torch returns indices within each (H, W) plane; make them flat over (C, H, W).
        C, H, W = x.shape[1:]
        offs = (torch.arange(C, device=x.device) * (H * W)).reshape(1, C, 1, 1)
        return idx + offs

    def pattern(self, xs):
        return self.argmax(xs[0])

    def linearize(self, xs, x_b) -> Operator:
        """At a point, max pooling is the selection of the argmax:
        :meth:`MaxPool2d.from_indices <linop.operators.pool.MaxPool2d.from_indices>`."""
        x = xs[0]
        idx = self.argmax(x)
        return MaxPool2d.from_indices(idx, tuple(x.shape[1:]), planar=False, dtype=x.dtype)

    def geometry(self, boxes, in_shapes):
        """The whole pooling window (a superset of any argmax selection): x-independent."""
        src = torch.from_numpy(boxes[0].astype(np.float64)).reshape((4,) + tuple(in_shapes[0]))
        pool = lambda t: F.max_pool2d(t, self.kernel_size, self.stride, self.padding, self.dilation,  # noqa: E731
                                      ceil_mode=self.ceil_mode)
        b = torch.stack([-pool(-src[0]), pool(src[1]), -pool(-src[2]), pool(src[3])]).reshape(4, -1)
        return b.numpy().astype(np.int64)

    def reverse(self, z_star, z_hat, a_hats, x_b, options):
        """Copy back into the pooling window (seed 001 §3.4(b)), or argmax / nearest.

        With ``options.pool_rule == "exact"`` (and ``keep_unchanged``) a window whose pooled
        target equals its forward value keeps â; with "copy" it too receives the pooled value
        in every entry, as the paper's rule reads."""
        from ..operators.conv import pair
        from ..reverse import steps

        in_shape = tuple(a_hats[0].shape[1:])
        H, W = in_shape[1:]
        k = pair(self.kernel_size, "kernel_size")
        if self.ceil_mode and (H % k[0] or W % k[1]):
            raise NotImplementedError(
                f"max pooling {self.name!r} uses ceil_mode with partial windows ({H}x{W} by {k}); "
                f"the copy-back reverse step of seed 001 §3.4(b) covers full windows only"
            )
        report = self._report()
        report.method = options.maxpool
        report.solve_info = {"pool_rule": options.pool_rule}
        # pool_rule "copy" (seed 001 §3.4(b)): every window is copied back, unchanged ones too
        keep = options.keep_unchanged and options.pool_rule == "exact"
        a = steps.unpool_max(
            z_star, self.kernel_size, in_shape, mode=options.maxpool, a_hat=a_hats[0], stride=self.stride,
            padding=self.padding, dilation=self.dilation, p_hat=z_hat if keep else None,
        )
        return [a], report
