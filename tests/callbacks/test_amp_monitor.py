"""fp16 loss scaling on the CPU (Lightning's MixedPrecision with a CPU GradScaler) and, where there is one, on CUDA
(``precision="16-mixed"``): skipped steps are counted and logged, never reported as non-finite gradients nor dropped
a second time, and a collapsing scale is a finding."""

import importlib.util
from pathlib import Path

import lightning as L
import pytest
import torch
from lightning.pytorch import Callback
from lightning.pytorch.loggers import TensorBoardLogger
from lightning.pytorch.plugins import MixedPrecision
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_lossdiag import AmpMonitor, LossDiagnostics
from lightning_lossdiag.diagnosis.config import DoctorConfig
from lightning_lossdiag.diagnosis.record import RunRecord, record_for
from lightning_lossdiag.diagnosis.rules.amp import amp_scale_collapse

_spec = importlib.util.spec_from_file_location("lossdiag_host_reads", Path(__file__).with_name("test_host_reads.py"))
_reads = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_reads)

STEPS, EVERY = 30, 5
DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA"))]


class Classifier(L.LightningModule):
    def __init__(self, loss_factor=1.0):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(8, 32), nn.ReLU(), nn.Linear(32, 3))
        self.loss_factor = loss_factor

    def training_step(self, batch, batch_idx):
        x, y = batch
        return nn.functional.cross_entropy(self.net(x), y) * self.loss_factor

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.05)


class UpdateCounter(Callback):
    """Counts the optimizer steps that really changed the weights (a skipped step leaves them as they were)."""

    def __init__(self):
        self.before, self.applied, self.skipped = None, 0, 0

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.before = [p.detach().clone() for p in pl_module.parameters()]

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        changed = any(not torch.equal(a, p) for a, p in zip(self.before, pl_module.parameters(), strict=True))
        self.applied += changed
        self.skipped += not changed


def loader():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(STEPS * 16, 8, generator=g)
    return DataLoader(TensorDataset(x, (x[:, 0] > 0).long() + (x[:, 1] > 0).long()), batch_size=16)


def fp16_fit(tmp_path, loss_factor=1.0, init_scale=2.0**24, callbacks=None, device="cpu"):
    counter = UpdateCounter()
    diag = LossDiagnostics(activations=False) if callbacks is None else None
    trainer = L.Trainer(
        max_epochs=1,
        accelerator=device,
        devices=1,
        log_every_n_steps=EVERY,
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
        limit_val_batches=0,
        logger=TensorBoardLogger(tmp_path, name="", version=""),
        plugins=[MixedPrecision("16-mixed", device, scaler=torch.amp.GradScaler(device, init_scale=init_scale))],
        callbacks=[counter, *(callbacks if callbacks is not None else [diag])],
    )
    torch.manual_seed(0)
    trainer.fit(Classifier(loss_factor), loader())
    return trainer, diag, counter


@pytest.mark.slow
@pytest.mark.parametrize("device", DEVICES)
def test_a_backing_off_scaler_is_counted_not_reported(tmp_path, device):
    # a start at 2**24 overflows fp16: the scaler skips the first steps and halves the scale until it fits
    trainer, diag, counter = fp16_fit(tmp_path, device=device)
    record = trainer.lossdiag_record
    skipped = record.values("amp/skipped_steps")
    assert 1 <= counter.skipped < STEPS // 2
    assert counter.applied == STEPS - counter.skipped
    assert skipped[-1] == counter.skipped  # the count equals the steps whose weights really stayed put
    assert record.values("amp/scale")[-1] == 2.0**24 / 2**counter.skipped  # halved once per skipped step
    codes = {f.code for f in diag.findings}
    assert not codes & {"nonfinite_grad", "nonfinite_loss", "amp_scale_collapse"}, codes
    assert record.values("grad/nonfinite_count")[-1] == 0
    assert record.values("nonfinite/skipped_steps")[-1] == 0  # the guard left the skipping to the scaler
    params_finite = all(torch.isfinite(p).all() for p in trainer.lightning_module.parameters())
    assert params_finite


@pytest.mark.slow
@pytest.mark.parametrize("device", DEVICES)
def test_a_scale_that_keeps_collapsing_is_a_finding(tmp_path, device):
    # a loss a trillion times too large overflows fp16 at every scale the run reaches: every step is skipped
    trainer, diag, counter = fp16_fit(tmp_path, loss_factor=1e12, init_scale=2.0**16, device=device)
    assert counter.applied == 0
    found = {f.code: f for f in diag.findings}
    assert "amp_scale_collapse" in found, sorted(found)
    assert "nonfinite_grad" not in found
    assert found["amp_scale_collapse"].evidence["skipped"] == STEPS
    assert "bf16-mixed" in found["amp_scale_collapse"].message


@pytest.mark.slow
def test_without_a_scaler_nothing_is_logged(tmp_path):
    trainer = L.Trainer(
        max_epochs=1,
        accelerator="cpu",
        log_every_n_steps=EVERY,
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
        logger=TensorBoardLogger(tmp_path, name="", version=""),
        callbacks=[AmpMonitor()],
    )
    trainer.fit(Classifier(), loader())
    assert record_for(trainer).keys("amp/") == []


@pytest.mark.slow
@pytest.mark.parametrize("device", DEVICES)
def test_no_host_reads_between_flushes_under_fp16(tmp_path, device):
    # the scaler reads its own verdict every step (torch's GradScaler.step); the package reads nothing (on CUDA:
    # set_sync_debug_mode("error") around every hook of the package)
    check = _reads.no_host_reads if device == "cpu" else _reads.cuda_sync_errors
    guard = _reads.SyncGuard([LossDiagnostics()], check)
    trainer = L.Trainer(
        max_epochs=1,
        limit_train_batches=13,
        limit_val_batches=0,
        log_every_n_steps=_reads.EVERY,
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
        logger=TensorBoardLogger(tmp_path, name="", version=""),
        accelerator=device,
        devices=1,
        plugins=[MixedPrecision("16-mixed", device, scaler=torch.amp.GradScaler(device, init_scale=2.0**24))],
        callbacks=[guard],
    )
    trainer.fit(_reads.DeepMLP(3))
    assert guard.guarded_calls == 9 * 6
    assert trainer.lossdiag_record.values("amp/scale")


@pytest.mark.parametrize(
    ("points", "fires"),
    [
        ([(10, 2.0**12, 4), (20, 2.0**12, 4), (30, 2.0**13, 4)], False),  # settled after 4 early skips
        ([(10, 2.0**2, 9), (20, 2.0**-8, 19), (30, 2.0**-18, 29)], True),  # below 1 and still halving
        ([(10, 8.0, 3), (20, 8.0, 8), (30, 8.0, 13)], True),  # half of the late steps skipped: fires at the edge
        ([(10, 8.0, 3), (20, 8.0, 7), (30, 8.0, 11)], False),  # 4 of 10 late steps: under the share
        ([(10, 0.5, 0)], True),  # a scale under 1 at the only flush
    ],
    ids=["settled", "collapsing", "half_skipped", "under_share", "below_one"],
)
def test_amp_scale_collapse_rule_at_its_edges(points, fires):
    record = RunRecord()
    for step, scale, skipped in points:
        record.add_scalars(step, {"amp/scale": scale, "amp/skipped_steps": skipped})
    assert bool(amp_scale_collapse(record, DoctorConfig())) == fires


def test_amp_monitor_state_round_trips():
    monitor = AmpMonitor()
    monitor.load_state_dict({"skipped_steps": 7})
    assert monitor.state_dict() == {"skipped_steps": 7}
    assert AmpMonitor().state_dict() == {"skipped_steps": 0}
