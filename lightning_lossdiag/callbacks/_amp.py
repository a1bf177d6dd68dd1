"""fp16 loss scaling as the Trainer runs it: the ``GradScaler`` and its verdict on the current step, on the device.

Lightning's ``MixedPrecision`` plugin (``precision="16-mixed"``) unscales the gradients before
``on_before_optimizer_step``; ``torch.amp.GradScaler.unscale_`` leaves its verdict in the optimizer's entry of the
scaler's per-optimizer state (``found_inf_per_device``: a 0/1 tensor per device) and keeps the scale as a device
tensor. Both are read here as tensors: no host read (``GradScaler.get_scale()`` would read the host). The scaler then
skips ``optimizer.step()`` when the verdict is 1 and lowers the scale; that is its normal work, not a fault.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor


def grad_scaler(trainer: Any) -> Any | None:
    """The ``GradScaler`` of the Trainer's precision plugin when it scales the loss (fp16), else ``None``.

    Example:
        >>> from types import SimpleNamespace
        >>> scaler = torch.amp.GradScaler("cpu")
        >>> grad_scaler(SimpleNamespace(precision_plugin=SimpleNamespace(scaler=scaler))) is scaler
        True
        >>> grad_scaler(SimpleNamespace(precision_plugin=SimpleNamespace())) is None
        True
    """
    scaler = getattr(getattr(trainer, "precision_plugin", None), "scaler", None)
    if scaler is None or not getattr(scaler, "is_enabled", lambda: False)():
        return None
    return scaler


def scaler_found_inf(scaler: Any, optimizer: Any) -> Tensor | None:
    """1.0 when the scaler found a NaN/inf gradient in ``optimizer``'s unscaled gradients (it will skip the step).

    A 0-d float tensor on the gradients' device (the sum over devices, clamped to 1), or ``None`` when the scaler
    has not unscaled this optimizer's gradients (nothing to say). No host read. With one device it is the scaler's
    own flag (``unscale_`` writes exactly ``0.0`` or ``1.0`` into a tensor it makes for this step): no kernel, and
    callers must not modify it (the scaler reads it to decide whether to step).

    Example:
        >>> weight = torch.nn.Parameter(torch.ones(2))
        >>> opt = torch.optim.SGD([weight], lr=0.1)
        >>> scaler = torch.amp.GradScaler("cpu", init_scale=2.0)
        >>> scaler.scale(weight.sum() * float("inf")).backward()
        >>> scaler.unscale_(opt)
        >>> scaler_found_inf(scaler, opt)
        tensor(1.)
    """
    if scaler is None:
        return None
    opt = getattr(optimizer, "_optimizer", optimizer)
    states = getattr(scaler, "_per_optimizer_states", None)
    state = states.get(id(opt)) if isinstance(states, dict) else None
    found = state.get("found_inf_per_device") if isinstance(state, dict) else None
    if not found:
        return None
    values = list(found.values())
    if len(values) == 1 and values[0].dtype == torch.float32:
        return values[0]  # already 0.0 or 1.0: no clamp (one kernel less a step)
    device = values[0].device
    total = values[0].float() if len(values) == 1 else torch.stack([v.to(device).float() for v in values]).sum()
    return total.clamp(max=1.0)


def scaler_skip_mask(scaler: Any, optimizer: Any) -> Tensor | None:
    """A 0-d bool device tensor, True when the scaler will skip ``optimizer``'s step (``None``: nothing to say).

    What ``masked_fill_`` takes to zero a step's norms in one kernel (``torch.where`` against a tensor of zeros
    takes three). No host read.

    Example:
        >>> weight = torch.nn.Parameter(torch.ones(2))
        >>> opt = torch.optim.SGD([weight], lr=0.1)
        >>> scaler = torch.amp.GradScaler("cpu", init_scale=2.0)
        >>> scaler.scale(weight.sum() * float("nan")).backward()
        >>> scaler.unscale_(opt)
        >>> torch.tensor([3.0, 4.0]).masked_fill_(scaler_skip_mask(scaler, opt), 0.0)
        tensor([0., 0.])
    """
    found = scaler_found_inf(scaler, optimizer)
    return None if found is None else found > 0


def scaler_scale(scaler: Any) -> Tensor | None:
    """The current loss scale as a device tensor (``None`` before the first scaled backward). No host read."""
    scale = getattr(scaler, "_scale", None)
    return scale.reshape(()) if isinstance(scale, Tensor) else None


__all__ = ["grad_scaler", "scaler_found_inf", "scaler_scale", "scaler_skip_mask"]
