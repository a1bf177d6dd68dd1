"""What the FSDP1 and FSDP2 scenarios share: starting the ranks, the probe's reference norms, the checks.

The scripts (``fsdp1_script.py``, ``fsdp2_script.py``) import it as a sibling (their folder is on ``sys.path`` when
they run); the tests get it from the ``sharded`` fixture of ``conftest.py``, which loads it by path.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import lightning as L

EVERY = 3  # flush interval of the norms scenario
STEPS = 7


def run_ranks(script: Path, out: Path, scenario: str, devices: int = 2) -> Path:
    """Run ``script`` on ``devices`` gloo ranks (Lightning starts the others); fail with its output when it fails."""
    # a Trainer of this process may have set MASTER_PORT (still bound): the ranks pick a free port of their own
    drop = ("LOCAL_RANK", "NODE_RANK", "WORLD_SIZE", "MASTER_PORT", "MASTER_ADDR", "RANK")
    env = {k: v for k, v in os.environ.items() if k not in drop}
    cmd = [sys.executable, str(script), str(out), str(devices), scenario]
    done = subprocess.run(cmd, cwd=out, env=env, capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-4000:]
    return out


class Classifier(L.LightningModule):
    """The scenarios' model: a two-layer MLP, cross-entropy, SGD; each script shards it in ``configure_model``."""

    def __init__(self) -> None:
        from torch import nn

        super().__init__()
        self.net = nn.Sequential(nn.Linear(6, 16), nn.ReLU(), nn.Linear(16, 4))

    def training_step(self, batch: Any, batch_idx: int) -> Any:
        from torch.nn.functional import cross_entropy

        x, y = batch
        return cross_entropy(self.net(x), y)

    def configure_optimizers(self) -> Any:
        import torch

        return torch.optim.SGD(self.parameters(), lr=0.1)


def trainer(devices: int, strategy: Any, **kwargs: Any) -> L.Trainer:
    """A Trainer of ``STEPS`` steps on ``devices`` CPU processes under ``strategy``, no checkpoints, no bars."""
    return L.Trainer(
        max_steps=STEPS,
        accelerator="cpu",
        devices=devices,
        strategy=strategy,
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
        **kwargs,
    )


class FullNormProbe(L.Callback):
    """The tests' reference: norms of the full gradients and weights at every optimizer step (collectives allowed).

    A subclass says how the full tensors are gathered (``full_tensors``: two maps parameter name -> tensor, the
    gradients and the weights).
    """

    def __init__(self) -> None:
        self.totals: dict[int, float] = {}
        self.groups: dict[int, dict[str, float]] = {}
        self.weights: dict[int, dict[str, float]] = {}

    def full_tensors(self, pl_module: Any) -> tuple[dict[str, Any], dict[str, Any]]:
        raise NotImplementedError

    def on_before_optimizer_step(self, trainer: Any, pl_module: Any, optimizer: Any) -> None:
        step = trainer.global_step + 1
        grads, weights = self.full_tensors(pl_module)
        self.totals[step], self.groups[step] = full_norms(grads)
        self.weights[step] = full_norms(weights)[1]


def full_norms(full: dict[str, Any]) -> tuple[float, dict[str, float]]:
    """The total L2 norm of full gradients by parameter name, and that of each group ``net.<i>`` (the reference)."""
    total, groups = 0.0, {}
    for name, g in full.items():
        square = float((g.double() * g.double()).sum())
        group = ".".join(name.split(".")[:2])  # net.0, net.2
        groups[group] = groups.get(group, 0.0) + square
        total += square
    return math.sqrt(total), {k: math.sqrt(v) for k, v in groups.items()}


def check_full_norms(out: Path, devices: int = 2) -> list[dict[str, Any]]:
    """Every rank logged the norms of the full gradients at the flushes, the same on all; rank 0 alone wrote."""
    ranks = [json.loads((out / f"rank{r}.json").read_text()) for r in range(devices)]
    assert [r["world"] for r in ranks] == [devices] * devices
    for rank in ranks:
        logged = dict((int(s), v) for s, v in rank["logged"]["grad/norm_total"])
        assert sorted(logged) == [3, 6, 7]  # flushes every 3 steps, and the end of training
        for step, value in logged.items():
            assert math.isclose(value, rank["full_totals"][str(step)], rel_tol=1e-5), step
        for group in ("net.0", "net.2"):
            series = dict((int(s), v) for s, v in rank["logged"][f"grad/norm/{group}"])
            for step, value in series.items():
                assert math.isclose(value, rank["full_groups"][str(step)][group], rel_tol=1e-5), (group, step)
            weights = dict((int(s), v) for s, v in rank["logged"][f"param/norm/{group}"])  # measured at flushes
            assert sorted(weights) == [3, 6, 7], group
            for step, value in weights.items():
                assert math.isclose(value, rank["full_weights"][str(step)][group], rel_tol=1e-5), (group, step)
        maximum = dict((int(s), v) for s, v in rank["logged"]["grad/norm_total_max"])
        assert math.isclose(maximum[3], max(rank["full_totals"][str(s)] for s in (1, 2, 3)), rel_tol=1e-5)
    assert all(r["logged"]["grad/norm_total"] == ranks[0]["logged"]["grad/norm_total"] for r in ranks)
    for rank in ranks:  # the hot-path rule holds there too: no host read between flushes (batch 0: one-time checks)
        between = [n for n, step in rank["reads"][1:] if step % EVERY and step < STEPS]
        assert between == [0] * len(between), rank["reads"]
        assert len(between) >= 3
    assert len(list(out.glob("events.out.tfevents.*"))) == 1  # rank 0 writes
    return ranks


def check_both_skipped(out: Path) -> list[dict[str, Any]]:
    """Both ranks skipped the one step whose infinite gradient lay in rank 0's shard, and kept finite weights."""
    ranks = [json.loads((out / f"nonfinite_rank{r}.json").read_text()) for r in (0, 1)]
    assert [r["skipped"][-1] for r in ranks] == [1, 1]
    assert all(r["finite"] for r in ranks)
    return ranks


def data(devices: int, nonfinite: bool) -> Any:
    """The seeded batches of a scenario: 8 rows per rank and step, 2 classes (``nonfinite``) or 4."""
    import torch
    from torch.utils.data import DataLoader, TensorDataset

    torch.manual_seed(0)
    x = torch.randn(STEPS * 8 * devices, 6)
    y = (x[:, 0] > 0).long() if nonfinite else (x[:, 0] > 0).long() + 2 * (x[:, 1] > 0).long()
    return DataLoader(TensorDataset(x, y), batch_size=8)


def read_probe() -> tuple[Any, Any]:
    """A host-read counter (the package's reads only) and the callback that splits its reads by batch (put FIRST)."""
    from lightning_lossdiag.testing import HostReadCounter, StepReadProbe

    counter = HostReadCounter()
    return counter, StepReadProbe(counter)


def write_norms(out: Path, trainer: Any, probe: FullNormProbe, reads: Any, **extra: Any) -> None:
    """The norms scenario's results of this rank: what was logged beside the probe's reference, reads per batch."""
    record = trainer.lossdiag_record
    payload = {
        "reads": list(zip(reads.reads, reads.steps_after, strict=True)),
        "rank": trainer.global_rank,
        "world": trainer.world_size,
        "logged": {k: record.series(k) for k in [*record.keys("grad/"), *record.keys("param/")]},
        "skipped": record.values("nonfinite/skipped_steps"),
        "full_totals": probe.totals,
        "full_groups": probe.groups,
        "full_weights": probe.weights,
        **extra,
    }
    (out / f"rank{trainer.global_rank}.json").write_text(json.dumps(payload))


def write_nonfinite(out: Path, trainer: Any, full: list[Any]) -> None:
    """The nonfinite scenario's results of this rank: the skipped steps, and the full weights after the fit."""
    payload = {
        "rank": trainer.global_rank,
        "skipped": trainer.lossdiag_record.values("nonfinite/skipped_steps"),
        "finite": all(bool(p.isfinite().all()) for p in full),
        "checksum": sum(float(p.double().sum()) for p in full),
    }
    (out / f"nonfinite_rank{trainer.global_rank}.json").write_text(json.dumps(payload))


def main(**scenarios: Any) -> None:
    """``script.py <out_dir> <devices> [scenario]``: run it (default ``norms``), wait for both ranks, exit at once."""
    import torch

    scenario = sys.argv[3] if len(sys.argv) > 3 else "norms"
    scenarios[scenario](Path(sys.argv[1]), int(sys.argv[2]))
    if torch.distributed.is_initialized():
        torch.distributed.barrier()  # past it, both ranks have written their results
    # Skip the interpreter's teardown: under load a gloo thread still alive at exit aborted it ("terminate called
    # without an active exception", rc -6) after the run had finished and its results were written, even after
    # destroy_process_group(). What the tests check is in the files.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)
