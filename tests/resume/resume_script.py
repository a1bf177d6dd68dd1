"""Module, data and helper callbacks for ``test_resume.py``, used through the ``lossdiag`` CLI by ``class_path``.

The test runs ``python -m lightning_lossdiag.cli fit --config <yaml>`` with this folder on ``PYTHONPATH``.

Training is a pure function of the global step, whatever the dataloader does after a restart: the training batch
only counts (6 dummy rows per epoch); ``training_step`` draws its 16 rows from a fixed bank with a generator seeded
by ``global_step``. So a run killed and resumed from a checkpoint must end where an uninterrupted run ends.

The step-by-step events are planted so every piece of callback state has something to hold: a NaN loss at
``NAN_AT`` (``on_nonfinite="skip"`` drops that update), a loss spike at ``SPIKE_AT``, gradient clipping (the
Trainer's ``gradient_clip_val``), and a ``ReduceLROnPlateau`` with ``mode="max"`` on ``val/loss`` (a falling loss
is a bad epoch for it: it reduces the lr every epoch, and the scheduler check raises ``scheduler_mode_mismatch``).
"""

from __future__ import annotations

import json
import math
import os
import signal
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch import Callback
from torch import Tensor, nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_lossdiag import LossDiagnostics, LossMixin

BATCHES_PER_EPOCH = 6
NAN_AT = 4  # global_step before the optimizer step whose loss is NaN (the monitors call it step 5)
SPIKE_AT = 14  # global_step before the step whose loss spikes (step 15)


def _bank(n: int, seed: int) -> tuple[Tensor, Tensor]:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 3, generator=g)
    y = x @ torch.tensor([1.5, -2.0, 0.5]) + 0.3 * torch.randn(n, generator=g)
    return x, y


class StepModule(LossMixin, L.LightningModule):
    """A small regression MLP whose training rows depend only on ``global_step``."""

    def __init__(self, lr: float = 0.05) -> None:
        super().__init__(loss="mse")
        self.lr = lr
        self.net = nn.Sequential(nn.Linear(3, 16), nn.Tanh(), nn.Linear(16, 1))
        self.bank_x, self.bank_y = _bank(256, seed=0)

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x).squeeze(-1)

    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        g = torch.Generator().manual_seed(1000 + int(self.global_step))
        idx = torch.randint(0, self.bank_x.shape[0], (16,), generator=g)
        x, y = self.bank_x[idx].to(self.device), self.bank_y[idx].to(self.device)
        preds = self(x)
        if self.global_step == NAN_AT:
            preds = preds * math.nan
        if self.global_step == SPIKE_AT:
            preds = preds + 40.0
        return self.compute_loss(preds, y, stage="train")

    def validation_step(self, batch: Any, batch_idx: int) -> Tensor:
        x, y = batch
        return self.compute_loss(self(x), y, stage="val")

    def configure_optimizers(self) -> Any:
        opt = torch.optim.SGD(self.parameters(), lr=self.lr, momentum=0.9)
        sched = torch.optim.lr_scheduler.ReduceLROnPlateau(opt, mode="max", factor=0.5, patience=0)
        # interval "step" with one step per epoch (after validation): Lightning skips EPOCH-interval schedulers at the
        # end of the epoch a fit resumes into (FitLoop.on_advance_end, `not self.restarting`), so an epoch-interval
        # plateau would make the resumed run differ from the uninterrupted one for reasons outside this package
        config = {"scheduler": sched, "monitor": "val/loss", "interval": "step", "frequency": BATCHES_PER_EPOCH}
        return {"optimizer": opt, "lr_scheduler": config}


class StepData(L.LightningDataModule):
    """``BATCHES_PER_EPOCH`` dummy training batches (their content is unused) and a fixed validation set."""

    def train_dataloader(self) -> DataLoader:
        return DataLoader(TensorDataset(torch.arange(BATCHES_PER_EPOCH)), batch_size=1)

    def val_dataloader(self) -> DataLoader:
        return DataLoader(TensorDataset(*_bank(64, seed=1)), batch_size=32)


class KillAfterCheckpoint(Callback):
    """SIGKILL this process at the start of the batch after ``step``, once the checkpoint of ``step`` exists."""

    def __init__(self, step: int, checkpoint: str) -> None:
        self.step = step
        self.checkpoint = checkpoint

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: Any, batch: Any, batch_idx: int) -> None:
        if trainer.global_step == self.step:
            if not Path(self.checkpoint).is_file():
                raise RuntimeError(f"expected the checkpoint {self.checkpoint} before the kill at step {self.step}")
            os.kill(os.getpid(), signal.SIGKILL)


class DumpState(Callback):
    """At the end of fit, write the ``LossDiagnostics`` state and the plateau scheduler's state to ``path``."""

    def __init__(self, path: str) -> None:
        self.path = path

    def on_fit_end(self, trainer: L.Trainer, pl_module: Any) -> None:
        (diag,) = [cb for cb in trainer.callbacks if isinstance(cb, LossDiagnostics)]  # type: ignore[attr-defined]
        sched = trainer.lr_scheduler_configs[0].scheduler
        payload = {
            "global_step": trainer.global_step,
            "diagnostics": diag.state_dict(),
            "findings": [f.code for f in diag.findings],
            "plateau": {k: sched.state_dict()[k] for k in ("best", "num_bad_epochs", "cooldown_counter", "last_epoch")},
            "lr": trainer.optimizers[0].param_groups[0]["lr"],
        }
        Path(self.path).write_text(json.dumps(payload, indent=1, default=str), encoding="utf-8")
