"""The binary update of :class:`~lightning_lossdiag.stats.classification.ClassCounts` (one score a row).

Part of ``ClassCounts``' implementation (it reads and writes the counts' state). No host read.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import Tensor

from lightning_lossdiag.stats.calibration import FINE_BINS, add_classwise, bin_sums, calibration_bins

if TYPE_CHECKING:
    from lightning_lossdiag.stats.classification import ClassCounts


def update_binary(counts: ClassCounts, x: Tensor, target: Tensor, n: int, rank: int, world: int) -> None:
    """Add a binary batch (``x``: one score a row). No host read.

    Every row gives the counts and the calibration bins; the budget sample gives the curves.
    """
    p = counts._probabilities(x.reshape(-1), multiclass=False)
    t = target.reshape(-1).float()
    m = p.shape[0]
    valid = (t >= 0) & (t <= 1)
    if counts.ignore_index is not None:
        valid &= t != counts.ignore_index
    safe = torch.where(valid, t, 0.0).round().long()
    pred = (p > 0.5).long()
    v = valid.to(torch.float64)
    counts.per_class[::2].index_add_(1, safe, torch.stack([v, torch.where(pred == safe, v, 0.0)]))
    counts.per_class[1].index_add_(0, pred, v)
    if counts.confusion.numel():
        counts.confusion.view(-1).index_add_(0, torch.add(pred, safe, alpha=2), v)
    p_true = torch.where(safe == 1, p, 1 - p)
    if counts.views:
        loss = torch.where(valid, -p_true.clamp_min(1e-12).log(), float("-inf"))
        counts._offer_worst(loss, [safe, pred, torch.where(pred == 1, p, 1 - p)], n, rank, world)
    # classwise bins of both classes (1 - p and p against the label, every row); the top-label bins are those of
    # the positive class (p against the label), so they are taken from them; the fine bins of the same values
    both, labels = torch.stack([1 - p, p], 1), torch.stack([1 - safe, safe], 1)
    add_classwise(counts.classwise, both, labels, v, counts._calibration_edges, counts._windows[1])
    counts.calibration.copy_(counts.classwise[1])
    _, fine = calibration_bins(p, counts._calibration_edges, FINE_BINS, counts._windows[1])
    counts.calibration_fine.index_add_(1, fine.long(), bin_sums(p, safe, v).T)  # int64: int32 is slow along dim 1
    r, k = counts._sample(m, 1)
    s_p, s_pos, w = (p, safe, v) if r is None else (p[r], safe[r], v[r] * (m / k))
    counts._add_curves(s_p[:, None], s_pos[:, None], w)
    sp = s_p.double()
    counted = v.sum()
    brier = v @ (p.double() - safe).square()  # every row
    index = [counts._index["moments"], counts._index["rows"]]  # moments (sampled), brier; rows counted, left out
    parts = [torch.stack([w.sum(), w @ sp, w @ sp.square(), brier, counted, counted, m - counted])]
    if counts.views:
        counts._add_probs(torch.where(valid, p_true, float("nan")), index, parts)
    counts._store.index_add_(0, torch.cat(index), torch.cat(parts))


__all__ = ["update_binary"]
