"""Rules on the data and what the model makes of it: ``class_imbalance``, ``constant_predictions``."""

from __future__ import annotations

import math
from typing import Any

from lightning_lossdiag.diagnosis.config import DoctorConfig
from lightning_lossdiag.diagnosis.findings import Finding, Severity
from lightning_lossdiag.diagnosis.record import RunRecord
from lightning_lossdiag.diagnosis.rules._chance import imbalance_p
from lightning_lossdiag.diagnosis.rules._common import fmt
from lightning_lossdiag.diagnosis.rules._label_imbalance import label_imbalance

_STAGE_ORDER = ("val", "test", "train")
_FEW_CLASSES = 3  # up to this many classes the message still gives every count
_SHOWN = 5  # the rarest classes a message names, whatever the number of classes
_EMPTY_SHOWN = 3  # the classes without samples a message names
_FULL_COUNTS = 20  # the evidence keeps the full count list up to this many classes
_RAREST_FRAC = 0.1  # ``rarest_share``: the share of the samples held by this fraction of the classes (at least 1)
_NAME_CHARS = 24  # longer class names are cut in messages
_FEW_PER_CLASS = 10  # below this many samples a class on average, the message says chance shapes the counts
_MIN_RECALL_SAMPLES = 20  # the rarest classes' pooled recall needs at least this many samples to say anything


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
    """``(where it was read, value)`` of the minority class's recall from a logged scalar, else ``None``."""
    for stage in _STAGE_ORDER:
        for key in (f"metrics/{stage}/{term}recall/{minority}",):
            found = _last(record, key)
            if found is not None:
                return f"`{key}`", found[1]
        if n_classes == 2 and minority == 1:
            found = _last(record, f"metrics/{stage}/{term}recall")
            if found is not None:
                return f"`metrics/{stage}/{term}recall`", found[1]
    return None


def _pooled_recall(counts: list[float], noted: Any) -> tuple[float, int, int] | None:
    """``(recall, classes, samples)`` of the rarest classes with samples, pooled, from the note's per-class recall.

    Many classes log no scalar per class, so the note's ``recall`` list stands in. The rarest class decides alone
    when it has ``_MIN_RECALL_SAMPLES`` samples; otherwise the next rarest join it until they have that many
    together (correct rows over their samples), so that a class seen once does not decide alone. ``None`` without
    the list, or when even the rarest ``_RAREST_FRAC`` of the classes hold too few samples to tell.
    """
    if not isinstance(noted, list) or len(noted) != len(counts):
        return None
    usable = sorted(
        (i for i in range(len(counts)) if counts[i] > 0 and _finite_number(noted[i])), key=lambda i: (counts[i], i)
    )
    limit = max(1, int(len(usable) * _RAREST_FRAC))
    group: list[int] = []
    for i in usable[:limit]:
        group.append(i)
        if sum(counts[j] for j in group) >= _MIN_RECALL_SAMPLES:
            support = sum(counts[j] for j in group)
            return sum(noted[j] * counts[j] for j in group) / support, len(group), int(support)
    return None


def _finite_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _name(names: list[str] | None, index: int) -> str:
    """How a message names a class: its index, or its name (in backticks, cut when long) when the note gives names."""
    if names is None:
        return str(index)
    name = names[index]
    return f"`{name if len(name) <= _NAME_CHARS else name[: _NAME_CHARS - 3] + '...'}`"


def _times(x: float) -> str:
    """A ratio for a message: ``15.7x``, ``1000x`` (no exponent)."""
    return f"{x:.0f}x" if x >= 100 else f"{fmt(x)}x"


def _summary(counts: list[float], names: list[str] | None, where: str, minority: int) -> tuple[str, dict[str, Any]]:
    """The sentences that describe the class counts, and the evidence behind them; never every count.

    Up to ``_FEW_CLASSES`` classes the counts are short enough to give; beyond, the ratio of the largest to the
    smallest non-empty class, the classes without samples, the share of the rarest ``_RAREST_FRAC`` of the classes
    and the ``_SHOWN`` rarest classes with their counts.
    """
    n, total = len(counts), sum(counts)
    order = sorted(range(n), key=lambda i: (counts[i], i))  # rarest first, ties by index
    seen = [i for i in order if counts[i] > 0]
    empty = [i for i in order if counts[i] <= 0]
    ratio = max(counts) / counts[seen[0]] if len(seen) > 1 else None
    k = max(1, int(n * _RAREST_FRAC))
    rarest_share = sum(counts[i] for i in order[:k]) / total
    rarest = [[i, int(counts[i])] for i in seen[:_SHOWN]]
    evidence: dict[str, Any] = {
        "num_classes": n,
        "ratio": ratio,
        "rarest": rarest,
        "rarest_k": k,
        "rarest_share": rarest_share,
        "empty_classes": len(empty),
    }
    if n <= _FULL_COUNTS:
        evidence["counts"] = counts
    non_empty = " non-empty" if empty else ""
    none_at_all = f"{len(empty)} class{'es have' if len(empty) > 1 else ' has'} no sample at all"
    if n <= _FEW_CLASSES:
        text = f"Class {_name(names, minority)} holds only {fmt(counts[minority] / total * 100)}% of {where} "
        text += f"(counts {[int(c) for c in counts]})"
        if empty:
            text += f": {none_at_all}."
            if ratio is not None:
                text += f" The largest class has {_times(ratio)} the samples of the smallest non-empty one."
        else:
            text += f"; the largest class has {_times(ratio or 1.0)} its samples."
        return text, evidence
    if ratio is None:
        return f"Of the {n} classes, {where} all fall in class {_name(names, seen[0])}; {none_at_all}.", evidence
    text = (
        f"{where[0].upper()}{where[1:]} span {n} classes: the largest has {_times(ratio)} the samples of the "
        f"smallest{non_empty} one, class {_name(names, seen[0])} ({fmt(counts[seen[0]] / total * 100)}%)."
    )
    if empty:
        shown = ", ".join(_name(names, i) for i in empty[:_EMPTY_SHOWN])
        text += f" {none_at_all} ({'e.g. ' if len(empty) > _EMPTY_SHOWN else ''}{shown})."
    if k > 1:
        text += f" The rarest {k} classes ({fmt(k / n * 100)}%) hold {fmt(rarest_share * 100)}% of the samples."
    shown = ", ".join(f"{_name(names, i)} ({c})" for i, c in rarest)
    text += f" Rarest{non_empty} classes (samples): {shown}."
    if total / n < _FEW_PER_CLASS:
        text += f" At ~{fmt(total / n)} samples a class, part of this spread is chance."
    return text, evidence


def class_imbalance(record: RunRecord, cfg: DoctorConfig) -> list[Finding]:
    """``class_imbalance``: the smallest class holds less than ``imbalance_share * 2 / C`` of the samples.

    With two classes that is ``imbalance_share``; with ``C`` classes the smallest class is held against the even
    share ``1 / C`` (``imbalance_share = 0.1``: below a fifth of the mean class count), so many balanced classes
    never fire. The counts must also be unlikely for equally likely classes (Pearson's chi-square test of all
    counts, or the chance of a class as rare as the smallest; probability below ``imbalance_p``): 64 validation
    samples over 1,000 classes leave ~938 classes empty by chance alone, and that is no finding.

    Reads the ``data/class_counts`` note: ``counts`` (one per class), optional ``names`` (one string per class) and
    ``recall`` (one per class; read when no per-class recall scalar is logged, as for many classes), and for a
    multi-task model ``heads`` (``{term: counts}`` or ``{term: {"counts", "names", "recall"}}``, one verdict each).

    ``info`` when the model still finds the minority class; ``warning`` when its recall is about 0
    (``metrics/<stage>/recall/<class>``, the binary recall, or the note's ``recall``) or nearly every prediction is
    the majority class (``errors/<stage>/majority_pred_share``). A class without samples has no recall: the recall read
    is that of the rarest class with samples.

    Sequence outputs (``(B, T, V)``, the note's ``sequence``) get no verdict: a language model's tokens follow a long
    tail in any text, and class weights are not how such models are trained. (Logits flattened to ``(B*T, V)`` look
    like any classifier's and are judged as one.)

    A multilabel task (note ``task``) is judged on the share of positive label values instead, a warning when the
    recall is about 0 (:func:`~lightning_lossdiag.diagnosis.rules._label_imbalance.label_imbalance`).

    The message stays short whatever the number of classes: up to 3 classes it gives the counts; beyond, the ratio
    of the largest to the smallest non-empty class, how many classes have no sample, the share of the samples held by
    the rarest 10% of the classes and the 5 rarest classes with their counts. The evidence holds ``num_classes``,
    ``ratio``, ``rarest`` (``[class, count]`` pairs), ``rarest_k``, ``rarest_share``, ``empty_classes``,
    ``minority_class``, ``share``, ``p_balanced`` (the test's probability), ``stage`` and ``counts`` up to 20
    classes. Below 10 samples a class on average the message says that chance shapes the counts too.

    Example:
        >>> r = RunRecord()
        >>> r.notes["data/class_counts"] = {"stage": "train", "counts": [950, 50]}
        >>> r.add_scalars(100, {"metrics/val/recall": 0.0})
        >>> [(f.code, f.severity) for f in class_imbalance(r, DoctorConfig())]
        [('class_imbalance', 'warning')]
        >>> counts = [1000 // (c + 1) for c in range(1000)]  # long-tailed: 1000, 500, 333, ..., 1
        >>> r = RunRecord()
        >>> r.notes["data/class_counts"] = {"stage": "train", "counts": counts}
        >>> (f,) = class_imbalance(r, DoctorConfig())
        >>> f.evidence["ratio"], f.evidence["rarest"][:2], f.evidence["empty_classes"], "counts" in f.evidence
        (1000.0, [[500, 1], [501, 1]], 0, False)
    """
    note = record.notes.get("data/class_counts")
    if not isinstance(note, dict) or note.get("sequence"):
        return []
    stage = str(note.get("stage", "train"))
    heads = note.get("heads")
    if record.notes.get("task") == "multilabel":  # each label a binary task: the share of positive values
        counts = note.get("counts")
        if heads or not isinstance(counts, list):
            return []
        labels = label_imbalance(record, cfg, [float(c) for c in counts if isinstance(c, (int, float))], stage)
        return [labels] if labels is not None else []
    if isinstance(heads, dict) and heads:  # multi-task: one verdict per classification head
        found = [_imbalance(record, cfg, value, stage, str(term)) for term, value in heads.items()]
        return [f for f in found if f is not None]
    single = _imbalance(record, cfg, note, stage, None)
    return [single] if single is not None else []


def _imbalance(record: RunRecord, cfg: DoctorConfig, raw: Any, stage: str, term: str | None) -> Finding | None:
    """The ``class_imbalance`` verdict for one set of class counts (``term``: the head of a multi-task model).

    ``raw``: the counts, or a dict with ``counts`` and optional ``names`` and ``recall``.
    """
    info = raw if isinstance(raw, dict) else {"counts": raw}
    if not isinstance(info.get("counts"), list):
        return None
    counts = [float(c) for c in info["counts"] if isinstance(c, (int, float))]
    total = sum(counts)
    if len(counts) < 2 or total <= 0:
        return None
    minority = min(range(len(counts)), key=counts.__getitem__)
    share = counts[minority] / total
    # held against the even share 1/C: two classes fire below imbalance_share, C classes below
    # imbalance_share * 2 / C (1,000 equal classes hold 0.1% each and are balanced)
    if share >= cfg.imbalance_share * 2.0 / len(counts):
        return None
    chance = imbalance_p(counts)  # few samples over many classes leave classes empty by chance: no imbalance shown
    if chance >= cfg.imbalance_p:
        return None
    names_raw = info.get("names")
    names = [str(n) for n in names_raw] if isinstance(names_raw, list) and len(names_raw) == len(counts) else None
    prefix = f"{term}/" if term else ""
    where = f"the {stage} samples of head `{term}`" if term else f"the {stage} samples"
    summary, evidence = _summary(counts, names, where, minority)
    evidence.update({"stage": stage, "minority_class": minority, "share": share, "p_balanced": chance})
    if term:
        evidence["term"] = term
    with_samples = [i for i in range(len(counts)) if counts[i] > 0]
    rarest_seen = min(with_samples, key=counts.__getitem__)  # an empty class has no recall: read the rarest seen
    symptoms = []
    recall = None
    rare, its = f"class {_name(names, rarest_seen)}", "its"
    if len(with_samples) > 1:
        recall = _minority_recall(record, rarest_seen, len(counts), prefix)
        pooled = _pooled_recall(counts, info.get("recall")) if recall is None else None
        if pooled is not None:  # many classes: the rarest ones together, from the note's per-class recall
            value, k, support = pooled
            source = "the `data/class_counts` note"
            recall = (source if k == 1 else f"their {support} samples together, from {source}", value)
            if k > 1:
                rare, its = f"the rarest {k} classes", "their"
                evidence["recall_classes"] = k
    if recall is not None:
        evidence["minority_recall"] = recall[1]
        if rarest_seen != minority:
            evidence["recall_class"] = rarest_seen
        if recall[1] <= cfg.recall_zero:
            symptoms.append(f"{its} recall is {fmt(recall[1])} ({recall[0]})")
    majority = _first_stage_value(record, "errors/{stage}/{term}majority_pred_share", prefix)
    if majority is not None:
        evidence["majority_pred_share"] = majority[2]
        if majority[2] >= cfg.majority_share_one:
            symptoms.append(f"{fmt(majority[2] * 100)}% of the {majority[0]} predictions are the majority class")
    severity: Severity = "warning" if symptoms else "info"
    if symptoms:
        seen = f"The model ignores {rare}: " + " and ".join(symptoms) + "."
    elif len(with_samples) < 2:
        seen = f"With every sample in {rare}, nothing shows how the model does on the others."
    elif recall is not None:
        seen = f"The model still finds {rare} (recall {fmt(recall[1])}), but accuracy alone hides how well."
    else:
        seen = f"No per-class recall was logged to show whether the model finds {rare}."
    binary = len(counts) == 2
    fix = (
        "`pos_weight: auto` for `bce_with_logits`, or the `focal` loss"
        if binary
        else "class weights in the cross-entropy, or the `focal` loss"
    )
    msg = (
        f"{summary} {seen} A model can reach high accuracy by always predicting the majority class. Try: {fix}, or a "
        "balanced sampler; watch recall/F1 per class rather than accuracy."
    )
    return Finding("class_imbalance", severity, msg, None, evidence)


def _num_classes(record: RunRecord) -> int:
    """The number of classes, from the ``data/class_counts`` note (0 when there is none)."""
    note = record.notes.get("data/class_counts")
    counts = note.get("counts") if isinstance(note, dict) else None
    return len(counts) if isinstance(counts, list) else 0


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
    task = record.notes.get("task")
    if task in ("binary", "multiclass", "multilabel"):
        what = f"the std of the predicted probabilities is {fmt(value)}"
        classes = _num_classes(record) if task == "multiclass" else 0
        if classes > 2:  # C probabilities average 1/C: held to the same spread relative to their mean as two classes
            what += f" ({fmt(value * classes * 100)}% of their mean 1/{classes})"
            return (stage, step, value, what) if value <= cfg.constant_pred_std * 2.0 / classes else None
        return (stage, step, value, what) if value <= cfg.constant_pred_std else None
    what = f"their std is {fmt(value)}"
    return (stage, step, value, what) if value <= cfg.constant_pred_std_abs else None


def constant_predictions(record: RunRecord, cfg: DoctorConfig) -> list[Finding]:
    """``constant_predictions``: the model outputs (nearly) the same value for every sample (warning).

    Reads ``errors/<stage>/constant_pred_std``: the std of the predictions (regression; compared with
    ``errors/<stage>/target_std`` when logged, else with ``constant_pred_std_abs``) or the mean per-class std of the
    predicted probabilities (classification), and ``errors/<stage>/majority_pred_share`` (share of predictions in the
    majority class, classification; no finding when that class holds ``majority_share_one`` of the samples itself,
    like the background pixels of a segmentation: predicting it is then no collapse). With ``C > 2`` classes (the
    ``data/class_counts`` note of a multiclass task) the probabilities average ``1 / C``, so their std is held to
    ``constant_pred_std * 2 / C``: a 1,000-class model whose probabilities vary by a third of their mean (std ~3e-4)
    is not constant.

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
        true_share = _majority_share(record, stage)
        if true_share is not None and true_share >= cfg.majority_share_one:
            return []  # the data itself is that one class (background pixels): predicting it is no collapse
        held = "" if true_share is None else f", a class that holds {fmt(true_share * 100)}% of the samples"
        msg = (
            f"{fmt(value * 100)}% of the {stage} predictions are the same class{held} (step {step}). The model has "
            "collapsed to one answer, which scores as well as the class share and no better. Try: class weights or "
            "`pos_weight: auto`, the `focal` loss, a higher lr if the loss is flat, check that labels are not "
            "shuffled apart from inputs."
        )
        evidence = {"stage": stage, "majority_pred_share": value}
        if true_share is not None:
            evidence["majority_share"] = true_share
        return [Finding("constant_predictions", "warning", msg, step, evidence)]
    return []


def _majority_share(record: RunRecord, stage: str) -> float | None:
    """The share of ``stage``'s samples in its largest class, from the ``data/class_counts`` note of that stage."""
    note = record.notes.get("data/class_counts")
    if not isinstance(note, dict) or note.get("stage") != stage or not isinstance(note.get("counts"), list):
        return None
    counts = [float(c) for c in note["counts"] if isinstance(c, (int, float))]
    total = sum(counts)
    return max(counts) / total if total > 0 else None


RULES = (class_imbalance, constant_predictions)
