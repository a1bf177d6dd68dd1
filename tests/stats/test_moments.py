"""RunningMoments against numpy/torch on the concatenation of random batch splits; Chan merge properties."""

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from lightning_lossdiag.stats import RunningMoments

SETTINGS = settings(max_examples=40, deadline=None)


def split(values: np.ndarray, cuts: list[int]) -> list[np.ndarray]:
    points = sorted({c % (len(values) + 1) for c in cuts})
    return np.split(values, points)


def moments_of(parts, **kwargs) -> RunningMoments:
    m = RunningMoments(**kwargs)
    for part in parts:
        m.update(torch.from_numpy(np.asarray(part)))
    return m


def assert_state_equal(a: RunningMoments, b: RunningMoments) -> None:
    for x, y in zip(a.state, b.state, strict=True):
        assert torch.equal(x, y), (x, y)


values_strategy = st.builds(
    lambda n, loc, scale, seed: np.random.default_rng(seed).normal(loc, scale, size=n),
    st.integers(1, 300),
    st.floats(-1e3, 1e3),
    st.floats(1e-3, 1e3),
    st.integers(0, 2**32 - 1),
)


@SETTINGS
@given(values=values_strategy, cuts=st.lists(st.integers(0, 300), max_size=6))
def test_moments_equal_numpy_and_torch_on_concatenation(values, cuts):
    m = moments_of(split(values, cuts))
    x = torch.from_numpy(values)
    assert float(m.count) == len(values)
    scale = 1e-12 * (np.abs(values).max() + 1)
    np.testing.assert_allclose(float(m.mean), values.mean(), rtol=1e-10, atol=scale)
    np.testing.assert_allclose(float(m.mean), x.mean().item(), rtol=1e-10, atol=scale)
    np.testing.assert_allclose(float(m.var), values.var(), rtol=1e-8, atol=scale**2)
    np.testing.assert_allclose(float(m.std), x.std(correction=0).item(), rtol=1e-8, atol=scale)
    if len(values) > 1:
        np.testing.assert_allclose(float(m.var_unbiased), x.var().item(), rtol=1e-8, atol=scale**2)
    else:
        assert math.isnan(float(m.var_unbiased))
    assert float(m.min) == values.min()
    assert float(m.max) == values.max()


@SETTINGS
@given(a=values_strategy, b=values_strategy, c=values_strategy)
def test_merge_is_order_independent_and_equals_all_at_once(a, b, c):
    ma, mb, mc = moments_of([a]), moments_of([b]), moments_of([c])
    ab = moments_of([a]).merge(mb)
    ba = moments_of([b]).merge(ma)
    assert_state_equal(ab, ba)  # two-way merge is exactly symmetric

    abc = moments_of([a]).merge(mb).merge(mc)
    cab = moments_of([c]).merge(ma).merge(mb)
    once = moments_of([np.concatenate([a, b, c])])
    for merged in (abc, cab):
        assert float(merged.count) == float(once.count)
        scale = 1e-12 * (max(np.abs(a).max(), np.abs(b).max(), np.abs(c).max()) + 1)
        np.testing.assert_allclose(float(merged.mean), float(once.mean), rtol=1e-10, atol=scale)
        np.testing.assert_allclose(float(merged.m2), float(once.m2), rtol=1e-8, atol=scale**2 * len(a))
        assert float(merged.min) == float(once.min)
        assert float(merged.max) == float(once.max)


def test_merging_with_empty_changes_nothing_and_empty_is_nan():
    m = moments_of([np.array([0.1, 0.7, 0.3])])
    before = [t.clone() for t in m.state]
    m.merge(RunningMoments())
    for x, y in zip(before, m.state, strict=True):
        assert torch.equal(x, y)
    empty = RunningMoments()
    assert float(empty.count) == 0
    assert math.isnan(float(empty.var))
    assert float(empty.min) == math.inf
    assert float(empty.max) == -math.inf


def test_per_column_moments():
    rng = np.random.default_rng(1)
    data = rng.normal(size=(100, 3)) * np.array([1.0, 10.0, 0.1])
    m = RunningMoments(shape=(3,))
    m.update(torch.from_numpy(data[:37]))
    m.update(torch.from_numpy(data[37:]))
    np.testing.assert_allclose(m.mean.numpy(), data.mean(0), rtol=1e-12)
    np.testing.assert_allclose(m.var_unbiased.numpy(), data.var(0, ddof=1), rtol=1e-10)
    np.testing.assert_array_equal(m.min.numpy(), data.min(0))
    np.testing.assert_array_equal(m.count.numpy(), [100, 100, 100])
    with pytest.raises(ValueError, match=r"`x` must have a shape ending in \(3,\)"):
        m.update(torch.zeros(4, 2))


def test_nonfinite_values_propagate_or_are_ignored():
    x = torch.tensor([1.0, math.nan, 3.0, math.inf])
    kept = RunningMoments()
    kept.update(x)
    assert math.isnan(float(kept.mean))
    skipped = RunningMoments(ignore_nonfinite=True)
    skipped.update(x)
    skipped.update(torch.tensor([5.0]))
    assert float(skipped.count) == 3
    assert float(skipped.mean) == 3.0
    np.testing.assert_allclose(float(skipped.var), np.var([1.0, 3.0, 5.0]))
    assert float(skipped.max) == 5.0


def test_bad_shape_argument_raises():
    with pytest.raises(ValueError, match="`shape` must be a sequence of positive integers"):
        RunningMoments(shape=(0,))


def test_state_dict_round_trip():
    m = moments_of([np.arange(10.0)])
    restored = RunningMoments()
    restored.load_state_dict(m.state_dict())
    assert_state_equal(m, restored)
    with pytest.raises(ValueError, match="saved with configuration"):
        RunningMoments(shape=(2,)).load_state_dict(m.state_dict())
