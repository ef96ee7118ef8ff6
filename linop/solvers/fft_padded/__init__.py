"""Exact reverse step of any zero-padded convolution: FFT + ring/boundary capacitance.

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

**Square layers** (:mod:`.square`).  When ``C_in = C_out``, every ``K̂(ω)`` is invertible and
there are as many constrained ring entries as boundary outputs (``'same'`` convs with equal
channels), ``W`` is square and ``W⁻¹ = N_IV − N_IB N_PB⁻¹ N_PV`` with ``N = C⁻¹`` (the
complementary block of the inverse): one LU of ``C_out |B|`` rows instead of the lifted system
of ``C_out |B| + |P'|``, and not of normal-equations type (direct error ``~eps·cond``, no
refinement step).  ``square="auto"`` uses it where its condition estimate says the direct
answer is accurate (``eps·cond_est ≤ 1e-8``); otherwise the lifted system below.

**Cost.**  ``m = |B|·C_out + |P'|`` unknowns (``P'`` the constrained ring entries, at most ``|P|·C_in``): the blocks are *gathered* from one inverse
FFT of each spectrum (``Q_BB[(i,b),(j,c)] = q_ij(p_b − p_c)``), factored once per layer
(``O(m³)``; the Schur update on its lower triangle only), and each batch costs FFTs over
``3 C_out + C_in`` (MDP) or ``C_out + 3 C_in`` channels (CCP; ``4 C_in`` when the first stage is a
direct transposed conv, e.g. RGB inputs), two or three per-frequency products, the boundary /
ring couplings as spatial taps (:mod:`.lift`) and triangular solves with ``m`` rows (``2 m²``
flops a sample).  The refinement's residual ``r − W δ`` is taken by FFTs where that is cheaper
than the direct conv (:func:`.lift.torus_forward`).
Where the blocks would exceed the byte budget the solver falls back to Fourier-preconditioned
CG (``fft-pcg`` style: Craig on ``W Wᵀ`` with ``S (C Cᵀ)⁻¹ Sᵀ``, resp. CGLS with
``Eᵀ (Cᵀ C)⁻¹ E``), exact to its tolerance; the iterations are reported.

**Which ring entries, which boundary** (:func:`.torus.ring_entries`).  Only ring entries some
valid output reads need a constraint in the MDP (the others are zero columns of ``S C``, left
at zero by the minimum norm: e.g. the phases of a strided conv that never reach the padding);
in the CCP every unread entry is constrained instead (a zero column would make the least-
squares problem singular).  A valid output that reads no free entry is a zero row of ``W``
(padding ≥ kernel): it joins the boundary (``W⁺`` ignores it) — exact, still ``λ = 0``.
``fixed_zero`` adds image entries held at zero (the missing phase entries below).

**Coverage** (:class:`.ExactConvSolver`, module :mod:`.grouped`).  Any zero padding (int,
pair, 4-sided, ``'same'``); stride by the polyphase rewrite ``W = W_poly Π`` (module
:mod:`.polyphase`; sizes not divisible by the stride hold the missing phase entries at zero);
groups block-diagonally, one factorisation per group (depthwise included), no dense block
expansion; dilation at stride 1 by the dilated (sparse) kernel — exact, the boundary grows with
the dilated size; with a stride it is absorbed into the phase kernel.  (A stride-1 dilated conv
is also ``d²`` independent phase convs with the undilated kernel — a smaller factorisation; not
implemented.)

Modules: :mod:`.torus` (geometry, constraints, gather), :mod:`.factor` (block Cholesky),
:mod:`.lift` (per-batch right-hand sides and lift back), :mod:`.square` (square ``W``),
:mod:`.solver` (:class:`.PaddedConvSolver`: geometry, constraints, factorisation), :mod:`.maps`
(its torus maps and ``W`` / ``Wᵀ``), :mod:`.paths` (its per-batch solves), :mod:`.iterate` (refinement, PCG),
:mod:`.polyphase`, :mod:`.grouped` (:class:`.ExactConvSolver`).
"""
from __future__ import annotations

from .factor import QuasiDefiniteFactor
from .grouped import ExactConvSolver, exact_conv_bytes
from .iterate import padded_pcg
from .polyphase import (
           PolyphaseGeometry,
           from_polyphase,
           polyphase_geometry,
           polyphase_kernel,
           to_polyphase,
)
from .solver import PaddedConvSolver
from .torus import (
           PaddedTorus,
           conv_geometry,
           effective_kernel,
           padded_conv_bytes,
           padded_torus,
)

__all__ = [
           "ExactConvSolver",
           "PaddedConvSolver",
           "PaddedTorus",
           "PolyphaseGeometry",
           "QuasiDefiniteFactor",
           "conv_geometry",
           "effective_kernel",
           "exact_conv_bytes",
           "from_polyphase",
           "padded_conv_bytes",
           "padded_pcg",
           "padded_torus",
           "polyphase_geometry",
           "polyphase_kernel",
           "to_polyphase",
]
