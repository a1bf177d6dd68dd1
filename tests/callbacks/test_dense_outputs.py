"""Dense outputs as users hand them: the class dimension from shapes (or the option), clear errors where it cannot be
told, and ignored targets left out of every statistic and metric."""

import pytest
import torch
import torchmetrics.functional.classification as tmfc

from lightning_lossdiag import ErrorDistributionMonitor, MetricCurves
from lightning_lossdiag.callbacks._task import class_dimension, infer_task_info
from lightning_lossdiag.stats.class_metrics import class_metrics
from lightning_lossdiag.stats.classification import ClassCounts


@pytest.mark.parametrize(
    ("preds", "target", "dim"),
    [
        ((8, 21, 6, 6), (8, 6, 6), 1),  # segmentation logits, torch's (N, C, H, W)
        ((2, 16, 1000), (2, 16), 2),  # a language model's (B, T, V)
        ((32, 1000), (32,), 1),  # flattened (B*T, V)
        ((4, 5, 7, 9), (4, 7, 9), 1),
    ],
    ids=["nchw", "btv", "flat", "nc_d1_d2"],
)
def test_the_class_dimension_comes_from_the_shapes(preds, target, dim):
    info = infer_task_info(None, torch.randn(preds), torch.randint(0, 5, target))
    assert info.task == "multiclass"
    assert (info.class_dim % len(preds)) == dim
    assert info.num_classes == preds[dim]


def test_shapes_that_fit_both_dims_ask_for_class_dim_and_the_option_settles_it():
    preds, target = torch.randn(4, 7, 7), torch.randint(0, 7, (4, 7))
    with pytest.raises(ValueError, match=r"cannot tell the class dimension .*\(4, 7, 7\).*class_dim=-1"):
        infer_task_info(None, preds, target)
    assert infer_task_info(None, preds, target, class_dim=-1).class_dim == -1
    assert infer_task_info(None, preds, target, class_dim=1).class_dim == 1


def test_shapes_that_fit_no_class_dim_say_what_was_expected():
    with pytest.raises(ValueError, match=r"targets must have the predictions' shape without the class dimension -1"):
        class_dimension(torch.zeros(2, 16, 50), torch.zeros(2, 15), "multiclass", -1)
    with pytest.raises(ValueError, match=r"do not fit targets"):
        class_dimension(torch.zeros(2, 16, 50), torch.zeros(3, 15), "multiclass")


@pytest.mark.parametrize("cls", [ErrorDistributionMonitor, MetricCurves])
@pytest.mark.parametrize(("option", "value"), [("class_dim", 2), ("class_dim", True), ("ignore_index", 1.5)])
def test_bad_options_name_the_argument_and_what_is_allowed(cls, option, value):
    with pytest.raises(ValueError, match=rf"`{option}` must be .*got {value!r}"):
        cls(**{option: value})


def test_a_criterion_ignore_index_is_taken():
    info = infer_task_info(torch.nn.CrossEntropyLoss(ignore_index=0), torch.randn(8, 5), torch.randint(0, 5, (8,)))
    assert info.ignore_index == 0


def test_ignore_index_inside_the_class_range_is_left_out_of_every_statistic():
    # class 0 is "background": ignore_index=0 drops its rows from counts, curves, worst rows and histograms
    g = torch.Generator().manual_seed(3)
    target = torch.randint(0, 4, (6, 5, 5), generator=g)
    logits = torch.randn(6, 4, 5, 5, generator=g) + 2 * torch.nn.functional.one_hot(target, 4).permute(0, 3, 1, 2)
    counts = ClassCounts("multiclass", "logits", 4, ignore_index=0, thresholds=11)
    counts.update(logits, target)
    kept = target != 0
    n_kept = int(kept.sum())
    assert counts.rows.tolist() == [n_kept, target.numel() - n_kept]
    assert counts.per_class[0, 0].item() == 0  # no support for the ignored class
    assert counts.true_prob.counts.sum().item() == n_kept
    assert counts.curves[:, :, :].sum().item() == pytest.approx(4 * n_kept)  # every kept row once per curve
    assert set(counts.worst.rows[:, 2].tolist()) <= {1.0, 2.0, 3.0}  # the worst rows' true classes
    probs = logits.softmax(1)
    expected = tmfc.multiclass_accuracy(probs, target, 4, average="micro", ignore_index=0)
    assert class_metrics(counts)["accuracy"].item() == pytest.approx(expected.item())
    expected_auroc = tmfc.multiclass_auroc(probs, target, 4, thresholds=11, ignore_index=0)
    # torchmetrics scores the ignored class's curve 0 too (no positives left): the same macro mean
    assert class_metrics(counts)["auroc"].item() == pytest.approx(expected_auroc.item(), abs=1e-6)


def test_multilabel_targets_outside_zero_one_are_left_out():
    g = torch.Generator().manual_seed(4)
    target = (torch.rand(40, 6, generator=g) < 0.3).float()
    target[torch.rand(40, 6, generator=g) < 0.2] = -1  # unknown labels
    probs = torch.rand(40, 6, generator=g)
    counts = ClassCounts("multilabel", "probabilities", 6, thresholds=11)
    counts.update(probs, target)
    kept = target >= 0
    assert counts.label_rows.tolist() == kept.sum(0).double().tolist()
    got = class_metrics(counts, ["accuracy", "recall", "auroc"])
    t = target.long()
    kw = {"num_labels": 6, "ignore_index": -1}
    assert got["accuracy"].item() == pytest.approx(tmfc.multilabel_accuracy(probs, t, average="micro", **kw).item())
    assert got["recall"].item() == pytest.approx(tmfc.multilabel_recall(probs, t, **kw).item())
    assert got["auroc"].item() == pytest.approx(tmfc.multilabel_auroc(probs, t, thresholds=11, **kw).item(), abs=1e-6)
