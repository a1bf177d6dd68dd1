"""K-fold cross-validation of a config: ``lossdiag cv --config X.yaml --folds K [--stratified] [--seed S]``.

Each fold trains a FRESH model built from the config (seeded with the same seed, so every fold starts from the same
weights), with its own Trainer and callbacks, logging to TensorBoard under one parent folder
(``runs/cv/<config stem>/fold_<i>`` by default, ``--out DIR`` otherwise). A fold is fitted, then validated once
more with its final weights; every scalar of ``trainer.callback_metrics`` after that validation (``val/loss``,
``metrics/val/<name>``, ...) is collected, with the finding codes of the Doctor (alone or inside
``LossDiagnostics``) after that validation (as in the fold's ``lossdiag_report.json``; the Doctor's own table is
printed only with ``--fold-reports``). At the end ``lossdiag cv`` prints a table of every metric per fold with
mean ± std (sample standard deviation, ``ddof=1``, unless ``--ddof 0``) and writes ``cv_summary.json``.

Cross-validation protocol: the DataModule of the config provides

* ``cv_dataset() -> torch.utils.data.Dataset``: every row the folds split (train + val of a normal fit);
* ``cv_targets() -> Tensor | None``: one class label per row, for ``--stratified`` (``None`` for regression);
* ``set_fold(train_indices: Sequence[int], val_indices: Sequence[int]) -> None``: indices into ``cv_dataset()``;
  afterwards ``train_dataloader()`` / ``val_dataloader()`` serve those rows.

The DataModule is built afresh for each fold too, so ``cv_dataset()`` must give the same rows every time (the
examples in :mod:`lightning_lossdiag.examples` make their data from a seed).

Folds are deterministic for a seed. Plain folds shuffle the rows and cut them into ``K`` parts whose sizes differ by
at most one; stratified folds shuffle each class's rows and deal them round-robin, so every fold holds
``floor(n_c / K)`` or ``ceil(n_c / K)`` rows of each class ``c``.

Example:
    >>> [f.val for f in kfold_indices(6, 3, seed=1)]
    [[0, 4], [1, 2], [3, 5]]
"""

from lightning_lossdiag.cv.folds import CVError, Fold, kfold_indices, stratified_kfold_indices
from lightning_lossdiag.cv.runner import CVResult, cv_main, run_cv
from lightning_lossdiag.cv.summary import MetricSummary, summarize_folds

__all__ = [
    "CVError",
    "CVResult",
    "Fold",
    "MetricSummary",
    "cv_main",
    "kfold_indices",
    "run_cv",
    "stratified_kfold_indices",
    "summarize_folds",
]
