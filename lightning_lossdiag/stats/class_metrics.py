"""Classification metrics from :class:`~lightning_lossdiag.stats.classification.ClassCounts`: pure tensor formulas.

The values equal torchmetrics' functional results on the same rows (``validate_args=False``, binned curves with the
same thresholds): accuracy is micro, precision, recall and F1 are macro (for multiclass, classes that are neither
present nor predicted are left out of the mean, as torchmetrics does; for multilabel every label counts), AUROC and
average precision are the macro means of the per-class binned areas (a class with no positive scores 0 there, as in
torchmetrics). Nothing here reads the host.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from lightning_lossdiag.stats.calibration import adaptive_ece, classwise_ece
from lightning_lossdiag.stats.curves import binned_auroc, binned_average_precision

_BLOCK = 1024
NAMES = (
    "accuracy",
    "precision",
    "recall",
    "f1",
    "auroc",
    "average_precision",
    "balanced_accuracy",
    "recall_per_class",
    "top5_accuracy",
    "perplexity",
    "ece",
    "mce",
    "ece_adaptive",
    "ece_classwise",
    "brier",
    "confidence",
)


def _div(num: Tensor, den: Tensor) -> Tensor:
    return torch.where(den > 0, num / den.clamp_min(1e-300), torch.zeros_like(num))


def stat_scores(counts: Any) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """``(tp, fp, tn, fn)`` per class (multilabel: per label) from ``per_class`` support, predicted and correct.

    Example:
        >>> from types import SimpleNamespace
        >>> per_class = torch.tensor([[2.0, 1.0], [1.0, 2.0], [1.0, 1.0]])  # example input, off the hot path
        >>> rows = torch.tensor([3.0, 0.0])  # example input, off the hot path
        >>> c = SimpleNamespace(task="multiclass", per_class=per_class, rows=rows, label_rows=torch.zeros(2))
        >>> [t.tolist() for t in stat_scores(c)]  # an example reads the host (epoch-end code)
        [[1.0, 1.0], [0.0, 1.0], [1.0, 1.0], [1.0, 0.0]]
    """
    support, predicted, correct = counts.per_class
    tp, fp, fn = correct, predicted - correct, support - correct
    total = counts.label_rows if counts.task == "multilabel" else counts.rows[0]
    return tp, fp, total - tp - fp - fn, fn


def class_metrics(counts: Any, names: tuple[str, ...] | list[str] = NAMES) -> dict[str, Tensor]:
    """The metrics ``names`` of a task (those that apply), as device tensors.

    ``recall_per_class`` is a ``(C,)`` tensor; every other value is 0-d. ``balanced_accuracy`` is binary only (the
    mean recall of the classes present). Multiclass adds ``top5_accuracy`` (at least 10 classes: the true class among
    the 5 highest scores) and ``perplexity`` (``exp`` of the mean negative log-likelihood of the true class, which is
    the mean cross-entropy when the predictions are logits). Calibration: ``ece`` and ``mce`` (15 equal-width bins),
    ``ece_adaptive`` (15 equal-mass bins merged from 1,024 fine ones), ``ece_classwise`` (the mean over classes of
    each class's 15-bin ECE), ``brier`` and ``confidence`` (see :mod:`~lightning_lossdiag.stats.calibration`).

    Example:
        >>> from lightning_lossdiag.stats.classification import ClassCounts
        >>> c = ClassCounts("binary", "probabilities", 2, thresholds=11)
        >>> probs = torch.tensor([0.9, 0.2, 0.7, 0.4])  # example input, off the hot path
        >>> labels = torch.tensor([1.0, 0.0, 0.0, 1.0])  # example input, off the hot path
        >>> c.update(probs, labels)
        >>> out = class_metrics(c, ["accuracy", "precision", "auroc"])  # device tensors
        >>> {k: round(v.item(), 3) for k, v in out.items()}  # an example reads the host (epoch-end code)
        {'accuracy': 0.5, 'precision': 0.5, 'auroc': 0.75}
    """
    tp, fp, tn, fn = stat_scores(counts)
    out: dict[str, Tensor] = {}
    binary = counts.task == "binary"
    if binary:
        pos = (tp[1], fp[1], fn[1])
        values = {
            "accuracy": _div(tp.sum(), counts.rows[0]),
            "precision": _div(pos[0], pos[0] + pos[1]),
            "recall": _div(pos[0], pos[0] + pos[2]),
            "f1": _div(2 * pos[0], 2 * pos[0] + pos[1] + pos[2]),
        }
        present = (tp + fn) > 0
        recalls = _div(tp, tp + fn)
        values["balanced_accuracy"] = _div((recalls * present).sum(), present.sum().double())
    else:
        if counts.task == "multilabel":
            weights = torch.ones_like(tp)
            accuracy = _div((tp + tn).sum(), (tp + tn + fp + fn).sum())
        else:
            weights = ((tp + fp + fn) > 0).double()
            accuracy = _div(tp.sum(), (tp + fn).sum())
        values = {
            "accuracy": accuracy,
            "precision": _div((_div(tp, tp + fp) * weights).sum(), weights.sum()),
            "recall": _div((_div(tp, tp + fn) * weights).sum(), weights.sum()),
            "f1": _div((_div(2 * tp, 2 * tp + fp + fn) * weights).sum(), weights.sum()),
            "recall_per_class": _div(tp, tp + fn),
        }
    calibration = getattr(counts, "calibration", None)
    if calibration is not None:
        values.update(calibration_errors(calibration))
        values["confidence"] = _div(calibration[1].sum(), calibration[0].sum())
        values["brier"] = _div(counts.brier[0], counts.brier[1])
    fine, classwise = getattr(counts, "calibration_fine", None), getattr(counts, "classwise", None)
    if fine is not None and counts.task in ("binary", "multilabel"):
        values["confidence"] = top_label_confidence(fine)  # comparable with the accuracy, as for multiclass
    if fine is not None:
        values["ece_adaptive"] = adaptive_ece(fine)
    if classwise is not None:
        values["ece_classwise"] = classwise_ece(classwise)
    blocks = counts.curves.split(_BLOCK)  # blocks of classes, each in float64 alone: small temporaries at 32k classes
    ranking = getattr(counts, "ranking", None)
    if counts.task == "multiclass" and ranking is not None:
        if getattr(counts, "top_k", 0):
            values["top5_accuracy"] = _div(ranking[0], counts.rows[0])
        values["perplexity"] = torch.exp(_div(ranking[1], counts.rows[0]))
    if "auroc" in names:
        values["auroc"] = torch.cat([binned_auroc(b.double()) for b in blocks]).mean()
    if "average_precision" in names:
        values["average_precision"] = torch.cat([binned_average_precision(b.double()) for b in blocks]).mean()
    for name in names:
        if name in values:
            out[name] = values[name]
    return out


def top_label_confidence(fine: Tensor) -> Tensor:
    """Mean ``max(p, 1 - p)`` from the ``(3, B)`` fine bins of positive-class probabilities (B even: 0.5 is an edge).

    The confidence of a binary decision at threshold 0.5, so that it compares with the accuracy (the positive-class
    mean would compare with the positive rate). Exact: each fine bin lies on one side of 0.5.

    Example:
        >>> fine = torch.zeros(3, 4, dtype=torch.float64)
        >>> fine[:, 0] = torch.tensor([1.0, 0.1, 0.0])  # example input, off the hot path; p = 0.1: confidence 0.9
        >>> fine[:, 3] = torch.tensor([1.0, 0.8, 1.0])  # example input, off the hot path; p = 0.8: confidence 0.8
        >>> round(top_label_confidence(fine).item(), 3)  # an example reads the host (epoch-end code)
        0.85
    """
    weight, confidence = fine[0], fine[1]
    half = weight.shape[0] // 2
    total = confidence[half:].sum() + (weight[:half] - confidence[:half]).sum()
    return _div(total, weight.sum())


def calibration_errors(bins: Tensor) -> dict[str, Tensor]:
    """``ece`` (expected calibration error, L1) and ``mce`` (maximum) from ``(3, B)`` bins: weight, confidence, hits.

    ``ECE = sum_b (n_b / N) |acc_b - conf_b|`` and ``MCE = max_b |acc_b - conf_b|`` over the bins, torchmetrics'
    binned formulas (empty bins count 0).

    Example:
        >>> bins = torch.tensor([[2.0, 0.0, 2.0], [0.4, 0.0, 1.8], [0.0, 0.0, 2.0]])  # example input, off the hot path
        >>> {k: round(v.item(), 3) for k, v in calibration_errors(bins).items()}  # example read (epoch-end code)
        {'ece': 0.15, 'mce': 0.2}
    """
    weight, confidence, hits = bins
    gap = (_div(hits, weight) - _div(confidence, weight)).abs()
    return {"ece": _div((gap * weight).sum(), weight.sum()), "mce": gap.amax()}


__all__ = ["NAMES", "calibration_errors", "class_metrics", "stat_scores", "top_label_confidence"]
