"""The :class:`Finding` record: what the diagnosis says about a run, under a stable code."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any, Literal

Severity = Literal["info", "warning", "error"]
SEVERITIES: tuple[str, ...] = ("info", "warning", "error")


@dataclass(frozen=True)
class Finding:
    """One observation of the diagnosis.

    Attributes:
        code: a stable string users can grep and filter on (``"exploding_gradients"``, ...).
        severity: ``"info"``, ``"warning"`` or ``"error"``.
        message: what was seen (with numbers), why it matters and what to try.
        step: the global step it refers to (first occurrence), or ``None``.
        evidence: plain numbers and names behind the message (JSON-serialisable).

    Example:
        >>> f = Finding("plateau", "warning", "val/loss has not improved for 8 epochs.", step=400)
        >>> f.to_dict()["code"]
        'plateau'
    """

    code: str
    severity: Severity
    message: str
    step: int | None = None
    evidence: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.severity not in SEVERITIES:
            raise ValueError(f"`severity` must be one of {SEVERITIES}, got {self.severity!r}")

    def to_dict(self) -> dict[str, Any]:
        """Plain data, for JSON and checkpoints."""
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Finding:
        """Inverse of :meth:`to_dict`; unknown keys are ignored so older/newer reports load."""
        return cls(
            code=str(data["code"]),
            severity=data.get("severity", "info"),
            message=str(data.get("message", "")),
            step=data.get("step"),
            evidence=dict(data.get("evidence") or {}),
        )
