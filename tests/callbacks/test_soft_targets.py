"""Class probabilities as targets (label smoothing in the targets, mixup/cutmix, distillation): a multiclass task.

torch's ``cross_entropy`` takes ``(N, C)`` probabilities as targets. Handed over, such targets were read as
multilabel (one-hot rows: a sigmoid over softmax logits) or as regression (smoothed or mixed rows: R^2 of logits
against probabilities). They are now multiclass, each row labelled by its most likely class; the metrics are checked
against torchmetrics on those labels.
"""

import lightning as L
import pytest
import torch
from lightning.pytorch import Trainer
from lightning.pytorch.loggers import TensorBoardLogger
from torch import nn
from torch.utils.data import DataLoader, TensorDataset
from torchmetrics.functional.classification import multiclass_accuracy

from lightning_lossdiag import LossDiagnostics, LossMixin
from lightning_lossdiag.callbacks._task import hard_labels, infer_task_info, info_from_state, info_state

G = torch.Generator().manual_seed(0)


def _one_hot(n, c):
    return nn.functional.one_hot(torch.randint(0, c, (n,), generator=G), c).float()


@pytest.mark.parametrize(
    "make",
    [
        lambda: _one_hot(16, 10),
        lambda: _one_hot(16, 10) * 0.9 + 0.01,  # label smoothing 0.1 written into the targets
        lambda: 0.7 * _one_hot(16, 10) + 0.3 * _one_hot(16, 10),  # mixup
        lambda: torch.softmax(torch.randn(16, 10, generator=G), 1),  # a teacher's probabilities
    ],
    ids=["one_hot", "smoothed", "mixup", "teacher"],
)
def test_rows_of_class_probabilities_are_a_multiclass_task(make):
    target = make()
    info = infer_task_info(None, torch.randn(16, 10), target)
    assert (info.task, info.num_classes, info.class_dim, info.soft_target) == ("multiclass", 10, 1, True)
    assert torch.equal(hard_labels(target, info), target.argmax(1))


def test_dense_and_sequence_targets_find_the_dim_that_sums_to_one():
    seg = torch.softmax(torch.randn(2, 5, 4, 4, generator=G), 1)  # (N, C, H, W), torch's class dim 1
    info = infer_task_info(None, torch.randn(2, 5, 4, 4), seg)
    assert (info.task, info.num_classes, info.class_dim) == ("multiclass", 5, 1)
    assert hard_labels(seg, info).shape == (2, 4, 4)
    seq = torch.softmax(torch.randn(2, 7, 50, generator=G), -1)  # (B, T, V) distillation targets
    info = infer_task_info(None, torch.randn(2, 7, 50), seq)
    assert (info.task, info.num_classes, info.class_dim) == ("multiclass", 50, -1)
    assert torch.equal(hard_labels(seq, info), seq.argmax(-1))


def test_other_float_targets_keep_their_task():
    several = (torch.rand(16, 10, generator=G) < 0.3).float()  # several labels a row: multilabel
    several[0, :3] = 1.0
    assert infer_task_info(None, torch.randn(16, 10), several).task == "multilabel"
    assert infer_task_info(None, torch.randn(16, 10), torch.randn(16, 10)).task == "regression"
    assert infer_task_info(None, torch.randn(16, 10), torch.rand(16, 10) + 0.5).task == "regression"
    forced = infer_task_info(None, torch.randn(16, 10), _one_hot(16, 10), task="multilabel")  # one label a row
    assert (forced.task, forced.soft_target) == ("multilabel", False)
    hard = infer_task_info(None, torch.randn(16, 10), torch.randint(0, 10, (16,)))
    assert not hard.soft_target


def test_the_task_survives_a_checkpoint():
    info = infer_task_info(None, torch.randn(4, 3), torch.softmax(torch.randn(4, 3), 1))
    assert info_from_state(info_state(info)) == info
    assert not info_from_state({"task": "multiclass", "inputs": "logits", "num_classes": 3}).soft_target


class _Mixup(L.LightningModule):
    """Mixes pairs of rows (fixed weight 0.7) and hands over the mixed class probabilities."""

    def __init__(self, classes=10):
        super().__init__()
        self.classes = classes
        self.net = nn.Linear(16, classes)

    def _step(self, batch):
        x, y = batch
        logits = self.net(x)
        one_hot = nn.functional.one_hot(y, self.classes).float()
        target = 0.7 * one_hot + 0.3 * one_hot.roll(1, 0)
        return {"loss": nn.functional.cross_entropy(logits, target), "preds": logits.detach(), "target": target}

    def training_step(self, batch, batch_idx):
        return self._step(batch)

    def validation_step(self, batch, batch_idx):
        return self._step(batch)

    def configure_optimizers(self):
        return torch.optim.Adam(self.parameters(), lr=1e-2)


def _data(n=256):
    g = torch.Generator().manual_seed(1)
    x = torch.randn(n, 16, generator=g)
    return x, x[:, :10].argmax(1)


def _fit(model, tmp_path, loader):
    trainer = Trainer(
        max_epochs=2,
        callbacks=[LossDiagnostics()],
        logger=TensorBoardLogger(tmp_path),
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
        log_every_n_steps=4,
    )
    trainer.fit(model, loader, loader)
    return trainer.lossdiag_record


def test_a_mixup_fit_logs_the_accuracy_of_the_most_likely_class(tmp_path):
    x, y = _data()
    model = _Mixup()
    record = _fit(model, tmp_path, DataLoader(TensorDataset(x, y), batch_size=32))
    assert record.notes["task"] == "multiclass"
    assert "metrics/val/r2" not in record.scalars  # read as regression before
    with torch.no_grad():
        logits = model.net(x)
    # 0.7 of a row's own class and 0.3 of its neighbour's: the own class is the most likely one
    expected = multiclass_accuracy(logits, y, num_classes=10, average="micro").item()
    assert record.last("metrics/val/accuracy") == pytest.approx(expected, abs=1e-6)
    assert sum(record.notes["data/class_counts"]["counts"]) == 256


class _Smoothed(LossMixin, L.LightningModule):
    """LossMixin's cross-entropy with smoothed one-hot targets written by the step."""

    def __init__(self):
        super().__init__(loss="cross_entropy")
        self.net = nn.Linear(16, 10)

    def _step(self, batch, stage):
        x, y = batch
        return self.compute_loss(self.net(x), nn.functional.one_hot(y, 10).float() * 0.9 + 0.01, stage)

    def training_step(self, batch, batch_idx):
        return self._step(batch, "train")

    def validation_step(self, batch, batch_idx):
        return self._step(batch, "val")

    def configure_optimizers(self):
        return torch.optim.Adam(self.parameters(), lr=1e-2)


def test_loss_mixin_with_smoothed_targets_is_multiclass(tmp_path):
    x, y = _data()
    model = _Smoothed()
    record = _fit(model, tmp_path, DataLoader(TensorDataset(x, y), batch_size=32))
    assert record.notes["task"] == "multiclass"
    with torch.no_grad():
        expected = multiclass_accuracy(model.net(x), y, num_classes=10, average="micro").item()
    assert record.last("metrics/val/accuracy") == pytest.approx(expected, abs=1e-6)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("classes", [10, 1000])
def test_half_precision_probabilities_are_read_as_probabilities(dtype, classes):
    # bfloat16 rounds each probability by up to 0.4%: their rows sum to 1 within ~2e-3 only (1e-3 read them as logits,
    # and the engine then took a softmax of probabilities)
    probs = torch.softmax(3 * torch.randn(64, classes, generator=G), 1)
    labels = torch.randint(0, classes, (64,), generator=G)
    assert infer_task_info(None, probs.to(dtype), labels).inputs == "probabilities"
    assert infer_task_info(None, probs.log().to(dtype), labels).inputs == "log_probabilities"
    assert infer_task_info(None, torch.randn(64, classes, generator=G).to(dtype), labels).inputs == "logits"
    soft = infer_task_info(None, torch.randn(64, classes), probs.to(dtype))  # bf16 teacher probabilities as targets
    assert (soft.task, soft.soft_target) == ("multiclass", True)
