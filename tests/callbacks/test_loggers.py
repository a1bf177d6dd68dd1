"""LossDiagnostics works with TensorBoardLogger, CSVLogger, several loggers at once, and none."""

import csv
import warnings

import pytest
from lightning.pytorch import Trainer
from lightning.pytorch.demos.boring_classes import BoringModel
from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from lightning_lossdiag import LossDiagnostics


def _fit(tmp_path, logger):
    diag = LossDiagnostics()
    trainer = Trainer(
        default_root_dir=tmp_path,
        max_epochs=1,
        limit_train_batches=8,
        limit_val_batches=2,
        log_every_n_steps=4,
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
        logger=logger,
        callbacks=[diag],
    )
    trainer.fit(BoringModel())
    return trainer, diag


def _csv_rows(logger):
    with open(f"{logger.log_dir}/metrics.csv") as handle:
        return list(csv.DictReader(handle))


def test_csv_logger_gets_the_flushed_keys_at_the_flush_steps(tmp_path):
    logger = CSVLogger(tmp_path)
    _fit(tmp_path, logger)
    rows = _csv_rows(logger)
    loss_steps = [int(r["step"]) for r in rows if r.get("train/loss")]
    assert loss_steps == [4, 8]
    assert any(r.get("grad/norm_total") for r in rows)


def test_several_loggers_each_get_the_same_values(tmp_path):
    tb, csv_logger = TensorBoardLogger(tmp_path, name="tb"), CSVLogger(tmp_path, name="csv")
    _fit(tmp_path, [tb, csv_logger])
    acc = EventAccumulator(tb.log_dir)
    acc.Reload()
    tb_values = {e.step: e.value for e in acc.Scalars("grad/norm_total")}
    csv_values = {
        int(r["step"]): float(r["grad/norm_total"]) for r in _csv_rows(csv_logger) if r.get("grad/norm_total")
    }
    assert sorted(tb_values) == sorted(csv_values) == [4, 8]
    for step, value in csv_values.items():
        assert tb_values[step] == pytest.approx(value, rel=1e-6)


def test_no_logger_warns_once_and_still_diagnoses(tmp_path):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer, diag = _fit(tmp_path, False)
    no_logger = [w for w in caught if "has no logger" in str(w.message)]
    assert len(no_logger) == 1
    assert trainer.global_step == 8
    assert isinstance(diag.findings, list)
    assert "train/loss" in trainer.lossdiag_record.scalars
