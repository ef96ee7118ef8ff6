"""Torus geometry of a padded stride-1 conv: ``W = S C E`` exactly (see the package docstring).

The smallest torus, its boundary ``B`` (torus positions holding no output) and ring ``P``
(torus positions outside the image), the byte count of the capacitance factorisation, and
the gather of an explicit block of a block-circulant operator.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from ... import backend
from ...operators.conv import pair, parse_padding

__all__ = [
    "PaddedTorus",
    "all_channels",
    "block_sizes",
    "channel_mode",
    "conv_geometry",
    "effective_kernel",
    "gather",
    "padded_conv_bytes",
    "padded_torus",
    "peak_bytes",
    "ring_entries",
]


# --------------------------------------------------------------------------- geometry
@dataclass(frozen=True)
class PaddedTorus:
    """Where a padded stride-1 conv lives on the torus (see the module docstring).

    Attributes
    ----------
    in_hw, out_hw, kernel : (H, W), (H_out, W_out), the (dilated) kernel size (k_h, k_w)
    padding : (top, bottom, left, right)
    torus : (T_h, T_w)
    rows, cols : torus row / column of each output row / column (``o − p_t + k_h − 1 mod T_h``)
    boundary : flat torus indices not holding an output (``B``), ascending
    ring : flat torus indices outside the ``H × W`` image (``P``), ascending
    """

    in_hw: tuple[int, int]
    out_hw: tuple[int, int]
    kernel: tuple[int, int]
    padding: tuple[int, int, int, int]
    torus: tuple[int, int]
    rows: np.ndarray
    cols: np.ndarray
    boundary: np.ndarray
    ring: np.ndarray


def padded_torus(in_hw: tuple[int, int], kernel: tuple[int, int], padding: tuple[int, int, int, int],
                 torus: tuple[int, int] | None = None) -> PaddedTorus:
    """The smallest (or the given) torus on which ``W = S C E`` holds exactly.

    Parameters
    ----------
    in_hw : (H, W)
    kernel : (k_h, k_w), already dilated
    padding : (top, bottom, left, right)
    torus : (T_h, T_w), optional
        At least ``(max(H + max(p_t, p_b), H_out, k_h), …)``; larger tori (e.g. FFT-friendly
        sizes) are exact too but give a larger boundary and ring.
    """
    (H, W), (kh, kw) = in_hw, kernel
    pt, pb, pl, pr = padding
    Ho, Wo = H + pt + pb - kh + 1, W + pl + pr - kw + 1
    if Ho < 1 or Wo < 1:
        raise ValueError(f"padded_torus: kernel {kh}x{kw} larger than the padded input "
                         f"{H + pt + pb}x{W + pl + pr} (padding={padding})")
    need = (max(H + max(pt, pb), Ho, kh), max(W + max(pl, pr), Wo, kw))
    if torus is None:
        torus = need
    torus = (int(torus[0]), int(torus[1]))
    if torus[0] < need[0] or torus[1] < need[1]:
        raise ValueError(f"padded_torus: torus={torus} is too small for this conv; it needs at least {need} "
                         "(T_h ≥ max(H + max(top, bottom), H_out, k_h), likewise for the width)")
    Th, Tw = torus
    rows = (np.arange(Ho) - pt + kh - 1) % Th
    cols = (np.arange(Wo) - pl + kw - 1) % Tw
    out_mask = np.ones((Th, Tw), dtype=bool)
    out_mask[np.ix_(rows, cols)] = False
    ring_mask = np.ones((Th, Tw), dtype=bool)
    ring_mask[:H, :W] = False
    return PaddedTorus((H, W), (Ho, Wo), (kh, kw), tuple(padding), torus, rows, cols,  # type: ignore[arg-type]
                       np.flatnonzero(out_mask), np.flatnonzero(ring_mask))


def effective_kernel(weight: torch.Tensor, dilation: tuple[int, int] = (1, 1), groups: int = 1) -> torch.Tensor:
    """The dense, undilated ``(C_out, C_in, k_h', k_w')`` kernel of a dilated / grouped conv.

    Dilation inserts ``d − 1`` zeros between taps (``k' = d (k − 1) + 1``); groups place each
    group's ``(C_out/g, C_in/g)`` kernel on the block diagonal.  Both are exact rewrites.
    """
    c_out, cig, kh, kw = weight.shape
    dh, dw = dilation
    w = weight
    if (dh, dw) != (1, 1):
        w = weight.new_zeros((c_out, cig, dh * (kh - 1) + 1, dw * (kw - 1) + 1))
        w[:, :, ::dh, ::dw] = weight
    if groups > 1:
        cog = c_out // groups
        full = w.new_zeros((c_out, cig * groups) + tuple(w.shape[2:]))
        for g in range(groups):  # a handful of groups: block copies, not a per-entry loop
            full[g * cog:(g + 1) * cog, g * cig:(g + 1) * cig] = w[g * cog:(g + 1) * cog]
        w = full
    return w


def channel_mode(c_out: int, c_in: int, n_out: int, n_in: int) -> str:
    """The paper's channel rule (§3.2 a/b); square channel counts follow W's shape."""
    if c_out != c_in:
        return "MDP" if c_out < c_in else "CCP"
    return "MDP" if n_out <= n_in else "CCP"


def block_sizes(c_out: int, c_in: int, geo: PaddedTorus, n_ring: int | None = None) -> tuple[str, int, int]:
    """(MDP/CCP, |B|·C_out, number of constrained ring entries — default |P|·C_in)."""
    (H, W), (Ho, Wo) = geo.in_hw, geo.out_hw
    mode = channel_mode(c_out, c_in, c_out * Ho * Wo, c_in * H * W)
    return mode, int(geo.boundary.size) * c_out, int(geo.ring.size) * c_in if n_ring is None else int(n_ring)


def peak_bytes(mode: str, mB: int, mP: int, itemsize: int) -> int:
    mf, ms = (mB, mP) if mode == "MDP" else (mP, mB)  # first (definite) block, Schur block
    # stage peaks: gather + Cholesky of the first block; the coupling block and its
    # triangular solve; the Schur complement (in place) and its factor.
    peak = max(2 * mf * mf, mf * mf + 2 * mf * ms, mf * mf + mf * ms + 2 * ms * ms)
    return int(itemsize * peak * 1.05)


def padded_conv_bytes(out_channels: int, in_channels: int, in_hw: tuple[int, int], kernel: Any,
                      padding: Any = 0, dilation: Any = 1, torus: tuple[int, int] | None = None,
                      itemsize: int = 8, support: np.ndarray | None = None,
                      fixed_zero: np.ndarray | None = None) -> int:
    """Peak bytes of :class:`PaddedConvSolver`'s capacitance factorisation.

    ``m = |B|·C_out + |P|·C_in``; the factors keep ``m_f² + m_f m_s + m_s²`` entries
    (first block, coupling, Schur block), the peak is reached while the Schur complement
    is factored.  E.g. a 64→32 3×3 ``'same'`` conv at 32×32: ``|B| = |P| = 65``,
    ``m = 6240``, about 0.4 GB.

    Parameters
    ----------
    out_channels, in_channels : int
    in_hw : (H, W)
    kernel : int or (k_h, k_w)
    padding : int, pair, 4-tuple or ``'same'``/``'valid'``
    dilation : int or pair
    torus : optional torus size (default the smallest)
    itemsize : bytes per entry (8 for float64)
    support, fixed_zero : optional structural kernel support (C_in, k_h', k_w') of the dilated
        kernel and fixed-zero image entries (C_in, H, W), as :func:`ring_entries`; without
        them every ring entry is counted (an upper bound).
    """
    k = pair(kernel, "kernel")
    d = pair(dilation, "dilation")
    pad = parse_padding(padding, k, d, (1, 1))
    keff = (d[0] * (k[0] - 1) + 1, d[1] * (k[1] - 1) + 1)
    geo = padded_torus((int(in_hw[0]), int(in_hw[1])), keff, pad, torus)
    n_ring = None
    if support is not None or fixed_zero is not None:
        sup = np.ones((int(in_channels),) + keff, dtype=bool) if support is None else np.asarray(support, dtype=bool)
        mode = block_sizes(int(out_channels), int(in_channels), geo)[0]
        ring, bnd = ring_entries(geo, sup, fixed_zero, mode)
        return peak_bytes(mode, bnd.size * int(out_channels), ring.size, itemsize)
    mode, mB, mP = block_sizes(int(out_channels), int(in_channels), geo, n_ring)
    return peak_bytes(mode, mB, mP, itemsize)


def _taps_or(masks: np.ndarray, support: np.ndarray, sign: int) -> np.ndarray:
    """``OR_{u ∈ support_c} masks_c[p + sign·(k − 1 − u)]`` per channel (loop over taps, ≤ k_h k_w)."""
    _, kh, kw = support.shape
    out = np.zeros(masks.shape, dtype=bool)
    for u in range(kh):
        for v in range(kw):
            sel = support[:, u, v]
            if sel.any():
                out[sel] |= np.roll(masks[sel], (-sign * (kh - 1 - u), -sign * (kw - 1 - v)), axis=(1, 2))
    return out


def ring_entries(geo: PaddedTorus, support: np.ndarray, fixed_zero: np.ndarray | None = None,
                 mode: str = "MDP") -> tuple[np.ndarray, np.ndarray]:
    """The constrained input entries and the boundary: ``(ring, boundary)``, both ascending.

    ``ring``: flat indices ``c·T_h T_w + p`` of the input entries held at zero; ``boundary``:
    torus positions whose output is free.  An entry must be zero when it is outside the image
    (the ring ``P``) or marked in ``fixed_zero`` (C_in, H, W).  With the kernel support
    ``support`` (C_in, k_h, k_w; output position ``t`` reads input ``t − (k − 1) + u``):

    * MDP: such an entry that no valid output reads is a zero column of ``S C``: the minimum-
      norm solution leaves it at zero, so its constraint is dropped (exact) — e.g. the phase
      channels of a strided conv whose phase kernel never reaches the padding;
    * CCP: every entry that no valid output reads — ring or image — is constrained instead
      (a zero column would make the least-squares problem singular; zero is its min-norm value);
    * a valid output that reads no free entry is a zero row of ``W``: ``W⁺`` ignores it, so
      it joins the boundary (its residual is free) — exact, and W's rank is kept.
    """
    (H, W), (Th, Tw) = geo.in_hw, geo.torus
    C = int(support.shape[0])
    valid = np.zeros((Th, Tw), dtype=bool)
    valid[np.ix_(geo.rows, geo.cols)] = True
    constrained = np.ones((C, Th, Tw), dtype=bool)
    constrained[:, :H, :W] = False if fixed_zero is None else fixed_zero
    reached = _taps_or(np.broadcast_to(valid, (C, Th, Tw)), support, +1)
    ring = constrained & reached if mode == "MDP" else constrained | ~reached
    reads_free = _taps_or(~constrained, support, -1).any(axis=0)
    boundary = np.flatnonzero(~valid | ~reads_free)
    return np.flatnonzero(ring), boundary


def gather(q: torch.Tensor, rows: tuple[np.ndarray, np.ndarray], cols: tuple[np.ndarray, np.ndarray],
           torus: tuple[int, int], row_chunk: int) -> torch.Tensor:
    """Explicit block ``M[(i, p), (j, p')] = q_ij(p − p')`` of a block-circulant operator.

    ``q`` (p, r, T_h·T_w) is its spatial kernel (``F⁻¹`` of the per-frequency matrices);
    ``rows`` / ``cols`` are ``(channels, flat torus positions)`` pairs.  The distinct row and
    column positions give a small table of torus differences; each chunk of ``row_chunk`` rows
    is one flat ``take`` over every column channel at the distinct column positions, then the
    requested columns (bounded temporary memory: ``row_chunk · r · #positions`` entries).
    """
    Th, Tw = torus
    (ci, pi), (cj, pj) = rows, cols
    out = torch.empty((ci.size, cj.size), dtype=q.dtype, device=q.device)
    if out.numel() == 0:
        return out
    ur, ri = np.unique(pi, return_inverse=True)
    uc, cx = np.unique(pj, return_inverse=True)
    (rr, rc), (cr, cc) = np.divmod(ur, Tw), np.divmod(uc, Tw)
    diff = ((rr[:, None] - cr[None, :]) % Th) * Tw + (rc[:, None] - cc[None, :]) % Tw  # (#row pos, #col pos)
    r_, T2 = int(q.shape[1]), int(q.shape[2])
    dev = q.device
    D = torch.as_tensor(diff, device=dev)
    base_c = (torch.arange(r_, device=dev) * T2)[None, :, None]
    cols_all = np.asarray(cj, dtype=np.int64) * uc.size + cx.reshape(-1)  # (channel, column position) → flat
    structured = cols_all.size == r_ * uc.size and bool((cols_all == np.arange(cols_all.size)).all())
    csel = None if structured else torch.as_tensor(cols_all, device=dev)
    qf = q.reshape(-1)
    CI = torch.as_tensor(np.asarray(ci, dtype=np.int64) * (r_ * T2), device=dev)
    RI = torch.as_tensor(ri.reshape(-1), device=dev)
    step = max(1, int(row_chunk))
    for i0 in range(0, ci.size, step):  # loop over row chunks, not entries
        i1 = min(ci.size, i0 + step)
        idx = CI[i0:i1, None, None] + base_c + D[RI[i0:i1]][:, None, :]  # (k, r, #col pos)
        blk = qf[idx].reshape(i1 - i0, -1)
        out[i0:i1] = blk if csel is None else blk[:, csel]
    return out


def all_channels(channels: int, positions: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``(channel, position)`` pairs of every channel at ``positions``, ordered (channel, position)."""
    return np.repeat(np.arange(channels), positions.size), np.tile(positions, channels)


def conv_geometry(weight: Any, in_shape: Any, padding: Any, dilation: Any, groups: Any, stride: Any,
                  who: str = "PaddedConvSolver", allow_stride: bool = False) -> tuple:
    """Normalise ``(weight, in_shape, padding, dilation, groups, stride)`` from a Conv2d or arguments.

    ``weight`` is either a :class:`~linop.operators.Conv2d` (then ``in_shape`` must be None and
    its geometry is used) or a ``(C_out, C_in/groups, k_h, k_w)`` array.  Returns the float
    torch weight, ``(C_in, H, W)``, the 4-sided padding, the dilation and stride pairs and
    ``groups``.  ``who`` names the caller in errors; ``allow_stride=False`` refuses stride ≠ 1.
    """
    if hasattr(weight, "weight") and hasattr(weight, "in_shape"):
        op = weight
        if in_shape is not None:
            raise ValueError(f"{who}: pass either a Conv2d operator or weight + in_shape, not both")
        w, in_shape = backend.to_torch(op.weight), tuple(op.in_shape)
        padding = tuple(getattr(op, "padding", (0, 0, 0, 0)))
        dilation, groups, stride = getattr(op, "dilation", 1), int(getattr(op, "groups", 1)), getattr(op, "stride", 1)
    else:
        if in_shape is None:
            raise ValueError(f"{who}: in_shape (C_in, H, W) is required with a bare weight")
        w = backend.to_torch(weight)
    if w.ndim != 4:
        raise ValueError(f"{who}: weight must be (C_out, C_in/groups, k_h, k_w), got {tuple(w.shape)}")
    if not w.is_floating_point():
        w = w.to(torch.float64)
    in_shape = tuple(int(s) for s in in_shape)
    if len(in_shape) != 3:
        raise ValueError(f"{who}: in_shape must be (C_in, H, W), got {in_shape}")
    if isinstance(groups, bool) or int(groups) < 1:
        raise ValueError(f"{who}: groups must be a positive int, got {groups!r}")
    groups = int(groups)
    c_out, cig, kh, kw = (int(s) for s in w.shape)
    if c_out % groups or cig * groups != in_shape[0]:
        raise ValueError(f"{who}: in_shape {in_shape} has {in_shape[0]} channels, the weight expects "
                         f"C_in/groups={cig} x groups={groups}, with C_out={c_out} divisible by groups")
    stride, dilation = pair(stride, "stride"), pair(dilation, "dilation")
    if stride != (1, 1) and not allow_stride:
        raise NotImplementedError(
            f"{who}: stride={stride} is not supported (stride 1 only). Use ExactConvSolver / "
            "solve(method='fft-exact') (polyphase, exact), or method='cg' (exact, any stride)")
    padding = parse_padding(padding, (kh, kw), dilation, stride)
    return w, in_shape, padding, dilation, groups, stride
