"""The multilabel update of :class:`~lightning_lossdiag.stats.classification.ClassCounts`: each label a binary task.

Part of ``ClassCounts``' implementation (it reads and writes the counts' state): every value, in pieces of at most
``_LABEL_VALUES`` whose temporaries are kept buffers (:func:`~lightning_lossdiag.stats.label_values.label_values`),
gives the per-label counts and each row's loss; the budget sample of rows gives the curves, calibration bins, moments
and Brier score. No host read.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import Tensor

from lightning_lossdiag.stats.calibration import FINE_BINS, calibration_bins
from lightning_lossdiag.stats.curves import by_lookup
from lightning_lossdiag.stats.label_values import label_masks, label_values
from lightning_lossdiag.stats.pending import Pending, pieces

if TYPE_CHECKING:
    from lightning_lossdiag.stats.classification import ClassCounts

_LABEL_VALUES = 2**18  # values per piece of the every-value statistics on the CPU (kept 1 MiB float buffers)
_HISTOGRAM_VALUES = 4096  # probabilities per update in the true-label probability histogram


def update_multilabel(counts: ClassCounts, x: Tensor, target: Tensor, n: int, rank: int, world: int) -> None:
    """Add a multilabel batch: every value in bounded pieces (:func:`label_piece`), then the sample. No host read."""
    d = counts.class_dim % x.ndim
    c = counts.num_classes
    xs, ts = x.movedim(d, -1).reshape(-1, c), target.movedim(d, -1).reshape(-1, c)
    m = xs.shape[0]
    if m == 0:
        return
    # every value, in pieces of at most _LABEL_VALUES whose full-size temporaries are kept buffers
    step = max(1, _LABEL_VALUES * (1 if by_lookup(xs) else 16) // c)  # 16 MiB float32 pieces off the CPU
    pieces = [label_piece(counts, xs[a : a + step], ts[a : a + step], n, rank, world, a, m) for a in range(0, m, step)]
    label_counts = pieces[0][0] if len(pieces) == 1 else torch.stack([p[0] for p in pieces]).sum(0)
    # support, predicted and correct per label, then the valid values per label (label_rows follows per_class)
    counts._store[counts._at["per_class"] : counts._at["per_class"] + 4 * c].add_(label_counts.view(-1))
    counted = pieces[0][1] if len(pieces) == 1 else torch.stack([p[1] for p in pieces]).sum()
    rows = torch.stack([counted, m - counted])
    k = counts._sample_size(m, c)
    r = counts._sample_rows(m, k)  # drawn before any settle: held or not, the same rows
    held = counts._pending
    kinds = {"sample": ((c,), xs.dtype), "targets": ((c,), ts.dtype)}
    if held is None or not held.admit(1, k, counts.settle, c, kinds):  # added now
        sample, s_t = (xs, ts) if r is None else (xs[r], ts[r])
        add_labels_sampled(counts, sample, s_t, m / k, rows)
        _top_label_bins(counts)
        return
    # held: the sampled rows and targets, their weights and the row counts, added at the next settle()
    held.claim("rows", "rows", (2,), rows.dtype)[:1].copy_(rows[None])
    for name, values in (("sample", xs), ("targets", ts)):
        out = held.claim("sample", name, (c,), values.dtype)[:k]
        out.copy_(values) if r is None else torch.index_select(values, 0, r, out=out)
    held.claim("sample", "scale", (), torch.float64)[:k].fill_(m / k)
    held.advance(1, k, m)
    if held.full():
        counts.settle()


def settle_multilabel(counts: ClassCounts, held: Pending) -> None:
    """Add the sampled rows ``held`` (:class:`~lightning_lossdiag.stats.pending.Pending`) to the state, then clear."""
    sample, s_t, scale = (held.view("sample", name) for name in ("sample", "targets", "scale"))
    rows: Tensor | None = held.view("rows", "rows").sum(0)
    parts = pieces(sample.shape[0], counts.num_classes)  # pieces whose temporaries stay in cache
    for at in parts:
        add_labels_sampled(counts, sample[at], s_t[at], scale[at, None], rows, -(-held.updates // len(parts)))
        rows = None
    _top_label_bins(counts)
    held.clear()


def _top_label_bins(counts: ClassCounts) -> None:
    """The top-label bins of multilabel counts: the classwise bins summed over labels (the same values, same bins)."""
    counts.calibration.copy_(counts.classwise.sum(0))


def label_piece(
    counts: ClassCounts, xs: Tensor, ts: Tensor, n: int, rank: int, world: int, start: int, total: int
) -> tuple[Tensor, Tensor]:
    """Every value of rows ``start:start + len(xs)``: ``(4, C)`` label counts and the rows kept; worst rows offered.

    Each full-size temporary is a kept scratch buffer (:class:`~lightning_lossdiag.stats.row_ops.Workspace`).
    """
    v = label_values(xs, ts, counts.inputs, counts.ignore_index, counts._work, losses=counts.views)
    positive, predicted, row_loss = v.positive, v.predicted, v.row_loss
    if row_loss is not None:  # the worst rows (error views only)
        columns = [
            lambda at: positive[at].sum(1),
            lambda at: predicted[at].sum(1),
            lambda at: (-row_loss[at]).exp(),
        ]
        counts._offer_worst(torch.where(v.kept, row_loss, float("-inf")), columns, n, rank, world, start, total)
    return v.counts, v.kept.sum()


def add_labels_sampled(
    counts: ClassCounts, sample: Tensor, s_t: Tensor, scale: float | Tensor, rows: Tensor | None, updates: int = 1
) -> None:
    """Multilabel statistics on the budget sample of rows, each label as a binary task.

    ``sample``/``s_t``: the ``(k, C)`` sampled predictions and targets; ``scale``: the weight of a sampled row
    (``M / k``, or ``(k, 1)`` of them for ``updates`` held updates). Curves, classwise and fine calibration bins,
    moments, Brier score and the probability histogram; ``rows`` (counted, left out; ``None``: added with another
    piece) joins their update of the store. The top-label bins are the classwise bins summed over labels: the caller
    takes them from those once (:func:`_top_label_bins`) instead of counting them twice.
    """
    c = counts.num_classes
    _, s_valid, s_pos = label_masks(s_t if s_t.dtype == torch.float64 else s_t.float(), counts.ignore_index)
    probs = counts._probabilities(sample, multiclass=False)
    # (3, k, C) weight, probability and hit sums of each value, float64 in one block (a product of float64 and float32
    # or bool factors takes the CPU's slow casting path, so each factor is float64 first)
    sums = probs.new_empty((3, *probs.shape), dtype=torch.float64)
    w = sums[0].copy_(s_valid).mul_(scale)
    p64 = probs.double()
    torch.mul(w, p64, out=sums[1])
    sums[2].copy_(s_pos).mul_(w)
    counts._add_curves(probs, s_pos, w)
    j, fine = calibration_bins(probs, counts._calibration_edges, FINE_BINS, counts._windows[1])
    counts._add_classwise(j, sums.unbind(0))  # the top-label bins follow from them (_top_label_bins, once)
    counts.calibration_fine.index_add_(1, fine.view(-1).long(), sums.view(3, -1))  # int64: int32 is slow on dim 1
    weight, p_sum, hits = sums.sum(1)  # (C,) each
    squares = (sums[1] * p64).sum(0)  # sum of w p^2 per label
    # Brier: sum of w (p - y)^2 = w p^2 - 2 w p y + w y for 0/1 labels, from the sums at hand (w p y: hits times p)
    brier = squares.sum() - 2 * (sums[2] * p64).sum() + hits.sum()
    moment = torch.cat([weight, p_sum, squares, brier[None], weight.sum()[None]])
    index, parts = [counts._index["moments"]], [moment]
    if rows is not None:
        index, parts = [*index, counts._index["rows"]], [*parts, rows]
    if counts.views:
        # the probability histogram takes a few of the sampled rows of each update; of held updates, rows spread
        # evenly over their samples (each row is a uniform draw, so any rows will do)
        shown = max(1, _HISTOGRAM_VALUES // c) * updates
        at = slice(None, shown) if updates == 1 else slice(None, None, max(1, probs.shape[0] // shown))
        p_true = torch.where(s_pos[at][:shown], probs[at][:shown], 1 - probs[at][:shown])
        counts._add_probs(torch.where(s_valid[at][:shown], p_true, float("nan")).view(-1), index, parts)
    counts._store.index_add_(0, torch.cat(index), torch.cat(parts))


__all__ = ["add_labels_sampled", "label_piece", "settle_multilabel", "update_multilabel"]
