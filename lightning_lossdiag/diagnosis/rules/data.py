"""Rules on the data and what the model makes of it: ``class_imbalance``, ``constant_predictions``."""

from __future__ import annotations

import math
from typing import Any

from lightning_lossdiag.diagnosis.config import DoctorConfig
from lightning_lossdiag.diagnosis.findings import Finding, Severity
from lightning_lossdiag.diagnosis.record import RunRecord
from lightning_lossdiag.diagnosis.rules._common import fmt

_STAGE_ORDER = ("val", "test", "train")


def _last(record: RunRecord, key: str) -> tuple[int, float] | None:
    points = [p for p in record.series(key) if math.isfinite(p[1])]
    return points[-1] if points else None


def _first_stage_value(record: RunRecord, template: str, term: str = "") -> tuple[str, int, float] | None:
    """The newest value of ``template.format(stage=..., term=...)`` for the first stage (val, test, train) with one."""
    for stage in _STAGE_ORDER:
        found = _last(record, template.format(stage=stage, term=term))
        if found is not None:
            return stage, found[0], found[1]
    return None


def _minority_recall(record: RunRecord, minority: int, n_classes: int, term: str = "") -> tuple[str, float] | None:
    for stage in _STAGE_ORDER:
        for key in (f"metrics/{stage}/{term}recall/{minority}",):
            found = _last(record, key)
            if found is not None:
                return key, found[1]
        if n_classes == 2 and minority == 1:
            found = _last(record, f"metrics/{stage}/{term}recall")
            if found is not None:
                return f"metrics/{stage}/{term}recall", found[1]
    return None


def class_imbalance(record: RunRecord, cfg: DoctorConfig) -> list[Finding]:
    """``class_imbalance``: the smallest class holds less than ``imbalance_share`` of the samples.

    ``info`` when the model still finds the minority class; ``warning`` when its recall is about 0
    (``metrics/<stage>/recall/<class>``, or the binary recall) or nearly every prediction is the majority class
    (``errors/<stage>/majority_pred_share``).

    Example:
        >>> r = RunRecord()
        >>> r.notes["data/class_counts"] = {"stage": "train", "counts": [950, 50]}
        >>> r.add_scalars(100, {"metrics/val/recall": 0.0})
        >>> [(f.code, f.severity) for f in class_imbalance(r, DoctorConfig())]
        [('class_imbalance', 'warning')]
    """
    note = record.notes.get("data/class_counts")
    if not isinstance(note, dict) or record.notes.get("task") == "multilabel":
        return []
    stage = str(note.get("stage", "train"))
    heads = note.get("heads")
    if isinstance(heads, dict) and heads:  # multi-task: one verdict per classification head
        found = [_imbalance(record, cfg, counts, stage, str(term)) for term, counts in heads.items()]
        return [f for f in found if f is not None]
    single = _imbalance(record, cfg, note.get("counts"), stage, None)
    return [single] if single is not None else []


def _imbalance(record: RunRecord, cfg: DoctorConfig, raw: Any, stage: str, term: str | None) -> Finding | None:
    """The ``class_imbalance`` verdict for one set of class counts (``term``: the head of a multi-task model)."""
    if not isinstance(raw, list):
        return None
    counts = [float(c) for c in raw if isinstance(c, (int, float))]
    total = sum(counts)
    if len(counts) < 2 or total <= 0:
        return None
    minority = min(range(len(counts)), key=counts.__getitem__)
    share = counts[minority] / total
    if share >= cfg.imbalance_share:
        return None
    prefix = f"{term}/" if term else ""
    evidence: dict[str, Any] = {"stage": stage, "counts": counts, "minority_class": minority, "share": share}
    if term:
        evidence["term"] = term
    symptoms = []
    recall = _minority_recall(record, minority, len(counts), prefix)
    if recall is not None:
        evidence["minority_recall"] = recall[1]
        if recall[1] <= cfg.recall_zero:
            symptoms.append(f"its recall is {fmt(recall[1])} (`{recall[0]}`)")
    majority = _first_stage_value(record, "errors/{stage}/{term}majority_pred_share", prefix)
    if majority is not None:
        evidence["majority_pred_share"] = majority[2]
        if majority[2] >= cfg.majority_share_one:
            symptoms.append(f"{fmt(majority[2] * 100)}% of the {majority[0]} predictions are the majority class")
    severity: Severity = "warning" if symptoms else "info"
    seen = (
        "The model ignores it: " + " and ".join(symptoms) + "."
        if symptoms
        else "The model still finds it, but accuracy alone hides how well."
    )
    binary = len(counts) == 2
    fix = (
        "`pos_weight: auto` for `bce_with_logits`, or the `focal` loss"
        if binary
        else "class weights in the cross-entropy, or the `focal` loss"
    )
    where = f"the {stage} samples of head `{term}`" if term else f"the {stage} samples"
    msg = (
        f"Class {minority} holds only {fmt(share * 100)}% of {where} (counts {[int(c) for c in counts]}). "
        f"{seen} A model can reach high accuracy by always predicting the majority class. Try: {fix}, or a "
        "balanced sampler; watch recall/F1 per class rather than accuracy."
    )
    return Finding("class_imbalance", severity, msg, None, evidence)


def _relative_pred_std(record: RunRecord, cfg: DoctorConfig) -> tuple[str, int, float, str] | None:
    """``(stage, step, value, what)`` of the prediction spread when it is about zero, else ``None``."""
    std = _first_stage_value(record, "errors/{stage}/constant_pred_std")
    if std is None:
        return None
    stage, step, value = std
    target = _last(record, f"errors/{stage}/target_std")
    if target is not None and target[1] > 0:
        rel = value / target[1]
        what = f"their std is {fmt(rel)} of the targets' std"
        return (stage, step, rel, what) if rel <= cfg.constant_pred_std else None
    if record.notes.get("task") in ("binary", "multiclass", "multilabel"):
        what = f"the std of the predicted probabilities is {fmt(value)}"
        return (stage, step, value, what) if value <= cfg.constant_pred_std else None
    what = f"their std is {fmt(value)}"
    return (stage, step, value, what) if value <= cfg.constant_pred_std_abs else None


def constant_predictions(record: RunRecord, cfg: DoctorConfig) -> list[Finding]:
    """``constant_predictions``: the model outputs (nearly) the same value for every sample (warning).

    Reads ``errors/<stage>/constant_pred_std``: the std of the predictions (regression; compared with
    ``errors/<stage>/target_std`` when logged, else with ``constant_pred_std_abs``) or the mean per-class std of the
    predicted probabilities (classification), and ``errors/<stage>/majority_pred_share`` (share of predictions in the
    majority class, classification).

    Example:
        >>> r = RunRecord()
        >>> r.add_scalars(40, {"errors/val/constant_pred_std": 0.0})
        >>> constant_predictions(r, DoctorConfig())[0].step
        40
    """
    found = _relative_pred_std(record, cfg)
    if found is not None:
        stage, step, value, what = found
        msg = (
            f"The {stage} predictions barely vary: {what} (step {step}). The model predicts about the same value "
            "for every input (often the target mean or the class prior), so it has learned nothing about the inputs. "
            "Try: check that inputs reach the model (not all zeros, not detached), normalise inputs and targets, "
            "raise the lr if the loss is flat, remove a final activation that saturates."
        )
        return [Finding("constant_predictions", "warning", msg, step, {"stage": stage, "pred_std": value})]
    share = _first_stage_value(record, "errors/{stage}/majority_pred_share")
    if share is not None and share[2] >= cfg.majority_share_one:
        stage, step, value = share
        msg = (
            f"{fmt(value * 100)}% of the {stage} predictions are the same class (step {step}). The model has "
            "collapsed to one answer, which scores as well as the class share and no better. Try: class weights or "
            "`pos_weight: auto`, the `focal` loss, a higher lr if the loss is flat, check that labels are not "
            "shuffled apart from inputs."
        )
        return [Finding("constant_predictions", "warning", msg, step, {"stage": stage, "majority_pred_share": value})]
    return []


RULES = (class_imbalance, constant_predictions)
