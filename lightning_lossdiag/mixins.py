"""`LossMixin`: a LightningModule picks its loss from a spec (YAML-friendly) and hands each step to the callbacks.

Use it before ``LightningModule`` in the bases::

    class MyModel(LossMixin, L.LightningModule):
        def __init__(self, loss: LossSpec = "mse", hidden: int = 32) -> None:
            super().__init__(loss=loss)
            self.save_hyperparameters()  # LightningCLI then shows and saves `loss`
            ...

        def training_step(self, batch, batch_idx):
            x, y = batch
            return self.compute_loss(self(x), y, stage="train")

What :meth:`LossMixin.compute_loss` does for you: logs ``<stage>/loss`` (and ``<stage>/loss/<term>`` for composite
losses), hands detached ``preds``/``target`` to the lossdiag callbacks, and checks the first batch of each stage for
silent mistakes (shapes that broadcast, probabilities fed to a logits loss, class targets of the wrong dtype).

Modules that do not use the mixin hand their step over by returning ``{"loss": loss, "preds": preds, "target": y}``
from ``training_step`` / ``validation_step`` / ``test_step``; the callbacks then read it from ``outputs``.

Automatic class weights (``pos_weight: auto``, ``weight: auto``) need the training targets. They are taken, in
``setup``, from the first of:

1. ``trainer.datamodule.train_targets()`` -- a DataModule method returning the training targets as one tensor (or a
   mapping ``head -> tensor`` for composite losses). Cheap and exact: implement it when you can;
2. the batches of ``trainer.datamodule.train_dataloader()`` (or the module's own ``train_dataloader``), taking
   ``batch[1]`` of tuple batches or ``batch["target"]`` of mapping batches, concatenated.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import TYPE_CHECKING, Any

import torch
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from lightning.pytorch.utilities.model_helpers import is_overridden
from torch import Tensor, nn
from typing_extensions import override

from lightning_lossdiag._input_checks import Problem, input_problems
from lightning_lossdiag._outputs import StepOutputs, stash_outputs
from lightning_lossdiag.callbacks._base import log_scalars
from lightning_lossdiag.diagnosis.findings import Finding, Severity
from lightning_lossdiag.diagnosis.record import record_for
from lightning_lossdiag.losses import (
    CompositeLoss,
    LossSpec,
    build_loss,
    describe_loss,
    needs_auto_weights,
    resolve_auto_weights,
)
from lightning_lossdiag.losses.auto_weights import auto_weight_scalars

if TYPE_CHECKING:  # pragma: no cover
    from lightning.pytorch import LightningModule

    _Base = LightningModule
else:
    _Base = object

_CKPT_KEY = "lossdiag_resolved_loss"


class LossMixin(_Base):
    """Builds ``self.criterion`` from a loss spec and computes, logs and hands over the loss of each step.

    Args:
        *args: passed on to the next base (``LightningModule``).
        loss: a loss spec understood by :func:`lightning_lossdiag.losses.build_loss`: a registered name (``"mse"``,
            ``"huber"``, ``"focal"``, ...) or a mapping with ``name`` and arguments. A spec with ``auto`` weights is
            resolved from the training targets in ``setup("fit")`` (see the module docstring).
        **kwargs: passed on to the next base.

    Attributes:
        loss_in_progress_bar: class attribute, ``False`` by default. ``True`` puts every step's ``train/loss`` in the
            progress bar, which costs one host synchronisation per step (Lightning reads the value back after each
            batch). With ``LossMonitor`` (part of ``LossDiagnostics``) the bar shows the loss of each flush for free.
            ``val/loss`` and ``test/loss`` are always in the bar (epoch values: no per-step read).
        loss_spec: the spec as given.
        criterion: the loss module (an ``nn.Module`` attribute, so learnable loss parameters are trained and
            checkpointed); ``None`` until ``setup`` when the spec has automatic weights.

    Raises:
        LossConfigError: at construction, for an unknown loss name or bad arguments.

    Logged keys:

    ========================  ==========================================================================
    key                       when
    ========================  ==========================================================================
    ``train/loss``            each step (not sent to loggers when a callback with
                              ``writes_train_loss = True`` writes it at its flush)
    ``val/loss``              epoch mean of the validation steps
    ``test/loss``             epoch mean of the test steps
    ``<stage>/loss/<term>``   named terms of a composite loss, as above
    ``loss/pos_weight``,      what ``auto`` weights became, once at step 0 (``loss/pos_weight/<i>`` per
    ``loss/weight/<class>``   column; ``loss/<term>/...`` for the terms of a composite loss)
    ========================  ==========================================================================

    Example:
        >>> import lightning as L
        >>> class Tiny(LossMixin, L.LightningModule):
        ...     def __init__(self, loss="mse"):
        ...         super().__init__(loss=loss)
        ...         self.layer = torch.nn.Linear(2, 1)
        >>> Tiny(loss="huber").criterion is not None
        True
    """

    loss_in_progress_bar: bool = False

    def __init__(self, *args: Any, loss: LossSpec = "mse", **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.loss_spec: LossSpec = loss
        self._lossdiag_checked: set[str] = set()
        self._lossdiag_resolved: Any = None
        self.criterion: nn.Module | None = None
        if needs_auto_weights(loss):
            self._validate_auto_spec(loss)
        else:
            self.criterion = build_loss(loss)

    # ------------------------------------------------------------------ building the criterion
    @staticmethod
    def _validate_auto_spec(loss: LossSpec) -> None:
        """Fail now, not after the data is loaded, when a spec with ``auto`` weights is otherwise wrong."""
        build_loss(_without_auto(loss))  # raises LossConfigError for a bad name or argument

    @override
    def setup(self, stage: str) -> None:
        """Forget the one-time input checks and resolve ``auto`` weights from the training targets if needed.

        Subclasses that override ``setup`` must call ``super().setup(stage)``.
        """
        super().setup(stage)
        self._lossdiag_checked.clear()
        if self.criterion is None:
            self._build_with_auto_weights()
        elif stage == "fit":
            self._note_class_counts_if_cheap()

    def _build_with_auto_weights(self) -> None:
        targets = training_targets(self)
        resolved, info = resolve_auto_weights(self.loss_spec, targets)
        self.criterion = build_loss(resolved)
        self._lossdiag_resolved = resolved
        weights = auto_weight_scalars(self.loss_spec, resolved)
        shown = ", ".join(f"{k} = {v:.4g}" for k, v in weights.items())
        rank_zero_info(f"lossdiag: automatic loss weights from the training targets: {shown} (from {info})")
        if weights and self._trainer is not None:
            log_scalars(self.trainer, weights, step=0)  # once, before the first step: charted and in the report
        _note_class_counts(self.trainer, targets)

    def _note_class_counts_if_cheap(self) -> None:
        """Note the class counts for the diagnosis when the DataModule hands its targets over (``train_targets``)."""
        dm = getattr(self.trainer, "datamodule", None)
        if dm is None or self.criterion is None or not callable(getattr(dm, "train_targets", None)):
            return
        if describe_loss(self.criterion).task in ("binary", "multiclass", "multilabel", "multitask"):
            _note_class_counts(self.trainer, dm.train_targets())

    @override
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Keep the resolved spec, so ``load_from_checkpoint`` can rebuild the criterion before loading weights."""
        super().on_save_checkpoint(checkpoint)
        if self._lossdiag_resolved is not None:
            checkpoint[_CKPT_KEY] = self._lossdiag_resolved

    @override
    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Rebuild a criterion with resolved ``auto`` weights before the state dict is loaded."""
        super().on_load_checkpoint(checkpoint)
        resolved = checkpoint.get(_CKPT_KEY)
        if self.criterion is None and resolved is not None:
            self.criterion = build_loss(resolved)
            self._lossdiag_resolved = resolved

    # ------------------------------------------------------------------ the step
    def compute_loss(self, preds: Any, target: Any, stage: str = "train") -> Tensor:
        """Compute the loss of one step, log it and hand the step to the lossdiag callbacks.

        Args:
            preds: the model output (a tensor, or a mapping ``head -> tensor`` for a composite loss).
            target: the target, same structure as ``preds``.
            stage: ``"train"``, ``"val"`` or ``"test"``.

        Returns:
            The scalar loss (with its graph, for ``training_step`` to return).

        Raises:
            ValueError: on the first batch of a stage, for inputs the loss would silently get wrong.
        """
        if stage not in ("train", "val", "test"):
            raise ValueError(f"`stage` must be one of {{'train', 'val', 'test'}}, got {stage!r}")
        criterion = self.criterion
        if criterion is None:
            raise RuntimeError(
                "`criterion` is not built yet: its spec has `auto` weights, which are resolved in `setup`. "
                "Run it through a Trainer, or call `setup('fit')` after attaching one."
            )
        trainer = _attached_trainer(self)
        if stage not in self._lossdiag_checked:
            self._lossdiag_checked.add(stage)
            self._check_first_batch(trainer, criterion, preds, target)
        loss = criterion(preds, target)
        terms: dict[str, Tensor] = dict(getattr(criterion, "last_terms", {}) or {})
        if trainer is not None:
            self._log_loss(trainer, stage, loss, terms, _batch_size(preds))
        stash_outputs(self, stage, StepOutputs(loss, preds, target, terms, criterion))
        return loss

    def _log_loss(self, trainer: Any, stage: str, loss: Tensor, terms: dict[str, Tensor], batch_size: int) -> None:
        has_logger = bool(getattr(trainer, "loggers", None))  # avoids Lightning's "no logger configured" warning
        if stage == "train":
            writes = any(getattr(cb, "writes_train_loss", False) is True for cb in getattr(trainer, "callbacks", []))
            opts: dict[str, Any] = {"on_step": True, "on_epoch": False, "logger": has_logger and not writes}
        else:
            # sync_dist with on_epoch reduces once at epoch end (not per step): every rank, and rank 0's logger, sees
            # the loss over the whole validation set under DDP, so schedulers and early stopping agree across ranks.
            opts = {"on_step": False, "on_epoch": True, "logger": has_logger, "sync_dist": True}
        # A step-level value in the progress bar is read back to the host after every batch (Lightning turns it into a
        # number): only on request. LossMonitor shows the training loss there at each flush instead, for free.
        prog_bar = stage != "train" or bool(self.loss_in_progress_bar)
        self.log(f"{stage}/loss", loss, prog_bar=prog_bar, batch_size=batch_size, **opts)
        for name, value in terms.items():
            self.log(f"{stage}/loss/{name}", value, batch_size=batch_size, **opts)

    def _check_first_batch(self, trainer: Any, criterion: nn.Module, preds: Any, target: Any) -> None:
        # one-time host read: the checks look at the values of the first batch of each stage only
        # During fit the training batch is judged from its autograd graph; validation runs without one, so the
        # value heuristics (logits that happen to lie in [0, 1]) are left to stand-alone validate/test runs.
        in_fit = trainer is not None and str(getattr(trainer.state.fn, "value", trainer.state.fn)) == "fit"
        problems = list(_problems(criterion, preds, target, value_heuristics=not in_fit))
        step = int(trainer.global_step) if trainer is not None else None
        record = record_for(trainer) if trainer is not None else None
        for p in problems:
            if p.code is not None and record is not None:
                severity: Severity = "error" if p.is_error else "warning"
                record.add_finding(Finding(p.code, severity, p.message, step=step, evidence=p.evidence))
            if not p.is_error:
                rank_zero_warn(p.message)
        errors = [p.message for p in problems if p.is_error]
        if errors:
            raise ValueError("\n".join(errors))


def _problems(criterion: nn.Module, preds: Any, target: Any, value_heuristics: bool) -> Iterable[Problem]:
    """Problems of the criterion, or of each term of a composite loss on its own head."""
    if isinstance(criterion, CompositeLoss) and isinstance(preds, Mapping) and isinstance(target, Mapping):
        for name, term in criterion.losses.items():
            p, t = preds.get(criterion.output_keys[name]), target.get(criterion.target_keys[name])
            if isinstance(p, Tensor) and isinstance(t, Tensor):
                yield from input_problems(term, p, t, f"term {name!r}: ", value_heuristics)
        return
    if isinstance(preds, Tensor) and isinstance(target, Tensor):
        yield from input_problems(criterion, preds, target, "", value_heuristics)


def _note_class_counts(trainer: Any, targets: Any) -> None:
    """Put ``{"stage": "train", "counts": [...]}`` (and ``"heads"`` for mappings) in the run record's notes."""
    if isinstance(targets, Mapping):
        heads = {str(k): c for k, v in targets.items() if (c := class_counts(v)) is not None}
        if heads:
            note = {"stage": "train", "counts": next(iter(heads.values())), "heads": heads}
            record_for(trainer).notes["data/class_counts"] = note
        return
    counts = class_counts(targets)
    if counts is not None:
        record_for(trainer).notes["data/class_counts"] = {"stage": "train", "counts": counts}


def _without_auto(spec: Any) -> Any:
    """A copy of ``spec`` with every ``"auto"`` value removed (to validate the rest of it early)."""
    if isinstance(spec, Mapping):
        return {k: _without_auto(v) for k, v in spec.items() if not (isinstance(v, str) and v == "auto")}
    if isinstance(spec, list):
        return [_without_auto(v) for v in spec]
    return spec


def _attached_trainer(module: Any) -> Any:
    try:
        return module.trainer
    except RuntimeError:  # not attached: compute_loss still works in plain unit tests
        return None


def _batch_size(preds: Any) -> int:
    if isinstance(preds, Tensor):
        return int(preds.shape[0]) if preds.ndim else 1  # shapes are host metadata, not a read
    if isinstance(preds, Mapping):
        for v in preds.values():
            if isinstance(v, Tensor):
                return _batch_size(v)
    return 1


def training_targets(module: Any) -> Tensor | dict[str, Tensor]:
    """The training targets of ``module``'s Trainer, for ``auto`` weights (see the module docstring for the order).

    Raises:
        RuntimeError: when neither the DataModule nor the module offers the training data.
    """
    trainer = module.trainer
    dm = getattr(trainer, "datamodule", None)
    if dm is not None and callable(getattr(dm, "train_targets", None)):
        return dm.train_targets()
    if dm is not None:
        loader = dm.train_dataloader()
    elif is_overridden("train_dataloader", module):
        loader = module.train_dataloader()
    else:
        raise RuntimeError(
            "The loss spec has `auto` weights, which are computed from the training targets, but the Trainer has "
            "no DataModule and the module defines no `train_dataloader`. Use a DataModule (ideally with a "
            "`train_targets()` method), or give the weights explicitly."
        )
    return concat_targets(loader)


def concat_targets(batches: Iterable[Any]) -> Tensor | dict[str, Tensor]:
    """Concatenate ``batch[1]`` (tuple batches) or ``batch["target"]`` (mapping batches) over an iterable.

    Example:
        >>> concat_targets([(torch.zeros(2, 3), torch.tensor([0, 1])), (torch.zeros(1, 3), torch.tensor([1]))])
        tensor([0, 1, 1])
    """
    parts: list[Any] = []
    for batch in batches:
        if isinstance(batch, Mapping):
            if "target" not in batch:
                raise ValueError(f"mapping batches must hold a 'target' key, got keys {sorted(batch)}")
            parts.append(batch["target"])
        elif isinstance(batch, (tuple, list)) and len(batch) >= 2:
            parts.append(batch[1])
        else:
            raise ValueError(f"batches must be (inputs, target, ...) or mappings with 'target', got {type(batch)}")
    if not parts:
        raise ValueError("the training dataloader yielded no batches, so `auto` weights cannot be computed")
    if isinstance(parts[0], Mapping):
        return {k: torch.cat([p[k] for p in parts]) for k in parts[0]}
    return torch.cat(list(parts))


def class_counts(targets: Any) -> list[int] | None:
    """Counts per class of integer (or 0/1) targets; ``None`` for other targets (one-time host read, at setup).

    Example:
        >>> class_counts(torch.tensor([0, 2, 2, 1, 2]))
        [1, 1, 3]
        >>> class_counts(torch.tensor([0.0, 1.0, 1.0]))
        [1, 2]
    """
    if not isinstance(targets, Tensor) or targets.numel() == 0:
        return None
    flat = targets.detach().reshape(-1)
    if flat.is_floating_point():
        if not bool(((flat == 0) | (flat == 1)).all()):  # one-time host read at setup
            return None
        flat = flat.long()
    if flat.dtype == torch.bool:
        flat = flat.long()
    if int(flat.min()) < 0:  # one-time host read at setup
        return None
    return [int(c) for c in torch.bincount(flat).tolist()]  # one-time host read at setup


__all__ = ["LossMixin", "class_counts", "concat_targets", "training_targets"]
