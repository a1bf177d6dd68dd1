from __future__ import annotations

import numpy as np
import pytest
import torch

from lightning_lossdiag.examples import (
    ImbalancedBinaryDataModule,
    LinearRegressionDataModule,
    MulticlassDataModule,
    MultiTaskDataModule,
    NonlinearRegressionDataModule,
    RowsDataset,
)

ALL = [
    LinearRegressionDataModule,
    NonlinearRegressionDataModule,
    ImbalancedBinaryDataModule,
    MulticlassDataModule,
    MultiTaskDataModule,
]


def test_linear_regression_slope_and_intercept_by_least_squares():
    dm = LinearRegressionDataModule(num_samples=2000, noise=0.3)
    x, y = dm.x[:, 0].numpy().astype(np.float64), dm.y.numpy().astype(np.float64)
    design = np.stack([x, np.ones_like(x)], axis=1)
    (slope, intercept), *_ = np.linalg.lstsq(design, y, rcond=None)
    assert slope == pytest.approx(2.0, abs=0.05)
    assert intercept == pytest.approx(1.0, abs=0.05)
    residual = y - design @ np.array([slope, intercept])
    assert residual.std() == pytest.approx(0.3, rel=0.1)


def test_nonlinear_regression_features_and_heteroscedastic_noise():
    dm = NonlinearRegressionDataModule(num_samples=2000, num_features=6)
    x, y = dm.x.numpy(), dm.y.numpy()
    assert x.shape == (2000, 6)
    assert y.shape == (2000,)
    mean = np.sin(2 * x[:, 0]) + x[:, 1] ** 2 - 0.5 * x[:, 2] * x[:, 3]
    noise = y - mean
    small, large = np.abs(x[:, 0]) < 0.3, np.abs(x[:, 0]) > 1.2
    assert noise[large].std() > 3 * noise[small].std()
    # the mean is nonlinear: a linear fit leaves much more than the noise unexplained
    design = np.column_stack([x, np.ones(len(x))])
    coef, *_ = np.linalg.lstsq(design, y, rcond=None)
    assert (y - design @ coef).var() > 2 * noise.var()


def test_imbalanced_binary_has_about_ten_percent_positives():
    dm = ImbalancedBinaryDataModule(num_samples=2000)
    y = dm.y.numpy()
    assert dm.x.shape == (2000, 4)
    assert set(np.unique(y)) == {0.0, 1.0}
    assert y.mean() == pytest.approx(0.10, abs=0.01)
    assert dm.train_targets().mean().item() == pytest.approx(0.10, abs=0.03)


def test_multiclass_has_five_balanced_long_classes():
    dm = MulticlassDataModule(num_samples=1000)
    assert dm.y.dtype == torch.long
    counts = np.bincount(dm.y.numpy())
    assert len(counts) == 5
    assert counts.min() > 150


def test_multitask_has_two_heads_and_conversions_only_after_clicks():
    dm = MultiTaskDataModule(num_samples=1000)
    assert set(dm.y) == {"ctr", "cvr"}
    ctr, cvr = dm.y["ctr"], dm.y["cvr"]
    assert ctr.shape == cvr.shape == (1000,)
    assert bool((cvr <= ctr).all())
    assert 0.05 < ctr.mean().item() < 0.6
    assert 0.0 < cvr.mean().item() < ctr.mean().item()
    x, y = next(iter(dm.train_dataloader()))
    assert set(y) == {"ctr", "cvr"}
    assert y["ctr"].shape == (len(x),)


@pytest.mark.parametrize("cls", ALL, ids=lambda c: c.__name__)
def test_splits_are_disjoint_and_cv_protocol_works(cls):
    dm = cls(num_samples=200, batch_size=16)
    pool = dm.cv_dataset()
    n_test = len(dm.test_dataloader().dataset)
    assert len(pool) + n_test == 200
    assert n_test == 40
    # no test row is a cross-validation row (features are continuous, so rows are unique)
    pool_rows = {tuple(pool[i][0].tolist()) for i in range(len(pool))}
    test_rows = {tuple(r.tolist()) for r in dm.test_dataloader().dataset.x}
    assert not pool_rows & test_rows
    assert len(dm.train_dataloader().dataset) + len(dm.val_dataloader().dataset) == len(pool)

    train_idx, val_idx = list(range(0, len(pool), 2)), list(range(1, len(pool), 2))
    dm.set_fold(train_idx, val_idx)
    train_ds, val_ds = dm.train_dataloader().dataset, dm.val_dataloader().dataset
    assert len(train_ds) == len(train_idx)
    assert len(val_ds) == len(val_idx)
    assert torch.equal(train_ds[3][0], pool[train_idx[3]][0])
    assert torch.equal(val_ds[0][0], pool[val_idx[0]][0])
    targets = dm.train_targets()
    first = targets["ctr"] if isinstance(targets, dict) else targets
    assert len(first) == len(train_idx)

    labels = dm.cv_targets()
    if cls in (LinearRegressionDataModule, NonlinearRegressionDataModule):
        assert labels is None
    else:
        assert labels.dtype == torch.long
        assert labels.shape == (len(pool),)
        y0 = pool[0][1]
        expected = int(y0["ctr"] + y0["cvr"]) if isinstance(y0, dict) else int(y0)
        assert int(labels[0]) == expected


def test_set_fold_rejects_bad_indices():
    dm = LinearRegressionDataModule(num_samples=100)
    with pytest.raises(ValueError, match=r"`val_indices` must index rows of `cv_dataset\(\)` in \[0, 79\]"):
        dm.set_fold([0, 1], [5, 80])
    with pytest.raises(ValueError, match="`train_indices` must not be empty"):
        dm.set_fold([], [1])


def test_data_is_seeded():
    a, b, c = (MulticlassDataModule(num_samples=100, seed=s) for s in (3, 3, 4))
    assert torch.equal(a.x, b.x)
    assert torch.equal(a.y, b.y)
    assert not torch.equal(a.x, c.x)
    xa = next(iter(a.train_dataloader()))[0]
    xb = next(iter(b.train_dataloader()))[0]
    assert torch.equal(xa, xb)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"num_samples": 5}, "`num_samples` must be an integer >= 20"),
        ({"val_fraction": 0.7}, "`val_fraction` must be in"),
        ({"batch_size": 0}, "`batch_size` must be a positive integer"),
        ({"noise": -1.0}, "`noise` must be >= 0"),
    ],
)
def test_bad_arguments_are_named(kwargs, match):
    with pytest.raises(ValueError, match=match):
        LinearRegressionDataModule(**kwargs)


def test_rows_dataset_checks_lengths():
    with pytest.raises(ValueError, match="one row per row"):
        RowsDataset(torch.zeros(3, 1), torch.zeros(2))
