"""Held values of several class-engine updates, added to the counts at once: fewer ops per training step.

An update of :class:`~lightning_lossdiag.stats.classification.ClassCounts` has two halves. The first reads the whole
batch (maxima, top-k, row losses, per-label masks) and must run while the batch is alive. The second adds what the
first found to the state: per-row sums and bins, and the statistics of the budget sample of rows (curves,
classwise bins, moments). On the CPU each op of that second half costs a few microseconds whatever its size, so a
batch of 256 rows pays about a hundred of them. :class:`Pending` keeps the second half's inputs of up to ``steps``
updates in fixed buffers (the staged per-row values, the predicted and true classes, the sampled rows and their
weights) and the counts add them in one go: the same values, in the same bins, a fraction of the ops per step.
The rows drawn for the sample are the same as without holding (the sampler's draws do not move), so the counts are
equal to those of updates added one by one, up to the order of float64 sums. The confused-pair sketch of the error
views is not held: which pairs it keeps depends on how rows are batched, so it still takes each update as it comes.

Bounded memory: at most ``MAX_ROWS`` held rows and ``MAX_SAMPLE_VALUES`` held sampled values; an update larger
than that is added alone, and when fewer than ``MIN_HELD`` updates of the first one's size would fit (a batch of
segmentation maps is 32k rows and more) nothing is held: each update's own ops are then few next to its values. No
host read.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

import torch
from torch import Tensor

MAX_ROWS = 2**16  # held rows (staged per-row values: about 60 bytes a row)
MAX_SAMPLE_VALUES = 2**18  # held sampled values (1 MiB of float32 scores)
SETTLE_VALUES = 2**15  # sampled values added per piece at a settle: its temporaries stay in cache
MIN_HELD = 4  # holding pays only when this many updates fit in the buffers; larger updates are added at once


def pieces(rows: int, width: int) -> list[slice]:
    """Slices of ``rows`` held sampled rows of ``width`` values, each of at most ``SETTLE_VALUES`` values."""
    step = max(1, SETTLE_VALUES // max(1, width))
    return [slice(a, min(a + step, rows)) for a in range(0, rows, step)]


class Pending:
    """Fixed buffers holding the inputs of the second half of up to ``steps`` updates (see the module docstring).

    Buffers come in two kinds: ``"rows"`` (one entry per row of a batch) and ``"sample"`` (one per sampled row).
    Their capacity is ``steps`` updates of the size of the first update (or of a larger one that comes while
    nothing is held), within the module's bounds.

    Example:
        >>> held = Pending(steps=4, device=torch.device("cpu"))
        >>> held.admit(rows=3, sample=2, settle=lambda: None)
        True
        >>> held.claim("rows", "pred", (), torch.long)[:3].copy_(torch.tensor([2, 0, 1]))  # example input
        tensor([2, 0, 1])
        >>> held.advance(rows=3, sample=2, total=3)
        >>> held.view("rows", "pred").tolist(), held.capacity
        ([2, 0, 1], {'rows': 12, 'sample': 8})
    """

    def __init__(self, steps: int, device: torch.device) -> None:
        self.steps = max(1, steps)
        self.device = device
        self.updates = 0  # updates held
        self.total = 0  # rows of the held updates, counted and left out
        self.used = {"rows": 0, "sample": 0}
        self.capacity = {"rows": 0, "sample": 0}
        self._buffers: dict[str, tuple[str, Tensor]] = {}

    def admit(
        self,
        rows: int,
        sample: int,
        settle: Callable[[], None],
        width: int = 1,
        kinds: Mapping[str, tuple[tuple[int, ...], torch.dtype]] | None = None,
    ) -> bool:
        """Whether an update of ``rows`` rows and ``sample`` sampled rows (``width`` values each) is held.

        ``settle`` (the counts adding what is held, then :meth:`clear`) is called first when the update would not
        fit beside what is held, or when a buffer of ``kinds`` (name: trailing shape and dtype the update writes)
        holds entries of another shape or dtype. An update larger than the capacity settles what is held and sizes
        the buffers again for itself (the first update may be a small one); one of which fewer than ``MIN_HELD``
        would fit is not held (``False``).
        """
        if self.updates and not all(self._same(name, *kind) for name, kind in (kinds or {}).items()):
            settle()
        if not self._fits(rows, sample):  # larger than the buffers: add what is held, size them for this one
            if self.updates:
                settle()
            self._size(rows, sample, width)  # buffers of the old size are rebuilt by claim()
            return self._fits(rows, sample)
        if self.used["rows"] + rows > self.capacity["rows"] or self.used["sample"] + sample > self.capacity["sample"]:
            settle()
        return True

    def _fits(self, rows: int, sample: int) -> bool:
        return rows <= self.capacity["rows"] and sample <= self.capacity["sample"]

    def _size(self, rows: int, sample: int, width: int) -> None:
        """Capacity for ``steps`` updates of this size, within the bounds; none when fewer than ``MIN_HELD`` fit."""
        cap = max(1, MAX_SAMPLE_VALUES // max(1, width))
        self.capacity = {"rows": min(MAX_ROWS, rows * self.steps), "sample": min(cap, sample * self.steps)}
        need = min(MIN_HELD, self.steps)
        if rows * need > self.capacity["rows"] or sample * need > self.capacity["sample"]:
            self.capacity = {"rows": 0, "sample": 0}  # too few would fit (e.g. segmentation maps): not held

    def claim(self, kind: str, name: str, tail: tuple[int, ...], dtype: torch.dtype) -> Tensor:
        """The entries of buffer ``name`` (shape ``(capacity, *tail)``) that the admitted update writes.

        Only valid between :meth:`admit` and :meth:`advance`. A buffer whose shape or dtype changes is rebuilt
        (:meth:`admit` settles what it held first, given the update's ``kinds``).
        """
        kept = self._buffers.get(name)
        cap = self.capacity[kind]
        if kept is None or kept[1].dtype != dtype or tuple(kept[1].shape[1:]) != tail or kept[1].shape[0] != cap:
            kept = self._buffers[name] = (kind, torch.empty((cap, *tail), dtype=dtype, device=self.device))
        start = self.used[kind]
        return kept[1][start:]

    def _same(self, name: str, tail: tuple[int, ...], dtype: torch.dtype) -> bool:
        """Whether buffer ``name`` (if built) has this trailing shape and dtype."""
        kept = self._buffers.get(name)
        return kept is None or (kept[1].dtype == dtype and tuple(kept[1].shape[1:]) == tail)

    def advance(self, rows: int, sample: int, total: int) -> None:
        """The admitted update is written: its entries join the held ones (``total``: its rows, all of them)."""
        self.used["rows"] += rows
        self.used["sample"] += sample
        self.total += total
        self.updates += 1

    def view(self, kind: str, name: str) -> Tensor:
        """The held entries of buffer ``name``."""
        return self._buffers[name][1][: self.used[kind]]

    def full(self) -> bool:
        """``steps`` updates are held: time to add them."""
        return self.updates >= self.steps

    def clear(self) -> None:
        """Forget the held entries (after the counts added them); the buffers stay for the next updates."""
        self.updates = self.total = 0
        self.used = {"rows": 0, "sample": 0}

    @property
    def nbytes(self) -> int:
        """Bytes of the buffers."""
        return sum(t.numel() * t.element_size() for _, t in self._buffers.values())


__all__ = ["MAX_ROWS", "MAX_SAMPLE_VALUES", "SETTLE_VALUES", "Pending", "pieces"]
