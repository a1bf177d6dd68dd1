"""``lossdiag compare RUN_DIR [RUN_DIR ...] [--json]``: finished runs side by side.

For each run: the final and best value of each metric, its findings, and its configuration; the table shows the
metrics of every run, the findings that appeared or went away against the first run, and only the configuration
values that differ (``--json``: the same as one object, for scripts).

Which folder is a run: a RUN_DIR is either a logger's version folder (``runs/regression/version_0``, the folder
holding the event files) or a folder above one or more of them (``runs/regression``). In the second case the run
whose newest event file was written last is compared, the rule of ``lossdiag report``; the others are named.

Where the numbers come from, per run folder:

* metrics: every scalar of its TensorBoard event files (subfolders included, the HParams session excluded; see
  :func:`~lightning_lossdiag.diagnosis.offline.read_scalars`) that is a metric by
  :func:`~lightning_lossdiag.diagnosis.outcome.is_metric_key`: final = the last value written (what TensorBoard
  shows), best = the lowest of a loss or error and the highest of an accuracy-like score (by the name; ``None``
  when the name says neither);
* findings: ``lossdiag_report.json`` written by the ``Doctor`` at the end of the run, else the rules run again on
  the event files as ``lossdiag report`` does;
* configuration: ``config.yaml`` (LightningCLI) or else ``hparams.yaml`` (``save_hyperparameters``), flattened to
  dotted keys, plus the Trainer and optimizer settings of the run's HParams session that the files lack. A key
  missing from a run counts as null.

Functions: :func:`load_run_summary` reads one run, :func:`compare_runs` builds the comparison (pure),
:func:`render_table` prints it and :func:`compare_main` is the command.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

from lightning_lossdiag.diagnosis.findings import SEVERITIES
from lightning_lossdiag.diagnosis.offline import RunDirError, find_runs, read_scalars
from lightning_lossdiag.diagnosis.outcome import (
    MetricOutcome,
    finding_counts,
    json_number,
    metric_outcomes,
    read_run_config,
)

REPORT_NAME = "lossdiag_report.json"
_EXPECTED = "expected a run folder holding TensorBoard event files (e.g. runs/regression/version_0) or a folder of runs"


@dataclass
class RunSummary:
    """What one finished run ended with, as :func:`compare_runs` compares it.

    Attributes:
        label: the run's name in the table (``"run 1"``, ...).
        requested: the folder given on the command line.
        path: the run folder read (``requested`` itself, or its latest run).
        other_runs: the other run folders under ``requested`` that were not read.
        metrics: final and best value of each metric, by key.
        findings: ``code -> severity`` (the highest, when a code was raised more than once).
        findings_source: ``"report"`` (the Doctor's JSON report), ``"recomputed"`` (the rules on the event files)
            or ``"none"`` (no scalar to diagnose).
        config: flattened configuration, ``dotted.key -> value``.
        config_sources: the files (and ``"lossdiag_hparams"``, the HParams session) the configuration came from.
    """

    label: str
    requested: str
    path: str
    other_runs: list[str] = field(default_factory=list)
    metrics: dict[str, MetricOutcome] = field(default_factory=dict)
    findings: dict[str, str] = field(default_factory=dict)
    findings_source: str = "none"
    config: dict[str, Any] = field(default_factory=dict)
    config_sources: list[str] = field(default_factory=list)


def resolve_run(path: str | Path) -> tuple[Path, list[Path]]:
    r"""The run folder a RUN_DIR names (itself or its latest run) and the other runs under it.

    Raises:
        RunDirError: ``path`` does not exist, is a file, or holds no TensorBoard event files; the message names the
            path and what was expected.

    Example:
        >>> try:
        ...     resolve_run("no/such/folder")
        ... except RunDirError as err:
        ...     print(str(err).replace("; ", "\n"))
        'no/such/folder' does not exist
        expected a run folder holding TensorBoard event files (e.g. runs/regression/version_0) or a folder of runs
    """
    root = Path(path)
    if not root.exists():
        raise RunDirError(f"{str(root)!r} does not exist; {_EXPECTED}")
    if not root.is_dir():
        raise RunDirError(f"{str(root)!r} is a file; {_EXPECTED}")
    try:
        runs = find_runs(root)
    except RunDirError:
        raise RunDirError(
            f"no TensorBoard event files (events.out.tfevents.*) under {str(root)!r}; {_EXPECTED}"
        ) from None
    return runs[-1], runs[:-1]


def _rank(severity: str) -> int:
    return SEVERITIES.index(severity) if severity in SEVERITIES else -1


def _code_map(items: Sequence[Mapping[str, Any]]) -> dict[str, str]:
    out: dict[str, str] = {}
    for item in items:
        code, severity = str(item.get("code", "")), str(item.get("severity", ""))
        if code and _rank(severity) >= _rank(out.get(code, "")):
            out[code] = severity
    return out


def _findings(run: Path) -> tuple[dict[str, str], str]:
    report = run / REPORT_NAME
    if report.is_file():
        try:
            data = json.loads(report.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, ValueError):
            data = None
        if isinstance(data, Mapping) and isinstance(data.get("findings"), list):
            return _code_map([f for f in data["findings"] if isinstance(f, Mapping)]), "report"
    from lightning_lossdiag.diagnosis.config import DoctorConfig
    from lightning_lossdiag.diagnosis.engine import diagnose
    from lightning_lossdiag.diagnosis.offline import load_run

    try:
        record = load_run(run)
    except RunDirError:  # event files without a scalar: nothing to diagnose
        return {}, "none"
    return _code_map([f.to_dict() for f in diagnose(record, DoctorConfig())]), "recomputed"


def _config(run: Path) -> tuple[dict[str, Any], list[str]]:
    from lightning_lossdiag.dashboards.hparams import read_session
    from lightning_lossdiag.diagnosis.outcome import SESSION_DIR

    config, source = read_run_config(run)
    sources = [source] if source else []
    session = read_session(run)
    if session is not None:
        added = False
        for key, value in session["hparams"].items():
            if config.get(key) is None:
                config[key] = value
                added = True
        # a null parent (``optimizer: null`` in config.yaml) is spelled out by the session's ``optimizer.*`` keys
        for key in [k for k, v in config.items() if v is None and any(s.startswith(k + ".") for s in config)]:
            del config[key]
        if added:
            sources.append(SESSION_DIR)
    return dict(sorted(config.items())), sources


def load_run_summary(path: str | Path, label: str = "run 1") -> RunSummary:
    """Read one RUN_DIR: its metrics, findings and configuration (see the module docstring for the rules).

    Raises:
        RunDirError: the folder is missing, a file, or holds no TensorBoard event files.

    Example:
        >>> import tempfile
        >>> from torch.utils.tensorboard import SummaryWriter
        >>> d = tempfile.mkdtemp()
        >>> with SummaryWriter(d) as w:
        ...     for step, value in [(1, 0.5), (2, 0.3), (3, 0.4)]:
        ...         w.add_scalar("val_loss", value, step)
        >>> run = load_run_summary(d)
        >>> run.metrics["val_loss"].final, run.metrics["val_loss"].best, run.metrics["val_loss"].best_step
        (0.4000000059604645, 0.30000001192092896, 2)
    """
    run, others = resolve_run(path)
    scalars = {tag: [(step, value) for step, _, value in events] for tag, events in read_scalars(run).items()}
    findings, findings_source = _findings(run)
    config, config_sources = _config(run)
    return RunSummary(
        label=label,
        requested=str(path),
        path=str(run),
        other_runs=[str(o) for o in others],
        metrics=metric_outcomes(scalars),
        findings=findings,
        findings_source=findings_source,
        config=config,
        config_sources=config_sources,
    )


def _plain(value: Any) -> Any:
    if isinstance(value, float):
        return json_number(value)
    if value is None or isinstance(value, (bool, int, str)):
        return value
    return str(value)


def compare_runs(runs: Sequence[RunSummary]) -> dict[str, Any]:
    """The comparison of runs as one JSON-ready object (the first run is the reference for findings).

    Keys: ``runs`` (label, path, other runs, sources, finding counts), ``metrics`` (``key -> {"direction", "runs":
    [final/best per run, null where the run lacks the key]}``), ``findings`` (``codes``: ``code -> [severity or null
    per run]``; ``appeared``/``gone``: per run, the codes it has and the first run has not, and the reverse), and
    ``config`` (``differing``: ``key -> [value per run]`` for the keys whose values are not all equal;
    ``compared_keys``: how many keys the runs hold in all).

    Example:
        >>> a = RunSummary("run 1", "a", "a", findings={"plateau": "warning"}, config={"lr": 0.1, "seed": 0})
        >>> b = RunSummary("run 2", "b", "b", findings={"overfitting": "warning"}, config={"lr": 0.01, "seed": 0})
        >>> out = compare_runs([a, b])
        >>> out["findings"]["appeared"], out["findings"]["gone"], out["config"]["differing"]
        ([[], ['overfitting']], [[], ['plateau']], {'lr': [0.1, 0.01]})
    """
    if not runs:
        raise ValueError("`runs` must hold at least one run, got none")
    keys = sorted({k for r in runs for k in r.metrics})
    metrics = {}
    for key in keys:
        outcomes = [r.metrics.get(key) for r in runs]
        direction = next((o.direction for o in outcomes if o is not None), None)
        metrics[key] = {"direction": direction, "runs": [None if o is None else o.to_dict() for o in outcomes]}
    codes = sorted({c for r in runs for c in r.findings})
    first = set(runs[0].findings)
    findings = {
        "codes": {c: [r.findings.get(c) for r in runs] for c in codes},
        "appeared": [sorted(set(r.findings) - first) for r in runs],
        "gone": [sorted(first - set(r.findings)) for r in runs],
    }
    config_keys = sorted({k for r in runs for k in r.config})
    differing = {}
    for key in config_keys:
        values = [r.config.get(key) for r in runs]
        if any(v != values[0] for v in values[1:]):
            differing[key] = [_plain(v) for v in values]
    return {
        "runs": [
            {
                "label": r.label,
                "requested": r.requested,
                "path": r.path,
                "other_runs": r.other_runs,
                "findings_source": r.findings_source,
                "config_sources": r.config_sources,
                "finding_counts": finding_counts(r.findings.values()),
            }
            for r in runs
        ],
        "metrics": metrics,
        "findings": findings,
        "config": {"differing": differing, "compared_keys": len(config_keys)},
    }


def _num(x: Any) -> str:
    if x is None:
        return "-"
    if isinstance(x, str):  # "nan", "inf" from JSON-safe numbers
        return x
    return f"{x:.4g}" if math.isfinite(x) else str(x)


def _value(x: Any) -> str:
    if x is None:
        return "-"
    return _num(x) if isinstance(x, float) else str(x)


def render_table(comparison: Mapping[str, Any], file: IO[str] | None = None) -> None:
    """Print a comparison from :func:`compare_runs` as plain-text tables: runs, metrics, findings, config diff."""
    import io

    from rich import box
    from rich.console import Console
    from rich.table import Table

    buffer = io.StringIO()
    console = Console(file=buffer, width=120, soft_wrap=False, highlight=False, emoji=False, markup=False)
    runs = comparison["runs"]
    console.print(f"lossdiag compare: {len(runs)} run{'s' if len(runs) != 1 else ''}")
    for run in runs:
        note = ""
        if run["other_runs"]:
            note = f"  (latest of {len(run['other_runs']) + 1} runs under {run['requested']})"
        console.print(f"  {run['label']}: {run['path']}{note}", soft_wrap=True)  # a path is never cut

    console.print()
    table = Table(title="metrics: final and best (min for losses and errors, max for scores)", box=box.SIMPLE_HEAD)
    table.title_justify = "left"
    table.add_column("metric", overflow="fold")
    table.add_column("best is", no_wrap=True)
    for run in runs:
        table.add_column(f"{run['label']} final", justify="right", no_wrap=True)
        table.add_column(f"{run['label']} best (step)", justify="right", no_wrap=True)
    for key, entry in comparison["metrics"].items():
        cells = [key, entry["direction"] or "-"]
        for outcome in entry["runs"]:
            if outcome is None:
                cells += ["-", "-"]
                continue
            best = "-" if outcome["best"] is None else f"{_num(outcome['best'])} ({outcome['best_step']})"
            cells += [_num(outcome["final"]), best]
        table.add_row(*cells)
    console.print(table if comparison["metrics"] else "no metrics in the event files")

    codes = comparison["findings"]["codes"]
    console.print()
    table = Table(title="findings (new / gone: against run 1)", box=box.SIMPLE_HEAD)
    table.title_justify = "left"
    table.add_column("code", no_wrap=True)
    for run in runs:
        table.add_column(run["label"], no_wrap=True)
    for code, severities in codes.items():
        cells = [code]
        for i, severity in enumerate(severities):
            text = severity or "-"
            if i and severity is not None and severities[0] is None:
                text += " (new)"
            elif i and severity is None and severities[0] is not None:
                text += " (gone)"
            cells.append(text)
        table.add_row(*cells)
    console.print(table if codes else "findings: none in any run")

    config = comparison["config"]
    console.print()
    differing = config["differing"]
    title = f"config: the {len(differing)} of {config['compared_keys']} values that differ"
    table = Table(title=title, box=box.SIMPLE_HEAD)
    table.title_justify = "left"
    table.add_column("key", overflow="fold")
    for run in runs:
        table.add_column(run["label"], overflow="fold")
    for key, values in differing.items():
        table.add_row(key, *[_value(v) for v in values])
    console.print(table if differing else f"config: no value differs ({config['compared_keys']} keys compared)")
    text = "\n".join(line.rstrip() for line in buffer.getvalue().splitlines())
    print(text.replace("\n\n\n", "\n\n"), file=file or sys.stdout)


def compare_main(argv: Sequence[str] | None = None) -> int:
    """``lossdiag compare RUN_DIR [RUN_DIR ...] [--json]``: print the comparison of finished runs.

    Returns 0 on success; 2 (with a one-line message on stderr) when a folder is missing or holds no event files.

    Example:
        >>> compare_main(["no/such/run"])
        2
    """
    parser = argparse.ArgumentParser(
        prog="lossdiag compare",
        description="Compare finished runs side by side: final and best metrics, findings, differing config values.",
        epilog="A RUN_DIR is a run folder (runs/regression/version_0) or a folder of runs (its latest run is read).",
    )
    parser.add_argument("run_dirs", nargs="+", metavar="RUN_DIR", help="run folders, the first is the reference")
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of tables")
    try:
        args = parser.parse_args(list(argv) if argv is not None else None)
    except SystemExit as stop:  # argparse printed its own message
        return int(stop.code or 0) if not isinstance(stop.code, str) else 2
    try:
        runs = [load_run_summary(path, label=f"run {i}") for i, path in enumerate(args.run_dirs, start=1)]
    except (RunDirError, OSError) as err:
        print(f"lossdiag compare: {err}", file=sys.stderr)
        return 2
    comparison = compare_runs(runs)
    try:
        if args.json:
            print(json.dumps(comparison, indent=2, default=str))
        else:
            render_table(comparison)
        sys.stdout.flush()
    except BrokenPipeError:  # `lossdiag compare ... | head`: the reader left, nothing is wrong
        sys.stdout = open(os.devnull, "w")  # noqa: SIM115 (Python flushes stdout again at exit)
    return 0


__all__ = ["RunSummary", "compare_main", "compare_runs", "load_run_summary", "render_table", "resolve_run"]
