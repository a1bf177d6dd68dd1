"""Every value of a multilabel batch: the per-label counts and each row's loss, in a few passes over kept buffers.

What :class:`~lightning_lossdiag.stats.classification.ClassCounts` needs from every ``(row, label)`` value of a
multilabel update (the budget sample does the rest): per label the positives, the predicted positives, the correct
positives and the valid values; per row the valid values and the mean binary cross-entropy over them (for the worst
rows). Targets outside ``[0, 1]`` (NaN included) and ``ignore_index`` weigh 0. Each full-size temporary is written
into a buffer of a :class:`~lightning_lossdiag.stats.row_ops.Workspace` when one is given (on the CPU a fresh
multi-MiB temporary costs page faults on every update). No host read.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import torch
from torch import Tensor

from lightning_lossdiag.stats.curves import by_lookup
from lightning_lossdiag.stats.row_ops import Workspace, count_true

#: the integers of a float's width: viewed through them, an AND with 0 or -1 clears or keeps a value bit for bit
_SAME_WIDTH_INT = {4: torch.int32, 8: torch.int64}

Take = Callable[[str, torch.dtype], Tensor]


class LabelValues(NamedTuple):
    """What every value of a multilabel piece gives (see the module docstring)."""

    counts: Tensor  # (4, C): positives, predicted positives, correct positives, valid values per label
    kept: Tensor  # (M,) bool: rows with at least one valid value
    row_loss: Tensor | None  # (M,) mean binary cross-entropy over each row's valid values; None: not asked for
    positive: Tensor  # (M, C) 0/1 masks (float on the CPU, else bool): valid and above 0.5 (a scratch buffer)
    predicted: Tensor  # (M, C) 0/1 masks: valid and predicted positive (a scratch buffer)


def label_masks(
    t: Tensor, ignore_index: int | None, take: Take | None = None, mask: torch.dtype = torch.bool
) -> tuple[Tensor, Tensor, Tensor]:
    """``(clean, valid, positive)`` of float targets: clamped into ``[0, 1]``, kept, kept and above 0.5.

    ``take(name, dtype)``: where each full-size result goes (kept scratch buffers), else fresh tensors. ``mask``: the
    dtype of the two masks, ``bool`` or a float dtype (0/1 values: the CPU writes a float comparison about 4x
    faster than a bool one, and sums floats faster than bytes).

    Example:
        >>> clean, valid, positive = label_masks(torch.tensor([0.0, 1.0, 2.0, float("nan")]), None)
        >>> valid.tolist(), positive.tolist()
        ([True, True, False, False], [False, True, False, False])
    """

    def out(name: str, dtype: torch.dtype) -> Tensor | None:
        return take(name, dtype) if take is not None else None

    clean = torch.clamp(t, 0, 1, out=out("clean", t.dtype))
    valid = torch.eq(clean, t, out=out("valid", mask))  # in [0, 1] (NaN is not)
    if ignore_index is not None and 0 <= ignore_index <= 1:
        valid.mul_(torch.ne(t, ignore_index, out=out("scratch", mask)))  # mul: logical and of 0/1 values
    positive = torch.gt(t, 0.5, out=out("positive", mask)).mul_(valid)
    return clean, valid, positive


def _count(mask: Tensor, dim: int) -> Tensor:
    """Count a 0/1 mask along ``dim``: floats by ``sum`` (exact to 2**24), bools by :func:`count_true`."""
    return mask.sum(dim) if mask.is_floating_point() else count_true(mask, dim)


def label_values(
    xs: Tensor, ts: Tensor, inputs: str, ignore_index: int | None, work: Workspace, *, losses: bool = True
) -> LabelValues:
    """The :class:`LabelValues` of ``(M, C)`` predictions ``xs`` (``inputs``: logits, probabilities or log-probs).

    The row loss is torch's binary cross-entropy (with logits: ``x - y x - log sigmoid(x)``; with probabilities:
    ``-(y log p + (1 - y) log(1 - p))``, logs clamped at -100, without torch's range check, which NaN fails); with
    ``losses=False`` it is not computed (``None``): only the worst rows need it.

    Example:
        >>> ws = Workspace(torch.device("cpu"))
        >>> v = label_values(torch.tensor([[2.0, -1.0], [0.5, 0.5]]), torch.tensor([[1.0, 0.0], [0.0, -1.0]]),
        ...                  "logits", None, ws)
        >>> v.counts.tolist()  # positives, predicted, correct, valid per label (float 0/1 masks summed on the CPU)
        [[1.0, 0.0], [2.0, 0.0], [1.0, 0.0], [2.0, 1.0]]
        >>> round(v.row_loss[0].item(), 4) == round(torch.nn.functional.binary_cross_entropy_with_logits(
        ...     torch.tensor([2.0, -1.0]), torch.tensor([1.0, 0.0])).item(), 4)
        True
    """
    shape = tuple(xs.shape)
    fd = xs.dtype if xs.dtype in (torch.float32, torch.float64) else torch.float32

    def take(name: str, dtype: torch.dtype) -> Tensor:
        return work.take(name, shape, dtype)

    x = xs if xs.dtype == fd else take("x", fd).copy_(xs)
    t = ts if ts.dtype == fd else take("t", fd).copy_(ts)
    # 0/1 masks: floats on the CPU (a float comparison costs a quarter of a bool one there), bools elsewhere
    mask = fd if by_lookup(x) else torch.bool
    clean, valid, positive = label_masks(t, ignore_index, take, mask)
    score = x if inputs != "log_probabilities" else torch.exp(x, out=take("probs", fd))
    pred = torch.gt(score, 0.0 if inputs == "logits" else 0.5, out=take("pred", mask))
    predicted = torch.mul(pred, valid, out=take("predicted", mask))
    per_row = _count(valid, 1)
    correct = pred.mul_(positive)
    counts = torch.stack([_count(positive, 0), _count(predicted, 0), _count(correct, 0), _count(valid, 0)])
    if not losses:
        return LabelValues(counts, per_row > 0, None, positive, predicted)
    if inputs == "logits":  # binary_cross_entropy_with_logits: x - y * x - log(sigmoid(x)), in place
        bce = torch.addcmul(x, clean, x, value=-1, out=clean)
        bce = bce.sub_(torch.ops.aten.log_sigmoid.out(x, out=take("probs", fd)))
    else:
        probs = torch.clamp(score, 0, 1, out=take("probs", fd))
        log_p = torch.log(probs, out=take("bce", fd)).clamp_min_(-100)
        log_q = probs.neg_().log1p_().clamp_min_(-100)
        bce = log_p.sub_(log_q).mul_(clean).add_(log_q).neg_()
    if valid.is_floating_point():  # the CPU: left-out values cleared bit by bit (NaN losses included)
        # valid 0/1 -> 0/-1 (every bit set) in the integers of the losses' width, in the buffer of `pred` (counted
        # above, no longer read); one AND keeps a kept loss's bits and clears the others: ~0.1 ms for 256k values,
        # where a bool mask and a masked fill took ~0.4 ms
        ints = _SAME_WIDTH_INT[bce.element_size()]
        keep = pred.view(ints).copy_(valid).neg_()
        row_loss = bce.view(ints).bitwise_and_(keep).view(bce.dtype).sum(1)
    else:
        dropped = torch.eq(valid, 0, out=take("scratch", torch.bool))  # a masked fill: NaN losses of left-out go
        row_loss = bce.masked_fill_(dropped, 0.0).sum(1)
    return LabelValues(counts, per_row > 0, row_loss.div_(per_row.clamp_min(1)), positive, predicted)


__all__ = ["LabelValues", "label_masks", "label_values"]
