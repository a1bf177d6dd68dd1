"""GradientMonitor: fused gradient norms before and after clipping, clip rate, dead and non-finite parameters.

Per optimizer step only one fused ``torch._foreach_norm`` runs (two with clipping by value, or by norm with a
non-L2 ``norm_type``); its per-parameter row is kept by reference in a per-optimizer window
(:mod:`~lightning_lossdiag.callbacks._grad_window`). At a flush the rows are stacked once and the totals, the clip
rate, the non-finite and dead parameters and the group norms come from a few batched kernels and one host transfer.
"""

from __future__ import annotations

import math
import operator
from typing import Any, Literal

import torch
from lightning.pytorch import Callback, LightningModule, Trainer
from torch import Tensor
from typing_extensions import override

from lightning_lossdiag.callbacks._amp import grad_scaler, scaler_skip_mask
from lightning_lossdiag.callbacks._base import (
    SUMMED_SHARDS,
    FlushSchedule,
    log_scalars,
    refuse_sharded,
    warn_no_logger_once,
)
from lightning_lossdiag.callbacks._grad_groups import (
    OTHER_GROUP,
    check_depth,
    clean_name,
    group_parameters,
    host_floats,
    resolve_depth,
)
from lightning_lossdiag.callbacks._grad_window import (
    NO_STEP,
    ClipSpec,
    OptWindow,
    combine,
    param_norms,
    stacked_norms,
)
from lightning_lossdiag.callbacks._shards import local_grads, local_parts, shard_reducer
from lightning_lossdiag.diagnosis.record import record_for

_MAX_NAMES = 64  # names kept in the notes (bounded)
_IS_SPARSE = operator.attrgetter("is_sparse")  # mapped over the gradients at C speed (no generator frame)


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
    measured at each ``opt.step()``, after any clipping the module already did; the clip rate stays 0.

    Sharded gradients: under FSDP2 (``ModelParallelStrategy``) and FSDP1 (``FSDPStrategy`` with
    ``use_orig_params=True``, Lightning's default) each rank measures its own pieces of every gradient, and their
    ``p``-th powers are summed over the ranks that shard them when the rows are folded (one ``all_reduce`` per block
    of steps), so every value is that of the full gradients, the same on every rank. Layer names are those of the
    unwrapped model (``net.0``, not ``net._fsdp_wrapped_module.0``). DeepSpeed, and FSDP1 set-ups whose shards cannot
    be summed (``use_orig_params=False``, mixed process groups, parameters left out of FSDP), are refused at fit
    start with a message that says why.

    Values at a flush are those of the flush step, except ``clip_rate`` and ``norm_total_max`` (since the last
    flush). With several optimizers every key gets the suffix ``_opt<i>`` (index in ``trainer.optimizers``); with
    one optimizer there is no suffix.

    | key | when | meaning |
    |---|---|---|
    | ``grad/norm_total`` | flush | total gradient norm (``norm_type``) before clipping |
    | ``grad/norm_total_max`` | flush | largest pre-clip total norm since the last flush |
    | ``grad/norm_total_clipped`` | flush | total norm after the Trainer's clipping |
    | ``grad/clip_val`` | flush | the Trainer's ``gradient_clip_val`` (when set), charted with the two norms |
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
        self._states: dict[int, OptWindow] = {}
        #: ``(optimizer, step, params, grads, norms)`` of the step in progress, handed to the NaN guard of
        #: :class:`~lightning_lossdiag.LossDiagnostics` (kept only when :attr:`shares_latest` is set)
        self._latest: tuple[Any, int, list[Tensor], list[Tensor], Tensor] | None = None
        #: set by LossDiagnostics when its NaN guard takes this monitor's norms of each step (:meth:`take_latest`)
        self.shares_latest = False
        self._last_window: tuple[Any, OptWindow] | None = None  # (optimizer, its window): the per-step lookup
        self.nonfinite_counts: dict[int, int] = {}
        self.first_nonfinite_step = -1
        self.nonfinite_params: list[str] = []
        self.dead_params: list[str] | None = None
        self._windows: dict[int, dict[str, Any]] = {}  # restored accumulators since the last flush, per optimizer
        self._key_cache: tuple[tuple[Any, ...], str] | None = None  # (options, state_key)
        #: ``(gradient_clip_val, gradient_clip_algorithm, automatic, ClipSpec)`` of the last step
        self._clip_cache: tuple[Any, Any, bool, ClipSpec] | None = None

    @property
    @override
    def state_key(self) -> str:
        # Lightning builds this for every hook call (the profiler's label): cache it while the options stay the same
        opts = (self.every_n_steps, self.depth, self.max_groups, self.norm_type, self.param_norms)
        cached = getattr(self, "_key_cache", None)
        if cached is None or cached[0] != opts:
            names = ("every_n_steps", "depth", "max_groups", "norm_type", "param_norms")
            cached = self._key_cache = (opts, self._generate_state_key(**dict(zip(names, opts, strict=True))))
        return cached[1]

    @override
    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        if stage == "fit":  # FSDP2 and FSDP1: the shards are summed; DeepSpeed is refused
            refuse_sharded(trainer, "GradientMonitor", "gradient norms", allowed=SUMMED_SHARDS)

    @override
    def on_fit_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        """Fail now, not at the first step, on a sharded set-up whose shards cannot be summed (FSDP1 options)."""
        model = getattr(getattr(trainer, "strategy", None), "model", None)
        for opt in getattr(trainer, "optimizers", None) or []:
            shard_reducer([p for group in opt.param_groups for p in group["params"]], model)

    def _setup(self, pl_module: LightningModule, optimizer: Any, idx: int, model: Any = None) -> OptWindow:
        """One-time: the optimizer's parameters, their names and groups, the group index tensor.

        ``model``: the strategy's model (it holds the FSDP1 units, which say over which processes the shards lie).
        """
        names_by_id = {id(p): clean_name(n) for n, p in pl_module.named_parameters()}
        depth = resolve_depth(pl_module, self.depth, self.max_groups)
        group_by_name = {n: g for g, ns in group_parameters(pl_module, depth, self.max_groups).items() for n in ns}
        params: list[Tensor] = []
        for pg in optimizer.param_groups:
            params.extend(p for p in pg["params"] if all(p is not q for q in params))
        names = [names_by_id.get(id(p), f"opt{idx}.param{i}") for i, p in enumerate(params)]
        groups = [group_by_name.get(n, OTHER_GROUP) for n in names]
        device = params[0].device if params else torch.device("cpu")
        state = OptWindow(params, names, groups, device, self.norm_type)
        state.reduce = shard_reducer(params, model)  # FSDP2/FSDP1 shards: norms of the full gradients at each fold
        state.nonfinite_count.fill_(self.nonfinite_counts.get(idx, 0))  # resumed counters continue
        window = self._windows.pop(idx, None)
        if window:  # resumed from a checkpoint written between flushes: the window goes on where it was
            state.restore(window, dead_known=self.dead_params is not None)
        if self.first_nonfinite_step >= 0:
            state.first_nonfinite.fill_(self.first_nonfinite_step)
        return state

    def take_latest(self, optimizer: Any) -> tuple[int, list[Tensor], list[Tensor], Tensor] | None:
        """What this monitor measured at the optimizer step in progress, handed over once, or ``None``.

        ``(step, params, grads, norms)``: the global step the optimizer step completes, the parameters whose
        gradients it measured (a list that stays the same object from step to step while the same parameters have
        gradients), those gradients and their per-gradient norms (a device tensor). Only when :attr:`shares_latest`
        is set, every gradient was dense and ``optimizer`` is the one measured. Any ``norm_type`` propagates NaN/inf,
        so the caller can test finiteness on them without a second pass over the gradients (the NaN guard of
        :class:`~lightning_lossdiag.LossDiagnostics` does, in the same ``on_before_optimizer_step`` call, right after
        this monitor). The reference is dropped here, so no gradient is held past the step.
        """
        latest, self._latest = self._latest, None
        if latest is None or latest[0] is not getattr(optimizer, "_optimizer", optimizer):
            return None
        return latest[1:]

    def _clip_spec(self, trainer: Trainer, automatic: bool) -> ClipSpec:
        """The Trainer's clipping (``None`` when off, and in manual optimization where Lightning forbids it).

        Cached while the Trainer's two settings stay the same (the per-step path compares them only).
        """
        clip_val, algo = trainer.gradient_clip_val, trainer.gradient_clip_algorithm
        cached = getattr(self, "_clip_cache", None)  # (absent on an instance unpickled from an older version)
        if cached is not None and cached[0] is clip_val and cached[1] is algo and cached[2] is automatic:
            return cached[3]
        spec: ClipSpec = None
        if automatic and clip_val is not None and clip_val > 0:
            name = str(getattr(algo, "value", algo) or "norm")
            spec = ("value" if name == "value" else "norm", float(clip_val))
        self._clip_cache = (clip_val, algo, automatic, spec)
        return spec

    def _window(self, trainer: Trainer, pl_module: LightningModule, opt: Any) -> OptWindow:
        """The window of ``opt``: the last one used (a cached pair: no lookup per step), else found or built."""
        cached = self._last_window
        if cached is not None and cached[0] is opt:
            return cached[1]
        idx = next((i for i, o in enumerate(trainer.optimizers) if o is opt), 0)
        st = self._states.get(idx)
        if st is None:
            st = self._states[idx] = self._setup(
                pl_module, opt, idx, getattr(getattr(trainer, "strategy", None), "model", None)
            )
        self._last_window = (opt, st)
        return st

    @override
    def on_before_optimizer_step(self, trainer: Trainer, pl_module: LightningModule, optimizer: Any) -> None:
        # The per-step path: one fused norm call and a few list appends. Everything else waits for the flush.
        opt = getattr(optimizer, "_optimizer", optimizer)
        self._latest = None
        st = self._window(trainer, pl_module, opt)
        params = st.params
        sharded = st.reduce is not None
        # sharded: each rank's pieces, one per parameter (empty where it holds none), summed over ranks at the fold
        grads = local_grads(params) if sharded else [g for q in params if (g := q.grad) is not None]
        if not grads:
            return
        positions: Tensor | None = None  # None: every parameter has a gradient (the usual case)
        if len(grads) != len(params):
            params, positions = st.subset()  # the same list object while the same parameters have gradients
        automatic = pl_module.automatic_optimization
        clip = self._clip_spec(trainer, automatic)
        p = self.norm_type
        dense = not any(map(_IS_SPARSE, grads))
        path = st.path if dense and not sharded else None
        # the norm the clip decision needs when the logged norm is not it: max-abs ("value") or L2 ("norm")
        clip_p = None if clip is None else (math.inf if clip[0] == "value" else 2.0)
        second = None if clip_p is None or clip_p == p else clip_p
        aux = None
        if path is None or (second == 2.0 and st.l2_by_dot):  # checked per call, or L2 by CPU dots: separately
            aux = None if second is None else param_norms(grads, second, path=None if path is None else "cpu_l2")
            norms = row = param_norms(grads, p, path=path)
        else:  # both norms of the step (when clipping needs a second one) from one stack
            norms = row = stacked_norms(grads, p, path, second)
            if second is not None:
                norms, aux = row.view(2, len(grads)).unbind()
        step = trainer.global_step + 1  # the step this optimizer step completes (global_step after the batch)
        skip = scaler_skip_mask(grad_scaler(trainer), opt)  # fp16: the GradScaler's own verdict, on the device
        if skip is not None:  # a step the scaler skips applies no update: zero norms, not non-finite gradients
            for t in (row, aux if row is norms else None):
                if t is not None:
                    t.masked_fill_(skip, 0.0)  # in place: these norms were just made here (one kernel each)
        if self.shares_latest and dense:  # for take_latest: the NaN guard of LossDiagnostics reuses the norms
            self._latest = (opt, step, params, grads, norms)
        if positions is not None:  # rows over all of the window's parameters
            norms = st.full_row(positions, norms)
            aux = None if aux is None else st.full_row(positions, aux)
        st.push(norms, aux, step, clip)
        if not self.param_norms and (clip is None or clip[0] != "value"):
            return  # nothing else needs the gradients ahead of a flush (group norms come from the row, at the flush)
        # automatic optimization: exactly one optimizer step per batch, so the flush step is known in advance;
        # manual optimization may step several times per batch: every step may be the last before a flush
        if automatic and not self._schedule.step_is_flushed(step, trainer):
            return
        if clip is not None and clip[0] == "value":
            kept = torch._foreach_clamp_min(grads, -clip[1])
            torch._foreach_clamp_max_(kept, clip[1])  # what clip_grad_value_ leaves, on copies
            kept_norms = param_norms(list(kept), p)
            if sharded:
                kept_norms = st.reduce(kept_norms[None], p)[0]
            st.last_clipped = torch.linalg.vector_norm(kept_norms, p)
        if self.param_norms:
            weights = param_norms(local_parts([q.detach() for q in params]), p)
            if positions is not None:
                weights = st.full_row(positions, weights)
            if sharded:
                weights = st.reduce(weights[None], p)[0]
            st.param_norms = combine(weights, st.index, len(st.group_names), p)

    @override
    def on_train_batch_end(
        self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        self._latest = None  # never hold a step's gradients past its batch
        step = int(trainer.global_step)
        if self._schedule.is_flush(step, trainer):
            self._flush(trainer)
            self._schedule.mark(step)

    @override
    def on_train_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._flush(trainer)

    def _flush(self, trainer: Trainer) -> None:
        active = {i: st for i, st in self._states.items() if st.steps and st.last is not None}
        if not active:
            return
        resolve_dead = self.dead_params is None
        parts: list[Tensor] = []
        shown: dict[int, tuple[bool, bool, bool]] = {}  # per optimizer: group norms, parameter norms, post-clip known
        for i, st in active.items():
            st.fold()
            last_total, last_clipped, groups = st.latest()
            known = last_clipped is not None
            parts += [last_total, st.total_max, last_total if last_clipped is None else last_clipped, st.clip_count]
            parts += [st.nonfinite_count, st.first_nonfinite]
            parts += [st.nonfinite_mask, *(g for g in (groups, st.param_norms) if g is not None)]
            parts += [st.zero_mask] if resolve_dead else []
            shown[i] = (groups is not None, st.param_norms is not None, known)
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
            if shown[i][2]:  # else the run ended on a step not expected to be flushed: no post-clip norm to show
                values[f"grad/norm_total_clipped{sfx}"] = clipped
            values[f"grad/clip_rate{sfx}"] = clip_count / st.steps
            values[f"grad/nonfinite_count{sfx}"] = nonfinite
            for prefix, present in zip(("grad/norm", "param/norm"), shown[i][:2], strict=True):
                if present:
                    for name in st.group_names:
                        values[f"{prefix}/{name}{sfx}"] = next(host)
            if resolve_dead:
                zero = [next(host) for _ in st.names]
                dead += [n for n, z in zip(st.names, zero, strict=True) if z]  # grad None or 0 on every step
            self.nonfinite_counts[i] = int(nonfinite)
            if first < NO_STEP and (self.first_nonfinite_step < 0 or first < self.first_nonfinite_step):
                self.first_nonfinite_step = int(first)
            self._add_bad_names(self.nonfinite_params, st.names, bad)
            st.restart()
        clip_val = trainer.gradient_clip_val
        if clip_val is not None and float(clip_val) > 0:  # host config value: drawn beside the norms it bounds
            values["grad/clip_val"] = float(clip_val)
        warn_no_logger_once(trainer, type(self).__name__)
        log_scalars(trainer, values)
        self._write_notes(trainer, dead if resolve_dead else None)

    @staticmethod
    def _add_bad_names(out: list[str], names: list[str], bad: list[float]) -> None:
        """Append (bounded, no duplicates) the names whose non-finite flag is set (host values)."""
        for n, b in zip(names, bad, strict=True):
            if b and n not in out and len(out) < _MAX_NAMES:
                out.append(n)

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
            st.fold()  # the same batched reduction a flush runs; the rows kept so far end up in the accumulators
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
            if first_dev < NO_STEP and (first < 0 or first_dev < first):
                first = int(first_dev)
            self._add_bad_names(bad_names, st.names, bad)
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
        self._last_window = None
        self._latest = None


__all__ = ["GradientMonitor"]
