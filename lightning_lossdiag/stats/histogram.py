"""Fixed-range (or log-spaced) streaming histograms on the device, written to TensorBoard with ``add_histogram_raw``.

Bin convention (``numpy.histogram``'s): with edges ``e_0 < ... < e_B`` (the float64 tensor ``edges``) bin ``i``
holds ``e_i <= x < e_{i+1}``, and the last bin also holds ``x == e_B`` (``high``), as in ``torch.histc``. Finite values
below ``low`` are counted in ``underflow``, above ``high`` in ``overflow``; NaN and +-inf only in ``nonfinite``. Values
are compared with the edges in float64 (exact for every float dtype), so the counts equal
``numpy.histogram(x, bins=edges)`` exactly, and ``torch.histc(x, bins, low, high)`` except for values within
rounding of an edge (``histc`` computes ``floor((x - low) * bins / (high - low))`` in the input dtype, which may put
a value on or next to an edge into the neighbouring bin; here a value equal to an inner edge always goes into the
bin above it).

State (fixed size, ``bins + 7`` numbers): ``counts`` (int64, ``(bins,)``), ``underflow``/``overflow``/``nonfinite``
(0-d int64), and over the finite values ``sum``, ``sum_squares``, ``min``, ``max`` (0-d float64; ``min = +inf`` and
``max = -inf`` while empty).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any, NamedTuple

import torch
from torch import Tensor
from typing_extensions import Self

from lightning_lossdiag.stats._base import StreamingStat, check_positive_int, on_device
from lightning_lossdiag.stats.distributed import pack


class HistogramState(NamedTuple):
    """The state tensors of :class:`FixedHistogram`."""

    counts: Tensor
    underflow: Tensor
    overflow: Tensor
    nonfinite: Tensor
    sum: Tensor
    sum_squares: Tensor
    min: Tensor
    max: Tensor


def histogram_edges(
    low: float,
    high: float,
    bins: int,
    *,
    log: bool = False,
    dtype: torch.dtype = torch.float64,
    device: torch.device | str | None = None,
) -> Tensor:
    """The ``bins + 1`` bin edges from ``low`` to ``high``: evenly spaced, or evenly spaced in log (``low > 0``).

    Linear edges are ``torch.linspace(low, high, bins + 1, dtype=dtype)``. Log edges are
    ``exp(linspace(log(low), log(high)))`` computed in float64 with the end points set to ``low`` and ``high``
    exactly, then cast to ``dtype``.

    Example:
        >>> histogram_edges(0.0, 1.0, 4).tolist()
        [0.0, 0.25, 0.5, 0.75, 1.0]
        >>> [round(e, 9) for e in histogram_edges(1.0, 1000.0, 3, log=True).tolist()]
        [1.0, 10.0, 100.0, 1000.0]
    """
    check_positive_int("bins", bins)
    if isinstance(low, bool) or not isinstance(low, (int, float)) or not math.isfinite(low):
        raise ValueError(f"`low` must be a finite number, got {low!r}")
    if isinstance(high, bool) or not isinstance(high, (int, float)) or not math.isfinite(high):
        raise ValueError(f"`high` must be a finite number, got {high!r}")
    if not low < high:
        raise ValueError(f"`low` must be smaller than `high`, got low={low!r}, high={high!r}")
    if not log:
        return torch.linspace(float(low), float(high), bins + 1, dtype=dtype, device=device)
    if low <= 0:
        raise ValueError(f"`low` must be > 0 for log-spaced edges (`log=True`), got {low!r}")
    edges = torch.linspace(math.log(low), math.log(high), bins + 1, dtype=torch.float64, device=device).exp()
    edges[0] = float(low)
    edges[-1] = float(high)
    return edges.to(dtype)


def _histogram_init(bins: int, device: torch.device) -> HistogramState:
    def zero_int() -> Tensor:
        return torch.zeros((), dtype=torch.int64, device=device)

    def full(value: float) -> Tensor:
        return torch.full((), value, dtype=torch.float64, device=device)

    return HistogramState(
        counts=torch.zeros(bins, dtype=torch.int64, device=device),
        underflow=zero_int(),
        overflow=zero_int(),
        nonfinite=zero_int(),
        sum=full(0.0),
        sum_squares=full(0.0),
        min=full(math.inf),
        max=full(-math.inf),
    )


def _histogram_update(state: HistogramState, values: Tensor, edges: Tensor) -> HistogramState:
    """Pure update: the state after also counting ``values`` (any shape) against ``edges`` (float64)."""
    x = values.detach().reshape(-1)
    if x.numel() == 0:
        return state
    x = x.to(torch.float64)
    bins = edges.numel() - 1
    finite = torch.isfinite(x)
    under = (x < edges[0]) & finite
    over = (x > edges[-1]) & finite
    inside = finite & ~under & ~over
    # right=True: index = number of edges <= x, so e_i <= x < e_{i+1} lands in bin i; x == high is clamped to the last.
    index = (torch.bucketize(x, edges, right=True) - 1).clamp_(0, bins - 1)
    counts = state.counts.scatter_add(0, index, inside.to(torch.int64))
    finite_x = torch.where(finite, x, 0.0)
    return HistogramState(
        counts=counts,
        underflow=state.underflow + under.sum(),
        overflow=state.overflow + over.sum(),
        nonfinite=state.nonfinite + (~finite).sum(),
        sum=state.sum + finite_x.sum(),
        sum_squares=state.sum_squares + finite_x.square().sum(),
        min=torch.minimum(state.min, torch.where(finite, x, math.inf).amin()),
        max=torch.maximum(state.max, torch.where(finite, x, -math.inf).amax()),
    )


def _histogram_reduce(stacked: Sequence[Tensor]) -> HistogramState:
    """Pure merge of ``(W, ...)`` stacks of histogram states: sums, and min/max."""
    s = HistogramState(*stacked)
    return HistogramState(
        counts=s.counts.sum(0),
        underflow=s.underflow.sum(0),
        overflow=s.overflow.sum(0),
        nonfinite=s.nonfinite.sum(0),
        sum=s.sum.sum(0),
        sum_squares=s.sum_squares.sum(0),
        min=s.min.amin(0),
        max=s.max.amax(0),
    )


class FixedHistogram(StreamingStat):
    """A histogram with fixed edges that accumulates on the device, mergeable across batches and ranks.

    See the module docstring for the bin convention. ``update`` makes no host read; :func:`histogram_raw_args`
    reads the state once (epoch end) for ``SummaryWriter.add_histogram_raw``.

    Args:
        low: left edge of the first bin.
        high: right edge of the last bin (values equal to it go into the last bin).
        bins: number of bins.
        log: log-spaced edges (requires ``low > 0``).
        device: where the state lives (default: CPU).

    Example:
        >>> h = FixedHistogram(0.0, 4.0, bins=4)
        >>> h.update(torch.tensor([0.0, 0.5, 1.0, 3.9, 4.0, 7.0, -1.0, float("nan")]))
        >>> h.counts.tolist(), int(h.underflow), int(h.overflow), int(h.nonfinite), int(h.total)
        ([2, 1, 0, 2], 1, 1, 1, 8)
    """

    _state_names = HistogramState._fields

    counts: Tensor
    underflow: Tensor
    overflow: Tensor
    nonfinite: Tensor
    sum: Tensor
    sum_squares: Tensor
    min: Tensor
    max: Tensor

    def __init__(
        self, low: float, high: float, bins: int = 64, *, log: bool = False, device: torch.device | str | None = None
    ) -> None:
        super().__init__(device)
        self.edges = histogram_edges(low, high, bins, log=log, device=self.device)
        self.low, self.high, self.bins, self.log = float(low), float(high), bins, bool(log)
        self.reset()

    def _config(self) -> dict[str, Any]:
        return {"low": self.low, "high": self.high, "bins": self.bins, "log": self.log}

    def _initial_state(self) -> HistogramState:
        return _histogram_init(self.bins, self.device)

    def _reduce(self, stacked: Sequence[Tensor]) -> HistogramState:
        return _histogram_reduce(stacked)

    def update(self, values: Tensor) -> None:
        """Count ``values`` (any shape; detached). No host read."""
        if not isinstance(values, Tensor):
            raise TypeError(f"`values` must be a Tensor, got {type(values).__name__}")
        values = on_device(values, self.device)
        self._set_state(_histogram_update(HistogramState(*self.state), values, self.edges))

    @property
    def total(self) -> Tensor:
        """Number of values seen, non-finite ones included (0-d int64 tensor on the device)."""
        return self.counts.sum() + self.underflow + self.overflow + self.nonfinite

    def to(self, device: torch.device | str | int) -> Self:
        """Move the state and the edges to ``device``, in place; returns ``self``."""
        super().to(device)
        self.edges = on_device(self.edges, self.device)
        return self


def histogram_raw_args(h: FixedHistogram) -> dict[str, Any]:
    """Host-side keyword arguments for ``SummaryWriter.add_histogram_raw`` (add ``tag`` and ``global_step``).

    Reads the histogram state in ONE transfer, so call it at a flush or at epoch end, never per step. The buckets are
    the ``bins`` bins (upper limits ``edges[1:]``), plus an outer bucket for the underflow (upper limit ``low``) and
    one for the overflow (upper limit ``max``) when they are non-zero. ``num``, ``sum``, ``sum_squares``, ``min`` and
    ``max`` are over the finite values; non-finite values are not in the histogram (see ``h.nonfinite``). When no
    finite value was seen, ``num`` is 0 and ``min``/``max`` are 0.0: callers usually skip writing then.

    Example:
        >>> h = FixedHistogram(0.0, 2.0, bins=2)
        >>> h.update(torch.tensor([0.5, 1.5, 1.5, 5.0]))
        >>> args = histogram_raw_args(h)
        >>> args["num"], args["bucket_limits"], args["bucket_counts"], args["max"]
        (4, [1.0, 2.0, 5.0], [1, 2, 1], 5.0)
    """
    state = h.state
    host = pack([*state, h.edges]).cpu().tolist()  # epoch-end/flush host read: one transfer for the whole histogram
    bins = h.bins
    counts = [int(c) for c in host[:bins]]
    underflow, overflow, _nonfinite = (int(v) for v in host[bins : bins + 3])
    total_sum, sum_squares, vmin, vmax = host[bins + 3 : bins + 7]
    edges = host[bins + 7 :]
    limits = list(edges[1:])
    if underflow:
        limits.insert(0, edges[0])
        counts.insert(0, underflow)
    if overflow:
        limits.append(vmax)
        counts.append(overflow)
    num = sum(counts)
    if num == 0:
        vmin = vmax = 0.0
    return {
        "min": vmin,
        "max": vmax,
        "num": num,
        "sum": total_sum,
        "sum_squares": sum_squares,
        "bucket_limits": limits,
        "bucket_counts": counts,
    }


# ---- a histogram staged in a caller's flat float64 state (slot counts and sums via one index_add_) -------------
def staged_slots(bins: int, device: torch.device | str | None = None) -> Tensor:
    """Boundaries whose ``bucketize(x, right=True)`` is the slot of ``x`` in a staged ``[0, 1]`` histogram.

    Slot 0 for ``-inf``, 1 below 0, ``2 + i`` in bin ``i`` of ``histogram_edges(0, 1, bins)`` (1.0 in the last bin),
    ``bins + 2`` above 1, ``bins + 3`` for ``+inf`` and NaN: the bins, underflow, overflow and non-finite counts of
    :class:`FixedHistogram`. The staged state is ``bins + 6`` float64 values: these ``bins + 4`` slot counts, then
    the sum and the sum of squares of the finite values.

    Example:
        >>> torch.bucketize(torch.tensor([-1.0, 0.0, 0.5, 1.0, 2.0], dtype=torch.float64), staged_slots(2),
        ...                 right=True).tolist()
        [1, 2, 3, 3, 4]
    """
    edges = histogram_edges(0.0, 1.0, bins, device=device)
    one = torch.ones(1, dtype=torch.float64, device=edges.device)
    low = torch.full((1,), -torch.finfo(torch.float64).max, dtype=torch.float64, device=edges.device)
    return torch.cat([low, edges[:-1], one.nextafter(one + 1), one * math.inf])


def stage_values(
    p: Tensor, bounds: Tensor, offset: int, sums: Tensor, value_range: Tensor
) -> tuple[list[Tensor], list[Tensor]] | None:
    """Positions and values that count ``(n,)`` values (NaN: left out) in a staged histogram; ``None`` for none.

    ``bounds``: :func:`staged_slots`; ``offset``: where the staged state starts in the caller's flat state;
    ``sums``: the ``(2,)`` positions of its sum and sum of squares. The caller adds the returned values at the
    returned positions (one ``index_add_``). ``value_range`` (``(2,)`` float64: minimum and minus the maximum of the
    finite values) is updated in place. No host read.
    """
    x = p.double()
    if x.shape[0] == 0:
        return None
    finite = torch.nan_to_num(x, nan=0.0, posinf=0.0, neginf=0.0)
    index = [torch.bucketize(x, bounds, right=True).add_(offset), sums[:1].expand_as(x), sums[1:].expand_as(x)]
    inf = math.inf  # the minimum and maximum of the finite values: the others weigh +-inf
    low = torch.stack([torch.nan_to_num(x, inf, inf, inf), torch.nan_to_num(x, -inf, -inf, -inf).neg_()])
    torch.minimum(value_range, low.amin(1), out=value_range)
    return index, [torch.ones_like(x), finite, finite * finite]


def staged_histogram(state: Tensor, bins: int, value_range: Tensor) -> FixedHistogram:
    """The :class:`FixedHistogram` over ``[0, 1]`` of a staged state (see :func:`staged_slots`; epoch end)."""
    counts = state.round().long()
    hist = FixedHistogram(0.0, 1.0, bins, device=state.device)
    fields = {"counts": counts[2 : bins + 2], "underflow": counts[1], "overflow": counts[bins + 2]}
    fields.update(nonfinite=counts[0] + counts[bins + 3], sum=state[bins + 4], sum_squares=state[bins + 5])
    hist.load_state_dict({**fields, "min": value_range[0], "max": -value_range[1]})
    return hist


__all__ = [
    "FixedHistogram",
    "HistogramState",
    "histogram_edges",
    "histogram_raw_args",
    "stage_values",
    "staged_histogram",
    "staged_slots",
]
