"""Edges of the rules the noise work touched: each fires just past its threshold and stays quiet just short of it.

The ``metric_scale_mismatch`` cases were checked against mutations of the rule (the 0.5 guard of the complement
dropped, a tie of kinds made to fire, the "hundredth" tolerance widened tenfold): each mutation fails a test here.
"""

import random

import pytest

from lightning_lossdiag.diagnosis.config import DoctorConfig
from lightning_lossdiag.diagnosis.record import RunRecord
from lightning_lossdiag.diagnosis.rules.fit import overfitting, plateau
from lightning_lossdiag.diagnosis.rules.loss import loss_diverging
from lightning_lossdiag.diagnosis.rules.metrics import metric_scale_mismatch

CFG = DoctorConfig()


def jitter(n, sd, seed=0):
    rng = random.Random(seed)
    return [rng.gauss(0.0, sd) for _ in range(n)]


def fit_record(val, train, flushes=None):
    r = RunRecord()
    for e, (v, t) in enumerate(zip(val, train, strict=True)):
        r.add_scalars(10 * (e + 1), {"val/loss": v, "train/loss_epoch": t})
    for s, v in enumerate(flushes or []):
        r.add_scalars(s + 1, {"train/loss": v})
    return r


# ---- overfitting ---------------------------------------------------------------------------------------------------
def rising_val(rise, sd=0.01, seed=0):
    """A val loss that converges to 0.3 with noise, then rises by ``rise`` over its last 4 evaluations."""
    level = [0.3 + j for j in jitter(12, sd, seed)]
    tail = [level[-1] + rise * (i + 1) / 4 for i in range(4)]
    val = [1.0, 0.6, 0.4, *level, *tail]
    train = [1.0 - 0.04 * e for e in range(len(val))]
    return val, train


def test_overfitting_fires_just_past_k_noise_and_not_before():
    val, train = rising_val(0.06)
    (found,) = overfitting(fit_record(val, train), DoctorConfig(noise_k=0.0))
    z = (found.evidence["recent"] - found.evidence["best"]) / found.evidence["noise"]
    assert z > 1.0
    assert overfitting(fit_record(val, train), DoctorConfig(noise_k=z * 0.99))[0].code == "overfitting"
    assert overfitting(fit_record(val, train), DoctorConfig(noise_k=z * 1.01)) == []


@pytest.mark.parametrize("seed", range(5))
def test_overfitting_quiet_when_the_val_loss_only_wanders_within_its_noise(seed):
    val, train = rising_val(0.0, sd=0.01, seed=seed)  # converged: the last values differ from the best by noise
    assert overfitting(fit_record(val, train), CFG) == []


def test_overfitting_needs_overfit_epochs_since_the_best():
    val = [1.0, 0.7, 0.5, 0.55, 0.65]  # a clean rise, but only 2 evaluations since the best
    train = [1.0, 0.7, 0.5, 0.4, 0.3]
    assert overfitting(fit_record(val, train), CFG) == []
    assert (
        overfitting(fit_record(val, train), DoctorConfig(overfit_epochs=2))[0].evidence["evaluations_since_best"] == 2
    )


def test_overfitting_needs_the_relative_rise_whatever_the_noise():
    val = [1.0, 0.7, 0.5, 0.502, 0.504, 0.506, 0.508]  # a steady rise: the median of the last 3 is 1.2% up
    train = [1.0, 0.7, 0.5, 0.45, 0.4, 0.35, 0.3]
    assert overfitting(fit_record(val, train), DoctorConfig(noise_k=0.0)) == []
    found = overfitting(fit_record(val, train), DoctorConfig(noise_k=0.0, overfit_rel_rise=0.01))
    assert found[0].severity == "warning"


def test_overfitting_says_memorising_only_when_the_training_loss_fell_beyond_its_noise():
    val, train = rising_val(0.2)
    (found,) = overfitting(fit_record(val, train), CFG)
    assert found.evidence["memorising"] is True
    assert "memorising" in found.message
    flat = [0.5 + j for j in jitter(len(val), 0.01, seed=3)]
    flat[-1] = min(flat[: len(val) - 5]) - 0.001  # the training loss ends a hair below where it was at the best
    (found,) = overfitting(fit_record(val, flat), CFG)
    assert found.severity == "warning"
    assert found.evidence["memorising"] is False
    assert "memorising" not in found.message
    assert "not yet memorisation" in found.message


def test_overfitting_quiet_when_the_training_loss_does_not_fall():
    val, _ = rising_val(0.2)
    rising_train = [0.2 + 0.01 * e for e in range(len(val))]
    assert overfitting(fit_record(val, rising_train), CFG) == []


# ---- plateau -------------------------------------------------------------------------------------------------------
def converged(sd=0.01, n=14, seed=0):
    return [1.0, 0.6, 0.4, *(0.3 + j for j in jitter(n, sd, seed))]


@pytest.mark.parametrize("seed", range(5))
def test_plateau_at_the_noise_floor_of_a_converged_run_is_info_without_a_larger_model(seed):
    val = converged(seed=seed)
    found = plateau(fit_record(val, val), CFG)
    assert [f.severity for f in found] in ([], ["info"])
    for f in found:
        assert f.evidence["kind"] == "converged"
        assert "larger model" not in f.message
        assert "EarlyStopping" in f.message


def test_plateau_quiet_when_the_last_evaluations_beat_the_best_by_more_than_k_noise():
    val = converged(n=10)
    val[-1] = min(val[:-5]) - 0.02  # a new best by 0.02: progress or noise, depending on the noise
    (f,) = plateau(fit_record(val, val), DoctorConfig(noise_k=100.0))
    z = (f.evidence["best"] - min(val[-5:])) / f.evidence["noise"]
    assert z > 1.0
    assert plateau(fit_record(val, val), DoctorConfig(noise_k=z * 1.01))[0].severity == "info"
    assert plateau(fit_record(val, val), DoctorConfig(noise_k=z * 0.99)) == []


def test_plateau_quiet_when_the_loss_rose_beyond_its_noise():
    val = [1.0, 0.6, 0.4, 0.3, 0.301, 0.299, 0.45, 0.46, 0.45, 0.46, 0.45]
    train = [1.0, 0.6, 0.4, 0.3, 0.3, 0.3, 0.31, 0.32, 0.33, 0.34, 0.35]  # both rise: not overfitting either
    assert plateau(fit_record(val, train), CFG) == []


def test_plateau_is_a_warning_when_nothing_is_learnt():
    val = [1.0 + j for j in jitter(10, 0.01, seed=1)]
    flushes = [1.0 + j for j in jitter(30, 0.05, seed=2)]
    (f,) = plateau(fit_record(val, val, flushes), CFG)
    assert (f.severity, f.evidence["kind"]) == ("warning", "stalled")
    assert "not learning" in f.message
    learning = [2.0 * 0.9**i for i in range(30)]  # the training loss falls: held-out data do not follow
    (g,) = plateau(fit_record(val, val, learning), CFG)
    assert (g.severity, g.evidence["kind"]) == ("info", "no_transfer")
    assert "larger model" not in g.message


def test_plateau_is_a_warning_when_the_loss_does_not_even_jitter():
    val = [1.0, 0.6, 0.5, 0.5, 0.5, 0.5, 0.5, 0.5]
    (f,) = plateau(fit_record(val, val), CFG)
    assert (f.severity, f.evidence["kind"]) == ("warning", "frozen")
    assert "no longer change" in f.message
    val[-1] = 0.5001  # a loss that moves at all is not frozen
    assert plateau(fit_record(val, val), CFG)[0].severity == "info"


# ---- loss_diverging ------------------------------------------------------------------------------------------------
def noisy_flat_loss():
    """A per-batch loss that swings between ~0.05 and ~0.3 without a trend: its medians wander by 2x by chance."""
    return [0.05, 0.06, 0.05, 0.04, 0.3, 0.06, 0.28, 0.05, 0.3, 0.06, 0.29, 0.31, 0.05, 0.3, 0.29, 0.06]


def test_loss_diverging_quiet_on_a_noisy_flat_loss_whose_medians_wander():
    r = RunRecord()
    for i, v in enumerate(noisy_flat_loss()):
        r.add_scalars(10 * (i + 1), {"train/loss": v})
    assert loss_diverging(r, DoctorConfig(noise_k=0.0))[0].code == "loss_diverging"  # the old rule cried wolf
    assert loss_diverging(r, CFG) == []


def test_loss_diverging_fires_just_past_k_standard_errors():
    r = RunRecord()
    for i, v in enumerate([1.0, 0.7, 0.5, 0.42, 0.4, 0.41, 0.39, 0.45, 0.7, 1.0, 1.3, 1.2, 1.5, 1.4]):
        r.add_scalars(10 * (i + 1), {"train/loss": v})
    (f,) = loss_diverging(r, DoctorConfig(noise_k=0.0))
    z = (f.evidence["recent"] - f.evidence["best"]) / f.evidence["noise_se"]
    assert z > 3
    assert "standard errors" in f.message
    assert loss_diverging(r, DoctorConfig(noise_k=z * 0.99))[0].code == "loss_diverging"
    assert loss_diverging(r, DoctorConfig(noise_k=z * 1.01)) == []


def test_loss_diverging_quiet_just_under_its_factor():
    r = RunRecord()
    values = [1.0, 0.7, 0.5, 0.4, 0.4, 0.4, 0.4, 0.5, 0.6, 0.7, 0.79, 0.79, 0.79, 0.79]  # recent median ~1.98x
    for i, v in enumerate(values):
        r.add_scalars(10 * (i + 1), {"train/loss": v})
    assert loss_diverging(r, CFG) == []
    assert loss_diverging(r, DoctorConfig(diverge_factor=1.9))[0].code == "loss_diverging"


def test_noise_config_is_validated():
    with pytest.raises(ValueError, match="noise_window"):
        DoctorConfig(noise_window=3)
    with pytest.raises(ValueError, match="noise_k"):
        DoctorConfig(noise_k=-1.0)


# ---- metric_scale_mismatch -----------------------------------------------------------------------------------------
def scale_record(pairs, key="val_acc", ours="metrics/val/accuracy"):
    r = RunRecord()
    for e, (user, our) in enumerate(pairs):
        r.add_scalars(10 * (e + 1), {ours: our})
        r.add_scalars(10 * (e + 1) - 1, {key: user})
    return r


def test_scale_true_100x_fires():
    (f,) = metric_scale_mismatch(scale_record([(100 * o, o) for o in (0.7, 0.8, 0.85, 0.9)]), CFG)
    assert f.evidence["kind"] == "percent"
    (g,) = metric_scale_mismatch(scale_record([(o / 100, o) for o in (0.7, 0.8, 0.85, 0.9)]), CFG)
    assert g.evidence["kind"] == "hundredth"


def test_scale_accuracy_near_half_logged_as_its_complement_stays_quiet():
    # 0.45 logged as 0.55: near 0.5 "1 - ours" is as likely a coincidence as a flipped class (guard of 0.1 around 0.5)
    ours = [0.45, 0.46, 0.44, 0.45]
    assert metric_scale_mismatch(scale_record([(1 - o, o) for o in ours]), CFG) == []
    far = [0.38, 0.37, 0.39, 0.38]  # just outside the guard, the same relation is a finding
    (f,) = metric_scale_mismatch(scale_record([(1 - o, o) for o in far]), CFG)
    assert f.evidence["kind"] == "complement"


@pytest.mark.parametrize("first", ["mismatch", "same"], ids=["mismatch-first", "same-first"])
def test_scale_a_tie_of_kinds_stays_quiet(first):
    ours = [0.7, 0.8, 0.85, 0.9]
    bad = [(100 * o, o) for o in ours[:2]]
    good = [(o, o) for o in ours[2:]]
    pairs = bad + good if first == "mismatch" else good + bad
    assert metric_scale_mismatch(scale_record(pairs), CFG) == []
    three = [(100 * o, o) for o in ours[:3]] + [(ours[3], ours[3])]  # a majority of 3 to 1 is a finding
    assert metric_scale_mismatch(scale_record(three), CFG)[0].evidence["kind"] == "percent"


@pytest.mark.parametrize(
    "factor", [1 / 30, 1 / 50, 1 / 1000, 30.0, 1000.0], ids=["1/30", "1/50", "1/1000", "30x", "1000x"]
)
def test_scale_ratios_far_from_100_stay_quiet(factor):
    ours = [0.7, 0.8, 0.85, 0.9]
    assert metric_scale_mismatch(scale_record([(o * factor, o) for o in ours]), CFG) == []


@pytest.mark.parametrize("ratio", [1 / 115, 1 / 88], ids=["1/115", "1/88"])
def test_scale_hundredth_tolerance_edges_fire(ratio):
    ours = [0.7, 0.8, 0.85, 0.9]
    (f,) = metric_scale_mismatch(scale_record([(o * ratio, o) for o in ours]), CFG)
    assert f.evidence["kind"] == "hundredth"


def test_scale_ratio_needs_a_meaningful_value_of_ours():
    tiny = [0.04, 0.03, 0.04, 0.03]  # below metric_min_value: a ratio of tiny numbers says nothing
    assert metric_scale_mismatch(scale_record([(100 * o, o) for o in tiny]), CFG) == []


def test_scale_complement_tolerance_edge():
    ours = [0.7, 0.8, 0.85, 0.9]
    assert metric_scale_mismatch(scale_record([(1 - o + 0.02, o) for o in ours]), CFG) == []
    assert metric_scale_mismatch(scale_record([(1 - o + 0.005, o) for o in ours]), CFG)[0].evidence["kind"] == (
        "complement"
    )
