"""The hot-path rule: no host read between flushes, and a flush costs a constant number of reads at any depth."""

import contextlib

import pytest
import torch
from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.loggers import TensorBoardLogger
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_lossdiag.callbacks.gradient_monitor import GradientMonitor
from lightning_lossdiag.callbacks.loss_monitor import LossMonitor
from lightning_lossdiag.callbacks.scheduler_monitor import SchedulerMonitor
from lightning_lossdiag.examples import MLPRegressor
from lightning_lossdiag.testing import HostReadCounter, StepReadProbe

EVERY = 4


class DeepMLP(LightningModule):
    def __init__(self, depth, width=8):
        super().__init__()
        layers = []
        for i in range(depth):
            layers += [nn.Linear(4 if i == 0 else width, width), nn.ReLU()]
        self.net = nn.Sequential(*layers, nn.Linear(width, 1))

    def training_step(self, batch, batch_idx):
        x, y = batch
        preds = self.net(x).squeeze(-1)
        return {"loss": nn.functional.mse_loss(preds, y), "preds": preds.detach(), "target": y}

    def configure_optimizers(self):
        opt = torch.optim.Adam(self.parameters(), lr=1e-3)
        return {"optimizer": opt, "lr_scheduler": torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.9)}

    def validation_step(self, batch, batch_idx):
        x, y = batch
        preds = self.net(x).squeeze(-1)
        return {"loss": nn.functional.mse_loss(preds, y), "preds": preds, "target": y}

    def train_dataloader(self):
        g = torch.Generator().manual_seed(0)
        x = torch.randn(13 * 8, 4, generator=g)
        return DataLoader(TensorDataset(x, x.sum(-1)), batch_size=8)

    def val_dataloader(self):
        g = torch.Generator().manual_seed(1)
        x = torch.randn(3 * 8, 4, generator=g)
        return DataLoader(TensorDataset(x, x.sum(-1)), batch_size=8)


def monitors():
    return [
        LossMonitor(every_n_steps=EVERY),
        GradientMonitor(every_n_steps=EVERY, depth=2, param_norms=True),
        SchedulerMonitor(every_n_steps=EVERY),
    ]


def bundle():
    from lightning_lossdiag import LossDiagnostics

    return [LossDiagnostics()]


def reads_per_batch(tmp_path, depth, make_callbacks):
    counter = HostReadCounter()
    probe = StepReadProbe(counter)
    trainer = Trainer(
        max_epochs=1,
        limit_train_batches=13,
        limit_val_batches=0,
        log_every_n_steps=EVERY,
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
        logger=TensorBoardLogger(tmp_path, name="", version=str(depth)),
        accelerator="cpu",
        devices=1,
        callbacks=[probe, *make_callbacks()],
    )
    with counter:
        trainer.fit(DeepMLP(depth))
    batches = list(zip(probe.reads, probe.steps_after, strict=False))[1:]  # batch 0 may run one-time checks
    non_flush = [r for r, s in batches if s % EVERY]
    flush = [r for r, s in batches if s % EVERY == 0]
    assert len(flush) == 3
    assert non_flush == [0] * len(non_flush), dict(counter.sites)
    return flush


@pytest.mark.parametrize("make_callbacks", [monitors, bundle], ids=["three_monitors", "LossDiagnostics"])
def test_no_reads_between_flushes_and_constant_flush_cost(tmp_path, make_callbacks):
    shallow = reads_per_batch(tmp_path, 2, make_callbacks)
    deep = reads_per_batch(tmp_path, 24, make_callbacks)
    assert len(set(shallow)) == 1  # every flush costs the same
    assert shallow == deep  # and it does not grow with the number of layers
    assert 0 < shallow[0] <= 16


def test_monitors_alone_read_twice_per_flush_each(tmp_path):
    # LossMonitor and GradientMonitor move everything in one transfer (`.cpu()` + `.tolist()` of one tensor);
    # SchedulerMonitor logs host floats (no read)
    assert reads_per_batch(tmp_path, 3, monitors) == [4, 4, 4]


#: hooks Lightning calls per training step (before the optimizer step, except the batch end) and per val batch
_TRAIN_STEP_HOOKS = (
    "on_train_batch_start",
    "on_before_backward",
    "on_after_backward",
    "on_before_zero_grad",
    "on_before_optimizer_step",
    "on_train_batch_end",
)
_VAL_STEP_HOOKS = ("on_validation_batch_start", "on_validation_batch_end")
_OTHER_HOOKS = tuple(
    name
    for name, value in vars(Callback).items()
    if callable(value)
    and (name.startswith("on_") or name in ("setup", "teardown"))
    and name not in _TRAIN_STEP_HOOKS + _VAL_STEP_HOOKS
)


class SyncGuard(Callback):
    """Forward every hook to the wrapped callbacks; run the per-step ones under a strict guard.

    Guarded: training-step hooks of steps that are not flush steps (and not the first step, which may run one-time
    checks), and validation batch hooks except each run's first batch. ``strict`` is a context-manager factory:
    CUDA's sync debug mode on a GPU, a zero-read assertion with ``HostReadCounter`` on the CPU.
    """

    def __init__(self, callbacks, strict):
        self.callbacks = callbacks
        self.strict = strict
        self.guarded_calls = 0

    def _call(self, name, trainer, *args, guard=False, **kwargs):
        if not guard:
            for cb in self.callbacks:
                getattr(cb, name)(trainer, *args, **kwargs)
            return
        self.guarded_calls += 1
        with self.strict(name):
            for cb in self.callbacks:
                getattr(cb, name)(trainer, *args, **kwargs)

    def _train_step_guarded(self, trainer, name):
        step = trainer.global_step + (0 if name == "on_train_batch_end" else 1)  # the step this batch completes
        return step > 1 and step % EVERY != 0  # step 1: one-time checks of the first batch

    def _val_batch_guarded(self, args):
        batch_idx = (
            args[3] if len(args) > 3 and isinstance(args[3], int) else args[2]
        )  # (pl_module, [outputs,] batch, idx)
        return batch_idx > 0


def _forward(name):
    def hook(self, trainer, *args, **kwargs):
        self._call(name, trainer, *args, **kwargs)

    return hook


def _train_forward(name):
    def hook(self, trainer, *args):
        self._call(name, trainer, *args, guard=self._train_step_guarded(trainer, name))

    return hook


def _val_forward(name):
    def hook(self, trainer, *args):
        self._call(name, trainer, *args, guard=not trainer.sanity_checking and self._val_batch_guarded(args))

    return hook


for _name in _OTHER_HOOKS:
    setattr(SyncGuard, _name, _forward(_name))
for _name in _TRAIN_STEP_HOOKS:
    setattr(SyncGuard, _name, _train_forward(_name))
for _name in _VAL_STEP_HOOKS:
    setattr(SyncGuard, _name, _val_forward(_name))


@contextlib.contextmanager
def cuda_sync_errors(hook):
    torch.cuda.set_sync_debug_mode("error")  # any synchronising CUDA call raises RuntimeError
    try:
        yield
    finally:
        torch.cuda.set_sync_debug_mode("default")


@contextlib.contextmanager
def no_host_reads(hook):
    with HostReadCounter() as counter:
        yield
    assert counter.total == 0, f"{hook}: host reads {dict(counter.sites)}"


def guarded_fit(tmp_path, make_callbacks, accelerator, strict):
    guard = SyncGuard(make_callbacks(), strict)
    trainer = Trainer(
        max_epochs=1,
        limit_train_batches=13,
        limit_val_batches=3,
        num_sanity_val_steps=0,
        log_every_n_steps=EVERY,
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
        logger=TensorBoardLogger(tmp_path, name="", version=""),
        accelerator=accelerator,
        devices=1,
        callbacks=[guard],
    )
    trainer.fit(DeepMLP(4))
    # 13 steps, flushes at 4, 8, 12: the guarded steps are 2, 3, 5, 6, 7, 9, 10, 11, 13 (6 hooks each, the
    # batch-end hook is guarded on the batch that ends the step) and validation batches 1 and 2 (2 hooks each)
    assert trainer.global_step == 13
    return guard, trainer


@pytest.mark.parametrize("make_callbacks", [monitors, bundle], ids=["three_monitors", "LossDiagnostics"])
def test_no_host_reads_in_per_step_hooks_of_train_and_val(tmp_path, make_callbacks):
    guard, _ = guarded_fit(tmp_path, make_callbacks, "cpu", no_host_reads)
    assert guard.guarded_calls == 9 * 6 + 2 * 2  # the guard really wrapped every per-step hook


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA: set_sync_debug_mode only checks CUDA syncs")
@pytest.mark.parametrize("make_callbacks", [monitors, bundle], ids=["three_monitors", "LossDiagnostics"])
def test_no_cuda_sync_between_flushes(tmp_path, make_callbacks):
    # raises RuntimeError on any synchronising call inside the guarded hooks (training and validation batches)
    guard, _ = guarded_fit(tmp_path, make_callbacks, "cuda", cuda_sync_errors)
    assert guard.guarded_calls == 9 * 6 + 2 * 2


# ------------------------------------------------------------- the whole loop: reads made by Lightning on our behalf
class MixinRegressor(MLPRegressor):
    """The package's own example model: LossMixin logs the loss and hands preds/targets to the callbacks."""

    def train_dataloader(self):
        g = torch.Generator().manual_seed(0)
        x = torch.randn(13 * 8, 4, generator=g)
        return DataLoader(TensorDataset(x, x.sum(-1)), batch_size=8)


class PlainRegressor(MixinRegressor):
    """The same network trained with a bare step: no mixin logging, no hand-over."""

    def training_step(self, batch, batch_idx):
        x, y = batch
        return nn.functional.mse_loss(self(x), y)


def all_reads_per_step(tmp_path, model, callbacks):
    """Reads per training batch from ANY code (Lightning's included), from one batch start to the next."""
    counter = HostReadCounter(only_package=None)
    probe = StepReadProbe(counter)
    trainer = Trainer(
        max_epochs=1,
        limit_val_batches=0,
        log_every_n_steps=EVERY,
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
        logger=TensorBoardLogger(tmp_path, name="", version=type(model).__name__ + str(len(callbacks))),
        accelerator="cpu",
        devices=1,
        callbacks=[probe, *callbacks],
    )
    with counter:
        trainer.fit(model)
    batches = list(zip(probe.reads, probe.steps_after, strict=False))[1:-1]  # first: one-time checks; last: end
    return [r for r, s in batches if s % EVERY], trainer


def test_mixin_model_with_diagnostics_reads_no_more_than_a_bare_loop(tmp_path):
    # Lightning itself turns every step-level value logged with prog_bar=True into a host number after each batch;
    # the package must not make it do so, nor anything else, on non-flush steps.
    torch.manual_seed(0)
    bare, _ = all_reads_per_step(tmp_path, PlainRegressor(in_features=4), [])
    torch.manual_seed(0)
    ours, trainer = all_reads_per_step(tmp_path, MixinRegressor(in_features=4), bundle())
    assert len(ours) == len(bare) >= 6
    assert ours == bare
    assert trainer.progress_bar_metrics["train/loss"] == trainer.lossdiag_record.values("train/loss")[-1]


def test_loss_in_progress_bar_costs_one_read_per_step(tmp_path):
    class Shown(MixinRegressor):
        loss_in_progress_bar = True

    torch.manual_seed(0)
    quiet, _ = all_reads_per_step(tmp_path, MixinRegressor(in_features=4), bundle())
    torch.manual_seed(0)
    shown, _ = all_reads_per_step(tmp_path, Shown(in_features=4), bundle())
    assert [s - q for s, q in zip(shown, quiet, strict=True)] == [1] * len(quiet)  # as documented
