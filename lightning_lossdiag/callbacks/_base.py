"""Shared plumbing of the callbacks: the flush schedule, one-transfer host reads, and writing to loggers.

These are the only places a callback moves numbers to the host. Every function documents when it may be called.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import torch
from lightning.pytorch.utilities import rank_zero_warn
from torch import Tensor

from lightning_lossdiag.dashboards.writers import write_scalars
from lightning_lossdiag.diagnosis.record import record_for


class FlushSchedule:
    """Decides which optimizer steps are flush steps.

    A flush happens after optimizer step ``s`` (``trainer.global_step == s`` in ``on_train_batch_end``) when
    ``s % every_n_steps == 0``. ``every_n_steps=None`` takes the Trainer's ``log_every_n_steps``.

    Example:
        >>> sched = FlushSchedule(every_n_steps=5)
        >>> [s for s in range(1, 16) if sched.is_flush(s, trainer=None)]
        [5, 10, 15]
    """

    def __init__(self, every_n_steps: int | None = None) -> None:
        if every_n_steps is not None and (not isinstance(every_n_steps, int) or every_n_steps < 1):
            raise ValueError(f"`every_n_steps` must be a positive integer or None, got {every_n_steps!r}")
        self.every_n_steps = every_n_steps
        self._last_flushed = -1

    def interval(self, trainer: Any) -> int:
        """Steps between flushes: the explicit value, else the Trainer's ``log_every_n_steps`` (at least 1)."""
        if self.every_n_steps is not None:
            return self.every_n_steps
        return max(1, int(getattr(trainer, "log_every_n_steps", 50) or 1))

    def is_flush(self, global_step: int, trainer: Any) -> bool:
        """True when ``global_step`` (optimizer steps done) is a flush step not yet flushed."""
        return global_step > 0 and global_step % self.interval(trainer) == 0 and global_step != self._last_flushed

    def mark(self, global_step: int) -> None:
        """Remember that ``global_step`` was flushed (a step is flushed once, even with gradient accumulation)."""
        self._last_flushed = global_step

    def next_step_flushes(self, trainer: Any) -> bool:
        """True when the optimizer step about to run will be a flush step (used to arm forward hooks)."""
        return (int(trainer.global_step) + 1) % self.interval(trainer) == 0

    def step_is_flushed(self, step: int, trainer: Any) -> bool:
        """True when optimizer step ``step`` (the one about to run) will be flushed: a flush step, or the fit's last.

        The fit's last step is known in advance by ``max_steps`` or as the last batch of the last epoch.

        Used by callbacks that flush at train end to arm per-step work (group norms, the post-clip norm).
        """
        return step % self.interval(trainer) == 0 or fit_ends_at(step, trainer)


def fit_ends_at(step: int, trainer: Any) -> bool:
    """True when optimizer step ``step`` (the one about to run) is the fit's last by ``max_steps`` or ``max_epochs``.

    By ``max_epochs``: the last batch of the last epoch. A stop decided later (EarlyStopping, ``should_stop``)
    cannot be known here.

    Example:
        >>> from types import SimpleNamespace
        >>> fit_ends_at(10, SimpleNamespace(max_steps=10))
        True
    """
    max_steps = getattr(trainer, "max_steps", -1)
    if max_steps is not None and max_steps > 0 and step >= max_steps:
        return True
    epoch_loop = getattr(getattr(trainer, "fit_loop", None), "epoch_loop", None)
    last_batch = getattr(getattr(epoch_loop, "batch_progress", None), "is_last_batch", False) is True
    max_epochs = getattr(trainer, "max_epochs", None)
    return last_batch and max_epochs is not None and max_epochs > 0 and trainer.current_epoch + 1 >= max_epochs


def host_to_device(values: list[int] | list[bool], device: torch.device, dtype: torch.dtype = torch.long) -> Tensor:
    """Host numbers onto the device: a host-to-device copy, never a read.

    Pinned and asynchronous on CUDA, so it does not wait for the device (a plain ``torch.tensor(..., device="cuda")``
    synchronises).

    Example:
        >>> host_to_device([3, 1], torch.device("cpu"))
        tensor([3, 1])
    """
    host = torch.tensor(values, dtype=dtype)
    if device.type == "cuda":
        return host.pin_memory().to(device, non_blocking=True)
    return host.to(device)


_SHARDED = ("FSDPStrategy", "ModelParallelStrategy", "DeepSpeedStrategy")
#: the sharding strategies whose gradient shards the gradient monitor and the NaN guard sum (``_shards.py``)
SUMMED_SHARDS = ("ModelParallelStrategy", "FSDPStrategy")


def refuse_sharded(
    trainer: Any,
    who: str,
    what: str,
    way_out: str = "`LossDiagnostics(gradients=False)`",
    allowed: tuple[str, ...] = (),
) -> None:
    """Fail at fit start under a sharding strategy, where ``who`` would see one rank's shard of each gradient.

    FSDP (``FSDPStrategy``), FSDP2/tensor parallel (``ModelParallelStrategy``) and DeepSpeed hand each rank a slice of
    every gradient: norms and non-finite checks of those slices are not the full gradient's, and numbers that look
    right but are not are worse than none. ``allowed``: the strategies (class names, subclasses included) whose
    shards the caller sums itself (:data:`SUMMED_SHARDS` for the gradient monitor and the NaN guard).

    Example:
        >>> from types import SimpleNamespace
        >>> class DeepSpeedStrategy: ...
        >>> try:
        ...     refuse_sharded(SimpleNamespace(strategy=DeepSpeedStrategy()), "GradientMonitor", "gradient norms")
        ... except RuntimeError as err:
        ...     print(str(err)[:50])
        GradientMonitor does not support DeepSpeedStrategy
    """
    names = [cls.__name__ for cls in type(getattr(trainer, "strategy", None)).__mro__]
    found = next((n for n in names if n in _SHARDED), None)
    if found is not None and found not in allowed:
        raise RuntimeError(
            f"{who} does not support {found} yet: each rank holds a shard of every gradient, so its {what} would "
            f"be one shard's, not the model's. Turn it off to train with the other parts: {way_out}. DDP, FSDP "
            "(FSDPStrategy with use_orig_params=True) and FSDP2 (ModelParallelStrategy) are supported."
        )


def to_host(values: Mapping[str, Tensor | float | int]) -> dict[str, float]:
    """Move a mapping of scalar tensors to host floats in ONE transfer. Flush/epoch-end only (one host sync).

    Example:
        >>> to_host({"a": torch.tensor(1.5), "b": torch.tensor([2])})
        {'a': 1.5, 'b': 2.0}
        >>> to_host({"mean": torch.tensor(0.25, dtype=torch.float64), "std": torch.tensor(2.0, dtype=torch.float64)})
        {'mean': 0.25, 'std': 2.0}
    """
    if not values:
        return {}
    keys = list(values)
    items = list(values.values())
    scalars = [v for v in items if isinstance(v, Tensor) and v.ndim == 0]
    if len(scalars) == len(items) and all(
        v.dtype == scalars[0].dtype and v.device == scalars[0].device for v in scalars
    ):  # the usual flush: scalars of one dtype on one device -> one stack, one conversion, one transfer
        host = torch.stack(scalars).detach().to(torch.float64).cpu().tolist()
        return dict(zip(keys, (float(x) for x in host), strict=True))
    device = next((v.device for v in items if isinstance(v, Tensor)), torch.device("cpu"))
    tensors = [
        v.detach().reshape(-1)[:1].to(device=device, dtype=torch.float64)
        if isinstance(v, Tensor)
        else torch.full((1,), float(v), dtype=torch.float64, device=device)
        for v in items
    ]
    host = torch.cat(tensors).cpu().tolist()  # the one host read of a flush
    return dict(zip(keys, (float(x) for x in host), strict=True))


def log_scalars(trainer: Any, metrics: Mapping[str, float], step: int | None = None) -> None:
    """Write host floats to every logger at ``step`` (default ``trainer.global_step``) and to the run record.

    Lightning's own ``TensorBoardLogger`` gets all of them in one event (:func:`write_scalars`), every other logger
    one ``log_metrics`` call.

    Non-finite values are written as they are (TensorBoard shows them); the record keeps them for the rules.
    """
    if not metrics:
        return
    step = int(trainer.global_step) if step is None else int(step)
    clean = {k: float(v) for k, v in metrics.items()}
    record_for(trainer).add_scalars(step, clean)
    if getattr(trainer, "is_global_zero", True):
        for logger in getattr(trainer, "loggers", []) or []:
            write_scalars(logger, clean, step)  # Lightning's TensorBoardLogger: one event; others: log_metrics


def show_in_progress_bar(trainer: Any, values: Mapping[str, float]) -> None:
    """Show host floats in Lightning's progress bar until they are next updated (flush-time values).

    The bar reads a dict of plain numbers that Lightning keeps; a value put there costs nothing per step, whereas a
    tensor logged with ``self.log(..., on_step=True, prog_bar=True)`` is read back to the host after every batch.
    Silently does nothing where that dict does not exist (another Trainer, a future Lightning).
    """
    shown = getattr(getattr(trainer, "_logger_connector", None), "_progress_bar_metrics", None)
    if isinstance(shown, dict):
        shown.update({k: float(v) for k, v in values.items()})


def warn_no_logger_once(trainer: Any, owner: str) -> bool:
    """Warn once per Trainer that there is no logger (numbers still reach the diagnosis). Returns True if none."""
    if getattr(trainer, "loggers", None):
        return False
    if not getattr(trainer, "_lossdiag_warned_no_logger", False):
        rank_zero_warn(
            f"{owner}: the Trainer has no logger, so nothing is written to TensorBoard or CSV; "
            "the diagnosis is still computed and printed. Pass `logger=TensorBoardLogger(...)` to see the charts."
        )
        trainer._lossdiag_warned_no_logger = True  # our own attribute on the Trainer, not a Lightning one
    return True


def is_finite_number(x: float) -> bool:
    """``math.isfinite`` that accepts anything float() accepts (host values only)."""
    try:
        return math.isfinite(float(x))
    except (TypeError, ValueError):
        return False
