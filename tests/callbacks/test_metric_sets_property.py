"""Every metric MetricCurves logs equals torchmetrics' functional value on the full data, for random data fed in
random batch splits (the batched, merged states must not depend on how the epoch was cut)."""

import numpy as np
import pytest
import torch
import torchmetrics.functional as tmf
import torchmetrics.functional.classification as tmfc
from hypothesis import given, settings
from hypothesis import strategies as st

from lightning_lossdiag.callbacks._metric_sets import METRIC_NAMES, build_metrics, update_metrics
from lightning_lossdiag.callbacks._task import TaskInfo

SETTINGS = settings(max_examples=25, deadline=None)
THRESHOLDS = 21


@st.composite
def split_data(draw, max_rows=120):
    n = draw(st.integers(4, max_rows))
    seed = draw(st.integers(0, 2**31 - 1))
    cuts = sorted(set(draw(st.lists(st.integers(1, n - 1), max_size=6))))
    return n, seed, [0, *cuts, n]


def feed(info, metrics, preds, target, bounds):
    for lo, hi in zip(bounds[:-1], bounds[1:], strict=True):
        update_metrics(info, metrics, preds[lo:hi], target[lo:hi])
    return {name: m.compute() for name, m in metrics.items()}


def assert_same(got, expected):
    assert set(got) == set(expected)
    for name, value in expected.items():
        ours = np.asarray(got[name].detach().double().cpu())
        ref = np.asarray(torch.as_tensor(value).double().cpu())
        np.testing.assert_allclose(ours, ref, rtol=1e-5, atol=1e-6, equal_nan=True, err_msg=name)


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
    assert set(got) == set(METRIC_NAMES["binary"])
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
    assert set(build_metrics(info, THRESHOLDS, None, sequence=True)) == set(METRIC_NAMES[task])


def test_balanced_accuracy_of_an_epoch_with_one_class_is_that_class_recall():
    # scikit-learn's definition: a class without target rows does not count (a macro recall would count it as 0)
    info = TaskInfo("binary", "probabilities", 2)
    metrics = build_metrics(info, THRESHOLDS, ["balanced_accuracy"], sequence=False)
    got = feed(info, metrics, torch.tensor([0.9, 0.2, 0.1, 0.3]), torch.zeros(4), [0, 1, 4])
    assert got["balanced_accuracy"].item() == pytest.approx(0.75)  # 3 of the 4 negatives are predicted negative
