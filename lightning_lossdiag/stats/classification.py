"""One stage's classification counts on the device: one pass over a batch feeds the error views and the metrics.

What each update costs (``M`` rows: samples, pixels or tokens; ``C`` classes or labels; ``T`` thresholds):

* every row, from one pass for the maximum (chunk maxima over a long last dim) and one log-softmax (the fused
  cross-entropy, whose output is ``-log p_true``; the top-label log-probability follows from it): per-class support,
  predicted and correct counts, the top-k hits and the negative log-likelihood, the top-label calibration bins, the
  confusion matrix (``C <= max_confusion``) or the most confused pairs (:class:`ConfusedPairs`), the loss of each
  row and the worst rows (multilabel: every value, for the per-label counts and each row's loss);
* a bounded budget of values (``budget`` values of ``rows x classes``: a uniform sample of
  ``k = max(1, budget // C)`` rows, drawn with replacement by a generator of its own, each weighing ``M / k``, so the
  counts stay unbiased): the binned PR/ROC counts (one bin lookup per value: ``O(k C)``, never ``x T``), the
  probability moments, the Brier score, the classwise calibration bins and the true-class probability histogram
  (multilabel: also the calibration bins). When ``M * C <= budget`` every row is used and the curves are exact.

Few kernels per update, whatever the task. With ``hold=N`` (the class engine holds 16) the second half of an update,
what adds the per-row values and the budget sample to the state, runs once for N updates
(:mod:`~lightning_lossdiag.stats.pending`): the same counts, a fraction of the ops per update. The float64 states
are views into one flat tensor, so the small sums of a batch (rows, NLL, top-k hits, moments, Brier score,
histogram) land in one ``index_add_``; the counts of a row go in
with one ``index_add_`` per state (several statistics in one where they share an index); a state that is a sum of
another (the multilabel and binary top-label bins are classwise bins summed) is taken from it. Bins are found by
arithmetic and a lookup on the CPU (int32 positions) and by one ``bucketize`` elsewhere
(:data:`~lightning_lossdiag.stats.curves.LOOKUP_DEVICES`), the same bins either way; the CPU writes its full-size
comparisons as 0/1 floats (a quarter of the cost of a bool mask there); bf16/fp16 logits are read once by a float32
log-softmax off the CPU.

State: ``3 x C`` counts, ``K x 2 x T`` curve weights (``K = 1`` for binary), ``C x 3 x 16`` classwise calibration
bins, fixed top-label calibration bins (15 and 1,024, see :mod:`~lightning_lossdiag.stats.calibration`), a
``C x C`` confusion only up to ``max_confusion`` classes, else a fixed-size pair sketch: at most
``classes x thresholds`` whatever the data.
Targets outside ``[0, C)`` (multiclass) or ``[0, 1]`` (binary, multilabel), and ``ignore_index``, weigh 0 in every
statistic: ``-100`` tokens and ``255`` void pixels are left out without a boolean mask. No update reads the host.

This module holds the state and what the tasks share (sampling, the worst rows, curve, classwise and histogram
adders, the merge); each task's update is in its own module: :mod:`~lightning_lossdiag.stats.multiclass_counts`,
:mod:`~lightning_lossdiag.stats.label_counts` and :mod:`~lightning_lossdiag.stats.binary_counts`.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor

from lightning_lossdiag.stats.binary_counts import update_binary
from lightning_lossdiag.stats.calibration import FINE_BINS
from lightning_lossdiag.stats.curves import by_lookup, curve_thresholds, threshold_bins, threshold_window
from lightning_lossdiag.stats.distributed import GatherFn
from lightning_lossdiag.stats.histogram import FixedHistogram, stage_values, staged_histogram, staged_slots
from lightning_lossdiag.stats.label_counts import settle_multilabel, update_multilabel
from lightning_lossdiag.stats.multiclass_counts import settle_multiclass, update_multiclass
from lightning_lossdiag.stats.pairs import ConfusedPairs
from lightning_lossdiag.stats.pending import Pending
from lightning_lossdiag.stats.row_ops import (
    ARGMAX_CHUNK,
    Workspace,
    descending_weights,
    first_argmax,
    in_top_k,
    row_index,
)
from lightning_lossdiag.stats.topk import TopKWorst

_TASKS = ("binary", "multiclass", "multilabel")
_INPUTS = ("logits", "probabilities", "log_probabilities")
_CALIBRATION = ("calibration", "calibration_fine", "classwise", "brier")  # top-label, fine, classwise bins; Brier
_TENSORS = ("per_class", "label_rows", "rows", "curves", "moments", "confusion", "ranking", *_CALIBRATION, "prob_hist")
# the float64 states, views in this order into one flat tensor (one index_add_ reaches any of them); per_class and
# label_rows, rows and ranking, moments and brier are neighbours so one slice takes both
_STORE = (
    "per_class",
    "label_rows",
    "rows",
    "ranking",
    "calibration",
    "calibration_fine",
    "classwise",
    "moments",
    "brier",
    "prob_hist",
    "confusion",
)
_Column = Tensor | Callable[[Tensor], Tensor]  # a worst-rows column, or what builds it for the kept rows
CALIBRATION_BINS = 15  # equal-width confidence bins of the calibration error (Guo et al. 2017; torchmetrics' default)
TOP_K = 5  # top-k accuracy is counted from this many classes on (k = 5 when there are at least 10 classes)


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
        views: also count what only the error views read: the confusion (or the confused pairs), the worst rows
            (multilabel: the loss of every row) and the true-class probability histogram. ``False`` for counts that
            only feed metrics: about a third fewer ops per update, the same metric values.
        hold: multiclass and multilabel updates held before their per-row sums and budget samples are added to
            the state at once (:class:`~lightning_lossdiag.stats.pending.Pending`: fixed buffers, the same counts,
            a fraction of the ops per update). ``1``: every update is added at once. Held updates are added by
            :meth:`settle`, which :meth:`merged` calls; read the state after it.

    Example:
        >>> counts = ClassCounts("multiclass", "logits", 3, thresholds=11)
        >>> logits = torch.tensor([[2.0, 0.0, 0.0], [0.0, 3.0, 0.0], [0.0, 0.0, 1.0]])  # example, off the hot path
        >>> labels = torch.tensor([0, 2, -100])  # example input, off the hot path
        >>> counts.update(logits, labels)
        >>> counts.per_class.tolist()  # example read: support, predicted, correct per class (-100 row left out)
        [[1.0, 0.0, 1.0], [1.0, 1.0, 0.0], [1.0, 0.0, 0.0]]
    """

    # float64 states: views into one flat tensor (see __init__)
    per_class: Tensor
    label_rows: Tensor
    rows: Tensor
    ranking: Tensor
    calibration: Tensor
    calibration_fine: Tensor
    classwise: Tensor
    moments: Tensor
    brier: Tensor
    prob_hist: Tensor
    confusion: Tensor

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
        views: bool = True,
        hold: int = 1,
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
        b = CALIBRATION_BINS + 1
        self.views = views  # the error views' statistics: confusion or pairs, worst rows, probability histogram
        dense = views and task != "multilabel" and c <= max_confusion
        self.thresholds = curve_thresholds(thresholds, self.device)
        self._calibration_edges = curve_thresholds(b, self.device)
        self._windows = (threshold_window(self.thresholds), threshold_window(self._calibration_edges))
        self.top_k = TOP_K if task == "multiclass" and num_classes >= 2 * TOP_K else 0
        # Every float64 state is a view into one flat tensor (plus one trash slot at its end), so one index_add_
        # adds a batch's sums to several states and one collective merges them all; layout in the order of _STORE.
        #   per_class: support, predicted, correct per class; label_rows: multilabel, valid values per label
        #   rows: rows counted, rows left out; ranking: multiclass, rows whose true class is among the TOP_K highest
        #     scores, and the sum of -log p(true class)
        #   calibration: per confidence bin (torchmetrics' bins: edges linspace(0, 1, 16), 1.0 in a bin of its own) the
        #     weight, the sum of confidences and the sum of hits; top-label confidence for multiclass (every row), the
        #     positive-class probability for binary (every row) and multilabel (the sampled values)
        #   calibration_fine: the same sums in 1,024 fine bins (the equal-mass ECE)
        #   classwise: p_c against 1[y = c] for every class (binary: 1 - p and p; multilabel: each label), same bins
        #   moments: weight, sum p, sum p^2 (sampled); brier: weighted sum of squared errors of the probabilities and
        #     the weight (sampled rows; binary: every row); prob_hist: the true-class probability histogram (see
        #     true_prob); confusion: C x C up to max_confusion classes
        shapes = {
            "per_class": (3, c),
            "label_rows": (c,),
            "rows": (2,),
            "ranking": (2,),
            "calibration": (3, b),
            "calibration_fine": (3, FINE_BINS),
            "classwise": (c, 3, b),
            "moments": (3, k),
            "brier": (2,),
            "prob_hist": (bins + 6,),
            "confusion": (c, c) if dense else (0, 0),
        }
        sizes = [math.prod(shapes[name]) for name in _STORE]
        self._store = torch.zeros(sum(sizes) + 1, dtype=torch.float64, device=self.device)
        self._at: dict[str, int] = {}
        start = 0
        for name, size in zip(_STORE, sizes, strict=True):
            self._at[name] = start
            setattr(self, name, self._store[start : start + size].view(shapes[name]))
            start += size
        self._trash = start
        # float32 curve weights: exact integer counts up to 2**24 per bin, half the memory of float64 at 32k classes
        self.curves = torch.zeros(k, 2, thresholds, dtype=torch.float32, device=self.device)
        many = views and task == "multiclass" and c > max_confusion
        self.pairs = ConfusedPairs(c, device=self.device) if many else None
        self._bins = bins
        self._prob_range = torch.full((2,), float("inf"), dtype=torch.float64, device=self.device)  # min, -max
        self.worst = TopKWorst(worst_k, 5, device=self.device)
        self.seen = 0
        self._steps = 1
        self._generator = torch.Generator(device=self.device)
        self._generator.manual_seed(seed)
        self._index = self._index_tables(c, k, b, thresholds)
        self._zero = torch.zeros(1, 1, dtype=torch.float64, device=self.device)  # promotes row values to float64
        self._work = Workspace(self.device)  # an update's full-size temporaries, kept (see row_ops.Workspace)
        self._pending = Pending(hold, self.device) if hold > 1 and task != "binary" else None

    def _index_tables(self, c: int, k: int, b: int, t: int) -> dict[str, Tensor]:
        """Constant device index tables of the updates (built once, on the device: no host-to-device copy)."""
        at, dev, hist = self._at, self.device, self._at["prob_hist"] + self._bins

        def positions(*values: int) -> Tensor:
            out = torch.empty(len(values), dtype=torch.long, device=dev)
            for i, value in enumerate(values):
                out[i : i + 1].fill_(value)
            return out

        rows, ranking = at["rows"], at["ranking"]
        bins = torch.int32 if by_lookup(self._store) else torch.long  # the dtype of the bins (int32 on the CPU)
        return {
            # the row sums (multiclass): rows counted, (confidences and hits: trash), -log p(true class), top-k hits
            "row_sums": positions(rows, self._trash, self._trash, ranking + 1, ranking),
            "left_out": positions(rows + 1),
            "rows": positions(rows, rows + 1),
            "moments": torch.arange(at["moments"], at["moments"] + 3 * k + 2, device=dev),  # then brier
            "hist_bounds": staged_slots(self._bins, dev),
            "hist_sums": positions(hist + 4, hist + 5),
            "classes": torch.arange(c, device=dev),
            "curve_base": (torch.arange(k, device=dev)[None, :] * (2 * t)).to(bins),
            "classwise": (torch.arange(c, device=dev) * (3 * b) + at["classwise"]).to(bins),  # each class's first bin
            "descending": descending_weights(c, 3, 1, dev, exact=by_lookup(self._store)),  # float: CPU compare
            "chunk": torch.arange(ARGMAX_CHUNK, device=dev),
        }

    # ---- per batch: device only ------------------------------------------------------------------------------
    def update(self, preds: Tensor, target: Tensor, *, rank: int = 0, world: int = 1, steps: int = 1) -> None:
        """Add one batch (predictions as handed over, targets as the loss takes them). No host read.

        ``steps``: how many training steps the batch joins (held steps fed at once): the budget is per step.
        """
        n = int(target.shape[0]) if target.ndim else 1
        self._steps = max(1, steps)
        if self.task == "multiclass":
            update_multiclass(self, preds.detach(), target.detach(), n, rank, world)
        elif self.task == "binary":
            update_binary(self, preds.detach(), target.detach(), n, rank, world)
        else:
            update_multilabel(self, preds.detach(), target.detach(), n, rank, world)
        self.seen += n

    def settle(self) -> None:
        """Add the held updates to the state (see ``hold``); a no-op when nothing is held. No host read."""
        held = self._pending
        if held is None or not held.updates:
            return
        (settle_multiclass if self.task == "multiclass" else settle_multilabel)(self, held)

    def _sample(self, m: int, width: int) -> tuple[Tensor | None, int]:
        """Row positions of the budget sample (``None``: every row) and how many."""
        k = self._sample_size(m, width)
        return self._sample_rows(m, k), k

    def _sample_size(self, m: int, width: int) -> int:
        """Rows in the budget sample of ``m`` rows of ``width`` values (``m``: every row)."""
        return min(m, max(1, self.budget * self._steps // max(1, width)))

    def _sample_rows(self, m: int, k: int) -> Tensor | None:
        """``k`` uniform row positions drawn with replacement (``None`` when ``k == m``: every row, no draw)."""
        return None if k >= m else torch.randint(0, m, (k,), device=self.device, generator=self._generator)

    def _offer_worst(
        self, loss: Tensor, columns: Sequence[_Column], n: int, rank: int, world: int, start: int = 0, total: int = 0
    ) -> None:
        """Offer the rows with the largest ``loss`` (``-inf``: never): top-k first, then only their columns are built.

        ``columns`` are ``(M,)`` tensors ``(true, predicted, probability)`` or callables building those columns for the
        kept rows ``at``; the sample index and element of each kept row are computed from its position (``start``:
        where these rows begin among the ``total`` rows of the update, when they are a piece of it). No host read.
        """
        scores, at = loss.topk(min(self.worst.k, loss.shape[0]))
        per_sample = max(1, max(total, loss.shape[0]) // max(n, 1))
        index, element = row_index(at if start == 0 else at + start, self.seen, per_sample, rank, world)
        kept = [col(at) if callable(col) else col[at] for col in columns]
        self.worst.update(scores, torch.stack([index, element, *kept], dim=1))  # float64, as the index is

    def _labels(self, lab: Tensor) -> tuple[Tensor, Tensor]:
        """``(safe, valid)``: labels clamped into ``[0, C)`` (rows left out keep a harmless class) and the rows kept."""
        safe = lab.clamp(0, self.num_classes - 1)
        valid = safe == lab
        if self.ignore_index is not None and 0 <= self.ignore_index < self.num_classes:
            valid &= lab != self.ignore_index
        return safe, valid

    def _add_classwise(self, j: Tensor, sums: Sequence[Tensor], hits: tuple[Tensor, Tensor] | None = None) -> None:
        """Add ``(k, C)`` weight, probability and hit sums to the classwise bins ``j`` (``(k, C)``, changed in place).

        One index for the three sums (each ``index_add_`` goes through a view of the store shifted by a bin row).
        ``hits``: ``(true class, weight)`` of each of the ``k`` rows instead of a ``(k, C)`` hit sum, when a row has
        one hit (multiclass): ``k`` values added, not ``k x C``.
        """
        at = j.add_(self._index["classwise"])  # the weight slot of each value's class and bin
        b = CALIBRATION_BINS + 1
        for row, values in enumerate(sums):
            self._store[row * b :].index_add_(0, at.view(-1), values.reshape(-1))
        if hits is not None:
            true, weight = hits
            self._store[2 * b :].index_add_(0, at.gather(1, true[:, None]).squeeze(1), weight)

    def _add_probs(self, p: Tensor, index: list[Tensor], parts: list[Tensor]) -> None:
        """Count ``(n,)`` probabilities (NaN: a row left out) in the true-class histogram (:attr:`true_prob`).

        One ``bucketize`` over slots ``[-inf | under | bins | over | +inf and NaN]`` gives each value its count's
        position; the counts and the sums of the finite values are appended to ``index``/``parts`` (the store's
        update), the minimum and maximum kept apart. No host read.
        """
        offset, sums = self._at["prob_hist"], self._index["hist_sums"]
        added = stage_values(p, self._index["hist_bounds"], offset, sums, self._prob_range)
        if added is not None:
            index += added[0]
            parts += added[1]

    @property
    def true_prob(self) -> FixedHistogram:
        """The histogram of the probability of the true class (multilabel: of each shown value's label).

        ``bins`` bins over ``[0, 1]`` with :class:`~lightning_lossdiag.stats.histogram.FixedHistogram`'s conventions
        (NaN: rows left out), built from the device counts at each access (epoch end).
        """
        return staged_histogram(self.prob_hist, self._bins, self._prob_range)

    def _add_curves(self, probs: Tensor, positive: Tensor, w: Tensor) -> None:
        """Binned curve weights of ``(k, K)`` sampled probabilities (``w``: ``(k,)`` or ``(k, K)``).

        ``positive``: a ``(k, K)`` 0/1 mask, or the ``(k,)`` true class of each row (one positive a row: ``k``
        values moved to the positive curve instead of a ``k x K`` pass). As in
        :func:`~lightning_lossdiag.stats.curves.add_curve_counts`, values below the first threshold weigh 0.
        """
        t = self.thresholds.shape[0]
        w = (w[:, None] if w.ndim == 1 else w).float()
        if by_lookup(probs):  # int32 bins; the weight by a comparison written as floats (a bool one costs 4x here)
            j = threshold_bins(probs, self.thresholds, self._windows[0])
            weight = torch.ge(j, 0, out=torch.empty(j.shape, device=j.device)).mul_(w)
            at = j.clamp_min_(0)
        else:  # one search over t_1..t_{T-1}: the bin, 0 below t_1 (below t_0 the weight is 0)
            q = torch.nan_to_num(probs, nan=-1.0)
            weight, at = torch.where(q >= 0, w, 0.0), torch.bucketize(q, self.thresholds[1:], right=True)
        if positive.ndim == 1:  # the true class of each row
            moved = torch.full((at.shape[0], 1), t, dtype=at.dtype, device=at.device)
            at.scatter_add_(1, positive[:, None], moved)
        else:
            at.add_(positive.to(at.dtype), alpha=t)
        at = at.add_(self._index["curve_base"])
        self.curves.view(-1).index_add_(0, at.view(-1), weight.view(-1))

    def _probabilities(self, x: Tensor, *, multiclass: bool) -> Tensor:
        x = x.float()
        if self.inputs == "logits":
            return x.softmax(dim=-1) if multiclass else x.sigmoid()
        return x.exp() if self.inputs == "log_probabilities" else x

    # ---- epoch end (host reads allowed) ----------------------------------------------------------------------
    def merged(self, gather: GatherFn | None = None, world: int = 1) -> ClassCounts:
        """A copy holding the merge of every rank's counts (a collective when ``world > 1``); ``self`` is untouched."""
        self.settle()
        out = copy.copy(self)
        if world <= 1 or gather is None:
            return out
        out._store = gather(self._store).reshape(-1, self._store.shape[0]).sum(0)  # every float64 state at once
        for name in _STORE:
            view = getattr(self, name)
            setattr(out, name, out._store[self._at[name] : self._at[name] + view.numel()].view(view.shape))
        out.curves = gather(self.curves).reshape(-1, *self.curves.shape).sum(0)
        out._prob_range = gather(self._prob_range).reshape(-1, 2).amin(0)
        for name in ("worst", "pairs"):
            stat = getattr(self, name)
            if stat is not None:
                clone = copy.deepcopy(stat)
                clone.sync(gather)
                setattr(out, name, clone)
        return out

    @property
    def scratch_bytes(self) -> int:
        """Bytes of the scratch buffers kept between updates (one piece of an update's temporaries, held updates)."""
        return self._work.nbytes + (self._pending.nbytes if self._pending is not None else 0)

    def nbytes(self) -> int:
        """Bytes of device state (fixed at construction)."""
        total = sum(getattr(self, n).numel() * getattr(self, n).element_size() for n in (*_TENSORS, "_prob_range"))
        stats: list[Any] = [self.worst, self.pairs]
        return total + sum(s.state_bytes() for s in stats if s is not None)


__all__ = ["ClassCounts", "first_argmax", "in_top_k", "row_index"]
