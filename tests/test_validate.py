"""linop.validate: the one validation of unit selections, images, batches, labels and dtypes."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from linop import validate


# ---------------------------------------------------------------------------- units
@given(st.integers(1, 40).flatmap(lambda n: st.tuples(st.just(n), st.lists(st.booleans(), min_size=n, max_size=n))))
def test_boolean_mask_selects_its_true_positions(case):
    n, mask = case
    m = np.array(mask, dtype=bool)
    if not m.any():
        with pytest.raises(ValueError, match="units selects no unit"):
            validate.units(m, n)
        return
    for form in (m, torch.as_tensor(m), list(m)):
        assert validate.units(form, n).tolist() == np.flatnonzero(m).tolist()


@given(st.integers(1, 40).flatmap(lambda n: st.tuples(st.just(n), st.lists(st.integers(0, n - 1), min_size=1,
                                                                             max_size=n, unique=True))))
def test_integer_indices_pass_in_order(case):
    n, idx = case
    for form in (idx, np.array(idx, dtype=np.int32), torch.tensor(idx)):
        sel = validate.units(form, n)
        assert sel.dtype == torch.int64 and sel.tolist() == idx


@pytest.mark.parametrize("bad, err, needle", [
    (np.array([True] + [False] * 9), ValueError, "one entry per unit"),  # mask of 10 for 12 units
    ([1.7], ValueError, "floats"),
    ([1.0], ValueError, "floats"),  # no silent cast, even when integral
    ([], ValueError, "selects no unit"),
    (np.array([], dtype=np.int64), ValueError, "selects no unit"),
    ([3, 3], ValueError, "repeats indices \\[3\\]"),
    ([12], ValueError, r"in \[0, 12\)"),
    ([-1], ValueError, r"in \[0, 12\)"),
    ("0", TypeError, "units"),
    (True, TypeError, "scalar True"),
    ({0: 1}, TypeError, "units"),
    ([[0, 1], [2]], ValueError, "units"),  # ragged
    (np.array([1 + 1j]), TypeError, "real numbers"),
])
def test_bad_unit_selections_name_the_argument(bad, err, needle):
    with pytest.raises(err, match=needle) as info:
        validate.units(bad, 12)
    assert str(info.value).startswith("units")


def test_units_none_slice_and_scalar():
    assert validate.units(None, 4).tolist() == [0, 1, 2, 3]
    assert validate.units(slice(1, None, 2), 5).tolist() == [1, 3]
    assert validate.units(2, 5).tolist() == [2]
    with pytest.raises(ValueError, match="selects no unit"):
        validate.units(slice(3, 3), 5)


# ---------------------------------------------------------------------------- dtypes / images
@pytest.mark.parametrize("dt", [torch.float16, torch.bfloat16, np.float16, "float16", torch.int64, np.complex128])
def test_dtype_refuses_non_compute_dtypes(dt):
    with pytest.raises(ValueError, match="dtype must be float32 or float64"):
        validate.dtype(dt)


@pytest.mark.parametrize("dt, want", [(torch.float32, torch.float32), (np.float64, torch.float64),
                                      ("float64", torch.float64), ("torch.float32", torch.float32)])
def test_dtype_accepts_float32_float64(dt, want):
    assert validate.dtype(dt) is want


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_image_refuses_non_finite(bad):
    x = torch.zeros(1, 3, 3, dtype=torch.float64)
    x[0, 1, 2] = bad
    with pytest.raises(ValueError, match="x holds 1 NaN / Inf"):
        validate.image(x)
    with pytest.raises(ValueError, match="images holds 1 NaN / Inf"):
        validate.batch(x.numpy(), torch.float64, "images")


def test_image_dtypes():
    with pytest.raises(ValueError, match="x has dtype torch.float16"):
        validate.image(torch.zeros(2, dtype=torch.float16), torch.float64)
    with pytest.raises(ValueError, match="x has dtype torch.bfloat16"):
        validate.image(torch.zeros(2, dtype=torch.bfloat16))
    with pytest.raises(ValueError, match="x has dtype float16"):
        validate.image(np.zeros(2, dtype=np.float16))
    with pytest.raises(TypeError, match="x must hold real numbers"):
        validate.image(torch.zeros(2, dtype=torch.complex128))
    with pytest.raises(TypeError, match="x must be an array"):
        validate.image("img")
    # integers are cast exactly (checked bound: 2**53 in float64, 2**24 in float32)
    ints = np.array([[0, 255, -7]], dtype=np.int64)
    assert torch.equal(validate.image(ints, torch.float64), torch.tensor([[0.0, 255.0, -7.0]], dtype=torch.float64))
    with pytest.raises(ValueError, match="not exact in torch.float32"):
        validate.image(np.array([2**24 + 1]), torch.float32)
    with pytest.raises(TypeError, match="integer dtype"):
        validate.image(ints)  # no compute dtype given: no guess


def test_batch_refuses_empty():
    with pytest.raises(ValueError, match="x is an empty batch"):
        validate.batch(torch.zeros(0, 1, 4, 4), torch.float64, sample_ndim=3)
    one = validate.batch(torch.ones(1, 4, 4), torch.float64, sample_ndim=3)  # a single sample passes
    assert one.shape == (1, 4, 4)


def test_labels():
    assert validate.labels([1, 0], 2, 3).dtype == torch.int64
    with pytest.raises(ValueError, match="y: labels must be integers"):
        validate.labels([1.0, 0.0], 2, 3)
    with pytest.raises(ValueError, match=r"y: label 3 out of range \[0, 3\)"):
        validate.labels([1, 3], 2, 3)
    with pytest.raises(ValueError, match=r"y: labels must have shape \(2,\)"):
        validate.labels([1], 2, 3)
