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
