"""LossMonitor: the training loss, its EMA, spikes and non-finite steps, with no host read between flushes.

Per training batch the monitor keeps a reference to the detached loss tensor (no kernel, no copy, no read). At a
flush the losses since the last flush are moved to the host in ONE transfer and folded, in order, into the running
statistics (:class:`LossStats`). Because the statistics run on the host over the exact sequence of losses, the EMA
and the spike detector are the sequential algorithms below, not approximations.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields
from typing import Any

import torch
from lightning.pytorch import Callback, LightningModule, Trainer
from torch import Tensor
from typing_extensions import override

from lightning_lossdiag._outputs import clear_outputs, fetch_outputs
from lightning_lossdiag.callbacks._base import (
    FlushSchedule,
    host_to_device,
    log_scalars,
    show_in_progress_bar,
    warn_no_logger_once,
)
from lightning_lossdiag.callbacks._eval_loss import EvalLosses, logs_own_loss
from lightning_lossdiag.callbacks._grad_groups import host_floats, safe_tag
from lightning_lossdiag.callbacks._guard_ops import merge_nonfinite
from lightning_lossdiag.callbacks._guard_rows import NO_STEP
from lightning_lossdiag.diagnosis.record import record_for

_MIN_LOG_STD = 0.01  # floor of the spike detector's std of log(loss): a spike must rise > zscore * 1% at least
_COMPACT_AT = 512  # pending per-batch losses are concatenated on the device past this many (bounded Python list)


@dataclass
class LossStats:
    """Host-side running statistics of the training loss (plain numbers; what the checkpoint stores).

    * EMA, bias-corrected: ``raw <- d * raw + (1 - d) * x`` over finite losses only, starting at ``raw = 0``;
      reported as ``raw / (1 - d ** n)`` (``n`` finite losses seen), so the first value is the first loss.
    * Spike detector on ``y = log(loss)`` for finite, positive losses: an exponentially weighted mean ``m`` and
      variance ``v`` of ``y`` (weight ``1 - d``). After ``warmup`` such losses, a loss is a spike when
      ``y - m > zscore * max(sqrt(v), 0.01)``. A spike enters the statistics clipped to ``m + zscore * std``, so one
      spike neither hides the next ones nor makes the detector blind. Losses <= 0 are not tested.
    * Non-finite losses (NaN, inf) are counted and never enter the EMA, the means, the min/max or the detector.

    Example:
        >>> s = LossStats()
        >>> s.update([1.0, float("nan"), 2.0], [1, 2, 3], decay=0.5, zscore=6.0, warmup=20)
        >>> round(s.ema(0.5), 4), s.nonfinite_count, s.first_nonfinite_step, s.window_min, s.window_max
        (1.6667, 1, 2, 1.0, 2.0)
    """

    ema_raw: float = 0.0
    ema_n: int = 0
    spike_mean: float = 0.0
    spike_var: float = 0.0
    spike_n: int = 0
    spike_count: int = 0
    first_spike_step: int = -1
    nonfinite_count: int = 0
    first_nonfinite_step: int = -1
    epoch_sum: float = 0.0
    epoch_count: int = 0
    window_n: int = 0
    window_sum: float = 0.0
    window_count: int = 0
    window_min: float = math.inf
    window_max: float = -math.inf
    last: float = math.nan

    def update(self, values: list[float], steps: list[int], decay: float, zscore: float, warmup: int) -> None:
        """Fold host losses (in training order, with the global step of each) into the statistics."""
        alpha = 1.0 - decay
        for x, step in zip(values, steps, strict=True):
            self.last = x
            self.window_n += 1
            if not math.isfinite(x):
                self.nonfinite_count += 1
                if self.first_nonfinite_step < 0:
                    self.first_nonfinite_step = step
                continue
            self.window_sum += x
            self.window_count += 1
            self.window_min = min(self.window_min, x)
            self.window_max = max(self.window_max, x)
            self.epoch_sum += x
            self.epoch_count += 1
            self.ema_raw = decay * self.ema_raw + alpha * x
            self.ema_n += 1
            if x > 0:
                self._spike_step(math.log(x), step, alpha, zscore, warmup)

    def _spike_step(self, y: float, step: int, alpha: float, zscore: float, warmup: int) -> None:
        if self.spike_n >= warmup:
            limit = self.spike_mean + zscore * max(math.sqrt(self.spike_var), _MIN_LOG_STD)
            if y > limit:
                self.spike_count += 1
                if self.first_spike_step < 0:
                    self.first_spike_step = step
                y = limit
        if self.spike_n == 0:
            self.spike_mean, self.spike_var = y, 0.0
        else:
            diff = y - self.spike_mean
            incr = alpha * diff
            self.spike_mean += incr
            self.spike_var = (1.0 - alpha) * (self.spike_var + diff * incr)
        self.spike_n += 1

    def ema(self, decay: float) -> float:
        """The bias-corrected EMA (NaN before the first finite loss)."""
        return self.ema_raw / (1.0 - decay**self.ema_n) if self.ema_n else math.nan

    def reset_window(self) -> None:
        """Start a new flush window."""
        self.window_n, self.window_sum, self.window_count = 0, 0.0, 0
        self.window_min, self.window_max = math.inf, -math.inf


class LossMonitor(Callback):
    """Log the training loss, its EMA, min/max/mean since the last flush, composite terms, spikes and NaN/inf steps.

    Costs nothing per batch beyond keeping a reference to the detached loss; one host transfer per flush
    (every ``every_n_steps`` optimizer steps, default the Trainer's ``log_every_n_steps``) and one per epoch end.
    Steps are ``trainer.global_step`` after the batch (the x-axis of the charts). See :class:`LossStats` for the
    EMA and the spike rule.

    | key | when | meaning |
    |---|---|---|
    | ``train/loss`` | flush | loss of the last batch before the flush (NaN if it was NaN) |
    | ``train/loss_ema`` | flush | bias-corrected EMA of finite losses (``ema_decay``) |
    | ``train/loss_mean``, ``train/loss_min``, ``train/loss_max`` | flush | over finite losses since the last flush |
    | ``train/loss/<term>`` | flush | each term of a composite loss (``StepOutputs.terms``), last batch |
    | ``train/nonfinite_count`` | flush | cumulative number of batches whose loss was NaN/inf |
    | ``train/loss_spikes`` | flush | cumulative number of spike batches |
    | ``train/loss_epoch`` | train epoch end | mean of the epoch's finite losses |
    | ``val/loss``, ``test/loss`` | validation / test end | mean handed-over loss of the stage (see below) |

    ``val/loss`` and ``test/loss`` are the mean of the losses the evaluation steps handed over (``{"loss", "preds",
    "target"}``), weighted by batch size, over all ranks, written only when the run logs no loss of that stage
    itself (``val_loss``, ``LossMixin``'s ``val/loss``, ...): without a validation loss the diagnosis cannot see
    overfitting. They go to the loggers and the run record; to monitor a loss with ``ModelCheckpoint`` or
    ``EarlyStopping``, log it with ``self.log``.

    The progress bar shows ``train/loss`` as of the last flush (a host number: no per-step read).

    Notes in the run record: ``loss/first_nonfinite_step``, ``loss/first_spike_step`` (once set).

    Under DDP every rank keeps its own losses (``train/loss`` and the EMA are rank 0's, the rank that writes), but
    the non-finite count and first step are merged over all ranks at each flush and epoch end (one ``all_gather`` on
    the device, read with the flush's one transfer), so ``train/nonfinite_count`` and ``loss/first_nonfinite_step``
    count a NaN loss on any rank.

    Args:
        every_n_steps: flush interval in optimizer steps; ``None`` takes the Trainer's ``log_every_n_steps``.
        ema_decay: decay ``d`` of the EMA and of the spike detector's statistics, in ``(0, 1)``.
        spike_zscore: how many standard deviations of ``log(loss)`` above its running mean make a spike (> 0).
        spike_warmup: number of finite positive losses seen before spikes are tested (>= 1).

    Example:
        >>> LossMonitor(every_n_steps=10).state_key
        "LossMonitor{'every_n_steps': 10, 'ema_decay': 0.98, 'spike_zscore': 6.0, 'spike_warmup': 20}"
    """

    writes_train_loss = True

    def __init__(
        self,
        every_n_steps: int | None = None,
        ema_decay: float = 0.98,
        spike_zscore: float = 6.0,
        spike_warmup: int = 20,
    ) -> None:
        if not isinstance(ema_decay, (int, float)) or not 0.0 < ema_decay < 1.0:
            raise ValueError(f"`ema_decay` must be a float in (0, 1), got {ema_decay!r}")
        if not isinstance(spike_zscore, (int, float)) or not spike_zscore > 0:
            raise ValueError(f"`spike_zscore` must be a positive number, got {spike_zscore!r}")
        if not isinstance(spike_warmup, int) or isinstance(spike_warmup, bool) or spike_warmup < 1:
            raise ValueError(f"`spike_warmup` must be an integer >= 1, got {spike_warmup!r}")
        self._schedule = FlushSchedule(every_n_steps)
        self.every_n_steps = every_n_steps
        self.ema_decay = float(ema_decay)
        self.spike_zscore = float(spike_zscore)
        self.spike_warmup = spike_warmup
        self.stats = LossStats()
        self._pending: list[Tensor] = []
        self._pending_steps: list[int] = []
        self._terms: dict[str, Tensor] = {}
        self._unmerged_nonfinite = 0  # non-finite losses folded in at a checkpoint save, not yet merged over ranks
        self._eval = EvalLosses()

    @property
    @override
    def state_key(self) -> str:
        return self._generate_state_key(
            every_n_steps=self.every_n_steps,
            ema_decay=self.ema_decay,
            spike_zscore=self.spike_zscore,
            spike_warmup=self.spike_warmup,
        )

    @override
    def on_train_batch_start(self, trainer: Trainer, pl_module: LightningModule, batch: Any, batch_idx: int) -> None:
        clear_outputs(pl_module, "train")

    @override
    def on_train_batch_end(
        self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        step = int(trainer.global_step)
        out = fetch_outputs(pl_module, outputs, "train")
        if out is not None and isinstance(out.loss, Tensor):
            loss = out.loss if out.loss.numel() == 1 else out.loss.float().mean()
            self._pending.append(loss)  # a reference only: no kernel, no host read
            self._pending_steps.append(step)
            if out.terms:
                self._terms = dict(out.terms)
            if len(self._pending) >= _COMPACT_AT:
                self._pending = [torch.cat([t.reshape(-1).float() for t in self._pending])]  # device-only concat
        if self._schedule.is_flush(step, trainer):
            self._flush(trainer)
            self._schedule.mark(step)

    @override
    def on_train_epoch_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self.stats.epoch_sum, self.stats.epoch_count = 0.0, 0

    @override
    def on_train_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._absorb(trainer)  # epoch end: one host transfer
        if self.stats.epoch_count:
            log_scalars(trainer, {"train/loss_epoch": self.stats.epoch_sum / self.stats.epoch_count})

    @override
    def on_train_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._flush(trainer)

    # ---- the loss of evaluation steps (references per batch; one read at the end of the evaluation) ----------------
    @override
    def on_validation_batch_end(
        self,
        trainer: Trainer,
        pl_module: LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
        dataloader_idx: int = 0,
    ) -> None:
        if not trainer.sanity_checking:
            self._eval.take(pl_module, outputs, "val")

    @override
    def on_test_batch_end(
        self,
        trainer: Trainer,
        pl_module: LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
        dataloader_idx: int = 0,
    ) -> None:
        self._eval.take(pl_module, outputs, "test")

    @override
    def on_validation_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._write_eval_loss(trainer, pl_module, "val")

    @override
    def on_test_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._write_eval_loss(trainer, pl_module, "test")

    def _write_eval_loss(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        """``<stage>/loss``: the mean handed-over loss of the evaluation, unless the run logs a loss of it itself."""
        both = self._eval.sum_and_rows(stage)
        self._eval.reset(stage)
        if trainer.sanity_checking or logs_own_loss(trainer.callback_metrics, stage):
            return
        if int(trainer.world_size) > 1:  # every rank joins (a rank without batches adds zeros): the global mean
            local = both if both is not None else torch.zeros(2, device=pl_module.device)
            both = trainer.strategy.all_gather(local).reshape(-1, 2).sum(0)
        if both is None:
            return
        total, rows = both.tolist()  # end of the evaluation: one host read
        if rows > 0:
            log_scalars(trainer, {f"{stage}/loss": total / rows})

    def _absorb(self, trainer: Trainer | None = None) -> list[float]:
        """Move pending losses (and the last terms) to the host in one transfer; return the term values.

        With a ``trainer`` under DDP (flush and epoch end, where every rank calls it at the same step), the
        non-finite count and first step are merged over ranks on the device first and read in the same transfer.
        """
        merge = trainer is not None and trainer.world_size > 1
        if not self._pending and not self._terms and not merge:
            return []
        terms = [t.reshape(-1)[:1] for t in self._terms.values()]
        extra = [self._nonfinite_all_ranks(trainer)] if merge else []
        host = host_floats(self._pending + terms + extra)  # flush / epoch end: the one host read
        n = len(host) - len(terms) - 2 * len(extra)  # == len(self._pending_steps): one step per batch
        s = self.stats
        before = s.nonfinite_count
        s.update(host[:n], self._pending_steps, self.ema_decay, self.spike_zscore, self.spike_warmup)
        if merge:  # replace this rank's count since the last merge by the count over all ranks
            count, first = host[-2:]
            s.nonfinite_count = before - self._unmerged_nonfinite + int(count)
            if first < NO_STEP:
                s.first_nonfinite_step = (
                    int(first) if s.first_nonfinite_step < 0 else min(s.first_nonfinite_step, int(first))
                )
            self._unmerged_nonfinite = 0
        else:
            self._unmerged_nonfinite += s.nonfinite_count - before
        self._pending, self._pending_steps = [], []
        return host[n : n + len(terms)]

    def _nonfinite_all_ranks(self, trainer: Any) -> Tensor:
        """``[count, first step]`` of non-finite losses not yet merged, summed / min'ed over ranks (no host read)."""
        if self._pending:
            flat = torch.cat([t.reshape(-1).float() for t in self._pending])
            steps = host_to_device(self._pending_steps, flat.device)  # host ints, a copy up (never a read)
            bad = ~torch.isfinite(flat)
            count = bad.sum() + self._unmerged_nonfinite
            first = torch.where(bad, steps, NO_STEP).amin()
        else:
            count = torch.full((), self._unmerged_nonfinite, dtype=torch.int64, device=trainer.strategy.root_device)
            first = torch.full_like(count, NO_STEP)
        if self.stats.first_nonfinite_step >= 0:  # min is idempotent: sending a step every rank knows is harmless
            first = first.clamp(max=self.stats.first_nonfinite_step)
        return merge_nonfinite(trainer, count, first)

    def _flush(self, trainer: Trainer) -> None:
        names = list(self._terms)
        term_values = self._absorb(trainer)
        s = self.stats
        if s.window_n == 0 and not names:
            return
        values: dict[str, float] = {"train/nonfinite_count": s.nonfinite_count, "train/loss_spikes": s.spike_count}
        if s.window_n:
            values["train/loss"] = s.last
        if s.ema_n:
            values["train/loss_ema"] = s.ema(self.ema_decay)
        if s.window_count:
            values["train/loss_mean"] = s.window_sum / s.window_count
            values["train/loss_min"] = s.window_min
            values["train/loss_max"] = s.window_max
        for name, v in zip(names, term_values, strict=True):
            values[f"train/loss/{safe_tag(name)}"] = v
        self._terms = {}
        warn_no_logger_once(trainer, type(self).__name__)
        log_scalars(trainer, values)
        if "train/loss" in values:
            show_in_progress_bar(trainer, {"train/loss": values["train/loss"]})
        notes = record_for(trainer).notes
        if s.first_nonfinite_step >= 0:
            notes["loss/first_nonfinite_step"] = s.first_nonfinite_step
        if s.first_spike_step >= 0:
            notes["loss/first_spike_step"] = s.first_spike_step
        s.reset_window()

    @override
    def state_dict(self) -> dict[str, Any]:
        """Plain data: the running statistics (pending losses folded in first) and the flush bookkeeping."""
        self._absorb()  # checkpoint save: one host transfer, so a resume from a step between flushes loses no loss
        return {"stats": asdict(self.stats), "last_flushed": self._schedule._last_flushed}

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore :meth:`state_dict`; missing keys keep their defaults."""
        saved = state_dict.get("stats", {}) or {}
        fresh = LossStats()
        for f in fields(LossStats):
            default = getattr(fresh, f.name)
            setattr(self.stats, f.name, type(default)(saved.get(f.name, default)))
        self._schedule._last_flushed = int(state_dict.get("last_flushed", -1))
        self._unmerged_nonfinite = 0  # the loaded count is the merged one of the rank that saved it


__all__ = ["LossMonitor", "LossStats"]
