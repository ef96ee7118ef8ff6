"""Reverse steps of the non-linear and structural layers (seed 001 §3.4).

The greedy reverse pass of seed 001 (§3, "we adopt a greedy strategy to reconstruct all
feature maps from a*_L to a*_{l_R} layer by layer") alternates linear steps — MDP / CCP
solves, :mod:`linop.solvers` — with the reverse steps collected here:

* :func:`inverse_activation` — seed 001 §3.4(a): bijections with unlimited range
  (LeakyReLU / PReLU, with their real slope) are inverted exactly; bijections with a limited
  range (tanh, sigmoid) are inverted after *clipping into the open range* with a documented,
  configurable margin; ReLU (not a bijection) is reversed by the identity.
* :func:`unpool_max`, :func:`unpool_avg` — seed 001 §3.4(b): pooling with stride = kernel
  size is reversed by copying every pooled value back over its window.  Two alternatives
  are offered for max pooling (the forward argmax, and the nearest pre-image), and an exact
  minimum-norm version for average pooling.
* :func:`structural_step` — layers whose matrix has at most one non-zero per row and per
  column (flatten, channel zero-padding, strided subsampling, scaling, window-1 pooling):
  their minimum-norm least-squares correction ``a* = â + W⁺(z* − W â)`` has a closed form,
  evaluated without cancellation.
* :func:`subtract_bias` — ``z = c + R b`` reversed as ``c* = z* − R b``.

*Exactness convention* (used throughout).  Where a reconstructed value equals the forward
value bit for bit, the reverse step returns the forward input exactly (the forward
pre-activation is a pre-image; for a bijection it is *the* pre-image).  So a feature the
embedding leaves unchanged travels back unchanged, without rounding (``(c + b) − b ≠ c`` in
floating point) and without clipping saturated tanh units.  Pass ``keep_unchanged=False``
for the plain formulas.
"""
from __future__ import annotations

from typing import Any, Sequence

import numpy as np
import torch

from ..operators.conv import pair
from ..solvers.case import rank_case

__all__ = [
    "ACTIVATION_KINDS",
    "DEFAULT_CLIP_MARGIN",
    "MAXPOOL_MODES",
    "AVGPOOL_MODES",
    "inverse_activation",
    "unpool_max",
    "unpool_avg",
    "pool_windows",
    "structural_pinv",
    "structural_step",
    "subtract_bias",
]

ACTIVATION_KINDS = ("relu", "leaky_relu", "prelu", "tanh", "sigmoid", "identity")
RELU_MODES = ("identity", "nearest")
MAXPOOL_MODES = ("copy", "argmax", "nearest")
AVGPOOL_MODES = ("copy", "exact")

#: Default distance kept from the ends of a bounded range before inverting (tanh: |t| <= 1 − m,
#: sigmoid: m <= s <= 1 − m).  1e-6 caps |atanh| at ~7.25 and |logit| at ~13.8: far beyond any
#: trained pre-activation, yet representable in float32 (1 − 1e-6 is ~17 float32 ulps below 1).
DEFAULT_CLIP_MARGIN = 1e-6


# ----------------------------------------------------------------------------- activations
def _slopes(negative_slope: Any, like: torch.Tensor) -> torch.Tensor:
    """LeakyReLU / PReLU slope γ as a tensor broadcastable against ``like`` (N, C, ...)."""
    g = torch.as_tensor(negative_slope, dtype=like.dtype, device=like.device)
    if g.numel() > 1:  # per-channel PReLU
        if like.dim() < 2 or g.numel() != like.shape[1]:
            raise ValueError(
                f"prelu negative_slope has {g.numel()} entries but the feature has "
                f"{like.shape[1] if like.dim() > 1 else 1} channels"
            )
        g = g.reshape((1, -1) + (1,) * (like.dim() - 2))
    if bool((g < 0).any()):
        raise ValueError(
            f"negative_slope must be >= 0 for an invertible LeakyReLU/PReLU, got {negative_slope!r}"
        )
    return g


def _check_margin(kind: str, clip_margin: float) -> float:
    m = float(clip_margin)
    upper = 1.0 if kind == "tanh" else 0.5  # sigmoid's open range (0, 1) has half-width 0.5
    if not (0.0 < m < upper):
        raise ValueError(f"clip_margin for {kind} must lie in (0, {upper}), got {clip_margin!r}")
    return m


def inverse_activation(
    a_star: torch.Tensor,
    kind: str,
    negative_slope: Any = 0.0,
    *,
    clip_margin: float = DEFAULT_CLIP_MARGIN,
    relu: str = "identity",
    a_hat: torch.Tensor | None = None,
    z_hat: torch.Tensor | None = None,
    keep_unchanged: bool = True,
    return_clipped: bool = False,
):
    """Reverse an elementwise activation: ``z* = σ⁻¹(a*)`` (seed 001 §3.4(a)).

    Parameters
    ----------
    a_star : Tensor (N, ...)
        Reconstructed activated feature ``a*_l``.
    kind : {"relu", "leaky_relu", "prelu", "tanh", "sigmoid", "identity"}
        * leaky_relu / prelu — type (i), bijection onto ℝ: ``z = a`` for ``a ≥ 0``,
          ``a / γ`` otherwise, with the layer's real slope γ (per channel for PReLU).  A slope
          of exactly 0 is a ReLU and is treated as such.
        * tanh / sigmoid — type (ii), bounded range: ``a*`` is first clipped to
          ``|a| ≤ 1 − m`` (tanh) or ``m ≤ a ≤ 1 − m`` (sigmoid), then ``atanh`` / ``logit``.
        * relu — type (iii): the identity, as in the paper (``relu="identity"``); or
          ``relu="nearest"``: the pre-image of the projection of ``a*`` onto the range
          ``[0, ∞)`` that is nearest to the forward ``ẑ`` (``a*`` where ``a* > 0``,
          ``min(ẑ, 0)`` elsewhere; needs ``z_hat``).
    negative_slope : float or Tensor
        γ of LeakyReLU / PReLU (must be ≥ 0).
    clip_margin : float
        ``m`` above (default :data:`DEFAULT_CLIP_MARGIN` = 1e-6).
    a_hat, z_hat : Tensor, optional
        Forward output ``â`` and input ``ẑ`` of the activation.  With ``keep_unchanged`` the
        entries where ``a* == â`` return ``ẑ`` exactly (see the module docstring).
    return_clipped : bool
        Also return the number of entries moved by clipping, per sample (N,).

    Returns
    -------
    z_star : Tensor, same shape as ``a_star`` (and ``n_clipped`` if requested).
    """
    if kind not in ACTIVATION_KINDS:
        raise ValueError(f"activation kind must be one of {ACTIVATION_KINDS}, got {kind!r}")
    if relu not in RELU_MODES:
        raise ValueError(f"relu must be one of {RELU_MODES}, got {relu!r}")
    if not isinstance(a_star, torch.Tensor):
        raise TypeError(f"a_star must be a torch.Tensor, got {type(a_star).__name__}")
    if not bool(torch.isfinite(a_star).all()):
        raise ValueError(f"a_star holds non-finite values (NaN/inf) before inverting {kind}")
    clipped = torch.zeros_like(a_star, dtype=torch.bool)

    def relu_inverse(a: torch.Tensor) -> torch.Tensor:
        if relu == "identity":
            return a
        if z_hat is None:
            raise ValueError("relu='nearest' needs z_hat, the forward pre-activation")
        return torch.where(a > 0, a, torch.minimum(z_hat, torch.zeros_like(z_hat)))

    if kind == "identity":
        z = a_star.clone()
    elif kind == "relu":
        z = relu_inverse(a_star).clone()
    elif kind in ("leaky_relu", "prelu"):
        g = _slopes(negative_slope, a_star)
        safe = torch.where(g > 0, g, torch.ones_like(g))
        z = torch.where(a_star >= 0, a_star, a_star / safe)
        if bool((g == 0).any()):  # slope 0: this channel is a ReLU
            z = torch.where(g == 0, relu_inverse(a_star), z)
    elif kind == "tanh":
        m = _check_margin(kind, clip_margin)
        t = a_star.clamp(-1.0 + m, 1.0 - m)
        clipped = t != a_star
        z = torch.atanh(t)
    else:  # sigmoid
        m = _check_margin(kind, clip_margin)
        t = a_star.clamp(m, 1.0 - m)
        clipped = t != a_star
        z = torch.logit(t)
    if keep_unchanged and a_hat is not None and z_hat is not None:
        same = a_star == a_hat
        z = torch.where(same, z_hat.to(z.dtype), z)
        clipped = clipped & ~same
    if return_clipped:
        return z, clipped.reshape(clipped.shape[0], -1).sum(1)
    return z


# ----------------------------------------------------------------------------- pooling
def _check_pool(kernel_size, stride, padding, dilation, in_shape) -> tuple[tuple[int, int], tuple[int, ...]]:
    k = pair(kernel_size, "kernel_size")
    s = k if stride is None else pair(stride, "stride")
    p = pair(padding, "padding", minimum=0)
    d = pair(dilation, "dilation")
    if s != k or p != (0, 0) or d != (1, 1):
        raise NotImplementedError(
            f"the copy-back pooling reverse of seed 001 §3.4(b) needs stride == kernel_size, "
            f"padding 0 and dilation 1; got kernel_size={k}, stride={s}, padding={p}, dilation={d} "
            f"(for average pooling use the exact solve through linop.solvers.solve instead)"
        )
    in_shape = tuple(int(v) for v in in_shape)
    if len(in_shape) != 3:
        raise ValueError(f"pooling reverse needs a (C, H, W) input shape, got {in_shape}")
    return k, in_shape


def pool_windows(a: torch.Tensor, kernel_size: tuple[int, int]) -> torch.Tensor:
    """View of the non-overlapping windows: (N, C, H, W) -> (N, C, Ho, Wo, kh·kw).

    Windows are flattened row-major, the scan order of ``torch.nn.functional.max_pool2d``;
    rows / columns beyond ``Ho·kh`` / ``Wo·kw`` (floor mode) are not part of any window."""
    kh, kw = kernel_size
    N, C, H, W = a.shape
    Ho, Wo = H // kh, W // kw
    v = a[:, :, : Ho * kh, : Wo * kw].reshape(N, C, Ho, kh, Wo, kw)
    return v.permute(0, 1, 2, 4, 3, 5).reshape(N, C, Ho, Wo, kh * kw)


def _from_windows(v: torch.Tensor, kernel_size, base: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`pool_windows`, written into a copy of ``base`` (N, C, H, W)."""
    kh, kw = kernel_size
    N, C, Ho, Wo, _ = v.shape
    out = base.clone()
    out[:, :, : Ho * kh, : Wo * kw] = v.reshape(N, C, Ho, Wo, kh, kw).permute(0, 1, 2, 4, 3, 5).reshape(
        N, C, Ho * kh, Wo * kw
    )
    return out


def _pooled_shape_check(p_star: torch.Tensor, k, in_shape) -> None:
    C, H, W = in_shape
    want = (C, H // k[0], W // k[1])
    if p_star.dim() != 4 or tuple(p_star.shape[1:]) != want:
        raise ValueError(f"pooled feature must have shape (N, {want[0]}, {want[1]}, {want[2]}), got {tuple(p_star.shape)}")


def _base(a_hat, p_star, in_shape) -> torch.Tensor:
    if a_hat is not None:
        if tuple(a_hat.shape) != (p_star.shape[0],) + tuple(in_shape):
            raise ValueError(f"a_hat must have shape (N, *{tuple(in_shape)}), got {tuple(a_hat.shape)}")
        return a_hat.to(p_star.dtype)
    return p_star.new_zeros((p_star.shape[0],) + tuple(in_shape))


def _keep_windows(w, v, p_star, p_hat, a_hat):
    """Windows whose pooled target is unchanged (``p* == p̂``) keep their forward values."""
    if p_hat is None or a_hat is None:
        return w
    if tuple(p_hat.shape) != tuple(p_star.shape):
        raise ValueError(f"p_hat must have the shape of p_star {tuple(p_star.shape)}, got {tuple(p_hat.shape)}")
    return torch.where((p_star == p_hat).unsqueeze(-1), v, w)


def unpool_max(
    p_star: torch.Tensor,
    kernel_size: Any,
    in_shape: Sequence[int],
    *,
    mode: str = "copy",
    a_hat: torch.Tensor | None = None,
    stride: Any = None,
    padding: Any = 0,
    dilation: Any = 1,
    p_hat: torch.Tensor | None = None,
) -> torch.Tensor:
    """Reverse of max pooling with stride = kernel size (seed 001 §3.4(b)).

    Parameters
    ----------
    p_star : Tensor (N, C, Ho, Wo)
        Reconstructed pooled feature.
    kernel_size, stride, padding, dilation :
        The pooling's geometry; only stride == kernel, padding 0, dilation 1 is supported
        (NotImplementedError otherwise).
    in_shape : (C, H, W)
        Shape of the pooling input (H, W may exceed Ho·kh, Wo·kw: floor mode).
    mode : {"copy", "argmax", "nearest"}
        * ``"copy"`` (the paper: "directly copying values from the post-pooling ones"): every
          entry of a window receives the pooled value.  ``maxpool(a*) = p*`` exactly.
        * ``"argmax"``: the linearised MDP at â — the pooled value goes to the forward argmax,
          the other entries keep â.  Exact for the selection operator at â; ``maxpool(a*)``
          can differ from ``p*`` where ``p*`` fell below another entry of the window.
        * ``"nearest"``: the point of ``{a : maxpool(a) = p*}`` nearest to â (beyond the
          paper): entries above ``p*`` are lowered to it and, where the whole window lies
          below ``p*``, its largest entry is raised to it.  ``maxpool(a*) = p*`` exactly and
          ``a* = â`` wherever ``p* = p̂``.
    a_hat : Tensor (N, C, H, W), optional
        Forward input of the pooling; needed for "argmax" / "nearest".  Entries outside every
        window (floor mode) take â when given, else 0.
    p_hat : Tensor (N, C, Ho, Wo), optional
        Forward pooled value.  With ``a_hat`` given, windows with ``p* == p̂`` keep â
        (the exactness convention of this module; "nearest" does so by construction).

    Returns
    -------
    a_star : Tensor (N, C, H, W)
    """
    if mode not in MAXPOOL_MODES:
        raise ValueError(f"max-pool reverse mode must be one of {MAXPOOL_MODES}, got {mode!r}")
    k, in_shape = _check_pool(kernel_size, stride, padding, dilation, in_shape)
    _pooled_shape_check(p_star, k, in_shape)
    if mode != "copy" and a_hat is None:
        raise ValueError(f"max-pool reverse mode {mode!r} needs a_hat, the forward pooling input")
    base = _base(a_hat, p_star, in_shape)
    t = p_star.unsqueeze(-1)
    v = pool_windows(base, k)
    if mode == "copy":
        w = t.expand(*p_star.shape, k[0] * k[1])
    elif mode == "argmax":
        idx = v.argmax(-1, keepdim=True)  # first maximum in scan order, as torch's max_pool2d
        w = v.scatter(-1, idx, t)
    else:  # nearest: clamp from above, then lift the largest entry where all lie below p*
        idx = v.argmax(-1, keepdim=True)
        below = v.gather(-1, idx) < t
        w = torch.minimum(v, t)
        w = torch.where(below, w.scatter(-1, idx, t), w)
    return _from_windows(_keep_windows(w, v, p_star, p_hat, a_hat), k, base)


def unpool_avg(
    p_star: torch.Tensor,
    kernel_size: Any,
    in_shape: Sequence[int],
    *,
    mode: str = "copy",
    a_hat: torch.Tensor | None = None,
    stride: Any = None,
    padding: Any = 0,
    p_hat: torch.Tensor | None = None,
) -> torch.Tensor:
    """Reverse of average pooling with stride = kernel size (seed 001 §3.4(b)).

    * ``mode="copy"`` (the paper): every window entry receives the pooled value; the average
      of k copies of p* is p*, so ``avgpool(a*) = p*`` exactly.
    * ``mode="exact"``: the minimum-norm correction ``a* = â + W⁺(p* − W â)`` (MDP, seed 001
      Eq. 4).  For non-overlapping windows ``W Wᵀ = I / (kh·kw)``, hence ``W⁺ = kh·kw·Wᵀ`` =
      copy-back: every entry of a window moves by the window's deviation ``p* − p̂``.  (Any
      other stride / padding: solve with the AvgPool2d operator through :func:`linop.solve`.)

    Entries outside every window (floor mode) keep â (0 without ``a_hat``); with ``p_hat``
    (forward pooled value) and ``a_hat``, windows with ``p* == p̂`` keep â.
    """
    if mode not in AVGPOOL_MODES:
        raise ValueError(f"avg-pool reverse mode must be one of {AVGPOOL_MODES}, got {mode!r}")
    k, in_shape = _check_pool(kernel_size, stride, padding, 1, in_shape)
    _pooled_shape_check(p_star, k, in_shape)
    if mode == "exact" and a_hat is None:
        raise ValueError("avg-pool reverse mode 'exact' needs a_hat, the forward pooling input")
    base = _base(a_hat, p_star, in_shape)
    v = pool_windows(base, k)
    if mode == "copy":
        w = p_star.unsqueeze(-1).expand(*p_star.shape, k[0] * k[1])
    else:
        w = v + (p_star.unsqueeze(-1) - v.mean(-1, keepdim=True))
    return _from_windows(_keep_windows(w, v, p_star, p_hat, a_hat), k, base)


# ----------------------------------------------------------------------------- structural
def structural_pinv(op: Any) -> tuple[np.ndarray, np.ndarray, np.ndarray] | None:
    """If ``op``'s matrix has at most one non-zero per row and per column, its pattern.

    Returns ``(rows, cols, vals)`` (one entry per non-zero; then ``W⁺ = Wᵀ`` with reciprocal
    values) or None for a general matrix.  Flatten, channel zero-padding, strided
    subsampling, scaling and window-1 pooling are of this kind."""
    try:
        S = op.to_sparse()
    except (NotImplementedError, AttributeError):
        return None
    S = S.tocoo()
    keep = S.data != 0
    r, c, v = S.row[keep], S.col[keep], S.data[keep]
    m, n = S.shape
    if r.size and (np.bincount(r, minlength=m).max() > 1 or np.bincount(c, minlength=n).max() > 1):
        return None
    return r.astype(np.int64), c.astype(np.int64), v


def structural_step(
    pattern: tuple[np.ndarray, np.ndarray, np.ndarray],
    shape: tuple[int, int],
    z_star: torch.Tensor,
    a_hat: torch.Tensor,
) -> tuple[torch.Tensor, str]:
    """Minimum-norm least-squares correction for a one-non-zero-per-row-and-column W.

    ``a* = â + W⁺(z* − W â)`` reduces to: ``a*_c = z*_r / w_rc`` for every non-zero
    ``(r, c)``, ``a*_c = â_c`` for columns without one (no cancellation: the copy is exact).

    Returns ``(a_star, case)`` with the case of W as :func:`linop.solvers.case.rank_case`
    names it (the rank is the number of non-zeros): "MDP" (full row rank, square included),
    "CCP" (full column rank) or "rank-deficient" (neither)."""
    r, c, v = pattern
    m, n = shape
    N = z_star.shape[0]
    zf = z_star.reshape(N, m)
    out = a_hat.reshape(N, n).clone().to(z_star.dtype)
    if r.size:
        ri = torch.as_tensor(r, device=z_star.device)
        ci = torch.as_tensor(c, device=z_star.device)
        vals = torch.as_tensor(v, device=z_star.device, dtype=z_star.dtype)
        if bool((vals == 1).all()):
            out[:, ci] = zf[:, ri]
        else:
            out[:, ci] = zf[:, ri] / vals
    return out.reshape(a_hat.shape), rank_case(m, n, int(r.size))


def subtract_bias(
    z_star: torch.Tensor,
    bias: torch.Tensor,
    *,
    z_hat: torch.Tensor | None = None,
    c_hat: torch.Tensor | None = None,
    keep_unchanged: bool = True,
) -> torch.Tensor:
    """Reverse of ``z = c + R b``: ``c* = z* − R b`` (``bias`` = ``R b``, broadcastable).

    With ``keep_unchanged`` and the forward ``ẑ``, ``ĉ`` given, entries with ``z* == ẑ``
    return ``ĉ`` exactly (floating-point ``(ĉ + b) − b`` need not equal ``ĉ``)."""
    c = z_star - bias.to(z_star.dtype)
    if keep_unchanged and z_hat is not None and c_hat is not None:
        c = torch.where(z_star == z_hat, c_hat.to(c.dtype), c)
    return c
