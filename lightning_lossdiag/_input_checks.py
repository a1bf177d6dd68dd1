"""First-batch input checks of :class:`~lightning_lossdiag.mixins.LossMixin`: mistakes a loss makes silently.

Each check reads values on the host, so the mixin runs them on the first batch of each stage only (one-time).
``describe_loss`` says what the loss expects (task and input kind); the checks compare that with what came.

Whether ``preds`` already went through a sigmoid or softmax is read from the autograd graph when there is one (the
op that produced ``preds``, looking through reshapes): exact, and free of false alarms on an untrained model whose
logits happen to lie in [0, 1]. Without a graph (``no_grad`` evaluation) the values decide, if the caller allows it.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from lightning_lossdiag.losses import describe_loss

_SHAPE_OPS = re.compile(
    r"(Unsafe)?(Squeeze|Unsqueeze|View|Reshape|Alias|Expand|Clone|Permute|Transpose|T|Select|Slice|Unbind|Split"
    r"|SplitWithSizes|Flatten|ToCopy)$"
)
_OPAQUE = re.compile(r"Compiled|CppFunction|PythonFunction|Function$")


@dataclass(frozen=True)
class Problem:
    """One input problem: an error (raise) or a warning; ``code`` is the finding code, if it has one."""

    is_error: bool
    message: str
    code: str | None = None
    evidence: dict[str, Any] = field(default_factory=dict)


def producer(t: Tensor) -> str | None:
    """The autograd op that produced ``t``, looking through reshapes (``None`` without a graph).

    Example:
        >>> producer(torch.sigmoid(torch.randn(4, 1, requires_grad=True)).squeeze(-1))
        'Sigmoid'
        >>> producer(torch.randn(3)) is None
        True
    """
    fn = t.grad_fn
    for _ in range(32):
        if fn is None:
            return None
        name = re.sub(r"Backward\d*$", "", type(fn).__name__)
        if not _SHAPE_OPS.match(name):
            return name
        fn = next((f for f, _ in fn.next_functions if f is not None), None)
    return None


def _looks_applied(preds: Tensor, op: str, by_values: bool, allow_values: bool) -> str | None:
    """How we know ``op`` was applied to ``preds`` already: ``"graph"``, ``"values"`` or ``None`` (not applied)."""
    found = producer(preds)
    if found is not None and not _OPAQUE.search(found):
        return "graph" if found == op else None
    return "values" if allow_values and by_values else None


def input_problems(
    criterion: nn.Module, preds: Tensor, target: Tensor, label: str = "", value_heuristics: bool = True
) -> list[Problem]:
    """Silent mistakes in the inputs of ``criterion``. Reads the values on the host: first batch only (one-time).

    Args:
        criterion: the loss module.
        preds: the first argument of the loss.
        target: the second argument of the loss.
        label: prefix of the messages (e.g. the term of a composite loss).
        value_heuristics: without an autograd graph, judge "already a sigmoid/softmax" from the values.

    Example:
        >>> from lightning_lossdiag.losses import build_loss
        >>> [p.code for p in input_problems(build_loss("mse"), torch.zeros(8, 1), torch.zeros(8))]
        ['shape_broadcast']
    """
    if preds.numel() == 0 or target.numel() == 0:
        return []
    traits = describe_loss(criterion)
    task = traits.task
    if task == "other" and traits.inputs == "logits":  # e.g. focal with mode=None, before its first forward
        if preds.shape == target.shape:
            task = "binary"
        elif target.ndim == preds.ndim - 1 and not target.is_floating_point():
            task = "multiclass"
    name = f"{label}`{getattr(criterion, 'name', None) or type(criterion).__name__}`"
    if task in ("regression", "binary", "multilabel"):
        return _elementwise_problems(task, traits.inputs, name, preds, target, value_heuristics)
    if task == "multiclass":
        ignore = getattr(criterion, "ignore_index", None)
        weights = _class_weights(criterion)
        return _multiclass_problems(traits.inputs, name, preds, target, ignore, value_heuristics, weights)
    return []


def _class_weights(criterion: nn.Module) -> tuple[str, Tensor] | None:
    """``(argument name, tensor)`` of a multiclass loss's per-class weights (``weight``; ``alpha`` of focal)."""
    for attr, arg in (("weight", "weight"), ("class_weights", "alpha")):
        value = getattr(criterion, attr, None)
        if isinstance(value, Tensor):
            return arg, value
    return None


def _weight_problem(name: str, weights: tuple[str, Tensor] | None, preds: Tensor) -> Problem | None:
    """A class-weight vector whose length is not the number of classes ``preds.shape[1]`` (shapes only: no read)."""
    if weights is None:
        return None
    arg, weight = weights
    n_cls = int(preds.shape[1])
    if weight.dim() == 1 and weight.numel() == n_cls:
        return None
    got = f"{weight.numel()} weights" if weight.dim() == 1 else f"a tensor of shape {tuple(weight.shape)}"
    msg = (
        f"{name}: `{arg}` must hold one weight per class, C = {n_cls} classes for `preds` of shape "
        f"{tuple(preds.shape)} (dim 1), got {got}. Give {n_cls} weights, or check the model's number of outputs."
    )
    return Problem(True, msg)


def _elementwise_problems(
    task: str, inputs: str, name: str, preds: Tensor, target: Tensor, value_heuristics: bool
) -> list[Problem]:
    if preds.shape != target.shape:
        try:
            shape = torch.broadcast_shapes(preds.shape, target.shape)
        except RuntimeError:
            return []  # not broadcastable: the loss raises its own error
        if shape != preds.shape:
            ps, ts, bs = tuple(preds.shape), tuple(target.shape), tuple(shape)
            msg = (
                f"{name}: `preds` of shape {ps} and `target` of shape {ts} broadcast to {bs}, so each prediction "
                "would be compared with every target and the loss would be silently wrong. Make the shapes equal, "
                "e.g. `preds.squeeze(-1)` or `target.view_as(preds)`."
            )
            return [Problem(True, msg, "shape_broadcast", {"preds_shape": ps, "target_shape": ts, "broadcast": bs})]
    if task == "regression":
        return []
    p, t = preds.detach().float(), target.detach().float()
    pmin, pmax, tmin, tmax = torch.stack([p.min(), p.max(), t.min(), t.max()]).tolist()  # one-time host read
    out = []
    if tmin < 0 or tmax > 1:
        msg = (
            f"{name} expects targets in [0, 1] (0/1 or soft labels), got values in [{tmin:.4g}, {tmax:.4g}]. "
            "Map labels to 0/1, or use a multiclass loss for class indices."
        )
        out.append(Problem(True, msg))
    if inputs == "probabilities" and (pmin < 0 or pmax > 1):
        msg = (
            f"{name} expects probabilities in [0, 1], but `preds` range over [{pmin:.4g}, {pmax:.4g}]. If the model "
            "outputs logits, use `bce_with_logits` on the logits (numerically stabler) instead of `bce`."
        )
        out.append(Problem(True, msg))
    in_unit = pmin >= 0 and pmax <= 1 and p.numel() >= 16
    how = _looks_applied(preds, "Sigmoid", in_unit, value_heuristics) if inputs == "logits" else None
    if how is not None:
        seen = "come straight from a sigmoid" if how == "graph" else f"all {p.numel()} lie in [0, 1]"
        msg = (
            f"{name} applies a sigmoid to its input, but the first batch's `preds` {seen} (range "
            f"[{pmin:.3g}, {pmax:.3g}]), like probabilities. A second sigmoid squeezes them into [0.5, 0.73]: the "
            "loss cannot fall below 0.31 for positives or 0.69 for negatives and gradients shrink. Return logits "
            "from the model (apply the sigmoid only for inference)."
        )
        evidence = {"preds_min": pmin, "preds_max": pmax, "detected_by": how}
        out.append(Problem(False, msg, "double_sigmoid", evidence))
    return out


def _multiclass_problems(
    inputs: str,
    name: str,
    preds: Tensor,
    target: Tensor,
    ignore: Any,
    value_heuristics: bool,
    weights: tuple[str, Tensor] | None = None,
) -> list[Problem]:
    if preds.ndim < 2:
        return [Problem(True, f"{name} expects scores of shape (N, C), got `preds` of shape {tuple(preds.shape)}.")]
    weight_problem = _weight_problem(name, weights, preds)
    if weight_problem is not None:
        return [weight_problem]
    n_cls = int(preds.shape[1])
    soft = target.shape == preds.shape and target.is_floating_point()
    expected = (int(preds.shape[0]), *preds.shape[2:])
    if not soft and tuple(target.shape) != expected:
        hint = "use `target.squeeze(1)`" if tuple(target.shape) == (*expected, 1) else "pass one index per row"
        msg = (
            f"{name} expects class indices of shape {expected} for `preds` of shape {tuple(preds.shape)}, got "
            f"`target` of shape {tuple(target.shape)}: {hint}."
        )
        return [Problem(True, msg)]
    if not soft and target.dtype != torch.long:
        msg = (
            f"{name} expects class indices of dtype torch.long, got `target` of dtype {target.dtype}: use "
            "`target.long()` (float targets must have the shape of `preds`)."
        )
        return [Problem(True, msg)]
    p = preds.detach().float()
    t = target.detach()
    if not soft and isinstance(ignore, int):
        t = torch.where(t == ignore, torch.zeros_like(t), t)
    dev = (p.sum(dim=1) - 1).abs().max()
    stats = torch.stack([p.min(), dev, t.min().float(), t.max().float()]).tolist()  # one-time host read
    pmin, dev_max, tmin, tmax = stats
    out = []
    if not soft and (tmin < 0 or tmax >= n_cls):
        msg = f"{name}: class indices must lie in [0, {n_cls - 1}] for {n_cls} classes, got [{tmin:.0f}, {tmax:.0f}]."
        out.append(Problem(True, msg))
    rows_sum_to_one = n_cls >= 2 and pmin >= 0 and dev_max < 1e-3
    how = None
    if inputs in ("logits", "log_probabilities"):
        how = _looks_applied(preds, "Softmax", rows_sum_to_one, value_heuristics)
    if how is not None:
        floor = math.log(1 + (n_cls - 1) / math.e)
        if inputs == "logits":
            what = "takes raw logits and applies log_softmax itself"
            fix = "Return the logits from the model (apply softmax only for inference)."
        else:
            what = "expects log-probabilities"
            fix = "Use `log_softmax` instead of `softmax`, or `cross_entropy` on raw logits."
        seen = "come straight from a softmax" if how == "graph" else "have rows that are non-negative and sum to 1"
        msg = (
            f"{name} {what}, but the first batch's `preds` {seen}, like probabilities. A second softmax flattens "
            f"the distribution: with {n_cls} classes the loss cannot fall below {floor:.3f} and gradients shrink. "
            f"{fix}"
        )
        evidence = {"num_classes": n_cls, "row_sum_dev": dev_max, "detected_by": how}
        out.append(Problem(False, msg, "softmax_into_cross_entropy", evidence))
    return out


__all__ = ["Problem", "input_problems", "producer"]
