"""A binary classifier with a one-output head hands over ``(N, 1)`` logits with ``(N,)`` 0/1 labels.

That was read as regression (R^2 of logits against labels) with a false ``shape_broadcast`` warning, since the
loss had squeezed the logits itself. It is a binary task; the metrics are checked against torchmetrics.
"""

import lightning as L
import pytest
import torch
from lightning.pytorch import Trainer
from lightning.pytorch.loggers import TensorBoardLogger
from torch import nn
from torch.utils.data import DataLoader, TensorDataset
from torchmetrics.functional.classification import binary_accuracy, binary_auroc

from lightning_lossdiag import LossDiagnostics
from lightning_lossdiag.callbacks._task import infer_task_info


@pytest.mark.parametrize(
    ("preds", "target"),
    [
        (torch.randn(8, 1), torch.tensor([0.0, 1.0] * 4)),
        (torch.randn(8), torch.tensor([[0.0], [1.0]] * 4)),
        (torch.randn(8, 1), torch.tensor([0, 1] * 4)),
    ],
    ids=["N1_vs_N", "N_vs_N1", "N1_vs_int"],
)
def test_a_trailing_one_with_0_1_labels_is_binary(preds, target):
    info = infer_task_info(None, preds, target)
    assert (info.task, info.num_classes) == ("binary", 2)


def test_values_that_are_not_labels_stay_regression():
    assert infer_task_info(None, torch.randn(8, 1), torch.randn(8)).task == "regression"
    assert infer_task_info(None, torch.randn(8, 2), torch.tensor([0.0, 1.0] * 4)).task == "regression"


class _OneOutput(L.LightningModule):
    def __init__(self):
        super().__init__()
        self.net = nn.Linear(16, 1)

    def _step(self, batch):
        x, y = batch
        logits = self.net(x)  # (N, 1)
        loss = nn.functional.binary_cross_entropy_with_logits(logits.squeeze(1), y)
        return {"loss": loss, "preds": logits.detach(), "target": y}

    def training_step(self, batch, batch_idx):
        return self._step(batch)

    def validation_step(self, batch, batch_idx):
        return self._step(batch)

    def configure_optimizers(self):
        return torch.optim.Adam(self.parameters(), lr=1e-2)


def test_a_fit_with_a_one_output_head_logs_binary_metrics(tmp_path):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(512, 16, generator=g)
    y = (x[:, 0] > 0.5).float()
    loader = DataLoader(TensorDataset(x, y), batch_size=64)
    model = _OneOutput()
    diag = LossDiagnostics()
    trainer = Trainer(
        max_epochs=2,
        callbacks=[diag],
        logger=TensorBoardLogger(tmp_path),
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
        log_every_n_steps=4,
    )
    trainer.fit(model, loader, loader)
    record = trainer.lossdiag_record
    assert record.notes["task"] == "binary"
    assert "shape_broadcast" not in [f.code for f in diag.findings]
    with torch.no_grad():
        scores = model.net(x).squeeze(1)
    assert record.last("metrics/val/accuracy") == pytest.approx(binary_accuracy(scores.sigmoid(), y).item(), abs=1e-6)
    # binned AUROC (101 thresholds) against the exact one: within a bin's width of error
    assert record.last("metrics/val/auroc") == pytest.approx(binary_auroc(scores.sigmoid(), y.long()).item(), abs=0.02)


@pytest.mark.parametrize("dtype", [torch.float32, torch.long], ids=["float_masks", "int_masks"])
def test_a_one_channel_segmentation_head_is_binary(dtype):
    # (N, 1, H, W) logits with (N, H, W) masks: regression (float masks) or one-class multiclass (int masks) before
    masks = (torch.rand(2, 8, 8, generator=torch.Generator().manual_seed(0)) < 0.3).to(dtype)
    info = infer_task_info(None, torch.randn(2, 1, 8, 8), masks)
    assert (info.task, info.num_classes) == ("binary", 2)
    assert infer_task_info(None, torch.randn(2, 1, 8, 8), torch.randn(2, 8, 8)).task == "regression"  # depth maps


class _OneChannelSeg(L.LightningModule):
    def __init__(self):
        super().__init__()
        self.net = nn.Conv2d(3, 1, 3, padding=1)

    def _step(self, batch):
        x, y = batch
        logits = self.net(x)  # (N, 1, H, W)
        loss = nn.functional.binary_cross_entropy_with_logits(logits.squeeze(1), y.float())
        return {"loss": loss, "preds": logits.detach(), "target": y}

    def training_step(self, batch, batch_idx):
        return self._step(batch)

    def validation_step(self, batch, batch_idx):
        return self._step(batch)

    def configure_optimizers(self):
        return torch.optim.Adam(self.parameters(), lr=1e-2)


def test_a_binary_segmentation_fit_counts_every_pixel(tmp_path):
    g = torch.Generator().manual_seed(1)
    x = torch.randn(32, 3, 8, 8, generator=g)
    y = (x[:, 0] > 0.5).long()  # (N, H, W) masks
    loader = DataLoader(TensorDataset(x, y), batch_size=8)
    model = _OneChannelSeg()
    trainer = Trainer(
        max_epochs=2,
        callbacks=[LossDiagnostics()],
        logger=TensorBoardLogger(tmp_path),
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
        log_every_n_steps=2,
    )
    trainer.fit(model, loader, loader)
    record = trainer.lossdiag_record
    assert record.notes["task"] == "binary"
    assert record.last("errors/val/samples") == 32 * 8 * 8  # every pixel a row
    with torch.no_grad():
        scores = model.net(x).reshape(-1)
    expected = binary_accuracy(scores.sigmoid(), y.reshape(-1)).item()
    assert record.last("metrics/val/accuracy") == pytest.approx(expected, abs=1e-6)
