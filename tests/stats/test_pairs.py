"""ConfusedPairs: exact on few pairs, heavy hitters within the count-min bound, weights, merge/sync, no host reads."""

import math
from collections import Counter

import pytest
import torch

from lightning_lossdiag.stats.distributed import pack
from lightning_lossdiag.stats.pairs import ConfusedPairs
from lightning_lossdiag.testing import HostReadCounter


def exact_top(true: torch.Tensor, pred: torch.Tensor, k: int) -> list[tuple[int, int, float]]:
    errors = Counter((t, p) for t, p in zip(true.tolist(), pred.tolist(), strict=True) if t != p)
    ranked = sorted(errors.items(), key=lambda kv: (-kv[1], kv[0]))[:k]
    return [(t, p, float(c)) for (t, p), c in ranked]


def few_pairs(seed: int = 0, n: int = 600) -> tuple[torch.Tensor, torch.Tensor]:
    """Rows over 8 distinct confused pairs (Zipf-like frequencies) plus correct predictions."""
    gen = torch.Generator().manual_seed(seed)
    pairs = torch.tensor([[1, 2], [7, 3], [2, 1], [900, 5], [42, 41], [0, 999], [500, 501], [3, 7]])
    probs = torch.tensor([40.0, 20, 12, 8, 6, 4, 3, 1, 30])  # last: a correct prediction
    choice = torch.multinomial(probs, n, replacement=True, generator=gen)
    diag = torch.randint(0, 1000, (n,), generator=gen)
    true = torch.where(choice < 8, pairs[choice.clamp(max=7), 0], diag)
    pred = torch.where(choice < 8, pairs[choice.clamp(max=7), 1], diag)
    return true, pred


def heavy_stream(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, list[tuple[int, int]]]:
    """20,000 random error pairs over 1,000 classes plus 5 planted pairs with 500 rows each.

    Noise comes first and last (8,000 rows each), so a heavy pair must take its buckets from an earlier light key
    and keep them against later ones; the planted rows are shuffled with 4,000 noise rows in the middle.
    """
    gen = torch.Generator().manual_seed(seed)
    true = torch.randint(0, 1000, (20_000,), generator=gen)
    pred = (true + torch.randint(1, 1000, (20_000,), generator=gen)) % 1000  # never equal to true
    planted = [(3, 8), (10, 11), (250, 17), (999, 0), (512, 256)]
    mid_t = torch.cat([torch.tensor([t for t, _ in planted]).repeat_interleave(500), true[8000:12_000]])
    mid_p = torch.cat([torch.tensor([p for _, p in planted]).repeat_interleave(500), pred[8000:12_000]])
    perm = torch.randperm(6500, generator=gen)
    true = torch.cat([true[:8000], mid_t[perm], true[12_000:]])
    pred = torch.cat([pred[:8000], mid_p[perm], pred[12_000:]])
    return true, pred, planted


def feed(cp: ConfusedPairs, true: torch.Tensor, pred: torch.Tensor, batch: int = 1024, weight=None) -> None:
    for i in range(0, len(true), batch):
        w = None if weight is None else weight[i : i + batch]
        cp.update(true[i : i + batch], pred[i : i + batch], w)


def test_few_pairs_are_counted_exactly_and_correct_predictions_never():
    true, pred = few_pairs()
    cp = ConfusedPairs(num_classes=1000)
    feed(cp, true, pred, batch=97)
    expected = exact_top(true, pred, 100)
    assert len(expected) == 8
    assert cp.top(100) == expected
    assert cp.top(3) == expected[:3]
    assert float(cp.total()) == sum(c for *_, c in expected) == float((true != pred).sum())
    assert all(t != p for t, p, _ in cp.top(100))


def test_heavy_hitters_among_noise_are_the_top_five_within_the_bound():
    true, pred, planted = heavy_stream()
    cp = ConfusedPairs(num_classes=1000, width=4096, depth=3)
    feed(cp, true, pred)
    exact = Counter(zip(true.tolist(), pred.tolist(), strict=True))
    top = cp.top(5)
    assert {(t, p) for t, p, _ in top} == set(planted)
    bound = math.e / cp.width * float(cp.total())
    assert float(cp.total()) == 22_500
    for t, p, count in top:
        assert exact[(t, p)] <= count <= exact[(t, p)] + bound
    assert top[-1][2] > 2 * max(c for pair, c in exact.items() if pair not in planted)


def test_weights_zero_rows_are_ignored_and_fractions_add_up():
    true = torch.tensor([7, 1, 1, 1, 2, 2, 4, -100, 5])
    pred = torch.tensor([8, 2, 2, 2, 3, 3, 4, 1, 6])
    weight = torch.tensor([2.0, 0.5, 0.25, 0.0, 0.0, 0.0, 3.0, 1.0, 2.0])
    cp = ConfusedPairs(num_classes=10, width=64)
    cp.update(true, pred, weight)
    # (2, 3) only ever came with weight 0; (4, 4) is correct; -100 is an ignored class; ties go by key ascending.
    assert cp.top(10) == [(5, 6, 2.0), (7, 8, 2.0), (1, 2, 0.75)]
    assert float(cp.total()) == 4.75
    assert torch.equal(cp.counts[:, -1], torch.zeros(cp.depth, dtype=torch.float64))  # trash bucket holds nothing
    assert torch.equal(cp.keys[:, -1], torch.full((cp.depth,), -1))


def test_merge_of_two_halves_equals_one_stream_and_sync_equals_merge():
    for true, pred, k in [(*few_pairs(), 100), (*heavy_stream()[:2], 5)]:
        whole, a, b = (ConfusedPairs(num_classes=1000) for _ in range(3))
        half = len(true) // 2
        feed(whole, true, pred)
        feed(a, true[:half], pred[:half])
        feed(b, true[half:], pred[half:])
        packed = torch.stack([pack(a.state), pack(b.state)])  # what a 2-rank all_gather returns
        synced = ConfusedPairs(num_classes=1000)
        synced.load_state_dict(a.state_dict())
        merged = a.merge(b)
        assert torch.equal(merged.counts, whole.counts)
        assert merged.top(k) == whole.top(k)
        synced.sync(lambda t, packed=packed: packed)
        assert torch.equal(synced.counts, merged.counts)
        assert torch.equal(synced.keys, merged.keys)
    with pytest.raises(ValueError, match="same configuration"):
        ConfusedPairs(num_classes=1000).merge(ConfusedPairs(num_classes=1000, seed=1))


def row_buckets(pair: tuple[int, int], width: int, depth: int) -> tuple[int, ...]:
    """The bucket of ``pair`` in each hash row of a ``ConfusedPairs(num_classes=100, width, depth)``."""
    probe = ConfusedPairs(num_classes=100, width=width, depth=depth)
    probe.update(torch.tensor([pair[0]]), torch.tensor([pair[1]]))
    return tuple(probe.counts.argmax(1).tolist())


def test_the_heaviest_pair_of_a_batch_claims_its_buckets():
    # Width 2, depth 2: light pairs with larger keys share the heavy pair's bucket in one row only.
    heavy = (1, 2)
    h0, h1 = row_buckets(heavy, 2, 2)
    pairs = [(t, p) for t in range(2, 99) for p in (t + 1, t - 1)]
    light0 = next(q for q in pairs if row_buckets(q, 2, 2) == (h0, 1 - h1))
    light1 = next(q for q in pairs if row_buckets(q, 2, 2) == (1 - h0, h1))
    rows = [light0, heavy, *[heavy] * 9, light1]
    cp = ConfusedPairs(num_classes=100, width=2, depth=2)
    cp.update(torch.tensor([t for t, _ in rows]), torch.tensor([p for _, p in rows]))
    assert cp.top(1) == [(*heavy, 11.0)]
    assert sorted(cp.top(3)[1:]) == sorted([(*light0, 1.0), (*light1, 1.0)])


def test_merge_keeps_the_candidate_of_the_rank_that_counted_most_in_a_bucket():
    # One bucket (width 2, depth 1): a light pair shares the heavy pair's bucket.
    light = next((t, t + 1) for t in range(2, 99) if row_buckets((t, t + 1), 2, 1) == row_buckets((1, 2), 2, 1))
    heavy, other = ConfusedPairs(num_classes=100, width=2, depth=1), ConfusedPairs(num_classes=100, width=2, depth=1)
    heavy.update(torch.full((10,), 1), torch.full((10,), 2))
    other.update(torch.tensor([light[0]] * 3), torch.tensor([light[1]] * 3))
    packed = torch.stack([pack(other.state), pack(heavy.state)])
    for first, second in [(other, heavy), (heavy, other)]:
        merged = ConfusedPairs(num_classes=100, width=2, depth=1)
        merged.load_state_dict(first.state_dict())
        assert merged.merge(second).top(5) == [(1, 2, 13.0)]  # the light pair's bucket estimate would be 13 too
    other.sync(lambda t: packed)
    assert other.top(5) == [(1, 2, 13.0)]


def test_update_makes_no_host_reads():
    true, pred, _ = heavy_stream()
    weight = torch.rand(len(true), dtype=torch.float32)
    cp = ConfusedPairs(num_classes=1000)
    with HostReadCounter(only_package=None) as counter:
        feed(cp, true, pred)
        feed(cp, true, pred, weight=weight)
        cp.total()
    assert counter.total == 0, counter.by_kind
    with HostReadCounter(only_package=None) as counter:
        cp.top(5)  # the epoch-end read is seen
    assert counter.total >= 1


def test_memory_does_not_depend_on_the_number_of_classes():
    small, large = ConfusedPairs(num_classes=1000), ConfusedPairs(num_classes=32_000)
    assert small.state_bytes() == large.state_bytes() == 3 * 4097 * 16
    gen = torch.Generator().manual_seed(1)
    large.update(torch.randint(0, 32_000, (5000,), generator=gen), torch.randint(0, 32_000, (5000,), generator=gen))
    assert large.state_bytes() == small.state_bytes()


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"num_classes": 1}, "`num_classes` must be an integer"),
        ({"num_classes": 10.0}, "`num_classes` must be an integer"),
        ({"num_classes": 10, "width": 1}, "`width` must be an integer >= 2, got 1"),
        ({"num_classes": 10, "depth": 0}, "`depth` must be a positive integer, got 0"),
        ({"num_classes": 10, "seed": "x"}, "`seed` must be an integer"),
    ],
    ids=["num_classes_1", "num_classes_float", "width", "depth", "seed"],
)
def test_bad_constructor_arguments_raise(kwargs, match):
    with pytest.raises(ValueError, match=match):
        ConfusedPairs(**kwargs)


def test_bad_update_arguments_raise():
    cp = ConfusedPairs(num_classes=10)
    ok = torch.tensor([1, 2])
    with pytest.raises(ValueError, match=r"`true` must be a 1-d integer tensor, got torch.float32"):
        cp.update(ok.float(), ok)
    with pytest.raises(
        ValueError, match=r"`pred` must be a 1-d integer tensor, got torch.int64 tensor of shape \(1, 2\)"
    ):
        cp.update(ok, ok[None])
    with pytest.raises(ValueError, match=r"`pred` must have the shape of `true` \(2,\), got \(3,\)"):
        cp.update(ok, torch.tensor([1, 2, 3]))
    with pytest.raises(ValueError, match=r"`weight` must be a floating tensor of shape \(2,\)"):
        cp.update(ok, ok, torch.tensor([1, 1]))
    with pytest.raises(ValueError, match="`k` must be a positive integer"):
        cp.top(0)


def test_state_dict_round_trip():
    true, pred = few_pairs()
    cp = ConfusedPairs(num_classes=1000, width=256, depth=4, seed=7)
    feed(cp, true, pred)
    state = cp.state_dict()
    assert state["config"] == {"num_classes": 1000, "width": 256, "depth": 4, "seed": 7}
    fresh = ConfusedPairs(num_classes=1000, width=256, depth=4, seed=7)
    fresh.load_state_dict(state)
    assert torch.equal(fresh.counts, cp.counts)
    assert torch.equal(fresh.keys, cp.keys)
    assert fresh.top(10) == cp.top(10)
    with pytest.raises(ValueError, match="was saved with configuration"):
        ConfusedPairs(num_classes=1000, width=256, depth=4, seed=8).load_state_dict(state)
