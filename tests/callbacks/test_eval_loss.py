"""``val/loss`` and ``test/loss`` from the losses evaluation steps hand over, when the run logs none itself.

A ``validation_step`` that returns ``{"loss", "preds", "target"}`` logs nothing in Lightning; before, such runs had
no validation loss and the diagnosis could not judge overfitting. The expected values are computed here from the
final model, and read back from the TensorBoard event files with TensorBoard's own reader.
"""

import lightning as L
import pytest
import torch
from lightning.pytorch import Trainer
from lightning.pytorch.loggers import TensorBoardLogger
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_lossdiag import LossDiagnostics, LossMixin
from lightning_lossdiag.callbacks._eval_loss import EvalLosses, logs_own_loss


class _HandOver(L.LightningModule):
    def __init__(self, log_own=False):
        super().__init__()
        self.log_own = log_own
        self.net = nn.Linear(8, 4)

    def _step(self, batch, stage):
        x, y = batch
        logits = self.net(x)
        loss = nn.functional.cross_entropy(logits, y)
        if self.log_own and stage != "train":
            self.log(f"{stage}_loss", loss)
        return {"loss": loss, "preds": logits.detach(), "target": y}

    def training_step(self, batch, batch_idx):
        return self._step(batch, "train")

    def validation_step(self, batch, batch_idx):
        return self._step(batch, "val")

    def test_step(self, batch, batch_idx):
        return self._step(batch, "test")

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def _data(n=100):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n, 8, generator=g)
    return x, x[:, :4].argmax(1)


def _trainer(tmp_path, **kwargs):
    opts = dict(
        max_epochs=2,
        callbacks=[LossDiagnostics()],
        logger=TensorBoardLogger(tmp_path),
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
        log_every_n_steps=2,
    )
    opts.update(kwargs)
    return Trainer(**opts)


def test_the_handed_over_validation_loss_is_logged_as_its_batch_weighted_mean(tmp_path):
    x, y = _data()
    loader = DataLoader(TensorDataset(x, y), batch_size=32)  # 32, 32, 32, 4: the last batch weighs 4
    model = _HandOver()
    trainer = _trainer(tmp_path)
    trainer.fit(model, loader, loader)
    with torch.no_grad():
        expected = nn.functional.cross_entropy(model.net(x), y).item()  # the mean over rows
    record = trainer.lossdiag_record
    points = record.series("val/loss")
    assert [s for s, _ in points] == [4, 8]  # one per validation, at its global step; none for the sanity check
    assert points[-1][1] == pytest.approx(expected, rel=1e-5)
    acc = EventAccumulator(str(trainer.log_dir), size_guidance={"scalars": 0})
    acc.Reload()
    assert [round(e.value, 5) for e in acc.Scalars("val/loss")] == [round(v, 5) for _, v in points]
    trainer.test(model, loader)
    assert record.series("test/loss")[-1][1] == pytest.approx(expected, rel=1e-5)


@pytest.mark.parametrize("own", ["self_log", "loss_mixin"])
def test_a_run_that_logs_its_own_loss_gets_no_second_one(tmp_path, own):
    x, y = _data()
    loader = DataLoader(TensorDataset(x, y), batch_size=32)
    model = _HandOver(log_own=True) if own == "self_log" else _Mixin()
    trainer = _trainer(tmp_path)
    trainer.fit(model, loader, loader)
    record = trainer.lossdiag_record
    if own == "self_log":
        assert "val/loss" not in record.scalars
        assert len(record.series("val_loss")) == 2
    else:
        assert [s for s, _ in record.series("val/loss")] == [4, 8]  # LossMixin's own, once per validation


class _Mixin(LossMixin, L.LightningModule):
    def __init__(self):
        super().__init__(loss="cross_entropy")
        self.net = nn.Linear(8, 4)

    def training_step(self, batch, batch_idx):
        return self.compute_loss(self.net(batch[0]), batch[1])

    def validation_step(self, batch, batch_idx):
        return self.compute_loss(self.net(batch[0]), batch[1], stage="val")

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def test_held_losses_stay_bounded_and_exact():
    losses = EvalLosses()
    values = torch.rand(1300, generator=torch.Generator().manual_seed(1))
    sizes = [1 + i % 7 for i in range(1300)]
    for value, size in zip(values, sizes, strict=True):
        losses.add("val", value, size)
    assert len(losses._losses["val"]) < 520  # summed on the device past 512
    expected = (values.double() * torch.tensor(sizes, dtype=torch.float64)).sum() / sum(sizes)
    assert losses.mean("val").item() == pytest.approx(expected.item(), rel=1e-5)
    losses.reset("val")
    assert losses.mean("val") is None


def test_own_loss_names_include_dataloader_suffixes():
    assert logs_own_loss({"val_loss/dataloader_idx_1": 0.2}, "val")
    assert logs_own_loss({"test/loss": 0.2}, "test")
    assert not logs_own_loss({"val/accuracy": 0.9, "train_loss": 0.1}, "val")
