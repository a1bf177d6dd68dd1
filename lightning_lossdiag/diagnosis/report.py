"""Render findings: a rich table for the terminal, a markdown table for TensorBoard text, and a JSON report."""

from __future__ import annotations

import math
import sys
from collections import Counter
from collections.abc import Mapping, Sequence
from typing import IO, Any

from lightning_lossdiag.diagnosis.findings import SEVERITIES, Finding
from lightning_lossdiag.diagnosis.record import RunRecord
from lightning_lossdiag.diagnosis.rules._common import find_series

_STYLE = {"error": "bold red", "warning": "yellow", "info": "cyan"}
_MAIN_SERIES = ("train/loss", "train/loss_epoch", "val/loss")
_MAIN_KEYS = ("train/loss_ema", "grad/norm_total", "grad/norm_total_clipped", "grad/clip_rate")
_MAIN_PREFIXES = ("lr/", "metrics/")


def _json_number(x: float) -> float | str:
    return x if math.isfinite(x) else str(x)  # JSON has no NaN/inf: write them as "nan", "inf"


def versions() -> dict[str, str]:
    """Versions of lightning_lossdiag, torch and lightning (``"unknown"`` when one is not importable)."""
    out = {}
    for name in ("lightning_lossdiag", "torch", "lightning"):
        try:
            module = __import__(name)
            out[name] = str(getattr(module, "__version__", "unknown"))
        except ImportError:
            out[name] = "unknown"
    return out


def summary(record: RunRecord, extra: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """Summary numbers of a record: the last value of the main series, the last step, the number of series.

    Example:
        >>> r = RunRecord()
        >>> r.add_scalars(10, {"train_loss": 0.5, "metrics/val/accuracy": 0.9})
        >>> s = summary(r, {"epochs": 1})
        >>> s["last"], s["last_step"], s["epochs"]
        ({'train/loss': 0.5, 'metrics/val/accuracy': 0.9}, 10, 1)
    """
    last: dict[str, float | str] = {}
    for canonical in _MAIN_SERIES:
        _, points = find_series(record, canonical)
        if points:
            last[canonical] = _json_number(points[-1][1])
    for key in _MAIN_KEYS:
        value = record.last(key)
        if value is not None:
            last[key] = _json_number(value)
    for key in record.keys(""):
        if key.startswith(_MAIN_PREFIXES) and (value := record.last(key)) is not None:
            last[key] = _json_number(value)
    steps = [pts[-1][0] for pts in record.scalars.values() if pts]
    out: dict[str, Any] = {"last": last, "last_step": max(steps) if steps else None, "series": len(record.scalars)}
    out.update(extra or {})
    return out


def build_report(
    findings: Sequence[Finding], record: RunRecord, extra: Mapping[str, Any] | None = None
) -> dict[str, Any]:
    """The JSON-ready report: findings, counts by severity, summary numbers and versions."""
    counts: Counter[str] = Counter(f.severity for f in findings)
    return {
        "findings": [_plain(f.to_dict()) for f in findings],
        "counts": {s: counts.get(s, 0) for s in SEVERITIES},
        "summary": _plain(summary(record, extra)),
        "versions": versions(),
    }


def _plain(value: Any) -> Any:
    """Make evidence JSON-safe: tuples -> lists, non-finite floats -> strings, unknown objects -> ``str``."""
    if isinstance(value, Mapping):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, float):
        return _json_number(value)
    if value is None or isinstance(value, (bool, int, str)):
        return value
    return str(value)


def to_markdown(findings: Sequence[Finding]) -> str:
    r"""A markdown table (TensorBoard renders it in the Text tab).

    Example:
        >>> print(to_markdown([Finding("plateau", "warning", "val/loss | flat", 40)]))
        | severity | code | step | message |
        |---|---|---|---|
        | warning | `plateau` | 40 | val/loss \| flat |
    """
    if not findings:
        return "No findings: nothing looked wrong in what was recorded."
    rows = ["| severity | code | step | message |", "|---|---|---|---|"]
    for f in findings:
        message = f.message.replace("|", "\\|").replace("\n", " ")
        step = "" if f.step is None else str(f.step)
        rows.append(f"| {f.severity} | `{f.code}` | {step} | {message} |")
    return "\n".join(rows)


def print_table(findings: Sequence[Finding], file: IO[str] | None = None, title: str = "lightning-lossdiag") -> None:
    """Print the findings as a rich table (severity, code, step, message) to ``file`` (default stdout).

    Cells are plain text: a message is printed as it is, brackets and colons included (no rich markup, emoji codes
    or highlighting; these also cost ~15 ms of regex compilation the first time at the end of a fit).
    """
    from rich.console import Console
    from rich.table import Table
    from rich.text import Text

    console = Console(file=file or sys.stdout, soft_wrap=False, highlight=False, emoji=False, markup=False)
    if not findings:
        console.print(Text.assemble((title, "bold"), ": no findings, nothing looked wrong in what was recorded."))
        return
    counts: Counter[str] = Counter(f.severity for f in findings)
    caption = ", ".join(f"{counts[s]} {s}" for s in reversed(SEVERITIES) if counts.get(s))
    table = Table(title=Text(f"{title} diagnosis"), caption=Text(caption), show_lines=True, expand=False)
    table.add_column("severity", no_wrap=True)
    table.add_column("code", no_wrap=True)
    table.add_column("step", justify="right", no_wrap=True)
    table.add_column("message", overflow="fold")
    for f in findings:
        step = "" if f.step is None else str(f.step)
        table.add_row(Text(f.severity, _STYLE.get(f.severity, "")), Text(f.code), Text(step), Text(f.message))
    console.print(table)


__all__ = ["build_report", "print_table", "summary", "to_markdown", "versions"]
