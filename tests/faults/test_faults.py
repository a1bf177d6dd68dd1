"""Faults: an unwritable log folder, no logger at all, and an exception raised inside the user's training step."""

from __future__ import annotations

import json
import math
import os
from types import SimpleNamespace

import lightning as L
import pytest
from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from lightning_lossdiag import LossDiagnostics
from lightning_lossdiag.callbacks._faults import LogDirNotWritableError, check_log_dirs_writable


def _under_a_file(tmp_path):
    """A folder path under a regular file: no process can create it (root included, unlike a chmod'ed folder)."""
    afile = tmp_path / "afile"
    afile.write_text("I am a file, not a folder\n")
    return afile / "logs"


@pytest.mark.parametrize("bad_logger", ["tensorboard", "csv_second"])
def test_unwritable_log_dir_fails_at_fit_start(tmp_path, tiny_classifier, class_loaders, trainer_kwargs, bad_logger):
    bad_dir = _under_a_file(tmp_path)
    if bad_logger == "tensorboard":
        loggers = [TensorBoardLogger(save_dir=str(bad_dir))]
        name, index = "TensorBoardLogger", 0
    else:
        loggers = [TensorBoardLogger(save_dir=str(tmp_path / "ok")), CSVLogger(save_dir=str(bad_dir))]
        name, index = "CSVLogger", 1
    model = tiny_classifier()
    trainer = L.Trainer(
        max_epochs=1, limit_train_batches=4, limit_val_batches=0, logger=loggers, callbacks=[LossDiagnostics()],
        **trainer_kwargs,
    )
    with pytest.raises(LogDirNotWritableError) as excinfo:
        trainer.fit(model, class_loaders[0])
    message = str(excinfo.value)
    assert isinstance(excinfo.value, OSError)
    assert f"{name} (logger {index})" in message
    assert str(bad_dir) in message  # the folder (or its version sub-folder) is named
    assert "Not a directory" in message  # the operating system's reason
    assert isinstance(excinfo.value.__cause__, NotADirectoryError)
    assert model.train_losses == []  # no training step ran
    assert trainer.global_step == 0


def test_log_dir_check_is_silent_and_leaves_nothing_when_writable(tmp_path):
    folder = tmp_path / "runs" / "version_0"
    trainer = SimpleNamespace(is_global_zero=True, loggers=[SimpleNamespace(log_dir=str(folder))])
    check_log_dirs_writable(trainer)
    assert folder.is_dir()
    assert list(folder.iterdir()) == []  # the probe file is removed again


def test_log_dir_check_runs_on_global_rank_zero_only(tmp_path):
    bad = SimpleNamespace(log_dir=str(_under_a_file(tmp_path)))
    check_log_dirs_writable(SimpleNamespace(is_global_zero=False, loggers=[bad]))  # other ranks do not touch disk
    with pytest.raises(LogDirNotWritableError, match="SimpleNamespace"):
        check_log_dirs_writable(SimpleNamespace(is_global_zero=True, loggers=[bad]))


def test_missing_logger_warns_once_and_still_prints_the_diagnosis(
    tiny_classifier, class_loaders, trainer_kwargs, recwarn, capsys
):
    diag = LossDiagnostics(every_n_steps=2)
    trainer = L.Trainer(max_epochs=2, limit_train_batches=4, limit_val_batches=2, logger=False, callbacks=[diag],
                        **trainer_kwargs)
    trainer.fit(tiny_classifier(), *class_loaders)
    about_logger = [str(w.message) for w in recwarn if "no logger" in str(w.message).lower()]
    assert len(about_logger) == 1, about_logger
    assert "LossDiagnostics" in about_logger[0]
    out = capsys.readouterr().out
    assert "lightning-lossdiag" in out  # the Doctor's table title
    assert isinstance(diag.findings, list)
    assert diag.parts["doctor"].report["summary"]["status"] == "finished"
    assert diag.parts["doctor"].report_path is None  # nowhere to write the JSON without a logger


def test_exception_in_training_step_keeps_the_report_of_what_was_seen(
    tmp_path, tiny_classifier, class_loaders, trainer_kwargs
):
    fail_at = 5
    model = tiny_classifier(fail_at_batch=fail_at)
    logger = TensorBoardLogger(save_dir=str(tmp_path))
    trainer = L.Trainer(max_epochs=1, limit_train_batches=8, limit_val_batches=0, logger=logger,
                        callbacks=[LossDiagnostics(every_n_steps=1)], **trainer_kwargs)
    with pytest.raises(RuntimeError, match=f"failed at training batch {fail_at}"):
        trainer.fit(model, class_loaders[0])
    assert len(model.train_losses) == fail_at  # batches 0..N-1 trained, batch N raised

    path = os.path.join(logger.log_dir, "lossdiag_report.json")
    assert os.path.isfile(path)
    with open(path, encoding="utf-8") as fh:
        report = json.load(fh)
    summary = report["summary"]
    assert summary["status"] == "interrupted"
    assert f"failed at training batch {fail_at}" in summary["exception"]
    assert summary["global_step"] == fail_at
    assert summary["last_step"] == fail_at
    assert math.isclose(summary["last"]["train/loss"], model.train_losses[-1], rel_tol=1e-5)
    assert isinstance(report["findings"], list)

    # every step before the failure is in the event file, with the loss the model computed at that step
    events = EventAccumulator(logger.log_dir, size_guidance={"scalars": 0, "tensors": 0})
    events.Reload()
    points = events.Scalars("train/loss")
    assert [p.step for p in points] == list(range(1, fail_at + 1))
    for point, expected in zip(points, model.train_losses, strict=True):
        assert math.isclose(point.value, expected, rel_tol=1e-5)
    assert "diagnosis" in events.Tags()["tensors"]  # the Doctor's text, written on the way out
