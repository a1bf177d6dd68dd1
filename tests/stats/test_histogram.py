"""FixedHistogram against torch.histc and numpy.histogram over random data and random batch splits."""

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from torch.utils.tensorboard import SummaryWriter

from lightning_lossdiag.stats import FixedHistogram, histogram_edges, histogram_raw_args

SETTINGS = settings(max_examples=40, deadline=None)


def split(values: np.ndarray, cuts: list[int]) -> list[np.ndarray]:
    points = sorted({c % (len(values) + 1) for c in cuts})
    return np.split(values, points)


@st.composite
def histogram_case(draw, allow_nonfinite=True):
    low = draw(st.floats(-100, 100, allow_nan=False))
    width = draw(st.floats(1e-3, 100, allow_nan=False))
    bins = draw(st.integers(1, 40))
    dtype = draw(st.sampled_from([torch.float32, torch.float64]))
    high = low + width
    # Values from a wider range (under/overflow), plus values sitting exactly on the edges histc uses.
    n = draw(st.integers(0, 200))
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    values = rng.uniform(low - width, high + width, size=n)
    ref_edges = torch.linspace(low, high, bins + 1, dtype=dtype).double().numpy()
    on_edges = rng.choice(ref_edges, size=draw(st.integers(0, 20)))
    extra = [math.nan, math.inf, -math.inf] * draw(st.integers(0, 2)) if allow_nonfinite else []
    values = np.concatenate([values, on_edges, np.array(extra, dtype=np.float64)])
    if dtype == torch.float32 and n:
        values = np.concatenate([values, np.nextafter(on_edges, np.inf), np.nextafter(on_edges, -np.inf)])
    rng.shuffle(values)
    values = torch.from_numpy(values).to(dtype).double().numpy()  # exactly representable in `dtype`
    cuts = draw(st.lists(st.integers(0, 400), max_size=6))
    return low, high, bins, dtype, values, cuts


@SETTINGS
@given(case=histogram_case())
def test_counts_equal_histc_and_numpy_over_random_splits(case):
    low, high, bins, dtype, values, cuts = case
    h = FixedHistogram(low, high, bins)
    for part in split(values, cuts):
        h.update(torch.from_numpy(part).to(dtype))

    finite = values[np.isfinite(values)]
    edges = np.linspace(low, high, bins + 1)
    np.testing.assert_allclose(h.edges.numpy(), edges, rtol=1e-12, atol=1e-12 * (abs(low) + abs(high)))
    assert h.edges[0].item() == low
    assert h.edges[-1].item() == high

    # numpy on the same edges: [e_i, e_i+1), the last bin closed (values == high go into the last bin).
    expected_np, _ = np.histogram(finite, bins=h.edges.numpy())
    np.testing.assert_array_equal(h.counts.numpy(), expected_np)
    assert int(h.underflow) == int((finite < low).sum())
    assert int(h.overflow) == int((finite > high).sum())

    # torch.histc rounds (x - low) * bins / (high - low) in the input dtype: equal away from the edges.
    histogram_of_counted = h.counts.clone()
    tol = 16 * torch.finfo(dtype).eps * (abs(low) + abs(high) + (high - low))
    near_edge = (np.abs(finite[:, None] - edges[None, :]) <= tol).any(axis=1)
    h_far = FixedHistogram(low, high, bins)
    h_far.update(torch.from_numpy(finite[~near_edge]).to(dtype))
    x_far = torch.from_numpy(finite[~near_edge]).to(dtype)
    assert torch.equal(h_far.counts, torch.histc(x_far, bins, low, high).to(torch.int64))
    assert int(histogram_of_counted.sum() - h_far.counts.sum()) == int(
        ((finite[near_edge] >= low) & (finite[near_edge] <= high)).sum()
    )
    assert int(h.nonfinite) == int((~np.isfinite(values)).sum())
    assert int(h.total) == len(values)
    if len(finite):
        assert float(h.min) == finite.min()
        assert float(h.max) == finite.max()
        np.testing.assert_allclose(float(h.sum), finite.sum(), rtol=1e-9, atol=1e-9)
        np.testing.assert_allclose(float(h.sum_squares), (finite**2).sum(), rtol=1e-9)
    else:
        assert float(h.min) == math.inf
        assert float(h.max) == -math.inf


def test_edge_values_follow_the_documented_convention():
    # low -> first bin, an inner edge -> the bin above it, high -> the last bin (as numpy and histc do here).
    h = FixedHistogram(0.0, 1.0, bins=4)
    h.update(torch.tensor([0.0, 1.0, 0.25]))
    assert h.counts.tolist() == [1, 1, 0, 1]
    assert torch.equal(h.counts, torch.histc(torch.tensor([0.0, 1.0, 0.25]), 4, 0.0, 1.0).long())
    # Every inner edge, exactly, goes into the bin above it (numpy's convention), whatever the rounding.
    h7 = FixedHistogram(-1.3, 2.9, bins=7)
    h7.update(h7.edges[1:-1])
    assert h7.counts.tolist() == [0, 1, 1, 1, 1, 1, 1]
    assert h7.counts.tolist() == np.histogram(h7.edges[1:-1].numpy(), bins=h7.edges.numpy())[0].tolist()


def test_half_and_integer_values_are_binned_like_float32():
    values = torch.tensor([-3, 0, 1, 2, 5, 9, 10, 12])
    h = FixedHistogram(0.0, 10.0, bins=5)
    h.update(values)
    h.update(values.half())
    expected = 2 * torch.histc(values.float(), 5, 0.0, 10.0).long()
    assert torch.equal(h.counts, expected)
    assert int(h.underflow) == 2
    assert int(h.overflow) == 2


@SETTINGS
@given(
    low=st.floats(1e-6, 1e3),
    ratio=st.floats(1.5, 1e6),
    bins=st.integers(1, 50),
    seed=st.integers(0, 2**32 - 1),
)
def test_log_spaced_edges_and_counts(low, ratio, bins, seed):
    high = low * ratio
    edges = histogram_edges(low, high, bins, log=True)
    assert edges.dtype == torch.float64
    assert edges[0].item() == low
    assert edges[-1].item() == high
    np.testing.assert_allclose(edges.numpy(), np.geomspace(low, high, bins + 1), rtol=1e-12)
    assert bool((edges[1:] > edges[:-1]).all())
    ratios = (edges[1:] / edges[:-1]).numpy()
    np.testing.assert_allclose(ratios, ratios[0], rtol=1e-9)

    rng = np.random.default_rng(seed)
    values = np.exp(rng.uniform(math.log(low) - 1, math.log(high) + 1, size=300))
    h = FixedHistogram(low, high, bins, log=True)
    h.update(torch.from_numpy(values[:120]))
    h.update(torch.from_numpy(values[120:]))
    expected, _ = np.histogram(values, bins=edges.numpy())
    np.testing.assert_array_equal(h.counts.numpy(), expected)
    assert int(h.underflow) == int((values < low).sum())
    assert int(h.overflow) == int((values > high).sum())


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"low": 1.0, "high": 1.0}, "`low` must be smaller than `high`"),
        ({"low": 0.0, "high": 1.0, "bins": 0}, "`bins` must be a positive integer"),
        ({"low": 0.0, "high": 1.0, "log": True}, "`low` must be > 0"),
        ({"low": math.nan, "high": 1.0}, "`low` must be a finite number"),
        ({"low": 0.0, "high": math.inf}, "`high` must be a finite number"),
    ],
    ids=["empty-range", "zero-bins", "log-nonpositive", "nan-low", "inf-high"],
)
def test_bad_arguments_raise(kwargs, match):
    with pytest.raises(ValueError, match=match):
        FixedHistogram(**kwargs)


def test_merge_checks_configuration():
    with pytest.raises(ValueError, match="same configuration"):
        FixedHistogram(0.0, 1.0, 4).merge(FixedHistogram(0.0, 2.0, 4))
    with pytest.raises(TypeError, match="must be a FixedHistogram"):
        FixedHistogram(0.0, 1.0, 4).merge(object())


def test_raw_args_round_trip_through_tensorboard(tmp_path):
    rng = np.random.default_rng(0)
    values = rng.normal(0.0, 2.0, size=1000)
    h = FixedHistogram(-3.0, 3.0, bins=12)
    h.update(torch.from_numpy(values))
    h.update(torch.tensor([math.nan]))
    args = histogram_raw_args(h)

    inside = values[(values >= -3) & (values <= 3)]
    expected_bins, _ = np.histogram(inside, bins=np.linspace(-3, 3, 13))
    under, over = int((values < -3).sum()), int((values > 3).sum())
    assert under > 0
    assert over > 0
    assert args["bucket_counts"] == [under, *expected_bins.tolist(), over]
    assert args["bucket_limits"][0] == -3.0
    assert args["bucket_limits"][-1] == pytest.approx(values.max())
    np.testing.assert_allclose(args["bucket_limits"][1:-1], np.linspace(-3, 3, 13)[1:])
    assert args["num"] == 1000
    assert args["min"] == pytest.approx(values.min())
    assert args["sum"] == pytest.approx(values.sum())
    assert args["sum_squares"] == pytest.approx((values**2).sum())

    writer = SummaryWriter(str(tmp_path))
    writer.add_histogram_raw("errors/val/residual", global_step=3, **args)
    writer.close()
    acc = EventAccumulator(str(tmp_path), size_guidance={"histograms": 0})
    acc.Reload()
    (event,) = acc.Histograms("errors/val/residual")
    assert event.step == 3
    assert event.histogram_value.num == 1000
    assert list(event.histogram_value.bucket) == [under, *expected_bins.tolist(), over]


def test_raw_args_without_out_of_range_values_and_empty():
    h = FixedHistogram(0.0, 1.0, bins=2)
    empty = histogram_raw_args(h)
    assert empty["num"] == 0
    assert empty["bucket_counts"] == [0, 0]
    h.update(torch.tensor([0.1, 0.6, 0.7]))
    args = histogram_raw_args(h)
    assert args["bucket_limits"] == [0.5, 1.0]
    assert args["bucket_counts"] == [1, 2]


@SETTINGS
@given(case=histogram_case(), order=st.randoms(use_true_random=False))
def test_merging_parts_in_any_order_equals_one_pass(case, order):
    low, high, bins, dtype, values, cuts = case
    whole = FixedHistogram(low, high, bins)
    whole.update(torch.from_numpy(values).to(dtype))
    parts = []
    for part in split(values, cuts):
        h = FixedHistogram(low, high, bins)
        h.update(torch.from_numpy(part).to(dtype))
        parts.append(h)
    order.shuffle(parts)
    merged = parts[0]
    for other in parts[1:]:
        merged.merge(other)
    assert torch.equal(merged.counts, whole.counts)
    for name in ("underflow", "overflow", "nonfinite"):
        assert int(getattr(merged, name)) == int(getattr(whole, name)), name
    for name in ("sum", "sum_squares", "min", "max"):  # float sums: equal up to the order of additions
        a, b = float(getattr(merged, name)), float(getattr(whole, name))
        assert a == pytest.approx(b, rel=1e-9, abs=1e-9) or (math.isnan(a) and math.isnan(b)), name
