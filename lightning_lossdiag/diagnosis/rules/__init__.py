"""Diagnosis rules: pure functions ``rule(record, cfg) -> list[Finding]``, one module per family of codes.

=================  ===========================================================================================
module             codes
=================  ===========================================================================================
``loss``           ``nonfinite_loss``, ``loss_spike``, ``loss_diverging``
``gradients``      ``nonfinite_grad``, ``exploding_gradients``, ``vanishing_gradients``, ``dead_parameters``,
                   ``clipping_saturated``
``fit``            ``plateau``, ``overfitting``
``data``           ``class_imbalance``, ``constant_predictions``
``metrics``        ``metric_scale_mismatch``
``schedule``       ``scheduler_mode_mismatch``, ``scheduler_monitor_missing``
``activations``    ``dead_units``, ``saturated_activations``
``amp``            ``amp_scale_collapse``
``calibration``    ``overconfident``, ``underconfident``
=================  ===========================================================================================

``double_sigmoid``, ``softmax_into_cross_entropy`` and ``shape_broadcast`` come from one-time input checks, which add
them to the run record directly; the engine merges them.
"""

from __future__ import annotations

from collections.abc import Callable

from lightning_lossdiag.diagnosis.config import DoctorConfig
from lightning_lossdiag.diagnosis.findings import Finding
from lightning_lossdiag.diagnosis.record import RunRecord
from lightning_lossdiag.diagnosis.rules import (
    activations,
    amp,
    calibration,
    data,
    fit,
    gradients,
    loss,
    metrics,
    schedule,
)

Rule = Callable[[RunRecord, DoctorConfig], list[Finding]]

#: Every rule, in the order they run.
ALL_RULES: tuple[Rule, ...] = (
    *loss.RULES,
    *gradients.RULES,
    *fit.RULES,
    *data.RULES,
    *metrics.RULES,
    *schedule.RULES,
    *activations.RULES,
    *amp.RULES,
    *calibration.RULES,
)

__all__ = ["ALL_RULES", "Rule"]
