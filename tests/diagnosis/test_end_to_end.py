"""Real small runs through the Doctor: a user's mis-scaled accuracy, and the default NaN policy of the bundle."""

import lightning as L
import pytest
import torch
from lightning.pytorch import Trainer
from lightning.pytorch.loggers import TensorBoardLogger
from torch import nn
from torch.utils.data import DataLoader, TensorDataset
from torchmetrics.classification import BinaryAccuracy

from lightning_lossdiag import LossDiagnostics, MetricCurves
from lightning_lossdiag.callbacks.doctor import Doctor


class SigmoidBCE(L.LightningModule):
    """A plain module (no mixin): sigmoid + nn.BCELoss, returns {"loss", "preds", "target"}, logs its own val_acc."""

    def __init__(self, acc_divisor):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(4, 16), nn.Tanh(), nn.Linear(16, 1))
        self.criterion = nn.BCELoss()
        self.acc_divisor = acc_divisor

    def forward(self, x):
        return torch.sigmoid(self.net(x)).squeeze(-1)

    def training_step(self, batch, batch_idx):
        x, y = batch
        p = self(x)
        loss = self.criterion(p, y)
        self.log("train_loss", loss)
        return {"loss": loss, "preds": p.detach(), "target": y}

    def validation_step(self, batch, batch_idx):
        x, y = batch
        p = self(x)
        loss = self.criterion(p, y)
        correct = ((p > 0.5).float() == y).float().sum()
        self.log("val_loss", loss)
        self.log("val_acc", correct / (len(y) * self.acc_divisor))  # acc_divisor=100: the bug under test
        return {"loss": loss, "preds": p, "target": y}

    def configure_optimizers(self):
        return torch.optim.Adam(self.parameters(), lr=0.02)


def data():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(320, 4, generator=g)
    y = ((x[:, 0] + 0.5 * x[:, 1]) > 0).float()
    train = DataLoader(TensorDataset(x[:256], y[:256]), batch_size=32, shuffle=False)
    val = DataLoader(TensorDataset(x[256:], y[256:]), batch_size=32)
    return train, val, x[256:], y[256:]


def fit(tmp_path, acc_divisor):
    torch.manual_seed(0)
    model, doctor = SigmoidBCE(acc_divisor), Doctor(print_report=False)
    trainer = Trainer(
        default_root_dir=tmp_path,
        max_epochs=2,
        limit_train_batches=8,
        limit_val_batches=2,
        log_every_n_steps=4,
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
        accelerator="cpu",
        devices=1,
        logger=TensorBoardLogger(tmp_path),
        callbacks=[MetricCurves(), doctor],
    )
    train, val, xv, yv = data()
    trainer.fit(model, train, val)
    model.eval()
    with torch.no_grad():
        reference = BinaryAccuracy()(model(xv), yv.long()).item()  # the accuracy of the final model, independently
    return doctor, reference


def test_percent_scaled_accuracy_is_found_with_both_numbers(tmp_path):
    doctor, reference = fit(tmp_path, acc_divisor=100)
    (f,) = [f for f in doctor.findings if f.code == "metric_scale_mismatch"]
    assert f.evidence["key"] == "val_acc"
    assert f.evidence["ours_key"] == "metrics/val/accuracy"
    assert f.evidence["computed"] == pytest.approx(reference, abs=1e-6)
    assert f.evidence["logged"] == pytest.approx(reference / 100, rel=1e-5)
    assert f.evidence["kind"] == "hundredth"
    assert "`val_acc`" in f.message
    assert f"{reference:.3g}" in f.message
    assert f"{reference / 100:.3g}" in f.message


def test_correct_accuracy_gets_no_scale_finding(tmp_path):
    doctor, reference = fit(tmp_path, acc_divisor=1)
    assert [f for f in doctor.findings if f.code == "metric_scale_mismatch"] == []
    assert reference > 0.8  # the model did learn, so the comparison was meaningful
    assert [f.code for f in doctor.findings if f.severity != "info"] == []


class NaNAt(L.LightningModule):
    """A user's regression module whose inputs are NaN for one training batch."""

    def __init__(self, nan_batch):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 1))
        self.nan_batch = nan_batch

    def training_step(self, batch, batch_idx):
        x, y = batch
        if self.current_epoch == 0 and batch_idx == self.nan_batch:
            x = x * float("nan")
        preds = self.net(x).squeeze(-1)
        loss = nn.functional.mse_loss(preds, y)
        return {"loss": loss, "preds": preds.detach(), "target": y}

    def validation_step(self, batch, batch_idx):
        x, y = batch
        preds = self.net(x).squeeze(-1)
        self.log("val_loss", nn.functional.mse_loss(preds, y))
        return {"preds": preds, "target": y}

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.05)


def test_default_bundle_finishes_a_nan_run_and_names_the_step(tmp_path):
    bundle = LossDiagnostics()
    nan_batch = 3
    g = torch.Generator().manual_seed(0)
    x = torch.randn(128, 4, generator=g)
    y = x.sum(1)
    trainer = Trainer(
        default_root_dir=tmp_path,
        max_epochs=2,
        limit_train_batches=8,
        limit_val_batches=2,
        log_every_n_steps=4,
        enable_progress_bar=False,
        enable_model_summary=False,
        accelerator="cpu",
        devices=1,
        logger=TensorBoardLogger(tmp_path),
        callbacks=[bundle],
    )
    trainer.fit(
        NaNAt(nan_batch),
        DataLoader(TensorDataset(x, y), batch_size=16),
        DataLoader(TensorDataset(x[:32], y[:32]), batch_size=16),
    )
    assert trainer.global_step == 16  # the default policy never stops the run
    found = {f.code: f for f in bundle.findings}
    assert found["nonfinite_loss"].step == nan_batch + 1
    assert found["nonfinite_loss"].severity == "error"
    ckpts = list((tmp_path / "lightning_logs" / "version_0" / "checkpoints").glob("*.ckpt"))
    assert len(ckpts) == 1
    state = torch.load(ckpts[0], weights_only=False)["state_dict"]
    assert all(torch.isfinite(v).all() for v in state.values())  # the default drops the NaN update: no work lost
