"""Precision-recall curves from binned counts, written with ``add_pr_curve_raw``.

Each class has two count vectors over ``T`` fixed thresholds ``linspace(0, 1, T)`` (counted on the device by
:mod:`lightning_lossdiag.stats.curves`): how many positives and how many negatives had their largest threshold
``<= p`` at index ``j``. A reverse cumulative sum gives, for every threshold ``t_j``, the positives and negatives
predicted positive (``p >= t_j``), which is torchmetrics' binned rule.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from torch import Tensor


def confusion_at_thresholds(pos: Tensor, neg: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """``(tp, fp, tn, fn)``, each ``(C, T)``: counts with ``p >= t_j`` predicted positive.

    Example:
        >>> tp, fp, tn, fn = confusion_at_thresholds(torch.tensor([[0, 2, 0]]), torch.tensor([[1, 0, 0]]))
        >>> tp.tolist(), fp.tolist(), tn.tolist(), fn.tolist()
        ([[2, 2, 0]], [[1, 0, 0]], [[0, 1, 1]], [[0, 0, 2]])
    """
    tp = pos.flip(-1).cumsum(-1).flip(-1)
    fp = neg.flip(-1).cumsum(-1).flip(-1)
    fn = pos.sum(-1, keepdim=True) - tp
    tn = neg.sum(-1, keepdim=True) - fp
    return tp, fp, tn, fn


def precision_recall(tp: np.ndarray, fp: np.ndarray, fn: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Precision and recall per threshold.

    Where nothing is predicted positive, precision is 1 (the end point of every PR curve; torchmetrics 1.9 gives
    ``nan`` there, which TensorBoard cannot draw); recall is 0 when a class has no positives.

    Example:
        >>> p, r = precision_recall(np.array([2, 1, 0]), np.array([2, 0, 0]), np.array([0, 1, 2]))
        >>> p.tolist(), r.tolist()
        ([0.5, 1.0, 1.0], [1.0, 0.5, 0.0])
    """
    tp, fp, fn = (np.asarray(a, dtype=np.float64) for a in (tp, fp, fn))
    pred_pos = tp + fp
    precision = np.divide(tp, pred_pos, out=np.ones_like(tp), where=pred_pos > 0)
    real_pos = tp + fn
    recall = np.divide(tp, real_pos, out=np.zeros_like(tp), where=real_pos > 0)
    return precision, recall


def pr_curve_raw_args(tp: Any, fp: Any, tn: Any, fn: Any) -> dict[str, Any]:
    """Keyword arguments for ``SummaryWriter.add_pr_curve_raw`` from host count vectors of one class.

    Example:
        >>> args = pr_curve_raw_args([2, 1, 0], [2, 0, 0], [0, 2, 2], [0, 1, 2])
        >>> args["num_thresholds"], args["precision"].tolist()
        (3, [0.5, 1.0, 1.0])
    """
    tp_a, fp_a, tn_a, fn_a = (np.asarray(a, dtype=np.float64).reshape(-1) for a in (tp, fp, tn, fn))
    precision, recall = precision_recall(tp_a, fp_a, fn_a)
    return {
        "true_positive_counts": tp_a,
        "false_positive_counts": fp_a,
        "true_negative_counts": tn_a,
        "false_negative_counts": fn_a,
        "precision": precision,
        "recall": recall,
        "num_thresholds": int(tp_a.shape[0]),
    }


def write_pr_curves(writer: Any, prefix: str, pos: np.ndarray, neg: np.ndarray, names: list[str], step: int) -> None:
    """Write one PR curve per class as ``<prefix>/<name>`` from host ``(C, T)`` count arrays."""
    counts = confusion_at_thresholds(
        torch.as_tensor(pos, dtype=torch.float64), torch.as_tensor(neg, dtype=torch.float64)
    )  # host arrays at epoch end
    tp, fp, tn, fn = (t.numpy() for t in counts)  # already on the host (epoch end): no device read
    for c, name in enumerate(names):
        writer.add_pr_curve_raw(f"{prefix}/{name}", global_step=step, **pr_curve_raw_args(tp[c], fp[c], tn[c], fn[c]))


__all__ = [
    "confusion_at_thresholds",
    "pr_curve_raw_args",
    "precision_recall",
    "write_pr_curves",
]
