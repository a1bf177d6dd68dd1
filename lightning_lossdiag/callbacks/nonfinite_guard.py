"""NonFiniteGuard: what to do when a loss or gradient turns NaN/inf, decided on the device.

Before every optimizer step the guard checks, on the device, whether the step's loss (seen in
``on_before_backward``) and the optimizer's gradients (one fused ``torch._foreach_norm``: NaN and inf propagate into
the L2 norm of each gradient) are finite. What happens next is the policy.
"""

from __future__ import annotations

import os
from typing import Any, Literal

import torch
from lightning.pytorch import Callback, LightningModule, Trainer
from torch import Tensor
from torch.optim import Optimizer
from typing_extensions import override

from lightning_lossdiag.callbacks._base import FlushSchedule, log_scalars
from lightning_lossdiag.callbacks._grad_groups import host_floats
from lightning_lossdiag.callbacks._grad_window import param_norms
from lightning_lossdiag.dashboards.writers import log_dirs
from lightning_lossdiag.diagnosis.record import record_for

Policy = Literal["warn", "skip", "stop", "raise"]
POLICIES: tuple[str, ...] = ("warn", "skip", "stop", "raise")
STOP_CHECKPOINT = "nonfinite_stop.ckpt"
NO_STEP = 2**62  # "no non-finite step" in a device minimum (exact in float64, so it survives the host transfer)


class NonFiniteError(RuntimeError):
    """Raised by ``NonFiniteGuard(policy="raise")`` at the first step with a NaN/inf loss or gradient."""


def _grads(optimizer: Optimizer) -> list[tuple[Tensor, Tensor]]:
    """``(parameter, gradient)`` of every dense gradient the optimizer will use."""
    return [
        (p, p.grad)
        for group in optimizer.param_groups
        for p in group["params"]
        if p.grad is not None and not p.grad.is_sparse
    ]


def finite_flags(grads: list[Tensor]) -> Tensor | None:
    """One device bool per gradient: all its values are finite (no host read). ``None`` when there are none.

    Example:
        >>> finite_flags([torch.ones(2), torch.tensor([1.0, float("nan")])])
        tensor([ True, False])
    """
    if not grads:
        return None
    # The L2 norm in float32 (the monitors' own): NaN/inf propagate, and it costs a fifth of the max-abs norm on a CPU.
    # A finite gradient whose norm overflows float32 (elements beyond ~1e19) counts as non-finite: no better than NaN.
    return torch.isfinite(param_norms(grads, 2.0))


def drop_update(grads: list[Tensor], bad: Tensor) -> None:
    """Zero every gradient in place when the device flag ``bad`` is set, else leave them bit for bit; no host read.

    ``NaN * 0`` is NaN, so non-finite values are first mapped to 0 (a no-op on a good step, where every value is
    finite), then one fused multiply by ``0`` or ``1``: two light passes instead of a ``masked_fill_`` per tensor.

    Example:
        >>> g = [torch.tensor([1.0, float("nan")]), torch.tensor([2.0])]
        >>> drop_update(g, torch.tensor(True))
        >>> [t.tolist() for t in g]
        [[0.0, 0.0], [0.0]]
    """
    keep = (~bad).to(torch.float32)
    by_dtype: dict[torch.dtype, list[Tensor]] = {}
    for g in grads:
        g.nan_to_num_(0.0, 0.0, 0.0)
        by_dtype.setdefault(g.dtype, []).append(g)
    for dtype, group in by_dtype.items():
        torch._foreach_mul_(group, keep.to(dtype))


def merge_nonfinite(trainer: Any, count: Tensor, first: Tensor) -> Tensor:
    """``[sum of count, min of first]`` over all ranks, on the device, with ONE collective (``all_gather``).

    ``first`` is a step, ``NO_STEP`` meaning "none". Every rank must call this at the same point of training (a
    flush or an epoch end: flushes happen at the same step on every rank). No host read; the caller reads the result
    together with the rest of its flush.

    Example:
        >>> from types import SimpleNamespace
        >>> other_rank = torch.tensor([2, 7])  # a second rank saw 2 non-finite steps, the first at step 7
        >>> trainer = SimpleNamespace(strategy=SimpleNamespace(all_gather=lambda t: torch.stack([t, other_rank])))
        >>> merge_nonfinite(trainer, torch.tensor(1), torch.tensor(9)).tolist()
        [3, 7]
    """
    local = torch.stack([count.to(torch.int64).reshape(()), first.to(torch.int64).reshape(())])
    gathered = trainer.strategy.all_gather(local).reshape(-1, 2)  # the one collective: (world_size, 2)
    return torch.stack([gathered[:, 0].sum(), gathered[:, 1].amin()])


class NonFiniteGuard(Callback):
    """Watch for NaN/inf losses and gradients on the device and apply a policy.

    Policies:

    * ``"skip"`` (default): a step with a non-finite loss or gradient gets all its gradients zeroed on the device
      (:func:`drop_update`; ``NaN * 0`` would stay NaN), with no host read, so the update is dropped and the weights,
      and every checkpoint saved later, stay finite. With plain SGD the parameters do not move; optimizers with
      momentum or weight decay still move them by their own (finite) state. The run never stops.
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
        self._loss_ok: Tensor | None = None
        self._dev: dict[str, Tensor] = {}  # device counters since the last flush
        self._param_names: dict[int, str] = {}
        self._flag_ids: list[int] = []
        self._flag_names: list[str] = []
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
    def on_fit_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._param_names = {id(p): name for name, p in pl_module.named_parameters()}
        self._dev = {}
        self._flag_ids, self._flag_names = [], []
        self._loss_ok = None
        record_for(trainer).notes["nonfinite/policy"] = self.policy

    @override
    def on_train_batch_start(self, trainer: Trainer, pl_module: LightningModule, batch: Any, batch_idx: int) -> None:
        self._batch_idx = batch_idx

    @override
    def on_before_backward(self, trainer: Trainer, pl_module: LightningModule, loss: Tensor) -> None:
        ok = torch.isfinite(loss.detach()).all()  # device flag, no host read
        self._loss_ok = ok if self._loss_ok is None else self._loss_ok & ok

    @override
    def on_before_optimizer_step(self, trainer: Trainer, pl_module: LightningModule, optimizer: Optimizer) -> None:
        pairs = _grads(optimizer)
        grads = [g for _, g in pairs]
        step = int(trainer.global_step) + 1
        source = self.norm_source
        shared = source.latest_grad_norms(optimizer, step, grads) if source is not None else None
        flags = torch.isfinite(shared) if shared is not None else finite_flags(grads)
        loss_ok, self._loss_ok = self._loss_ok, None
        if flags is None and loss_ok is None:
            return
        device = flags.device if flags is not None else loss_ok.device  # type: ignore[union-attr]
        grad_ok = flags.all() if flags is not None else torch.ones((), dtype=torch.bool, device=device)
        loss_ok = loss_ok.to(device) if loss_ok is not None else torch.ones((), dtype=torch.bool, device=device)
        # Under DDP act on the all-reduced gradients only: the same on every rank, so no rank skips, stops or raises
        # alone (the replicas would drift apart, or the others would wait forever on the next collective).
        bad = ~grad_ok if trainer.world_size > 1 else ~(grad_ok & loss_ok)
        if self.policy == "raise":
            self._raise_if_bad(trainer, bad, loss_ok, flags, pairs, step)
            return
        self._count(bad, loss_ok, grad_ok, flags, step, pairs)
        if self.policy in ("skip", "stop"):
            drop_update(grads, bad)
            self._dev["skipped"] += bad.to(torch.int64)

    @override
    def on_train_batch_end(
        self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        step = int(trainer.global_step)
        if self._schedule.is_flush(step, trainer):
            self._flush(trainer, act=True)
            self._schedule.mark(step)

    @override
    def on_train_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._flush(trainer, act=False)

    # ---- device bookkeeping ----------------------------------------------------------------------------------
    def _count(
        self, bad: Tensor, loss_ok: Tensor, grad_ok: Tensor, flags: Tensor | None, step: int, pairs: list[Any]
    ) -> None:
        ids = [id(p) for p, _ in pairs]
        if not self._dev:
            dev = bad.device
            self._dev = {k: torch.zeros((), dtype=torch.int64, device=dev) for k in ("bad", "skipped")}
            self._dev.update(
                {k: torch.full((), -1, dtype=torch.int64, device=dev) for k in ("first_loss", "first_grad")}
            )
        d = self._dev
        if ids != self._flag_ids:
            # The set of parameters with gradients changed (first step, a new optimizer): fold the old per-parameter
            # flags into the host names first. A one-time host read per change, not per step.
            if "bad_params" in d:
                self._read()
            d["bad_params"] = torch.zeros(len(ids), dtype=torch.bool, device=bad.device)
            self._flag_ids = ids
            self._flag_names = [self._param_names.get(i, f"param[{n}]") for n, i in enumerate(ids)]
        d["bad"] += bad.to(torch.int64)
        here = torch.full_like(d["first_loss"], step)
        d["first_loss"] = torch.where(~loss_ok & (d["first_loss"] < 0), here, d["first_loss"])
        d["first_grad"] = torch.where(~grad_ok & (d["first_grad"] < 0), here, d["first_grad"])
        if flags is not None:
            d["bad_params"] |= ~flags

    def _read(self, trainer: Trainer | None = None) -> int | None:
        """Fold the device counters into the host totals: ONE host transfer (flush, train end, checkpoint save).

        With a ``trainer`` under DDP (flushes only: every rank calls it at the same step), the first non-finite loss
        step over all ranks is merged on the device before that transfer and returned (``-1``: none); else ``None``.
        """
        d = self._dev
        merge = trainer is not None and trainer.world_size > 1
        if not d and not merge:
            return None
        keys = ("bad", "skipped", "first_loss", "first_grad")
        flags = [d["bad_params"]] if "bad_params" in d else []
        parts = [d[k] for k in keys] + flags if d else []
        if merge:
            parts.append(self._first_loss_all_ranks(trainer))
        host = host_floats(parts)  # flush: the one host read
        merged: int | None = None
        if merge:
            merged = int(host[-1]) if host[-1] < NO_STEP else -1
            host = host[:-2]
        if not d:
            return merged
        bad, skipped, first_loss, first_grad = (int(x) for x in host[:4])
        self.nonfinite_steps += bad
        self.skipped_steps += skipped
        if first_loss >= 0 and self.first_loss_step < 0:
            self.first_loss_step = first_loss
        if first_grad >= 0 and self.first_grad_step < 0:
            self.first_grad_step = first_grad
        for i, x in enumerate(host[4:]):
            name = self._flag_names[i] if i < len(self._flag_names) else f"param[{i}]"
            if x > 0 and name not in self.bad_params:
                self.bad_params.append(name)
        for k in ("bad", "skipped"):
            d[k].zero_()
        for k in ("first_loss", "first_grad"):
            d[k].fill_(-1)
        if flags:
            d["bad_params"].zero_()
        return merged

    def _first_loss_all_ranks(self, trainer: Any) -> Tensor:
        """This rank's first non-finite loss step (host total and device counter) merged over ranks; no host read."""
        d = self._dev
        if d:
            first = torch.where(d["first_loss"] >= 0, d["first_loss"], NO_STEP)
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
        if self.policy in ("skip", "stop") and self._dev:
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
        bad: Tensor,
        loss_ok: Tensor,
        flags: Tensor | None,
        pairs: list[tuple[Tensor, Tensor]],
        step: int,
    ) -> None:
        if not bool(bad):  # policy "raise": the documented one host synchronisation per step
            return
        loss_bad = not bool(loss_ok)  # failure path only: we are about to raise
        names: list[str] = []
        if flags is not None:
            finite = host_floats([flags])  # failure path only
            names = [self._param_names.get(id(p), "?") for (p, _), f in zip(pairs, finite, strict=True) if f == 0]
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
    "finite_flags",
    "merge_nonfinite",
]
