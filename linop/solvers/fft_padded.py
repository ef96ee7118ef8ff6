"""Exact reverse step of a *padded* stride-1 convolution: FFT + ring/boundary capacitance.

Beyond seed 001 §3.2 (which covers stride 1 without padding, Eqs. 8–20) and beyond
:mod:`linop.solvers.capacitance` (``fft-exact``, unpadded only).  We compute the exact
minimum-norm correction ``δ* = W⁺ r`` (so ``a* = â + δ*``, ``r = z* − b − W â``; the MDP
Eqs. 4–6 when W has full row rank, the CCP Eq. 7 when it has full column rank) for a
convolution with any zero padding ``(top, bottom, left, right)`` — int, pair, 4-sided or
``'same'`` — by FFTs plus one small boundary system factored once per layer.

**The torus.**  Put the ``H × W`` input at the top-left corner of a ``T_h × T_w`` torus and
let ``C`` be the circular convolution with the flipped kernel ``K̃`` (Eq. 10) zero-padded to
the torus (one ``C_out × C_in`` matrix ``K̂(ω)`` per frequency, Eq. 12).  Output ``o`` of the
padded conv reads the input rows ``o − p_t + k`` (``k < k_h``), and ``(C a)[p]`` reads the
torus rows ``p − k_h + 1 + k``, so output ``o`` is torus position ``p = o − p_t + k_h − 1
(mod T_h)``.  With ``T_h ≥ H + max(p_t, p_b)`` every out-of-image row read (``[−p_t, −1]``
and ``[H, H + p_b − 1]``) lands on a torus row ``≥ H`` that holds no input, i.e. on a zero,
and with ``T_h ≥ H_out`` the outputs sit at distinct positions (same for columns).  Hence,
exactly,

    W = S C E,

``E`` the zero embedding of the input (``E Eᵀ = I − E_P E_Pᵀ``, ``P`` the *ring*: the
``T_h T_w − H W`` torus positions outside the image) and ``S`` the selection of the valid
output positions ``V`` (its complement ``B``, the *boundary*: ``T_h T_w − H_out W_out``
positions).  The default torus is the smallest one, ``T_h = max(H + max(p_t, p_b), H_out,
k_h)``: for a 3×3 ``'same'`` conv that is ``(H + 1) × (W + 1)``, so ``|B| = |P| = H + W + 1``
(the padding rows ``−1`` and ``H`` share one torus row).

**Lifting** (Tikhonov form, exact at ``λ = 0``).  For ``λ ≥ 0`` the problem
``min_a ‖W a − r‖² + λ ‖a‖²`` is, on the torus, ``min ‖C a − Sᵀ r − E_B s‖² + λ ‖a‖²`` over
``a`` with ``E_Pᵀ a = 0`` and free boundary outputs ``s`` (minimising over ``s`` gives
back ``‖S C a − r‖²``).  Its KKT conditions, with a multiplier ``μ`` on the ring, give
``a = R c + Z E_P μ`` (``c = Sᵀ r + E_B s``) and two block equations on ``B ∪ P`` only::

    [ −Q_BB   (Rᵀ)_BP ] [ s ]   [  (Q Sᵀ r)_B ]         Q = λ (C Cᵀ + λ)⁻¹
    [  R_PB    Z_PP   ] [ μ ] = [ −(R Sᵀ r)_P ]         R = Cᵀ (C Cᵀ + λ)⁻¹ = (Cᵀ C + λ)⁻¹ Cᵀ
                                                         Z = (Cᵀ C + λ)⁻¹

(the first row says the residual vanishes on ``B``, the second that ``a`` vanishes on ``P``).
``Q``, ``R``, ``Z`` are block-circulant: from the SVD ``K̂ = U diag(σ_ω) Vᴴ`` their
spectra are ``I − U σ²/(σ²+λ) Uᴴ``, ``V σ/(σ²+λ) Uᴴ``, ``V 1/(σ²+λ) Vᴴ (+ λ⁻¹(I − V Vᴴ))``.
A symmetric rescaling (``μ → λ μ`` in the MDP, both by ``s_max``) makes the ``λ → 0`` limit
finite, so one code path serves both cases:

* MDP (``C_out ≤ C_in``): ``A = s_max² (C Cᵀ + λ)⁻¹ → s_max² (C Cᵀ)⁻¹`` (SPD) and
  ``Z_s = λ Z → I − C⁺ C`` (PSD) — at ``λ = 0`` this is the KKT system of Eq. 6 lifted to the
  torus: the Schur complement on ``B`` of ``(C Cᵀ)⁻¹`` (as in ``fft-exact``) bordered by the
  ring constraints.
* CCP (``C_out > C_in``): ``A = Q → I − C C⁺`` (PSD) and ``Z_s = s_max² Z → s_max² (Cᵀ C)⁻¹``
  (SPD) — Woodbury for ``Wᵀ W = Eᵀ Cᵀ (I − E_B E_Bᵀ) C E`` restricted to the image.

In both, with ``G = s_max R`` and ``r̃ = r / s_max``, the system is symmetric
*quasi-definite*::

    [ −A_BB   Gᵀ_BP ] [ x_B ]   [  (A Sᵀ r̃)_B ]
    [  G_PB   Z_s,PP] [ x_P ] = [ −(G Sᵀ r̃)_P ],       a = G (Sᵀ r̃ + E_B x_B) + Z_s E_P x_P,

and ``δ = Eᵀ a`` (the image part; ``a`` vanishes on the ring).  It is factored by block
Cholesky: the definite block first (``L₁L₁ᵀ = A_BB`` in the MDP, ``Z_s,PP`` in the CCP), then
the Schur complement of the other block (``Z_s,PP + XᵀX`` with ``X = L₁⁻¹ Gᵀ_BP``, resp.
``A_BB + YᵀY`` with ``Y = L₁⁻¹ G_PB``) — SPD exactly when W has full row (MDP) / column (CCP)
rank.  With no padding (``P = ∅``) this is the ``fft-exact`` capacitance system.

**Singular cases.**  If some ``K̂(ω)`` is numerically rank deficient, or the Schur
complement is not positive definite (W itself rank deficient, or the channel rule
disagrees with W's shape, e.g. padding ≥ kernel size), we factor at ``λ = reg · s_max² > 0``
(both diagonal blocks then SPD: always factorable) and run iterated Tikhonov
``δ ← δ + T_λ (r − W δ)``, which converges to ``W⁺ r`` (error factor ``λ/(σ² + λ)`` per step
on each singular value σ of W; null-space directions are never excited); the number of
steps is reported.

**Accuracy.**  The lifted system is of normal-equations type (its Schur complement carries
``XᵀX``): the direct solve's relative error grows like ``eps·cond(W)²`` (measured 3e-5 for a
square 'same' layer with ``cond(W) = 4e6``; ≤ 1e-13 for the benchmark layers).  When the
LAPACK condition estimate says ``eps·cond > 1e-12``, iterative refinement
``δ ← δ + T (r − W δ)`` (the same iteration as above, ``λ = 0``) brings it to the pinv's own
``eps·cond(W)`` level in one to four steps.

**Cost.**  ``m = |B|·C_out + |P|·C_in`` unknowns: the blocks are *gathered* from one inverse
FFT of each spectrum (``Q_BB[(i,b),(j,c)] = q_ij(p_b − p_c)``), factored once per layer
(``O(m³)``), and each batch costs two FFT round trips over ``C_out + C_in`` channels, two
per-frequency products and triangular solves with ``m`` rows (``2 m²`` flops a sample).
Where the blocks would exceed the byte budget the solver falls back to Fourier-preconditioned
CG (``fft-pcg`` style: Craig on ``W Wᵀ`` with ``S (C Cᵀ)⁻¹ Sᵀ``, resp. CGLS with
``Eᵀ (Cᵀ C)⁻¹ E``), exact to its tolerance; the iterations are reported.

**Coverage.**  Stride 1 with any zero padding; dilation (the kernel is dilated into a
larger sparse kernel — exact, the boundary grows with the dilated size) and groups (the
kernel is expanded to its block-diagonal full form — exact, the per-frequency block structure
is not exploited yet).  Stride ≠ 1 raises ``NotImplementedError`` (polyphase: future work).
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from scipy.linalg import lapack

from .. import backend
from ..operators.conv import Conv2d, pair, parse_padding
from .fft import FFTConvSolver, small_lapack
from .iterative import cgls, craig
from .result import DEFAULT_MAX_BYTES

__all__ = ["PaddedConvSolver", "PaddedTorus", "QuasiDefiniteFactor", "effective_kernel", "padded_conv_bytes",
           "padded_pcg", "padded_torus"]

_METHODS = ("auto", "capacitance", "pcg")
#: A factor whose condition estimate exceeds this (eps·cond > 1e-2) is treated as singular:
#: exactly rank-deficient W measured cond_est ≈ 1e16–6e16; a full-rank W with cond(W) = 4e6
#: measured 4e12 (and is refined to ~eps·cond(W)).
_SINGULAR_COND = 1e-2 / np.finfo(np.float64).eps


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


def _mode(c_out: int, c_in: int, n_out: int, n_in: int) -> str:
    """The paper's channel rule (§3.2 a/b); square channel counts follow W's shape."""
    if c_out != c_in:
        return "MDP" if c_out < c_in else "CCP"
    return "MDP" if n_out <= n_in else "CCP"


def _block_sizes(c_out: int, c_in: int, geo: PaddedTorus) -> tuple[str, int, int]:
    (H, W), (Ho, Wo) = geo.in_hw, geo.out_hw
    mode = _mode(c_out, c_in, c_out * Ho * Wo, c_in * H * W)
    return mode, int(geo.boundary.size) * c_out, int(geo.ring.size) * c_in


def _peak_bytes(mode: str, mB: int, mP: int, itemsize: int) -> int:
    mf, ms = (mB, mP) if mode == "MDP" else (mP, mB)  # first (definite) block, Schur block
    # stage peaks: gather + Cholesky of the first block; the coupling block and its
    # triangular solve; the Schur complement (in place) and its factor.
    peak = max(2 * mf * mf, mf * mf + 2 * mf * ms, mf * mf + mf * ms + 2 * ms * ms)
    return int(itemsize * peak * 1.05)


def padded_conv_bytes(out_channels: int, in_channels: int, in_hw: tuple[int, int], kernel: Any,
                      padding: Any = 0, dilation: Any = 1, torus: tuple[int, int] | None = None,
                      itemsize: int = 8) -> int:
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
    """
    k = pair(kernel, "kernel")
    d = pair(dilation, "dilation")
    pad = parse_padding(padding, k, d, (1, 1))
    keff = (d[0] * (k[0] - 1) + 1, d[1] * (k[1] - 1) + 1)
    geo = padded_torus((int(in_hw[0]), int(in_hw[1])), keff, pad, torus)
    mode, mB, mP = _block_sizes(int(out_channels), int(in_channels), geo)
    return _peak_bytes(mode, mB, mP, itemsize)


def _gather(q: torch.Tensor, rows: np.ndarray, cols: np.ndarray, torus: tuple[int, int],
            row_chunk: int) -> torch.Tensor:
    """Explicit block ``M[(i, b), (j, c)] = q_ij(p_b − p_c)`` of a block-circulant operator.

    ``q`` (p, r, T_h·T_w) is its spatial kernel (``F⁻¹`` of the per-frequency matrices),
    ``rows`` / ``cols`` flat torus positions; returns ``(p·|rows|, r·|cols|)`` ordered
    (channel, position).  Built ``row_chunk`` rows at a time (bounded temporary memory).
    """
    Th, Tw = torus
    p, r = int(q.shape[0]), int(q.shape[1])
    nb, nc = rows.size, cols.size
    out = torch.empty((p * nb, r * nc), dtype=q.dtype, device=q.device)
    if out.numel() == 0:
        return out
    rr, rc = np.divmod(rows, Tw)
    cr, cc = np.divmod(cols, Tw)
    diff = ((rr[:, None] - cr[None, :]) % Th) * Tw + (rc[:, None] - cc[None, :]) % Tw
    D = torch.as_tensor(diff, device=q.device)
    step = max(1, row_chunk // max(nb, 1))
    for i0 in range(0, p, step):  # loop over channel chunks, not entries
        i1 = min(p, i0 + step)
        blk = q[i0:i1][:, :, D]  # (ib, r, nb, nc)
        out[i0 * nb:i1 * nb] = blk.permute(0, 2, 1, 3).reshape((i1 - i0) * nb, r * nc)
    return out


def _cond_est(L: torch.Tensor, anorm: float) -> float:
    """LAPACK ``pocon`` 1-norm condition estimate of ``L Lᵀ`` (CPU only; nan elsewhere)."""
    if L.numel() == 0:
        return 1.0
    if L.device.type != "cpu":
        return float("nan")
    with small_lapack():  # O(m²) BLAS-2: threads only add contention
        rc, inf = lapack.dpocon(L.detach().to(torch.float64).numpy().T, anorm, uplo="U")
    return float(1.0 / rc) if (inf == 0 and rc > 0) else float("inf")


# --------------------------------------------------------------------------- the solver
class QuasiDefiniteFactor:
    """Block Cholesky of the symmetric quasi-definite ``[[−A_BB, Gᵀ_BP], [G_PB, Z_s,PP]]``.

    ``definite_first="B"`` (MDP): ``L₁L₁ᵀ = A_BB``, ``X = L₁⁻¹ Gᵀ_BP``, ``L₂L₂ᵀ = Z_s,PP + XᵀX``;
    ``"P"`` (CCP): ``L₁L₁ᵀ = Z_s,PP``, ``X = L₁⁻¹ G_PB``, ``L₂L₂ᵀ = A_BB + XᵀX``.  ``ok`` is False
    when a Cholesky fails (the Schur complement is not SPD: W rank deficient in that case).

    Parameters
    ----------
    first : tensor, the definite diagonal block (consumed)
    coupling, second : callables returning the coupling block (rows of ``first``) and the
        other diagonal block, built only once the first factor succeeded (bounded peak memory)
    definite_first : "B" or "P"
    """

    def __init__(self, first: torch.Tensor, coupling: Any, second: Any, definite_first: str):
        self.order = definite_first
        self.ok, self.cond_est = False, (float("nan"), float("nan"))
        n1 = float(first.abs().sum(0).max()) if first.numel() else 0.0  # 1-norm (symmetric)
        # torch's LAPACK Cholesky (MKL): measured ~5x faster than scipy's OpenBLAS potrf here
        L1, info = torch.linalg.cholesky_ex(first)
        del first
        if int(info) != 0:
            return
        X = torch.linalg.solve_triangular(L1, coupling(), upper=False)  # L₁⁻¹ (coupling)
        Sch = second()
        Sch.addmm_(X.T, X)  # the Schur complement, in place
        n2 = float(Sch.abs().sum(0).max()) if Sch.numel() else 0.0
        L2, info = torch.linalg.cholesky_ex(Sch)
        del Sch
        if int(info) != 0:
            return
        self.L1, self.X, self.L2 = L1, X, L2
        self.cond_est = (_cond_est(L1, n1), _cond_est(L2, n2))
        self.ok = True

    def solve(self, bB: torch.Tensor, bP: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(x_B, x_P)`` for (N, m_B), (N, m_P) right-hand sides: triangular solves (BLAS-3)."""
        tri = torch.linalg.solve_triangular
        L1, X, L2 = self.L1, self.X, self.L2
        if self.order == "B":  # w = L₁⁻¹b_B; x_P = (Z_s + XᵀX)⁻¹(b_P + Xᵀw); x_B = L₁⁻ᵀ(X x_P − w)
            w = tri(L1, bB.T, upper=False)
            xP = tri(L2.T, tri(L2, bP.T + X.T @ w, upper=False), upper=True)
            xB = tri(L1.T, X @ xP - w, upper=True)
        else:  # w = L₁⁻¹b_P; x_B = (A + XᵀX)⁻¹(Xᵀw − b_B); x_P = L₁⁻ᵀ(w − X x_B)
            w = tri(L1, bP.T, upper=False)
            xB = tri(L2.T, tri(L2, X.T @ w - bB.T, upper=False), upper=True)
            xP = tri(L1.T, w - X @ xB, upper=True)
        return xB.T, xP.T


class PaddedConvSolver:
    """Exact ``W⁺`` of a padded stride-1 conv via FFT + ring/boundary capacitance, factored once.

    Parameters
    ----------
    weight : (C_out, C_in / groups, k_h, k_w) array / tensor, or a :class:`~linop.operators.Conv2d`
        The network's kernel, or the operator (then its geometry is used and ``in_shape``,
        ``padding``, ``dilation``, ``groups``, ``stride`` must not be given).
    in_shape : (C_in, H, W)
    padding : int, (p_h, p_w), (top, bottom, left, right), ``'same'`` or ``'valid'``
    dilation : int or pair
    groups : int
    stride : must be 1 (``NotImplementedError`` otherwise)
    torus : (T_h, T_w), optional
        Torus size (default: the smallest exact one, see :func:`padded_torus`).
    method : {"auto", "capacitance", "pcg"}
        ``auto``: the capacitance factorisation when :func:`padded_conv_bytes` ≤ ``max_bytes``,
        else Fourier-preconditioned CG.  ``capacitance`` raises ``MemoryError`` over budget.
    rcond : float
        A frequency whose smallest singular value is below ``rcond · s_max`` is singular;
        then the Tikhonov lifting (``λ = reg · s_max²``) with refinement is used.
    reg : float
        Relative Tikhonov shift of that fallback (and of the PCG preconditioners).  Rounding
        leaves a null-space component of about ``eps / reg`` relative; each refinement step
        contracts by ``λ / (σ_min(W)² + λ)``.
    max_bytes : int
        Memory budget of the capacitance factorisation.
    refine : "auto", True or False
        Iterative refinement after the direct solve (each step one conv and one more solve).
        The capacitance system is of normal-equations type, so the direct solve's error grows
        like ``eps·cond(W)²``; ``"auto"`` refines when ``eps·cond_est > 1e-12``.
    device, dtype : where the factors and spectra live (float64 for exactness).
    row_chunk : rows per gather chunk while building the blocks.

    Notes
    -----
    The maths and its equations are in the module docstring.  ``solve(r)`` returns
    ``δ = W⁺ r``; the reconstruction is ``a* = â + δ`` with ``r = z* − b − W â``.
    """

    def __init__(self, weight: Any, in_shape: tuple[int, int, int] | None = None, padding: Any = 0,
                 dilation: Any = 1, groups: int = 1, stride: Any = 1, torus: tuple[int, int] | None = None,
                 method: str = "auto", rcond: float = 1e-10, reg: float = 1e-6,
                 max_bytes: int = DEFAULT_MAX_BYTES, refine: bool | str = "auto", device: torch.device | str = "cpu",
                 dtype: torch.dtype = torch.float64, row_chunk: int = 1024):
        t0 = time.perf_counter()
        w, in_shape, padding, dilation, groups, stride = self._geometry(weight, in_shape, padding, dilation,
                                                                        groups, stride)
        if method not in _METHODS:
            raise ValueError(f"PaddedConvSolver: method must be one of {_METHODS}, got {method!r}")
        if not (0 < rcond < 1) or not (0 < reg < 1):
            raise ValueError(f"PaddedConvSolver: rcond and reg must be in (0, 1), got rcond={rcond!r}, reg={reg!r}")
        self.weight = w.detach().to(device=device, dtype=dtype)
        self.padding, self.dilation, self.groups = padding, dilation, groups
        weff = effective_kernel(self.weight, dilation, groups)
        C_out, C_in, kh, kw = (int(s) for s in weff.shape)
        _, H, W = in_shape
        self.geo = padded_torus((H, W), (kh, kw), padding, torus)
        Ho, Wo = self.geo.out_hw
        self.C_in, self.C_out, self.H, self.W = C_in, C_out, H, W
        self.in_shape, self.out_shape = (C_in, H, W), (C_out, Ho, Wo)
        self.torus = self.geo.torus
        self.device, self.dtype = torch.device(device), dtype
        # the circular conv C on the torus (spectra + per-frequency SVDs) — the paper's machinery
        self.fs = FFTConvSolver(weff, (C_in,) + self.torus, reg=reg, device=device, dtype=dtype)
        # the direct conv, for residuals (refinement, PCG): same W, no FFT round trips
        self._op = Conv2d(self.weight.cpu(), in_shape, padding=padding, dilation=dilation, groups=groups)
        self.case, self.mB, self.mP = _block_sizes(C_out, C_in, self.geo)
        self.m = self.mB + self.mP
        self.need_bytes = _peak_bytes(self.case, self.mB, self.mP, torch.finfo(dtype).bits // 8)
        Un, sn, Vhn = self.fs._svd
        self.s_max = float(sn.max()) if sn.size else 0.0
        if self.s_max == 0.0:
            raise ValueError("PaddedConvSolver: the conv kernel is identically zero (W = 0)")
        self.singular_freqs = int((sn[..., -1] <= rcond * self.s_max).sum())
        self._B = torch.as_tensor(self.geo.boundary, device=self.device)
        self._P = torch.as_tensor(self.geo.ring, device=self.device)
        self._rows = torch.as_tensor(self.geo.rows, device=self.device)
        self._cols = torch.as_tensor(self.geo.cols, device=self.device)
        self.reg, self.lam, self.cond_est = reg, 0.0, (float("nan"), float("nan"))
        if method == "capacitance" and self.need_bytes > max_bytes:
            raise MemoryError(
                f"PaddedConvSolver: the capacitance system is {self.m}x{self.m} ({self.geo.boundary.size} boundary "
                f"x {C_out} out + {self.geo.ring.size} ring x {C_in} in channels) and needs about "
                f"{self.need_bytes / 2**30:.2f} GiB > max_bytes {max_bytes / 2**30:.2f} GiB. Use method='pcg' "
                "(exact, iterative, O(batch) memory), or raise max_bytes="
            )
        self.method = "capacitance" if (method == "capacitance" or
                                        (method == "auto" and self.need_bytes <= max_bytes)) else "pcg"
        if self.method == "capacitance":
            self.lam = 0.0 if self.singular_freqs == 0 else reg * self.s_max**2
            ok = self._factor(Un, sn, Vhn, row_chunk)
            if ok and self.lam == 0.0 and max(self.cond_est) > _SINGULAR_COND:
                ok = False  # Cholesky passed on rounding alone: the Schur complement is singular
            if not ok and self.lam == 0.0:  # K̂ invertible per frequency but W itself is not of full rank
                self.lam = reg * self.s_max**2
                ok = self._factor(Un, sn, Vhn, row_chunk)
            if not ok:
                raise np.linalg.LinAlgError(
                    f"PaddedConvSolver: the regularised capacitance system ({self.m}x{self.m}, λ={self.lam:.3e}) "
                    "is not quasi-definite in floating point; use method='pcg'")
        if refine not in ("auto", True, False):
            raise ValueError(f"PaddedConvSolver: refine must be 'auto', True or False, got {refine!r}")
        # eps·cond(capacitance) overestimates the direct solve's relative error by ~10–100x
        # (measured); above 1e-12 one or two refinement steps bring it to ~eps·cond(W).
        self.refine = (bool(refine) if refine != "auto" else
                       self.method == "capacitance" and np.finfo(np.float64).eps * max(self.cond_est) > 1e-12)
        self.factor_seconds = time.perf_counter() - t0

    # ------------------------------------------------------------------ construction
    @staticmethod
    def _geometry(weight, in_shape, padding, dilation, groups, stride):
        """Normalise (weight, geometry) from a Conv2d operator or explicit arguments."""
        if hasattr(weight, "weight") and hasattr(weight, "in_shape"):
            op = weight
            if in_shape is not None:
                raise ValueError("PaddedConvSolver: pass either a Conv2d operator or weight + in_shape, not both")
            w, in_shape = backend.to_torch(op.weight), tuple(op.in_shape)
            padding = tuple(getattr(op, "padding", (0, 0, 0, 0)))
            dilation, groups, stride = getattr(op, "dilation", 1), int(getattr(op, "groups", 1)), getattr(op, "stride", 1)
        else:
            if in_shape is None:
                raise ValueError("PaddedConvSolver: in_shape (C_in, H, W) is required with a bare weight")
            w = backend.to_torch(weight)
        if w.ndim != 4:
            raise ValueError(f"PaddedConvSolver: weight must be (C_out, C_in/groups, k_h, k_w), got {tuple(w.shape)}")
        if not w.is_floating_point():
            w = w.to(torch.float64)
        in_shape = tuple(int(s) for s in in_shape)
        if len(in_shape) != 3:
            raise ValueError(f"PaddedConvSolver: in_shape must be (C_in, H, W), got {in_shape}")
        if isinstance(groups, bool) or int(groups) < 1:
            raise ValueError(f"PaddedConvSolver: groups must be a positive int, got {groups!r}")
        groups = int(groups)
        c_out, cig, kh, kw = (int(s) for s in w.shape)
        if c_out % groups or cig * groups != in_shape[0]:
            raise ValueError(f"PaddedConvSolver: in_shape {in_shape} has {in_shape[0]} channels, the weight expects "
                             f"C_in/groups={cig} x groups={groups}, with C_out={c_out} divisible by groups")
        stride, dilation = pair(stride, "stride"), pair(dilation, "dilation")
        if stride != (1, 1):
            raise NotImplementedError(
                f"PaddedConvSolver: stride={stride} is not supported (stride 1 only; the polyphase extension is "
                "future work). Use method='cg' or 'lsmr' (exact, any stride)")
        padding = parse_padding(padding, (kh, kw), dilation, stride)
        return w, in_shape, padding, dilation, groups, stride

    @classmethod
    def from_operator(cls, op: Any, **kw: Any) -> PaddedConvSolver:
        """Build from a :class:`~linop.operators.Conv2d` (its weight, shape, padding, dilation, groups)."""
        return cls(op, **kw)

    # ------------------------------------------------------------------ once per layer
    def _spectra(self, Un: np.ndarray, sn: np.ndarray, Vhn: np.ndarray) -> tuple[np.ndarray, ...]:
        """Per-frequency ``Â`` (C_out²), ``Ĝ`` (C_in × C_out), ``Ẑ_s`` (C_in²); module docstring."""
        lam, sig = self.lam, self.s_max
        Uh = np.conj(np.swapaxes(Un, -1, -2))
        V = np.conj(np.swapaxes(Vhn, -1, -2))
        Vh = Vhn
        d = sn**2 + lam
        with np.errstate(divide="ignore", invalid="ignore"):
            G = (V * (sig * sn / d)[..., None, :]) @ Uh
            if self.case == "MDP":  # U square: A = s²(CCᵀ+λ)⁻¹, Z_s = λ(CᵀC+λ)⁻¹ = I − V σ²/(σ²+λ) Vᴴ
                A = (Un * (sig**2 / d)[..., None, :]) @ Uh
                Z = np.eye(self.C_in) - (V * (sn**2 / d)[..., None, :]) @ Vh
            else:  # V square: A = λ(CCᵀ+λ)⁻¹ = I − U σ²/(σ²+λ) Uᴴ, Z_s = s²(CᵀC+λ)⁻¹
                A = np.eye(self.C_out) - (Un * (sn**2 / d)[..., None, :]) @ Uh
                Z = (V * (sig**2 / d)[..., None, :]) @ Vh
        return A, G, Z

    def _factor(self, Un: np.ndarray, sn: np.ndarray, Vhn: np.ndarray, row_chunk: int) -> bool:
        with small_lapack():
            A, G, Z = self._spectra(Un, sn, Vhn)
        cdt = self.fs.khat.dtype
        to = lambda a: torch.from_numpy(np.ascontiguousarray(a)).to(self.device, cdt)
        Ah, Gh, Zh = to(A), to(G), to(Z)
        # per-batch products: [Â; Ĝ] on Sᵀ r̃ (right-hand sides), [Ĝ, Ẑ_s] on (c, E_P x_P) (lift back)
        self._AG = torch.cat([Ah, Gh], dim=-2).contiguous()
        self._GZ = torch.cat([Gh, Zh], dim=-1).contiguous()
        Th, Tw = self.torus
        spatial = lambda M: torch.fft.irfft2(M.permute(2, 3, 0, 1), s=(Th, Tw)).reshape(M.shape[2], M.shape[3], -1)
        B, P = self.geo.boundary, self.geo.ring
        if self.case == "MDP":  # definite block B first
            F1 = _gather(spatial(Ah), B, B, self.torus, row_chunk)
            S2 = lambda: _gather(spatial(Zh), P, P, self.torus, row_chunk)
            coupling = lambda: _gather(spatial(Gh), P, B, self.torus, row_chunk).T  # G_BP = G_PBᵀ
        else:  # definite block P first
            F1 = _gather(spatial(Zh), P, P, self.torus, row_chunk)
            S2 = lambda: _gather(spatial(Ah), B, B, self.torus, row_chunk)
            coupling = lambda: _gather(spatial(Gh), P, B, self.torus, row_chunk)  # G_PB
        self._qd = QuasiDefiniteFactor(F1, coupling, S2, definite_first="B" if self.case == "MDP" else "P")
        self.cond_est = self._qd.cond_est
        return self._qd.ok

    # ------------------------------------------------------------------ torus helpers
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
        """``W a`` by the direct torch conv (cheaper than the torus FFTs for small batches)."""
        return self._op.apply(a)

    def adjoint(self, y: torch.Tensor) -> torch.Tensor:
        """``Wᵀ y`` by the direct transposed conv."""
        return self._op.apply_adjoint(y)

    # ------------------------------------------------------------------ per batch
    def _rhs(self, rt: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``((A Sᵀ r̃)_B, −(G Sᵀ r̃)_P)`` — one FFT round trip over C_out + C_in channels."""
        N = rt.shape[0]
        u = self._irfft(self._mul(self._AG, self._rfft(self.place(rt)))).reshape(N, self.C_out + self.C_in, -1)
        return u[:, : self.C_out, self._B].reshape(N, -1), -u[:, self.C_out:, self._P].reshape(N, -1)

    def _lift(self, rt: torch.Tensor, xB: torch.Tensor, xP: torch.Tensor) -> torch.Tensor:
        """``Eᵀ (G (Sᵀ r̃ + E_B x_B) + Z_s E_P x_P)`` — one FFT round trip."""
        N = rt.shape[0]
        c = torch.cat([self.place(rt), rt.new_zeros((N, self.C_in) + self.torus)], dim=1)
        cf = c.view(N, self.C_out + self.C_in, -1)
        cf[:, : self.C_out, self._B] = xB.reshape(N, self.C_out, -1)
        cf[:, self.C_out:, self._P] = xP.reshape(N, self.C_in, -1)
        return self._irfft(self._mul(self._GZ, self._rfft(c)))[:, :, : self.H, : self.W]

    def tikhonov(self, r: torch.Tensor, chunk: int = 64) -> torch.Tensor:
        """``W⁺ r`` (λ = 0) or ``(WᵀW + λI)⁻¹ Wᵀ r``: (N, *out_shape) → (N, *in_shape).

        FFT stages run ``chunk`` samples at a time; the capacitance solve once for the batch.
        """
        rt = r / self.s_max
        N, ch = r.shape[0], int(chunk)
        parts = [self._rhs(rt[k:k + ch]) for k in range(0, N, ch)]
        xB, xP = self._qd.solve(torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts]))
        return torch.cat([self._lift(rt[k:k + ch], xB[k:k + ch], xP[k:k + ch]) for k in range(0, N, ch)])

    def _check_r(self, r: Any, chunk: int) -> torch.Tensor:
        r = backend.to_torch(r) if not isinstance(r, torch.Tensor) else r
        if r.ndim != 4 or tuple(r.shape[1:]) != self.out_shape:
            raise ValueError(f"PaddedConvSolver.solve: r must have shape (N, {', '.join(map(str, self.out_shape))}), "
                             f"got {tuple(r.shape)}")
        if isinstance(chunk, bool) or int(chunk) < 1:
            raise ValueError(f"PaddedConvSolver.solve: chunk must be ≥ 1, got {chunk!r}")
        return r.to(device=self.device, dtype=self.dtype)

    def solve(self, r: Any, tol: float | None = None, maxiter: int | None = None, chunk: int = 64,
              refine: bool | None = None) -> tuple[torch.Tensor, dict]:
        """``δ = W⁺ r`` for a batch ``r`` (N, *out_shape); returns ``(δ, info)``.

        Capacitance: one direct application of :meth:`tikhonov`, then — when ``λ > 0``, or
        when ``refine`` (default: :attr:`refine`, decided from the condition estimate) — the
        refinement ``δ ← δ + T (r − W δ)`` until each sample's update is ≤ ``tol`` (default
        1e-13) relative to its δ, stops decreasing (rounding floor), or ``maxiter`` steps
        (default 100 with ``λ > 0``, else 10).  PCG: Craig (MDP) / CGLS (CCP) to ``tol``
        (default 1e-12), at most ``maxiter`` (1000) iterations.  ``info["iterations"]`` (per
        sample) counts refinement steps resp. CG iterations.
        """
        r = self._check_r(r, chunk)
        if self.method == "pcg":
            return padded_pcg(self, r, 1e-12 if tol is None else float(tol), 1000 if maxiter is None else int(maxiter))
        tol = 1e-13 if tol is None else float(tol)
        maxiter = (100 if self.lam > 0.0 else 10) if maxiter is None else int(maxiter)
        ch = int(chunk)
        d = self.tikhonov(r, ch)
        if self.lam > 0.0 or (self.refine if refine is None else bool(refine)):
            return self._refine(r, d, tol, maxiter, ch)
        N = r.shape[0]
        return d, {"iterations": np.zeros(N, dtype=np.int64), "converged": np.ones(N, dtype=bool),
                   "method": "capacitance"}

    def _refine(self, r: torch.Tensor, d: torch.Tensor, tol: float, maxiter: int,
                ch: int) -> tuple[torch.Tensor, dict]:
        """Iterated Tikhonov / iterative refinement ``δ ← δ + T (r − W δ)`` on the active samples.

        With ``λ = 0`` it removes the rounding error of the direct solve (which grows like
        ``eps·cond(W)²``: the capacitance system is a normal-equations form) down to about
        ``eps·cond(W)``; with ``λ > 0`` it converges to ``W⁺ r`` (module docstring).
        """
        N = r.shape[0]
        iters = np.zeros(N, dtype=np.int64)
        conv = np.zeros(N, dtype=bool)
        stag = np.zeros(N, dtype=bool)
        last = np.full(N, np.inf)
        active = torch.arange(N, device=r.device)
        for it in range(1, int(maxiter) + 1):
            if active.numel() == 0:
                break
            da, ra = d[active], r[active]
            res = ra - torch.cat([self.forward(da[k:k + ch]) for k in range(0, da.shape[0], ch)])
            upd = self.tikhonov(res, ch)
            rel = (torch.linalg.vector_norm(upd.reshape(upd.shape[0], -1), dim=1)
                   / torch.linalg.vector_norm(da.reshape(da.shape[0], -1), dim=1).clamp_min(torch.finfo(d.dtype).tiny))
            rel = rel.cpu().numpy()
            idx = active.cpu().numpy()
            grew = rel >= last[idx]  # no longer contracting: the rounding floor; keep the previous iterate
            keep = ~grew
            d[active[torch.as_tensor(keep, device=r.device)]] += upd[torch.as_tensor(keep, device=r.device)]
            iters[idx[keep]] = it
            last[idx] = np.minimum(rel, last[idx])
            ok = rel <= tol
            conv[idx[ok & keep]] = True
            stag[idx[grew]] = True
            active = active[torch.as_tensor(~(ok | grew), device=r.device)]
        return d, {"iterations": iters, "converged": conv | stag, "stagnated": stag, "last_update": last,
                   "method": "capacitance" + (" + Tikhonov refinement" if self.lam > 0.0 else " + refinement")}

    def info(self) -> dict:
        """Geometry, sizes, conditioning and the algorithm used (for ``SolveResult.info``)."""
        out = {"exact_case": self.case, "torus": self.torus, "padding": self.geo.padding,
               "dilation": self.dilation, "groups": self.groups,
               "boundary_positions": int(self.geo.boundary.size), "ring_positions": int(self.geo.ring.size),
               "capacitance_size": self.m, "capacitance_bytes": self.need_bytes, "solver_method": self.method,
               "tikhonov_lambda": self.lam, "refine": bool(getattr(self, "refine", False)),
               "singular_frequencies": self.singular_freqs,
               "factor_seconds": getattr(self, "factor_seconds", float("nan"))}
        if self.method == "capacitance":
            out["capacitance_cond_est"] = max(self.cond_est)
            out["algorithm"] = ("padded capacitance (Schur complement of (CCᵀ)⁻¹ on B, bordered by the ring)"
                                if self.case == "MDP" else
                                "padded capacitance (Woodbury on CᵀC over the ring, Schur on B)")
            if self.lam > 0.0:
                out["algorithm"] += "; Tikhonov lifting + iterated refinement"
        else:
            out["algorithm"] = ("Craig (PCG on W Wᵀ), preconditioner S(CCᵀ)⁻¹Sᵀ" if self.case == "MDP"
                                else "PCGLS, preconditioner Eᵀ(CᵀC)⁻¹E")
        return out


def padded_pcg(ps: PaddedConvSolver, r: torch.Tensor, tol: float, maxiter: int) -> tuple[torch.Tensor, dict]:
    """Fallback of :class:`PaddedConvSolver`: Craig / CGLS with a circulant preconditioner.

    MDP: Craig on ``W Wᵀ`` preconditioned by ``S (C Cᵀ + ε)⁻¹ Sᵀ`` (iterates stay in
    ``range(Wᵀ)``: minimum norm); samples where it does not converge (W not of full row
    rank) are redone by CGLS.  CCP: CGLS preconditioned by ``Eᵀ (Cᵀ C + ε)⁻¹ E``.  ``W``,
    ``Wᵀ`` are the direct convs; exact to ``tol``, O(batch) memory.
    """
    N, fs = r.shape[0], ps.fs

    def flat(fn, shape):  # the Krylov solvers work on flat (k, n) batches
        return lambda v: fn(v.reshape((v.shape[0],) + shape)).reshape(v.shape[0], -1)

    def torus_apply(M, lift, crop):
        return lambda x: crop(ps._irfft(ps._mul(M, ps._rfft(lift(x)))))

    fwd, adj = flat(ps.forward, ps.in_shape), flat(ps.adjoint, ps.out_shape)
    M_ccp = lambda: flat(torus_apply(fs._precond("ccp"), ps.embed, lambda c: c[:, :, : ps.H, : ps.W]),
                         ps.in_shape)
    rf = r.reshape(N, -1)
    if ps.case == "MDP":
        M = flat(torus_apply(fs._precond("mdp"), ps.place, ps.select), ps.out_shape)
        delta, info = craig(fwd, adj, rf, tol, maxiter, M=M)
        bad = np.flatnonzero(~info["converged"])
        if bad.size:  # W Wᵀ y = r inconsistent (W not of full row rank): CGLS is min-norm LS
            idx = torch.as_tensor(bad, device=r.device)
            d2, i2 = cgls(fwd, adj, rf[idx], tol, maxiter, M=M_ccp())
            delta[idx] = d2
            for k in ("iterations", "converged", "relres"):
                info[k][bad] = i2[k]
            info["cgls_fallback_samples"] = bad
    else:
        delta, info = cgls(fwd, adj, rf, tol, maxiter, M=M_ccp())
    info["method"] = "pcg"
    return delta.reshape((N,) + ps.in_shape), info
