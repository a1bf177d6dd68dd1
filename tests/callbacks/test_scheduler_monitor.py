import copy
import math

import pytest
import torch
from lightning.pytorch import LightningModule, Trainer
from lightning.pytorch.loggers import TensorBoardLogger
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from torch import nn
from torch.optim.lr_scheduler import ReduceLROnPlateau
from torch.utils.data import DataLoader, TensorDataset

from lightning_lossdiag.callbacks.scheduler_monitor import SchedulerMonitor, steps_to_reduction
from lightning_lossdiag.diagnosis.direction import metric_direction
from lightning_lossdiag.diagnosis.record import record_for

VAL = [1.0, 0.9, 0.95, 0.93, 0.92, 0.8, 0.85, 0.86, 0.87, 0.88]
PLATEAU = {"mode": "min", "patience": 1, "factor": 0.5, "cooldown": 1}


class ScriptedVal(LightningModule):
    """Logs `metric` = script[current_epoch] at each validation; trains a tiny linear model."""

    def __init__(self, script=VAL, metric="val/loss", monitor="val/loss", plateau=PLATEAU, strict=True, named=False):
        super().__init__()
        self.layer = nn.Linear(2, 1)
        self.script, self.metric, self.monitor = script, metric, monitor
        self.plateau, self.strict, self.named = plateau, strict, named

    def training_step(self, batch, batch_idx):
        return self.layer(batch[0]).pow(2).mean()

    def validation_step(self, batch, batch_idx):
        self.log(self.metric, self.script[self.current_epoch])

    def configure_optimizers(self):
        params = [{"params": self.layer.parameters(), "name": "linear layer"}] if self.named else self.parameters()
        opt = torch.optim.SGD(params, lr=0.1, momentum=0.9)
        sched = ReduceLROnPlateau(opt, **self.plateau)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "monitor": self.monitor, "strict": self.strict}}

    def train_dataloader(self):
        return DataLoader(TensorDataset(torch.randn(16, 2)), batch_size=8)

    def val_dataloader(self):
        return DataLoader(TensorDataset(torch.randn(8, 2)), batch_size=8)


def fit(tmp_path, model, epochs=10, monitor=None):
    monitor = monitor or SchedulerMonitor(every_n_steps=2)
    trainer = Trainer(
        max_epochs=epochs,
        limit_train_batches=2,
        limit_val_batches=1,
        num_sanity_val_steps=0,
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
        logger=TensorBoardLogger(tmp_path, name="", version=""),
        accelerator="cpu",
        devices=1,
        callbacks=[monitor],
    )
    trainer.fit(model)
    return trainer, monitor


def reference(script, **plateau):
    """PyTorch's own scheduler stepped on the same values: its attributes after each step."""
    opt = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=0.1)
    sched = ReduceLROnPlateau(opt, **plateau)
    rows = []
    for value in script:
        before = opt.param_groups[0]["lr"]
        sched.step(value)
        after = opt.param_groups[0]["lr"]
        # epochs to reduction, counted by stepping a copy with values that never improve
        probe = copy.deepcopy(sched)
        probe_opt = probe.optimizer
        n = 0
        while probe_opt.param_groups[0]["lr"] == after and n < 100:
            probe.step(math.inf)
            n += 1
        rows.append((sched.best, sched.num_bad_epochs, sched.cooldown_counter, before, after, n))
    return rows


def test_plateau_state_follows_pytorch_epoch_by_epoch(tmp_path):
    trainer, monitor = fit(tmp_path, ScriptedVal())
    rec = record_for(trainer)
    ref = reference(VAL, **PLATEAU)
    assert rec.values("plateau/best") == pytest.approx([r[0] for r in ref])
    assert rec.values("plateau/num_bad_epochs") == [r[1] for r in ref]
    assert rec.values("plateau/cooldown") == [r[2] for r in ref]
    assert rec.values("plateau/epochs_to_reduction") == [r[5] for r in ref]
    cuts = [i for i, r in enumerate(ref) if r[4] < r[3]]
    assert len(cuts) >= 2
    assert rec.values("plateau/reductions")[-1] == len(cuts)
    assert rec.values("plateau/reductions") == [sum(1 for c in cuts if c <= e) for e in range(len(VAL))]  # per epoch
    assert [p for p, _ in rec.series("plateau/best")] == [2 * (e + 1) for e in range(len(VAL))]
    reductions = rec.notes["scheduler/reductions"]
    assert [r["epoch"] for r in reductions] == cuts
    assert [r["metric"] for r in reductions] == pytest.approx([VAL[e] for e in cuts])
    assert [r["from_lr"] for r in reductions] == pytest.approx([ref[e][3] for e in cuts])
    assert [r["to_lr"] for r in reductions] == pytest.approx([ref[e][4] for e in cuts])
    assert rec.notes["scheduler/plateau"][0]["monitor"] == "val/loss"
    assert rec.findings == []  # lr cut while above min_lr: no scheduler_at_min_lr (nor any other finding)

    acc = EventAccumulator(str(tmp_path))
    acc.Reload()
    texts = acc.Tensors("plateau/reduction/text_summary")
    assert [e.step for e in texts] == [2 * (e + 1) for e in cuts]
    first = texts[0].tensor_proto.string_val[0].decode()
    assert f"epoch {cuts[0]}" in first
    assert "0.1 -> 0.05" in first
    assert monitor.state_dict()["reduction_counts"] == [len(cuts)]


def test_learning_rates_and_momentum_at_flush(tmp_path):
    trainer, _ = fit(tmp_path, ScriptedVal(named=True), epochs=2)
    rec = record_for(trainer)
    assert [s for s, _ in rec.series("lr/sgd/linear_layer")] == [2, 4]
    assert rec.values("lr/sgd/linear_layer") == pytest.approx([0.1, 0.1])
    assert rec.values("momentum/sgd/linear_layer") == pytest.approx([0.9, 0.9])


def test_mode_mismatch_finding(tmp_path):
    model = ScriptedVal(metric="val/acc", monitor="val/acc")
    trainer, _ = fit(tmp_path, model, epochs=2)
    codes = [f.code for f in record_for(trainer).findings]
    assert codes == ["scheduler_mode_mismatch"]
    assert "mode='max'" in record_for(trainer).findings[0].message


def test_missing_monitor_lists_logged_metrics(tmp_path):
    model = ScriptedVal(monitor="val/nope", strict=False)
    with pytest.warns(RuntimeWarning, match="not available"):
        trainer, _ = fit(tmp_path, model, epochs=2)
    findings = record_for(trainer).findings
    assert [f.code for f in findings] == ["scheduler_monitor_missing"]
    assert findings[0].evidence["available"] == ["val/loss"]


def test_missing_monitor_recorded_when_lightning_raises(tmp_path):
    from lightning.fabric.utilities.exceptions import MisconfigurationException

    monitor = SchedulerMonitor()
    model = ScriptedVal(monitor="val/nope", strict=True)
    trainer = Trainer(
        max_epochs=2,
        limit_train_batches=2,
        limit_val_batches=1,
        num_sanity_val_steps=0,
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
        logger=False,
        callbacks=[monitor],
    )
    with pytest.raises(MisconfigurationException, match="val/nope"):
        trainer.fit(model)
    assert [f.code for f in record_for(trainer).findings] == ["scheduler_monitor_missing"]


def test_min_lr_finding(tmp_path):
    plateau = dict(PLATEAU, min_lr=0.1)
    trainer, _ = fit(tmp_path, ScriptedVal(plateau=plateau), epochs=5)
    rec = record_for(trainer)
    assert [f.code for f in rec.findings] == ["scheduler_at_min_lr"]
    assert rec.values("plateau/reductions")[-1] == 0


def test_steps_to_reduction_matches_simulation():
    for patience in range(4):
        for cooldown in range(3):
            kw = {"mode": "min", "patience": patience, "cooldown": cooldown, "factor": 0.5}
            ref = reference([1.0] + [2.0] * 7, **kw)
            opt = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=0.1)
            sched = ReduceLROnPlateau(opt, **kw)
            for value, row in zip([1.0] + [2.0] * 7, ref, strict=False):
                sched.step(value)
                assert steps_to_reduction(sched.num_bad_epochs, patience, sched.cooldown_counter) == row[5]


def test_state_round_trip(tmp_path):
    _, monitor = fit(tmp_path, ScriptedVal())
    state = monitor.state_dict()
    other = SchedulerMonitor(every_n_steps=2)
    other.load_state_dict(state)
    assert other.state_dict() == state


@pytest.mark.parametrize(
    ("name", "direction"),
    [
        ("val/loss", "min"),
        ("val_loss", "min"),
        ("train/mse", "min"),
        ("val/rmse", "min"),
        ("valError", "min"),
        ("val/dice_loss", "min"),
        ("val/acc", "max"),
        ("val_accuracy", "max"),
        ("val/f1", "max"),
        ("val/auroc", "max"),
        ("val/r2", "max"),
        ("val/mAP", "max"),
        ("val/iou", "max"),
        ("val/dice", "max"),
        ("val/precision", "max"),
        ("val/recall", "max"),
        ("acc1", "max"),
        ("lr", None),
        ("epoch", None),
    ],
)
def test_metric_direction(name, direction):
    assert metric_direction(name) == direction


def test_bad_arguments():
    with pytest.raises(ValueError, match="log_momentum"):
        SchedulerMonitor(log_momentum="yes")
