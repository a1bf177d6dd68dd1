"""Gradient norms under FSDP2 (``ModelParallelStrategy``): each rank holds a ``Shard`` of every gradient (a DTensor).

A norm over disjoint shards adds up: ``||g||_p ** p`` is the sum over the shards of ``||shard||_p ** p`` (the
maximum for ``p = inf``). So per-parameter norms are measured on each rank's local shard (``to_local()``, no
collective, no host read) and a block of them is reduced over the mesh dimensions the gradients are sharded on when
the statistics are folded (every few steps and at a flush; every rank folds at the same steps), one ``all_reduce``
per sharded mesh dimension for the whole block. Replicated mesh dimensions hold copies and are not summed.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor

Reduce = Callable[[Tensor, float], Tensor]


def _placements(t: Any) -> tuple[Any, ...] | None:
    return getattr(t, "placements", None) if hasattr(t, "to_local") else None


def local_parts(tensors: list[Tensor]) -> list[Tensor]:
    """Each DTensor's local shard (a view: no copy, no collective); plain tensors as they are."""
    return [t.to_local() if _placements(t) is not None else t for t in tensors]  # type: ignore[attr-defined]


def shard_reducer(params: list[Tensor]) -> Reduce | None:
    """A function that turns a block of local per-parameter ``p``-norms into the full tensors' norms, or ``None``.

    ``None`` when no parameter is a DTensor (one process, DDP). Every DTensor parameter must live on one device mesh
    with the same placements, each ``Shard`` or ``Replicate`` (FSDP2, HSDP, tensor parallel over whole dims).

    Raises:
        RuntimeError: mixed meshes or placements, or a ``Partial`` placement (a gradient still to be summed).

    Example:
        >>> shard_reducer([torch.nn.Parameter(torch.ones(2))]) is None
        True
    """
    sharded: list[Any] = [p for p in params if _placements(p) is not None]
    if not sharded:
        return None
    first = sharded[0]
    mesh, placements = first.device_mesh, tuple(first.placements)
    if any(p.device_mesh != mesh or tuple(p.placements) != placements for p in sharded):
        raise RuntimeError(
            "GradientMonitor: the parameters are sharded over different device meshes or placements; gradient norms "
            "of the full model cannot be summed from them. Use one fully_shard mesh, or `gradients=False`."
        )
    names = {type(pl).__name__ for pl in placements}
    if not names <= {"Shard", "Replicate"}:
        raise RuntimeError(
            f"GradientMonitor: gradients placed as {sorted(names)} (only Shard and Replicate are summed exactly); "
            "use `gradients=False` for this model."
        )
    groups = [mesh.get_group(dim) for dim, pl in enumerate(placements) if type(pl).__name__ == "Shard"]

    def reduce(block: Tensor, p: float) -> Tensor:
        if math.isinf(p):
            out = block.clone()
            for group in groups:
                dist.all_reduce(out, op=dist.ReduceOp.MAX, group=group)
            return out
        powers = block.double().pow(p)
        for group in groups:
            dist.all_reduce(powers, op=dist.ReduceOp.SUM, group=group)
        return powers.pow(1.0 / p).to(block.dtype)

    return reduce


__all__ = ["Reduce", "local_parts", "shard_reducer"]

_ = torch  # used in doctests
