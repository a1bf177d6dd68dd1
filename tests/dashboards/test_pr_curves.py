"""Binned PR counts equal torchmetrics' binned precision-recall curve and numpy counts; written raw curves read back."""

import numpy as np
import pytest
import torch
import torchmetrics.functional.classification as tmfc
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from tensorboard.util import tensor_util
from torch.utils.tensorboard import SummaryWriter

from lightning_lossdiag.dashboards.pr_curves import confusion_at_thresholds, pr_curve_raw_args, write_pr_curves
from lightning_lossdiag.stats.curves import add_curve_counts, curve_thresholds


def _counts(probs, positive, t):
    """The engine's binned counts (``stats.curves``), fed in several batches, as ``(pos, neg)`` integer arrays."""
    counts = torch.zeros(probs.shape[1], 2, t, dtype=torch.float32)
    thr = curve_thresholds(t)
    for chunk in range(0, probs.shape[0], 37):  # several batches
        rows = slice(chunk, chunk + 37)
        add_curve_counts(counts, probs[rows], positive[rows], torch.ones(probs[rows].shape[0]), thr)
    return counts[:, 1].long(), counts[:, 0].long()


def test_counts_equal_numpy_threshold_rule():
    g = torch.Generator().manual_seed(0)
    probs = torch.rand(500, 3, generator=g)
    probs[:5] = torch.tensor([0.0, 0.5, 1.0])  # exact threshold values
    positive = torch.rand(500, 3, generator=g) > 0.6
    pos, neg = _counts(probs, positive, 11)
    tp, fp, tn, fn = confusion_at_thresholds(pos, neg)
    thr = np.linspace(0, 1, 11, dtype=np.float32)
    p, y = probs.numpy(), positive.numpy()
    for c in range(3):
        pred = p[:, c, None] >= thr[None, :]
        np.testing.assert_array_equal(tp[c].numpy(), (pred & y[:, c, None]).sum(0))
        np.testing.assert_array_equal(fp[c].numpy(), (pred & ~y[:, c, None]).sum(0))
        np.testing.assert_array_equal(fn[c].numpy(), (~pred & y[:, c, None]).sum(0))
        np.testing.assert_array_equal(tn[c].numpy(), (~pred & ~y[:, c, None]).sum(0))


def test_precision_recall_equal_torchmetrics_binned_curve():
    g = torch.Generator().manual_seed(1)
    probs = torch.rand(400, generator=g)
    target = (probs + 0.4 * torch.rand(400, generator=g) > 0.7).long()
    pos, neg = _counts(probs[:, None], target[:, None], 101)
    tp, fp, tn, fn = confusion_at_thresholds(pos, neg)
    args = pr_curve_raw_args(tp[0], fp[0], tn[0], fn[0])
    precision, recall, thresholds = tmfc.binary_precision_recall_curve(probs, target, thresholds=101)
    tm_precision = precision[:-1].numpy()
    nothing_predicted = np.isnan(tm_precision)  # torchmetrics 1.9: 0/0 -> nan; we draw 1 (the curve's end point)
    assert nothing_predicted.any()
    np.testing.assert_array_equal(args["precision"][nothing_predicted], 1.0)
    np.testing.assert_array_equal((tp[0] + fp[0]).numpy()[nothing_predicted], 0)
    np.testing.assert_allclose(args["precision"][~nothing_predicted], tm_precision[~nothing_predicted], atol=1e-6)
    np.testing.assert_allclose(args["recall"], recall[:-1].numpy(), atol=1e-6)
    assert args["num_thresholds"] == 101


def test_write_pr_curves_reads_back(tmp_path):
    g = torch.Generator().manual_seed(2)
    probs = torch.rand(200, 2, generator=g)
    positive = torch.rand(200, 2, generator=g) > 0.5
    pos, neg = _counts(probs, positive, 21)
    writer = SummaryWriter(str(tmp_path))
    write_pr_curves(writer, "errors/val/pr_curve", pos.numpy(), neg.numpy(), ["0", "1"], step=3)
    writer.close()
    acc = EventAccumulator(str(tmp_path), size_guidance={"tensors": 0})
    acc.Reload()
    assert {"errors/val/pr_curve/0", "errors/val/pr_curve/1"} <= set(acc.Tags()["tensors"])
    event = acc.Tensors("errors/val/pr_curve/1")[0]
    data = tensor_util.make_ndarray(event.tensor_proto)
    assert data.shape == (6, 21)
    tp, fp, _, _ = confusion_at_thresholds(pos, neg)
    assert event.step == 3
    np.testing.assert_array_equal(data[0], tp[1].numpy())
    np.testing.assert_array_equal(data[1], fp[1].numpy())


def test_bad_threshold_count():
    with pytest.raises(ValueError, match="`thresholds` must be an integer >= 2"):
        curve_thresholds(1)
