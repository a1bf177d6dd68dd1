"""Gradient norms of sharded gradients: FSDP2 (``ModelParallelStrategy``) and FSDP1 (``FSDPStrategy``).

Under FSDP2 each rank holds a ``Shard`` of every gradient (a DTensor); under FSDP1 with ``use_orig_params=True``
(Lightning's default) each parameter's gradient on a rank is the 1-D piece of it that lies in the rank's slice of
the flat parameter, or ``None`` when none does. Either way a norm over disjoint pieces adds up: ``||g||_p ** p`` is
the sum over the pieces of ``||piece||_p ** p`` (the maximum for ``p = inf``; a missing piece counts 0). So
per-parameter norms are measured on each rank's local pieces (no collective, no host read) and a block of them is
reduced over the ranks the gradients are sharded on when the statistics are folded (every few steps and at a flush;
every rank folds at the same steps), one ``all_reduce`` per sharded group for the whole block. Replicated copies
(FSDP2's ``Replicate`` mesh dimensions, the replica groups of FSDP1's hybrid sharding) are not summed.
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


def local_grads(params: list[Tensor]) -> list[Tensor]:
    """Each parameter's local gradient piece, one per parameter on every rank (no collective, no host read).

    An empty tensor where the rank holds no piece of it (FSDP1 leaves that gradient ``None``) or it has no
    gradient: its norm is 0, and every rank's row of norms has the same layout for the reduction.

    Example:
        >>> w, b = torch.nn.Parameter(torch.ones(3)), torch.nn.Parameter(torch.ones(1))
        >>> w.grad = torch.full((3,), 2.0)
        >>> [tuple(g.shape) for g in local_grads([w, b])]
        [(3,), (0,)]
    """
    out = []
    for p in params:
        g = p.grad
        if g is None:
            local = p.to_local() if _placements(p) is not None else p  # type: ignore[attr-defined]
            out.append(local.detach().new_empty(0))
        else:
            out.append(g.to_local() if _placements(g) is not None else g)  # type: ignore[attr-defined]
    return out


def shard_reducer(params: list[Tensor], model: Any = None) -> Reduce | None:
    """A function that turns a block of local per-parameter ``p``-norms into the full tensors' norms, or ``None``.

    ``None`` when no parameter is sharded (one process, DDP, FSDP1's ``NO_SHARD``). Every DTensor parameter must live
    on one device mesh with the same placements, each ``Shard`` or ``Replicate`` (FSDP2, HSDP, tensor parallel over
    whole dims). FSDP1 parameters (marked by FSDP as flattened) need ``model``, the module that holds the
    ``FullyShardedDataParallel`` units (the strategy's ``model``), for their process group (:func:`fsdp1_group`).

    Raises:
        RuntimeError: mixed meshes or placements, or a ``Partial`` placement (a gradient still to be summed); an FSDP1
            set-up whose shards cannot be summed exactly (see :func:`fsdp1_group`).

    Example:
        >>> shard_reducer([torch.nn.Parameter(torch.ones(2))]) is None
        True
    """
    sharded: list[Any] = [p for p in params if _placements(p) is not None]
    if not sharded:
        if any(getattr(p, _FSDP1_FLAG, False) for p in params):
            group = fsdp1_group(params, model)
            return None if group is None else _reducer([group])
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
    return _reducer([mesh.get_group(dim) for dim, pl in enumerate(placements) if type(pl).__name__ == "Shard"])


#: the attribute FSDP1 sets on the parameters it has flattened into a ``FlatParameter`` (and on those)
_FSDP1_FLAG = "_fsdp_flattened"
_WAY_OUT = "or train with `LossDiagnostics(gradients=False, on_nonfinite='warn')`"
_WHO = "lightning-lossdiag (gradient norms, NaN guard)"


def fsdp1_units(model: Any) -> list[Any]:
    """The ``FullyShardedDataParallel`` (FSDP1) modules of ``model`` (itself included), outermost first."""
    try:
        from torch.distributed.fsdp import FullyShardedDataParallel
    except ImportError:  # a torch built without distributed support
        return []
    modules = getattr(model, "modules", None)
    return [m for m in modules() if isinstance(m, FullyShardedDataParallel)] if callable(modules) else []


def fsdp1_group(params: list[Tensor], model: Any) -> Any:
    """The process group FSDP1 shards ``params``' gradients over, or ``None`` when it does not shard them.

    ``None`` under ``NO_SHARD`` (every rank holds whole gradients, as under DDP). Hybrid sharding shards within a
    group and replicates across them: only the shard group is summed.

    Raises:
        RuntimeError: no FSDP unit found in ``model``; ``use_orig_params=False`` (the optimizer then sees flat
            parameters that mix layers, with no per-layer norms to give); units with different process groups or
            sharding strategies; parameters left out of FSDP (``ignored_modules``: whole on every rank, so they
            cannot be summed with the shards).

    Example:
        >>> fsdp1_group([torch.nn.Parameter(torch.ones(2))], torch.nn.Linear(2, 1)) is None
        True
    """
    if not any(getattr(p, _FSDP1_FLAG, False) for p in params):
        return None
    units = fsdp1_units(model)
    if not units:
        raise RuntimeError(
            f"{_WHO}: the parameters are FSDP1 shards, but no FullyShardedDataParallel module was found to say over "
            f"which processes they are sharded; {_WAY_OUT}."
        )
    if any(getattr(u, "_use_orig_params", True) is False for u in units):
        raise RuntimeError(
            f"{_WHO}: FSDP1 with use_orig_params=False hands the optimizer flat parameters that mix layers, so "
            "there are no per-layer gradients to measure; use FSDPStrategy(use_orig_params=True) (Lightning's "
            f"default), {_WAY_OUT}."
        )
    strategies = {str(getattr(getattr(u, "sharding_strategy", None), "name", "FULL_SHARD")) for u in units}
    groups = {id(getattr(u, "process_group", None)) for u in units}
    if len(strategies) > 1 or len(groups) > 1:
        raise RuntimeError(
            f"{_WHO}: the FSDP1 units use different sharding strategies ({sorted(strategies)}) or process groups; "
            f"the norms of the full gradients cannot be summed from their shards. Use one of each, {_WAY_OUT}."
        )
    loose = sum(1 for p in params if not getattr(p, _FSDP1_FLAG, False))
    if loose:
        raise RuntimeError(
            f"{_WHO}: {loose} trained parameter(s) are outside FSDP (ignored_modules): each rank holds them whole, "
            f"so they cannot be summed with the shards of the others; wrap them too, {_WAY_OUT}."
        )
    if strategies == {"NO_SHARD"}:
        return None
    return getattr(units[0], "process_group", None) or dist.group.WORLD


def _reducer(groups: list[Any]) -> Reduce:
    """Sum ``p``-th powers (max for ``p = inf``) of a block of local norms over each of ``groups``, on the device."""

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


__all__ = ["Reduce", "fsdp1_group", "fsdp1_units", "local_grads", "local_parts", "shard_reducer"]

_ = torch  # used in doctests
