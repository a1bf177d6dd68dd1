"""``ErrorDistributionMonitor``: where the errors are, in bounded device memory, written once per epoch."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import replace
from typing import Any, Literal

import torch
from lightning.pytorch import LightningModule, Trainer
from lightning.pytorch.utilities import rank_zero_warn
from torch import Tensor
from typing_extensions import override

from lightning_lossdiag._outputs import fetch_outputs
from lightning_lossdiag.callbacks._base import log_scalars, to_host
from lightning_lossdiag.callbacks._class_engine import (
    DEFAULT_BUDGET,
    DEFAULT_BUFFER_BYTES,
    DEFAULT_MAX_CONFUSION,
    EngineConfig,
    engine_for,
)
from lightning_lossdiag.callbacks._class_state import ClassificationState
from lightning_lossdiag.callbacks._error_states import RegressionState, StageState, regression_ranges
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
    outputs_per_target_message,
    point_prediction,
    regression_column,
    step_parts,
)
from lightning_lossdiag.dashboards.writers import tensorboard_writers
from lightning_lossdiag.diagnosis.findings import Finding
from lightning_lossdiag.diagnosis.record import record_for

Gather = Callable[[Tensor], Tensor]
_OWNER = "ErrorDistributionMonitor"


def make_gather(trainer: Any, pl_module: LightningModule) -> Gather:
    """A gather that stacks a tensor from every rank on dim 0 (a plain ``unsqueeze`` on one process)."""
    if int(getattr(trainer, "world_size", 1)) > 1:
        return lambda t: pl_module.all_gather(t)  # type: ignore[return-value]
    return lambda t: t.unsqueeze(0)


class ErrorDistributionMonitor(StagedOutputsCallback):
    """Distributions of the errors of each evaluated stage, as TensorBoard histograms, images, PR curves and text.

    Every batch updates fixed-size statistics on the model's device (histograms with fixed edges, a bounded uniform
    sample of rows for the scatter plot, the top-k worst samples, per-target-bin errors, confusion and binned PR
    counts); memory does not grow with the number of samples and no value is read on the host between epoch ends.
    The first batch of a stage reads a few numbers once (task, kind of predictions, value ranges); after each epoch
    the ranges are re-fitted from that epoch's merged sample, so later histograms follow the shrinking errors.
    Values outside a range land in under/overflow and are reported as ``errors/<stage>/out_of_range``. At the end of
    each epoch the states are merged across DDP ranks; only global rank 0 writes.

    | key | kind | when | tasks |
    |---|---|---|---|
    | ``errors/<stage>/residual``, ``errors/<stage>/abs_error`` | histogram | epoch end | regression |
    | ``errors/<stage>/pred_vs_true`` | image | epoch end | regression |
    | ``errors/<stage>/confusion_matrix`` | image | epoch end | binary, multiclass (many classes: the most
    confused ones plus "other") |
    | ``errors/<stage>/pr_curve/<class>`` | PR curve | epoch end | classification up to ``max_classes`` (binary:
    ``1``) |
    | ``errors/<stage>/pr_curve/micro``, ``errors/<stage>/pr_curve/worst_<rank>`` | PR curve | epoch end | more than
    ``max_classes`` classes (``worst_01`` is the worst class, named in ``worst_classes``) |
    | ``errors/<stage>/class_recall``, ``errors/<stage>/class_precision`` | histogram | epoch end | more than
    ``max_classes`` classes (one value per class) |
    | ``errors/<stage>/worst_classes`` | text | epoch end | classification (recall, precision, F1, AP, most
    confused with) |
    | ``errors/<stage>/confused_pairs`` | text | epoch end | more than ``max_classes`` classes (multiclass) |
    | ``errors/<stage>/true_class_prob`` | histogram | epoch end | classification |
    | ``errors/<stage>/reliability`` | image | epoch end | classification (accuracy against mean confidence per bin) |
    | ``errors/<stage>/target_dist``, ``errors/<stage>/pred_dist`` | histogram | epoch end | all |
    | ``errors/<stage>/worst`` | text | epoch end | all |
    | ``errors/<stage>/constant_pred_std`` | scalar | epoch end | all (mean per-class std of probabilities) |
    | ``errors/<stage>/majority_pred_share`` | scalar | epoch end | binary, multiclass |
    | ``errors/<stage>/out_of_range`` | scalar | epoch end | all (share of values outside the histogram ranges) |
    | ``errors/<stage>/samples`` | scalar | epoch end | all |
    | ``errors/<stage>/<term>/residual``, ``errors/<stage>/<term>/confusion_matrix``,
    ``errors/<stage>/<term>/pr_curve/<class>``, ``errors/<stage>/<term>/worst``, ... (every key above) |
    as above | epoch end | multi-task steps, each term's own task |

    Multi-task steps (``preds``/``target`` mappings ``head -> tensor``, e.g. a
    :class:`~lightning_lossdiag.losses.CompositeLoss`) get each key once per loss term, with the term after the stage
    (``errors/val/ctr/pr_curve/1``); each term's task comes from its own loss. Single-tensor steps keep the keys above.

    Run-record notes: ``task`` (multi-task: the terms' common task, if they share one) and ``data/class_counts``
    (``{"stage", "counts"}``, classification; multiclass adds each class's ``"recall"`` and ``"sequence": True`` for
    ``(B, T, V)`` outputs; multi-task adds ``"heads": {term: counts}``). A regression module whose ``(N, 1)``
    predictions meet ``(N,)`` targets gets a ``shape_broadcast`` finding (and is squeezed).

    Args:
        stages: stages to watch, from ``"train"``, ``"val"``, ``"test"``.
        task: ``"auto"`` or a task to force.
        bins: histogram bins.
        residual_range: ``(low, high)`` for the residual histogram (default: fitted from the data).
        sample_size: rows kept for the scatter plot.
        worst_k: rows of the worst-samples table.
        target_bins: target bins of the absolute-error-by-target chart (quantiles of the first batch).
        num_classes: classes when the predictions' dim 1 does not say it.
        log_every_n_epochs: write every this many epochs of the stage.
        thresholds: thresholds of the binned PR curves.
        class_dim: the class dimension of the predictions: ``None`` tells it from the shapes (``(N, C, d1, ...)``
            with ``(N, d1, ...)`` targets, or ``(B, T, V)`` with ``(B, T)``), ``1`` or ``-1`` where both fit.
        ignore_index: a target value left out of every statistic (``-100`` tokens, ``255`` void pixels); targets
            outside ``[0, C)`` are always left out; the criterion's ``ignore_index`` is used when it has one.
        max_classes: the largest class count with a full confusion matrix and one PR curve per class; beyond, the
            most confused classes (plus "other"), the micro PR curve and those of the ``worst_classes`` worst
            classes, per-class recall and precision as histograms across classes and a table of the worst classes.
        worst_classes: classes in the worst-classes table and PR curves of many-class tasks.
        budget: values of ``rows x classes`` per step for the PR counts, probability moments and histograms: a
            uniform sample of ``budget // classes`` rows (every row while the batch fits), each weighing
            ``rows / sampled``, so the curves stay unbiased. Counts, confusions, losses and worst rows use every row.

    Example:
        >>> monitor = ErrorDistributionMonitor(stages=("val",), bins=32)
        >>> monitor.layout_entries()
        {'Errors: val': ['errors/val/constant_pred_std', 'errors/val/majority_pred_share', 'errors/val/out_of_range']}
    """

    def __init__(
        self,
        stages: Sequence[Literal["train", "val", "test"]] = ("val", "test"),
        task: Literal["auto", "regression", "binary", "multiclass", "multilabel"] = "auto",
        bins: int = 64,
        residual_range: tuple[float, float] | None = None,
        sample_size: int = 2048,
        worst_k: int = 20,
        target_bins: int = 8,
        num_classes: int | None = None,
        log_every_n_epochs: int = 1,
        thresholds: int = 101,
        class_dim: int | None = None,
        ignore_index: int | None = None,
        max_classes: int = DEFAULT_MAX_CONFUSION,
        worst_classes: int = 10,
        budget: int = DEFAULT_BUDGET,
    ) -> None:
        bad = [s for s in stages if s not in ("train", "val", "test")]
        if not stages or bad:
            raise ValueError(f"`stages` must be a non-empty subset of ('train', 'val', 'test'), got {stages!r}")
        if task != "auto" and task not in TASKS:
            raise ValueError(f"`task` must be 'auto' or one of {TASKS}, got {task!r}")
        for name, value, low in (
            ("bins", bins, 2),
            ("sample_size", sample_size, 1),
            ("worst_k", worst_k, 1),
            ("target_bins", target_bins, 1),
            ("log_every_n_epochs", log_every_n_epochs, 1),
            ("thresholds", thresholds, 2),
            ("max_classes", max_classes, 2),
            ("worst_classes", worst_classes, 1),
            ("budget", budget, 1),
        ):
            if not isinstance(value, int) or isinstance(value, bool) or value < low:
                raise ValueError(f"`{name}` must be an integer >= {low}, got {value!r}")
        if residual_range is not None and (
            len(residual_range) != 2 or not float(residual_range[0]) < float(residual_range[1])
        ):
            raise ValueError(f"`residual_range` must be (low, high) with low < high, or None, got {residual_range!r}")
        if num_classes is not None and (not isinstance(num_classes, int) or num_classes < 2):
            raise ValueError(f"`num_classes` must be an integer >= 2 or None, got {num_classes!r}")
        self.stages = tuple(stages)
        self.task = task
        self.bins = bins
        self.residual_range = (float(residual_range[0]), float(residual_range[1])) if residual_range else None
        self.sample_size = sample_size
        self.worst_k = worst_k
        self.target_bins = target_bins
        self.num_classes = num_classes
        self.log_every_n_epochs = log_every_n_epochs
        self.thresholds = thresholds
        self.class_dim = check_class_dim(class_dim)
        self.ignore_index = check_ignore_index(ignore_index)
        self.max_classes = max_classes
        self.worst_classes = worst_classes
        self.budget = budget
        self._engines: dict[str, Any] = {}
        self._states: dict[str, StageState] = {}
        self._info: dict[str, TaskInfo] = {}
        self._ranges: dict[str, dict[str, Any]] = {}
        self._epochs: dict[str, int] = {}
        self._warned: set[str] = set()
        self._refused: set[str] = set()  # slots left out, said once (class indices as predictions, ...)
        self._points: dict[str, int | None] = {}  # regression slots: the point column of multi-quantile outputs

    @property
    def state_key(self) -> str:
        """Distinguishes instances with different stages or tasks in one checkpoint."""
        return self._generate_state_key(stages=self.stages, task=self.task)

    # ---- hooks -----------------------------------------------------------------------------------------------
    @override
    def on_train_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._finish_epoch(trainer, pl_module, "train")

    @override
    def on_validation_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if not trainer.sanity_checking:
            self._finish_epoch(trainer, pl_module, "val")

    @override
    def on_test_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._finish_epoch(trainer, pl_module, "test")

    # ---- per batch (device only after the first batch) -------------------------------------------------------
    def _update(self, trainer: Trainer, pl_module: LightningModule, outputs: Any, stage: str) -> None:
        if stage not in self.stages:
            return
        step = fetch_outputs(pl_module, outputs, stage)
        parts = step_parts(step.preds, step.target, step.criterion) if step is not None else []
        if not parts:
            if stage not in self._warned:
                self._warned.add(stage)
                rank_zero_warn(
                    f"ErrorDistributionMonitor: the {stage} step handed no tensor `preds` and `target` (use LossMixin "
                    'or return {"loss", "preds", "target"}); no error distributions for this stage.'
                )
            return
        rank, world = int(trainer.global_rank), int(trainer.world_size)
        for term, criterion, preds, target in parts:
            slot = stage if term is None else f"{stage}/{term}"  # keys: errors/<stage>[/<term>]/...
            if slot in self._refused:
                continue
            if slot not in self._states:
                if label_predictions(preds, target, self.task):  # class indices, not scores: refused once
                    self._refuse(slot, label_predictions_message(_OWNER, slot, preds, "error distributions"))
                    continue
                if not self._start_slot(trainer, pl_module, slot, criterion, preds, target):
                    continue
            if self._info[slot].task == "regression":
                preds, _ = align_regression(point_prediction(preds, self._points.get(slot)), target)
            self._states[slot].update(preds, target, rank=rank, world=world)

    def _start_slot(
        self, trainer: Trainer, pl_module: LightningModule, slot: str, criterion: Any, preds: Tensor, target: Tensor
    ) -> bool:
        """First batch of a stage (or of one term of it): infer the task and fit ranges (one-time host reads).

        ``False``: the slot is refused (several regression outputs per target that no loss explains).
        """
        info = self._info.get(slot) or infer_task_info(
            criterion, preds, target, self.task, self.class_dim, self.ignore_index
        )
        if self.num_classes is not None and info.task in ("multiclass", "multilabel"):
            info = replace(info, num_classes=self.num_classes)
        if info.task == "regression":
            usable, column = regression_column(criterion, preds, target)  # multi-quantile outputs: the median
            if not usable:
                self._refuse(slot, outputs_per_target_message(_OWNER, slot, preds, target, "error distributions"))
                return False
            self._points[slot] = column
            preds = point_prediction(preds, column)
        self._info[slot] = info
        _note_task(record_for(trainer).notes, self._info, slot)
        if info.task == "regression":
            aligned, changed = align_regression(preds, target)
            if changed and criterion is None:
                record_for(trainer).add_finding(_broadcast_finding(slot, preds, target, int(trainer.global_step)))
            if slot not in self._ranges:
                gather = make_gather(trainer, pl_module)
                self._ranges[slot] = regression_ranges(aligned, target, self.target_bins, self.residual_range, gather)
        else:
            config = EngineConfig(self.thresholds, self.budget, self.max_classes, self.bins, self.worst_k, True)
            steps = int(getattr(trainer, "log_every_n_steps", 0) or 50)
            self._engines[slot] = engine_for(trainer, slot, info, config, preds.device, steps, DEFAULT_BUFFER_BYTES)
        self._states[slot] = self._make_state(slot, preds.device, int(trainer.global_rank))
        return True

    def _make_state(self, slot: str, device: torch.device, rank: int = 0) -> StageState:
        info = self._info[slot]
        if info.task == "regression":
            # each DDP rank draws its own sample keys (a shared seed would pick the same positions on every rank)
            return RegressionState(self._ranges[slot], self.bins, self.sample_size, self.worst_k, device, seed=rank)
        return ClassificationState(self._engines[slot], max_classes=self.max_classes, worst_classes=self.worst_classes)

    def _slots(self, stage: str) -> list[str]:
        """The state keys of ``stage``: ``stage`` itself and ``stage/<term>`` for multi-task steps (sorted)."""
        return sorted(s for s in self._states if s == stage or s.startswith(f"{stage}/"))

    # ---- epoch end (host reads allowed) ------------------------------------------------------------------------
    def _finish_epoch(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        slots = self._slots(stage)
        if not slots or stage not in self.stages:
            return
        epoch = self._epochs.get(stage, 0)
        self._epochs[stage] = epoch + 1
        rank = int(trainer.global_rank)
        if epoch % self.log_every_n_epochs == 0:
            step = int(trainer.global_step)
            record = record_for(trainer)
            scalars: dict[str, Tensor] = {}
            counts: dict[str, list[int]] = {}
            for slot in slots:
                state = self._states[slot]
                state.sync(make_gather(trainer, pl_module))  # epoch end: collective merge across ranks
                scalars.update(state.scalars(f"errors/{slot}"))
                slot_counts = state.class_counts()  # epoch end: host list of class counts (classification)
                if slot_counts is not None:
                    counts[slot] = slot_counts
            log_scalars(trainer, to_host(scalars), step)  # one host transfer of the epoch's scalars
            for slot in slots:
                _note_task(record.notes, self._info, slot)
            if stage in counts:
                note: dict[str, Any] = {"stage": stage, "counts": counts[stage]}
                if self._info[stage].class_dim == -1:  # (B, T, V): the classes are a sequence model's tokens
                    note["sequence"] = True
                state = self._states[stage]
                if isinstance(state, ClassificationState) and self._info[stage].task == "multiclass":
                    note["recall"] = state.class_recall()  # epoch end host read: each class's, for the rules
                record.notes["data/class_counts"] = note
            elif counts:
                heads = {slot.split("/", 1)[1]: c for slot, c in counts.items()}
                first = next(iter(heads.values()))
                record.notes["data/class_counts"] = {"stage": stage, "counts": first, "heads": heads}
            for writer in tensorboard_writers(trainer):
                for slot in slots:
                    self._states[slot].write(writer, f"errors/{slot}", step)  # epoch end, rank 0: figures, text
            for slot in slots:
                state = self._states[slot]
                if isinstance(state, RegressionState) and self.residual_range is None:
                    self._ranges[slot] = state.refit_ranges(self.target_bins)  # epoch end: next epoch's ranges
        for slot in slots:
            finish = getattr(self._states[slot], "finish", None)
            if finish is not None:
                finish()  # the shared counts start fresh at the slot's next step
            self._states[slot] = self._make_state(slot, self._states[slot].device, rank)  # fresh, for the next epoch

    def held_bytes(self) -> int:
        """Bytes of device state held for all stages (bounded: independent of the number of samples)."""
        return sum(s.nbytes() for s in self._states.values())

    def layout_entries(self) -> dict[str, list[str]]:
        """Custom-scalars charts: title -> tag regexes (one chart of the error scalars per stage, and per term seen)."""
        terms = [s for s in self._info if "/" in s and s.split("/", 1)[0] in self.stages]
        return {
            f"Errors: {s}": [
                f"errors/{s}/constant_pred_std",
                f"errors/{s}/majority_pred_share",
                f"errors/{s}/out_of_range",
            ]
            for s in [*self.stages, *terms]
        }

    @override
    def state_dict(self) -> dict[str, Any]:
        return {
            "info": {s: info_state(i) for s, i in self._info.items()},
            "ranges": {s: dict(r) for s, r in self._ranges.items()},
            "epochs": dict(self._epochs),
        }

    @override
    def load_state_dict(self, state_dict: Mapping[str, Any]) -> None:
        for stage, info in dict(state_dict.get("info", {})).items():
            self._info[stage] = info_from_state(info)
        self._ranges = {s: dict(r) for s, r in dict(state_dict.get("ranges", {})).items()}
        self._epochs = {s: int(e) for s, e in dict(state_dict.get("epochs", {})).items()}


def _note_task(notes: dict[str, Any], infos: Mapping[str, TaskInfo], slot: str) -> None:
    """Run-record note ``task``: the stage's task, or the terms' common task (left alone when terms differ)."""
    if "/" not in slot:
        notes["task"] = infos[slot].task
        return
    stage = slot.split("/", 1)[0]
    tasks = {i.task for s, i in infos.items() if s.startswith(f"{stage}/")}
    if len(tasks) == 1:
        notes["task"] = next(iter(tasks))


def _broadcast_finding(stage: str, preds: Tensor, target: Tensor, step: int) -> Finding:
    return Finding(
        "shape_broadcast",
        "warning",
        f"{stage} predictions have shape {tuple(preds.shape)} but targets {tuple(target.shape)}. A loss such as "
        f"mse_loss broadcasts the pair to {(int(preds.shape[0]), int(target.shape[0]))} and compares every prediction "
        "with every target, so the model learns the mean. Squeeze the last dim of the predictions (or use LossMixin, "
        "which checks this).",
        step=step,
        evidence={"stage": stage, "preds_shape": list(preds.shape), "target_shape": list(target.shape)},
    )


__all__ = ["ErrorDistributionMonitor", "make_gather"]
