"""Every rule: a scripted record that triggers it, and a healthy or near-miss record where it stays quiet."""

import math
import random

import numpy as np
import pytest

from lightning_lossdiag.diagnosis.config import DoctorConfig
from lightning_lossdiag.diagnosis.engine import diagnose
from lightning_lossdiag.diagnosis.record import RunRecord
from lightning_lossdiag.diagnosis.rules import ALL_RULES
from lightning_lossdiag.diagnosis.rules.activations import dead_units, saturated_activations
from lightning_lossdiag.diagnosis.rules.data import class_imbalance, constant_predictions
from lightning_lossdiag.diagnosis.rules.fit import overfitting, plateau
from lightning_lossdiag.diagnosis.rules.gradients import (
    clipping_saturated,
    dead_parameters,
    exploding_gradients,
    nonfinite_grad,
    vanishing_gradients,
)
from lightning_lossdiag.diagnosis.rules.loss import loss_diverging, loss_spike, nonfinite_loss
from lightning_lossdiag.diagnosis.rules.metrics import metric_scale_mismatch, parse_metric_key
from lightning_lossdiag.diagnosis.rules.schedule import scheduler_mode_mismatch, scheduler_monitor_missing

CFG = DoctorConfig()
DESIGN_CODES = {
    "nonfinite_loss",
    "nonfinite_grad",
    "exploding_gradients",
    "vanishing_gradients",
    "dead_parameters",
    "clipping_saturated",
    "loss_spike",
    "loss_diverging",
    "plateau",
    "overfitting",
    "class_imbalance",
    "constant_predictions",
    "metric_scale_mismatch",
    "scheduler_mode_mismatch",
    "scheduler_monitor_missing",
    "dead_units",
    "saturated_activations",
    "amp_scale_collapse",
    "overconfident",
    "underconfident",
}


def healthy_record(epochs=8, steps_per_epoch=20, flush=5):
    """A run that learns well: loss falls with noise, stable gradients, consistent metrics, balanced classes."""
    rng = random.Random(0)
    r = RunRecord()
    r.notes["data/class_counts"] = {"stage": "train", "counts": [480, 520]}
    r.notes["task"] = "binary"
    r.notes["grad/clip"] = {"val": 5.0, "algorithm": "norm"}
    r.notes["scheduler/plateau"] = [{"optimizer": 0, "monitor": "val_loss", "mode": "min", "min_lrs": [1e-6]}]
    r.notes["callbacks/monitors"] = [
        {"callback": "EarlyStopping", "monitor": "val_loss", "mode": "min"},
        {"callback": "ModelCheckpoint", "monitor": "val_acc", "mode": "max"},
    ]
    r.notes["doctor/callback_metrics"] = ["train_loss", "val_loss", "val_acc"]
    for step in range(flush, epochs * steps_per_epoch + 1, flush):
        base = 0.2 + 0.8 * math.exp(-step / 40)
        loss = base * (1 + 0.1 * rng.uniform(-1, 1))
        r.add_scalars(
            step,
            {
                "train/loss": loss,
                "train/loss_ema": base,
                "train/nonfinite_count": 0.0,
                "train/loss_spikes": 0.0,
                "grad/norm_total": 1.0 + 0.2 * rng.random(),
                "grad/clip_rate": 0.05,
                "grad/norm/0": 0.3 + 0.05 * rng.random(),
                "grad/norm/2": 0.6 + 0.05 * rng.random(),
                "grad/norm/4": 0.9,
                "lr/SGD/0": 0.01,
                "act/dead_frac/0": 0.05,
                "act/saturated_frac/1": 0.02,
            },
        )
        if step % steps_per_epoch == 0:
            epoch = step // steps_per_epoch
            acc = 0.6 + 0.3 * (1 - math.exp(-epoch / 2))
            r.add_scalars(
                step,
                {
                    "train/loss_epoch": base * 1.02,
                    "val_loss": base * 1.1,
                    "val_acc": acc,
                    "metrics/val/accuracy": acc,
                    "metrics/val/recall": acc - 0.02,
                    "errors/val/majority_pred_share": 0.55,
                    "errors/val/constant_pred_std": 0.8,
                },
            )
    return r


def codes(findings):
    return [f.code for f in findings]


def test_all_design_codes_have_a_rule():
    r = RunRecord()  # every rule runs on an empty record without error and says nothing
    assert diagnose(r) == []
    names = {rule.__name__ for rule in ALL_RULES}
    assert names == DESIGN_CODES


@pytest.mark.parametrize("rule", ALL_RULES, ids=lambda r: r.__name__)
def test_every_rule_quiet_on_a_healthy_run(rule):
    assert rule(healthy_record(), CFG) == []


def test_healthy_run_has_no_warning_or_error():
    assert [f for f in diagnose(healthy_record()) if f.severity != "info"] == []


# ---- loss ------------------------------------------------------------------------------------------------------
def test_nonfinite_loss_from_note_count_and_logged_series():
    r = healthy_record()
    r.notes["loss/first_nonfinite_step"] = 37
    r.add_scalars(40, {"train/nonfinite_count": 3.0})
    (f,) = nonfinite_loss(r, CFG)
    assert (f.severity, f.step, f.evidence["count"]) == ("error", 37, 3)
    assert "step 37" in f.message
    assert "3 step(s)" in f.message
    plain = RunRecord()  # event files of a plain module: only the logged loss turned NaN
    for s, v in [(1, 0.5), (2, 0.4), (3, float("nan")), (4, float("nan"))]:
        plain.add_scalars(s, {"train_loss": v})
    assert nonfinite_loss(plain, CFG)[0].step == 3


def test_loss_spike_severity_depends_on_count():
    r = healthy_record()
    r.add_scalars(200, {"train/loss_spikes": 1.0})
    r.notes["loss/first_spike_step"] = 123
    (f,) = loss_spike(r, CFG)
    assert (f.severity, f.step) == ("info", 123)
    r.add_scalars(205, {"train/loss_spikes": float(CFG.spike_warn_count)})
    assert loss_spike(r, CFG)[0].severity == "warning"


def test_loss_diverging_detects_a_climb_and_names_the_turn():
    r = RunRecord()
    values = [1.0, 0.7, 0.5, 0.4, 0.35, 0.3, 0.3, 0.32, 0.5, 0.9, 1.5, 2.5, 4.0, 6.0]
    for i, v in enumerate(values):
        r.add_scalars(10 * (i + 1), {"train/loss": v, "lr/Adam/0": 0.5})
    (f,) = loss_diverging(r, CFG)
    assert f.severity == "warning"
    w = f.evidence["window"]
    assert w == max(3, round(len(values) * CFG.window_frac))
    assert f.evidence["recent"] == pytest.approx(float(np.median(values[-w:])))
    smoothed = [float(np.median(values[i : i + w])) for i in range(len(values) - w + 1)]
    assert f.evidence["best"] == pytest.approx(min(smoothed))
    assert 50 <= f.step <= 80  # the turn is where the smoothed loss was lowest
    assert "lr is now 0.5" in f.message


def test_loss_diverging_ignores_small_wobble_near_zero_after_a_big_drop():
    r = RunRecord()
    values = [2.0, 1.0, 0.3, 0.05, 0.01, 0.004, 0.002, 0.002, 0.003, 0.005, 0.006, 0.006]
    for i, v in enumerate(values):
        r.add_scalars(i + 1, {"train/loss": v})
    assert loss_diverging(r, CFG) == []


# ---- gradients ---------------------------------------------------------------------------------------------------
def test_nonfinite_grad_names_parameters_and_points_to_the_loss():
    r = healthy_record()
    r.notes.update(
        {
            "grad/first_nonfinite_step": 55,
            "grad/nonfinite_params": ["enc.weight", "enc.bias"],
            "loss/first_nonfinite_step": 55,
        }
    )
    (f,) = nonfinite_grad(r, CFG)
    assert (f.severity, f.step, f.evidence["params"]) == ("error", 55, ["enc.weight", "enc.bias"])
    assert "`enc.weight`" in f.message
    assert "loss was already non-finite at step 55" in f.message
    logged = RunRecord()
    logged.add_scalars(5, {"grad/norm_total": 1.0})
    logged.add_scalars(10, {"grad/norm_total": float("inf")})
    assert nonfinite_grad(logged, CFG)[0].step == 10


def test_exploding_total_norm_and_by_depth():
    r = RunRecord()
    for i in range(12):
        r.add_scalars(i, {"grad/norm_total": 2.0 * 3.0**i})
    (f,) = exploding_gradients(r, CFG)
    assert f.evidence["recent"] / f.evidence["early"] >= CFG.grad_explode_growth
    depth = RunRecord()
    depth.add_scalars(10, {"grad/norm/embed": 5e3, "grad/norm/mid": 10.0, "grad/norm/head": 1.0})
    (f,) = exploding_gradients(depth, CFG)
    assert f.evidence["first_layer"] == "grad/norm/embed"
    assert f.evidence["last_layer"] == "grad/norm/head"
    assert vanishing_gradients(depth, CFG) == []


def test_exploding_ignores_large_but_stable_norms():
    r = RunRecord()
    for i in range(12):
        r.add_scalars(i, {"grad/norm_total": 500.0 + 10 * (i % 3)})
    assert exploding_gradients(r, CFG) == []


def test_vanishing_uses_model_order_not_alphabetical():
    r = RunRecord()
    for s in (10, 20, 30):  # written input-first: "z_in" before "a_out"; sorted order would flip them
        r.add_scalars(s, {"grad/norm/z_in": 1e-8, "grad/norm/m": 1e-4, "grad/norm/a_out": 0.1, "grad/norm/other": 5.0})
    (f,) = vanishing_gradients(r, CFG)
    assert f.evidence["first_layer"] == "grad/norm/z_in"
    assert f.evidence["last_layer"] == "grad/norm/a_out"
    assert f.evidence["first"] / f.evidence["last"] == pytest.approx(1e-7)


def test_dead_parameters():
    r = healthy_record()
    r.notes["grad/dead_params"] = ["aux_head.weight", "aux_head.bias"]
    (f,) = dead_parameters(r, CFG)
    assert f.severity == "warning"
    assert "`aux_head.weight`" in f.message


def test_clipping_saturated_needs_most_flushes_for_long_enough():
    r = RunRecord()
    r.notes["grad/clip"] = {"val": 0.01, "algorithm": "norm"}
    for s in range(1, 11):
        r.add_scalars(10 * s, {"grad/clip_rate": 1.0 if s != 4 else 0.5, "grad/norm_total": 3.0})
    (f,) = clipping_saturated(r, CFG)
    assert (f.evidence["saturated_flushes"], f.evidence["flushes"]) == (9, 10)
    assert "0.01" in f.message
    assert "3" in f.message
    short = RunRecord()
    for s in range(1, CFG.clip_min_flushes):
        short.add_scalars(s, {"grad/clip_rate": 1.0})
    assert clipping_saturated(short, CFG) == []
    half = RunRecord()
    for s in range(1, 11):
        half.add_scalars(s, {"grad/clip_rate": 1.0 if s % 2 else 0.0})
    assert clipping_saturated(half, CFG) == []


# ---- fit ---------------------------------------------------------------------------------------------------------
def overfit_record():
    r = RunRecord()
    train = [1.0, 0.7, 0.5, 0.4, 0.3, 0.22, 0.15, 0.1]
    val = [1.05, 0.8, 0.65, 0.6, 0.62, 0.68, 0.75, 0.83]
    for e, (t, v) in enumerate(zip(train, val, strict=True)):
        r.add_scalars(10 * (e + 1), {"train_loss_epoch": t, "val_loss": v})
    return r, train, val


def test_overfitting_reports_the_gap_from_the_numbers():
    r, train, val = overfit_record()
    (f,) = overfitting(r, CFG)
    assert f.step == 40
    assert f.evidence["evaluations_since_best"] == 4
    assert f.evidence["gap_at_best"] == pytest.approx(val[3] - train[3])
    assert f.evidence["gap_last"] == pytest.approx(val[-1] - train[-1])
    assert plateau(r, CFG) == []  # the val curve is rising, not flat: that is overfitting only


def test_overfitting_quiet_when_train_loss_rises_too_or_val_recovers():
    r = RunRecord()
    for e, (t, v) in enumerate([(1.0, 1.0), (0.8, 0.8), (0.9, 0.9), (1.0, 1.0), (1.1, 1.1)]):
        r.add_scalars(e + 1, {"train/loss_epoch": t, "val/loss": v})
    assert overfitting(r, CFG) == []
    r2, _, _ = overfit_record()
    r2.add_scalars(90, {"train_loss_epoch": 0.08, "val_loss": 0.55})  # new best: no longer overfitting
    assert overfitting(r2, CFG) == []


def test_overfitting_falls_back_to_mean_of_flushed_train_loss():
    r = RunRecord()
    val = [1.0, 0.7, 0.75, 0.8, 0.9]
    for e, v in enumerate(val):
        for k in range(1, 5):
            r.add_scalars(100 * e + 25 * k, {"train/loss": 1.0 - 0.2 * e - 0.01 * k})
        r.add_scalars(100 * e + 100, {"val/loss": v})
    (f,) = overfitting(r, CFG)
    expected_best = sum(1.0 - 0.2 - 0.01 * k for k in range(1, 5)) / 4
    assert f.evidence["train_at_best"] == pytest.approx(expected_best)


def test_plateau_on_val_loss_mentions_min_lr():
    r = RunRecord()
    vals = [1.0, 0.6, 0.5, 0.5004, 0.4999, 0.5001, 0.5002, 0.5]
    for e, v in enumerate(vals):
        r.add_scalars(e + 1, {"val/loss": v, "lr/Adam/0": 1e-6, "train/loss_epoch": v})
    r.notes["scheduler/plateau"] = [{"optimizer": 0, "monitor": "val/loss", "mode": "min", "min_lrs": [1e-6]}]
    (f,) = plateau(r, CFG)
    assert f.evidence["best"] == 0.5
    assert f.evidence["best_step"] == 3
    assert "min_lr" in f.message
    r.notes["scheduler/plateau"][0]["min_lrs"] = [1e-8]
    assert "min_lr" not in plateau(r, CFG)[0].message


def test_plateau_quiet_while_still_improving_and_uses_train_epoch_loss_without_val():
    r = RunRecord()
    for e in range(10):
        r.add_scalars(e, {"val/loss": 1.0 / (e + 1)})
    assert plateau(r, CFG) == []
    t = RunRecord()
    for e, v in enumerate([1.0, 0.8, 0.7, 0.7, 0.7, 0.7, 0.7, 0.7]):
        t.add_scalars(e, {"train_loss_epoch": v})
    assert plateau(t, CFG)[0].evidence["key"] == "train_loss_epoch"


# ---- data --------------------------------------------------------------------------------------------------------
def test_class_imbalance_is_info_when_minority_is_found_and_warning_when_ignored():
    r = healthy_record()
    r.notes["data/class_counts"] = {"stage": "train", "counts": [940, 60]}
    (f,) = class_imbalance(r, CFG)
    assert (f.severity, f.evidence["minority_class"]) == ("info", 1)
    assert f.evidence["share"] == pytest.approx(60 / 1000)
    assert "pos_weight: auto" in f.message
    assert "focal" in f.message
    r.add_scalars(999, {"metrics/val/recall": 0.0})
    assert class_imbalance(r, CFG)[0].severity == "warning"


def test_class_imbalance_multiclass_uses_per_class_recall_or_majority_share():
    r = RunRecord()
    r.notes["data/class_counts"] = {"stage": "train", "counts": [500, 30, 470]}
    r.add_scalars(10, {"metrics/val/recall/1": 0.6})
    assert class_imbalance(r, CFG)[0].severity == "info"
    r.add_scalars(20, {"metrics/val/recall/1": 0.01})
    assert class_imbalance(r, CFG)[0].severity == "warning"
    m = RunRecord()
    m.notes["data/class_counts"] = {"stage": "train", "counts": [500, 30, 470]}
    m.add_scalars(10, {"errors/val/majority_pred_share": 1.0})
    assert class_imbalance(m, CFG)[0].severity == "warning"
    balanced = RunRecord()
    balanced.notes["data/class_counts"] = {"stage": "train", "counts": [300, 350, 350]}
    assert class_imbalance(balanced, CFG) == []


def test_constant_predictions_regression_and_classification():
    r = RunRecord()
    r.add_scalars(10, {"errors/val/constant_pred_std": 0.5, "errors/val/target_std": 5.0})
    assert constant_predictions(r, CFG) == []
    r.add_scalars(20, {"errors/val/constant_pred_std": 0.002, "errors/val/target_std": 5.0})
    (f,) = constant_predictions(r, CFG)
    assert (f.step, f.evidence["stage"], f.evidence["pred_std"]) == (20, "val", pytest.approx(0.002 / 5.0))
    absolute = RunRecord()  # regression without a logged target spread: only a truly constant output counts
    absolute.add_scalars(5, {"errors/val/constant_pred_std": 1e-5})
    assert constant_predictions(absolute, CFG) == []
    absolute.add_scalars(6, {"errors/val/constant_pred_std": 1e-8})
    assert constant_predictions(absolute, CFG)[0].step == 6
    probs = RunRecord()
    probs.notes["task"] = "binary"
    probs.add_scalars(7, {"errors/test/constant_pred_std": 1e-4})
    assert constant_predictions(probs, CFG)[0].evidence["stage"] == "test"
    c = RunRecord()
    c.add_scalars(30, {"errors/train/majority_pred_share": 1.0})
    assert constant_predictions(c, CFG)[0].evidence["stage"] == "train"
    c.add_scalars(40, {"errors/train/majority_pred_share": 0.7})
    assert constant_predictions(c, CFG) == []


# ---- metrics ------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("key", "expected"),
    [
        ("val_acc", ("val", "accuracy")),
        ("valid/accuracy_epoch", ("val", "accuracy")),
        ("test_f1", ("test", "f1")),
        ("train-precision", ("train", "precision")),
        ("val_recall", ("val", "recall")),
        ("acc", None),
        ("val_top5_acc", None),
        ("metrics/val/accuracy", None),
        ("val_loss", None),
    ],
)
def test_parse_metric_key(key, expected):
    assert parse_metric_key(key) == expected


@pytest.mark.parametrize(
    ("user", "kind"),
    [(lambda o: o * 100, "percent"), (lambda o: o / 100, "hundredth"), (lambda o: 1 - o, "complement")],
    ids=["percent", "hundredth", "complement"],
)
def test_metric_scale_mismatch_kinds(user, kind):
    r = RunRecord()
    ours = [0.7, 0.8, 0.85, 0.9]
    for e, o in enumerate(ours):
        r.add_scalars(10 * (e + 1), {"metrics/val/accuracy": o})
        r.add_scalars(10 * (e + 1) - 1, {"val_acc": user(o)})  # one step early, as Lightning logs epoch values
    (f,) = metric_scale_mismatch(r, CFG)
    assert (f.evidence["kind"], f.evidence["key"], f.evidence["ours_key"]) == (kind, "val_acc", "metrics/val/accuracy")
    assert f.evidence["computed"] == 0.9
    assert f.evidence["logged"] == pytest.approx(user(0.9))
    assert "val_acc" in f.message
    assert f"{user(0.9):.3g}" in f.message
    assert "0.9" in f.message


def test_metric_scale_mismatch_quiet_when_consistent_or_far_in_time():
    r = RunRecord()
    for e, o in enumerate([0.5, 0.52, 0.49]):  # near 0.5, "1 - ours" is not evidence of anything
        r.add_scalars(e, {"metrics/val/accuracy": o, "val_acc": o + 0.001, "val_f1": 1 - o})
    r.add_scalars(0, {"metrics/val/f1": 0.5})
    r.add_scalars(500, {"val_precision": 50.0})  # no computed precision at all
    assert metric_scale_mismatch(r, CFG) == []


# ---- schedule -----------------------------------------------------------------------------------------------------
def test_scheduler_mode_mismatch_for_scheduler_and_callbacks():
    r = RunRecord()
    r.notes["scheduler/plateau"] = [{"optimizer": 0, "monitor": "val/accuracy", "mode": "min"}]
    r.notes["callbacks/monitors"] = [
        {"callback": "EarlyStopping", "monitor": "val_loss", "mode": "max"},
        {"callback": "ModelCheckpoint", "monitor": "val_f1", "mode": "max"},
    ]
    found = scheduler_mode_mismatch(r, CFG)
    assert [(f.evidence["callback"], f.evidence["expected"]) for f in found] == [
        ("ReduceLROnPlateau", "max"),
        ("EarlyStopping", "min"),
    ]
    assert "mode='max'" in found[0].message


def test_scheduler_monitor_missing_lists_what_exists():
    r = RunRecord()
    r.notes["callbacks/monitors"] = [{"callback": "ModelCheckpoint", "monitor": "val/acc", "mode": "max"}]
    assert scheduler_monitor_missing(r, CFG) == []  # without the list of logged metrics we cannot tell
    r.notes["doctor/callback_metrics"] = ["val_acc", "val_loss"]
    (f,) = scheduler_monitor_missing(r, CFG)
    assert f.evidence["monitor"] == "val/acc"
    assert "val_acc" in f.message


# ---- activations --------------------------------------------------------------------------------------------------
def test_dead_units_and_saturation_must_be_sustained():
    r = RunRecord()
    for s, (d, sat) in enumerate([(0.1, 0.9), (0.7, 0.9), (0.8, 0.2), (0.75, 0.9), (0.9, 0.95)]):
        r.add_scalars(10 * (s + 1), {"act/dead_frac/enc": d, "act/saturated_frac/gate": sat})
    (f,) = dead_units(r, CFG)
    assert f.step == 20
    assert f.evidence["layers"] == {"enc": 0.9}
    assert saturated_activations(r, CFG) == []  # only the last 2 flushes are saturated
    r.add_scalars(60, {"act/saturated_frac/gate": 0.97})
    (g,) = saturated_activations(r, CFG)
    assert g.step == 40
    assert "`gate`" in g.message


def test_config_overrides_change_decisions():
    r = RunRecord()
    for s in range(3):
        r.add_scalars(s, {"act/dead_frac/enc": 0.3})
    assert dead_units(r, CFG) == []
    assert dead_units(r, DoctorConfig(dead_frac=0.2))[0].code == "dead_units"
