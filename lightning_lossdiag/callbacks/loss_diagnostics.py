"""``LossDiagnostics``: the one callback most users add. It bundles every monitor with sane defaults."""

from __future__ import annotations

import difflib
import importlib
import inspect
from collections.abc import Callable, Mapping
from typing import Any, Literal

from lightning.pytorch import Callback

from lightning_lossdiag.callbacks._base import warn_no_logger_once
from lightning_lossdiag.callbacks._faults import check_log_dirs_writable, explain_log_dir_error
from lightning_lossdiag.dashboards.layout import BASE_LAYOUT, merge_entries, write_layout
from lightning_lossdiag.dashboards.writers import tensorboard_writers

PartOption = bool | Mapping[str, Any] | None

#: part name -> (module, class); order matters: the Doctor comes last so it sees what the others wrote, and the
#: non-finite guard comes after the gradient monitor so the monitor sees a bad gradient before it is dropped.
_PARTS: dict[str, tuple[str, str]] = {
    "loss": ("lightning_lossdiag.callbacks.loss_monitor", "LossMonitor"),
    "gradients": ("lightning_lossdiag.callbacks.gradient_monitor", "GradientMonitor"),
    "scheduler": ("lightning_lossdiag.callbacks.scheduler_monitor", "SchedulerMonitor"),
    "activations": ("lightning_lossdiag.callbacks.activation_monitor", "ActivationMonitor"),
    "amp": ("lightning_lossdiag.callbacks.amp_monitor", "AmpMonitor"),
    "errors": ("lightning_lossdiag.callbacks.error_distribution", "ErrorDistributionMonitor"),
    "metrics": ("lightning_lossdiag.callbacks.metric_curves", "MetricCurves"),
    "nonfinite": ("lightning_lossdiag.callbacks.nonfinite_guard", "NonFiniteGuard"),
    "doctor": ("lightning_lossdiag.callbacks.doctor", "Doctor"),
}
_FLUSHING_PARTS = ("loss", "gradients", "scheduler", "activations", "amp", "nonfinite")
_NONFINITE_POLICIES = ("warn", "skip", "stop", "raise")

_HOOKS: tuple[str, ...] = tuple(
    name
    for name, value in vars(Callback).items()
    if callable(value) and not name.startswith("_") and name not in ("state_dict", "load_state_dict")
)


def _overrides(part: Callback, hook: str) -> bool:
    return getattr(type(part), hook) is not getattr(Callback, hook)


def _build_part(name: str, option: PartOption, every_n_steps: int | None) -> Callback | None:
    """Construct one part from its option: False/None -> off, True -> defaults, mapping -> keyword arguments."""
    if option is False or option is None:
        return None
    if option is not True and not isinstance(option, Mapping):
        raise ValueError(f"`{name}` must be True, False or a mapping of options for {_PARTS[name][1]}, got {option!r}")
    kwargs = dict(option) if isinstance(option, Mapping) else {}
    if every_n_steps is not None and name in _FLUSHING_PARTS:
        kwargs.setdefault("every_n_steps", every_n_steps)
    module_name, class_name = _PARTS[name]
    cls = getattr(importlib.import_module(module_name), class_name)
    allowed = [p for p in inspect.signature(cls).parameters if p not in ("self", "args", "kwargs")]
    unknown = [key for key in kwargs if key not in allowed]
    if unknown:
        close = difflib.get_close_matches(unknown[0], allowed, n=1)
        hint = f"; did you mean {close[0]!r}?" if close else "."
        raise ValueError(f"`{name}` has no option {unknown[0]!r}{hint} {class_name} takes: {', '.join(allowed)}")
    try:
        return cls(**kwargs)  # type: ignore[no-any-return]
    except TypeError as err:
        raise ValueError(f"`{name}` options for {class_name} are invalid: {err}") from err


class LossDiagnostics(Callback):
    """Every lightning-lossdiag monitor in one callback, with sane defaults.

    ``Trainer(callbacks=[LossDiagnostics()])`` is all most users need. Each part can be turned off (``False``) or
    configured with a mapping of its options, in Python or in YAML under ``trainer.callbacks``:

    .. code-block:: yaml

        trainer:
          callbacks:
            - class_path: lightning_lossdiag.LossDiagnostics
              init_args:
                gradients: {depth: 2}
                activations: false
                on_nonfinite: skip

    Args:
        loss: :class:`~lightning_lossdiag.LossMonitor` options (per-step loss, EMA, spikes, non-finite count).
        gradients: :class:`~lightning_lossdiag.GradientMonitor` options (norms, clipping).
        scheduler: :class:`~lightning_lossdiag.SchedulerMonitor` options (learning rate, ReduceLROnPlateau state).
        activations: :class:`~lightning_lossdiag.ActivationMonitor` options (flush steps only).
        amp: :class:`~lightning_lossdiag.AmpMonitor` options (fp16 loss scale and the steps the scaler skipped).
        errors: :class:`~lightning_lossdiag.ErrorDistributionMonitor` options (residuals, confusion, PR, worst).
        metrics: :class:`~lightning_lossdiag.MetricCurves` options (torchmetrics for train and val).
        doctor: :class:`~lightning_lossdiag.Doctor` options (findings and the end-of-fit report).
        on_nonfinite: what to do when a loss or gradient is NaN/inf: ``"skip"`` (default: drop that update on the
            device, no host read, so the weights and checkpoints stay finite; the run goes on), ``"warn"`` (only
            record it: the update is applied and the weights turn NaN), ``"stop"`` (skip, then save a checkpoint and
            stop at the next flush), ``"raise"`` (check every step; costs one host synchronisation per step).
        every_n_steps: flush interval for every part (default: the Trainer's ``log_every_n_steps``).

    Logged keys: the union of the parts' keys (see each part's docstring and the README):

    ==========================================  =========================================
    key                                         written by
    ==========================================  =========================================
    ``train/loss``, ``train/loss_ema``, ...     LossMonitor (flush)
    ``grad/norm_total``, ``grad/norm/<layer>``  GradientMonitor (flush)
    ``lr/<optimizer>/<group>``, ``plateau/*``   SchedulerMonitor (flush, scheduler step)
    ``act/<stat>/<layer>``, ``act/hist/*``      ActivationMonitor (flush, epoch end)
    ``amp/scale``, ``amp/skipped_steps``        AmpMonitor (flush; fp16 with a GradScaler)
    ``errors/<stage>/*``                        ErrorDistributionMonitor (epoch end)
    ``metrics/<stage>/<name>``                  MetricCurves (epoch end)
    ``nonfinite/skipped_steps``                 NonFiniteGuard (flush; "skip" and "stop")
    ``diagnosis``                               Doctor (end of fit)
    ``final/*``, ``best/*``, ``findings/*``     Doctor (end of fit: the HParams session)
    ==========================================  =========================================

    It also writes a TensorBoard custom-scalars layout at fit start (train/val loss together, pre/post-clip norm with
    the clip value, learning rate with the plateau counters, train/val of each metric), and its Doctor writes the
    run's HParams session at the end of fit into the sub-run ``lossdiag_hparams`` (hyperparameters, final and best
    metrics, finding counts; see :mod:`lightning_lossdiag.dashboards.hparams`).

    Example:
        >>> diag = LossDiagnostics(activations=False, gradients={"depth": 2})
        >>> sorted(diag.parts)[:3]
        ['amp', 'doctor', 'errors']
    """

    def __init__(
        self,
        loss: PartOption = True,
        gradients: PartOption = True,
        scheduler: PartOption = True,
        activations: PartOption = True,
        amp: PartOption = True,
        errors: PartOption = True,
        metrics: PartOption = True,
        doctor: PartOption = True,
        on_nonfinite: Literal["warn", "skip", "stop", "raise"] = "skip",
        every_n_steps: int | None = None,
    ) -> None:
        if on_nonfinite not in _NONFINITE_POLICIES:
            raise ValueError(f"`on_nonfinite` must be one of {_NONFINITE_POLICIES}, got {on_nonfinite!r}")
        if every_n_steps is not None and (not isinstance(every_n_steps, int) or every_n_steps < 1):
            raise ValueError(f"`every_n_steps` must be a positive integer or None, got {every_n_steps!r}")
        options: dict[str, PartOption] = {
            "loss": loss,
            "gradients": gradients,
            "scheduler": scheduler,
            "activations": activations,
            "amp": amp,
            "errors": errors,
            "metrics": metrics,
            # "warn" needs no guard: the monitors count non-finite values on the device and the Doctor reports them.
            "nonfinite": {"policy": on_nonfinite} if on_nonfinite != "warn" else False,
            "doctor": doctor,
        }
        self.on_nonfinite = on_nonfinite
        self.every_n_steps = every_n_steps
        self.parts: dict[str, Callback] = {}
        for name in _PARTS:
            part = _build_part(name, options[name], every_n_steps)
            if part is not None:
                self.parts[name] = part
        if "nonfinite" in self.parts and "gradients" in self.parts:  # the guard reuses the monitor's norms
            self.parts["nonfinite"].norm_source = self.parts["gradients"]  # type: ignore[attr-defined]
            self.parts["gradients"].shares_latest = True  # type: ignore[attr-defined]
        self._dispatch: dict[str, list[Callable[..., Any]]] = {}
        self._build_dispatch()

    def _build_dispatch(self) -> None:
        # Only parts that override a hook are called for it: the per-step cost of the bundle is what the parts do.
        self._dispatch = {
            hook: [getattr(p, hook) for p in self.parts.values() if _overrides(p, hook)] for hook in _HOOKS
        }

    @property
    def writes_train_loss(self) -> bool:
        """True when the loss monitor is on: it writes ``train/loss`` at flushes (the LossMixin then doesn't)."""
        return "loss" in self.parts

    @property
    def findings(self) -> list[Any]:
        """The Doctor's findings of the last fit/validate/test (empty when the Doctor is off)."""
        doctor = self.parts.get("doctor")
        return list(getattr(doctor, "findings", []))

    def layout_entries(self) -> dict[str, list[str]]:
        """Custom-scalars charts of the bundle and its parts (title -> tag regexes)."""
        extra = [p.layout_entries() for p in self.parts.values() if hasattr(p, "layout_entries")]
        return merge_entries(BASE_LAYOUT, *extra)

    def setup(self, trainer: Any, pl_module: Any, stage: str) -> None:
        """Fail before the first step if a logger's folder cannot be written, then set up every part."""
        check_log_dirs_writable(trainer)
        for hook in self._dispatch["setup"]:
            hook(trainer, pl_module, stage)

    def on_exception(self, trainer: Any, pl_module: Any, exception: BaseException) -> None:
        """Explain an unwritable log folder on Lightning's own error, then let every part see the exception."""
        explain_log_dir_error(trainer, exception)
        for hook in self._dispatch["on_exception"]:
            hook(trainer, pl_module, exception)

    def on_fit_start(self, trainer: Any, pl_module: Any) -> None:
        """Warn once if there is no logger, write the custom-scalars layout, then start every part."""
        warn_no_logger_once(trainer, "LossDiagnostics")
        write_layout(tensorboard_writers(trainer), self.layout_entries())
        for hook in self._dispatch["on_fit_start"]:
            hook(trainer, pl_module)

    def state_dict(self) -> dict[str, Any]:
        """Each part's state under its part name."""
        return {name: part.state_dict() for name, part in self.parts.items()}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore each part present in ``state_dict`` (parts missing from an older checkpoint keep defaults)."""
        for name, part in self.parts.items():
            if name in state_dict:
                part.load_state_dict(state_dict[name])

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state["_dispatch"] = {}  # bound methods are rebuilt after unpickling
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._build_dispatch()


def _make_forwarder(hook: str) -> Callable[..., None]:
    def forward(self: LossDiagnostics, *args: Any, **kwargs: Any) -> None:
        for fn in self._dispatch[hook]:
            fn(*args, **kwargs)

    forward.__name__ = hook
    forward.__qualname__ = f"LossDiagnostics.{hook}"
    forward.__doc__ = f"Forward ``{hook}`` to every part that implements it."
    return forward


for _hook in _HOOKS:
    if _hook not in vars(LossDiagnostics):
        setattr(LossDiagnostics, _hook, _make_forwarder(_hook))
