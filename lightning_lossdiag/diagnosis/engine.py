"""Run every rule on a run record, merge the findings of one-time checks, sort by severity."""

from __future__ import annotations

import warnings
from collections.abc import Iterable, Mapping
from typing import Any

from lightning_lossdiag.diagnosis.config import DoctorConfig
from lightning_lossdiag.diagnosis.findings import SEVERITIES, Finding
from lightning_lossdiag.diagnosis.record import RunRecord
from lightning_lossdiag.diagnosis.rules import ALL_RULES, Rule

_RANK = {s: i for i, s in enumerate(reversed(SEVERITIES))}  # error 0, warning 1, info 2


def _subject(f: Finding) -> tuple[Any, Any] | None:
    """What a finding is about: ``(callback, monitor)`` for monitor findings, ``(None, key)`` for keyed ones."""
    monitor = f.evidence.get("monitor")
    if isinstance(monitor, str):
        # one-time checks of the scheduler monitor name no callback: they are about ReduceLROnPlateau
        return f.evidence.get("callback") or "ReduceLROnPlateau", monitor
    key = f.evidence.get("key")
    return (None, key) if isinstance(key, str) else None


def _same(a: Finding, b: Finding) -> bool:
    if a.code != b.code:
        return False
    if a.message == b.message:
        return True
    sa = _subject(a)
    return sa is not None and sa == _subject(b)


def sort_findings(findings: Iterable[Finding]) -> list[Finding]:
    """Errors first, then warnings, then info; within a severity by step (unknown steps last), then code.

    Example:
        >>> fs = [Finding("plateau", "warning", "b", 9), Finding("nonfinite_loss", "error", "a", 20)]
        >>> [f.code for f in sort_findings(fs)]
        ['nonfinite_loss', 'plateau']
    """
    return sorted(findings, key=lambda f: (_RANK[f.severity], f.step is None, f.step or 0, f.code))


def diagnose(
    record: RunRecord,
    cfg: DoctorConfig | Mapping[str, Any] | None = None,
    rules: Iterable[Rule] = ALL_RULES,
) -> list[Finding]:
    """All findings about ``record``: the rules' and those one-time checks added, deduplicated and sorted.

    A rule that fails (a bug, odd data) is reported as a Python warning and skipped, so the report of the other rules
    is never lost. A rule finding that repeats one of the record's own findings (same code and subject) is dropped.

    Example:
        >>> r = RunRecord()
        >>> r.notes["loss/first_nonfinite_step"] = 12
        >>> [(f.code, f.severity, f.step) for f in diagnose(r)]
        [('nonfinite_loss', 'error', 12)]
    """
    config = DoctorConfig.from_value(cfg)
    merged: list[Finding] = list(record.findings)
    for rule in rules:
        try:
            found = rule(record, config)
        except Exception as err:  # a broken rule must not lose the rest of the report
            warnings.warn(f"lightning_lossdiag: diagnosis rule {rule.__name__} failed: {err!r}", stacklevel=2)
            continue
        for f in found:
            if not any(_same(f, g) for g in merged):
                merged.append(f)
    return sort_findings(merged)


__all__ = ["diagnose", "sort_findings"]
