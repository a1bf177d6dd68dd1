"""Quantile regression: ``(N, Q)`` outputs of the package's own ``quantile`` loss with ``(N,)`` targets.

``LossDiagnostics`` used to stop such a fit with "regression predictions and targets must have the same number of
elements". The error statistics and metrics now read the median column, the coverage of each quantile is logged,
and outputs that no loss explains are refused once, with the way out named. Expected values are computed here from
the final model.
"""

import warnings

import lightning as L
import pytest
import torch
from lightning.pytorch import Trainer
from lightning.pytorch.loggers import TensorBoardLogger
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_lossdiag import LossDiagnostics, LossMixin
from lightning_lossdiag.callbacks._task import point_column
from lightning_lossdiag.losses import QuantileLoss


@pytest.mark.parametrize(
    ("quantiles", "target_shape", "column"),
    [([0.1, 0.5, 0.9], (6,), 1), ([0.05, 0.25, 0.6, 0.95], (6, 1), 2), ([0.25, 0.75], (6,), 0)],
)
def test_the_point_prediction_is_the_quantile_nearest_the_median(quantiles, target_shape, column):
    preds = torch.zeros(6, len(quantiles))
    assert point_column(QuantileLoss(quantiles), preds, torch.zeros(target_shape)) == column


def test_outputs_that_fit_their_targets_need_no_column():
    assert point_column(QuantileLoss(0.5), torch.zeros(6), torch.zeros(6)) is None
    assert point_column(nn.MSELoss(), torch.zeros(6, 3), torch.zeros(6)) is None
    assert point_column(QuantileLoss([0.1, 0.9]), torch.zeros(6, 3), torch.zeros(6)) is None  # 3 outputs, 2 quantiles


class _Quantiles(LossMixin, L.LightningModule):
    def __init__(self, mixin=True):
        super().__init__(loss={"name": "quantile", "quantiles": [0.1, 0.5, 0.9]})
        self.mixin = mixin
        self.net = nn.Linear(8, 3)

    def _step(self, batch, stage):
        x, y = batch
        out = self.net(x)
        if self.mixin:
            return self.compute_loss(out, y, stage)
        return {"loss": self.criterion(out, y), "preds": out.detach(), "target": y}

    def training_step(self, batch, batch_idx):
        return self._step(batch, "train")

    def validation_step(self, batch, batch_idx):
        return self._step(batch, "val")

    def configure_optimizers(self):
        return torch.optim.Adam(self.parameters(), lr=1e-2)


def _fit(tmp_path, model):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(256, 8, generator=g)
    y = x[:, 0] + 0.3 * torch.randn(256, generator=g)
    loader = DataLoader(TensorDataset(x, y), batch_size=64)
    trainer = Trainer(
        max_epochs=2,
        callbacks=[LossDiagnostics()],
        logger=TensorBoardLogger(tmp_path),
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
        log_every_n_steps=2,
    )
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer.fit(model, loader, loader)
    return trainer, x, y, [str(w.message) for w in caught if "several outputs per target" in str(w.message)]


@pytest.mark.parametrize("mixin", [True, False], ids=["loss_mixin", "handed_over_dict"])
def test_a_quantile_fit_reads_the_median_column(tmp_path, mixin):
    model = _Quantiles(mixin)  # a returned dict carries no criterion: nothing tells which column is the prediction
    trainer, x, y, messages = _fit(tmp_path, model)
    record = trainer.lossdiag_record
    if not mixin:
        assert len(messages) == 3  # MetricCurves for train and val, ErrorDistributionMonitor for val
        assert not [k for k in record.scalars if k.startswith(("metrics/", "errors/"))]
        assert trainer.global_step == 8
        return
    assert messages == []
    with torch.no_grad():
        out = model.net(x)
    median = out[:, 1]
    assert record.last("metrics/val/mae") == pytest.approx((median - y).abs().mean().item(), rel=1e-5)
    assert record.last("errors/val/samples") == 256
    # coverage: the share of targets at or below each quantile's prediction, and inside [q0.1, q0.9]
    for column, q in enumerate(("0.1", "0.5", "0.9")):
        expected = (y <= out[:, column]).double().mean().item()
        assert record.last(f"metrics/val/coverage/{q}") == pytest.approx(expected, abs=1e-6)
    inside = ((y >= out[:, 0]) & (y <= out[:, 2])).double().mean().item()
    assert record.last("metrics/val/interval_coverage") == pytest.approx(inside, abs=1e-6)
    assert "metrics/train/interval_coverage" in record.scalars


def test_coverage_counts_unsorted_quantiles_and_column_targets():
    from lightning_lossdiag.metrics import QuantileCoverage

    g = torch.Generator().manual_seed(3)
    preds = torch.randn(50, 3, generator=g).sort(1).values[:, [2, 0, 1]]  # columns: q0.9, q0.1, q0.5
    target = torch.randn(50, 1, generator=g)
    metric = QuantileCoverage([0.9, 0.1, 0.5])
    metric.update(preds[:20], target[:20])
    metric.update(preds[20:], target[20:])
    expected = [(target[:, 0] <= preds[:, c]).double().mean().item() for c in range(3)]
    expected.append(((target[:, 0] >= preds[:, 1]) & (target[:, 0] <= preds[:, 0])).double().mean().item())
    assert metric.compute().tolist() == pytest.approx(expected)
    with pytest.raises(ValueError, match="at least two quantiles"):
        QuantileCoverage([0.5])
