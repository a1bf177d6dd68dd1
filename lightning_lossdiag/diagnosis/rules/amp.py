"""Rules on fp16 loss scaling: ``amp_scale_collapse``.

Reads ``amp/scale`` and ``amp/skipped_steps`` (written at flushes by ``AmpMonitor`` when a ``GradScaler`` runs). A
few skipped steps while the scale settles are the scaler's normal work and are not reported.
"""

from __future__ import annotations

from lightning_lossdiag.diagnosis.config import DoctorConfig
from lightning_lossdiag.diagnosis.findings import Finding
from lightning_lossdiag.diagnosis.record import RunRecord
from lightning_lossdiag.diagnosis.rules._common import fmt


def amp_scale_collapse(record: RunRecord, cfg: DoctorConfig) -> list[Finding]:
    """``amp_scale_collapse``: the fp16 loss scale fell below ``amp_min_scale``, or the scaler kept skipping steps.

    Fires (warning) when the last logged scale is below ``amp_min_scale`` (the gradients overflow fp16 even without
    scaling), or when the scaler skipped at least ``amp_skip_share`` of the optimizer steps between the middle
    flush and the last one (it is still halving the scale instead of settling).

    Example:
        >>> r = RunRecord()
        >>> for step, scale, skipped in [(10, 2.0**-2, 9), (20, 2.0**-12, 19), (30, 2.0**-22, 29)]:
        ...     r.add_scalars(step, {"amp/scale": scale, "amp/skipped_steps": skipped})
        >>> [(f.code, f.severity) for f in amp_scale_collapse(r, DoctorConfig())]
        [('amp_scale_collapse', 'warning')]
    """
    scales = record.series("amp/scale")
    skipped = dict(record.series("amp/skipped_steps"))
    if not scales:
        return []
    steps = [s for s, _ in scales]
    last_step, last_scale = scales[-1]
    mid_step = steps[len(steps) // 2] if len(steps) > 1 else 0
    late = skipped.get(last_step, 0.0) - (skipped.get(mid_step, 0.0) if mid_step else 0.0)
    window = max(1, last_step - mid_step)
    share = late / window
    if last_scale >= cfg.amp_min_scale and share < cfg.amp_skip_share:
        return []
    total = skipped.get(last_step, 0.0)
    msg = (
        f"The fp16 loss scale is {fmt(last_scale)} at step {last_step} and the GradScaler skipped "
        f"{int(late)} of the {window} optimizer steps since step {mid_step} ({fmt(share * 100)}%; "
        f"{int(total)} in all). A skipped step applies no update; a scale that keeps halving means the gradients "
        "overflow fp16 whatever the scale, so the model barely trains. Look for a loss far from 1 (an unnormalised "
        "sum, a huge weight), a log or a division of zero in the forward pass, or a learning rate that blew up; or "
        "train with bf16-mixed, which needs no loss scaling."
    )
    evidence = {"scale": last_scale, "step": last_step, "skipped_late": late, "window": window, "skipped": total}
    return [Finding("amp_scale_collapse", "warning", msg, last_step, evidence)]


RULES = (amp_scale_collapse,)
