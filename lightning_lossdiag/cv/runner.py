"""Run the folds of ``lossdiag cv``: parse the config once, then per fold a fresh model, DataModule and Trainer."""

from __future__ import annotations

import argparse
import sys
import warnings
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lightning.fabric.utilities.seed import seed_everything
from lightning.pytorch import LightningModule, Trainer
from lightning.pytorch.loggers import Logger, TensorBoardLogger
from rich.console import Console
from torch import Tensor
from typing_extensions import override

from lightning_lossdiag._cli_base import LossDiagCLI
from lightning_lossdiag.cv.folds import CVError, Fold, class_counts, kfold_indices, stratified_kfold_indices
from lightning_lossdiag.cv.summary import DEFAULT_DDOF, MetricSummary, summarize_folds, summary_table
from lightning_lossdiag.cv.summary import write_summary_json as _write_json

PROTOCOL = ("cv_dataset", "cv_targets", "set_fold")
SUMMARY_NAME = "cv_summary.json"


class _FoldCLI(LossDiagCLI):
    """``LossDiagCLI`` that parses at construction and builds the classes only on :meth:`build_fold`."""

    _building = False
    _fold_logger: Logger | None = None

    @override
    def instantiate_classes(self) -> None:
        if self._building:
            super().instantiate_classes()

    @override
    def instantiate_trainer(self, **kwargs: Any) -> Trainer:
        if self._fold_logger is not None:
            kwargs["logger"] = self._fold_logger
        return super().instantiate_trainer(**kwargs)

    def build_fold(self, logger: Logger) -> tuple[LightningModule, Any, Trainer]:
        """A fresh model, DataModule and Trainer (logging to ``logger``) from the parsed config."""
        self._building, self._fold_logger = True, logger
        try:
            self.instantiate_classes()
        finally:
            self._building, self._fold_logger = False, None
        return self.model, self.datamodule, self.trainer


@dataclass
class CVResult:
    """What :func:`run_cv` found: per-fold metrics, their summary, fold sizes, findings and where it wrote."""

    summary: dict[str, MetricSummary]
    per_fold: list[dict[str, float]]
    fold_sizes: list[tuple[int, int]]
    findings: list[list[str] | None]
    log_dirs: list[str]
    summary_path: Path
    extra: dict[str, Any] = field(default_factory=dict)


def _doctors(trainer: Trainer) -> list[Any]:
    """The Doctor callbacks of ``trainer``: given directly or inside a ``LossDiagnostics``."""
    from lightning_lossdiag.callbacks.doctor import Doctor

    found: list[Any] = []
    for cb in trainer.callbacks:  # type: ignore[attr-defined]
        parts = getattr(cb, "parts", None)
        inner = list(parts.values()) if isinstance(parts, Mapping) else []
        found.extend(c for c in [cb, *inner] if isinstance(c, Doctor) and c not in found)
    return found


@contextmanager
def _quiet(doctors: Sequence[Any], quiet: bool) -> Iterator[None]:
    """Turn off the Doctors' printed tables while in the block when ``quiet`` (their settings come back after)."""
    before = [d.print_report for d in doctors]
    for d in doctors:
        d.print_report = d.print_report and not quiet
    try:
        yield
    finally:
        for d, flag in zip(doctors, before, strict=True):
            d.print_report = flag


def _scalar_metrics(metrics: Mapping[str, Any]) -> dict[str, float]:
    from lightning_lossdiag.callbacks._base import to_host

    scalars = {k: v for k, v in metrics.items() if isinstance(v, Tensor) and v.numel() == 1}
    return to_host(scalars)  # once per fold, after its validation run: one host transfer


def _check_protocol(dm: Any, stratified: bool) -> None:
    if dm is None:
        raise CVError(
            "`lossdiag cv` needs a DataModule, but the config has no `data` section; add `data: {class_path: ..., "
            "init_args: ...}` with a DataModule that follows the cross-validation protocol"
        )
    needed = PROTOCOL if stratified else ("cv_dataset", "set_fold")
    missing = [name for name in needed if not callable(getattr(dm, name, None))]
    if missing:
        names = ", ".join(f"`{m}`" for m in missing)
        raise CVError(
            f"`lossdiag cv` needs a DataModule that follows the cross-validation protocol, but "
            f"{type(dm).__name__} lacks {names}. Implement `cv_dataset() -> Dataset` (every row the folds split), "
            "`cv_targets() -> Tensor | None` (one class label per row, for --stratified) and "
            "`set_fold(train_indices, val_indices) -> None` (the next train/val dataloaders serve those rows); "
            "see lightning_lossdiag.examples for DataModules that do."
        )


def _num_rows(dm: Any) -> int:
    dataset = dm.cv_dataset()
    try:
        return len(dataset)
    except TypeError as err:
        raise CVError(
            f"{type(dm).__name__}.cv_dataset() must return a Dataset with a length (a map-style Dataset), got "
            f"{type(dataset).__name__}"
        ) from err


def _make_folds(dm: Any, n: int, k: int, seed: int, stratified: bool) -> tuple[list[Fold], Any]:
    if isinstance(k, bool) or not isinstance(k, int) or k < 2:
        raise CVError(f"`--folds` must be an integer >= 2, got {k!r}")
    if k > n:
        raise CVError(
            f"`--folds` must not exceed the number of rows of {type(dm).__name__}.cv_dataset() ({n}), got {k}: "
            "every fold needs at least one validation row"
        )
    if not stratified:
        return kfold_indices(n, k, seed), None
    labels = dm.cv_targets()
    if labels is None:
        raise CVError(
            f"`--stratified` needs class labels, but {type(dm).__name__}.cv_targets() returned None (a regression "
            "DataModule has no classes to keep in proportion); leave out --stratified for plain k-fold splits"
        )
    if len(labels) != n:
        raise CVError(
            f"{type(dm).__name__}.cv_targets() must give one label per row of cv_dataset() ({n}), got {len(labels)}"
        )
    return stratified_kfold_indices(labels, k, seed), labels


def _parse_config(config: Path, overrides: Sequence[str]) -> _FoldCLI:
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*args parameter is intended to run from within Python.*")
        return _FoldCLI(args=["--config", str(config), *overrides], run=False)


def run_cv(
    config: str | Path,
    folds: int,
    overrides: Sequence[str] = (),
    stratified: bool = False,
    seed: int | None = None,
    out: str | Path | None = None,
    ddof: int = DEFAULT_DDOF,
    fold_reports: bool = False,
    console: Console | None = None,
) -> CVResult:
    """K-fold cross-validation of a LightningCLI config; see :mod:`lightning_lossdiag.cv` for the protocol.

    Args:
        config: the YAML config (the one ``lossdiag fit --config`` takes).
        folds: number of folds ``k``, ``2 <= k <=`` rows of ``cv_dataset()``.
        overrides: LightningCLI arguments applied on top of the config (``--trainer.max_epochs=1``, ...).
        stratified: keep each class's share in every fold (needs ``cv_targets()``).
        seed: seed of the folds and of each fold's model (default: the config's ``seed_everything``, else 0).
        out: parent folder of the fold runs and of ``cv_summary.json`` (default ``runs/cv/<config stem>``).
        ddof: delta degrees of freedom of the standard deviation over folds (1: sample, 0: population).
        fold_reports: let the Doctor print its table at the end of each fold's fit (default: only the codes in the
            fold's line and the summary table; every fold's full report is in its ``lossdiag_report.json``).
        console: where to print (default: stdout).

    Raises:
        CVError: a request that cannot be run (the message says why and what to change).
    """
    console = console or Console(width=max(Console().width, 120))
    path = Path(config)
    if isinstance(folds, bool) or not isinstance(folds, int) or folds < 2:
        raise CVError(f"`--folds` must be an integer >= 2, got {folds!r}")
    if not path.is_file():
        raise CVError(
            f"`--config` must be an existing YAML file, got {str(config)!r} (not found from {Path.cwd()}); pass "
            "the config `lossdiag fit` takes, e.g. --config configs/regression.yaml"
        )
    cli = _parse_config(path, overrides)
    config_seed = cli.config.get("seed_everything")
    if seed is None:
        seed = config_seed if isinstance(config_seed, int) and not isinstance(config_seed, bool) else 0
    root = Path(out) if out is not None else Path("runs") / "cv" / path.stem

    splits: list[Fold] = []
    labels: Any = None
    n = 0
    per_fold: list[dict[str, float]] = []
    findings: list[list[str] | None] = []
    log_dirs: list[str] = []
    for i in range(folds):
        logger = TensorBoardLogger(save_dir=str(root), name="", version=f"fold_{i}", default_hp_metric=False)
        if Path(logger.log_dir).is_dir() and any(Path(logger.log_dir).iterdir()):
            console.print(f"[yellow]note:[/] {logger.log_dir} already holds files; the new run is added to them")
        seed_everything(seed, workers=True, verbose=False)  # the same initial weights in every fold
        model, dm, trainer = cli.build_fold(logger)
        if i == 0:
            _check_protocol(dm, stratified)
            n = _num_rows(dm)
            splits, labels = _make_folds(dm, n, folds, seed, stratified)
        elif _num_rows(dm) != n:
            raise CVError(f"{type(dm).__name__}.cv_dataset() changed size between folds; it must give the same rows")
        fold = splits[i]
        dm.set_fold(fold.train, fold.val)
        doctors = _doctors(trainer)
        with _quiet(doctors, not fold_reports):
            trainer.fit(model, datamodule=dm)
        with _quiet(doctors, True):  # the fit's table was enough; the report file gets the final diagnosis
            trainer.validate(model, datamodule=dm, verbose=False)
        findings.append([f.code for d in doctors for f in d.findings] if doctors else None)
        per_fold.append(_scalar_metrics(trainer.callback_metrics))
        log_dirs.append(str(logger.log_dir))
        _print_fold(console, i, folds, fold, per_fold[-1], findings[-1])

    summary = summarize_folds(per_fold, ddof=ddof)
    sizes = [(len(f.train), len(f.val)) for f in splits]
    extra: dict[str, Any] = {
        "config": str(config),
        "config_text": Path(config).read_text(encoding="utf-8"),  # the file as it was, so the summary stands alone
        "overrides": list(overrides),
        "seed": seed,
        "folds": folds,
        "stratified": stratified,
        "fold_sizes": [{"train": t, "val": v} for t, v in sizes],
    }
    if labels is not None:
        extra["val_class_counts"] = [class_counts(labels, f.val) for f in splits]
    extra["findings"] = [None if codes is None else {"count": len(codes), "codes": codes} for codes in findings]
    extra["log_dirs"] = log_dirs
    summary_path = _write_json(root / SUMMARY_NAME, summary, **extra)
    console.print(summary_table(summary, sizes, findings, title=f"{folds}-fold cross-validation of {path.name}"))
    console.print(f"fold runs: {root / 'fold_<i>'} (tensorboard --logdir {root})")
    console.print(f"summary: {summary_path}")
    return CVResult(summary, per_fold, sizes, findings, log_dirs, summary_path, extra)


def _print_fold(
    console: Console, i: int, k: int, fold: Fold, metrics: Mapping[str, float], codes: list[str] | None
) -> None:
    loss = metrics.get("val/loss", metrics.get("val_loss"))
    parts = [f"train {len(fold.train)} / val {len(fold.val)} rows"]
    if loss is not None:
        parts.append(f"val/loss {loss:.4g}")
    if codes is not None:
        parts.append(f"findings: {', '.join(sorted(set(codes))) or 'none'}")
    console.print(f"[bold]fold {i}[/] ({i + 1} of {k}): " + " · ".join(parts))


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="lossdiag cv",
        allow_abbrev=False,
        description=(
            "K-fold cross-validation of a LightningCLI config: a fresh model per fold, each fold's TensorBoard run "
            "under one folder, a table of every validation metric per fold with mean ± std, and cv_summary.json. "
            "Any other --trainer.* / --model.* / --data.* argument overrides the config as in `lossdiag fit`."
        ),
    )
    parser.add_argument("--config", "-c", required=True, help="the YAML config `lossdiag fit` takes")
    parser.add_argument("--folds", type=int, default=5, help="number of folds K (default 5)")
    parser.add_argument("--stratified", action="store_true", help="keep each class's share in every fold")
    parser.add_argument("--seed", type=int, default=None, help="seed of folds and models (default: seed_everything)")
    parser.add_argument("--out", default=None, help="parent folder of the fold runs (default runs/cv/<config stem>)")
    parser.add_argument("--fold-reports", action="store_true", help="print the Doctor's table after each fold's fit")
    parser.add_argument(
        "--ddof", type=int, choices=(0, 1), default=DEFAULT_DDOF, help="std over folds: 1 sample (default), 0 numpy's"
    )
    return parser


def cv_main(argv: Sequence[str]) -> int:
    """``lossdiag cv --config X.yaml --folds K [--stratified] [--seed S] [--out DIR] [overrides]``; the exit status.

    Returns 0 on success, 2 (with a one-paragraph message on stderr) for a request that cannot be run.
    """
    try:
        opts, overrides = _parser().parse_known_args(list(argv))
        run_cv(
            opts.config,
            opts.folds,
            overrides=overrides,
            stratified=opts.stratified,
            seed=opts.seed,
            out=opts.out,
            ddof=opts.ddof,
            fold_reports=opts.fold_reports,
        )
    except CVError as err:
        print(f"lossdiag cv: {err}", file=sys.stderr)
        return 2
    except SystemExit as exc:  # argparse / jsonargparse already printed their message
        return exc.code if isinstance(exc.code, int) else 2
    return 0
