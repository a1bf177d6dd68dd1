"""A doctor that weighs noise: trend findings hold their evidence against the noise of the series they read.

Real small fits: healthy runs over several seeds get no warning-level trend finding, a model that memorises a tiny
training set still gets ``overfitting``. Records: the demo's noisy "rise" stays quiet, and a validation loss that
rises while the accuracy holds is over-confidence (``overconfident``), not overfitting.
"""

import math
import random

import pytest
from lightning.pytorch import Trainer, seed_everything

from lightning_lossdiag import LossDiagnostics
from lightning_lossdiag.diagnosis.config import DoctorConfig
from lightning_lossdiag.diagnosis.engine import diagnose
from lightning_lossdiag.diagnosis.record import RunRecord, record_for
from lightning_lossdiag.diagnosis.rules._common import noise_sd
from lightning_lossdiag.diagnosis.rules.fit import overfitting, plateau
from lightning_lossdiag.examples import LinearRegressionDataModule, MLPRegressor

TREND_CODES = {"overfitting", "plateau", "loss_diverging"}
pytestmark = pytest.mark.filterwarnings("ignore:LossDiagnostics. the Trainer has no logger")


# ---- the noise of a series -----------------------------------------------------------------------------------------
def test_noise_sd_measures_the_spread_around_the_trend_not_the_trend():
    rng = random.Random(0)
    noise = [rng.gauss(0.0, 0.02) for _ in range(400)]
    assert noise_sd(noise) == pytest.approx(0.02, rel=0.1)
    trend = [1.0 - 0.003 * i + 2e-6 * i * i + e for i, e in enumerate(noise)]  # a falling, curving loss
    assert noise_sd(trend) == pytest.approx(noise_sd(noise), rel=0.05)
    assert noise_sd([2.0 - 0.1 * i for i in range(20)]) == pytest.approx(0.0, abs=1e-12)
    assert noise_sd([0.5, 0.4]) == 0.0
    assert noise_sd([]) == 0.0


def test_noise_sd_leaves_out_the_turn_it_is_told():
    turned = [1.0, 0.7, 0.75, 0.8, 0.9]  # a fall that turns into a rise: the turn is not noise
    assert noise_sd(turned, turn=1) < noise_sd(turned) / 3


# ---- real small fits -----------------------------------------------------------------------------------------------
def fit(tmp_path, seed, model, data, epochs, every=1):
    seed_everything(seed, verbose=False)
    bundle = LossDiagnostics(doctor={"print_report": False})
    trainer = Trainer(
        default_root_dir=tmp_path,
        max_epochs=epochs,
        check_val_every_n_epoch=every,
        log_every_n_steps=5,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        accelerator="cpu",
        devices=1,
        callbacks=[bundle],
    )
    trainer.fit(model, data)
    return bundle.findings, record_for(trainer)


@pytest.mark.parametrize("seed", range(4), ids=lambda s: f"seed{s}")
def test_healthy_fit_on_noisy_linear_data_gets_no_warning_level_trend_finding(tmp_path, seed):
    # the demo's model (configs/regression.yaml: Huber, ReduceLROnPlateau) on y = 2x + 1 + N(0, 0.3^2), 48 val rows
    data = LinearRegressionDataModule(noise=0.3, num_samples=300, batch_size=32, seed=seed)
    model = MLPRegressor(in_features=1, hidden=32, depth=2, lr=0.01, loss={"name": "huber", "delta": 1.0},
                         plateau_patience=3)  # fmt: skip
    findings, record = fit(tmp_path, seed, model, data, epochs=30)
    assert record.last("val/loss") < 0.08  # it learnt: the Huber loss of the noise alone is about 0.045
    trend = [f for f in findings if f.code in TREND_CODES]
    assert [(f.code, f.severity) for f in trend if f.severity != "info"] == []
    for f in trend:
        assert "larger model" not in f.message
        assert "memorising" not in f.message


def test_a_model_that_memorises_a_tiny_training_set_gets_overfitting(tmp_path):
    data = LinearRegressionDataModule(
        noise=0.5, num_samples=60, batch_size=64, val_fraction=0.45, test_fraction=0.05, seed=2
    )
    model = MLPRegressor(in_features=1, hidden=128, depth=3, lr=0.01)
    findings, _ = fit(tmp_path, 2, model, data, epochs=200, every=5)
    (found,) = [f for f in findings if f.code == "overfitting"]
    assert found.severity == "warning"
    ev = found.evidence
    assert ev["noise"] > 0
    assert ev["recent"] - ev["best"] > DoctorConfig().noise_k * ev["noise"]
    assert ev["memorising"] is True
    assert "memorising" in found.message
    assert f"{(ev['recent'] - ev['best']) / ev['noise']:.3g}x its noise" in found.message


# ---- records -------------------------------------------------------------------------------------------------------
def demo_record():
    """The issue's `make demo`: val/loss 0.192 at best, 0.205 at the end, train loss 0.178 -> 0.175; all noise."""
    rng = random.Random(7)
    val = [0.9, 0.45, 0.3] + [0.198 + rng.gauss(0.0, 0.006) for _ in range(12)] + [0.2, 0.208, 0.205]
    val[9] = 0.192
    train = [1.2, 0.5, 0.3] + [0.178 - 0.0002 * i for i in range(len(val) - 3)]
    r = RunRecord()
    for e, (t, v) in enumerate(zip(train, val, strict=True)):
        r.add_scalars(64 * (e + 1), {"train/loss_epoch": t, "val/loss": v})
    return r


def test_the_demos_noisy_rise_is_not_overfitting():
    r = demo_record()
    assert overfitting(r, DoctorConfig(noise_k=0.0))[0].code == "overfitting"  # what the rule said before
    assert overfitting(r, DoctorConfig()) == []
    assert [f.severity for f in plateau(r, DoctorConfig())] in ([], ["info"])
    assert [f for f in diagnose(r) if f.severity != "info"] == []


TRAIN = [0.9, 0.6, 0.45, 0.35, 0.28, 0.22, 0.17, 0.13, 0.1, 0.08]
VAL = [0.92, 0.65, 0.5, 0.44, 0.43, 0.46, 0.5, 0.55, 0.6, 0.66]
ACC_HOLDS = [0.7, 0.8, 0.85, 0.87, 0.88, 0.88, 0.885, 0.88, 0.885, 0.88]
ACC_DROPS = [0.7, 0.8, 0.85, 0.87, 0.88, 0.87, 0.85, 0.83, 0.82, 0.80]


def classifier_record(acc, acc_key="metrics/val/accuracy", calibration=True):
    """A classifier whose val loss rises after epoch 5 while the training loss keeps falling."""
    r = RunRecord()
    for e, (t, v, a) in enumerate(zip(TRAIN, VAL, acc, strict=True)):
        r.add_scalars(100 * (e + 1), {"train/loss_epoch": t, "val/loss": v, acc_key: a})
    if calibration:  # probabilities pushed towards 0 and 1: confidence well above accuracy, ECE above its noise
        conf = 0.97
        ece = conf - acc[-1]
        r.add_scalars(1000, {"metrics/val/ece": ece, "metrics/val/confidence": conf, "errors/val/samples": 2000})
    return r


def test_overconfidence_is_named_as_such_not_as_overfitting():
    r = classifier_record(ACC_HOLDS)
    assert overfitting(r, DoctorConfig()) == []
    assert plateau(r, DoctorConfig()) == []  # a rising loss is not a plateau either
    found = {f.code: f for f in diagnose(r)}
    assert "overfitting" not in found
    assert found["overconfident"].severity == "warning"
    assert "over-confident" in found["overconfident"].message


@pytest.mark.parametrize("acc_key", ["metrics/val/accuracy", "val_acc"])
def test_loss_rising_while_accuracy_holds_is_info_and_claims_no_memorisation(acc_key):
    r = classifier_record(ACC_HOLDS, acc_key=acc_key, calibration=False)  # no calibration measured
    (f,) = overfitting(r, DoctorConfig())
    assert f.severity == "info"
    assert f.evidence["accuracy_key"] == acc_key
    assert f.evidence["accuracy_holds"] is True
    assert "over-confidence, not memorisation" in f.message
    assert "it is memorising" not in f.message
    assert "metrics/val/ece" in f.message


def test_overfitting_with_falling_accuracy_stays_a_warning_and_names_overconfidence_too():
    r = classifier_record(ACC_DROPS)
    (f,) = overfitting(r, DoctorConfig())
    assert f.severity == "warning"
    assert f.evidence["accuracy_holds"] is False
    assert "`overconfident`" in f.message
    assert {"overfitting", "overconfident"} <= {g.code for g in diagnose(r)}


def test_overfitting_without_accuracy_or_calibration_is_unchanged():
    r = classifier_record(ACC_HOLDS, acc_key="unrelated/metric", calibration=False)
    (f,) = overfitting(r, DoctorConfig())
    assert f.severity == "warning"
    assert "accuracy_key" not in f.evidence
    assert math.isclose(f.evidence["best"], min(VAL))
