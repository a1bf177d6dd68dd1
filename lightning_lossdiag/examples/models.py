"""Example LightningModules: small MLPs whose loss comes from a spec through :class:`~lightning_lossdiag.LossMixin`."""

from __future__ import annotations

from typing import Any

import lightning as L
import torch
from torch import Tensor, nn
from typing_extensions import override

from lightning_lossdiag.losses import LossSpec
from lightning_lossdiag.mixins import LossMixin

MULTITASK_DEFAULT_LOSS: dict[str, Any] = {
    "name": "composite",
    "terms": {
        "ctr": {"loss": "bce_with_logits", "weight": 0.7},
        "cvr": {"loss": "bce_with_logits", "weight": 0.3},
    },
}


def mlp(in_features: int, hidden: int, depth: int, out_features: int) -> nn.Sequential:
    """``depth`` hidden layers of ``hidden`` ReLU units, then a linear output layer.

    Example:
        >>> mlp(3, 8, 2, 1)(torch.zeros(5, 3)).shape
        torch.Size([5, 1])
    """
    for arg, value in (("in_features", in_features), ("hidden", hidden), ("out_features", out_features)):
        if not isinstance(value, int) or value < 1:
            raise ValueError(f"`{arg}` must be a positive integer, got {value!r}")
    if not isinstance(depth, int) or depth < 0:
        raise ValueError(f"`depth` must be a non-negative integer, got {depth!r}")
    layers: list[nn.Module] = []
    width = in_features
    for _ in range(depth):
        layers += [nn.Linear(width, hidden), nn.ReLU()]
        width = hidden
    layers.append(nn.Linear(width, out_features))
    return nn.Sequential(*layers)


class _ExampleModule(LossMixin, L.LightningModule):
    """Steps, Adam and an optional ReduceLROnPlateau on ``val/loss`` shared by the examples."""

    def __init__(self, loss: LossSpec, lr: float, weight_decay: float, plateau_patience: int | None) -> None:
        super().__init__(loss=loss)
        if not lr > 0:
            raise ValueError(f"`lr` must be > 0, got {lr!r}")
        if weight_decay < 0:
            raise ValueError(f"`weight_decay` must be >= 0, got {weight_decay!r}")
        if plateau_patience is not None and (not isinstance(plateau_patience, int) or plateau_patience < 0):
            raise ValueError(f"`plateau_patience` must be a non-negative integer or None, got {plateau_patience!r}")
        self.lr = lr
        self.weight_decay = weight_decay
        self.plateau_patience = plateau_patience

    def _step(self, batch: Any, stage: str) -> Tensor:
        x, y = batch[0], batch[1]
        return self.compute_loss(self(x), y, stage=stage)

    @override
    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        return self._step(batch, "train")

    @override
    def validation_step(self, batch: Any, batch_idx: int) -> Tensor:
        return self._step(batch, "val")

    @override
    def test_step(self, batch: Any, batch_idx: int) -> Tensor:
        return self._step(batch, "test")

    @override
    def predict_step(self, batch: Any, batch_idx: int, dataloader_idx: int = 0) -> Any:
        return self(batch[0])

    @override
    def configure_optimizers(self) -> Any:
        optimizer = torch.optim.Adam(self.parameters(), lr=self.lr, weight_decay=self.weight_decay)
        if self.plateau_patience is None:
            return optimizer
        scheduler = torch.optim.lr_scheduler.ReduceLROnPlateau(
            optimizer, mode="min", factor=0.5, patience=self.plateau_patience
        )
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "monitor": "val/loss"}}


class MLPRegressor(_ExampleModule):
    """An MLP for regression; with ``out_features=1`` it returns shape ``(N,)`` to match targets of shape ``(N,)``.

    Args:
        in_features: number of input features.
        out_features: number of outputs (targets of shape ``(N,)`` when 1, else ``(N, out_features)``).
        hidden: units per hidden layer.
        depth: number of hidden layers.
        loss: loss spec (``"mse"``, ``"huber"``, ``{"name": "huber", "delta": 0.5}``, ...).
        lr: Adam learning rate.
        weight_decay: Adam weight decay.
        plateau_patience: when set, ReduceLROnPlateau on ``val/loss`` with this patience (factor 0.5).

    Example:
        >>> MLPRegressor(in_features=3)(torch.zeros(4, 3)).shape
        torch.Size([4])
    """

    def __init__(
        self,
        in_features: int = 1,
        out_features: int = 1,
        hidden: int = 32,
        depth: int = 2,
        loss: LossSpec = "mse",
        lr: float = 1e-2,
        weight_decay: float = 0.0,
        plateau_patience: int | None = None,
    ) -> None:
        super().__init__(loss, lr, weight_decay, plateau_patience)
        self.save_hyperparameters()
        self.net = mlp(in_features, hidden, depth, out_features)

    @override
    def forward(self, x: Tensor) -> Tensor:
        out = self.net(x)
        return out.squeeze(-1) if self.hparams["out_features"] == 1 else out


class MLPClassifier(_ExampleModule):
    """An MLP classifier returning logits: shape ``(N,)`` for ``num_classes=2`` (binary), ``(N, C)`` otherwise.

    Binary targets are float 0/1 of shape ``(N,)`` (``bce_with_logits``, ``focal``); multiclass targets are class
    indices of dtype ``torch.long`` (``cross_entropy``, ``focal`` with classes).

    Args:
        in_features: number of input features.
        num_classes: 2 for binary (one logit), more for multiclass (one logit per class).
        hidden: units per hidden layer.
        depth: number of hidden layers.
        loss: loss spec (``"bce_with_logits"``, ``{"name": "bce_with_logits", "pos_weight": "auto"}``, ...).
        lr: Adam learning rate.
        weight_decay: Adam weight decay.
        plateau_patience: when set, ReduceLROnPlateau on ``val/loss`` with this patience (factor 0.5).

    Example:
        >>> MLPClassifier(in_features=4, num_classes=5, loss="cross_entropy")(torch.zeros(2, 4)).shape
        torch.Size([2, 5])
    """

    def __init__(
        self,
        in_features: int = 4,
        num_classes: int = 2,
        hidden: int = 32,
        depth: int = 2,
        loss: LossSpec = "bce_with_logits",
        lr: float = 1e-2,
        weight_decay: float = 0.0,
        plateau_patience: int | None = None,
    ) -> None:
        if not isinstance(num_classes, int) or num_classes < 2:
            raise ValueError(f"`num_classes` must be an integer >= 2, got {num_classes!r}")
        super().__init__(loss, lr, weight_decay, plateau_patience)
        self.save_hyperparameters()
        self.net = mlp(in_features, hidden, depth, 1 if num_classes == 2 else num_classes)

    @override
    def forward(self, x: Tensor) -> Tensor:
        out = self.net(x)
        return out.squeeze(-1) if self.hparams["num_classes"] == 2 else out


class MultiTaskMLP(_ExampleModule):
    """A shared MLP trunk with one logit head per task; ``forward`` returns ``{head: logits of shape (N,)}``.

    Args:
        in_features: number of input features.
        heads: names of the heads (keys of the targets and of the composite loss).
        hidden: units per hidden layer of the trunk.
        depth: number of hidden layers of the trunk.
        loss: loss spec, usually a composite with one term per head (default: CTR 0.7, CVR 0.3).
        lr: Adam learning rate.
        weight_decay: Adam weight decay.
        plateau_patience: when set, ReduceLROnPlateau on ``val/loss`` with this patience (factor 0.5).

    Example:
        >>> sorted(MultiTaskMLP(in_features=3)(torch.zeros(2, 3)))
        ['ctr', 'cvr']
    """

    def __init__(
        self,
        in_features: int = 6,
        heads: tuple[str, ...] = ("ctr", "cvr"),
        hidden: int = 32,
        depth: int = 2,
        loss: LossSpec = MULTITASK_DEFAULT_LOSS,
        lr: float = 1e-2,
        weight_decay: float = 0.0,
        plateau_patience: int | None = None,
    ) -> None:
        heads = tuple(heads)
        if not heads or len(set(heads)) != len(heads):
            raise ValueError(f"`heads` must be distinct names, at least one, got {heads!r}")
        super().__init__(loss, lr, weight_decay, plateau_patience)
        self.save_hyperparameters()
        self.trunk = mlp(in_features, hidden, max(depth - 1, 0), hidden)
        self.heads = nn.ModuleDict({h: nn.Linear(hidden, 1) for h in heads})

    @override
    def forward(self, x: Tensor) -> dict[str, Tensor]:
        z = torch.relu(self.trunk(x))
        return {name: head(z).squeeze(-1) for name, head in self.heads.items()}
