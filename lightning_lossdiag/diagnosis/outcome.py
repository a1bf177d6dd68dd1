"""What a run ended with: the final and best value of each metric, its finding counts and its configuration.

Shared by ``lossdiag compare`` (which reads finished runs) and the TensorBoard HParams session the ``Doctor`` writes
at the end of fit, so both show the same numbers under the same rules:

* **which keys are metrics** (:func:`is_metric_key`): every scalar except the diagnostics' own families (gradient,
  parameter, activation, learning-rate, plateau, AMP, error-distribution and loss-weight keys, the flush-level
  loss statistics ``train/loss_ema`` ...) and Lightning's ``epoch``/``hp_metric``;
* **final** is the last value written, **best** the lowest value of a loss or error and the highest of an
  accuracy-like score, by :func:`~lightning_lossdiag.diagnosis.direction.metric_direction` of the name (``None`` when
  the name says neither); non-finite values are never best;
* **the configuration** (:func:`read_run_config`) is LightningCLI's ``config.yaml`` in the run folder when there is
  one, else Lightning's ``hparams.yaml`` (what ``save_hyperparameters`` saved), flattened to dotted keys.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from lightning_lossdiag.diagnosis.direction import metric_direction
from lightning_lossdiag.diagnosis.findings import SEVERITIES

#: Name of the sub-run (a folder inside the run's log dir) that holds the run's TensorBoard HParams session.
SESSION_DIR = "lossdiag_hparams"
#: Configuration files looked for in a run folder, in this order: LightningCLI's, then Lightning's.
CONFIG_FILES = ("config.yaml", "hparams.yaml")

_NOT_METRIC_PREFIXES = (
    "grad/", "param/", "act/", "lr/", "lr-", "momentum/", "momentum-", "plateau/", "amp/", "nonfinite/",
    "errors/", "loss/",
)  # fmt: skip
_NOT_METRIC_KEYS = frozenset(
    {"epoch", "step", "hp_metric", "train/loss_ema", "train/loss_mean", "train/loss_min", "train/loss_max",
     "train/nonfinite_count", "train/loss_spikes"}
)  # fmt: skip


def is_metric_key(key: str) -> bool:
    """True when ``key`` is a metric whose final and best values are compared (see the module docstring).

    Example:
        >>> [is_metric_key(k) for k in ["val/loss", "metrics/val/f1", "val_acc", "grad/norm_total", "epoch"]]
        [True, True, True, False, False]
    """
    return key not in _NOT_METRIC_KEYS and not key.startswith(_NOT_METRIC_PREFIXES)


@dataclass(frozen=True)
class MetricOutcome:
    """The final and best value of one metric series.

    Attributes:
        final: the last value written (may be ``nan``/``inf``).
        final_step: its step.
        best: the lowest (``direction == "min"``) or highest (``"max"``) finite value; ``None`` when the direction
            is unknown or no value is finite.
        best_step: the first step where ``best`` was reached.
        direction: ``"min"``, ``"max"`` or ``None``.
    """

    final: float
    final_step: int
    best: float | None
    best_step: int | None
    direction: Literal["min", "max"] | None

    def to_dict(self) -> dict[str, Any]:
        """Plain, JSON-safe data (non-finite numbers as strings ``"nan"``, ``"inf"``)."""
        return {
            "final": json_number(self.final),
            "final_step": self.final_step,
            "best": None if self.best is None else json_number(self.best),
            "best_step": self.best_step,
            "direction": self.direction,
        }


def json_number(x: float) -> float | str:
    """``x`` itself when finite, else its string (JSON has no NaN/inf)."""
    return x if math.isfinite(x) else str(x)


def metric_outcome(points: Sequence[tuple[int, float]], key: str) -> MetricOutcome | None:
    """Final and best of one series of ``(step, value)`` points, in the order they were written.

    Example:
        >>> metric_outcome([(1, 0.9), (2, 0.4), (3, 0.6)], "val/loss")
        MetricOutcome(final=0.6, final_step=3, best=0.4, best_step=2, direction='min')
        >>> metric_outcome([(1, 0.7), (2, 0.8), (3, float("nan"))], "val_acc").best
        0.8
    """
    if not points:
        return None
    direction = metric_direction(key)
    step, final = points[-1]
    best: tuple[int, float] | None = None
    if direction is not None:
        better = (lambda a, b: a < b) if direction == "min" else (lambda a, b: a > b)
        for s, v in points:
            if math.isfinite(v) and (best is None or better(v, best[1])):
                best = (s, v)
    return MetricOutcome(
        final=float(final),
        final_step=int(step),
        best=None if best is None else float(best[1]),
        best_step=None if best is None else int(best[0]),
        direction=direction,
    )


def metric_outcomes(scalars: Mapping[str, Sequence[tuple[int, float]]]) -> dict[str, MetricOutcome]:
    """:func:`metric_outcome` of every metric key (:func:`is_metric_key`) of ``key -> [(step, value)]``, by key.

    Example:
        >>> out = metric_outcomes({"val_loss": [(1, 0.5), (2, 0.3)], "grad/norm_total": [(1, 2.0)]})
        >>> list(out), out["val_loss"].best
        (['val_loss'], 0.3)
    """
    out = {}
    for key in sorted(scalars):
        if is_metric_key(key) and (outcome := metric_outcome(scalars[key], key)) is not None:
            out[key] = outcome
    return out


def finding_counts(severities: Iterable[str]) -> dict[str, int]:
    """Number of findings per severity, plus ``total``.

    Example:
        >>> finding_counts(["warning", "info", "warning"])
        {'info': 1, 'warning': 2, 'error': 0, 'total': 3}
    """
    listed = list(severities)
    counts = {s: sum(1 for x in listed if x == s) for s in SEVERITIES}
    counts["total"] = len(listed)
    return counts


def flatten_config(value: Any, prefix: str = "") -> dict[str, Any]:
    """Nested mappings and lists -> ``{"dotted.key": scalar}``; empty containers stay as ``{}``/``[]``.

    Top-level keys starting with ``_`` (LightningCLI's ``_class_path``, ``_instantiator``) are left out.

    Example:
        >>> flatten_config({"model": {"init_args": {"lr": 0.01, "layers": [8, 4]}}, "_class_path": "x", "opt": {}})
        {'model.init_args.lr': 0.01, 'model.init_args.layers.0': 8, 'model.init_args.layers.1': 4, 'opt': {}}
    """
    out: dict[str, Any] = {}
    if isinstance(value, Mapping) and value:
        for k, v in value.items():
            if not prefix and str(k).startswith("_"):
                continue
            out.update(flatten_config(v, f"{prefix}.{k}" if prefix else str(k)))
    elif isinstance(value, (list, tuple)) and value:
        for i, v in enumerate(value):
            out.update(flatten_config(v, f"{prefix}.{i}" if prefix else str(i)))
    elif prefix:
        out[prefix] = value
    return out


def _yaml_loader() -> Any:
    import yaml

    class _Loader(yaml.SafeLoader):
        """Safe YAML that reads a Python tag (``!!python/object:...``) as the tag's name instead of failing."""

    def _tagged(loader: Any, suffix: str, node: Any) -> str:
        return f"!{suffix}"

    _Loader.add_multi_constructor("", _tagged)
    return _Loader


def read_run_config(run_dir: str | Path) -> tuple[dict[str, Any], str | None]:
    r"""The flattened configuration of a run folder and the file it came from (``({}, None)`` without one).

    ``config.yaml`` (written by LightningCLI's ``SaveConfigCallback``: the whole configuration, e.g.
    ``model.init_args.lr``, ``trainer.max_epochs``) wins over ``hparams.yaml`` (written by Lightning's loggers: the
    module's and datamodule's ``save_hyperparameters``, e.g. ``lr``). An unreadable file counts as absent.

    Example:
        >>> import tempfile
        >>> d = Path(tempfile.mkdtemp())
        >>> _ = (d / "hparams.yaml").write_text("lr: 0.01\nnet:\n  hidden: 32\n")
        >>> read_run_config(d)
        ({'lr': 0.01, 'net.hidden': 32}, 'hparams.yaml')
    """
    import yaml

    for name in CONFIG_FILES:
        path = Path(run_dir) / name
        if not path.is_file():
            continue
        try:
            data = yaml.load(path.read_text(encoding="utf-8"), Loader=_yaml_loader())  # noqa: S506 (a safe loader)
        except (OSError, UnicodeDecodeError, yaml.YAMLError):
            continue
        if isinstance(data, Mapping):
            return flatten_config(data), name
    return {}, None


__all__ = [
    "CONFIG_FILES",
    "SESSION_DIR",
    "MetricOutcome",
    "finding_counts",
    "flatten_config",
    "is_metric_key",
    "json_number",
    "metric_outcome",
    "metric_outcomes",
    "read_run_config",
]
