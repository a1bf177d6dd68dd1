"""Which task a step solves (regression, binary, multiclass, multilabel), what the predictions are, and rows.

Pure functions over tensors, shared by ``ErrorDistributionMonitor`` and ``MetricCurves``. The criterion decides when
it is known (:func:`lightning_lossdiag.losses.describe_loss`); otherwise shapes and dtypes do, with one host read of
a few numbers on the FIRST batch only (0/1 targets? predictions in ``[0, 1]``? rows summing to 1?).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal, get_args

import torch
from torch import Tensor, nn

from lightning_lossdiag.callbacks._class_dim import (
    check_class_dim,
    check_ignore_index,
    class_dimension,
    likely_class_dim,
)

Task = Literal["regression", "binary", "multiclass", "multilabel"]
Inputs = Literal["logits", "probabilities", "log_probabilities", "values"]
TASKS: tuple[str, ...] = get_args(Task)
INPUTS: tuple[str, ...] = get_args(Inputs)


@dataclass(frozen=True)
class TaskInfo:
    """What one stage's predictions are.

    Attributes:
        task: ``"regression"``, ``"binary"``, ``"multiclass"`` or ``"multilabel"``.
        inputs: what ``preds`` hold: ``"logits"``, ``"probabilities"``, ``"log_probabilities"`` or ``"values"``.
        num_classes: classes (multiclass, 2 for binary), labels (multilabel), ``None`` for regression.
        class_dim: the dimension of ``preds`` that holds the classes: ``1`` (torch's ``(N, C, d1, ...)``) or the
            last one, ``-1`` (``(B, T, V)`` sequences).
        ignore_index: a target value whose rows are left out of every statistic (besides the values outside
            ``[0, C)``, which are always left out of multiclass statistics).
        soft_target: multiclass targets handed as class probabilities shaped like the predictions (label smoothing
            in the targets, mixup or cutmix, distillation): each row's most likely class is its label
            (:func:`hard_labels`).
    """

    task: Task
    inputs: Inputs
    num_classes: int | None = None
    class_dim: int = 1
    ignore_index: int | None = None
    soft_target: bool = False


def info_state(info: TaskInfo) -> dict[str, Any]:
    """A :class:`TaskInfo` as plain checkpoint data."""
    return {
        "task": info.task,
        "inputs": info.inputs,
        "num_classes": info.num_classes,
        "class_dim": info.class_dim,
        "ignore_index": info.ignore_index,
        "soft_target": info.soft_target,
    }


def info_from_state(state: Mapping[str, Any]) -> TaskInfo:
    """The :class:`TaskInfo` of :func:`info_state` (older checkpoints: class dim 1, no ignore index)."""
    return TaskInfo(
        state.get("task", "regression"),
        state.get("inputs", "values"),
        state.get("num_classes"),
        int(state.get("class_dim", 1)),
        state.get("ignore_index"),
        bool(state.get("soft_target", False)),
    )


def _describe(criterion: nn.Module | None) -> tuple[str | None, str | None]:
    """``(task, inputs)`` from the loss registry's traits, ``(None, None)`` when the criterion is not known."""
    if criterion is None:
        return None, None
    try:
        from lightning_lossdiag.losses import describe_loss
    except ImportError:  # the registry is optional for this module
        return None, None
    try:
        traits = describe_loss(criterion)
    except (TypeError, ValueError, KeyError, LookupError):
        return None, None
    task = getattr(traits, "task", None)
    inputs = getattr(traits, "inputs", None)
    return (task if task in TASKS else None), (inputs if inputs in INPUTS else None)


def _refine_binary(task: str, preds: Tensor) -> str:
    """Sigmoid losses serve both binary and multilabel; ``(N, L)`` predictions with ``L > 1`` are multilabel."""
    if task in ("binary", "multilabel"):
        return "multilabel" if preds.ndim == 2 and preds.shape[1] > 1 else "binary"
    return task


_FACTS = (
    *("min", "max", "binary_target", "row_sum_err", "exp_row_sum_err"),
    *("target_min", "target_sum_1", "target_sum_last"),
)
_SUM_TOLERANCE = 1e-3  # rows of float32 probabilities sum to 1 within this (half precision: see _tolerance)


def _tolerance(dtype: torch.dtype) -> float:
    """How far from 1 rows of probabilities stored in ``dtype`` may sum: bfloat16 rounds each value by up to 0.4%."""
    return max(_SUM_TOLERANCE, 2 * torch.finfo(dtype).eps) if dtype.is_floating_point else _SUM_TOLERANCE


def _first_batch_facts(preds: Tensor, target: Tensor) -> dict[str, float]:
    """A few numbers of the first batch in ONE host read (one-time; never on later batches).

    Besides the predictions' range and row sums: whether the targets are 0/1, and for float targets shaped like the
    predictions their minimum and how far their sums over dim 1 and over the last dim are from 1 (class
    probabilities as targets).
    """
    p = preds.detach().float()
    t = target.detach().float()
    inf = torch.full((), float("inf"), device=p.device)
    binary_target = ((t == 0) | (t == 1)).all().float()
    facts = [p.min(), p.max(), binary_target]
    if p.ndim >= 2 and p.shape[1] > 1:
        dim = likely_class_dim(p, target)
        facts.append((p.sum(dim) - 1).abs().max())
        facts.append((p.exp().sum(dim) - 1).abs().max())
    else:
        facts += [inf] * 2
    if target.is_floating_point() and t.shape == p.shape and t.ndim >= 2 and t.numel():
        facts += [t.min(), (t.sum(1) - 1).abs().max(), (t.sum(-1) - 1).abs().max()]
    else:
        facts += [inf] * 3
    host = torch.stack([f.reshape(()) for f in facts]).tolist()  # one-time host read (first batch)
    out = dict(zip(_FACTS, host, strict=True))
    out["tolerance"], out["target_tolerance"] = _tolerance(preds.dtype), _tolerance(target.dtype)
    return out


def _soft_dim(facts: dict[str, float], ndim: int) -> int | None:
    """The dim along which float targets shaped like the predictions are class probabilities, else ``None``.

    Non-negative rows summing to 1 over dim 1 (torch's convention, and ``(N, C)``), else over the last dim
    (``(B, T, V)`` distillation targets).
    """
    if not facts["target_min"] >= 0.0:
        return None
    tolerance = facts.get("target_tolerance", _SUM_TOLERANCE)
    if facts["target_sum_1"] < tolerance:
        return 1
    return ndim - 1 if facts["target_sum_last"] < tolerance else None


def _is_soft(preds: Tensor, target: Tensor) -> bool:
    """Float targets of the predictions' shape (2-D or more): class probabilities for a multiclass task."""
    return target.is_floating_point() and preds.ndim >= 2 and tuple(target.shape) == tuple(preds.shape)


def hard_labels(target: Tensor, info: TaskInfo) -> Tensor:
    """The labels of a step's targets: the most likely class of soft targets (:attr:`TaskInfo.soft_target`).

    Other targets are returned as they are. No host read.

    Example:
        >>> soft = torch.tensor([[0.1, 0.9, 0.0], [0.7, 0.2, 0.1]])  # example input, off the hot path (mixup, ...)
        >>> hard_labels(soft, TaskInfo("multiclass", "logits", 3, soft_target=True)).tolist()  # off the hot path
        [1, 0]
    """
    return target.argmax(info.class_dim) if info.soft_target else target


def _infer_from_shapes(preds: Tensor, target: Tensor, facts: dict[str, float]) -> str:
    if not preds.is_floating_point():
        return "regression"
    if _is_soft(preds, target):  # class probabilities as targets (one-hot rows too: one class a row)
        dim = _soft_dim(facts, preds.ndim)
        if dim is not None and preds.shape[dim] > 1:
            return "multiclass"
    if not target.is_floating_point() and target.dtype != torch.bool and preds.ndim == target.ndim + 1:
        if facts["binary_target"] == 1.0 and _one_more_dim(preds, target):
            return "binary"  # (N, 1) logits with (N,) 0/1 labels, (N, 1, H, W) with (N, H, W): one output, one class
        return "multiclass"  # (N, C, ...) with (N, ...) labels, or (B, T, V) with (B, T): class_dimension() tells
    if facts["binary_target"] == 1.0 and (preds.shape == target.shape or _one_more_dim(preds, target)):
        return _refine_binary("binary", preds)
    return "regression"


def _one_more_dim(a: Tensor, b: Tensor) -> bool:
    """One of the two is the other's shape with one more dim of size 1, anywhere.

    ``(N, 1)`` logits of a one-output head with ``(N,)`` labels, or a one-channel segmentation head's
    ``(N, 1, H, W)`` with ``(N, H, W)`` masks: the same values in the same order.
    """
    longer, shorter = (tuple(a.shape), tuple(b.shape)) if a.ndim > b.ndim else (tuple(b.shape), tuple(a.shape))
    if len(longer) != len(shorter) + 1:
        return False
    return any(longer[i] == 1 and longer[:i] + longer[i + 1 :] == shorter for i in range(len(longer)))


def _infer_inputs(task: str, facts: dict[str, float]) -> str:
    if task == "regression":
        return "values"
    low, high = facts["min"], facts["max"]
    if task == "multiclass":
        tolerance = facts.get("tolerance", _SUM_TOLERANCE)
        if low >= 0.0 and high <= 1.0 and facts["row_sum_err"] < tolerance:
            return "probabilities"
        if high <= 0.0 and facts["exp_row_sum_err"] < tolerance:
            return "log_probabilities"
        return "logits"
    return "probabilities" if low >= 0.0 and high <= 1.0 else "logits"


def infer_task_info(
    criterion: nn.Module | None,
    preds: Tensor,
    target: Tensor,
    task: str = "auto",
    class_dim: int | None = None,
    ignore_index: int | None = None,
) -> TaskInfo:
    """Task, kind of predictions and number of classes of a first batch (one host read when the criterion is unknown).

    Args:
        criterion: the loss module, or ``None``.
        preds: the first batch's predictions.
        target: the first batch's targets.
        task: ``"auto"`` or a task to force.
        class_dim: the class dimension of ``preds`` (``1`` or ``-1``); ``None`` tells it from the shapes (see
            :func:`class_dimension`).
        ignore_index: a target value to leave out; ``None`` takes the criterion's ``ignore_index`` when it has one.

    Example:
        >>> infer_task_info(None, torch.randn(8, 5), torch.randint(0, 5, (8,)))
        TaskInfo(task='multiclass', inputs='logits', num_classes=5, class_dim=1, ignore_index=None, soft_target=False)
        >>> infer_task_info(None, torch.randn(2, 7, 50), torch.randint(0, 50, (2, 7))).class_dim
        -1
    """
    if task != "auto" and task not in TASKS:
        raise ValueError(f"`task` must be 'auto' or one of {TASKS}, got {task!r}")
    crit_task, crit_inputs = _describe(criterion)
    facts: dict[str, float] | None = None
    if task != "auto":
        chosen = task
    elif crit_task is not None:
        chosen = _refine_binary(crit_task, preds)
    else:
        facts = _first_batch_facts(preds, target)
        chosen = _infer_from_shapes(preds, target, facts)
    if crit_inputs is not None:
        inputs = crit_inputs
    elif chosen == "regression":
        inputs = "values"
    else:
        facts = facts if facts is not None else _first_batch_facts(preds, target)
        inputs = _infer_inputs(chosen, facts)
    num_classes: int | None = None
    dim = 1
    soft = chosen == "multiclass" and _is_soft(preds, target)
    if chosen == "binary":
        num_classes = 2
    elif chosen in ("multiclass", "multilabel"):
        if preds.ndim < 2:
            raise ValueError(f"{chosen} predictions must have a class dimension (N, C, ...), got {tuple(preds.shape)}")
        known = criterion is not None and crit_task is not None  # a torch loss: classes on dim 1
        if soft:  # class probabilities as targets: the dim given, torch's dim 1 for a loss, else where rows sum to 1
            if class_dim is not None:
                dim = class_dimension(preds, preds, "multilabel", class_dim)  # validates 1 / -1 for these shapes
            elif known:
                dim = 1
            else:
                facts = facts if facts is not None else _first_batch_facts(preds, target)
                dim = _soft_dim(facts, preds.ndim) or 1
        else:
            dim = class_dimension(preds, target, chosen, class_dim if class_dim is not None else (1 if known else None))
        num_classes = int(preds.shape[dim])
    if ignore_index is None:
        crit_ignore = getattr(criterion, "ignore_index", None)
        ignore_index = crit_ignore if isinstance(crit_ignore, int) and not isinstance(crit_ignore, bool) else None
    return TaskInfo(chosen, inputs, num_classes, dim if dim == 1 else -1, ignore_index, soft)  # type: ignore[arg-type]


def infer_task(criterion: nn.Module | None, preds: Tensor, target: Tensor, task: str = "auto") -> Task:
    """The task of a batch: the criterion's when known, else from shapes and dtypes (``task`` forces one).

    Float targets shaped like 2-D or larger predictions whose rows are class probabilities (non-negative, summing
    to 1 over dim 1 or the last dim; one-hot rows too) give ``"multiclass"``; other targets of 0/1 shaped like the
    predictions, or differing by a trailing 1 (``(N, 1)`` logits of a one-output head with ``(N,)`` labels), give
    ``"binary"`` (``"multilabel"`` for ``(N, L)``, ``L > 1``); integer targets with
    ``(N, C, ...)`` predictions give ``"multiclass"``; anything else is ``"regression"``.

    Example:
        >>> infer_task(None, torch.randn(4), torch.tensor([0.0, 1.0, 1.0, 0.0]))
        'binary'
        >>> infer_task(None, torch.randn(4, 1), torch.tensor([0.0, 1.0, 1.0, 0.0]))  # example input: a one-output head
        'binary'
        >>> infer_task(None, torch.randn(4, 3), torch.rand(4, 3))
        'regression'
        >>> infer_task(None, torch.randn(4, 3), torch.tensor([[0.9, 0.05, 0.05]] * 4))  # example input: smoothed rows
        'multiclass'
    """
    return infer_task_info(criterion, preds, target, task).task


def to_probabilities(preds: Tensor, traits: Any) -> Tensor:
    """Probabilities from ``preds`` given ``traits`` (anything with ``task`` and ``inputs``, e.g. :class:`TaskInfo`).

    Logits go through a sigmoid (binary, multilabel) or a softmax over dim 1 (multiclass), log-probabilities
    through ``exp``; probabilities and regression values are returned as float.

    Example:
        >>> to_probabilities(torch.tensor([0.0]), TaskInfo("binary", "logits", 2))
        tensor([0.5000])
    """
    task, inputs = getattr(traits, "task", None), getattr(traits, "inputs", None)
    preds = preds.float()
    if task == "regression" or inputs in ("values", "probabilities"):
        return preds
    if inputs == "log_probabilities":
        return preds.exp()
    if inputs == "logits":
        return preds.softmax(dim=getattr(traits, "class_dim", 1)) if task == "multiclass" else preds.sigmoid()
    raise ValueError(f"`traits.inputs` must be one of {INPUTS}, got {inputs!r}")


def as_rows(probs: Tensor, target: Tensor, info: TaskInfo) -> tuple[Tensor, Tensor, int]:
    """Flatten a batch to rows: ``(values, targets, rows_per_sample)``.

    Regression: ``(M,)`` values and targets. Binary: ``(M, 1)`` probabilities and 0/1 targets. Multiclass:
    ``(M, C)`` probabilities (class dim moved last) and ``(M,)`` class indices. Multilabel: ``(M, L)`` and ``(M, L)``.
    ``rows_per_sample`` is ``M // N`` (``N`` = batch size), e.g. the pixels of a segmentation map.

    Example:
        >>> info = TaskInfo("multiclass", "probabilities", 3)
        >>> v, t, k = as_rows(torch.rand(2, 3, 4), torch.randint(0, 3, (2, 4)), info)
        >>> tuple(v.shape), tuple(t.shape), k
        ((8, 3), (8,), 4)
    """
    n = max(1, int(target.shape[0])) if target.ndim else 1
    if info.task == "regression":
        values, labels = probs.reshape(-1), target.reshape(-1).float()
    elif info.task == "binary":
        values, labels = probs.reshape(-1, 1), target.reshape(-1, 1).float()
    elif info.task == "multiclass":
        c = int(probs.shape[info.class_dim])
        values, labels = probs.movedim(info.class_dim, -1).reshape(-1, c), target.reshape(-1).long()
    else:
        c = int(probs.shape[info.class_dim])
        values = probs.movedim(info.class_dim, -1).reshape(-1, c)
        labels = target.movedim(info.class_dim, -1).reshape(-1, c).float()
    if values.shape[0] != labels.shape[0]:
        raise ValueError(
            f"predictions and targets do not line up for a {info.task} task: {tuple(probs.shape)} vs "
            f"{tuple(target.shape)}"
        )
    return values, labels, max(1, values.shape[0] // n)


def step_parts(preds: Any, target: Any, criterion: nn.Module | None) -> list[tuple[str | None, Any, Tensor, Tensor]]:
    """Split a step into ``(term, criterion, preds, target)`` parts: one per head of a multi-task step.

    Tensors give one part with term ``None``. Mappings ``head -> tensor`` give one part per term of a composite
    criterion (anything with ``losses``, ``output_keys`` and ``target_keys``, like
    :class:`~lightning_lossdiag.losses.CompositeLoss`), each with the term's own loss; without one, one part per key
    found in both mappings, with no criterion. Parts whose tensors are missing are skipped. No host read.

    Example:
        >>> from lightning_lossdiag.losses import CompositeLoss
        >>> loss = CompositeLoss({"ctr": "bce_with_logits", "cvr": {"loss": "mse", "output": "cvr_out"}})
        >>> preds = {"ctr": torch.zeros(2), "cvr_out": torch.ones(2)}
        >>> target = {"ctr": torch.ones(2), "cvr": torch.ones(2)}
        >>> parts = step_parts(preds, target, loss)
        >>> [(term, type(crit).__name__, p.tolist()) for term, crit, p, _ in parts]
        [('ctr', 'BCEWithLogitsLoss', [0.0, 0.0]), ('cvr', 'MSELoss', [1.0, 1.0])]
    """
    if isinstance(preds, Tensor) and isinstance(target, Tensor):
        return [(None, criterion, preds, target)]
    if not isinstance(preds, Mapping) or not isinstance(target, Mapping):
        return []
    losses = getattr(criterion, "losses", None)
    out_keys, tgt_keys = getattr(criterion, "output_keys", None), getattr(criterion, "target_keys", None)
    terms: list[tuple[str, nn.Module | None, Any, Any]]
    if isinstance(losses, nn.ModuleDict) and isinstance(out_keys, Mapping) and isinstance(tgt_keys, Mapping):
        terms = [(str(n), losses[n], out_keys.get(n, n), tgt_keys.get(n, n)) for n in losses]
    else:
        terms = [(str(k), None, k, k) for k in preds if k in target]
    parts: list[tuple[str | None, Any, Tensor, Tensor]] = []
    for term, loss, p_key, t_key in terms:
        p, t = preds.get(p_key), target.get(t_key)
        if isinstance(p, Tensor) and isinstance(t, Tensor):
            parts.append((term, loss, p, t))
    return parts


def label_predictions(preds: Tensor, target: Tensor, task: str = "auto") -> bool:
    """Integer or bool predictions shaped like the targets: class indices (``logits.argmax(1)``), not scores.

    Metrics, curves and calibration need the scores, so such a step is refused with a message (regression of class
    indices would be nonsense). ``task="regression"`` forces integer values to count as regression. Shapes and
    dtypes only: no host read.

    Example:
        >>> label_predictions(torch.tensor([2, 0, 1]), torch.tensor([2, 1, 1]))  # example input, off the hot path
        True
        >>> label_predictions(torch.randn(3, 4), torch.tensor([2, 1, 1]))  # example input, off the hot path
        False
    """
    if task == "regression" or preds.is_floating_point() or preds.is_complex():
        return False
    return tuple(preds.shape) == tuple(target.shape) or _one_more_dim(preds, target)


def label_predictions_message(owner: str, slot: str, preds: Tensor, what: str) -> str:
    """The one-time message of a step that handed class indices as predictions (:func:`label_predictions`)."""
    return (
        f"{owner}: the {slot} step handed {str(preds.dtype).replace('torch.', '')} predictions of shape "
        f"{tuple(preds.shape)}, shaped like the targets: class indices (such as `logits.argmax(1)`), not scores. "
        f"Accuracy, curves and calibration need the scores: hand over the logits (`preds=logits.detach()`) or the "
        f"probabilities. No {what} for this stage (pass `task='regression'` if these are integer regression values)."
    )


def point_column(criterion: Any, preds: Tensor, target: Tensor) -> int | None:
    """The column of a multi-quantile loss's ``(..., Q)`` outputs that is the point prediction, else ``None``.

    That is the quantile nearest the median (``QuantileLoss([0.1, 0.5, 0.9])``: column 1), for targets ``(...)`` or
    ``(..., 1)``. The error statistics and regression metrics read that column. One-time host read of the loss's
    quantiles (first batch).

    Example:
        >>> from lightning_lossdiag.losses import QuantileLoss
        >>> point_column(QuantileLoss([0.1, 0.5, 0.9]), torch.zeros(4, 3), torch.zeros(4))
        1
        >>> point_column(None, torch.zeros(4, 3), torch.zeros(4)) is None
        True
    """
    values = loss_quantiles(criterion)
    if values is None or preds.ndim == 0:
        return None
    q = len(values)
    if preds.shape[-1] != q or tuple(target.shape) not in (tuple(preds.shape[:-1]), (*preds.shape[:-1], 1)):
        return None
    return min(range(q), key=lambda i: (abs(values[i] - 0.5), i))


def loss_quantiles(criterion: Any) -> list[float] | None:
    """The quantiles of a multi-quantile loss (``QuantileLoss([0.1, 0.5, 0.9])``), else ``None``.

    One-time host read of the loss's constant buffer (first batch).
    """
    quantiles = getattr(criterion, "quantiles", None)
    if not isinstance(quantiles, Tensor) or quantiles.ndim != 1 or quantiles.numel() < 2:
        return None
    return [float(q) for q in quantiles.tolist()]  # one-time host read (first batch)


def regression_column(criterion: Any, preds: Tensor, target: Tensor) -> tuple[bool, int | None]:
    """``(usable, column)`` of a regression slot's first batch: its :func:`point_column`, and whether it is usable.

    ``usable`` is ``False`` when the point prediction still has several values per target that no loss explains.

    Example:
        >>> target = torch.zeros(4)
        >>> regression_column(None, torch.zeros(4, 1), target), regression_column(None, torch.zeros(4, 3), target)
        ((True, None), (False, None))
    """
    column = point_column(criterion, preds, target)
    return point_prediction(preds, column).numel() == target.numel(), column


def point_prediction(preds: Tensor, column: int | None) -> Tensor:
    """``preds`` itself, or its ``column`` of the last dim (:func:`point_column`): a view, no kernel."""
    return preds if column is None else preds[..., column]


def outputs_per_target_message(owner: str, slot: str, preds: Tensor, target: Tensor, what: str) -> str:
    """The one-time message of regression outputs that hold several values per target and no loss to tell them."""
    return (
        f"{owner}: the {slot} step handed regression predictions of shape {tuple(preds.shape)} for targets of shape "
        f"{tuple(target.shape)}: several outputs per target, and no loss tells which is the prediction. Hand over "
        "the point prediction (the median of quantile outputs, the mean of a (mean, variance) head), or use "
        f"LossMixin with the `quantile` loss, whose median column is read. No {what} for this stage."
    )


def align_regression(preds: Tensor, target: Tensor) -> tuple[Tensor, bool]:
    """``preds`` reshaped to ``target``'s shape when only the shape differs (``(N, 1)`` vs ``(N,)``).

    Returns the predictions and whether they had to be reshaped (a loss on the raw pair would have broadcast to
    ``(N, N)``). Shapes are metadata: no host read.

    Example:
        >>> p, changed = align_regression(torch.zeros(4, 1), torch.zeros(4))
        >>> tuple(p.shape), changed
        ((4,), True)
    """
    if preds.shape == target.shape:
        return preds, False
    if preds.numel() != target.numel():
        raise ValueError(
            f"regression predictions and targets must have the same number of elements, got shapes "
            f"{tuple(preds.shape)} and {tuple(target.shape)}"
        )
    return preds.reshape(target.shape), True


__all__ = [
    "INPUTS",
    "TASKS",
    "Inputs",
    "Task",
    "TaskInfo",
    "align_regression",
    "as_rows",
    "check_class_dim",
    "check_ignore_index",
    "class_dimension",
    "hard_labels",
    "info_from_state",
    "info_state",
    "infer_task",
    "label_predictions",
    "label_predictions_message",
    "loss_quantiles",
    "outputs_per_target_message",
    "point_column",
    "point_prediction",
    "regression_column",
    "infer_task_info",
    "step_parts",
    "to_probabilities",
]
