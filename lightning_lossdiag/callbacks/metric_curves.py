"""``MetricCurves``: torchmetrics per task, updated on the device in batches of steps and logged once per epoch."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import replace
from typing import Any, Literal

from lightning.pytorch import LightningModule, Trainer
from lightning.pytorch.utilities import rank_zero_warn
from torch import Tensor, nn
from torchmetrics import Metric
from typing_extensions import override

from lightning_lossdiag._outputs import fetch_outputs
from lightning_lossdiag.callbacks._base import to_host
from lightning_lossdiag.callbacks._class_engine import (
    DEFAULT_BUDGET,
    DEFAULT_BUFFER_BYTES,
    DEFAULT_MAX_CONFUSION,
    Engine,
    EngineConfig,
    engine_for,
    restore_counts,
    saved_counts,
)
from lightning_lossdiag.callbacks._metric_buffer import StepBuffer
from lightning_lossdiag.callbacks._metric_sets import (
    ALL_NAMES,
    METRIC_NAMES,
    QUANTILE_COVERAGE,
    TITLES,
    build_metrics,
    restore_states,
    to_plain,
    update_metrics,
)
from lightning_lossdiag.callbacks._staged import StagedOutputsCallback
from lightning_lossdiag.callbacks._task import (
    TASKS,
    TaskInfo,
    align_regression,
    check_class_dim,
    check_ignore_index,
    infer_task_info,
    info_from_state,
    info_state,
    label_predictions,
    label_predictions_message,
    loss_quantiles,
    outputs_per_target_message,
    point_prediction,
    regression_column,
    step_parts,
)
from lightning_lossdiag.callbacks.error_distribution import make_gather
from lightning_lossdiag.diagnosis.record import record_for
from lightning_lossdiag.metrics import QuantileCoverage
from lightning_lossdiag.stats.class_metrics import class_metrics

_DEFAULT_BUFFER_STEPS = 50


class MetricCurves(StagedOutputsCallback):
    """Task metrics from torchmetrics, per stage, logged at the end of each epoch with ``pl_module.log``.

    The metrics live in this callback (moved to the model's device at the first batch). A step only keeps references
    to its detached ``preds``/``target`` (no kernel, no host read); every ``buffer_steps`` steps, or sooner when the
    held tensors pass ``buffer_bytes``, and at epoch end and checkpoint save, the held steps are concatenated and each
    metric gets ONE ``update`` on the device (no host read): the same states as per-step updates (sums and binned
    counts) for a fraction of the per-step cost. ``compute`` runs at epoch end (torchmetrics syncs DDP ranks there).
    A data loader that reuses its output tensors in place needs ``buffer_steps=1`` (held steps are references). Values
    go through ``pl_module.log`` (so ``ModelCheckpoint(monitor="metrics/val/mae")``, ``EarlyStopping`` and
    ``ReduceLROnPlateau`` can watch them) and into the run record (one host transfer per stage and epoch).

    The checkpoint holds the training metrics' states of the epoch in progress, so a fit resumed from a mid-epoch
    checkpoint logs metrics over the whole epoch. Not under DDP: rank 0 writes the checkpoint and cannot hold the
    other ranks' states without a collective at save time, so there the interrupted epoch's training metrics cover
    the steps after the resume. Validation and test restart from scratch on resume, so their states are not saved.
    The values are the same on every rank (torchmetrics syncs them), so they are logged with ``sync_dist=True`` and
    ``reduce_fx="max"``: the max of equal values is the value, exactly, and Lightning does not warn about syncing.

    The task comes from the criterion (``LossMixin``) or from the first batch's shapes; pass ``task`` to force it.
    Regression metrics are torchmetrics' own (their updates are sync-free sums). Classification metrics are computed
    from the stage's device counts, shared with ``ErrorDistributionMonitor`` (one pass over a batch feeds both):
    per-class support, predicted and correct counts over every row, and binned PR/ROC counts over a uniform sample
    of ``budget // classes`` rows per step (every row while the batch fits, so small tasks are exact). The values
    equal torchmetrics' functional ones on the same rows (``thresholds`` binned curves, macro averages); nothing in
    the update synchronises (torchmetrics' classification updates call ``bincount``, which does on CUDA).
    Training metrics use the training steps' outputs (computed under the model's training mode, e.g. dropout on).
    With the ``quantile`` loss's ``(..., Q)`` outputs the regression metrics read the quantile nearest the median;
    ``coverage/<q>`` is the share of targets at or below the prediction of quantile ``q`` (calibrated: ``q``) and
    ``interval_coverage`` the share inside the outermost two (calibrated: ``q_max - q_min``).

    | key | kind | when | tasks |
    |---|---|---|---|
    | ``metrics/<stage>/mae``, ``mse``, ``rmse``, ``r2``, ``explained_variance`` | scalar | epoch end | regression |
    | ``metrics/<stage>/directional_accuracy`` | scalar | epoch end | regression on sequences ``(N, ..., T)`` |
    | ``metrics/<stage>/coverage/<q>``, ``interval_coverage`` | scalar | epoch end | the ``quantile`` loss (below) |
    | ``metrics/<stage>/accuracy``, ``precision``, ``recall``, ``f1`` (macro), ``auroc``, ``average_precision`` |
    scalar | epoch end | classification |
    | ``metrics/<stage>/balanced_accuracy`` | scalar | epoch end | binary (macro recall) |
    | ``metrics/<stage>/recall/<class>`` | scalar | epoch end | multiclass, multilabel, up to ``max_classes`` |
    | ``metrics/<stage>/top5_accuracy`` | scalar | epoch end | multiclass, at least 10 classes |
    | ``metrics/<stage>/perplexity`` | scalar | epoch end | multiclass (``exp`` of the mean cross-entropy) |
    | ``metrics/<stage>/ece``, ``mce``, ``ece_adaptive``, ``ece_classwise``, ``brier``, ``confidence`` | scalar |
    epoch end | classification (15-bin calibration errors: equal-width, equal-mass and classwise; Brier score, mean
    confidence) |
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
            ``auroc``, ``average_precision``, ``balanced_accuracy``, ``recall_per_class``, ``top5_accuracy``,
            ``perplexity``, ``ece``, ``mce``, ``ece_adaptive``, ``ece_classwise``, ``brier``, ``confidence``.
        buffer_steps: steps held before one batched update of the metrics (default: the Trainer's
            ``log_every_n_steps``, else 50); ``1`` updates every step.
        buffer_bytes: bytes of held tensors (per stage and term) past which they are fed to the metrics at once,
            whatever the step count (memory stays below this plus one step, plus one copy while concatenating;
            default 8 MiB: a few steps of 1,000-class logits, a 32k-vocabulary step alone).
        class_dim: the class dimension of the predictions: ``None`` tells it from the shapes (``(N, C, d1, ...)``
            with ``(N, d1, ...)`` targets, or ``(B, T, V)`` with ``(B, T)``), ``1`` or ``-1`` to say it where both
            fit.
        ignore_index: a target value left out of every metric (``-100`` tokens, ``255`` void pixels). Targets outside
            ``[0, C)`` are always left out of multiclass metrics; the criterion's ``ignore_index`` is used when it
            has one.
        max_classes: up to this many classes, ``recall_per_class`` is logged as one scalar per class; beyond, it is
            a histogram across classes and a table of the worst classes (``ErrorDistributionMonitor``).
        budget: values of ``rows x classes`` per step for AUROC and average precision: a uniform sample of
            ``budget // classes`` rows (every row while the batch fits), each weighing ``rows / sampled``.

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
        buffer_steps: int | None = None,
        buffer_bytes: int = DEFAULT_BUFFER_BYTES,
        class_dim: int | None = None,
        ignore_index: int | None = None,
        max_classes: int = DEFAULT_MAX_CONFUSION,
        budget: int = DEFAULT_BUDGET,
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
        unknown = [m for m in metrics or [] if m not in ALL_NAMES]
        if metrics is not None and (not metrics or unknown):
            raise ValueError(f"`metrics` must be a non-empty list of names from {ALL_NAMES}, got {metrics!r}")
        if buffer_steps is not None and (not isinstance(buffer_steps, int) or buffer_steps < 1):
            raise ValueError(f"`buffer_steps` must be a positive integer or None, got {buffer_steps!r}")
        if not isinstance(buffer_bytes, int) or buffer_bytes < 0:
            raise ValueError(f"`buffer_bytes` must be a non-negative integer, got {buffer_bytes!r}")
        self.stages = tuple(stages)
        self.task = task
        self.num_classes = num_classes
        self.thresholds = thresholds
        self.metrics = list(metrics) if metrics is not None else None
        self.buffer_steps = buffer_steps
        self.buffer_bytes = buffer_bytes
        for name, value, low in (("max_classes", max_classes, 2), ("budget", budget, 1)):
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise ValueError(f"`{name}` must be an integer >= {low}, got {value!r}")
        self.class_dim = check_class_dim(class_dim)
        self.ignore_index = check_ignore_index(ignore_index)
        self.max_classes = max_classes
        self.budget = budget
        self._engines: dict[str, Engine] = {}  # classification slots: the counts shared with ErrorDistributionMonitor
        self._gather: Any = None
        self._buffers: dict[str, StepBuffer] = {}  # per slot: steps not yet fed to the metrics
        self._state_key: tuple[Any, str] | None = None
        self._info: dict[str, TaskInfo] = {}
        self._modules: dict[str, nn.ModuleDict] = {}
        self._updated: dict[str, bool] = {}
        self._warned: set[str] = set()
        self._refused: set[str] = set()  # slots left out, said once (class indices as predictions, ...)
        self._points: dict[str, int | None] = {}  # regression slots: the point column of multi-quantile outputs
        self._world_size = 1
        self._epoch = 0
        self._resumed: dict[str, Any] = {}  # training states of a checkpoint, put back when their slots are built

    @property
    def state_key(self) -> str:
        """Distinguishes instances with different stages or tasks in one checkpoint."""
        args = (self.stages, self.task)  # Lightning reads this at every hook call (a profiler label): cached
        if self._state_key is None or self._state_key[0] != args:
            self._state_key = (args, self._generate_state_key(stages=self.stages, task=self.task))
        return self._state_key[1]

    # ---- hooks -----------------------------------------------------------------------------------------------
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
            if slot in self._refused:
                continue
            if slot not in self._modules:
                if label_predictions(preds, target, self.task):  # class indices, not scores: refused once
                    self._refuse(slot, label_predictions_message("MetricCurves", slot, preds, "metrics"))
                    continue
                if not self._start_slot(trainer, slot, criterion, preds, target):
                    continue
                self._resume_slot(slot)
            engine = self._engines.get(slot)
            if engine is not None:
                engine.add(preds, target)  # counted once per step, together with the error views
                continue
            if self._info[slot].task == "regression":  # shapes only: a bad step still fails at its own step
                column = self._points.get(slot)
                aligned, _ = align_regression(point_prediction(preds, column), target)
                preds = aligned if column is None else preds  # quantile outputs are held whole (their coverage)
            buffer = self._buffers.get(slot)
            if buffer is None:
                steps = self.buffer_steps or int(getattr(trainer, "log_every_n_steps", 0) or _DEFAULT_BUFFER_STEPS)
                buffer = self._buffers[slot] = StepBuffer(max(1, steps), self.buffer_bytes)
            if buffer.add(preds, target):
                self._drain(slot)
        self._updated[stage] = True

    def _start_slot(self, trainer: Trainer, slot: str, criterion: Any, preds: Tensor, target: Tensor) -> bool:
        """First batch of a stage (or of one term of it): the task and the metrics (one-time host read at most).

        Regression gets torchmetrics (their updates are sync-free sums); classification reads the slot's shared
        counts (torchmetrics' classification updates call ``bincount``, which synchronises on CUDA). ``False``: the
        slot is refused (several regression outputs per target that no loss explains).
        """
        info = self._info.get(slot) or infer_task_info(
            criterion, preds, target, self.task, self.class_dim, self.ignore_index
        )
        if self.num_classes is not None and info.task in ("multiclass", "multilabel"):
            info = replace(info, num_classes=self.num_classes)
        if info.task == "regression":
            usable, column = regression_column(criterion, preds, target)  # multi-quantile outputs: the median
            if not usable:
                self._refuse(slot, outputs_per_target_message("MetricCurves", slot, preds, target, "metrics"))
                return False
            self._info[slot], self._points[slot] = info, column
            point = point_prediction(preds, column)
            sequence = point.ndim >= 2 and point.shape[-1] >= 2
            metrics = build_metrics(info, self.thresholds, self.metrics, sequence)
            quantiles = loss_quantiles(criterion) if column is not None else None
            if quantiles is not None and self.metrics is None:
                metrics[QUANTILE_COVERAGE] = QuantileCoverage(quantiles)
            self._modules[slot] = nn.ModuleDict(metrics).to(preds.device)
            return True
        self._info[slot] = info
        self._modules[slot] = nn.ModuleDict()
        steps = self.buffer_steps or int(getattr(trainer, "log_every_n_steps", 0) or _DEFAULT_BUFFER_STEPS)
        config = EngineConfig(self.thresholds, self.budget, self.max_classes)
        self._engines[slot] = engine_for(trainer, slot, info, config, preds.device, max(1, steps), self.buffer_bytes)
        return True

    def _resume_slot(self, slot: str) -> None:
        """Put back the saved training states of ``slot`` if they belong to this epoch (one-time, at resume)."""
        saved = self._resumed.get("slots", {}).pop(slot, None)
        if saved is None or self._resumed.get("epoch") != self._epoch or self._world_size != 1:
            return
        engine = self._engines.get(slot)
        if engine is not None:
            restore_counts(engine.counts, saved.get("counts"))
            engine.drained += 1  # restored counts are counts: never rebuilt from scratch
            return
        for name, metric in self._stage_metrics(slot).items():
            if name in saved:
                restore_states(metric, saved[name])

    def _drain(self, slot: str) -> None:
        """Feed the held steps of ``slot`` to its metrics: one concatenation and one ``update`` each (no host read)."""
        buffer = self._buffers.get(slot)
        if buffer is None or not len(buffer):
            return
        metrics = self._stage_metrics(slot)
        for preds, target in buffer.take():
            update_metrics(self._info[slot], metrics, preds, target, self._points.get(slot))

    def held_bytes(self, buffers: bool = True) -> int:
        """Bytes of device tensors held.

        Every metric state (fixed by the task and ``thresholds``), plus with ``buffers`` the steps held for a batched
        update (at most ``buffer_bytes`` plus one step) and the class engines' scratch buffers (bounded by the largest
        piece of an update, see :class:`~lightning_lossdiag.stats.row_ops.Workspace`).
        """
        states = sum(
            t.nbytes
            for slot in self._modules
            for metric in self._stage_metrics(slot).values()
            for value in metric.metric_state.values()
            for t in (value if isinstance(value, list) else [value])
            if isinstance(t, Tensor)
        )
        states += sum(engine.counts.nbytes() for engine in self._engines.values())
        held = [*self._buffers.values(), *(e.buffer for e in self._engines.values())]
        scratch = sum(engine.counts.scratch_bytes for engine in self._engines.values())
        return states + (sum(buffer.nbytes for buffer in held) + scratch if buffers else 0)

    def _drain_stage(self, stage: str) -> None:
        for slot in self._slots(stage):
            self._drain(slot)

    def _stage_metrics(self, slot: str) -> dict[str, Metric]:
        return {name: m for name, m in self._modules.get(slot, nn.ModuleDict()).items() if isinstance(m, Metric)}

    def _slots(self, stage: str) -> list[str]:
        """The metric sets of ``stage``: ``stage`` itself and ``stage/<term>`` for multi-task steps (sorted)."""
        return sorted(s for s in self._modules if s == stage or s.startswith(f"{stage}/"))

    def compute_stage(self, stage: str) -> dict[str, Tensor]:
        """Current values of ``stage`` as device tensors keyed ``metrics/<stage>[/<term>]/<name>``.

        ``recall_per_class`` is split into ``metrics/<stage>/recall/<class>`` up to ``max_classes`` classes; beyond,
        per-class recall is a histogram across classes and a table of the worst classes (``ErrorDistributionMonitor``).
        """
        self._drain_stage(stage)
        values: dict[str, Tensor] = {}
        for slot in self._slots(stage):
            engine = self._engines.get(slot)
            if engine is not None:
                wanted = [n for n in METRIC_NAMES[engine.info.task] if self.metrics is None or n in self.metrics]
                computed = class_metrics(engine.view(self._gather), wanted)  # epoch end: one collective per slot
                per_class = computed.pop("recall_per_class", None)
                values.update({f"metrics/{slot}/{name}": value for name, value in computed.items()})
                if per_class is not None and per_class.shape[0] <= self.max_classes:
                    values.update({f"metrics/{slot}/recall/{c}": per_class[c] for c in range(per_class.shape[0])})
                continue
            for name, metric in self._stage_metrics(slot).items():
                value = metric.compute()
                if isinstance(metric, QuantileCoverage):  # at or below each quantile, then inside the outermost
                    for q, share in zip(metric.quantiles, value[:-1], strict=True):
                        values[f"metrics/{slot}/coverage/{q:g}"] = share
                    values[f"metrics/{slot}/interval_coverage"] = value[-1]
                elif name == "recall_per_class":
                    for c in range(value.shape[0]):
                        values[f"metrics/{slot}/recall/{c}"] = value[c]
                else:
                    values[f"metrics/{slot}/{name}"] = value
        return values

    def _log_epoch(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        if stage not in self.stages or not self._updated.get(stage, False):
            return
        self._gather = make_gather(trainer, pl_module)
        values = self.compute_stage(stage)  # epoch end: torchmetrics syncs ranks here
        for key, value in values.items():
            # equal on every rank (torchmetrics synced them): the max over ranks is the value itself, exactly
            pl_module.log(key, value.float(), on_step=False, on_epoch=True, sync_dist=True, reduce_fx="max")
        record_for(trainer).add_scalars(int(trainer.global_step), to_host(values))  # one host transfer (epoch end)
        for slot in self._slots(stage):
            for metric in self._stage_metrics(slot).values():
                metric.reset()
            if slot in self._engines:
                self._engines[slot].finish()  # the shared counts start fresh at the slot's next step
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
                title = TITLES.get(name, name.replace("_", " ").capitalize())
                entries[title] = [f"metrics/{s}/{name}" for s in slots]
        return entries

    @override
    def state_dict(self) -> dict[str, Any]:
        """Plain data: the task of each slot and, mid-epoch (one process), the training metrics' states."""
        self._drain_stage("train")  # checkpoint save: the held steps go into the saved states
        state: dict[str, Any] = {"info": {s: info_state(i) for s, i in self._info.items()}}
        if self._updated.get("train", False) and self._world_size == 1:
            slots = {
                slot: {
                    n: {k: to_plain(v) for k, v in m.metric_state.items()} for n, m in self._stage_metrics(slot).items()
                }
                for slot in self._slots("train")
            }
            for slot in slots:
                if slot in self._engines:
                    slots[slot]["counts"] = saved_counts(self._engines[slot])
            state["train_states"] = {"epoch": self._epoch, "slots": slots}
        elif self._resumed.get("slots"):
            state["train_states"] = {"epoch": self._resumed.get("epoch"), "slots": dict(self._resumed["slots"])}
        return state

    @override
    def load_state_dict(self, state_dict: Mapping[str, Any]) -> None:
        """Restore :meth:`state_dict`; missing keys keep their defaults."""
        for stage, info in dict(state_dict.get("info", {})).items():
            self._info[stage] = info_from_state(info)
        saved = state_dict.get("train_states") or {}
        self._resumed = {"epoch": saved.get("epoch"), "slots": dict(saved.get("slots") or {})} if saved else {}
        if self._resumed:  # the metrics are rebuilt (and given these states) at the next training batch
            self._modules = {s: m for s, m in self._modules.items() if s not in self._resumed["slots"]}
            self._buffers = {s: b for s, b in self._buffers.items() if s in self._modules}
            self._engines = {s: e for s, e in self._engines.items() if s in self._modules}
            self._updated["train"] = False


__all__ = ["METRIC_NAMES", "MetricCurves", "build_metrics"]
