"""The validation and test loss of handed-over steps, written as ``val/loss``/``test/loss`` when nothing logs one.

A step that returns ``{"loss", "preds", "target"}`` from ``validation_step`` hands its loss to the callbacks, but
Lightning logs nothing of it; without a validation loss the diagnosis cannot see overfitting or a plateau of the
validation loss. :class:`EvalLosses` keeps references to those losses (no kernel per batch) and, at the end of the
evaluation, writes their mean weighted by batch size, unless the run logs a loss of that stage itself
(``self.log("val_loss", ...)``, ``LossMixin``'s ``val/loss``).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor

from lightning_lossdiag._outputs import fetch_outputs
from lightning_lossdiag.diagnosis.rules._common import ALIASES

#: names a run may log its own loss of a stage under (checked in ``trainer.callback_metrics``, any dataloader suffix):
#: the validation names are those the diagnosis reads
LOSS_NAMES = {
    "val": ALIASES["val/loss"],
    "test": ("test/loss", "test_loss", "test/loss_epoch", "test_loss_epoch"),
}
_COMPACT_AT = 512  # held per-batch losses are summed on the device past this many


def _batch_size(target: Any) -> int:
    """Rows of a step (the first dim of its target, the first tensor of a mapping): shapes only, no host read."""
    if isinstance(target, Mapping):
        target = next((t for t in target.values() if isinstance(t, Tensor)), None)
    return int(target.shape[0]) if isinstance(target, Tensor) and target.ndim else 1


def logs_own_loss(metrics: Mapping[str, Any], stage: str) -> bool:
    """True when ``metrics`` (``trainer.callback_metrics``) hold a loss of ``stage`` under a common name.

    Example:
        >>> logs_own_loss({"val_loss/dataloader_idx_0": 0.3}, "val"), logs_own_loss({"val/acc": 0.9}, "val")
        (True, False)
    """
    names = LOSS_NAMES.get(stage, ())
    return any(key.split("/dataloader_idx_")[0] in names for key in metrics)


class EvalLosses:
    """Per-stage references to the handed-over losses of evaluation batches and their batch sizes.

    Example:
        >>> losses = EvalLosses()
        >>> losses.add("val", torch.tensor(1.0), 2)  # example input, off the hot path
        >>> losses.add("val", torch.tensor(4.0), 1)  # example input, off the hot path
        >>> losses.mean("val").item()  # (1 * 2 + 4 * 1) / 3, off the hot path
        2.0
    """

    def __init__(self) -> None:
        self._losses: dict[str, list[Tensor]] = {}
        self._sizes: dict[str, list[int]] = {}  # the weight of each held loss (a compacted sum weighs 1)
        self._rows: dict[str, int] = {}

    def take(self, pl_module: Any, outputs: Any, stage: str) -> None:
        """Keep the loss a batch of ``stage`` handed over (a reference: no kernel, no host read)."""
        step = fetch_outputs(pl_module, outputs, stage)
        if step is not None and isinstance(step.loss, Tensor):
            self.add(stage, step.loss, _batch_size(step.target))

    def add(self, stage: str, loss: Tensor, size: int) -> None:
        """Hold one batch's loss (a scalar, or the mean of a tensor of losses) and its number of rows."""
        losses, sizes = self._losses.setdefault(stage, []), self._sizes.setdefault(stage, [])
        losses.append(loss if loss.numel() == 1 else loss.float().mean())
        sizes.append(size)
        self._rows[stage] = self._rows.get(stage, 0) + size
        if len(losses) >= _COMPACT_AT:  # a bounded list: the weighted sum so far, with a weight of 1
            self._losses[stage], self._sizes[stage] = [self._weighted_sum(stage)], [1]

    def _weighted_sum(self, stage: str) -> Tensor:
        values = [t.reshape(()).float() for t in self._losses[stage]]
        # the sizes as scalar arguments: no host-to-device copy (a blocking one on CUDA)
        return torch.stack(torch._foreach_mul(values, self._sizes[stage])).sum()

    def sum_and_rows(self, stage: str) -> Tensor | None:
        """``[weighted sum, rows]`` of ``stage`` on the device, or ``None`` without losses (evaluation end)."""
        if not self._losses.get(stage):
            return None
        total = self._weighted_sum(stage)
        return torch.stack([total, torch.full_like(total, float(self._rows[stage]))])

    def mean(self, stage: str) -> Tensor | None:
        """The batch-size-weighted mean loss of ``stage`` (device tensor), or ``None`` without losses."""
        both = self.sum_and_rows(stage)
        return None if both is None else both[0] / both[1]

    def reset(self, stage: str) -> None:
        """Forget the losses of ``stage`` (the next evaluation starts afresh)."""
        self._losses.pop(stage, None)
        self._sizes.pop(stage, None)
        self._rows.pop(stage, None)


__all__ = ["LOSS_NAMES", "EvalLosses", "logs_own_loss"]
