"""FSDP1 scenarios for ``test_fsdp1.py``: ``python fsdp1_script.py <out_dir> <devices> [scenario]``.

Lightning's ``FSDPStrategy`` wants a GPU; its check looks at the exact class, so a subclass (``CpuFSDP``) runs the
same strategy on CPU processes over gloo. The module wraps its layers in ``FullyShardedDataParallel`` itself in
``configure_model`` (Lightning then leaves the wrapping as it is), on the CPU device, with ``use_orig_params=True``
(Lightning's default): each rank holds, for every parameter, the 1-D piece of it that lies in its slice of the flat
parameter, or nothing. A probe measures, at every optimizer step, the norms of the FULL gradients
(``summon_full_params(with_grads=True)``, a collective the probe may use; the package may not) and each rank dumps
them with what ``GradientMonitor`` logged at the flush steps. ``nonfinite``: at step 3 one element of rank 0's first
gradient piece is made infinite after backward (rank 1's pieces stay finite); the NaN guard ("skip") must skip that
step on both ranks (``guard_alone``: the same without the gradient monitor, the guard measuring the pieces
itself). ``hybrid`` (four ranks): ``HYBRID_SHARD`` with ranks {0, 1} and {2, 3} each sharding one copy of
the model; the norms must be summed within a shard group, not over the replicas.
"""

from __future__ import annotations

import functools
from pathlib import Path

import _sharded as sharded  # this folder: on sys.path when the script runs
import lightning as L
import torch
from _sharded import EVERY, FullNormProbe
from lightning.pytorch.loggers import TensorBoardLogger
from lightning.pytorch.strategies import FSDPStrategy
from torch.distributed.fsdp import FullyShardedDataParallel as FSDP
from torch.distributed.fsdp import ShardingStrategy

from lightning_lossdiag import LossDiagnostics


class CpuFSDP(FSDPStrategy):
    """Lightning's FSDP1 strategy, allowed on CPU processes (the accelerator check compares the exact class)."""


class SummonProbe(FullNormProbe):
    """The full gradients FSDP1 gathers for ``summon_full_params(with_grads=True)`` (a collective)."""

    def full_tensors(self, pl_module):
        with FSDP.summon_full_params(pl_module.net, with_grads=True):
            named = [(f"net.{n}", p) for n, p in pl_module.net.named_parameters()]
            grads = {n: p.grad.clone() for n, p in named if p.grad is not None}
            return grads, {n: p.detach().clone() for n, p in named}


class Sharded(sharded.Classifier):
    hybrid = False  # HybridSharded: two shard groups, each holding one copy of the model

    def configure_model(self) -> None:
        if isinstance(self.net, FSDP):
            return
        options: dict = {"device_id": torch.device("cpu"), "use_orig_params": True}
        if self.hybrid:
            # ranks {0, 1} and {2, 3} each shard one copy; {0, 2} and {1, 3} hold the same pieces (replicas)
            rank, world = torch.distributed.get_rank(), torch.distributed.get_world_size()
            half = world // 2
            shard = [torch.distributed.new_group(list(range(s, s + half))) for s in (0, half)]  # made on every rank
            replica = [torch.distributed.new_group(list(range(r, world, half))) for r in range(half)]
            options["process_group"] = (shard[rank // half], replica[rank % half])
            options["sharding_strategy"] = ShardingStrategy.HYBRID_SHARD
        for i in (0, 2):
            self.net[i] = FSDP(self.net[i], **options)
        self.net = FSDP(self.net, **options)


class HybridSharded(Sharded):
    hybrid = True


class Poisoned(Sharded):
    """After backward at step 3, one element of rank 0's first gradient piece is infinite; rank 1's stay finite."""

    def on_after_backward(self) -> None:
        if self.global_step == 2 and self.global_rank == 0:
            piece = next(p.grad for p in self.parameters() if p.grad is not None and p.grad.numel())
            piece.view(-1)[0] = float("inf")


def _trainer(devices: int, **kwargs) -> L.Trainer:
    return sharded.trainer(devices, CpuFSDP(process_group_backend="gloo"), **kwargs)


def _full_params(model: Sharded) -> list[torch.Tensor]:
    with FSDP.summon_full_params(model.net):
        return [p.detach().clone() for p in model.net.parameters()]


def run_nonfinite(out: Path, devices: int, gradients: bool = True) -> None:
    # gradients=False: the guard measures the pieces itself instead of taking the gradient monitor's row
    parts = {"activations": False, "errors": False, "metrics": False, "gradients": gradients}
    diag = LossDiagnostics(on_nonfinite="skip", every_n_steps=EVERY, **parts)
    trainer = _trainer(devices, logger=False, callbacks=[diag])
    model = Poisoned()
    trainer.fit(model, sharded.data(devices, nonfinite=True))
    sharded.write_nonfinite(out, trainer, _full_params(model))


def run_norms(out: Path, devices: int, model: Sharded | None = None) -> None:
    probe = SummonProbe()
    parts = {"activations": False, "errors": False, "metrics": False, "gradients": {"param_norms": True}}
    diag = LossDiagnostics(on_nonfinite="skip", **parts)
    logger = TensorBoardLogger(str(out), name="", version="")
    counter, reads = sharded.read_probe()
    trainer = _trainer(devices, log_every_n_steps=EVERY, logger=logger, callbacks=[reads, probe, diag])
    with counter:
        trainer.fit(Sharded() if model is None else model, sharded.data(devices, nonfinite=False))
    local = [p.numel() for p in trainer.lightning_module.parameters()]
    sharded.write_norms(out, trainer, probe, reads, local_sizes=local)


def run_hybrid(out: Path, devices: int) -> None:
    """Hybrid sharding (four ranks): two shard groups of two ranks, each holding one copy of the model."""
    run_norms(out, devices, HybridSharded())


if __name__ == "__main__":
    guard_alone = functools.partial(run_nonfinite, gradients=False)
    sharded.main(norms=run_norms, nonfinite=run_nonfinite, guard_alone=guard_alone, hybrid=run_hybrid)
