"""MetricCurves on real small Trainers: values equal torchmetrics' functional values on the full data."""

import math
import warnings

import numpy as np
import pytest
import torch
import torchmetrics.functional as tmf
from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.callbacks import ModelCheckpoint
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_lossdiag.callbacks.metric_curves import MetricCurves
from lightning_lossdiag.diagnosis.record import record_for
from lightning_lossdiag.testing import HostReadCounter

N_VAL = 200


class _Module(LightningModule):
    """Tiny module returning {"loss", "preds", "target"} from its steps."""

    def __init__(self, x, y, out, loss_fn, seq=False):
        super().__init__()
        torch.manual_seed(0)
        self.net = nn.Sequential(nn.Linear(x.shape[-1], 16), nn.Tanh(), nn.Linear(16, out))
        self.x, self.y, self.loss_fn, self.seq = x, y, loss_fn, seq

    def forward(self, x):
        out = self.net(x)
        return out.squeeze(-1) if out.shape[-1] == 1 and not self.seq else out

    def _step(self, batch):
        x, y = batch
        preds = self(x)
        return {"loss": self.loss_fn(preds, y), "preds": preds, "target": y}

    def training_step(self, batch, batch_idx):
        return self._step(batch)

    def validation_step(self, batch, batch_idx):
        return self._step(batch)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.05)

    def train_dataloader(self):
        return DataLoader(TensorDataset(self.x[N_VAL:], self.y[N_VAL:]), batch_size=32, shuffle=True)

    def val_dataloader(self):
        return DataLoader(TensorDataset(self.x[:N_VAL], self.y[:N_VAL]), batch_size=N_VAL // 2)


def _trainer(tmp_path, callbacks, epochs=2, logger=False, checkpoint=False):
    return Trainer(
        default_root_dir=tmp_path,
        max_epochs=epochs,
        limit_train_batches=4,
        limit_val_batches=2,
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=checkpoint,
        logger=logger,
        accelerator="cpu",
        devices=1,
        callbacks=callbacks,
    )


def _regression_data(seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(400, 3, generator=g)
    y = x @ torch.tensor([1.0, -2.0, 0.5]) + 0.3 * torch.randn(400, generator=g)
    return x, y


def _val_outputs(model):
    model.eval()
    with torch.no_grad():
        return model(model.x[:N_VAL]), model.y[:N_VAL]


def test_regression_values_equal_torchmetrics_and_feed_checkpoint(tmp_path):
    x, y = _regression_data()
    model = _Module(x, y, 1, nn.functional.mse_loss)
    curves = MetricCurves(stages=("train", "val"))
    ckpt = ModelCheckpoint(dirpath=tmp_path / "ckpt", monitor="metrics/val/mae", mode="min", save_top_k=1)
    trainer = _trainer(tmp_path, [curves, ckpt], checkpoint=True)
    trainer.fit(model)

    preds, target = _val_outputs(model)
    expected = {
        "mae": tmf.mean_absolute_error(preds, target),
        "mse": tmf.mean_squared_error(preds, target),
        "rmse": tmf.mean_squared_error(preds, target, squared=False),
        "r2": tmf.r2_score(preds, target),
        "explained_variance": tmf.explained_variance(preds, target),
    }
    for name, value in expected.items():
        logged = trainer.callback_metrics[f"metrics/val/{name}"]
        assert logged.item() == pytest.approx(value.item(), rel=1e-5, abs=1e-6), name
    assert "metrics/val/directional_accuracy" not in trainer.callback_metrics  # not a sequence task
    assert "metrics/train/mae" in trainer.callback_metrics

    record = record_for(trainer)
    maes = record.values("metrics/val/mae")
    assert len(maes) == 2  # one per epoch, sanity check not counted
    assert maes[-1] == pytest.approx(expected["mae"].item(), rel=1e-5)
    # ModelCheckpoint monitored our key: the best score is the smallest epoch value
    assert ckpt.best_model_score.item() == pytest.approx(min(maes), rel=1e-6)
    assert ckpt.best_model_path.endswith(".ckpt")


def test_multiclass_values_equal_torchmetrics(tmp_path):
    g = torch.Generator().manual_seed(1)
    x = torch.randn(400, 4, generator=g)
    y = (x[:, 0] * 2 + x[:, 1]).round().clamp(-2, 2).long() + 2
    model = _Module(x, y, 5, nn.functional.cross_entropy)
    curves = MetricCurves(stages=("val",), thresholds=101)
    trainer = _trainer(tmp_path, [curves], epochs=1)
    trainer.fit(model)

    logits, target = _val_outputs(model)
    probs = logits.softmax(-1)
    exp = {
        "accuracy": tmf.accuracy(probs, target, task="multiclass", num_classes=5, average="micro"),
        "precision": tmf.precision(probs, target, task="multiclass", num_classes=5, average="macro"),
        "f1": tmf.f1_score(probs, target, task="multiclass", num_classes=5, average="macro"),
        "auroc": tmf.auroc(probs, target, task="multiclass", num_classes=5, thresholds=101),
        "average_precision": tmf.average_precision(probs, target, task="multiclass", num_classes=5, thresholds=101),
    }
    for name, value in exp.items():
        assert trainer.callback_metrics[f"metrics/val/{name}"].item() == pytest.approx(value.item(), abs=1e-5), name
    per_class = tmf.recall(probs, target, task="multiclass", num_classes=5, average=None)
    for c in range(5):
        assert trainer.callback_metrics[f"metrics/val/recall/{c}"].item() == pytest.approx(
            per_class[c].item(), abs=1e-6
        )
    # accuracy by hand, independent of torchmetrics
    assert trainer.callback_metrics["metrics/val/accuracy"].item() == pytest.approx(
        (probs.argmax(-1) == target).float().mean().item(), abs=1e-6
    )


def test_binary_logits_balanced_accuracy_and_auroc(tmp_path):
    g = torch.Generator().manual_seed(2)
    x = torch.randn(400, 3, generator=g)
    y = (x[:, 0] + 0.5 * torch.randn(400, generator=g) > 0.8).float()  # imbalanced
    model = _Module(x, y, 1, nn.functional.binary_cross_entropy_with_logits)
    trainer = _trainer(tmp_path, [MetricCurves(stages=("val",))], epochs=1)
    trainer.fit(model)

    logits, target = _val_outputs(model)
    probs = logits.sigmoid()
    pred = (probs > 0.5).numpy()
    t = target.numpy().astype(bool)
    balanced = 0.5 * ((pred & t).sum() / t.sum() + (~pred & ~t).sum() / (~t).sum())
    cm = trainer.callback_metrics
    assert cm["metrics/val/balanced_accuracy"].item() == pytest.approx(balanced, abs=1e-6)
    assert cm["metrics/val/accuracy"].item() == pytest.approx((pred == t).mean(), abs=1e-6)
    auroc = tmf.auroc(probs, target.long(), task="binary", thresholds=101)
    ap = tmf.average_precision(probs, target.long(), task="binary", thresholds=101)
    assert cm["metrics/val/auroc"].item() == pytest.approx(auroc.item(), abs=1e-6)
    assert cm["metrics/val/average_precision"].item() == pytest.approx(ap.item(), abs=1e-6)


def test_sequence_regression_logs_directional_accuracy(tmp_path):
    g = torch.Generator().manual_seed(3)
    x = torch.randn(400, 6, generator=g)
    y = torch.cumsum(x[:, :5], dim=1)
    model = _Module(x, y, 5, nn.functional.mse_loss, seq=True)
    trainer = _trainer(tmp_path, [MetricCurves(stages=("val",), metrics=["mae", "directional_accuracy"])], epochs=1)
    trainer.fit(model)
    preds, target = _val_outputs(model)
    dp, dt = np.sign(np.diff(preds.numpy(), axis=-1)), np.sign(np.diff(target.numpy(), axis=-1))
    cm = trainer.callback_metrics
    assert cm["metrics/val/directional_accuracy"].item() == pytest.approx((dp == dt).mean(), abs=1e-6)
    assert cm["metrics/val/mae"].item() == pytest.approx(np.abs(preds.numpy() - target.numpy()).mean(), rel=1e-5)
    assert "metrics/val/r2" not in cm  # only the chosen metrics


class _ValReadProbe(Callback):
    """Counts our package's host reads per validation batch (put first in callbacks)."""

    def __init__(self, counter):
        self.reads = []
        self._open = False
        counter.listeners.append(self._on_read)

    def _on_read(self, kind, site):
        if self._open:
            self.reads[-1] += 1

    def on_validation_batch_start(self, trainer, pl_module, batch, batch_idx, dataloader_idx=0):
        if not trainer.sanity_checking:
            self.reads.append(0)
            self._open = True

    def on_validation_epoch_end(self, trainer, pl_module):
        self._open = False


# torchmetrics 1.9's multiclass/multilabel curve metrics check "are these logits?" with a host `bool` on CPU
# tensors only (a `torch.where` on accelerators), so AUROC/AP are left out of the CPU read count for multiclass.
@pytest.mark.parametrize(
    ("task", "out", "loss", "metrics"),
    [
        ("regression", 1, nn.functional.mse_loss, None),
        ("binary", 1, nn.functional.binary_cross_entropy_with_logits, None),
        ("multiclass", 5, nn.functional.cross_entropy, ["accuracy", "precision", "recall", "f1", "recall_per_class"]),
    ],
    ids=["regression", "binary", "multiclass"],
)
def test_no_host_reads_in_validation_batches_after_the_first(tmp_path, task, out, loss, metrics):
    g = torch.Generator().manual_seed(4)
    x = torch.randn(400, 4, generator=g)
    y = {
        "multiclass": torch.randint(0, 5, (400,), generator=g),
        "binary": (x.sum(1) > 0).float(),
        "regression": x.sum(1),
    }[task]
    model = _Module(x, y, out, loss)
    counter = HostReadCounter()
    probe = _ValReadProbe(counter)
    with counter:
        trainer = _trainer(tmp_path, [probe, MetricCurves(stages=("val",), task=task, metrics=metrics)], epochs=2)
        trainer.fit(model)
    assert len(probe.reads) == 4
    assert probe.reads[1:] == [0, 0, 0]
    assert probe.reads[0] <= 1  # one-time inference of the kind of predictions (forced task)


def test_layout_entries_and_bad_arguments():
    cb = MetricCurves(stages=("train", "val"), task="binary")
    entries = cb.layout_entries()
    assert entries["AUROC"] == ["metrics/train/auroc", "metrics/val/auroc"]
    assert "MAE" not in entries
    assert MetricCurves(task="regression").layout_entries()["MAE"] == [
        "metrics/train/mae",
        "metrics/val/mae",
        "metrics/test/mae",
    ]
    with pytest.raises(ValueError, match="`stages`"):
        MetricCurves(stages=("validation",))
    with pytest.raises(ValueError, match="`task` must be"):
        MetricCurves(task="ranking")
    with pytest.raises(ValueError, match="`metrics`"):
        MetricCurves(metrics=["maee"])
    with pytest.raises(ValueError, match="`thresholds`"):
        MetricCurves(thresholds=1)


def test_state_round_trip(tmp_path):
    x, y = _regression_data()
    cb = MetricCurves(stages=("val",))
    _trainer(tmp_path, [cb], epochs=1).fit(_Module(x, y, 1, nn.functional.mse_loss))
    state = cb.state_dict()
    assert state["info"]["val"]["task"] == "regression"
    fresh = MetricCurves(stages=("val",))
    fresh.load_state_dict(state)
    assert fresh.state_dict() == state
    assert not math.isnan(len(state))


# ---------------------------------------------------------------- multi-task (CompositeLoss over heads)


class _ValCapture(Callback):
    """Keeps the predictions and targets of each validation step (after the monitors, outside fit's sanity check)."""

    def __init__(self):
        self.preds, self.target = [], []

    def on_validation_epoch_start(self, trainer, pl_module):
        self.preds, self.target = [], []

    def on_validation_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0):
        x, y = batch
        with torch.no_grad():
            self.preds.append({k: v.detach().clone() for k, v in pl_module(x).items()})
        self.target.append({k: v.clone() for k, v in y.items()})

    def stacked(self):
        heads = self.preds[0].keys()
        return (
            {h: torch.cat([p[h] for p in self.preds]) for h in heads},
            {h: torch.cat([t[h] for t in self.target]) for h in heads},
        )


def test_multitask_metrics_per_term_equal_torchmetrics(tmp_path):
    from lightning.pytorch.loggers import TensorBoardLogger
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from lightning_lossdiag.examples import MultiTaskDataModule, MultiTaskMLP

    torch.manual_seed(0)
    model = MultiTaskMLP(in_features=6, hidden=8, depth=1)
    capture = _ValCapture()
    trainer = _trainer(
        tmp_path,
        [MetricCurves(stages=("val",), thresholds=101), capture],
        logger=TensorBoardLogger(tmp_path, name="tb"),
    )
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer.fit(model, MultiTaskDataModule(num_samples=400, batch_size=32, seed=0))
    assert not [w for w in caught if "handed no tensor" in str(w.message)]
    preds, target = capture.stacked()
    assert target["ctr"].numel() == 64

    acc = EventAccumulator(trainer.logger.log_dir)
    acc.Reload()
    tags = set(acc.Tags()["scalars"])
    for head in ("ctr", "cvr"):
        probs, labels = preds[head].sigmoid(), target[head].long()
        expected = {
            "auroc": tmf.auroc(probs, labels, task="binary", thresholds=101),
            "average_precision": tmf.average_precision(probs, labels, task="binary", thresholds=101),
            "f1": tmf.f1_score(probs, labels, task="binary"),
            "accuracy": ((probs > 0.5).long() == labels).float().mean(),  # by hand
        }
        for name, value in expected.items():
            key = f"metrics/val/{head}/{name}"
            assert key in tags, sorted(tags)
            events = acc.Scalars(key)
            assert len(events) == 2  # one per epoch
            assert events[-1].value == pytest.approx(value.item(), abs=1e-5), key
            assert trainer.callback_metrics[key].item() == pytest.approx(value.item(), abs=1e-6), key
    assert not any(t.startswith("metrics/val/") and t.count("/") == 2 for t in tags)  # no untermed keys
    ctr_auroc = tmf.auroc(preds["ctr"].sigmoid(), target["ctr"].long(), task="binary", thresholds=101).item()
    assert record_for(trainer).values("metrics/val/ctr/auroc")[-1] == pytest.approx(ctr_auroc, abs=1e-6)


def test_multitask_no_host_reads_in_validation_batches_after_the_first(tmp_path):
    from lightning_lossdiag.examples import MultiTaskDataModule, MultiTaskMLP

    counter = HostReadCounter()
    probe = _ValReadProbe(counter)
    curves = MetricCurves(stages=("val",))
    with counter:
        trainer = _trainer(tmp_path, [probe, curves], epochs=2)
        trainer.fit(MultiTaskMLP(in_features=6, hidden=8, depth=1), MultiTaskDataModule(num_samples=400, batch_size=32))
    assert len(probe.reads) == 4
    assert probe.reads[1:] == [0, 0, 0]
    assert "metrics/val/cvr/balanced_accuracy" in trainer.callback_metrics
    assert curves.layout_entries()["AUROC"] == ["metrics/val/auroc", "metrics/val/ctr/auroc", "metrics/val/cvr/auroc"]


# ---------------------------------------------------------------- a mid-epoch checkpoint and resume
class _StepModule(LightningModule):
    """Regression whose training rows depend only on ``global_step`` (so a resumed fit sees the same rows)."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.net = nn.Sequential(nn.Linear(3, 8), nn.Tanh(), nn.Linear(8, 1))
        self.x, self.y = _regression_data()
        self.rows = []  # (preds, target) of every training step of this process

    def training_step(self, batch, batch_idx):
        g = torch.Generator().manual_seed(100 + self.global_step)
        idx = torch.randint(0, 400, (16,), generator=g)
        x, y = self.x[idx], self.y[idx]
        preds = self.net(x).squeeze(-1)
        self.rows.append((self.current_epoch, preds.detach(), y))
        return {"loss": nn.functional.mse_loss(preds, y), "preds": preds.detach(), "target": y}

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.05)

    def train_dataloader(self):
        return DataLoader(TensorDataset(torch.arange(6)), batch_size=1)


def _step_trainer(tmp_path, curves, ckpt_every=None):
    callbacks = [curves]
    if ckpt_every:
        callbacks.append(ModelCheckpoint(dirpath=tmp_path / "ckpt", every_n_train_steps=ckpt_every, save_top_k=-1))
    return Trainer(
        default_root_dir=tmp_path,
        max_epochs=2,
        limit_val_batches=0,
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=bool(ckpt_every),
        logger=False,
        accelerator="cpu",
        devices=1,
        callbacks=callbacks,
    )


def test_mid_epoch_resume_keeps_the_training_metrics_of_the_whole_epoch(tmp_path):
    full_model = _StepModule()
    full = _step_trainer(tmp_path / "full", MetricCurves(stages=("train",), task="regression"), ckpt_every=8)
    full.fit(full_model)
    (ckpt,) = (tmp_path / "full" / "ckpt").glob("*step=8.ckpt")  # epoch 1, after 2 of its 6 steps
    saved = [v for k, v in torch.load(ckpt, weights_only=False)["callbacks"].items() if k.startswith("MetricCurves")]
    assert saved[0]["train_states"]["epoch"] == 1
    fresh = MetricCurves(stages=("train",), task="regression")
    fresh.load_state_dict(saved[0])
    assert fresh.state_dict() == saved[0]  # plain data that round-trips

    resumed_model = _StepModule()
    resumed = _step_trainer(tmp_path / "resumed", MetricCurves(stages=("train",), task="regression"))
    resumed.fit(resumed_model, ckpt_path=ckpt)
    assert [e for e, _, _ in resumed_model.rows] == [1] * 4  # only the last 4 steps ran in this process
    # reference: plain torch over the 6 training steps of epoch 1 (from the uninterrupted run)
    preds = torch.cat([p for e, p, _ in full_model.rows if e == 1])
    target = torch.cat([t for e, _, t in full_model.rows if e == 1])
    mae = (preds - target).abs().mean().item()
    mse = ((preds - target) ** 2).mean().item()
    for trainer in (full, resumed):
        rec = record_for(trainer)
        assert rec.values("metrics/train/mae")[-1] == pytest.approx(mae, rel=1e-5)
        assert rec.values("metrics/train/mse")[-1] == pytest.approx(mse, rel=1e-5)
        assert float(trainer.callback_metrics["metrics/train/mae"]) == pytest.approx(mae, rel=1e-5)


def test_saved_training_states_of_another_epoch_are_not_used(tmp_path):
    model = _StepModule()
    curves = MetricCurves(stages=("train",), task="regression")
    trainer = _step_trainer(tmp_path / "full", curves, ckpt_every=8)
    trainer.fit(model)
    (ckpt,) = (tmp_path / "full" / "ckpt").glob("*step=8.ckpt")
    checkpoint = torch.load(ckpt, weights_only=False)
    state = next(v for k, v in checkpoint["callbacks"].items() if k.startswith("MetricCurves"))
    state["train_states"]["epoch"] = 0  # as if saved in an earlier epoch than the one the fit resumes into
    torch.save(checkpoint, tmp_path / "edited.ckpt")
    other = MetricCurves(stages=("train",), task="regression")
    model2 = _StepModule()
    trainer2 = _step_trainer(tmp_path / "resumed", other)
    trainer2.fit(model2, ckpt_path=tmp_path / "edited.ckpt")
    preds = torch.cat([p for _, p, _ in model2.rows])  # the 4 steps run after the resume, nothing else
    target = torch.cat([t for _, _, t in model2.rows])
    assert record_for(trainer2).values("metrics/train/mae")[-1] == pytest.approx(
        (preds - target).abs().mean().item(), rel=1e-5
    )
    assert "train_states" not in other.state_dict()  # dropped at the end of that epoch


# ---------------------------------------------------------------- batched updates (held steps fed at once)
class _TrainCapture(Callback):
    """Keeps each training step's (preds, target) of the last epoch, and the held steps of MetricCurves' buffer."""

    def __init__(self, curves):
        self.curves = curves
        self.rows, self.held, self.held_bytes = [], [], []

    def on_train_epoch_start(self, trainer, pl_module):
        self.rows, self.held, self.held_bytes = [], [], []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.rows.append((outputs["preds"].detach().clone(), outputs["target"].clone()))
        buffer = _held(self.curves, "train")
        self.held.append(len(buffer))
        self.held_bytes.append(buffer.nbytes)


def _held(curves, slot):
    """The steps held for ``slot``: MetricCurves' own buffer (regression) or the shared engine's (classification)."""
    engine = curves._engines.get(slot)
    return engine.buffer if engine is not None else curves._buffers.get(slot)


def _binary_fit(tmp_path, **options):
    from lightning.pytorch import seed_everything

    seed_everything(7, verbose=False)
    g = torch.Generator().manual_seed(2)
    x = torch.randn(400, 3, generator=g)
    y = (x[:, 0] + 0.5 * torch.randn(400, generator=g) > 0.3).float()
    model = _Module(x, y, 1, nn.functional.binary_cross_entropy_with_logits)
    curves = MetricCurves(stages=("train", "val"), **options)
    capture = _TrainCapture(curves)
    trainer = _trainer(tmp_path, [curves, capture], epochs=2)
    trainer.fit(model)
    return trainer, capture


@pytest.mark.parametrize(
    ("options", "held"),
    [
        ({"buffer_steps": 3}, [1, 2, 0, 1]),  # drained at the 3rd step, and the 4th at epoch end
        ({"buffer_bytes": 300}, [1, 0, 1, 0]),  # a step holds 2 x 32 float32 (256 B): drained past 300 B
        ({}, [1, 2, 3, 4]),  # default: the Trainer's log_every_n_steps (50): only epoch end drains
    ],
    ids=["steps", "bytes", "default"],
)
def test_buffered_updates_equal_per_step_updates(tmp_path, options, held):
    per_step, _ = _binary_fit(tmp_path / "per_step", buffer_steps=1)
    buffered, capture = _binary_fit(tmp_path / "buffered", **options)
    assert capture.held == held
    assert max(capture.held_bytes) <= options.get("buffer_bytes", 256 * 2**10)
    assert _held(capture.curves, "train").nbytes == 0  # epoch end drained what was left
    keys = [k for k in per_step.callback_metrics if k.startswith("metrics/")]
    # 7 ranking metrics and 6 of calibration (ece, mce, ece_adaptive, ece_classwise, brier, confidence), train and val
    assert len(keys) == 2 * 13
    for key in keys:  # counts-based states: the very same numbers, not just close ones
        assert buffered.callback_metrics[key].item() == per_step.callback_metrics[key].item(), key
    # and both equal torchmetrics' functional values over the last epoch's 4 training steps
    probs = torch.cat([p for p, _ in capture.rows]).sigmoid()
    target = torch.cat([t for _, t in capture.rows]).long()
    cm = buffered.callback_metrics
    assert cm["metrics/train/auroc"].item() == pytest.approx(
        tmf.auroc(probs, target, task="binary", thresholds=101).item(), abs=1e-6
    )
    assert cm["metrics/train/accuracy"].item() == pytest.approx(
        ((probs > 0.5).long() == target).float().mean().item(), abs=1e-6
    )


def test_regression_buffer_drained_by_checkpoint_state(tmp_path):
    class _SaveAtSecondStep(Callback):
        def __init__(self, curves):
            self.curves, self.rows, self.state = curves, [], None

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            self.rows.append((outputs["preds"].detach().clone(), outputs["target"].clone()))
            if batch_idx == 1:
                assert len(self.curves._buffers["train"]) == 2  # held, not yet in the metrics
                self.state = self.curves.state_dict()
                assert len(self.curves._buffers["train"]) == 0

    x, y = _regression_data()
    curves = MetricCurves(stages=("train",), task="regression")
    saver = _SaveAtSecondStep(curves)
    trainer = _trainer(tmp_path, [curves, saver], epochs=1)
    trainer.fit(_Module(x, y, 1, nn.functional.mse_loss))
    preds = torch.cat([p for p, _ in saver.rows[:2]])
    target = torch.cat([t for _, t in saver.rows[:2]])
    mae = saver.state["train_states"]["slots"]["train"]["mae"]
    assert mae["total"][2] == [64]  # the two steps of 32 rows
    assert mae["sum_abs_error"][2][0] == pytest.approx((preds - target).abs().sum().item(), rel=1e-6)
    # the epoch went on after the save: its value covers the 4 steps once each (nothing lost, nothing twice)
    all_preds = torch.cat([p for p, _ in saver.rows])
    all_target = torch.cat([t for _, t in saver.rows])
    assert len(saver.rows) == 4
    assert trainer.callback_metrics["metrics/train/mae"].item() == pytest.approx(
        (all_preds - all_target).abs().mean().item(), rel=1e-5
    )


def test_no_host_reads_in_training_batches_including_the_batched_updates(tmp_path):
    from lightning_lossdiag.testing import StepReadProbe

    g = torch.Generator().manual_seed(5)
    x = torch.randn(400, 4, generator=g)
    y = (x.sum(1) > 0).float()
    model = _Module(x, y, 1, nn.functional.binary_cross_entropy_with_logits)
    counter = HostReadCounter()
    probe = StepReadProbe(counter)
    curves = MetricCurves(stages=("train",), task="binary", buffer_steps=2)
    with counter:
        _trainer(tmp_path, [probe, curves], epochs=2).fit(model)
    assert len(probe.reads) == 8  # 4 batches x 2 epochs; batches 2, 4, 6, 8 run the batched update
    assert probe.reads[1:] == [0] * 7
    assert probe.reads[0] <= 1  # one-time inference of the kind of predictions


def test_step_buffer_counts_storage_bytes_and_concatenates_in_order():
    from lightning_lossdiag.callbacks._metric_buffer import StepBuffer

    buffer = StepBuffer(max_steps=10, max_bytes=1000)
    big = torch.arange(300.0)  # 1200 B of float32
    assert not buffer.add(torch.ones(4), torch.zeros(4))  # 16 + 16 B
    assert buffer.nbytes == 32
    assert buffer.add(big[:2], torch.zeros(2))  # a view keeps all of `big` alive: counted whole, past 1000 B
    assert buffer.nbytes == 32 + 1200 + 8
    ((preds, target),) = buffer.take()
    assert preds.tolist() == [1.0] * 4 + [0.0, 1.0]
    assert target.tolist() == [0.0] * 6
    assert (len(buffer), buffer.nbytes) == (0, 0)
    with pytest.raises(ValueError, match="`max_steps`"):
        StepBuffer(max_steps=0, max_bytes=1)
    with pytest.raises(ValueError, match="`buffer_steps`"):
        MetricCurves(buffer_steps=0)
    with pytest.raises(ValueError, match="`buffer_bytes`"):
        MetricCurves(buffer_bytes=-1)
