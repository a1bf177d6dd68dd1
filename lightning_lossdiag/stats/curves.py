"""Binned threshold curves (PR, ROC, AUROC, average precision) from per-bin counts: bucketize once, cumulate at read.

Each curve ``k`` (a class, a label, or the one positive class of a binary task) keeps two rows of weights over ``T``
fixed thresholds ``t_0 < ... < t_{T-1}`` (``linspace(0, 1, T)``, as torchmetrics uses): in bin ``j`` the weight of the
positives and of the negatives whose largest threshold ``<= p`` is ``t_j``. A value below ``t_0`` is never predicted
positive and is not counted. The reverse cumulative sum over ``j`` gives, for every threshold, the positives and
negatives with ``p >= t_j``: torchmetrics' binned rule, so the areas below equal ``binary_auroc``,
``multiclass_auroc`` and ``*_average_precision`` with ``thresholds=T`` on the same data.

An update costs ``O(values)`` (one bin lookup and one ``index_add_``), never ``values x thresholds``; the state is
``K x 2 x T`` whatever the number of samples. Weights are floating (``ClassCounts`` keeps float32: exact for integer
counts up to ``2**24`` per bin, half the memory at 32k classes) so a uniform sample of rows can stand for a whole
batch (each sampled row weighs ``rows / sampled``).
"""

from __future__ import annotations

import torch
from torch import Tensor


def curve_thresholds(num_thresholds: int, device: torch.device | str | None = None) -> Tensor:
    """``linspace(0, 1, num_thresholds)`` in float32, the thresholds torchmetrics uses for ``thresholds=T``.

    Example:
        >>> curve_thresholds(3)
        tensor([0.0000, 0.5000, 1.0000])
    """
    if isinstance(num_thresholds, bool) or not isinstance(num_thresholds, int) or num_thresholds < 2:
        raise ValueError(f"`thresholds` must be an integer >= 2, got {num_thresholds!r}")
    return torch.linspace(0, 1, num_thresholds, device=device)


def add_curve_counts(
    counts: Tensor,
    probs: Tensor,
    positive: Tensor,
    weight: Tensor,
    thresholds: Tensor,
    window: tuple[Tensor, Tensor] | None = None,
) -> None:
    """Add ``(M, K)`` probabilities to ``counts`` ``(K, 2, T)`` in place: row 0 negatives, row 1 positives.

    Args:
        counts: floating ``(K, 2, T)`` state (float32 counts integers exactly up to ``2**24`` per bin).
        probs: ``(M, K)`` probabilities (values below ``t_0`` and NaN are never counted).
        positive: ``(M, K)`` 0/1 labels (any dtype).
        weight: ``(M,)`` or ``(M, K)`` weight of each value (0 for ignored rows).
        thresholds: the ``(T,)`` ascending thresholds.
        window: :func:`threshold_window` of ``thresholds`` (built here when not given).

    Device only, no host read.

    Example:
        >>> c = torch.zeros(1, 2, 3, dtype=torch.float64)
        >>> add_curve_counts(c, torch.tensor([[0.2], [0.9], [0.6]]), torch.tensor([[0], [1], [1]]),
        ...                  torch.ones(3), curve_thresholds(3))
        >>> c[0].tolist()
        [[1.0, 0.0, 0.0], [0.0, 2.0, 0.0]]
    """
    k, _, t = counts.shape
    j = threshold_bins(probs.float(), thresholds, window)
    w = weight.to(counts.dtype)
    w = torch.where(j >= 0, w[:, None] if w.ndim == 1 else w, 0.0)
    flat = j.clamp_min_(0).add_(positive.to(j.dtype), alpha=t).add_(_curve_offsets(k, t, j.device).to(j.dtype))
    counts.view(-1).index_add_(0, flat.view(-1), w.view(-1))


def _curve_offsets(k: int, t: int, device: torch.device) -> Tensor:
    return (torch.arange(k, device=device) * (2 * t))[None, :]


def threshold_window(thresholds: Tensor) -> tuple[Tensor, Tensor]:
    """``(low, high)``, ``T + 1`` values each: ``low[j + 1] = t_j``, ``high[j + 1] = t_{j+1}``, ``j`` in ``[-1, T)``.

    The first entry holds ``(-inf, t_0)`` (below every threshold) and the last ``high`` is ``+inf``, so one lookup at a
    candidate bin ``j`` (at position ``j + 1``: no negative index) gives both thresholds around it. Build it once per
    threshold tensor and pass it to :func:`threshold_bins`.

    Example:
        >>> [t.tolist() for t in threshold_window(curve_thresholds(3))]
        [[-inf, 0.0, 0.5, 1.0], [0.0, 0.5, 1.0, inf]]
    """
    inf = thresholds.new_full((1,), float("inf"))
    return torch.cat([-inf, thresholds]), torch.cat([thresholds, inf])


def threshold_bins(p: Tensor, thresholds: Tensor, window: tuple[Tensor, Tensor] | None = None) -> Tensor:
    """Index of the largest threshold ``<= p`` (``-1`` below the first one, and for NaN): torchmetrics' ``p >= t_j``.

    ``thresholds`` must be ``linspace(0, 1, T)`` (:func:`curve_thresholds`); ``window`` is its
    :func:`threshold_window` (built here when not given). On the CPU the candidate ``j = trunc(p * (T - 1))`` is off by
    at most one where float rounding (or the truncation of a small negative value) put ``p`` on the other side of the
    float32 threshold; one lookup of ``t_j`` and ``t_{j+1}`` corrects it (:func:`lookup_bins`), so the result equals
    ``bucketize(p, thresholds, right=True) - 1`` exactly, at a constant cost (a binary search costs 3-5x more there
    on probabilities spread over ``[0, 1]``, where its branches mispredict). On other devices, where launching a
    kernel costs more than its work, ``bucketize`` gives the same bins in one kernel (:data:`LOOKUP_DEVICES`).

    Example:
        >>> th = curve_thresholds(11)
        >>> threshold_bins(torch.tensor([0.0, 0.3, 0.29999998, 1.0, 7.0, -0.5, float("nan")]), th).tolist()
        [0, 3, 2, 10, 10, -1, -1]
    """
    q = torch.nan_to_num(p, nan=-1.0)  # NaN: below every threshold; +-inf: the largest (smallest) float
    if not by_lookup(q):  # int64 there; int32 from the lookup
        return torch.bucketize(q, thresholds.to(q.dtype), right=True).sub_(1)
    return lookup_bins(q, thresholds, window)


# device types that take the CPU's paths of the class engine: bins by arithmetic and a lookup (not a search), byte
# counts in blocks, small row-loss pieces, a float32 copy of half-precision logits. The one switch: tests set it
# empty to run a GPU's paths on the CPU (benchmarks/update_ops.py --path device counts them)
LOOKUP_DEVICES = frozenset({"cpu"})


def by_lookup(t: Tensor) -> bool:
    """Whether ``t``'s device takes the CPU's paths (:data:`LOOKUP_DEVICES`): bins by :func:`lookup_bins`, etc."""
    return t.device.type in LOOKUP_DEVICES


def lookup_bins(q: Tensor, thresholds: Tensor, window: tuple[Tensor, Tensor] | None = None) -> Tensor:
    """:func:`threshold_bins` of NaN-free ``q`` by arithmetic.

    The candidate ``trunc(q * (T - 1))`` is within one bin of the answer; one lookup of the thresholds on each side of
    it moves it there. The candidate is taken one up (``trunc(q * (T - 1) + 1)``, 0 for anything below ``t_0``) so
    both lookups are ``index_select`` calls on non-negative positions, several times cheaper on the CPU than indexing.
    The bins are ``int32`` (an index every ``index_add_``/``index_select`` takes).
    """
    t = thresholds.shape[0]
    low, high = window if window is not None else threshold_window(thresholds)
    j = q.mul(t - 1).add_(1).clamp_(0, t).to(torch.int32)  # the candidate bin + 1, in [0, T]
    at = j.view(-1)
    # both thresholds around the candidate, compared before it moves; int32 all the way (the CPU converts to int32
    # 5x faster than to int64, and a comparison written as bool, or a bool added to int64, takes its slow paths)
    above_low = torch.le(low.index_select(0, at).view_as(q), q, out=torch.empty_like(j))
    above_high = torch.le(high.index_select(0, at).view_as(q), q, out=torch.empty_like(j))
    return j.add_(above_low).add_(above_high).sub_(2)


def rates_at_thresholds(counts: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """``(tp, fp, tn, fn)``, each ``(K, T)``: the weights predicted positive (``p >= t_j``) and not, per threshold.

    Example:
        >>> c = torch.tensor([[[1.0, 0.0, 0.0], [0.0, 2.0, 0.0]]])
        >>> [x.tolist() for x in rates_at_thresholds(c)]
        [[[2.0, 2.0, 0.0]], [[1.0, 0.0, 0.0]], [[0.0, 1.0, 1.0]], [[0.0, 0.0, 2.0]]]
    """
    neg, pos = counts[:, 0], counts[:, 1]
    tp = pos.flip(-1).cumsum(-1).flip(-1)
    fp = neg.flip(-1).cumsum(-1).flip(-1)
    return tp, fp, neg.sum(-1, keepdim=True) - fp, pos.sum(-1, keepdim=True) - tp


def _safe(num: Tensor, den: Tensor, zero: float) -> Tensor:
    return torch.where(den > 0, num / den.clamp_min(1e-300), torch.full_like(num, zero))


def binned_auroc(counts: Tensor) -> Tensor:
    """Area under the ROC curve of each of the ``K`` curves (trapezoids over the ``T`` thresholds).

    A curve with no positives has ``tpr = 0`` everywhere (area 0), as torchmetrics' binned AUROC gives.

    Example:
        >>> c = torch.zeros(1, 2, 11, dtype=torch.float64)
        >>> add_curve_counts(c, torch.tensor([[0.1], [0.4], [0.35], [0.8]]), torch.tensor([[0], [0], [1], [1]]),
        ...                  torch.ones(4), curve_thresholds(11))
        >>> round(binned_auroc(c).item(), 4)
        0.75
    """
    tp, fp, tn, fn = rates_at_thresholds(counts)
    tpr = _safe(tp, tp + fn, 0.0).flip(-1)
    fpr = _safe(fp, fp + tn, 0.0).flip(-1)
    return torch.trapz(tpr, fpr, dim=-1)


def binned_precision_recall(counts: Tensor) -> tuple[Tensor, Tensor]:
    """Precision and recall per curve and threshold, ``(K, T + 1)`` each, with torchmetrics' end point (1, 0).

    Precision where nothing is predicted positive and recall where there is no positive are 0 (torchmetrics gives
    NaN there and sets it to 0 before the area, which is what is returned).
    """
    tp, fp, _, fn = rates_at_thresholds(counts)
    precision = _safe(tp, tp + fp, 0.0)
    recall = _safe(tp, tp + fn, 0.0)
    one = torch.ones_like(precision[:, :1])
    return torch.cat([precision, one], dim=-1), torch.cat([recall, one * 0], dim=-1)


def binned_average_precision(counts: Tensor) -> Tensor:
    """Average precision of each curve: ``-sum((R[j+1] - R[j]) * P[j])``, torchmetrics' binned formula.

    Example:
        >>> c = torch.zeros(1, 2, 11, dtype=torch.float64)
        >>> add_curve_counts(c, torch.tensor([[0.1], [0.4], [0.35], [0.8]]), torch.tensor([[0], [0], [1], [1]]),
        ...                  torch.ones(4), curve_thresholds(11))
        >>> round(binned_average_precision(c).item(), 4)
        0.8333
    """
    precision, recall = binned_precision_recall(counts)
    return -((recall[:, 1:] - recall[:, :-1]) * precision[:, :-1]).sum(-1)


__all__ = [
    "add_curve_counts",
    "by_lookup",
    "lookup_bins",
    "threshold_bins",
    "threshold_window",
    "binned_auroc",
    "binned_average_precision",
    "binned_precision_recall",
    "curve_thresholds",
    "rates_at_thresholds",
]
