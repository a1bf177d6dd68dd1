"""NonFiniteGuard: what to do when a loss or gradient turns NaN/inf, decided on the device.

Before every optimizer step the guard checks, on the device, whether the step's loss (seen in
``on_before_backward``) and the optimizer's gradients (one fused ``torch._foreach_norm``: NaN and inf propagate into
the L2 norm of each gradient; inside :class:`~lightning_lossdiag.LossDiagnostics` the gradient monitor's norms of the
step are reused) are finite. What happens next is the policy.

Per step the guard spends three small kernels (the finiteness flag, with the step's loss folded in) and, under
``"skip"``/``"stop"``, :func:`~lightning_lossdiag.callbacks._guard_ops.drop_update`: one pass over the gradients.
Counting is deferred: each step appends references to a
:class:`~lightning_lossdiag.callbacks._guard_rows.GuardRows`, reduced in one batch at the flush.
"""

from __future__ import annotations

import operator
import os
from itertools import chain
from typing import Any, Literal

import torch
from lightning.pytorch import Callback, LightningModule, Trainer
from torch import Tensor
from torch.optim import Optimizer
from typing_extensions import override

from lightning_lossdiag.callbacks._amp import grad_scaler, scaler_skip_mask
from lightning_lossdiag.callbacks._base import SUMMED_SHARDS, FlushSchedule, log_scalars, refuse_sharded
from lightning_lossdiag.callbacks._grad_groups import clean_name, host_floats
from lightning_lossdiag.callbacks._grad_window import NormPath, norm_path, param_norms
from lightning_lossdiag.callbacks._guard_ops import (
    IS_SPARSE,
    drop_update,
    fused_skip_target,
    int_view,
    merge_nonfinite,
    step_grads,
)
from lightning_lossdiag.callbacks._guard_rows import FOLD_ROWS, NO_STEP, GuardRows, loss_probe, step_ok
from lightning_lossdiag.callbacks._shards import local_grads, local_parts, shard_reducer
from lightning_lossdiag.dashboards.writers import log_dirs
from lightning_lossdiag.diagnosis.record import record_for

Policy = Literal["warn", "skip", "stop", "raise"]
POLICIES: tuple[str, ...] = ("warn", "skip", "stop", "raise")
STOP_CHECKPOINT = "nonfinite_stop.ckpt"


class NonFiniteError(RuntimeError):
    """Raised by ``NonFiniteGuard(policy="raise")`` at the first step with a NaN/inf loss or gradient."""


class NonFiniteGuard(Callback):
    """Watch for NaN/inf losses and gradients on the device and apply a policy.

    Policies:

    * ``"skip"`` (default): a step with a non-finite loss or gradient gets all its gradients zeroed on the device
      (:func:`drop_update`: one pass in integer arithmetic, as ``NaN * 0.0`` stays NaN), with no host read, so the
      update is dropped and the weights, and every checkpoint saved later, stay finite. With plain SGD the
      parameters do not move; optimizers with momentum or weight decay still move them by their own (finite) state.
      A fused torch ``Adam``/``AdamW``/``SGD``/``Adagrad`` (``fused=True``, no ``GradScaler``) is instead handed the
      flag as ``optimizer.found_inf`` (:func:`fused_skip_target`), taken back after the batch: its kernel skips the
      whole step on the device, weights, moments and step count included, and the gradients are not touched. The
      run never stops.
    * ``"warn"``: only the device check and counters; the update is applied as it is, so one NaN gradient makes the
      weights NaN for the rest of the run (and in the checkpoints saved after it). The notes
      ``loss/first_nonfinite_step`` / ``grad/first_nonfinite_step`` and ``grad/nonfinite_params`` reach the run
      record at the next flush (one host read) and the Doctor reports them. The run never stops.
    * ``"stop"``: as ``"skip"``, and at the next flush (one read) if a non-finite step was seen: save
      ``<log_dir>/nonfinite_stop.ckpt`` (finite weights, thanks to the skip) and set ``trainer.should_stop``. Under
      DDP the decision is reduced with ``reduce_boolean_decision(all=False)``, so every rank stops together.
    * ``"raise"``: checks every step on the host -- this costs ONE host synchronisation per optimizer step -- and
      raises :class:`NonFiniteError` naming the step before the update is applied. Lightning then calls
      ``on_exception`` (the Doctor writes its report) and finalises the loggers, so logs are flushed.

    Steps are ``trainer.global_step`` after the optimizer step (the convention of the monitors' charts).

    | key | when | meaning |
    |---|---|---|
    | ``nonfinite/skipped_steps`` | flush (``"skip"``, ``"stop"``) | cumulative number of dropped updates |

    Notes in the run record (set at flushes, not overwritten when a monitor set them first):
    ``nonfinite/policy``, ``nonfinite/steps`` (count), ``loss/first_nonfinite_step``, ``grad/first_nonfinite_step``,
    ``grad/nonfinite_params``, ``nonfinite/stop_checkpoint`` (path, ``"stop"`` only).

    Under DDP the losses differ between ranks (the gradients do not: they are all-reduced). So that every rank makes
    the same decision without a collective, ``"skip"``, ``"stop"`` and ``"raise"`` act on the gradients alone when
    ``world_size > 1`` (a NaN loss on any rank makes the all-reduced gradients NaN on every rank); a non-finite loss
    whose gradients stay finite is only counted. At each flush the first
    non-finite loss step is merged over all ranks (one ``all_gather``, read with the flush's one transfer), so the
    note ``loss/first_nonfinite_step`` of rank 0 (the only rank that writes) knows about a NaN loss on any rank.
    The guard's own counters and :meth:`state_dict` stay per rank (``first_loss_step`` is this rank's).

    Under FSDP2 (``ModelParallelStrategy``) and FSDP1 (``FSDPStrategy``, ``use_orig_params=True``) each rank holds
    pieces of every gradient: the per-parameter norms of the pieces are summed over the shards at every step (one
    ``all_reduce`` a step, on the device), so every rank skips, stops or raises at the same step, even when the bad
    element lies in one rank's piece. DeepSpeed is refused at fit start (``"warn"`` only records and is allowed).

    Args:
        policy: ``"skip"`` (default), ``"warn"``, ``"stop"`` or ``"raise"`` (see above).
        every_n_steps: flush interval in optimizer steps; ``None`` takes the Trainer's ``log_every_n_steps``.

    Example:
        >>> NonFiniteGuard(policy="skip").state_key
        "NonFiniteGuard{'policy': 'skip'}"
    """

    def __init__(self, policy: Policy = "skip", every_n_steps: int | None = None) -> None:
        if policy not in POLICIES:
            raise ValueError(f"`policy` must be one of {POLICIES}, got {policy!r}")
        self.policy: Policy = policy
        self.every_n_steps = every_n_steps
        self._schedule = FlushSchedule(every_n_steps)
        self._losses: list[Tensor] = []  # detached losses of the optimizer step in progress (one per backward)
        self._rows: dict[tuple[int, ...], GuardRows] = {}  # per set of gradient tensors: steps since the last fold
        self._last_rows: tuple[list[Tensor], GuardRows] | None = None  # (parameter list, its rows): per-step lookup
        self._param_names: dict[int, str] = {}
        self._grads_only = False  # DDP: a step is bad when its (all-reduced) gradients are
        self._found_inf_set: list[Optimizer] = []  # fused optimizers told to skip or not this batch (cleared after)
        #: per optimizer (by id, within one fit): its :func:`fused_skip_target`, decided at its first step
        self._fused_targets: dict[int, Optimizer | None] = {}
        self._reducers: dict[int, Any] = {}  # FSDP2/FSDP1: shard reducers per parameter list
        #: per optimizer (by id, within one fit): its parameters and their norm path (:meth:`_optimizer_params`)
        self._plans: dict[int, tuple[list[Tensor], NormPath | None]] = {}
        self._ok: Tensor | None = None  # where the step's skip flag is written (reused: no allocation per step)
        self._found_inf: Tensor | None = None  # the same for the flag handed to a fused optimizer as `found_inf`
        self._batch_idx = -1
        self.nonfinite_steps = 0
        self.skipped_steps = 0
        self.first_loss_step = -1
        self.first_grad_step = -1
        self.bad_params: list[str] = []
        #: a GradientMonitor whose per-gradient norms of the step are reused for the finiteness test (set by
        #: LossDiagnostics; the norms are computed before this guard's hook, so one pass over the gradients is saved)
        self.norm_source: Any = None

    @property
    @override
    def state_key(self) -> str:
        return self._generate_state_key(policy=self.policy)

    # ---- hooks -----------------------------------------------------------------------------------------------
    @override
    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        if stage == "fit" and self.policy != "warn":  # FSDP2 and FSDP1: decided on all shards; DeepSpeed: refused
            refuse_sharded(
                trainer, "NonFiniteGuard", "decision to skip a step", "`on_nonfinite='warn'`", allowed=SUMMED_SHARDS
            )

    @override
    def on_fit_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._param_names = {id(p): clean_name(name) for name, p in pl_module.named_parameters()}
        self._rows = {}
        self._last_rows = None
        self._losses = []
        self._grads_only = trainer.world_size > 1
        self._fused_targets = {}
        self._reducers = {}
        self._plans = {}
        record_for(trainer).notes["nonfinite/policy"] = self.policy
        if self.policy != "warn":  # a sharded set-up whose shards cannot be summed fails now, not at the first step
            for opt in getattr(trainer, "optimizers", None) or []:
                self._shard_reduce(self._optimizer_params(opt)[0], trainer)

    @override
    def on_train_batch_start(self, trainer: Trainer, pl_module: LightningModule, batch: Any, batch_idx: int) -> None:
        self._batch_idx = batch_idx

    @override
    def on_before_backward(self, trainer: Trainer, pl_module: LightningModule, loss: Tensor) -> None:
        self._losses.append(loss.detach())  # a reference: no kernel, no host read

    @override
    def on_before_optimizer_step(self, trainer: Trainer, pl_module: LightningModule, optimizer: Optimizer) -> None:
        losses, self._losses = self._losses, []
        probe = loss_probe(losses)  # usually the loss itself: finite exactly when it is
        step, params, grads, norms = self._step_grads(trainer, optimizer)
        if not grads and probe is None:
            return
        if self.policy == "raise":
            self._raise_if_bad(trainer, probe, norms, params, step)
            return
        rows = self._rows_for(params, norms, probe)
        rows.push(step, probe if probe is not None else self._no_mark(rows.device), norms)
        if len(rows.steps) >= FOLD_ROWS:
            rows.fold(self._grads_only, self.policy != "warn")
        if self.policy in ("skip", "stop") and grads:
            # Under DDP act on the all-reduced gradients only: the same on every rank, so no rank skips or stops
            # alone (the replicas would drift apart, or the others would wait forever on the next collective).
            key = id(optimizer)
            if key not in self._fused_targets:  # decided once per optimizer and fit (its class, the precision)
                self._fused_targets[key] = fused_skip_target(optimizer, trainer)
            target = self._fused_targets[key]
            probe_used = None if self._grads_only else probe
            if target is not None:  # the fused kernel skips the update itself: no pass over the gradients
                # 1.0 for a bad step, written straight as float32 into one reused tensor (the optimizer holds it
                # until the batch ends, when it is taken back; the next step writes after, in stream order)
                found_inf = step_ok(norms, probe_used, self._found_inf, rows.zeros, found_inf=True)
                if found_inf is not None:
                    self._found_inf = found_inf
                    target.found_inf = found_inf  # type: ignore[attr-defined]
                    self._found_inf_set.append(target)
                return
            ok = step_ok(norms, probe_used, self._ok, rows.zeros)
            if ok is not None:
                self._ok = ok  # used right away, never kept: the next step writes its flag into the same tensor
                # Last gradient first: the norms were just computed first to last, so the pass starts on memory
                # still in cache, and it leaves the first gradients the warmest for the optimizer, which starts
                # there (~0.1 ms a step on the CPU of benchmarks/overhead.py, A/B in the loop).
                drop_update(grads[::-1], ok, rows.int_view)

    def _shard_reduce(self, params: list[Tensor], trainer: Trainer) -> Any:
        """FSDP2/FSDP1: the reducer of the parameters' shards (decided once per parameter list), else ``None``."""
        key = id(params[0]) if params else 0
        if key not in self._reducers:
            self._reducers[key] = shard_reducer(params, getattr(getattr(trainer, "strategy", None), "model", None))
        return self._reducers[key]

    def _step_grads(
        self, trainer: Trainer, optimizer: Optimizer
    ) -> tuple[int, list[Tensor], list[Tensor], Tensor | None]:
        """The step, the parameters with a dense gradient, those gradients, and their norms (``None``: no gradient).

        Inside :class:`~lightning_lossdiag.LossDiagnostics` the gradient monitor measured the same gradients just
        before this hook, in the same call: they are taken from it (:meth:`GradientMonitor.take_latest`), so there is
        neither a walk over the optimizer's groups nor a second norm. Under fp16 a step the ``GradScaler`` found
        non-finite gets zero norms (the monitor's or these): the scaler skips it and lowers the scale itself, so
        the guard neither drops it a second time nor reports it.
        """
        source = self.norm_source
        seen = source.take_latest(optimizer) if source is not None else None
        if seen is not None:
            step, params, grads, norms = seen
            reduce = self._shard_reduce(params, trainer)
            if reduce is None:
                return seen  # type: ignore[no-any-return]
            # sharded: the monitor measured this rank's pieces (a row over every parameter, the same layout on every
            # rank); the decision must be the same on every rank
            return step, params, local_parts(grads), reduce(norms[None], source.norm_type)[0]
        params, path = self._optimizer_params(optimizer)
        reduce = self._shard_reduce(params, trainer)
        grads = [g for q in params if (g := q.grad) is not None]
        measured = grads
        if reduce is not None:  # sharded: a row over every parameter on every rank (a rank without a piece: empty)
            measured = grads = local_grads(params)
            path = None
        elif len(grads) != len(params) or any(map(IS_SPARSE, grads)):  # some without (dense) gradient: this step's
            pairs = step_grads(optimizer)
            params, grads, path = [p for p, _ in pairs], [g for _, g in pairs], None
            measured = grads
        step = trainer.global_step + 1
        norms = param_norms(measured, 2.0, path=path) if grads else None  # float32 L2: NaN/inf propagate
        if reduce is not None and norms is not None:  # sharded: one all_reduce a step, the same verdict on every rank
            norms = reduce(norms[None], 2.0)[0]
        skip = scaler_skip_mask(grad_scaler(trainer), optimizer)
        if skip is not None and norms is not None:  # fp16: the GradScaler skips this step itself, not the guard
            norms.masked_fill_(skip, 0.0)  # in place: made just above (one kernel; where() against zeros took 3)
        return step, params, grads, norms

    def _optimizer_params(self, optimizer: Optimizer) -> tuple[list[Tensor], NormPath | None]:
        """Every parameter of ``optimizer`` and the :func:`norm_path` of their gradients' L2 norms.

        Decided once per set of parameters: the same list object comes back while the optimizer's groups hold the
        same parameters (checked by identity at each step, at C speed), so the rows of the guard are found without
        a key per step and the norms are taken without per-step dtype/device checks. A group added or changed
        (``add_param_group``) gives a new list.
        """
        groups = optimizer.param_groups
        cached = self._plans.get(id(optimizer))
        if cached is not None:
            params = cached[0]
            if len(params) == sum(len(g["params"]) for g in groups) and all(
                map(operator.is_, params, chain.from_iterable(g["params"] for g in groups))
            ):
                return cached
        params = [q for g in groups for q in g["params"]]
        plan = self._plans[id(optimizer)] = (params, norm_path(params, 2.0))
        return plan

    @override
    def on_train_batch_end(
        self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        self._clear_found_inf()
        step = int(trainer.global_step)
        if self._schedule.is_flush(step, trainer):
            self._flush(trainer, act=True)
            self._schedule.mark(step)

    @override
    def on_train_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._clear_found_inf()
        self._flush(trainer, act=False)

    @override
    def on_exception(self, trainer: Trainer, pl_module: LightningModule, exception: BaseException) -> None:
        self._clear_found_inf()

    def _clear_found_inf(self) -> None:
        """Take back ``found_inf`` from the fused optimizers, so no later ``step`` outside this batch reads it."""
        for opt in self._found_inf_set:
            if "found_inf" in vars(opt):
                del opt.found_inf  # type: ignore[attr-defined]
        self._found_inf_set = []

    # ---- device bookkeeping ----------------------------------------------------------------------------------
    def _rows_for(self, params: list[Tensor], norms: Tensor | None, probe: Tensor | None) -> GuardRows:
        """The rows of this set of gradient tensors (one per optimizer, or per subset with gradients)."""
        last = self._last_rows
        if last is not None and last[0] is params:  # the same list object as the step before: the usual case
            return last[1]
        key = tuple(map(id, params))
        rows = self._rows.get(key)
        if rows is None:
            names = [self._param_names.get(i, f"param[{n}]") for n, i in enumerate(key)]
            device = norms.device if norms is not None else probe.device  # type: ignore[union-attr]
            rows = self._rows[key] = GuardRows(names, device)
            rows.int_view = int_view(params)
        self._last_rows = (params, rows)
        return rows

    @staticmethod
    def _no_mark(device: torch.device) -> Tensor:
        """The mark of a step whose loss the guard did not see (a finite one)."""
        return torch.zeros((), device=device)

    def _read(self, trainer: Trainer | None = None) -> int | None:
        """Fold the device counters into the host totals: ONE host transfer (flush, train end, checkpoint save).

        With a ``trainer`` under DDP (flushes only: every rank calls it at the same step), the first non-finite loss
        step over all ranks is merged on the device before that transfer and returned (``-1``: none); else ``None``.
        """
        dropping = self.policy in ("skip", "stop")
        for rows in self._rows.values():
            rows.fold(self._grads_only, dropping)
        folded = [r for r in self._rows.values() if r.totals is not None]
        merge = trainer is not None and trainer.world_size > 1
        if not folded and not merge:
            return None
        parts: list[Tensor] = []
        for rows in folded:
            parts.append(rows.totals)  # type: ignore[arg-type]
            if rows.bad_params is not None:
                parts.append(rows.bad_params)
        if merge:
            parts.append(self._first_loss_all_ranks(trainer, folded))
        host = host_floats(parts)  # flush: the one host read
        merged: int | None = None
        if merge:
            merged = int(host[-1]) if host[-1] < NO_STEP else -1
            host = host[:-2]
        at = 0
        for rows in folded:
            bad, skipped, first_loss, first_grad = (int(x) for x in host[at : at + 4])
            at += 4
            self.nonfinite_steps += bad
            self.skipped_steps += skipped
            if first_loss < NO_STEP and (self.first_loss_step < 0 or first_loss < self.first_loss_step):
                self.first_loss_step = first_loss
            if first_grad < NO_STEP and (self.first_grad_step < 0 or first_grad < self.first_grad_step):
                self.first_grad_step = first_grad
            if rows.bad_params is not None:
                for name, x in zip(rows.names, host[at : at + len(rows.names)], strict=True):
                    if x > 0 and name not in self.bad_params:
                        self.bad_params.append(name)
                at += len(rows.names)
            rows.reset()
        return merged

    def _first_loss_all_ranks(self, trainer: Any, folded: list[GuardRows]) -> Tensor:
        """This rank's first non-finite loss step (host total and folded rows) merged over ranks; no host read."""
        firsts = [rows.totals[2] for rows in folded if rows.totals is not None]
        if firsts:
            first = torch.stack(firsts).amin()
        else:
            first = torch.full((), NO_STEP, dtype=torch.int64, device=trainer.strategy.root_device)
        if self.first_loss_step >= 0:
            first = first.clamp(max=self.first_loss_step)
        return merge_nonfinite(trainer, torch.zeros_like(first), first)

    def _flush(self, trainer: Trainer, act: bool) -> None:
        merged = self._read(trainer)
        loss_step = self.first_loss_step if merged is None else merged  # under DDP: the first over all ranks
        notes = record_for(trainer).notes
        notes["nonfinite/policy"] = self.policy
        notes["nonfinite/steps"] = self.nonfinite_steps
        if loss_step >= 0:
            notes.setdefault("loss/first_nonfinite_step", loss_step)
        if self.first_grad_step >= 0:
            notes.setdefault("grad/first_nonfinite_step", self.first_grad_step)
        if self.bad_params:
            notes.setdefault("grad/nonfinite_params", list(self.bad_params))
        if self.policy in ("skip", "stop") and self._rows:
            log_scalars(trainer, {"nonfinite/skipped_steps": float(self.skipped_steps)})
        if act and self.policy == "stop":
            self._maybe_stop(trainer)

    def _maybe_stop(self, trainer: Trainer) -> None:
        decision = trainer.strategy.reduce_boolean_decision(self.nonfinite_steps > 0, all=False)
        if not decision or trainer.should_stop:
            return
        dirs = log_dirs(trainer)
        folder = dirs[0] if dirs else str(trainer.default_root_dir)
        path = os.path.join(folder, STOP_CHECKPOINT)
        trainer.save_checkpoint(path)  # every rank calls it (the decision was reduced); rank 0 writes
        record_for(trainer).notes["nonfinite/stop_checkpoint"] = path
        trainer.should_stop = True

    # ---- "raise" ---------------------------------------------------------------------------------------------
    def _raise_if_bad(
        self,
        trainer: Trainer,
        probe: Tensor | None,
        norms: Tensor | None,
        params: list[Tensor],
        step: int,
    ) -> None:
        ok = step_ok(norms, None if self._grads_only else probe)
        if ok is None or bool(ok):  # policy "raise": the documented one host sync per step
            return
        loss_bad = probe is not None and not bool(torch.isfinite(probe))  # host read on the failure path only: raise
        names: list[str] = []
        if norms is not None:
            finite = host_floats([torch.isfinite(norms)])  # failure path only
            names = [self._param_names.get(id(p), "?") for p, f in zip(params, finite, strict=True) if f == 0]
        self.nonfinite_steps += 1
        notes = record_for(trainer).notes
        notes["nonfinite/policy"] = self.policy
        notes["nonfinite/steps"] = self.nonfinite_steps
        if loss_bad:
            self.first_loss_step = step
            notes.setdefault("loss/first_nonfinite_step", step)
        if names:
            self.first_grad_step = step
            self.bad_params = names
            notes.setdefault("grad/first_nonfinite_step", step)
            notes.setdefault("grad/nonfinite_params", names)
        what = "the loss" if loss_bad else "a gradient"
        where = f"global step {step} (epoch {trainer.current_epoch}, batch {self._batch_idx})"
        shown = f" Parameters with NaN/inf gradients: {', '.join(names[:8])}." if names else ""
        raise NonFiniteError(
            f"NonFiniteGuard(policy='raise'): {what} was NaN or infinite at {where}; the update was not applied.{shown}"
            " Try a lower learning rate, gradient clipping, or check the inputs of that batch; policy='skip' drops "
            "such updates without stopping."
        )

    # ---- state -----------------------------------------------------------------------------------------------
    @override
    def state_dict(self) -> dict[str, Any]:
        """Plain data: the counters and first steps (device counters are read once, at checkpoint save)."""
        self._read()
        return {
            "nonfinite_steps": self.nonfinite_steps,
            "skipped_steps": self.skipped_steps,
            "first_loss_step": self.first_loss_step,
            "first_grad_step": self.first_grad_step,
            "bad_params": list(self.bad_params),
            "last_flushed": self._schedule._last_flushed,
        }

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore :meth:`state_dict`; missing keys keep their defaults."""
        self.nonfinite_steps = int(state_dict.get("nonfinite_steps", 0))
        self.skipped_steps = int(state_dict.get("skipped_steps", 0))
        self.first_loss_step = int(state_dict.get("first_loss_step", -1))
        self.first_grad_step = int(state_dict.get("first_grad_step", -1))
        self.bad_params = [str(n) for n in state_dict.get("bad_params", [])]
        self._schedule._last_flushed = int(state_dict.get("last_flushed", -1))


__all__ = [
    "NO_STEP",
    "POLICIES",
    "NonFiniteError",
    "NonFiniteGuard",
    "drop_update",
    "fused_skip_target",
    "int_view",
    "merge_nonfinite",
]
