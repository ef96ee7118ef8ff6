"""Optimal embedding (seed 001 §3.3): MA (Eq. 22) and NE (Algorithm 1, Eqs. 25–33)."""
from itertools import combinations

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from scipy.optimize import linprog

from linop.reverse.embed import embed, ne_multipliers

# Entries drawn from a small integer grid (plus a float scale) so that ties — between
# competitors, and between competitors and the label — occur often.
batches = st.integers(1, 4).flatmap(
    lambda N: st.integers(2, 6).flatmap(
        lambda n: st.tuples(
            st.lists(st.lists(st.integers(-3, 3), min_size=n, max_size=n), min_size=N, max_size=N),
            st.lists(st.integers(0, n - 1), min_size=N, max_size=N),
            st.sampled_from([1.0, 0.37, 1e3]),
        )
    )
)


def brute_force_ne(a: np.ndarray, y: int) -> float:
    """Smallest ||a − â||₂ over every active set I ⊆ {i ≠ y} (all feasible KKT candidates)."""
    others = [i for i in range(a.size) if i != y]
    best = np.inf
    for k in range(len(others) + 1):
        for S in combinations(others, k):
            idx = list(S) + [y]
            cand = a.copy()
            cand[idx] = a[idx].mean()  # the active set and y* share their mean (Eqs. 26, 29-31)
            if np.all(cand[y] >= cand):
                best = min(best, float(np.linalg.norm(cand - a)))
    return best


@given(batches)
def test_ne_constraint_kkt_and_brute_force_optimality(data):
    vals, y, scale = data
    a = np.asarray(vals, dtype=np.float64) * scale + 0.01 * np.arange(len(vals))[:, None]
    y = np.asarray(y)
    out = embed(a, y, "l2")
    rows = np.arange(len(y))
    # (25a) argmax constraint — holds exactly (the answer is built with min()).
    assert np.all(out[rows, y][:, None] >= out)
    mu = ne_multipliers(a, out, y)
    # (25b) μ ≥ 0 and (25e) complementary slackness — both exact by construction.
    assert np.all(mu >= 0)
    assert np.all(mu * (out[rows, y][:, None] - out) == 0)
    # (25c) 2(a* − â)_{y*} = Σ μ_i: a sum of ≤ 6 rounded terms of size ≤ 6·|â|, so a few ulps of that.
    lhs = 2 * (out[rows, y] - a[rows, y])
    assert np.allclose(lhs, mu.sum(axis=1), rtol=0, atol=64 * np.finfo(float).eps * (np.abs(a).max() + 1))
    # Optimality: no farther from â than the best active set found by enumeration.
    for i in range(len(y)):
        d = np.linalg.norm(out[i] - a[i])
        assert d <= brute_force_ne(a[i], int(y[i])) * (1 + 1e-12) + 1e-12


@given(batches)
def test_ma_is_l1_optimal(data):
    vals, y, scale = data
    a = np.asarray(vals, dtype=np.float64) * scale
    out = embed(a, np.asarray(y), "ma")
    for i, yi in enumerate(y):
        n = a.shape[1]
        # LP: variables [x (n), u (n)], min Σu, u ≥ ±(x − â), x_j − x_y ≤ 0.
        c = np.r_[np.zeros(n), np.ones(n)]
        I = np.eye(n)
        A = [np.c_[I, -I], np.c_[-I, -I]]
        bnd = [a[i], -a[i]]
        for j in range(n):
            if j != yi:
                row = np.zeros(2 * n)
                row[j], row[yi] = 1, -1
                A.append(row[None])
                bnd.append([0.0])
        res = linprog(c, A_ub=np.vstack(A), b_ub=np.concatenate(bnd), bounds=[(None, None)] * (2 * n), method="highs")
        assert res.status == 0
        assert out[i, yi] >= out[i].max()
        # HiGHS is exact here up to its feasibility tolerance (1e-7 relative by default)
        assert np.abs(out[i] - a[i]).sum() <= res.fun + 1e-7 * (1 + abs(res.fun))
        assert np.abs(out[i] - a[i]).sum() == pytest.approx(a[i].max() - a[i, yi], abs=0)  # Eq. 23


def test_label_already_max_is_unchanged_bitwise():
    rng = np.random.default_rng(0)
    a = rng.standard_normal((50, 10))
    y = a.argmax(axis=1)
    for norm in ("l2", "l1", "ne", "ma"):
        assert np.array_equal(embed(a, y, norm), a)
    # a tie for the maximum with the label is also "already the max"
    b = np.array([[2.0, 2.0, -1.0]])
    assert np.array_equal(embed(b, [1]), b)


def test_ties_worked_examples():
    # d sorted = [2, 2, 0]: both competitors active, t = (1 + 3 + 3)/3
    out = embed(np.array([[1.0, 3.0, 3.0]]), [0])
    # t = â_y + c/(k+1) = 1 + 4/3: two roundings, so within 2 ulps (4.4e-16 each) of 7/3
    assert np.allclose(out, 7 / 3, rtol=0, atol=9e-16) and out[0, 0] == out[0, 1] == out[0, 2]
    # second competitor exactly at t (μ = 0 boundary): â = [0, 4, 2], y=0 → t = 2, â_2 = 2 stays
    out = embed(np.array([[0.0, 4.0, 2.0]]), [0])
    assert np.array_equal(out, [[2.0, 2.0, 2.0]])


def test_types_devices_dtypes_and_1d():
    a = np.array([[0.0, 1.0, 5.0], [3.0, -1.0, 2.0]], dtype=np.float32)
    t = torch.tensor(a, dtype=torch.float64)
    out_t = embed(t, torch.tensor([0, 1]))
    assert isinstance(out_t, torch.Tensor) and out_t.dtype == torch.float64
    out_n = embed(a, [0, 1])
    assert isinstance(out_n, np.ndarray) and out_n.dtype == np.float32
    np.testing.assert_allclose(out_n, out_t.numpy(), rtol=1e-6)  # float32 result vs float64: a few ulps of 2^-24
    one = embed(np.array([1.0, 2.0]), 0)
    assert one.shape == (2,) and one[0] == one[1] == 1.5


@pytest.mark.parametrize(
    "a, y, norm, msg",
    [
        (np.zeros((2, 3)), [0, 3], "l2", "out of range"),
        (np.zeros((2, 3)), [0, -1], "l2", "out of range"),
        (np.array([[0.0, np.nan, 1.0]]), [0], "l2", "NaN"),
        (np.array([[0.0, np.inf, 1.0]]), [0], "l1", "NaN or inf"),
        (np.zeros((2, 3, 1)), [0, 1], "l2", "shape"),
        (np.zeros((2, 3)), [0], "l2", "shape"),
        (np.zeros((2, 3)), [0.0, 1.0], "l2", "integers"),
        (np.zeros((2, 3)), [0, 1], "l3", "norm"),
    ],
)
def test_bad_input_raises(a, y, norm, msg):
    with pytest.raises(ValueError, match=msg):
        embed(a, np.asarray(y), norm)


def test_onehot_embedding_is_the_ablation_code():
    """embed(..., "onehot"): the one-hot code of y (seed 001 §4.2), same type / shape rule as NE/MA."""
    from linop.reverse import EMBEDDINGS

    assert EMBEDDINGS == ("ne", "ma", "onehot")
    a = np.array([[0.3, -1.0, 2.0], [5.0, 4.0, 4.5]])
    out = embed(a, np.array([1, 0]), "onehot")
    assert isinstance(out, np.ndarray) and out.dtype == a.dtype
    np.testing.assert_array_equal(out, [[0.0, 1.0, 0.0], [1.0, 0.0, 0.0]])
    t = embed(torch.tensor(a[0], dtype=torch.float32), 2, "onehot")
    assert isinstance(t, torch.Tensor) and t.dtype == torch.float32 and t.shape == (3,)
    np.testing.assert_array_equal(t.numpy(), [0.0, 0.0, 1.0])
    with pytest.raises(ValueError, match="onehot"):
        embed(a, np.array([1, 0]), "one-hot")
