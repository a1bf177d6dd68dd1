"""Doctor: run the diagnosis at the end of fit/validate/test and report it (table, TensorBoard text, JSON)."""

from __future__ import annotations

import json
import os
import time
from collections.abc import Mapping
from typing import Any

from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.callbacks import EarlyStopping, ModelCheckpoint
from lightning.pytorch.utilities import rank_zero_warn
from torch import Tensor
from typing_extensions import override

from lightning_lossdiag.callbacks._base import to_host
from lightning_lossdiag.dashboards.hparams import silence_hp_metric_placeholder, write_hparams_session
from lightning_lossdiag.dashboards.writers import log_dirs, tensorboard_writers
from lightning_lossdiag.diagnosis.config import DoctorConfig
from lightning_lossdiag.diagnosis.engine import diagnose
from lightning_lossdiag.diagnosis.findings import Finding
from lightning_lossdiag.diagnosis.record import RunRecord, record_for
from lightning_lossdiag.diagnosis.report import build_report, print_table, to_markdown
from lightning_lossdiag.diagnosis.rules.schedule import mode_mismatch_finding


def merge_record(record: RunRecord, saved: Mapping[str, Any]) -> None:
    """Put a saved record (``RunRecord.state_dict()``) under what ``record`` already holds (resume).

    Saved points come first in each series; notes written in this run win; findings are kept once.

    Example:
        >>> old = RunRecord()
        >>> old.add_scalars(10, {"val_loss": 0.9})
        >>> new = RunRecord()
        >>> new.add_scalars(20, {"val_loss": 0.7})
        >>> merge_record(new, old.state_dict())
        >>> new.series("val_loss")
        [(10, 0.9), (20, 0.7)]
    """
    past = RunRecord()
    past.load_state_dict(dict(saved))
    current = record.scalars
    record.scalars = {}
    for key, points in past.scalars.items():
        for step, value in points:
            record.add_scalars(step, {key: value})
    for key, points in current.items():
        for step, value in points:
            record.add_scalars(step, {key: value})
    record.notes = {**past.notes, **record.notes}
    findings, record.findings = record.findings, []
    for f in [*past.findings, *findings]:
        record.add_finding(f)


def _is_scalar(value: Any) -> bool:
    if isinstance(value, Tensor):
        return value.numel() == 1
    return isinstance(value, (int, float)) and not isinstance(value, bool)


class Doctor(Callback):
    """Diagnose the run at the end of fit/validate/test: findings with stable codes, printed and saved.

    During the run the Doctor copies the metrics the user logs (``trainer.callback_metrics``: ``val_acc``,
    ``val/loss``, ``train_loss_epoch``, ...) into the run record once per epoch, after Lightning has computed the
    epoch values: at ``on_validation_end`` (values of validation steps and of ``on_validation_epoch_end``), at the
    next ``on_train_epoch_start`` and at ``on_train_end`` (values of training steps and of the module's
    ``on_train_epoch_end``), and when a checkpoint is saved. The step is ``trainer.global_step``; a value not updated
    since the last copy is not copied again. Keys another callback already writes to the record are left to it. At
    fit start it notes the ``monitor``/``mode`` of every EarlyStopping and ModelCheckpoint and checks the mode
    against the metric.

    At the end of fit, validate or test (also when the run raises: ``on_exception``) it runs every rule
    (:func:`~lightning_lossdiag.diagnosis.engine.diagnose`) and, on global rank 0:

    * prints a table (severity, code, step, message) when ``print_report``;
    * writes the markdown table as TensorBoard text ``diagnosis``;
    * writes ``json_name`` (findings, summary numbers, versions) into the first logger's log dir
      (nothing is written without a logger; ``self.report`` still holds it);
    * at the end of fit, when ``hparams_session``: writes the run's TensorBoard HParams session (its
      hyperparameters, the final and best value of each metric, the finding counts) into
      ``<log dir>/lossdiag_hparams`` of each TensorBoard logger, so the HParams tab compares runs (see
      :mod:`lightning_lossdiag.dashboards.hparams`). It then also turns off the ``hp_metric = -1`` placeholder of
      Lightning's ``TensorBoardLogger`` at ``setup``.

    ``self.findings`` holds the findings. The checkpoint carries the run record and the findings, so a resumed run
    reports what it saw before the restart too. (A checkpoint saved at validation end, Lightning's default when there
    is validation, is written before the module's ``on_train_epoch_end`` of that epoch, so values logged there for
    that one epoch are not in it.)

    | key | when | meaning |
    |---|---|---|
    | ``diagnosis`` (text) | end of fit/validate/test, exception | markdown table of the findings |
    | ``<user keys>`` (run record only) | epoch end | ``trainer.callback_metrics`` copied for the rules |
    | ``final/<metric>``, ``best/<metric>``, ``findings/<severity>`` | end of fit | HParams columns (sub-run) |

    Args:
        config: thresholds of the rules: a :class:`DoctorConfig`, a mapping of its fields, or ``None`` (defaults).
        print_report: print the table to stdout at the end.
        json_name: file name of the JSON report in the log dir.
        hparams_session: write the TensorBoard HParams session at the end of fit (and silence Lightning's placeholder).

    Example:
        >>> Doctor(config={"plateau_epochs": 10}).config.plateau_epochs
        10
    """

    def __init__(
        self,
        config: DoctorConfig | Mapping[str, Any] | None = None,
        print_report: bool = True,
        json_name: str = "lossdiag_report.json",
        hparams_session: bool = True,
    ) -> None:
        if not isinstance(print_report, bool):
            raise ValueError(f"`print_report` must be True or False, got {print_report!r}")
        if not isinstance(json_name, str) or not json_name.strip() or os.sep in json_name:
            raise ValueError(f"`json_name` must be a non-empty file name (no folder), got {json_name!r}")
        if not isinstance(hparams_session, bool):
            raise ValueError(f"`hparams_session` must be True or False, got {hparams_session!r}")
        self.config = DoctorConfig.from_value(config)
        self.print_report = print_report
        self.json_name = json_name
        self.hparams_session = hparams_session
        self._fit_started: float | None = None
        self.findings: list[Finding] = []
        self.report: dict[str, Any] = {}
        self.report_path: str | None = None
        self._record: RunRecord | None = None
        self._pending: dict[str, Any] | None = None
        self._seen: dict[str, Any] = {}
        self._own_keys: set[str] = set()
        self._reported = False

    @property
    @override
    def state_key(self) -> str:
        return self._generate_state_key(json_name=self.json_name)

    # ---- attaching to a Trainer --------------------------------------------------------------------------------
    def _attach(self, trainer: Trainer) -> RunRecord:
        record = record_for(trainer)
        if record is not self._record:
            self._record = record
            self._seen, self._own_keys = {}, set()
        if self._pending is not None:
            merge_record(record, self._pending.get("record", {}))
            self._own_keys.update(self._pending.get("own_keys", []))
            self._pending = None
        return record

    def _note_monitors(self, trainer: Trainer, record: RunRecord) -> None:
        monitors = []
        for cb in trainer.callbacks:  # type: ignore[attr-defined]
            if isinstance(cb, (EarlyStopping, ModelCheckpoint)) and getattr(cb, "monitor", None):
                name, mode = type(cb).__name__, getattr(cb, "mode", None)
                monitors.append({"callback": name, "monitor": str(cb.monitor), "mode": mode})
                found = mode_mismatch_finding(name, str(cb.monitor), mode)
                if found is not None:
                    record.add_finding(found)
        record.notes["callbacks/monitors"] = monitors

    @override
    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        if self.hparams_session:  # before Lightning logs the hyperparameters: our session carries the real metrics
            silence_hp_metric_placeholder(trainer)

    @override
    def on_fit_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._reported = False
        self._fit_started = time.time()
        self._note_monitors(trainer, self._attach(trainer))

    @override
    def on_validation_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if not trainer.training and trainer.state.fn == "validate":
            self._reported = False
            self._attach(trainer)

    @override
    def on_test_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._reported = False
        self._attach(trainer)

    # ---- copying the user's logged values ------------------------------------------------------------------------
    def _capture(self, trainer: Trainer) -> None:
        if trainer.sanity_checking:
            return
        record = self._attach(trainer)
        fresh: dict[str, Any] = {}
        for key, value in trainer.callback_metrics.items():
            if self._seen.get(key) is value or not _is_scalar(value):
                continue
            if key in record.scalars and key not in self._own_keys:
                continue  # another callback writes this key to the record itself
            fresh[key] = value
        seen = set(record.notes.get("doctor/callback_metrics", [])) | set(trainer.callback_metrics)
        record.notes["doctor/callback_metrics"] = sorted(seen)
        if not fresh:
            return
        self._seen.update(fresh)
        values = to_host(fresh)  # epoch end (or checkpoint save): one host transfer for every captured value
        record.add_scalars(int(trainer.global_step), values)
        self._own_keys.update(values)

    @override
    def on_validation_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._capture(trainer)
        if trainer.state.fn == "validate":
            self._report(trainer, status="finished")

    @override
    def on_train_epoch_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._capture(trainer)

    @override
    def on_train_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._capture(trainer)
        self._note_early_stopping(trainer, self._attach(trainer))

    @staticmethod
    def _note_early_stopping(trainer: Trainer, record: RunRecord) -> None:
        """Note every EarlyStopping that ended the run: the fit rules then say the problem was already handled."""
        stopped = [
            {"monitor": str(cb.monitor), "stopped_epoch": int(cb.stopped_epoch)}
            for cb in trainer.callbacks  # type: ignore[attr-defined]
            if isinstance(cb, EarlyStopping) and int(getattr(cb, "stopped_epoch", 0) or 0) > 0
        ]
        if stopped:
            record.notes["callbacks/early_stopped"] = stopped

    @override
    def on_test_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._capture(trainer)
        self._report(trainer, status="finished")

    @override
    def on_fit_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._report(trainer, status="finished")

    @override
    def on_save_checkpoint(self, trainer: Trainer, pl_module: LightningModule, checkpoint: dict[str, Any]) -> None:
        # A checkpoint saved at the end of a training epoch is written before the next copy point: copy the epoch's
        # values now and put the updated record into the checkpoint (Lightning took our state_dict just before).
        self._capture(trainer)
        states = checkpoint.get("callbacks")
        if isinstance(states, dict) and self.state_key in states:
            states[self.state_key] = self.state_dict()

    @override
    def on_exception(self, trainer: Trainer, pl_module: LightningModule, exception: BaseException) -> None:
        self._report(trainer, status="interrupted", exception=exception)

    @override
    def teardown(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        self._seen = {}  # drop references to the Trainer's metric tensors

    # ---- the report ----------------------------------------------------------------------------------------------
    def _report(self, trainer: Trainer, status: str, exception: BaseException | None = None) -> None:
        if self._reported:
            return
        self._reported = True
        record = self._attach(trainer)
        self.findings = diagnose(record, self.config)
        extra: dict[str, Any] = {
            "stage": str(getattr(trainer.state.fn, "value", trainer.state.fn)),
            "status": status,
            "global_step": int(trainer.global_step),
            "epochs": int(trainer.current_epoch),
        }
        if exception is not None:
            extra["exception"] = f"{type(exception).__name__}: {exception}"
        self.report = build_report(self.findings, record, extra)
        if not trainer.is_global_zero:
            return
        try:
            self._write(trainer)
        except OSError as err:  # never crash the end of a run because a report could not be written
            rank_zero_warn(f"Doctor: could not write the diagnosis report: {err}")

    def _write(self, trainer: Trainer) -> None:
        if self.print_report:
            print_table(self.findings)
        for writer in tensorboard_writers(trainer):
            writer.add_text("diagnosis", to_markdown(self.findings), global_step=int(trainer.global_step))
            writer.flush()
        dirs = log_dirs(trainer)
        if not dirs:
            return
        os.makedirs(dirs[0], exist_ok=True)
        path = os.path.join(dirs[0], self.json_name)
        with open(path, "w", encoding="utf-8") as fh:
            json.dump(self.report, fh, indent=2, default=str)
        self.report_path = path
        if self.hparams_session and self.report["summary"].get("stage") == "fit" and self._record is not None:
            severities = [f.severity for f in self.findings]
            failed = self.report["summary"].get("status") != "finished"
            write_hparams_session(trainer, self._record.scalars, severities, self._fit_started, failed=failed)

    # ---- state ---------------------------------------------------------------------------------------------------
    @override
    def state_dict(self) -> dict[str, Any]:
        """Plain data: the run record, the keys this Doctor copied into it, and the last findings."""
        if self._pending is not None:
            record_state = self._pending.get("record", {})
            own = sorted(self._pending.get("own_keys", []))
        else:
            record_state = self._record.state_dict() if self._record is not None else {}
            own = sorted(self._own_keys)
        return {"record": record_state, "own_keys": own, "findings": [f.to_dict() for f in self.findings]}

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Keep the saved record until the next fit/validate/test starts, then merge it into the Trainer's record."""
        self._pending = {"record": state_dict.get("record", {}), "own_keys": list(state_dict.get("own_keys", []))}
        self.findings = [Finding.from_dict(d) for d in state_dict.get("findings", [])]


__all__ = ["Doctor", "merge_record"]
