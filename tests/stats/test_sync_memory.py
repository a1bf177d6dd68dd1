"""sync across ranks (fake 2-rank gather, Lightning-style gathers, real gloo), fixed state size, no host reads."""

import math
import os

import numpy as np
import pytest
import torch

from lightning_lossdiag.stats import (
    BinnedErrors,
    BoundedSample,
    FixedHistogram,
    RunningMoments,
    TopKWorst,
    histogram_raw_args,
    single_process_gather,
)
from lightning_lossdiag.testing import HostReadCounter


def make_stats(seed: int = 0) -> dict:
    return {
        "hist": FixedHistogram(-3.0, 3.0, bins=64),
        "log_hist": FixedHistogram(1e-3, 10.0, bins=16, log=True),
        "moments": RunningMoments(),
        "sample": BoundedSample(128, 3, seed=seed),
        "worst": TopKWorst(20, 3),
        "binned": BinnedErrors([-2.0, -1.0, 0.0, 1.0, 2.0]),
    }


def batch(rank: int, i: int, n: int = 257) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(1000 * rank + i)
    target = torch.randn(n, generator=gen) * 1.5
    preds = target + torch.randn(n, generator=gen) * 0.5
    if i == 1:
        preds[3] = math.nan
    return preds, target


def feed(stats: dict, preds: torch.Tensor, target: torch.Tensor, row_offset: int = 0) -> None:
    err = preds - target
    rows = torch.stack([torch.arange(len(preds), dtype=torch.float32) + row_offset, target, preds], dim=1)
    stats["hist"].update(err)
    stats["log_hist"].update(err.abs())
    stats["moments"].update(target)
    stats["sample"].update(rows)
    stats["worst"].update(err.abs(), rows.double())
    stats["binned"].update(target, err.abs())


def rank_stats(rank: int, batches: int = 3) -> dict:
    stats = make_stats(seed=rank)
    for i in range(batches):
        preds, target = batch(rank, i)
        feed(stats, preds, target, row_offset=10_000 * rank + 1000 * i)
    return stats


def assert_same_state(a, b) -> None:
    for x, y in zip(a.state, b.state, strict=True):
        torch.testing.assert_close(x, y, rtol=0, atol=0, equal_nan=True)


def test_sync_with_fake_two_rank_gather_equals_merge():
    ranks = [rank_stats(0), rank_stats(1)]
    expected = {name: rank_stats(0)[name].merge(ranks[1][name]) for name in ranks[0]}
    for name in ranks[0]:
        # What each rank hands to the collective (recorded from a real state), then each rank's view of it.
        sent = []
        for r in (0, 1):
            ranks[r][name].sync(lambda t, sent=sent: sent.append(t.clone()) or t.unsqueeze(0))
        for r in (0, 1):
            ranks[r][name].sync(lambda t, sent=sent: torch.stack(sent))
        assert_same_state(ranks[0][name], ranks[1][name])  # every rank ends with the same state
        assert_same_state(ranks[0][name], expected[name])


def test_sync_merges_counts_and_moments_like_the_concatenation():
    ranks = [rank_stats(0), rank_stats(1)]
    sent = {name: [] for name in ranks[0]}
    for r in (0, 1):
        for name, s in ranks[r].items():
            sent[name].append(s.state)
    from lightning_lossdiag.stats.distributed import pack

    for name in ranks[0]:
        packed = torch.stack([pack(sent[name][0]), pack(sent[name][1])])
        ranks[0][name].sync(lambda t, packed=packed: packed)
    merged = ranks[0]
    preds = torch.cat([batch(r, i)[0] for r in (0, 1) for i in range(3)])
    target = torch.cat([batch(r, i)[1] for r in (0, 1) for i in range(3)])
    err = (preds - target).double()
    finite = err[torch.isfinite(err)]
    assert torch.equal(merged["hist"].counts, torch.histc(finite, 64, -3.0, 3.0).long())
    assert int(merged["hist"].nonfinite) == 2
    assert float(merged["moments"].count) == len(target)
    torch.testing.assert_close(merged["moments"].mean, target.double().mean(), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(merged["moments"].var_unbiased, target.double().var(), rtol=1e-10, atol=1e-12)
    top = torch.sort(finite.abs(), descending=True).values[:20]
    assert torch.equal(merged["worst"].scores[1:], top[:19])  # the NaN error ranks first
    assert math.isnan(merged["worst"].scores[0].item())
    assert merged["sample"].filled == 128 and int(merged["sample"].seen) == len(target)


def test_lightning_single_device_gather_returning_the_tensor_is_a_world_of_one():
    a, b = rank_stats(0), rank_stats(0)
    for name in a:
        a[name].sync(lambda t: t)  # SingleDeviceStrategy.all_gather returns the input unchanged
        b[name].sync(single_process_gather)
        assert_same_state(a[name], b[name])
        assert_same_state(a[name], rank_stats(0)[name])


def test_bad_gather_raises():
    with pytest.raises(ValueError, match="`gather` must stack the tensor of every rank"):
        FixedHistogram(0.0, 1.0, 4).sync(lambda t: t[:-1])


def _gloo_rank(rank: int, store: str, results: str) -> None:
    import torch.distributed as dist
    from lightning.pytorch.strategies import DDPStrategy

    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=2)
    try:
        stats = rank_stats(rank)
        strategy = DDPStrategy()
        for s in stats.values():
            s.sync(strategy.all_gather)  # Lightning's real all_gather over gloo
        torch.save({name: s.state_dict() for name, s in stats.items()}, os.path.join(results, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


@pytest.mark.ddp
def test_sync_over_two_gloo_processes_equals_merge(tmp_path):
    import torch.multiprocessing as mp

    results = tmp_path / "results"
    results.mkdir()
    ctx = mp.start_processes(
        _gloo_rank, args=(str(tmp_path / "store"), str(results)), nprocs=2, join=False, start_method="fork"
    )
    try:
        for _ in range(12):
            if ctx.join(timeout=10):
                break
        else:
            pytest.fail("the two ranks did not finish")
    finally:
        for proc in ctx.processes:
            if proc.is_alive():
                proc.terminate()
    saved = [torch.load(results / f"rank{r}.pt") for r in (0, 1)]
    expected = {name: s.merge(rank_stats(1)[name]) for name, s in rank_stats(0).items()}
    for name, exp in expected.items():
        for r in (0, 1):
            got = make_stats()[name]
            got.load_state_dict(saved[r][name])
            assert_same_state(got, exp)


def _feed_values(stats: dict, n_values: int) -> None:
    gen = torch.Generator().manual_seed(0)
    done = 0
    while done < n_values:
        n = min(4096, n_values - done)
        target = torch.randn(n, generator=gen)
        preds = target + 0.3 * torch.randn(n, generator=gen)
        feed(stats, preds, target, row_offset=done)
        done += n


def test_state_size_does_not_depend_on_the_number_of_values():
    small, large = make_stats(), make_stats()
    _feed_values(small, 20_000)
    _feed_values(large, 400_000)
    assert int(large["moments"].count) == 400_000
    for name in small:
        assert small[name].state_bytes() == large[name].state_bytes(), name
    tensors_small = [t for s in small.values() for t in s.state_dict().values() if isinstance(t, torch.Tensor)]
    tensors_large = [t for s in large.values() for t in s.state_dict().values() if isinstance(t, torch.Tensor)]
    bytes_small = sum(t.numel() * t.element_size() for t in tensors_small)
    bytes_large = sum(t.numel() * t.element_size() for t in tensors_large)
    assert bytes_small == bytes_large < 256 * 1024


def test_update_merge_and_sync_make_no_host_reads():
    stats, other = make_stats(), rank_stats(1)
    prepared = [batch(0, i) for i in range(3)]
    with HostReadCounter(only_package=None) as counter:
        for preds, target in prepared:
            feed(stats, preds, target)
        for name, s in stats.items():
            s.merge(other[name])
            s.sync(single_process_gather)
    assert counter.total == 0, counter.by_kind
    # the epoch-end accessors do read (and say so): the counter sees them
    with HostReadCounter(only_package=None) as counter:
        histogram_raw_args(stats["hist"])
        _ = stats["sample"].rows
    assert counter.total >= 2


def test_state_dict_round_trip_and_to_for_every_class():
    stats = rank_stats(0)
    for name, s in stats.items():
        fresh = make_stats()[name]
        fresh.load_state_dict(s.state_dict())
        assert_same_state(fresh, s)
        moved = fresh.to("cpu")
        assert moved is fresh and all(t.device.type == "cpu" for t in fresh.state)
        fresh.reset()
        assert_same_state(fresh, make_stats()[name])


def test_load_state_dict_rejects_other_shapes():
    h = FixedHistogram(0.0, 1.0, 4)
    state = h.state_dict()
    state.pop("config")
    state["counts"] = torch.zeros(5, dtype=torch.int64)
    with pytest.raises(ValueError, match=r"`state_dict\['counts'\]` must have shape \(4,\)"):
        h.load_state_dict(state)


def test_sample_rows_are_plottable_before_filling():
    s = BoundedSample(10, 2)
    s.update(torch.tensor([[1.0, 2.0], [3.0, 4.0]]))
    assert s.rows.shape == (2, 2)
    assert np.isnan(s.padded_rows.numpy()[2:]).all()
