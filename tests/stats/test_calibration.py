"""Calibration from the shared counts: ECE and MCE equal torchmetrics' (bin edges 0.0 and 1.0 included), the Brier
score equals its formula, the reliability diagram is written, and the findings hold the ECE against its noise. The
equal-mass ECE agrees with the exact one of sorted confidences within the merge's tolerance; the classwise ECE equals
torchmetrics' binary ECE of each class, averaged, and a direct reference."""

import numpy as np
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


# ---- equal-mass (adaptive) ECE: 1,024 fine bins merged into 15 of equal weight ----------------------------------


def _counts(task, inputs, preds, target, classes, chunk=4999, **kw):
    counts = ClassCounts(task, inputs, classes, thresholds=11, **kw)
    for lo in range(0, preds.shape[0], chunk):
        counts.update(preds[lo : lo + chunk], target[lo : lo + chunk])
    return counts


def _exact_equal_mass_ece(confidence, hit, bins=15):
    """Nixon et al.'s equal-mass ECE from every confidence sorted: rank r goes to bin floor(r * bins / N)."""
    order = np.argsort(confidence, kind="stable")
    c, h = confidence[order].astype(np.float64), hit[order].astype(np.float64)
    which = (np.arange(c.shape[0]) * bins) // c.shape[0]
    return float(np.abs(np.bincount(which, weights=h - c, minlength=bins)).sum() / c.shape[0])


def _merge_tolerance(fine, n, bins=15):
    """How far the merged fine bins may sit from the exact sort (the module docstring of stats/calibration.py).

    Only values in the fine bins at a boundary between equal-mass bins (within one rank of it: the exact bins put the
    boundary at a whole rank) can land in another bin than the exact sort puts them in, and moving one value changes
    two bins' sums. Of a straddled fine bin of weight W, the moved values' confidences are within 1/1024 of the
    proportional share's (``W / 1024``); their hits differ from the proportional share by the order of hits among
    near-equal confidences, a hypergeometric deviation of standard deviation at most ``sqrt(W) / 4``: allow two
    (``sqrt(W) / 2``); plus one value for the rounding of the boundary to a whole rank.
    """
    w = fine[0].double()
    upper = w.cumsum(0)
    lower = upper - w
    total = 0.0
    for b in range(1, bins):
        at = b * n / bins
        near = w[(lower <= at + 1) & (upper >= at - 1) & (w > 0)].sum().item()
        total += near**0.5 / 2 + near / 1024 + 1
    return 2 * total / n


def _calibrated_multiclass(n, seed, classes=10):
    g = torch.Generator().manual_seed(seed)
    logits = 2 * torch.randn(n, classes, generator=g)
    target = torch.multinomial(logits.softmax(1), 1, generator=g).squeeze(1)  # calibrated: the ECE is all noise
    return logits, target


@pytest.mark.parametrize("n", [20_000, 50_000], ids=["20k", "50k"])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_adaptive_ece_agrees_with_the_exact_equal_mass_ece_of_sorted_confidences(n, seed):
    # a calibrated model (targets drawn from its own probabilities): the hardest case for the merge, since the bins'
    # gaps are noise of both signs and nothing cancels the error of a misplaced value
    logits, target = _calibrated_multiclass(n, seed)
    counts = _counts("multiclass", "logits", logits, target, 10, budget=2**22)
    got = class_metrics(counts)["ece_adaptive"].item()
    confidence, pred = logits.softmax(1).max(1)
    exact = _exact_equal_mass_ece(confidence.numpy(), (pred == target).numpy())
    tol = _merge_tolerance(counts.calibration_fine, n)
    assert tol < 1.2 / n**0.5  # the tolerance is below the noise of the ECE itself at this sample count
    assert got == pytest.approx(exact, abs=tol)
    assert abs(got - exact) < tol / 4  # and in practice well inside it (observed: 0 to 1/10 of it)


def test_binary_adaptive_ece_is_the_positive_class_equal_mass_ece():
    g = torch.Generator().manual_seed(3)
    p = torch.rand(30_000, generator=g) ** 2
    target = (torch.rand(30_000, generator=g) < (0.8 * p + 0.1)).float()  # miscalibrated at both ends
    p[:50], p[50:100] = 0.0, 1.0
    counts = _counts("binary", "probabilities", p, target, 2)
    got = class_metrics(counts)["ece_adaptive"].item()
    exact = _exact_equal_mass_ece(p.numpy(), target.numpy())
    assert got == pytest.approx(exact, abs=_merge_tolerance(counts.calibration_fine, 30_000))
    assert got == pytest.approx(exact, rel=0.02)  # a real miscalibration: the merge error is a small part of it


def test_adaptive_ece_sees_gaps_that_cancel_inside_one_equal_width_bin():
    # every confidence in [0.47, 0.53) (one equal-width bin, ~61 fine ones): below 0.5 the hit rate is 0.9, above it
    # 0.1. The equal-width bin averages the two to a gap near 0; the equal-mass bins split them and see ~0.4
    g = torch.Generator().manual_seed(11)
    p = 0.47 + 0.06 * torch.rand(20_000, generator=g)
    target = (torch.rand(20_000, generator=g) < torch.where(p < 0.5, 0.9, 0.1)).float()
    counts = _counts("binary", "probabilities", p, target, 2)
    got = class_metrics(counts)
    exact = _exact_equal_mass_ece(p.numpy(), target.numpy())
    assert exact > 0.35
    assert got["ece"].item() < 0.05
    assert got["ece_adaptive"].item() == pytest.approx(exact, abs=_merge_tolerance(counts.calibration_fine, 20_000))


def test_adaptive_ece_is_exact_with_one_value_per_fine_bin_and_whole_bins():
    g = torch.Generator().manual_seed(4)
    fine_bin = torch.randperm(1024, generator=g)[:600]  # 600 values, one per fine bin: 15 bins of exactly 40
    p = (fine_bin.double() + torch.rand(600, generator=g, dtype=torch.float64)) / 1024
    target = (torch.rand(600, generator=g) < 0.5).float()
    counts = _counts("binary", "probabilities", p.float(), target, 2)
    exact = _exact_equal_mass_ece(p.float().numpy(), target.numpy())
    assert class_metrics(counts)["ece_adaptive"].item() == pytest.approx(exact, abs=1e-9)


def test_adaptive_ece_of_confidences_piled_in_one_fine_bin_is_their_gap():
    # every confidence within 1/1024 of 1.0: the merge cannot split them by confidence, so each equal-mass bin gets
    # the pile's mean accuracy and confidence, and the ECE is |accuracy - confidence| (the documented approximation)
    g = torch.Generator().manual_seed(5)
    p = 1 - torch.rand(3000, generator=g) / 2000
    target = (torch.rand(3000, generator=g) < 0.8).float()
    got = class_metrics(_counts("binary", "probabilities", p, target, 2))["ece_adaptive"].item()
    assert got == pytest.approx(abs(target.mean().item() - p.double().mean().item()), abs=1e-6)


# ---- classwise ECE (Nixon et al. 2019): each class's p_c against 1[y = c], 15 bins, mean over classes -----------


def _tm_classwise(probs, onehot):
    """The mean over classes of torchmetrics' binary ECE of each class's probability against its indicator."""
    return torch.stack(
        [
            tmfc.binary_calibration_error(probs[:, c].contiguous(), onehot[:, c].long(), n_bins=15)
            for c in range(probs.shape[1])
        ]
    ).mean()


def _reference_classwise(probs, onehot, bins=15):
    """A direct numpy reference: per class, bins ``[e_k, e_k+1)`` and 1.0 alone, ``sum |hits - conf| / N``.

    The edges are torch's float32 ``linspace(0, 1, 16)`` (torchmetrics' and ours): numpy's float32 edges differ from
    them in the last bit at some inner edges, which moves a probability of exactly 0.4 to the other bin.
    """
    p, y = probs.numpy().astype(np.float64), onehot.numpy().astype(np.float64)
    edges = torch.linspace(0, 1, bins + 1).numpy()
    out = []
    for c in range(p.shape[1]):
        which = np.searchsorted(edges, probs[:, c].numpy(), side="right") - 1
        gap = np.bincount(which, weights=y[:, c] - p[:, c], minlength=bins + 1)
        out.append(np.abs(gap).sum() / p.shape[0])
    return float(np.mean(out))


def test_multiclass_classwise_ece_equals_torchmetrics_per_class_with_probabilities_zero_and_one():
    g = torch.Generator().manual_seed(6)
    target = torch.randint(0, 5, (800,), generator=g)
    onehot = torch.nn.functional.one_hot(target, 5)
    probs = (torch.rand(800, 5, generator=g) + 2 * onehot).softmax(1)
    probs[:10] = torch.tensor([1.0, 0.0, 0.0, 0.0, 0.0])  # p = 1.0 and p = 0.0, the bin edges
    probs[10:20] = torch.tensor([0.4, 0.2, 0.2, 0.2, 0.0])  # on inner edges (6/15, 3/15)
    got = _fed("multiclass", "probabilities", probs, target, 5)["ece_classwise"].item()
    assert got == pytest.approx(_tm_classwise(probs, onehot).item(), abs=1e-6)
    assert got == pytest.approx(_reference_classwise(probs, onehot), abs=1e-6)


def test_multiclass_classwise_ece_from_logits_leaves_ignored_rows_out():
    g = torch.Generator().manual_seed(7)
    target = torch.randint(0, 4, (600,), generator=g)
    target[::7] = -100
    logits = 3 * torch.randn(600, 4, generator=g)
    kept = target >= 0
    probs = logits[kept].softmax(1)
    onehot = torch.nn.functional.one_hot(target[kept], 4)
    got = _fed("multiclass", "logits", logits, target, 4)["ece_classwise"].item()
    assert got == pytest.approx(_tm_classwise(probs, onehot).item(), abs=1e-5)
    assert got == pytest.approx(_reference_classwise(probs, onehot), abs=1e-5)


def test_binary_classwise_ece_is_the_two_class_value():
    g = torch.Generator().manual_seed(8)
    target = (torch.rand(500, generator=g) < 0.3).float()
    p = (0.4 * target + 0.7 * torch.rand(500, generator=g)).clamp(0, 1)
    p[:5], p[5:10] = 0.0, 1.0
    got = _fed("binary", "probabilities", p, target, 2)
    two = torch.stack([1 - p, p], 1)  # the binary task as two classes
    onehot = torch.stack([1 - target, target], 1)
    assert got["ece_classwise"].item() == pytest.approx(_tm_classwise(two, onehot).item(), abs=1e-6)
    as_multiclass = _fed("multiclass", "probabilities", two, target.long(), 2)["ece_classwise"]
    assert got["ece_classwise"].item() == pytest.approx(as_multiclass.item(), abs=1e-9)


def test_multilabel_calibration_is_each_label_as_binary():
    g = torch.Generator().manual_seed(9)
    target = (torch.rand(400, 6, generator=g) < 0.3).long()
    probs = (0.5 * target + 0.6 * torch.rand(400, 6, generator=g)).clamp(0, 1)
    probs[:4] = 1.0
    got = _fed("multilabel", "probabilities", probs, target, 6)  # 2,400 values fit the budget: every value counts
    assert got["ece_classwise"].item() == pytest.approx(_tm_classwise(probs, target).item(), abs=1e-6)
    flat = tmfc.binary_calibration_error(probs.reshape(-1), target.reshape(-1), n_bins=15)
    assert got["ece"].item() == pytest.approx(flat.item(), abs=1e-6)  # the pooled labels, positive-class
    exact = _exact_equal_mass_ece(probs.reshape(-1).numpy(), target.reshape(-1).numpy())
    counts = _counts("multilabel", "probabilities", probs, target, 6)
    assert got["ece_adaptive"].item() == pytest.approx(exact, abs=_merge_tolerance(counts.calibration_fine, 2400))


def test_classwise_state_at_many_classes_takes_the_sampled_budget_only():
    classes, rows, budget = 2000, 256, 2**12  # budget // classes = 2 sampled rows per update
    g = torch.Generator().manual_seed(10)
    counts = ClassCounts("multiclass", "logits", classes, thresholds=11, budget=budget)
    assert counts.classwise.shape == (classes, 3, 16)
    for _ in range(3):
        counts.update(torch.randn(rows, classes, generator=g), torch.randint(0, classes, (rows,), generator=g))
    weight = counts.classwise[:, 0]
    # each sampled row weighs rows / sampled: every class's weight is the rows counted, unbiased
    assert torch.allclose(weight.sum(-1), torch.full((classes,), 3.0 * rows, dtype=torch.float64))
    assert int((weight > 0).sum(-1).max()) <= 3 * 2  # at most the sampled rows' bins: O(budget) values per update
    value = class_metrics(counts, ["ece_classwise"])["ece_classwise"].item()
    assert 0.0 <= value < 1.0


def test_calibration_counts_travel_in_the_checkpoint_of_the_metric_counts():
    from types import SimpleNamespace

    from lightning_lossdiag.callbacks._class_engine import restore_counts, saved_counts

    g = torch.Generator().manual_seed(12)
    target = torch.randint(0, 3, (200,), generator=g)
    logits = torch.randn(200, 3, generator=g)
    counts = _counts("multiclass", "logits", logits, target, 3)
    saved = saved_counts(SimpleNamespace(counts=counts, drain=lambda: None))
    fresh = ClassCounts("multiclass", "logits", 3, thresholds=11)
    restore_counts(fresh, saved)
    names = ["ece", "mce", "ece_adaptive", "ece_classwise", "brier", "confidence"]
    before, after = class_metrics(counts, names), class_metrics(fresh, names)
    assert {k: v.item() for k, v in after.items()} == {k: v.item() for k, v in before.items()}


def test_binary_confidence_is_the_decisions_confidence_and_names_the_direction():
    # balanced labels, probabilities pushed to 0.02 / 0.98, 80 % right: over-confident. The positive-class mean
    # (~0.5) against the accuracy (0.8) would have called it under-confident.
    g = torch.Generator().manual_seed(0)
    n = 4000
    target = (torch.rand(n, generator=g) < 0.5).float()
    right = torch.rand(n, generator=g) < 0.8
    says_positive = torch.where(right, target, 1 - target)
    probs = torch.where(says_positive > 0, torch.tensor(0.98), torch.tensor(0.02))
    counts = ClassCounts("binary", "probabilities", 2, thresholds=11)
    counts.update(probs, target)
    values = {k: v.item() for k, v in class_metrics(counts, ["accuracy", "confidence", "ece"]).items()}
    assert values["confidence"] == pytest.approx(0.98, abs=1e-6)
    assert values["accuracy"] == pytest.approx(right.double().mean().item(), abs=1e-9)
    record = RunRecord()
    scalars = {f"metrics/val/{k}": v for k, v in values.items()}
    record.add_scalars(10, {**scalars, "errors/val/samples": float(n)})
    assert overconfident(record, DoctorConfig())
    assert not underconfident(record, DoctorConfig())
