"""FSDP2 scenarios for ``test_fsdp2.py``: ``python fsdp2_script.py <out_dir> <devices> [norms|nonfinite]``.

A small MLP is sharded with ``fully_shard`` over ``ModelParallelStrategy(data_parallel_size=devices)`` on gloo
(each rank holds half of every weight and gradient). A probe measures, at every optimizer step, the norms of the
FULL gradients (``full_tensor()``, a collective the probe may use; the package may not) and each rank dumps them with
what ``GradientMonitor`` logged at the flush steps. ``nonfinite``: at step 3 one element of the first weight's
gradient is infinite, which lands in rank 0's shard only; the NaN guard ("skip") must skip that step on both ranks.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.loggers import TensorBoardLogger
from lightning.pytorch.strategies import ModelParallelStrategy
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_lossdiag import LossDiagnostics

EVERY = 3
STEPS = 7


class FullNormProbe(L.Callback):
    """The test's reference: norms of the full gradients, every step (collectives allowed here)."""

    def __init__(self) -> None:
        self.totals: dict[int, float] = {}
        self.groups: dict[int, dict[str, float]] = {}

    def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
        full = {n: p.grad.full_tensor().double() for n, p in pl_module.named_parameters() if p.grad is not None}
        step = trainer.global_step + 1
        self.totals[step] = torch.sqrt(sum((g * g).sum() for g in full.values())).item()
        groups: dict[str, float] = {}
        for name, g in full.items():
            group = ".".join(name.split(".")[:2])  # net.0, net.2
            groups[group] = groups.get(group, 0.0) + (g * g).sum().item()
        self.groups[step] = {k: v**0.5 for k, v in groups.items()}


class Sharded(L.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(6, 16), nn.ReLU(), nn.Linear(16, 4))

    def configure_model(self) -> None:
        from torch.distributed.fsdp import fully_shard

        for layer in self.net:
            if isinstance(layer, nn.Linear):
                fully_shard(layer, mesh=self.device_mesh["data_parallel"])
        fully_shard(self.net, mesh=self.device_mesh["data_parallel"])

    def training_step(self, batch, batch_idx):
        x, y = batch
        return nn.functional.cross_entropy(self.net(x), y)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


class Poisoned(Sharded):
    """Adds ``w[0, 0] * inf`` to the loss at step 3: an infinite gradient in one element of rank 0's shard."""

    def training_step(self, batch, batch_idx):
        loss = super().training_step(batch, batch_idx)
        if self.global_step == 2:
            loss = loss + self.net[0].weight.full_tensor()[0, 0] * float("inf")
        return loss


def run_nonfinite(out: Path, devices: int) -> None:
    torch.manual_seed(0)
    x = torch.randn(STEPS * 8 * devices, 6)
    y = (x[:, 0] > 0).long()
    diag = LossDiagnostics(on_nonfinite="skip", activations=False, errors=False, metrics=False, every_n_steps=EVERY)
    trainer = L.Trainer(
        max_steps=STEPS,
        accelerator="cpu",
        devices=devices,
        strategy=ModelParallelStrategy(data_parallel_size=devices, tensor_parallel_size=1),
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
        logger=False,
        callbacks=[diag],
    )
    model = Poisoned()
    trainer.fit(model, DataLoader(TensorDataset(x, y), batch_size=8))
    full = [p.full_tensor() for p in model.parameters()]
    payload = {
        "rank": trainer.global_rank,
        "skipped": trainer.lossdiag_record.values("nonfinite/skipped_steps"),
        "finite": all(bool(torch.isfinite(p).all()) for p in full),
        "checksum": sum(float(p.double().sum()) for p in full),
    }
    (out / f"nonfinite_rank{trainer.global_rank}.json").write_text(json.dumps(payload))


def main(out: Path, devices: int) -> None:
    torch.manual_seed(0)
    x = torch.randn(STEPS * 8 * devices, 6)
    y = (x[:, 0] > 0).long() + 2 * (x[:, 1] > 0).long()
    probe = FullNormProbe()
    diag = LossDiagnostics(on_nonfinite="warn", activations=False, errors=False, metrics=False)
    trainer = L.Trainer(
        max_steps=STEPS,
        accelerator="cpu",
        devices=devices,
        strategy=ModelParallelStrategy(data_parallel_size=devices, tensor_parallel_size=1),
        log_every_n_steps=EVERY,
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
        logger=TensorBoardLogger(str(out), name="", version=""),
        callbacks=[probe, diag],
    )
    trainer.fit(Sharded(), DataLoader(TensorDataset(x, y), batch_size=8))
    record = trainer.lossdiag_record
    payload = {
        "rank": trainer.global_rank,
        "world": trainer.world_size,
        "logged": {k: record.series(k) for k in record.keys("grad/")},
        "full_totals": probe.totals,
        "full_groups": probe.groups,
        "local_shapes": [tuple(p.to_local().shape) for p in trainer.lightning_module.parameters()],
    }
    (out / f"rank{trainer.global_rank}.json").write_text(json.dumps(payload))


if __name__ == "__main__":
    scenario = sys.argv[3] if len(sys.argv) > 3 else "norms"
    (run_nonfinite if scenario == "nonfinite" else main)(Path(sys.argv[1]), int(sys.argv[2]))
    if torch.distributed.is_initialized():
        torch.distributed.barrier()  # past it, both ranks have written their results
    # Skip the interpreter's teardown: under load a gloo thread still alive at exit aborted it ("terminate called
    # without an active exception", rc -6) after the run had finished and its results were written, even after
    # destroy_process_group(). What the tests check is in the files.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)
