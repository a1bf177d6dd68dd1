"""One stage's classification counts on the device: one pass over a batch feeds the error views and the metrics.

What each update costs (``M`` rows: samples, pixels or tokens; ``C`` classes or labels; ``T`` thresholds):

* every row (``O(M)`` after one ``max``/``logsumexp`` over the class dim): per-class support, predicted and correct
  counts, the confusion matrix (``C <= max_confusion``) or the most confused pairs (:class:`ConfusedPairs`), the
  true-class probability histogram, the loss of each row and the worst rows;
* a bounded budget of values (``budget`` values of ``rows x classes``: a uniform sample of
  ``k = max(1, budget // C)`` rows, drawn with replacement by a generator of its own, each weighing ``M / k``, so the
  counts stay unbiased): the binned PR/ROC counts (bucketized once: ``O(k C)``, never ``x T``), the probability
  moments of each class and, for multilabel, the probability histogram. When ``M * C <= budget`` every row is used
  and the curves are exact.

State: ``3 x C`` counts, ``K x 2 x T`` curve weights (``K = 1`` for binary), a ``C x C`` confusion only up to
``max_confusion`` classes, else a fixed-size pair sketch: at most ``classes x thresholds`` whatever the data.
Targets outside ``[0, C)`` (multiclass) or ``[0, 1]`` (binary, multilabel), and ``ignore_index``, weigh 0 in every
statistic: ``-100`` tokens and ``255`` void pixels are left out without a boolean mask. No update reads the host.
"""

from __future__ import annotations

import copy
from typing import Any

import torch
from torch import Tensor
from torch.nn import functional as F  # noqa: N812

from lightning_lossdiag.stats.curves import add_curve_counts, curve_thresholds
from lightning_lossdiag.stats.distributed import GatherFn
from lightning_lossdiag.stats.histogram import FixedHistogram
from lightning_lossdiag.stats.pairs import ConfusedPairs
from lightning_lossdiag.stats.topk import TopKWorst

_TASKS = ("binary", "multiclass", "multilabel")
_INPUTS = ("logits", "probabilities", "log_probabilities")
_TENSORS = ("per_class", "label_rows", "rows", "curves", "moments", "confusion")


def _unravel(flat: Tensor, shape: tuple[int, ...]) -> tuple[Tensor, ...]:
    """Coordinates of flat positions in ``shape`` (integer arithmetic on the device, no host read)."""
    coords = []
    for size in reversed(shape):
        coords.append(flat % size)
        flat = torch.div(flat, size, rounding_mode="floor")
    return tuple(reversed(coords))


def _row_index(
    seen: int, m: int, per_sample: int, rank: int, world: int, device: torch.device
) -> tuple[Tensor, Tensor]:
    """Sample index of each row (in the stage's loader order; under DDP the sampler's) and its element in the sample."""
    pos = torch.arange(m, device=device)
    local = seen + torch.div(pos, per_sample, rounding_mode="floor")
    return (local * world + rank).double(), (pos % per_sample).double()


class ClassCounts:
    """Device counts of one stage of a binary, multiclass or multilabel task (see the module docstring).

    Args:
        task: ``"binary"``, ``"multiclass"`` or ``"multilabel"``.
        inputs: what predictions hold: ``"logits"``, ``"probabilities"`` or ``"log_probabilities"``.
        num_classes: classes (2 for binary) or labels.
        class_dim: the class dimension of the predictions (``1``, or ``-1`` for ``(B, T, V)``).
        ignore_index: a target value to leave out (besides out-of-range targets).
        thresholds: thresholds of the binned curves.
        budget: values of ``rows x classes`` per update for the curves and moments (a uniform sample of rows).
        max_confusion: the largest class count with a full confusion matrix; above it, the most confused pairs.
        bins: bins of the true-class probability histogram.
        worst_k: rows kept in the worst-rows table.
        device: where the state lives.
        seed: seed of the row sampler (give each DDP rank its own).

    Example:
        >>> counts = ClassCounts("multiclass", "logits", 3, thresholds=11)
        >>> counts.update(torch.tensor([[2.0, 0.0, 0.0], [0.0, 3.0, 0.0], [0.0, 0.0, 1.0]]), torch.tensor([0, 2, -100]))
        >>> counts.per_class.tolist()  # support, predicted, correct per class (the -100 row is left out)
        [[1.0, 0.0, 1.0], [1.0, 1.0, 0.0], [1.0, 0.0, 0.0]]
    """

    def __init__(
        self,
        task: str,
        inputs: str,
        num_classes: int,
        *,
        class_dim: int = 1,
        ignore_index: int | None = None,
        thresholds: int = 101,
        budget: int = 2**16,
        max_confusion: int = 32,
        bins: int = 64,
        worst_k: int = 20,
        device: torch.device | str | None = None,
        seed: int = 0,
    ) -> None:
        if task not in _TASKS:
            raise ValueError(f"`task` must be one of {_TASKS}, got {task!r}")
        if inputs not in _INPUTS:
            raise ValueError(f"`inputs` must be one of {_INPUTS}, got {inputs!r}")
        for name, value, low in (
            ("num_classes", num_classes, 2),
            ("budget", budget, 1),
            ("max_confusion", max_confusion, 0),
        ):
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise ValueError(f"`{name}` must be an integer >= {low}, got {value!r}")
        self.task, self.inputs, self.num_classes = task, inputs, num_classes
        self.class_dim, self.ignore_index, self.budget = class_dim, ignore_index, budget
        self.device = torch.device(device) if device is not None else torch.device("cpu")
        c, k = num_classes, (1 if task == "binary" else num_classes)

        def zeros(*shape: int) -> Tensor:
            return torch.zeros(*shape, dtype=torch.float64, device=self.device)

        self.thresholds = curve_thresholds(thresholds, self.device)
        self.per_class = zeros(3, c)  # support, predicted, correct
        self.label_rows = zeros(c)  # multilabel: valid values per label
        self.rows = zeros(2)  # rows counted, rows left out
        self.curves = zeros(k, 2, thresholds)
        self.moments = zeros(3, k)  # weight, sum p, sum p^2 (sampled)
        dense = task != "multilabel" and c <= max_confusion
        self.confusion = zeros(c if dense else 0, c if dense else 0)
        self.pairs = ConfusedPairs(c, device=self.device) if task == "multiclass" and not dense else None
        self.true_prob = FixedHistogram(0.0, 1.0, bins, device=self.device)
        self.worst = TopKWorst(worst_k, 5, device=self.device)
        self.seen = 0
        self._generator = torch.Generator(device=self.device)
        self._generator.manual_seed(seed)

    # ---- per batch: device only ------------------------------------------------------------------------------
    def update(self, preds: Tensor, target: Tensor, *, rank: int = 0, world: int = 1) -> None:
        """Add one batch (predictions as handed over, targets as the loss takes them). No host read."""
        n = int(target.shape[0]) if target.ndim else 1
        if self.task == "multiclass":
            self._update_multiclass(preds.detach(), target.detach(), n, rank, world)
        elif self.task == "binary":
            self._update_binary(preds.detach(), target.detach(), n, rank, world)
        else:
            self._update_multilabel(preds.detach(), target.detach(), n, rank, world)
        self.seen += n

    def _sample(self, m: int, width: int) -> tuple[Tensor | None, int]:
        """Row positions of the budget sample (``None``: every row) and how many."""
        k = max(1, self.budget // max(1, width))
        if k >= m:
            return None, m
        return torch.randint(0, m, (k,), device=self.device, generator=self._generator), k

    def _counts(self, safe: Tensor, pred: Tensor, v: Tensor, m: int) -> None:
        c = self.num_classes
        index = torch.cat([safe, pred + c, safe + 2 * c])
        self.per_class.view(-1).index_add_(0, index, torch.cat([v, v, v * (pred == safe)]))
        counted = v.sum()
        self.rows += torch.stack([counted, m - counted])
        if self.confusion.numel():
            self.confusion.view(-1).index_add_(0, safe * c + pred, v)
        if self.pairs is not None:
            self.pairs.update(safe, pred, v * (pred != safe))

    def _valid_labels(self, lab: Tensor) -> tuple[Tensor, Tensor]:
        valid = (lab >= 0) & (lab < self.num_classes)
        if self.ignore_index is not None:
            valid &= lab != self.ignore_index
        return valid, torch.where(valid, lab, torch.zeros_like(lab))

    def _update_multiclass(self, x: Tensor, target: Tensor, n: int, rank: int, world: int) -> None:
        d = self.class_dim % x.ndim
        c = self.num_classes
        x = x if x.dtype in (torch.float32, torch.float64) else x.float()
        lab = target.long()
        valid, safe = self._valid_labels(lab)
        top, pred = x.max(dim=d)
        picked = x.gather(d, safe.unsqueeze(d)).squeeze(d)
        if self.inputs == "logits":
            lse = x.logsumexp(dim=d)
            log_true, log_pred = picked - lse, top - lse
        elif self.inputs == "log_probabilities":
            log_true, log_pred = picked, top
        else:
            log_true, log_pred = picked.clamp_min(1e-12).log(), top.clamp_min(1e-12).log()
        flat = [t.reshape(-1) for t in (lab, safe, valid, pred, log_true, log_pred)]
        lab, safe, valid, pred, log_true, log_pred = flat
        m = lab.shape[0]
        v = valid.double()
        self._counts(safe, pred, v, m)
        p_true = log_true.exp()
        self.true_prob.update(torch.where(valid, p_true, torch.full_like(p_true, float("nan"))))
        index, element = _row_index(self.seen, m, max(1, m // max(n, 1)), rank, world, self.device)
        loss = torch.where(valid, -log_true, torch.full_like(log_true, float("-inf")))
        rows = torch.stack([index, element, lab.double(), pred.double(), log_pred.exp().double()], dim=1)
        self.worst.update(loss, rows)
        moved = x.movedim(d, -1)  # a view: rows are gathered from it, never copied whole
        r, k = self._sample(m, c)
        if r is None:
            sample, s_safe, w = moved.reshape(-1, c), safe, v
        else:
            sample, s_safe, w = moved[_unravel(r, tuple(moved.shape[:-1]))], safe[r], v[r] * (m / k)
        probs = self._probabilities(sample, multiclass=True)
        positive = s_safe[:, None] == torch.arange(c, device=self.device)  # one_hot reads min() on the CPU
        add_curve_counts(self.curves, probs, positive, w, self.thresholds)
        self._moments(probs, w[:, None])

    def _probabilities(self, x: Tensor, *, multiclass: bool) -> Tensor:
        x = x.float()
        if self.inputs == "logits":
            return x.softmax(dim=-1) if multiclass else x.sigmoid()
        return x.exp() if self.inputs == "log_probabilities" else x

    def _moments(self, probs: Tensor, w: Tensor) -> None:
        p = probs.double()
        self.moments += torch.stack([w.expand_as(p).sum(0), (w * p).sum(0), (w * p * p).sum(0)])

    def _update_binary(self, x: Tensor, target: Tensor, n: int, rank: int, world: int) -> None:
        p = self._probabilities(x.reshape(-1), multiclass=False)
        t = target.reshape(-1).float()
        m = p.shape[0]
        valid = (t >= 0) & (t <= 1)
        if self.ignore_index is not None:
            valid &= t != self.ignore_index
        safe = torch.where(valid, t, torch.zeros_like(t)).round().long()
        pred = (p > 0.5).long()
        v = valid.double()
        self._counts(safe, pred, v, m)
        p_true = torch.where(safe == 1, p, 1 - p)
        self.true_prob.update(torch.where(valid, p_true, torch.full_like(p_true, float("nan"))))
        index, element = _row_index(self.seen, m, max(1, m // max(n, 1)), rank, world, self.device)
        loss = torch.where(valid, -p_true.clamp_min(1e-12).log(), torch.full_like(p_true, float("-inf")))
        p_pred = torch.where(pred == 1, p, 1 - p)
        self.worst.update(loss, torch.stack([index, element, safe.double(), pred.double(), p_pred.double()], dim=1))
        r, k = self._sample(m, 1)
        s_p, s_pos, w = (p, safe, v) if r is None else (p[r], safe[r], v[r] * (m / k))
        add_curve_counts(self.curves, s_p[:, None].contiguous(), s_pos[:, None], w, self.thresholds)
        self._moments(s_p[:, None], w[:, None])

    def _update_multilabel(self, x: Tensor, target: Tensor, n: int, rank: int, world: int) -> None:
        d = self.class_dim % x.ndim
        c = self.num_classes
        xs, ts = x.movedim(d, -1).reshape(-1, c), target.movedim(d, -1).reshape(-1, c).float()
        m = xs.shape[0]
        valid = (ts >= 0) & (ts <= 1)
        if self.ignore_index is not None:
            valid &= ts != self.ignore_index
        positive = (ts > 0.5) & valid
        pred = (xs > 0.0) if self.inputs == "logits" else (self._probabilities(xs, multiclass=False) > 0.5)
        predicted = pred & valid
        vd = valid.double()
        stats = torch.stack(
            [positive.double().sum(0), predicted.double().sum(0), (predicted & positive).double().sum(0)]
        )
        self.per_class += stats
        self.label_rows += vd.sum(0)
        counted = vd.amax(1).sum() if m else vd.sum()
        self.rows += torch.stack([counted, m - counted])
        r, k = self._sample(m, c)
        sample = xs if r is None else xs[r]
        probs = self._probabilities(sample, multiclass=False)
        s_pos, s_valid = (positive, vd) if r is None else (positive[r], vd[r])
        w = s_valid * (m / k if r is not None else 1.0)
        add_curve_counts(self.curves, probs, s_pos, w, self.thresholds)
        p_true = torch.where(s_pos, probs, 1 - probs)
        self.true_prob.update(torch.where(s_valid > 0, p_true, torch.full_like(p_true, float("nan"))))
        self.moments += torch.stack([w.sum(0), (w * probs).sum(0), (w * probs * probs).sum(0)])
        # worst rows: the mean binary cross-entropy of each row over its valid labels (every row)
        bce = (
            F.binary_cross_entropy_with_logits(xs.float(), ts.clamp(0, 1), reduction="none")
            if (self.inputs == "logits")
            else F.binary_cross_entropy(
                self._probabilities(xs, multiclass=False).clamp(0, 1), ts.clamp(0, 1), reduction="none"
            )
        )
        per_row = (bce * vd).sum(1) / vd.sum(1).clamp_min(1)
        index, element = _row_index(self.seen, m, max(1, m // max(n, 1)), rank, world, self.device)
        rows = torch.stack([index, element, positive.double().sum(1), predicted.double().sum(1), (-per_row).exp()], 1)
        self.worst.update(torch.where(vd.sum(1) > 0, per_row, torch.full_like(per_row, float("-inf"))), rows)

    # ---- epoch end (host reads allowed) ----------------------------------------------------------------------
    def merged(self, gather: GatherFn | None = None, world: int = 1) -> ClassCounts:
        """A copy holding the merge of every rank's counts (a collective when ``world > 1``); ``self`` is untouched."""
        out = copy.copy(self)
        if world <= 1 or gather is None:
            return out
        for name in _TENSORS:
            setattr(out, name, gather(getattr(self, name)).sum(0))
        for name in ("true_prob", "worst", "pairs"):
            stat = getattr(self, name)
            if stat is not None:
                clone = copy.deepcopy(stat)
                clone.sync(gather)
                setattr(out, name, clone)
        return out

    def nbytes(self) -> int:
        """Bytes of device state (fixed at construction)."""
        total = sum(getattr(self, n).numel() * getattr(self, n).element_size() for n in _TENSORS)
        stats: list[Any] = [self.true_prob, self.worst, self.pairs]
        return total + sum(s.state_bytes() for s in stats if s is not None)


__all__ = ["ClassCounts"]
