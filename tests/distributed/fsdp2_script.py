"""FSDP2 scenarios for ``test_fsdp2.py``: ``python fsdp2_script.py <out_dir> <devices> [norms|nonfinite]``.

A small MLP is sharded with ``fully_shard`` over ``ModelParallelStrategy(data_parallel_size=devices)`` on gloo
(each rank holds half of every weight and gradient). A probe measures, at every optimizer step, the norms of the
FULL gradients (``full_tensor()``, a collective the probe may use; the package may not) and each rank dumps them with
what ``GradientMonitor`` logged at the flush steps. ``nonfinite``: at step 3 one element of the first weight's
gradient is infinite, which lands in rank 0's shard only; the NaN guard ("skip") must skip that step on both ranks.
"""

from __future__ import annotations

from pathlib import Path

import _sharded as sharded  # this folder: on sys.path when the script runs
import lightning as L
from _sharded import EVERY, FullNormProbe
from lightning.pytorch.loggers import TensorBoardLogger
from lightning.pytorch.strategies import ModelParallelStrategy
from torch import nn

from lightning_lossdiag import LossDiagnostics


class FullTensorProbe(FullNormProbe):
    """The full gradients of the DTensor shards (``full_tensor()``: a collective)."""

    def full_tensors(self, pl_module):
        named = list(pl_module.named_parameters())
        grads = {n: p.grad.full_tensor() for n, p in named if p.grad is not None}
        return grads, {n: p.detach().full_tensor() for n, p in named}


class Sharded(sharded.Classifier):
    def configure_model(self) -> None:
        from torch.distributed.fsdp import fully_shard

        for layer in self.net:
            if isinstance(layer, nn.Linear):
                fully_shard(layer, mesh=self.device_mesh["data_parallel"])
        fully_shard(self.net, mesh=self.device_mesh["data_parallel"])


class Poisoned(Sharded):
    """Adds ``w[0, 0] * inf`` to the loss at step 3: an infinite gradient in one element of rank 0's shard."""

    def training_step(self, batch, batch_idx):
        loss = super().training_step(batch, batch_idx)
        if self.global_step == 2:
            loss = loss + self.net[0].weight.full_tensor()[0, 0] * float("inf")
        return loss


def _trainer(devices: int, **kwargs) -> L.Trainer:
    strategy = ModelParallelStrategy(data_parallel_size=devices, tensor_parallel_size=1)
    return sharded.trainer(devices, strategy, **kwargs)


def run_nonfinite(out: Path, devices: int) -> None:
    diag = LossDiagnostics(on_nonfinite="skip", activations=False, errors=False, metrics=False, every_n_steps=EVERY)
    trainer = _trainer(devices, logger=False, callbacks=[diag])
    model = Poisoned()
    trainer.fit(model, sharded.data(devices, nonfinite=True))
    sharded.write_nonfinite(out, trainer, [p.full_tensor() for p in model.parameters()])


def run_norms(out: Path, devices: int) -> None:
    probe = FullTensorProbe()
    parts = {"activations": False, "errors": False, "metrics": False, "gradients": {"param_norms": True}}
    diag = LossDiagnostics(on_nonfinite="warn", **parts)
    logger = TensorBoardLogger(str(out), name="", version="")
    counter, reads = sharded.read_probe()
    trainer = _trainer(devices, log_every_n_steps=EVERY, logger=logger, callbacks=[reads, probe, diag])
    with counter:
        trainer.fit(Sharded(), sharded.data(devices, nonfinite=False))
    local = [tuple(p.to_local().shape) for p in trainer.lightning_module.parameters()]
    sharded.write_norms(out, trainer, probe, reads, local_shapes=local)


if __name__ == "__main__":
    sharded.main(norms=run_norms, nonfinite=run_nonfinite)
