"""Find the TensorBoard ``SummaryWriter``s behind a Trainer's loggers (global rank 0 only)."""

from __future__ import annotations

from typing import Any


def tensorboard_writers(trainer: Any) -> list[Any]:
    """The ``SummaryWriter`` of every TensorBoard logger of ``trainer``; empty on ranks other than 0.

    Works for ``lightning.pytorch.loggers.TensorBoardLogger`` (whose ``experiment`` is a
    ``torch.utils.tensorboard.SummaryWriter``). Other loggers get scalars through ``log_metrics`` only.
    """
    if not getattr(trainer, "is_global_zero", True):
        return []
    from lightning.pytorch.loggers import TensorBoardLogger

    writers = []
    for logger in getattr(trainer, "loggers", []) or []:
        if isinstance(logger, TensorBoardLogger):
            writers.append(logger.experiment)
    return writers


def log_dirs(trainer: Any) -> list[str]:
    """The log folders of the Trainer's loggers that have one (first is where reports go)."""
    dirs = []
    for logger in getattr(trainer, "loggers", []) or []:
        d = getattr(logger, "log_dir", None)
        if d:
            dirs.append(str(d))
    return dirs
