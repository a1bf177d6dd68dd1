"""Pure tensor helpers of the activation monitor: which modules are activations, their bounds, per-call statistics.

Everything here runs on the tensor's device and never reads a value on the host, so it can run inside a forward
hook. A forward pass may call one module several times (a shared activation); :func:`call_stats` measures one call
and :func:`merge_stats` pools calls, so the statistics of a step cover every call of that step's forward pass.

Formulas, over the ``n`` values ``x`` of one activation output (all calls pooled):

* ``mean = sum(x) / n``; ``std = sqrt(sum((x - mean)^2) / n)`` (population std, merged exactly across calls);
* ``zero_frac = #(x == 0) / n``;
* ``saturated_frac = #(x <= lo + tol * (hi - lo) or x >= hi - tol * (hi - lo)) / n`` for an activation bounded to
  ``[lo, hi]``;
* ``dead_frac`` = share of units (slices along ``unit_dim``) whose values are all zero on the whole batch.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from lightning_lossdiag.callbacks._base import host_to_device

#: Activation-function modules (softmax-like normalisations are not activations here: their outputs are shares).
ACTIVATION_TYPES: tuple[type[nn.Module], ...] = (
    nn.ReLU,
    nn.LeakyReLU,
    nn.PReLU,
    nn.RReLU,
    nn.ELU,
    nn.SELU,
    nn.CELU,
    nn.GELU,
    nn.SiLU,
    nn.Mish,
    nn.Sigmoid,
    nn.Tanh,
    nn.Hardtanh,  # includes nn.ReLU6
    nn.Hardsigmoid,
    nn.Hardswish,
    nn.Softplus,
    nn.Softsign,
    nn.LogSigmoid,
    nn.Tanhshrink,
    nn.Softshrink,
    nn.Hardshrink,
    nn.Threshold,
    nn.GLU,
)


def is_activation(module: nn.Module) -> bool:
    """True for activation-function modules (``nn.ReLU``, ``nn.Sigmoid``, ``nn.GELU``, ...).

    Example:
        >>> is_activation(nn.ReLU()), is_activation(nn.Linear(2, 2)), is_activation(nn.Softmax(dim=1))
        (True, False, False)
    """
    return isinstance(module, ACTIVATION_TYPES)


def activation_bounds(module: nn.Module) -> tuple[float, float] | None:
    """The output range ``(lo, hi)`` of a bounded activation, or None for unbounded ones and other modules.

    Bounded: ``Sigmoid`` and ``Hardsigmoid`` ``[0, 1]``, ``Tanh`` and ``Softsign`` ``[-1, 1]``, ``Hardtanh``
    ``[min_val, max_val]`` (so ``ReLU6`` is ``[0, 6]``).

    Example:
        >>> activation_bounds(nn.ReLU6()), activation_bounds(nn.Tanh()), activation_bounds(nn.ReLU())
        ((0.0, 6.0), (-1.0, 1.0), None)
    """
    if isinstance(module, nn.Hardtanh):
        return float(module.min_val), float(module.max_val)
    if isinstance(module, (nn.Sigmoid, nn.Hardsigmoid)):
        return 0.0, 1.0
    if isinstance(module, (nn.Tanh, nn.Softsign)):
        return -1.0, 1.0
    return None


def first_tensor(output: Any) -> Tensor | None:
    """The activation tensor of a module output: the output itself, or the first floating tensor of a tuple/list.

    Example:
        >>> first_tensor((torch.ones(2), torch.zeros(1))).tolist(), first_tensor("text")
        ([1.0, 1.0], None)
    """
    if isinstance(output, Tensor):
        return output if output.is_floating_point() else None
    if isinstance(output, (tuple, list)):
        for item in output:
            found = first_tensor(item)
            if found is not None:
                return found
    return None


def _unit_axis(ndim: int, unit_dim: int) -> int:
    return unit_dim if -ndim <= unit_dim < ndim else ndim - 1


#: Values of a layer's output taken at a time (rows of its first dim): the temporaries of ``call_stats`` (a float32
#: copy, the centred values, a mask) stay within ~10 bytes per value of a chunk, not of the whole output. On a GPT-like
#: LM the head's (16, 512, 8192) bf16 logits made 512 MiB of temporaries at once, which added to the fit's peak memory.
CHUNK_VALUES = 1 << 22


def _row_chunks(x: Tensor) -> list[Tensor]:
    """``x`` split along its first dim into pieces of at most ~``CHUNK_VALUES`` values (views, no copy)."""
    if x.ndim == 0 or x.numel() <= CHUNK_VALUES:
        return [x]
    per_row = max(x.numel() // max(x.shape[0], 1), 1)
    return list(x.split(max(CHUNK_VALUES // per_row, 1), dim=0))


@torch.no_grad()
def call_stats(x: Tensor, unit_dim: int, bounds: tuple[float, float] | None, tol: float) -> dict[str, Tensor]:
    """Statistics of one call's output ``x`` (device tensors, no host read).

    Keys: ``n``, ``mean``, ``m2`` (sum of squared deviations), ``zeros``, ``saturated`` (present when ``bounds``
    is given), ``alive`` (bool per unit: some non-zero value; units run along ``unit_dim``, or the last dim when the
    tensor has no such dim; a 0-d or 1-d tensor is one unit). Large outputs are read in chunks of rows
    (``CHUNK_VALUES``), so the temporaries stay small whatever the output's size.

    Example:
        >>> s = call_stats(torch.tensor([[0.0, 1.0], [0.0, 3.0]]), unit_dim=1, bounds=None, tol=0.01)
        >>> s["mean"].item(), s["zeros"].item(), s["alive"].tolist()
        (1.0, 2.0, [False, True])
    """
    x = x.detach()
    if not x.is_floating_point():
        x = x.float()
    n = torch.full((), x.numel(), dtype=torch.float64, device=x.device)
    pieces = _row_chunks(x)
    if x.dtype == torch.float32 or len(pieces) == 1:
        mean = x.float().mean()  # float32 (no copy) or small
    else:  # bf16/fp16/fp64: a float32 copy of one piece at a time (mean(dtype=...) copies it all on the CPU)
        mean = torch.stack([piece.float().sum() for piece in pieces]).sum() / x.numel()
    axis = _unit_axis(x.ndim, unit_dim) % x.ndim if x.ndim > 1 else 0
    chunks = pieces if axis != 0 else [x]  # units along dim 0: one piece (the counts are per row then)
    m2 = torch.zeros((), dtype=torch.float32, device=x.device)
    per_unit: Tensor | None = None
    saturated: Tensor | None = None
    for chunk in chunks:
        centered = (chunk.float() - mean).reshape(-1)  # the one temporary of the size of the chunk
        m2 = m2 + torch.dot(centered, centered)  # sum of squared deviations: one BLAS/cuBLAS call per chunk
        del centered
        # non-zero values per unit (NaN counts as non-zero), summed as int32: on the CPU about 2.5x faster than
        # count_nonzero over the same dims, which accumulates in int64
        if x.ndim <= 1:
            counts = chunk.ne(0).sum(dtype=torch.int32).reshape(1)
        else:
            counts = chunk.ne(0).sum(dim=tuple(d for d in range(x.ndim) if d != axis), dtype=torch.int32)
        per_unit = counts if per_unit is None else per_unit + counts
        if bounds is not None:
            lo, hi = bounds
            margin = tol * (hi - lo)
            hits = ((chunk <= lo + margin) | (chunk >= hi - margin)).sum().double()
            saturated = hits if saturated is None else saturated + hits
    assert per_unit is not None
    mean, m2 = torch.stack([mean, m2]).double().unbind()
    out = {"n": n, "mean": mean, "m2": m2, "zeros": n - per_unit.sum().double()}
    if saturated is not None:
        out["saturated"] = saturated
    out["alive"] = per_unit > 0
    return out


@torch.no_grad()
def merge_stats(a: dict[str, Tensor], b: dict[str, Tensor]) -> dict[str, Tensor]:
    """Pool two calls' statistics exactly (Chan's parallel mean/variance); a unit is alive if alive in either call.

    When the calls have different numbers of units the newer call's ``alive`` is kept.

    Example:
        >>> x, y = torch.tensor([[1.0, 0.0]]), torch.tensor([[3.0, 0.0], [5.0, 0.0]])
        >>> m = merge_stats(call_stats(x, 1, None, 0.01), call_stats(y, 1, None, 0.01))
        >>> finish_stats(m)["mean"].item() == torch.cat([x, y]).mean().item()
        True
    """
    n = a["n"] + b["n"]
    delta = b["mean"] - a["mean"]
    out = {
        "n": n,
        "mean": a["mean"] + delta * b["n"] / n,
        "m2": a["m2"] + b["m2"] + delta.square() * a["n"] * b["n"] / n,
        "zeros": a["zeros"] + b["zeros"],
    }
    if "saturated" in a and "saturated" in b:
        out["saturated"] = a["saturated"] + b["saturated"]
    same_units = a["alive"].shape == b["alive"].shape  # shapes are host metadata, not a value read
    out["alive"] = a["alive"] | b["alive"] if same_units else b["alive"]
    return out


@torch.no_grad()
def finish_stats(acc: dict[str, Tensor]) -> dict[str, Tensor]:
    """Final per-layer scalars (device tensors): ``mean``, ``std``, ``zero_frac``, ``dead_frac``, ``saturated_frac``.

    ``saturated_frac`` is present only when the pooled statistics have a ``saturated`` count (bounded activations).

    Example:
        >>> f = finish_stats(call_stats(torch.tensor([[0.0, 2.0]]), 1, None, 0.01))
        >>> f["std"].item(), f["zero_frac"].item(), f["dead_frac"].item()
        (1.0, 0.5, 0.5)
    """
    row = finish_all([acc])[0]  # one formula for one layer and for all of them
    return {stat: row[i] for i, stat in enumerate(FINISHED) if stat != "saturated_frac" or "saturated" in acc}


#: the columns of :func:`finish_all`, in order (``saturated_frac`` is NaN for a layer without it)
FINISHED = ("mean", "std", "zero_frac", "dead_frac", "saturated_frac")


@torch.no_grad()
def finish_all(accs: list[dict[str, Tensor]]) -> Tensor:
    """:func:`finish_stats` of every layer at once: a ``[layers, 5]`` float64 matrix, columns :data:`FINISHED`.

    A few kernels for all layers instead of about ten per layer (11 layers on the CPU, timed alone: ~0.2 ms instead
    of ~0.35 ms), and one matrix to move to the host. ``saturated_frac`` is NaN where the layer has no
    ``saturated`` count (unbounded activations).

    Example:
        >>> a = call_stats(torch.tensor([[0.0, 2.0]]), 1, None, 0.01)
        >>> b = call_stats(torch.tensor([[1.0], [-1.0], [0.98]]), 1, (-1.0, 1.0), 0.01)
        >>> finish_all([a, b]).tolist()[0]
        [1.0, 1.0, 0.5, 0.5, nan]
        >>> row, one = finish_all([a, b])[1].tolist(), finish_stats(b)
        >>> row == [one[k].item() for k in FINISHED]
        True
    """
    if not accs:
        return torch.zeros(0, len(FINISHED), dtype=torch.float64)
    nan = torch.full_like(accs[0]["n"], torch.nan)
    n = torch.stack([a["n"] for a in accs]).clamp_min_(1)
    m2 = torch.stack([a["m2"] for a in accs])
    zeros = torch.stack([a["zeros"] for a in accs])
    saturated = torch.stack([a.get("saturated", nan) for a in accs])
    alive = torch.nn.utils.rnn.pad_sequence([a["alive"].reshape(-1) for a in accs], batch_first=True)
    units = [a["alive"].numel() for a in accs]  # shapes: host metadata, not a read
    dead = 1.0 - alive.sum(dim=1, dtype=torch.float64) / host_to_device(units, n.device, torch.float64)
    std = (m2 / n).clamp_min_(0).sqrt_()
    return torch.stack([torch.stack([a["mean"] for a in accs]), std, zeros / n, dead, saturated / n], dim=1)


def histogram(x: Tensor, bins: int) -> Tensor:
    """Fixed-bin histogram of the finite values of ``x`` over their observed ``[min, max]``, on the device.

    Returns one float64 vector ``[min, max, num, sum, sum_squares, count_0, ..., count_{bins-1}]`` (what
    ``SummaryWriter.add_histogram_raw`` needs). Bin ``i`` covers ``[min + i * w, min + (i + 1) * w)`` with
    ``w = (max - min) / bins``; the maximum falls in the last bin. All values fall in bin 0 when ``min == max``.
    Same bins as ``torch.histc(x, bins, min, max)``, but the range stays on the device (``histc`` needs it on the
    host), so no host read happens. With no finite value, ``min > max`` (``inf``, ``-inf``). One row of
    :func:`histograms`.

    Example:
        >>> h = histogram(torch.tensor([0.0, 0.5, 1.0, 1.0]), bins=2)
        >>> h[:3].tolist(), h[5:].tolist()
        ([0.0, 1.0, 4.0], [1.0, 3.0])
    """
    return histograms([x], bins)[0]


@torch.no_grad()
def histograms(values: list[Tensor], bins: int) -> Tensor:
    """:func:`histogram` of each tensor of ``values``, all at once: one row each, in a few kernels for all of them.

    The values are laid out as rows of one float32 matrix, padded with NaN (never counted: not finite). Every step
    runs once over the matrix, in place on one scratch matrix where it can (fresh memory costs page faults), and
    needs no mask: ``nan_to_num`` moves the non-finite values out of the minimum and maximum and out of the sums,
    and into a spare bin after the last row's for the counts (one ``bincount``). Sums are float32 (pairwise).

    Example:
        >>> rows = histograms([torch.tensor([0.0, 0.5, 1.0, 1.0]), torch.tensor([2.0, float("nan")])], bins=2)
        >>> rows[0, 5:].tolist(), rows[1, :3].tolist(), rows[1, 5:].tolist()
        ([1.0, 3.0], [2.0, 2.0, 1.0], [1.0, 0.0])
    """
    if not values:
        return torch.zeros(0, 5 + bins, dtype=torch.float64)
    device, rows = values[0].device, len(values)
    width = max(max(v.numel() for v in values), 1)
    matrix = torch.empty((rows, width), dtype=torch.float32, device=device)
    for row, v in zip(matrix, values, strict=True):
        row[: v.numel()].copy_(v.detach().reshape(-1))
        row[v.numel() :].fill_(torch.nan)
    inf, nan = torch.inf, torch.nan
    scratch = torch.nan_to_num(matrix, nan=inf, posinf=inf, neginf=inf)
    lo = scratch.amin(dim=1, keepdim=True)  # inf: no finite value in the row
    hi = torch.nan_to_num(matrix, nan=-inf, posinf=-inf, neginf=-inf, out=scratch).amax(dim=1, keepdim=True)
    # at most the largest float32, so a finite value never makes inf / inf (it lands in the last bin instead)
    span = torch.where(hi > lo, (hi - lo).clamp_(max=torch.finfo(torch.float32).max), torch.ones_like(hi))
    # bin of each value: (x - min) / span * bins, floored, clamped to the row's bins; NaN (the non-finite) stays NaN
    pos = torch.nan_to_num(matrix, nan=nan, posinf=nan, neginf=nan, out=scratch).sub_(lo).div_(span).mul_(bins)
    pos.floor_().clamp_(0, bins - 1)
    pos += torch.arange(rows, device=device, dtype=torch.float32).unsqueeze(1) * bins  # row r: bins after r's start
    spare = rows * bins  # where the non-finite values (and the padding) are counted, then dropped
    idx = torch.nan_to_num_(pos, nan=float(spare)).to(torch.int32).reshape(-1)
    # epoch end: bincount sizes its output from the largest index (a host read on CUDA, next to the one transfer)
    counts = torch.bincount(idx, minlength=spare + 1)[:spare].reshape(rows, bins).double()
    xs = torch.nan_to_num(matrix, nan=0.0, posinf=0.0, neginf=0.0, out=scratch)
    sums = torch.stack([xs.sum(dim=1), torch.linalg.vecdot(xs, xs)], dim=1).double()
    head = torch.cat([lo.double(), hi.double(), counts.sum(dim=1, keepdim=True), sums], dim=1)
    return torch.cat([head, counts], dim=1)


def bucket_limits(lo: float, hi: float, bins: int) -> list[float]:
    """Right edges of the ``bins`` equal bins over ``[lo, hi]`` (host floats; a zero range gets width 1).

    Example:
        >>> bucket_limits(0.0, 1.0, 4)
        [0.25, 0.5, 0.75, 1.0]
    """
    span = hi - lo if hi > lo else 1.0
    return [lo + span * (i + 1) / bins for i in range(bins)]


__all__ = [
    "ACTIVATION_TYPES",
    "activation_bounds",
    "bucket_limits",
    "call_stats",
    "FINISHED",
    "finish_all",
    "finish_stats",
    "first_tensor",
    "histogram",
    "histograms",
    "is_activation",
]
