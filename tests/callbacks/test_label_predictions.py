"""Class indices handed over as predictions (``preds=logits.argmax(1)``) are refused once, with the fix named.

They used to become a regression task: MSE and R^2 of class ids, and regression findings on them.
"""

import warnings

import lightning as L
import pytest
import torch
from lightning.pytorch import Trainer
from lightning.pytorch.loggers import TensorBoardLogger
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_lossdiag import LossDiagnostics, MetricCurves
from lightning_lossdiag.callbacks._task import label_predictions


def test_integer_predictions_shaped_like_the_targets_are_labels():
    assert label_predictions(torch.tensor([2, 0, 1]), torch.tensor([2, 1, 1]))
    assert label_predictions(torch.zeros(2, 4, 4, dtype=torch.long), torch.zeros(2, 4, 4, dtype=torch.long))  # masks
    assert label_predictions(torch.tensor([True, False]), torch.tensor([1.0, 0.0]))
    assert not label_predictions(torch.randn(3, 4), torch.tensor([2, 1, 1]))
    assert not label_predictions(torch.tensor([2, 0, 1]), torch.tensor([2, 1, 1]), task="regression")


class _Argmax(L.LightningModule):
    def __init__(self):
        super().__init__()
        self.net = nn.Linear(16, 10)

    def _step(self, batch):
        x, y = batch
        logits = self.net(x)
        return {"loss": nn.functional.cross_entropy(logits, y), "preds": logits.argmax(1), "target": y}

    def training_step(self, batch, batch_idx):
        return self._step(batch)

    def validation_step(self, batch, batch_idx):
        return self._step(batch)

    def configure_optimizers(self):
        return torch.optim.Adam(self.parameters(), lr=1e-2)


def _fit(tmp_path, callbacks):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(256, 16, generator=g)
    loader = DataLoader(TensorDataset(x, x[:, :10].argmax(1)), batch_size=32)
    trainer = Trainer(
        max_epochs=2,
        callbacks=callbacks,
        logger=TensorBoardLogger(tmp_path),
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
        log_every_n_steps=4,
    )
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer.fit(_Argmax(), loader, loader)
    return trainer, [str(w.message) for w in caught if "class indices" in str(w.message)]


def test_a_fit_handing_argmax_predictions_is_told_once_per_stage_and_logs_no_nonsense(tmp_path):
    trainer, messages = _fit(tmp_path, [LossDiagnostics()])
    record = trainer.lossdiag_record
    assert not [k for k in record.scalars if k.startswith(("metrics/", "errors/"))]  # no MSE of class ids
    assert trainer.global_step == 16  # training itself went on
    # MetricCurves for train and val, ErrorDistributionMonitor for val: one message each, whatever the steps
    assert len(messages) == 3
    assert any(m.startswith("MetricCurves: the val step handed int64 predictions of shape (32,)") for m in messages)
    assert all("preds=logits.detach()" in m for m in messages)


def test_task_regression_keeps_integer_values_as_regression(tmp_path):
    trainer, messages = _fit(tmp_path, [MetricCurves(task="regression")])
    assert messages == []
    assert "metrics/val/mse" in trainer.lossdiag_record.scalars


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_float_predictions_are_never_refused(dtype):
    assert not label_predictions(torch.zeros(4, dtype=dtype), torch.zeros(4, dtype=torch.long))
