"""The torchmetrics of :class:`~lightning_lossdiag.MetricCurves`: which ones, how a batch feeds them, their states.

Pure helpers (no Trainer): the metrics of a task, one batched update on the device with no host read, and the
metrics' states as plain checkpoint data.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
import torchmetrics.classification as tmc
import torchmetrics.regression as tmr
from torch import Tensor
from torchmetrics import Metric

from lightning_lossdiag.callbacks._task import TaskInfo, align_regression, as_rows, to_probabilities
from lightning_lossdiag.metrics import BalancedAccuracy, DirectionalAccuracy

_CLASSIFICATION = ("accuracy", "precision", "recall", "f1", "auroc", "average_precision")
# from the shared counts (stats/class_metrics.py)
_CALIBRATION = ("ece", "mce", "ece_adaptive", "ece_classwise", "brier", "confidence")
METRIC_NAMES: dict[str, tuple[str, ...]] = {
    "regression": ("mae", "mse", "rmse", "r2", "explained_variance", "directional_accuracy"),
    "binary": (*_CLASSIFICATION, "balanced_accuracy", *_CALIBRATION),
    "multiclass": (*_CLASSIFICATION, "recall_per_class", "top5_accuracy", "perplexity", *_CALIBRATION),
    "multilabel": (*_CLASSIFICATION, "recall_per_class", *_CALIBRATION),
}
ALL_NAMES = sorted({n for names in METRIC_NAMES.values() for n in names})
TITLES = {
    "mae": "MAE",
    "mse": "MSE",
    "rmse": "RMSE",
    "r2": "R2",
    "auroc": "AUROC",
    "f1": "F1",
    "top5_accuracy": "Top-5 accuracy",
    "ece": "ECE",
    "mce": "MCE",
    "ece_adaptive": "Adaptive ECE",
    "ece_classwise": "Classwise ECE",
}
_CURVES = ("auroc", "average_precision")


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
            "balanced_accuracy": lambda: BalancedAccuracy(**kw),
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
    factories = _factories(info, thresholds)  # top5_accuracy and perplexity come from the shared counts only
    return {name: factories[name]() for name in names if name in factories}


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


#: the metric of a quantile loss's outputs (:class:`~lightning_lossdiag.metrics.QuantileCoverage`), added by the
#: callback when the loss tells the quantiles
QUANTILE_COVERAGE = "quantile_coverage"


def update_metrics(
    info: TaskInfo, metrics: Mapping[str, Metric], preds: Tensor, target: Tensor, column: int | None = None
) -> None:
    """Feed one batch (or several concatenated along dim 0) to the metrics of a task, on the device, no host read.

    ``column``: regression predictions are a quantile loss's ``(..., Q)`` outputs; the metrics read that column
    (the median), ``quantile_coverage`` all of them.

    Example:
        >>> info = TaskInfo("binary", "probabilities", 2)
        >>> metrics = build_metrics(info, 11, ["accuracy"], sequence=False)
        >>> update_metrics(info, metrics, torch.tensor([0.9, 0.2, 0.7]), torch.tensor([1.0, 0.0, 0.0]))
        >>> round(metrics["accuracy"].compute().item(), 4)
        0.6667
    """
    if info.task == "regression":
        full = preds
        preds, _ = align_regression(preds if column is None else preds[..., column], target)
        flat_p, flat_t = preds.reshape(-1).float(), target.reshape(-1).float()
        for name, metric in metrics.items():
            if name == QUANTILE_COVERAGE:
                metric.update(full, target)
            elif name == "directional_accuracy":
                metric.update(preds.float(), target.float())
            else:
                metric.update(flat_p, flat_t)
        return
    labels, label_target, curve_probs, curve_target = _label_inputs(info, to_probabilities(preds, info), target)
    for name, metric in metrics.items():
        if name in _CURVES:
            metric.update(curve_probs, curve_target)
        else:
            metric.update(labels, label_target)


def to_plain(value: Any) -> Any:
    """A torchmetrics state (a tensor, or a list of them) as plain data: ``[dtype, shape, values]``.

    Example:
        >>> to_plain(torch.tensor([1, 2]))
        ['int64', [2], [1, 2]]
    """
    if isinstance(value, Tensor):  # checkpoint save, not the per-step path: a host read per state
        return [str(value.dtype).removeprefix("torch."), list(value.shape), value.detach().reshape(-1).cpu().tolist()]
    return {"items": [to_plain(v) for v in value]}


def restore_states(metric: Metric, saved: Mapping[str, Any]) -> None:
    """Put :func:`to_plain` states back into a fresh ``metric`` on its device (one-time, when a resumed slot starts).

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


__all__ = ["ALL_NAMES", "METRIC_NAMES", "TITLES", "build_metrics", "restore_states", "to_plain", "update_metrics"]
