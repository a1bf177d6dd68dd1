"""The ``lossdiag`` command: LightningCLI subcommands with package defaults, plus ``losses``, ``report`` and ``cv``.

``lossdiag fit --config configs/regression.yaml`` trains through :class:`LossDiagCLI`; ``lossdiag losses`` prints the
loss catalogue; ``lossdiag report`` and ``lossdiag cv`` are dispatched before LightningCLI parses anything.
A loss spec that cannot be built (e.g. a misspelt name) ends the command with its one-paragraph message and exit
status 2, without a traceback.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.cli import LightningCLI
from lightning.pytorch.loggers import TensorBoardLogger
from lightning.pytorch.utilities.exceptions import MisconfigurationException

from lightning_lossdiag._cli_parser import LossDiagParser
from lightning_lossdiag.dashboards.writers import log_dirs

_LIGHTNING_COMMANDS = ("fit", "validate", "test", "predict")

HELP = """\
usage: lossdiag <command> [options]

Loss diagnostics for PyTorch Lightning.

Training commands (LightningCLI; `lossdiag <command> --help` lists every option):
  fit        train a model:   lossdiag fit --config configs/regression.yaml
  validate   run the validation loop once (e.g. with --ckpt_path)
  test       run the test loop once
  predict    run prediction

Package commands:
  losses     print the loss catalogue: name, aliases, task, what it is for, arguments
             (lossdiag losses [--task regression|binary|multiclass|...])
  report     diagnose a finished run offline from its TensorBoard event files (lossdiag report --help)
  cv         k-fold cross-validation of a config, with a summary per fold (lossdiag cv --help)

Defaults of the training commands: TensorBoard logs under runs/<config file name>/, log_every_n_steps=10,
seed_everything=0. A loss spec that cannot be built exits with status 2 and says what to fix.
"""


class ConfigurationError(ValueError):
    """A value of the configuration that the Trainer, the model, the data or a callback refused at construction."""


class LossDiagCLI(LightningCLI):
    """LightningCLI with defaults that suit the package.

    * any ``LightningModule`` / ``LightningDataModule`` by ``class_path`` (subclass mode), e.g. the examples in
      :mod:`lightning_lossdiag.examples`;
    * ``TensorBoardLogger(save_dir="runs", name=<config file stem>)`` (``"lossdiag"`` without a config);
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
                "init_args": {"save_dir": "runs", "name": name},
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


def losses_main(argv: Sequence[str]) -> int:
    """``lossdiag losses [--task TASK]``: print the catalogue of registered losses as a table."""
    import argparse

    from rich.console import Console
    from rich.table import Table

    from lightning_lossdiag.losses import list_losses

    parser = argparse.ArgumentParser(prog="lossdiag losses", description="Print the catalogue of registered losses.")
    parser.add_argument("--task", default=None, help="show only losses for this task (regression, binary, ...)")
    opts = parser.parse_args(list(argv))
    infos = [i for i in list_losses() if opts.task is None or i.task == opts.task]
    if not infos:
        tasks = sorted({i.task for i in list_losses()})
        print(f"`--task` must be one of {tasks}, got {opts.task!r}", file=sys.stderr)
        return 2
    table = Table(title=f"lightning-lossdiag losses ({len(infos)})", show_lines=False)
    table.add_column("name", no_wrap=True, style="bold", min_width=max(len(i.name) for i in infos))
    table.add_column("aliases")
    table.add_column("task", no_wrap=True)
    table.add_column("what it is for")
    table.add_column("arguments")
    for info in infos:
        table.add_row(info.name, ", ".join(info.aliases), info.task, info.summary, ", ".join(info.arguments))
    Console(width=max(Console().width, 160)).print(table)
    return 0


def _report(argv: Sequence[str]) -> int:
    from lightning_lossdiag.diagnosis.offline import report_main

    return int(report_main(list(argv)) or 0)


def _cv(argv: Sequence[str]) -> int:
    from lightning_lossdiag.cv import cv_main

    return int(cv_main(list(argv)) or 0)


_PACKAGE_COMMANDS: dict[str, Callable[[Sequence[str]], int]] = {"losses": losses_main, "report": _report, "cv": _cv}


def _loss_config_error(exc: BaseException) -> BaseException | None:
    """The ``LossConfigError`` behind ``exc`` (itself, or in its cause/context chain, as jsonargparse wraps it)."""
    from lightning_lossdiag.losses import LossConfigError

    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        if isinstance(current, LossConfigError):
            return current
        seen.add(id(current))
        current = current.__cause__ or current.__context__
    return None


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``lossdiag`` console script; returns the exit status (also used by ``sys.exit``).

    Args:
        argv: the arguments after the program name (default ``sys.argv[1:]``).
    """
    args = list(sys.argv[1:] if argv is None else argv)
    if not args or args[0] in ("-h", "--help", "help"):
        print(HELP)
        return 0
    command = _PACKAGE_COMMANDS.get(args[0])
    try:
        if command is not None:
            return command(args[1:])
        if args[0] not in _LIGHTNING_COMMANDS and not args[0].startswith("-"):
            print(HELP, file=sys.stderr)
            print(f"lossdiag: unknown command {args[0]!r}", file=sys.stderr)
            return 2
        LossDiagCLI(args=None if argv is None else args, run_name=config_stem(args))  # None: LightningCLI reads argv
    except ConfigurationError as exc:
        error = _loss_config_error(exc) or exc
        print(f"lossdiag: bad configuration: {error}", file=sys.stderr)
        return 2
    except Exception as exc:
        loss_error = _loss_config_error(exc)
        if loss_error is None:
            raise
        print(f"lossdiag: {loss_error}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
