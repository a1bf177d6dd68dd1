"""SchedulerMonitor: learning rates and momenta at each flush, ReduceLROnPlateau state at each scheduler step.

Learning rates are host numbers (``param_groups``), so logging them costs no device read. ``ReduceLROnPlateau``
keeps its state in plain attributes (``best``, ``num_bad_epochs``, ``cooldown_counter``, ...), read at epoch
granularity.

When Lightning steps a plateau scheduler: with ``interval="epoch"`` in ``FitLoop.on_advance_end``, AFTER the
``on_train_epoch_end`` hooks (``_update_learning_rates(..., update_plateau_schedulers=True)``); with
``interval="step"`` after validation at the end of a training batch. A step is therefore detected by a change of
the scheduler's ``last_epoch`` at the next hook that can see it: ``on_train_epoch_start``, ``on_train_batch_start``
(step-interval schedulers only) or ``on_train_end``. Detecting a step reads the monitored metric from
``trainer.callback_metrics`` (one host read per scheduler step; for step-interval plateau schedulers that read
happens inside the batch that follows the step).
"""

from __future__ import annotations

import math
from typing import Any

from lightning.pytorch import Callback, LightningModule, Trainer
from torch import Tensor
from torch.optim.lr_scheduler import ReduceLROnPlateau
from typing_extensions import override

from lightning_lossdiag.callbacks._base import FlushSchedule, log_scalars, warn_no_logger_once
from lightning_lossdiag.callbacks._grad_groups import host_floats, safe_tag
from lightning_lossdiag.dashboards.writers import tensorboard_writers
from lightning_lossdiag.diagnosis.direction import metric_direction
from lightning_lossdiag.diagnosis.findings import Finding
from lightning_lossdiag.diagnosis.record import record_for

_MAX_REDUCTIONS = 100  # reductions kept in the notes (bounded)


def steps_to_reduction(num_bad_epochs: int, patience: int, cooldown_counter: int) -> int:
    """Scheduler steps without improvement until ``ReduceLROnPlateau`` reduces the lr (PyTorch's rule).

    PyTorch reduces when ``num_bad_epochs > patience``; during cooldown each step lowers ``cooldown_counter`` by one
    and resets ``num_bad_epochs`` to 0. So from the state after a step: ``cooldown_counter + patience + 1 -
    num_bad_epochs``.

    Example:
        >>> steps_to_reduction(0, 2, 0), steps_to_reduction(2, 2, 0), steps_to_reduction(0, 2, 3)
        (3, 1, 6)
    """
    return int(cooldown_counter) + int(patience) + 1 - int(num_bad_epochs)


def _lrs(optimizer: Any, key: str = "lr") -> list[float]:
    vals = [pg[key] for pg in optimizer.param_groups]
    return [float(v) for v in vals]  # epoch/scheduler-step granularity (a tensor lr is read once here: host)


class _Plateau:
    """Host-side tracker of one ReduceLROnPlateau config."""

    def __init__(self, config: Any, opt_index: int) -> None:
        self.config, self.sched, self.opt_index = config, config.scheduler, opt_index
        self.seen = int(self.sched.last_epoch)
        self.snapshot = (float(self.sched.best), int(self.sched.num_bad_epochs), int(self.sched.cooldown_counter))
        self.lrs = _lrs(self.sched.optimizer)
        self.reductions = 0


class SchedulerMonitor(Callback):
    """Log learning rates (and momenta) per optimizer and param group, and the state of every ReduceLROnPlateau.

    Optimizer names are the class name in lower case (``adam``); with several optimizers, ``adam_0``, ``sgd_1``.
    Groups are ``group0``, ``group1``... or the param group's ``"name"``. The lr logged at a flush is the one the
    flush step used (read at the start of that batch). Plateau keys get the suffix ``_<k>`` (k-th plateau scheduler)
    only when there are several. ``epochs_to_reduction`` counts scheduler steps, which are epochs with the default
    ``interval="epoch"`` and ``frequency=1``.

    | key | when | meaning |
    |---|---|---|
    | ``lr/<optimizer>/<group>`` | flush | learning rate |
    | ``momentum/<optimizer>/<group>`` | flush | ``momentum`` or ``betas[0]`` (``log_momentum=True``) |
    | ``plateau/best`` | plateau step | best monitored value so far (once finite) |
    | ``plateau/num_bad_epochs`` | plateau step | scheduler steps since the last improvement |
    | ``plateau/cooldown`` | plateau step | cooldown steps left |
    | ``plateau/reductions`` | plateau step | cumulative reductions that lowered the lr |
    | ``plateau/epochs_to_reduction`` | plateau step | steps without improvement until a reduction (PyTorch rule) |
    | ``plateau/reduction`` | reduction | TensorBoard text: epoch, lr before and after, metric value |

    Notes: ``scheduler/plateau`` (configs), ``scheduler/reductions`` (bounded list). Findings:
    ``scheduler_monitor_missing``, ``scheduler_mode_mismatch``, ``scheduler_at_min_lr``.

    Args:
        every_n_steps: flush interval in optimizer steps; ``None`` takes the Trainer's ``log_every_n_steps``.
        log_momentum: also log momentum / ``betas[0]``.

    Example:
        >>> SchedulerMonitor(every_n_steps=5).state_key
        "SchedulerMonitor{'every_n_steps': 5, 'log_momentum': True}"
    """

    def __init__(self, every_n_steps: int | None = None, log_momentum: bool = True) -> None:
        if not isinstance(log_momentum, bool):
            raise ValueError(f"`log_momentum` must be True or False, got {log_momentum!r}")
        self._schedule = FlushSchedule(every_n_steps)
        self.every_n_steps = every_n_steps
        self.log_momentum = log_momentum
        self._plateaus: list[_Plateau] = []
        self._snapshot: dict[str, float | Tensor] = {}
        self._reported: set[tuple[str, int]] = set()
        self._epochs_ended = False
        self.reductions: list[dict[str, Any]] = []
        self._loaded_counts: list[int] = []

    @property
    @override
    def state_key(self) -> str:
        return self._generate_state_key(every_n_steps=self.every_n_steps, log_momentum=self.log_momentum)

    # ---------------------------------------------------------------- learning rates
    def _rates(self, trainer: Trainer) -> dict[str, float | Tensor]:
        optimizers = trainer.optimizers
        out: dict[str, float | Tensor] = {}
        for i, opt in enumerate(optimizers):
            oname = type(opt).__name__.lower() + (f"_{i}" if len(optimizers) > 1 else "")
            for j, pg in enumerate(opt.param_groups):
                gname = safe_tag(str(pg["name"])) if pg.get("name") else f"group{j}"
                lr = pg.get("lr")
                out[f"lr/{oname}/{gname}"] = lr.detach().clone() if isinstance(lr, Tensor) else float(lr or 0.0)
                mom = pg.get("momentum", pg["betas"][0] if "betas" in pg else None)
                if self.log_momentum and mom is not None:
                    out[f"momentum/{oname}/{gname}"] = mom.detach().clone() if isinstance(mom, Tensor) else float(mom)
        return out

    @override
    def on_train_batch_start(self, trainer: Trainer, pl_module: LightningModule, batch: Any, batch_idx: int) -> None:
        if self._schedule.next_step_flushes(trainer):
            self._snapshot = self._rates(trainer)  # python floats: no device work
        if self._plateaus and any(p.config.interval == "step" for p in self._plateaus):
            self._poll(trainer, int(trainer.current_epoch))

    @override
    def on_train_batch_end(
        self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        step = int(trainer.global_step)
        if self._schedule.is_flush(step, trainer):
            self._flush(trainer)
            self._schedule.mark(step)

    def _flush(self, trainer: Trainer) -> None:
        rates = self._snapshot or self._rates(trainer)
        self._snapshot = {}
        tensors = {k: v for k, v in rates.items() if isinstance(v, Tensor)}
        values = {k: float(v) for k, v in rates.items() if not isinstance(v, Tensor)}
        if tensors:  # tensor learning rates (capturable optimizers): one transfer at the flush
            values.update(zip(tensors, host_floats(list(tensors.values())), strict=True))
        warn_no_logger_once(trainer, type(self).__name__)
        log_scalars(trainer, values)

    # ---------------------------------------------------------------- plateau schedulers
    @override
    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._plateaus = []
        opts = list(trainer.optimizers)
        for config in trainer.lr_scheduler_configs:
            if isinstance(config.scheduler, ReduceLROnPlateau):
                opt_index = next((i for i, o in enumerate(opts) if o is config.scheduler.optimizer), 0)
                tracker = _Plateau(config, opt_index)
                k = len(self._plateaus)
                tracker.reductions = self._loaded_counts[k] if k < len(self._loaded_counts) else 0
                self._plateaus.append(tracker)
        notes = record_for(trainer).notes
        notes["scheduler/plateau"] = [self._describe(p) for p in self._plateaus]
        for k, p in enumerate(self._plateaus):
            self._check_mode(trainer, p, k)

    def _describe(self, p: _Plateau) -> dict[str, Any]:
        s = p.sched
        return {
            "optimizer": p.opt_index,
            "monitor": p.config.monitor,
            "mode": s.mode,
            "patience": int(s.patience),
            "threshold": float(s.threshold),
            "threshold_mode": s.threshold_mode,
            "cooldown": int(s.cooldown),
            "min_lrs": [float(x) for x in s.min_lrs],
            "factor": float(s.factor),
            "interval": p.config.interval,
            "frequency": int(p.config.frequency),
        }

    def _find(self, trainer: Trainer, code: str, k: int, severity: Any, message: str, **evidence: Any) -> None:
        if (code, k) in self._reported:
            return
        self._reported.add((code, k))
        record_for(trainer).add_finding(Finding(code, severity, message, int(trainer.global_step), evidence))

    def _check_mode(self, trainer: Trainer, p: _Plateau, k: int) -> None:
        monitor, mode = str(p.config.monitor), p.sched.mode
        expected = metric_direction(monitor)
        if expected is not None and expected != mode:
            self._find(
                trainer, "scheduler_mode_mismatch", k, "warning",
                f"ReduceLROnPlateau watches {monitor!r} with mode={mode!r}, but its name says it should "
                f"{'fall' if expected == 'min' else 'rise'}: every improvement counts as a bad epoch, so the lr is "
                f"cut for the wrong reason. Use mode={expected!r}.",
                monitor=monitor, mode=mode, expected=expected,
            )  # fmt: skip

    def _check_missing(self, trainer: Trainer) -> None:
        available = sorted(trainer.callback_metrics)
        for k, p in enumerate(self._plateaus):
            monitor = p.config.monitor
            if monitor not in trainer.callback_metrics:
                self._find(
                    trainer, "scheduler_monitor_missing", k, "error" if p.config.strict else "warning",
                    f"ReduceLROnPlateau monitors {monitor!r}, which was never logged, so the lr is never reduced. "
                    f"Logged metrics: {available}. Log it with self.log({monitor!r}, ...) or fix `monitor`.",
                    monitor=monitor, available=available,
                )  # fmt: skip

    @override
    def on_train_epoch_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if self._epochs_ended:
            self._check_missing(trainer)  # an epoch ended: its metrics are all logged now
            self._poll(trainer, int(trainer.current_epoch) - 1)

    @override
    def on_train_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._epochs_ended = True

    @override
    def on_train_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._flush(trainer)
        if self._epochs_ended:
            self._check_missing(trainer)
            self._poll(trainer, int(trainer.current_epoch) - 1)

    @override
    def on_exception(self, trainer: Trainer, pl_module: LightningModule, exception: BaseException) -> None:
        if self._plateaus and self._epochs_ended:
            self._check_missing(trainer)  # Lightning raises when a strict plateau monitor is missing

    def _poll(self, trainer: Trainer, epoch: int) -> None:
        """Epoch granularity: detect plateau steps since the last poll and log their state."""
        several = len(self._plateaus) > 1
        for k, p in enumerate(self._plateaus):
            s = p.sched
            if int(s.last_epoch) == p.seen:
                continue
            advanced = int(s.last_epoch) - p.seen
            best, bad, cool = float(s.best), int(s.num_bad_epochs), int(s.cooldown_counter)
            lrs = _lrs(s.optimizer)
            prev_best, prev_bad, prev_cool = p.snapshot
            triggered = (
                prev_cool == 0 and best == prev_best and prev_bad + 1 > s.patience
                if advanced == 1
                else any(new < old - s.eps for new, old in zip(lrs, p.lrs, strict=True))
            )
            lowered = any(new < old - s.eps for new, old in zip(lrs, p.lrs, strict=True))
            metric = trainer.callback_metrics.get(p.config.monitor)
            value = float(metric) if metric is not None else math.nan  # epoch granularity host read
            if triggered and lowered:
                p.reductions += 1
                self._mark(trainer, p, epoch, p.lrs, lrs, value)
            if bad > 0 or (triggered and not lowered):
                self._check_min_lr(trainer, p, k, lrs, bad)
            sfx = f"_{k}" if several else ""
            values: dict[str, float] = {
                f"plateau/num_bad_epochs{sfx}": bad,
                f"plateau/cooldown{sfx}": cool,
                f"plateau/reductions{sfx}": p.reductions,
                f"plateau/epochs_to_reduction{sfx}": steps_to_reduction(bad, s.patience, cool),
            }
            if math.isfinite(best):
                values[f"plateau/best{sfx}"] = best
            log_scalars(trainer, values)
            p.seen, p.snapshot, p.lrs = int(s.last_epoch), (best, bad, cool), lrs

    def _check_min_lr(self, trainer: Trainer, p: _Plateau, k: int, lrs: list[float], bad: int) -> None:
        mins = [float(x) for x in p.sched.min_lrs]
        if all(lr <= m + p.sched.eps for lr, m in zip(lrs, mins, strict=False)):
            self._find(
                trainer, "scheduler_at_min_lr", k, "warning",
                f"ReduceLROnPlateau on {p.config.monitor!r} is already at min_lr={mins} while bad epochs accumulate "
                f"({bad} now): further plateaus cannot lower the lr. Lower `min_lr`, stop early, or change the "
                "schedule.",
                monitor=p.config.monitor, lrs=lrs, min_lrs=mins, num_bad_epochs=bad,
            )  # fmt: skip

    def _mark(
        self, trainer: Trainer, p: _Plateau, epoch: int, old: list[float], new: list[float], value: float
    ) -> None:
        step = int(trainer.global_step)
        entry: dict[str, Any] = {"epoch": epoch, "step": step, "from_lr": old[0], "to_lr": new[0], "metric": value}
        entry |= {"monitor": p.config.monitor, "optimizer": p.opt_index, "from_lrs": list(old), "to_lrs": list(new)}
        if len(self.reductions) < _MAX_REDUCTIONS:
            self.reductions.append(entry)
        record_for(trainer).notes["scheduler/reductions"] = [dict(r) for r in self.reductions]
        text = (
            f"epoch {epoch} (step {step}): lr {old[0]:.6g} -> {new[0]:.6g} "
            f"({p.config.monitor} = {value:.6g}, best = {float(p.sched.best):.6g}, patience = {p.sched.patience})"
        )
        for writer in tensorboard_writers(trainer):
            writer.add_text("plateau/reduction", text, step)

    # ---------------------------------------------------------------- state
    @override
    def state_dict(self) -> dict[str, Any]:
        """Plain data: reductions so far (per plateau scheduler and the list) and the flush bookkeeping."""
        counts = [p.reductions for p in self._plateaus] or list(self._loaded_counts)
        return {
            "reduction_counts": counts,
            "reductions": [dict(r) for r in self.reductions],
            "last_flushed": self._schedule._last_flushed,
        }

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore :meth:`state_dict`; missing keys keep their defaults."""
        self._loaded_counts = [int(c) for c in state_dict.get("reduction_counts", [])]
        self.reductions = [dict(r) for r in state_dict.get("reductions", [])]
        self._schedule._last_flushed = int(state_dict.get("last_flushed", -1))
        for p, c in zip(self._plateaus, self._loaded_counts, strict=False):
            p.reductions = c


__all__ = ["SchedulerMonitor", "steps_to_reduction"]
