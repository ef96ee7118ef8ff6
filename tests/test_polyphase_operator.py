"""The polyphase permutation Π as an Operator (issue 14 follow-up).

* ``Polyphase`` in its three forms against two independent torch references: ``F.pixel_unshuffle``
  (square stride dividing H, W) and a strided-slice construction (any stride and size), with
  ``dottest`` both ways (``kit_forms.check_forms``); the torch path equals the references bit for
  bit (both only copy entries, so no rounding can occur).
* ``ΠᵀΠ = I`` and ``ΠΠᵀ = diag(existing)`` (``= I`` when the stride divides H and W), exactly.
* The exact statement of ``linop.solvers.fft_padded.polyphase``: a strided / padded / dilated /
  grouped conv is ``W = W_poly Π`` — as CSR matrices, exactly; as torch maps, forward and adjoint.
* The solver's Π is this operator: ``to_polyphase`` / ``from_polyphase`` are its torch forward /
  adjoint and ``missing_entries`` is ``~existing``.
"""
from __future__ import annotations

import numpy as np
import pytest
import scipy.sparse
import torch
import torch.nn.functional as F
from hypothesis import given
from hypothesis import strategies as st
from kit_convs import conv_from, conv_geometries
from kit_forms import RTOL, check_forms

from linop.operators import Chain, Conv2d, Polyphase, dottest
from linop.solvers.fft_padded.polyphase import (
    from_polyphase,
    missing_entries,
    polyphase_factors,
    polyphase_geometry,
    to_polyphase,
)

pytestmark = pytest.mark.usefixtures("one_thread")


def sliced(x: torch.Tensor, stride: tuple[int, int]) -> torch.Tensor:
    """Independent reference for Π: phase (a, b) is the strided slice ``x[..., a::s_h, b::s_w]``,
    written into a zero phase stack (a loop over the s_h s_w phases, not over entries)."""
    N, C, H, W = x.shape
    sh, sw = stride
    Hp, Wp = -(-H // sh), -(-W // sw)
    out = x.new_zeros((N, C, sh, sw, Hp, Wp))
    for a in range(sh):
        for b in range(sw):
            ph = x[:, :, a::sh, b::sw]
            out[:, :, a, b, : ph.shape[2], : ph.shape[3]] = ph
    return out.reshape(N, C * sh * sw, Hp, Wp)


# ============================================================================ three forms
@given(st.integers(1, 3), st.integers(1, 3), st.integers(1, 4), st.integers(1, 4))
def test_forms_pixel_unshuffle(C, r, h, w):
    """Square stride dividing H, W: Π is ``F.pixel_unshuffle`` and Πᵀ ``F.pixel_shuffle``."""
    op = Polyphase((C, r * h, r * w), r)
    check_forms(op, lambda x: F.pixel_unshuffle(x, r))
    x = torch.randn((2,) + op.in_shape, dtype=torch.float64)
    y = torch.randn((2,) + op.out_shape, dtype=torch.float64)
    assert torch.equal(op.apply(x), F.pixel_unshuffle(x, r))  # copies only: bit for bit
    assert torch.equal(op.apply_adjoint(y), F.pixel_shuffle(y, r))
    assert op.divisible


@given(st.integers(1, 3), st.integers(1, 9), st.integers(1, 9), st.integers(1, 3), st.integers(1, 3))
def test_forms_any_stride_and_size(C, H, W, sh, sw):
    """Any stride, H and W (not divisible: the embedding Π_e into the zero-extended stack)."""
    op = Polyphase((C, H, W), (sh, sw))
    assert op.out_shape == (C * sh * sw, -(-H // sh), -(-W // sw))
    A = check_forms(op, lambda x: sliced(x, (sh, sw)))
    assert A.nnz == C * H * W and np.all(A.data == 1.0)  # one 1 per column: a selection
    x = torch.randn((2,) + op.in_shape, dtype=torch.float64)
    assert torch.equal(op.apply(x), sliced(x, (sh, sw)))
    assert op.divisible == (H % sh == 0 and W % sw == 0)


@given(st.integers(1, 3), st.integers(1, 9), st.integers(1, 9), st.integers(1, 3), st.integers(1, 3))
def test_adjoint_is_inverse_on_range(C, H, W, sh, sw):
    """ΠᵀΠ = I; ΠΠᵀ = D, the 0/1 diagonal of the existing entries (I when divisible).  Exact:
    the products of 0/1 selection matrices are 0/1 sums of one term, the torch maps copies."""
    op = Polyphase((C, H, W), (sh, sw))
    P = op.to_sparse()
    eye = scipy.sparse.identity(op.shape[1], format="csr")
    assert (P.T @ P != eye).nnz == 0
    D = scipy.sparse.diags(op.existing.ravel().astype(np.float64), format="csr")
    assert (P @ P.T != D).nnz == 0
    assert op.existing.all() == op.divisible
    x = torch.randn((3,) + op.in_shape, dtype=torch.float64)
    y = torch.randn((3,) + op.out_shape, dtype=torch.float64)
    assert torch.equal(op.apply_adjoint(op.apply(x)), x)
    assert torch.equal(op.apply(op.apply_adjoint(y)), y * torch.from_numpy(op.existing))


# ============================================================================ W = W_poly Π
@st.composite
def convs(draw) -> Conv2d:
    """A random conv (:func:`kit_convs.conv_geometries`: channels, groups, kernel, stride 1–3,
    dilation, every padding form, H, W 2–10 multiples of the stride or not)."""
    return conv_from(draw(conv_geometries()))[1]


def check_factorisation(conv: Conv2d) -> None:
    w_poly, pi = polyphase_factors(conv)
    assert w_poly.stride == (1, 1) and w_poly.dilation == (1, 1) and pi.stride == conv.stride
    A = conv.to_sparse()
    # Exact, not merely close: Π has a single 1 in every column, so every entry of W_poly Π is
    # ONE product w·1 — a copied weight, no sum, no rounding.  (Phase taps where no original tap
    # lands are structural zeros of W_poly; `!=` compares values, so they count as zeros.)
    assert (w_poly.to_sparse() @ pi.to_sparse() != A).nnz == 0
    chain = Chain([pi, w_poly])
    assert (chain.to_sparse() != A).nnz == 0
    # torch maps: the same products summed in another order (conv2d vs the phase conv), plus
    # exact zeros: off by ≤ K·u·(|A||x|) with K ≤ 162 terms, so RTOL = 1e-12 of |A||x| (kit_forms).
    x = torch.randn((2,) + conv.in_shape, dtype=torch.float64)
    y = torch.randn((2,) + conv.out_shape, dtype=torch.float64)
    X, Y = x.reshape(2, -1).numpy().T, y.reshape(2, -1).numpy().T
    fwd_scale, adj_scale = abs(A) @ np.abs(X), abs(A).T @ np.abs(Y)
    fwd = chain.apply(x).reshape(2, -1).numpy().T - conv.apply(x).reshape(2, -1).numpy().T
    adj = chain.apply_adjoint(y).reshape(2, -1).numpy().T - conv.apply_adjoint(y).reshape(2, -1).numpy().T
    assert np.all(np.abs(fwd) <= RTOL * fwd_scale + 1e-300)
    assert np.all(np.abs(adj) <= RTOL * adj_scale + 1e-300)
    dottest(chain, rng=0)


@given(convs())
def test_conv_is_phase_conv_after_polyphase(conv):
    check_factorisation(conv)


@pytest.mark.parametrize("cin,cout,k,stride,pad,hw", [
    (16, 32, 3, 2, 1, 16),  # ResNet20's downsampling 3×3 conv (at half its spatial size)
    (16, 32, 1, 2, 0, 16),  # a 1×1 strided projection shortcut
    (3, 4, 3, 2, 1, 7),     # odd size: the embedding Π_e
])
def test_resnet_like_strided_convs(cin, cout, k, stride, pad, hw):
    w = torch.tensor(np.random.default_rng(cin + cout).standard_normal((cout, cin, k, k)))
    check_factorisation(Conv2d(w, (cin, hw, hw), stride=stride, padding=pad))


# ============================================================================ the solver's Π
@given(st.integers(1, 3), st.integers(1, 9), st.integers(1, 9), st.integers(1, 3), st.integers(1, 3))
def test_solver_polyphase_is_the_operator(C, H, W, sh, sw):
    """``to_polyphase`` / ``from_polyphase`` / ``missing_entries`` of the solver are Π's torch
    forward / adjoint / ``~existing``, bit for bit (also on a non-contiguous input)."""
    op = Polyphase((C, H, W), (sh, sw))
    x = torch.randn((2, C, W, H), dtype=torch.float64).transpose(2, 3)  # non-contiguous
    y = torch.randn((2,) + op.out_shape, dtype=torch.float64)
    assert torch.equal(to_polyphase(x, (sh, sw)), op.apply(x))
    assert torch.equal(from_polyphase(y, (sh, sw), (H, W)), op.apply_adjoint(y))
    miss = missing_entries(polyphase_geometry((H, W), (1, 1), (0, 0, 0, 0), (sh, sw)), C)
    assert (miss is None) == op.divisible
    if miss is not None:
        assert np.array_equal(miss, ~op.existing)


# ============================================================================ bad input
@pytest.mark.parametrize("make,exc,word", [
    (lambda: Polyphase((2, 4), 2), ValueError, "input_shape"),
    (lambda: Polyphase((2, 4.0, 4), 2), TypeError, "input_shape"),
    (lambda: Polyphase((2, 4, 4), 0), ValueError, "stride"),
    (lambda: Polyphase((2, 4, 4), (1, 2, 3)), ValueError, "stride"),
    (lambda: Polyphase((2, 4, 4), "2"), ValueError, "stride"),
    (lambda: Polyphase((2, 4, 4), 2).apply(torch.zeros(1, 2, 4, 5)), ValueError, "input"),
    (lambda: polyphase_factors(Polyphase((2, 4, 4), 2)), TypeError, "conv"),
])
def test_bad_input(make, exc, word):
    with pytest.raises(exc, match=word):
        make()
