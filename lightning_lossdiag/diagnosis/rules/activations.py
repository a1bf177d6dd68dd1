"""Rules on activations: ``dead_units`` and ``saturated_activations`` (sustained over several flushes)."""

from __future__ import annotations

from lightning_lossdiag.diagnosis.config import DoctorConfig
from lightning_lossdiag.diagnosis.findings import Finding
from lightning_lossdiag.diagnosis.record import RunRecord
from lightning_lossdiag.diagnosis.rules._common import finite, fmt


def sustained_layers(record: RunRecord, prefix: str, threshold: float, flushes: int) -> list[tuple[str, float, int]]:
    """Layers whose ``prefix<layer>`` value exceeded ``threshold`` at each of the last ``flushes`` flushes.

    Returns ``(layer, last value, first step of the run of high values)``, worst first.

    Example:
        >>> r = RunRecord()
        >>> for s in (10, 20, 30):
        ...     r.add_scalars(s, {"act/dead_frac/fc1": 0.8, "act/dead_frac/fc2": 0.1})
        >>> sustained_layers(r, "act/dead_frac/", 0.5, 3)
        [('fc1', 0.8, 10)]
    """
    out = []
    for key in record.keys(prefix):
        points = finite(record.series(key))
        if len(points) < max(1, flushes) or not all(v > threshold for _, v in points[-flushes:]):
            continue
        start = len(points) - flushes
        while start > 0 and points[start - 1][1] > threshold:
            start -= 1
        out.append((key[len(prefix) :], points[-1][1], points[start][0]))
    return sorted(out, key=lambda x: -x[1])


def _layers_text(layers: list[tuple[str, float, int]], limit: int = 5) -> str:
    text = ", ".join(f"`{name}` ({fmt(v * 100)}%)" for name, v, _ in layers[:limit])
    return text + (f" and {len(layers) - limit} more" if len(layers) > limit else "")


def dead_units(record: RunRecord, cfg: DoctorConfig) -> list[Finding]:
    """``dead_units``: layers where most units output zero for every input of the flush batch, flush after flush."""
    layers = sustained_layers(record, "act/dead_frac/", cfg.dead_frac, cfg.activation_flushes)
    if not layers:
        return []
    msg = (
        f"Dead units (zero on every input of the batch) in {_layers_text(layers)} at each of the last "
        f"{cfg.activation_flushes} flushes. A dead ReLU unit gets no gradient and never recovers, so the layer "
        "loses capacity. Try: a lower lr, LeakyReLU/GELU, He init, normalisation before the activation, and check "
        "for large negative biases."
    )
    evidence = {"layers": {name: v for name, v, _ in layers}, "threshold": cfg.dead_frac}
    return [Finding("dead_units", "warning", msg, min(s for _, _, s in layers), evidence)]


def saturated_activations(record: RunRecord, cfg: DoctorConfig) -> list[Finding]:
    """``saturated_activations``: layers whose activations sit in the flat tails of sigmoid/tanh, flush after flush."""
    layers = sustained_layers(record, "act/saturated_frac/", cfg.saturated_frac, cfg.activation_flushes)
    if not layers:
        return []
    msg = (
        f"Saturated activations (in the flat tails of sigmoid/tanh, where the gradient is ~0) in "
        f"{_layers_text(layers)} at each of the last {cfg.activation_flushes} flushes. Saturated units pass almost "
        "no gradient back, so the layers before them stop learning. Try: normalise the inputs, a smaller init "
        "scale or lr, LayerNorm/BatchNorm before the activation, or ReLU/GELU."
    )
    evidence = {"layers": {name: v for name, v, _ in layers}, "threshold": cfg.saturated_frac}
    return [Finding("saturated_activations", "warning", msg, min(s for _, _, s in layers), evidence)]


RULES = (dead_units, saturated_activations)
