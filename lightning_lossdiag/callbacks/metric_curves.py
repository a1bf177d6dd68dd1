"""``MetricCurves``: torchmetrics per task, updated on the device every step and logged once per epoch."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any, Literal

import torch
import torchmetrics.classification as tmc
import torchmetrics.regression as tmr
from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.utilities import rank_zero_warn
from torch import Tensor, nn
from torchmetrics import Metric
from typing_extensions import override

from lightning_lossdiag._outputs import clear_outputs, fetch_outputs
from lightning_lossdiag.callbacks._base import to_host
from lightning_lossdiag.callbacks._task import (
    TASKS,
    TaskInfo,
    align_regression,
    as_rows,
    infer_task_info,
    step_parts,
    to_probabilities,
)
from lightning_lossdiag.diagnosis.record import record_for
from lightning_lossdiag.metrics import DirectionalAccuracy

METRIC_NAMES: dict[str, tuple[str, ...]] = {
    "regression": ("mae", "mse", "rmse", "r2", "explained_variance", "directional_accuracy"),
    "binary": ("accuracy", "precision", "recall", "f1", "auroc", "average_precision", "balanced_accuracy"),
    "multiclass": ("accuracy", "precision", "recall", "f1", "auroc", "average_precision", "recall_per_class"),
    "multilabel": ("accuracy", "precision", "recall", "f1", "auroc", "average_precision", "recall_per_class"),
}
_ALL_NAMES = sorted({n for names in METRIC_NAMES.values() for n in names})
_TITLES = {"mae": "MAE", "mse": "MSE", "rmse": "RMSE", "r2": "R2", "auroc": "AUROC", "f1": "F1"}


def _factories(info: TaskInfo, thresholds: int) -> dict[str, Callable[[], Metric]]:
    kw: dict[str, Any] = {"validate_args": False}
    c = int(info.num_classes or 2)
    if info.task == "regression":
        return {
            "mae": tmr.MeanAbsoluteError,
            "mse": tmr.MeanSquaredError,
            "rmse": lambda: tmr.MeanSquaredError(squared=False),
            "r2": tmr.R2Score,
            "explained_variance": tmr.ExplainedVariance,
            "directional_accuracy": DirectionalAccuracy,
        }
    if info.task == "binary":
        return {
            "accuracy": lambda: tmc.BinaryAccuracy(**kw),
            "precision": lambda: tmc.BinaryPrecision(**kw),
            "recall": lambda: tmc.BinaryRecall(**kw),
            "f1": lambda: tmc.BinaryF1Score(**kw),
            "auroc": lambda: tmc.BinaryAUROC(thresholds=thresholds, normalization=None, **kw),
            "average_precision": lambda: tmc.BinaryAveragePrecision(thresholds=thresholds, normalization=None, **kw),
            "balanced_accuracy": lambda: tmc.MulticlassRecall(num_classes=2, average="macro", **kw),
        }
    if info.task == "multiclass":
        return {
            "accuracy": lambda: tmc.MulticlassAccuracy(num_classes=c, average="micro", **kw),
            "precision": lambda: tmc.MulticlassPrecision(num_classes=c, average="macro", **kw),
            "recall": lambda: tmc.MulticlassRecall(num_classes=c, average="macro", **kw),
            "f1": lambda: tmc.MulticlassF1Score(num_classes=c, average="macro", **kw),
            "auroc": lambda: tmc.MulticlassAUROC(num_classes=c, thresholds=thresholds, **kw),
            "average_precision": lambda: tmc.MulticlassAveragePrecision(num_classes=c, thresholds=thresholds, **kw),
            "recall_per_class": lambda: tmc.MulticlassRecall(num_classes=c, average=None, **kw),
        }
    return {
        "accuracy": lambda: tmc.MultilabelAccuracy(num_labels=c, average="micro", **kw),
        "precision": lambda: tmc.MultilabelPrecision(num_labels=c, average="macro", **kw),
        "recall": lambda: tmc.MultilabelRecall(num_labels=c, average="macro", **kw),
        "f1": lambda: tmc.MultilabelF1Score(num_labels=c, average="macro", **kw),
        "auroc": lambda: tmc.MultilabelAUROC(num_labels=c, thresholds=thresholds, **kw),
        "average_precision": lambda: tmc.MultilabelAveragePrecision(num_labels=c, thresholds=thresholds, **kw),
        "recall_per_class": lambda: tmc.MultilabelRecall(num_labels=c, average=None, **kw),
    }


def build_metrics(info: TaskInfo, thresholds: int, wanted: Sequence[str] | None, sequence: bool) -> dict[str, Metric]:
    """The torchmetrics of one stage (pure: no Trainer).

    Classification metrics take labels we threshold ourselves and curves take probabilities, all with
    ``validate_args=False``, so their ``update`` does not read values on the host.

    Example:
        >>> sorted(build_metrics(TaskInfo("regression", "values"), 101, None, sequence=False))
        ['explained_variance', 'mae', 'mse', 'r2', 'rmse']
    """
    names = [n for n in METRIC_NAMES[info.task] if wanted is None or n in wanted]
    if info.task == "regression" and not sequence and wanted is None:
        names.remove("directional_accuracy")
    factories = _factories(info, thresholds)
    return {name: factories[name]() for name in names}


def _to_plain(value: Any) -> Any:
    """A torchmetrics state (a tensor, or a list of them) as plain data: ``[dtype, shape, values]``."""
    if isinstance(value, Tensor):  # checkpoint save, not the per-step path: a host read per state
        return [str(value.dtype).removeprefix("torch."), list(value.shape), value.detach().reshape(-1).cpu().tolist()]
    return {"items": [_to_plain(v) for v in value]}


def _restore_states(metric: Metric, saved: Mapping[str, Any]) -> None:
    """Put :func:`_to_plain` states back into a fresh ``metric`` on its device (one-time, when a resumed slot starts).

    A tensor state whose shape no longer fits (the options changed) is left at its default.
    """
    for name, default in metric._defaults.items():
        data = saved.get(name)
        if isinstance(default, Tensor) and isinstance(data, list) and len(data) == 3:
            value = torch.tensor(data[2], dtype=getattr(torch, data[0]), device=metric.device).reshape(data[1])
            if value.shape == default.shape:
                setattr(metric, name, value)
        elif isinstance(default, list) and isinstance(data, dict):
            items = [
                torch.tensor(d[2], dtype=getattr(torch, d[0]), device=metric.device).reshape(d[1])
                for d in data["items"]
            ]
            setattr(metric, name, items)


def _label_inputs(info: TaskInfo, probs: Tensor, target: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """``(labels, label_target, curve_probs, curve_target)`` for one batch, on the device."""
    values, labels, _ = as_rows(probs, target, info)
    if info.task == "binary":
        values, labels = values.reshape(-1), labels.reshape(-1).long()
        return (values > 0.5).long(), labels, values, labels
    if info.task == "multiclass":
        return values.argmax(dim=1), labels, values, labels
    labels = labels.long()
    return (values > 0.5).long(), labels, values, labels


class MetricCurves(Callback):
    """Task metrics from torchmetrics, per stage, logged at the end of each epoch with ``pl_module.log``.

    The metrics live in this callback (moved to the model's device at the first batch); ``update`` runs on the
    device every step with no host read, ``compute`` runs at epoch end (torchmetrics syncs DDP ranks there). Values
    go through ``pl_module.log`` (so ``ModelCheckpoint(monitor="metrics/val/mae")``, ``EarlyStopping`` and
    ``ReduceLROnPlateau`` can watch them) and into the run record (one host transfer per stage and epoch).

    The checkpoint holds the training metrics' states of the epoch in progress, so a fit resumed from a mid-epoch
    checkpoint logs metrics over the whole epoch. Not under DDP: rank 0 writes the checkpoint and cannot hold the
    other ranks' states without a collective at save time, so there the interrupted epoch's training metrics cover
    the steps after the resume. Validation and test restart from scratch on resume, so their states are not saved.
    The values are the same on every rank (torchmetrics syncs them), so they are logged with ``sync_dist=True`` and
    ``reduce_fx="max"``: the max of equal values is the value, exactly, and Lightning does not warn about syncing.

    The task comes from the criterion (``LossMixin``) or from the first batch's shapes; pass ``task`` to force it.
    Training metrics use the training steps' outputs (computed under the model's training mode, e.g. dropout on).

    | key | kind | when | tasks |
    |---|---|---|---|
    | ``metrics/<stage>/mae``, ``mse``, ``rmse``, ``r2``, ``explained_variance`` | scalar | epoch end | regression |
    | ``metrics/<stage>/directional_accuracy`` | scalar | epoch end | regression on sequences ``(N, ..., T)`` |
    | ``metrics/<stage>/accuracy``, ``precision``, ``recall``, ``f1`` (macro), ``auroc``, ``average_precision`` |
    scalar | epoch end | classification |
    | ``metrics/<stage>/balanced_accuracy`` | scalar | epoch end | binary (macro recall) |
    | ``metrics/<stage>/recall/<class>`` | scalar | epoch end | multiclass, multilabel |
    | ``metrics/<stage>/<term>/<name>`` (every name above, e.g. ``metrics/val/ctr/auroc``),
    ``metrics/<stage>/<term>/recall/<class>`` | scalar | epoch end | multi-task steps, each term's own task |

    Multi-task steps (``preds``/``target`` mappings ``head -> tensor``, e.g. a
    :class:`~lightning_lossdiag.losses.CompositeLoss`) get one set of metrics per loss term, keyed with the term after
    the stage; each term's task comes from its own loss. Single-tensor steps keep the keys above.

    Args:
        stages: stages to measure, from ``"train"``, ``"val"``, ``"test"``.
        task: ``"auto"`` or a task to force (``"regression"``, ``"binary"``, ``"multiclass"``, ``"multilabel"``).
        num_classes: classes (labels) when the predictions' dim 1 does not say it.
        thresholds: number of fixed thresholds of AUROC and average precision (binned: bounded memory).
        metrics: names to keep (default all of the task's), from ``mae``, ``mse``, ``rmse``, ``r2``,
            ``explained_variance``, ``directional_accuracy``, ``accuracy``, ``precision``, ``recall``, ``f1``,
            ``auroc``, ``average_precision``, ``balanced_accuracy``, ``recall_per_class``.

    Example:
        >>> cb = MetricCurves(stages=("val",), task="regression")
        >>> cb.layout_entries()["MAE"]
        ['metrics/val/mae']
    """

    def __init__(
        self,
        stages: Sequence[Literal["train", "val", "test"]] = ("train", "val", "test"),
        task: Literal["auto", "regression", "binary", "multiclass", "multilabel"] = "auto",
        num_classes: int | None = None,
        thresholds: int = 101,
        metrics: list[str] | None = None,
    ) -> None:
        bad = [s for s in stages if s not in ("train", "val", "test")]
        if not stages or bad:
            raise ValueError(f"`stages` must be a non-empty subset of ('train', 'val', 'test'), got {stages!r}")
        if task != "auto" and task not in TASKS:
            raise ValueError(f"`task` must be 'auto' or one of {TASKS}, got {task!r}")
        if num_classes is not None and (not isinstance(num_classes, int) or num_classes < 2):
            raise ValueError(f"`num_classes` must be an integer >= 2 or None, got {num_classes!r}")
        if not isinstance(thresholds, int) or thresholds < 2:
            raise ValueError(f"`thresholds` must be an integer >= 2, got {thresholds!r}")
        unknown = [m for m in metrics or [] if m not in _ALL_NAMES]
        if metrics is not None and (not metrics or unknown):
            raise ValueError(f"`metrics` must be a non-empty list of names from {_ALL_NAMES}, got {metrics!r}")
        self.stages = tuple(stages)
        self.task = task
        self.num_classes = num_classes
        self.thresholds = thresholds
        self.metrics = list(metrics) if metrics is not None else None
        self._info: dict[str, TaskInfo] = {}
        self._modules: dict[str, nn.ModuleDict] = {}
        self._updated: dict[str, bool] = {}
        self._warned: set[str] = set()
        self._world_size = 1
        self._epoch = 0
        self._resumed: dict[str, Any] = {}  # training states of a checkpoint, put back when their slots are built

    @property
    def state_key(self) -> str:
        """Distinguishes instances with different stages or tasks in one checkpoint."""
        return self._generate_state_key(stages=self.stages, task=self.task)

    # ---- hooks -----------------------------------------------------------------------------------------------
    @override
    def on_train_batch_start(self, trainer: Trainer, pl_module: LightningModule, batch: Any, batch_idx: int) -> None:
        clear_outputs(pl_module, "train")

    @override
    def on_validation_batch_start(
        self, trainer: Trainer, pl_module: LightningModule, batch: Any, batch_idx: int, dataloader_idx: int = 0
    ) -> None:
        clear_outputs(pl_module, "val")

    @override
    def on_test_batch_start(
        self, trainer: Trainer, pl_module: LightningModule, batch: Any, batch_idx: int, dataloader_idx: int = 0
    ) -> None:
        clear_outputs(pl_module, "test")

    @override
    def on_train_batch_end(
        self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        self._update(trainer, pl_module, outputs, "train")

    @override
    def on_validation_batch_end(
        self,
        trainer: Trainer,
        pl_module: LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
        dataloader_idx: int = 0,
    ) -> None:
        if not trainer.sanity_checking:
            self._update(trainer, pl_module, outputs, "val")

    @override
    def on_test_batch_end(
        self,
        trainer: Trainer,
        pl_module: LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
        dataloader_idx: int = 0,
    ) -> None:
        self._update(trainer, pl_module, outputs, "test")

    @override
    def on_train_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._log_epoch(trainer, pl_module, "train")
        self._resumed = {}  # states of a resumed epoch are used within that epoch or never

    @override
    def on_validation_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if not trainer.sanity_checking:
            self._log_epoch(trainer, pl_module, "val")

    @override
    def on_test_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._log_epoch(trainer, pl_module, "test")

    # ---- work ------------------------------------------------------------------------------------------------
    def _update(self, trainer: Trainer, pl_module: LightningModule, outputs: Any, stage: str) -> None:
        if stage not in self.stages:
            return
        step = fetch_outputs(pl_module, outputs, stage)
        parts = step_parts(step.preds, step.target, step.criterion) if step is not None else []
        if not parts:
            if stage not in self._warned:
                self._warned.add(stage)
                rank_zero_warn(
                    f"MetricCurves: the {stage} step handed no tensor `preds` and `target` (use LossMixin or return "
                    '{"loss", "preds", "target"}); no metrics for this stage.'
                )
            return
        self._world_size, self._epoch = int(trainer.world_size), int(trainer.current_epoch)
        for term, criterion, preds, target in parts:
            slot = stage if term is None else f"{stage}/{term}"  # keys: metrics/<stage>[/<term>]/<name>
            if slot not in self._modules:
                self._start_slot(slot, criterion, preds, target)
                self._resume_slot(slot)
            self._update_slot(slot, preds, target)
        self._updated[stage] = True

    def _start_slot(self, slot: str, criterion: Any, preds: Tensor, target: Tensor) -> None:
        """First batch of a stage (or of one term of it): the task and the metrics (one-time host read at most)."""
        info = self._info.get(slot) or infer_task_info(criterion, preds, target, self.task)
        if self.num_classes is not None and info.task in ("multiclass", "multilabel"):
            info = TaskInfo(info.task, info.inputs, self.num_classes)
        sequence = info.task == "regression" and preds.ndim >= 2 and preds.shape[-1] >= 2
        self._info[slot] = info
        metrics = build_metrics(info, self.thresholds, self.metrics, sequence)
        self._modules[slot] = nn.ModuleDict(metrics).to(preds.device)

    def _resume_slot(self, slot: str) -> None:
        """Put back the saved training states of ``slot`` if they belong to this epoch (one-time, at resume)."""
        saved = self._resumed.get("slots", {}).pop(slot, None)
        if saved is None or self._resumed.get("epoch") != self._epoch or self._world_size != 1:
            return
        for name, metric in self._stage_metrics(slot).items():
            if name in saved:
                _restore_states(metric, saved[name])

    def _update_slot(self, slot: str, preds: Tensor, target: Tensor) -> None:
        """Update the metrics of one stage (or term) with one batch, on the device."""
        info = self._info[slot]
        metrics = self._stage_metrics(slot)
        if info.task == "regression":
            preds, _ = align_regression(preds, target)
            flat_p, flat_t = preds.reshape(-1).float(), target.reshape(-1).float()
            for name, metric in metrics.items():
                if name == "directional_accuracy":
                    metric.update(preds.float(), target.float())
                else:
                    metric.update(flat_p, flat_t)
        else:
            labels, label_target, curve_probs, curve_target = _label_inputs(info, to_probabilities(preds, info), target)
            for name, metric in metrics.items():
                if name in ("auroc", "average_precision"):
                    metric.update(curve_probs, curve_target)
                else:
                    metric.update(labels, label_target)

    def _stage_metrics(self, slot: str) -> dict[str, Metric]:
        return {name: m for name, m in self._modules.get(slot, nn.ModuleDict()).items() if isinstance(m, Metric)}

    def _slots(self, stage: str) -> list[str]:
        """The metric sets of ``stage``: ``stage`` itself and ``stage/<term>`` for multi-task steps (sorted)."""
        return sorted(s for s in self._modules if s == stage or s.startswith(f"{stage}/"))

    def compute_stage(self, stage: str) -> dict[str, Tensor]:
        """Current values of ``stage`` as device tensors keyed ``metrics/<stage>[/<term>]/<name>`` (per class split)."""
        values: dict[str, Tensor] = {}
        for slot in self._slots(stage):
            for name, metric in self._stage_metrics(slot).items():
                value = metric.compute()
                if name == "recall_per_class":
                    for c in range(value.shape[0]):
                        values[f"metrics/{slot}/recall/{c}"] = value[c]
                else:
                    values[f"metrics/{slot}/{name}"] = value
        return values

    def _log_epoch(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        if stage not in self.stages or not self._updated.get(stage, False):
            return
        values = self.compute_stage(stage)  # epoch end: torchmetrics syncs ranks here
        for key, value in values.items():
            # equal on every rank (torchmetrics synced them): the max over ranks is the value itself, exactly
            pl_module.log(key, value.float(), on_step=False, on_epoch=True, sync_dist=True, reduce_fx="max")
        record_for(trainer).add_scalars(int(trainer.global_step), to_host(values))  # one host transfer (epoch end)
        for slot in self._slots(stage):
            for metric in self._stage_metrics(slot).values():
                metric.reset()
        self._updated[stage] = False

    # ---- layout and state ------------------------------------------------------------------------------------
    def layout_entries(self) -> dict[str, list[str]]:
        """Custom-scalars charts: title -> tag regexes, one chart per metric with a line per stage (and term seen)."""
        tasks: set[str]
        if self._info:
            tasks = {info.task for info in self._info.values()}
        elif self.task != "auto":
            tasks = {self.task}
        else:
            tasks = set(TASKS)
        names = [n for t in TASKS if t in tasks for n in METRIC_NAMES[t] if self.metrics is None or n in self.metrics]
        slots = [*self.stages, *(s for s in self._info if "/" in s and s.split("/", 1)[0] in self.stages)]
        entries: dict[str, list[str]] = {}
        for name in dict.fromkeys(names):
            if name == "recall_per_class":
                entries["Recall per class"] = [f"metrics/{s}/recall/.*" for s in slots]
            else:
                title = _TITLES.get(name, name.replace("_", " ").capitalize())
                entries[title] = [f"metrics/{s}/{name}" for s in slots]
        return entries

    @override
    def state_dict(self) -> dict[str, Any]:
        """Plain data: the task of each slot and, mid-epoch (one process), the training metrics' states."""
        state: dict[str, Any] = {
            "info": {
                s: {"task": i.task, "inputs": i.inputs, "num_classes": i.num_classes} for s, i in self._info.items()
            }
        }
        if self._updated.get("train", False) and self._world_size == 1:
            slots = {
                slot: {
                    n: {k: _to_plain(v) for k, v in m.metric_state.items()}
                    for n, m in self._stage_metrics(slot).items()
                }
                for slot in self._slots("train")
            }
            state["train_states"] = {"epoch": self._epoch, "slots": slots}
        elif self._resumed.get("slots"):
            state["train_states"] = {"epoch": self._resumed.get("epoch"), "slots": dict(self._resumed["slots"])}
        return state

    @override
    def load_state_dict(self, state_dict: Mapping[str, Any]) -> None:
        """Restore :meth:`state_dict`; missing keys keep their defaults."""
        for stage, info in dict(state_dict.get("info", {})).items():
            self._info[stage] = TaskInfo(
                info.get("task", "regression"), info.get("inputs", "values"), info.get("num_classes")
            )
        saved = state_dict.get("train_states") or {}
        self._resumed = {"epoch": saved.get("epoch"), "slots": dict(saved.get("slots") or {})} if saved else {}
        if self._resumed:  # the metrics are rebuilt (and given these states) at the next training batch
            self._modules = {s: m for s, m in self._modules.items() if s not in self._resumed["slots"]}
            self._updated["train"] = False


__all__ = ["METRIC_NAMES", "MetricCurves", "build_metrics"]
