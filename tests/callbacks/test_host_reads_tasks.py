"""The hot-path rule for every task with predictions handed over: no host read (CPU) and no CUDA sync (GPU) between
flushes, for regression, binary, multiclass (10 and 1,000 classes), multilabel, segmentation, class-probability
targets and (B, T, V) sequences.

The guard of ``test_host_reads.py`` wraps every per-step hook of ``LossDiagnostics()`` (training steps that are not
flush steps, validation batches after the first) and fails on any host read or synchronising CUDA call inside them.
"""

import importlib.util
from pathlib import Path

import pytest
import torch
from lightning.pytorch import LightningModule, Trainer
from lightning.pytorch.loggers import TensorBoardLogger
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_lossdiag import LossDiagnostics

_spec = importlib.util.spec_from_file_location("lossdiag_host_reads", Path(__file__).with_name("test_host_reads.py"))
_reads = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_reads)

EVERY = _reads.EVERY
BATCH = 8

#: task -> (output shape per sample, target maker (n, generator) -> targets, loss)
TASKS = {
    "regression": ((), lambda n, g: torch.randn(n, generator=g), nn.functional.mse_loss),
    "binary": (
        (),
        lambda n, g: (torch.rand(n, generator=g) < 0.3).float(),
        nn.functional.binary_cross_entropy_with_logits,
    ),
    "multiclass10": ((10,), lambda n, g: torch.randint(0, 10, (n,), generator=g), nn.functional.cross_entropy),
    "multiclass1000": ((1000,), lambda n, g: torch.randint(0, 1000, (n,), generator=g), nn.functional.cross_entropy),
    "multilabel": (
        (20,),
        lambda n, g: (torch.rand(n, 20, generator=g) < 0.1).float(),
        nn.functional.binary_cross_entropy_with_logits,
    ),
    "segmentation": (
        (5, 6, 6),
        lambda n, g: torch.where(
            torch.rand(n, 6, 6, generator=g) < 0.1, 255, torch.randint(0, 5, (n, 6, 6), generator=g)
        ),
        lambda p, t: nn.functional.cross_entropy(p, t, ignore_index=255),
    ),
    "soft_targets": (  # class probabilities as targets (mixup, label smoothing): multiclass on each row's argmax
        (10,),
        lambda n, g: torch.softmax(3 * torch.randn(n, 10, generator=g), 1),
        nn.functional.cross_entropy,
    ),
    "sequence": (
        (7, 50),
        lambda n, g: torch.where(torch.rand(n, 7, generator=g) < 0.1, -100, torch.randint(0, 50, (n, 7), generator=g)),
        lambda p, t: nn.functional.cross_entropy(p.transpose(1, 2), t),  # (B, T, V) handed over as it is
    ),
}


class HandOver(LightningModule):
    """A linear model whose output has the task's shape; each step returns {"loss", "preds", "target"}."""

    def __init__(self, task):
        super().__init__()
        self.shape, self.make_target, self.loss_fn = TASKS[task]
        out = 1
        for size in self.shape:
            out *= size
        self.net = nn.Linear(4, out)

    def _step(self, batch):
        x, y = batch
        preds = self.net(x).reshape(x.shape[0], *self.shape)
        return {"loss": self.loss_fn(preds, y), "preds": preds.detach(), "target": y}

    def training_step(self, batch, batch_idx):
        return self._step(batch)

    def validation_step(self, batch, batch_idx):
        return self._step(batch)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.01)

    def _loader(self, n, seed):
        g = torch.Generator().manual_seed(seed)
        return DataLoader(TensorDataset(torch.randn(n, 4, generator=g), self.make_target(n, g)), batch_size=BATCH)

    def train_dataloader(self):
        return self._loader(13 * BATCH, 0)

    def val_dataloader(self):
        return self._loader(3 * BATCH, 1)


def guarded_task_fit(tmp_path, task, accelerator, strict, buffer_steps=1):
    # buffer_steps=1: the shared counts take every step at once, inside the guarded hooks (by default small outputs
    # are held as references and counted at flush steps)
    guard = _reads.SyncGuard([LossDiagnostics(metrics={"buffer_steps": buffer_steps})], strict)
    trainer = Trainer(
        max_epochs=1,
        limit_train_batches=13,
        limit_val_batches=3,
        num_sanity_val_steps=0,
        log_every_n_steps=EVERY,
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
        logger=TensorBoardLogger(tmp_path, name="", version=task),
        accelerator=accelerator,
        devices=1,
        callbacks=[guard],
    )
    trainer.fit(HandOver(task))
    assert trainer.global_step == 13
    return guard, trainer


@pytest.mark.slow
@pytest.mark.parametrize("task", sorted(TASKS))
def test_no_host_reads_between_flushes_for_every_task(tmp_path, task):
    guard, trainer = guarded_task_fit(tmp_path, task, "cpu", _reads.no_host_reads)
    assert guard.guarded_calls == 9 * 6 + 2 * 2  # every per-step hook of the guarded steps ran under the guard
    # the hand-over was used: the epoch's metrics (or errors) of the task were logged
    record = trainer.lossdiag_record
    expected = "metrics/val/mae" if task == "regression" else "metrics/val/accuracy"
    assert record.values(expected), sorted(record.series)[:20]


@pytest.mark.slow
def test_default_buffering_holds_small_steps_and_reads_nothing(tmp_path):
    guard, trainer = guarded_task_fit(tmp_path, "multiclass10", "cpu", _reads.no_host_reads, buffer_steps=None)
    assert guard.guarded_calls == 9 * 6 + 2 * 2
    assert trainer.lossdiag_record.values("metrics/train/accuracy")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA: set_sync_debug_mode only checks CUDA syncs")
@pytest.mark.parametrize("buffer_steps", [1, None], ids=["every_step", "default"])
@pytest.mark.parametrize("task", sorted(TASKS))
def test_no_cuda_sync_between_flushes_for_every_task(tmp_path, task, buffer_steps):
    guard, _ = guarded_task_fit(tmp_path, task, "cuda", _reads.cuda_sync_errors, buffer_steps)
    assert guard.guarded_calls == 9 * 6 + 2 * 2
