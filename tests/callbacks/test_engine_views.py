"""A slot that only MetricCurves reads is counted without the error views' statistics, and gives the same metrics.

The train stage is watched by ``MetricCurves`` and, by default, not by ``ErrorDistributionMonitor``: its engine
skipped nothing before, so every training step paid for confused pairs, worst rows and a probability histogram that
no one wrote.
"""

import pytest
import torch
from lightning.pytorch import LightningModule, Trainer, seed_everything
from torch import nn
from torch.profiler import profile
from torch.utils.data import DataLoader, TensorDataset

from lightning_lossdiag import LossDiagnostics
from lightning_lossdiag.callbacks._class_engine import EngineConfig, engine_for
from lightning_lossdiag.callbacks._task import TaskInfo
from lightning_lossdiag.stats.class_metrics import class_metrics
from lightning_lossdiag.stats.classification import ClassCounts

_CASES = {
    "multiclass": (lambda g: torch.randn(96, 50, generator=g), lambda g: torch.randint(0, 50, (96,), generator=g), 50),
    "binary": (lambda g: torch.randn(96, generator=g), lambda g: (torch.rand(96, generator=g) < 0.3).float(), 2),
    "multilabel": (
        lambda g: torch.randn(96, 40, generator=g),
        lambda g: (torch.rand(96, 40, generator=g) < 0.1).float(),
        40,
    ),
}


@pytest.mark.parametrize("task", list(_CASES))
def test_counts_without_the_views_give_the_same_metrics(task):
    make_x, make_y, classes = _CASES[task]
    g = torch.Generator().manual_seed(4)
    batches = [(make_x(g), make_y(g)) for _ in range(3)]
    full = ClassCounts(task, "logits", classes, thresholds=21, budget=1000, max_confusion=8)
    lean = ClassCounts(task, "logits", classes, thresholds=21, budget=1000, max_confusion=8, views=False)
    for preds, target in batches:
        full.update(preds, target)
        lean.update(preds, target)
    for name in ("per_class", "label_rows", "rows", "ranking", "calibration", "calibration_fine", "classwise"):
        assert torch.equal(getattr(full, name), getattr(lean, name)), name
    assert torch.equal(full.curves, lean.curves)
    assert torch.equal(full.brier, lean.brier)
    a, b = class_metrics(full), class_metrics(lean)
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)
    # what the views would have read was never counted
    assert lean.pairs is None
    assert lean.confusion.numel() == 0
    assert int(lean.worst.seen) == 0
    assert lean.prob_hist.sum().item() == 0
    assert full.prob_hist.sum().item() > 0


def _ops(counts: ClassCounts, preds: torch.Tensor, target: torch.Tensor) -> int:
    counts.update(preds, target)
    with profile() as prof:
        counts.update(preds, target)
    return sum(1 for e in prof.events() if e.name.startswith("aten::"))


def test_counts_without_the_views_dispatch_far_fewer_ops():
    preds, target = torch.randn(256, 1000), torch.randint(0, 1000, (256,))
    full = _ops(ClassCounts("multiclass", "logits", 1000), preds, target)
    lean = _ops(ClassCounts("multiclass", "logits", 1000, views=False), preds, target)
    assert lean < 0.75 * full, (lean, full)  # the pair sketch, the worst rows and the histogram: a third of the ops


class _Trainer:
    global_rank, world_size = 0, 1


def test_the_error_views_join_a_slot_that_has_not_counted_yet():
    trainer, info = _Trainer(), TaskInfo("multiclass", "logits", 40)
    metrics = engine_for(trainer, "val", info, EngineConfig(thresholds=11), torch.device("cpu"), 50, 1 << 20)
    assert not metrics.counts.views
    metrics.add(torch.randn(8, 40), torch.randint(0, 40, (8,)))  # held, not counted yet
    views = EngineConfig(thresholds=11, bins=64, worst_k=20, views=True)
    errors = engine_for(trainer, "val", info, views, torch.device("cpu"), 50, 1 << 20)
    assert errors is metrics  # one engine, now with the views
    assert errors.counts.views
    errors.drain()
    errors.counts.settle()  # held updates are added before a read
    assert errors.counts.rows[0].item() == 8  # the held step, counted once, with the views
    assert int(errors.counts.worst.seen) > 0


def test_the_error_views_count_apart_once_a_slot_has_counted():
    trainer, info = _Trainer(), TaskInfo("multiclass", "logits", 40)
    metrics = engine_for(trainer, "train", info, EngineConfig(thresholds=11), torch.device("cpu"), 1, 1 << 20)
    metrics.add(torch.randn(8, 40), torch.randint(0, 40, (8,)))  # buffer of 1 step: counted at once
    views = EngineConfig(thresholds=11, bins=64, worst_k=20, views=True)
    errors = engine_for(trainer, "train", info, views, torch.device("cpu"), 1, 1 << 20)
    assert errors is not metrics  # the metrics' counts are never rebuilt once they hold a step
    metrics.counts.settle()  # held updates are added before a read
    assert metrics.counts.rows[0].item() == 8
    assert errors.counts.views


class _Classifier(LightningModule):
    def __init__(self) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.x, self.y = torch.randn(320, 8, generator=g), torch.randint(0, 40, (320,), generator=g)
        self.net = nn.Linear(8, 40)

    def _step(self, batch):
        x, y = batch
        logits = self.net(x)
        return {"loss": nn.functional.cross_entropy(logits, y), "preds": logits.detach(), "target": y}

    def training_step(self, batch, batch_idx):
        return self._step(batch)

    def validation_step(self, batch, batch_idx):
        return self._step(batch)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)

    def train_dataloader(self):
        return DataLoader(TensorDataset(self.x[64:], self.y[64:]), batch_size=32)

    def val_dataloader(self):
        return DataLoader(TensorDataset(self.x[:64], self.y[:64]), batch_size=32)


@pytest.mark.slow
@pytest.mark.parametrize(("errors", "train_views"), [(True, False), ({"stages": ["train", "val"]}, True)])
def test_in_a_fit_only_the_stages_the_error_views_watch_count_them(tmp_path, errors, train_views):
    seed_everything(0, verbose=False)
    trainer = Trainer(
        default_root_dir=tmp_path,
        max_epochs=1,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
        num_sanity_val_steps=0,
        callbacks=[LossDiagnostics(errors=errors, doctor=False)],
    )
    trainer.fit(_Classifier())
    engines = trainer.__dict__["lossdiag_class_engines"]
    assert [e.counts.views for e in engines["train"]] == [train_views]  # one engine a slot, shared
    assert [e.counts.views for e in engines["val"]] == [True]
    assert "metrics/train/accuracy" in trainer.callback_metrics
    assert "metrics/val/accuracy" in trainer.callback_metrics
