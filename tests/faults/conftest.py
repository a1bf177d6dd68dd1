"""A tiny 3-class classifier and its data, shared by the fault tests."""

from __future__ import annotations

import lightning as L
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_lossdiag import LossMixin


class TinyClassifier(LossMixin, L.LightningModule):
    """Three classes from four features; records each training loss and can fail at a chosen training batch."""

    def __init__(self, fail_at_batch: int | None = None) -> None:
        super().__init__(loss="cross_entropy")
        self.net = nn.Sequential(nn.Linear(4, 16), nn.ReLU(), nn.Linear(16, 3))
        self.fail_at_batch = fail_at_batch
        self.train_losses: list[float] = []  # test-side reference, read on the host on purpose

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def training_step(self, batch, batch_idx):
        if self.fail_at_batch is not None and batch_idx == self.fail_at_batch:
            raise RuntimeError(f"user code failed at training batch {batch_idx}")
        x, y = batch
        loss = self.compute_loss(self(x), y, stage="train")
        self.train_losses.append(loss.item())
        return loss

    def validation_step(self, batch, batch_idx):
        x, y = batch
        return self.compute_loss(self(x), y, stage="val")

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def class_data(n: int = 192, seed: int = 0) -> TensorDataset:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 4, generator=g)
    y = (x[:, 0] > 0.4).long() + (x[:, 1] > 0.0).long()  # labels 0, 1, 2, all present
    return TensorDataset(x, y)


@pytest.fixture
def tiny_classifier() -> type[TinyClassifier]:
    return TinyClassifier


@pytest.fixture
def class_loaders() -> tuple[DataLoader, DataLoader]:
    return (
        DataLoader(class_data(192, seed=0), batch_size=32, shuffle=False),
        DataLoader(class_data(64, seed=1), batch_size=32, shuffle=False),
    )


def small_trainer_kwargs() -> dict:
    return {
        "accelerator": "cpu",
        "devices": 1,
        "enable_progress_bar": False,
        "enable_model_summary": False,
        "enable_checkpointing": False,
    }


@pytest.fixture
def trainer_kwargs() -> dict:
    return small_trainer_kwargs()
