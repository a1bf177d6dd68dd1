"""One classification engine per Trainer and stage slot, shared by ``ErrorDistributionMonitor`` and ``MetricCurves``.

Both callbacks see the same step. The first that hands it over feeds the slot's
:class:`~lightning_lossdiag.stats.classification.ClassCounts`; the second finds the same tensors already taken and
does nothing, so a batch is counted once whichever parts are on. Steps are held as references (no kernel) and fed in
one concatenated update every ``buffer_steps`` steps or once the held tensors pass ``buffer_bytes`` (large outputs:
every step), and at epoch end. The counts add the second half of their updates (per-row sums, budget samples)
``HOLD_UPDATES`` updates at a time (:mod:`~lightning_lossdiag.stats.pending`); every read goes through
``ClassCounts.merged`` or ``settle``, which add what is held first. At the end of an epoch each reader takes the
merged counts (one collective per slot and epoch, cached for the other reader) and marks the slot finished; its next
batch starts fresh counts.
"""

from __future__ import annotations

import weakref
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from typing import Any

import torch
from torch import Tensor

from lightning_lossdiag.callbacks._metric_buffer import StepBuffer
from lightning_lossdiag.callbacks._task import TaskInfo, hard_labels
from lightning_lossdiag.stats.classification import ClassCounts

_ENGINES_ATTR = "lossdiag_class_engines"
DEFAULT_BUDGET = 2**14
DEFAULT_MAX_CONFUSION = 32
_LARGE_BYTES = 2**19  # on the CPU a step this large is counted alone (no concatenation)
DEFAULT_BUFFER_BYTES = 8 * 2**20  # held step outputs per slot: a few steps of 1,000-class logits, one 32k-token step
HOLD_UPDATES = 16  # updates whose per-row sums and budget samples are added to the counts at once (stats.pending)


@dataclass(frozen=True)
class EngineConfig:
    """What two readers must agree on to share counts (``bins``/``worst_k``/``views`` ``None``: any will do).

    ``views``: the error views' statistics (confusion or confused pairs, worst rows, true-class probability
    histogram), which only ``ErrorDistributionMonitor`` reads. A slot that only ``MetricCurves`` watches (the train
    stage, by default) is counted without them: about a third fewer ops per update.
    """

    thresholds: int = 101
    budget: int = DEFAULT_BUDGET
    max_confusion: int = DEFAULT_MAX_CONFUSION
    bins: int | None = None
    worst_k: int | None = None
    views: bool | None = None

    def fits(self, other: EngineConfig) -> bool:
        """True when counts built with ``other`` serve this reader."""
        same = (self.thresholds, self.budget, self.max_confusion) == (
            other.thresholds,
            other.budget,
            other.max_confusion,
        )
        optional = self.bins in (None, other.bins) and self.worst_k in (None, other.worst_k)
        return same and optional and self.views in (None, other.views)


@dataclass
class Engine:
    """The counts of one slot, the steps held for them, and the last step taken."""

    info: TaskInfo
    config: EngineConfig
    counts: ClassCounts
    buffer: StepBuffer
    rank: int = 0
    world: int = 1
    last: tuple[weakref.ref[Tensor], weakref.ref[Tensor]] | None = None  # weak: the step's logits die with the step
    finished: bool = False
    version: int = 0
    merged: tuple[int, ClassCounts] | None = None
    readers: set[int] = field(default_factory=set)
    drained: int = 0  # updates fed to the counts so far (0: they can still be rebuilt with other statistics)

    def add(self, preds: Tensor, target: Tensor) -> None:
        """Take one step (once, whichever reader comes first); no kernel unless the buffer is full."""
        if self.last is not None and self.last[0]() is preds and self.last[1]() is target:
            return
        if self.finished:  # first batch of a new epoch of this stage
            device, self.merged = self.counts.device, None
            del self.counts  # the last epoch's counts go before the new ones come (no two sets at once)
            self.counts = _new_counts(self.info, self.config, device, self.rank)
            self.finished = False
        self.last = (weakref.ref(preds), weakref.ref(target))
        target = hard_labels(target, self.info)  # class probabilities as targets: each row's most likely class
        self.version += 1
        if self.buffer.add(preds, target) or _large(preds, self.buffer.max_bytes):
            self.drain()  # a large step goes alone: concatenating it would copy more than it saves

    def drain(self) -> None:
        """Feed the held steps to the counts (device only); the sampling budget is per step, so it scales with them."""
        steps = len(self.buffer)
        pairs = self.buffer.take()
        self.drained += len(pairs)
        for preds, target in pairs:
            self.counts.update(preds, target, rank=self.rank, world=self.world, steps=max(1, steps // len(pairs)))

    def view(self, gather: Any) -> ClassCounts:
        """The counts merged over ranks (epoch end: one collective per slot and epoch, then cached)."""
        self.drain()
        if self.merged is None or self.merged[0] != self.version:
            self.merged = (self.version, self.counts.merged(gather, self.world))
        return self.merged[1]

    def finish(self) -> None:
        """The epoch of this slot is over: the next step starts fresh counts (left as they are until then)."""
        self.drain()
        self.finished = True
        self.last = None


_SAVED_COUNTS = (
    "per_class",
    "label_rows",
    "rows",
    "curves",
    "moments",
    "calibration",
    "calibration_fine",
    "classwise",
    "brier",
)


def saved_counts(engine: Engine) -> dict[str, Any]:
    """The metric counts of a slot as CPU tensors for a checkpoint (checkpoint save: host copies)."""
    engine.drain()
    engine.counts.settle()
    return {name: getattr(engine.counts, name).detach().cpu().clone() for name in _SAVED_COUNTS}


def restore_counts(counts: Any, saved: Any) -> None:
    """Add saved metric counts to a slot's fresh counts (one-time, at resume; shapes that no longer fit are skipped)."""
    if not isinstance(saved, Mapping):
        return
    for name in _SAVED_COUNTS:
        value, current = saved.get(name), getattr(counts, name)
        if isinstance(value, Tensor) and value.shape == current.shape:
            current += value.to(device=current.device, dtype=current.dtype)


def _large(preds: Tensor, max_bytes: int) -> bool:
    """A step counted alone (storage size: metadata, no host read); its update's fixed cost is small next to it.

    On the CPU, predictions of 512 KiB or more: a concatenation would copy them into fresh pages, which costs more
    than the few ops an update adds. Elsewhere, at least 1 MiB and a quarter of the buffer: there an update's cost
    is its kernel launches, which the concatenation of several steps saves.
    """
    nbytes = preds.untyped_storage().nbytes()
    if preds.device.type == "cpu":
        return nbytes >= _LARGE_BYTES
    return nbytes >= max(max_bytes // 4, 2**20)


def _new_counts(info: TaskInfo, config: EngineConfig, device: torch.device, rank: int) -> ClassCounts:
    return ClassCounts(
        info.task,
        info.inputs,
        int(info.num_classes or 2),
        class_dim=info.class_dim,
        ignore_index=info.ignore_index,
        thresholds=config.thresholds,
        budget=config.budget,
        max_confusion=config.max_confusion,
        bins=config.bins or 64,
        worst_k=config.worst_k or 20,
        device=device,
        seed=rank,  # each DDP rank samples its own rows
        views=bool(config.views),
        hold=HOLD_UPDATES,
    )


def engine_for(
    trainer: Any,
    slot: str,
    info: TaskInfo,
    config: EngineConfig,
    device: torch.device,
    buffer_steps: int,
    buffer_bytes: int,
) -> Engine:
    """The engine of ``slot`` on ``trainer`` that fits ``config`` (created at the first batch of the slot)."""
    engines: dict[str, list[Engine]] = trainer.__dict__.setdefault(_ENGINES_ATTR, {})
    for engine in engines.get(slot, []):
        if engine.info != info:
            continue
        wider = replace(engine.config, views=True)
        if config.views and not engine.config.views and not engine.drained and config.fits(wider):
            # the error views join a slot before anything was counted (the readers' first step, in either order):
            # the counts are rebuilt with the views' statistics and the held step is counted once, by them
            engine.config = wider
            engine.counts = _new_counts(info, wider, engine.counts.device, engine.rank)
        if config.fits(engine.config):
            # the reader that asks to hold fewer steps (or bytes) sets the shared buffer's limits
            engine.buffer.max_steps = min(engine.buffer.max_steps, buffer_steps)
            engine.buffer.max_bytes = min(engine.buffer.max_bytes, buffer_bytes)
            return engine
    built = EngineConfig(
        config.thresholds,
        config.budget,
        config.max_confusion,
        config.bins or 64,
        config.worst_k or 20,
        bool(config.views),
    )
    rank, world = int(getattr(trainer, "global_rank", 0)), int(getattr(trainer, "world_size", 1))
    engine = Engine(
        info, built, _new_counts(info, built, device, rank), StepBuffer(buffer_steps, buffer_bytes), rank, world
    )
    engines.setdefault(slot, []).append(engine)
    return engine


__all__ = [
    "DEFAULT_BUDGET",
    "DEFAULT_BUFFER_BYTES",
    "restore_counts",
    "saved_counts",
    "DEFAULT_MAX_CONFUSION",
    "Engine",
    "EngineConfig",
    "engine_for",
]
