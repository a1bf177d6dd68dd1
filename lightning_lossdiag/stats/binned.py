"""Errors grouped by bins of the target (is the model worse for large targets?), accumulated on the device.

Bin convention: with edges ``e_0 < ... < e_B`` bin ``i`` holds targets ``e_i <= t < e_{i+1}`` and the last bin also
holds ``t == e_B``; targets below ``e_0`` go to the FIRST bin and targets above ``e_B`` to the LAST bin, so every
finite pair is counted. Pairs whose target or error is NaN/inf are counted only in ``nonfinite``. Comparisons are
made in float64.

State: ``count`` (int64, ``(B,)``), ``sum_abs`` and ``sum_sq`` (float64, ``(B,)``), ``nonfinite`` (0-d int64).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any, NamedTuple

import torch
from torch import Tensor
from typing_extensions import Self

from lightning_lossdiag.stats._base import StreamingStat, check_positive_int, on_device


class BinnedState(NamedTuple):
    """The state tensors of :class:`BinnedErrors`."""

    count: Tensor  # type: ignore[assignment]  # shadows tuple.count on purpose
    sum_abs: Tensor
    sum_sq: Tensor
    nonfinite: Tensor


def _binned_init(bins: int, device: torch.device) -> BinnedState:
    return BinnedState(
        count=torch.zeros(bins, dtype=torch.int64, device=device),
        sum_abs=torch.zeros(bins, dtype=torch.float64, device=device),
        sum_sq=torch.zeros(bins, dtype=torch.float64, device=device),
        nonfinite=torch.zeros((), dtype=torch.int64, device=device),
    )


def _binned_update(state: BinnedState, target: Tensor, abs_error: Tensor, edges: Tensor) -> BinnedState:
    """Pure update: add the pairs ``(target, abs_error)`` (same number of elements) binned by ``edges`` (float64)."""
    t = target.detach().reshape(-1).to(torch.float64)
    err = abs_error.detach().reshape(-1).to(torch.float64)
    finite = torch.isfinite(t) & torch.isfinite(err)
    # Only the inner edges: below e_1 -> bin 0 (first bin takes the underflow), >= e_{B-1} -> bin B-1 (the overflow).
    index = torch.bucketize(torch.where(finite, t, 0.0), edges[1:-1], right=True)
    err = torch.where(finite, err, 0.0)
    return BinnedState(
        count=state.count.scatter_add(0, index, finite.to(torch.int64)),
        sum_abs=state.sum_abs.scatter_add(0, index, err),
        sum_sq=state.sum_sq.scatter_add(0, index, err.square()),
        nonfinite=state.nonfinite + (~finite).sum(),
    )


def _binned_reduce(stacked: Sequence[Tensor]) -> BinnedState:
    """Pure merge of ``(W, ...)`` stacks of binned states: sums."""
    return BinnedState(*(t.sum(0) for t in stacked))


def _validated_edges(edges: Tensor | Sequence[float]) -> list[float]:
    if isinstance(edges, Tensor):
        values = edges.detach().reshape(-1).cpu().tolist()  # one-time host read at construction
    else:
        try:
            values = [float(e) for e in edges]
        except (TypeError, ValueError) as err:
            raise ValueError(f"`edges` must be a sequence of numbers or a 1-d Tensor, got {edges!r}") from err
    if len(values) < 2:
        raise ValueError(f"`edges` must hold at least 2 values (one bin), got {values!r}")
    if not all(math.isfinite(v) for v in values) or any(
        not b > a for a, b in zip(values[:-1], values[1:], strict=True)
    ):
        raise ValueError(f"`edges` must be finite and strictly increasing, got {values!r}")
    return values


class BinnedErrors(StreamingStat):
    """Count, mean absolute error and RMSE per bin of the target, streamed on the device.

    See the module docstring for the bin convention (out-of-range targets join the first/last bin).

    Args:
        edges: ``B + 1`` strictly increasing finite bin edges (e.g. from :func:`quantile_edges_from_sample`).
        device: where the state lives (default: CPU).

    Example:
        >>> b = BinnedErrors([0.0, 1.0, 2.0])
        >>> b.update(torch.tensor([0.5, 1.5, 1.7, 9.0]), torch.tensor([1.0, 2.0, 4.0, 6.0]))
        >>> b.count.tolist(), b.mean_abs().tolist(), b.rmse()[0].item()
        ([1, 3], [1.0, 4.0], 1.0)
    """

    _state_names = BinnedState._fields

    count: Tensor
    sum_abs: Tensor
    sum_sq: Tensor
    nonfinite: Tensor

    def __init__(self, edges: Tensor | Sequence[float], device: torch.device | str | None = None) -> None:
        super().__init__(device)
        self._edge_list = _validated_edges(edges)
        self.bins = check_positive_int("bins", len(self._edge_list) - 1)
        self.edges = torch.tensor(self._edge_list, dtype=torch.float64, device=self.device)
        self.reset()

    def _config(self) -> dict[str, Any]:
        return {"edges": list(self._edge_list)}

    def _initial_state(self) -> BinnedState:
        return _binned_init(self.bins, self.device)

    def _reduce(self, stacked: Sequence[Tensor]) -> BinnedState:
        return _binned_reduce(stacked)

    def update(self, target: Tensor, abs_error: Tensor) -> None:
        """Add pairs of targets and absolute errors (any shapes with the same number of elements). No host read."""
        if not isinstance(target, Tensor) or not isinstance(abs_error, Tensor):
            raise TypeError(
                f"`target` and `abs_error` must be Tensors, got {type(target).__name__} and {type(abs_error).__name__}"
            )
        if target.numel() != abs_error.numel():
            raise ValueError(
                f"`target` and `abs_error` must have the same number of elements, "
                f"got shapes {tuple(target.shape)} and {tuple(abs_error.shape)}"
            )
        if target.numel() == 0:
            return
        state = _binned_update(
            BinnedState(*self.state), on_device(target, self.device), on_device(abs_error, self.device), self.edges
        )
        self._set_state(state)

    def mean_abs(self) -> Tensor:
        """Mean absolute error per bin (float64, NaN for empty bins)."""
        return self.sum_abs / self.count.to(torch.float64)

    def rmse(self) -> Tensor:
        """Root mean squared error per bin (float64, NaN for empty bins)."""
        return (self.sum_sq / self.count.to(torch.float64)).sqrt()

    def to(self, device: torch.device | str | int) -> Self:
        """Move the state and the edges to ``device``, in place; returns ``self``."""
        super().to(device)
        self.edges = on_device(self.edges, self.device)
        return self


def quantile_edges_from_sample(values: Tensor, bins: int) -> Tensor:
    """Bin edges at the ``0, 1/bins, ..., 1`` quantiles of the finite ``values`` (e.g. ``BoundedSample.rows[:, 0]``).

    Repeated quantiles (equal within ``1e-9`` of the largest magnitude) are merged, so fewer than ``bins`` bins come
    back when values repeat; if all values are equal, the single bin ``[v - 0.5, v + 0.5]`` is returned.
    Epoch-time helper: it reads values on the host.

    Raises:
        ValueError: if ``bins`` is not a positive integer or there is no finite value.

    Example:
        >>> quantile_edges_from_sample(torch.arange(9.0), 4).tolist()
        [0.0, 2.0, 4.0, 6.0, 8.0]
    """
    check_positive_int("bins", bins)
    flat = values.detach().reshape(-1).to(torch.float64)
    flat = flat[torch.isfinite(flat)]  # epoch-time host read (boolean mask): choosing edges is not per step
    if flat.numel() == 0:
        raise ValueError("`values` must contain at least one finite value to choose bin edges, got none")
    q = torch.linspace(0.0, 1.0, bins + 1, dtype=torch.float64, device=flat.device)
    quantiles = torch.quantile(flat, q).tolist()  # epoch-time host read: choosing edges is not per step
    tol = 1e-9 * max(abs(quantiles[0]), abs(quantiles[-1]))  # interpolation can split a repeated value by an ulp
    edges = [quantiles[0]]
    for value in quantiles[1:]:
        if value - edges[-1] > tol:
            edges.append(value)
    if len(edges) < 2:
        edges = [edges[0] - 0.5, edges[0] + 0.5]
    return torch.tensor(edges, dtype=torch.float64, device=flat.device)


__all__ = ["BinnedErrors", "BinnedState", "quantile_edges_from_sample"]
