"""Sharded strategies hand each rank a slice of every gradient: the gradient monitor and the NaN guard refuse them at
fit start with a clear message (instead of logging one shard's numbers); the other parts are unaffected."""

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
@pytest.mark.parametrize(
    ("make", "who"),
    [
        (LossDiagnostics, "GradientMonitor"),
        (lambda: GradientMonitor(), "GradientMonitor"),
        (lambda: NonFiniteGuard(policy="skip"), "NonFiniteGuard"),
    ],
    ids=["bundle", "gradients", "guard"],
)
def test_sharded_strategy_is_refused_at_fit_start_with_a_way_out(tmp_path, make, who):
    with pytest.raises(RuntimeError, match=rf"{who} does not support ModelParallelStrategy yet: .*gradients=False"):
        _fit(tmp_path, [make()])


@pytest.mark.slow
def test_the_way_out_the_message_gives_trains(tmp_path):
    trainer = _fit(tmp_path, [LossDiagnostics(gradients=False, on_nonfinite="warn", activations=False)])
    assert trainer.global_step == 2
