"""A torch.compile'd network trains with LossDiagnostics(): every key but the activation hooks' is logged, and the
package adds no graph break (dynamo's own counters, with and without the callbacks, side by side)."""

import os
import subprocess
import sys

import lightning as L
import pytest
import torch
from lightning.pytorch.loggers import TensorBoardLogger
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_lossdiag import LossDiagnostics, LossMixin


class CompiledClassifier(LossMixin, L.LightningModule):
    def __init__(self, backend):
        super().__init__(loss="cross_entropy")
        self.net = torch.compile(nn.Sequential(nn.Linear(6, 32), nn.ReLU(), nn.Linear(32, 4)), backend=backend)

    def training_step(self, batch, batch_idx):
        x, y = batch
        return self.compute_loss(self.net(x), y, stage="train")

    def validation_step(self, batch, batch_idx):
        x, y = batch
        return self.compute_loss(self.net(x), y, stage="val")

    def configure_optimizers(self):
        return torch.optim.Adam(self.parameters(), lr=0.01)


def _loader(seed):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(256, 6, generator=g)
    return DataLoader(TensorDataset(x, (x[:, 0] > 0).long() * 2 + (x[:, 1] > 0).long()), batch_size=32)


def _fit(tmp_path, backend, callbacks):
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    trainer = L.Trainer(
        max_epochs=2,
        accelerator="cpu",
        log_every_n_steps=4,
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
        logger=TensorBoardLogger(tmp_path, name="", version=""),
        callbacks=callbacks,
    )
    torch.manual_seed(0)
    trainer.fit(CompiledClassifier(backend), _loader(0), _loader(1))
    return trainer, sum(counters["graph_break"].values()), dict(counters["stats"])


@pytest.mark.slow
@pytest.mark.parametrize("backend", ["eager", "inductor"])
def test_a_compiled_network_trains_with_every_key_and_no_added_graph_break(tmp_path, backend):
    if backend == "inductor" and not os.environ.get("LOSSDIAG_IN_CHILD"):
        # inductor leaves compile workers behind: run it in a process of its own, so later fork-based tests stay safe
        test = f"{__file__}::test_a_compiled_network_trains_with_every_key_and_no_added_graph_break[inductor]"
        env = {**os.environ, "LOSSDIAG_IN_CHILD": "1"}
        child = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "--basetemp", str(tmp_path), test]
        done = subprocess.run(child, env=env, capture_output=True, text=True, timeout=600)
        assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-2000:]
        return
    bare, bare_breaks, bare_stats = _fit(tmp_path / "bare", backend, [])
    with pytest.warns(UserWarning, match="torch.compile"):  # the activation hooks skip the compiled module, once
        ours, our_breaks, our_stats = _fit(tmp_path / "diag", backend, [LossDiagnostics()])
    assert our_breaks == bare_breaks
    assert our_stats.get("unique_graphs") == bare_stats.get("unique_graphs")  # no recompile either
    record = ours.lossdiag_record
    for key in ("train/loss", "grad/norm_total", "lr/adam/group0", "metrics/val/accuracy", "metrics/train/f1"):
        assert record.values(key), key
    assert record.values("errors/val/samples")[-1] == 256
    assert not record.keys("act/")  # the compiled module's activations are not hooked
