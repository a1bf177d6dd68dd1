"""Helpers the rules share: key aliases, robust window statistics, noise and number formatting (host floats only)."""

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

#: A second difference of independent noise of standard deviation ``s`` has standard deviation ``s * sqrt(6)``; the
#: mean absolute deviation of a normal variable is ``sqrt(2 / pi)`` times its standard deviation.
_SECOND_DIFF_SCALE = math.sqrt(6.0) * math.sqrt(2.0 / math.pi)


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


def noise_sd(values: Sequence[float], turn: int | None = None) -> float:
    """Standard deviation of the point-to-point noise of a series around its local trend (0.0 when unknown).

    Second differences ``x[i-1] - 2 x[i] + x[i+1]`` cancel a locally linear trend, and centring them on their median
    cancels a steady curvature. Their mean absolute deviation from that median is scaled to the standard deviation
    of one point: for independent noise of standard deviation ``s`` it estimates ``s`` (a mean, not a median: the
    noise of loss curves comes in bursts, and a median reads a quiet stretch as no noise at all). ``turn`` is the
    index of a point whose second difference is left out: the turn a rule is testing (the best value before a rise)
    is not noise. Fewer than 3 points give 0.0 (nothing is known about the noise).

    Example:
        >>> round(noise_sd([0.5, 0.4, 0.3, 0.2, 0.1]), 6)  # a straight fall: no noise around its trend
        0.0
        >>> round(noise_sd([0.30, 0.33, 0.29, 0.32, 0.30, 0.31, 0.29, 0.33]), 3)  # a level that jitters by ~0.02
        0.026
        >>> round(noise_sd([1.0, 0.7, 0.75, 0.8, 0.9], turn=1), 3)  # a fall that turns into a rise at index 1
        0.013
    """
    d2 = [values[i - 1] - 2.0 * values[i] + values[i + 1] for i in range(1, len(values) - 1) if i != turn]
    d2 = [d for d in d2 if math.isfinite(d)]
    if not d2:
        return 0.0
    center = median(d2)
    return sum(abs(d - center) for d in d2) / len(d2) / _SECOND_DIFF_SCALE


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
