"""Faults: an unwritable log folder, no logger at all, and an exception raised inside the user's training step."""

from __future__ import annotations

import json
import math
import os
from types import SimpleNamespace

import lightning as L
import pytest
from lightning.pytorch.loggers import Logger, TensorBoardLogger
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from lightning_lossdiag import LossDiagnostics
from lightning_lossdiag.callbacks._faults import (
    LogDirNotWritableError,
    check_log_dirs_writable,
    explain_log_dir_error,
)


def _under_a_file(tmp_path):
    """A folder path under a regular file: no process can create it (root included, unlike a chmod'ed folder)."""
    afile = tmp_path / "afile"
    afile.write_text("I am a file, not a folder\n")
    return afile / "logs"


class SummaryFileLogger(Logger):
    """A logger that keeps metrics in memory and writes them to ``log_dir`` when the run finishes successfully.

    Lightning never touches its folder before that (``experiment`` is not a folder), so without a check at fit start
    an unwritable folder is only found after the whole run trained.
    """

    def __init__(self, save_dir):
        super().__init__()
        self._save_dir = str(save_dir)
        self.metrics: list[tuple[int, dict]] = []

    @property
    def name(self):
        return "summary"

    @property
    def version(self):
        return 0

    @property
    def log_dir(self):
        return os.path.join(self._save_dir, "summary")

    def log_hyperparams(self, params, *args, **kwargs):
        pass

    def log_metrics(self, metrics, step=None):
        self.metrics.append((step, dict(metrics)))

    def finalize(self, status):
        if status == "success":
            os.makedirs(self.log_dir, exist_ok=True)
            with open(os.path.join(self.log_dir, "metrics.json"), "w", encoding="utf-8") as fh:
                json.dump(self.metrics, fh)


def _fit_with(loggers, callbacks, model, loader, trainer_kwargs):
    trainer = L.Trainer(
        max_epochs=1, limit_train_batches=4, limit_val_batches=0, logger=loggers, callbacks=callbacks, **trainer_kwargs
    )
    trainer.fit(model, loader)
    return trainer


def test_unwritable_log_dir_fails_at_fit_start_not_after_training(
    tmp_path, tiny_classifier, class_loaders, trainer_kwargs
):
    bad_dir = _under_a_file(tmp_path)

    # without the check, this logger's folder is first written when the run finishes: every step trains first
    late = tiny_classifier()
    with pytest.raises(NotADirectoryError):
        _fit_with([SummaryFileLogger(bad_dir)], [], late, class_loaders[0], trainer_kwargs)
    assert len(late.train_losses) == 4

    # with LossDiagnostics the same folder fails in `setup`, before the first step, and the message says why
    model = tiny_classifier()
    loggers = [TensorBoardLogger(save_dir=str(tmp_path / "ok")), SummaryFileLogger(bad_dir)]
    trainer = L.Trainer(
        max_epochs=1,
        limit_train_batches=4,
        limit_val_batches=0,
        logger=loggers,
        callbacks=[LossDiagnostics()],
        **trainer_kwargs,
    )
    with pytest.raises(LogDirNotWritableError) as excinfo:
        trainer.fit(model, class_loaders[0])
    message = str(excinfo.value)
    assert isinstance(excinfo.value, OSError)
    assert "SummaryFileLogger (logger 1)" in message  # the logger, by class and position
    assert repr(os.path.join(str(bad_dir), "summary")) in message  # the folder
    assert "`log_dir`" in message
    assert "NotADirectoryError: Not a directory" in message  # the operating system's reason
    assert isinstance(excinfo.value.__cause__, NotADirectoryError)
    assert model.train_losses == []  # no training step ran
    assert trainer.global_step == 0


def test_tensorboard_folder_under_a_file_fails_before_any_step_and_is_explained(
    tmp_path, tiny_classifier, class_loaders, trainer_kwargs
):
    # Lightning creates the TensorBoard folder (`logger.experiment`) before any callback's `setup`, so the bare
    # file-system error comes first; `explain_log_dir_error` (for `on_exception`) names the logger and the folder.
    bad_dir = _under_a_file(tmp_path)
    model = tiny_classifier()
    logger = TensorBoardLogger(save_dir=str(bad_dir))
    trainer = L.Trainer(
        max_epochs=1,
        limit_train_batches=4,
        limit_val_batches=0,
        logger=logger,
        callbacks=[LossDiagnostics()],
        **trainer_kwargs,
    )
    with pytest.raises(OSError, match="Not a directory") as excinfo:
        trainer.fit(model, class_loaders[0])
    assert model.train_losses == []
    assert trainer.global_step == 0
    error = excinfo.value
    error.__notes__ = []  # judge what the function adds on its own
    assert explain_log_dir_error(trainer, error)
    (note,) = error.__notes__
    assert note.startswith("lightning-lossdiag: TensorBoardLogger (logger 0) cannot write to its log folder")
    assert str(bad_dir) in note
    assert "Not a directory" in note


def test_loss_diagnostics_explains_a_tensorboard_folder_it_cannot_create(
    tmp_path, tiny_classifier, class_loaders, trainer_kwargs
):
    bad_dir = _under_a_file(tmp_path)
    trainer = L.Trainer(
        max_epochs=1,
        limit_train_batches=4,
        limit_val_batches=0,
        logger=TensorBoardLogger(save_dir=str(bad_dir)),
        callbacks=[LossDiagnostics()],
        **trainer_kwargs,
    )
    with pytest.raises(NotADirectoryError) as excinfo:
        trainer.fit(tiny_classifier(), class_loaders[0])
    notes = getattr(excinfo.value, "__notes__", [])
    assert any("TensorBoardLogger (logger 0) cannot write" in n and str(bad_dir) in n for n in notes)


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


def test_log_dir_check_skips_remote_and_missing_folders():
    loggers = [SimpleNamespace(save_dir="s3://bucket/runs"), SimpleNamespace(log_dir=None), object()]
    check_log_dirs_writable(SimpleNamespace(is_global_zero=True, loggers=loggers))  # nothing local to probe


def test_missing_logger_warns_once_and_still_prints_the_diagnosis(
    tiny_classifier, class_loaders, trainer_kwargs, recwarn, capsys
):
    diag = LossDiagnostics(every_n_steps=2)
    trainer = L.Trainer(
        max_epochs=2, limit_train_batches=4, limit_val_batches=2, logger=False, callbacks=[diag], **trainer_kwargs
    )
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
    trainer = L.Trainer(
        max_epochs=1,
        limit_train_batches=8,
        limit_val_batches=0,
        logger=logger,
        callbacks=[LossDiagnostics(every_n_steps=1)],
        **trainer_kwargs,
    )
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
    assert any(t.startswith("diagnosis") for t in events.Tags()["tensors"])  # the Doctor's text, written on the way out


def _rank_checks_log_dir(rank: int, bad_dir: str, store: str, results: str) -> None:
    import torch.distributed as dist
    from lightning.pytorch.strategies import DDPStrategy

    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=2)
    try:
        # only rank 0 looks at the disk; rank 1's logger would be fine, so rank 1 stops only if told by rank 0
        logger = SimpleNamespace(log_dir=bad_dir if rank == 0 else os.path.join(results, "fine"))
        trainer = SimpleNamespace(is_global_zero=rank == 0, world_size=2, strategy=DDPStrategy(), loggers=[logger])
        try:
            check_log_dirs_writable(trainer)
            outcome = "returned"
        except LogDirNotWritableError as err:
            outcome = f"raised: {err}"
        with open(os.path.join(results, f"rank{rank}.txt"), "w", encoding="utf-8") as fh:
            fh.write(outcome)
        dist.barrier()
    finally:
        dist.destroy_process_group()


@pytest.mark.ddp
def test_log_dir_verdict_of_rank_zero_reaches_every_rank(tmp_path):
    import torch.multiprocessing as mp

    bad_dir = str(_under_a_file(tmp_path))
    results = tmp_path / "results"
    results.mkdir()
    ctx = mp.start_processes(
        _rank_checks_log_dir,
        args=(bad_dir, str(tmp_path / "store"), str(results)),
        nprocs=2,
        join=False,
        start_method="fork",
    )
    try:
        for _ in range(12):  # at most 12 x 10 s
            if ctx.join(timeout=10):
                break
        else:
            pytest.fail("the two ranks did not finish")
    finally:
        for proc in ctx.processes:
            if proc.is_alive():
                proc.terminate()
    outcomes = {r: (results / f"rank{r}.txt").read_text() for r in (0, 1)}
    for outcome in outcomes.values():
        assert outcome.startswith("raised: SimpleNamespace (logger 0) cannot write to its log folder"), outcomes
        assert bad_dir in outcome
    assert not (results / "fine").exists()  # rank 1 never touched its own folder
