"""Calibration bins on the device: top-label, fine (for equal-mass ECE) and classwise sums, and the errors they give.

Three states, each of per-bin sums ``(weight, sum of confidences, sum of hits)``, all updated by ``scatter_add_`` /
``index_add_`` with no host read:

* ``(3, B + 1)`` top-label bins, ``B = 15`` equal-width bins with torchmetrics' edges ``linspace(0, 1, 16)`` (a
  confidence of exactly 1.0 in a bin of its own): ECE and MCE (Guo et al. 2017).
* ``(3, F)`` fine bins, ``F = 1024`` equal-width bins of the same confidences: the equal-mass ("adaptive") ECE of
  Nixon et al. 2019, read by :func:`adaptive_ece`. Exact equal-mass bins need every confidence sorted (unbounded
  memory); the fine bins keep 24 KiB and are merged at read into ``B`` bins of equal weight.
* ``(K, 3, B + 1)`` classwise bins: for every class ``c`` the probability ``p_c`` against ``1[y = c]`` (binary: both
  classes, ``1 - p`` and ``p``; multilabel: each label), the classwise ECE of Nixon et al. 2019
  (:func:`classwise_ece`). Updated with the values the curves use (a uniform sample of ``budget // K`` rows per
  step at large ``K``), so its cost is ``O(budget)`` per step whatever the class count.

The approximation of :func:`adaptive_ece`: a fine bin that straddles the boundary between two equal-mass bins is
split between them in proportion to the weight each side needs, as if its values were interchangeable. Its values
lie within ``1 / F`` of each other, so the confidence sums are off by at most ``1 / F`` per moved value; the hits
of the values an exact sort would put on each side of the boundary differ from the proportional share only by how
hits happen to be ordered among confidences within ``1 / F`` of each other (sampling noise of about
``sqrt(w) / 4`` hits for a straddled fine bin of weight ``w``). Where every fine bin holds one value at most and the
boundaries fall between values, the result is the exact equal-mass ECE. On 20,000 to 50,000 predictions of a
calibrated 10-class model (the hardest case: every bin's gap is noise) the merged value is within 0.0004 of the
exact one, under a tenth of the ECE's own noise (``1.2 / sqrt(N)``; ``tests/stats/test_calibration.py``).
A pile of confidences inside one fine bin (e.g. thousands of values in ``[1 - 1/1024, 1]``) is never split by
confidence: the equal-mass bins inside it share its mean accuracy and confidence.
"""

from __future__ import annotations

import torch
from torch import Tensor

from lightning_lossdiag.stats.curves import by_lookup, lookup_bins

FINE_BINS = 1024  # equal-width fine confidence bins of the equal-mass ECE (resolution 1/1024)


def _div(num: Tensor, den: Tensor) -> Tensor:
    return torch.where(den > 0, num / den.clamp_min(1e-300), torch.zeros_like(num))


def calibration_bins(
    confidence: Tensor, edges: Tensor, fine: int, window: tuple[Tensor, Tensor] | None = None
) -> tuple[Tensor, Tensor]:
    """Equal-width bin (edges ``linspace(0, 1, B + 1)``) and fine bin (``F = fine`` bins) of every confidence.

    The first index is ``bucketize(c, edges, right=True) - 1`` clamped to ``[0, B]`` (a confidence of 1.0 in bin
    ``B`` of its own, NaN and values below 0 in bin 0), the second ``floor(c * F)`` clamped to ``[0, F - 1]`` (NaN in
    bin 0). ``window``: :func:`~lightning_lossdiag.stats.curves.threshold_window` of ``edges``. Device only.

    Example:
        >>> j, fj = calibration_bins(torch.tensor([0.2, 0.5, 1.0, float("nan")]), torch.linspace(0, 1, 3), 4)
        >>> j.tolist(), fj.tolist()
        ([0, 1, 2, 0], [0, 2, 3, 0])
    """
    q = torch.nan_to_num(confidence.float(), nan=-1.0)
    index = torch.int32 if by_lookup(q) else torch.long  # the CPU converts to int32 5x faster
    return _coarse_bins(q, edges, window), (q * fine).clamp_(0, fine - 1).to(index)  # floor = trunc from 0 up


def calibration_bin(confidence: Tensor, edges: Tensor, window: tuple[Tensor, Tensor] | None = None) -> Tensor:
    """The first index of :func:`calibration_bins` alone (the equal-width bin of every confidence)."""
    return _coarse_bins(torch.nan_to_num(confidence.float(), nan=-1.0), edges, window)


def _coarse_bins(q: Tensor, edges: Tensor, window: tuple[Tensor, Tensor] | None) -> Tensor:
    # bucketize(q, edges[1:]) is bucketize(q, edges) - 1 clamped at 0: one kernel off the CPU (NaN is -1 here)
    return lookup_bins(q, edges, window).clamp_(min=0) if by_lookup(q) else torch.bucketize(q, edges[1:], right=True)


def add_calibration(bins: Tensor, fine: Tensor, edges: Tensor, confidence: Tensor, hit: Tensor, weight: Tensor) -> None:
    """Add confidences (float), hits (0/1) and weights, all ``(M,)`` or ``(M, K)``, to ``bins`` and ``fine`` in place.

    Args:
        bins: ``(3, B + 1)`` float64 sums of the equal-width bins with ``edges`` (``linspace(0, 1, B + 1)``).
        fine: ``(3, F)`` float64 sums of ``F`` equal-width fine bins (a confidence of 1.0 in the last one).
        edges: the ``B + 1`` edges of ``bins``.
        confidence: the confidences (NaN goes to the first bin, so a NaN confidence makes the errors NaN).
        hit: 0/1 (or fractional) hits, broadcastable to ``confidence``.
        weight: weights broadcastable to ``confidence`` (0 for ignored values).

    Device only, no host read.

    Example:
        >>> bins, fine = torch.zeros(3, 3, dtype=torch.float64), torch.zeros(3, 4, dtype=torch.float64)
        >>> add_calibration(bins, fine, torch.linspace(0, 1, 3), torch.tensor([0.2, 0.7, 1.0]),
        ...                 torch.tensor([0.0, 1.0, 1.0]), torch.ones(3))
        >>> bins[0].tolist(), fine[0].tolist()
        ([1.0, 1.0, 1.0], [1.0, 0.0, 1.0, 1.0])
    """
    c = confidence.float()
    j, fj = calibration_bins(c, edges, fine.shape[1])
    stacked = bin_sums(c, hit, weight).reshape(-1, 3).T
    bins.scatter_add_(1, j.reshape(-1).long().expand(3, -1), stacked)  # scatter takes int64 indices only
    fine.scatter_add_(1, fj.reshape(-1).long().expand(3, -1), stacked)


def bin_sums(confidence: Tensor, hit: Tensor, weight: Tensor) -> Tensor:
    """``(..., 3)`` float64 ``(w, w * c, w * hit)`` of every value: what a calibration bin adds up (broadcasting)."""
    w = weight.double().expand_as(confidence)
    return torch.stack([w, w * confidence.double(), w * hit], -1)


def add_classwise(
    state: Tensor,
    probs: Tensor,
    positive: Tensor,
    weight: Tensor,
    edges: Tensor,
    window: tuple[Tensor, Tensor] | None = None,
) -> None:
    """Add ``(M, K)`` probabilities of each class against their 0/1 ``positive`` to ``state`` ``(K, 3, B + 1)``.

    ``weight`` is ``(M,)`` or ``(M, K)`` (0 for ignored values); ``window`` is the
    :func:`~lightning_lossdiag.stats.curves.threshold_window` of ``edges``. Costs ``O(M K)`` (one bin lookup, one
    ``index_add_``), device only, no host read.

    Example:
        >>> state = torch.zeros(2, 3, 3, dtype=torch.float64)
        >>> p = torch.tensor([[0.75, 0.25], [0.25, 0.75]])
        >>> add_classwise(state, p, torch.tensor([[1, 0], [0, 1]]), torch.ones(2), torch.linspace(0, 1, 3))
        >>> state[0].tolist()  # class 0: weight, confidence and hit sums per bin
        [[1.0, 1.0, 0.0], [0.25, 0.75, 0.0], [0.0, 1.0, 0.0]]
    """
    k, _, b = state.shape
    p = probs.float()
    w = weight if weight.ndim == p.ndim else weight[:, None]
    at = classwise_index(calibration_bin(p, edges, window), k, b, 0)
    state.view(-1).index_add_(0, at.view(-1), bin_sums(p, positive, w).view(-1))


def classwise_index(j: Tensor, k: int, b: int, offset: int) -> Tensor:
    """``(M, K, 3)`` flat positions in a ``(K, 3, b)`` state starting at ``offset`` of the sums of bins ``j`` (M, K)."""
    base = torch.arange(0, k * 3 * b, 3 * b, device=j.device)[:, None] + torch.arange(0, 3 * b, b, device=j.device)
    return j[..., None] + (base + offset)


def adaptive_ece(fine: Tensor, bins: int = 15) -> Tensor:
    """Equal-mass ECE from ``(3, F)`` fine bins merged into ``bins`` bins of equal weight (see the module docstring).

    ``ECE = sum_b |hits_b - confidence_b| / N`` over the merged bins, where a fine bin straddling a boundary gives
    each side its share of the weight. 0 when nothing was counted.

    Example:
        >>> fine = torch.zeros(3, 8, dtype=torch.float64)
        >>> fine[:, 1] = torch.tensor([2.0, 0.5, 1.0])  # two values near 0.25, one hit
        >>> fine[:, 7] = torch.tensor([2.0, 1.9, 1.0])  # two near 0.95, one hit
        >>> round(adaptive_ece(fine, 2).item(), 3)  # bins: |1 - 0.5| and |1 - 1.9| over 4 values
        0.35
    """
    weight = fine[0]
    total = weight.sum()
    upper = weight.cumsum(0)
    lower = upper - weight
    edges = torch.linspace(0, 1, bins + 1, dtype=weight.dtype, device=weight.device) * total
    overlap = torch.minimum(upper[None], edges[1:, None]) - torch.maximum(lower[None], edges[:-1, None])
    share = _div(overlap.clamp_min(0), weight[None].expand_as(overlap))  # (bins, F): share of each fine bin
    gap = share @ (fine[2] - fine[1])
    return _div(gap.abs().sum(), total)


def classwise_ece(state: Tensor) -> Tensor:
    """Classwise ECE: the mean over classes of each class's 15-bin ECE of ``p_c`` against ``1[y = c]``.

    ``state`` is ``(K, 3, B)`` (weight, confidence and hit sums per class and bin); classes with no weight (every
    value ignored) are left out of the mean. For binary (``K = 2``: ``1 - p`` and ``p``) it is the two-class value.

    Example:
        >>> state = torch.tensor([[[2.0, 0.0], [1.0, 0.0], [2.0, 0.0]], [[1.0, 1.0], [0.2, 0.9], [0.0, 1.0]]])
        >>> round(classwise_ece(state).item(), 3)  # class 0: |2 - 1| / 2, class 1: (0.2 + 0.1) / 2
        0.325
    """
    weight = state[:, 0].sum(-1)
    per_class = _div((state[:, 2] - state[:, 1]).abs().sum(-1), weight)
    present = (weight > 0).to(per_class.dtype)
    return _div((per_class * present).sum(), present.sum())


__all__ = [
    "FINE_BINS",
    "adaptive_ece",
    "add_calibration",
    "add_classwise",
    "bin_sums",
    "calibration_bin",
    "calibration_bins",
    "classwise_ece",
    "classwise_index",
]
