"""Rules on what schedulers and callbacks monitor: ``scheduler_mode_mismatch``, ``scheduler_monitor_missing``.

Reads the ReduceLROnPlateau configurations (note ``scheduler/plateau``, written by the scheduler monitor) and the
EarlyStopping / ModelCheckpoint monitors (note ``callbacks/monitors``, written by the Doctor at fit start). A monitor
is "missing" only when the Doctor listed the metrics the run did produce (note ``doctor/callback_metrics``).
"""

from __future__ import annotations

from typing import Any

from lightning_lossdiag.diagnosis.config import DoctorConfig
from lightning_lossdiag.diagnosis.direction import metric_direction
from lightning_lossdiag.diagnosis.findings import Finding
from lightning_lossdiag.diagnosis.record import RunRecord

_CONSEQUENCE = {
    "ReduceLROnPlateau": "it cuts the learning rate while the metric improves and keeps it while it worsens",
    "EarlyStopping": "it stops the run when the metric improves and never when it worsens",
    "ModelCheckpoint": "it keeps the worst checkpoints as the best ones",
}


def monitored(record: RunRecord) -> list[dict[str, Any]]:
    """Every ``{"callback", "monitor", "mode"}`` the run declared (schedulers first), skipping ones without a monitor.

    Example:
        >>> r = RunRecord()
        >>> r.notes["scheduler/plateau"] = [{"optimizer": 0, "monitor": "val_acc", "mode": "min"}]
        >>> monitored(r)
        [{'callback': 'ReduceLROnPlateau', 'monitor': 'val_acc', 'mode': 'min'}]
    """
    out = []
    for conf in record.notes.get("scheduler/plateau") or []:
        if isinstance(conf, dict) and conf.get("monitor"):
            out.append({"callback": "ReduceLROnPlateau", "monitor": str(conf["monitor"]), "mode": conf.get("mode")})
    for conf in record.notes.get("callbacks/monitors") or []:
        if isinstance(conf, dict) and conf.get("monitor"):
            name = str(conf.get("callback"))
            out.append({"callback": name, "monitor": str(conf["monitor"]), "mode": conf.get("mode")})
    return out


def mode_mismatch_finding(callback: str, monitor: str, mode: Any) -> Finding | None:
    """The ``scheduler_mode_mismatch`` finding for one monitor, or ``None`` when the mode fits (or is unknown).

    Example:
        >>> mode_mismatch_finding("EarlyStopping", "val_acc", "min").evidence["expected"]
        'max'
        >>> mode_mismatch_finding("EarlyStopping", "val_loss", "min") is None
        True
    """
    expected = metric_direction(monitor)
    if expected is None or mode not in ("min", "max") or mode == expected:
        return None
    rises = "rise" if expected == "max" else "fall"
    msg = (
        f"{callback} monitors `{monitor}` with mode={mode!r}, but `{monitor}` should {rises}: "
        f"{_CONSEQUENCE.get(callback, 'it reads improvements as regressions')}. Try: mode={expected!r}."
    )
    evidence = {"callback": callback, "monitor": monitor, "mode": mode, "expected": expected}
    return Finding("scheduler_mode_mismatch", "warning", msg, None, evidence)


def scheduler_mode_mismatch(record: RunRecord, cfg: DoctorConfig) -> list[Finding]:
    """``scheduler_mode_mismatch``: ``mode`` of ReduceLROnPlateau/EarlyStopping/ModelCheckpoint against the metric."""
    found = (mode_mismatch_finding(m["callback"], m["monitor"], m["mode"]) for m in monitored(record))
    return [f for f in found if f is not None]


def scheduler_monitor_missing(record: RunRecord, cfg: DoctorConfig) -> list[Finding]:
    """``scheduler_monitor_missing``: a monitored key never appeared among the run's logged metrics (warning).

    Example:
        >>> r = RunRecord()
        >>> r.notes["callbacks/monitors"] = [{"callback": "EarlyStopping", "monitor": "val_los", "mode": "min"}]
        >>> r.notes["doctor/callback_metrics"] = ["val_loss", "train_loss"]
        >>> scheduler_monitor_missing(r, DoctorConfig())[0].evidence["available"]
        ['train_loss', 'val_loss']
    """
    seen = record.notes.get("doctor/callback_metrics")
    if not isinstance(seen, list):
        return []
    available = sorted(set(map(str, seen)))
    out = []
    for m in monitored(record):
        if m["monitor"] in available or m["monitor"] in record.scalars:
            continue
        msg = (
            f"{m['callback']} monitors `{m['monitor']}`, but no metric of that name was logged in this run, so it "
            f"never acts (or Lightning stops with an error when `strict=True`). Logged metrics: "
            f"{', '.join(available[:12]) or 'none'}{' ...' if len(available) > 12 else ''}. Try: log it with "
            "`self.log(...)` in the stage it is monitored after, or fix the name."
        )
        evidence = {"callback": m["callback"], "monitor": m["monitor"], "available": available}
        out.append(Finding("scheduler_monitor_missing", "warning", msg, None, evidence))
    return out


RULES = (scheduler_mode_mismatch, scheduler_monitor_missing)
