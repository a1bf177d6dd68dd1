"""lightning-lossdiag: loss diagnostics for PyTorch Lightning.

Losses chosen in YAML (:class:`LossMixin`, :func:`build_loss`), training-loop monitors with no host synchronisation
between flushes, error distributions and metric curves in TensorBoard, and a diagnosis with stable finding codes.

Quick start::

    from lightning_lossdiag import LossDiagnostics
    trainer = Trainer(callbacks=[LossDiagnostics()])

Public names are imported lazily, so ``import lightning_lossdiag`` stays cheap.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

_EXPORTS: dict[str, str] = {
    # losses
    "build_loss": "lightning_lossdiag.losses",
    "list_losses": "lightning_lossdiag.losses",
    "register_loss": "lightning_lossdiag.losses",
    "CompositeLoss": "lightning_lossdiag.losses",
    "FocalLoss": "lightning_lossdiag.losses",
    "DiceLoss": "lightning_lossdiag.losses",
    "LogCoshLoss": "lightning_lossdiag.losses",
    "QuantileLoss": "lightning_lossdiag.losses",
    "LossConfigError": "lightning_lossdiag.losses",
    # module mixin
    "LossMixin": "lightning_lossdiag.mixins",
    # callbacks
    "LossMonitor": "lightning_lossdiag.callbacks.loss_monitor",
    "GradientMonitor": "lightning_lossdiag.callbacks.gradient_monitor",
    "SchedulerMonitor": "lightning_lossdiag.callbacks.scheduler_monitor",
    "ErrorDistributionMonitor": "lightning_lossdiag.callbacks.error_distribution",
    "MetricCurves": "lightning_lossdiag.callbacks.metric_curves",
    "ActivationMonitor": "lightning_lossdiag.callbacks.activation_monitor",
    "AmpMonitor": "lightning_lossdiag.callbacks.amp_monitor",
    "Doctor": "lightning_lossdiag.callbacks.doctor",
    "NonFiniteGuard": "lightning_lossdiag.callbacks.nonfinite_guard",
    "LossDiagnostics": "lightning_lossdiag.callbacks.loss_diagnostics",
    # diagnosis
    "Finding": "lightning_lossdiag.diagnosis.findings",
    "RunRecord": "lightning_lossdiag.diagnosis.record",
    "DoctorConfig": "lightning_lossdiag.diagnosis.config",
    "diagnose": "lightning_lossdiag.diagnosis.engine",
    "load_run": "lightning_lossdiag.diagnosis.offline",
}

__all__ = sorted([*_EXPORTS, "__version__"])


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'lightning_lossdiag' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return __all__


if TYPE_CHECKING:  # pragma: no cover
    from lightning_lossdiag.diagnosis.findings import Finding as Finding
    from lightning_lossdiag.diagnosis.record import RunRecord as RunRecord
