"""A base for callbacks that read every step's predictions and targets of the train, val and test stages."""

from __future__ import annotations

from typing import Any

from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.utilities import rank_zero_warn
from typing_extensions import override

from lightning_lossdiag._outputs import clear_outputs


class StagedOutputsCallback(Callback):
    """Routes ``on_<stage>_batch_end`` to ``self._update(trainer, pl_module, outputs, stage)``.

    The stash of the stage is cleared at the start of each batch, so a step that hands nothing is never mistaken for
    the previous one; sanity-check validation batches are skipped. Subclasses implement ``_update``, and skip the
    slots in ``_refused`` (a set they create), which :meth:`_refuse` fills.
    """

    _refused: set[str]

    def _update(self, trainer: Trainer, pl_module: LightningModule, outputs: Any, stage: str) -> None:
        raise NotImplementedError

    def _refuse(self, slot: str, message: str) -> None:
        """Leave ``slot`` out for the rest of the run, saying why once."""
        self._refused.add(slot)
        rank_zero_warn(message)

    @override
    def on_train_batch_start(self, trainer: Trainer, pl_module: LightningModule, batch: Any, batch_idx: int) -> None:
        clear_outputs(pl_module, "train")

    @override
    def on_validation_batch_start(
        self, trainer: Trainer, pl_module: LightningModule, batch: Any, batch_idx: int, dataloader_idx: int = 0
    ) -> None:
        clear_outputs(pl_module, "val")

    @override
    def on_test_batch_start(
        self, trainer: Trainer, pl_module: LightningModule, batch: Any, batch_idx: int, dataloader_idx: int = 0
    ) -> None:
        clear_outputs(pl_module, "test")

    @override
    def on_train_batch_end(
        self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        self._update(trainer, pl_module, outputs, "train")

    @override
    def on_validation_batch_end(
        self,
        trainer: Trainer,
        pl_module: LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
        dataloader_idx: int = 0,
    ) -> None:
        if not trainer.sanity_checking:
            self._update(trainer, pl_module, outputs, "val")

    @override
    def on_test_batch_end(
        self,
        trainer: Trainer,
        pl_module: LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
        dataloader_idx: int = 0,
    ) -> None:
        self._update(trainer, pl_module, outputs, "test")
