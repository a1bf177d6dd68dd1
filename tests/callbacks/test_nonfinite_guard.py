"""NonFiniteGuard: each policy on a real run with a NaN injected at a known batch, plus the hot-path contract."""

import json
import math
import os
from types import SimpleNamespace

import lightning as L
import pytest
import torch
from lightning.pytorch import Callback, Trainer
from lightning.pytorch.loggers import TensorBoardLogger
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_lossdiag.callbacks._grad_groups import host_floats
from lightning_lossdiag.callbacks.doctor import Doctor
from lightning_lossdiag.callbacks.nonfinite_guard import STOP_CHECKPOINT, NonFiniteError, NonFiniteGuard
from lightning_lossdiag.diagnosis.record import record_for
from lightning_lossdiag.testing import HostReadCounter, StepReadProbe

NAN_BATCH = 5  # batch index of epoch 0 whose inputs are NaN
NAN_STEP = NAN_BATCH + 1  # global step after that batch: the step convention of the monitors and the guard


class NaNRegressor(L.LightningModule):
    """A user's plain module: the inputs of one training batch are NaN."""

    def __init__(self, nan_batch=NAN_BATCH, lr=0.05):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 1))
        self.nan_batch, self.lr = nan_batch, lr

    def training_step(self, batch, batch_idx):
        x, y = batch
        if self.current_epoch == 0 and batch_idx == self.nan_batch:
            x = x * float("nan")
        loss = nn.functional.mse_loss(self.net(x).squeeze(-1), y)
        self.log("train_loss", loss)
        return loss

    def validation_step(self, batch, batch_idx):
        x, y = batch
        self.log("val_loss", nn.functional.mse_loss(self.net(x).squeeze(-1), y))

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=self.lr)  # no momentum: a zero gradient means no update


def loaders():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(256, 4, generator=g)
    y = x @ torch.tensor([1.0, -2.0, 0.5, 0.0])
    return DataLoader(TensorDataset(x, y), batch_size=16), DataLoader(TensorDataset(x[:64], y[:64]), batch_size=32)


def make_trainer(tmp_path, callbacks, **kw):
    args = dict(
        default_root_dir=tmp_path,
        max_epochs=2,
        limit_train_batches=8,
        limit_val_batches=2,
        log_every_n_steps=4,
        enable_progress_bar=False,
        enable_model_summary=False,
        accelerator="cpu",
        devices=1,
        logger=TensorBoardLogger(tmp_path, name="run"),
        callbacks=callbacks,
    )
    args.update(kw)
    return Trainer(**args)


def params(module):
    return [p.detach().clone() for p in module.parameters()]


class ParamProbe(Callback):
    """Parameters before and after chosen training batches of epoch 0."""

    def __init__(self, batches):
        self.batches, self.before, self.after = set(batches), {}, {}

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if trainer.current_epoch == 0 and batch_idx in self.batches:
            self.before[batch_idx] = params(pl_module)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if trainer.current_epoch == 0 and batch_idx in self.batches:
            self.after[batch_idx] = params(pl_module)


def scalars(log_dir, tag):
    acc = EventAccumulator(str(log_dir), size_guidance={"scalars": 0})
    acc.Reload()
    return [(e.step, e.value) for e in acc.Scalars(tag)] if tag in acc.Tags()["scalars"] else []


@pytest.mark.parametrize("bad", [{"policy": "ignore"}, {"every_n_steps": 0}], ids=["policy", "interval"])
def test_rejects_bad_arguments(bad):
    with pytest.raises(ValueError, match="policy|every_n_steps"):
        NonFiniteGuard(**bad)


def test_default_policy_finishes_keeps_the_work_and_names_the_step(tmp_path):
    model, doctor = NaNRegressor(), Doctor(print_report=False)
    guard = NonFiniteGuard()
    assert guard.policy == "skip"
    trainer = make_trainer(tmp_path, [guard, doctor])
    trainer.fit(model, *loaders())
    assert trainer.global_step == 16  # the run finished: two epochs of 8 batches
    codes = {f.code: f for f in doctor.findings}
    assert codes["nonfinite_loss"].step == NAN_STEP
    assert f"step {NAN_STEP}" in codes["nonfinite_loss"].message
    ckpts = list((tmp_path / "run" / "version_0" / "checkpoints").glob("*.ckpt"))
    assert len(ckpts) == 1
    ckpt = torch.load(ckpts[0], weights_only=False)
    assert ckpt["global_step"] == 16
    assert all(torch.isfinite(v).all() for v in ckpt["state_dict"].values())  # no work lost: the weights are usable
    assert all(math.isfinite(v) for _, v in scalars(trainer.logger.log_dir, "val_loss"))  # and still learning
    assert scalars(trainer.logger.log_dir, "nonfinite/skipped_steps")[-1] == (16, 1.0)


def test_warn_applies_the_update_and_names_the_step(tmp_path):
    model, doctor = NaNRegressor(), Doctor(print_report=False)
    trainer = make_trainer(tmp_path, [NonFiniteGuard(policy="warn"), doctor])
    trainer.fit(model, *loaders())
    assert trainer.global_step == 16  # the run finished: two epochs of 8 batches
    codes = {f.code: f for f in doctor.findings}
    assert codes["nonfinite_loss"].step == NAN_STEP
    assert f"step {NAN_STEP}" in codes["nonfinite_loss"].message
    assert codes["nonfinite_grad"].step == NAN_STEP
    assert set(codes["nonfinite_grad"].evidence["params"]) == {n for n, _ in model.named_parameters()}
    ckpts = list((tmp_path / "run" / "version_0" / "checkpoints").glob("*.ckpt"))
    assert len(ckpts) == 1
    ckpt = torch.load(ckpts[0], weights_only=False)
    assert ckpt["global_step"] == 16
    assert set(ckpt["state_dict"]) == set(model.state_dict())
    assert not any(torch.isfinite(v).all() for v in ckpt["state_dict"].values())  # documented: "warn" applies NaNs
    assert not scalars(trainer.logger.log_dir, "nonfinite/skipped_steps")
    logged = scalars(trainer.logger.log_dir, "train_loss")
    assert [s for s, _ in logged] == [3, 7, 11, 15]  # Lightning logs training steps every 4 batches
    report = json.loads((tmp_path / "run" / "version_0" / "lossdiag_report.json").read_text())
    assert report["findings"][0]["code"] in ("nonfinite_loss", "nonfinite_grad")


def test_skip_drops_the_update_of_the_nan_step_only(tmp_path):
    model, probe, doctor = NaNRegressor(), ParamProbe([NAN_BATCH - 1, NAN_BATCH]), Doctor(print_report=False)
    trainer = make_trainer(tmp_path, [probe, NonFiniteGuard(policy="skip"), doctor])
    trainer.fit(model, *loaders())
    for before, after in zip(probe.before[NAN_BATCH], probe.after[NAN_BATCH], strict=True):
        assert torch.equal(before, after)
    moved = [
        not torch.equal(b, a) for b, a in zip(probe.before[NAN_BATCH - 1], probe.after[NAN_BATCH - 1], strict=True)
    ]
    assert all(moved)  # a normal step does change every parameter
    assert all(torch.isfinite(p).all() for p in model.parameters())
    assert scalars(trainer.logger.log_dir, "nonfinite/skipped_steps")[-1] == (16, 1.0)
    f = next(f for f in doctor.findings if f.code == "nonfinite_loss")
    assert f.step == NAN_STEP
    assert "dropped 1 update" in f.message


def test_stop_saves_a_checkpoint_and_stops_at_the_next_flush(tmp_path):
    nan_batch = 4  # global step 5; flushes every 3 steps, so the next flush is step 6
    model = NaNRegressor(nan_batch=nan_batch)
    trainer = make_trainer(tmp_path, [NonFiniteGuard(policy="stop", every_n_steps=3), Doctor(print_report=False)])
    trainer.fit(model, *loaders())
    assert trainer.global_step == 6
    path = os.path.join(trainer.logger.log_dir, STOP_CHECKPOINT)
    ckpt = torch.load(path, weights_only=False)
    assert ckpt["global_step"] == 6
    assert all(torch.isfinite(v).all() for v in ckpt["state_dict"].values())  # the bad update was dropped
    assert trainer.lossdiag_record.notes["nonfinite/stop_checkpoint"] == path


def test_raise_stops_at_the_step_and_the_report_of_what_was_seen_exists(tmp_path):
    model = NaNRegressor()
    trainer = make_trainer(tmp_path, [NonFiniteGuard(policy="raise"), Doctor(print_report=False)])
    with pytest.raises(NonFiniteError, match=rf"global step {NAN_STEP} \(epoch 0, batch {NAN_BATCH}\)"):
        trainer.fit(model, *loaders())
    assert trainer.global_step == NAN_BATCH  # the update of the NaN batch was not applied
    assert all(torch.isfinite(p).all() for p in model.parameters())
    report = json.loads((tmp_path / "run" / "version_0" / "lossdiag_report.json").read_text())
    assert report["summary"]["status"] == "interrupted"
    assert "NonFiniteError" in report["summary"]["exception"]
    loss = next(f for f in report["findings"] if f["code"] == "nonfinite_loss")
    assert loss["step"] == NAN_STEP
    assert [s for s, _ in scalars(trainer.logger.log_dir, "train_loss")] == [3]  # logs written before are intact


@pytest.mark.parametrize("policy", ["warn", "skip", "stop", "raise"])
def test_host_reads_per_step(tmp_path, policy):
    counter = HostReadCounter()
    probe = StepReadProbe(counter)
    with counter:
        trainer = make_trainer(
            tmp_path,
            [probe, NonFiniteGuard(policy=policy, every_n_steps=4)],
            max_epochs=1,
            logger=False,
            limit_val_batches=0,
            enable_checkpointing=False,
        )
        trainer.fit(NaNRegressor(nan_batch=-1), loaders()[0])
    flushes = [r for r, s in zip(probe.reads, probe.steps_after, strict=True) if s % 4 == 0]
    others = [r for r, s in zip(probe.reads, probe.steps_after, strict=True) if s % 4 != 0]
    with HostReadCounter(only_package=None) as one:
        host_floats([torch.zeros(()), torch.zeros(3)])  # what one transfer counts (.cpu() then .tolist())
    if policy == "raise":
        assert set(others) == {1}
        assert set(flushes) == {1}  # documented: one sync per step, no flush work
    else:
        assert set(others) == {0}
        assert set(flushes) == {one.total}  # one transfer at a flush


def test_state_round_trip():
    guard = NonFiniteGuard(policy="skip")
    state = {
        "nonfinite_steps": 2,
        "skipped_steps": 2,
        "first_loss_step": 7,
        "first_grad_step": 7,
        "bad_params": ["w"],
        "last_flushed": 8,
    }
    guard.load_state_dict(state)
    assert guard.state_dict() == state
    assert math.isfinite(guard.first_loss_step)


# ------------------------------------------------------------------------ the first NaN loss over ranks
class TwoRanks:
    """Rank 0 of two: ``all_gather`` stacks this rank's vector with a fixed one of the other rank (the real
    collective runs in tests/distributed)."""

    world_size = 2

    def __init__(self, other_first):
        self.other = torch.tensor([0, other_first])
        self.calls = 0
        self.strategy = self
        self.root_device = torch.device("cpu")

    def all_gather(self, local):
        self.calls += 1
        return torch.stack([local, self.other])


@pytest.mark.parametrize(("here", "there", "note"), [(None, 6, 6), (4, 6, 4), (None, 2**62, None)])
def test_flush_notes_the_first_nonfinite_loss_of_any_rank(here, there, note):
    guard = NonFiniteGuard(policy="warn", every_n_steps=4)
    weight = torch.zeros(1, requires_grad=True)
    optimizer = torch.optim.SGD([weight], lr=0.1)
    for step in range(1, 9):
        guard.on_before_backward(None, None, torch.tensor(float("nan") if step == here else 1.0))
        weight.grad = torch.ones(1)
        guard.on_before_optimizer_step(SimpleNamespace(global_step=step - 1), None, optimizer)
    trainer = TwoRanks(there)
    guard._flush(trainer, act=False)
    assert trainer.calls == 1
    assert record_for(trainer).notes.get("loss/first_nonfinite_step") == note
    assert guard.first_loss_step == (here if here is not None else -1)  # the guard's own state stays this rank's


class NaNInOneGradient(NaNRegressor):
    """Finite loss; the gradient of the first layer's bias turns NaN at one batch (a custom backward gone wrong)."""

    def on_after_backward(self):
        if self.current_epoch == 0 and self.trainer.global_step == NAN_BATCH:
            self.net[0].bias.grad[0] = float("nan")


def test_in_the_bundle_the_guard_reuses_the_gradient_norms(tmp_path, monkeypatch):
    import lightning_lossdiag.callbacks.nonfinite_guard as guard_module
    from lightning_lossdiag import LossDiagnostics

    def no_second_pass(grads, p):
        raise AssertionError("the guard recomputed the norms GradientMonitor already had")

    monkeypatch.setattr(guard_module, "param_norms", no_second_pass)
    bundle = LossDiagnostics(activations=False, errors=False, metrics=False, doctor={"print_report": False})
    model = NaNInOneGradient(nan_batch=-1)  # the inputs stay finite
    trainer = make_trainer(tmp_path, [bundle], max_epochs=1, limit_val_batches=0)
    trainer.fit(model, loaders()[0])
    guard = bundle.parts["nonfinite"]
    assert guard.norm_source is bundle.parts["gradients"]
    assert guard.skipped_steps == 1
    assert guard.first_grad_step == NAN_STEP
    assert guard.first_loss_step == -1  # the loss stayed finite
    assert guard.bad_params == ["net.0.bias"]
    assert all(torch.isfinite(p).all() for p in model.parameters())  # the update of that step was dropped


def test_no_step_gradients_are_held_past_the_guard(tmp_path):
    """The monitor hands its gradients to the bundle's guard once; a lone GradientMonitor never keeps them."""
    from lightning_lossdiag import GradientMonitor, LossDiagnostics

    bundle = LossDiagnostics(activations=False, errors=False, metrics=False, doctor={"print_report": False})
    lone = GradientMonitor()
    held: list[object] = []

    class Watch(Callback):  # runs after the monitors' on_before_optimizer_step (callbacks are called in order)
        def on_before_optimizer_step(self, trainer, pl_module, optimizer):
            held.extend([bundle.parts["gradients"]._latest, lone._latest])

    model = NaNInOneGradient(nan_batch=-1)
    trainer = make_trainer(tmp_path, [bundle, lone, Watch()], max_epochs=1, limit_val_batches=0)
    trainer.fit(model, loaders()[0])
    assert bundle.parts["gradients"].shares_latest
    assert not lone.shares_latest
    assert len(held) == 2 * trainer.global_step > 0
    assert all(x is None for x in held)


class FusedAdamRegressor(NaNRegressor):
    def configure_optimizers(self):
        return torch.optim.Adam(self.parameters(), lr=self.lr, fused=True)


class OptimizerProbe(Callback):
    """The fused optimizer's state and the gradients it was handed, around the NaN batch (after the guard ran)."""

    def __init__(self):
        self.grads_before_step, self.state, self.leftover = None, {}, []

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):  # runs after the guard's hook
        if trainer.current_epoch == 0 and trainer.fit_loop.epoch_loop.batch_idx == NAN_BATCH:
            self.grads_before_step = [p.grad.clone() for p in pl_module.parameters()]

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self._snapshot(trainer, batch_idx, "before")

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self._snapshot(trainer, batch_idx, "after")
        self.leftover.append(hasattr(trainer.optimizers[0], "found_inf"))

    def _snapshot(self, trainer, batch_idx, when):
        if trainer.current_epoch == 0 and batch_idx in (NAN_BATCH - 1, NAN_BATCH, NAN_BATCH + 1):
            opt = trainer.optimizers[0]
            self.state[(batch_idx, when)] = [
                (p.detach().clone(), *(opt.state[p][k].clone() for k in ("exp_avg", "exp_avg_sq", "step")))
                for p in opt.param_groups[0]["params"]
                if p in opt.state
            ]


def test_a_fused_optimizer_skips_the_bad_step_itself_without_touching_the_gradients(tmp_path):
    probe = OptimizerProbe()
    guard = NonFiniteGuard(policy="skip")
    model = FusedAdamRegressor()
    trainer = make_trainer(tmp_path, [guard, probe], max_epochs=1, limit_val_batches=0)
    trainer.fit(model, loaders()[0])
    assert any(bool(torch.isnan(g).any()) for g in probe.grads_before_step)  # no pass zeroed them...
    before, after = probe.state[(NAN_BATCH, "before")], probe.state[(NAN_BATCH, "after")]
    for b, a in zip(before, after, strict=True):  # ...and the kernel left weights, moments and step count alone
        assert all(torch.equal(x, y) for x, y in zip(b, a, strict=True))
    previous = zip(probe.state[(NAN_BATCH - 1, "before")], probe.state[(NAN_BATCH - 1, "after")], strict=True)
    assert all(not torch.equal(b[0], a[0]) for b, a in previous)  # a normal step does move the weights
    following = zip(probe.state[(NAN_BATCH + 1, "before")], probe.state[(NAN_BATCH + 1, "after")], strict=True)
    assert all(not torch.equal(b[0], a[0]) for b, a in following)  # and so does the one after: the flag is reset
    assert all(torch.isfinite(p).all() for p in model.parameters())
    assert guard.skipped_steps == 1
    assert not any(probe.leftover)  # `found_inf` is taken back after every batch


def test_the_drop_pass_runs_from_the_last_gradient_to_the_first(tmp_path, monkeypatch):
    # the order is what keeps the pass cheap (it starts where the norm pass ended, in cache); the values must not care
    import lightning_lossdiag.callbacks.nonfinite_guard as guard_module

    orders, views = [], []
    real_drop = guard_module.drop_update

    def recording_drop(grads, ok, view=None):
        orders.append([id(g) for g in grads])
        views.append(view)
        real_drop(grads, ok, view)

    class GradOrder(Callback):
        def on_before_optimizer_step(self, trainer, pl_module, optimizer):  # runs after the guard's hook
            self.ids = [id(p.grad) for p in pl_module.parameters()]

    monkeypatch.setattr(guard_module, "drop_update", recording_drop)
    probe, order = ParamProbe([NAN_BATCH]), GradOrder()
    model = NaNRegressor()
    trainer = make_trainer(tmp_path, [NonFiniteGuard(policy="skip"), order, probe], max_epochs=1, limit_val_batches=0)
    trainer.fit(model, loaders()[0])
    assert len(orders) == 8
    assert orders[-1] == order.ids[::-1]
    assert set(views) == {torch.int32}  # float32 parameters on one device: one view, decided once, no grouping
    for before, after in zip(probe.before[NAN_BATCH], probe.after[NAN_BATCH], strict=True):
        assert torch.equal(before, after)  # the NaN step's update was still dropped
