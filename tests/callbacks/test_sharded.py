"""Sharded strategies hand each rank a slice of every gradient. Under FSDP2 (ModelParallelStrategy) the gradient
monitor sums the shards and the NaN guard decides on all of them (two-process tests in
tests/distributed/test_fsdp2.py); FSDP1 and DeepSpeed are refused at fit start with a clear message and a way out."""

import lightning as L
import pytest
import torch
from lightning.pytorch.strategies import ModelParallelStrategy
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_lossdiag import GradientMonitor, LossDiagnostics, NonFiniteGuard


class Tiny(L.LightningModule):
    def __init__(self):
        super().__init__()
        self.net = nn.Linear(4, 1)

    def training_step(self, batch, batch_idx):
        x, y = batch
        return nn.functional.mse_loss(self.net(x).squeeze(-1), y)

    def configure_model(self):
        from torch.distributed.fsdp import fully_shard

        fully_shard(self.net, mesh=self.device_mesh["data_parallel"])  # FSDP2: gradients become DTensor shards

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


@pytest.fixture(autouse=True)
def _no_process_group_left():
    """ModelParallelStrategy starts a process group in this process: end it, so later fork-based tests start clean."""
    yield
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


def _fit(tmp_path, callbacks):
    trainer = L.Trainer(
        max_steps=2,
        accelerator="cpu",
        devices=1,
        strategy=ModelParallelStrategy(),
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
        logger=False,
        default_root_dir=tmp_path,
        callbacks=callbacks,
    )
    x = torch.randn(16, 4)
    trainer.fit(Tiny(), DataLoader(TensorDataset(x, x.sum(1)), batch_size=8))
    return trainer


@pytest.mark.slow
@pytest.mark.parametrize("policy", ["skip", "warn"])
def test_fsdp2_trains_with_gradient_norms_and_the_guard(tmp_path, policy):
    trainer = _fit(tmp_path, [LossDiagnostics(on_nonfinite=policy, activations=False)])
    assert trainer.global_step == 2
    assert trainer.lossdiag_record.values("grad/norm_total")


@pytest.mark.parametrize("name", ["FSDPStrategy", "DeepSpeedStrategy"])
def test_fsdp1_and_deepspeed_are_refused_with_a_way_out(name):
    from types import SimpleNamespace

    trainer = SimpleNamespace(strategy=type(name, (), {})())
    with pytest.raises(RuntimeError, match=rf"GradientMonitor does not support {name} yet: .*gradients=False"):
        GradientMonitor().setup(trainer, None, "fit")
    with pytest.raises(RuntimeError, match=rf"NonFiniteGuard does not support {name} yet: .*on_nonfinite='warn'"):
        NonFiniteGuard(policy="skip").setup(trainer, None, "fit")
    NonFiniteGuard(policy="warn").setup(trainer, None, "fit")  # "warn" only records: nothing to refuse
