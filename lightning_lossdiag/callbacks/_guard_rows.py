"""The per-step record of :class:`~lightning_lossdiag.NonFiniteGuard`: references kept per step, reduced in batches.

An optimizer step only appends three things to a :class:`GuardRows`: its global step (a host int), a 0-d device
tensor that is finite exactly when the step's loss was (:func:`loss_probe`: usually the loss itself), and the
per-gradient L2 norms the step already computed. No device work is spent on counting. At a flush, a checkpoint, or
when :data:`FOLD_ROWS` rows have piled up, :meth:`GuardRows.fold` stacks them and derives every counter with a few
batched kernels, still on the device; the guard then reads all of it in its one flush transfer.
"""

from __future__ import annotations

import torch
from torch import Tensor

from lightning_lossdiag.callbacks._base import host_to_device

NO_STEP = 2**62  # "no non-finite step" in a device minimum (exact in float64, so it survives the host transfer)
FOLD_ROWS = 512  # rows kept before they are folded into the accumulators (bounds the memory between flushes)


def loss_mark(loss: Tensor) -> Tensor:
    """A 0-d tensor: ``0`` when every value of ``loss`` is finite, ``NaN`` otherwise (one kernel, no host read).

    ``x * 0`` is ``0`` for a finite ``x`` and ``NaN`` for ``NaN`` and ``±inf``, so marks can be summed and stacked
    without losing a bad one, and added to anything to poison it.

    Example:
        >>> loss_mark(torch.tensor(2.5)), loss_mark(torch.tensor(float("-inf")))
        (tensor(0.), tensor(nan))
    """
    mark = loss.detach() * 0
    return mark if mark.ndim == 0 else mark.sum()


def loss_probe(losses: list[Tensor]) -> Tensor | None:
    """One 0-d tensor that is finite exactly when every loss of the step is (``None``: no loss was seen).

    The usual step has one scalar loss: it is its own probe, with no kernel at all. Several backward passes
    (gradient accumulation) or a non-scalar loss are reduced to summed :func:`loss_mark` values, so large finite
    losses cannot overflow into a false alarm.

    Example:
        >>> loss = torch.tensor(2.5)
        >>> loss_probe([loss]) is loss, loss_probe([loss, torch.tensor(float("nan"))]), loss_probe([])
        (True, tensor(nan), None)
    """
    if not losses:
        return None
    if len(losses) == 1 and losses[0].ndim == 0:
        return losses[0]
    return torch.stack([loss_mark(t) for t in losses]).sum()


def step_ok(
    norms: Tensor | None,
    probe: Tensor | None,
    out: Tensor | None = None,
    zeros: Tensor | None = None,
    *,
    found_inf: bool = False,
) -> Tensor | None:
    """A 0-d device ``int32``: ``1`` when every norm and the loss probe are finite, else ``0``. No host read.

    ``None`` when neither was given.

    ``dot(norms, 0)`` is ``0`` when every norm is finite and ``NaN`` when one is ``NaN`` or ``inf`` (``0 * inf`` is
    ``NaN``); adding ``0 * probe`` (``alpha=0``) folds the loss in the same way, and ``NaN`` is the one value not
    equal to itself. Three small kernels whatever the number of parameters, exact for any finite values (nothing
    is summed that could overflow), and the result is written as an integer, the type
    :func:`~lightning_lossdiag.callbacks._guard_ops.drop_update` multiplies integer views of the gradients by
    (a bool would be converted once per gradient).

    With ``found_inf=True`` the flag is inverted and ``float32``: ``1.0`` for a bad step, what a fused torch
    optimizer reads as ``found_inf`` to skip it. The same three kernels (``ne`` instead of ``eq``), where converting
    the ``int32`` flag would take two more (~60-100 µs a step inside a CPU training loop).

    Args:
        norms: the step's per-gradient norms (any ``p``: NaN/inf propagate).
        probe: :func:`loss_probe` of the step.
        out: a 0-d tensor on the norms' device to write the flag into, ``int32`` (``float32`` with ``found_inf``): a
            caller that uses the flag at once reuses one from step to step, no allocation per step; a new one when
            ``None`` or when it does not fit.
        zeros: zeros shaped like ``norms`` (kept by the caller from step to step); made here when ``None`` or when
            they do not fit.
        found_inf: return ``1.0`` (``float32``) for a bad step and ``0.0`` for a good one instead.

    Example:
        >>> step_ok(torch.tensor([1.0, 3e38]), torch.tensor(-3e38)), step_ok(torch.tensor([float("inf")]), None)
        (tensor(1, dtype=torch.int32), tensor(0, dtype=torch.int32))
        >>> step_ok(None, torch.tensor(float("nan")))
        tensor(0, dtype=torch.int32)
        >>> bad, good = torch.tensor([1.0, float("nan")]), torch.ones(2)
        >>> step_ok(bad, None, found_inf=True), step_ok(good, None, found_inf=True)
        (tensor(1.), tensor(0.))
    """
    if norms is not None and norms.numel():
        if zeros is None or (zeros.shape, zeros.dtype, zeros.device) != (norms.shape, norms.dtype, norms.device):
            zeros = torch.zeros_like(norms)
        value = torch.dot(norms, zeros)  # 0, or NaN
        if probe is not None:
            value.add_(probe if probe.device == value.device else probe.to(value.device), alpha=0)
    elif probe is not None:
        value = torch.mul(probe.detach(), 0)
    else:
        return None
    dtype = torch.float32 if found_inf else torch.int32
    if out is None or out.device != value.device or out.dtype != dtype:
        out = torch.empty((), dtype=dtype, device=value.device)
    return torch.ne(value, value, out=out) if found_inf else torch.eq(value, value, out=out)


class GuardRows:
    """The steps of one set of gradient tensors since the last fold, and their device accumulators.

    Args:
        names: the parameter names, in the order of the norms of each row (``[]``: steps without gradients).
        device: where the accumulators live.

    Example:
        >>> rows = GuardRows(["w", "b"], torch.device("cpu"))
        >>> rows.push(3, torch.tensor(0.7), torch.tensor([1.0, 2.0]))  # the step's loss, finite
        >>> rows.push(4, torch.tensor(float("nan")), torch.tensor([float("nan"), 2.0]))
        >>> rows.fold(grads_only=False, dropping=True)
        >>> rows.totals.tolist(), rows.bad_params.tolist()
        ([1, 1, 4, 4], [True, False])
    """

    def __init__(self, names: list[str], device: torch.device) -> None:
        self.names = names
        self.device = device
        #: zeros shaped like a row of norms, for :func:`step_ok` (made once, not per step)
        self.zeros = torch.zeros(len(names), device=device)
        #: the integer dtype the guard's drop pass views these gradients as, when they share one (set by the guard)
        self.int_view: torch.dtype | None = None
        self.steps: list[int] = []
        self.probes: list[Tensor] = []  # per step: finite exactly when its loss was (loss_probe)
        self.norms: list[Tensor] = []
        #: int64 ``[non-finite steps, dropped updates, first non-finite loss step, first non-finite gradient step]``
        #: (first steps :data:`NO_STEP` when none); ``None`` until the first fold after a read
        self.totals: Tensor | None = None
        #: per parameter: its gradient was non-finite at some folded step
        self.bad_params: Tensor | None = None

    def push(self, step: int, probe: Tensor, norms: Tensor | None) -> None:
        """Append one optimizer step (references only: no device work)."""
        self.steps.append(step)
        self.probes.append(probe)
        if norms is not None:
            self.norms.append(norms)

    def fold(self, grads_only: bool, dropping: bool) -> None:
        """Reduce the pending rows into the accumulators, on the device (no host read).

        Args:
            grads_only: a step is bad when its gradients are (DDP: the loss differs between ranks).
            dropping: the policy dropped the bad steps' updates (they count as skipped).
        """
        if not self.steps:
            return
        dev = self.device
        steps = host_to_device(self.steps, dev)
        # probes are losses of any float dtype (or marks): compared as float32 marks when the dtypes differ
        probes = [t if t.dtype == torch.float32 else loss_mark(t).float() for t in self.probes]
        loss_ok = torch.isfinite(torch.stack(probes).to(dev))
        if self.norms and self.names:
            finite = torch.isfinite(torch.stack(self.norms).to(dev))  # [rows, params]
            grad_ok = finite.all(dim=1)
            seen = ~finite.all(dim=0)
            self.bad_params = seen if self.bad_params is None else self.bad_params | seen
        else:
            grad_ok = torch.ones_like(loss_ok)
        bad = ~grad_ok if grads_only else ~(grad_ok & loss_ok)
        n_bad = bad.sum()
        now = torch.stack(
            [
                n_bad,
                n_bad if dropping else torch.zeros_like(n_bad),
                torch.where(loss_ok, NO_STEP, steps).amin(),
                torch.where(grad_ok, NO_STEP, steps).amin(),
            ]
        )
        if self.totals is not None:
            now = torch.cat([self.totals[:2] + now[:2], torch.minimum(self.totals[2:], now[2:])])
        self.totals = now
        self.steps, self.probes, self.norms = [], [], []

    def reset(self) -> None:
        """Forget the accumulators (after the host read that consumed them)."""
        self.totals = None
        self.bad_params = None


__all__ = ["FOLD_ROWS", "NO_STEP", "GuardRows", "loss_mark", "loss_probe", "step_ok"]
