"""Rules on how the fit progresses across epochs: ``plateau`` and ``overfitting``.

Each point of the validation loss is one evaluation (usually one epoch). The training loss is taken per epoch
(``train/loss_epoch`` or a user's ``train_loss_epoch``) or, failing that, as the mean of the flushed training loss
between two evaluations.
"""

from __future__ import annotations

import math
from typing import Any

from lightning_lossdiag.diagnosis.config import DoctorConfig
from lightning_lossdiag.diagnosis.findings import Finding
from lightning_lossdiag.diagnosis.record import RunRecord
from lightning_lossdiag.diagnosis.rules._common import Series, find_series, finite, fmt

#: Two series are aligned when their steps differ by at most this (Lightning logs train epoch values one step early).
_STEP_SLACK = 1


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


def _overfitting(record: RunRecord, cfg: DoctorConfig, key: str, val: Series) -> Finding | None:
    n = len(val)
    values = [v for _, v in val]
    best_idx = min(range(n), key=values.__getitem__)
    since = n - 1 - best_idx
    best, last = values[best_idx], values[-1]
    if since < cfg.overfit_epochs or last - best < cfg.overfit_rel_rise * abs(best) or last <= best:
        return None
    train = train_at(record, [s for s, _ in val])
    t_best, t_last = train[best_idx], train[-1]
    if t_best is None or t_last is None or t_last >= t_best:
        return None
    if t_best - t_last < cfg.overfit_train_drop * abs(t_best):
        return None
    gap_best, gap_last = best - t_best, last - t_last
    msg = (
        f"{key} rose from its best {fmt(best)} (step {val[best_idx][0]}) to {fmt(last)} over the last {since} "
        f"evaluations while the training loss fell from {fmt(t_best)} to {fmt(t_last)}; the val-train gap grew "
        f"from {fmt(gap_best)} to {fmt(gap_last)}. The model is memorising the training set. Try: keep the best "
        "checkpoint (`ModelCheckpoint(monitor=...)`) or `EarlyStopping`, more data or augmentation, weight decay, "
        "dropout, or a smaller model."
    )
    evidence: dict[str, Any] = {
        "key": key,
        "best": best,
        "best_step": val[best_idx][0],
        "last": last,
        "train_at_best": t_best,
        "train_last": t_last,
        "gap_at_best": gap_best,
        "gap_last": gap_last,
        "evaluations_since_best": since,
    }
    return Finding("overfitting", "warning", msg, val[best_idx][0], evidence)


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


def _plateau(record: RunRecord, cfg: DoctorConfig, key: str, series: Series) -> Finding | None:
    w = cfg.plateau_epochs
    if w < 1 or len(series) < w + 1:
        return None
    values = [v for _, v in series]
    before, recent = values[:-w], values[-w:]
    best_before = min(before)
    if min(recent) < best_before - cfg.plateau_rel_improvement * abs(best_before):
        return None
    best_step = series[values.index(best_before)][0]
    msg = (
        f"{key} has not improved by more than {fmt(cfg.plateau_rel_improvement * 100)}% for the last {w} "
        f"evaluations (best {fmt(best_before)} at step {best_step}, last {fmt(values[-1])}). The run spends compute "
        "without progress. Try: a lower lr (ReduceLROnPlateau), EarlyStopping, and if the training loss stalls "
        f"too, a larger model or better features.{_at_min_lr(record)}"
    )
    evidence = {"key": key, "best": best_before, "best_step": best_step, "last": values[-1], "evaluations": w}
    return Finding("plateau", "warning", msg, best_step, evidence)


def overfitting(record: RunRecord, cfg: DoctorConfig) -> list[Finding]:
    """``overfitting``: validation loss rising for ``overfit_epochs`` evaluations while the training loss falls.

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
    """``plateau``: no relative improvement over ``plateau_epochs`` evaluations of the val loss (or train epoch loss).

    Stays quiet when the validation loss is rising while the training loss falls: that is ``overfitting``.

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
