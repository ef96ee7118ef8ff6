"""Diagonal operators: activation slope masks ``Σ`` and smooth-activation derivatives.

Seed 000 (appendix C, Eq. C.9) linearises every ReLU / LeakyReLU at the point through the
diagonal Jacobian ``Σ_l = diag((1+γ)/2 + (1-γ)/2 · sgn(c_l))``; the recurrence
``J_l = W_l Σ_{l-1} J_{l-1} + [0, R_l]`` then holds exactly because the activation is
piecewise linear through the origin.  Seed 001 needs the derivative diagonals of tanh and
sigmoid for its reconstructions (these are only first-order, not exact).

Convention at a kink (e.g. ``c = 0`` for ReLU): **torch autograd's**.  ReLU, LeakyReLU and
PReLU take the *negative-side* slope at exactly 0 (ReLU: 0, LeakyReLU/PReLU: γ), because
torch's backward tests ``x > 0``.  For a ReLU-like activation the exact identity
``σ(c) = Σ c`` holds either way, since the unit's value is 0 there.
"""
from __future__ import annotations

from math import prod
from typing import Any, Sequence

import numpy as np
import torch

from .. import backend
from .base import Operator, as_shape, numpy_dtype
from .conv import as_cpu_tensor

__all__ = [
    "Diagonal",
    "ReLUMask",
    "LeakyReLUMask",
    "PReLUMask",
    "PiecewiseLinearMask",
    "TanhDerivative",
    "SigmoidDerivative",
]


def _point(x: Any, who: str, shape: Sequence[int] | None = None) -> torch.Tensor:
    """One sample ``x`` as a CPU tensor.  The batch rule of single-sample APIs: with ``shape``
    given, ``x`` has shape ``shape`` or ``(1, *shape)``; without it, ``x``'s own shape is the
    per-sample shape (nothing is dropped)."""
    t = x.detach().to("cpu") if isinstance(x, torch.Tensor) else backend.to_torch(backend.to_numpy(x))
    if t.dim() == 0 or t.numel() == 0:
        raise ValueError(f"{who}: x must be a non-empty per-sample array, got shape {tuple(t.shape)}")
    if shape is not None:
        shp = as_shape(shape, "shape")
        if tuple(t.shape) == (1,) + shp:
            t = t[0]
        elif tuple(t.shape) != shp:
            raise ValueError(f"{who}: x must have shape {shp} or (1, *{shp}) (one sample), got {tuple(t.shape)}")
    if not t.is_floating_point():
        t = t.to(torch.float64)
    return t.clone().contiguous()


_BATCH_RULE = """x : array or tensor
        The point (one sample).  Its shape is the operator's per-sample shape, unless
        ``shape`` is given: then ``x`` has shape ``shape`` or ``(1, *shape)`` (the batch rule of
        every single-sample API: one sample, with or without a batch axis of 1).
    shape : per-sample shape, optional"""


class Diagonal(Operator):
    """``y = d ⊙ x``: the diagonal matrix ``diag(d)`` on tensors of shape ``shape``.

    Parameters
    ----------
    d : array or tensor with ``prod(shape)`` entries
    shape : per-sample shape (default ``d.shape``)
    keep_zeros : bool
        ``to_sparse()`` drops the entries where ``d == 0`` (inactive units of a mask are
        not structural non-zeros) unless this is True.
    """

    pinv_by_pattern = True  # a diagonal: at most one non-zero per row and column

    def __init__(self, d: Any, shape: Sequence[int] | None = None, keep_zeros: bool = False):
        dt = as_cpu_tensor(d, "d")
        shp = as_shape(tuple(dt.shape) if shape is None else shape, "shape")
        if dt.numel() != prod(shp):
            raise ValueError(f"{type(self).__name__}: d has {dt.numel()} entries but shape={shp} needs {prod(shp)}")
        self.diag = dt.reshape(shp).contiguous()
        self.keep_zeros = bool(keep_zeros)
        super().__init__(shp, shp, dtype=numpy_dtype(dt.dtype))

    def _apply(self, x):
        return x * self._diag_like(x)

    _apply_adjoint = _apply  # diagonal: self-adjoint

    def _diag_like(self, x: torch.Tensor) -> torch.Tensor:
        """``d`` on ``x``'s device and dtype, in ``x``'s memory layout: for a channels-last
        ``(N, C, H, W)`` batch a channels-last ``(1, C, H, W)`` copy (cached with the parameters;
        a broadcast across mismatched layouts is ~1.5× slower), else ``d`` itself.  The products
        ``x ⊙ d`` are the same in either layout."""
        d = self._param("diag", x)
        if not (x.dim() == 4 and d.dim() == 3 and not x.is_contiguous()
                and x.is_contiguous(memory_format=torch.channels_last)):
            return d
        key = ("diag_channels_last", x.device, x.dtype)
        t = self._param_cache.get(key)
        if t is None:
            t = d.reshape((1,) + tuple(d.shape)).contiguous(memory_format=torch.channels_last)
            self._param_cache[key] = t
        return t

    def apply_into(self, x: torch.Tensor, out: torch.Tensor) -> bool:
        """``out ← x ⊙ d`` (one product per entry, as :meth:`_apply`) when ``out`` has ``x``'s
        shape, dtype and strides (a layout-matched write); False otherwise, or when a subclass
        overrides ``_apply``."""
        if not (self._applies_as(Diagonal) and tuple(x.shape[1:]) == self.in_shape and out.shape == x.shape
                and out.dtype == x.dtype and out.stride() == x.stride() and x.is_floating_point()):
            return False
        torch.mul(x, self._diag_like(x), out=out)
        return True

    def apply_(self, x: torch.Tensor) -> bool:
        """``x ← x ⊙ d`` in place (the products of :meth:`_apply`) for a dense batch (contiguous
        or channels-last: no entry stored twice); False otherwise, or when a subclass overrides
        ``_apply``."""
        if not (self._applies_as(Diagonal) and tuple(x.shape[1:]) == self.in_shape and x.is_floating_point()
                and (x.is_contiguous() or x.is_contiguous(memory_format=torch.channels_last))):
            return False
        x.mul_(self._diag_like(x))
        return True

    def _coo(self):
        v = self.diag.numpy().ravel()
        idx = np.arange(v.size) if self.keep_zeros else np.flatnonzero(v)
        return idx, idx, v[idx]


class ReLUMask(Diagonal):
    """``Σ = diag(1[x > 0])`` — ReLU's slopes at the pre-activation ``x`` (0 at x = 0, like torch).

    Parameters
    ----------
    {batch}
    """

    def __init__(self, x: Any, shape: Sequence[int] | None = None):
        t = _point(x, "ReLUMask", shape)
        super().__init__((t > 0).to(t.dtype))


class LeakyReLUMask(Diagonal):
    """``Σ = diag(1 if x > 0 else γ)`` (seed 000 Eq. C.9); γ at x = 0, like torch.

    Parameters
    ----------
    {batch}
    negative_slope : γ
    """

    def __init__(self, x: Any, negative_slope: float = 0.01, shape: Sequence[int] | None = None):
        t = _point(x, "LeakyReLUMask", shape)
        try:
            g = float(negative_slope)
        except (TypeError, ValueError):
            raise ValueError(f"LeakyReLUMask: negative_slope must be a float, got {negative_slope!r}") from None
        if not np.isfinite(g):
            raise ValueError(f"LeakyReLUMask: negative_slope must be finite, got {negative_slope!r}")
        self.negative_slope = g
        super().__init__(torch.where(t > 0, torch.ones_like(t), torch.full_like(t, g)))


class PReLUMask(Diagonal):
    """PReLU slopes: ``1`` where ``x > 0`` else the learned slope (scalar, or one per channel
    along axis 0 of ``x``, as ``torch.nn.PReLU(num_parameters=C)``); the slope at x = 0, like torch.

    Parameters
    ----------
    {batch}
    weight : the learned slope(s)
    """

    def __init__(self, x: Any, weight: Any, shape: Sequence[int] | None = None):
        t = _point(x, "PReLUMask", shape)
        w = as_cpu_tensor(weight, "weight").reshape(-1).to(t.dtype)
        if w.numel() == 1:
            g = w.reshape(())
        elif t.dim() >= 1 and w.numel() == t.shape[0]:
            g = w.reshape((-1,) + (1,) * (t.dim() - 1))
        else:
            raise ValueError(
                f"PReLUMask: weight must have 1 or C={t.shape[0]} entries (x shape {tuple(t.shape)}), got {w.numel()}"
            )
        self.weight = w
        super().__init__(torch.where(t > 0, torch.ones_like(t), g.expand_as(t)))


class PiecewiseLinearMask(Diagonal):
    """Slopes of any piecewise-linear activation at ``x``.

    Parameters
    ----------
    {batch}
    breakpoints : increasing sequence ``b_1 < … < b_k``
    slopes : ``k + 1`` slopes, ``slopes[i]`` on ``(b_i, b_{i+1})`` (with ``b_0 = -inf``,
        ``b_{k+1} = +inf``)
    at_breakpoint : ``"left"`` (default; slope of the interval below — ReLU / LeakyReLU's
        torch convention), ``"right"``, or a sequence of ``k`` values used at exactly
        ``b_i`` (e.g. ``[0, 0]`` reproduces torch's hardtanh / ReLU6 gradients).

    Examples
    --------
    ReLU: ``breakpoints=[0], slopes=[0, 1]``; hardtanh: ``[-1, 1], [0, 1, 0], at_breakpoint=[0, 0]``.
    """

    def __init__(self, x: Any, breakpoints: Sequence[float], slopes: Sequence[float], at_breakpoint: Any = "left",
                 shape: Sequence[int] | None = None):
        t = _point(x, "PiecewiseLinearMask", shape)
        b = torch.as_tensor(np.asarray(breakpoints, dtype=np.float64).reshape(-1), dtype=t.dtype)
        s = torch.as_tensor(np.asarray(slopes, dtype=np.float64).reshape(-1), dtype=t.dtype)
        if s.numel() != b.numel() + 1:
            raise ValueError(
                f"PiecewiseLinearMask: need len(slopes) = len(breakpoints) + 1, got {s.numel()} slopes "
                f"for {b.numel()} breakpoints"
            )
        if b.numel() > 1 and not bool((b[1:] > b[:-1]).all()):
            raise ValueError(f"PiecewiseLinearMask: breakpoints must be strictly increasing, got {list(breakpoints)}")
        if not (bool(torch.isfinite(b).all()) and bool(torch.isfinite(s).all())):
            raise ValueError("PiecewiseLinearMask: breakpoints and slopes must be finite")
        # index of the interval: number of breakpoints strictly below x ("left" at a kink)
        flat = t.reshape(-1)
        nb = b.numel()
        i_left = torch.searchsorted(b, flat, right=False)
        d = s[i_left]
        if nb:
            at_kink = (i_left < nb) & (flat == b[i_left.clamp(max=nb - 1)])
        else:
            at_kink = torch.zeros_like(flat, dtype=torch.bool)
        if isinstance(at_breakpoint, str):
            if at_breakpoint == "right":
                d = torch.where(at_kink, s[(i_left + 1).clamp(max=nb)], d)
            elif at_breakpoint != "left":
                raise ValueError(
                    f"PiecewiseLinearMask: at_breakpoint must be 'left', 'right' or {nb} values, got {at_breakpoint!r}"
                )
        else:
            v = torch.as_tensor(np.asarray(at_breakpoint, dtype=np.float64).reshape(-1), dtype=t.dtype)
            if v.numel() != nb:
                raise ValueError(
                    f"PiecewiseLinearMask: at_breakpoint needs {nb} values (one per breakpoint), got {v.numel()}"
                )
            if nb:
                d = torch.where(at_kink, v[i_left.clamp(max=nb - 1)], d)
        self.breakpoints, self.slopes = b, s
        super().__init__(d.reshape(t.shape))


class TanhDerivative(Diagonal):
    """``diag(1 - tanh(x)²)``: the Jacobian of tanh at ``x`` (first order only).

    Parameters
    ----------
    {batch}
    """

    def __init__(self, x: Any, shape: Sequence[int] | None = None):
        t = _point(x, "TanhDerivative", shape)
        super().__init__(1 - torch.tanh(t) ** 2, keep_zeros=True)


class SigmoidDerivative(Diagonal):
    """``diag(s (1 - s))`` with ``s = sigmoid(x)``: the Jacobian of sigmoid at ``x``.

    Parameters
    ----------
    {batch}
    """

    def __init__(self, x: Any, shape: Sequence[int] | None = None):
        t = _point(x, "SigmoidDerivative", shape)
        s = torch.sigmoid(t)
        super().__init__(s * (1 - s), keep_zeros=True)


for _cls in (ReLUMask, LeakyReLUMask, PReLUMask, PiecewiseLinearMask, TanhDerivative, SigmoidDerivative):
    _cls.__doc__ = _cls.__doc__.replace("{batch}", _BATCH_RULE)
