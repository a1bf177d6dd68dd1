"""Deterministic per-rank statistics for ``test_sync_memory.py``; also a gloo rank: ``python stats_scenario.py RANK
STORE OUT`` builds rank RANK's statistics, syncs them with Lightning's real ``all_gather`` over gloo (2 ranks) and
saves the state dicts to ``OUT/rank<RANK>.pt``."""

from __future__ import annotations

import math
import os
import sys

import torch

from lightning_lossdiag.stats import BinnedErrors, BoundedSample, FixedHistogram, RunningMoments, TopKWorst


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
    """Predictions and targets of batch ``i`` of ``rank``; batch 1 has one NaN prediction."""
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


def main(rank: int, store: str, out: str) -> None:
    import torch.distributed as dist
    from lightning.pytorch.strategies import DDPStrategy

    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=2)
    try:
        stats = rank_stats(rank)
        strategy = DDPStrategy()
        for s in stats.values():
            s.sync(strategy.all_gather)  # Lightning's real all_gather over gloo
        torch.save({name: s.state_dict() for name, s in stats.items()}, os.path.join(out, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":
    main(int(sys.argv[1]), sys.argv[2], sys.argv[3])
