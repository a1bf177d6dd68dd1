"""Small validators and the reduction helper shared by the extra losses.

Every validator raises :class:`~lightning_lossdiag.losses._registry.LossConfigError` with a message that names the
argument, what is allowed and what came. Nothing here reads a tensor on the host.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor

from lightning_lossdiag.losses._errors import LossConfigError

REDUCTIONS: tuple[str, ...] = ("mean", "sum", "none")


def check_reduction(reduction: Any, allowed: tuple[str, ...] = REDUCTIONS) -> str:
    """Return ``reduction`` when it is one of ``allowed`` (default ``'mean'``, ``'sum'``, ``'none'``); raise otherwise.

    Example:
        >>> check_reduction("sum")
        'sum'
    """
    if not isinstance(reduction, str) or reduction not in allowed:
        raise LossConfigError(f"`reduction` must be one of {', '.join(map(repr, allowed))}, got {reduction!r}")
    return reduction


def is_number(value: Any) -> bool:
    """Whether ``value`` is a plain real number (``bool`` is not).

    Example:
        >>> is_number(1), is_number(True), is_number("1")
        (True, False, False)
    """
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _allowed_range(low: float | None, high: float | None, low_open: bool, high_open: bool) -> str:
    if low is not None and high is not None:
        return f"a number in {'(' if low_open else '['}{low:g}, {high:g}{')' if high_open else ']'}"
    if low is not None:
        return f"a number {'>' if low_open else '>='} {low:g}"
    if high is not None:
        return f"a number {'<' if high_open else '<='} {high:g}"
    return "a finite number"


def check_number(
    name: str,
    value: Any,
    *,
    low: float | None = None,
    high: float | None = None,
    low_open: bool = False,
    high_open: bool = False,
) -> float:
    """Return ``value`` as a float after checking it is a finite number inside the given bounds.

    Example:
        >>> check_number("gamma", 2, low=0.0)
        2.0
    """
    allowed = _allowed_range(low, high, low_open, high_open)
    if not is_number(value) or not math.isfinite(value):
        raise LossConfigError(f"`{name}` must be {allowed}, got {type(value).__name__} {value!r}")
    bad_low = low is not None and (value <= low if low_open else value < low)
    bad_high = high is not None and (value >= high if high_open else value > high)
    if bad_low or bad_high:
        raise LossConfigError(f"`{name}` must be {allowed}, got {value!r}")
    return float(value)


def as_float_tensor(name: str, value: Any) -> Tensor:
    """Turn a number, a (nested) list of numbers or a tensor into a float tensor; raise on anything else.

    Example:
        >>> as_float_tensor("weight", [1, 2])
        tensor([1., 2.])
    """
    if isinstance(value, Tensor):
        return value.to(torch.get_default_dtype()) if not value.is_floating_point() else value
    try:
        return torch.tensor(value, dtype=torch.get_default_dtype())
    except (TypeError, ValueError, RuntimeError):
        raise LossConfigError(
            f"`{name}` must be a number, a list of numbers or a tensor, got {type(value).__name__} {value!r}"
        ) from None


def reduce_loss(loss: Tensor, reduction: str) -> Tensor:
    """Apply ``reduction`` (``'mean'``, ``'sum'`` or ``'none'``) to an element-wise loss.

    Example:
        >>> reduce_loss(torch.tensor([1.0, 3.0]), "mean")
        tensor(2.)
    """
    if reduction == "mean":
        return loss.mean()
    if reduction == "sum":
        return loss.sum()
    return loss


__all__ = ["REDUCTIONS", "as_float_tensor", "check_number", "check_reduction", "is_number", "reduce_loss"]
