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

from lightning_lossdiag.dashboards.figures import pred_vs_true_figure
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
from lightning_lossdiag.stats.classification import row_index

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


def _write_hist(writer: Any, tag: str, hist: FixedHistogram, step: int) -> None:
    args = histogram_raw_args(hist)  # epoch end: host read of the counts
    if args.get("num", 0) > 0:
        writer.add_histogram_raw(tag, global_step=step, **args)


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
        pos = torch.arange(p.numel(), device=self.device)
        index, element = (c.float() for c in row_index(pos, self.seen, per_sample, rank, world))
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
        write_worst(writer, prefix, step, self.worst)

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


def write_worst(writer: Any, prefix: str, step: int, worst: TopKWorst, *, kind: str = "values") -> None:
    """The worst rows as the text ``<prefix>/worst`` (epoch end, rank 0; host reads).

    Rows are ``(sample, element, true, predicted, ...)``: ``kind="values"`` (regression: the values),
    ``"classes"`` (class indices and the predicted class's probability) or ``"labels"`` (multilabel: how many labels
    are true and predicted, and the mean probability given to the true labels).
    """
    scores, rows = worst.scores.cpu(), worst.rows.cpu()  # epoch end: top-k rows to the host
    keep = torch.isfinite(scores).tolist()  # host list (epoch end)
    data = [(float(s), r.tolist()) for s, r, k in zip(scores, rows, keep, strict=True) if k]
    if not data:
        return
    many = any(r[1] > 0 for _, r in data)
    if kind == "classes":
        targets: list[object] = [int(r[2]) for _, r in data]
        predictions: list[object] = [f"{int(r[3])} (p={r[4]:.3g})" for _, r in data]
    elif kind == "labels":
        targets = [f"{int(r[2])} labels" for _, r in data]
        predictions = [f"{int(r[3])} labels (p={r[4]:.3g})" for _, r in data]
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


__all__ = ["RegressionState", "StageState", "regression_ranges", "tensor_bytes", "write_worst"]
