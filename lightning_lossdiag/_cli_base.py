"""The LightningCLI of the package (:class:`LossDiagCLI`), apart from the ``lossdiag`` entry point.

``cli.py`` (the command) and ``cv/`` (cross-validation) both build on it; neither imports the other at module level.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.cli import LightningCLI
from lightning.pytorch.loggers import TensorBoardLogger
from lightning.pytorch.utilities.exceptions import MisconfigurationException

from lightning_lossdiag._cli_parser import LossDiagParser
from lightning_lossdiag.dashboards.writers import log_dirs


class ConfigurationError(ValueError):
    """A value of the configuration that the Trainer, the model, the data or a callback refused at construction."""


class LossDiagCLI(LightningCLI):
    """LightningCLI with defaults that suit the package.

    * any ``LightningModule`` / ``LightningDataModule`` by ``class_path`` (subclass mode), e.g. the examples in
      :mod:`lightning_lossdiag.examples`;
    * ``TensorBoardLogger(save_dir="runs", name=<config file stem>, default_hp_metric=False)`` (``"lossdiag"``
      without a config): no ``hp_metric = -1`` placeholder; the ``Doctor`` writes the run's HParams session with its
      real metrics at the end of fit;
    * ``log_every_n_steps=10`` (also the flush interval of the lossdiag callbacks), no model summary table;
    * ``seed_everything=0``;
    * checkpoints also saved as ``<log dir>/checkpoints/last.ckpt`` (``save_last``, when a ``ModelCheckpoint`` leaves
      it unset), so ``lossdiag test --ckpt_path runs/<name>/version_<n>/checkpoints/last.ckpt`` always has a file.

    Args:
        *args: passed to ``LightningCLI``.
        run_name: logger name (default: the stem of the first ``--config`` file in ``args``/``sys.argv``).
        **kwargs: passed to ``LightningCLI``; ``trainer_defaults`` given here win over the package defaults.
    """

    def __init__(self, *args: Any, run_name: str | None = None, **kwargs: Any) -> None:
        argv = kwargs.get("args")
        name = run_name or config_stem(argv if isinstance(argv, Sequence) else sys.argv[1:]) or "lossdiag"
        defaults: dict[str, Any] = {
            "logger": {
                "class_path": f"{TensorBoardLogger.__module__}.{TensorBoardLogger.__qualname__}",
                "init_args": {"save_dir": "runs", "name": name, "default_hp_metric": False},
            },
            "log_every_n_steps": 10,
            "enable_model_summary": False,
        }
        defaults.update(kwargs.pop("trainer_defaults", None) or {})
        kwargs.setdefault("seed_everything_default", 0)
        kwargs.setdefault("parser_class", LossDiagParser)
        kwargs.setdefault("save_config_kwargs", {"overwrite": True})
        kwargs["trainer_defaults"] = defaults
        super().__init__(*args, **kwargs)

    def instantiate_classes(self) -> None:
        """Build the Trainer, model and data; a value they refuse is a configuration error, not a crash."""
        try:
            super().instantiate_classes()
        except (MisconfigurationException, ValueError) as err:
            raise ConfigurationError(str(err)) from err

    def before_fit(self) -> None:
        """Called by LightningCLI before ``fit``: keep a ``last.ckpt`` beside the other checkpoints."""
        for callback in self.trainer.checkpoint_callbacks:
            if isinstance(callback, ModelCheckpoint) and callback.save_last is None:
                callback.save_last = True

    def _print_where(self) -> None:
        """Say where the logs and the report went (global rank 0), so a newcomer knows what to open."""
        trainer = self.trainer
        if not trainer.is_global_zero:
            return
        for folder in log_dirs(trainer):
            print(f"lossdiag: TensorBoard logs in {folder} (view: tensorboard --logdir {os.path.dirname(folder)})")
        for callback in trainer.checkpoint_callbacks:
            last = getattr(callback, "last_model_path", "")
            if self.subcommand == "fit" and last and os.path.exists(last):
                print(f"lossdiag: last checkpoint in {last} (evaluate: lossdiag test --ckpt_path {last} ...)")
        for folder in log_dirs(trainer):
            report = os.path.join(folder, "lossdiag_report.json")
            if os.path.exists(report):
                print(f"lossdiag: diagnosis report in {report}")

    def after_fit(self) -> None:
        """Called by LightningCLI after ``fit``."""
        self._print_where()

    def after_validate(self) -> None:
        """Called by LightningCLI after ``validate``."""
        self._print_where()

    def after_test(self) -> None:
        """Called by LightningCLI after ``test``."""
        self._print_where()


def config_stem(argv: Sequence[str]) -> str | None:
    """The file stem of the first ``--config``/``-c`` argument, or ``None``.

    Example:
        >>> config_stem(["fit", "--config", "configs/regression.yaml"])
        'regression'
        >>> config_stem(["fit", "--config=a/b.yml"]), config_stem(["fit"])
        ('b', None)
    """
    for i, arg in enumerate(argv):
        if arg in ("--config", "-c") and i + 1 < len(argv):
            return Path(argv[i + 1]).stem
        if arg.startswith("--config="):
            return Path(arg.split("=", 1)[1]).stem
    return None


__all__ = ["ConfigurationError", "LossDiagCLI", "config_stem"]
