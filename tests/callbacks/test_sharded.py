"""Sharded strategies hand each rank a slice of every gradient: the NaN guard refuses them at fit start with a clear
message (instead of deciding on one shard), and so does the gradient monitor except under FSDP2, where it sums the
shards (two-process test in tests/distributed/test_fsdp2.py); the other parts are unaffected."""

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
@pytest.mark.parametrize("make", [LossDiagnostics, lambda: NonFiniteGuard(policy="skip")], ids=["bundle", "guard"])
def test_the_guard_refuses_a_sharded_strategy_at_fit_start_with_a_way_out(tmp_path, make):
    with pytest.raises(RuntimeError, match=r"NonFiniteGuard does not support ModelParallelStrategy yet: .*'warn'"):
        _fit(tmp_path, [make()])


@pytest.mark.slow
def test_the_way_out_the_message_gives_trains_with_gradient_norms(tmp_path):
    trainer = _fit(tmp_path, [LossDiagnostics(on_nonfinite="warn", activations=False)])
    assert trainer.global_step == 2
    assert trainer.lossdiag_record.values("grad/norm_total")


def test_fsdp1_and_deepspeed_are_refused_by_the_gradient_monitor():
    from types import SimpleNamespace

    for name in ("FSDPStrategy", "DeepSpeedStrategy"):
        strategy = type(name, (), {})()
        with pytest.raises(RuntimeError, match=rf"GradientMonitor does not support {name} yet: .*gradients=False"):
            GradientMonitor().setup(SimpleNamespace(strategy=strategy), None, "fit")
