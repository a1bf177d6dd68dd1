"""Rule ``metric_scale_mismatch``: a metric the user logs disagrees in scale with ours.

A user key whose name says accuracy/acc/precision/recall/f1 and a stage (``val_acc``, ``train/f1_epoch``,
``test_precision``) is paired with our ``metrics/<stage>/<name>`` point by point (steps at most one apart: Lightning
logs training epoch values one step early). When most pairs show the user value at ~100x ours (a percentage), ~1/100
of ours (divided by 100 once too often) or ``1 - ours`` (an error rate, or flipped classes), the rule says so with
both numbers. Keys without a stage word are not compared.
"""

from __future__ import annotations

import re
from collections import Counter

from lightning_lossdiag.diagnosis.config import DoctorConfig
from lightning_lossdiag.diagnosis.findings import Finding
from lightning_lossdiag.diagnosis.record import RunRecord
from lightning_lossdiag.diagnosis.rules._common import Series, finite, fmt

_STAGES = {"train": "train", "training": "train", "val": "val", "valid": "val", "validation": "val", "test": "test"}
_METRICS = {"acc": "accuracy", "accuracy": "accuracy", "precision": "precision", "prec": "precision",
            "recall": "recall", "f1": "f1", "f1score": "f1"}  # fmt: skip
_OURS = ("metrics/", "errors/", "grad/", "act/", "lr/", "plateau/", "nonfinite/", "param/")
_SPLIT = re.compile(r"[/_\-.\s]+")


def parse_metric_key(key: str) -> tuple[str, str] | None:
    """``(stage, metric)`` named by a user's key, or ``None`` when it names no single stage and metric.

    Example:
        >>> parse_metric_key("val_acc"), parse_metric_key("train/f1_epoch"), parse_metric_key("acc")
        (('val', 'accuracy'), ('train', 'f1'), None)
    """
    if key.startswith(_OURS):
        return None
    tokens = [t for t in _SPLIT.split(key.lower()) if t]
    if any(t.startswith("top") for t in tokens):
        return None  # top-k accuracy is a different metric
    stages = {_STAGES[t] for t in tokens if t in _STAGES}
    metrics = {_METRICS[t] for t in tokens if t in _METRICS}
    if len(stages) != 1 or len(metrics) != 1:
        return None
    return stages.pop(), metrics.pop()


def _pairs(user: Series, ours: Series) -> list[tuple[int, float, float]]:
    out = []
    for step, u in user:
        near = min(ours, key=lambda p: abs(p[0] - step))
        if abs(near[0] - step) <= 1:
            out.append((step, u, near[1]))
    return out


def _kind(u: float, o: float, cfg: DoctorConfig) -> str:
    tol = cfg.metric_ratio_tolerance
    if abs(u - o) <= cfg.metric_complement_tolerance:
        return "same"
    if o >= cfg.metric_min_value and u > 0:
        ratio = u / o
        if abs(ratio / 100.0 - 1.0) <= tol:
            return "percent"
        if abs(ratio * 100.0 - 1.0) <= tol:
            return "hundredth"
    if abs(o - 0.5) > 0.1 and abs(u - (1.0 - o)) <= cfg.metric_complement_tolerance:
        return "complement"
    return "other"


_EXPLAIN = {
    "percent": ("about 100x ours: it is a percentage", "divide by 100 (or compare it with 100, not 1)"),
    "hundredth": (
        "about 1/100 of ours: it was divided by 100 once too often (e.g. `correct / (n * 100)`)",
        "compute it as `correct / n`, or log our value",
    ),
    "complement": (
        "equal to 1 - ours: it is an error rate, or the positive class / threshold is flipped",
        "check `preds > 0.5` vs `>= 0.5`, which class is positive, and whether sigmoid was applied",
    ),
}


def metric_scale_mismatch(record: RunRecord, cfg: DoctorConfig) -> list[Finding]:
    """``metric_scale_mismatch``: a user's accuracy/precision/recall/f1 has a different scale than ours (warning).

    Example:
        >>> r = RunRecord()
        >>> r.add_scalars(20, {"val_acc": 0.0085, "metrics/val/accuracy": 0.85})
        >>> f = metric_scale_mismatch(r, DoctorConfig())[0]
        >>> f.evidence["key"], f.evidence["kind"]
        ('val_acc', 'hundredth')
    """
    out = []
    for key in list(record.scalars):
        parsed = parse_metric_key(key)
        if parsed is None:
            continue
        stage, metric = parsed
        ours_key = f"metrics/{stage}/{metric}"
        ours = finite(record.series(ours_key))
        user = finite(record.series(key))
        if not ours or not user:
            continue
        pairs = _pairs(user, ours)
        if not pairs:
            continue
        kinds = Counter(_kind(u, o, cfg) for _, u, o in pairs)
        kind, n = kinds.most_common(1)[0]
        if kind not in _EXPLAIN or n * 2 <= len(pairs):
            continue
        step, u, o = next(p for p in reversed(pairs) if _kind(p[1], p[2], cfg) == kind)
        what, fix = _EXPLAIN[kind]
        msg = (
            f"Your logged `{key}` = {fmt(u)} at step {step}, but our `{ours_key}` = {fmt(o)} on the same data; "
            f"yours is {what} ({n} of {len(pairs)} evaluations agree). A callback monitoring `{key}` "
            f"(ModelCheckpoint, EarlyStopping, ReduceLROnPlateau) or a comparison across runs reads the wrong "
            f"number. Try: {fix}."
        )
        evidence = {"key": key, "ours_key": ours_key, "logged": u, "computed": o, "step": step, "kind": kind}
        out.append(Finding("metric_scale_mismatch", "warning", msg, step, evidence))
    return out


RULES = (metric_scale_mismatch,)
