"""LossDiagnostics in the Trainer modes users reach for: validate/test/predict alone, fast_dev_run, gradient
accumulation, no validation, manual optimization. Each run must finish and leave a diagnosis."""

import lightning as L
import pytest
import torch
from lightning.pytorch import Trainer
from lightning.pytorch.demos.boring_classes import BoringModel
from lightning.pytorch.loggers import TensorBoardLogger

from lightning_lossdiag import LossDiagnostics


def _trainer(tmp_path, **kwargs):
    opts = dict(
        default_root_dir=tmp_path,
        max_epochs=1,
        limit_train_batches=6,
        limit_val_batches=2,
        limit_test_batches=2,
        limit_predict_batches=2,
        log_every_n_steps=2,
        enable_progress_bar=False,
        enable_model_summary=False,
        logger=TensorBoardLogger(tmp_path),
    )
    opts.update(kwargs)
    diag = LossDiagnostics()
    return Trainer(callbacks=[diag], **opts), diag


@pytest.mark.parametrize("mode", ["validate", "test", "predict"])
def test_evaluation_alone(tmp_path, mode):
    trainer, diag = _trainer(tmp_path)
    getattr(trainer, mode)(BoringModel())
    assert isinstance(diag.findings, list)
    if mode != "predict":
        assert (tmp_path / "lightning_logs" / "version_0" / "lossdiag_report.json").is_file()


def test_fast_dev_run_still_diagnoses(tmp_path):
    trainer, diag = _trainer(tmp_path, fast_dev_run=True, logger=None)  # Lightning swaps in a DummyLogger
    trainer.fit(BoringModel())
    assert trainer.global_step == 1
    assert isinstance(diag.findings, list)
    assert "train/loss" in trainer.lossdiag_record.scalars


def test_gradient_accumulation_and_no_validation(tmp_path):
    trainer, diag = _trainer(tmp_path, accumulate_grad_batches=3, limit_val_batches=0)
    trainer.fit(BoringModel())
    assert trainer.global_step == 2
    record = trainer.lossdiag_record
    assert [s for s, _ in record.series("grad/norm_total")] == [2]  # one flush at optimizer step 2


class ManualModel(BoringModel):
    def __init__(self):
        super().__init__()
        self.automatic_optimization = False

    def training_step(self, batch, batch_idx):
        opt = self.optimizers()
        loss = self.step(batch)
        opt.zero_grad()
        self.manual_backward(loss)
        opt.step()
        return {"loss": loss.detach()}


def test_manual_optimization(tmp_path):
    trainer, diag = _trainer(tmp_path)
    trainer.fit(ManualModel())
    assert trainer.global_step == 6
    assert len(trainer.lossdiag_record.values("train/loss")) == 3


class Seq(L.LightningModule):
    """A module that logs nothing itself and returns only the loss tensor."""

    def __init__(self):
        super().__init__()
        self.layer = torch.nn.Linear(32, 1)

    def training_step(self, batch, batch_idx):
        return self.layer(batch).pow(2).mean()

    def train_dataloader(self):
        return torch.utils.data.DataLoader(torch.randn(64, 32), batch_size=8)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.01)


def test_plain_loss_tensor_steps(tmp_path):
    trainer, diag = _trainer(tmp_path, limit_val_batches=0)
    trainer.fit(Seq())
    assert trainer.lossdiag_record.values("train/loss")
    assert all(f.severity == "info" for f in diag.findings)
