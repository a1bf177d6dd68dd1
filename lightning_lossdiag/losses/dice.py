"""Soft Dice loss for segmentation-style and imbalanced classification targets."""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F  # noqa: N812
from torch import Tensor, nn

from lightning_lossdiag.losses._checks import check_number, check_reduction
from lightning_lossdiag.losses._errors import LossConfigError
from lightning_lossdiag.losses._registry import register_loss

_MODES = ("binary", "multiclass", "multilabel")


@register_loss(
    "dice",
    aliases=("DiceLoss", "soft_dice"),
    summary="Soft Dice (1 - overlap) loss for segmentation and rare positives (binary, multiclass or multilabel).",
    task="classification",
)
class DiceLoss(nn.Module):
    r"""Soft Dice loss: one minus the soft overlap of predicted probabilities and targets, per class.

    For each class :math:`c`, with probabilities :math:`p` and 0/1 targets :math:`t` summed over the batch and every
    spatial position (ignored positions excluded),

    .. math:: \mathrm{dice}_c = \frac{2 \sum p_c t_c + s}{\sum p_c + \sum t_c + s}, \qquad
              \mathrm{loss}_c = 1 - \mathrm{dice}_c

    where :math:`s` is ``smooth``. ``reduction="mean"`` averages :math:`\mathrm{loss}_c` over the classes, ``"sum"``
    adds them, ``"none"`` returns the vector of per-class losses (length 1 in binary mode).

    * ``binary``: ``preds`` and ``target`` have the same shape, one class; :math:`p = \sigma(x)`.
    * ``multilabel``: ``preds`` and ``target`` are ``(N, C, ...)``; :math:`p = \sigma(x)` per class.
    * ``multiclass``: logits ``(N, C, ...)`` and integer targets ``(N, ...)``; :math:`p = \mathrm{softmax}(x)` over
      dim 1, :math:`t` one-hot.

    Args:
        mode: ``"binary"``, ``"multiclass"`` or ``"multilabel"``.
        smooth: :math:`s` >= 0; keeps the ratio defined for classes absent from the batch.
        from_logits: apply the sigmoid / softmax first; ``False`` when ``preds`` are already probabilities.
        reduction: ``"mean"``, ``"sum"`` or ``"none"`` (over classes).
        ignore_index: positions whose target equals this value are left out (``None``: none).

    Example:
        >>> loss = DiceLoss("binary", smooth=0.0, from_logits=False)
        >>> loss(torch.tensor([1.0, 0.0]), torch.tensor([1.0, 0.0]))
        tensor(0.)
    """

    def __init__(
        self,
        mode: Literal["binary", "multiclass", "multilabel"],
        smooth: float = 1.0,
        from_logits: bool = True,
        reduction: Literal["mean", "sum", "none"] = "mean",
        ignore_index: int | None = None,
    ) -> None:
        super().__init__()
        if mode not in _MODES:
            raise LossConfigError(f"`mode` must be one of {', '.join(map(repr, _MODES))}, got {mode!r}")
        if not isinstance(from_logits, bool):
            raise LossConfigError(f"`from_logits` must be true or false, got {from_logits!r}")
        if ignore_index is not None and (not isinstance(ignore_index, int) or isinstance(ignore_index, bool)):
            raise LossConfigError(f"`ignore_index` must be an integer or None, got {ignore_index!r}")
        self.mode = mode
        self.smooth = check_number("smooth", smooth, low=0.0)
        self.from_logits = from_logits
        self.reduction = check_reduction(reduction)
        self.ignore_index = ignore_index

    def _probabilities_and_targets(self, preds: Tensor, target: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Return ``(p, t, valid)`` shaped ``(N, C, ...)`` (binary: ``(N, 1, ...)``)."""
        valid = torch.ones_like(target, dtype=torch.bool) if self.ignore_index is None else target != self.ignore_index
        zero = torch.zeros((), dtype=target.dtype, device=target.device)
        safe = torch.where(valid, target, zero)
        if self.mode == "multiclass":
            if target.is_floating_point() or preds.dim() < 2 or preds.shape[:1] + preds.shape[2:] != target.shape:
                raise ValueError(
                    "DiceLoss(mode='multiclass') needs logits (N, C, ...) and integer targets (N, ...), got preds "
                    f"{tuple(preds.shape)} and target {tuple(target.shape)} of dtype {target.dtype}"
                )
            p = preds.softmax(dim=1) if self.from_logits else preds
            t = F.one_hot(safe.long(), preds.shape[1]).movedim(-1, 1).to(preds.dtype)
            return p, t, valid.unsqueeze(1).to(preds.dtype)
        if preds.shape != target.shape:
            raise ValueError(
                f"DiceLoss(mode={self.mode!r}) needs preds and target of the same shape, got {tuple(preds.shape)} "
                f"and {tuple(target.shape)}"
            )
        p = preds.sigmoid() if self.from_logits else preds
        t = safe.to(preds.dtype)
        mask = valid.to(preds.dtype)
        if self.mode == "binary":
            return p.reshape(1, 1, -1), t.reshape(1, 1, -1), mask.reshape(1, 1, -1)
        if preds.dim() < 2:
            raise ValueError(f"DiceLoss(mode='multilabel') needs preds (N, C, ...), got {tuple(preds.shape)}")
        return p, t, mask

    def forward(self, preds: Tensor, target: Tensor) -> Tensor:
        """Dice loss of ``preds`` against ``target`` (no host reads)."""
        p, t, mask = self._probabilities_and_targets(preds, target)
        p, t = p * mask, t * mask
        dims = [d for d in range(p.dim()) if d != 1]
        intersection = (p * t).sum(dim=dims)
        total = p.sum(dim=dims) + t.sum(dim=dims)
        per_class = 1 - (2 * intersection + self.smooth) / (total + self.smooth)
        if self.reduction == "mean":
            return per_class.mean()
        return per_class.sum() if self.reduction == "sum" else per_class

    def extra_repr(self) -> str:
        """Arguments shown by ``repr``."""
        return f"mode={self.mode!r}, smooth={self.smooth}, from_logits={self.from_logits}, reduction={self.reduction!r}"


__all__ = ["DiceLoss"]
