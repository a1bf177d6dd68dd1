"""Rules on the training loss: ``nonfinite_loss``, ``loss_spike``, ``loss_diverging``."""

from __future__ import annotations

import math

from lightning_lossdiag.diagnosis.config import DoctorConfig
from lightning_lossdiag.diagnosis.findings import Finding, Severity
from lightning_lossdiag.diagnosis.record import RunRecord
from lightning_lossdiag.diagnosis.rules._common import (
    find_series,
    finite,
    first_step,
    fmt,
    median,
    min_step,
    noise_sd,
    note_int,
    rolling_medians,
    window,
)


def _skipped_note(record: RunRecord) -> str:
    skipped = record.last("nonfinite/skipped_steps")
    policy = record.notes.get("nonfinite/policy")
    if policy in ("skip", "stop") and skipped:
        return f" NonFiniteGuard (policy {policy!r}) dropped {int(skipped)} update(s) with non-finite values."
    return ""


def nonfinite_loss(record: RunRecord, cfg: DoctorConfig) -> list[Finding]:
    """``nonfinite_loss``: the training loss was NaN or infinite at some step (error).

    Reads the note ``loss/first_nonfinite_step``, the cumulative ``train/nonfinite_count`` and any non-finite point
    of the logged training loss (so event files of a plain module are diagnosed too).

    Example:
        >>> r = RunRecord()
        >>> r.notes["loss/first_nonfinite_step"] = 41
        >>> [(f.code, f.step) for f in nonfinite_loss(r, DoctorConfig())]
        [('nonfinite_loss', 41)]
    """
    counts = record.series("train/nonfinite_count")
    count = int(counts[-1][1]) if counts and math.isfinite(counts[-1][1]) else 0
    key, points = find_series(record, "train/loss")
    logged_step = first_step(points, lambda v: not math.isfinite(v))
    noted = note_int(record, "loss/first_nonfinite_step")
    counted_at = first_step(counts, lambda v: v > 0)
    if noted is None and logged_step is None and count == 0:
        return []
    step = noted if noted is not None else min_step(logged_step, counted_at)
    where = f"first at step {step}" if step is not None else "at some step"
    many = f" ({count} step(s) in all)" if count else ""
    msg = (
        f"The training loss was NaN or infinite, {where}{many}. After a non-finite loss the gradients and every "
        "later update are garbage, so the weights may now be NaN too."
        f"{_skipped_note(record)} Try: a lower learning rate or gradient clipping (`gradient_clip_val`); check "
        "inputs and targets for NaN/inf; guard log, sqrt and division in the loss with an epsilon; prefer bf16 or "
        'fp32 over fp16; `LossDiagnostics(on_nonfinite="stop")` saves a checkpoint and stops when it happens.'
    )
    evidence = {"first_step": step, "count": count, "key": key}
    return [Finding("nonfinite_loss", "error", msg, step, evidence)]


def loss_spike(record: RunRecord, cfg: DoctorConfig) -> list[Finding]:
    """``loss_spike``: steps whose loss jumped far above its recent level (``info``; ``warning`` when frequent).

    Example:
        >>> r = RunRecord()
        >>> r.add_scalars(50, {"train/loss_spikes": 4.0})
        >>> [(f.code, f.severity) for f in loss_spike(r, DoctorConfig())]
        [('loss_spike', 'warning')]
    """
    count = record.last("train/loss_spikes", 0.0) or 0.0
    if not math.isfinite(count) or count <= 0:
        return []
    n = int(count)
    step = note_int(record, "loss/first_spike_step")
    if step is None:
        step = first_step(record.series("train/loss_spikes"), lambda v: v > 0)
    severity: Severity = "warning" if n >= cfg.spike_warn_count else "info"
    msg = (
        f"{n} loss spike(s): step losses far above the recent average, first at step {step}. A rare spike comes "
        "from a hard or mislabelled batch; frequent spikes point to a learning rate that is too high, too short a "
        "warm-up, or bad samples. Try: a lower lr or a warm-up, gradient clipping, and look at the batches of those "
        "steps."
    )
    return [Finding("loss_spike", severity, msg, step, {"count": n, "first_step": step})]


#: The median of ``w`` noisy points has a standard error of about ``1.2533 * sigma / sqrt(w)``.
_MEDIAN_SE = math.sqrt(math.pi / 2.0)


def _in_se(rise: float, se: float) -> str:
    """``'25 standard errors of its noise (±0.01) above it'``, or a note that the climb shows no noise at all."""
    if se > 0:
        return f"{fmt(rise / se)} standard errors of its noise (±{fmt(se)}) above it"
    return "a steady climb with no noise around it"


def _latest_lr(record: RunRecord) -> float | None:
    keys = record.keys("lr/")
    return record.last(keys[0]) if keys else None


def loss_diverging(record: RunRecord, cfg: DoctorConfig) -> list[Finding]:
    """``loss_diverging``: the training loss climbed well above its best level and stays there (warning).

    The series (``train/loss_ema`` when present, else the training loss) is smoothed with rolling medians over the
    recent window (``window_frac``). It diverges when the recent median exceeds the best smoothed value by
    ``diverge_factor`` and the rise is at least ``diverge_min_rise`` of the improvement made before the best, so a
    loss that wobbles near zero after a large drop is not flagged, and when the rise stands ``noise_k`` standard
    errors above the noise of the series (the difference of two medians of ``w`` points whose spread around the
    trend is :func:`~lightning_lossdiag.diagnosis.rules._common.noise_sd`), so a noisy loss whose medians wander by
    chance is not flagged either.

    Example:
        >>> r = RunRecord()
        >>> for i, v in enumerate([1.0, 0.8, 0.6, 0.5, 0.7, 1.2, 2.0, 3.5, 5.0, 8.0]):
        ...     r.add_scalars(10 * (i + 1), {"train/loss": v})
        >>> [f.code for f in loss_diverging(r, DoctorConfig())]
        ['loss_diverging']
    """
    key: str | None = "train/loss_ema"
    points = finite(record.series("train/loss_ema"))
    if len(points) < cfg.min_points:
        key, raw = find_series(record, "train/loss")
        points = finite(raw)
    if key is None or len(points) < cfg.min_points:
        return []
    values = [v for _, v in points]
    w = window(len(values), cfg.window_frac)
    smooth = rolling_medians(values, w)
    best_idx = min(range(len(smooth)), key=smooth.__getitem__)
    best, start, recent = smooth[best_idx], smooth[0], median(values[-w:])
    rise = recent - best
    if best_idx >= len(smooth) - 1 or rise <= 0:
        return []
    if rise <= (cfg.diverge_factor - 1.0) * abs(best) or rise < cfg.diverge_min_rise * (start - best):
        return []
    sigma = noise_sd(values[-max(cfg.noise_window, 3 * w) :])
    se = _MEDIAN_SE * sigma * math.sqrt(2.0 / w)  # standard error of the difference of two medians of w points
    if rise < cfg.noise_k * se:
        return []  # a noisy loss whose medians wander: within its noise
    step = points[best_idx + w - 1][0]
    lr = _latest_lr(record)
    lr_text = f" (lr is now {fmt(lr)})" if lr is not None else ""
    msg = (
        f"The training loss ({key}) rose from its best {fmt(best)} around step {step} to {fmt(recent)} over the "
        f"last {w} flushes, {fmt(recent / best) + 'x' if best > 0 else 'well above'} its best, "
        f"{_in_se(rise, se)}. A loss that climbs "
        f"during training usually means the learning rate is too high{lr_text} or the optimizer state blew up. "
        "Try: lower the lr 3-10x, add a warm-up or a decaying schedule, clip gradients."
    )
    evidence = {"key": key, "best": best, "recent": recent, "window": w, "lr": lr, "noise": sigma, "noise_se": se}
    return [Finding("loss_diverging", "warning", msg, step, evidence)]


RULES = (nonfinite_loss, loss_spike, loss_diverging)
