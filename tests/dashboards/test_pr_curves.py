"""Binned PR counts equal torchmetrics' binned precision-recall curve and numpy counts; written raw curves read back."""

import numpy as np
import pytest
import torch
import torchmetrics.functional.classification as tmfc
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from tensorboard.util import tensor_util
from torch.utils.tensorboard import SummaryWriter

from lightning_lossdiag.dashboards.pr_curves import (
    confusion_at_thresholds,
    pr_curve_raw_args,
    pr_thresholds,
    update_pr_counts,
    write_pr_curves,
)


def _counts(probs, positive, t):
    pos = torch.zeros(probs.shape[1], t, dtype=torch.long)
    neg = torch.zeros_like(pos)
    thr = pr_thresholds(t)
    for chunk in range(0, probs.shape[0], 37):  # several batches
        update_pr_counts(pos, neg, probs[chunk : chunk + 37], positive[chunk : chunk + 37], thr)
    return pos, neg


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
    with pytest.raises(ValueError, match="`num_thresholds`"):
        pr_thresholds(1)
