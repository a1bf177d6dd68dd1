"""Offline diagnosis of event files: load_run and `lossdiag report RUN_DIR [--json]`."""

import json
import os

import lightning as L
import pytest
import torch
from lightning.pytorch import Trainer
from lightning.pytorch.loggers import TensorBoardLogger
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_lossdiag.callbacks.doctor import Doctor
from lightning_lossdiag.diagnosis.offline import RunDirError, canonical_names, find_runs, load_run, report_main

NAN_BATCH = 5


class PlainModule(L.LightningModule):
    """A plain Lightning module that knows nothing of lightning_lossdiag: logs `train_loss` and `val_loss`."""

    def __init__(self, nan_batch=None):
        super().__init__()
        self.net = nn.Linear(4, 1)
        self.nan_batch = nan_batch

    def training_step(self, batch, batch_idx):
        x, y = batch
        if batch_idx == self.nan_batch and self.current_epoch == 0:
            x = x * float("nan")
        loss = nn.functional.mse_loss(self.net(x).squeeze(-1), y)
        self.log("train_loss", loss)
        return loss

    def validation_step(self, batch, batch_idx):
        x, y = batch
        self.log("val_loss", nn.functional.mse_loss(self.net(x).squeeze(-1), y))

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.05)


def run(tmp_path, callbacks=(), nan_batch=None, version=None):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(128, 4, generator=g)
    y = x.sum(1)
    logger = TensorBoardLogger(tmp_path, name="logs", version=version)
    trainer = Trainer(
        default_root_dir=tmp_path,
        max_epochs=2,
        limit_train_batches=8,
        limit_val_batches=2,
        log_every_n_steps=1,
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
        accelerator="cpu",
        devices=1,
        logger=logger,
        callbacks=list(callbacks),
    )
    trainer.fit(
        PlainModule(nan_batch),
        DataLoader(TensorDataset(x, y), batch_size=16),
        DataLoader(TensorDataset(x[:32], y[:32]), batch_size=16),
    )
    return trainer.logger.log_dir


def read(log_dir, tag):
    acc = EventAccumulator(str(log_dir), size_guidance={"scalars": 0})
    acc.Reload()
    return [(e.step, e.value) for e in acc.Scalars(tag)]


def test_canonical_names_prefer_ours_and_keep_the_rest():
    assert canonical_names(["train/loss", "train_loss", "val_loss"]) == {
        "train/loss": "train/loss",
        "train_loss": "train_loss",
        "val_loss": "val/loss",
    }


def test_plain_module_run_is_read_under_our_names(tmp_path):
    log_dir = run(tmp_path)
    record = load_run(log_dir)
    assert record.series("train/loss") == read(log_dir, "train_loss")
    assert record.series("val/loss") == read(log_dir, "val_loss")
    assert record.notes["offline/run_dirs"] == [log_dir]


def test_nan_in_a_plain_run_is_found_offline_at_its_logged_step(tmp_path, capsys):
    log_dir = run(tmp_path, nan_batch=NAN_BATCH)
    logged = read(log_dir, "train_loss")
    first_nan = next(s for s, v in logged if v != v)
    assert report_main([str(log_dir), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    f = next(f for f in report["findings"] if f["code"] == "nonfinite_loss")
    assert f["step"] == first_nan
    assert f["severity"] == "error"
    assert report["summary"]["epochs"] == 2
    assert report["summary"]["last"]["train/loss"] == "nan"  # JSON has no NaN: written as a string


def test_report_prints_the_table_for_a_run_with_our_callbacks(tmp_path, capsys):
    from lightning_lossdiag.callbacks.gradient_monitor import GradientMonitor
    from lightning_lossdiag.callbacks.loss_monitor import LossMonitor

    callbacks = [LossMonitor(every_n_steps=2), GradientMonitor(every_n_steps=2), Doctor(print_report=False)]
    log_dir = run(tmp_path, callbacks=callbacks, nan_batch=NAN_BATCH)
    capsys.readouterr()
    assert report_main([log_dir]) == 0
    out = capsys.readouterr().out
    assert "nonfinite_loss" in out
    assert "nonfinite_grad" in out
    assert "error" in out
    assert "diagnosis" in out
    record = load_run(log_dir)
    norms = read(log_dir, "grad/norm_total")
    first_bad = next(s for s, v in norms if v != v or abs(v) == float("inf"))
    assert record.series("grad/norm_total")[0] == norms[0]
    assert report_main([log_dir, "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert next(f for f in report["findings"] if f["code"] == "nonfinite_grad")["step"] == first_bad


def test_latest_run_is_read_unless_merge(tmp_path, capsys):
    old = run(tmp_path, version=0)
    new = run(tmp_path, nan_batch=NAN_BATCH, version=1)
    os.utime(next(p for p in os.scandir(old) if p.name.startswith("events")).path, (1, 1))  # make version_0 older
    root = tmp_path / "logs"
    assert [str(p) for p in find_runs(root)] == [old, new]
    assert report_main([str(root), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["summary"]["run_dirs"] == [new]
    assert report["summary"]["other_runs"] == [old]
    assert "nonfinite_loss" in [f["code"] for f in report["findings"]]
    merged = load_run(root, pick="merge")
    n_old, n_new = len(read(old, "val_loss")), len(read(new, "val_loss"))
    assert len(merged.series("val/loss")) == len({s for s, _ in read(old, "val_loss") + read(new, "val_loss")})
    assert n_old == n_new == 2


def test_empty_missing_or_file_exits_2_with_a_message(tmp_path, capsys):
    empty = tmp_path / "empty"
    empty.mkdir()
    assert report_main([str(empty)]) == 2
    assert "no TensorBoard event files" in capsys.readouterr().err
    assert report_main([str(tmp_path / "nope")]) == 2
    assert "does not exist" in capsys.readouterr().err
    afile = tmp_path / "f.txt"
    afile.write_text("x")
    assert report_main([str(afile), "--json"]) == 2
    assert "folder" in capsys.readouterr().err
    with pytest.raises(RunDirError):
        load_run(empty)
    with pytest.raises(ValueError, match="pick"):
        load_run(empty, pick="first")


def test_missing_argument_is_a_usage_error(capsys):
    assert report_main([]) == 2
    assert "usage" in capsys.readouterr().err
