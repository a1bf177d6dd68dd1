"""Per-class views that stay readable at 1,000+ classes: finished host numbers in, TensorBoard events out.

Small tasks (``C <= max_classes``) keep one view per class: the confusion matrix, one PR curve per class, plus a
table of the worst classes. Beyond that, what is written is bounded whatever ``C`` is (``k + 6`` tags at most): the
confusion among the most confused classes plus "other", the micro-averaged PR curve, the PR curves of the ``k``
worst classes under rank tags (``pr_curve/worst_01`` ...; the table names the class each rank holds), histograms of
recall and precision across classes, and tables of the worst classes and the most confused pairs.

Per class, with ``tp = correct``, ``fp = predicted - correct`` and ``fn = support - correct``: recall ``tp / support``
(NaN without support), precision ``tp / predicted`` (NaN when nothing is predicted), F1 ``2 tp / (support +
predicted)`` (the harmonic mean of the two where both exist, 0 when one is 0; NaN only when both counts are 0), and
average precision from the binned curve counts, ``AP = sum_j (R_j - R_{j+1}) P_j`` with ``R_T = 0`` (torchmetrics'
binned rule; NaN when the curve has no positives).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from lightning_lossdiag.dashboards.figures import confusion_matrix_figure
from lightning_lossdiag.dashboards.pr_curves import confusion_at_thresholds, pr_curve_raw_args, write_pr_curves
from lightning_lossdiag.dashboards.tables import markdown_table

_TASKS = ("binary", "multiclass", "multilabel")
# confusion_matrix_figure prints the cell shares only up to 20 rows: 19 classes + "other" keeps them on the image.
_SUBSET_CLASSES = 19
_MAX_PAIR_ROWS = 20
_HIST_BINS = 20
_TICK_CHARS = 24


@dataclass
class ClassSummary:
    """Finished per-class numbers of one stage and epoch (host arrays).

    Example:
        >>> s = ClassSummary("multiclass", support=np.array([4, 0]), predicted=np.array([3, 1]),
        ...                  correct=np.array([3, 0]), pos=np.zeros((2, 3)), neg=np.zeros((2, 3)))
        >>> s.num_classes, s.names
        (2, ['0', '1'])
    """

    task: str  # "binary", "multiclass" or "multilabel"
    support: np.ndarray  # (C,) true count per class (multilabel: positives per label); binary: C == 2
    predicted: np.ndarray  # (C,) rows predicted as the class (multilabel: predicted positives per label)
    correct: np.ndarray  # (C,) true positives per class
    pos: np.ndarray  # (K, T) binned positive counts per curve and threshold bin (K = 1 for binary, C otherwise)
    neg: np.ndarray  # (K, T) binned negative counts
    confusion: np.ndarray | None = None  # (C, C) counts[true, pred] when the task is small, else None
    pairs: list[tuple[int, int, float]] | None = None  # most confused (true, pred, count), count descending
    names: list[str] | None = None  # class names (default: the indices as str)

    def __post_init__(self) -> None:
        if self.task not in _TASKS:
            raise ValueError(f"`task` must be one of {_TASKS}, got {self.task!r}")
        self.support, self.predicted, self.correct = (
            np.asarray(a, dtype=np.float64).reshape(-1) for a in (self.support, self.predicted, self.correct)
        )
        num = self.support.shape[0]
        if self.predicted.shape[0] != num or self.correct.shape[0] != num:
            raise ValueError(
                f"`support`, `predicted` and `correct` must have one entry per class, got {self.support.shape[0]}, "
                f"{self.predicted.shape[0]} and {self.correct.shape[0]}"
            )
        if self.task == "binary" and num != 2:
            raise ValueError(f"a binary task has 2 classes (0 and 1), got {num}")
        # float32 counts stay float32 (no copy of C x T curves at 32k classes); the AP reads them in float64 blocks
        self.pos, self.neg = (
            np.asarray(a, dtype=np.float32 if _is_f32(a) else np.float64) for a in (self.pos, self.neg)
        )
        curves = 1 if self.task == "binary" else num
        if self.pos.ndim != 2 or self.pos.shape != self.neg.shape or self.pos.shape[0] != curves:
            raise ValueError(
                f"`pos` and `neg` must both be ({curves}, T) for a {self.task} task with {num} classes, got "
                f"{self.pos.shape} and {self.neg.shape}"
            )
        if self.confusion is not None:
            self.confusion = np.asarray(self.confusion, dtype=np.float64)
            if self.confusion.shape != (num, num):
                raise ValueError(f"`confusion` must be ({num}, {num}), got {self.confusion.shape}")
        if self.names is None:
            self.names = [str(c) for c in range(num)]
        elif len(self.names) != num:
            raise ValueError(f"`names` must have {num} entries (one per class), got {len(self.names)}")

    @property
    def num_classes(self) -> int:
        """``C``, the number of classes (labels)."""
        return int(self.support.shape[0])

    @property
    def class_names(self) -> list[str]:
        """The names, one per class."""
        return self.names if self.names is not None else [str(c) for c in range(self.num_classes)]


def _example() -> ClassSummary:
    """Three classes: 0 is good, 1 is often taken for 2, 2 has no support (used by the doctests)."""
    return ClassSummary(
        "multiclass",
        support=np.array([5, 4, 0]),
        predicted=np.array([5, 1, 3]),
        correct=np.array([5, 1, 0]),
        pos=np.array([[0, 0, 5], [1, 2, 1], [0, 0, 0]]),
        neg=np.array([[4, 0, 0], [3, 2, 0], [6, 2, 1]]),
        pairs=[(1, 2, 3.0)],
    )


_AP_BLOCK = 1024  # classes per block of the AP computation


def _column_sums(a: np.ndarray) -> np.ndarray:
    """``a.sum(0)`` in float64, ``_AP_BLOCK`` rows at a time (a float64 copy of 32k x T float32 counts is 26 MB)."""
    return sum(
        (a[i : i + _AP_BLOCK].sum(0, dtype=np.float64) for i in range(0, a.shape[0], _AP_BLOCK)), np.zeros(a.shape[1])
    )


def _is_f32(a: Any) -> bool:
    return getattr(a, "dtype", None) == np.float32


def is_small(summary: ClassSummary, max_classes: int) -> bool:
    """Whether the task keeps one view per class (``C <= max_classes``).

    Example:
        >>> is_small(_example(), 3), is_small(_example(), 2)
        (True, False)
    """
    return summary.num_classes <= max_classes


def _curve(summary: ClassSummary, c: int) -> tuple[np.ndarray, np.ndarray]:
    """``(pos, neg)`` binned counts of class ``c``; binary class 0 is class 1's curve read from the other end."""
    if summary.task != "binary":
        return summary.pos[c], summary.neg[c]
    return (summary.pos[0], summary.neg[0]) if c == 1 else (summary.neg[0][::-1], summary.pos[0][::-1])


def _average_precision(pos: np.ndarray, neg: np.ndarray) -> np.ndarray:
    """Binned AP of each row of ``(K, T)`` counts; NaN for a row without positives (in blocks: bounded memory)."""
    if pos.shape[0] > _AP_BLOCK:
        blocks = range(0, pos.shape[0], _AP_BLOCK)
        return np.concatenate([_average_precision(pos[i : i + _AP_BLOCK], neg[i : i + _AP_BLOCK]) for i in blocks])
    tp = pos[:, ::-1].cumsum(1, dtype=np.float64)[:, ::-1]
    fp = neg[:, ::-1].cumsum(1, dtype=np.float64)[:, ::-1]
    total = tp[:, :1]
    recall = np.divide(tp, total, out=np.zeros_like(tp), where=total > 0)
    precision = np.divide(tp, tp + fp, out=np.ones_like(tp), where=tp + fp > 0)
    drop = recall - np.concatenate([recall[:, 1:], np.zeros_like(recall[:, :1])], axis=1)
    return np.where(total[:, 0] > 0, (drop * precision).sum(1), np.nan)


def per_class_table(summary: ClassSummary) -> dict[str, np.ndarray]:
    """Recall, precision, F1 and average precision per class (see the module docstring for the rules and NaNs).

    Example:
        >>> t = per_class_table(_example())
        >>> t["recall"].tolist(), t["precision"].tolist(), t["f1"].tolist()
        ([1.0, 0.25, nan], [1.0, 1.0, 0.0], [1.0, 0.4, 0.0])
        >>> t["average_precision"].round(3).tolist()
        [1.0, 0.661, nan]
    """
    s = summary
    cached = s.__dict__.get("_table")
    if cached is not None:
        return cached  # type: ignore[no-any-return]
    recall = np.divide(s.correct, s.support, out=np.full_like(s.support, np.nan), where=s.support > 0)
    precision = np.divide(s.correct, s.predicted, out=np.full_like(s.support, np.nan), where=s.predicted > 0)
    both = s.support + s.predicted
    f1 = np.divide(2 * s.correct, both, out=np.full_like(s.support, np.nan), where=both > 0)
    curves = [_curve(s, c) for c in range(2)] if s.task == "binary" else [(s.pos, s.neg)]
    pos = np.concatenate([np.atleast_2d(p) for p, _ in curves])
    neg = np.concatenate([np.atleast_2d(n) for _, n in curves])
    table = {"recall": recall, "precision": precision, "f1": f1, "average_precision": _average_precision(pos, neg)}
    s.__dict__["_table"] = table  # computed once per summary (the views read it several times)
    return table


def worst_classes(summary: ClassSummary, k: int) -> list[int]:
    """The ``k`` classes with support and the lowest F1, worst first (ties: lower recall, then lower index).

    Example:
        >>> worst_classes(_example(), 5)
        [1, 0]
    """
    table = per_class_table(summary)
    present = np.flatnonzero(summary.support > 0)
    order = np.lexsort((present, table["recall"][present], table["f1"][present]))
    return [int(c) for c in present[order][: max(k, 0)]]


def _pairs(summary: ClassSummary) -> list[tuple[int, int, float]]:
    """The most confused pairs, count descending: ``summary.pairs``, or the off-diagonal cells of the confusion."""
    if summary.pairs is not None:
        return [(int(t), int(p), float(n)) for t, p, n in summary.pairs]
    if summary.confusion is None or summary.task == "multilabel":
        return []
    off = summary.confusion.copy()
    np.fill_diagonal(off, 0.0)
    true, pred = np.nonzero(off > 0)
    order = np.lexsort((pred, true, -off[true, pred]))
    return [(int(true[i]), int(pred[i]), float(off[true[i], pred[i]])) for i in order]


def confusion_subset(summary: ClassSummary, k: int) -> tuple[np.ndarray, list[str]]:
    """Counts among the classes of the most confused pairs, plus an "other" row and column.

    The classes are taken in order of first appearance in the pairs (true, then predicted), at most ``k`` of them.
    Cells: the diagonal is ``correct``; off-diagonal cells among the selected classes come from the confusion matrix
    when there is one, else from the pairs (a pair not listed counts 0). The "other" column of a selected true class
    is its support minus its selected cells; the "other" row of a selected predicted class is its predictions minus
    its selected cells (those came from unselected true classes); both clamped at 0. The other/other cell holds the
    rest of the unselected classes' support (clamped at 0), so each row sums to the support of its true class(es) and
    the whole matrix to the number of rows.

    Returns:
        ``(k' + 1, k' + 1)`` counts ``[true, predicted]`` and the ``k' + 1`` names (the last is ``"other"``).

    Example:
        >>> counts, names = confusion_subset(_example(), 5)
        >>> counts.tolist(), names
        ([[1.0, 3.0, 0.0], [0.0, 0.0, 0.0], [0.0, 0.0, 5.0]], ['1', '2', 'other'])
    """
    s = summary
    if s.task == "multilabel":
        raise ValueError(
            "`confusion_subset` needs a binary or multiclass task: labels of a multilabel task do not "
            "compete, so there is no confusion matrix"
        )
    selected: list[int] = []
    pairs = _pairs(s)
    for true, pred, _ in pairs:
        for c in (true, pred):
            if c not in selected and len(selected) < k:
                selected.append(c)
    sel = np.asarray(selected, dtype=np.int64)
    if s.confusion is not None:
        inner = s.confusion[np.ix_(sel, sel)].copy()
    else:
        inner = np.zeros((sel.size, sel.size))
        where = {c: i for i, c in enumerate(selected)}
        for true, pred, count in pairs:
            if true != pred and true in where and pred in where:
                inner[where[true], where[pred]] = count
    np.fill_diagonal(inner, s.correct[sel])
    out = np.zeros((sel.size + 1, sel.size + 1))
    out[:-1, :-1] = inner
    out[:-1, -1] = np.maximum(s.support[sel] - inner.sum(1), 0.0)
    out[-1, :-1] = np.maximum(s.predicted[sel] - inner.sum(0), 0.0)
    out[-1, -1] = max(float(s.support.sum() - s.support[sel].sum() - out[-1, :-1].sum()), 0.0)
    return out, [s.class_names[c] for c in selected] + ["other"]


def _short(name: str) -> str:
    return name if len(name) <= _TICK_CHARS else name[: _TICK_CHARS - 1] + "~"


def _write_curve(writer: Any, tag: str, step: int, pos: np.ndarray, neg: np.ndarray) -> None:
    counts = confusion_at_thresholds(
        *(torch.as_tensor(a[None], dtype=torch.float64) for a in (pos, neg))
    )  # host arrays
    tp, fp, tn, fn = (t[0].numpy() for t in counts)
    writer.add_pr_curve_raw(tag, global_step=step, **pr_curve_raw_args(tp, fp, tn, fn))


def _hist_args(values: np.ndarray) -> dict[str, Any] | None:
    """``add_histogram_raw`` arguments for values in ``[0, 1]`` on fixed bins; ``None`` when there are none."""
    values = values[np.isfinite(values)]
    if values.size == 0:
        return None
    edges = np.linspace(0.0, 1.0, _HIST_BINS + 1)
    counts, _ = np.histogram(values, bins=edges)
    return {
        "min": float(values.min()),
        "max": float(values.max()),
        "num": int(values.size),
        "sum": float(values.sum()),
        "sum_squares": float(np.square(values).sum()),
        "bucket_limits": edges[1:].tolist(),
        "bucket_counts": counts.tolist(),
    }


def _worst_table(summary: ClassSummary, worst: list[int], curve_tags: list[str]) -> str:
    table, names = per_class_table(summary), summary.class_names
    top: dict[int, tuple[int, float]] = {}
    for true, pred, count in _pairs(summary):
        top.setdefault(true, (pred, count))
    rows: list[list[object]] = []
    for rank, (c, tag) in enumerate(zip(worst, curve_tags, strict=True), start=1):
        pred, count = top.get(c, (-1, 0.0))
        rows.append(
            [rank, names[c], summary.support[c], summary.predicted[c]]
            + [round(float(table[key][c]), 4) for key in ("recall", "precision", "f1", "average_precision")]
            + [f"{names[pred]} ({int(count)})" if pred >= 0 else "-", tag]
        )
    columns = ["rank", "class", "support", "predicted", "recall", "precision", "F1", "AP", "most confused with"]
    return markdown_table([*columns, "PR curve"], rows)


def _pairs_table(summary: ClassSummary, pairs: list[tuple[int, int, float]]) -> str:
    names, support = summary.class_names, summary.support
    rows = [
        [rank, names[t], names[p], n, round(n / support[t], 4) if support[t] > 0 else float("nan")]
        for rank, (t, p, n) in enumerate(pairs, start=1)
    ]
    return markdown_table(["rank", "true", "predicted", "count", "share of the true class"], rows)


def write_class_views(
    writer: Any, prefix: str, step: int, summary: ClassSummary, *, max_classes: int = 32, k: int = 10
) -> list[str]:
    """Write the views; returns the tags written.

    ``C <= max_classes``: ``<prefix>/confusion_matrix`` (binary/multiclass, when ``summary.confusion`` is given),
    ``<prefix>/pr_curve/<name>`` per class (binary: only class 1's) and ``<prefix>/worst_classes``. Otherwise at most
    ``k + 6`` tags: ``confusion_matrix`` (most confused classes + "other"; binary/multiclass with pairs),
    ``pr_curve/micro``, ``pr_curve/worst_01`` .. ``worst_{k:02d}``, ``class_recall`` and ``class_precision``
    (histograms across classes), ``worst_classes`` and ``confused_pairs`` (when there are pairs). Text tables go
    through ``add_text``, which stores them under ``<tag>/text_summary``; the returned tags are the keys given.

    Example:
        >>> from unittest.mock import MagicMock
        >>> tags = write_class_views(MagicMock(), "errors/val", 3, _example(), max_classes=2, k=1)
        >>> [t.removeprefix("errors/val/") for t in tags]  # doctest: +NORMALIZE_WHITESPACE
        ['confusion_matrix', 'pr_curve/micro', 'pr_curve/worst_01', 'class_recall', 'class_precision',
         'worst_classes', 'confused_pairs']
        >>> write_class_views(MagicMock(), "errors/val", 3, _example(), max_classes=3)  # doctest: +NORMALIZE_WHITESPACE
        ['errors/val/pr_curve/0', 'errors/val/pr_curve/1', 'errors/val/pr_curve/2', 'errors/val/worst_classes']
    """
    if isinstance(max_classes, bool) or not isinstance(max_classes, int) or max_classes < 1:
        raise ValueError(f"`max_classes` must be an integer >= 1, got {max_classes!r}")
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise ValueError(f"`k` must be an integer >= 1, got {k!r}")
    s, names, tags = summary, summary.class_names, []
    worst, pairs, small = worst_classes(s, k), _pairs(s), is_small(s, max_classes)
    if small:
        if s.confusion is not None and s.task != "multilabel":
            image = confusion_matrix_figure(s.confusion, [_short(n) for n in names])
            writer.add_image(f"{prefix}/confusion_matrix", image, step, dataformats="HWC")
            tags.append(f"{prefix}/confusion_matrix")
        curve_names = [names[1]] if s.task == "binary" else names
        write_pr_curves(writer, f"{prefix}/pr_curve", s.pos, s.neg, curve_names, step)
        tags += [f"{prefix}/pr_curve/{n}" for n in curve_names]
        curve_tags = [f"{prefix}/pr_curve/{names[c]}" if s.task != "binary" or c == 1 else "-" for c in worst]
    else:
        if pairs and s.task != "multilabel":
            counts, sub_names = confusion_subset(s, _SUBSET_CLASSES)
            title = f"Most confused {len(sub_names) - 1} of {s.num_classes} classes, + other"
            image = confusion_matrix_figure(counts, [_short(n) for n in sub_names], title=title)
            writer.add_image(f"{prefix}/confusion_matrix", image, step, dataformats="HWC")
            tags.append(f"{prefix}/confusion_matrix")
        _write_curve(writer, f"{prefix}/pr_curve/micro", step, _column_sums(s.pos), _column_sums(s.neg))
        curve_tags = [f"{prefix}/pr_curve/worst_{rank:02d}" for rank in range(1, len(worst) + 1)]
        for c, tag in zip(worst, curve_tags, strict=True):
            _write_curve(writer, tag, step, *_curve(s, c))
        tags += [f"{prefix}/pr_curve/micro", *curve_tags]
        table = per_class_table(s)
        for name, values in (("recall", table["recall"]), ("precision", table["precision"])):
            args = _hist_args(values)
            if args is not None:
                writer.add_histogram_raw(f"{prefix}/class_{name}", global_step=step, **args)
                tags.append(f"{prefix}/class_{name}")
    writer.add_text(f"{prefix}/worst_classes", _worst_table(s, worst, curve_tags), step)
    tags.append(f"{prefix}/worst_classes")
    if not small and pairs:
        writer.add_text(f"{prefix}/confused_pairs", _pairs_table(s, pairs[:_MAX_PAIR_ROWS]), step)
        tags.append(f"{prefix}/confused_pairs")
    return tags


__all__ = ["ClassSummary", "confusion_subset", "is_small", "per_class_table", "worst_classes", "write_class_views"]
