r"""Running count, mean, variance, min and max on the device, mergeable with Chan et al.'s parallel formula.

For states :math:`(n_i, \bar x_i, M_{2,i})` the merged state is

.. math::

    n = \sum_i n_i, \qquad \bar x = \sum_i \frac{n_i}{n} \bar x_i, \qquad
    M_2 = \sum_i M_{2,i} + \sum_i n_i (\bar x_i - \bar x)^2,

which is Chan, Golub and LeVeque's pairwise update written for any number of parts (batches or ranks). The
population variance is :math:`M_2 / n`, the unbiased one :math:`M_2 / (n - 1)`. Everything is float64.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any, NamedTuple

import torch
from torch import Tensor

from lightning_lossdiag.stats._base import StreamingStat, on_device


class MomentsState(NamedTuple):
    """The state tensors of :class:`RunningMoments` (float64, each of the statistic's ``shape``)."""

    count: Tensor  # type: ignore[assignment]  # shadows tuple.count on purpose
    mean: Tensor
    m2: Tensor
    min: Tensor
    max: Tensor


def _moments_init(shape: tuple[int, ...], device: torch.device) -> MomentsState:
    def full(value: float) -> Tensor:
        return torch.full(shape, value, dtype=torch.float64, device=device)

    return MomentsState(full(0.0), full(0.0), full(0.0), full(math.inf), full(-math.inf))


def _batch_moments(x: Tensor, ignore_nonfinite: bool) -> MomentsState:
    """Moments of the rows of ``x`` (``(N, *shape)``, float64, ``N > 0``) along dim 0."""
    if not ignore_nonfinite:
        mean = x.mean(0)
        count = torch.full_like(mean, float(x.shape[0]))  # a shape: host metadata, no host read (no sync)
        return MomentsState(count, mean, (x - mean).square().sum(0), x.amin(0), x.amax(0))
    finite = torch.isfinite(x)
    count = finite.sum(0).to(torch.float64)
    mean = torch.where(finite, x, 0.0).sum(0) / count.clamp(min=1.0)
    m2 = torch.where(finite, (x - mean).square(), 0.0).sum(0)
    vmin = torch.where(finite, x, math.inf).amin(0)
    vmax = torch.where(finite, x, -math.inf).amax(0)
    return MomentsState(count, mean, m2, vmin, vmax)


def _moments_reduce(stacked: Sequence[Tensor]) -> MomentsState:
    """Pure Chan merge of ``(W, *shape)`` stacks of moment states along dim 0 (empty parts contribute nothing)."""
    s = MomentsState(*stacked)
    count = s.count.sum(0)
    weight = s.count / count.clamp(min=1.0)  # exactly 1.0 for a lone non-empty part, 0.0 for empty parts
    mean = (weight * s.mean).sum(0)
    m2 = s.m2.sum(0) + (s.count * (s.mean - mean).square()).sum(0)
    return MomentsState(count, mean, m2, s.min.amin(0), s.max.amax(0))


def _moments_update(state: MomentsState, x: Tensor, ignore_nonfinite: bool) -> MomentsState:
    """Pure update: the state after also seeing the rows of ``x`` (``(N, *shape)``)."""
    if x.shape[0] == 0:
        return state
    batch = _batch_moments(x.detach().to(torch.float64), ignore_nonfinite)
    return _moments_reduce([torch.stack(pair) for pair in zip(state, batch, strict=True)])


class RunningMoments(StreamingStat):
    """Streaming count, mean, variance, min and max (float64 on the device), per element of ``shape``.

    With the default ``shape=()`` every value of every update is one observation; with ``shape=(C,)`` an update
    takes ``(..., C)`` and keeps moments per column. While empty: ``count = 0``, ``mean = m2 = 0``, ``min = +inf``,
    ``max = -inf`` and ``var`` is NaN. No host reads in ``update``, ``merge`` or ``sync``.

    Args:
        device: where the state lives (default: CPU).
        shape: shape of the statistic (trailing shape of the updates).
        ignore_nonfinite: skip NaN/inf values (default: keep them, so they show up as NaN/inf moments).

    Example:
        >>> m = RunningMoments()
        >>> m.update(torch.tensor([1.0, 2.0]))
        >>> m.update(torch.tensor([3.0, 4.0]))
        >>> float(m.count), float(m.mean), float(m.var), float(m.var_unbiased), float(m.min), float(m.max)
        (4.0, 2.5, 1.25, 1.6666666666666667, 1.0, 4.0)
    """

    _state_names = MomentsState._fields

    count: Tensor  # type: ignore[assignment]  # shadows tuple.count on purpose
    mean: Tensor
    m2: Tensor
    min: Tensor
    max: Tensor

    def __init__(
        self,
        device: torch.device | str | None = None,
        *,
        shape: Sequence[int] = (),
        ignore_nonfinite: bool = False,
    ) -> None:
        super().__init__(device)
        shape = tuple(shape)
        if any(isinstance(d, bool) or not isinstance(d, int) or d < 1 for d in shape):
            raise ValueError(f"`shape` must be a sequence of positive integers, got {shape!r}")
        self.shape = shape
        self.ignore_nonfinite = bool(ignore_nonfinite)
        self.reset()

    def _config(self) -> dict[str, Any]:
        return {"shape": list(self.shape), "ignore_nonfinite": self.ignore_nonfinite}

    def _initial_state(self) -> MomentsState:
        return _moments_init(self.shape, self.device)

    def _reduce(self, stacked: Sequence[Tensor]) -> MomentsState:
        return _moments_reduce(stacked)

    def update(self, x: Tensor) -> None:
        """Add the values of ``x`` (any shape ending in ``shape``). No host read."""
        if not isinstance(x, Tensor):
            raise TypeError(f"`x` must be a Tensor, got {type(x).__name__}")
        n_dims = len(self.shape)
        if n_dims and tuple(x.shape[x.dim() - n_dims :]) != self.shape:
            raise ValueError(f"`x` must have a shape ending in {self.shape}, got {tuple(x.shape)}")
        rows = on_device(x, self.device).reshape(-1, *self.shape)
        self._set_state(_moments_update(MomentsState(*self.state), rows, self.ignore_nonfinite))

    @property
    def var(self) -> Tensor:
        """Population variance ``m2 / count`` (NaN while empty)."""
        return self.m2 / self.count

    @property
    def var_unbiased(self) -> Tensor:
        """Unbiased variance ``m2 / (count - 1)`` (NaN for fewer than 2 values)."""
        return torch.where(self.count > 1, self.m2 / (self.count - 1), math.nan)

    @property
    def std(self) -> Tensor:
        """Population standard deviation."""
        return self.var.sqrt()

    @property
    def std_unbiased(self) -> Tensor:
        """Square root of the unbiased variance."""
        return self.var_unbiased.sqrt()


__all__ = ["MomentsState", "RunningMoments"]
