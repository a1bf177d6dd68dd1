"""The per-optimizer window of ``GradientMonitor``: per-step norm rows kept as references, reduced in one batch.

An optimizer step only appends its fused per-parameter norms (a ``[params]`` row, plus a second row of max-abs or
L2 norms when the Trainer's clipping needs one) to the window, and its global step to a host list. At a flush, a
checkpoint, or when the window grows past :data:`FOLD_ROWS` rows, the rows are stacked once and every statistic is
derived from the ``[steps, params]`` matrix with a few batched kernels and folded into device accumulators. Nothing
here reads the host: the callback moves the accumulators in its one flush transfer.
"""

from __future__ import annotations

import math
from typing import Any, Literal

import torch
from torch import Tensor

from lightning_lossdiag.callbacks._base import host_to_device

NO_STEP = 2**62  # "no non-finite step yet" inside the device minimum
FOLD_ROWS = 512  # rows kept before they are folded into the accumulators (flushes rarer than this many steps)
MAX_SUBSETS = 64  # patterns of present gradients cached per optimizer (a mixture of experts may have many)

#: the Trainer's clipping as the window sees it: ``("norm" | "value", clip_val)``, or ``None`` when it is off
ClipSpec = tuple[str, float] | None


#: dtypes whose norm is accumulated in float32 by ``_foreach_norm(..., dtype=float32)`` (wider ones keep their own)
_FLOAT32_NORM = (torch.float32, torch.float16, torch.bfloat16)


#: how :func:`param_norms` may skip its per-call checks: ``"fused"`` (dense, one device, float32/float16/bfloat16)
#: or ``"cpu_l2"`` (also: L2 of float32 tensors on the CPU, at least ``DOT_VALUES`` values in all)
NormPath = Literal["fused", "cpu_l2"]
#: values from which the CPU's per-tensor dots beat one fused call: below, the dots' dispatches (one per tensor,
#: plus reshapes) cost more than they save (a 6-tensor MLP of 6.5k values: 14 us vs 11 us; 0.9M values: 88 vs 109)
DOT_VALUES = 2**17


def cpu_l2_norms(tensors: list[Tensor]) -> Tensor:
    """L2 norms of float32 CPU tensors, stacked: the square root of ``dot(t, t)`` per tensor.

    On the CPU ``torch._foreach_norm`` runs ``linalg.vector_norm`` tensor by tensor, and that kernel is about twice
    as slow as the BLAS ``dot`` on the same values; in a training loop the dot version saved ~0.3 ms per step on
    the benchmark's 10x256 MLP. Same float32 accumulation, so the same overflow (``inf`` once the sum of squares
    passes 3.4e38) and NaN/inf propagation; the values agree to float32 rounding. One difference: a tensor of ONE
    element beyond 1.8e19 in magnitude reads ``inf`` here, where ``vector_norm`` returns its absolute value (such
    a gradient counts as non-finite). On CUDA ``_foreach_norm`` is one fused kernel and stays.

    Example:
        >>> cpu_l2_norms([torch.tensor([3.0, 4.0]), torch.tensor([[1.0, 2.0], [2.0, 4.0]]).t()])
        tensor([5., 5.])
    """
    return stacked_norms(tensors, 2.0, "cpu_l2")


def norm_path(tensors: list[Tensor], p: float) -> NormPath | None:
    """The check-free path of :func:`param_norms` for the gradients of ``tensors`` (parameters), or ``None``.

    A gradient has its parameter's dtype and device (``torch`` enforces it), so this is decided once per set of
    parameters. Sparse gradients are still checked per call. L2 norms take the CPU's dots from ``DOT_VALUES``
    values on (a small model's few tensors are cheaper in one fused call).

    Example:
        >>> w, small = [torch.zeros(512, 512)], [torch.zeros(2)]
        >>> norm_path(w, 2.0), norm_path(w, 1.0), norm_path(small, 2.0)
        ('cpu_l2', 'fused', 'fused')
        >>> norm_path([torch.zeros(2, dtype=torch.float64)], 2.0) is None
        True
    """
    if not tensors:
        return None
    first = tensors[0].device
    if not all(t.device == first and t.dtype in _FLOAT32_NORM for t in tensors):
        return None
    if p == 2.0 and first.type == "cpu" and all(t.dtype == torch.float32 for t in tensors):
        return "cpu_l2" if sum(t.numel() for t in tensors) >= DOT_VALUES else "fused"
    return "fused"


def param_norms(tensors: list[Tensor], p: float, *, path: NormPath | None = None) -> Tensor:
    """Per-tensor norms in float32, stacked (fused ``_foreach_norm``; a per-tensor fallback for sparse grads).

    Half and bfloat16 tensors are reduced in float32 (no overflow at 65504); float64 and complex tensors in their
    own precision, then cast. Tensors on several devices (model parallel) are fused per device and the norms
    gathered on the first device, with no host read. L2 norms of float32 CPU tensors use :func:`cpu_l2_norms`.

    Args:
        tensors: the tensors (gradients or parameters).
        p: the norm.
        path: the caller knows every tensor is dense and fits this :func:`norm_path` (the per-step path of the
            gradient monitor decides it once per optimizer, not per step).

    Example:
        >>> param_norms([torch.tensor([3.0, 4.0]), torch.tensor([-2.0], dtype=torch.float64)], 2.0)
        tensor([5., 2.])
    """
    if path is not None:
        return stacked_norms(tensors, p, path)
    if any(t.is_sparse for t in tensors):
        return torch.stack([torch.linalg.vector_norm(t.coalesce().values(), p).float() for t in tensors])
    checked = norm_path(tensors, p)
    if checked is not None:  # the usual case: one fused call (or the CPU dot)
        return param_norms(tensors, p, path=checked)
    first = tensors[0].device
    groups: dict[tuple[torch.device, bool], list[int]] = {}
    for i, t in enumerate(tensors):
        groups.setdefault((t.device, t.dtype in _FLOAT32_NORM), []).append(i)
    out: list[Tensor] = [tensors[0]] * len(tensors)
    for (_, low), index in groups.items():
        members = [tensors[i] for i in index]
        norms = torch._foreach_norm(members, p, dtype=torch.float32) if low else torch._foreach_norm(members, p)
        for i, n in zip(index, norms, strict=True):
            out[i] = n.to(device=first, dtype=torch.float32)
    return torch.stack(out)


def stacked_norms(tensors: list[Tensor], p: float, path: NormPath, second: float | None = None) -> Tensor:
    """Per-tensor float32 norms from ONE ``torch.stack``: the ``p``-norms, then (``second`` given) the ``second``-norms.

    For a step that needs two norms of the same tensors (the logged one and the one the Trainer's clipping decides
    on): one stack of ``2n`` values instead of two of ``n``. The tensors must fit ``path`` (:func:`norm_path`: dense,
    one device, float32/float16/bfloat16; ``"cpu_l2"``: float32 CPU tensors and ``p == 2``). The ``second``-norms
    always come from ``torch._foreach_norm``: what :func:`param_norms` gives unless they are L2 norms of float32 CPU
    tensors (its dot path, which rounds differently).

    Example:
        >>> stacked_norms([torch.tensor([3.0, -4.0]), torch.tensor([2.0])], 2.0, "cpu_l2", float("inf"))
        tensor([5., 2., 4., 2.])
    """
    parts: list[Tensor] | tuple[Tensor, ...]
    if path == "cpu_l2":  # squares by BLAS dot; the square root after the stack, on the p-norms only
        dot = torch.dot  # 1-D as they are (biases: no reshape), others as flat views (copies if not contiguous)
        parts = [dot(t, t) if t.ndim == 1 else dot(f := t.reshape(-1), f) for t in tensors]
    else:
        parts = torch._foreach_norm(tensors, p, dtype=torch.float32)
    if second is not None:
        parts = [*parts, *torch._foreach_norm(tensors, second, dtype=torch.float32)]
    row = torch.stack(parts)
    if path == "cpu_l2":
        (row if second is None else row[: len(tensors)]).sqrt_()
    return row


def combine(per_param: Tensor, index: Tensor, n_groups: int, p: float) -> Tensor:
    """Group norms from per-parameter norms: ``(sum_i n_i ** p) ** (1/p)`` per group (``max`` for p = inf).

    Example:
        >>> combine(torch.tensor([3.0, 4.0, 1.0]), torch.tensor([0, 0, 1]), 2, 2.0)
        tensor([5., 1.])
    """
    out = per_param.new_zeros(n_groups)
    if math.isinf(p):
        return out.scatter_reduce_(0, index, per_param, reduce="amax", include_self=True)
    return out.scatter_add_(0, index, per_param.pow(p)).pow(1.0 / p)


def clip_coef(l2: Tensor, clip_val: float) -> Tensor:
    """What ``clip_grad_norm_`` multiplies the gradients by: ``min(1, clip_val / (l2 + 1e-6))``, elementwise."""
    return torch.clamp(float(clip_val) / (l2 + 1e-6), max=1.0)


def reduce_rows(norms: Tensor, aux: Tensor | None, steps: Tensor, p: float, clip: ClipSpec) -> list[Tensor]:
    """Batched statistics of a ``[steps, params]`` block of per-parameter ``p``-norms, all on the device.

    ``aux`` holds per-parameter max-abs values (``"value"`` clipping) or L2 norms (``"norm"`` clipping with
    ``p != 2``), or is ``None`` when ``norms`` already serves. Returns ``[total_max, clip_count, nonfinite_count,
    first_nonfinite_step, nonfinite_per_param, zero_per_param]``: the largest total norm, the steps clipping changed
    (``l2 + 1e-6 > clip_val`` / any ``|g| > clip_val``), the steps with a NaN/inf norm, the first such step
    (:data:`NO_STEP` if none), and per parameter whether it was ever non-finite / zero on every row.

    Example:
        >>> rows = torch.tensor([[3.0, 4.0], [0.0, float("inf")], [0.0, 1.0]])
        >>> out = reduce_rows(rows, None, torch.tensor([7, 8, 9]), 2.0, ("norm", 2.0))
        >>> [t.tolist() for t in out]
        [inf, 2, 1, 8, [False, True], [False, False]]
    """
    totals = torch.linalg.vector_norm(norms, p, dim=1)
    bad = ~torch.isfinite(norms)
    bad_step = bad.any(dim=1)
    first = torch.where(bad_step, steps, NO_STEP).amin()
    if clip is None:
        clipped = totals.new_zeros((), dtype=torch.long)
    elif clip[0] == "value":
        clipped = ((norms if aux is None else aux) > clip[1]).any(dim=1).sum()
    else:
        l2 = totals if aux is None else torch.linalg.vector_norm(aux, 2.0, dim=1)
        clipped = (clip_coef(l2, clip[1]) < 1.0).sum()
    return [totals.amax(), clipped, bad_step.sum(), first, bad.any(dim=0), (norms == 0).all(dim=0)]


class OptWindow:
    """One optimizer's parameters, names and group index, its rows since the last fold, and device accumulators.

    ``steps`` counts the optimizer steps since the last flush (folded or not); ``nonfinite_count``,
    ``first_nonfinite`` and ``nonfinite_mask`` are cumulative over the run; ``zero_mask`` covers every step so far.
    """

    def __init__(
        self, params: list[Tensor], names: list[str], groups: list[str], device: torch.device, p: float
    ) -> None:
        self.params, self.names, self.device, self.p = params, names, device, p
        #: how :func:`param_norms` measures their dense gradients without a per-step check (``None``: checked)
        self.path = norm_path(params, p)
        #: their L2 norms take the CPU dot path (a second norm of L2 cannot join the fused stack: other rounding)
        self.l2_by_dot = norm_path(params, 2.0) == "cpu_l2"
        self.group_names = list(dict.fromkeys(groups))
        pos = {g: i for i, g in enumerate(self.group_names)}
        self.index = host_to_device([pos[g] for g in groups], device)  # one-time H2D copy
        #: per pattern of parameters with a gradient (their indices): the list of those parameters (the same object
        #: at every step with that pattern, so a consumer can key on it) and their positions on the device
        self.subsets: dict[tuple[int, ...], tuple[list[Tensor], Tensor]] = {}
        n = len(params)
        self.nonfinite_mask = torch.zeros(n, dtype=torch.bool, device=device)
        self.zero_mask = torch.ones(n, dtype=torch.bool, device=device)
        self.total_max = torch.zeros((), device=device)
        self.clip_count = torch.zeros((), device=device)
        self.nonfinite_count = torch.zeros((), device=device)
        self.first_nonfinite = torch.full((), NO_STEP, dtype=torch.long, device=device)
        self.rows: list[Tensor] = []
        self.aux_rows: list[Tensor] = []
        self.step_numbers: list[int] = []
        self.clip: ClipSpec = None
        self.last: Tensor | None = None  # the latest step's row, kept across folds for the flush
        self.last_aux: Tensor | None = None
        self.last_clipped: Tensor | None = None  # "value" clipping: post-clip total norm, computed on flush steps
        self.param_norms: Tensor | None = None
        self.steps = 0
        #: FSDP2: turns local shards' norms into the full gradients' (a collective; see ``_shards.py``), else None
        self.reduce: Any = None

    def subset(self) -> tuple[list[Tensor], Tensor]:
        """The parameters that have a gradient now, and their positions among all (a device index tensor).

        Cached per pattern (at most :data:`MAX_SUBSETS` of them; beyond, built at each step): a model that leaves
        the same parameters without a gradient at every step (a frozen or unused layer) gets the same list object
        and positions back, with no per-step list building or host-to-device copy.
        """
        key = tuple(i for i, q in enumerate(self.params) if q.grad is not None)
        hit = self.subsets.get(key)
        if hit is None:
            device = self.params[key[0]].device if key else self.device  # where param_norms puts their norms
            hit = ([self.params[i] for i in key], host_to_device(list(key), device))  # H2D, once per pattern
            if len(self.subsets) < MAX_SUBSETS:
                self.subsets[key] = hit
        return hit

    def full_row(self, positions: Tensor, values: Tensor) -> Tensor:
        """Norms of the present parameters as a row over all parameters (absent ones: 0, like a zero gradient)."""
        return values.new_zeros(len(self.params)).index_copy_(0, positions, values)

    def push(self, row: Tensor, aux: Tensor | None, step: int, clip: ClipSpec) -> None:
        """Append one optimizer step (tensor references only; folds first if the clipping changed)."""
        if clip != self.clip and self.rows:
            self.fold()
        self.clip = clip
        self.rows.append(row)
        if aux is not None:
            self.aux_rows.append(aux)
        self.step_numbers.append(step)
        self.last, self.last_aux, self.last_clipped = row, aux, None
        self.steps += 1
        if len(self.rows) >= FOLD_ROWS:
            self.fold()

    def fold(self) -> None:
        """Reduce the kept rows in one batch into the accumulators and drop them (no host read)."""
        if not self.rows:
            return
        aux = torch.stack(self.aux_rows) if len(self.aux_rows) == len(self.rows) else None
        steps = host_to_device(self.step_numbers, self.rows[0].device)
        rows = torch.stack(self.rows)
        if (
            self.reduce is not None
        ):  # sharded gradients: the full norms, one collective per block (same steps on all ranks)
            rows = self.reduce(rows, self.p)
            self.last = rows[-1]
            if aux is not None:
                aux = self.reduce(aux, math.inf if self.clip is not None and self.clip[0] == "value" else 2.0)
                self.last_aux = aux[-1]
        top, clipped, bad, first, bad_params, zero = reduce_rows(rows, aux, steps, self.p, self.clip)
        torch.maximum(self.total_max, top, out=self.total_max)
        self.clip_count.add_(clipped)
        self.nonfinite_count.add_(bad)
        torch.minimum(self.first_nonfinite, first, out=self.first_nonfinite)
        self.nonfinite_mask.logical_or_(bad_params)
        self.zero_mask.logical_and_(zero)
        self.rows, self.aux_rows, self.step_numbers = [], [], []

    def latest(self) -> tuple[Tensor, Tensor | None, Tensor]:
        """Total norm of the latest step before and after the Trainer's clipping, and its group norms.

        The post-clip norm is ``None`` when it is not known: "value" clipping on a step that was not expected to be
        flushed.
        """
        if self.last is None:
            raise RuntimeError("OptWindow.latest() needs at least one optimizer step")
        p = self.p
        total = torch.linalg.vector_norm(self.last, p)
        clipped: Tensor | None = total
        if self.clip is not None and self.clip[0] == "norm":
            l2 = total if self.last_aux is None else torch.linalg.vector_norm(self.last_aux, 2.0)
            clipped = total * clip_coef(l2, self.clip[1])
        elif self.clip is not None:
            clipped = self.last_clipped
        groups = combine(self.last, self.index, len(self.group_names), p)
        return total, clipped, groups

    def restart(self) -> None:
        """After a flush: the window statistics start again (cumulative ones go on)."""
        self.total_max.zero_()
        self.clip_count.zero_()
        self.param_norms = None
        self.steps = 0

    def restore(self, window: dict[str, Any], dead_known: bool) -> None:
        """Continue a window saved in a checkpoint between flushes (one-time host-to-device fills)."""
        self.steps = int(window.get("steps", 0))
        self.total_max.fill_(float(window.get("total_max", 0.0)))
        self.clip_count.fill_(float(window.get("clip_count", 0)))
        zero = window.get("zero_params")
        if zero is not None and not dead_known:
            keep = set(zero)
            mask = [n in keep for n in self.names]
            self.zero_mask = host_to_device(mask, self.device, torch.bool)  # one-time H2D copy


__all__ = [
    "FOLD_ROWS",
    "NO_STEP",
    "ClipSpec",
    "NormPath",
    "OptWindow",
    "clip_coef",
    "combine",
    "norm_path",
    "param_norms",
    "reduce_rows",
    "stacked_norms",
]
