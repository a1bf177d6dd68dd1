"""Every metric MetricCurves logs equals torchmetrics' functional value on the full data, for random data fed in
random batch splits (the batched, merged states must not depend on how the epoch was cut). Classification values
come from the shared device counts (``ClassCounts``), regression values from torchmetrics itself."""

import numpy as np
import pytest
import torch
import torchmetrics.functional as tmf
import torchmetrics.functional.classification as tmfc
from hypothesis import given, settings
from hypothesis import strategies as st
from torchmetrics.functional.text import perplexity

from lightning_lossdiag.callbacks._metric_sets import METRIC_NAMES, build_metrics, update_metrics
from lightning_lossdiag.callbacks._task import TaskInfo
from lightning_lossdiag.stats.class_metrics import class_metrics
from lightning_lossdiag.stats.classification import ClassCounts

SETTINGS = settings(max_examples=25, deadline=None)
THRESHOLDS = 21


@st.composite
def split_data(draw, max_rows=120):
    n = draw(st.integers(4, max_rows))
    seed = draw(st.integers(0, 2**31 - 1))
    cuts = sorted(set(draw(st.lists(st.integers(1, n - 1), max_size=6))))
    return n, seed, [0, *cuts, n]


def feed(info, metrics, preds, target, bounds, budget=2**16):
    """Regression: the torchmetrics MetricCurves keeps; classification: the shared counts it reads instead."""
    if info.task != "regression":
        counts = ClassCounts(
            info.task, info.inputs, info.num_classes, class_dim=info.class_dim, thresholds=THRESHOLDS, budget=budget
        )
        for lo, hi in zip(bounds[:-1], bounds[1:], strict=True):
            counts.update(preds[lo:hi], target[lo:hi])
        return class_metrics(counts, list(metrics))
    for lo, hi in zip(bounds[:-1], bounds[1:], strict=True):
        update_metrics(info, metrics, preds[lo:hi], target[lo:hi])
    return {name: m.compute() for name, m in metrics.items()}


def assert_same(got, expected):
    assert set(got) == set(expected)
    for name, value in expected.items():
        ours = np.asarray(got[name].detach().double().cpu())
        ref = np.asarray(torch.as_tensor(value).double().cpu())
        # float32 states: r2 of 4 rows summed in batches vs at once differs in the 6th digit (seen: 6e-5 relative)
        np.testing.assert_allclose(ours, ref, rtol=2e-4, atol=1e-6, equal_nan=True, err_msg=name)


@SETTINGS
@given(data=split_data())
def test_regression_metrics(data):
    n, seed, bounds = data
    g = torch.Generator().manual_seed(seed)
    target = torch.randn(n, generator=g) * 3
    preds = target + torch.randn(n, generator=g)
    info = TaskInfo("regression", "values")
    got = feed(info, build_metrics(info, THRESHOLDS, None, sequence=False), preds, target, bounds)
    expected = {
        "mae": tmf.mean_absolute_error(preds, target),
        "mse": tmf.mean_squared_error(preds, target),
        "rmse": tmf.mean_squared_error(preds, target, squared=False),
        "r2": tmf.r2_score(preds, target),
        "explained_variance": tmf.explained_variance(preds, target),
    }
    assert_same(got, expected)


@SETTINGS
@given(data=split_data())
def test_binary_metrics(data):
    n, seed, bounds = data
    g = torch.Generator().manual_seed(seed)
    target = (torch.rand(n, generator=g) < 0.3).float()
    probs = (0.6 * target + 0.7 * torch.rand(n, generator=g)).clamp(0, 1)
    info = TaskInfo("binary", "probabilities", 2)
    got = feed(info, build_metrics(info, THRESHOLDS, None, sequence=False), probs, target, bounds)
    t = target.long()
    labels = (probs > 0.5).long()
    recalls = [float(((labels == c) & (t == c)).sum()) / max(1, int((t == c).sum())) for c in (0, 1)]
    expected = {
        "accuracy": tmfc.binary_accuracy(labels, t),
        "precision": tmfc.binary_precision(labels, t),
        "recall": tmfc.binary_recall(labels, t),
        "f1": tmfc.binary_f1_score(labels, t),
        "auroc": tmfc.binary_auroc(probs, t, thresholds=THRESHOLDS),
        "average_precision": tmfc.binary_average_precision(probs, t, thresholds=THRESHOLDS),
        "balanced_accuracy": np.mean([r for r, c in zip(recalls, (0, 1), strict=True) if int((t == c).sum())]),
    }
    calibration = {"ece", "mce", "ece_adaptive", "ece_classwise", "brier", "confidence"}  # test_calibration.py
    assert set(got) == set(METRIC_NAMES["binary"]) - calibration
    assert_same(got, expected)


@SETTINGS
@given(data=split_data(), classes=st.integers(3, 5))
def test_multiclass_metrics_from_logits(data, classes):
    n, seed, bounds = data
    g = torch.Generator().manual_seed(seed)
    target = torch.randint(0, classes, (n,), generator=g)
    logits = torch.randn(n, classes, generator=g) + 2.0 * torch.nn.functional.one_hot(target, classes)
    info = TaskInfo("multiclass", "logits", classes)
    got = feed(info, build_metrics(info, THRESHOLDS, None, sequence=False), logits, target, bounds)
    probs = logits.softmax(dim=1)
    kw = {"num_classes": classes}
    expected = {
        "accuracy": tmfc.multiclass_accuracy(probs, target, average="micro", **kw),
        "precision": tmfc.multiclass_precision(probs, target, average="macro", **kw),
        "recall": tmfc.multiclass_recall(probs, target, average="macro", **kw),
        "f1": tmfc.multiclass_f1_score(probs, target, average="macro", **kw),
        "auroc": tmfc.multiclass_auroc(probs, target, thresholds=THRESHOLDS, **kw),
        "average_precision": tmfc.multiclass_average_precision(probs, target, thresholds=THRESHOLDS, **kw),
        "recall_per_class": tmfc.multiclass_recall(probs, target, average=None, **kw),
    }
    assert_same(got, expected)


@SETTINGS
@given(data=split_data(), labels=st.integers(2, 4))
def test_multilabel_metrics(data, labels):
    n, seed, bounds = data
    g = torch.Generator().manual_seed(seed)
    target = (torch.rand(n, labels, generator=g) < 0.4).long()
    probs = (0.5 * target + 0.6 * torch.rand(n, labels, generator=g)).clamp(0, 1)
    info = TaskInfo("multilabel", "probabilities", labels)
    got = feed(info, build_metrics(info, THRESHOLDS, None, sequence=False), probs, target, bounds)
    kw = {"num_labels": labels}
    expected = {
        "accuracy": tmfc.multilabel_accuracy(probs, target, average="micro", **kw),
        "precision": tmfc.multilabel_precision(probs, target, average="macro", **kw),
        "recall": tmfc.multilabel_recall(probs, target, average="macro", **kw),
        "f1": tmfc.multilabel_f1_score(probs, target, average="macro", **kw),
        "auroc": tmfc.multilabel_auroc(probs, target, thresholds=THRESHOLDS, **kw),
        "average_precision": tmfc.multilabel_average_precision(probs, target, thresholds=THRESHOLDS, **kw),
        "recall_per_class": tmfc.multilabel_recall(probs, target, average=None, **kw),
    }
    assert_same(got, expected)


@pytest.mark.parametrize("task", sorted(METRIC_NAMES))
def test_each_task_has_its_metrics(task):
    info = TaskInfo(task, "values" if task == "regression" else "probabilities", None if task == "regression" else 3)
    from_counts = {
        "top5_accuracy",
        "perplexity",
        "ece",
        "mce",
        "ece_adaptive",
        "ece_classwise",
        "brier",
        "confidence",
    }  # computed from the shared counts only, never by torchmetrics here
    assert set(build_metrics(info, THRESHOLDS, None, sequence=True)) == set(METRIC_NAMES[task]) - from_counts


def test_balanced_accuracy_of_an_epoch_with_one_class_is_that_class_recall():
    # scikit-learn's definition: a class without target rows does not count (a macro recall would count it as 0)
    info = TaskInfo("binary", "probabilities", 2)
    metrics = build_metrics(info, THRESHOLDS, ["balanced_accuracy"], sequence=False)
    got = feed(info, metrics, torch.tensor([0.9, 0.2, 0.1, 0.3]), torch.zeros(4), [0, 1, 4])
    assert got["balanced_accuracy"].item() == pytest.approx(0.75)  # 3 of the 4 negatives are predicted negative


@settings(max_examples=8, deadline=None)
@given(data=split_data(max_rows=60), layout=st.sampled_from(["flat", "btv", "nchw"]))
def test_thousand_classes_dense_outputs_and_ignored_targets(data, layout):
    # 1,000 classes handed over as (N, C), (B, T, V) or (N, C, H, W), with ignored targets (-100); the budget covers
    # every row here, so the curves are exact and every value equals torchmetrics' on the rows that are not ignored
    n, seed, bounds = data
    classes = 1000
    g = torch.Generator().manual_seed(seed)
    target = torch.randint(0, classes, (n, 3), generator=g)
    target[torch.rand(n, 3, generator=g) < 0.1] = -100
    logits = torch.randn(n, 3, classes, generator=g) + 4.0 * torch.nn.functional.one_hot(target.clamp_min(0), classes)
    flat_logits, flat_target = logits.reshape(-1, classes), target.reshape(-1)
    target_bt = target.clone()  # (N, 3): the sequences torchmetrics' perplexity takes with (N, 3, C) logits
    if layout == "btv":
        preds, class_dim = logits, -1
    elif layout == "nchw":
        preds, class_dim = logits.permute(0, 2, 1).unsqueeze(-1), 1  # (N, C, 3, 1) with (N, 3, 1) labels
        target = target.unsqueeze(-1)
    else:
        preds, target, class_dim, bounds = flat_logits, flat_target, 1, [3 * b for b in bounds]
    info = TaskInfo("multiclass", "logits", classes, class_dim)
    names = ["accuracy", "precision", "recall", "f1", "auroc", "average_precision", "recall_per_class"]
    names += ["top5_accuracy", "perplexity"]
    got = feed(info, dict.fromkeys(names), preds, target, bounds, budget=classes * 3 * n)
    keep = flat_target >= 0
    probs, kept = flat_logits[keep].softmax(dim=1), flat_target[keep]
    kw = {"num_classes": classes}
    expected = {
        "accuracy": tmfc.multiclass_accuracy(probs, kept, average="micro", **kw),
        "precision": tmfc.multiclass_precision(probs, kept, average="macro", **kw),
        "recall": tmfc.multiclass_recall(probs, kept, average="macro", **kw),
        "f1": tmfc.multiclass_f1_score(probs, kept, average="macro", **kw),
        "auroc": tmfc.multiclass_auroc(probs, kept, thresholds=THRESHOLDS, **kw),
        "average_precision": tmfc.multiclass_average_precision(probs, kept, thresholds=THRESHOLDS, **kw),
        "recall_per_class": tmfc.multiclass_recall(probs, kept, average=None, **kw),
        "top5_accuracy": tmfc.multiclass_accuracy(probs, kept, top_k=5, average="micro", **kw),
        "perplexity": perplexity(logits, target_bt, ignore_index=-100),
    }
    assert_same(got, expected)


def test_sampled_curves_stay_unbiased_at_a_small_budget():
    # 1,000 classes, 100 batches of 64 rows, a budget of 10 rows per batch: the sampled AUROC and AP stay near the
    # exact ones, and the every-row statistics (accuracy, recall) are exact whatever the budget
    classes, g = 1000, torch.Generator().manual_seed(0)
    target = torch.randint(0, 50, (6400,), generator=g) * 20  # 50 classes present
    logits = torch.randn(6400, classes, generator=g) + 3.0 * torch.nn.functional.one_hot(target, classes)
    exact = ClassCounts("multiclass", "logits", classes, thresholds=THRESHOLDS, budget=64 * classes)
    sampled = ClassCounts("multiclass", "logits", classes, thresholds=THRESHOLDS, budget=10 * classes)
    for lo in range(0, 6400, 64):
        exact.update(logits[lo : lo + 64], target[lo : lo + 64])
        sampled.update(logits[lo : lo + 64], target[lo : lo + 64])
    a, b = class_metrics(exact), class_metrics(sampled)
    assert a["accuracy"].item() == b["accuracy"].item()
    assert torch.equal(a["recall_per_class"], b["recall_per_class"])
    # each sampled row weighs 6.4: the curve counts keep the totals of the exact ones (same expected value)
    assert sampled.curves[:, 1].sum().item() == pytest.approx(exact.curves[:, 1].sum().item(), rel=0.05)
    assert b["auroc"].item() == pytest.approx(a["auroc"].item(), abs=0.02)
    assert b["average_precision"].item() == pytest.approx(a["average_precision"].item(), abs=0.05)
    assert a["auroc"].item() != b["auroc"].item()  # the sample really is a sample
