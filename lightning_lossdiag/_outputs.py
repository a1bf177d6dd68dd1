"""The hand-off between a LightningModule and the callbacks: detached predictions, targets and loss terms.

A module hands its step's tensors to the callbacks in one of two ways:

1. ``LossMixin.compute_loss`` calls :func:`stash_outputs` (nothing to do for the user);
2. a step returns a mapping ``{"loss": ..., "preds": ..., "target": ...}`` and the callbacks read it from
   ``outputs`` in their ``on_*_batch_end`` hooks.

Callbacks call :func:`fetch_outputs`, which prefers the stash and falls back to the returned mapping. Nothing here
reads a tensor on the host.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from torch import Tensor, nn

Stage = Literal["train", "val", "test", "predict"]
STAGES: tuple[str, ...] = ("train", "val", "test")

_STASH_ATTR = "_lossdiag_stash"
_FETCHED_ATTR = "_lossdiag_fetched"  # (the step's returned value, stage, what fetch_outputs made of it)


@dataclass
class StepOutputs:
    """What one step hands to the callbacks. All tensors are detached and stay on the model's device.

    Attributes:
        loss: the scalar loss of the step (detached), or ``None``.
        preds: the model output the loss was computed on (a tensor, or a mapping of named heads for composite losses).
        target: the target, same structure as ``preds``.
        terms: named loss terms of a composite loss (detached scalars).
        criterion: the loss module, used to infer the task (regression, binary, multiclass, multilabel).
    """

    loss: Tensor | None = None
    preds: Any = None
    target: Any = None
    terms: dict[str, Tensor] = field(default_factory=dict)
    criterion: nn.Module | None = None


def _detach(value: Any) -> Any:
    """``value`` with every tensor cut from autograd. A tensor outside any graph is kept as it is (no op to run).

    Lightning already hands ``on_train_batch_end`` detached tensors; a ``detach`` per tensor per step would only add
    dispatcher work.
    """
    if isinstance(value, Tensor):
        return value.detach() if value.requires_grad else value
    if isinstance(value, Mapping):
        return {k: _detach(v) for k, v in value.items()}
    return value


def stash_outputs(module: nn.Module, stage: str, outputs: StepOutputs) -> None:
    """Keep ``outputs`` on ``module`` for the callbacks of this step (replaces the previous step's).

    Example:
        >>> m = nn.Linear(1, 1)
        >>> stash_outputs(m, "train", StepOutputs(loss=torch.tensor(1.0)))
        >>> fetch_outputs(m, None, "train").loss
        tensor(1.)
    """
    outputs.loss = _detach(outputs.loss)
    outputs.preds = _detach(outputs.preds)
    outputs.target = _detach(outputs.target)
    outputs.terms = {k: _detach(v) for k, v in outputs.terms.items()}
    stash: dict[str, StepOutputs] = module.__dict__.setdefault(_STASH_ATTR, {})
    stash[stage] = outputs


def fetch_outputs(module: nn.Module, step_output: Any, stage: str) -> StepOutputs | None:
    """Return what the step of ``stage`` handed over, or ``None`` when it handed nothing.

    ``step_output`` is the ``outputs`` argument of Lightning's ``on_*_batch_end`` hooks. The stash of
    ``LossMixin.compute_loss`` wins; otherwise a returned mapping with ``preds`` and ``target`` is used.
    Several callbacks may fetch the same step: a returned value is read (and detached) once, and the later callbacks
    of that step get the same :class:`StepOutputs`. :func:`clear_outputs` is called at the start of the next step.

    Example:
        >>> m, out = nn.Linear(1, 1), {"loss": torch.tensor(0.5), "preds": torch.zeros(2), "target": torch.ones(2)}
        >>> first = fetch_outputs(m, out, "train")
        >>> first.loss, fetch_outputs(m, out, "train") is first, fetch_outputs(m, dict(out), "train") is first
        (tensor(0.5000), True, False)
    """
    stash: dict[str, StepOutputs] = module.__dict__.get(_STASH_ATTR, {})
    if stage in stash:
        return stash[stage]
    if step_output is None:
        return None
    seen = module.__dict__.get(_FETCHED_ATTR)
    if seen is not None and seen[0] is step_output and seen[1] == stage:  # another callback already read this step
        return seen[2]  # type: ignore[no-any-return]
    fetched = _from_step_output(step_output, stage)
    # holding the step's own object (not its id) makes the check exact; it is replaced at the next step
    module.__dict__[_FETCHED_ATTR] = (step_output, stage, fetched)
    return fetched


def _from_step_output(step_output: Any, stage: str) -> StepOutputs | None:
    """Read a step's returned value: a mapping with ``preds`` and ``target`` (and ``loss``), or the loss alone."""
    if isinstance(step_output, Mapping) and "preds" in step_output and "target" in step_output:
        loss = step_output.get("loss")
        return StepOutputs(
            loss=_detach(loss) if isinstance(loss, Tensor) else None,
            preds=_detach(step_output["preds"]),
            target=_detach(step_output["target"]),
        )
    if isinstance(step_output, Tensor) and stage == "train":
        return StepOutputs(loss=_detach(step_output))
    if isinstance(step_output, Mapping) and isinstance(step_output.get("loss"), Tensor):
        return StepOutputs(loss=_detach(step_output["loss"]))
    return None


def clear_outputs(module: nn.Module, stage: str) -> None:
    """Forget the stash of ``stage`` (called at the start of each batch so stale tensors are never reused)."""
    stash: dict[str, StepOutputs] | None = module.__dict__.get(_STASH_ATTR)
    if stash is not None:
        stash.pop(stage, None)
    seen = module.__dict__.get(_FETCHED_ATTR)
    if seen is not None and seen[1] == stage:
        del module.__dict__[_FETCHED_ATTR]


def lightning_stage(trainer_state_stage: Any) -> str:
    """Map Lightning's ``RunningStage`` (``"train"``, ``"validate"``, ``"sanity_check"``, ...) to our stage names."""
    value = str(getattr(trainer_state_stage, "value", trainer_state_stage))
    return {"train": "train", "validate": "val", "sanity_check": "val", "test": "test", "predict": "predict"}.get(
        value, value
    )


__all__ = ["STAGES", "Stage", "StepOutputs", "clear_outputs", "fetch_outputs", "lightning_stage", "stash_outputs"]

_ = torch  # torch is used in doctests
