"""Per-fold results: mean ± std per metric, the rich table printed at the end of ``lossdiag cv``, and the JSON file.

Everything here works on plain host floats (collected once per fold, after its validation run).
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from rich.table import Table

#: the ``ddof`` of the standard deviation over folds used by ``lossdiag cv`` (sample standard deviation)
DEFAULT_DDOF = 1


@dataclass(frozen=True)
class MetricSummary:
    """One metric over the folds.

    Attributes:
        values: the value of each fold, ``None`` where the fold did not log the metric.
        mean: mean over the folds that logged it (NaN when none did).
        std: standard deviation over those folds with ``ddof`` (NaN when fewer than ``ddof + 1`` values).
        ddof: delta degrees of freedom of ``std`` (``numpy.std``'s meaning: divide by ``count - ddof``).
    """

    values: list[float | None]
    mean: float
    std: float
    ddof: int

    @property
    def count(self) -> int:
        """Number of folds that logged the metric."""
        return sum(v is not None for v in self.values)


def summarize_folds(per_fold: Sequence[Mapping[str, float]], ddof: int = DEFAULT_DDOF) -> dict[str, MetricSummary]:
    """Mean and standard deviation of every metric over the folds (``numpy.mean`` / ``numpy.std(ddof=ddof)``).

    A metric a fold did not log is ``None`` for that fold and left out of its mean and std. A NaN value is kept
    (it makes the mean NaN: a diverged fold should show). Metrics come out sorted by name.

    Args:
        per_fold: one mapping ``metric -> value`` per fold.
        ddof: ``0`` for the population standard deviation (numpy's default), ``1`` for the sample one (default).

    Raises:
        ValueError: ``ddof`` is not 0 or 1, or ``per_fold`` is empty.

    Example:
        >>> s = summarize_folds([{"val/loss": 1.0}, {"val/loss": 3.0}], ddof=0)["val/loss"]
        >>> s.values, s.mean, s.std
        ([1.0, 3.0], 2.0, 1.0)
    """
    if ddof not in (0, 1) or isinstance(ddof, bool):
        raise ValueError(f"`ddof` must be 0 or 1, got {ddof!r}")
    if not per_fold:
        raise ValueError("`per_fold` must hold the metrics of at least one fold, got an empty sequence")
    names = sorted({name for fold in per_fold for name in fold})
    summary: dict[str, MetricSummary] = {}
    for name in names:
        values = [float(fold[name]) if name in fold else None for fold in per_fold]
        present = np.array([v for v in values if v is not None], dtype=np.float64)
        with np.errstate(invalid="ignore", over="ignore"):  # an infinite value gives a NaN std, without a warning
            mean = float(np.mean(present)) if present.size else math.nan
            std = float(np.std(present, ddof=ddof)) if present.size > ddof else math.nan
        summary[name] = MetricSummary(values=values, mean=mean, std=std, ddof=ddof)
    return summary


def format_value(value: float | None) -> str:
    """Four significant digits; ``-`` for a missing value.

    Example:
        >>> format_value(0.123456), format_value(1234.5), format_value(None), format_value(float("nan"))
        ('0.1235', '1234', '-', 'nan')
    """
    if value is None:
        return "-"
    return f"{value:.4g}"


def summary_table(
    summary: Mapping[str, MetricSummary],
    fold_sizes: Sequence[tuple[int, int]],
    findings: Sequence[Sequence[str] | None] | None = None,
    title: str = "cross-validation",
) -> Table:
    """A rich table: one row per metric, one column per fold, and a ``mean ± std`` column.

    Two rows on top give each fold's train/val row counts. When a Doctor ran, a ``findings`` row gives the number
    of findings of each fold, then one row per finding code marks the folds where it was raised (``k/K folds``).

    Args:
        summary: the result of :func:`summarize_folds`.
        fold_sizes: ``(train rows, val rows)`` of each fold.
        findings: finding codes of each fold (``None`` for a fold without a Doctor), or ``None`` to leave the rows out.
        title: table title.
    """
    k = len(fold_sizes)
    ddof = next(iter(summary.values())).ddof if summary else DEFAULT_DDOF
    table = Table(title=title, caption=f"std over folds with ddof={ddof}")
    table.add_column("metric", style="bold", no_wrap=True)
    for i in range(k):
        table.add_column(f"fold {i}", justify="right")
    table.add_column("mean ± std", justify="right", no_wrap=True)
    table.add_row("train rows", *(str(t) for t, _ in fold_sizes), "", style="dim")
    table.add_row("val rows", *(str(v) for _, v in fold_sizes), "", style="dim", end_section=True)
    for name, s in summary.items():
        table.add_row(name, *(format_value(v) for v in s.values), f"{format_value(s.mean)} ± {format_value(s.std)}")
    if findings is not None:
        table.add_row(
            "findings",
            *("-" if codes is None else str(len(codes)) for codes in findings),
            f"{sum(len(c) for c in findings if c is not None)} in all",
            end_section=False,
        )
        for code in sorted({c for codes in findings if codes is not None for c in codes}):
            hits = ["-" if codes is None else ("yes" if code in codes else "") for codes in findings]
            table.add_row(f"  {code}", *hits, f"{hits.count('yes')}/{k} folds", style="yellow")
    return table


def _finite_or_none(value: float | None) -> float | None:
    return value if value is not None and math.isfinite(value) else None


def summary_dict(summary: Mapping[str, MetricSummary]) -> dict[str, dict[str, Any]]:
    """Plain JSON-ready data: ``{metric: {"values", "mean", "std", "count"}}``; non-finite numbers become ``None``.

    Example:
        >>> summary_dict(summarize_folds([{"a": 1.0}, {"a": float("nan")}]))["a"]
        {'values': [1.0, None], 'mean': None, 'std': None, 'count': 2}
    """
    return {
        name: {
            "values": [_finite_or_none(v) for v in s.values],
            "mean": _finite_or_none(s.mean),
            "std": _finite_or_none(s.std),
            "count": s.count,
        }
        for name, s in summary.items()
    }


def write_summary_json(path: str | Path, summary: Mapping[str, MetricSummary], **fields: Any) -> Path:
    """Write ``cv_summary.json``: the given ``fields`` (config, seed, folds, ...), ``std_ddof`` and ``metrics``.

    Values that are not finite are written as ``null`` (strict JSON); ``count`` says how many folds logged the
    metric, so a ``null`` among ``values`` with a full count was NaN or infinite.

    Returns:
        The path written.
    """
    ddof = next(iter(summary.values())).ddof if summary else DEFAULT_DDOF
    data = {**fields, "std_ddof": ddof, "metrics": summary_dict(summary)}
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(data, indent=2, allow_nan=False) + "\n", encoding="utf-8")
    return out
