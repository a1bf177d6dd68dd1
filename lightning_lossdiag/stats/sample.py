"""A bounded uniform sample of rows on the device: keep the rows with the ``k`` smallest random keys (bottom-k).

Every row seen gets an independent uniform key; the sample is the ``k`` rows with the smallest keys, which is a
uniform sample without replacement of everything seen. Merging two samples is concatenating them and taking the
bottom ``k`` again, so batches and ranks merge exactly, in any order.

Fixed shapes (so states can be gathered across ranks): the state is always ``k`` slots sorted by key, ascending.
Slots not yet filled have key ``+inf`` and a row of NaN (NaN rows are invisible in scatter plots), and ``seen``
counts the rows offered, so the valid rows are the first ``min(k, seen)`` slots. :attr:`BoundedSample.rows` and
:attr:`BoundedSample.keys` return just those (one host read: epoch end); ``padded_rows``/``padded_keys`` are the
fixed-shape buffers and :meth:`BoundedSample.valid_mask` marks the valid slots without a host read.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any, NamedTuple

import torch
from torch import Tensor
from typing_extensions import Self

from lightning_lossdiag.stats._base import StreamingStat, check_positive_int, on_device


class SampleState(NamedTuple):
    """The state tensors of :class:`BoundedSample`."""

    padded_keys: Tensor
    padded_rows: Tensor
    seen: Tensor


def select_k(keys: Tensor, rows: Tensor, k: int, *, largest: bool) -> tuple[Tensor, Tensor]:
    """The ``k`` entries of ``keys`` (``(M,)``, ``M >= k``) that are smallest (or largest), sorted, with their rows.

    Example:
        >>> keys = torch.tensor([0.75, 0.25, 0.5])  # example input, off the hot path
        >>> rows = torch.tensor([[3.0], [1.0], [2.0]])  # example input, off the hot path
        >>> keys, rows = select_k(keys, rows, 2, largest=False)
        >>> keys.tolist(), rows.tolist()  # an example reads the host; the training loop never does
        ([0.25, 0.5], [[1.0], [2.0]])
    """
    values, index = torch.topk(keys, k, largest=largest, sorted=True)
    return values, rows.index_select(0, index)


def _sample_init(k: int, num_columns: int, dtype: torch.dtype, device: torch.device) -> SampleState:
    return SampleState(
        padded_keys=torch.full((k,), math.inf, dtype=torch.float64, device=device),
        padded_rows=torch.full((k, num_columns), math.nan, dtype=dtype, device=device),
        seen=torch.zeros((), dtype=torch.int64, device=device),
    )


def _sample_update(state: SampleState, rows: Tensor, keys: Tensor) -> SampleState:
    """Pure update: the bottom-k of the state's slots and the new ``rows`` (``(N, C)``) with their ``keys``."""
    k = state.padded_keys.shape[0]
    all_keys = torch.cat([state.padded_keys, keys.detach().to(torch.float64)])
    all_rows = torch.cat([state.padded_rows, rows.detach().to(state.padded_rows.dtype)])
    new_keys, new_rows = select_k(all_keys, all_rows, k, largest=False)
    return SampleState(new_keys, new_rows, state.seen + rows.shape[0])


def _sample_reduce(stacked: Sequence[Tensor]) -> SampleState:
    """Pure merge of ``(W, ...)`` stacks of sample states: concatenate all slots, keep the bottom k."""
    s = SampleState(*stacked)
    k = s.padded_keys.shape[1]
    keys, rows = select_k(
        s.padded_keys.reshape(-1), s.padded_rows.reshape(-1, s.padded_rows.shape[-1]), k, largest=False
    )
    return SampleState(keys, rows, s.seen.sum(0))


class BoundedSample(StreamingStat):
    """A uniform sample of at most ``k`` rows of everything seen, held in fixed-size device tensors.

    See the module docstring for the padding. Keys come from a generator on the state's device seeded with
    ``seed``; give each DDP rank its own seed (e.g. ``seed + trainer.global_rank``) so the ranks draw independent
    keys. Moving the sample to another device re-seeds its generator (with a value derived from ``seed``).

    Args:
        k: maximum number of rows kept.
        num_columns: columns of every row (e.g. 2 for ``(target, prediction)``).
        seed: seed of the key generator.
        dtype: floating dtype of the stored rows.
        device: where the state lives (default: CPU).

    Example:
        >>> s = BoundedSample(k=2, num_columns=1)
        >>> rows = torch.tensor([[10.0], [20.0], [30.0]])  # example input, off the hot path
        >>> keys = torch.tensor([0.5, 0.125, 0.25])  # example input, off the hot path
        >>> s.update(rows, keys=keys)
        >>> s.rows.tolist(), s.keys.tolist(), s.filled  # an example reads the host; the training loop never does
        ([[20.0], [30.0]], [0.125, 0.25], 2)
    """

    _state_names = SampleState._fields

    padded_keys: Tensor
    padded_rows: Tensor
    seen: Tensor

    def __init__(
        self,
        k: int,
        num_columns: int,
        *,
        seed: int = 0,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str | None = None,
    ) -> None:
        super().__init__(device)
        self.k = check_positive_int("k", k)
        self.num_columns = check_positive_int("num_columns", num_columns)
        if isinstance(seed, bool) or not isinstance(seed, int):
            raise ValueError(f"`seed` must be an integer, got {seed!r}")
        if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
            raise ValueError(f"`dtype` must be a floating torch dtype (rows are padded with NaN), got {dtype!r}")
        self.seed = seed
        self.dtype = dtype
        self._moves = 0
        self._generator = self._make_generator()
        self.reset()

    def _make_generator(self) -> torch.Generator:
        generator = torch.Generator(device=self.device)
        generator.manual_seed((self.seed + 1_000_003 * self._moves) % (2**63))
        return generator

    def _config(self) -> dict[str, Any]:
        return {"k": self.k, "num_columns": self.num_columns, "dtype": str(self.dtype)}

    def _initial_state(self) -> SampleState:
        return _sample_init(self.k, self.num_columns, self.dtype, self.device)

    def _reduce(self, stacked: Sequence[Tensor]) -> SampleState:
        return _sample_reduce(stacked)

    def update(self, rows: Tensor, keys: Tensor | None = None) -> None:
        """Offer ``rows`` (``(N, num_columns)``) with their ``keys`` (``(N,)``, drawn uniformly in [0, 1) if None).

        Explicit keys must be finite (``+inf`` marks an empty slot). No host read.
        """
        if not isinstance(rows, Tensor) or rows.dim() != 2 or rows.shape[1] != self.num_columns:
            got = tuple(rows.shape) if isinstance(rows, Tensor) else type(rows).__name__
            raise ValueError(f"`rows` must be a Tensor of shape (N, {self.num_columns}), got {got}")
        if keys is not None and (not isinstance(keys, Tensor) or tuple(keys.shape) != (rows.shape[0],)):
            got = tuple(keys.shape) if isinstance(keys, Tensor) else type(keys).__name__
            raise ValueError(f"`keys` must be None or a Tensor of shape ({rows.shape[0]},), got {got}")
        if rows.shape[0] == 0:
            return
        if keys is None:
            keys = torch.rand(rows.shape[0], generator=self._generator, dtype=torch.float64, device=self.device)
        state = _sample_update(SampleState(*self.state), on_device(rows, self.device), on_device(keys, self.device))
        self._set_state(state)

    def valid_mask(self) -> Tensor:
        """``(k,)`` bool tensor on the device: which slots hold a sampled row (no host read)."""
        return torch.arange(self.k, device=self.device) < self.seen

    @property
    def filled(self) -> int:
        """Number of valid rows, ``min(k, seen)``. Reads one number on the host: call it at epoch end."""
        return min(self.k, int(self.seen))  # epoch-end host read of the fill count

    @property
    def rows(self) -> Tensor:
        """The sampled rows, ``(filled, num_columns)``, sorted by key. One host read (epoch end)."""
        return self.padded_rows[: self.filled]

    @property
    def keys(self) -> Tensor:
        """The keys of the sampled rows, ascending. One host read (epoch end)."""
        return self.padded_keys[: self.filled]

    def reset(self) -> None:
        """Forget every row (the key generator keeps running, so a new epoch draws new keys)."""
        super().reset()

    def state_dict(self) -> dict[str, Any]:
        """Configuration, state tensors, and the key generator's state (to resume the same key stream)."""
        out = super().state_dict()
        out["generator_state"] = self._generator.get_state()
        out["generator_device"] = self.device.type
        return out

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore a :meth:`state_dict`; the generator state is restored when saved from the same device type."""
        super().load_state_dict(state_dict)
        generator_state = state_dict.get("generator_state")
        if generator_state is not None and state_dict.get("generator_device") == self.device.type:
            self._generator.set_state(generator_state)

    def to(self, device: torch.device | str | int) -> Self:
        """Move the state to ``device`` in place (re-seeding the generator if the device changes); returns self."""
        old = self.device
        super().to(device)
        if self.device != old:
            self._moves += 1
            self._generator = self._make_generator()
        return self


__all__ = ["BoundedSample", "SampleState", "select_k"]
