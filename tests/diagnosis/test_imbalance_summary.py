"""``class_imbalance`` summarises the class counts (ratio, rarest share, a few rarest classes), whatever their number.

Every expected number is computed here from the counts, not read back from the rule.
"""

import json
import re

import pytest

from lightning_lossdiag.diagnosis.config import DoctorConfig
from lightning_lossdiag.diagnosis.record import RunRecord
from lightning_lossdiag.diagnosis.rules.data import class_imbalance

CFG = DoctorConfig()
ZIPF = [1_000_000 // (c + 1) for c in range(1000)]  # long-tailed: 1000000, 500000, 333333, ..., 1000
NUMBER = re.compile(r"\d+(?:\.\d+)?")


def _finding(note, scalars=None):
    record = RunRecord()
    record.notes["data/class_counts"] = note
    if scalars:
        record.add_scalars(100, scalars)
    (found,) = class_imbalance(record, CFG)
    return found


def _rarest(counts, n):
    """The ``n`` rarest classes with samples, rarest first (ties by index)."""
    return [c for c in sorted(range(len(counts)), key=lambda c: (counts[c], c)) if counts[c] > 0][:n]


def _ratio_in(message):
    return float(re.search(r"has (\d+(?:\.\d+)?)x", message).group(1))


def test_a_thousand_long_tailed_classes_give_a_short_summary_not_every_count():
    found = _finding({"stage": "train", "counts": ZIPF})
    msg = found.message
    assert found.code == "class_imbalance"
    assert found.severity == "info"
    assert len(msg) < 600
    # the ratio of the largest to the smallest class
    ratio = max(ZIPF) / min(ZIPF)
    assert _ratio_in(msg) == pytest.approx(ratio, rel=5e-3)
    # the share of the samples held by the rarest 10% of the classes
    k = len(ZIPF) // 10
    share = sum(sorted(ZIPF)[:k]) / sum(ZIPF) * 100
    held = re.search(r"rarest (\d+) classes \([\d.]+%\) hold (\d+(?:\.\d+)?)% of the samples", msg)
    assert int(held.group(1)) == k
    assert float(held.group(2)) == pytest.approx(share, rel=5e-3)
    # the five rarest classes by index, with their counts, and no other count
    rarest = _rarest(ZIPF, 5)
    for c in rarest:
        assert f"{c} ({ZIPF[c]})" in msg
    assert len(re.findall(r"\((\d+)\)", msg)) == 5
    assert len(NUMBER.findall(msg)) <= 25  # the old message held all 1000 counts
    # the smallest class's share, as before
    smallest = min(range(len(ZIPF)), key=ZIPF.__getitem__)
    assert f"class {smallest} ({float(f'{ZIPF[smallest] / sum(ZIPF) * 100:.3g}'):g}%)" in msg
    # small evidence, JSON-friendly, without the full count list
    ev = found.evidence
    assert "counts" not in ev
    assert len(json.dumps(ev)) < 500
    assert ev["num_classes"] == 1000
    assert ev["ratio"] == pytest.approx(ratio)
    assert ev["rarest"] == [[c, ZIPF[c]] for c in rarest]
    assert ev["rarest_share"] == pytest.approx(share / 100)
    assert ev["empty_classes"] == 0
    assert ev["minority_class"] == smallest
    assert ev["share"] == pytest.approx(min(ZIPF) / sum(ZIPF))


@pytest.mark.parametrize("n_classes", [4, 20, 21, 1000, 5000], ids=lambda n: f"{n}-classes")
def test_the_message_names_at_most_five_counts_whatever_the_number_of_classes(n_classes):
    counts = [10_000 // (c + 1) ** 2 + 5 for c in range(n_classes)]
    counts[-1] = 1  # a rare tail: below a fifth of the mean count at every size
    found = _finding({"stage": "val", "counts": counts})
    assert len(re.findall(r"\((\d+)\)", found.message)) == min(5, n_classes)
    assert len(NUMBER.findall(found.message)) <= 25
    assert len(found.message) < 600
    assert ("counts" in found.evidence) == (n_classes <= 20)  # the full list only for small tasks
    assert len(found.evidence["rarest"]) == min(5, n_classes)


def test_two_classes_still_fire_as_before_and_give_both_counts():
    found = _finding({"stage": "train", "counts": [940, 60]})
    assert (found.severity, found.evidence["minority_class"]) == ("info", 1)
    assert found.evidence["share"] == pytest.approx(60 / 1000)
    assert found.evidence["counts"] == [940, 60]
    assert "Class 1 holds only 6% of the train samples" in found.message
    assert "[940, 60]" in found.message
    assert _ratio_in(found.message) == pytest.approx(940 / 60, rel=5e-3)
    assert "pos_weight: auto" in found.message
    warned = _finding({"stage": "train", "counts": [940, 60]}, {"metrics/val/recall": 0.0})
    assert warned.severity == "warning"
    assert "`metrics/val/recall`" in warned.message


def test_classes_without_samples_are_counted_and_the_ratio_is_over_the_others():
    counts = list(ZIPF)
    empty = [3, 17, 40, 900]
    for c in empty:
        counts[c] = 0
    found = _finding({"stage": "val", "counts": counts})
    msg = found.message
    assert f"{len(empty)} classes have no sample at all" in msg
    assert "(e.g. 3, 17, 40)" in msg
    non_empty = [c for c in counts if c > 0]
    assert _ratio_in(msg) == pytest.approx(max(non_empty) / min(non_empty), rel=5e-3)
    assert found.evidence["empty_classes"] == len(empty)
    assert found.evidence["ratio"] == pytest.approx(max(non_empty) / min(non_empty))
    assert found.evidence["minority_class"] == 3  # the verdict is unchanged: the smallest class holds 0%
    assert found.evidence["share"] == 0.0
    assert [c for c, _ in found.evidence["rarest"]] == _rarest(counts, 5)  # the rarest listed all have samples


def test_an_empty_class_has_no_recall_so_the_rarest_class_with_samples_is_read():
    counts = [400, 300, 0, 20, 280]
    # torchmetrics reports recall 0 for a class without samples: that alone must not make a warning
    found = _finding({"stage": "train", "counts": counts}, {"metrics/val/recall/2": 0.0, "metrics/val/recall/3": 0.5})
    assert found.severity == "info"
    assert (found.evidence["recall_class"], found.evidence["minority_recall"]) == (3, 0.5)
    assert "1 class has no sample at all" in found.message
    ignored = _finding({"stage": "train", "counts": counts}, {"metrics/val/recall/3": 0.0})
    assert ignored.severity == "warning"
    assert "The model ignores class 3" in ignored.message


def test_names_are_used_when_the_note_gives_them():
    names = [f"species-{c}" for c in range(len(ZIPF))]
    found = _finding({"stage": "train", "counts": ZIPF, "names": names})
    for c in _rarest(ZIPF, 5):
        assert f"`species-{c}` ({ZIPF[c]})" in found.message
    assert f"class `species-{len(ZIPF) - 1}`" in found.message
    assert len(re.findall(r"\((\d+)\)", found.message)) == 5
    small = _finding({"stage": "train", "counts": [940, 60], "names": ["negative", "positive"]})
    assert "Class `positive` holds only 6%" in small.message
    wrong_length = _finding({"stage": "train", "counts": [940, 60], "names": ["negative"]})
    assert "Class 1 holds only" in wrong_length.message


def test_long_names_are_cut():
    names = [f"a very long class name number {c:04d} that goes on" for c in range(len(ZIPF))]
    found = _finding({"stage": "train", "counts": ZIPF, "names": names})
    assert "goes on" not in found.message
    assert len(found.message) < 800


def test_a_recall_list_in_the_note_stands_in_for_per_class_scalars():
    rarest = _rarest(ZIPF, 1)[0]
    recall = [0.9] * len(ZIPF)
    recall[rarest] = 0.0
    found = _finding({"stage": "val", "counts": ZIPF, "recall": recall})
    assert found.severity == "warning"
    assert found.evidence["minority_recall"] == 0.0
    assert "`data/class_counts` note" in found.message
    recall[rarest] = 0.7
    assert _finding({"stage": "val", "counts": ZIPF, "recall": recall}).severity == "info"
    assert "minority_recall" not in _finding({"stage": "val", "counts": ZIPF, "recall": [0.0] * 10}).evidence


def test_multitask_heads_may_carry_names_and_are_summarised_each():
    counts = [10_000 // (c + 1) for c in range(100)]
    record = RunRecord()
    record.notes["data/class_counts"] = {
        "stage": "train",
        "counts": counts,
        "heads": {"tag": {"counts": counts, "names": [f"t{c}" for c in range(100)]}, "ctr": [500, 500]},
    }
    (found,) = class_imbalance(record, CFG)
    assert found.evidence["term"] == "tag"
    assert "head `tag`" in found.message
    assert f"`t99` ({counts[99]})" in found.message
    assert "counts" not in found.evidence


@pytest.mark.parametrize("classes", [10, 1000])
def test_balanced_many_classes_do_not_fire_and_a_rare_one_does(classes):
    # the smallest class is held against the even share 1/C: equal classes are balanced at any class count
    balanced = RunRecord()
    balanced.notes["data/class_counts"] = {"stage": "train", "counts": [100] * classes}
    assert class_imbalance(balanced, DoctorConfig()) == []
    rare = RunRecord()
    rare.notes["data/class_counts"] = {"stage": "train", "counts": [100] * (classes - 1) + [10]}
    assert [f.code for f in class_imbalance(rare, DoctorConfig())] == ["class_imbalance"]


def test_classes_seen_once_are_pooled_before_their_recall_counts():
    # 1,000 classes, the rarest 100 seen once each: one sample's recall is 0 or 1 by luck, so the rarest classes
    # count together, until they hold 20 samples
    counts = [1] * 100 + [30] * 900
    recall = [0.9] * 1000
    for c in range(5):
        recall[c] = 0.0  # 5 of the 20 rarest missed: pooled recall 0.675, no warning
    found = _finding({"stage": "val", "counts": counts, "recall": recall})
    assert found.severity == "info"
    assert found.evidence["recall_classes"] == 20
    assert found.evidence["minority_recall"] == pytest.approx(15 * 0.9 / 20)
    recall[:20] = [0.0] * 20  # every one of them missed
    found = _finding({"stage": "val", "counts": counts, "recall": recall})
    assert found.severity == "warning"
    assert "The model ignores the rarest 20 classes: their recall is 0 (their 20 samples together" in found.message
    few = [1] * 10 + [30] * 90  # the rarest 10% (10 classes) hold 10 samples: too few to tell
    assert "minority_recall" not in _finding({"stage": "val", "counts": few, "recall": [0.0] * 100}).evidence
