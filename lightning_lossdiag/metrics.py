"""Metrics of our own, as torchmetrics ``Metric`` classes (sum states, so they merge across DDP ranks).

:class:`DirectionalAccuracy` is the share of steps of a sequence where the predicted change has the sign of the true
change. Forecasts with a small error can still get the direction wrong, which is what a trading or control rule
acts on.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor
from torchmetrics import Metric
from torchmetrics.classification import MulticlassStatScores


def _directional_accuracy_update(preds: Tensor, target: Tensor) -> tuple[Tensor, Tensor]:
    """Count matching change directions along the last dim (device tensors only, no host reads)."""
    if preds.shape != target.shape:
        raise ValueError(
            f"`preds` and `target` must have the same shape, got {tuple(preds.shape)} and {tuple(target.shape)}"
        )
    if preds.ndim < 1 or preds.shape[-1] < 2:
        raise ValueError(
            f"`preds` must have a last (time) dimension of length >= 2 to have changes, got shape {tuple(preds.shape)}"
        )
    pred_dir = torch.sign(torch.diff(preds.float(), dim=-1))
    true_dir = torch.sign(torch.diff(target.float(), dim=-1))
    correct = (pred_dir == true_dir).sum()
    return correct, torch.tensor(true_dir.numel(), device=preds.device)


def directional_accuracy(preds: Tensor, target: Tensor) -> Tensor:
    """Share of steps ``t`` along the last dim where ``sign(p[t+1] - p[t]) == sign(y[t+1] - y[t])``.

    A step with no change in both counts as a match; a step where only one of the two is flat does not.

    Example:
        >>> directional_accuracy(torch.tensor([0.0, 1.0, 0.5, 0.7]), torch.tensor([0.0, 2.0, 3.0, 1.0]))
        tensor(0.3333)
    """
    correct, total = _directional_accuracy_update(preds, target)
    return correct.float() / total


class DirectionalAccuracy(Metric):
    r"""Directional accuracy of sequence forecasts, accumulated over batches.

    .. math:: \mathrm{DA} = \frac{1}{|S|} \sum_{(i, t) \in S}
        \mathbb{1}\left[\operatorname{sign}(\Delta \hat y_{i,t}) = \operatorname{sign}(\Delta y_{i,t})\right],
        \quad \Delta y_{i,t} = y_{i,t+1} - y_{i,t}

    over every sequence ``i`` and step ``t`` along the last dimension. ``update`` only adds two counters on the
    device; ``compute`` divides (``nan`` before any update).

    Example:
        >>> m = DirectionalAccuracy()
        >>> m.update(torch.tensor([[1.0, 2.0, 3.0]]), torch.tensor([[1.0, 0.0, 4.0]]))
        >>> m.update(torch.tensor([[0.0, 1.0]]), torch.tensor([[5.0, 6.0]]))
        >>> m.compute()
        tensor(0.6667)
    """

    is_differentiable = False
    higher_is_better = True
    full_state_update = False
    correct: Tensor
    total: Tensor

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.add_state("correct", default=torch.tensor(0, dtype=torch.long), dist_reduce_fx="sum")
        self.add_state("total", default=torch.tensor(0, dtype=torch.long), dist_reduce_fx="sum")

    def update(self, preds: Tensor, target: Tensor) -> None:
        """Add the matching directions of one batch (``preds`` and ``target`` of shape ``(..., T)``, ``T >= 2``)."""
        correct, total = _directional_accuracy_update(preds, target)
        self.correct += correct
        self.total += total

    def compute(self) -> Tensor:
        """The share of matching directions so far."""
        return self.correct.double().div(self.total).float()


class BalancedAccuracy(MulticlassStatScores):
    """Balanced accuracy of binary labels: the mean recall over the classes present in the targets.

    The definition of scikit-learn's ``balanced_accuracy_score``: a class with no target row does not count (a
    macro recall over both classes would count it as 0 and halve the score of an epoch that holds one class only).
    Counts only (``tp``, ``fn`` per class), so it merges across batches and DDP ranks exactly; no host read.

    Example:
        >>> metric = BalancedAccuracy()
        >>> metric.update(torch.tensor([1, 0, 0, 0]), torch.tensor([1, 1, 0, 0]))
        >>> metric.compute()
        tensor(0.7500)
        >>> metric = BalancedAccuracy()
        >>> metric.update(torch.tensor([1, 0]), torch.tensor([0, 0]))  # one class only: its recall
        >>> metric.compute()
        tensor(0.5000)
    """

    def __init__(self, **kwargs: Any) -> None:
        kwargs.setdefault("validate_args", False)
        super().__init__(num_classes=2, average=None, **kwargs)

    def compute(self) -> Tensor:
        """Mean of ``tp / (tp + fn)`` over the classes with at least one target row (0 when there is none)."""
        tp, _fp, _tn, fn = self._final_state()
        support = tp + fn
        present = support > 0
        recall = tp.double() / support.clamp(min=1).double()
        return ((recall * present).sum() / present.sum().clamp(min=1)).float()


class QuantileCoverage(Metric):
    r"""How often targets fall at or below each predicted quantile, and inside the outermost two.

    For quantile outputs ``(..., Q)`` and targets ``(...)`` (or ``(..., 1)``): the share of targets at or below the
    prediction of each quantile ``q`` (a calibrated model gives ``q``), then the share inside
    ``[lowest, highest]`` (a calibrated model gives ``q_max - q_min``). ``update`` adds counts on the device (sum
    states: they merge across DDP ranks); ``compute`` returns the ``Q + 1`` shares, ``nan`` before any update.

    Example:
        >>> m = QuantileCoverage([0.1, 0.5, 0.9])
        >>> m.update(torch.tensor([[0.0, 1.0, 2.0], [0.0, 1.0, 2.0]]), torch.tensor([0.5, 3.0]))  # example input
        >>> # at or below q0.1: 0 of 2, q0.5: 1, q0.9: 1; inside [q0.1, q0.9]: 1
        >>> m.compute().tolist()  # example read, off the hot path
        [0.0, 0.5, 0.5, 0.5]
    """

    is_differentiable = False
    higher_is_better = None
    full_state_update = False
    below: Tensor
    inside: Tensor
    total: Tensor

    def __init__(self, quantiles: list[float], **kwargs: Any) -> None:
        super().__init__(**kwargs)
        if len(quantiles) < 2:
            raise ValueError(f"`quantiles` must hold at least two quantiles, got {quantiles!r}")
        self.quantiles = [float(q) for q in quantiles]
        self._low = min(range(len(quantiles)), key=lambda i: self.quantiles[i])
        self._high = max(range(len(quantiles)), key=lambda i: self.quantiles[i])
        self.add_state("below", default=torch.zeros(len(quantiles), dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("inside", default=torch.zeros((), dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("total", default=torch.zeros((), dtype=torch.float64), dist_reduce_fx="sum")

    def update(self, preds: Tensor, target: Tensor) -> None:
        """Add a batch: ``preds`` ``(..., Q)``, ``target`` ``(...)`` or ``(..., 1)``. No host read."""
        q = preds.shape[-1]
        p = preds.reshape(-1, q).float()
        t = target.reshape(-1, 1).float()
        at_or_below = t <= p  # (n, Q)
        self.below += at_or_below.sum(0)
        self.inside += (at_or_below[:, self._high] & (t[:, 0] >= p[:, self._low])).sum()
        self.total += p.shape[0]

    def compute(self) -> Tensor:
        """The share of targets at or below each quantile, then inside the outermost two (``Q + 1`` values)."""
        return (torch.cat([self.below, self.inside[None]]) / self.total).float()


__all__ = ["BalancedAccuracy", "DirectionalAccuracy", "QuantileCoverage", "directional_accuracy"]
