import math

import pytest
import torch
from lightning.pytorch import LightningModule, Trainer
from lightning.pytorch.loggers import TensorBoardLogger
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_lossdiag._outputs import StepOutputs, stash_outputs
from lightning_lossdiag.callbacks.loss_monitor import LossMonitor, LossStats
from lightning_lossdiag.diagnosis.record import record_for


class ScriptedLoss(LightningModule):
    """training_step returns script[global_step]: the loss value of every optimizer step is known in advance."""

    def __init__(self, script, terms=False):
        super().__init__()
        self.layer = nn.Linear(2, 1)
        self.script = script
        self.terms = terms

    def training_step(self, batch, batch_idx):
        value = self.script[self.trainer.global_step]
        loss = self.layer(batch[0]).sum() * 0.0 + value
        if self.terms:
            a, b = torch.tensor(value * 0.25), torch.tensor(value * 0.75)
            stash_outputs(self, "train", StepOutputs(loss=loss, terms={"mse": a, "aux head": b}))
        return loss

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.0)

    def train_dataloader(self):
        return DataLoader(TensorDataset(torch.randn(64, 2)), batch_size=8)


def make_trainer(tmp_path, callbacks, max_epochs=1, batches=8, logger=True, **kw):
    return Trainer(
        max_epochs=max_epochs,
        limit_train_batches=batches,
        limit_val_batches=0,
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
        logger=TensorBoardLogger(tmp_path, name="", version="") if logger else False,
        accelerator="cpu",
        devices=1,
        callbacks=callbacks,
        **kw,
    )


def hand_ema(values, decay):
    """Bias-corrected EMA over the finite values (reference, written out from the definition)."""
    finite = [v for v in values if math.isfinite(v)]
    n = len(finite)
    weights = [(1 - decay) * decay ** (n - 1 - i) for i in range(n)]
    return sum(w * v for w, v in zip(weights, finite, strict=False)) / (1 - decay**n)


def read_scalars(log_dir):
    acc = EventAccumulator(str(log_dir))
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


def smooth(n):
    return [1.0 / (1.0 + 0.05 * t) + 0.01 * math.sin(t) for t in range(n)]


def test_flush_values_match_hand_computed_and_tensorboard(tmp_path):
    script = smooth(16)
    monitor = LossMonitor(every_n_steps=4, ema_decay=0.9, spike_warmup=3)
    trainer = make_trainer(tmp_path, [monitor], max_epochs=2)
    trainer.fit(ScriptedLoss(script))
    rec = record_for(trainer)
    steps = [4, 8, 12, 16]
    assert [s for s, _ in rec.series("train/loss")] == steps
    for i, step in enumerate(steps):
        window = script[step - 4 : step]
        assert rec.series("train/loss")[i][1] == pytest.approx(script[step - 1])
        assert rec.series("train/loss_mean")[i][1] == pytest.approx(sum(window) / 4)
        assert rec.series("train/loss_min")[i][1] == pytest.approx(min(window))
        assert rec.series("train/loss_max")[i][1] == pytest.approx(max(window))
        assert rec.series("train/loss_ema")[i][1] == pytest.approx(hand_ema(script[:step], 0.9))
    assert rec.values("train/loss_spikes") == [0, 0, 0, 0]
    assert rec.values("train/nonfinite_count") == [0, 0, 0, 0]
    assert rec.values("train/loss_epoch") == pytest.approx([sum(script[:8]) / 8, sum(script[8:]) / 8])
    assert "loss/first_nonfinite_step" not in rec.notes
    assert "loss/first_spike_step" not in rec.notes

    tb = read_scalars(tmp_path)
    assert [s for s, _ in tb["train/loss_ema"]] == steps
    assert [v for _, v in tb["train/loss_ema"]] == pytest.approx([hand_ema(script[:s], 0.9) for s in steps], rel=1e-6)
    assert [s for s, _ in tb["train/loss_epoch"]] == [8, 16]


def test_nan_and_spike_detected_at_the_right_steps(tmp_path):
    script = smooth(24)
    script[6] = float("nan")  # batch 6 -> global_step 7 after it
    script[15] = script[14] * 20  # batch 15 -> global_step 16
    monitor = LossMonitor(every_n_steps=8, ema_decay=0.9, spike_warmup=5)
    trainer = make_trainer(tmp_path, [monitor], max_epochs=3)
    trainer.fit(ScriptedLoss(script))
    rec = record_for(trainer)
    assert rec.notes["loss/first_nonfinite_step"] == 7
    assert rec.notes["loss/first_spike_step"] == 16
    assert rec.values("train/nonfinite_count") == [1, 1, 1]
    assert rec.values("train/loss_spikes") == [0, 1, 1]
    # NaN did not poison the EMA, the mean or the epoch mean
    assert rec.series("train/loss_ema")[0][1] == pytest.approx(hand_ema(script[:8], 0.9))
    finite = [v for v in script[:8] if math.isfinite(v)]
    assert rec.values("train/loss_mean")[0] == pytest.approx(sum(finite) / len(finite))
    assert rec.values("train/loss_epoch")[0] == pytest.approx(sum(finite) / len(finite))
    assert rec.values("train/loss_max")[1] == pytest.approx(script[15])


def test_terms_are_logged(tmp_path):
    script = smooth(8)
    trainer = make_trainer(tmp_path, [LossMonitor(every_n_steps=4)])
    trainer.fit(ScriptedLoss(script, terms=True))
    rec = record_for(trainer)
    assert rec.values("train/loss/mse") == pytest.approx([script[3] * 0.25, script[7] * 0.25])
    assert rec.values("train/loss/aux_head") == pytest.approx([script[3] * 0.75, script[7] * 0.75])


def test_leftovers_flushed_at_train_end(tmp_path):
    script = smooth(6)
    trainer = make_trainer(tmp_path, [LossMonitor(every_n_steps=4)], batches=6)
    trainer.fit(ScriptedLoss(script))
    rec = record_for(trainer)
    assert [s for s, _ in rec.series("train/loss")] == [4, 6]
    assert rec.values("train/loss_mean")[1] == pytest.approx((script[4] + script[5]) / 2)


def test_no_logger_still_records(tmp_path):
    script = smooth(4)
    trainer = make_trainer(tmp_path, [LossMonitor(every_n_steps=2)], batches=4, logger=False)
    with pytest.warns(UserWarning, match="no logger"):
        trainer.fit(ScriptedLoss(script))
    assert record_for(trainer).values("train/loss") == pytest.approx([script[1], script[3]])


def test_stats_spike_rule_by_hand():
    s = LossStats()
    values = [1.0] * 10 + [1.5] + [1.0] * 5 + [-2.0, 0.0]
    s.update(values, list(range(1, len(values) + 1)), decay=0.9, zscore=6.0, warmup=5)
    # constant history: std is floored at 0.01 in log space, so 1.5 (log 0.405) is far above the limit 0.06
    assert s.spike_count == 1
    assert s.first_spike_step == 11
    # losses <= 0 are finite (counted in the mean) but never tested by the detector
    assert s.nonfinite_count == 0
    assert s.window_count == len(values)
    quiet = LossStats()
    quiet.update([1.0 + 0.02 * ((-1) ** t) for t in range(40)], list(range(40)), decay=0.9, zscore=6.0, warmup=5)
    assert quiet.spike_count == 0


def test_stats_inf_is_nonfinite():
    s = LossStats()
    s.update([2.0, float("inf"), float("-inf"), 4.0], [1, 2, 3, 4], decay=0.5, zscore=6.0, warmup=1)
    assert s.nonfinite_count == 2
    assert s.first_nonfinite_step == 2
    assert s.ema(0.5) == pytest.approx(hand_ema([2.0, 4.0], 0.5))


def test_state_round_trip_and_resume_continues(tmp_path):
    script = smooth(16)
    script[3] = float("nan")
    first = LossMonitor(every_n_steps=4, ema_decay=0.9)
    trainer = make_trainer(tmp_path, [first], max_epochs=1)
    model = ScriptedLoss(script)
    trainer.fit(model)
    ckpt = tmp_path / "a.ckpt"
    trainer.save_checkpoint(ckpt)

    state = first.state_dict()
    clone = LossMonitor(every_n_steps=4, ema_decay=0.9)
    clone.load_state_dict(state)
    assert clone.state_dict() == state
    assert clone.stats.nonfinite_count == 1

    second = LossMonitor(every_n_steps=4, ema_decay=0.9)
    trainer2 = make_trainer(tmp_path / "b", [second], max_epochs=2)
    trainer2.fit(ScriptedLoss(script), ckpt_path=ckpt)
    rec = record_for(trainer2)
    assert [s for s, _ in rec.series("train/loss_ema")] == [12, 16]
    assert rec.values("train/loss_ema")[-1] == pytest.approx(hand_ema(script[:16], 0.9))
    assert rec.values("train/nonfinite_count") == [1, 1]


def test_state_key_differs_by_options():
    assert LossMonitor(ema_decay=0.9).state_key != LossMonitor(ema_decay=0.99).state_key


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"ema_decay": 1.0}, "ema_decay"),
        ({"spike_zscore": 0}, "spike_zscore"),
        ({"spike_warmup": 0}, "spike_warmup"),
        ({"every_n_steps": 0}, "every_n_steps"),
    ],
    ids=["decay", "zscore", "warmup", "every"],
)
def test_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        LossMonitor(**kwargs)


# ------------------------------------------------------------------------ non-finite losses merged over ranks
class TwoRanks:
    """A Trainer seen by rank 0 of two: ``all_gather`` stacks this rank's vector with the other rank's.

    The real collective runs in tests/distributed (two gloo processes); here the other rank is a fixed
    ``[nonfinite_count, first_step]`` so the arithmetic of the merge is checked by hand.
    """

    world_size = 2
    global_step = 0
    is_global_zero = True
    loggers = ()

    def __init__(self, other):
        self.other = torch.tensor(other)
        self.gathered = []
        self.strategy = self

    @property
    def root_device(self):
        return torch.device("cpu")

    def all_gather(self, local):
        self.gathered.append(local.tolist())
        return torch.stack([local, self.other])


def _feed(monitor, losses, first_step):
    for i, value in enumerate(losses):
        monitor._pending.append(torch.tensor(value))
        monitor._pending_steps.append(first_step + i)


@pytest.mark.parametrize(
    ("other", "count", "first"),
    [([1, 3], 1, 3), ([0, 2**62], 0, -1), ([2, 7], 3, 6)],
    ids=["nan_on_other_rank", "none", "both"],
)
def test_nonfinite_losses_are_merged_over_ranks_at_a_flush(other, count, first):
    mon = LossMonitor(every_n_steps=4)
    trainer = TwoRanks(other)
    trainer.global_step = 8
    losses = [1.0, 2.0, 3.0, 4.0] if count != 3 else [1.0, float("nan"), 3.0, 4.0]  # steps 5..8 on this rank
    _feed(mon, losses, first_step=5)
    mon._flush(trainer)
    assert len(trainer.gathered) == 1  # one collective per flush
    assert mon.stats.nonfinite_count == count
    assert mon.stats.first_nonfinite_step == first
    assert record_for(trainer).values("train/nonfinite_count") == [count]
    assert record_for(trainer).notes.get("loss/first_nonfinite_step", -1) == first
    finite = [v for v in losses if math.isfinite(v)]  # this rank's losses stay its own
    assert record_for(trainer).values("train/loss_mean") == [pytest.approx(sum(finite) / len(finite))]


def test_nonfinite_folded_in_at_a_checkpoint_is_merged_once_at_the_next_flush():
    mon = LossMonitor(every_n_steps=4)
    _feed(mon, [1.0, float("nan")], first_step=1)
    mon.state_dict()  # checkpoint save between flushes: folded in on this rank only (no collective there)
    assert mon.stats.nonfinite_count == 1
    trainer = TwoRanks([1, 4])
    trainer.global_step = 4
    _feed(mon, [1.0, 2.0], first_step=3)
    mon._flush(trainer)
    assert trainer.gathered == [[1, 2]]  # this rank sends the NaN of step 2 it has not merged yet
    assert mon.stats.nonfinite_count == 2  # 1 here + 1 there, not counted twice
    assert mon.stats.first_nonfinite_step == 2
    trainer.global_step = 8
    _feed(mon, [1.0] * 4, first_step=5)
    mon._flush(trainer)
    assert trainer.gathered[-1] == [0, 2]  # nothing new here; the known first step is harmless under min
    assert mon.stats.nonfinite_count == 3  # the fixed other rank reports one more


def test_single_process_makes_no_collective(tmp_path):
    script = smooth(8)
    script[2] = float("nan")
    mon = LossMonitor(every_n_steps=4)
    trainer = make_trainer(tmp_path, [mon])
    trainer.fit(ScriptedLoss(script))
    assert mon._unmerged_nonfinite == 1  # counted, never sent anywhere
    assert record_for(trainer).values("train/nonfinite_count") == [1, 1]
