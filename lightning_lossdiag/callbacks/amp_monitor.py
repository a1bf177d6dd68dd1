"""``AmpMonitor``: fp16 loss scaling at each flush: the ``GradScaler``'s scale and the optimizer steps it skipped."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from lightning.pytorch import Callback, LightningModule, Trainer
from torch import Tensor
from typing_extensions import override

from lightning_lossdiag.callbacks._amp import grad_scaler, scaler_found_inf, scaler_scale
from lightning_lossdiag.callbacks._base import FlushSchedule, log_scalars, to_host


class AmpMonitor(Callback):
    """The loss scale and the steps the ``GradScaler`` skipped, under fp16 mixed precision (``precision="16-mixed"``).

    A ``GradScaler`` multiplies the loss by a scale (65536 to start) so fp16 gradients do not underflow; when the
    unscaled gradients hold a NaN/inf it skips that optimizer step and halves the scale, and after
    ``growth_interval`` good steps it doubles it. A few skipped steps at the start of a fit are its normal work (the
    first scales overflow): they are counted here, not reported as non-finite gradients. A scale that keeps falling
    means the gradients overflow whatever the scale: the ``Doctor`` reports it as ``amp_scale_collapse``.

    Per step the skipped flag is added to a device counter (no host read); a flush moves the count and the scale
    in one transfer. Nothing is logged without a ``GradScaler`` (fp32, bf16-mixed).

    | key | when | meaning |
    |---|---|---|
    | ``amp/scale`` | flush | the loss scale after the flush step's update |
    | ``amp/skipped_steps`` | flush | optimizer steps the scaler skipped so far (cumulative over the fit) |

    Args:
        every_n_steps: flush interval (default: the Trainer's ``log_every_n_steps``).

    Example:
        >>> AmpMonitor(every_n_steps=10).state_dict()
        {'skipped_steps': 0}
    """

    def __init__(self, every_n_steps: int | None = None) -> None:
        self._schedule = FlushSchedule(every_n_steps)
        self.every_n_steps = every_n_steps
        self._skipped: Tensor | None = None
        self._resumed = 0
        self._scaler: Any = None

    @override
    def on_fit_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._scaler = grad_scaler(trainer)

    @override
    def on_before_optimizer_step(self, trainer: Trainer, pl_module: LightningModule, optimizer: Any) -> None:
        found = scaler_found_inf(self._scaler, optimizer)
        if found is None:
            return
        if self._skipped is None:
            self._skipped = torch.zeros((), device=found.device)
        self._skipped.add_(found)  # device only: the scaler skips this step when found is 1

    @override
    def on_train_batch_end(
        self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        step = int(trainer.global_step)
        if self._scaler is not None and self._schedule.is_flush(step, trainer):
            self._flush(trainer, step)
            self._schedule.mark(step)

    @override
    def on_train_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        step = int(trainer.global_step)
        if self._scaler is not None and step > 0 and self._schedule._last_flushed != step:
            self._flush(trainer, step)

    def _flush(self, trainer: Trainer, step: int) -> None:
        scale = scaler_scale(self._scaler)
        if scale is None:
            return
        skipped = self._skipped if self._skipped is not None else torch.zeros((), device=scale.device)
        values = to_host({"amp/scale": scale.float(), "amp/skipped_steps": skipped.to(scale.device)})  # one read
        values["amp/skipped_steps"] += self._resumed
        log_scalars(trainer, values, step)

    @override
    def state_dict(self) -> dict[str, Any]:
        """Plain data: the skipped-step count (the scale itself is in the checkpoint's precision-plugin state)."""
        skipped = int(self._skipped.item()) if self._skipped is not None else 0  # checkpoint save: one host read
        return {"skipped_steps": skipped + self._resumed}

    @override
    def load_state_dict(self, state_dict: Mapping[str, Any]) -> None:
        """Continue the skipped-step count of a checkpoint."""
        self._resumed = int(state_dict.get("skipped_steps", 0))
        self._skipped = None


__all__ = ["AmpMonitor"]
