"""Helpers the rules share: key aliases, robust window statistics and number formatting (host floats only)."""

from __future__ import annotations

import math
import statistics
from collections.abc import Callable, Sequence

from lightning_lossdiag.diagnosis.record import RunRecord

Series = list[tuple[int, float]]

#: Our canonical name -> names users commonly log for the same thing (checked in this order).
ALIASES: dict[str, tuple[str, ...]] = {
    "train/loss": ("train/loss", "train_loss", "train_loss_step", "train/loss_step", "loss"),
    "train/loss_epoch": ("train/loss_epoch", "train_loss_epoch"),
    "val/loss": ("val/loss", "val_loss", "valid_loss", "val/loss_epoch", "val_loss_epoch", "validation_loss"),
}


def find_series(record: RunRecord, canonical: str) -> tuple[str | None, Series]:
    """The first alias of ``canonical`` with points in ``record``: ``(key, points)``, or ``(None, [])``.

    Example:
        >>> r = RunRecord()
        >>> r.add_scalars(3, {"val_loss": 0.5})
        >>> find_series(r, "val/loss")
        ('val_loss', [(3, 0.5)])
    """
    for key in ALIASES.get(canonical, (canonical,)):
        points = record.series(key)
        if points:
            return key, points
    return None, []


def finite(points: Series) -> Series:
    """The points whose value is finite."""
    return [(s, v) for s, v in points if math.isfinite(v)]


def window(n: int, frac: float) -> int:
    """Size of the recent window of a series of ``n`` points: ``frac`` of it, at least 3 (at most ``n``)."""
    return min(n, max(3, int(round(n * frac))))


def median(values: Sequence[float]) -> float:
    """Median of the values (``nan`` when empty)."""
    return float(statistics.median(values)) if values else math.nan


def rolling_medians(values: Sequence[float], size: int) -> list[float]:
    """Medians of every full window of ``size`` consecutive values (smooths noise before taking a minimum)."""
    size = max(1, min(size, len(values)))
    return [median(values[i : i + size]) for i in range(len(values) - size + 1)]


def first_step(points: Series, predicate: Callable[[float], bool]) -> int | None:
    """Step of the first point whose value satisfies ``predicate``."""
    for s, v in points:
        if predicate(v):
            return s
    return None


def fmt(x: float | None) -> str:
    """Short human number: ``0.00123`` -> ``'0.00123'``, ``1234567`` -> ``'1.23e+06'``."""
    if x is None:
        return "n/a"
    if not math.isfinite(x):
        return str(x)
    return f"{x:.3g}"


def note_int(record: RunRecord, key: str) -> int | None:
    """An integer note, or ``None`` when absent or not a number."""
    value = record.notes.get(key)
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    return int(value)


def min_step(*steps: int | None) -> int | None:
    """The smallest of the given steps that are not ``None``."""
    known = [s for s in steps if s is not None]
    return min(known) if known else None
