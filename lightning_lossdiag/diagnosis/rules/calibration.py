"""Rules on calibration: ``overconfident``, ``underconfident``.

Reads the last ``metrics/<stage>/ece`` (15-bin expected calibration error), ``metrics/<stage>/confidence`` (mean
confidence of the decisions: the top-label probability for multiclass, ``max(p, 1 - p)`` for binary and multilabel),
``metrics/<stage>/accuracy`` and ``errors/<stage>/samples`` of the validation stage (else the test stage).

A perfectly calibrated model still shows an ECE of about ``1.2 / sqrt(N)`` on ``N`` samples with 15 bins (0.12 at
100, 0.04 at 1,000, 0.01 at 10,000: the noise of the per-bin accuracies). A finding needs the ECE above
``ece_noise_factor`` times that floor and above ``ece_min``, and names the direction from confidence vs accuracy.
"""

from __future__ import annotations

import math
from typing import Any

from lightning_lossdiag.diagnosis.config import DoctorConfig
from lightning_lossdiag.diagnosis.findings import Finding
from lightning_lossdiag.diagnosis.record import RunRecord
from lightning_lossdiag.diagnosis.rules._common import fmt

_NOISE = 1.2  # ECE of a calibrated model ~ _NOISE / sqrt(N) with 15 bins


def _last(record: RunRecord, key: str) -> float | None:
    values = [v for v in record.values(key) if math.isfinite(v)]
    return values[-1] if values else None


def miscalibration(record: RunRecord, cfg: DoctorConfig) -> dict[str, Any] | None:
    """The evidence of a calibration finding (stage, ECE, confidence, accuracy, samples, floor), or ``None``.

    Example:
        >>> r = RunRecord()
        >>> r.add_scalars(50, {"metrics/val/ece": 0.2, "metrics/val/confidence": 0.95,
        ...                    "metrics/val/accuracy": 0.75, "errors/val/samples": 2000})
        >>> round(miscalibration(r, DoctorConfig())["gap"], 2)
        0.2
    """
    for stage in ("val", "test"):
        ece = _last(record, f"metrics/{stage}/ece")
        confidence = _last(record, f"metrics/{stage}/confidence")
        accuracy = _last(record, f"metrics/{stage}/accuracy")
        samples = _last(record, f"errors/{stage}/samples")
        if ece is None or confidence is None or accuracy is None or not samples:
            continue
        floor = _NOISE / math.sqrt(samples)
        if ece < max(cfg.ece_min, cfg.ece_noise_factor * floor):
            return None
        return {
            "stage": stage,
            "ece": ece,
            "confidence": confidence,
            "accuracy": accuracy,
            "gap": confidence - accuracy,
            "samples": int(samples),
            "noise_floor": floor,
        }
    return None


def _finding(code: str, ev: dict[str, Any], what: str, fix: str) -> Finding:
    msg = (
        f"The {ev['stage']} probabilities are {what}: ECE {fmt(ev['ece'])} over {ev['samples']} samples (a "
        f"calibrated model would show about {fmt(ev['noise_floor'])} from noise alone), mean confidence "
        f"{fmt(ev['confidence'])} against an accuracy of {fmt(ev['accuracy'])}. Decisions that read the "
        f"probabilities (thresholds, rankings by confidence, abstention) will be off. Try: {fix}."
    )
    return Finding(code, "warning", msg, None, ev)


def overconfident(record: RunRecord, cfg: DoctorConfig) -> list[Finding]:
    """``overconfident``: the ECE stands above its noise floor and the confidence above the accuracy."""
    ev = miscalibration(record, cfg)
    if ev is None or ev["gap"] <= 0:
        return []
    fix = (
        "temperature scaling on the validation set (one parameter, keeps accuracy), label smoothing, mixup, or "
        "stopping earlier: a network trained to near-zero training loss pushes its probabilities to 0 and 1"
    )
    return [_finding("overconfident", ev, "over-confident", fix)]


def underconfident(record: RunRecord, cfg: DoctorConfig) -> list[Finding]:
    """``underconfident``: the ECE stands above its noise floor and the confidence below the accuracy."""
    ev = miscalibration(record, cfg)
    if ev is None or ev["gap"] >= 0:
        return []
    fix = (
        "temperature scaling (a temperature below 1 sharpens), less label smoothing or regularisation, or "
        "training longer"
    )
    return [_finding("underconfident", ev, "under-confident", fix)]


RULES = (overconfident, underconfident)
