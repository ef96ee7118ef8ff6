"""Test kit: a tiny post-training setup shared by the FR-PT / BP-PT tests (not a test module)."""
from __future__ import annotations

import torch

from models.baselines import KConvMFC

__all__ = ["tiny_model", "tiny_data", "CountingReconstructor"]


def tiny_model(seed: int = 0) -> KConvMFC:
    torch.manual_seed(seed)
    # conv 1->3 (3x3) + tanh + pool 2 -> 3x3, conv 3->4 (3x3) + tanh -> 1x1, FC 4->10: L = 3
    return KConvMFC((1, 8, 8), (3, 4), (), 10, "tanh", kernel_size=3)


def tiny_data(n_train: int = 96, n_test: int = 64, seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(n_train + n_test, 1, 8, 8, generator=g)
    y = torch.randint(0, 10, (n_train + n_test,), generator=g)
    return {"x_train": x[:n_train], "y_train": y[:n_train], "x_test": x[n_train:], "y_test": y[n_train:]}


class CountingReconstructor:
    """Stand-in reconstructor (the mechanics under test do not depend on the solver): the
    target is a fixed, label-dependent shift of â_{l_R}; counts factory and chunk calls."""

    def __init__(self, fail_at_chunk: int | None = None):
        self.factory_calls = 0
        self.chunk_calls = 0
        self.fail_at_chunk = fail_at_chunk

    def __call__(self, upper, in_shape, embedding, solver):
        self.factory_calls += 1

        def f(a_hat, y):
            if self.fail_at_chunk is not None and self.chunk_calls == self.fail_at_chunk:
                raise KeyboardInterrupt("simulated kill")
            self.chunk_calls += 1
            shift = (y.to(a_hat.dtype) / 10.0).reshape(-1, *([1] * (a_hat.dim() - 1)))
            return a_hat.to(torch.float64) + shift

        return f
