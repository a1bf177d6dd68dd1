"""GradientMonitor: fused gradient norms before and after clipping, clip rate, dead and non-finite parameters.

Everything per step runs on the device: one ``torch._foreach_norm`` over the optimizer's gradients, a handful of
scalar kernels, and no host read. Per-layer norms are combined from the per-parameter norms with a precomputed
index tensor (``scatter_add_`` of ``norm ** p``), only on the optimizer steps that end in a flush.
"""

from __future__ import annotations

import math
from typing import Any, Literal

import torch
from lightning.pytorch import Callback, LightningModule, Trainer
from torch import Tensor
from typing_extensions import override

from lightning_lossdiag.callbacks._base import FlushSchedule, log_scalars, warn_no_logger_once
from lightning_lossdiag.callbacks._grad_groups import (
    OTHER_GROUP,
    check_depth,
    group_parameters,
    host_floats,
    resolve_depth,
)
from lightning_lossdiag.diagnosis.record import record_for

_NO_STEP = 2**62  # "no non-finite step yet" inside the device minimum
_MAX_NAMES = 64  # names kept in the notes (bounded)


def _norms(tensors: list[Tensor], p: float) -> Tensor:
    """Per-tensor norms in float32, stacked (fused ``_foreach_norm``; a per-tensor fallback for sparse grads)."""
    if any(t.is_sparse for t in tensors):
        return torch.stack([torch.linalg.vector_norm(t.coalesce().values(), p).float() for t in tensors])
    devices = {t.device for t in tensors}
    if len(devices) == 1:
        return torch.stack(torch._foreach_norm(tensors, p, dtype=torch.float32))
    first = tensors[0].device  # model parallel: fuse per device, gather the norms on the first device (no host read)
    return torch.stack([n.to(first) for n in torch._foreach_norm(tensors, p, dtype=torch.float32)])


def _combine(per_param: Tensor, index: Tensor, n_groups: int, p: float) -> Tensor:
    """Group norms from per-parameter norms: ``(sum_i n_i ** p) ** (1/p)`` per group (``max`` for p = inf)."""
    out = per_param.new_zeros(n_groups)
    if math.isinf(p):
        return out.scatter_reduce_(0, index, per_param, reduce="amax", include_self=True)
    return out.scatter_add_(0, index, per_param.pow(p)).pow(1.0 / p)


class _OptState:
    """Per-optimizer parameters, names, group index and device accumulators."""

    def __init__(self, params: list[Tensor], names: list[str], groups: list[str], device: torch.device) -> None:
        self.params, self.names = params, names
        self.group_names = list(dict.fromkeys(groups))
        pos = {g: i for i, g in enumerate(self.group_names)}
        self.index = torch.tensor([pos[g] for g in groups], dtype=torch.long, device=device)  # one-time H2D copy
        self.subset_index: dict[tuple[int, ...], Tensor] = {}
        n = len(params)
        self.nonfinite_mask = torch.zeros(n, dtype=torch.bool, device=device)
        self.zero_mask = torch.ones(n, dtype=torch.bool, device=device)
        self.total = torch.zeros((), device=device)
        self.total_max = torch.zeros((), device=device)
        self.clipped = torch.zeros((), device=device)
        self.clip_count = torch.zeros((), device=device)
        self.nonfinite_count = torch.zeros((), device=device)
        self.first_nonfinite = torch.full((), _NO_STEP, dtype=torch.long, device=device)
        self.group_norms: Tensor | None = None
        self.param_norms: Tensor | None = None
        self.steps = 0


class GradientMonitor(Callback):
    """Log gradient norms (total and per layer group) before clipping, after clipping, and how often clipping acts.

    Runs in ``on_before_optimizer_step``: after AMP unscaling and after gradient accumulation (the hook fires once
    per real optimizer step, on the accumulated gradient), before Lightning clips. The pre-clip total norm is
    ``torch.nn.utils.get_total_norm`` of the optimizer's gradients. The post-clip norm follows the Trainer's
    ``gradient_clip_val`` / ``gradient_clip_algorithm``:

    * ``"norm"``: ``clip_grad_norm_`` multiplies the gradients by ``min(1, clip_val / (norm + 1e-6))``, so the
      post-clip norm is ``norm * min(1, clip_val / (norm + 1e-6))`` (slightly below ``clip_val`` when clipped,
      because of that ``1e-6``) and a step counts as clipped when ``norm + 1e-6 > clip_val``;
    * ``"value"``: the norm of the gradients clamped to ``[-v, v]`` (fused, computed on flush steps), and a step
      counts as clipped when any ``|g| > v``.

    A ``configure_gradient_clipping`` override in the module is not seen. Manual optimization: Lightning forbids
    ``gradient_clip_val`` there; the module calls ``self.clip_gradients(...)`` and ``opt.step()`` itself, and
    ``opt.step()`` still fires ``on_before_optimizer_step`` (through the precision plugin's closure), so norms are
    measured at each ``opt.step()``, after any clipping the module already did; the clip rate stays 0. Sharded
    strategies (FSDP, DeepSpeed) see local shards only and are not supported.

    Values at a flush are those of the flush step, except ``clip_rate`` and ``norm_total_max`` (since the last
    flush). With several optimizers every key gets the suffix ``_opt<i>`` (index in ``trainer.optimizers``); with
    one optimizer there is no suffix.

    | key | when | meaning |
    |---|---|---|
    | ``grad/norm_total`` | flush | total gradient norm (``norm_type``) before clipping |
    | ``grad/norm_total_max`` | flush | largest pre-clip total norm since the last flush |
    | ``grad/norm_total_clipped`` | flush | total norm after the Trainer's clipping |
    | ``grad/clip_rate`` | flush | fraction of optimizer steps since the last flush that clipping changed |
    | ``grad/norm/<group>`` | flush | norm of the gradients of one layer group (module path cut to ``depth``) |
    | ``grad/nonfinite_count`` | flush | cumulative optimizer steps with a NaN/inf gradient |
    | ``param/norm/<group>`` | flush | parameter norm per group (``param_norms=True``) |

    Notes: ``grad/clip`` (``{"val", "algorithm"}``), ``grad/dead_params`` (grad None or all zero on every step up
    to the first flush; named once), ``grad/nonfinite_params``, ``grad/first_nonfinite_step``.

    Args:
        every_n_steps: flush interval in optimizer steps; ``None`` takes the Trainer's ``log_every_n_steps``.
        depth: module-path components that name a layer group (``1``: ``encoder``; ``2``: ``encoder.0``), or
            ``"auto"`` (default): the deepest depth that gives at most ``max_groups`` groups.
        max_groups: at most this many groups; the rest are merged into ``other``.
        norm_type: the norm (``2.0``, ``1.0``, ``float("inf")``, ...).
        param_norms: also log parameter norms per group (on flush steps).

    Example:
        >>> GradientMonitor(depth=2).state_key
        "GradientMonitor{'every_n_steps': None, 'depth': 2, 'max_groups': 32, 'norm_type': 2.0, 'param_norms': False}"
    """

    def __init__(
        self,
        every_n_steps: int | None = None,
        depth: int | Literal["auto"] = "auto",
        max_groups: int = 32,
        norm_type: float = 2.0,
        param_norms: bool = False,
    ) -> None:
        check_depth(depth)
        if not isinstance(max_groups, int) or isinstance(max_groups, bool) or max_groups < 1:
            raise ValueError(f"`max_groups` must be an integer >= 1, got {max_groups!r}")
        if isinstance(norm_type, bool) or not isinstance(norm_type, (int, float)) or not norm_type > 0:
            raise ValueError(f"`norm_type` must be a positive number or float('inf'), got {norm_type!r}")
        if not isinstance(param_norms, bool):
            raise ValueError(f"`param_norms` must be True or False, got {param_norms!r}")
        self._schedule = FlushSchedule(every_n_steps)
        self.every_n_steps = every_n_steps
        self.depth, self.max_groups = depth, max_groups
        self.norm_type = float(norm_type)
        self.param_norms = param_norms
        self._states: dict[int, _OptState] = {}
        self.nonfinite_counts: dict[int, int] = {}
        self.first_nonfinite_step = -1
        self.nonfinite_params: list[str] = []
        self.dead_params: list[str] | None = None
        self._windows: dict[int, dict[str, Any]] = {}  # restored accumulators since the last flush, per optimizer

    @property
    @override
    def state_key(self) -> str:
        return self._generate_state_key(
            every_n_steps=self.every_n_steps,
            depth=self.depth,
            max_groups=self.max_groups,
            norm_type=self.norm_type,
            param_norms=self.param_norms,
        )

    def _setup(self, pl_module: LightningModule, optimizer: Any, idx: int) -> _OptState:
        """One-time: the optimizer's parameters, their names and groups, the group index tensor."""
        names_by_id = {id(p): n for n, p in pl_module.named_parameters()}
        depth = resolve_depth(pl_module, self.depth, self.max_groups)
        group_by_name = {n: g for g, ns in group_parameters(pl_module, depth, self.max_groups).items() for n in ns}
        params: list[Tensor] = []
        for pg in optimizer.param_groups:
            params.extend(p for p in pg["params"] if all(p is not q for q in params))
        names = [names_by_id.get(id(p), f"opt{idx}.param{i}") for i, p in enumerate(params)]
        groups = [group_by_name.get(n, OTHER_GROUP) for n in names]
        state = _OptState(params, names, groups, params[0].device if params else torch.device("cpu"))
        state.nonfinite_count.fill_(self.nonfinite_counts.get(idx, 0))  # resumed counters continue
        window = self._windows.pop(idx, None)
        if window:  # resumed from a checkpoint written between flushes: the window goes on where it was
            state.steps = int(window.get("steps", 0))
            state.total_max.fill_(float(window.get("total_max", 0.0)))
            state.clip_count.fill_(float(window.get("clip_count", 0)))
            zero = window.get("zero_params")
            if zero is not None and self.dead_params is None:
                keep = set(zero)
                mask = [n in keep for n in names]
                state.zero_mask = torch.tensor(mask, dtype=torch.bool, device=state.zero_mask.device)  # one-time copy
        if self.first_nonfinite_step >= 0:
            state.first_nonfinite.fill_(self.first_nonfinite_step)
        return state

    @override
    def on_before_optimizer_step(self, trainer: Trainer, pl_module: LightningModule, optimizer: Any) -> None:
        opt = getattr(optimizer, "_optimizer", optimizer)
        idx = next((i for i, o in enumerate(trainer.optimizers) if o is opt), 0)
        st = self._states.get(idx)
        if st is None:
            st = self._states[idx] = self._setup(pl_module, opt, idx)
        present = [i for i, p in enumerate(st.params) if p.grad is not None]
        if not present:
            return
        grads = [st.params[i].grad for i in present]
        p = self.norm_type
        pn = _norms(grads, p)  # type: ignore[arg-type]
        full = len(present) == len(st.params)
        sub = st.index if full else st.subset_index.get(tuple(present))
        if sub is None:
            sub = st.subset_index[tuple(present)] = st.index[torch.tensor(present, device=st.index.device)]
        total = torch.linalg.vector_norm(pn, p)
        step = int(trainer.global_step) + 1  # the step this optimizer step completes (global_step after the batch)
        st.steps += 1
        st.total = total
        torch.maximum(st.total_max, total, out=st.total_max)
        bad = ~torch.isfinite(pn)
        any_bad = bad.any()
        st.nonfinite_count.add_(any_bad)
        torch.minimum(st.first_nonfinite, torch.where(any_bad, step, _NO_STEP), out=st.first_nonfinite)
        if full:
            st.nonfinite_mask.logical_or_(bad)
        else:
            pos = torch.tensor(present, device=st.index.device)
            st.nonfinite_mask.index_copy_(0, pos, st.nonfinite_mask[pos] | bad)
        if self.dead_params is None:
            if full:
                st.zero_mask.logical_and_(pn == 0)
            else:
                st.zero_mask.index_copy_(0, pos, st.zero_mask[pos] & (pn == 0))
        # automatic optimization: exactly one optimizer step per batch, so the flush step is known in advance;
        # manual optimization may step several times per batch: per-group norms are then combined on every step
        flush_step = not pl_module.automatic_optimization or self._schedule.next_step_flushes(trainer)
        st.clipped = total
        clip_val = trainer.gradient_clip_val if pl_module.automatic_optimization else None
        if clip_val is not None and clip_val > 0:
            algo = str(getattr(trainer.gradient_clip_algorithm, "value", trainer.gradient_clip_algorithm) or "norm")
            if algo == "value":
                maxabs = pn if math.isinf(p) else _norms(grads, math.inf)  # type: ignore[arg-type]
                st.clip_count.add_((maxabs > clip_val).any())
                if flush_step:
                    kept = torch._foreach_clamp_min(grads, -float(clip_val))  # type: ignore[arg-type]
                    torch._foreach_clamp_max_(kept, float(clip_val))  # what clip_grad_value_ leaves, on copies
                    st.clipped = torch.linalg.vector_norm(_norms(list(kept), p), p)
            else:
                l2 = total if p == 2.0 else torch.linalg.vector_norm(_norms(grads, 2.0), 2.0)  # type: ignore[arg-type]
                coef = torch.clamp(float(clip_val) / (l2 + 1e-6), max=1.0)  # what clip_grad_norm_ multiplies by
                st.clipped = total * coef
                st.clip_count.add_(coef < 1.0)
        if flush_step:
            st.group_norms = _combine(pn, sub, len(st.group_names), p)
            if self.param_norms:
                weights = [st.params[i].detach() for i in present]
                st.param_norms = _combine(_norms(weights, p), sub, len(st.group_names), p)

    @override
    def on_train_batch_end(
        self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        step = int(trainer.global_step)
        if self._schedule.is_flush(step, trainer):
            self._flush(trainer)
            self._schedule.mark(step)

    @override
    def on_train_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._flush(trainer)

    def _flush(self, trainer: Trainer) -> None:
        active = {i: st for i, st in self._states.items() if st.steps}
        if not active:
            return
        resolve_dead = self.dead_params is None
        parts: list[Tensor] = []
        for st in active.values():
            scalars = [st.total, st.total_max, st.clipped, st.clip_count, st.nonfinite_count, st.first_nonfinite]
            parts += [*scalars, st.nonfinite_mask]
            parts += [g for g in (st.group_norms, st.param_norms) if g is not None]
            parts += [st.zero_mask] if resolve_dead else []
        host = iter(host_floats(parts))  # flush: one host transfer for all optimizers and layers
        several = len(trainer.optimizers) > 1
        values: dict[str, float] = {}
        dead: list[str] = []
        for i, st in active.items():
            sfx = f"_opt{i}" if several else ""
            total, total_max, clipped, clip_count, nonfinite, first = (next(host) for _ in range(6))
            bad = [next(host) for _ in st.names]
            values[f"grad/norm_total{sfx}"] = total
            values[f"grad/norm_total_max{sfx}"] = total_max
            values[f"grad/norm_total_clipped{sfx}"] = clipped
            values[f"grad/clip_rate{sfx}"] = clip_count / st.steps
            values[f"grad/nonfinite_count{sfx}"] = nonfinite
            for prefix, g in (("grad/norm", st.group_norms), ("param/norm", st.param_norms)):
                if g is not None:
                    for name in st.group_names:
                        values[f"{prefix}/{name}{sfx}"] = next(host)
            if resolve_dead:
                zero = [next(host) for _ in st.names]
                dead += [n for n, z in zip(st.names, zero, strict=True) if z]  # grad None or 0 on every step
            self.nonfinite_counts[i] = int(nonfinite)
            if first < _NO_STEP and (self.first_nonfinite_step < 0 or first < self.first_nonfinite_step):
                self.first_nonfinite_step = int(first)
            for n, b in zip(st.names, bad, strict=True):
                if b and n not in self.nonfinite_params and len(self.nonfinite_params) < _MAX_NAMES:
                    self.nonfinite_params.append(n)
            st.clip_count.zero_()
            st.total_max.zero_()
            st.group_norms = st.param_norms = None
            st.steps = 0
        warn_no_logger_once(trainer, type(self).__name__)
        log_scalars(trainer, values)
        self._write_notes(trainer, dead if resolve_dead else None)

    def _write_notes(self, trainer: Trainer, dead: list[str] | None) -> None:
        notes = record_for(trainer).notes
        algo = getattr(trainer.gradient_clip_algorithm, "value", trainer.gradient_clip_algorithm)
        notes["grad/clip"] = {"val": trainer.gradient_clip_val, "algorithm": str(algo or "norm")}
        if dead is not None:
            self.dead_params = dead[:_MAX_NAMES]
            notes["grad/dead_params"] = list(self.dead_params)
        if self.nonfinite_params:
            notes["grad/nonfinite_params"] = list(self.nonfinite_params)
        if self.first_nonfinite_step >= 0:
            notes["grad/first_nonfinite_step"] = self.first_nonfinite_step

    @override
    def state_dict(self) -> dict[str, Any]:
        """Plain data, including the accumulators since the last flush (read once, at checkpoint save).

        ``windows`` holds, per optimizer index, what the next flush needs from the steps already done: ``steps``,
        ``total_max``, ``clip_count`` and (before the first flush) ``zero_params``. The cumulative non-finite count,
        first step and parameter names include the steps since the last flush.
        """
        windows = {str(i): dict(w) for i, w in self._windows.items()}  # restored, not yet rebuilt by `_setup`
        counts = dict(self.nonfinite_counts)
        first = self.first_nonfinite_step
        bad_names = list(self.nonfinite_params)
        live = [(i, st) for i, st in self._states.items() if st.steps]
        parts: list[Tensor] = []
        for _, st in live:
            parts += [st.total_max, st.clip_count, st.nonfinite_count, st.first_nonfinite, st.nonfinite_mask]
            parts += [st.zero_mask] if self.dead_params is None else []
        host = iter(host_floats(parts))  # checkpoint save, not the per-step path: one host transfer
        for i, st in live:
            total_max, clip_count, nonfinite, first_dev = (next(host) for _ in range(4))
            bad = [next(host) for _ in st.names]
            zero = [n for n in st.names if next(host)] if self.dead_params is None else None
            windows[str(i)] = {
                "steps": st.steps,
                "total_max": total_max,
                "clip_count": int(clip_count),
                "zero_params": zero,
            }
            counts[i] = int(nonfinite)
            if first_dev < _NO_STEP and (first < 0 or first_dev < first):
                first = int(first_dev)
            for n, b in zip(st.names, bad, strict=True):
                if b and n not in bad_names and len(bad_names) < _MAX_NAMES:
                    bad_names.append(n)
        return {
            "nonfinite_counts": {str(i): n for i, n in counts.items()},
            "first_nonfinite_step": first,
            "nonfinite_params": bad_names,
            "dead_params": None if self.dead_params is None else list(self.dead_params),
            "windows": windows,
            "last_flushed": self._schedule._last_flushed,
        }

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore :meth:`state_dict`; missing keys keep their defaults."""
        self.nonfinite_counts = {int(i): int(n) for i, n in (state_dict.get("nonfinite_counts") or {}).items()}
        self.first_nonfinite_step = int(state_dict.get("first_nonfinite_step", -1))
        self.nonfinite_params = list(state_dict.get("nonfinite_params", []))
        dead = state_dict.get("dead_params")
        self.dead_params = None if dead is None else list(dead)
        self._windows = {}
        for i, w in (state_dict.get("windows") or {}).items():
            zero = w.get("zero_params")
            self._windows[int(i)] = {
                "steps": int(w.get("steps", 0)),
                "total_max": float(w.get("total_max", 0.0)),
                "clip_count": int(w.get("clip_count", 0)),
                "zero_params": None if zero is None else [str(n) for n in zero],
            }
        self._schedule._last_flushed = int(state_dict.get("last_flushed", -1))
        self._states = {}


__all__ = ["GradientMonitor"]
