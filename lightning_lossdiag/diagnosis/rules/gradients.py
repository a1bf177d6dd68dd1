"""Rules on gradients.

Codes: ``nonfinite_grad``, ``exploding_gradients``, ``vanishing_gradients``, ``dead_parameters``,
``clipping_saturated``.
"""

from __future__ import annotations

import math

from lightning_lossdiag.diagnosis.config import DoctorConfig
from lightning_lossdiag.diagnosis.findings import Finding
from lightning_lossdiag.diagnosis.record import RunRecord
from lightning_lossdiag.diagnosis.rules._common import finite, first_step, fmt, median, min_step, note_int, window

_NOT_LAYERS = ("root", "other")


def _names(value: object, limit: int = 6) -> tuple[list[str], str]:
    names = [str(n) for n in value] if isinstance(value, (list, tuple)) else []
    shown = ", ".join(f"`{n}`" for n in names[:limit])
    if len(names) > limit:
        shown += f" and {len(names) - limit} more"
    return names, shown


def nonfinite_grad(record: RunRecord, cfg: DoctorConfig) -> list[Finding]:
    """``nonfinite_grad``: a gradient was NaN or infinite (error); names the first step and the parameters.

    Example:
        >>> r = RunRecord()
        >>> r.notes.update({"grad/first_nonfinite_step": 7, "grad/nonfinite_params": ["fc.weight"]})
        >>> nonfinite_grad(r, DoctorConfig())[0].evidence["params"]
        ['fc.weight']
    """
    counts = record.series("grad/nonfinite_count")
    count = int(counts[-1][1]) if counts and math.isfinite(counts[-1][1]) else 0
    norm_step = first_step(record.series("grad/norm_total"), lambda v: not math.isfinite(v))
    noted = note_int(record, "grad/first_nonfinite_step")
    if noted is None and norm_step is None and count == 0:
        return []
    step = noted if noted is not None else min_step(norm_step, first_step(counts, lambda v: v > 0))
    names, shown = _names(record.notes.get("grad/nonfinite_params"))
    params = f" in {shown}" if names else ""
    loss_step = note_int(record, "loss/first_nonfinite_step")
    cause = (
        f" The loss was already non-finite at step {loss_step}; fix that first (see `nonfinite_loss`)."
        if loss_step is not None and step is not None and loss_step <= step
        else " The loss was finite, so the backward pass itself overflowed: look for exp/log/pow/division in the "
        "model or loss, an fp16 overflow, or a too large learning rate."
    )
    many = f" ({count} optimizer step(s) in all)" if count else ""
    msg = (
        f"Gradients were NaN or infinite, first at step {step}{many}{params}. A single non-finite gradient turns "
        f"the weights it touches into NaN at the next update.{cause} Try: gradient clipping, a lower lr, "
        '`LossDiagnostics(on_nonfinite="skip")` to drop such updates.'
    )
    evidence = {"first_step": step, "count": count, "params": names}
    return [Finding("nonfinite_grad", "error", msg, step, evidence)]


def _layer_medians(record: RunRecord, cfg: DoctorConfig) -> list[tuple[str, float]]:
    """Median recent norm of each layer group, in the order the monitor first wrote them (input side first)."""
    out = []
    for key in record.scalars:  # insertion order = model order
        if not key.startswith("grad/norm/") or key.rpartition("/")[2] in _NOT_LAYERS:
            continue
        values = [v for _, v in finite(record.series(key))]
        if values:
            out.append((key, median(values[-window(len(values), cfg.window_frac) :])))
    return out


def exploding_gradients(record: RunRecord, cfg: DoctorConfig) -> list[Finding]:
    """``exploding_gradients``: the total gradient norm grows, or early layers get far larger norms (warning).

    Fires when the total norm grew by ``grad_explode_growth`` to at least ``grad_explode_min_norm``, or when the
    first layer's norm is ``grad_depth_ratio`` times the last layer's.

    Example:
        >>> r = RunRecord()
        >>> for i in range(8):
        ...     r.add_scalars(i, {"grad/norm_total": 10.0 ** i})
        >>> exploding_gradients(r, DoctorConfig())[0].code
        'exploding_gradients'
    """
    out = []
    points = finite(record.series("grad/norm_total"))
    if len(points) >= cfg.min_points:
        values = [v for _, v in points]
        w = window(len(values), cfg.window_frac)
        early, recent = median(values[:w]), median(values[-w:])
        if recent >= cfg.grad_explode_min_norm and recent >= cfg.grad_explode_growth * max(early, 1e-12):
            step = first_step(points, lambda v: v >= early * math.sqrt(cfg.grad_explode_growth))
            msg = (
                f"The total gradient norm (pre-clip) grew from {fmt(early)} to {fmt(recent)} "
                f"({fmt(recent / max(early, 1e-12))}x; median of the first and last {w} flushes). Growing gradients "
                "make updates ever larger until the loss diverges or turns NaN. Try: gradient clipping "
                "(`gradient_clip_val=1.0`), a lower lr or a warm-up, normalisation layers, a smaller init scale."
            )
            out.append(Finding("exploding_gradients", "warning", msg, step, {"early": early, "recent": recent}))
    layers = _layer_medians(record, cfg)
    if len(layers) >= 2:
        (first_key, first), (last_key, last) = layers[0], layers[-1]
        if last > 0 and first / last > cfg.grad_depth_ratio:
            msg = (
                f"The first layer's gradient norm ({first_key} = {fmt(first)}) is {fmt(first / last)}x the last "
                f"layer's ({last_key} = {fmt(last)}): gradients grow on their way back through the network, so the "
                "early layers take huge steps. Try: normalisation layers (LayerNorm/BatchNorm), residual "
                "connections, a smaller init scale, gradient clipping."
            )
            evidence = {"first_layer": first_key, "first": first, "last_layer": last_key, "last": last}
            out.append(Finding("exploding_gradients", "warning", msg, record.series(first_key)[-1][0], evidence))
    return out


def vanishing_gradients(record: RunRecord, cfg: DoctorConfig) -> list[Finding]:
    """``vanishing_gradients``: the first layer's gradient norm is tiny next to the last layer's (warning).

    Example:
        >>> r = RunRecord()
        >>> r.add_scalars(10, {"grad/norm/0": 1e-7, "grad/norm/4": 0.5})
        >>> vanishing_gradients(r, DoctorConfig())[0].code
        'vanishing_gradients'
    """
    layers = _layer_medians(record, cfg)
    if len(layers) < 2:
        return []
    (first_key, first), (last_key, last) = layers[0], layers[-1]
    if last <= 0 or first / last >= 1.0 / cfg.grad_depth_ratio:
        return []
    msg = (
        f"The first layer's gradient norm ({first_key} = {fmt(first)}) is only {fmt(first / last)} of the last "
        f"layer's ({last_key} = {fmt(last)}): the signal fades on its way back, so the early layers barely learn. "
        "Try: ReLU/GELU instead of sigmoid/tanh, residual connections, normalisation layers, He/Xavier init, a "
        "shallower network."
    )
    evidence = {"first_layer": first_key, "first": first, "last_layer": last_key, "last": last}
    return [Finding("vanishing_gradients", "warning", msg, record.series(first_key)[-1][0], evidence)]


def dead_parameters(record: RunRecord, cfg: DoctorConfig) -> list[Finding]:
    """``dead_parameters``: trainable parameters that never received a gradient (warning).

    Example:
        >>> r = RunRecord()
        >>> r.notes["grad/dead_params"] = ["head2.weight"]
        >>> dead_parameters(r, DoctorConfig())[0].evidence["params"]
        ['head2.weight']
    """
    names, shown = _names(record.notes.get("grad/dead_params"))
    if not names:
        return []
    msg = (
        f"{len(names)} trainable parameter(s) never received a gradient: {shown}. They are not used in the loss "
        "(an unused head or layer, a branch cut by `.detach()` or `torch.no_grad()`, or an output not passed to the "
        "loss), so they waste memory and may hide a bug; under DDP they need `find_unused_parameters=True`. Try: "
        "check the forward pass uses them, or freeze them with `requires_grad_(False)`."
    )
    return [Finding("dead_parameters", "warning", msg, None, {"params": names})]


def clipping_saturated(record: RunRecord, cfg: DoctorConfig) -> list[Finding]:
    """``clipping_saturated``: gradient clipping acted on nearly every step for most of the run (warning).

    Example:
        >>> r = RunRecord()
        >>> for s in range(1, 9):
        ...     r.add_scalars(s * 10, {"grad/clip_rate": 1.0, "grad/norm_total": 40.0})
        >>> clipping_saturated(r, DoctorConfig())[0].code
        'clipping_saturated'
    """
    points = finite(record.series("grad/clip_rate"))
    if len(points) < cfg.clip_min_flushes:
        return []
    saturated = [s for s, v in points if v > cfg.clip_rate]
    share = len(saturated) / len(points)
    if share < cfg.clip_share:
        return []
    clip = record.notes.get("grad/clip") or {}
    clip_val = clip.get("val") if isinstance(clip, dict) else None
    norms = [v for _, v in finite(record.series("grad/norm_total"))]
    norm = median(norms) if norms else None
    detail = f" (median pre-clip norm {fmt(norm)} vs clip value {fmt(clip_val)})" if norm and clip_val else ""
    msg = (
        f"Gradient clipping changed the gradients on more than {fmt(cfg.clip_rate * 100)}% of the steps in "
        f"{len(saturated)} of {len(points)} flushes{detail}. Clipping that always acts turns the optimizer into "
        "sign-like fixed-length steps: the clip value is too low for this model, or the lr is too high and keeps "
        "gradients large. Try: raise `gradient_clip_val` to about the typical pre-clip norm, or lower the lr."
    )
    evidence = {"saturated_flushes": len(saturated), "flushes": len(points), "clip_val": clip_val, "median_norm": norm}
    return [Finding("clipping_saturated", "warning", msg, saturated[0], evidence)]


RULES = (nonfinite_grad, exploding_gradients, vanishing_gradients, dead_parameters, clipping_saturated)
