"""Regression losses torch does not ship: log-cosh and the quantile (pinball) loss."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Literal

import torch
import torch.nn.functional as F  # noqa: N812
from torch import Tensor, nn

from lightning_lossdiag.losses._checks import check_number, check_reduction, is_number, reduce_loss
from lightning_lossdiag.losses._errors import LossConfigError
from lightning_lossdiag.losses._registry import register_loss

_LOG2 = math.log(2.0)


@register_loss(
    "log_cosh",
    aliases=("LogCoshLoss", "logcosh"),
    summary="log(cosh(error)): like MSE for small errors and MAE for large ones, smooth everywhere.",
    task="regression",
)
class LogCoshLoss(nn.Module):
    r"""Log-cosh loss of the error :math:`x = \hat y - y`, computed without overflow.

    .. math:: \log\cosh x = x + \mathrm{softplus}(-2x) - \log 2

    which is exact and stays finite for any finite :math:`x` (``torch.cosh`` overflows past about 89 in float32).
    It behaves like :math:`x^2 / 2` near zero and like :math:`|x| - \log 2` for large errors.

    Args:
        reduction: ``"mean"``, ``"sum"`` or ``"none"``.

    Example:
        >>> LogCoshLoss()(torch.tensor([0.0, 1000.0]), torch.zeros(2))
        tensor(499.6534)
    """

    def __init__(self, reduction: Literal["mean", "sum", "none"] = "mean") -> None:
        super().__init__()
        self.reduction = check_reduction(reduction)

    def forward(self, preds: Tensor, target: Tensor) -> Tensor:
        """Log-cosh of ``preds - target`` (same shapes)."""
        if preds.shape != target.shape:
            raise ValueError(
                f"LogCoshLoss needs preds and target of the same shape, got {tuple(preds.shape)} and "
                f"{tuple(target.shape)}"
            )
        x = preds - target
        return reduce_loss(x + F.softplus(-2.0 * x) - _LOG2, self.reduction)

    def extra_repr(self) -> str:
        """Arguments shown by ``repr``."""
        return f"reduction={self.reduction!r}"


@register_loss(
    "quantile",
    aliases=("QuantileLoss", "pinball"),
    summary="Pinball loss for quantile regression (prediction intervals); one output column per quantile.",
    task="regression",
)
class QuantileLoss(nn.Module):
    r"""Pinball (quantile) loss: its minimiser is the ``q``-th quantile of the target.

    With the residual :math:`r = y - \hat y`,

    .. math:: L_q(r) = \max(q\,r, (q - 1)\,r)

    so under-prediction costs :math:`q` per unit and over-prediction :math:`1 - q`. ``q = 0.5`` is half the absolute
    error.

    Shapes: one quantile given as a number: ``preds`` and ``target`` have the same shape. A list of ``Q`` quantiles:
    ``preds`` is ``(..., Q)`` and ``target`` is ``(...)`` or ``(..., 1)``; ``reduction="mean"`` averages over every
    sample and quantile, ``"none"`` returns ``(..., Q)``.

    Args:
        quantiles: a number or a list of numbers, each strictly inside (0, 1).
        reduction: ``"mean"``, ``"sum"`` or ``"none"``.

    Example:
        >>> QuantileLoss([0.1, 0.9], reduction="none")(torch.tensor([[0.0, 0.0]]), torch.tensor([1.0]))
        tensor([[0.1000, 0.9000]])
    """

    quantiles: Tensor

    def __init__(
        self, quantiles: float | Sequence[float] = 0.5, reduction: Literal["mean", "sum", "none"] = "mean"
    ) -> None:
        super().__init__()
        self.reduction = check_reduction(reduction)
        self.multi = not is_number(quantiles)
        if self.multi:
            if isinstance(quantiles, Tensor):
                quantiles = [float(q) for q in quantiles.flatten()]  # one-time conversion of a constructor argument
            if isinstance(quantiles, (str, bytes)) or not isinstance(quantiles, Sequence) or len(quantiles) == 0:
                raise LossConfigError(
                    f"`quantiles` must be a number or a non-empty list of numbers in (0, 1), got {quantiles!r}"
                )
            values = [check_number("quantiles", q, low=0.0, high=1.0, low_open=True, high_open=True) for q in quantiles]
        else:
            values = [check_number("quantiles", quantiles, low=0.0, high=1.0, low_open=True, high_open=True)]
        q = torch.tensor(values, dtype=torch.get_default_dtype())
        self.register_buffer("quantiles", q if self.multi else q.reshape(()))

    def _align(self, preds: Tensor, target: Tensor) -> Tensor:
        if not self.multi:
            if preds.shape != target.shape:
                raise ValueError(
                    f"QuantileLoss with one quantile needs preds and target of the same shape, got "
                    f"{tuple(preds.shape)} and {tuple(target.shape)}"
                )
            return target
        n_q = self.quantiles.numel()
        if preds.dim() >= 1 and preds.shape[-1] == n_q:
            if target.shape == preds.shape[:-1]:
                return target.unsqueeze(-1)
            if target.shape == preds.shape[:-1] + (1,):
                return target
        raise ValueError(
            f"QuantileLoss with {n_q} quantiles needs preds (..., {n_q}) and target (...) or (..., 1), got preds "
            f"{tuple(preds.shape)} and target {tuple(target.shape)}"
        )

    def forward(self, preds: Tensor, target: Tensor) -> Tensor:
        """Pinball loss of ``preds`` (one column per quantile) against ``target``."""
        residual = self._align(preds, target) - preds
        q = self.quantiles.to(preds.dtype)
        return reduce_loss(torch.maximum(q * residual, (q - 1) * residual), self.reduction)

    def extra_repr(self) -> str:
        """Arguments shown by ``repr``."""
        return f"quantiles={self.quantiles.tolist()}, reduction={self.reduction!r}"  # host read only for printing


__all__ = ["LogCoshLoss", "QuantileLoss"]
