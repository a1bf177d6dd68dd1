"""A real fit whose validation probabilities grow over-confident while its accuracy holds: the diagnosis names it
``overconfident`` (with the ECE against its noise floor), not ``overfitting``.

The classifier learns normally; its validation logits are multiplied by a temperature that grows every epoch, so
the predicted classes (and the accuracy) never change while the probabilities are pushed towards 0 and 1 and the
validation loss rises. This is the case issue 21 saw diagnosed as memorisation.
"""

import pytest
import torch
from lightning.pytorch import LightningModule, Trainer, seed_everything
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_lossdiag import LossDiagnostics, LossMixin
from lightning_lossdiag.diagnosis.record import record_for

EPOCHS = 8


class SharpeningClassifier(LossMixin, LightningModule):
    def __init__(self, sharpen: bool) -> None:
        super().__init__(loss="cross_entropy")
        self.net = nn.Linear(8, 3)
        self.sharpen = sharpen

    def training_step(self, batch, batch_idx):
        x, y = batch
        return self.compute_loss(self.net(x), y, stage="train")

    def validation_step(self, batch, batch_idx):
        x, y = batch
        temperature = 1.0 + 2.0 * self.current_epoch if self.sharpen else 1.0  # argmax unchanged
        return self.compute_loss(self.net(x) * temperature, y, stage="val")

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=1.0)


def _loader(seed: int, n: int, shuffle: bool) -> DataLoader:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 8, generator=g)
    scores = x[:, :3] * 1.5 + 0.8 * torch.randn(n, 3, generator=g)  # overlapping classes: accuracy ~0.8
    return DataLoader(TensorDataset(x, scores.argmax(1)), batch_size=256, shuffle=shuffle, generator=g)


def _fit(tmp_path, sharpen: bool):
    seed_everything(0, verbose=False)
    diag = LossDiagnostics(activations=False, doctor={"print_report": False})
    trainer = Trainer(
        default_root_dir=tmp_path,
        max_epochs=EPOCHS,
        log_every_n_steps=4,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        accelerator="cpu",
        devices=1,
        callbacks=[diag],
    )
    trainer.fit(SharpeningClassifier(sharpen), _loader(0, 2048, True), _loader(1, 4096, False))
    return trainer, {f.code: f for f in diag.findings}


@pytest.mark.slow
@pytest.mark.filterwarnings("ignore:LossDiagnostics. the Trainer has no logger")
def test_growing_overconfidence_is_named_as_such_not_as_overfitting(tmp_path):
    trainer, found = _fit(tmp_path, sharpen=True)
    record = record_for(trainer)
    val_loss = record.values("val/loss")
    accuracy = record.values("metrics/val/accuracy")
    assert val_loss[-1] > 1.5 * min(val_loss)  # the validation loss really rose ...
    assert max(accuracy) - min(accuracy[1:]) < 0.02  # ... while the accuracy held
    assert "overconfident" in found, sorted(found)
    ev = found["overconfident"].evidence
    assert ev["confidence"] > ev["accuracy"] + 0.1
    assert ev["ece"] > 3 * ev["noise_floor"]
    assert "overfitting" not in found, found["overfitting"].message


@pytest.mark.slow
@pytest.mark.filterwarnings("ignore:LossDiagnostics. the Trainer has no logger")
def test_the_same_fit_without_sharpening_has_no_calibration_or_trend_warning(tmp_path):
    _, found = _fit(tmp_path, sharpen=False)
    assert not {"overconfident", "underconfident", "overfitting"} & set(found), sorted(found)
