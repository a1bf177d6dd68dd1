"""``ActivationMonitor``: activation statistics per layer group, measured only on the step before a flush."""

from __future__ import annotations

import sys
from collections.abc import Callable
from typing import Any, Literal

import torch
from lightning.pytorch import Callback
from lightning.pytorch.utilities import rank_zero_warn
from torch import Tensor, nn
from torch.nn.modules.loss import _Loss
from torch.utils.hooks import RemovableHandle
from typing_extensions import override

from lightning_lossdiag.callbacks._activation_stats import (
    FINISHED,
    activation_bounds,
    bucket_limits,
    call_stats,
    finish_all,
    first_tensor,
    histograms,
    is_activation,
    merge_stats,
)
from lightning_lossdiag.callbacks._base import FlushSchedule, log_scalars, warn_no_logger_once
from lightning_lossdiag.callbacks._grad_groups import check_depth, group_modules, resolve_depth, safe_tag
from lightning_lossdiag.dashboards.writers import tensorboard_writers, write_histograms

_MODES = ("groups", "activations")


def _is_compiled(module: nn.Module) -> bool:
    """True when ``module`` runs through ``torch.compile`` (forward hooks inside it would force recompiles)."""
    if getattr(module, "_compiler_ctx", None) is not None:  # Lightning's `from_compiled` on a LightningModule
        return True
    if getattr(module, "_compiled_call_impl", None) is not None:  # nn.Module.compile()
        return True
    if hasattr(getattr(module, "forward", None), "_torchdynamo_orig_callable"):  # forward = torch.compile(forward)
        return True
    eval_frame = sys.modules.get("torch._dynamo.eval_frame")  # nothing is compiled if dynamo was never imported
    return eval_frame is not None and isinstance(module, eval_frame.OptimizedModule)


def _compiled_ids(root: nn.Module) -> tuple[set[int], list[str]]:
    """Ids of every module inside a compiled subtree of ``root``, and the paths of the compiled modules."""
    ids: set[int] = set()
    paths: list[str] = []
    for path, sub in root.named_modules():
        if id(sub) not in ids and _is_compiled(sub):
            paths.append(path or "<root>")
            ids.update(id(m) for m in sub.modules())
    return ids, paths


#: At most this many values of a layer's output are kept for its epoch-end histogram (the first ones: whole samples).
HIST_VALUES = 1 << 16


def _loss_module_ids(root: nn.Module) -> set[int]:
    """Ids of loss modules inside ``root`` (``torch.nn`` losses and the ``criterion`` of a LossMixin): not layers."""
    ids: set[int] = set()
    criterion = getattr(root, "criterion", None)
    for _, sub in root.named_modules():
        if isinstance(sub, _Loss) or (isinstance(criterion, nn.Module) and sub is criterion):
            ids.update(id(m) for m in sub.modules())
    return ids


def select_modules(
    root: nn.Module, depth: int, max_groups: int, mode: str, skip: set[int] | None = None
) -> list[tuple[str, nn.Module]]:
    """The ``(layer name, module)`` pairs to hook, in model order; modules whose id is in ``skip`` are left out.

    ``mode="groups"``: one module per layer group of :func:`group_modules` (same names as ``grad/norm/<layer>``):
    the last activation-function module of the group, else its last leaf module (then the group's output, e.g.
    logits, is measured). ``mode="activations"``: every activation-function module, named by its path.

    Example:
        >>> net = nn.Sequential(nn.Sequential(nn.Linear(2, 4), nn.ReLU(), nn.Linear(4, 4), nn.Tanh()), nn.Linear(4, 1))
        >>> [(name, type(m).__name__) for name, m in select_modules(net, 1, 32, "groups")]
        [('0', 'Tanh'), ('1', 'Linear')]
        >>> [name for name, _ in select_modules(net, 1, 32, "activations")]
        ['0.1', '0.3']
    """
    skip = skip or set()
    picked: list[tuple[str, nn.Module]] = []
    if mode == "activations":
        for path, sub in root.named_modules():
            if path and is_activation(sub) and id(sub) not in skip:
                picked.append((safe_tag(path), sub))
        return picked
    for group, members in group_modules(root, depth, max_groups).items():
        inside = [m for member in members for m in member.modules() if id(m) not in skip]
        acts = [m for m in inside if is_activation(m)]
        leaves = [m for m in inside if next(m.children(), None) is None]
        choice = acts[-1] if acts else (leaves[-1] if leaves else None)
        if choice is not None and all(choice is not m for _, m in picked):
            picked.append((group, choice))
    return picked


class ActivationMonitor(Callback):
    """Activation statistics per layer group, measured on the training step that precedes each flush.

    Forward hooks are registered in ``on_train_batch_start`` only when the optimizer step about to run is a flush
    step (with gradient accumulation, on each micro-batch of that step; the last one is kept) and removed in
    ``on_train_batch_end``: every other step runs with no hook at all. Inside a hook everything is computed on the
    device; the flush moves all layers' numbers to the host in one transfer.

    Which modules (``modules``): ``"groups"`` hooks one module per layer group (the groups of the gradient monitor,
    module path cut to ``depth``, at most ``max_groups``): the group's last activation-function module (``nn.ReLU``,
    ``nn.Sigmoid``, ``nn.GELU``, ...), or its last leaf module when it has none (functional activations such as
    ``F.relu`` cannot be hooked). ``"activations"`` hooks every activation-function module, named by its path.

    A module called several times in one forward pass (a shared activation) reports the calls pooled: mean, std and
    fractions over all values of all calls, a unit is dead when it is zero in every call; the histogram shows the
    last call. Modules under ``torch.compile`` (``OptimizedModule``, ``Module.compile()``, a compiled ``forward``,
    or a LightningModule passed to ``fit`` compiled) are not hooked: a one-time warning names them and they get no
    statistics. Under DDP every rank measures its own batch and only rank 0's numbers are written (no collective).

    Logged keys (``<layer>`` is the group name or module path):

    ============================== ========= ======================================================================
    key                            when      meaning
    ============================== ========= ======================================================================
    ``act/mean/<layer>``           flush     mean of the activation values of the batch
    ``act/std/<layer>``            flush     population standard deviation of those values
    ``act/zero_frac/<layer>``      flush     fraction of values exactly 0
    ``act/saturated_frac/<layer>`` flush     fraction within ``saturation_tol * (hi - lo)`` of a bounded activation's
                                             limits ``[lo, hi]`` (Sigmoid, Tanh, Hardtanh, ReLU6, Hardsigmoid,
                                             Softsign only)
    ``act/dead_frac/<layer>``      flush     share of units (slices along ``unit_dim``: features, or channels of a
                                             conv) that are 0 for every sample of the batch (also in the run record)
    ``act/hist/<layer>``           epoch end histogram (TensorBoard) of the last flush batch's values (the first
                                             ``HIST_VALUES`` = 65,536 of each layer's output), ``hist_bins``
                                             equal bins over the observed min/max
    ============================== ========= ======================================================================

    Args:
        every_n_steps: flush interval in optimizer steps (None: the Trainer's ``log_every_n_steps``).
        depth: module path components that name a layer group, or ``"auto"`` (default): the deepest depth that
            gives at most ``max_groups`` parameter groups (the same groups as ``GradientMonitor``).
        max_groups: at most this many groups; the rest are merged into ``other``.
        saturation_tol: relative distance to a bound that counts as saturated, in ``[0, 0.5)``.
        hist_bins: bins of the epoch-end histograms (0 turns histograms off).
        modules: ``"groups"`` or ``"activations"`` (see above).
        unit_dim: dimension that indexes units for ``dead_frac`` (1: features of ``(N, F)``, channels of
            ``(N, C, H, W)``; use -1 for ``(N, T, F)`` sequences). A tensor without that dim uses its last one.

    Example:
        >>> ActivationMonitor(every_n_steps=10, depth=2).state_key
        "ActivationMonitor{'every_n_steps': 10, 'depth': 2, 'modules': 'groups'}"
    """

    def __init__(
        self,
        every_n_steps: int | None = None,
        depth: int | Literal["auto"] = "auto",
        max_groups: int = 32,
        saturation_tol: float = 0.01,
        hist_bins: int = 64,
        modules: Literal["groups", "activations"] = "groups",
        unit_dim: int = 1,
    ) -> None:
        super().__init__()
        check_depth(depth)
        for name, value, low in (("max_groups", max_groups, 1), ("hist_bins", hist_bins, 0)):
            if not isinstance(value, int) or isinstance(value, bool) or value < low:
                raise ValueError(f"`{name}` must be an integer >= {low}, got {value!r}")
        if isinstance(saturation_tol, bool) or not isinstance(saturation_tol, (int, float)):
            raise ValueError(f"`saturation_tol` must be a number in [0, 0.5), got {saturation_tol!r}")
        if not 0.0 <= float(saturation_tol) < 0.5:
            raise ValueError(f"`saturation_tol` must be a number in [0, 0.5), got {saturation_tol!r}")
        if modules not in _MODES:
            raise ValueError(f"`modules` must be one of {set(_MODES)}, got {modules!r}")
        if not isinstance(unit_dim, int) or isinstance(unit_dim, bool):
            raise ValueError(f"`unit_dim` must be an integer, got {unit_dim!r}")
        self._schedule = FlushSchedule(every_n_steps)
        self.every_n_steps = every_n_steps
        self.depth = depth
        self.max_groups = max_groups
        self.saturation_tol = float(saturation_tol)
        self.hist_bins = hist_bins
        self.modules = modules
        self.unit_dim = unit_dim
        self._targets: list[tuple[str, nn.Module]] = []
        self._handles: list[RemovableHandle] = []
        self._pending: dict[str, dict[str, Tensor]] = {}
        self._step_hists: dict[str, Tensor] = {}
        self._epoch_hists: dict[str, Tensor] = {}
        self._hist_buffers: dict[str, Tensor] = {}  # per layer: where the values of the flush step are copied
        self._flushes = 0
        self._warned_compiled = False

    @property
    @override
    def state_key(self) -> str:
        return self._generate_state_key(every_n_steps=self.every_n_steps, depth=self.depth, modules=self.modules)

    # ----------------------------------------------------------------- hooks
    @override
    def on_train_start(self, trainer: Any, pl_module: Any) -> None:
        warn_no_logger_once(trainer, "ActivationMonitor")
        skip, compiled = _compiled_ids(pl_module)
        skip |= _loss_module_ids(pl_module)
        depth = resolve_depth(pl_module, self.depth, self.max_groups)
        self._targets = select_modules(pl_module, depth, self.max_groups, self.modules, skip)
        if compiled and not self._warned_compiled:
            rank_zero_warn(
                "ActivationMonitor: forward hooks are not supported inside torch.compile'd modules, so no activation "
                f"statistics are collected for {', '.join(compiled)}"
                + ("" if self._targets else " (nothing left to monitor)")
                + ". Train the uncompiled model for a run to see `act/...` charts."
            )
            self._warned_compiled = True

    @override
    def on_train_batch_start(self, trainer: Any, pl_module: Any, batch: Any, batch_idx: int) -> None:
        self._detach()
        if self._targets and self._schedule.next_step_flushes(trainer):
            self._pending = {}  # with gradient accumulation each micro-batch starts over: the last one is kept
            self._step_hists = {}
            self._attach()

    @override
    def on_train_batch_end(self, trainer: Any, pl_module: Any, outputs: Any, batch: Any, batch_idx: int) -> None:
        self._detach()
        step = int(trainer.global_step)
        if self._schedule.is_flush(step, trainer):
            self._flush(trainer, step)
            self._schedule.mark(step)

    @override
    def on_train_epoch_end(self, trainer: Any, pl_module: Any) -> None:
        values, self._epoch_hists = self._epoch_hists, {}
        writers = tensorboard_writers(trainer)
        if not values or not writers:
            return
        names = list(values)
        rows = histograms([values[n] for n in names], self.hist_bins).cpu().tolist()  # epoch end: one transfer
        step = int(trainer.global_step)
        hists: dict[str, dict[str, Any]] = {}
        for name, row in zip(names, rows, strict=True):
            lo, hi, num, total, squares = row[:5]
            if not lo <= hi:  # no finite value to show
                continue
            hists[f"act/hist/{name}"] = {
                "min": lo,
                "max": hi,
                "num": int(num),
                "sum": total,
                "sum_squares": squares,
                "bucket_limits": bucket_limits(lo, hi, len(row) - 5),
                "bucket_counts": row[5:],
            }
        for writer in writers:
            write_histograms(writer, hists, step)  # one event for every layer

    @override
    def on_train_end(self, trainer: Any, pl_module: Any) -> None:
        self._detach()
        if self._pending:  # measured for a flush step that did not complete: show it anyway
            step = int(trainer.global_step)
            self._flush(trainer, step)
            self._schedule.mark(step)

    @override
    def on_exception(self, trainer: Any, pl_module: Any, exception: BaseException) -> None:
        self._detach()

    @override
    def teardown(self, trainer: Any, pl_module: Any, stage: str) -> None:
        self._detach()
        if stage == "fit":  # drop references to the model and its tensors once fit is over
            self._targets, self._pending, self._step_hists, self._epoch_hists = [], {}, {}, {}
            self._hist_buffers = {}

    # ----------------------------------------------------------------- state
    @override
    def state_dict(self) -> dict[str, Any]:
        return {"last_flushed": self._schedule._last_flushed, "flushes": self._flushes}

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._schedule.mark(int(state_dict.get("last_flushed", -1)))
        self._flushes = int(state_dict.get("flushes", 0))

    # ----------------------------------------------------------------- internals
    def _make_hook(self, name: str, bounds: tuple[float, float] | None) -> Callable[[nn.Module, Any, Any], None]:
        def hook(module: nn.Module, args: Any, output: Any) -> None:
            x = first_tensor(output)
            if x is None:
                return
            stats = call_stats(x, self.unit_dim, bounds, self.saturation_tol)
            previous = self._pending.get(name)
            self._pending[name] = stats if previous is None else merge_stats(previous, stats)
            if self.hist_bins:  # keep (a bounded part of) the values; the histogram is made once, at epoch end
                self._step_hists[name] = self._keep_values(name, x.detach().reshape(-1)[:HIST_VALUES])

        return hook

    def _keep_values(self, name: str, values: Tensor) -> Tensor:
        """A copy of ``values`` in this layer's own buffer, reused from flush to flush.

        A fresh copy per flush costs new memory each time (on the CPU of a VM, page faults: ~0.4 ms per layer for
        65,536 values, more than the copy); only the last flush's values are used, at epoch end, so one buffer per
        layer (at most ``HIST_VALUES`` values) is enough.
        """
        buffer = self._hist_buffers.get(name)
        if (
            buffer is None
            or buffer.numel() < values.numel()
            or (buffer.dtype, buffer.device) != (values.dtype, values.device)
        ):
            buffer = torch.empty(max(values.numel(), 1), dtype=values.dtype, device=values.device)
            self._hist_buffers[name] = buffer
        kept = buffer[: values.numel()]
        kept.copy_(values)
        return kept

    def _attach(self) -> None:
        for name, module in self._targets:
            hook = self._make_hook(name, activation_bounds(module))
            self._handles.append(module.register_forward_hook(hook))

    def _detach(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []

    def _flush(self, trainer: Any, step: int) -> None:
        pending, self._pending = self._pending, {}
        if not pending:
            return
        names = list(pending)
        rows = finish_all([pending[name] for name in names]).cpu().tolist()  # flush: one transfer for every layer
        values: dict[str, float] = {}
        for name, row in zip(names, rows, strict=True):
            for stat, value in zip(FINISHED, row, strict=True):
                if stat != "saturated_frac" or "saturated" in pending[name]:
                    values[f"act/{stat}/{name}"] = value
        log_scalars(trainer, values, step)
        self._epoch_hists, self._step_hists = self._step_hists, {}
        self._flushes += 1


__all__ = ["ActivationMonitor", "select_modules"]
