"""First-batch input checks of :class:`~lightning_lossdiag.mixins.LossMixin`: mistakes a loss makes silently.

Each check reads values on the host, so the mixin runs them on the first batch of each stage only (one-time).
``describe_loss`` says what the loss expects (task and input kind); the checks compare that with what came.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from lightning_lossdiag.losses import describe_loss


@dataclass(frozen=True)
class Problem:
    """One input problem: an error (raise) or a warning; ``code`` is the finding code, if it has one."""

    is_error: bool
    message: str
    code: str | None = None
    evidence: dict[str, Any] = field(default_factory=dict)


def input_problems(criterion: nn.Module, preds: Tensor, target: Tensor, label: str = "") -> list[Problem]:
    """Silent mistakes in the inputs of ``criterion``. Reads the values on the host: first batch only (one-time).

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
        return _elementwise_problems(task, traits.inputs, name, preds, target)
    if task == "multiclass":
        return _multiclass_problems(traits.inputs, name, preds, target, getattr(criterion, "ignore_index", None))
    return []


def _elementwise_problems(task: str, inputs: str, name: str, preds: Tensor, target: Tensor) -> list[Problem]:
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
        out.append(
            Problem(
                True,
                f"{name} expects targets in [0, 1] (0/1 or soft labels), got values in "
                f"[{tmin:.4g}, {tmax:.4g}]. Map labels to 0/1, or use a multiclass loss for class indices.",
            )
        )
    if inputs == "probabilities" and (pmin < 0 or pmax > 1):
        out.append(
            Problem(
                True,
                f"{name} expects probabilities in [0, 1], but `preds` range over [{pmin:.4g}, "
                f"{pmax:.4g}]. If the model outputs logits, use `bce_with_logits` on the logits "
                "(numerically stabler) instead of `bce`.",
            )
        )
    if inputs == "logits" and pmin >= 0 and pmax <= 1 and p.numel() >= 16:
        msg = (
            f"{name} applies a sigmoid to its input, but all {p.numel()} values of the first batch lie in "
            f"[{pmin:.3g}, {pmax:.3g}] like probabilities. A second sigmoid squeezes them into [0.5, 0.73]: the loss "
            "cannot fall below 0.31 for positives or 0.69 for negatives and gradients shrink. Return logits from the "
            "model (apply the sigmoid only for inference)."
        )
        out.append(Problem(False, msg, "double_sigmoid", {"preds_min": pmin, "preds_max": pmax}))
    return out


def _multiclass_problems(inputs: str, name: str, preds: Tensor, target: Tensor, ignore: Any) -> list[Problem]:
    if preds.ndim < 2:
        return [Problem(True, f"{name} expects scores of shape (N, C), got `preds` of shape {tuple(preds.shape)}.")]
    n_cls = int(preds.shape[1])
    soft = target.shape == preds.shape and target.is_floating_point()
    expected = (int(preds.shape[0]), *preds.shape[2:])
    if not soft and tuple(target.shape) != expected:
        hint = "use `target.squeeze(1)`" if tuple(target.shape) == (*expected, 1) else "pass one index per row"
        return [
            Problem(
                True,
                f"{name} expects class indices of shape {expected} for `preds` of shape "
                f"{tuple(preds.shape)}, got `target` of shape {tuple(target.shape)}: {hint}.",
            )
        ]
    if not soft and target.dtype != torch.long:
        return [
            Problem(
                True,
                f"{name} expects class indices of dtype torch.long, got `target` of dtype "
                f"{target.dtype}: use `target.long()` (float targets must have the shape of `preds`).",
            )
        ]
    p = preds.detach().float()
    t = target.detach()
    if not soft and isinstance(ignore, int):
        t = torch.where(t == ignore, torch.zeros_like(t), t)
    dev = (p.sum(dim=1) - 1).abs().max()
    pmin, dev_max, tmin, tmax = torch.stack([p.min(), dev, t.min().float(), t.max().float()]).tolist()  # one-time
    out = []
    if not soft and (tmin < 0 or tmax >= n_cls):
        out.append(
            Problem(
                True,
                f"{name}: class indices must lie in [0, {n_cls - 1}] for {n_cls} classes, got "
                f"values in [{tmin:.0f}, {tmax:.0f}].",
            )
        )
    if inputs in ("logits", "log_probabilities") and n_cls >= 2 and pmin >= 0 and dev_max < 1e-3:
        floor = math.log(1 + (n_cls - 1) / math.e)
        if inputs == "logits":
            what = "takes raw logits and applies log_softmax itself"
            fix = "Return the logits from the model (apply softmax only for inference)."
        else:
            what = "expects log-probabilities"
            fix = "Use `log_softmax` instead of `softmax`, or `cross_entropy` on raw logits."
        msg = (
            f"{name} {what}, but every row of the first batch is non-negative and sums to 1 like softmax output. "
            f"A second softmax flattens the distribution: with {n_cls} classes the loss cannot fall below "
            f"{floor:.3f} and gradients shrink. {fix}"
        )
        out.append(Problem(False, msg, "softmax_into_cross_entropy", {"num_classes": n_cls, "row_sum_dev": dev_max}))
    return out


__all__ = ["Problem", "input_problems"]
