"""Binned curves: bins equal a binary search exactly, areas equal torchmetrics', sampled weights keep totals."""

import pytest
import torch
import torchmetrics.functional.classification as tmfc

from lightning_lossdiag.stats.curves import (
    add_curve_counts,
    binned_auroc,
    binned_average_precision,
    curve_thresholds,
    threshold_bins,
)


@pytest.mark.parametrize("num", [2, 11, 101, 1000])
def test_threshold_bins_equal_a_binary_search_at_every_edge(num):
    th = curve_thresholds(num)
    edges = torch.cat([th, th.nextafter(torch.tensor(2.0)), th.nextafter(torch.tensor(-1.0))])
    g = torch.Generator().manual_seed(num)
    x = torch.cat([torch.rand(200_000, generator=g), edges, torch.tensor([-3.0, 5.0, float("nan"), -1e-45])])
    expected = torch.bucketize(torch.nan_to_num(x, nan=-1.0), th, right=True) - 1
    assert torch.equal(threshold_bins(x, th), expected)


@pytest.mark.parametrize("classes", [1, 5])
def test_areas_equal_torchmetrics_binned_ones(classes):
    g = torch.Generator().manual_seed(classes)
    n, t = 500, 21
    if classes == 1:
        target = (torch.rand(n, generator=g) < 0.3).long()
        probs = (0.4 * target + 0.7 * torch.rand(n, generator=g)).clamp(0, 1)
        counts = torch.zeros(1, 2, t, dtype=torch.float64)
        add_curve_counts(counts, probs[:, None], target[:, None], torch.ones(n), curve_thresholds(t))
        auroc = tmfc.binary_auroc(probs, target, thresholds=t)
        ap = tmfc.binary_average_precision(probs, target, thresholds=t)
    else:
        target = torch.randint(0, classes - 1, (n,), generator=g)  # the last class never occurs: area 0 there
        probs = (torch.randn(n, classes, generator=g) + torch.nn.functional.one_hot(target, classes)).softmax(1)
        counts = torch.zeros(classes, 2, t, dtype=torch.float64)
        positive = target[:, None] == torch.arange(classes)
        add_curve_counts(counts, probs, positive, torch.ones(n), curve_thresholds(t))
        auroc = tmfc.multiclass_auroc(probs, target, classes, thresholds=t)
        ap = tmfc.multiclass_average_precision(probs, target, classes, thresholds=t)
    assert binned_auroc(counts).mean().item() == pytest.approx(auroc.item(), abs=1e-6)
    assert binned_average_precision(counts).mean().item() == pytest.approx(ap.item(), abs=1e-6)


def test_weights_scale_counts_and_zero_weights_drop_rows():
    th = curve_thresholds(5)
    probs = torch.tensor([[0.1], [0.6], [0.9]])
    positive = torch.tensor([[0], [1], [1]])
    counts = torch.zeros(1, 2, 5, dtype=torch.float64)
    add_curve_counts(counts, probs, positive, torch.tensor([2.5, 0.0, 2.5]), th)
    assert counts[0, 0].tolist() == [2.5, 0.0, 0.0, 0.0, 0.0]  # the negative at 0.1: bin of threshold 0.0
    assert counts[0, 1].tolist() == [0.0, 0.0, 0.0, 2.5, 0.0]  # 0.9 >= 0.75; the 0.6 row weighs 0
