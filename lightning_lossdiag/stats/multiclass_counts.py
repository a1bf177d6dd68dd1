"""The multiclass update of :class:`~lightning_lossdiag.stats.classification.ClassCounts`: rows or dense scores.

Part of ``ClassCounts``' implementation (it reads and writes the counts' state): every row gives its maximum, argmax,
true-class score, top-k membership and loss (:func:`row_scores`, :func:`~lightning_lossdiag.stats.row_ops.row_nll`),
which feed the per-class counts, the top-label calibration bins and the row sums; the budget sample of rows feeds the
curves, classwise bins, moments and Brier score (:func:`add_sampled`). No host read.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import torch
from torch import Tensor

from lightning_lossdiag.stats.calibration import FINE_BINS, calibration_bin, calibration_bins
from lightning_lossdiag.stats.curves import by_lookup
from lightning_lossdiag.stats.pending import Pending, pieces
from lightning_lossdiag.stats.row_ops import (
    chunk_maxima,
    count_above,
    first_hit,
    fits_scratch,
    in_top_k_chunks,
    max_in_chunks,
    row_nll,
)

if TYPE_CHECKING:
    from lightning_lossdiag.stats.classification import ClassCounts

_KEPT_ROW_VALUES = 2**19  # the largest per-row column block kept between updates (float64)
_DIRECT_SCORES = 2**24  # off the CPU: long rows up to this many scores take max and a counted comparison


def row_scores(counts: ClassCounts, x: Tensor, safe: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor | None]:
    """``(top, pred, picked, in_top)`` of ``(M, C)`` rows or ``(A, C, L)`` dense scores (the class dim is 1).

    The maximum, its first index, the true class's score and whether it is among the ``top_k`` highest, each
    ``(M,)``. On the CPU, long rows (512 classes or more) find all four from one pass of chunk maxima; off the CPU
    they do so only above ``_DIRECT_SCORES`` scores (below, ``max`` and one counted comparison: a third of the
    launches, and a bool temporary of at most 16 MiB). Dense scores: CUDA takes ``max`` (one kernel for both),
    the CPU ``amax`` and one comparison (see :func:`~lightning_lossdiag.stats.row_ops.first_argmax`).

    Example:
        >>> from lightning_lossdiag.stats.classification import ClassCounts
        >>> counts = ClassCounts("multiclass", "logits", 12)  # top-5 membership from 10 classes on
        >>> x = torch.stack([torch.arange(12.0), torch.arange(12.0).flip(0)])
        >>> true = torch.tensor([0, 3])  # example input, off the hot path
        >>> top, pred, picked, in_top = row_scores(counts, x, true)
        >>> pred.tolist(), picked.tolist(), in_top.tolist()  # example read, off the hot path; 11 above 0, 3 above 3
        ([11, 0], [0.0, 8.0], [False, True])
    """
    k, work = counts.top_k, counts._work
    if x.ndim == 2:
        picked = x.gather(1, safe[:, None]).squeeze(1)
        if x.shape[1] >= 512 and (by_lookup(x) or x.numel() > _DIRECT_SCORES):
            chunks = chunk_maxima(x)
            top, pred = max_in_chunks(x, chunks, counts._index["chunk"])
            if not k:
                return top, pred, picked, None
            if fits_scratch(x, work):  # one float comparison of every score (CPU, up to 1M scores): cheaper
                return top, pred, picked, count_above(x, picked[:, None], 1, work) < k
            return top, pred, picked, in_top_k_chunks(x, chunks, picked, k)
        top, pred = x.max(1)
        return top, pred, picked, (count_above(x, picked[:, None], 1, work) < k if k else None)
    picked = x.gather(1, safe.unsqueeze(1)).squeeze(1)
    if by_lookup(x):  # the CPU
        top = x.amax(1)
        pred = first_hit(x, 1, top, counts._index["descending"], work)
    else:
        top, pred = x.max(1)
    in_top = (count_above(x, picked.unsqueeze(1), 1, work) < k).view(-1) if k else None
    return top.view(-1), pred.view(-1), picked.view(-1), in_top


def update_multiclass(counts: ClassCounts, x: Tensor, target: Tensor, n: int, rank: int, world: int) -> None:
    """Add a multiclass batch: every row's statistics, then the budget sample (:func:`add_sampled`). No host read."""
    d = counts.class_dim % x.ndim
    c = counts.num_classes
    # bf16/fp16 logits off the CPU stay as they are (maxima and scores are exact; the log-softmax reads them once
    # in float32); the CPU computes faster on a float32 copy
    low = x.dtype not in (torch.float32, torch.float64)
    if low and (counts.inputs != "logits" or by_lookup(x)):
        x, low = x.float(), False
    lab = target.reshape(-1).long()
    safe, valid = counts._labels(lab)
    m = lab.shape[0]
    if m == 0:  # an empty batch counts nothing
        return
    if d == x.ndim - 1:  # (N, C), (B, T, V): rows
        scores = x.reshape(-1, c)
        target_of = safe
    else:  # (N, C, d1, ...): (A, C, L) with the class dim 1, a view for the usual layouts
        a = math.prod(x.shape[:d])
        scores = x.reshape(a, c, m // max(a, 1))
        target_of = safe.view(a, -1)
    top, pred, picked, in_top = row_scores(counts, scores, target_of)
    if counts.inputs == "logits":
        # the fused cross-entropy is -log p_true; logsumexp follows from it (a separate logsumexp costs 2-3x)
        nll = row_nll(scores, target_of, low, counts._work)
        log_pred = top - (picked + nll)  # log p(top) = top - logsumexp, logsumexp = picked + nll (float32)
        confidence = log_pred.exp()  # the top-label probability
    elif counts.inputs == "log_probabilities":
        nll, log_pred, confidence = picked.neg(), top, top.exp()
    else:
        nll, log_pred, confidence = picked.clamp_min(1e-12).log().neg_(), top.clamp_min(1e-12).log(), top
    # every row: support[true], predicted[pred], correct[true] (exact counts in float64); the top-label calibration
    # bins (weight, confidence, hit); rows counted and left out, the top-k hits and the sum of -log p(true class)
    columns = [valid, confidence, pred == safe, nll, *([] if in_top is None else [in_top])]
    if counts.views:  # the worst rows: every update, while its rows are at hand
        loss = torch.where(valid, nll, float("-inf"))
        prob = confidence if counts.inputs != "probabilities" else (lambda at: log_pred[at].exp())
        counts._offer_worst(loss, [lab, pred, prob], n, rank, world)
    k = counts._sample_size(m, c)
    held = counts._pending
    if held is not None and held.admit(m, k, counts.settle, c, {"sample": ((c,), scores.dtype)}):
        _hold(counts, held, scores, columns, valid, pred, safe, k)
        return
    shape = (len(columns), m)  # added now: a kept buffer of at most 4 MiB, else a fresh one
    kept = math.prod(shape) <= _KEPT_ROW_VALUES
    buffer = counts._work.take("per_row", shape, torch.float64) if kept else x.new_empty(shape, dtype=torch.float64)
    per_row = _staged(columns, valid, by_lookup(x), buffer, counts._zero)
    index, parts = add_rows(counts, per_row, pred, safe, m)
    add_sampled(counts, *_draw(counts, scores, safe, valid, m, k), index, parts)
    counts._store.index_add_(0, torch.cat(index), torch.cat(parts))


def _hold(
    counts: ClassCounts,
    held: Pending,
    scores: Tensor,
    columns: list[Tensor],
    valid: Tensor,
    pred: Tensor,
    safe: Tensor,
    k: int,
) -> None:
    """Write an admitted update's per-row values, classes and ``k`` sampled rows into the held buffers.

    They are added at the next :meth:`~lightning_lossdiag.stats.classification.ClassCounts.settle` (when ``hold``
    updates are held, or at the first read).
    """
    m, c = safe.shape[0], counts.num_classes
    rows = held.claim("rows", "per_row", (len(columns),), torch.float64)[:m].T
    _staged(columns, valid, by_lookup(scores), rows, counts._zero)
    if counts.pairs is not None:  # the pair sketch takes each update as it comes: its keys depend on the batches
        counts.pairs.update(safe, pred, rows[0] - rows[2], checked=True)  # the confused rows weigh 1
    held.claim("rows", "pred", (), torch.long)[:m].copy_(pred)
    held.claim("rows", "safe", (), torch.long)[:m].copy_(safe)
    out = (
        held.claim("sample", "sample", (c,), scores.dtype)[:k],
        held.claim("sample", "s_safe", (), torch.long)[:k],
        held.claim("sample", "w", (), torch.float64)[:k],
    )
    _draw(counts, scores, safe, valid, m, k, out)
    held.advance(m, k, m)
    if held.full():
        counts.settle()


def settle_multiclass(counts: ClassCounts, held: Pending) -> None:
    """Add the updates ``held`` (:class:`~lightning_lossdiag.stats.pending.Pending`) to the state, then clear them."""
    per_row = held.view("rows", "per_row").T
    pred, safe = held.view("rows", "pred"), held.view("rows", "safe")
    index, parts = add_rows(counts, per_row, pred, safe, held.total, pairs=False)
    sample, s_safe, w = (held.view("sample", name) for name in ("sample", "s_safe", "w"))
    for at in pieces(sample.shape[0], counts.num_classes):  # pieces whose temporaries stay in cache
        add_sampled(counts, sample[at], s_safe[at], w[at], index, parts)
    counts._store.index_add_(0, torch.cat(index), torch.cat(parts))
    held.clear()


def _staged(columns: list[Tensor], valid: Tensor, cpu: bool, out: Tensor, zero: Tensor) -> Tensor:
    """The per-row columns as float64 rows of ``out`` ``(len(columns), M)``, 0 on the rows left out.

    ``zero``: a ``(1, 1)`` float64 zero, which sets the result's dtype off the CPU.

    The CPU copies each column into its row and fills once: a ``where()`` over stacked columns of mixed dtypes takes
    its slow casting path there (~1 ms at 32k pixels); elsewhere two kernels.
    """
    if cpu:
        for row, column in zip(out, columns, strict=True):
            row.copy_(column)
        return out.masked_fill_(valid.logical_not(), 0.0)
    return torch.where(valid, torch.stack(columns), zero, out=out)


def add_rows(
    counts: ClassCounts, per_row: Tensor, pred: Tensor, safe: Tensor, total: int, pairs: bool = True
) -> tuple[list[Tensor], list[Tensor]]:
    """Add staged rows (:func:`_staged`) to the per-class counts, top-label bins, confusion or pairs.

    Returns the store positions and values of the row sums (``total``: every row, counted or not), for the caller's
    one ``index_add_`` into the store. ``pairs=False``: the pair sketch has seen these rows already (held updates).
    """
    v, hit = per_row[0], per_row[2]
    counts.per_class[::2].index_add_(1, safe, per_row[::2][:2])  # support and correct: weight and hit
    counts.per_class[1].index_add_(0, pred, v)
    # int64 positions: along dim 1 the CPU's index_add_ takes a slow path with int32 ones (25x)
    j, fine = (b.long() for b in calibration_bins(per_row[1], counts._calibration_edges, FINE_BINS, counts._windows[1]))
    counts.calibration.index_add_(1, j, per_row[:3])
    counts.calibration_fine.index_add_(1, fine, per_row[:3])
    sums = per_row.sum(1)
    if counts.confusion.numel():
        counts.confusion.view(-1).index_add_(0, torch.add(pred, safe, alpha=counts.num_classes), v)
    if counts.pairs is not None and pairs:
        counts.pairs.update(safe, pred, v - hit, checked=True)  # the confused rows weigh 1
    index = [counts._index["row_sums"][: per_row.shape[0]], counts._index["left_out"]]
    return index, [sums, total - sums[:1]]


def _draw(
    counts: ClassCounts,
    scores: Tensor,
    safe: Tensor,
    valid: Tensor,
    m: int,
    k: int,
    out: tuple[Tensor, Tensor, Tensor] | None = None,
) -> tuple[Tensor, Tensor, Tensor]:
    """The budget sample of ``k`` rows: ``(k, C)`` scores, their true classes and float64 weights ``M / k``.

    A row left out weighs 0. Written into ``out`` when given (held buffers).
    """
    c = counts.num_classes
    r = counts._sample_rows(m, k)
    if scores.ndim == 2:
        sample = scores if r is None else scores[r] if out is None else torch.index_select(scores, 0, r, out=out[0])
    elif r is None:
        sample = scores.movedim(1, -1).reshape(-1, c)
    else:
        length = scores.shape[2]
        lead = torch.div(r, length, rounding_mode="floor")
        sample = scores[lead, :, torch.sub(r, lead, alpha=length)]  # (k, C)
    s_safe, s_valid = (safe, valid) if r is None else (safe[r], valid[r])
    if out is None:
        return sample, s_safe, s_valid.to(torch.float64).mul_(m / max(k, 1))
    if sample.data_ptr() != out[0].data_ptr():
        out[0].copy_(sample)
    out[1].copy_(s_safe)
    out[2].copy_(s_valid).mul_(m / max(k, 1))
    return out


def add_sampled(
    counts: ClassCounts, sample: Tensor, s_safe: Tensor, w: Tensor, index: list[Tensor], parts: list[Tensor]
) -> None:
    """Multiclass statistics of ``rows x classes`` on the budget sample: ``(k, C)`` scores, true classes, weights.

    Curves and classwise bins are added here; the moments, the Brier score and the true-class histogram (a few
    values) are appended to ``index``/``parts``, the caller's update of the store.
    """
    c = counts.num_classes
    probs = counts._probabilities(sample, multiclass=True)
    counts._add_curves(probs, s_safe, w)  # one positive a row: its true class
    # classwise bins of every class (the sampled values: O(budget)): weight and probability sums of every value;
    # the hit sums have one value a row (its true class), added alone
    p64 = probs.double()  # float64 once: a product of float64 and float32 takes the CPU's slow casting path
    wp = torch.mul(p64, w[:, None])  # w p, (k, C)
    j = calibration_bin(probs, counts._calibration_edges, counts._windows[1])
    counts._add_classwise(j, (w[:, None].expand_as(wp), wp), hits=(s_safe, w))
    # moments (weight, sum p, sum p^2 per class) and the Brier score, the sum over classes of (p - onehot)^2:
    # sum p^2 - 2 p_true + 1 a row, from the sums at hand
    p_true = p64.gather(1, s_safe[:, None]).squeeze(1)
    p_sum, squares = wp.sum(0), wp.mul_(p64).sum(0)
    total = w.sum()
    brier = squares.sum() - 2 * (w @ p_true) + total
    index.append(counts._index["moments"])
    parts.append(torch.cat([total.expand(c), p_sum, squares, brier[None], total[None]]))
    if counts.views:
        counts._add_probs(torch.where(w > 0, p_true, float("nan")), index, parts)  # the sampled rows


__all__ = ["add_rows", "add_sampled", "row_scores", "settle_multiclass", "update_multiclass"]
