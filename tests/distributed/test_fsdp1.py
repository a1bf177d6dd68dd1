"""FSDP1 (Lightning's ``FSDPStrategy``) on two CPU processes (gloo): the gradient norms GradientMonitor logs are
those of the full gradients, not one rank's pieces, and every rank agrees; the layers keep their names under the
FSDP wrappers; only rank 0 writes event files; the NaN guard decides on all shards."""

from pathlib import Path

import pytest

SCRIPT = Path(__file__).with_name("fsdp1_script.py")


@pytest.mark.ddp
def test_fsdp1_gradient_norms_are_the_full_gradients(sharded, tmp_path):
    ranks = sharded.check_full_norms(sharded.run_ranks(SCRIPT, tmp_path, "norms"))
    # really sharded: the 96 values of the first weight are split, and a rank holds no piece of some parameters
    assert ranks[0]["local_sizes"][0] + ranks[1]["local_sizes"][0] == 96
    assert 0 < ranks[0]["local_sizes"][0] < 96
    assert 0 in ranks[0]["local_sizes"] + ranks[1]["local_sizes"]
    for rank in ranks:
        assert not any("_fsdp_wrapped_module" in key for key in rank["logged"])  # the layers' own names
        assert rank["skipped"][-1] == 0  # the guard ("skip") saw finite gradients on every step


@pytest.mark.ddp
@pytest.mark.parametrize("scenario", ["nonfinite", "guard_alone"])
def test_fsdp1_nan_guard_decides_on_all_shards(sharded, tmp_path, scenario):
    # the infinite gradient element lies in rank 0's pieces only: both ranks must skip that step, or one rank's
    # shards of the model would be updated and the other's not (with the gradient monitor's row, and without it)
    sharded.check_both_skipped(sharded.run_ranks(SCRIPT, tmp_path, scenario))


@pytest.mark.ddp
@pytest.mark.slow
def test_fsdp1_hybrid_sharding_sums_within_the_shard_group_only(sharded, tmp_path):
    # four ranks: {0, 1} and {2, 3} each hold one sharded copy, {0, 2} and {1, 3} hold the same pieces. Summing the
    # replicas too would give sqrt(2) times the norm
    ranks = sharded.check_full_norms(sharded.run_ranks(SCRIPT, tmp_path, "hybrid", devices=4), devices=4)
    assert ranks[0]["local_sizes"] == ranks[2]["local_sizes"] != ranks[1]["local_sizes"]  # replicas, and shards
