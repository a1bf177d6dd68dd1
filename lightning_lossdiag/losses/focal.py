"""Focal loss (Lin et al., 2017, "Focal Loss for Dense Object Detection") computed from logits."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import torch
import torch.nn.functional as F  # noqa: N812
from torch import Tensor, nn

from lightning_lossdiag.losses._checks import as_float_tensor, check_number, check_reduction, is_number
from lightning_lossdiag.losses._errors import LossConfigError
from lightning_lossdiag.losses._registry import register_loss

_MODES = ("binary", "multiclass")


@register_loss(
    "focal",
    aliases=("FocalLoss", "focal_loss"),
    summary="Cross-entropy down-weighted on easy examples, for class imbalance (binary or multiclass, from logits).",
    task="classification",
)
class FocalLoss(nn.Module):
    r"""Focal loss from logits: cross-entropy scaled by :math:`(1 - p_t)^\gamma` so easy examples count less.

    With :math:`p_t` the probability the model gives the true class,

    .. math:: \mathrm{FL} = -\alpha_t \, (1 - p_t)^{\gamma} \, \log p_t

    * ``binary``: ``preds`` and ``target`` have the same shape, targets are 0/1 (soft targets work too);
      :math:`p = \sigma(x)`, :math:`p_t = p\,y + (1 - p)(1 - y)`, :math:`\alpha_t = \alpha\,y + (1 - \alpha)(1 - y)`
      for a float ``alpha``. ``reduction="mean"`` averages over the (not ignored) elements, as ``BCEWithLogitsLoss``.
    * ``multiclass``: logits ``(N, C, ...)``, integer targets ``(N, ...)``; :math:`p_t = \mathrm{softmax}(x)_y`,
      :math:`\alpha_t = \alpha_y` for a list of ``C`` class weights. ``reduction="mean"`` divides the sum by
      :math:`\sum \alpha_t` over the not ignored targets, as ``CrossEntropyLoss(weight=...)``.

    With ``gamma=0`` the loss equals ``BCEWithLogitsLoss`` (element weights :math:`\alpha_t`) or
    ``CrossEntropyLoss(weight=alpha)``.

    Args:
        alpha: binary: the weight of positives in [0, 1]; multiclass: one non-negative weight per class; ``None``
            for no weighting.
        gamma: focusing parameter, >= 0 (2 in the paper).
        mode: ``"binary"``, ``"multiclass"``, or ``None`` to infer it from the shapes at each forward (same shape:
            binary; target with one dimension less and an integer dtype: multiclass).
        reduction: ``"mean"``, ``"sum"`` or ``"none"``.
        ignore_index: targets equal to this value do not contribute.

    Example:
        >>> loss = FocalLoss(gamma=2.0)
        >>> loss(torch.tensor([3.0, -3.0]), torch.tensor([1.0, 0.0])) < 1e-3
        tensor(True)
    """

    def __init__(
        self,
        alpha: float | Sequence[float] | Tensor | None = None,
        gamma: float = 2.0,
        mode: Literal["binary", "multiclass"] | None = None,
        reduction: Literal["mean", "sum", "none"] = "mean",
        ignore_index: int = -100,
    ) -> None:
        super().__init__()
        if mode is not None and mode not in _MODES:
            raise LossConfigError(f"`mode` must be one of 'binary', 'multiclass' or None, got {mode!r}")
        self.gamma = check_number("gamma", gamma, low=0.0)
        self.reduction = check_reduction(reduction)
        if not isinstance(ignore_index, int) or isinstance(ignore_index, bool):
            raise LossConfigError(f"`ignore_index` must be an integer, got {type(ignore_index).__name__}")
        self.ignore_index = ignore_index
        self.mode = mode
        self.inferred_mode: str | None = mode
        self.alpha: float | None = None
        self.class_weights: Tensor | None
        if alpha is None or is_number(alpha):
            if alpha is not None:
                self.alpha = check_number("alpha", alpha, low=0.0, high=1.0)
            if mode == "multiclass" and alpha is not None:
                raise LossConfigError(
                    f"`alpha` for a multiclass focal loss must be a list of class weights or None, got {alpha!r}"
                )
            self.register_buffer("class_weights", None)
        else:
            weights = as_float_tensor("alpha", alpha)
            if weights.dim() != 1 or weights.numel() < 2:
                raise LossConfigError(f"`alpha` as a list must hold one weight per class (>= 2), got {alpha!r}")
            if bool((weights < 0).any()):  # one-time check of a constructor argument, on the host
                raise LossConfigError(f"`alpha` class weights must be >= 0, got {alpha!r}")
            if mode == "binary":
                raise LossConfigError(f"`alpha` for a binary focal loss must be a number in [0, 1], got {alpha!r}")
            self.register_buffer("class_weights", weights)

    def _infer_mode(self, preds: Tensor, target: Tensor) -> str:
        if self.mode is not None:
            return self.mode
        if preds.shape == target.shape:
            return "binary"
        if (
            target.dim() == preds.dim() - 1
            and not target.is_floating_point()
            and preds.shape[1] >= 2
            and preds.shape[:1] + preds.shape[2:] == target.shape
        ):
            return "multiclass"
        raise ValueError(
            "FocalLoss cannot tell binary from multiclass for preds of shape "
            f"{tuple(preds.shape)} and target of shape {tuple(target.shape)} (dtype {target.dtype}): binary needs "
            "equal shapes, multiclass needs logits (N, C, ...) with C >= 2 and integer targets (N, ...). "
            "Set `mode` or fix the shapes."
        )

    def forward(self, preds: Tensor, target: Tensor) -> Tensor:
        """Focal loss of logits ``preds`` against ``target`` (no host reads)."""
        mode = self._infer_mode(preds, target)
        self.inferred_mode = mode
        if mode == "binary":
            return self._binary(preds, target)
        return self._multiclass(preds, target)

    def _binary(self, preds: Tensor, target: Tensor) -> Tensor:
        if self.class_weights is not None:
            raise ValueError("FocalLoss: binary inputs need `alpha` as a number in [0, 1] or None, not a list")
        if preds.shape != target.shape:
            raise ValueError(
                f"FocalLoss(mode='binary') needs preds and target of the same shape, got {tuple(preds.shape)} and "
                f"{tuple(target.shape)}"
            )
        valid = target != self.ignore_index
        y = torch.where(valid, target.to(preds.dtype), torch.zeros((), dtype=preds.dtype, device=preds.device))
        ce = -(y * F.logsigmoid(preds) + (1 - y) * F.logsigmoid(-preds))
        p = torch.sigmoid(preds)
        p_t = p * y + (1 - p) * (1 - y)
        loss = (1 - p_t).pow(self.gamma) * ce
        if self.alpha is not None:
            loss = loss * (self.alpha * y + (1 - self.alpha) * (1 - y))
        weight = valid.to(preds.dtype)
        loss = loss * weight
        if self.reduction == "mean":
            return loss.sum() / weight.sum()
        return loss.sum() if self.reduction == "sum" else loss

    def _multiclass(self, preds: Tensor, target: Tensor) -> Tensor:
        if self.alpha is not None:
            raise ValueError("FocalLoss: multiclass inputs need `alpha` as a list of class weights or None")
        if target.is_floating_point() or preds.dim() < 2 or preds.shape[:1] + preds.shape[2:] != target.shape:
            raise ValueError(
                "FocalLoss(mode='multiclass') needs logits (N, C, ...) and integer targets (N, ...), got preds "
                f"{tuple(preds.shape)} and target {tuple(target.shape)} of dtype {target.dtype}"
            )
        num_classes = preds.shape[1]
        if self.class_weights is not None and self.class_weights.numel() != num_classes:
            raise ValueError(
                f"FocalLoss: `alpha` has {self.class_weights.numel()} class weights, but preds have "
                f"{num_classes} classes"
            )
        valid = target != self.ignore_index
        safe = torch.where(valid, target, torch.zeros((), dtype=target.dtype, device=target.device)).long()
        log_p_t = F.log_softmax(preds, dim=1).gather(1, safe.unsqueeze(1)).squeeze(1)
        loss = -(1 - log_p_t.exp()).pow(self.gamma) * log_p_t
        weight = valid.to(preds.dtype)
        if self.class_weights is not None:
            weight = weight * self.class_weights.to(preds.dtype).index_select(0, safe.reshape(-1)).view_as(safe)
        loss = loss * weight
        if self.reduction == "mean":
            return loss.sum() / weight.sum()
        return loss.sum() if self.reduction == "sum" else loss

    def extra_repr(self) -> str:
        """Arguments shown by ``repr``."""
        return f"gamma={self.gamma}, alpha={self.alpha}, mode={self.mode!r}, reduction={self.reduction!r}"


__all__ = ["FocalLoss"]
