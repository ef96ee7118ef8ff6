"""2-D convolution as an explicit linear operator (no bias: biases enter through ``R_l``).

Seed 000 writes every convolutional layer of the equivalent model as ``c_l = W_l p_{l-1} +
R_l x_b`` (Eq. 3, appendix C, Eq. C.6/C.8).  :class:`Conv2d` is ``W_l``: a matrix of shape
``(C_out·H_out·W_out, C_in·H·W)`` acting on NCHW tensors flattened in C order, in three
agreeing forms — ``F.conv2d`` (forward) / ``F.conv_transpose2d`` (adjoint) through torch,
and the explicit CSR matrix assembled by a compiled (numba) kernel straight into CSR order.

This module also holds the small helpers (argument parsing, CSR sizing, GPU move) that the
other operator modules share.
"""
from __future__ import annotations

from typing import Any, Sequence

import numba
import numpy as np
import scipy.sparse
import torch
import torch.nn.functional as F

from .. import backend
from . import conv_gemm, conv_nhwc
from .base import Operator, as_shape, numpy_dtype

__all__ = ["Conv2d", "DEFAULT_MAX_SPARSE_BYTES"]

# --------------------------------------------------------------------------- helpers

#: Default ceiling on the memory an explicit CSR matrix may take (bytes).  The machines
#: this runs on are shared; callers who really want a larger matrix pass ``max_bytes``.
DEFAULT_MAX_SPARSE_BYTES = 4 * 2**30


def pair(value: Any, name: str, minimum: int = 1) -> tuple[int, int]:
    """``int`` or 2-sequence -> ``(a, b)`` of ints ``>= minimum``; clear error otherwise."""
    if isinstance(value, (int, np.integer)) and not isinstance(value, bool):
        out = (int(value), int(value))
    else:
        try:
            out = tuple(int(v) for v in value)
        except TypeError:
            raise ValueError(f"{name} must be an int or a pair of ints, got {value!r}") from None
        if len(out) != 2:
            raise ValueError(f"{name} must be an int or a pair of ints, got {value!r}")
    if min(out) < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value!r}")
    return out  # type: ignore[return-value]


def as_cpu_tensor(a: Any, name: str) -> torch.Tensor:
    """A detached CPU float tensor copy of a numpy array / torch tensor / cupy array."""
    if isinstance(a, torch.Tensor):
        t = a.detach().to("cpu").clone()
    else:
        try:
            arr = np.array(backend.to_numpy(a), copy=True)
        except (TypeError, ValueError) as exc:  # ragged nesting and the like
            raise TypeError(f"{name} must be an array / tensor of real numbers ({exc})") from None
        if arr.dtype.kind not in "biuf":  # strings, objects, complex: torch's message names no argument
            raise TypeError(f"{name} must be an array / tensor of real numbers, got {type(a).__name__} of dtype {arr.dtype}")
        t = torch.from_numpy(arr)
    if t.dtype not in (torch.float32, torch.float64):
        if t.is_floating_point() or t.dtype in (torch.int8, torch.int16, torch.int32, torch.int64, torch.uint8, torch.bool):
            t = t.to(torch.float64)
        else:
            raise ValueError(f"{name} must be a real float32/float64 array, got dtype {t.dtype}")
    return t.contiguous()


def index_dtype(nnz: int, n: int) -> type:
    """int32 indices when they fit (what scipy would pick), else int64."""
    return np.int32 if max(nnz, n) < 2**31 - 1 else np.int64


def check_sparse_size(what: str, nnz: int, n_rows: int, dtype: Any, max_bytes: int | None) -> None:
    """Refuse, before allocating, a CSR matrix larger than ``max_bytes``."""
    limit = DEFAULT_MAX_SPARSE_BYTES if max_bytes is None else int(max_bytes)
    itype = index_dtype(nnz, n_rows)
    need = nnz * (np.dtype(dtype).itemsize + np.dtype(itype).itemsize) + (n_rows + 1) * np.dtype(itype).itemsize
    if need > limit:
        raise MemoryError(
            f"{what}.to_sparse: the CSR matrix would hold nnz={nnz:,} entries "
            f"(~{need / 2**30:.2f} GiB) > max_bytes={limit:,} bytes; use the matrix-free "
            f"matvec/rmatvec instead, build a smaller operator (fewer channels / smaller input), "
            f"or pass a larger max_bytes"
        )


def finish_csr(A: scipy.sparse.csr_matrix, gpu: bool):
    """Move a host CSR matrix to the GPU (cupyx) when asked."""
    if not gpu:
        return A
    if not backend.cupy_available():
        raise RuntimeError("to_sparse(gpu=True) needs cupy and a CUDA device")
    return backend.get_sparse_module(backend._cupy.empty(0)).csr_matrix(A)


def result_dtype(*dtypes: Any) -> np.dtype:
    return np.result_type(*[np.dtype(d) for d in dtypes])


def sample_tensor(x: Any, ndim: int, name: str) -> torch.Tensor:
    """One sample as a CPU tensor with ``ndim`` dims (a leading batch axis of 1 is dropped)."""
    t = backend.to_torch(x) if not isinstance(x, torch.Tensor) else x
    t = t.detach().to("cpu")
    if t.dim() == ndim + 1 and t.shape[0] == 1:
        t = t[0]
    if t.dim() != ndim:
        raise ValueError(f"{name} must be one sample with {ndim} dims, got shape {tuple(t.shape)}")
    if not t.is_floating_point():
        t = t.to(torch.float64)
    return t.contiguous()


def seq_of_ops(ops: Sequence[Any], name: str) -> list:
    from .base import Operator

    ops = list(ops)
    if not ops:
        raise ValueError(f"{name} needs at least one operator, got none")
    for i, op in enumerate(ops):
        if not isinstance(op, Operator):
            raise ValueError(f"{name}: ops[{i}] must be a linop Operator, got {type(op).__name__}")
    return ops

def parse_padding(padding: Any, kernel: tuple[int, int], dilation: tuple[int, int], stride: tuple[int, int],
                  name: str = "padding") -> tuple[int, int, int, int]:
    """``padding`` -> ``(top, bottom, left, right)`` following torch's conventions.

    Accepts an int, ``(ph, pw)``, ``(top, bottom, left, right)``, ``"valid"`` (no padding)
    or ``"same"`` (output size = input size; total ``d·(k-1)`` split with the smaller half
    first, like torch; only for stride 1, like torch)."""
    if isinstance(padding, str):
        if padding == "valid":
            return (0, 0, 0, 0)
        if padding == "same":
            if stride != (1, 1):
                raise ValueError(f"{name}='same' is not supported for strided convolutions (stride={stride})")
            th, tw = dilation[0] * (kernel[0] - 1), dilation[1] * (kernel[1] - 1)
            return (th // 2, th - th // 2, tw // 2, tw - tw // 2)
        raise ValueError(f"{name} must be an int, a pair, a 4-tuple, 'same' or 'valid'; got {padding!r}")
    if isinstance(padding, (int, np.integer)) and not isinstance(padding, bool):
        p = (int(padding),) * 4
    else:
        try:
            vals = tuple(int(v) for v in padding)
        except TypeError:
            raise ValueError(f"{name} must be an int, a pair, a 4-tuple, 'same' or 'valid'; got {padding!r}") from None
        if len(vals) == 2:
            p = (vals[0], vals[0], vals[1], vals[1])
        elif len(vals) == 4:
            p = vals  # type: ignore[assignment]
        else:
            raise ValueError(f"{name} must be an int, a pair, a 4-tuple, 'same' or 'valid'; got {padding!r}")
    if min(p) < 0:
        raise ValueError(f"{name} must be non-negative, got {padding!r}")
    return p  # type: ignore[return-value]


def conv_out_size(n: int, pad_lo: int, pad_hi: int, k: int, d: int, s: int) -> int:
    """Output length of a 1-D convolution (floor mode)."""
    return (n + pad_lo + pad_hi - d * (k - 1) - 1) // s + 1


def valid_taps(n_in: int, n_out: int, k: int, s: int, d: int, pad_lo: int) -> np.ndarray:
    """Boolean ``(n_out, k)``: tap ``t`` of output ``o`` reads an in-bounds input."""
    pos = np.arange(n_out)[:, None] * s - pad_lo + np.arange(k)[None, :] * d
    return (pos >= 0) & (pos < n_in)


@numba.njit(cache=True, nogil=True)
def _conv_csr_fill(weight, H, W, Ho, Wo, sh, sw, pt, pl, dh, dw, cog, indptr, indices, data):  # pragma: no cover - compiled
    # Rows in (co, oh, ow) order; inside a row the columns come out ascending because
    # (ci, ih, iw) increase lexicographically with (ci, ki, kj) — so no sort is needed.
    c_out, cig, kh, kw = weight.shape
    for co in range(c_out):
        cbase = (co // cog) * cig
        for oh in range(Ho):
            for ow in range(Wo):
                r = (co * Ho + oh) * Wo + ow
                p, end = indptr[r], indptr[r + 1]
                for ci in range(cig):
                    plane = (cbase + ci) * H
                    for ki in range(kh):
                        ih = oh * sh - pt + ki * dh
                        if ih < 0 or ih >= H:
                            continue
                        rowbase = (plane + ih) * W
                        for kj in range(kw):
                            iw = ow * sw - pl + kj * dw
                            if iw < 0 or iw >= W:
                                continue
                            if p >= end:  # never write past the predicted row (guards memory)
                                return r
                            indices[p] = rowbase + iw
                            data[p] = weight[co, ci, ki, kj]
                            p += 1
                if p != end:  # row count disagrees with indptr
                    return r
    return -1


# --------------------------------------------------------------------------- Conv2d
class Conv2d(Operator):
    r"""2-D cross-correlation (torch ``conv2d``) without bias, as a linear operator ``W_l``.

    Parameters
    ----------
    weight : array or tensor, shape ``(C_out, C_in / groups, kh, kw)``
        Kernel (stored as a CPU torch tensor; float32/float64, ints are promoted to float64).
    input_shape : (C_in, H, W)
        Per-sample input shape.
    stride, dilation : int or (int, int)
    padding : int, (ph, pw), (top, bottom, left, right), ``"same"`` or ``"valid"``
        Zero padding.  Asymmetric padding is applied with ``F.pad`` before the convolution.
    groups : int
        Grouped convolution; ``C_in`` and ``C_out`` must be divisible by it.
    padding_mode : str
        Only ``"zeros"``: other modes are not linear maps of this form that the sparse
        assembly implements (``NotImplementedError``).

    Notes
    -----
    Matrix entry ``[(co, oh, ow), (ci, ih, iw)] = weight[co, ci - g·C_in/groups, ki, kj]``
    with ``ih = oh·sh - top + ki·dh`` and ``iw = ow·sw - left + kj·dw``.  ``to_sparse()`` stores
    one entry per *in-bounds* tap (padding taps are never stored); taps whose weight is
    exactly zero are kept as structural entries, so the pattern depends only on the geometry.

    *Evaluation.*  ``apply`` / ``apply_adjoint`` call ``F.conv2d`` / ``F.conv_transpose2d``,
    except for CPU float64 groups-1 convolutions with kernels > 1×1 and enough channels
    (:func:`conv_gemm.choose`): NCHW batches, stride 1, images of ≥ 128 pixels run as ``k_h·k_w``
    shifted GEMMs per image on one padded CNHW copy (:mod:`linop.operators.conv_gemm`: 1.5–2.3×
    torch's ``slow_conv2d`` here); channels-last batches (the sweep's) in their own layout
    (:mod:`linop.operators.conv_nhwc`): one patch GEMM per image (any stride; NHWC shifted GEMMs
    where :data:`conv_gemm.NHWC_SHIFT_PIXELS` asks), returning channels-last; adjoints (stride 1) as
    the convolution with the flipped, transposed kernel when ``2·C_in >= C_out`` — the same
    operator, summed in a different order, each image's values independent of the batch it is in.  ``LINOP_CONV64=torch`` (or
    ``linop.operators.conv_gemm.CONV64 = "torch"``) keeps torch's path everywhere.
    """

    def __init__(
        self,
        weight: Any,
        input_shape: Sequence[int],
        stride: int | Sequence[int] = 1,
        padding: int | str | Sequence[int] = 0,
        dilation: int | Sequence[int] = 1,
        groups: int = 1,
        padding_mode: str = "zeros",
    ):
        if padding_mode != "zeros":
            raise NotImplementedError(f"Conv2d: padding_mode={padding_mode!r} is not supported (only 'zeros')")
        w = as_cpu_tensor(weight, "weight")
        if w.dim() != 4:
            raise ValueError(f"Conv2d: weight must have shape (C_out, C_in/groups, kh, kw), got {tuple(w.shape)}")
        in_shape = as_shape(input_shape, "input_shape")
        if len(in_shape) != 3:
            raise ValueError(f"Conv2d: input_shape must be (C, H, W), got {tuple(input_shape)}")
        if isinstance(groups, bool) or not isinstance(groups, (int, np.integer)) or groups < 1:
            raise ValueError(f"Conv2d: groups must be a positive int, got {groups!r}")
        groups = int(groups)
        c_out, cig, kh, kw = (int(s) for s in w.shape)
        if min(c_out, cig, kh, kw) < 1:
            raise ValueError(f"Conv2d: weight has an empty dimension, shape {tuple(w.shape)}")
        if not torch.isfinite(w).all():
            raise ValueError("Conv2d: weight contains NaN or inf")
        c_in, H, W = in_shape
        if c_out % groups:
            raise ValueError(f"Conv2d: out channels {c_out} not divisible by groups={groups}")
        if c_in % groups:
            raise ValueError(f"Conv2d: input channels {c_in} not divisible by groups={groups}")
        if cig * groups != c_in:
            raise ValueError(
                f"Conv2d: input_shape has C_in={c_in} channels but weight expects "
                f"C_in/groups={cig} x groups={groups} = {cig * groups}"
            )
        self.stride = pair(stride, "stride")
        self.dilation = pair(dilation, "dilation")
        self.groups = groups
        self.kernel_size = (kh, kw)
        self.padding = parse_padding(padding, self.kernel_size, self.dilation, self.stride)
        pt, pb, pl, pr = self.padding
        eh, ew = self.dilation[0] * (kh - 1) + 1, self.dilation[1] * (kw - 1) + 1
        if H + pt + pb < eh or W + pl + pr < ew:
            raise ValueError(
                f"Conv2d: (dilated) kernel {eh}x{ew} is larger than the padded input "
                f"{H + pt + pb}x{W + pl + pr} (input_shape={in_shape}, padding={self.padding})"
            )
        Ho = conv_out_size(H, pt, pb, kh, self.dilation[0], self.stride[0])
        Wo = conv_out_size(W, pl, pr, kw, self.dilation[1], self.stride[1])
        self.weight = w
        super().__init__(in_shape, (c_out, Ho, Wo), dtype=numpy_dtype(w.dtype))
        self._symmetric = pt == pb and pl == pr
        # output_padding of the transposed conv that restores the (padded) input size
        self._out_pad = (
            H + pt + pb - ((Ho - 1) * self.stride[0] + eh),
            W + pl + pr - ((Wo - 1) * self.stride[1] + ew),
        )

    # ------------------------------------------------------------------ torch path
    def _apply(self, x: torch.Tensor) -> torch.Tensor:
        how = conv_gemm.choose(x, self.out_shape[0], self.kernel_size, self.stride, self.groups, self.padding)
        if how != "torch":  # CPU float64: the same operator evaluated by GEMMs (conv_gemm / conv_nhwc notes)
            return self._gemm(how, x, False, self.stride, self.padding)
        w = self._param("weight", x)
        pt, pb, pl, pr = self.padding
        if self._symmetric:
            return F.conv2d(x, w, None, self.stride, (pt, pl), self.dilation, self.groups)
        return F.conv2d(F.pad(x, (pl, pr, pt, pb)), w, None, self.stride, 0, self.dilation, self.groups)

    def _apply_adjoint(self, y: torch.Tensor) -> torch.Tensor:
        # stride 1: the transposed conv is the conv of y with the flipped, transposed kernel
        # padded by d·(k-1) - p (conv_gemm.adjoint_padding; negative = crop: torch's path)
        apad = conv_gemm.adjoint_padding(self.padding, self.kernel_size, self.dilation)
        how = conv_gemm.choose(y, self.in_shape[0], self.kernel_size, self.stride, self.groups, apad, adjoint=True)
        if how != "torch":
            return self._gemm(how, y, True, (1, 1), apad)
        w = self._param("weight", y)
        pt, pb, pl, pr = self.padding
        _, H, W = self.in_shape
        if self._symmetric:
            return F.conv_transpose2d(y, w, None, self.stride, (pt, pl), self._out_pad, self.groups, self.dilation)
        z = F.conv_transpose2d(y, w, None, self.stride, 0, self._out_pad, self.groups, self.dilation)
        return z[:, :, pt:pt + H, pl:pl + W].contiguous()

    def _gemm(self, how: str, x: torch.Tensor, adjoint: bool, stride: tuple[int, int],
              padding: Sequence[int]) -> torch.Tensor:
        """The convolution (``adjoint``: of the flipped, transposed kernel) by strategy ``how`` of
        :func:`conv_gemm.strategy`."""
        w = self._taps(x, adjoint, how)
        if how == "cnhw":
            return conv_gemm.conv2d_shifted_gemm(x, w, self.kernel_size, padding, self.dilation)
        if how == "nhwc":
            return conv_nhwc.conv2d_nhwc_shifted(x, w, self.kernel_size, padding, self.dilation)
        return conv_nhwc.conv2d_nhwc_im2col(x, w, self.kernel_size, stride, padding, self.dilation)

    def sweep_workspace(self, itemsize: int, channels_last: bool) -> int:
        """Elements per tangent of this convolution's workspace (the memory plan's term).

        CPU float64 convolutions that :func:`conv_gemm.strategy` sends to a GEMM strategy:

        * ``"cnhw"`` / ``"nhwc"`` (shifted GEMMs, stride 1): the padded input and the output grid,
          ``(C_in + C_out)·G`` per tangent (``G`` the padded image slot of
          :func:`conv_gemm.slot`; the result is a view of the grid);
        * ``"patch"`` (channels-last): the padded NHWC copy and the output,
          ``C_in·(H + t + b)·(W + l + r) + C_out·H_out·W_out`` per tangent (its one patch matrix
          ``H_out·W_out·k_h·k_w·C_in`` is per batch, not per tangent).

        Other float64 convolutions (and any dtype without oneDNN) run torch's ``slow_conv2d``: an
        im2col column buffer of ``C_in·k_h·k_w·H_out·W_out`` elements per batch entry for the
        whole batch (measured: a float64 3×3 conv of a 32 MB batch grows the RSS by 9 × 32 MB +
        the output).  oneDNN (float32 on the CPU) works without columns (0); its layout reorders
        are covered by the memory plan's generic one-input-one-output temporaries."""
        if itemsize == 4 and torch.backends.mkldnn.is_available():
            return 0
        C, H, W = (int(v) for v in self.in_shape)
        c_out, Ho, Wo = (int(v) for v in self.out_shape)
        nhwc = bool(channels_last) and C > 1 and H * W > 1  # conv_nhwc.is_nhwc of such batches
        how = conv_gemm.strategy((C, H, W), c_out, self.kernel_size, self.stride, self.groups, self.padding,
                                 torch.float64 if itemsize == 8 else torch.float32, nhwc=nhwc)
        if how in ("cnhw", "nhwc"):
            return conv_gemm.workspace(C, c_out, H, W, self.padding, self.kernel_size, self.dilation)
        if how == "patch":
            return conv_nhwc.im2col_workspace(C, c_out, H, W, self.padding, Ho, Wo)
        kh, kw = self.kernel_size
        return int(self.weight.shape[1]) * int(self.groups) * kh * kw * Ho * Wo

    def _taps(self, like: torch.Tensor, adjoint: bool, how: str = "cnhw") -> torch.Tensor:
        """The weight in the form strategy ``how`` multiplies by, on ``like``'s device / dtype,
        cached: per-tap matrices (:func:`conv_gemm.tap_weights`; ``"nhwc"``: transposed,
        :func:`conv_nhwc.nhwc_taps`) or the patch matrix (:func:`conv_nhwc.patch_weight`)."""
        key = ("taps", adjoint, how, like.device, like.dtype)
        t = self._param_cache.get(key)
        if t is None:
            w = self._param("weight", like)
            if how == "patch":  # the adjoint: the flipped kernel with C_in / C_out swapped
                t = conv_nhwc.patch_weight(w.flip(2, 3).transpose(0, 1) if adjoint else w)
            else:
                t = conv_gemm.tap_weights(w, adjoint)
                t = conv_nhwc.nhwc_taps(t) if how == "nhwc" else t
            self._param_cache[key] = t
        return t

    # ------------------------------------------------------------------ sparse form
    def _row_nnz(self) -> np.ndarray:
        """Stored entries per output row: ``C_in/groups · #valid(kh) · #valid(kw)``."""
        _, H, W = self.in_shape
        c_out, Ho, Wo = self.out_shape
        kh, kw = self.kernel_size
        pt, _, pl, _ = self.padding
        nh = valid_taps(H, Ho, kh, self.stride[0], self.dilation[0], pt).sum(1)
        nw = valid_taps(W, Wo, kw, self.stride[1], self.dilation[1], pl).sum(1)
        per_pos = (nh[:, None] * nw[None, :]).ravel() * int(self.weight.shape[1])
        return np.tile(per_pos, c_out)

    @property
    def nnz(self) -> int:
        """Number of entries ``to_sparse()`` stores (in-bounds taps)."""
        return int(self._row_nnz().sum())

    def _csr_arrays(self, dtype: Any, max_bytes: int | None):
        counts = self._row_nnz()
        nnz = int(counts.sum())
        check_sparse_size(type(self).__name__, nnz, self.shape[0], dtype, max_bytes)
        itype = index_dtype(nnz, max(self.shape))
        indptr = np.empty(self.shape[0] + 1, dtype=itype)
        indptr[0] = 0
        np.cumsum(counts, out=indptr[1:])
        indices = np.empty(nnz, dtype=itype)
        data = np.empty(nnz, dtype=dtype)
        w = self.weight.numpy().astype(dtype, copy=False)
        _, H, W = self.in_shape
        _, Ho, Wo = self.out_shape
        pt, _, pl, _ = self.padding
        cog = self.out_shape[0] // self.groups
        bad = _conv_csr_fill(np.ascontiguousarray(w), H, W, Ho, Wo, self.stride[0], self.stride[1], pt, pl,
                             self.dilation[0], self.dilation[1], cog, indptr, indices, data)
        if bad >= 0:  # internal consistency guard (cannot happen unless the geometry code is broken)
            raise RuntimeError(f"Conv2d: CSR row {bad} filled with a different count than predicted")
        return indptr, indices, data

    def to_sparse(self, gpu: bool = False, dtype: Any = None, max_bytes: int | None = None):
        """Explicit CSR matrix, assembled directly in sorted CSR order (no COO sort).

        Parameters
        ----------
        gpu : bool
            Return a ``cupyx.scipy.sparse.csr_matrix``.
        dtype : dtype, optional
            Value dtype (default: the weight's).
        max_bytes : int, optional
            Refuse (``MemoryError``, before allocating) matrices larger than this
            (default :data:`DEFAULT_MAX_SPARSE_BYTES`).
        """
        dt = numpy_dtype(dtype) if dtype is not None else self.dtype
        indptr, indices, data = self._csr_arrays(dt, max_bytes)
        A = scipy.sparse.csr_matrix((data, indices, indptr), shape=self.shape)
        A.has_sorted_indices = True
        A.has_canonical_format = True
        return finish_csr(A, gpu)

    def _coo(self):
        indptr, indices, data = self._csr_arrays(self.dtype, None)
        rows = np.repeat(np.arange(self.shape[0], dtype=indices.dtype), np.diff(indptr))
        return rows, indices, data

    def __repr__(self) -> str:
        return (f"<Conv2d {self.in_shape} -> {self.out_shape}, kernel={self.kernel_size}, stride={self.stride}, "
                f"padding={self.padding}, dilation={self.dilation}, groups={self.groups}, dtype={self.dtype}>")
