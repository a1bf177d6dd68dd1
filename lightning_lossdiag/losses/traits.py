"""What a loss module expects: the task it serves and what its first input is (logits, probabilities, ...).

The mixin uses this to check inputs (a sigmoid before ``BCEWithLogitsLoss``, a softmax before ``CrossEntropyLoss``),
and the error-distribution callback to infer the task.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from torch import nn

from lightning_lossdiag.losses.composite import CompositeLoss
from lightning_lossdiag.losses.dice import DiceLoss
from lightning_lossdiag.losses.focal import FocalLoss
from lightning_lossdiag.losses.regression import LogCoshLoss, QuantileLoss

Task = Literal["regression", "binary", "multiclass", "multilabel", "multitask", "other"]
Inputs = Literal["logits", "probabilities", "log_probabilities", "values", "other"]


@dataclass(frozen=True)
class LossTraits:
    """The task a loss serves and what its first argument must be.

    Attributes:
        task: ``"regression"``, ``"binary"``, ``"multiclass"``, ``"multilabel"``, ``"multitask"`` or ``"other"``.
        inputs: ``"logits"``, ``"probabilities"``, ``"log_probabilities"``, ``"values"`` or ``"other"``.
    """

    task: Task
    inputs: Inputs


def _table() -> list[tuple[type, Task, Inputs]]:
    """(class, task, inputs), most specific classes first; torch classes missing from older releases are skipped."""
    rows: list[tuple[str, Task, Inputs]] = [
        ("BCEWithLogitsLoss", "binary", "logits"),
        ("BCELoss", "binary", "probabilities"),
        ("SoftMarginLoss", "binary", "other"),
        ("CrossEntropyLoss", "multiclass", "logits"),
        ("LinearCrossEntropyLoss", "multiclass", "other"),
        ("NLLLoss", "multiclass", "log_probabilities"),
        ("MultiMarginLoss", "multiclass", "logits"),
        ("MultiLabelSoftMarginLoss", "multilabel", "logits"),
        ("MultiLabelMarginLoss", "multilabel", "other"),
        ("MSELoss", "regression", "values"),
        ("L1Loss", "regression", "values"),
        ("HuberLoss", "regression", "values"),
        ("SmoothL1Loss", "regression", "values"),
        ("GaussianNLLLoss", "regression", "values"),
        ("KLDivLoss", "other", "log_probabilities"),
    ]
    table: list[tuple[type, Task, Inputs]] = [
        (getattr(nn, name), task, inputs) for name, task, inputs in rows if hasattr(nn, name)
    ]
    table += [(LogCoshLoss, "regression", "values"), (QuantileLoss, "regression", "values")]
    table.append((CompositeLoss, "multitask", "other"))
    return table


_TABLE = _table()


def describe_loss(criterion: nn.Module) -> LossTraits:
    """The :class:`LossTraits` of a loss module (``other``/``other`` for modules it does not know).

    A custom loss can declare its own traits with a ``lossdiag_traits`` attribute holding a :class:`LossTraits`.
    ``FocalLoss`` and ``DiceLoss`` report their ``mode`` (a ``FocalLoss`` with ``mode=None`` reports the mode it
    inferred at its last forward, ``other`` before one).

    Example:
        >>> describe_loss(nn.BCEWithLogitsLoss())
        LossTraits(task='binary', inputs='logits')
        >>> describe_loss(nn.NLLLoss())
        LossTraits(task='multiclass', inputs='log_probabilities')
    """
    declared = getattr(criterion, "lossdiag_traits", None)
    if isinstance(declared, LossTraits):
        return declared
    if isinstance(criterion, FocalLoss):
        mode = criterion.mode or criterion.inferred_mode
        if mode == "binary":
            return LossTraits("binary", "logits")
        return LossTraits("multiclass", "logits") if mode == "multiclass" else LossTraits("other", "logits")
    if isinstance(criterion, DiceLoss):
        inputs: Inputs = "logits" if criterion.from_logits else "probabilities"
        mode_task: dict[str, Task] = {"binary": "binary", "multiclass": "multiclass", "multilabel": "multilabel"}
        return LossTraits(mode_task[criterion.mode], inputs)
    if isinstance(criterion, nn.PoissonNLLLoss):
        return LossTraits("regression", "other" if criterion.log_input else "values")
    for cls, task, inputs in _TABLE:
        if isinstance(criterion, cls):
            return LossTraits(task, inputs)
    return LossTraits("other", "other")


__all__ = ["Inputs", "LossTraits", "Task", "describe_loss"]
