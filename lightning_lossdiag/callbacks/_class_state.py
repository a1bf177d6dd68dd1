"""``ErrorDistributionMonitor``'s view of a classification slot: reads the shared engine, writes the epoch's events.

The counting lives in the slot's :class:`~lightning_lossdiag.callbacks._class_engine.Engine` (shared with
``MetricCurves``); this state only hands steps to it and, at epoch end, turns the merged counts into scalars and
TensorBoard events through :mod:`lightning_lossdiag.dashboards.class_views`.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from torch import Tensor

from lightning_lossdiag.callbacks._class_engine import Engine
from lightning_lossdiag.callbacks._error_states import write_worst
from lightning_lossdiag.dashboards.class_views import ClassSummary, write_class_views
from lightning_lossdiag.dashboards.figures import reliability_figure
from lightning_lossdiag.stats import histogram_raw_args
from lightning_lossdiag.stats.classification import ClassCounts

Gather = Any
_MAX_DIST_BUCKETS = 128  # class-index histograms of more classes are re-binned to this many buckets
_PAIRS_KEPT = 50


def class_hist_args(counts: list[float]) -> dict[str, Any]:
    """``add_histogram_raw`` arguments for counts per class index (one bucket per class up to 128 classes, else 128).

    Example:
        >>> args = class_hist_args([3, 0, 1])
        >>> args["bucket_limits"], args["bucket_counts"], args["num"]
        ([0.5, 1.5, 2.5], [3.0, 0.0, 1.0], 4.0)
        >>> len(class_hist_args([1] * 1000)["bucket_limits"])
        128
    """
    values = np.asarray(counts, dtype=np.float64)
    index = np.arange(values.shape[0], dtype=np.float64)
    present = np.nonzero(values > 0)[0]
    if values.shape[0] <= _MAX_DIST_BUCKETS:
        limits, buckets = index + 0.5, values.astype(np.float64)
    else:
        edges = np.linspace(0, values.shape[0], _MAX_DIST_BUCKETS + 1)
        which = np.minimum(np.searchsorted(edges, index, side="right") - 1, _MAX_DIST_BUCKETS - 1)
        buckets = np.bincount(which, weights=values, minlength=_MAX_DIST_BUCKETS).astype(np.float64)
        limits = edges[1:] - 0.5
    return {
        "min": float(present[0]) if present.size else 0.0,
        "max": float(present[-1]) if present.size else 0.0,
        "num": float(values.sum()),
        "sum": float((index * values).sum()),
        "sum_squares": float((index * index * values).sum()),
        "bucket_limits": [float(v) for v in limits],
        "bucket_counts": [float(v) for v in buckets],
    }


def summary_of(view: ClassCounts, max_pairs: int = _PAIRS_KEPT) -> ClassSummary:
    """Host copy of the merged counts as a :class:`ClassSummary` (epoch end: a few host reads of bounded size)."""
    per_class = view.per_class.cpu().numpy()  # epoch end: (3, C) counts to the host
    curves = view.curves.cpu().numpy()  # epoch end: (K, 2, T) float32 (exact counts; read in float64 per block)
    confusion = view.confusion.cpu().numpy() if view.confusion.numel() else None  # epoch end
    pairs = view.pairs.top(max_pairs) if view.pairs is not None else None  # epoch end
    return ClassSummary(
        task=view.task,
        support=per_class[0],
        predicted=per_class[1],
        correct=per_class[2],
        pos=curves[:, 1],
        neg=curves[:, 0],
        confusion=confusion,
        pairs=pairs,
    )


class ClassificationState:
    """One epoch of a classification slot as ``ErrorDistributionMonitor`` sees it (the counts are the engine's)."""

    def __init__(self, engine: Engine, *, max_classes: int = 32, worst_classes: int = 10) -> None:
        self.engine = engine
        self.device = engine.counts.device
        self.max_classes = max_classes
        self.worst_classes = worst_classes
        self.view: ClassCounts | None = None

    def update(self, preds: Tensor, target: Tensor, *, rank: int, world: int) -> None:
        """Hand one step to the engine (references; counted once per step whatever reads it)."""
        self.engine.add(preds, target)

    def sync(self, gather: Gather) -> None:
        """Take the merged counts of every rank (collective; epoch end)."""
        self.view = self.engine.view(gather)

    def _view(self) -> ClassCounts:
        return self.view if self.view is not None else self.engine.view(None)

    def finish(self) -> None:
        """The epoch is written: the engine starts fresh counts at the next step (the merged view is let go)."""
        self.engine.finish()
        self.view = None

    def scalars(self, prefix: str) -> dict[str, Tensor]:
        """Mean per-class std of the probabilities, majority-class prediction share, out-of-range share, samples."""
        v = self._view()
        weight, total, squares = v.moments
        mean = total / weight.clamp_min(1e-300)
        std = (squares / weight.clamp_min(1e-300) - mean * mean).clamp_min(0).sqrt().mean()
        h = v.true_prob
        out = {f"{prefix}/constant_pred_std": std, f"{prefix}/samples": v.rows[0]}
        out[f"{prefix}/out_of_range"] = (h.underflow + h.overflow).double() / h.counts.sum().clamp_min(1)
        if v.task != "multilabel":
            support, predicted = v.per_class[0], v.per_class[1]
            out[f"{prefix}/majority_pred_share"] = predicted[support.argmax()] / predicted.sum().clamp_min(1)
        return out

    def class_counts(self) -> list[int]:
        """True class counts (multilabel: positives per label); epoch end host read."""
        return [int(x) for x in self._view().per_class[0].round().tolist()]  # epoch end host read

    def class_recall(self) -> list[float]:
        """Recall of each class (correct over support; NaN for a class without samples); epoch end host read."""
        support, _, correct = self._view().per_class[:3]
        recall = torch.where(support > 0, correct / support.clamp_min(1), float("nan"))
        return [float(x) for x in recall.tolist()]  # epoch end host read

    def write(self, writer: Any, prefix: str, step: int) -> None:
        """Class views, probability histogram, class distributions and the worst rows (epoch end, rank 0)."""
        v = self._view()
        summary = summary_of(v)
        write_class_views(writer, prefix, step, summary, max_classes=self.max_classes, k=self.worst_classes)
        bins = v.calibration.cpu().numpy()  # epoch end: (3, 16) calibration bins
        if float(bins[0].sum()) > 0:
            image = reliability_figure(bins[0], bins[1], bins[2], title=prefix.split("/", 1)[-1])
            writer.add_image(f"{prefix}/reliability", image, step, dataformats="HWC")
        args = histogram_raw_args(v.true_prob)  # epoch end: host read of the counts
        if args.get("num", 0) > 0:
            writer.add_histogram_raw(f"{prefix}/true_class_prob", global_step=step, **args)
        for name, counts in (("target_dist", summary.support), ("pred_dist", summary.predicted)):
            if float(counts.sum()) > 0:
                writer.add_histogram_raw(f"{prefix}/{name}", global_step=step, **class_hist_args(counts.tolist()))
        write_worst(writer, prefix, step, v.worst, kind="labels" if v.task == "multilabel" else "classes")

    def nbytes(self) -> int:
        """Bytes of device state of the slot's counts."""
        return self.engine.counts.nbytes()


__all__ = ["ClassificationState", "class_hist_args", "summary_of"]
