"""Diagnose a finished run from its TensorBoard event files: ``lossdiag report RUN_DIR [--json]``.

:func:`load_run` builds a :class:`RunRecord` from every scalar in the event files of a folder, so the same rules as
during ``fit`` run on old logs, including logs of plain Lightning modules that never used lightning_lossdiag.

Which events are read: a *run* is a folder holding event files together with the event files of its subfolders
(``SummaryWriter.add_scalars`` and some loggers write there), except the HParams session the ``Doctor`` writes
into ``lossdiag_hparams/`` (its final/best columns restate the run's own series). When the given folder holds
several runs side by side (``lightning_logs/version_0``, ``version_1``, ...), the run whose newest event file was
written last is read (``pick="latest"``, the default), or all runs are merged into one record (``pick="merge"``: a
key written by several runs gets all their points, ordered by step).

Common names are mapped to ours when ours is absent: ``train_loss``, ``train_loss_step``, ``train/loss_step``,
``loss`` -> ``train/loss``; ``val_loss``, ``valid_loss``, ``val/loss_epoch``, ``val_loss_epoch`` -> ``val/loss``;
``train_loss_epoch`` -> ``train/loss_epoch``. Every other key keeps its name. Notes that only a live run knows
(parameter names, scheduler configuration, class counts) are absent, so the rules that need them stay quiet.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

from lightning_lossdiag.diagnosis.config import DoctorConfig
from lightning_lossdiag.diagnosis.engine import diagnose
from lightning_lossdiag.diagnosis.outcome import SESSION_DIR
from lightning_lossdiag.diagnosis.record import RunRecord
from lightning_lossdiag.diagnosis.report import build_report, print_table
from lightning_lossdiag.diagnosis.rules._common import ALIASES

_EVENT_GLOB = "events.out.tfevents.*"


class RunDirError(ValueError):
    """The folder given to :func:`load_run` is missing, unreadable or holds no scalars."""


def find_runs(path: str | Path) -> list[Path]:
    """The run folders under ``path``: folders with event files that are not inside another such folder.

    Sorted oldest first by the modification time of their newest event file (so the last one is the latest run).
    """
    root = Path(path)
    if not root.exists():
        raise RunDirError(f"`run_dir` {str(root)!r} does not exist")
    if not root.is_dir():
        raise RunDirError(f"`run_dir` must be a folder of TensorBoard event files, got the file {str(root)!r}")
    files = [p for p in root.rglob(_EVENT_GLOB) if p.is_file()]
    if not files:
        raise RunDirError(f"no TensorBoard event files ({_EVENT_GLOB}) under {str(root)!r}")
    dirs = {p.parent for p in files}
    runs = [d for d in dirs if not any(other != d and other in d.parents for other in dirs)]

    def newest(run: Path) -> float:
        return max(p.stat().st_mtime for p in files if p.parent == run or run in p.parent.parents)

    return sorted(runs, key=lambda r: (newest(r), str(r)))


def _read_dir(folder: Path) -> dict[str, list[tuple[int, float, float]]]:
    """``tag -> [(step, wall_time, value)]`` of the event files directly in ``folder``."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(folder), size_guidance={"scalars": 0})
    acc.Reload()
    return {tag: [(e.step, e.wall_time, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags().get("scalars", [])}


def _read_run(run: Path) -> dict[str, list[tuple[int, float, float]]]:
    session = run / SESSION_DIR
    found = {p.parent for p in run.rglob(_EVENT_GLOB) if p.is_file()}
    found = {d for d in found if d != session and session not in d.parents}
    folders = sorted(found, key=lambda d: (d != run, str(d)))
    out: dict[str, list[tuple[int, float, float]]] = {}
    for folder in folders:
        for tag, events in _read_dir(folder).items():
            name = tag if (folder == run or tag not in out) else f"{folder.relative_to(run).as_posix()}/{tag}"
            out.setdefault(name, []).extend(events)
    return out


def read_scalars(run: str | Path) -> dict[str, list[tuple[int, float, float]]]:
    """``tag -> [(step, wall_time, value)]`` of one run folder, as TensorBoard's ``EventAccumulator`` reads them.

    A tag of a subfolder keeps its name unless the folder itself (or an earlier subfolder) has it; it is then
    ``<subfolder>/<tag>``. The HParams session folder (``lossdiag_hparams``) is not read.
    """
    return _read_run(Path(run))


def canonical_names(tags: Sequence[str]) -> dict[str, str]:
    """Map each tag to the name the rules read: common user names -> ours when ours is absent.

    Example:
        >>> names = canonical_names(["train_loss_step", "train_loss_epoch", "val_loss", "val_acc"])
        >>> [names[k] for k in ("train_loss_step", "train_loss_epoch", "val_loss", "val_acc")]
        ['train/loss', 'train/loss_epoch', 'val/loss', 'val_acc']
    """
    mapping = {t: t for t in tags}
    present = set(tags)
    for canonical, aliases in ALIASES.items():
        if canonical in present:
            continue
        for alias in aliases:
            if alias in present and mapping[alias] == alias:
                mapping[alias] = canonical
                break
    return mapping


def load_run(path: str | Path, pick: Literal["latest", "merge"] = "latest") -> RunRecord:
    """Read the scalars of a run folder into a :class:`RunRecord` (see the module docstring for what is read).

    Raises:
        RunDirError: the folder does not exist, is a file, or holds no event files or no scalars.
    """
    if pick not in ("latest", "merge"):
        raise ValueError(f"`pick` must be one of ('latest', 'merge'), got {pick!r}")
    runs = find_runs(path)
    chosen = runs if pick == "merge" else runs[-1:]
    tags: dict[str, list[tuple[int, float, float]]] = {}
    for run in chosen:
        for tag, events in _read_run(run).items():
            tags.setdefault(tag, []).extend(events)
    if not tags:
        raise RunDirError(f"the event files under {str(path)!r} hold no scalars")
    names = canonical_names(list(tags))
    record = RunRecord(max_points=1 << 16)
    for tag, events in tags.items():
        for step, _, value in sorted(events, key=lambda e: (e[0], e[1])):
            record.add_scalars(int(step), {names[tag]: float(value)})
    record.notes["offline/run_dirs"] = [str(r) for r in chosen]
    record.notes["offline/other_runs"] = [str(r) for r in runs if r not in chosen]
    return record


def _epochs(record: RunRecord) -> int | None:
    epoch = record.last("epoch")
    return int(epoch) + 1 if epoch is not None else None


def report_main(argv: Sequence[str] | None = None) -> int:
    """``lossdiag report RUN_DIR [--json] [--merge]``: print the diagnosis of finished event files.

    Returns 0 on success; 2 (with a message on stderr) when the folder is missing, unreadable or empty.
    """
    parser = argparse.ArgumentParser(
        prog="lossdiag report", description="Diagnose a finished run from its TensorBoard event files."
    )
    parser.add_argument("run_dir", help="a run folder (e.g. lightning_logs/version_0) or a folder of runs")
    parser.add_argument("--json", action="store_true", help="print the report as JSON instead of a table")
    parser.add_argument("--merge", action="store_true", help="merge every run under RUN_DIR instead of the latest")
    try:
        args = parser.parse_args(list(argv) if argv is not None else None)
    except SystemExit as stop:  # argparse prints its own message
        return int(stop.code or 0) if not isinstance(stop.code, str) else 2
    try:
        record = load_run(args.run_dir, pick="merge" if args.merge else "latest")
    except (RunDirError, OSError) as err:
        print(f"lossdiag report: {err}", file=sys.stderr)
        return 2
    findings = diagnose(record, DoctorConfig())
    extra: dict[str, Any] = {"run_dirs": record.notes["offline/run_dirs"], "epochs": _epochs(record)}
    if record.notes["offline/other_runs"]:
        extra["other_runs"] = record.notes["offline/other_runs"]
    if args.json:
        print(json.dumps(build_report(findings, record, extra), indent=2))
    else:
        print_table(findings, file=sys.stdout, title=f"lossdiag report {', '.join(extra['run_dirs'])}")
    return 0


__all__ = ["RunDirError", "canonical_names", "find_runs", "load_run", "read_scalars", "report_main"]
