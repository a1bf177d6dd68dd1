"""Example LightningModules and DataModules on synthetic data made in memory (seeded, a few thousand rows at most).

DataModules (``x`` float features; targets as listed):

==================================  ===================================================================
class                               data
==================================  ===================================================================
``LinearRegressionDataModule``      ``y = 2 x + 1 + noise``, one feature; targets ``(N,)``
``NonlinearRegressionDataModule``   nonlinear mean of several features, heteroscedastic noise
``ImbalancedBinaryDataModule``      four features, ~10% positives; float 0/1 targets ``(N,)``
``MulticlassDataModule``            five Gaussian blobs; ``torch.long`` class indices ``(N,)``
``MultiTaskDataModule``             click / conversion labels; targets ``{"ctr": (N,), "cvr": (N,)}``
==================================  ===================================================================

Modules (MLPs using :class:`~lightning_lossdiag.LossMixin`, Adam, optional ReduceLROnPlateau on ``val/loss``):
``MLPRegressor``, ``MLPClassifier`` (binary with ``num_classes=2``, multiclass otherwise) and ``MultiTaskMLP``
(two heads; ``forward`` returns a dict).

Protocols the DataModules follow, so other parts of the package can use any DataModule that does the same:

* ``train_targets() -> Tensor | dict[str, Tensor]``: the targets of the training rows. ``LossMixin`` uses it to
  resolve ``auto`` class weights (``pos_weight: auto``) without iterating the dataloader.
* Cross-validation (``lossdiag cv``):

  - ``cv_dataset() -> Dataset``: every row the folds split (train + val of a normal fit; never the test rows);
  - ``cv_targets() -> Tensor | None``: one label per row of ``cv_dataset()`` for stratified folds (``None`` for
    regression, where folds are plain random splits);
  - ``set_fold(train_indices, val_indices) -> None``: indices into ``cv_dataset()``; the next
    ``train_dataloader()`` / ``val_dataloader()`` (and ``train_targets()``) use these rows;
  - ``test_dataloader()`` serves a held-out test split that no fold touches.

Example:
    >>> dm = MulticlassDataModule(num_samples=200)
    >>> len(dm.cv_dataset()), int(dm.cv_targets().max()) + 1
    (160, 5)
    >>> dm.set_fold(list(range(100)), list(range(100, 160)))
    >>> len(dm.train_dataloader().dataset), len(dm.val_dataloader().dataset)
    (100, 60)
"""

from lightning_lossdiag.examples.data import (
    ImbalancedBinaryDataModule,
    LinearRegressionDataModule,
    MulticlassDataModule,
    MultiTaskDataModule,
    NonlinearRegressionDataModule,
    RowsDataset,
    SyntheticDataModule,
)
from lightning_lossdiag.examples.models import MLPClassifier, MLPRegressor, MultiTaskMLP

__all__ = [
    "ImbalancedBinaryDataModule",
    "LinearRegressionDataModule",
    "MLPClassifier",
    "MLPRegressor",
    "MultiTaskDataModule",
    "MultiTaskMLP",
    "MulticlassDataModule",
    "NonlinearRegressionDataModule",
    "RowsDataset",
    "SyntheticDataModule",
]
