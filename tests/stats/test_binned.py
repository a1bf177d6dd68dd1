"""BinnedErrors against a numpy group-by written with explicit per-bin masks; quantile edges against numpy."""

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from lightning_lossdiag.stats import BinnedErrors, quantile_edges_from_sample

SETTINGS = settings(max_examples=40, deadline=None)


def numpy_groupby(edges: np.ndarray, target: np.ndarray, err: np.ndarray):
    """Reference: bin i is [e_i, e_i+1); the first bin also takes t < e_0, the last t >= e_{B-1} (incl. > e_B)."""
    bins = len(edges) - 1
    count, sum_abs, sum_sq = np.zeros(bins, int), np.zeros(bins), np.zeros(bins)
    for i in range(bins):
        lower = target >= edges[i] if i > 0 else np.ones_like(target, dtype=bool)
        upper = target < edges[i + 1] if i < bins - 1 else np.ones_like(target, dtype=bool)
        mask = lower & upper
        count[i] = mask.sum()
        sum_abs[i] = err[mask].sum()
        sum_sq[i] = (err[mask] ** 2).sum()
    return count, sum_abs, sum_sq


@st.composite
def binned_case(draw):
    bins = draw(st.integers(1, 12))
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    edges = np.unique(np.round(rng.uniform(-5, 5, size=bins + 1), 3))
    if len(edges) < 2:
        edges = np.array([0.0, 1.0])
    n = draw(st.integers(0, 300))
    target = rng.uniform(-7, 7, size=n)
    target[: n // 10] = rng.choice(edges, size=n // 10)  # values exactly on edges
    err = np.abs(rng.normal(size=n))
    cuts = sorted({c % (n + 1) for c in draw(st.lists(st.integers(0, 300), max_size=5))})
    return edges, target, err, cuts


@SETTINGS
@given(case=binned_case())
def test_binned_errors_equal_numpy_groupby(case):
    edges, target, err, cuts = case
    b = BinnedErrors(edges.tolist())
    for t, e in zip(np.split(target, cuts), np.split(err, cuts), strict=True):
        b.update(torch.from_numpy(t), torch.from_numpy(e))
    count, sum_abs, sum_sq = numpy_groupby(edges, target, err)
    np.testing.assert_array_equal(b.count.numpy(), count)
    np.testing.assert_allclose(b.sum_abs.numpy(), sum_abs, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(b.sum_sq.numpy(), sum_sq, rtol=1e-12, atol=1e-12)
    with np.errstate(invalid="ignore", divide="ignore"):
        np.testing.assert_allclose(b.mean_abs().numpy(), sum_abs / count, rtol=1e-12)
        np.testing.assert_allclose(b.rmse().numpy(), np.sqrt(sum_sq / count), rtol=1e-12)
    assert int(b.count.sum()) == len(target)


@SETTINGS
@given(a=binned_case(), b=binned_case())
def test_binned_merge_is_order_independent(a, b):
    edges, ta, ea, _ = a
    _, tb, eb, _ = b
    x, y = BinnedErrors(edges), BinnedErrors(edges)
    x.update(torch.from_numpy(ta), torch.from_numpy(ea))
    y.update(torch.from_numpy(tb), torch.from_numpy(eb))
    xy = BinnedErrors(edges).merge(x).merge(y)
    yx = BinnedErrors(edges).merge(y).merge(x)
    for p, q in zip(xy.state, yx.state, strict=True):
        assert torch.equal(p, q)
    whole = BinnedErrors(edges)
    whole.update(torch.from_numpy(np.concatenate([ta, tb])), torch.from_numpy(np.concatenate([ea, eb])))
    assert torch.equal(xy.count, whole.count)
    torch.testing.assert_close(xy.sum_abs, whole.sum_abs, rtol=1e-12, atol=1e-12)


def test_nonfinite_pairs_are_counted_apart_and_empty_bins_are_nan():
    b = BinnedErrors([0.0, 1.0, 2.0, 3.0])
    b.update(torch.tensor([0.5, math.nan, 0.7, 2.5]), torch.tensor([1.0, 1.0, math.inf, 3.0]))
    assert b.count.tolist() == [1, 0, 1]
    assert int(b.nonfinite) == 2
    assert math.isnan(b.mean_abs()[1].item())
    assert b.rmse()[2].item() == 3.0


@pytest.mark.parametrize(
    ("edges", "match"),
    [([1.0], "at least 2 values"), ([0.0, 0.0], "strictly increasing"), ([0.0, math.inf], "finite"), ("ab", "")],
    ids=["one-edge", "flat", "inf", "not-numbers"],
)
def test_bad_edges_raise(edges, match):
    with pytest.raises(ValueError, match=f"`edges` must.*{match}"):
        BinnedErrors(edges)


def test_update_checks_sizes():
    with pytest.raises(ValueError, match="same number of elements"):
        BinnedErrors([0.0, 1.0]).update(torch.zeros(3), torch.zeros(4))


@SETTINGS
@given(n=st.integers(1, 500), bins=st.integers(1, 20), seed=st.integers(0, 2**32 - 1), discrete=st.booleans())
def test_quantile_edges_match_numpy(n, bins, seed, discrete):
    rng = np.random.default_rng(seed)
    values = rng.integers(0, 4, size=n).astype(np.float64) if discrete else rng.lognormal(size=n)
    with_nan = np.concatenate([values, [np.nan, np.inf]])
    edges = quantile_edges_from_sample(torch.from_numpy(with_nan), bins)
    quantiles = np.quantile(values, np.linspace(0, 1, bins + 1))
    tol = 1e-9 * np.abs(quantiles).max()  # interpolation may split a repeated value by an ulp
    expected = [quantiles[0]]
    for q in quantiles[1:]:
        if q - expected[-1] > tol:
            expected.append(q)
    expected = np.array(expected)
    if len(expected) < 2:
        expected = np.array([expected[0] - 0.5, expected[0] + 0.5])
    np.testing.assert_allclose(edges.numpy(), expected, rtol=1e-9, atol=1e-12)
    assert bool((edges[1:] > edges[:-1]).all())
    BinnedErrors(edges)  # always usable as edges


def test_quantile_edges_need_a_finite_value():
    with pytest.raises(ValueError, match="at least one finite value"):
        quantile_edges_from_sample(torch.tensor([math.nan]), 4)
