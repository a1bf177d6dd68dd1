"""``class_imbalance`` of a multilabel task: rare positive labels, and a model that never predicts them.

Each label of a tagger is a binary task, so its imbalance is the share of positive values, not the smallest class.
A tagger whose positives are 1% of the values scores 99% accuracy by predicting no label at all; its recall (the
mean over labels) is then 0. Host floats only.
"""

from __future__ import annotations

from typing import Any

from lightning_lossdiag.diagnosis.config import DoctorConfig
from lightning_lossdiag.diagnosis.findings import Finding, Severity
from lightning_lossdiag.diagnosis.record import RunRecord
from lightning_lossdiag.diagnosis.rules._common import finite, fmt

_SHOWN = 5  # the rarest labels with positives a message names
_EMPTY_SHOWN = 3  # the labels without positives a message names
_STAGES = ("val", "test", "train")


def _last(record: RunRecord, key: str) -> float | None:
    points = finite(record.series(key))
    return points[-1][1] if points else None


def _recall(record: RunRecord, stage: str) -> tuple[str, float] | None:
    """``(key, value)`` of the newest recall of ``stage``, else of the first other stage with one."""
    for where in (stage, *(s for s in _STAGES if s != stage)):
        key = f"metrics/{where}/recall"
        value = _last(record, key)
        if value is not None:
            return key, value
    return None


def label_imbalance(record: RunRecord, cfg: DoctorConfig, counts: list[float], stage: str) -> Finding | None:
    """The verdict on the positives per label ``counts`` of ``stage`` (``None``: positives are not rare).

    Fires when positives are less than ``imbalance_share`` of the label values (``counts`` over
    ``errors/<stage>/samples`` rows times the labels): ``warning`` when the recall (``metrics/<stage>/recall``, the
    mean over labels) is at most ``recall_zero``, else ``info``. The message gives the positive share, the ratio of
    the most to the least frequent label with positives, the labels without any and the five rarest, never every
    count.

    Example:
        >>> r = RunRecord()
        >>> r.add_scalars(40, {"errors/val/samples": 1000.0, "metrics/val/recall": 0.0})
        >>> f = label_imbalance(r, DoctorConfig(), [10.0, 20.0, 0.0, 5.0], "val")
        >>> f.severity, f.evidence["positive_share"], f.evidence["empty_labels"]
        ('warning', 0.00875, 1)
    """
    rows = _last(record, f"errors/{stage}/samples")
    labels = len(counts)
    positives = sum(counts)
    if rows is None or rows <= 0 or labels == 0:
        return None
    share = positives / (rows * labels)
    if share >= cfg.imbalance_share:
        return None
    order = sorted(range(labels), key=lambda i: (counts[i], i))
    seen = [i for i in order if counts[i] > 0]
    empty = [i for i in order if counts[i] <= 0]
    ratio = max(counts) / counts[seen[0]] if seen else None
    evidence: dict[str, Any] = {
        "stage": stage,
        "num_labels": labels,
        "rows": rows,
        "positives": positives,
        "positive_share": share,
        "ratio": ratio,
        "rarest": [[i, int(counts[i])] for i in seen[:_SHOWN]],
        "empty_labels": len(empty),
    }
    text = (
        f"Positive labels are {fmt(share * 100)}% of the {stage} label values ({int(positives)} positives over "
        f"{int(rows)} rows x {labels} labels)."
    )
    if ratio is not None and labels > 1:
        text += f" The most frequent label has {fmt(ratio)}x the positives of the rarest one with any"
        text += f", label {seen[0]}." if not empty else "."
    if empty:
        shown = ", ".join(str(i) for i in empty[:_EMPTY_SHOWN])
        many = "e.g. " if len(empty) > _EMPTY_SHOWN else ""
        text += f" {len(empty)} label{'s have' if len(empty) > 1 else ' has'} no positive at all ({many}{shown})."
    if len(seen) > 1:
        text += " Rarest labels (positives): " + ", ".join(f"{i} ({int(counts[i])})" for i in seen[:_SHOWN]) + "."
    recall = _recall(record, stage)
    severity: Severity = "info"
    if recall is None:
        text += " No recall was logged to show whether the model finds the positives."
    elif recall[1] <= cfg.recall_zero:
        severity = "warning"
        evidence["recall"] = recall[1]
        text += (
            f" The model ignores them: its recall is {fmt(recall[1])} (`{recall[0]}`, the mean over labels), so an "
            f"accuracy near {fmt((1 - share) * 100)}% only counts the negatives."
        )
    else:
        evidence["recall"] = recall[1]
        text += f" The model still finds positives (recall {fmt(recall[1])}), but accuracy alone hides how well."
    text += (
        " Try: `pos_weight: auto` for `bce_with_logits`, or the `focal` loss; watch recall, F1 and average precision "
        "rather than accuracy."
    )
    return Finding("class_imbalance", severity, text, None, evidence)


__all__ = ["label_imbalance"]
