"""Fit findings that EarlyStopping already handled are info, not warnings; the Doctor notes who stopped the run."""

import lightning as L
import torch
from lightning.pytorch import Trainer
from lightning.pytorch.callbacks import EarlyStopping
from torch.utils.data import DataLoader, TensorDataset

from lightning_lossdiag.callbacks.doctor import Doctor
from lightning_lossdiag.diagnosis.config import DoctorConfig
from lightning_lossdiag.diagnosis.record import RunRecord, record_for
from lightning_lossdiag.diagnosis.rules.fit import overfitting, plateau

TRAIN = [1.0, 0.7, 0.5, 0.4, 0.3, 0.2, 0.15]
VAL = [1.0, 0.8, 0.7, 0.75, 0.8, 0.9, 0.95]


def _overfit_record():
    record = RunRecord()
    for epoch, (t, v) in enumerate(zip(TRAIN, VAL, strict=True)):
        record.add_scalars(10 * (epoch + 1), {"train/loss_epoch": t, "val/loss": v})
    return record


def test_overfitting_is_a_warning_without_early_stopping():
    (found,) = overfitting(_overfit_record(), DoctorConfig())
    assert found.severity == "warning"


def test_overfitting_on_the_early_stopped_metric_is_info_and_says_so():
    record = _overfit_record()
    record.notes["callbacks/early_stopped"] = [{"monitor": "val/loss", "stopped_epoch": 6}]
    (found,) = overfitting(record, DoctorConfig())
    assert found.severity == "info"
    assert "EarlyStopping on val/loss already ended the run at epoch 6" in found.message
    assert found.evidence["early_stopped_epoch"] == 6


def test_early_stopping_on_another_metric_keeps_the_warning():
    record = _overfit_record()
    record.notes["callbacks/early_stopped"] = [{"monitor": "val_acc", "stopped_epoch": 6}]
    (found,) = overfitting(record, DoctorConfig())
    assert found.severity == "warning"


def test_plateau_on_the_early_stopped_metric_is_info():
    record = RunRecord()
    for epoch, v in enumerate([1.0, 0.6, 0.5, 0.5, 0.5, 0.5, 0.5, 0.5]):
        record.add_scalars(epoch, {"val/loss": v})
    assert plateau(record, DoctorConfig())[0].severity == "warning"
    record.notes["callbacks/early_stopped"] = [{"monitor": "val/loss", "stopped_epoch": 7}]
    assert plateau(record, DoctorConfig())[0].severity == "info"


class ScriptedVal(L.LightningModule):
    """Trains a tiny layer; logs a scripted val/loss per epoch that improves, then rises."""

    def __init__(self, val_losses):
        super().__init__()
        self.layer = torch.nn.Linear(2, 1)
        self.val_losses = val_losses

    def training_step(self, batch, batch_idx):
        x, y = batch
        return torch.nn.functional.mse_loss(self.layer(x).squeeze(-1), y)

    def validation_step(self, batch, batch_idx):
        self.log("val/loss", torch.tensor(self.val_losses[self.current_epoch]))

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.01)


def test_doctor_notes_the_early_stopping_that_ended_a_real_run(tmp_path):
    data = TensorDataset(torch.randn(32, 2), torch.randn(32))
    loader = DataLoader(data, batch_size=8)
    stopper = EarlyStopping(monitor="val/loss", mode="min", patience=2)
    trainer = Trainer(
        default_root_dir=tmp_path,
        max_epochs=10,
        callbacks=[Doctor(print_report=False), stopper],
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
    )
    trainer.fit(ScriptedVal([1.0, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0, 1.1, 1.2, 1.3]), loader, loader)
    assert stopper.stopped_epoch > 0
    notes = record_for(trainer).notes["callbacks/early_stopped"]
    assert notes == [{"monitor": "val/loss", "stopped_epoch": stopper.stopped_epoch}]


def test_class_imbalance_is_judged_per_head_of_a_multitask_model():
    from lightning_lossdiag.diagnosis.rules.data import class_imbalance

    record = RunRecord()
    record.notes["data/class_counts"] = {
        "stage": "train",
        "counts": [500, 500],
        "heads": {"ctr": [500, 500], "cvr": [970, 30]},
    }
    record.add_scalars(100, {"metrics/val/cvr/recall": 0.0, "metrics/val/ctr/recall": 0.8})
    (found,) = class_imbalance(record, DoctorConfig())
    assert found.severity == "warning"
    assert found.evidence["term"] == "cvr"
    assert "head `cvr`" in found.message
    assert "`metrics/val/cvr/recall`" in found.message
    record.add_scalars(200, {"metrics/val/cvr/recall": 0.6})
    (found,) = class_imbalance(record, DoctorConfig())
    assert found.severity == "info"
