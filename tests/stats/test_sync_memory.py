"""sync across ranks (fake 2-rank gather, Lightning-style gathers, real gloo), fixed state size, no host reads."""

import importlib.util
import os
import pickle
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from lightning_lossdiag.stats import BoundedSample, FixedHistogram, histogram_raw_args, single_process_gather
from lightning_lossdiag.stats.distributed import pack
from lightning_lossdiag.testing import HostReadCounter

_spec = importlib.util.spec_from_file_location("stats_scenario", Path(__file__).with_name("stats_scenario.py"))
scenario = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(scenario)
make_stats, batch, feed, rank_stats = scenario.make_stats, scenario.batch, scenario.feed, scenario.rank_stats


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
    for name in ranks[0]:
        packed = torch.stack([pack(sent[name][0]), pack(sent[name][1])])
        ranks[0][name].sync(lambda t, packed=packed: packed)
    merged = ranks[0]
    preds = torch.cat([batch(r, i)[0] for r in (0, 1) for i in range(3)])
    target = torch.cat([batch(r, i)[1] for r in (0, 1) for i in range(3)])
    err = (preds - target).double()
    finite = err[torch.isfinite(err)]
    assert torch.equal(merged["hist"].counts, torch.histc(finite, 64, -3.0, 3.0).long())
    assert int(merged["hist"].nonfinite) == 2  # one NaN prediction per rank
    assert float(merged["moments"].count) == len(target)
    torch.testing.assert_close(merged["moments"].mean, target.double().mean(), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(merged["moments"].var_unbiased, target.double().var(), rtol=1e-10, atol=1e-12)
    top = torch.sort(finite.abs(), descending=True).values[:20]
    assert torch.equal(merged["worst"].scores[2:], top[:18])  # the two NaN errors rank first
    assert merged["worst"].scores[:2].isnan().all()
    assert merged["sample"].filled == 128
    assert int(merged["sample"].seen) == len(target)


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


@pytest.mark.ddp
def test_sync_over_two_gloo_processes_equals_merge(tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    script = Path(__file__).with_name("stats_scenario.py")
    procs = [
        subprocess.Popen([sys.executable, str(script), str(r), str(tmp_path / "store"), str(tmp_path)], env=env)
        for r in (0, 1)
    ]
    try:
        codes = [p.wait(timeout=240) for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    assert codes == [0, 0]
    saved = [torch.load(tmp_path / f"rank{r}.pt") for r in (0, 1)]
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
        assert moved is fresh
        assert all(t.device.type == "cpu" for t in fresh.state)
        fresh.reset()
        assert_same_state(fresh, make_stats()[name])
        clone = pickle.loads(pickle.dumps(s))  # callbacks holding these states must pickle
        assert_same_state(clone, s)
        assert clone.state_bytes() == s.state_bytes()


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
