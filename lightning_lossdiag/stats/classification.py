"""One stage's classification counts on the device: one pass over a batch feeds the error views and the metrics.

What each update costs (``M`` rows: samples, pixels or tokens; ``C`` classes or labels; ``T`` thresholds):

* every row (``O(M)`` after one ``max``/``logsumexp`` over the class dim): per-class support, predicted and correct
  counts, the confusion matrix (``C <= max_confusion``) or the most confused pairs (:class:`ConfusedPairs`), the
  true-class probability histogram, the loss of each row and the worst rows;
* a bounded budget of values (``budget`` values of ``rows x classes``: a uniform sample of
  ``k = max(1, budget // C)`` rows, drawn with replacement by a generator of its own, each weighing ``M / k``, so the
  counts stay unbiased): the binned PR/ROC counts (bucketized once: ``O(k C)``, never ``x T``), the probability
  moments and classwise calibration bins of each class and, for multilabel, the probability histogram. When
  ``M * C <= budget`` every row is used and the curves are exact.

State: ``3 x C`` counts, ``K x 2 x T`` curve weights (``K = 1`` for binary), ``C x 3 x 16`` classwise calibration
bins, fixed top-label calibration bins (15 and 1,024, see :mod:`~lightning_lossdiag.stats.calibration`), a
``C x C`` confusion only up to ``max_confusion`` classes, else a fixed-size pair sketch: at most
``classes x thresholds`` whatever the data.
Targets outside ``[0, C)`` (multiclass) or ``[0, 1]`` (binary, multilabel), and ``ignore_index``, weigh 0 in every
statistic: ``-100`` tokens and ``255`` void pixels are left out without a boolean mask. No update reads the host.
"""

from __future__ import annotations

import copy
from typing import Any

import torch
from torch import Tensor
from torch.nn import functional as F  # noqa: N812

from lightning_lossdiag.stats.calibration import FINE_BINS, add_calibration, add_classwise
from lightning_lossdiag.stats.curves import add_curve_counts, curve_thresholds
from lightning_lossdiag.stats.distributed import GatherFn
from lightning_lossdiag.stats.histogram import FixedHistogram
from lightning_lossdiag.stats.pairs import ConfusedPairs
from lightning_lossdiag.stats.topk import TopKWorst

_TASKS = ("binary", "multiclass", "multilabel")
_INPUTS = ("logits", "probabilities", "log_probabilities")
_ARGMAX_CHUNK = 64
_HISTOGRAM_VALUES = 4096  # multilabel: probabilities per update in the true-label probability histogram
_CALIBRATION = ("calibration", "calibration_fine", "classwise", "brier")  # top-label, fine, classwise bins; Brier
_TENSORS = ("per_class", "label_rows", "rows", "curves", "moments", "confusion", "ranking", *_CALIBRATION)
CALIBRATION_BINS = 15  # equal-width confidence bins of the calibration error (Guo et al. 2017; torchmetrics' default)
TOP_K = 5  # top-k accuracy is counted from this many classes on (k = 5 when there are at least 10 classes)


def _unravel(flat: Tensor, shape: tuple[int, ...]) -> tuple[Tensor, ...]:
    """Coordinates of flat positions in ``shape`` (integer arithmetic on the device, no host read)."""
    coords = []
    for size in reversed(shape):
        coords.append(flat % size)
        flat = torch.div(flat, size, rounding_mode="floor")
    return tuple(reversed(coords))


def first_argmax(x: Tensor, dim: int, top: Tensor) -> Tensor:
    """``x.argmax(dim)`` (first maximum) given ``top = x.amax(dim)``, at a fraction of ``argmax``'s CPU cost.

    torch's CPU ``argmax``/``max`` with indices is several times slower than ``amax``: over a class dim that is not
    the last one (``(N, C, H, W)``), the first class whose value equals the maximum is found with one comparison and
    an ``amax`` of descending class weights; over a long last dim (512 classes or more, a 32k vocabulary), the
    maximum's chunk of 64 is found first and searched alone. Short last dims use ``argmax`` itself. No host read.

    Example:
        >>> x = torch.tensor([[[1.0, 5.0], [5.0, 2.0]], [[0.0, 5.0], [3.0, 1.0]]])  # (N=2, C=2, L=2)
        >>> first_argmax(x, 1, x.amax(1)).tolist()
        [[1, 0], [1, 0]]
    """
    c = x.shape[dim]
    if dim == x.ndim - 1:
        if c < 512:
            return x.argmax(dim)
        b = _ARGMAX_CHUNK
        rows = x.reshape(-1, c)
        full = c - c % b
        chunks = rows[:, :full].reshape(rows.shape[0], full // b, b).amax(-1)
        if full < c:
            chunks = torch.cat([chunks, rows[:, full:].amax(-1, keepdim=True)], 1)
        start = chunks.argmax(-1) * b
        inside = rows.gather(1, (start[:, None] + torch.arange(b, device=x.device)).clamp_(max=c - 1))
        return (start + inside.argmax(-1)).reshape(x.shape[:-1])
    shape = [1] * x.ndim
    shape[dim] = c
    dtype = torch.uint8 if c < 2**8 else torch.int16 if c < 2**15 else torch.int32
    weights = (c - torch.arange(c, device=x.device, dtype=torch.int32)).to(dtype).view(shape)
    hits = (x == top.unsqueeze(dim)).view(torch.uint8) if dtype == torch.uint8 else (x == top.unsqueeze(dim))
    return c - (hits * weights).amax(dim).to(torch.long)


def in_top_k(x: Tensor, dim: int, picked: Tensor, k: int) -> Tensor:
    """Whether fewer than ``k`` scores along ``dim`` are strictly above ``picked`` (the true class is in the top k).

    Over a long last dim (512 classes or more) the k-th largest score is found among the ``k`` chunks of 64 with the
    largest maxima (the top k values lie in them), so the work is an ``amax`` pass plus ``k x 64`` values a row;
    otherwise the scores above ``picked`` are counted in bytes. No host read.

    Example:
        >>> x = torch.tensor([[0.1, 0.9, 0.5, 0.3], [0.8, 0.7, 0.6, 0.5]])
        >>> in_top_k(x, 1, torch.tensor([0.3, 0.5]), 2).tolist()
        [False, False]
        >>> in_top_k(x, 1, torch.tensor([0.5, 0.7]), 2).tolist()
        [True, True]
    """
    c = x.shape[dim]
    if dim != x.ndim - 1 or c < 512:
        return _count(x > picked.unsqueeze(dim), dim) < k
    b = _ARGMAX_CHUNK
    rows = x.reshape(-1, c)
    full = c - c % b
    chunks = rows[:, :full].reshape(rows.shape[0], full // b, b)
    best = chunks.amax(-1).topk(min(k, full // b), dim=-1).indices  # the chunks that hold the k largest
    candidates = chunks.gather(1, best[..., None].expand(-1, -1, b)).reshape(rows.shape[0], -1)
    if full < c:
        candidates = torch.cat([candidates, rows[:, full:]], 1)
    kth = candidates.topk(k, dim=-1).values[:, -1]
    return (picked.reshape(-1) >= kth).reshape(picked.shape)


def _count(mask: Tensor, dim: int) -> Tensor:
    """``mask.sum(dim)`` of a bool tensor without an int64 copy of it (summed as bytes into int32)."""
    return mask.view(torch.uint8).sum(dim, dtype=torch.int32)


def row_index(pos: Tensor, seen: int, per_sample: int, rank: int, world: int) -> tuple[Tensor, Tensor]:
    """Sample index of rows ``pos`` (in the stage's loader order; under DDP the sampler's) and their element."""
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
        budget: int = 2**14,
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
        # multiclass: rows whose true class is among the TOP_K highest scores, and the sum of -log p(true class)
        self.ranking = zeros(2)
        self.top_k = TOP_K if task == "multiclass" and num_classes >= 2 * TOP_K else 0
        # calibration: per confidence bin (torchmetrics' bins: edges linspace(0, 1, 16), 1.0 in a bin of its own)
        # the weight, the sum of confidences and the sum of hits; top-label confidence for multiclass, the
        # positive-class probability for binary and multilabel (every row; multilabel: the sampled values)
        self.calibration = zeros(3, CALIBRATION_BINS + 1)
        self.calibration_fine = zeros(3, FINE_BINS)  # the same sums in 1,024 fine bins: the equal-mass ECE
        # classwise: p_c against 1[y = c] for every class (binary: 1 - p and p; multilabel: each label), same bins
        self.classwise = zeros(c, 3, CALIBRATION_BINS + 1)
        self._calibration_edges = curve_thresholds(CALIBRATION_BINS + 1, self.device)
        self.brier = zeros(2)  # weighted sum of squared errors of the probabilities, weight (sampled rows)
        # float32 curve weights: exact integer counts up to 2**24 per bin, half the memory of float64 at 32k classes
        self.curves = torch.zeros(k, 2, thresholds, dtype=torch.float32, device=self.device)
        self.moments = zeros(3, k)  # weight, sum p, sum p^2 (sampled)
        dense = task != "multilabel" and c <= max_confusion
        self.confusion = zeros(c if dense else 0, c if dense else 0)
        self.pairs = ConfusedPairs(c, device=self.device) if task == "multiclass" and not dense else None
        self.true_prob = FixedHistogram(0.0, 1.0, bins, device=self.device)
        self.worst = TopKWorst(worst_k, 5, device=self.device)
        self.seen = 0
        self._steps = 1
        self._generator = torch.Generator(device=self.device)
        self._generator.manual_seed(seed)

    # ---- per batch: device only ------------------------------------------------------------------------------
    def update(self, preds: Tensor, target: Tensor, *, rank: int = 0, world: int = 1, steps: int = 1) -> None:
        """Add one batch (predictions as handed over, targets as the loss takes them). No host read.

        ``steps``: how many training steps the batch joins (held steps fed at once): the budget is per step.
        """
        n = int(target.shape[0]) if target.ndim else 1
        self._steps = max(1, steps)
        if self.task == "multiclass":
            self._update_multiclass(preds.detach(), target.detach(), n, rank, world)
        elif self.task == "binary":
            self._update_binary(preds.detach(), target.detach(), n, rank, world)
        else:
            self._update_multilabel(preds.detach(), target.detach(), n, rank, world)
        self.seen += n

    def _sample(self, m: int, width: int) -> tuple[Tensor | None, int]:
        """Row positions of the budget sample (``None``: every row) and how many."""
        k = max(1, self.budget * self._steps // max(1, width))
        if k >= m:
            return None, m
        return torch.randint(0, m, (k,), device=self.device, generator=self._generator), k

    def _offer_worst(self, loss: Tensor, columns: list[Tensor], n: int, rank: int, world: int) -> None:
        """Offer the rows with the largest ``loss`` (``-inf``: never): top-k first, then only their columns are built.

        ``columns`` are ``(M,)`` tensors ``(true, predicted, probability)``; the sample index and element of each kept
        row are computed from its position. No host read.
        """
        m = loss.shape[0]
        scores, at = loss.topk(min(self.worst.k, m))
        index, element = row_index(at, self.seen, max(1, m // max(n, 1)), rank, world)
        self.worst.update(scores, torch.stack([index, element, *(c[at].double() for c in columns)], dim=1))

    def _counts(self, safe: Tensor, pred: Tensor, v: Tensor, m: int) -> None:
        c = self.num_classes
        flat = self.per_class.view(-1)
        flat.index_add_(0, safe, v)
        flat.index_add_(0, pred + c, v)
        flat.index_add_(0, safe + 2 * c, v * (pred == safe))
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
        top = x.amax(dim=d)
        pred = first_argmax(x, d, top)
        picked = x.gather(d, safe.unsqueeze(d)).squeeze(d)
        # top-k: fewer than k classes score strictly above the true one (one comparison pass over the scores)
        in_top = in_top_k(x, d, picked, self.top_k) if self.top_k else None
        if self.inputs == "logits":
            # the fused cross-entropy is -log p_true; logsumexp follows from it (a separate logsumexp costs 2-3x)
            rows = x.reshape(-1, c) if d == x.ndim - 1 else x
            loss = F.cross_entropy(rows, safe.reshape(-1) if d == x.ndim - 1 else safe, reduction="none")
            log_true = -loss.reshape(picked.shape)
            log_pred = top - (picked - log_true)
        elif self.inputs == "log_probabilities":
            log_true, log_pred = picked, top
        else:
            log_true, log_pred = picked.clamp_min(1e-12).log(), top.clamp_min(1e-12).log()
        confidence = top.float() if self.inputs == "probabilities" else log_pred.exp()  # the top-label probability
        flat = [t.reshape(-1) for t in (lab, safe, valid, pred, log_true, log_pred, confidence)]
        lab, safe, valid, pred, log_true, log_pred, confidence = flat
        m = lab.shape[0]
        v = valid.double()
        self._counts(safe, pred, v, m)
        nll = torch.where(valid, -log_true, torch.zeros_like(log_true)).double().sum()
        hits = (in_top.reshape(-1) & valid).double().sum() if in_top is not None else nll * 0
        self.ranking += torch.stack([hits, nll])
        self._calibrate(confidence, (pred == safe).double(), v)
        loss = torch.where(valid, -log_true, torch.full_like(log_true, float("-inf")))
        self._offer_worst(loss, [lab, pred, log_pred.exp()], n, rank, world)
        moved = x.movedim(d, -1)  # a view: rows are gathered from it, never copied whole
        r, k = self._sample(m, c)
        if r is None:
            sample, s_safe, s_valid = moved.reshape(-1, c), safe, valid
        else:
            sample, s_safe, s_valid = moved[_unravel(r, tuple(moved.shape[:-1]))], safe[r], valid[r]
        w = s_valid.double() * (m / k)
        probs = self._probabilities(sample, multiclass=True)
        positive = s_safe[:, None] == torch.arange(c, device=self.device)  # one_hot reads min() on the CPU
        add_curve_counts(self.curves, probs, positive, w, self.thresholds)
        add_classwise(self.classwise, probs, positive, w, self._calibration_edges)  # the sampled values: O(budget)
        self._moments(probs, w[:, None])
        p_true = probs.gather(1, s_safe[:, None]).squeeze(1)  # the histogram of the sampled rows
        squared = probs.double().square().sum(1) - 2 * p_true.double() + 1  # sum over classes of (p - onehot)^2
        self.brier += torch.stack([(w * squared).sum(), w.sum()])
        self.true_prob.update(torch.where(s_valid, p_true, torch.full_like(p_true, float("nan"))))

    def _calibrate(self, confidence: Tensor, hit: Tensor, weight: Tensor) -> None:
        """Add confidences (float), hits (0/1) and weights, all ``(M,)`` or ``(M, K)``, to the calibration bins."""
        add_calibration(self.calibration, self.calibration_fine, self._calibration_edges, confidence, hit, weight)

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
        loss = torch.where(valid, -p_true.clamp_min(1e-12).log(), torch.full_like(p_true, float("-inf")))
        self._offer_worst(loss, [safe, pred, torch.where(pred == 1, p, 1 - p)], n, rank, world)
        self._calibrate(p, safe.double(), v)  # binary: the positive-class probability against the label
        both, labels = torch.stack([1 - p, p], 1), torch.stack([1 - safe, safe], 1)
        add_classwise(self.classwise, both, labels, v, self._calibration_edges)  # classwise: both classes, every row
        self.brier += torch.stack([(v * (p.double() - safe.double()).square()).sum(), v.sum()])
        r, k = self._sample(m, 1)
        s_p, s_pos, w = (p, safe, v) if r is None else (p[r], safe[r], v[r] * (m / k))
        add_curve_counts(self.curves, s_p[:, None].contiguous(), s_pos[:, None], w, self.thresholds)
        self._moments(s_p[:, None], w[:, None])

    def _update_multilabel(self, x: Tensor, target: Tensor, n: int, rank: int, world: int) -> None:
        d = self.class_dim % x.ndim
        c = self.num_classes
        xs, ts = x.movedim(d, -1).reshape(-1, c), target.movedim(d, -1).reshape(-1, c)
        xs, ts = (xs if xs.dtype in (torch.float32, torch.float64) else xs.float()), ts.float()
        m = xs.shape[0]
        valid = (ts >= 0) & (ts <= 1)
        if self.ignore_index is not None:
            valid &= ts != self.ignore_index
        positive = (ts > 0.5) & valid
        pred = (xs > 0.0) if self.inputs == "logits" else (self._probabilities(xs, multiclass=False) > 0.5)
        predicted = pred & valid
        sums = torch.stack(
            [_count(positive, 0), _count(predicted, 0), _count(predicted & positive, 0), _count(valid, 0)]
        )
        self.per_class += sums[:3]
        self.label_rows += sums[3]
        per_row = _count(valid, 1)
        counted = (per_row > 0).sum()
        self.rows += torch.stack([counted, m - counted])
        r, k = self._sample(m, c)
        sample = xs if r is None else xs[r]
        probs = self._probabilities(sample, multiclass=False)
        s_pos, s_valid = (positive, valid) if r is None else (positive[r], valid[r])
        w = s_valid.to(torch.float64) * (m / k if r is not None else 1.0)
        add_curve_counts(self.curves, probs, s_pos, w, self.thresholds)
        self.moments += torch.stack([w.sum(0), (w * probs).sum(0), (w * probs * probs).sum(0)])
        self._calibrate(probs, s_pos.double(), w)  # each label as a binary task, on the sampled values
        add_classwise(self.classwise, probs, s_pos, w, self._calibration_edges)
        self.brier += torch.stack([(w * (probs.double() - s_pos.double()).square()).sum(), w.sum()])
        shown = max(1, _HISTOGRAM_VALUES // c)  # the probability histogram takes a few of the sampled rows
        p_true = torch.where(s_pos[:shown], probs[:shown], 1 - probs[:shown])
        self.true_prob.update(torch.where(s_valid[:shown], p_true, torch.full_like(p_true, float("nan"))))
        # worst rows: the mean binary cross-entropy of each row over its valid labels (every row)
        clean = ts.clamp(0, 1)
        if self.inputs == "logits":
            bce = F.binary_cross_entropy_with_logits(xs, clean, reduction="none")
        else:
            bce = F.binary_cross_entropy(self._probabilities(xs, multiclass=False).clamp(0, 1), clean, reduction="none")
        row_loss = bce.masked_fill_(~valid, 0.0).sum(1) / per_row.clamp_min(1)
        loss = torch.where(per_row > 0, row_loss, torch.full_like(row_loss, float("-inf")))
        self._offer_worst(loss, [_count(positive, 1), _count(predicted, 1), (-row_loss).exp()], n, rank, world)

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


__all__ = ["ClassCounts", "first_argmax", "in_top_k", "row_index"]
