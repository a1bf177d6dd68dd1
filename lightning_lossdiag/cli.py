"""The ``lossdiag`` command: LightningCLI commands with our defaults, plus ``losses``, ``report``, ``compare``, ``cv``.

``lossdiag fit --config configs/regression.yaml`` trains through :class:`LossDiagCLI`; ``lossdiag losses`` prints the
loss catalogue; ``lossdiag report``, ``lossdiag compare`` and ``lossdiag cv`` are dispatched before LightningCLI
parses anything.
A loss spec that cannot be built (e.g. a misspelt name) ends the command with its one-paragraph message and exit
status 2, without a traceback.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Sequence

from lightning_lossdiag._cli_base import ConfigurationError, LossDiagCLI, config_stem

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
  compare    finished runs side by side: final/best metrics, new and gone findings, differing config values
             (lossdiag compare RUN_DIR [RUN_DIR ...] [--json])
  cv         k-fold cross-validation of a config, with a summary per fold (lossdiag cv --help)

Defaults of the training commands: TensorBoard logs under runs/<config file name>/, log_every_n_steps=10,
seed_everything=0. A loss spec that cannot be built exits with status 2 and says what to fix.
"""


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


def _compare(argv: Sequence[str]) -> int:
    from lightning_lossdiag.compare import compare_main

    return int(compare_main(list(argv)) or 0)


def _cv(argv: Sequence[str]) -> int:
    from lightning_lossdiag.cv import cv_main

    return int(cv_main(list(argv)) or 0)


_PACKAGE_COMMANDS: dict[str, Callable[[Sequence[str]], int]] = {
    "losses": losses_main,
    "report": _report,
    "compare": _compare,
    "cv": _cv,
}


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
