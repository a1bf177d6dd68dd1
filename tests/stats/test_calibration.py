"""Calibration from the shared counts: ECE and MCE equal torchmetrics' (bin edges 0.0 and 1.0 included), the Brier
score equals its formula, the reliability diagram is written, and the findings hold the ECE against its noise."""

import pytest
import torch
import torchmetrics.functional.classification as tmfc

from lightning_lossdiag.diagnosis.config import DoctorConfig
from lightning_lossdiag.diagnosis.record import RunRecord
from lightning_lossdiag.diagnosis.rules.calibration import overconfident, underconfident
from lightning_lossdiag.stats.class_metrics import class_metrics
from lightning_lossdiag.stats.classification import ClassCounts


def _fed(task, inputs, preds, target, classes, chunk=37):
    counts = ClassCounts(task, inputs, classes, thresholds=11)
    for lo in range(0, preds.shape[0], chunk):
        counts.update(preds[lo : lo + chunk], target[lo : lo + chunk])
    return class_metrics(counts)


def test_multiclass_ece_and_mce_equal_torchmetrics_with_confidences_on_the_bin_edges():
    g = torch.Generator().manual_seed(0)
    target = torch.randint(0, 4, (400,), generator=g)
    probs = (torch.rand(400, 4, generator=g) + 3 * torch.nn.functional.one_hot(target, 4)).softmax(1)
    probs[:8] = torch.tensor([1.0, 0.0, 0.0, 0.0])  # confidence exactly 1.0 (the last edge)
    probs[8:16] = torch.tensor([0.4, 0.2, 0.2, 0.2])  # exactly on an inner edge (6/15)
    got = _fed("multiclass", "probabilities", probs, target, 4)
    for norm, name in (("l1", "ece"), ("max", "mce")):
        expected = tmfc.multiclass_calibration_error(probs, target, 4, n_bins=15, norm=norm)
        assert got[name].item() == pytest.approx(expected.item(), abs=1e-6), name
    top, pred = probs.max(1)
    assert got["confidence"].item() == pytest.approx(top.mean().item(), abs=1e-6)
    brier = ((probs - torch.nn.functional.one_hot(target, 4)) ** 2).sum(1).mean()
    assert got["brier"].item() == pytest.approx(brier.item(), abs=1e-6)


def test_multiclass_calibration_from_logits_equals_torchmetrics():
    g = torch.Generator().manual_seed(1)
    target = torch.randint(0, 10, (500,), generator=g)
    logits = 4 * torch.randn(500, 10, generator=g) + 3 * torch.nn.functional.one_hot(target, 10)
    got = _fed("multiclass", "logits", logits, target, 10)
    expected = tmfc.multiclass_calibration_error(logits.softmax(1), target, 10, n_bins=15)
    assert got["ece"].item() == pytest.approx(expected.item(), abs=1e-5)


def test_binary_ece_equals_torchmetrics_with_probabilities_zero_and_one():
    g = torch.Generator().manual_seed(2)
    target = (torch.rand(300, generator=g) < 0.4).float()
    probs = (0.5 * target + 0.6 * torch.rand(300, generator=g)).clamp(0, 1)
    probs[:5], probs[5:10] = 0.0, 1.0
    got = _fed("binary", "probabilities", probs, target, 2)
    for norm, name in (("l1", "ece"), ("max", "mce")):
        expected = tmfc.binary_calibration_error(probs, target.long(), n_bins=15, norm=norm)
        assert got[name].item() == pytest.approx(expected.item(), abs=1e-6), name
    assert got["brier"].item() == pytest.approx(((probs - target) ** 2).mean().item(), abs=1e-6)


def test_ignored_rows_are_left_out_of_calibration():
    target = torch.tensor([0, 1, -100, 2])
    probs = torch.tensor([[0.9, 0.05, 0.05], [0.2, 0.7, 0.1], [0.1, 0.1, 0.8], [0.3, 0.3, 0.4]])
    got = _fed("multiclass", "probabilities", probs, target, 3)
    kept = target >= 0
    expected = tmfc.multiclass_calibration_error(probs[kept], target[kept], 3, n_bins=15)
    assert got["ece"].item() == pytest.approx(expected.item(), abs=1e-6)


def _record(ece, confidence, accuracy, samples):
    r = RunRecord()
    values = {"metrics/val/ece": ece, "metrics/val/confidence": confidence, "metrics/val/accuracy": accuracy}
    r.add_scalars(100, {**values, "errors/val/samples": samples})
    return r


@pytest.mark.parametrize(
    ("ece", "confidence", "accuracy", "samples", "over", "under"),
    [
        (0.18, 0.96, 0.78, 5000, True, False),  # far above the noise floor (0.017): over-confident
        (0.12, 0.62, 0.74, 5000, False, True),  # under-confident
        (0.12, 0.90, 0.78, 100, False, False),  # 100 samples: a calibrated model shows ~0.12, so nothing is said
        (0.03, 0.81, 0.78, 100000, False, False),  # above the floor but under ece_min: nothing
        (0.0499, 0.85, 0.80, 100000, False, False),  # just under ece_min
    ],
    ids=["over", "under", "noise", "small", "edge"],
)
def test_calibration_findings_hold_the_ece_against_its_noise(ece, confidence, accuracy, samples, over, under):
    r = _record(ece, confidence, accuracy, samples)
    assert bool(overconfident(r, DoctorConfig())) == over
    assert bool(underconfident(r, DoctorConfig())) == under
    if over:
        (finding,) = overconfident(r, DoctorConfig())
        assert "temperature scaling" in finding.message
        assert finding.evidence["noise_floor"] == pytest.approx(1.2 / samples**0.5)
