"""Per-class views: per-class dashboards for small tasks, bounded and readable ones at 1,000+ classes."""

import os

import numpy as np
import pytest
import torch
import torchmetrics.functional.classification as tmfc
from tensorboard.backend.event_processing.event_accumulator import STORE_EVERYTHING_SIZE_GUIDANCE, EventAccumulator
from tensorboard.util import tensor_util
from torch.utils.tensorboard import SummaryWriter

from lightning_lossdiag.dashboards import class_views, figures
from lightning_lossdiag.dashboards.class_views import (
    ClassSummary,
    confusion_subset,
    per_class_table,
    worst_classes,
    write_class_views,
)
from lightning_lossdiag.dashboards.pr_curves import confusion_at_thresholds, pr_curve_raw_args
from lightning_lossdiag.stats.curves import add_curve_counts, curve_thresholds

PREFIX = "errors/val"
T = 21
K = 10


def _many_tags(k=K, confusion=True, pairs=True):
    tags = {"pr_curve/micro", "class_recall", "class_precision", "worst_classes"}
    tags |= {f"pr_curve/worst_{r:02d}" for r in range(1, k + 1)}
    tags |= {"confusion_matrix"} if confusion else set()
    tags |= {"confused_pairs"} if pairs else set()
    return {f"{PREFIX}/{t}" for t in tags}


def _simulate(num_classes, rows, seed=0):
    """A multiclass epoch: classes 0, 7, 14, ... never occur; class c is often taken for c + 1."""
    rng = np.random.default_rng(seed)
    y = rng.integers(0, num_classes, rows)
    y = np.where(y % 7 == 0, (y + 1) % num_classes, y)
    roll = rng.random(rows)
    pred = np.where(roll < 0.6, y, np.where(roll < 0.85, (y + 1) % num_classes, rng.integers(0, num_classes, rows)))
    off = y != pred
    cells, counts = np.unique(np.stack([y[off], pred[off]], 1), axis=0, return_counts=True)
    order = np.lexsort((cells[:, 1], cells[:, 0], -counts))[:200]
    return ClassSummary(
        "multiclass",
        support=np.bincount(y, minlength=num_classes),
        predicted=np.bincount(pred, minlength=num_classes),
        correct=np.bincount(y[~off], minlength=num_classes),
        pos=rng.integers(0, 6, (num_classes, T)).astype(float),
        neg=rng.integers(0, 60, (num_classes, T)).astype(float),
        pairs=[(int(cells[i, 0]), int(cells[i, 1]), float(counts[i])) for i in order],
    )


def _write(tmp_path, summary, **kwargs):
    writer = SummaryWriter(str(tmp_path))
    tags = write_class_views(writer, PREFIX, 7, summary, **kwargs)
    writer.close()
    acc = EventAccumulator(str(tmp_path), size_guidance=STORE_EVERYTHING_SIZE_GUIDANCE)
    acc.Reload()
    found = {t for kind in ("images", "tensors", "histograms", "scalars") for t in acc.Tags()[kind]}
    # the returned tags are exactly what the event file holds (add_text stores "<tag>/text_summary", as for `worst`)
    found = {t.removesuffix("/text_summary") for t in found}
    assert set(tags) == found
    assert len(tags) == len(found)
    return acc, found


def _curve(acc, tag):
    (event,) = acc.Tensors(tag)
    return tensor_util.make_ndarray(event.tensor_proto)  # rows: tp, fp, tn, fn, precision, recall


def _expected_curve(pos, neg):
    tp, fp, tn, fn = (
        t[0].numpy() for t in confusion_at_thresholds(torch.as_tensor(pos[None]), torch.as_tensor(neg[None]))
    )
    args = pr_curve_raw_args(tp, fp, tn, fn)
    return np.stack(
        [
            args[k]
            for k in (
                "true_positive_counts",
                "false_positive_counts",
                "true_negative_counts",
                "false_negative_counts",
                "precision",
                "recall",
            )
        ]
    )


def _table_rows(acc, tag):
    (event,) = acc.Tensors(f"{tag}/text_summary")
    text = tensor_util.make_ndarray(event.tensor_proto).item().decode()
    lines = text.splitlines()
    header = [c.strip() for c in lines[0].strip("|").split("|")]
    return [dict(zip(header, (c.strip() for c in line.strip("|").split("|")), strict=True)) for line in lines[2:]]


def _direct_worst(summary, k):
    s, p, c = summary.support, summary.predicted, summary.correct
    f1 = {i: 2 * c[i] / (s[i] + p[i]) for i in range(len(s)) if s[i] > 0}
    return sorted(f1, key=lambda i: (f1[i], c[i] / s[i], i))[:k]


def test_small_multiclass_keeps_todays_per_class_views(tmp_path):
    rng = np.random.default_rng(1)
    confusion = rng.integers(0, 20, (5, 5)).astype(float) + np.diag([30.0] * 5)
    pos, neg = rng.integers(0, 9, (5, T)).astype(float), rng.integers(0, 40, (5, T)).astype(float)
    summary = ClassSummary("multiclass", confusion.sum(1), confusion.sum(0), np.diag(confusion), pos, neg, confusion)
    acc, tags = _write(tmp_path, summary)
    assert tags == {
        f"{PREFIX}/{t}" for t in ["confusion_matrix", "worst_classes", *(f"pr_curve/{c}" for c in range(5))]
    }
    for c in range(5):
        np.testing.assert_allclose(_curve(acc, f"{PREFIX}/pr_curve/{c}"), _expected_curve(pos[c], neg[c]), rtol=1e-6)
    rows = _table_rows(acc, f"{PREFIX}/worst_classes")
    assert [int(r["class"]) for r in rows] == _direct_worst(summary, K)
    assert rows[0]["PR curve"] == f"{PREFIX}/pr_curve/{rows[0]['class']}"


def test_small_binary_writes_only_the_positive_class_curve(tmp_path):
    confusion = np.array([[40.0, 10.0], [5.0, 45.0]])
    pos, neg = np.arange(T, dtype=float)[None], np.arange(T, dtype=float)[None, ::-1].copy()
    summary = ClassSummary("binary", confusion.sum(1), confusion.sum(0), np.diag(confusion), pos, neg, confusion)
    acc, tags = _write(tmp_path, summary)
    assert tags == {f"{PREFIX}/confusion_matrix", f"{PREFIX}/pr_curve/1", f"{PREFIX}/worst_classes"}
    np.testing.assert_allclose(_curve(acc, f"{PREFIX}/pr_curve/1"), _expected_curve(pos[0], neg[0]), rtol=1e-6)


def test_thousand_classes_bounded_tags_micro_curve_worst_ranks_and_histograms(tmp_path, monkeypatch):
    drawn = []

    def spy(counts, names, **kwargs):
        drawn.append((counts, names, kwargs))
        return figures.confusion_matrix_figure(counts, names, **kwargs)

    monkeypatch.setattr(class_views, "confusion_matrix_figure", spy)
    summary = _simulate(1000, 30_000)
    acc, tags = _write(tmp_path, summary)
    ((counts, names, kwargs),) = drawn
    # at most 20 rows/cols, so the figure still prints its cell shares and the tick labels stay apart
    assert counts.shape == (20, 20)
    assert names[-1] == "other"
    assert "of 1000 classes" in kwargs["title"]
    assert tags == _many_tags()
    micro = _curve(acc, f"{PREFIX}/pr_curve/micro")
    np.testing.assert_allclose(micro, _expected_curve(summary.pos.sum(0), summary.neg.sum(0)), rtol=1e-6)
    assert micro[0, 0] == summary.pos.sum()  # every positive of every class is predicted at threshold 0

    expected_worst = _direct_worst(summary, K)
    rows = _table_rows(acc, f"{PREFIX}/worst_classes")
    assert [int(r["class"]) for r in rows] == expected_worst
    for rank, (row, c) in enumerate(zip(rows, expected_worst, strict=True), start=1):
        tag = f"{PREFIX}/pr_curve/worst_{rank:02d}"
        assert row["PR curve"] == tag
        assert int(row["support"]) == summary.support[c]
        np.testing.assert_allclose(_curve(acc, tag), _expected_curve(summary.pos[c], summary.neg[c]), rtol=1e-6)

    recall = acc.Histograms(f"{PREFIX}/class_recall")[0].histogram_value
    assert recall.num == (summary.support > 0).sum() < 1000  # classes 0, 7, 14, ... have no support
    assert sum(recall.bucket) == recall.num
    precision = acc.Histograms(f"{PREFIX}/class_precision")[0].histogram_value
    assert precision.num == (summary.predicted > 0).sum()

    pairs = _table_rows(acc, f"{PREFIX}/confused_pairs")
    assert len(pairs) == 20
    t, p, n = summary.pairs[0]
    assert (pairs[0]["true"], pairs[0]["predicted"], int(pairs[0]["count"])) == (str(t), str(p), n)
    assert float(pairs[0]["share of the true class"]) == pytest.approx(n / summary.support[t], abs=1e-4)
    (image,) = acc.Images(f"{PREFIX}/confusion_matrix")
    assert image.height <= 1000


def test_five_thousand_classes_same_bounded_tags_and_under_one_mib(tmp_path):
    _, tags = _write(tmp_path, _simulate(5000, 60_000, seed=2))
    assert tags == _many_tags()
    (path,) = [os.path.join(tmp_path, f) for f in os.listdir(tmp_path) if f.startswith("events.out.tfevents")]
    assert os.path.getsize(path) < 1024 * 1024


def test_multilabel_thousand_labels_has_no_confusion_image(tmp_path):
    rng = np.random.default_rng(3)
    support = rng.integers(0, 50, 1000)
    correct = rng.integers(0, support + 1)
    summary = ClassSummary(
        "multilabel",
        support,
        correct + rng.integers(0, 20, 1000),
        correct,
        rng.integers(0, 6, (1000, T)).astype(float),
        rng.integers(0, 60, (1000, T)).astype(float),
    )
    acc, tags = _write(tmp_path, summary)
    assert tags == _many_tags(confusion=False, pairs=False)
    assert [int(r["class"]) for r in _table_rows(acc, f"{PREFIX}/worst_classes")] == _direct_worst(summary, K)
    with pytest.raises(ValueError, match="multilabel"):
        confusion_subset(summary, 5)


# true \ pred: a, b, c, d, e
HAND = np.array(
    [
        [10, 3, 0, 1, 0],
        [4, 8, 0, 0, 0],
        [0, 0, 6, 0, 2],
        [0, 0, 0, 5, 0],
        [1, 0, 0, 0, 7],
    ],
    dtype=float,
)
HAND_PAIRS = [(1, 0, 4.0), (0, 1, 3.0), (2, 4, 2.0), (0, 3, 1.0), (4, 0, 1.0)]


def _hand(**kwargs):
    return ClassSummary(
        "multiclass",
        HAND.sum(1),
        HAND.sum(0),
        np.diag(HAND),
        np.zeros((5, T)),
        np.zeros((5, T)),
        names=list("abcde"),
        **kwargs,
    )


def test_confusion_subset_places_pairs_and_keeps_row_sums():
    counts, names = confusion_subset(_hand(pairs=HAND_PAIRS), 2)
    assert names == ["b", "a", "other"]
    # b->a = 4 and a->b = 3 in their cells; a's miss to d goes to "other"; e->a (1) is the "other" row under a
    np.testing.assert_array_equal(counts, [[8, 4, 0], [3, 10, 1], [0, 1, 20]])
    np.testing.assert_array_equal(counts.sum(1)[:-1], HAND.sum(1)[[1, 0]])
    assert counts.sum(1)[-1] == HAND.sum(1)[[2, 3, 4]].sum()
    assert counts.sum() == HAND.sum()

    counts3, names3 = confusion_subset(_hand(pairs=HAND_PAIRS), 3)
    assert names3 == ["b", "a", "c", "other"]  # e (the partner of c) would be a 4th class
    sel = [1, 0, 2]
    np.testing.assert_array_equal(counts3[:-1, :-1], HAND[np.ix_(sel, sel)])
    np.testing.assert_array_equal(counts3.sum(1)[:-1], HAND.sum(1)[sel])
    np.testing.assert_array_equal(counts3.sum(0)[:-1], HAND.sum(0)[sel])
    assert counts3[2, 3] == 2  # c -> e is in "other"
    from_matrix, _ = confusion_subset(_hand(confusion=HAND), 3)  # pairs taken from the full matrix
    np.testing.assert_array_equal(from_matrix, counts3)


def test_per_class_table_matches_direct_formulas_and_torchmetrics_ap():
    g = torch.Generator().manual_seed(4)
    probs = torch.rand(300, 4, generator=g)
    positive = (probs + 0.6 * torch.rand(300, 4, generator=g)) > 0.9
    positive[:, 3] = False  # label 3 has no positives
    counts = torch.zeros(4, 2, T)
    add_curve_counts(counts, probs, positive, torch.ones(300), curve_thresholds(T))
    pos, neg = counts[:, 1].long(), counts[:, 0].long()
    support = np.array([10.0, 8.0, 5.0, 0.0])
    predicted = np.array([12.0, 0.0, 5.0, 3.0])
    correct = np.array([6.0, 0.0, 5.0, 0.0])
    table = per_class_table(ClassSummary("multilabel", support, predicted, correct, pos.numpy(), neg.numpy()))
    with np.errstate(invalid="ignore", divide="ignore"):
        recall, precision = correct / support, correct / predicted
    np.testing.assert_allclose(table["recall"], recall)  # NaN where there is no support
    np.testing.assert_allclose(table["precision"], precision)  # NaN where nothing is predicted
    assert np.isnan(table["recall"][3])
    assert np.isnan(table["precision"][1])
    np.testing.assert_allclose(table["f1"][[0, 2]], (2 * precision * recall / (precision + recall))[[0, 2]])
    np.testing.assert_array_equal(table["f1"][[1, 3]], 0.0)  # 2 tp / (2 tp + fp + fn) with tp = 0
    for c in range(3):
        expected = tmfc.binary_average_precision(probs[:, c], positive[:, c].long(), thresholds=T)
        assert table["average_precision"][c] == pytest.approx(float(expected), abs=1e-6)
    assert np.isnan(table["average_precision"][3])
    assert worst_classes(ClassSummary("multilabel", support, predicted, correct, pos.numpy(), neg.numpy()), 9) == [
        1,
        0,
        2,
    ]


def test_bad_inputs_say_what_was_expected():
    with pytest.raises(ValueError, match="`task` must be one of"):
        ClassSummary("regression", [1], [1], [1], np.zeros((1, T)), np.zeros((1, T)))
    with pytest.raises(ValueError, match=r"`pos` and `neg` must both be \(3, T\)"):
        ClassSummary("multiclass", [1, 2, 3], [1, 2, 3], [1, 2, 3], np.zeros((1, T)), np.zeros((1, T)))
    with pytest.raises(ValueError, match="`k` must be an integer >= 1"):
        write_class_views(None, PREFIX, 0, _hand(), k=0)
