"""Synthetic DataModules: seeded, made in memory, a few thousand rows at most (see the package docstring)."""

from __future__ import annotations

import math
from typing import Any

import lightning as L
import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset

Targets = Tensor | dict[str, Tensor]


class RowsDataset(Dataset):
    """Rows ``(x[i], y[i])`` of in-memory tensors; ``y`` may be a mapping ``head -> tensor`` (multi-task).

    Example:
        >>> ds = RowsDataset(torch.zeros(3, 2), {"a": torch.arange(3)})
        >>> len(ds), ds[2][1]
        (3, {'a': tensor(2)})
    """

    def __init__(self, x: Tensor, y: Targets) -> None:
        n = len(x)
        for t in y.values() if isinstance(y, dict) else [y]:
            if len(t) != n:
                raise ValueError(f"`y` must have one row per row of `x` ({n}), got {len(t)}")
        self.x = x
        self.y = y

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, index: int) -> tuple[Tensor, Any]:
        if isinstance(self.y, dict):
            return self.x[index], {k: v[index] for k, v in self.y.items()}
        return self.x[index], self.y[index]


def _take(y: Targets, index: Tensor) -> Targets:
    return {k: v[index] for k, v in y.items()} if isinstance(y, dict) else y[index]


class SyntheticDataModule(L.LightningDataModule):
    """Base of the example DataModules: a held-out test split, a train/val split, and the cross-validation protocol.

    The rows are made once in ``__init__`` from ``seed``. A fraction ``test_fraction`` is held out for
    ``test_dataloader``; the rest (the *pool*, returned by :meth:`cv_dataset`) is split into train and val by
    ``val_fraction``, or by :meth:`set_fold`.

    Args:
        num_samples: rows in total (train + val + test).
        val_fraction: share of the pool used for validation in a normal fit.
        test_fraction: share of all rows held out for testing.
        batch_size: rows per batch.
        seed: seed of the data and of the splits.
    """

    def __init__(
        self,
        num_samples: int = 2000,
        val_fraction: float = 0.2,
        test_fraction: float = 0.2,
        batch_size: int = 64,
        seed: int = 0,
    ) -> None:
        super().__init__()
        if not isinstance(num_samples, int) or num_samples < 20:
            raise ValueError(f"`num_samples` must be an integer >= 20, got {num_samples!r}")
        for arg, value in (("val_fraction", val_fraction), ("test_fraction", test_fraction)):
            if not 0.0 < value < 0.5:
                raise ValueError(f"`{arg}` must be in (0, 0.5), got {value!r}")
        if not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"`batch_size` must be a positive integer, got {batch_size!r}")
        self.num_samples = num_samples
        self.batch_size = batch_size
        self.seed = seed
        gen = torch.Generator().manual_seed(seed)
        self.x, self.y = self.make(num_samples, gen)
        order = torch.randperm(num_samples, generator=gen)
        n_test = max(1, round(num_samples * test_fraction))
        self._test_idx = order[:n_test]
        self._pool_idx = order[n_test:]
        n_val = max(1, round(len(self._pool_idx) * val_fraction))
        self._val_rel = torch.arange(n_val)
        self._train_rel = torch.arange(n_val, len(self._pool_idx))

    def _labels(self) -> Tensor:
        """The targets of the pool as one tensor (single-target examples)."""
        if isinstance(self.y, dict):
            raise TypeError(f"{type(self).__name__} has one target per head; override `cv_targets`")
        return self.y[self._pool_idx]

    def make(self, n: int, gen: torch.Generator) -> tuple[Tensor, Targets]:
        """Make ``n`` rows ``(x, y)`` from ``gen`` (implemented by each example)."""
        raise NotImplementedError

    # -- splits
    def _rows(self, rel: Tensor) -> RowsDataset:
        index = self._pool_idx[rel]
        return RowsDataset(self.x[index], _take(self.y, index))

    def train_targets(self) -> Targets:
        """Targets of the current training rows (used by ``LossMixin`` for ``auto`` weights)."""
        return _take(self.y, self._pool_idx[self._train_rel])

    def cv_dataset(self) -> Dataset:
        """All rows that cross-validation folds split (train + val of a normal fit; never the test rows)."""
        return self._rows(torch.arange(len(self._pool_idx)))

    def cv_targets(self) -> Tensor | None:
        """Labels of :meth:`cv_dataset` rows for stratified folds; ``None`` when folds need no stratification."""
        return None

    def set_fold(self, train_indices: Any, val_indices: Any) -> None:
        """Use rows ``train_indices`` / ``val_indices`` of :meth:`cv_dataset` in the next train/val dataloaders."""
        n = len(self._pool_idx)
        parts = []
        for arg, value in (("train_indices", train_indices), ("val_indices", val_indices)):
            idx = torch.as_tensor(value, dtype=torch.long).reshape(-1)
            if idx.numel() == 0:
                raise ValueError(f"`{arg}` must not be empty")
            lo, hi = int(idx.min()), int(idx.max())  # host data (index lists), not a training tensor
            if lo < 0 or hi >= n:
                raise ValueError(f"`{arg}` must index rows of `cv_dataset()` in [0, {n - 1}], got [{lo}, {hi}]")
            parts.append(idx)
        self._train_rel, self._val_rel = parts

    def train_dataloader(self) -> DataLoader:
        """Shuffled training batches (seeded)."""
        gen = torch.Generator().manual_seed(self.seed)
        return DataLoader(self._rows(self._train_rel), batch_size=self.batch_size, shuffle=True, generator=gen)

    def val_dataloader(self) -> DataLoader:
        """Validation batches."""
        return DataLoader(self._rows(self._val_rel), batch_size=self.batch_size)

    def test_dataloader(self) -> DataLoader:
        """Batches of the held-out test rows."""
        return DataLoader(RowsDataset(self.x[self._test_idx], _take(self.y, self._test_idx)), self.batch_size)

    def predict_dataloader(self) -> DataLoader:
        """The test rows (their targets are ignored by ``predict_step``)."""
        return self.test_dataloader()


class LinearRegressionDataModule(SyntheticDataModule):
    """``y = 2 x + 1 + noise`` with ``x ~ U(-2, 2)`` of shape ``(N, 1)`` and ``y`` of shape ``(N,)``.

    Args:
        noise: standard deviation of the Gaussian noise.
        **kwargs: see :class:`SyntheticDataModule`.

    Example:
        >>> dm = LinearRegressionDataModule(num_samples=100)
        >>> dm.x.shape, dm.y.shape
        (torch.Size([100, 1]), torch.Size([100]))
    """

    def __init__(self, noise: float = 0.3, **kwargs: Any) -> None:
        if noise < 0:
            raise ValueError(f"`noise` must be >= 0, got {noise!r}")
        self.noise = noise
        super().__init__(**kwargs)

    def make(self, n: int, gen: torch.Generator) -> tuple[Tensor, Targets]:
        """Make the rows."""
        x = torch.rand(n, 1, generator=gen) * 4 - 2
        y = 2 * x[:, 0] + 1 + self.noise * torch.randn(n, generator=gen)
        return x, y


class NonlinearRegressionDataModule(SyntheticDataModule):
    """Several features, a nonlinear mean and noise whose spread grows with ``|x0|`` (heteroscedastic).

    ``y = sin(2 x0) + x1^2 - 0.5 x2 x3 + eps``, ``eps ~ N(0, (0.1 + 0.5 |x0|)^2)``, ``x ~ N(0, 1)``.

    Args:
        num_features: number of features (at least 4; the extra ones are noise).
        **kwargs: see :class:`SyntheticDataModule`.
    """

    def __init__(self, num_features: int = 6, **kwargs: Any) -> None:
        if not isinstance(num_features, int) or num_features < 4:
            raise ValueError(f"`num_features` must be an integer >= 4, got {num_features!r}")
        self.num_features = num_features
        super().__init__(**kwargs)

    def make(self, n: int, gen: torch.Generator) -> tuple[Tensor, Targets]:
        """Make the rows."""
        x = torch.randn(n, self.num_features, generator=gen)
        scale = 0.1 + 0.5 * x[:, 0].abs()
        y = torch.sin(2 * x[:, 0]) + x[:, 1] ** 2 - 0.5 * x[:, 2] * x[:, 3] + scale * torch.randn(n, generator=gen)
        return x, y


class ImbalancedBinaryDataModule(SyntheticDataModule):
    """Four features; the positive class is the top ``positive_rate`` of a noisy linear score (float 0/1 targets).

    Args:
        positive_rate: share of positives (default 10%).
        **kwargs: see :class:`SyntheticDataModule`.
    """

    def __init__(self, positive_rate: float = 0.1, **kwargs: Any) -> None:
        if not 0.0 < positive_rate < 1.0:
            raise ValueError(f"`positive_rate` must be in (0, 1), got {positive_rate!r}")
        self.positive_rate = positive_rate
        super().__init__(**kwargs)

    def make(self, n: int, gen: torch.Generator) -> tuple[Tensor, Targets]:
        """Make the rows."""
        x = torch.randn(n, 4, generator=gen)
        score = x @ torch.tensor([1.5, -1.0, 0.5, 0.0]) + 0.5 * torch.randn(n, generator=gen)
        threshold = torch.quantile(score, 1.0 - self.positive_rate)
        return x, (score > threshold).float()

    def cv_targets(self) -> Tensor:
        """Class labels (0/1) of the pool, for stratified folds."""
        return self._labels().long()


class MulticlassDataModule(SyntheticDataModule):
    """Gaussian blobs around ``num_classes`` random centres in ``num_features`` dimensions; ``torch.long`` labels.

    Args:
        num_classes: number of classes (default 5).
        num_features: number of features.
        **kwargs: see :class:`SyntheticDataModule`.
    """

    def __init__(self, num_classes: int = 5, num_features: int = 8, **kwargs: Any) -> None:
        if not isinstance(num_classes, int) or num_classes < 2:
            raise ValueError(f"`num_classes` must be an integer >= 2, got {num_classes!r}")
        if not isinstance(num_features, int) or num_features < 1:
            raise ValueError(f"`num_features` must be a positive integer, got {num_features!r}")
        self.num_classes = num_classes
        self.num_features = num_features
        super().__init__(**kwargs)

    def make(self, n: int, gen: torch.Generator) -> tuple[Tensor, Targets]:
        """Make the rows."""
        centres = 1.5 * torch.randn(self.num_classes, self.num_features, generator=gen)
        y = torch.randint(0, self.num_classes, (n,), generator=gen)
        return centres[y] + torch.randn(n, self.num_features, generator=gen), y

    def cv_targets(self) -> Tensor:
        """Class labels of the pool, for stratified folds."""
        return self._labels()


class MultiTaskDataModule(SyntheticDataModule):
    """Click (CTR) and conversion (CVR) labels from six features; targets ``{"ctr": (N,), "cvr": (N,)}``, float 0/1.

    A row converts only if it was clicked: ``cvr <= ctr``.

    Args:
        num_features: number of features (at least 2).
        **kwargs: see :class:`SyntheticDataModule`.
    """

    def __init__(self, num_features: int = 6, **kwargs: Any) -> None:
        if not isinstance(num_features, int) or num_features < 2:
            raise ValueError(f"`num_features` must be an integer >= 2, got {num_features!r}")
        self.num_features = num_features
        super().__init__(**kwargs)

    def make(self, n: int, gen: torch.Generator) -> tuple[Tensor, Targets]:
        """Make the rows."""
        x = torch.randn(n, self.num_features, generator=gen)
        w = torch.randn(2, self.num_features, generator=gen) / math.sqrt(self.num_features)
        p_click = torch.sigmoid(2 * x @ w[0] - 1.0)
        p_convert = torch.sigmoid(2 * x @ w[1] - 0.5)
        ctr = (torch.rand(n, generator=gen) < p_click).float()
        cvr = ctr * (torch.rand(n, generator=gen) < p_convert).float()
        return x, {"ctr": ctr, "cvr": cvr}

    def cv_targets(self) -> Tensor:
        """``ctr + cvr`` (0: no click, 1: click, 2: conversion) of the pool, for stratified folds."""
        y = self.y
        if not isinstance(y, dict):
            raise TypeError(f"multi-task targets must be a mapping, got {type(y).__name__}")
        return (y["ctr"] + y["cvr"])[self._pool_idx].long()
