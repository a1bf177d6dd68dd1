"""The run record: the host-side numbers every monitor flushed, which the diagnosis rules read.

Monitors never read tensors between flushes. At a flush they move their numbers to the host once and hand them to
:func:`~lightning_lossdiag.callbacks._base.log_scalars`, which writes them to the loggers *and* appends them here.
The diagnosis (``Doctor``) and the offline reader (``lossdiag report``) both work on a :class:`RunRecord`, so every
rule runs the same way during a fit and on old event files.

The record is bounded: each series keeps at most ``max_points`` points (older points are thinned two to one).
"""

from __future__ import annotations

from typing import Any

from lightning_lossdiag.diagnosis.findings import Finding

_RECORD_ATTR = "lossdiag_record"


class RunRecord:
    """Scalar series, facts and early findings of one run.

    Attributes:
        scalars: ``key -> [(step, value), ...]`` in the order written (keys as logged: ``train/loss``, ``val/loss``,
            ``grad/norm_total``, ...).
        notes: structured facts that are not series (``"grad/nonfinite_params": [...]``, ``"data/class_counts"``,
            ``"scheduler/config"``, ...). Plain data only.
        findings: findings raised during the run by a one-time check (input checks, scheduler configuration).

    Example:
        >>> r = RunRecord()
        >>> r.add_scalars(10, {"train/loss": 0.5})
        >>> r.add_scalars(20, {"train/loss": 0.25})
        >>> r.values("train/loss")
        [0.5, 0.25]
        >>> r.last("train/loss")
        0.25
    """

    def __init__(self, max_points: int = 4096) -> None:
        if max_points < 16:
            raise ValueError(f"`max_points` must be >= 16, got {max_points!r}")
        self.max_points = max_points
        self.scalars: dict[str, list[tuple[int, float]]] = {}
        self.notes: dict[str, Any] = {}
        self.findings: list[Finding] = []

    def add_scalars(self, step: int, values: dict[str, float]) -> None:
        """Append one point per key at ``step`` (host floats only)."""
        for key, value in values.items():
            series = self.scalars.setdefault(key, [])
            if series and series[-1][0] == step:
                series[-1] = (int(step), float(value))  # a key written twice at one step keeps the last value
            else:
                series.append((int(step), float(value)))
            if len(series) > self.max_points:
                half = len(series) // 2
                series[:half] = series[:half:2]  # thin the older half two to one; recent points stay dense

    def add_finding(self, finding: Finding) -> None:
        """Keep a finding raised during the run (the same code and message are kept once)."""
        if not any(f.code == finding.code and f.message == finding.message for f in self.findings):
            self.findings.append(finding)

    def series(self, key: str) -> list[tuple[int, float]]:
        """The ``(step, value)`` points of ``key`` (empty if never written)."""
        return list(self.scalars.get(key, []))

    def values(self, key: str) -> list[float]:
        """The values of ``key`` in order."""
        return [v for _, v in self.scalars.get(key, [])]

    def last(self, key: str, default: float | None = None) -> float | None:
        """The newest value of ``key``, or ``default``."""
        series = self.scalars.get(key)
        return series[-1][1] if series else default

    def keys(self, prefix: str = "") -> list[str]:
        """Keys that start with ``prefix``, sorted."""
        return sorted(k for k in self.scalars if k.startswith(prefix))

    def state_dict(self) -> dict[str, Any]:
        """Plain data for checkpoints."""
        return {
            "max_points": self.max_points,
            "scalars": {k: [list(p) for p in v] for k, v in self.scalars.items()},
            "notes": dict(self.notes),
            "findings": [f.to_dict() for f in self.findings],
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore from :meth:`state_dict` (missing keys keep their defaults)."""
        self.max_points = int(state.get("max_points", self.max_points))
        self.scalars = {k: [(int(s), float(v)) for s, v in pts] for k, pts in state.get("scalars", {}).items()}
        self.notes = dict(state.get("notes", {}))
        self.findings = [Finding.from_dict(d) for d in state.get("findings", [])]


def record_for(trainer: Any) -> RunRecord:
    """The :class:`RunRecord` of ``trainer``, created on first use (kept as ``trainer.lossdiag_record``)."""
    record = getattr(trainer, _RECORD_ATTR, None)
    if not isinstance(record, RunRecord):
        record = RunRecord()
        setattr(trainer, _RECORD_ATTR, record)
    return record
