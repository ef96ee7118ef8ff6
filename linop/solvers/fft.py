"""FFT fast path for the reverse convolution step (seed 001 §3.2, Eqs. 8–20), and its exact
preconditioned completion (``fft-pcg``).

Setting: stride 1, no padding, ``T_{n,m} = â[m] ⊗ K[n,m]`` (Eq. 8), ``z[n] = Σ_m T_{n,m} + b_n``
(Eq. 9) on a ``C_l × H × W`` input.  With the flipped kernel ``K̃`` (Eq. 10) zero-padded on the
right/bottom to ``H × W``, the *circular* convolution ``C a = a ∗ K̃`` agrees with the network's
``T`` on the valid positions, which sit at offset ``(H_K − 1, W_K − 1)`` (``T`` zero-padded on
the left/top, Eq. 11/14).  Writing ``S`` for that selection, the layer is exactly ``W = S C``.
The remaining, wrapped-around entries of ``C a`` are the boundary term (Eq. 15)::

    G[a] = F(C a) − F(pad(T[a])) = F(B C a),     B = the boundary strip,

so Eq. 16/17 read ``F(pad(z* − b))[n] = Σ_m F(a[m]) F(K̃[n,m]) − G[a]``.  The paper freezes the
boundary term at ``â`` and solves one small system per frequency (u, v): the MDP (Eq. 18/19,
``C_l ≥ C_{l+1}``) ``F(a) = F(â) + K̂⁺ (F(pad(z*−b)) + G[â] − K̂ F(â))``, the CCP (Eq. 20,
``C_l < C_{l+1}``) ``F(a) = K̂⁺ (F(pad(z*−b)) + G[â])``, then the inverse FFT (Parseval makes the
per-frequency objectives the spatial ones).  Here ``K̂(u,v)`` is the ``C_{l+1} × C_l`` matrix of
``F(K̃[n,m])(u,v)`` and ``K̂⁺`` its per-frequency pseudo-inverse (computed by SVD, so the worst
per-frequency condition number is reported).

**How far is it from exact?**  Algebraically the FFT answer is ``δ_fft = C⁺ Sᵀ r`` with
``r = z* − b − W â``, while the exact one is ``δ* = (S C)⁺ r``.  Consequences (tested):

* MDP with every ``K̂(u,v)`` of full row rank: ``S C δ_fft = r`` — the FFT answer satisfies
  the constraint exactly; it is only *not the closest* (it also pins the boundary strip of
  ``C a`` to its value at â).
* It is exact iff ``G[a*] = G[â]``, i.e. ``B C δ* = 0``: e.g. 1×1 kernels (no boundary,
  ``G ≡ 0``), single-tap kernels (``C Cᵀ`` block diagonal in space), or a consistent ``â``.
* CCP: its least-squares misfit is ≥ the exact one.

**fft-pcg (beyond the paper).**  ``W Wᵀ = S (C Cᵀ) Sᵀ`` and ``Wᵀ W = Cᵀ (SᵀS) C`` are applied
in the Fourier domain (one ``C×C`` product per frequency between FFTs) and preconditioned
with the circulant inverses ``S (C Cᵀ)⁻¹ Sᵀ`` (MDP) or ``(Cᵀ C)⁻¹`` (CCP) — the FFT solve
itself.  The preconditioned operator differs from the identity only through the boundary
strip, so CG converges in few iterations, to the exact minimum-norm answer (MDP iterates
stay in ``range(Wᵀ)``).
"""
from __future__ import annotations

import contextlib
from typing import Any

import numpy as np
import torch

from .. import backend

try:  # scikit-learn's dependency; optional here
    from threadpoolctl import threadpool_limits as _threadpool_limits
except ImportError:  # pragma: no cover
    _threadpool_limits = None


def small_lapack():
    """Context: one BLAS/LAPACK thread for batches of small per-frequency matrices.

    OpenBLAS threading on hundreds of 32×64 complex SVDs / products is pathological on a
    loaded machine: measured 8.7 s multi-threaded vs 0.27 s single-threaded (544 SVDs).
    """
    return _threadpool_limits(1, user_api="blas") if _threadpool_limits is not None else contextlib.nullcontext()

__all__ = ["FFTConvSolver", "conv_spec"]


def conv_spec(W: Any) -> tuple[torch.Tensor, tuple[int, int, int]]:
    """``(weight, in_shape)`` of a :class:`~linop.operators.Conv2d`, refusing what the FFT path cannot do.

    The applicability check of the ``fft``, ``fft-pcg`` and ``fft-exact`` methods.

    Raises
    ------
    NotImplementedError
        stride ≠ 1, padding ≠ 0, dilation ≠ 1 or groups ≠ 1 (seed 001 §3.2 covers only
        stride 1 without padding; ``method="fft-exact"`` covers those layers exactly, so do
        ``"cg"``/``"lsmr"``).
    ValueError
        ``W`` is not a ``Conv2d`` operator.
    """
    from ..operators.conv import Conv2d

    if not isinstance(W, Conv2d):
        raise ValueError(
            f"solve(method='fft'): W must be a Conv2d operator (weight, in_shape (C, H, W)), got {type(W).__name__}"
        )
    problems = [f"{what}={val}" for what, val, ok in (
        ("stride", W.stride, (1, 1)), ("padding", W.padding, (0, 0, 0, 0)), ("dilation", W.dilation, (1, 1)),
        ("groups", W.groups, 1)) if val != ok]
    if problems:
        raise NotImplementedError(
            "solve(method='fft'/'fft-pcg'): the FFT path (seed 001 §3.2) needs stride 1, no padding, dilation 1 "
            f"and groups 1; this conv has {', '.join(problems)}. Use method='fft-exact' (exact: padding, stride, dilation, "
            "groups) or 'cg' / 'lsmr' (exact, iterative)."
        )
    return W.weight, tuple(int(s) for s in W.in_shape)  # type: ignore[return-value]


class FFTConvSolver:
    """Per-layer FFT factorisation of a stride-1, unpadded convolution (seed 001 §3.2).

    Parameters
    ----------
    weight : (C_out, C_in, kh, kw) array / tensor
        The network's (cross-correlation) kernel ``K``.
    in_shape : (C_in, H, W)
    rcond : float
        Per-frequency relative singular-value cut-off of the pseudo-inverse ``K̂⁺``.
    reg : float
        Relative Tikhonov shift of the circulant preconditioners of ``fft-pcg``
        (only affects the convergence speed, never the answer).
    device, dtype : where and in what real precision the spectra are kept (complex of it).
    """

    def __init__(self, weight: Any, in_shape: tuple[int, int, int], rcond: float = 1e-13, reg: float = 1e-12,
                 device: torch.device | str = "cpu", dtype: torch.dtype = torch.float64):
        w = backend.to_torch(weight).detach().to(device=device, dtype=dtype)
        if w.ndim != 4:
            raise ValueError(f"FFTConvSolver: weight must be (C_out, C_in, kh, kw), got {tuple(w.shape)}")
        self.C_out, self.C_in, self.kh, self.kw = (int(s) for s in w.shape)
        C, H, Wd = (int(s) for s in in_shape)
        if C != self.C_in:
            raise ValueError(f"FFTConvSolver: in_shape {tuple(in_shape)} has {C} channels, the weight {self.C_in}")
        if self.kh > H or self.kw > Wd:
            raise ValueError(f"FFTConvSolver: kernel {self.kh}x{self.kw} larger than the input {H}x{Wd}")
        self.in_shape = (C, H, Wd)
        self.out_shape = (self.C_out, H - self.kh + 1, Wd - self.kw + 1)
        self.H, self.W = H, Wd
        self.device, self.dtype = torch.device(device), dtype
        self.case = "MDP" if self.C_in >= self.C_out else "CCP"  # the paper's channel rule (§3.2 a/b)
        # Eq. 10: flipped kernel, zero-padded on the right and bottom to H×W (Eq. 12 via rfft2).
        kt = torch.flip(w, dims=(2, 3))
        kpad = torch.zeros((self.C_out, self.C_in, H, Wd), dtype=dtype, device=self.device)
        kpad[:, :, : self.kh, : self.kw] = kt
        khat = torch.fft.rfft2(kpad)  # (C_out, C_in, H, W//2+1)
        self.khat = khat.permute(2, 3, 0, 1).contiguous()  # (H, Wr, C_out, C_in): one matrix per (u, v)
        # Per-frequency SVDs in numpy/LAPACK: torch's batched complex SVD / inverse on CPU is
        # orders of magnitude slower (measured 95 s vs < 1 s for 544 matrices of 32×64).
        kn = self.khat.cpu().numpy()
        with small_lapack():
            Un, sn, Vhn = np.linalg.svd(kn, full_matrices=False)
            keep_n = sn > rcond * sn[..., :1]
            sinv_n = np.where(keep_n, 1.0 / np.where(keep_n, sn, 1.0), 0.0)
            kpinv = np.matmul(np.conj(np.swapaxes(Vhn, -1, -2)) * sinv_n[..., None, :],
                              np.conj(np.swapaxes(Un, -1, -2)))
        self.kpinv = torch.from_numpy(np.ascontiguousarray(kpinv)).to(self.device, self.khat.dtype)  # K̂⁺: (H, Wr, C_in, C_out)
        self._svd = (Un, sn, Vhn)
        s = torch.from_numpy(sn)
        keep = torch.from_numpy(keep_n)
        smin = s[..., -1]
        self.freq_rank_min = int(keep.sum(-1).min())
        self.freq_cond_max = float((s[..., 0] / smin).max()) if bool((smin > 0).all()) else float("inf")
        # circulant preconditioners for fft-pcg: (K̂K̂ᴴ + ε)⁻¹ (MDP) and (K̂ᴴK̂ + ε)⁻¹ (CCP)
        eps = reg * float(s.max()) ** 2
        self._reg = eps
        self._pre = {}

    # ------------------------------------------------------------------ spectra helpers
    def _fft(self, x: torch.Tensor) -> torch.Tensor:
        return torch.fft.rfft2(x)

    def _ifft(self, X: torch.Tensor) -> torch.Tensor:
        return torch.fft.irfft2(X, s=(self.H, self.W))

    @staticmethod
    def _mul(Mf: torch.Tensor, X: torch.Tensor) -> torch.Tensor:
        """Per-frequency product: Mf (H, Wr, p, q) times X (N, q, H, Wr) → (N, p, H, Wr)."""
        # contiguous operands: torch's complex batched matmul on strided views is ~100x slower
        Xf = X.permute(2, 3, 1, 0).contiguous()  # (H, Wr, q, N)
        return (Mf @ Xf).permute(3, 2, 0, 1).contiguous()

    def pad(self, y: torch.Tensor) -> torch.Tensor:
        """``Sᵀ``: an output batch placed at offset (kh−1, kw−1) of a zero H×W grid."""
        out = torch.zeros((y.shape[0], self.C_out, self.H, self.W), dtype=y.dtype, device=y.device)
        out[:, :, self.kh - 1:, self.kw - 1:] = y
        return out

    def crop(self, c: torch.Tensor) -> torch.Tensor:
        """``S``: the valid positions of a circular-convolution output."""
        return c[:, :, self.kh - 1:, self.kw - 1:]

    def circular(self, a: torch.Tensor) -> torch.Tensor:
        """``C a`` — the circular convolution ``a ∗ K̃`` on the H×W grid (all positions)."""
        return self._ifft(self._mul(self.khat, self._fft(a)))

    def forward(self, a: torch.Tensor) -> torch.Tensor:
        """``W a = S C a`` (equals the network's conv, Eq. 9 without bias)."""
        return self.crop(self.circular(a))

    def adjoint(self, y: torch.Tensor) -> torch.Tensor:
        """``Wᵀ y = Cᵀ Sᵀ y``."""
        return self._ifft(self._mul(self.khat.mH, self._fft(self.pad(y))))

    def boundary_term(self, a: torch.Tensor) -> torch.Tensor:
        """``Σ_m G_{n,m}[a]`` (Eq. 15) as a spectrum (N, C_out, H, Wr): ``F(B C a)``."""
        c = self.circular(a)
        c[:, :, self.kh - 1:, self.kw - 1:] = 0.0  # keep only the wrapped-around boundary strip B
        return self._fft(c)

    # ------------------------------------------------------------------ the paper's solve
    def _check(self, t: torch.Tensor, shape: tuple[int, ...], what: str) -> torch.Tensor:
        if tuple(t.shape[1:]) != shape:
            raise ValueError(f"FFTConvSolver: {what} must have shape (N, {', '.join(map(str, shape))}), got {tuple(t.shape)}")
        return t.to(device=self.device, dtype=self.dtype)

    def solve(self, a_hat: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """The FFT reconstruction ``a*`` for ``W a ≈ target = z* − b`` (Eqs. 17–20).

        ``a_hat`` (N, C_in, H, W), ``target`` (N, C_out, H', W'); returns (N, C_in, H, W).
        """
        a_hat = self._check(a_hat, self.in_shape, "a_hat")
        target = self._check(target, self.out_shape, "z* − b")
        A = self._fft(a_hat)  # Eq. 13
        KA = self._mul(self.khat, A)
        c = self._ifft(KA)  # C â
        c[:, :, self.kh - 1:, self.kw - 1:] = 0.0  # B C â: the boundary elements of Eq. 15
        rhs = self._fft(self.pad(target) + c)  # F(pad(z* − b)) + G[â]  (right-hand side of Eq. 19)
        if self.case == "MDP":  # Eq. 19: closest F(a) to F(â) on the per-frequency constraint
            Fa = A + self._mul(self.kpinv, rhs - KA)
        else:  # Eq. 20: per-frequency least squares
            Fa = self._mul(self.kpinv, rhs)
        return self._ifft(Fa)

    # ------------------------------------------------------------------ fft-pcg operators
    def _precond(self, which: str) -> torch.Tensor:
        P = self._pre.get(which)
        if P is None:
            Un, sn, Vhn = self._svd
            # from the SVD K̂ = U s Vᴴ: K̂K̂ᴴ = U s² Uᴴ, K̂ᴴK̂ = V s² Vᴴ; the shift ε makes the
            # inverse SPD on the complement too (only matters when the Gram matrix is singular)
            B = Un if which == "mdp" else np.conj(np.swapaxes(Vhn, -1, -2))
            d = sn**2
            Bh = np.conj(np.swapaxes(B, -1, -2))
            n = B.shape[-2]
            with small_lapack():
                A = (B * d[..., None, :]) @ Bh
                inv = (B * (1.0 / (d + self._reg))[..., None, :]) @ Bh
                if B.shape[-1] < n:  # singular Gram matrix: ε⁻¹ on the orthogonal complement of range(B)
                    inv = inv + (np.eye(n) - B @ Bh) / self._reg
            to = lambda m: torch.from_numpy(np.ascontiguousarray(m)).to(self.device, self.khat.dtype)  # noqa: E731
            P = to(inv)
            self._pre[which] = P
            self._pre[which + "_A"] = to(A)
        return P

    def precondition(self, case: str) -> None:
        """Build (once) the circulant preconditioner of ``case`` ("MDP" or "CCP") now, so that
        its cost is paid up front (``fft-pcg`` otherwise builds it on first use)."""
        if case not in ("MDP", "CCP"):
            raise ValueError(f"FFTConvSolver.precondition: case must be 'MDP' or 'CCP', got {case!r}")
        self._precond(case.lower())

    def WWt(self, y: torch.Tensor) -> torch.Tensor:
        """``W Wᵀ y = S (C Cᵀ) Sᵀ y``, one ``C_out × C_out`` product per frequency."""
        self._precond("mdp")
        return self.crop(self._ifft(self._mul(self._pre["mdp_A"], self._fft(self.pad(y)))))

    def M_mdp(self, y: torch.Tensor) -> torch.Tensor:
        """Preconditioner ``S (C Cᵀ)⁻¹ Sᵀ`` ≈ ``(W Wᵀ)⁻¹`` (the FFT-MDP solve)."""
        return self.crop(self._ifft(self._mul(self._precond("mdp"), self._fft(self.pad(y)))))

    def WtW(self, x: torch.Tensor) -> torch.Tensor:
        """``Wᵀ W x = Cᵀ (Sᵀ S) C x``."""
        return self.adjoint(self.forward(x))

    def M_ccp(self, x: torch.Tensor) -> torch.Tensor:
        """Preconditioner ``(Cᵀ C)⁻¹`` ≈ ``(Wᵀ W)⁻¹`` (the FFT-CCP solve)."""
        return self._ifft(self._mul(self._precond("ccp"), self._fft(x)))

    def info(self) -> dict:
        return {"fft_case": self.case, "freq_cond_max": self.freq_cond_max, "freq_rank_min": self.freq_rank_min,
                "grid": (self.H, self.W), "kernel": (self.kh, self.kw)}
