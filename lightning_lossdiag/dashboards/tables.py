"""Markdown tables for TensorBoard's text dashboard (``SummaryWriter.add_text`` renders markdown)."""

from __future__ import annotations

import math
from collections.abc import Sequence


def _cell(value: object) -> str:
    if isinstance(value, float):
        if math.isnan(value) or math.isinf(value):
            return str(value)
        if value == int(value) and abs(value) < 1e15:
            return str(int(value))
        return f"{value:.6g}"
    return str(value).replace("|", "\\|")


def markdown_table(columns: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    """A markdown table with a header row; floats are written with 6 significant digits.

    Example:
        >>> print(markdown_table(["a", "b"], [[1.0, 0.125], [2.0, 1 / 3]]))
        | a | b |
        |---|---|
        | 1 | 0.125 |
        | 2 | 0.333333 |
    """
    if not columns:
        raise ValueError("`columns` must name at least one column, got none")
    lines = ["| " + " | ".join(columns) + " |", "|" + "|".join("---" for _ in columns) + "|"]
    for row in rows:
        if len(row) != len(columns):
            raise ValueError(f"every row must have {len(columns)} cells (one per column), got {len(row)}: {row!r}")
        lines.append("| " + " | ".join(_cell(v) for v in row) + " |")
    return "\n".join(lines)


def worst_samples_table(
    index: Sequence[float],
    target: Sequence[object],
    prediction: Sequence[object],
    loss: Sequence[float],
    *,
    element: Sequence[float] | None = None,
) -> str:
    """The worst samples, one per row, in the given order (worst first).

    Args:
        index: the sample's position in the stage's data (in loader order).
        target: the true value or class.
        prediction: the predicted value or class.
        loss: the per-sample loss that ranked it.
        element: position inside a sample with several outputs (a column is added only when given).

    Example:
        >>> print(worst_samples_table([7.0], [1.0], [3.5], [2.5]))
        | rank | index | target | prediction | loss |
        |---|---|---|---|---|
        | 1 | 7 | 1 | 3.5 | 2.5 |
    """
    n = len(index)
    if not (len(target) == len(prediction) == len(loss) == n) or (element is not None and len(element) != n):
        raise ValueError("`index`, `target`, `prediction`, `loss` (and `element`) must have the same length")
    columns = ["rank", "index", *(["element"] if element is not None else []), "target", "prediction", "loss"]
    rows: list[list[object]] = []
    for i in range(n):
        row: list[object] = [i + 1, int(index[i])]
        if element is not None:
            row.append(int(element[i]))
        row += [target[i], prediction[i], float(loss[i])]
        rows.append(row)
    return markdown_table(columns, rows)


__all__ = ["markdown_table", "worst_samples_table"]
