"""The run's TensorBoard HParams session: hyperparameters, final and best metrics and finding counts, per run.

How TensorBoard's HParams plugin builds its table (``tensorboard.plugins.hparams.backend_context``): it takes the
*first* experiment summary (tag ``_hparams_/experiment``) it finds in any run, and that one summary fixes the columns
of every run; runs that logged other keys lose them. Lightning's ``TensorBoardLogger.log_hyperparams`` writes such a
summary in every run, with the placeholder metric ``hp_metric = -1``. Without any experiment summary the plugin
builds the columns from all runs instead: the hyperparameters of every session start (a union, with their types
and ``differs`` flags) and every scalar tag of every session run (the value shown is the last one).

So each run writes its session, and no experiment summary, into a sub-run of its own log dir,
``<log_dir>/lossdiag_hparams`` (as torch's ``SummaryWriter.add_hparams`` does, so the run's other scalars do not
become columns):

* a session start (``_hparams_/session_start_info``): the run's configuration (LightningCLI's ``config.yaml``, else
  ``hparams.yaml``, flattened to dotted keys, see :func:`~lightning_lossdiag.diagnosis.outcome.read_run_config`)
  plus the Trainer's and first optimizer's settings that the files do not hold (``trainer.max_epochs``,
  ``trainer.precision``, ``optimizer.class_path``, ``optimizer.init_args.lr``, ...);
* one scalar per column at the last step: ``final/<metric>`` and ``best/<metric>`` for every metric of the run
  record (:func:`~lightning_lossdiag.diagnosis.outcome.is_metric_key`; best only when the name says min or max) and
  ``findings/info``, ``findings/warning``, ``findings/error``, ``findings/total``;
* a session end (``_hparams_/session_end_info``): success, or failure when the fit raised.

The HParams tab then lists one row per run, with the union of every run's hyperparameters and metric columns.
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from lightning_lossdiag.diagnosis.outcome import (
    SESSION_DIR,
    MetricOutcome,
    finding_counts,
    metric_outcomes,
    read_run_config,
)

HParamValue = bool | float | str


def hparam_value(value: Any) -> HParamValue | None:
    """A value as TensorBoard's HParams plugin holds it: bool, float or string; ``None`` to leave it out.

    Example:
        >>> [hparam_value(v) for v in [True, 3, 0.1, "adam", None, float("nan"), [1, 2], {}]]
        [True, 3.0, 0.1, 'adam', None, 'nan', '[1, 2]', '{}']
    """
    if value is None:
        return None
    if isinstance(value, bool):
        return value
    if isinstance(value, (int, float)):
        return float(value) if math.isfinite(value) else str(float(value))
    if isinstance(value, str):
        return value
    numel = getattr(value, "numel", None)  # a tensor: a one-value tensor is its number (end of fit: host read is fine)
    if callable(numel) and numel() == 1:
        return hparam_value(value.item())
    return str(value)


def trainer_facts(trainer: Any) -> dict[str, Any]:
    """Settings of the Trainer and of its first optimizer, under LightningCLI's names.

    ``trainer.max_epochs``, ``trainer.precision``, ``trainer.accumulate_grad_batches``, ``trainer.gradient_clip_val``,
    ``optimizer.class_path`` and the optimizer's ``lr``, ``weight_decay`` and ``momentum`` defaults as
    ``optimizer.init_args.<name>`` (the values it was built with, not a scheduler's later ones).
    """
    facts: dict[str, Any] = {}
    for name in ("max_epochs", "precision", "accumulate_grad_batches", "gradient_clip_val"):
        facts[f"trainer.{name}"] = getattr(trainer, name, None)
    optimizers = list(getattr(trainer, "optimizers", None) or [])
    if optimizers:
        opt = optimizers[0]
        facts["optimizer.class_path"] = f"{type(opt).__module__}.{type(opt).__qualname__}"
        defaults = getattr(opt, "defaults", {}) or {}
        for name in ("lr", "weight_decay", "momentum"):
            if name in defaults:
                facts[f"optimizer.init_args.{name}"] = defaults[name]
    return facts


def session_hparams(config: Mapping[str, Any], facts: Mapping[str, Any]) -> dict[str, HParamValue]:
    """The session's hyperparameters: the configuration, then each fact whose key it lacks (or holds as null).

    Example:
        >>> session_hparams({"model.lr": 0.1, "trainer.precision": None}, {"trainer.precision": "32-true"})
        {'model.lr': 0.1, 'trainer.precision': '32-true'}
    """
    out: dict[str, HParamValue] = {}
    for source in (config, facts):
        for key, value in source.items():
            converted = hparam_value(value)
            if converted is not None and key not in out:
                out[key] = converted
    return out


def session_values(outcomes: Mapping[str, MetricOutcome], severities: Iterable[str]) -> dict[str, float]:
    """The metric columns of a session: ``final/<key>``, ``best/<key>`` and ``findings/<severity>``, ``total``.

    Example:
        >>> from lightning_lossdiag.diagnosis.outcome import metric_outcomes
        >>> values = session_values(metric_outcomes({"val/loss": [(1, 0.5), (2, 0.7)], "lr": [(1, 0.1)]}), ["info"])
        >>> values["final/val/loss"], values["best/val/loss"], values["findings/info"], values["findings/total"]
        (0.7, 0.5, 1.0, 1.0)
        >>> values["final/lr"], "best/lr" in values  # no direction in the name: no best
        (0.1, False)
    """
    values: dict[str, float] = {}
    for key, outcome in outcomes.items():
        values[f"final/{key}"] = outcome.final
        if outcome.best is not None:
            values[f"best/{key}"] = outcome.best
    for name, count in finding_counts(severities).items():
        values[f"findings/{name}"] = float(count)
    return values


def session_summaries(
    hparams: Mapping[str, HParamValue], start_time: float, end_time: float, failed: bool = False
) -> tuple[Any, Any]:
    """The session start and end ``Summary`` protos of TensorBoard's HParams plugin (no experiment summary).

    Example:
        >>> from tensorboard.plugins.hparams import plugin_data_pb2
        >>> start, end = session_summaries({"lr": 0.1, "opt": "sgd"}, 100.0, 160.0)
        >>> start.value[0].tag, start.value[0].metadata.plugin_data.plugin_name
        ('_hparams_/session_start_info', 'hparams')
        >>> info = plugin_data_pb2.HParamsPluginData.FromString(start.value[0].metadata.plugin_data.content)
        >>> info.session_start_info.hparams["lr"].number_value, end.value[0].tag
        (0.1, '_hparams_/session_end_info')
    """
    from tensorboard.compat.proto.summary_pb2 import Summary
    from tensorboard.plugins.hparams import api_pb2, metadata, plugin_data_pb2

    start = plugin_data_pb2.SessionStartInfo(start_time_secs=start_time)
    for key, value in hparams.items():
        if isinstance(value, bool):
            start.hparams[key].bool_value = value
        elif isinstance(value, float):
            start.hparams[key].number_value = value
        else:
            start.hparams[key].string_value = str(value)
    status = api_pb2.STATUS_FAILURE if failed else api_pb2.STATUS_SUCCESS
    end = plugin_data_pb2.SessionEndInfo(status=status, end_time_secs=end_time)
    out = []
    for tag, data in (
        (metadata.SESSION_START_INFO_TAG, plugin_data_pb2.HParamsPluginData(session_start_info=start)),
        (metadata.SESSION_END_INFO_TAG, plugin_data_pb2.HParamsPluginData(session_end_info=end)),
    ):
        smd = metadata.create_summary_metadata(data)
        out.append(Summary(value=[Summary.Value(tag=tag, metadata=smd, tensor=metadata.NULL_TENSOR)]))
    return out[0], out[1]


def write_session(
    log_dir: str,
    hparams: Mapping[str, HParamValue],
    values: Mapping[str, float],
    step: int,
    start_time: float | None = None,
    failed: bool = False,
) -> str:
    """Write one HParams session into ``<log_dir>/lossdiag_hparams`` and return that folder.

    Example:
        >>> import tempfile
        >>> from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
        >>> folder = write_session(tempfile.mkdtemp(), {"lr": 0.1}, {"final/val/loss": 0.25}, step=40)
        >>> acc = EventAccumulator(folder)
        >>> _ = acc.Reload()
        >>> sorted(acc.PluginTagToContent("hparams")), [(e.step, e.value) for e in acc.Scalars("final/val/loss")]
        (['_hparams_/session_end_info', '_hparams_/session_start_info'], [(40, 0.25)])
    """
    from tensorboard.compat.proto.summary_pb2 import Summary
    from torch.utils.tensorboard.writer import FileWriter

    now = time.time()
    start, end = session_summaries(hparams, now if start_time is None else start_time, now, failed)
    folder = os.path.join(log_dir, SESSION_DIR)
    writer = FileWriter(folder)
    try:
        writer.add_summary(start, int(step))
        scalars = [Summary.Value(tag=key, simple_value=float(v)) for key, v in values.items()]
        if scalars:
            writer.add_summary(Summary(value=scalars), int(step))
        writer.add_summary(end, int(step))
    finally:
        writer.close()
    return folder


def write_hparams_session(
    trainer: Any,
    scalars: Mapping[str, Any],
    severities: Iterable[str],
    start_time: float | None = None,
    failed: bool = False,
) -> list[str]:
    """Write the HParams session of a finished fit for every TensorBoard logger of ``trainer`` (global rank 0).

    Args:
        trainer: the Trainer; its TensorBoard loggers' log dirs get the session, its settings become hyperparameters.
        scalars: ``key -> [(step, value)]`` of the run (the run record's series).
        severities: the severity of each finding of the run.
        start_time: when the fit started (seconds since the epoch; default now).
        failed: the fit ended with an exception.

    Returns:
        The session folders written (empty without a TensorBoard logger).
    """
    from lightning_lossdiag.dashboards.writers import tensorboard_writers

    writers = tensorboard_writers(trainer)
    if not writers:
        return []
    values = session_values(metric_outcomes(scalars), list(severities))
    facts = trainer_facts(trainer)
    folders = []
    for writer in writers:
        log_dir = str(writer.get_logdir())
        config, _ = read_run_config(log_dir)
        hparams = session_hparams(config, facts)
        step = int(getattr(trainer, "global_step", 0))
        folders.append(write_session(log_dir, hparams, values, step, start_time=start_time, failed=failed))
    return folders


def read_session(run_dir: str | Path) -> dict[str, Any] | None:
    """The HParams session of a run folder, read back from ``<run_dir>/lossdiag_hparams``; ``None`` without one.

    Returns ``{"hparams": {name: value}, "values": {column: last value}, "status": "STATUS_SUCCESS" | ...}``;
    whole numbers come back as ``int`` (TensorBoard stores every number as a float).

    Example:
        >>> import tempfile
        >>> d = tempfile.mkdtemp()
        >>> _ = write_session(d, {"lr": 0.1, "epochs": 3.0, "opt": "sgd"}, {"final/val/loss": 0.5}, step=9)
        >>> session = read_session(d)
        >>> session["hparams"], session["values"], session["status"]
        ({'epochs': 3, 'lr': 0.1, 'opt': 'sgd'}, {'final/val/loss': 0.5}, 'STATUS_SUCCESS')
    """
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from tensorboard.plugins.hparams import api_pb2, metadata, plugin_data_pb2

    folder = Path(run_dir) / SESSION_DIR
    if not folder.is_dir():
        return None
    acc = EventAccumulator(str(folder), size_guidance={"scalars": 0, "tensors": 0})
    acc.Reload()
    try:
        content = acc.PluginTagToContent(metadata.PLUGIN_NAME)
    except KeyError:  # no HParams data in the folder
        return None
    if metadata.SESSION_START_INFO_TAG not in content:
        return None
    start = plugin_data_pb2.HParamsPluginData.FromString(content[metadata.SESSION_START_INFO_TAG]).session_start_info
    hparams: dict[str, Any] = {}
    for name in sorted(start.hparams):
        value = start.hparams[name]
        kind = value.WhichOneof("kind")
        if kind == "number_value":
            number = value.number_value
            whole = math.isfinite(number) and number.is_integer() and abs(number) < 2**53
            hparams[name] = int(number) if whole else number
        elif kind in ("string_value", "bool_value"):
            hparams[name] = getattr(value, kind)
    status = "STATUS_UNKNOWN"
    if metadata.SESSION_END_INFO_TAG in content:
        end = plugin_data_pb2.HParamsPluginData.FromString(content[metadata.SESSION_END_INFO_TAG]).session_end_info
        status = api_pb2.Status.Name(end.status)
    values = {tag: float(acc.Scalars(tag)[-1].value) for tag in sorted(acc.Tags().get("scalars", []))}
    return {"hparams": hparams, "values": values, "status": status}


def silence_hp_metric_placeholder(trainer: Any) -> int:
    """Turn off ``hp_metric = -1`` of the Trainer's Lightning TensorBoard loggers; returns how many were on.

    ``TensorBoardLogger(default_hp_metric=True)`` (Lightning's default) writes the placeholder and an experiment
    summary when the Trainer logs the hyperparameters (after the callbacks' ``setup``); TensorBoard would take that
    summary for every run and show ``-1``. Lightning has no public setter, so this sets the logger's own flag.
    """
    from lightning.fabric.loggers import TensorBoardLogger

    turned_off = 0
    for logger in getattr(trainer, "loggers", []) or []:
        if isinstance(logger, TensorBoardLogger) and getattr(logger, "_default_hp_metric", False) is True:
            logger._default_hp_metric = False
            turned_off += 1
    return turned_off


__all__ = [
    "hparam_value",
    "read_session",
    "session_hparams",
    "session_summaries",
    "session_values",
    "silence_hp_metric_placeholder",
    "trainer_facts",
    "write_hparams_session",
    "write_session",
]
