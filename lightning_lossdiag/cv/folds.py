"""Pure fold logic: plain and stratified k-fold splits of ``n`` rows, deterministic for a seed (no Lightning).

A split is a list of :class:`Fold` s. The validation parts of the ``k`` folds are disjoint and together cover
``range(n)``; each fold trains on every row it does not validate on. Indices inside a fold are sorted.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, NamedTuple

import numpy as np


class CVError(ValueError):
    """A cross-validation request that cannot be run; the message says what came and what is allowed."""


class Fold(NamedTuple):
    """One fold: row indices (into the cross-validation dataset) to train and to validate on, both sorted."""

    train: list[int]
    val: list[int]


def _check_k(n: int, k: int) -> None:
    if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or n < 0:
        raise CVError(f"`n` (the number of rows) must be a non-negative integer, got {n!r}")
    if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 2:
        raise CVError(f"`k` (the number of folds) must be an integer >= 2, got {k!r}")
    if k > n:
        raise CVError(
            f"`k` (the number of folds) must not exceed the number of rows ({n}), got {k}: every fold needs at "
            "least one validation row"
        )


def _folds_from_assignment(assignment: np.ndarray, k: int) -> list[Fold]:
    """``assignment[i]`` = the fold that validates on row ``i``."""
    rows = np.arange(len(assignment))
    return [
        Fold(train=rows[assignment != f].tolist(), val=rows[assignment == f].tolist())  # host data, not tensors
        for f in range(k)
    ]


def kfold_indices(n: int, k: int, seed: int = 0) -> list[Fold]:
    """Split ``range(n)`` into ``k`` folds after a seeded shuffle; validation sizes differ by at most one.

    The first ``n % k`` folds validate on ``n // k + 1`` rows, the others on ``n // k``.

    Args:
        n: number of rows.
        k: number of folds, ``2 <= k <= n``.
        seed: seed of the shuffle (``numpy.random.default_rng``); the same seed gives the same folds.

    Raises:
        CVError: ``k < 2`` or ``k > n``.

    Example:
        >>> folds = kfold_indices(10, 3, seed=0)
        >>> [len(f.val) for f in folds]
        [4, 3, 3]
        >>> sorted(i for f in folds for i in f.val) == list(range(10))
        True
    """
    _check_k(n, k)
    order = np.random.default_rng(seed).permutation(n)
    sizes = [n // k + (1 if f < n % k else 0) for f in range(k)]
    assignment = np.empty(n, dtype=np.int64)
    assignment[order] = np.repeat(np.arange(k), sizes)
    return _folds_from_assignment(assignment, k)


def _as_labels(labels: Any) -> np.ndarray:
    """Labels as a 1-D numpy array (a tensor is copied to the host once: fold set-up, before any training)."""
    if hasattr(labels, "detach"):
        labels = labels.detach().cpu().numpy()  # one-time host copy of the labels, before any training
    array = np.asarray(labels)
    if array.ndim != 1:
        raise CVError(f"`labels` must be one label per row (a 1-D sequence), got shape {tuple(array.shape)}")
    return array


def stratified_kfold_indices(labels: Sequence[Any] | Any, k: int, seed: int = 0) -> list[Fold]:
    """Split rows into ``k`` folds that keep the share of each class.

    The rows of each class (classes in sorted order) are shuffled with one seeded generator and dealt to the folds
    round-robin; the deal carries on from one class to the next where the previous one stopped. So every fold holds
    ``floor(n_c / k)`` or ``ceil(n_c / k)`` rows of class ``c`` (within one row of the ideal ``n_c / k``), and fold
    sizes differ by at most one.

    Args:
        labels: one label per row (a sequence, numpy array or 1-D tensor of class ids; any hashable, sortable values).
        k: number of folds, ``2 <= k <= len(labels)``.
        seed: seed of the shuffles; the same seed gives the same folds.

    Raises:
        CVError: ``k < 2``, ``k > len(labels)`` or labels that are not 1-D.

    Example:
        >>> folds = stratified_kfold_indices([0] * 6 + [1] * 3, 3, seed=0)
        >>> [sum(1 for i in f.val if i >= 6) for f in folds]  # one row of class 1 in each fold
        [1, 1, 1]
    """
    y = _as_labels(labels)
    _check_k(len(y), k)
    rng = np.random.default_rng(seed)
    assignment = np.empty(len(y), dtype=np.int64)
    start = 0
    for cls in np.unique(y):
        rows = rng.permutation(np.flatnonzero(y == cls))
        assignment[rows] = (start + np.arange(len(rows))) % k
        start = (start + len(rows)) % k
    return _folds_from_assignment(assignment, k)


def class_counts(labels: Sequence[Any] | Any, rows: Sequence[int]) -> dict[str, int]:
    """How many of ``rows`` carry each label (keys are the labels as strings, sorted by label).

    Example:
        >>> class_counts([0, 1, 1, 2], [1, 2, 3])
        {'1': 2, '2': 1}
    """
    y = _as_labels(labels)[np.asarray(rows, dtype=np.int64)]
    values, counts = np.unique(y, return_counts=True)
    return {str(v.item()): int(c) for v, c in zip(values, counts, strict=True)}  # numpy on the host: one-time
