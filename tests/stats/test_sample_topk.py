"""BoundedSample (bottom-k of keys) and TopKWorst against numpy sorting over random data and batch splits."""

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from lightning_lossdiag.stats import BoundedSample, TopKWorst

SETTINGS = settings(max_examples=40, deadline=None)


def split_points(n: int, cuts: list[int]) -> list[int]:
    return sorted({c % (n + 1) for c in cuts})


@st.composite
def rows_case(draw):
    n = draw(st.integers(0, 400))
    k = draw(st.integers(1, 64))
    seed = draw(st.integers(0, 2**32 - 1))
    rng = np.random.default_rng(seed)
    # Column 0 is a unique row id, so kept rows can be matched to their keys/scores.
    rows = np.column_stack([np.arange(n, dtype=np.float64), rng.normal(size=n), rng.normal(size=n)])
    keys = rng.permutation(n).astype(np.float64) / max(n, 1)  # distinct keys in [0, 1)
    cuts = draw(st.lists(st.integers(0, 400), max_size=6))
    return k, rows, keys, split_points(n, cuts)


@SETTINGS
@given(case=rows_case())
def test_sample_keeps_exactly_the_k_smallest_keys(case):
    k, rows, keys, points = case
    s = BoundedSample(k, 3, dtype=torch.float64)
    for r, kk in zip(np.split(rows, points), np.split(keys, points), strict=True):
        s.update(torch.from_numpy(r), keys=torch.from_numpy(kk))
    order = np.argsort(keys)[:k]
    assert s.filled == min(k, len(rows))
    np.testing.assert_array_equal(s.keys.numpy(), keys[order])
    np.testing.assert_array_equal(s.rows.numpy(), rows[order])
    assert int(s.seen) == len(rows)
    # padding: +inf keys and NaN rows after the filled slots
    assert bool(torch.isinf(s.padded_keys[s.filled :]).all())
    assert bool(torch.isnan(s.padded_rows[s.filled :]).all())
    assert s.valid_mask().sum().item() == s.filled


@SETTINGS
@given(a=rows_case(), b=rows_case())
def test_sample_merge_is_order_independent_and_equals_all_at_once(a, b):
    k, rows_a, keys_a, _ = a
    _, rows_b, keys_b, _ = b
    keys_b = keys_b + 0.5 / (len(keys_b) + 1) / max(len(keys_a), 1)  # keep keys distinct across the two parts
    sa, sb = BoundedSample(k, 3, dtype=torch.float64), BoundedSample(k, 3, dtype=torch.float64)
    sa.update(torch.from_numpy(rows_a), keys=torch.from_numpy(keys_a))
    sb.update(torch.from_numpy(rows_b), keys=torch.from_numpy(keys_b))
    ab = BoundedSample(k, 3, dtype=torch.float64).merge(sa).merge(sb)
    ba = BoundedSample(k, 3, dtype=torch.float64).merge(sb).merge(sa)
    for x, y in zip(ab.state, ba.state, strict=True):
        torch.testing.assert_close(x, y, rtol=0, atol=0, equal_nan=True)
    all_keys = np.concatenate([keys_a, keys_b])
    all_rows = np.concatenate([rows_a, rows_b])
    order = np.argsort(all_keys)[:k]
    np.testing.assert_array_equal(ab.keys.numpy(), all_keys[order])
    np.testing.assert_array_equal(ab.rows.numpy(), all_rows[order])


def test_sample_with_generated_keys_is_a_subset_without_repeats_and_uniform():
    n, k, runs = 100, 10, 300
    inclusion = np.zeros(n)
    for seed in range(runs):
        s = BoundedSample(k, 1, seed=seed)
        ids = torch.arange(n, dtype=torch.float32)[:, None]
        for chunk in ids.split(7):
            s.update(chunk)
        kept = s.rows[:, 0].numpy().astype(int)
        assert len(set(kept.tolist())) == k
        assert bool((s.keys[1:] >= s.keys[:-1]).all())
        assert float(s.keys.max()) < 1.0
        inclusion[kept] += 1
    # Each row is kept with probability k / n; 300 runs -> 30 expected, sd ~5.2. Deterministic seeds: no flakiness.
    assert abs(inclusion.mean() - runs * k / n) < 1e-9
    assert np.abs(inclusion - runs * k / n).max() < 6 * np.sqrt(runs * k / n * (1 - k / n))


def test_same_seed_gives_the_same_sample_and_state_dict_resumes_the_stream():
    a, b = BoundedSample(5, 1, seed=7), BoundedSample(5, 1, seed=7)
    data = torch.arange(50.0)[:, None]
    a.update(data)
    b.update(data)
    assert torch.equal(a.padded_rows, b.padded_rows)
    c = BoundedSample(5, 1, seed=99)
    c.load_state_dict(a.state_dict())
    a.update(data)
    c.update(data)
    assert torch.equal(a.padded_keys, c.padded_keys)


@SETTINGS
@given(case=rows_case(), ties=st.booleans())
def test_topk_is_exact(case, ties):
    k, rows, _, points = case
    rng = np.random.default_rng(len(rows))
    scores = rng.integers(0, 5, size=len(rows)).astype(np.float64) if ties else rng.normal(size=len(rows))
    t = TopKWorst(k, 3)
    for r, sc in zip(np.split(rows, points), np.split(scores, points), strict=True):
        t.update(torch.from_numpy(sc), torch.from_numpy(r))
    expected = np.sort(scores)[::-1][:k]
    assert t.filled == min(k, len(rows))
    np.testing.assert_array_equal(t.scores.numpy(), expected)
    ids = t.rows[:, 0].numpy().astype(int)
    assert len(set(ids.tolist())) == len(ids)
    np.testing.assert_array_equal(scores[ids], t.scores.numpy())  # each row is kept with its own score
    np.testing.assert_array_equal(t.rows.numpy(), rows[ids])


@SETTINGS
@given(a=rows_case(), b=rows_case())
def test_topk_merge_is_order_independent(a, b):
    k, rows_a, _, _ = a
    _, rows_b, _, _ = b
    rows_b = rows_b.copy()
    rows_b[:, 0] += len(rows_a)
    rng = np.random.default_rng(0)
    sc_a, sc_b = rng.normal(size=len(rows_a)), rng.normal(size=len(rows_b))
    ta, tb = TopKWorst(k, 3), TopKWorst(k, 3)
    ta.update(torch.from_numpy(sc_a), torch.from_numpy(rows_a))
    tb.update(torch.from_numpy(sc_b), torch.from_numpy(rows_b))
    ab = TopKWorst(k, 3).merge(ta).merge(tb)
    ba = TopKWorst(k, 3).merge(tb).merge(ta)
    for x, y in zip(ab.state, ba.state, strict=True):
        torch.testing.assert_close(x, y, rtol=0, atol=0, equal_nan=True)
    np.testing.assert_array_equal(ab.scores.numpy(), np.sort(np.concatenate([sc_a, sc_b]))[::-1][:k])


def test_topk_nan_scores_rank_first():
    t = TopKWorst(2, 1)
    t.update(torch.tensor([1.0, float("nan"), 5.0]), torch.tensor([[0.0], [1.0], [2.0]]))
    assert t.rows[:, 0].tolist() == [1.0, 2.0]


@pytest.mark.parametrize(
    ("make", "match"),
    [
        (lambda: BoundedSample(0, 2), "`k` must be a positive integer"),
        (lambda: BoundedSample(3, 2).update(torch.zeros(4, 3)), r"`rows` must be a Tensor of shape \(N, 2\)"),
        (lambda: BoundedSample(3, 2).update(torch.zeros(4, 2), keys=torch.zeros(3)), "`keys` must be None"),
        (lambda: BoundedSample(3, 2, dtype=torch.int64), "`dtype` must be a floating torch dtype"),
        (lambda: TopKWorst(3, 0), "`num_columns` must be a positive integer"),
        (lambda: TopKWorst(3, 2).update(torch.zeros(5), torch.zeros(4, 2)), r"`scores` must be a Tensor of shape"),
    ],
    ids=["k0", "rows-shape", "keys-shape", "int-dtype", "topk-columns", "scores-shape"],
)
def test_bad_arguments_raise(make, match):
    with pytest.raises(ValueError, match=match):
        make()
