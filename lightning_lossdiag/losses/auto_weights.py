r"""``pos_weight: auto`` and ``weight: auto``: class-balancing weights computed once from the training targets.

* ``pos_weight: auto`` (``bce_with_logits``): :math:`n_{neg} / n_{pos}`, one number for 1-D targets, one per column
  for 2-D (multilabel) targets.
* ``weight: auto`` (multiclass losses with class-index targets: ``cross_entropy``, ``nll``, ``multi_margin``, ...):
  inverse class frequency :math:`w_c = (1 / n_c) / \mathrm{mean}_k(1 / n_k)`, so the weights average to 1.

Everything here runs once, before training, and reads the targets on the host.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor

from lightning_lossdiag.losses._errors import LossConfigError
from lightning_lossdiag.losses._registry import AUTO_ARGUMENTS, LossSpec, get_entry, is_auto, split_spec


def _is_composite(spec: Mapping[str, Any]) -> bool:
    name = spec.get("name")
    if not isinstance(name, str):
        return False
    try:
        return get_entry(name).info.name == "composite"
    except LossConfigError:
        return False


def needs_auto_weights(spec: LossSpec | None) -> bool:
    """Whether ``spec`` (or a term of a composite spec) still has ``pos_weight: auto`` or ``weight: auto``.

    Example:
        >>> needs_auto_weights({"name": "bce_with_logits", "pos_weight": "auto"}), needs_auto_weights("mse")
        (True, False)
    """
    if not isinstance(spec, Mapping):
        return False
    if any(is_auto(spec.get(argument)) for argument in AUTO_ARGUMENTS):
        return True
    terms = spec.get("terms")
    if _is_composite(spec) and isinstance(terms, Mapping):
        return any(isinstance(t, Mapping) and needs_auto_weights(t.get("loss")) for t in terms.values())
    return False


def _pos_weight(name: str, target: Tensor) -> tuple[float | list[float], dict[str, Any]]:
    if target.dim() not in (1, 2):
        raise LossConfigError(
            f"loss {name!r}: `pos_weight: auto` needs 1-D (binary) or 2-D (multilabel) training targets, got shape "
            f"{tuple(target.shape)}"
        )
    values = target.double()
    not_binary = (values != 0) & (values != 1)
    if bool(not_binary.any()):  # one-time check of the training targets on the host, before fit
        example = values[not_binary][:3].tolist()  # one-time, host: examples for the message
        raise LossConfigError(
            f"loss {name!r}: `pos_weight: auto` needs 0/1 targets, but the training targets (dtype {target.dtype}) "
            f"hold other values, e.g. {example}; binarise the targets or give `pos_weight` explicitly"
        )
    columns = values if values.dim() == 2 else values.unsqueeze(1)
    positives = columns.sum(dim=0)
    negatives = columns.shape[0] - positives
    pos_list = [int(v) for v in positives.tolist()]  # one-time, host: counts for the message and the info
    neg_list = [int(v) for v in negatives.tolist()]  # one-time, host
    for column, (n_pos, n_neg) in enumerate(zip(pos_list, neg_list, strict=True)):
        where = f"column {column}" if values.dim() == 2 else "the targets"
        if n_pos == 0 or n_neg == 0:
            missing = "positive" if n_pos == 0 else "negative"
            raise LossConfigError(
                f"loss {name!r}: `pos_weight: auto` cannot be computed: {where} has no {missing} samples "
                f"({n_pos} positive, {n_neg} negative); give `pos_weight` explicitly or check the data"
            )
    weights = [n / p for n, p in zip(neg_list, pos_list, strict=True)]
    value: float | list[float] = weights if values.dim() == 2 else weights[0]
    return value, {"pos_weight": value, "positive_counts": pos_list, "negative_counts": neg_list}


def _class_weights(
    name: str, target: Tensor, ignore_index: int | None, num_classes: int | None
) -> tuple[list[float], dict[str, Any]]:
    if target.is_floating_point() or target.is_complex() or target.dtype == torch.bool:
        raise LossConfigError(
            f"loss {name!r}: `weight: auto` needs integer class indices as training targets, got dtype "
            f"{target.dtype}; convert the targets with `.long()` or give `weight` explicitly"
        )
    flat = target.reshape(-1).long()
    n_ignored = 0
    if ignore_index is not None:
        keep = flat != ignore_index
        n_ignored = int((~keep).sum())  # one-time, host: count for the info
        flat = flat[keep]  # one-time boolean indexing on the host copy of the targets, before fit
    if flat.numel() == 0:
        raise LossConfigError(f"loss {name!r}: `weight: auto` got no (non-ignored) training targets")
    low, high = int(flat.min()), int(flat.max())  # one-time, host
    if low < 0:
        raise LossConfigError(f"loss {name!r}: `weight: auto` needs class indices >= 0, got {low}")
    if num_classes is not None and high >= num_classes:
        raise LossConfigError(f"loss {name!r}: `weight: auto` found class index {high} with num_classes={num_classes}")
    size = num_classes if num_classes is not None else high + 1
    counts = [int(c) for c in torch.bincount(flat, minlength=size).tolist()]  # one-time, host
    empty = [c for c, n in enumerate(counts) if n == 0]
    if empty:
        raise LossConfigError(
            f"loss {name!r}: `weight: auto` cannot weight class(es) {empty}: no training samples (class counts "
            f"{counts}); give `weight` explicitly or check the labels"
        )
    inverse = [1.0 / n for n in counts]
    mean_inverse = sum(inverse) / len(inverse)
    weights = [v / mean_inverse for v in inverse]
    return weights, {"weight": weights, "class_counts": counts, "ignored": n_ignored}


def _check_applicable(name: str, argument: str, arguments: tuple[str, ...], task: str) -> None:
    if task == "regression":
        raise LossConfigError(
            f"loss {name!r} is a regression loss; `{argument}: auto` computes class-balancing weights from "
            "classification targets and does not apply: remove it"
        )
    if argument not in arguments:
        hint = " (for binary targets use bce_with_logits, which takes `pos_weight`)" if argument == "pos_weight" else ""
        raise LossConfigError(
            f"loss {name!r} takes no `{argument}` (accepted arguments: {', '.join(arguments)}), so `{argument}: auto` "
            f"cannot be used{hint}"
        )
    if argument == "weight" and task != "multiclass":
        raise LossConfigError(
            f"loss {name!r} is a {task} loss; `weight: auto` computes multiclass class weights from class-index "
            "targets. For binary or multilabel 0/1 targets use bce_with_logits with `pos_weight: auto`"
        )


def _resolve_composite(
    spec: Mapping[str, Any], targets: Any, num_classes: int | Mapping[str, int] | None
) -> tuple[LossSpec, dict[str, Any]]:
    if not isinstance(targets, Mapping):
        raise LossConfigError(
            "a composite loss with `auto` weights needs `targets` as a mapping of target key -> tensor, got "
            f"{type(targets).__name__}"
        )
    new_terms: dict[str, Any] = {}
    infos: dict[str, Any] = {}
    for term_name, term in spec["terms"].items():
        if not (isinstance(term, Mapping) and needs_auto_weights(term.get("loss"))):
            new_terms[term_name] = term
            continue
        key = term.get("target", term_name)
        if key not in targets:
            keys = ", ".join(map(repr, targets)) or "none"
            raise LossConfigError(f"term {term_name!r} reads target {key!r}, but `targets` has keys: {keys}")
        n_classes = num_classes.get(term_name) if isinstance(num_classes, Mapping) else num_classes
        try:
            resolved, info = resolve_auto_weights(term["loss"], targets[key], num_classes=n_classes)
        except LossConfigError as err:
            raise LossConfigError(f"term {term_name!r}: {err}") from None
        new_terms[term_name] = {**term, "loss": resolved}
        infos[term_name] = info
    return {**spec, "terms": new_terms}, {"terms": infos}


def resolve_auto_weights(
    spec: LossSpec, targets: Any, *, num_classes: int | Mapping[str, int] | None = None
) -> tuple[LossSpec, dict[str, Any]]:
    """Replace ``pos_weight: auto`` / ``weight: auto`` in ``spec`` with weights computed from the training targets.

    Args:
        spec: a loss spec; a spec without ``auto`` is returned unchanged with an empty info dict.
        targets: the training targets, a 1-D/2-D tensor (or anything ``torch.as_tensor`` takes); for a composite
            spec, a mapping target key -> tensor, each term resolving against its own target.
        num_classes: number of classes for ``weight: auto`` (default: largest class index + 1); a mapping term
            name -> number for composite specs.

    Returns:
        ``(resolved_spec, info)``: the spec with plain numbers/lists in place of ``auto`` (``build_loss`` turns them
        into tensors), and what was computed with the counts it came from (``{"terms": {...}}`` for composites).

    Raises:
        LossConfigError: ``auto`` on a regression loss or on a loss without that argument, targets that are not
            0/1 (``pos_weight``) or not class indices (``weight``), or a class / column without samples.

    Example:
        >>> targets = torch.tensor([0, 0, 0, 1])
        >>> spec, info = resolve_auto_weights({"name": "bce_with_logits", "pos_weight": "auto"}, targets)
        >>> spec
        {'name': 'bce_with_logits', 'pos_weight': 3.0}
        >>> spec, info = resolve_auto_weights({"name": "ce", "weight": "auto"}, targets)
        >>> spec["weight"], info["class_counts"]
        ([0.5, 1.5], [3, 1])
    """
    if not isinstance(spec, Mapping) or not needs_auto_weights(spec):
        return spec, {}
    if _is_composite(spec):
        return _resolve_composite(spec, targets, num_classes)
    if isinstance(num_classes, Mapping):
        raise LossConfigError(f"`num_classes` must be an integer or None for a single loss, got {num_classes!r}")
    name, arguments = split_spec(spec)
    entry = get_entry(name)
    target = torch.as_tensor(targets).detach().cpu()  # one-time, host: read the training targets before fit
    resolved: dict[str, Any] = dict(spec)
    info: dict[str, Any] = {"loss": name, "n_samples": int(target.shape[0]) if target.dim() else 1}
    for argument in AUTO_ARGUMENTS:
        if not is_auto(arguments.get(argument)):
            continue
        _check_applicable(name, argument, entry.info.arguments, entry.info.task)
        if argument == "pos_weight":
            resolved[argument], details = _pos_weight(name, target)
        else:
            default_ignore = -100 if "ignore_index" in entry.info.arguments else None
            ignore_index = arguments.get("ignore_index", default_ignore)
            resolved[argument], details = _class_weights(name, target, ignore_index, num_classes)
        info.update(details)
    return resolved, info


def auto_weight_scalars(spec: Any, resolved: Any, prefix: str = "loss") -> dict[str, float]:
    """The weights that ``auto`` became, as loggable scalars.

    ``loss/pos_weight`` (or ``loss/pos_weight/<i>`` per column), ``loss/weight/<class>``; composite terms as
    ``loss/<term>/...``. Arguments that were not ``auto`` are left out.

    Example:
        >>> spec = {"name": "ce", "weight": "auto"}
        >>> auto_weight_scalars(spec, resolve_auto_weights(spec, torch.tensor([0, 0, 0, 1]))[0])
        {'loss/weight/0': 0.5, 'loss/weight/1': 1.5}
    """
    if not isinstance(spec, Mapping) or not isinstance(resolved, Mapping):
        return {}
    out: dict[str, float] = {}
    if _is_composite(spec):
        for term_name, term in spec.get("terms", {}).items():
            done = resolved.get("terms", {}).get(term_name)
            if isinstance(term, Mapping) and isinstance(done, Mapping):
                out.update(auto_weight_scalars(term.get("loss"), done.get("loss"), f"{prefix}/{term_name}"))
        return out
    for argument in AUTO_ARGUMENTS:
        if not is_auto(spec.get(argument)):
            continue
        values = torch.as_tensor(resolved[argument], dtype=torch.float64).reshape(-1).tolist()  # host numbers
        if len(values) == 1 and argument == "pos_weight":
            out[f"{prefix}/{argument}"] = float(values[0])
        else:
            out.update({f"{prefix}/{argument}/{i}": float(v) for i, v in enumerate(values)})
    return out


__all__ = ["auto_weight_scalars", "needs_auto_weights", "resolve_auto_weights"]
