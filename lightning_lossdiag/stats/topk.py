"""The ``k`` rows with the largest scores seen (e.g. the worst predictions by absolute error), on the device.

Fixed shapes (so states can be gathered across ranks): ``k`` slots sorted by score, descending; slots not yet
filled have score ``-inf`` and a row of NaN, and ``seen`` counts the rows offered, so the valid rows are the first
``min(k, seen)`` slots. Ties are broken arbitrarily. A NaN score ranks above every number (``torch.topk``'s order),
so non-finite errors surface first. :attr:`TopKWorst.scores` and :attr:`TopKWorst.rows` return the valid slots
(one host read: epoch end).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any, NamedTuple

import torch
from torch import Tensor

from lightning_lossdiag.stats._base import StreamingStat, check_positive_int, on_device
from lightning_lossdiag.stats.sample import select_k


class TopKState(NamedTuple):
    """The state tensors of :class:`TopKWorst`."""

    padded_scores: Tensor
    padded_rows: Tensor
    seen: Tensor


def _topk_init(k: int, num_columns: int, dtype: torch.dtype, device: torch.device) -> TopKState:
    return TopKState(
        padded_scores=torch.full((k,), -math.inf, dtype=torch.float64, device=device),
        padded_rows=torch.full((k, num_columns), math.nan, dtype=dtype, device=device),
        seen=torch.zeros((), dtype=torch.int64, device=device),
    )


def _topk_update(state: TopKState, scores: Tensor, rows: Tensor) -> TopKState:
    """Pure update: the top-k of the state's slots and the new ``scores`` (``(N,)``) with their ``rows``."""
    k = state.padded_scores.shape[0]
    all_scores = torch.cat([state.padded_scores, scores.detach().reshape(-1).to(torch.float64)])
    all_rows = torch.cat([state.padded_rows, rows.detach().to(state.padded_rows.dtype)])
    new_scores, new_rows = select_k(all_scores, all_rows, k, largest=True)
    return TopKState(new_scores, new_rows, state.seen + rows.shape[0])


def _topk_reduce(stacked: Sequence[Tensor]) -> TopKState:
    """Pure merge of ``(W, ...)`` stacks of top-k states: concatenate all slots, keep the top k."""
    s = TopKState(*stacked)
    k = s.padded_scores.shape[1]
    flat_rows = s.padded_rows.reshape(-1, s.padded_rows.shape[-1])
    scores, rows = select_k(s.padded_scores.reshape(-1), flat_rows, k, largest=True)
    return TopKState(scores, rows, s.seen.sum(0))


class TopKWorst(StreamingStat):
    """Keep the ``k`` rows with the largest scores of everything seen, in fixed-size device tensors.

    Args:
        k: number of rows kept.
        num_columns: columns of every row (e.g. ``(index, target, prediction)``).
        device: where the state lives (default: CPU).
        dtype: floating dtype of the stored rows (float64 keeps integer indices exact up to 2**53).

    Example:
        >>> t = TopKWorst(k=2, num_columns=1)
        >>> scores = torch.tensor([0.5, 3.0, 1.0])  # example input, off the hot path
        >>> rows = torch.tensor([[0.0], [1.0], [2.0]])  # example input, off the hot path
        >>> t.update(scores, rows)
        >>> t.scores.tolist(), t.rows.tolist()  # an example reads the host; the training loop never does
        ([3.0, 1.0], [[1.0], [2.0]])
    """

    _state_names = TopKState._fields

    padded_scores: Tensor
    padded_rows: Tensor
    seen: Tensor

    def __init__(
        self,
        k: int,
        num_columns: int,
        device: torch.device | str | None = None,
        *,
        dtype: torch.dtype = torch.float64,
    ) -> None:
        super().__init__(device)
        self.k = check_positive_int("k", k)
        self.num_columns = check_positive_int("num_columns", num_columns)
        if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
            raise ValueError(f"`dtype` must be a floating torch dtype (rows are padded with NaN), got {dtype!r}")
        self.dtype = dtype
        self.reset()

    def _config(self) -> dict[str, Any]:
        return {"k": self.k, "num_columns": self.num_columns, "dtype": str(self.dtype)}

    def _initial_state(self) -> TopKState:
        return _topk_init(self.k, self.num_columns, self.dtype, self.device)

    def _reduce(self, stacked: Sequence[Tensor]) -> TopKState:
        return _topk_reduce(stacked)

    def update(self, scores: Tensor, rows: Tensor) -> None:
        """Offer ``rows`` (``(N, num_columns)``) ranked by ``scores`` (``(N,)``). No host read."""
        if not isinstance(rows, Tensor) or rows.dim() != 2 or rows.shape[1] != self.num_columns:
            got = tuple(rows.shape) if isinstance(rows, Tensor) else type(rows).__name__
            raise ValueError(f"`rows` must be a Tensor of shape (N, {self.num_columns}), got {got}")
        if not isinstance(scores, Tensor) or scores.numel() != rows.shape[0] or scores.dim() > 1:
            got = tuple(scores.shape) if isinstance(scores, Tensor) else type(scores).__name__
            raise ValueError(f"`scores` must be a Tensor of shape ({rows.shape[0]},), got {got}")
        if rows.shape[0] == 0:
            return
        state = _topk_update(TopKState(*self.state), on_device(scores, self.device), on_device(rows, self.device))
        self._set_state(state)

    def valid_mask(self) -> Tensor:
        """``(k,)`` bool tensor on the device: which slots hold a row (no host read)."""
        return torch.arange(self.k, device=self.device) < self.seen

    @property
    def filled(self) -> int:
        """Number of valid rows, ``min(k, seen)``. Reads one number on the host: call it at epoch end."""
        return min(self.k, int(self.seen))  # epoch-end host read of the fill count

    @property
    def scores(self) -> Tensor:
        """The kept scores, descending, ``(filled,)``. One host read (epoch end)."""
        return self.padded_scores[: self.filled]

    @property
    def rows(self) -> Tensor:
        """The kept rows, ``(filled, num_columns)``, in the order of :attr:`scores`. One host read (epoch end)."""
        return self.padded_rows[: self.filled]


__all__ = ["TopKState", "TopKWorst"]
