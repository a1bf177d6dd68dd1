"""Losses chosen by name: the registry, the extra losses and the composite multi-task loss.

Every ``torch.nn`` loss is registered under its class name and a snake_case name (``"MSELoss"``, ``"mse"``), plus
``focal``, ``dice``, ``log_cosh``, ``quantile`` and ``composite``. :func:`build_loss` turns a YAML spec into a module;
:func:`list_losses` is the catalogue (``lossdiag losses``); :func:`describe_loss` says what a loss expects.

Example:
    >>> build_loss({"name": "huber", "delta": 0.5})
    HuberLoss()
    >>> describe_loss(build_loss("ce"))
    LossTraits(task='multiclass', inputs='logits')
"""

from __future__ import annotations

from lightning_lossdiag.losses import _torch_losses  # noqa: F401  (registers the torch losses)
from lightning_lossdiag.losses._build import build_loss
from lightning_lossdiag.losses._errors import LossConfigError
from lightning_lossdiag.losses._registry import LossInfo, LossSpec, list_losses, register_loss
from lightning_lossdiag.losses.auto_weights import needs_auto_weights, resolve_auto_weights
from lightning_lossdiag.losses.composite import CompositeLoss
from lightning_lossdiag.losses.dice import DiceLoss
from lightning_lossdiag.losses.focal import FocalLoss
from lightning_lossdiag.losses.regression import LogCoshLoss, QuantileLoss
from lightning_lossdiag.losses.traits import LossTraits, describe_loss

__all__ = [
    "CompositeLoss",
    "DiceLoss",
    "FocalLoss",
    "LogCoshLoss",
    "LossConfigError",
    "LossInfo",
    "LossSpec",
    "LossTraits",
    "QuantileLoss",
    "build_loss",
    "describe_loss",
    "list_losses",
    "needs_auto_weights",
    "register_loss",
    "resolve_auto_weights",
]
