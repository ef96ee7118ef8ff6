"""Per-batch maps of :class:`.PaddedConvSolver`: right-hand sides and lift back, on the small side.

The capacitance solve needs, per sample (package docstring, ``r̃ = r / s_max``)::

    b_B = (A Sᵀ r̃)_B,   b_P = −(G Sᵀ r̃)_P,   a = G (Sᵀ r̃ + E_B x_B) + Z_s E_P x_P.

Applied as written, that is two FFT round trips over ``C_out + C_in`` channels.  The
spectra factor through one Gram inverse (``K̂ = U σ Vᴴ`` per frequency, ``λ ≥ 0``):

* **MDP** (``C_out ≤ C_in``, ``U`` square): with ``Ĥ = (K̂K̂ᴴ + λ)⁻¹`` (``C_out²``),
  ``A = s² Ĥ``, ``G = s K̂ᴴ Ĥ``, ``Z_s = I − K̂ᴴ Ĥ K̂``.  With ``h = s H Sᵀ r̃`` (``C_out``
  channels): ``b_B = s h_B``, ``b_P = −(Cᵀ h)_P`` and

      a = Cᵀ (h + H (s E_B x_B − C E_P x_P)) + E_P x_P;

* **CCP** (``C_out ≥ C_in``, ``V`` square): with ``Ẑ = (K̂ᴴK̂ + λ)⁻¹`` (``C_in²``),
  ``G = s Ẑ K̂ᴴ``, ``A = I − K̂ Ẑ K̂ᴴ``, ``Z_s = s² Ẑ``.  With ``g = G Sᵀ r̃`` (``C_in``
  channels) and ``(Sᵀ r̃)_B = 0``: ``b_B = −(C g)_B / s``, ``b_P = −g_P`` and

      a = g + s Z (Cᵀ E_B x_B + s E_P x_P).

``C`` and ``Cᵀ`` restricted to the boundary / ring are evaluated *spatially* (a gather or a
scatter over the ``k_h k_w`` taps of the few boundary / ring positions, ``O(|B| k²)`` a
channel pair), the spectrum of the first stage is kept for the second, and the placement
``Sᵀ`` is a zero-padded FFT times a per-frequency phase folded into the first matrix (shift
theorem).  FFTs per sample: ``3 C_out + C_in`` (MDP), ``C_out + 3 C_in`` (CCP) instead of
``3 (C_out + C_in)``; per-frequency products ``2 C_out² + C_in C_out`` resp.
``C_in C_out + C_in²`` instead of ``2 (C_out + C_in) max(C_out, C_in)``.  Same algebra,
same exactness (tested against the dense ``pinv``).
"""
from __future__ import annotations

import numpy as np
import torch

from ..fft import small_lapack

__all__ = ["TorusLift", "freq_mul", "shift_phase", "torus_forward"]


def freq_mul(M: torch.Tensor, X: torch.Tensor) -> torch.Tensor:
    """Per-frequency product ``M (F, p, q)`` times ``X (N, q, T_h, T_r)`` → ``(N, p, T_h, T_r)``.

    ``F = T_h T_r``.  One batched matmul over the frequencies: ``X`` copied frequency-major, the
    result left as a permuted view (the next FFT reads it).  Measured against the two-copy
    layout and a strided (copy-free) operand: as fast on one thread, and the strided one is
    2–10x slower with two threads on a loaded machine.
    """
    N, q = X.shape[:2]
    Y = torch.bmm(M, X.reshape(N, q, -1).permute(2, 1, 0).contiguous())  # (F, p, N)
    return Y.permute(2, 1, 0).reshape((N, M.shape[1]) + tuple(X.shape[2:]))


def shift_phase(torus: tuple[int, int], offset: tuple[int, int]) -> np.ndarray:
    """``exp(−2πi (u o_h / T_h + v o_w / T_w))`` on the rfft grid (T_h, T_w//2+1): the spectrum of a
    shift by ``offset`` (shift theorem) — how :math:`Sᵀ` (outputs at ``offset + (i, j)`` mod ``T``)
    becomes a zero-padded FFT times a phase."""
    (Th, Tw), (oh, ow) = torus, offset
    u = np.arange(Th)[:, None] * int(oh) / Th + np.arange(Tw // 2 + 1)[None, :] * int(ow) / Tw
    return np.exp(-2j * np.pi * u)


def torus_forward(KF: torch.Tensor, a: torch.Tensor, torus: tuple[int, int], out_hw: tuple[int, int]) -> torch.Tensor:
    """``W a = S C E a`` by FFTs: (N, C_in, H, W) → (N, C_out, H_out, W_out).

    ``KF`` (F, C_out, C_in) is ``K̂`` times the conjugate :func:`shift_phase` of the outputs'
    torus offset, so that ``S`` is the slice ``[:H_out, :W_out]``.
    """
    Y = freq_mul(KF, torch.fft.rfft2(a, s=torus))
    return torch.fft.irfft2(Y, s=torus)[:, :, : out_hw[0], : out_hw[1]]


def _taps(pos: np.ndarray, kernel: tuple[int, int], torus: tuple[int, int], sign: int) -> np.ndarray:
    """Flat torus index ``(pos + sign·(k − 1 − u)) mod T`` for every tap ``(u, v)``: (len(pos), k_h k_w).

    ``sign = −1``: the input read by tap ``(u, v)`` of the output at ``pos`` (``C``);
    ``sign = +1``: the output that reads ``pos`` through tap ``(u, v)`` (``Cᵀ``).
    """
    (kh, kw), (Th, Tw) = kernel, torus
    r, c = np.divmod(np.asarray(pos, dtype=np.int64), Tw)
    du = sign * (kh - 1 - np.arange(kh))
    dv = sign * (kw - 1 - np.arange(kw))
    rr = (r[:, None, None] + du[None, :, None]) % Th
    cc = (c[:, None, None] + dv[None, None, :]) % Tw
    return (rr * Tw + cc).reshape(pos.size, kh * kw)


class TorusLift:
    """The per-batch maps ``r̃ ↦ (b_B, b_P)`` and ``(r̃, x_B, x_P) ↦ δ`` (module docstring).

    Parameters
    ----------
    case : "MDP" or "CCP"
    weight : (C_out, C_in, k_h, k_w) real tensor, the effective (undilated, one-group) kernel
    khat : (T_h, T_r, C_out, C_in) complex tensor, its torus spectrum (``FFTConvSolver.khat``)
    svd : ``(U, σ, Vᴴ)`` of ``khat`` per frequency (numpy)
    lam, s_max : the Tikhonov shift ``λ`` and the scale ``s_max``
    torus, in_hw : ``(T_h, T_w)``, ``(H, W)``
    rows, cols : torus row / column of the output rows / columns (consecutive mod ``T``)
    boundary : flat torus positions ``B``; ring : flat constrained entries ``c T_h T_w + p``
    """

    def __init__(self, case: str, weight: torch.Tensor, khat: torch.Tensor, svd: tuple, lam: float, s_max: float,
                 torus: tuple[int, int], in_hw: tuple[int, int], rows: np.ndarray, cols: np.ndarray,
                 boundary: np.ndarray, ring: np.ndarray):
        self.case, self.s, self.torus, self.in_hw = case, float(s_max), torus, in_hw
        C_out, C_in, kh, kw = (int(v) for v in weight.shape)
        self.C_out, self.C_in = C_out, C_in
        dev, cdt = khat.device, khat.dtype
        Th, Tw = torus
        T2 = Th * Tw
        self.w = weight.reshape(C_out, C_in, kh * kw)
        Un, sn, Vhn = svd
        d = 1.0 / (sn**2 + lam)
        B = Un if case == "MDP" else np.conj(np.swapaxes(Vhn, -1, -2))  # the square factor
        with small_lapack():  # batches of small products: threads only add contention
            gram_inv = (B * d[..., None, :]) @ np.conj(np.swapaxes(B, -1, -2))  # Ĥ (MDP) or Ẑ (CCP)
            kn = khat.cpu().numpy()
            khH = np.conj(np.swapaxes(kn, -1, -2))
            MG = None if case == "MDP" else gram_inv @ khH
        F = khat.shape[0] * khat.shape[1]
        to = lambda a: torch.from_numpy(np.ascontiguousarray(a)).to(dev, cdt).reshape((F,) + a.shape[-2:])
        # Sᵀ: the outputs sit at (rows[0] + i, cols[0] + j) mod T — a zero-padded FFT times this phase
        phase = shift_phase(torus, (rows[0], cols[0]))[..., None, None]
        # rhs() takes r, not r̃ = r / s: the 1/s is folded into its first matrix (M1, or the
        # transposed conv's kernel wT) instead of a pass over the wide right-hand side
        if case == "MDP":
            self.M1 = to(gram_inv * phase)  # ĥ = s Ĥ F(Sᵀ r̃) = Ĥ F(Sᵀ r)
            self.M0 = to(gram_inv)
            self.KH = to(khH)
        else:
            self.M1 = to(MG * phase)  # ĝ = s Ẑ K̂ᴴ F(Sᵀ r̃) = Ẑ K̂ᴴ F(Sᵀ r)
            self.M0 = to(self.s * gram_inv)
        # CCP: Cᵀ Sᵀ r̃ by the direct transposed conv (full output, folded onto the torus) when that
        # is cheaper than C_out FFTs + a C_in × C_out product (few input channels, e.g. RGB convs).
        # Cost model per sample and output channel, in ns (measured on 2 CPU cores, float64):
        # conv 2 C_in k_h k_w H_out W_out / 10; FFT 0.7 T log₂T + C_in F  (T = T_h T_w, F frequencies).
        Ho, Wo = int(rows.size), int(cols.size)
        self.out_hw = (Ho, Wo)
        self.spatial_first = case == "CCP" and (
            2 * C_in * kh * kw * Ho * Wo / 10 < 0.7 * T2 * np.log2(T2) + C_in * F)
        if case == "CCP":  # (both branches stay available: tests compare them)
            # Cᵀ Sᵀ r̃ = (Cᵀ/s) Sᵀ r as one batched GEMM (C_in k_h k_w × C_out) and a col2im (full_transposed)
            self.wT = (weight / self.s).reshape(C_out, C_in * kh * kw).T.contiguous()
            self.kernel = (kh, kw)
            self.fold_r = torch.as_tensor((np.arange(Ho + kh - 1) + int(rows[0]) - kh + 1) % Th, device=dev)
            self.fold_c = torch.as_tensor((np.arange(Wo + kw - 1) + int(cols[0]) - kw + 1) % Tw, device=dev)
        self.B = torch.as_tensor(boundary, device=dev)
        self.nB = int(boundary.size)
        self.ring = torch.as_tensor(ring, device=dev)
        ch, pos = np.divmod(ring, T2)
        self.pos_P, inv = np.unique(pos, return_inverse=True)
        self.nPp = int(self.pos_P.size)
        self.ring_at = torch.as_tensor(ch * self.nPp + inv.reshape(-1), device=dev)  # entry → (c, ring position)
        self.idx_B = torch.as_tensor(_taps(boundary, (kh, kw), torus, -1), device=dev)  # inputs read from B
        self.idx_P = torch.as_tensor(_taps(self.pos_P, (kh, kw), torus, +1), device=dev)  # outputs reading P
        H, W = in_hw
        img = (pos // Tw < H) & (pos % Tw < W)  # fixed-zero image entries (polyphase): E_P x_P inside the image
        self.img_entries = torch.as_tensor(np.flatnonzero(img), device=dev) if img.any() else None
        if self.img_entries is not None:
            self.img_flat = torch.as_tensor(ch[img] * H * W + (pos[img] // Tw) * W + pos[img] % Tw, device=dev)

    # ------------------------------------------------------------------ spatial boundary / ring maps
    def _C_at_B(self, x: torch.Tensor) -> torch.Tensor:
        """``(C x)_B``: (N, C_in, T²) → (N, C_out, |B|)."""
        return torch.einsum("nibt,oit->nob", x[:, :, self.idx_B], self.w)

    def _Ct_at_P(self, y: torch.Tensor) -> torch.Tensor:
        """``Cᵀ y`` at the ring positions: (N, C_out, T²) → (N, C_in, |P_pos|)."""
        return torch.einsum("nopt,oit->nip", y[:, :, self.idx_P], self.w)

    def _scatter(self, out: torch.Tensor, contrib: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
        """``out[:, :, idx[j, t]] += contrib[:, :, j, t]`` (repeated indices accumulate)."""
        N, c = out.shape[:2]
        out.view(N * c, -1).index_add_(1, idx.reshape(-1), contrib.reshape(N * c, -1))
        return out

    def _rfft(self, x: torch.Tensor) -> torch.Tensor:
        return torch.fft.rfft2(x, s=self.torus)

    def _irfft(self, X: torch.Tensor) -> torch.Tensor:
        return torch.fft.irfft2(X, s=self.torus)

    def full_transposed(self, r: torch.Tensor) -> torch.Tensor:
        """``conv_transpose2d(r, w / s)`` (full output, (N, C_in, H_out + k_h − 1, W_out + k_w − 1)): the
        taps of all outputs by one batched GEMM, summed into place by ``fold`` (col2im).  Equal to
        the torch transposed conv (tested); measured ~1.7× faster in float64, whose transposed conv
        runs one GEMM + col2im per sample."""
        N, (Ho, Wo), (kh, kw) = r.shape[0], self.out_hw, self.kernel
        cols = torch.matmul(self.wT, r.reshape(N, self.C_out, Ho * Wo))  # (N, C_in k_h k_w, H_out W_out)
        return torch.nn.functional.fold(cols, (Ho + kh - 1, Wo + kw - 1), (kh, kw))

    # ------------------------------------------------------------------ per batch
    def rhs(self, r: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(b_B, b_P, spectrum kept for :meth:`lift`)`` for ``r̃ = r / s``; takes ``r`` (N, C_out, H_out, W_out)."""
        N = r.shape[0]
        if self.spatial_first:  # ĝ = s Ẑ F(Cᵀ Sᵀ r̃): full transposed conv, output j at torus j − p_t
            full = self.full_transposed(r)
            Th, Tw = self.torus
            v = full.new_zeros(full.shape[:2] + (Th, full.shape[3])).index_add_(2, self.fold_r, full)
            v = v.new_zeros(full.shape[:2] + (Th, Tw)).index_add_(3, self.fold_c, v)
            Y = freq_mul(self.M0, self._rfft(v))
        else:
            Y = freq_mul(self.M1, self._rfft(r))  # ĥ (MDP) / ĝ (CCP)
        u = self._irfft(Y).reshape(N, Y.shape[1], -1)
        if self.case == "MDP":
            bB = self.s * u[:, :, self.B]
            bP = -self._Ct_at_P(u).reshape(N, -1)[:, self.ring_at]
        else:
            bB = self._C_at_B(u) / (-self.s)
            bP = -u.reshape(N, -1)[:, self.ring]
        return bB.reshape(N, -1), bP, Y

    def lift(self, Y: torch.Tensor, xB: torch.Tensor, xP: torch.Tensor) -> torch.Tensor:
        """``δ = Eᵀ a`` (N, C_in, H, W) from the kept spectrum and the capacitance solution."""
        N, (Th, Tw), (H, W) = Y.shape[0], self.torus, self.in_hw
        xB = xB.reshape(N, self.C_out, self.nB)
        if self.case == "MDP":  # a = Cᵀ (h + H (s E_B x_B − C E_P x_P)) + E_P x_P
            xr = xP.new_zeros((N, self.C_in * self.nPp))
            xr[:, self.ring_at] = xP
            v = xB.new_zeros((N, self.C_out, Th * Tw))
            v[:, :, self.B] = self.s * xB
            contrib = torch.einsum("nip,oit->nopt", xr.view(N, self.C_in, self.nPp), self.w)
            self._scatter(v, contrib.neg_(), self.idx_P)
            Y = Y + freq_mul(self.M0, self._rfft(v.view(N, self.C_out, Th, Tw)))
            a = self._irfft(freq_mul(self.KH, Y))[:, :, :H, :W]
            if self.img_entries is not None:
                a = a.reshape(N, -1).index_add(1, self.img_flat, xP[:, self.img_entries]).view(N, self.C_in, H, W)
            return a
        # CCP: a = g + s Z (Cᵀ E_B x_B + s E_P x_P)
        v = xB.new_zeros((N, self.C_in, Th * Tw))
        self._scatter(v, torch.einsum("nob,oit->nibt", xB, self.w), self.idx_B)
        v.view(N, -1).index_add_(1, self.ring, self.s * xP)
        Y = Y + freq_mul(self.M0, self._rfft(v.view(N, self.C_in, Th, Tw)))
        return self._irfft(Y)[:, :, :H, :W]
