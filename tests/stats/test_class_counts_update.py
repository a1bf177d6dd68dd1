"""ClassCounts' update in few kernels. Off the CPU, bins come from one binary search, the argmax from ``max`` and byte
counts from one sum: that path (forced here on the CPU) gives the CPU path's states value for value. The states the
update derives instead of counting twice (multilabel and binary top-label bins), the true-class histogram staged in
the float64 store, the checked pair-sketch update and the merge across ranks keep the values of what they replace;
and no per-class or per-threshold loop creeps back into an update (a generous bound on the operators one update
dispatches)."""

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from lightning_lossdiag.stats import curves
from lightning_lossdiag.stats.calibration import calibration_bins, classwise_ece
from lightning_lossdiag.stats.classification import ClassCounts
from lightning_lossdiag.stats.curves import curve_thresholds, threshold_bins
from lightning_lossdiag.stats.histogram import FixedHistogram
from lightning_lossdiag.stats.pairs import ConfusedPairs
from lightning_lossdiag.stats.row_ops import first_argmax, first_hit, in_top_k

COUNTS = ("per_class", "label_rows", "rows", "confusion", "curves", "prob_hist")
SUMS = ("ranking", "calibration", "calibration_fine", "classwise", "brier", "moments")


@pytest.fixture
def search(monkeypatch):
    """Bins by binary search, the argmax by ``max`` and counts by one sum on the CPU too, as on a GPU (one switch)."""
    monkeypatch.setattr(curves, "LOOKUP_DEVICES", frozenset())


def _edges_and_noise(th):
    g = torch.Generator().manual_seed(th.shape[0])
    near = torch.cat([th, th.nextafter(torch.tensor(2.0)), th.nextafter(torch.tensor(-1.0))])
    odd = torch.tensor([-3.0, 5.0, float("nan"), float("inf"), -float("inf"), -0.0, -1e-45, 1.0 - 2**-24])
    return torch.cat([torch.rand(50_000, generator=g), near, odd])


@pytest.mark.parametrize("num", [2, 16, 101])
def test_binary_search_bins_equal_the_lookup_bins(num, monkeypatch):
    th = curve_thresholds(num)
    x = _edges_and_noise(th)
    lookup, coarse_lookup = threshold_bins(x, th), calibration_bins(x, th, 1024)
    monkeypatch.setattr(curves, "LOOKUP_DEVICES", frozenset())
    assert torch.equal(threshold_bins(x, th), lookup)
    for got, expected in zip(calibration_bins(x, th, 1024), coarse_lookup, strict=True):
        assert torch.equal(got, expected)


def _cases():
    g = torch.Generator().manual_seed(7)

    def labels(shape, c, ignore=None, share=0.1):
        y = torch.randint(0, c, shape, generator=g)
        if ignore is not None:
            y[torch.rand(shape, generator=g) < share] = ignore
        return y

    tied = torch.randn(40, 12, generator=g).round()  # many equal maxima: the first one must win
    return {
        "flat10": ({"num_classes": 12}, tied, labels((40,), 12)),
        "flat600_tail": ({"num_classes": 600}, torch.randn(30, 600, generator=g), labels((30,), 600, -100)),
        "btv_bf16": (
            {"num_classes": 640, "class_dim": -1, "ignore_index": -100},
            (3 * torch.randn(2, 24, 640, generator=g)).bfloat16(),
            labels((2, 24), 640, -100),
        ),
        "nchw_void": (
            {"num_classes": 21, "ignore_index": 255},
            torch.randn(3, 21, 6, 5, generator=g).round(),
            labels((3, 6, 5), 21, 255),
        ),
        "nchw_pairs": ({"num_classes": 40, "budget": 300}, torch.randn(2, 40, 9, generator=g), labels((2, 9), 40)),
        "multilabel": (
            {"task": "multilabel", "num_classes": 30, "budget": 200},
            torch.randn(50, 30, generator=g),
            (torch.rand(50, 30, generator=g) < 0.2).float() - 2 * (torch.rand(50, 30, generator=g) < 0.05).float(),
        ),
        "binary": (
            {"task": "binary", "num_classes": 2, "ignore_index": -1, "budget": 20},
            torch.randn(60, generator=g),
            labels((60,), 2, -1),
        ),
    }


def _fed(kw, preds, target, chunk=16):
    kw = {"task": "multiclass", "inputs": "logits", "thresholds": 21, **kw}
    counts = ClassCounts(kw.pop("task"), kw.pop("inputs"), kw.pop("num_classes"), **kw)
    for lo in range(0, preds.shape[0], chunk):
        counts.update(preds[lo : lo + chunk], target[lo : lo + chunk])
    return counts


def _assert_same_states(a, b):
    for name in COUNTS:
        assert torch.equal(getattr(a, name), getattr(b, name)), name
    for name in SUMS:
        torch.testing.assert_close(getattr(a, name), getattr(b, name), rtol=1e-9, atol=1e-9, msg=name)
    for name, x, y in zip(a.true_prob._state_names, a.true_prob.state, b.true_prob.state, strict=True):
        assert torch.equal(x, y), name
    torch.testing.assert_close(a.worst.padded_rows, b.worst.padded_rows, equal_nan=True)
    if a.pairs is not None:
        assert torch.equal(a.pairs.counts, b.pairs.counts)
        assert torch.equal(a.pairs.keys, b.pairs.keys)


@pytest.mark.parametrize("case", list(_cases()))
def test_the_gpu_path_gives_the_cpu_path_states(case, monkeypatch):
    kw, preds, target = _cases()[case]
    cpu = _fed(kw, preds, target)
    monkeypatch.setattr(curves, "LOOKUP_DEVICES", frozenset())
    _assert_same_states(cpu, _fed(kw, preds, target))


def test_first_argmax_and_top_k_equal_torch_on_ties_and_a_short_last_chunk():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(64, 1000, generator=g).mul(2).round()  # ties everywhere; 1000 = 15 chunks of 64 + 40
    assert torch.equal(first_argmax(x, 1, x.amax(1)), x.argmax(1))
    picked = x.gather(1, torch.randint(0, 1000, (64, 1), generator=g)).squeeze(1)
    assert torch.equal(in_top_k(x, 1, picked, 5), (x > picked[:, None]).sum(1) < 5)
    dense = torch.randn(4, 21, 7, generator=g).round()
    assert torch.equal(first_hit(dense, 1, dense.amax(1)), dense.argmax(1))
    # whole chunks only (1024 = 16 x 64), and rows that are a strided view (every other column of a wider tensor)
    for rows in (torch.randn(32, 1024, generator=g).round(), torch.randn(32, 1400, generator=g).round()[:, ::2]):
        assert torch.equal(first_argmax(rows, 1, rows.amax(1)), rows.argmax(1))
        picked = rows.gather(1, torch.randint(0, rows.shape[1], (32, 1), generator=g)).squeeze(1)
        assert torch.equal(in_top_k(rows, 1, picked, 5), (rows > picked[:, None]).sum(1) < 5)


def test_the_staged_histogram_is_the_fixed_histogram_of_the_same_values():
    # probabilities as handed over: on bin edges, outside [0, 1], infinite, NaN, and rows left out (NaN)
    probs = torch.tensor([[0.5, 0.5], [1.0, 0.0], [0.0, 1.0], [1.5, -0.5], [-0.2, 1.2], [0.25, 0.75]])
    probs = torch.cat([probs, torch.tensor([[float("inf"), 0.0], [float("nan"), 1.0], [0.3, 0.7]])])
    target = torch.tensor([0, 0, 0, 0, 0, 1, 0, 0, -100])
    counts = ClassCounts("multiclass", "probabilities", 2, thresholds=11)
    counts.update(probs, target)
    expected = FixedHistogram(0.0, 1.0, 64)
    values = probs.gather(1, target.clamp_min(0)[:, None]).squeeze(1)
    expected.update(torch.where(target >= 0, values, float("nan")))
    got = counts.true_prob
    for name, x, y in zip(got._state_names, got.state, expected.state, strict=True):
        torch.testing.assert_close(x, y, rtol=0, atol=1e-12, msg=name)
    empty = ClassCounts("multiclass", "logits", 3).true_prob
    assert empty.min.item() == float("inf")
    assert empty.max.item() == -float("inf")
    assert empty.counts.sum() == 0


@pytest.mark.parametrize(("task", "classes"), [("multilabel", 6), ("binary", 2)])
def test_derived_top_label_bins_equal_the_classwise_ones_they_come_from(task, classes):
    g = torch.Generator().manual_seed(1)
    shape = (80, classes) if task == "multilabel" else (80,)
    counts = _fed({"task": task, "num_classes": classes}, torch.randn(shape, generator=g), torch.randint(0, 2, shape))
    expected = counts.classwise.sum(0) if task == "multilabel" else counts.classwise[1]
    torch.testing.assert_close(counts.calibration, expected, rtol=0, atol=0)
    assert classwise_ece(counts.classwise) >= 0


def test_the_checked_pair_update_equals_the_full_one():
    g = torch.Generator().manual_seed(2)
    true, pred = torch.randint(0, 50, (3000,), generator=g), torch.randint(0, 50, (3000,), generator=g)
    pred[::3] = true[::3]
    weight = (pred != true).double()
    a, b = ConfusedPairs(50, width=64, depth=3), ConfusedPairs(50, width=64, depth=3)
    for lo in range(0, 3000, 500):
        a.update(true[lo : lo + 500], pred[lo : lo + 500])
        b.update(true[lo : lo + 500], pred[lo : lo + 500], weight[lo : lo + 500], checked=True)
    assert torch.equal(a.counts, b.counts)
    assert torch.equal(a.keys, b.keys)
    assert a.top(5) == b.top(5)


def test_merged_over_two_identical_ranks_doubles_every_count_and_keeps_the_range():
    kw, preds, target = _cases()["nchw_void"]
    counts = _fed(kw, preds, target)
    before = counts.per_class.clone()
    merged = counts.merged(lambda t: torch.stack([t, t]), world=2)
    for name in (*COUNTS, "classwise", "moments"):
        torch.testing.assert_close(getattr(merged, name), 2 * getattr(counts, name), msg=name)
    assert merged.per_class.data_ptr() != counts.per_class.data_ptr()
    assert torch.equal(counts.per_class, before)
    assert merged.true_prob.min.item() == counts.true_prob.min.item()
    assert merged.true_prob.counts.sum().item() == 2 * counts.true_prob.counts.sum().item()
    assert merged.nbytes() == counts.nbytes()


class _Ops(TorchDispatchMode):
    """Counts the operators that reach the dispatcher, views and metadata left out (what launches kernels)."""

    def __init__(self):
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if not func._schema.is_mutable and any(a.alias_info for a in func._schema.returns):
            pass  # a view
        elif func.__name__.split(".")[0] not in ("detach", "empty", "lift_fresh"):
            self.count += 1
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize(
    ("kw", "shape", "bound"),
    [
        ({"num_classes": 1000, "class_dim": -1, "ignore_index": -100}, (2, 64, 1000), 170),  # LM: pairs, top-5
        ({"num_classes": 21, "ignore_index": 255}, (2, 21, 16, 16), 130),  # segmentation: dense confusion
        ({"task": "multilabel", "num_classes": 300}, (64, 300), 130),
    ],
    ids=["btv1000", "nchw21", "multilabel"],
)
def test_an_update_dispatches_a_bounded_number_of_operators(kw, shape, bound, search):
    # the update before the one-pass rewrite dispatched 280 to 300 on these; a loop over classes or thresholds would
    # add hundreds (the bound is the GPU path's count with a margin for other torch versions)
    g = torch.Generator().manual_seed(0)
    preds = torch.randn(shape, generator=g)
    if kw.get("task") == "multilabel":
        target = (torch.rand(shape, generator=g) < 0.1).float()
    else:
        target = torch.randint(0, kw["num_classes"], (shape[0], *shape[2:]) if shape[1] == 21 else shape[:-1])
    counts = _fed(kw, preds, target, chunk=shape[0])
    with _Ops() as ops:
        counts.update(preds, target)
    assert ops.count <= bound, f"{ops.count} operators in one update (bound {bound})"


@pytest.mark.parametrize(
    ("task", "preds", "target"),
    [
        ("multiclass", torch.zeros(0, 5), torch.zeros(0, dtype=torch.long)),
        ("multiclass", torch.zeros(0, 5, 4, 4), torch.zeros(0, 4, 4, dtype=torch.long)),
        ("multilabel", torch.zeros(0, 5), torch.zeros(0, 5)),
        ("binary", torch.zeros(0), torch.zeros(0)),
    ],
    ids=["multiclass", "dense", "multilabel", "binary"],
)
def test_an_empty_batch_counts_nothing(task, preds, target):
    counts = ClassCounts(task, "logits", 2 if task == "binary" else 5)
    counts.update(preds, target)
    assert counts.rows.tolist() == [0.0, 0.0]
    assert counts.per_class.sum().item() == 0
