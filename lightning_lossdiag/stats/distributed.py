"""Merging statistic states across processes with a caller-supplied gather function.

A *gather function* takes a tensor and returns the same tensor from every rank stacked along a new dim 0, in rank
order: ``(W, *t.shape)``. ``LightningModule.all_gather`` is one; in a single process ``lambda t: t.unsqueeze(0)``
is one. Lightning's single-device strategies return the tensor unchanged and its DDP strategy gathers a 0-d tensor
as ``(W, 1)``; both are accepted, because the result is reshaped to ``(-1, *t.shape)``.

Every statistic in :mod:`lightning_lossdiag.stats` has ``sync(gather)``: it packs all its state tensors into ONE flat
float64 vector, gathers it once (one collective per statistic, whatever the number of state fields), unpacks the
``(W, ...)`` stacks and reduces them with the same pure function as ``merge``. Every rank receives the same stacks
and runs the same deterministic reduction, so every rank ends with the same merged state. Integer counts travel as
float64, which is exact up to 2**53.

No host reads happen here: shapes are known on the host, values stay on the device.

Example:
    >>> import torch
    >>> state = (torch.tensor(3, dtype=torch.int64), torch.ones(2))
    >>> stacked = gather_states(state, single_process_gather)
    >>> [tuple(t.shape) for t in stacked], stacked[0].dtype
    ([(1,), (1, 2)], torch.int64)
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

import torch
from torch import Tensor


class GatherFn(Protocol):
    """``(Tensor) -> Tensor`` stacking the tensor of every rank along a new dim 0 (e.g. ``pl_module.all_gather``)."""

    def __call__(self, tensor: Tensor, /) -> Tensor:
        """Return ``(world_size, *tensor.shape)`` (or the tensor unchanged for a world of one)."""
        ...


def single_process_gather(tensor: Tensor) -> Tensor:
    """The gather function of a world of one process: adds the rank dim.

    Example:
        >>> single_process_gather(torch.zeros(3)).shape
        torch.Size([1, 3])
    """
    return tensor.unsqueeze(0)


def pack(tensors: Sequence[Tensor]) -> Tensor:
    """Flatten and concatenate tensors (all on one device) into one float64 vector.

    Example:
        >>> pack([torch.tensor(2), torch.tensor([0.5, 1.5])])
        tensor([2.0000, 0.5000, 1.5000], dtype=torch.float64)
    """
    return torch.cat([t.detach().reshape(-1).to(torch.float64) for t in tensors])


def unpack_stacked(flat: Tensor, like: Sequence[Tensor]) -> list[Tensor]:
    """Split a ``(W, total)`` float64 matrix back into ``(W, *t.shape)`` tensors with the dtypes of ``like``.

    Example:
        >>> like = [torch.tensor(0), torch.zeros(2)]
        >>> [t.tolist() for t in unpack_stacked(torch.tensor([[1.0, 2.0, 3.0]]), like)]
        [[1], [[2.0, 3.0]]]
    """
    out = []
    start = 0
    for t in like:
        n = t.numel()
        out.append(flat[:, start : start + n].reshape(flat.shape[0], *t.shape).to(t.dtype))
        start += n
    return out


def gather_states(state: Sequence[Tensor], gather: GatherFn) -> list[Tensor]:
    """Gather every tensor of ``state`` from all ranks with ONE call of ``gather``; returns ``(W, *t.shape)`` stacks.

    Raises:
        ValueError: if the gather function returned a number of elements that is not a multiple of the state size.
    """
    if not state:
        return []
    flat = pack(state)
    gathered = gather(flat)
    if not isinstance(gathered, Tensor):
        raise TypeError(f"`gather` must return a Tensor, got {type(gathered).__name__}")
    total = flat.numel()
    if total == 0 or gathered.numel() % total != 0:
        raise ValueError(
            f"`gather` must stack the tensor of every rank along a new dim 0: got shape {tuple(gathered.shape)} "
            f"for an input of shape {tuple(flat.shape)}"
        )
    return unpack_stacked(gathered.reshape(-1, total), state)


def stack_states(states: Sequence[Sequence[Tensor]]) -> list[Tensor]:
    """Stack the matching fields of several states along a new dim 0 (the same layout ``gather_states`` returns)."""
    return [torch.stack(fields) for fields in zip(*states, strict=True)]


__all__ = ["GatherFn", "gather_states", "pack", "single_process_gather", "stack_states", "unpack_stacked"]
