"""Device state of ``ErrorDistributionMonitor`` for one stage and epoch: fixed size, mergeable across ranks.

``update`` runs every batch on the device with no host read. ``sync``, ``scalars``, ``class_counts``, ``write`` and
``refit_ranges`` run at epoch end only (host reads allowed there).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any, Protocol

import torch
from torch import Tensor
from torch.nn import functional as F  # noqa: N812

from lightning_lossdiag.callbacks._task import TaskInfo, as_rows, to_probabilities
from lightning_lossdiag.dashboards.figures import confusion_matrix_figure, pred_vs_true_figure
from lightning_lossdiag.dashboards.pr_curves import pr_thresholds, update_pr_counts, write_pr_curves
from lightning_lossdiag.dashboards.tables import worst_samples_table
from lightning_lossdiag.stats import (
    BinnedErrors,
    BoundedSample,
    FixedHistogram,
    RunningMoments,
    TopKWorst,
    histogram_raw_args,
    quantile_edges_from_sample,
)

Gather = Callable[[Tensor], Tensor]
_RESIDUAL_MARGIN = 2.0  # residual range = margin * largest |residual| seen when the range is fitted


class StageState(Protocol):
    """What the monitor needs from a stage's state."""

    device: torch.device

    def update(self, preds: Tensor, target: Tensor, *, rank: int, world: int) -> None: ...  # noqa: D102
    def sync(self, gather: Gather) -> None: ...  # noqa: D102
    def scalars(self, prefix: str) -> dict[str, Tensor]: ...  # noqa: D102
    def class_counts(self) -> list[int] | None: ...  # noqa: D102
    def write(self, writer: Any, prefix: str, step: int) -> None: ...  # noqa: D102
    def nbytes(self) -> int: ...  # noqa: D102


def tensor_bytes(obj: Any, _depth: int = 0) -> int:
    """Bytes of every tensor reachable from ``obj`` through attributes, dicts, lists and tuples."""
    if isinstance(obj, Tensor):
        return obj.numel() * obj.element_size()
    if _depth > 4:
        return 0
    if isinstance(obj, dict):
        return sum(tensor_bytes(v, _depth + 1) for v in obj.values())
    if isinstance(obj, (list, tuple)):
        return sum(tensor_bytes(v, _depth + 1) for v in obj)
    if hasattr(obj, "__dict__"):
        return sum(tensor_bytes(v, _depth + 1) for k, v in vars(obj).items() if k != "device")
    return 0


def _row_index(
    seen: int, m: int, per_sample: int, rank: int, world: int, device: torch.device
) -> tuple[Tensor, Tensor]:
    """Sample index (position in the stage's loader order; under DDP the DistributedSampler's) and element."""
    pos = torch.arange(m, device=device)
    local = seen + torch.div(pos, per_sample, rounding_mode="floor")
    return (local * world + rank).float(), (pos % per_sample).float()


def _sum_sync(t: Tensor, gather: Gather) -> None:
    t.copy_(gather(t).sum(0))


def _write_hist(writer: Any, tag: str, hist: FixedHistogram, step: int) -> None:
    args = histogram_raw_args(hist)  # epoch end: host read of the counts
    if args.get("num", 0) > 0:
        writer.add_histogram_raw(tag, global_step=step, **args)


def _class_hist_args(counts: list[int]) -> dict[str, Any]:
    """``add_histogram_raw`` arguments for class counts: one bucket per class, centred on its index."""
    present = [c for c, n in enumerate(counts) if n > 0]
    return {
        "min": float(present[0]) if present else 0.0,
        "max": float(present[-1]) if present else 0.0,
        "num": float(sum(counts)),
        "sum": float(sum(c * n for c, n in enumerate(counts))),
        "sum_squares": float(sum(c * c * n for c, n in enumerate(counts))),
        "bucket_limits": [c + 0.5 for c in range(len(counts))],
        "bucket_counts": [float(n) for n in counts],
    }


def regression_ranges(
    preds: Tensor, target: Tensor, target_bins: int, residual_range: tuple[float, float] | None, gather: Gather
) -> dict[str, Any]:
    """Histogram ranges and target-bin edges from a first batch, agreed across ranks (ONE host read, one-time).

    Every rank sends the same number of values (quantiles of its first batch's targets), so the gather lines up.
    """
    p, t = preds.detach().reshape(-1).double(), target.detach().reshape(-1).double()
    r = (p - t).abs()
    r = torch.where(torch.isfinite(r), r, torch.zeros_like(r))
    both = torch.cat([p, t])
    both = torch.where(torch.isfinite(both), both, torch.zeros_like(both))
    levels = torch.linspace(0.0, 1.0, target_bins + 1, dtype=torch.float64, device=t.device)
    quantiles = torch.nanquantile(torch.where(torch.isfinite(t), t, torch.full_like(t, float("nan"))), levels)
    facts = torch.cat([torch.stack([r.max(), -both.min(), both.max()]), quantiles])
    merged = gather(facts).reshape(-1, facts.numel())
    reduced = torch.cat([merged[:, :3].amax(0), merged[:, 3:].mean(0)])
    host = reduced.tolist()  # one-time host read: ranges of the first batch (all ranks agree)
    return _ranges_from(host[0], -host[1], host[2], host[3:], residual_range)


def _ranges_from(
    max_abs: float, low: float, high: float, edges: list[float], residual_range: tuple[float, float] | None
) -> dict[str, Any]:
    finite_ends = [v for v in (low, high) if math.isfinite(v)]
    if len(finite_ends) < 2:  # NaN/inf predictions (after a NaN step): a unit range around what is left
        centre = finite_ends[0] if finite_ends else 0.0
        low, high = centre - 1.0, centre + 1.0
    span = high - low if high > low else max(1.0, abs(high))
    v_low, v_high = low - 0.5 * span, high + 0.5 * span
    big = max_abs * _RESIDUAL_MARGIN if math.isfinite(max_abs) and max_abs > 0 else max(span, 1e-6)
    r_low, r_high = residual_range if residual_range is not None else (-big, big)
    clean = sorted({float(e) for e in edges if math.isfinite(e)})
    if len(clean) < 2:
        clean = [low, high if high > low else low + 1.0]
    clean[0], clean[-1] = min(clean[0], v_low), max(clean[-1], v_high)
    return {
        "residual": [float(r_low), float(r_high)],
        "abs": float(max(abs(r_low), abs(r_high))),
        "value": [float(v_low), float(v_high)],
        "edges": clean,
    }


class RegressionState:
    """Residual, |error|, target and prediction histograms; a bounded (target, prediction) sample; worst rows.

    ``seed`` seeds the sample's random keys: give each DDP rank its own (the monitor passes the global rank), or
    every rank keeps the rows at the same positions of its shard and the merged sample is not uniform.
    """

    def __init__(
        self,
        ranges: dict[str, Any],
        bins: int,
        sample_size: int,
        worst_k: int,
        device: torch.device,
        *,
        seed: int = 0,
    ) -> None:
        self.device = torch.device(device)
        self.ranges = ranges
        (r_low, r_high), (v_low, v_high) = ranges["residual"], ranges["value"]
        self.residual = FixedHistogram(r_low, r_high, bins, device=device)
        self.abs_error = FixedHistogram(0.0, ranges["abs"], bins, device=device)
        self.target_dist = FixedHistogram(v_low, v_high, bins, device=device)
        self.pred_dist = FixedHistogram(v_low, v_high, bins, device=device)
        self.moments = RunningMoments(device=device)
        self.sample = BoundedSample(sample_size, 2, seed=seed, device=device)
        self.worst = TopKWorst(worst_k, 4, device=device)
        self.binned = BinnedErrors(list(ranges["edges"]), device=device)  # host list: no read
        self.seen = 0

    def update(self, preds: Tensor, target: Tensor, *, rank: int, world: int) -> None:
        """Add one batch (``preds`` already aligned to ``target``); device only."""
        p, t = preds.detach().reshape(-1).float(), target.detach().reshape(-1).float()
        n = int(target.shape[0]) if target.ndim else 1
        per_sample = max(1, p.numel() // max(n, 1))
        index, element = _row_index(self.seen, p.numel(), per_sample, rank, world, self.device)
        self.seen += n
        r = p - t
        a = r.abs()
        self.residual.update(r)
        self.abs_error.update(a)
        self.target_dist.update(t)
        self.pred_dist.update(p)
        self.moments.update(p)
        self.sample.update(torch.stack([t, p], dim=1))
        self.worst.update(a, torch.stack([index, element, t, p], dim=1))
        self.binned.update(t, a)

    def _stats(self) -> list[Any]:
        return [
            self.residual,
            self.abs_error,
            self.target_dist,
            self.pred_dist,
            self.moments,
            self.sample,
            self.worst,
            self.binned,
        ]

    def sync(self, gather: Gather) -> None:
        """Merge every rank's state (collective; epoch end)."""
        for s in self._stats():
            s.sync(gather)

    def scalars(self, prefix: str) -> dict[str, Tensor]:
        """Device scalars of the epoch: prediction std, share of residuals outside the range, samples."""
        h = self.residual
        out = (h.underflow + h.overflow).double()
        return {
            f"{prefix}/constant_pred_std": self.moments.std,
            f"{prefix}/out_of_range": out / (h.counts.sum() + out).clamp_min(1),
            f"{prefix}/samples": torch.as_tensor(self.moments.count, device=self.device),
        }

    def class_counts(self) -> list[int] | None:
        """Regression has no classes."""
        return None

    def write(self, writer: Any, prefix: str, step: int) -> None:
        """Histograms, the predicted-vs-true figure and the worst table (epoch end, rank 0; host reads)."""
        for name in ("residual", "abs_error", "target_dist", "pred_dist"):
            _write_hist(writer, f"{prefix}/{name}", getattr(self, name), step)
        rows = self.sample.rows.cpu().numpy()  # epoch end: bounded sample to the host
        if rows.shape[0] > 0:
            image = pred_vs_true_figure(
                rows[:, 0],
                rows[:, 1],
                self.binned.edges.cpu().numpy(),  # epoch end host reads
                self.binned.mean_abs().cpu().numpy(),
                self.binned.count.cpu().numpy(),
            )
            writer.add_image(f"{prefix}/pred_vs_true", image, step, dataformats="HWC")
        _write_worst(writer, prefix, step, self.worst, classes=False)

    def refit_ranges(self, target_bins: int) -> dict[str, Any]:
        """Ranges for the next epoch from this epoch's merged sample (epoch end; one host read)."""
        rows = self.sample.rows
        rows = rows[torch.isfinite(rows).all(dim=1)]  # epoch end: boolean mask on the host-bound sample is fine
        if rows.shape[0] < 2:
            return self.ranges
        t, p = rows[:, 0], rows[:, 1]
        edges = quantile_edges_from_sample(t, target_bins).to(rows.dtype).reshape(-1)
        both = torch.cat([t, p])
        facts = torch.cat([torch.stack([(p - t).abs().max(), both.min(), both.max()]), edges])
        host = facts.tolist()  # epoch end: next epoch's ranges
        return _ranges_from(host[0], host[1], host[2], host[3:], None)

    def nbytes(self) -> int:
        """Bytes of device state."""
        return tensor_bytes(self._stats())


def _write_worst(writer: Any, prefix: str, step: int, worst: TopKWorst, *, classes: bool) -> None:
    scores, rows = worst.scores.cpu(), worst.rows.cpu()  # epoch end: top-k rows to the host
    keep = torch.isfinite(scores).tolist()  # host list (epoch end)
    data = [(float(s), r.tolist()) for s, r, k in zip(scores, rows, keep, strict=True) if k]
    if not data:
        return
    many = any(r[1] > 0 for _, r in data)
    if classes:
        targets: list[object] = [int(r[2]) for _, r in data]
        predictions: list[object] = [f"{int(r[3])} (p={r[4]:.3g})" for _, r in data]
    else:
        targets = [r[2] for _, r in data]
        predictions = [r[3] for _, r in data]
    table = worst_samples_table(
        [r[0] for _, r in data],
        targets,
        predictions,
        [s for s, _ in data],
        element=[r[1] for _, r in data] if many else None,
    )
    writer.add_text(f"{prefix}/worst", table, step)


class ClassificationState:
    """Confusion counts, binned PR counts, true-class probability histogram, probability moments, worst rows."""

    def __init__(self, info: TaskInfo, bins: int, thresholds: int, worst_k: int, device: torch.device) -> None:
        self.device = torch.device(device)
        self.info = info
        c = int(info.num_classes or 2)
        self.num_classes = c
        curves = 1 if info.task == "binary" else c
        self.confusion = torch.zeros(c, c, dtype=torch.long, device=device)  # multilabel: positives, predicted
        self.pos = torch.zeros(curves, thresholds, dtype=torch.long, device=device)
        self.neg = torch.zeros(curves, thresholds, dtype=torch.long, device=device)
        self.thresholds = pr_thresholds(thresholds, device)
        self.true_prob = FixedHistogram(0.0, 1.0, bins, device=device)
        self.moments = torch.zeros(3, curves, dtype=torch.float64, device=device)  # count, sum, sum of squares
        self.worst = TopKWorst(worst_k, 5, device=device)
        self.seen = 0

    def update(self, preds: Tensor, target: Tensor, *, rank: int, world: int) -> None:
        """Add one batch; device only (no boolean-mask indexing: invalid labels get weight 0)."""
        values, labels, per_sample = as_rows(to_probabilities(preds.detach(), self.info), target.detach(), self.info)
        n = int(target.shape[0]) if target.ndim else 1
        index, element = _row_index(self.seen, values.shape[0], per_sample, rank, world, self.device)
        self.seen += n
        c = self.num_classes
        if self.info.task == "multilabel":
            positive = labels.clamp(0, 1)
            pred = (values > 0.5).long()
            self.confusion[0] += positive.long().sum(0)
            self.confusion[1] += pred.sum(0)
            update_pr_counts(self.pos, self.neg, values, positive, self.thresholds)
            p_true = torch.where(positive > 0, values, 1 - values).reshape(-1)
            lab_flat, pred_flat, prob_flat = positive.reshape(-1), pred.reshape(-1).float(), values.reshape(-1)
            elem = (element[:, None] * c + torch.arange(c, device=self.device)).reshape(-1)
            idx = index[:, None].expand(-1, c).reshape(-1)
            valid = torch.ones_like(p_true, dtype=torch.bool)
        else:
            if self.info.task == "binary":
                p1 = values[:, 0]
                probs2 = torch.stack([1 - p1, p1], dim=1)
                lab = labels[:, 0].round().long()
            else:
                probs2, lab = values, labels
            valid = (lab >= 0) & (lab < c)
            safe = lab.clamp(0, c - 1)
            pred_cls = probs2.argmax(dim=1) if self.info.task == "multiclass" else (probs2[:, 1] > 0.5).long()
            self.confusion.view(-1).index_add_(0, safe * c + pred_cls, valid.long())
            curve_p = values if self.info.task == "multiclass" else values[:, :1]
            curve_pos = F.one_hot(safe, c) if self.info.task == "multiclass" else safe[:, None]
            curve_p = torch.where(valid[:, None], curve_p, torch.full_like(curve_p, -1.0))  # -1: never counted
            update_pr_counts(self.pos, self.neg, curve_p, curve_pos, self.thresholds)
            p_true = probs2.gather(1, safe[:, None]).squeeze(1)
            lab_flat, pred_flat, prob_flat = safe.float(), pred_cls.float(), probs2.gather(1, pred_cls[:, None])[:, 0]
            idx, elem = index, element
        self.true_prob.update(torch.where(valid, p_true, torch.full_like(p_true, float("nan"))))
        w = valid.reshape(values.shape[0], -1)[:, :1].double()
        v = values.double()
        self.moments += torch.stack([w.expand_as(v).sum(0), (v * w).sum(0), (v * v * w).sum(0)])
        loss = -torch.log(p_true.clamp_min(1e-12))
        loss = torch.where(valid, loss, torch.full_like(loss, float("-inf")))
        self.worst.update(loss, torch.stack([idx, elem, lab_flat, pred_flat, prob_flat], dim=1))

    def sync(self, gather: Gather) -> None:
        """Merge every rank's state (collective; epoch end)."""
        for t in (self.confusion, self.pos, self.neg, self.moments):
            _sum_sync(t, gather)
        self.true_prob.sync(gather)
        self.worst.sync(gather)

    def scalars(self, prefix: str) -> dict[str, Tensor]:
        """Mean per-class std of the probabilities, majority-class prediction share, out-of-range share, samples."""
        count, total, squares = self.moments
        mean = total / count.clamp_min(1)
        std = (squares / count.clamp_min(1) - mean * mean).clamp_min(0).sqrt().mean()
        h = self.true_prob
        out = {f"{prefix}/constant_pred_std": std, f"{prefix}/samples": count[0]}
        out[f"{prefix}/out_of_range"] = (h.underflow + h.overflow).double() / (h.counts.sum() + 1e-300).clamp_min(1)
        if self.info.task != "multilabel":
            true_counts, pred_counts = self.confusion.sum(1), self.confusion.sum(0)
            share = pred_counts[true_counts.argmax()].double() / pred_counts.sum().clamp_min(1)
            out[f"{prefix}/majority_pred_share"] = share
        return out

    def class_counts(self) -> list[int]:
        """True class counts (multilabel: positives per label); epoch end host read."""
        counts = self.confusion[0] if self.info.task == "multilabel" else self.confusion.sum(1)
        return [int(x) for x in counts.tolist()]  # epoch end host read

    def write(self, writer: Any, prefix: str, step: int) -> None:
        """Confusion image, PR curves, histograms and the worst table (epoch end, rank 0; host reads)."""
        conf = self.confusion.cpu().numpy()  # epoch end host read
        if self.info.task == "multilabel":
            true_counts, pred_counts = conf[0].tolist(), conf[1].tolist()
        else:
            true_counts, pred_counts = conf.sum(1).tolist(), conf.sum(0).tolist()
            writer.add_image(f"{prefix}/confusion_matrix", confusion_matrix_figure(conf), step, dataformats="HWC")
        names = ["1"] if self.info.task == "binary" else [str(c) for c in range(self.pos.shape[0])]
        write_pr_curves(writer, f"{prefix}/pr_curve", self.pos.cpu().numpy(), self.neg.cpu().numpy(), names, step)
        _write_hist(writer, f"{prefix}/true_class_prob", self.true_prob, step)
        if sum(true_counts) > 0:
            writer.add_histogram_raw(f"{prefix}/target_dist", global_step=step, **_class_hist_args(true_counts))
        if sum(pred_counts) > 0:
            writer.add_histogram_raw(f"{prefix}/pred_dist", global_step=step, **_class_hist_args(pred_counts))
        _write_worst(writer, prefix, step, self.worst, classes=True)

    def nbytes(self) -> int:
        """Bytes of device state."""
        return tensor_bytes([self.confusion, self.pos, self.neg, self.moments, self.true_prob, self.worst])


__all__ = ["ClassificationState", "RegressionState", "StageState", "regression_ranges", "tensor_bytes"]
