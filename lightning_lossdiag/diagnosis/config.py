"""Thresholds of the diagnosis rules, in one dataclass with documented defaults.

Every number a rule compares against lives here, so a user can tune the diagnosis from YAML
(``Doctor(config={"plateau_epochs": 10})``) without touching the rules.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict, dataclass, fields
from typing import Any


@dataclass
class DoctorConfig:
    """Thresholds of the diagnosis. Defaults are chosen so that a healthy run gets no warning.

    Attributes:
        min_points: fewest flush points a trend rule needs (loss divergence, exploding gradients).
        window_frac: share of a series that forms the "recent" window of trend rules (at least 3 points).
        diverge_factor: the loss diverges when its recent median exceeds its best smoothed value by this factor...
        diverge_min_rise: ...and the rise is at least this share of the improvement made before the best...
            (and, like every trend rule, the rise must stand ``noise_k`` standard errors above the noise).
        noise_k: how many standard errors of the noise a change must exceed before a trend rule (``overfitting``,
            ``plateau``, ``loss_diverging``) calls it real. The noise of a series is the standard deviation of one
            point around its local trend, estimated from the series itself (second differences over its last
            ``noise_window`` points or more; see ``rules._common.noise_sd``): the spread of the validation loss
            across evaluations, or of the flushed training loss across flushes. 3 keeps healthy runs quiet.
        noise_window: fewest recent points of a series over which its noise is estimated (at least 4); a rule
            widens it to cover the stretch it judges.
        spike_warn_count: loss spikes below this count are ``info``; this many or more are a ``warning``.
        grad_explode_growth: recent median of ``grad/norm_total`` over its early median that counts as exploding.
        grad_explode_min_norm: ... and the recent median must also be at least this large.
        grad_depth_ratio: first layer's gradient norm over the last layer's above this is ``exploding_gradients``
            and below its inverse is ``vanishing_gradients`` (medians over the recent window).
        clip_rate: a flush whose ``grad/clip_rate`` is above this counts as saturated.
        clip_share: ``clipping_saturated`` when at least this share of the flushes are saturated...
        clip_min_flushes: ...over at least this many flushes.
        plateau_epochs: evaluations without a new best beyond the noise that make a ``plateau``: the last this
            many stay within ``noise_k`` noise (and ``plateau_rel_improvement``) of the best value before them. It is
            ``info`` when the loss fell clearly before (a run converged to its noise floor; the message advises
            stopping earlier, not a larger model) and a ``warning`` when the loss never fell clearly, the training
            loss neither, or the values stopped changing at all (the weights no longer move).
        plateau_rel_improvement: relative improvement of the best value that still counts as progress (the noise
            counts too: an improvement must also exceed ``noise_k`` noise).
        overfit_epochs: evaluations since the best validation loss that make ``overfitting``...
        overfit_rel_rise: ...when the validation loss (median of the last 3 evaluations) is this much (relative)
            above the best one, and by ``noise_k`` times its noise across evaluations...
        overfit_train_drop: ...and the training loss fell by at least this share over the same evaluations. The
            message says "memorising" only when the training loss fell by more than ``noise_k`` times its own noise.
        overfit_acc_tolerance: when the validation accuracy (``metrics/val/accuracy``, ``val_acc``, ...) stayed
            within this (absolute, or ``noise_k`` times its noise if larger) of its value at the best loss, the rise
            of the loss is over-confidence, not memorisation: ``overfitting`` is ``info`` and says so, and it is
            left to ``overconfident`` when that finding stands.
        imbalance_share: ``class_imbalance`` when the smallest class holds less than this share of the samples
            (two classes; with ``C`` classes, less than ``imbalance_share * 2 / C``: the even share is ``1 / C``)...
        imbalance_p: ...and counts at least as uneven (Pearson's chi-square test), or a class as rare as the
            smallest, would come by chance less often than this if every class were equally likely. Few samples over
            many classes leave most classes empty by chance (64 samples over 1,000 classes: ~938 empty), which says
            nothing about imbalance.
        recall_zero: a minority-class recall at or below this counts as "never predicted".
        majority_share_one: a share of predictions in the majority class at or above this counts as "always".
        constant_pred_std: prediction std over target std (``errors/<stage>/target_std`` logged), or std of the
            predicted probabilities (classification; with ``C > 2`` classes, whose probabilities average ``1 / C``,
            this times ``2 / C``), at or below this counts as constant predictions.
        constant_pred_std_abs: regression without a logged target std: prediction std at or below this counts.
        metric_ratio_tolerance: relative tolerance around 100 and 0.01 for ``metric_scale_mismatch``.
        metric_complement_tolerance: absolute tolerance of "user value == 1 - ours".
        metric_min_value: our metric must be at least this for a ratio to be meaningful.
        dead_frac: ``act/dead_frac/<layer>`` above this is a dead layer...
        saturated_frac: ``act/saturated_frac/<layer>`` above this is a saturated layer...
        activation_flushes: ...when it holds for each of the last this many flushes.
        amp_min_scale: ``amp_scale_collapse`` when the fp16 loss scale falls below this...
        amp_skip_share: ...or when the GradScaler skipped at least this share of the steps in the second half.
        ece_min: ``overconfident``/``underconfident`` need an ECE of at least this...
        ece_noise_factor: ...and this many times the ECE a calibrated model shows on as many samples (1.2 / sqrt(N)).

    Example:
        >>> cfg = DoctorConfig.from_value({"plateau_epochs": 10})
        >>> cfg.plateau_epochs, cfg.overfit_epochs
        (10, 3)
    """

    min_points: int = 6
    window_frac: float = 0.25
    diverge_factor: float = 2.0
    diverge_min_rise: float = 0.25
    noise_k: float = 3.0
    noise_window: int = 12
    spike_warn_count: int = 3
    grad_explode_growth: float = 100.0
    grad_explode_min_norm: float = 10.0
    grad_depth_ratio: float = 1000.0
    clip_rate: float = 0.9
    clip_share: float = 0.8
    clip_min_flushes: int = 5
    plateau_epochs: int = 5
    plateau_rel_improvement: float = 1e-3
    overfit_epochs: int = 3
    overfit_rel_rise: float = 0.02
    overfit_train_drop: float = 0.0
    overfit_acc_tolerance: float = 0.01
    imbalance_share: float = 0.1
    imbalance_p: float = 1e-5
    recall_zero: float = 0.05
    majority_share_one: float = 0.99
    constant_pred_std: float = 1e-3
    constant_pred_std_abs: float = 1e-6
    metric_ratio_tolerance: float = 0.15
    metric_complement_tolerance: float = 0.01
    metric_min_value: float = 0.05
    dead_frac: float = 0.5
    saturated_frac: float = 0.5
    activation_flushes: int = 3
    amp_min_scale: float = 1.0
    amp_skip_share: float = 0.5
    ece_min: float = 0.05
    ece_noise_factor: float = 3.0

    def __post_init__(self) -> None:
        for f in fields(self):
            value = getattr(self, f.name)
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise ValueError(f"`{f.name}` must be a number, got {value!r}")
            if f.type in ("int", int) and not isinstance(value, int):
                raise ValueError(f"`{f.name}` must be an integer, got {value!r}")
            if value < 0:
                raise ValueError(f"`{f.name}` must be >= 0, got {value!r}")
        for name in (
            "window_frac",
            "clip_rate",
            "clip_share",
            "imbalance_share",
            "imbalance_p",
            "dead_frac",
            "saturated_frac",
            "amp_skip_share",
        ):
            if getattr(self, name) > 1:
                raise ValueError(f"`{name}` must be in [0, 1], got {getattr(self, name)!r}")
        if self.noise_window < 4:
            raise ValueError(f"`noise_window` must be >= 4, got {self.noise_window!r}")

    @classmethod
    def from_value(cls, value: DoctorConfig | Mapping[str, Any] | None) -> DoctorConfig:
        """Accept a config, a mapping of field overrides (unknown keys are an error) or ``None`` (defaults)."""
        if value is None:
            return cls()
        if isinstance(value, DoctorConfig):
            return value
        if not isinstance(value, Mapping):
            raise ValueError(f"`config` must be a DoctorConfig, a mapping or None, got {type(value).__name__}")
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(value) - known)
        if unknown:
            raise ValueError(f"`config` has unknown keys {unknown}; allowed keys are {sorted(known)}")
        return cls(**dict(value))

    def to_dict(self) -> dict[str, Any]:
        """Plain data (for the JSON report)."""
        return asdict(self)
