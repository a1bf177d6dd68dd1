"""FSDP2 on two CPU processes (gloo): the gradient norms GradientMonitor logs are those of the full gradients, not
one rank's shard, and every rank agrees; only rank 0 writes event files; the NaN guard decides on all shards."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).with_name("fsdp2_script.py")


def _run(out: Path, scenario: str) -> Path:
    # a Trainer of this process may have set MASTER_PORT (still bound): the two ranks pick a free port of their own
    drop = ("LOCAL_RANK", "NODE_RANK", "WORLD_SIZE", "MASTER_PORT", "MASTER_ADDR", "RANK")
    env = {k: v for k, v in os.environ.items() if k not in drop}
    cmd = [sys.executable, str(SCRIPT), str(out), "2", scenario]
    done = subprocess.run(cmd, cwd=out, env=env, capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-4000:]
    return out


@pytest.fixture(scope="module")
def fsdp2_run(tmp_path_factory) -> Path:
    return _run(tmp_path_factory.mktemp("fsdp2"), "norms")


@pytest.mark.ddp
def test_fsdp2_gradient_norms_are_the_full_gradients(fsdp2_run):
    ranks = [json.loads((fsdp2_run / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert [r["world"] for r in ranks] == [2, 2]
    assert ranks[0]["local_shapes"][0] == [8, 6]  # each rank holds half of the (16, 6) weight: really sharded
    for rank in ranks:
        logged = dict((int(s), v) for s, v in rank["logged"]["grad/norm_total"])
        assert sorted(logged) == [3, 6, 7]  # flushes every 3 steps, and the end of training
        for step, value in logged.items():
            assert value == pytest.approx(rank["full_totals"][str(step)], rel=1e-5), step
        for group in ("net.0", "net.2"):
            series = dict((int(s), v) for s, v in rank["logged"][f"grad/norm/{group}"])
            for step, value in series.items():
                assert value == pytest.approx(rank["full_groups"][str(step)][group], rel=1e-5), (group, step)
        maximum = dict((int(s), v) for s, v in rank["logged"]["grad/norm_total_max"])
        assert maximum[3] == pytest.approx(max(rank["full_totals"][str(s)] for s in (1, 2, 3)), rel=1e-5)
    assert ranks[0]["logged"]["grad/norm_total"] == ranks[1]["logged"]["grad/norm_total"]
    assert len(list(fsdp2_run.glob("events.out.tfevents.*"))) == 1  # rank 0 writes


@pytest.mark.ddp
def test_fsdp2_nan_guard_decides_on_all_shards(tmp_path):
    # the infinite gradient element lies in rank 0's shard only: both ranks must skip that step, or the shards of
    # one model would be updated on one rank and not on the other
    _run(tmp_path, "nonfinite")
    ranks = [json.loads((tmp_path / f"nonfinite_rank{r}.json").read_text()) for r in (0, 1)]
    assert [r["skipped"][-1] for r in ranks] == [1, 1]
    assert all(r["finite"] for r in ranks)
    assert ranks[0]["checksum"] == ranks[1]["checksum"]  # one model, the same full weights seen from both ranks
