"""FSDP2 on two CPU processes (gloo): the gradient norms GradientMonitor logs are those of the full gradients, not
one rank's shard, and every rank agrees; only rank 0 writes event files; the NaN guard decides on all shards."""

from pathlib import Path

import pytest

SCRIPT = Path(__file__).with_name("fsdp2_script.py")


@pytest.mark.ddp
def test_fsdp2_gradient_norms_are_the_full_gradients(sharded, tmp_path):
    ranks = sharded.check_full_norms(sharded.run_ranks(SCRIPT, tmp_path, "norms"))
    assert ranks[0]["local_shapes"][0] == [8, 6]  # each rank holds half of the (16, 6) weight: really sharded


@pytest.mark.ddp
def test_fsdp2_nan_guard_decides_on_all_shards(sharded, tmp_path):
    # the infinite gradient element lies in rank 0's shard only: both ranks must skip that step, or the shards of
    # one model would be updated on one rank and not on the other
    ranks = sharded.check_both_skipped(sharded.run_ranks(SCRIPT, tmp_path, "nonfinite"))
    assert ranks[0]["checksum"] == ranks[1]["checksum"]  # one model, the same full weights seen from both ranks
