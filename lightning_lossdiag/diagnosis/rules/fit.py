"""Rules on how the fit progresses across epochs: ``plateau`` and ``overfitting``.

Each point of the validation loss is one evaluation (usually one epoch). The training loss is taken per epoch
(``train/loss_epoch`` or a user's ``train_loss_epoch``) or, failing that, as the mean of the flushed training loss
between two evaluations.

Both rules weigh a change against the noise of the series they read: the spread of one evaluation around the
series' local trend (:func:`~lightning_lossdiag.diagnosis.rules._common.noise_sd`). A validation loss that wanders
within ``noise_k`` times that noise is neither rising nor improving.
"""

from __future__ import annotations

import math
from typing import Any

from lightning_lossdiag.diagnosis.config import DoctorConfig
from lightning_lossdiag.diagnosis.findings import Finding
from lightning_lossdiag.diagnosis.record import RunRecord
from lightning_lossdiag.diagnosis.rules._common import (
    Series,
    find_series,
    finite,
    fmt,
    median,
    noise_sd,
    rolling_medians,
)
from lightning_lossdiag.diagnosis.rules.calibration import miscalibration

#: Two series are aligned when their steps differ by at most this (Lightning logs train epoch values one step early).
_STEP_SLACK = 1
#: The current level of a series is the median of its last this many evaluations: one evaluation is not a trend.
_RECENT = 3
#: Where the validation accuracy is read from, in this order (ours, then names users commonly log).
_VAL_ACCURACY = ("metrics/val/accuracy", "val/accuracy", "val/acc", "val_acc", "val_accuracy", "valid_acc")


def train_at(record: RunRecord, steps: list[int]) -> list[float | None]:
    """The training loss belonging to each evaluation step (epoch value, else mean of the flushes since the last).

    Example:
        >>> r = RunRecord()
        >>> for s, v in [(5, 1.0), (10, 0.8), (15, 0.6), (20, 0.4)]:
        ...     r.add_scalars(s, {"train/loss": v})
        >>> train_at(r, [10, 20])
        [0.9, 0.5]
    """
    _, epoch = find_series(record, "train/loss_epoch")
    epoch = finite(epoch)
    out: list[float | None] = []
    if epoch:
        for s in steps:
            before = [v for es, v in epoch if es <= s + _STEP_SLACK]
            out.append(before[-1] if before else None)
        return out
    _, flushed = find_series(record, "train/loss")
    flushed = finite(flushed)
    prev = -math.inf
    for s in steps:
        chunk = [v for fs, v in flushed if prev < fs <= s]
        out.append(sum(chunk) / len(chunk) if chunk else None)
        prev = s
    return out


def _noise(values: list[float], span: int, cfg: DoctorConfig, turn: int | None = None) -> float:
    """Noise of ``values`` (one point's spread around the trend) over their last ``max(noise_window, span)`` points.

    ``turn`` is an index into ``values`` whose second difference is left out (see ``noise_sd``).
    """
    tail = values[-max(cfg.noise_window, span) :]
    return noise_sd(tail, None if turn is None else turn - (len(values) - len(tail)))


def _times_noise(change: float, sigma: float) -> str:
    """``'4.2x its noise (+-0.01)'``, or a note that the series shows no noise around its trend."""
    if sigma > 0:
        return f"{fmt(change / sigma)}x its noise across evaluations (±{fmt(sigma)})"
    return "with no measurable noise around its trend"


def _accuracy(record: RunRecord, cfg: DoctorConfig, val: Series, best_idx: int, m: int) -> dict[str, Any] | None:
    """The validation accuracy at the best loss and now (median of the last ``m`` evaluations), and whether it held.

    ``None`` when no accuracy is logged at the evaluations that matter.

    Example:
        >>> r = RunRecord()
        >>> for s, a in [(10, 0.8), (20, 0.9), (30, 0.9), (40, 0.89), (50, 0.9)]:
        ...     r.add_scalars(s, {"val_acc": a})
        >>> val = [(10, 0.5), (20, 0.3), (30, 0.35), (40, 0.4), (50, 0.45)]
        >>> _accuracy(r, DoctorConfig(), val, 1, 3)["holds"]
        True
    """
    key = next((k for k in _VAL_ACCURACY if finite(record.series(k))), None)
    if key is None:
        return None
    points = finite(record.series(key))
    best_step, since_step = val[best_idx][0], val[-m][0]
    near = min(points, key=lambda p: abs(p[0] - best_step))
    recent = [v for s, v in points if s >= since_step - _STEP_SLACK]
    if abs(near[0] - best_step) > _STEP_SLACK or not recent:
        return None
    values = [v for _, v in points]
    sigma = _noise(values, 2 * (len(val) - 1 - best_idx) + 1, cfg)
    tolerance = max(cfg.overfit_acc_tolerance, cfg.noise_k * sigma)
    now = median(recent[-m:])
    return {"key": key, "at_best": near[1], "recent": now, "tolerance": tolerance, "holds": now >= near[1] - tolerance}


def _overconfident(record: RunRecord, cfg: DoctorConfig) -> dict[str, Any] | None:
    """The evidence of an ``overconfident`` finding (calibration rule), or ``None``."""
    ev = miscalibration(record, cfg)
    return ev if ev is not None and ev["gap"] > 0 else None


def _overfitting(record: RunRecord, cfg: DoctorConfig, key: str, val: Series) -> Finding | None:
    n = len(val)
    values = [v for _, v in val]
    best_idx = min(range(n), key=values.__getitem__)
    since = n - 1 - best_idx
    if since < max(1, cfg.overfit_epochs):
        return None
    m = min(_RECENT, since)
    best, last, recent = values[best_idx], values[-1], median(values[-m:])
    rise = recent - best
    sigma = _noise(values, 2 * since + 1, cfg, turn=best_idx)
    if rise <= 0 or rise < cfg.overfit_rel_rise * abs(best) or rise < cfg.noise_k * sigma:
        return None  # within the noise of the evaluations (or too small to matter)
    train = train_at(record, [s for s, _ in val])
    t_best, t_last = train[best_idx], train[-1]
    if t_best is None or t_last is None or t_last >= t_best:
        return None
    if t_best - t_last < cfg.overfit_train_drop * abs(t_best):
        return None
    acc, over = _accuracy(record, cfg, val, best_idx, m), _overconfident(record, cfg)
    if over is not None and (acc is None or acc["holds"]):
        return None  # the probabilities are over-confident and the decisions held: `overconfident` names it
    t_sigma = _noise([t for t in train if t is not None], 2 * since + 1, cfg)
    memorising = t_best - t_last > cfg.noise_k * t_sigma
    gap_best, gap_last = best - t_best, last - t_last
    best_step = val[best_idx][0]
    seen = (
        f"{key} rose from its best {fmt(best)} (step {best_step}) to {fmt(recent)} (median of the last {m} "
        f"evaluations; last {fmt(last)}), {_times_noise(rise, sigma)}, while the training loss fell from "
        f"{fmt(t_best)} to {fmt(t_last)}; the val-train gap went from {fmt(gap_best)} to {fmt(gap_last)}."
    )
    evidence: dict[str, Any] = {
        "key": key,
        "best": best,
        "best_step": best_step,
        "last": last,
        "recent": recent,
        "noise": sigma,
        "noise_k": cfg.noise_k,
        "train_at_best": t_best,
        "train_last": t_last,
        "train_noise": t_sigma,
        "gap_at_best": gap_best,
        "gap_last": gap_last,
        "evaluations_since_best": since,
        "memorising": memorising,
    }
    if acc is not None:
        evidence.update({f"accuracy_{k}": v for k, v in acc.items() if k != "tolerance"})
    if acc is not None and acc["holds"]:
        msg = (
            f"{seen} The validation accuracy held ({acc['key']} {fmt(acc['at_best'])} at the best loss, "
            f"{fmt(acc['recent'])} now): the decisions did not get worse, the probabilities grew more confident, "
            "so the loss rises on the rows the model gets wrong. That is over-confidence, not memorisation. Try: "
            "temperature scaling on the validation set, label smoothing, or keep the checkpoint with the best "
            "val loss; MetricCurves logs `metrics/val/ece` and `metrics/val/confidence` to measure calibration."
        )
        return Finding("overfitting", "info", msg, best_step, evidence)
    if memorising:
        why = "The model fits the training set at the expense of held-out data: it is memorising it."
    else:
        why = (
            f"The training loss fell by less than {fmt(cfg.noise_k)}x its own noise (±{fmt(t_sigma)}), so this "
            "shows held-out performance getting worse, not yet memorisation of the training set."
        )
    calibration = ""
    if over is not None:
        calibration = f" The probabilities are over-confident too (ECE {fmt(over['ece'])}: see `overconfident`)."
    msg = (
        f"{seen} {why}{calibration} Try: keep the best checkpoint (`ModelCheckpoint(monitor=...)`) or "
        "`EarlyStopping`, more data or augmentation, weight decay, dropout, or a smaller model."
    )
    return Finding("overfitting", "warning", msg, best_step, evidence)


def _early_stopped_on(record: RunRecord, key: str) -> int | None:
    """The epoch at which an EarlyStopping monitoring ``key`` ended the run, or ``None``.

    Example:
        >>> r = RunRecord()
        >>> r.notes["callbacks/early_stopped"] = [{"monitor": "val/loss", "stopped_epoch": 7}]
        >>> _early_stopped_on(r, "val/loss"), _early_stopped_on(r, "val_loss")
        (7, None)
    """
    for entry in record.notes.get("callbacks/early_stopped", None) or []:
        if isinstance(entry, dict) and entry.get("monitor") == key:
            return int(entry.get("stopped_epoch", 0))
    return None


def _handled_by_early_stopping(record: RunRecord, finding: Finding, key: str) -> Finding:
    """Downgrade a fit finding to ``info`` when EarlyStopping on the same metric already ended the run."""
    epoch = _early_stopped_on(record, key)
    if epoch is None:
        return finding
    message = (
        f"{finding.message} EarlyStopping on {key} already ended the run at epoch {epoch}, as it should: keep the "
        f"best checkpoint (`ModelCheckpoint(monitor='{key}')`) rather than the last weights."
    )
    evidence = {**finding.evidence, "early_stopped_epoch": epoch}
    return Finding(finding.code, "info", message, finding.step, evidence)


def _at_min_lr(record: RunRecord) -> str:
    """A sentence when some learning rate already sits at its ReduceLROnPlateau ``min_lr`` (else empty)."""
    configs = record.notes.get("scheduler/plateau")
    if not isinstance(configs, list):
        return ""
    lrs = [v for k in record.keys("lr/") if (v := record.last(k)) is not None and math.isfinite(v)]
    for conf in configs:
        min_lrs = conf.get("min_lrs") if isinstance(conf, dict) else None
        floor = max((float(m) for m in min_lrs), default=0.0) if isinstance(min_lrs, list) and min_lrs else 0.0
        if floor > 0 and lrs and min(lrs) <= floor * (1 + 1e-6):
            return (
                f" The learning rate is already at ReduceLROnPlateau's min_lr ({fmt(floor)}), so the scheduler "
                "cannot help any more: stop the run, or change the model or data."
            )
    return ""


def _train_fell(record: RunRecord, cfg: DoctorConfig) -> bool | None:
    """Whether the flushed training loss fell clearly over the run (``None`` with fewer than 6 flushes).

    Clearly: from the median of its first 3 flushes to its lowest 3-flush median by more than ``noise_k`` times its
    noise and ``plateau_rel_improvement`` of the start.

    Example:
        >>> r = RunRecord()
        >>> for s, v in enumerate([2.0, 1.9, 2.1, 1.2, 0.8, 0.6, 0.5, 0.55]):
        ...     r.add_scalars(s, {"train/loss": v})
        >>> _train_fell(r, DoctorConfig())
        True
    """
    _, points = find_series(record, "train/loss")
    values = [v for _, v in finite(points)]
    if len(values) < 6:
        return None
    start = median(values[:3])
    needed = max(cfg.noise_k * noise_sd(values), cfg.plateau_rel_improvement * abs(start))
    return start - min(rolling_medians(values, 3)) > needed


def _plateau(record: RunRecord, cfg: DoctorConfig, key: str, series: Series) -> Finding | None:
    w = cfg.plateau_epochs
    if w < 1 or len(series) < w + 1:
        return None
    values = [v for _, v in series]
    before, recent = values[:-w], values[-w:]
    best_before = min(before)
    best_idx = values.index(best_before)
    # the noise of the flat stretch: from the best before the window (or the last `noise_window` points) to the end;
    # the descent before it is a trend, not noise
    sigma = noise_sd(values[max(best_idx, len(values) - cfg.noise_window) :])
    tol = max(cfg.plateau_rel_improvement * abs(best_before), cfg.noise_k * sigma)
    level = median(recent)
    if min(recent) < best_before - tol or level > best_before + tol:
        return None  # a new best beyond the noise (still improving), or a rise beyond it (not flat)
    best_step = series[best_idx][0]
    first, last = values[0], values[-1]
    if cfg.noise_k * sigma >= cfg.plateau_rel_improvement * abs(best_before):
        within = f"with ±{fmt(sigma)} of noise per evaluation, changes under {fmt(tol)} ({fmt(cfg.noise_k)}x) are noise"
    else:
        within = f"changes under {fmt(tol)} ({fmt(cfg.plateau_rel_improvement * 100)}% of it) count as none"
    seen = (
        f"The last {w} evaluations of {key} (median {fmt(level)}, last {fmt(last)}) stay within its noise of the best "
        f"value before them ({fmt(best_before)} at step {best_step}): {within}."
    )
    evidence: dict[str, Any] = {
        "key": key,
        "best": best_before,
        "best_step": best_step,
        "last": last,
        "recent": level,
        "first": first,
        "evaluations": w,
        "noise": sigma,
        "noise_k": cfg.noise_k,
        "tolerance": tol,
    }
    at_min_lr = _at_min_lr(record)
    if max(recent) - min(recent) <= 1e-6 * max(abs(level), 1e-12):
        evidence["kind"] = "frozen"
        msg = (
            f"{key} has stayed at exactly {fmt(level)} for the last {w} evaluations (best {fmt(best_before)} at step "
            f"{best_step}): a loss that does not even jitter means the weights no longer change. Try: check the "
            "learning rate (a scheduler may have taken it to 0), parameters left frozen (`requires_grad=False`) and "
            f"updates skipped by a non-finite guard; if they all look right, EarlyStopping ends such runs.{at_min_lr}"
        )
        return Finding("plateau", "warning", msg, best_step, evidence)
    start = median(before[:3])  # the first evaluations, not the first one alone: it is as noisy as the rest
    if start - best_before > max(tol, cfg.plateau_rel_improvement * abs(start)):
        evidence["kind"] = "converged"
        msg = (
            f"{seen} It fell from {fmt(first)} before: the run has converged to the noise floor of this model and "
            "data, and more epochs add little. Try: `EarlyStopping` on it (or fewer epochs) to save compute; a lower "
            f"lr or a decaying schedule may still take a small step.{at_min_lr}"
        )
        return Finding("plateau", "info", msg, best_step, evidence)
    if _train_fell(record, cfg):
        evidence["kind"] = "no_transfer"
        msg = (
            f"{seen} It never fell clearly below its first value {fmt(first)} while the training loss did: what "
            "the model learns does not carry over to held-out data, or the first evaluation already reached this "
            "level. Try: check that the validation data match the training data (preprocessing, labels), "
            f"regularisation, and `EarlyStopping`.{at_min_lr}"
        )
        return Finding("plateau", "info", msg, best_step, evidence)
    evidence["kind"] = "stalled"
    msg = (
        f"{seen} It never fell clearly below its first value {fmt(first)}, and the training loss did not either: "
        "the model is not learning. Try: another learning rate (too low learns nothing, too high bounces), check "
        "the inputs and targets (scaling, labels), and if the data are fine, a larger model or better features."
        f"{at_min_lr}"
    )
    return Finding("plateau", "warning", msg, best_step, evidence)


def overfitting(record: RunRecord, cfg: DoctorConfig) -> list[Finding]:
    """``overfitting``: validation loss rising for ``overfit_epochs`` evaluations while the training loss falls.

    The rise (median of the last 3 evaluations over the best) must exceed ``overfit_rel_rise`` of the best and
    ``noise_k`` times the noise of the validation loss across evaluations. The message says "memorising" only when
    the training loss also fell by more than ``noise_k`` times its own noise. When the validation accuracy held, the
    rise is over-confidence: the finding is ``info`` and says so, or is left to ``overconfident`` when the calibration
    rule finds it (it stays a warning, naming both, when the accuracy dropped too).

    Example:
        >>> r = RunRecord()
        >>> for e, (t, v) in enumerate([(1.0, 1.0), (0.7, 0.8), (0.5, 0.7), (0.4, 0.75), (0.3, 0.8), (0.2, 0.9)]):
        ...     r.add_scalars(10 * (e + 1), {"train/loss_epoch": t, "val/loss": v})
        >>> overfitting(r, DoctorConfig())[0].evidence["best_step"]
        30
    """
    key, val = find_series(record, "val/loss")
    val = finite(val)
    if key is None or len(val) < 2:
        return []
    found = _overfitting(record, cfg, key, val)
    return [_handled_by_early_stopping(record, found, key)] if found else []


def plateau(record: RunRecord, cfg: DoctorConfig) -> list[Finding]:
    """``plateau``: no new best beyond the noise over ``plateau_epochs`` evaluations of the val (or train epoch) loss.

    The last ``plateau_epochs`` evaluations must stay within ``noise_k`` noise (and ``plateau_rel_improvement``) of the
    best value before them, neither beating it nor rising above it (a rise is ``overfitting``'s, or nobody's). A run
    whose loss fell clearly before has converged to its noise floor: ``info``, and the advice is to stop earlier, not
    a larger model. It is a ``warning`` when the values stopped changing at all (the weights no longer move) or when
    neither this loss nor the flushed training loss ever fell clearly (the model is not learning).

    Example:
        >>> r = RunRecord()
        >>> for e, v in enumerate([1.0, 0.6, 0.5, 0.5, 0.5, 0.5, 0.5, 0.5]):
        ...     r.add_scalars(e, {"val/loss": v})
        >>> plateau(r, DoctorConfig())[0].evidence["best"]
        0.5
    """
    key, series = find_series(record, "val/loss")
    series = finite(series)
    if key is not None and len(series) > cfg.plateau_epochs:
        if _overfitting(record, cfg, key, series) is not None:
            return []
    else:
        key, series = find_series(record, "train/loss_epoch")
        series = finite(series)
    if key is None:
        return []
    found = _plateau(record, cfg, key, series)
    return [_handled_by_early_stopping(record, found, key)] if found else []


RULES = (plateau, overfitting)
