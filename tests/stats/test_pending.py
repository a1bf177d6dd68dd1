"""Held updates (``ClassCounts(hold=N)``): per-row sums and budget samples added N updates at a time.

The held counts must equal the counts of the same updates added one by one (the sampler draws the same rows), on
the CPU's paths and a GPU's, with the error views on, when an update does not fit beside the held ones, when the
dtype of the logits changes, and at every read (``merged`` settles first). And holding must do what it is for:
fewer operators per update.
"""

import pytest
import torch

from lightning_lossdiag.stats import curves, pending
from lightning_lossdiag.stats.classification import ClassCounts

from .test_class_counts_update import _assert_same_states, _cases, _Ops

HELD = [name for name in _cases() if name != "binary"]  # binary updates are not held: one value a row


def _fed(kw, batches, hold):
    kw = {"task": "multiclass", "inputs": "logits", "thresholds": 21, **kw}
    counts = ClassCounts(kw.pop("task"), kw.pop("inputs"), kw.pop("num_classes"), hold=hold, **kw)
    for preds, target in batches:
        counts.update(preds, target)
    return counts


def _batches(preds, target, sizes):
    out, lo = [], 0
    for size in sizes:
        out.append((preds[lo : lo + size], target[lo : lo + size]))
        lo += size
    return out


@pytest.mark.parametrize("gpu_path", [False, True], ids=["cpu_path", "gpu_path"])
@pytest.mark.parametrize("case", HELD)
def test_held_updates_give_the_states_of_updates_added_one_by_one(case, gpu_path, monkeypatch):
    if gpu_path:
        monkeypatch.setattr(curves, "LOOKUP_DEVICES", frozenset())
    kw, preds, target = _cases()[case]
    n = preds.shape[0]
    # uneven batches, and with hold=3 the third update settles the first three; dense cases (2-3 images): one a batch
    sizes = [n // 5, n // 5, n // 5, n // 5, n - 4 * (n // 5)] if n >= 10 else [1] * n
    hold = 3 if n >= 10 else n + 1
    alone = _fed(kw, _batches(preds, target, sizes), hold=1)
    held = _fed(kw, _batches(preds, target, sizes), hold=hold)
    assert held._pending is not None
    assert held._pending.updates == len(sizes) % hold
    _assert_same_states(alone, held.merged())
    assert held._pending.updates == 0


def test_an_update_larger_than_the_held_buffers_settles_them_and_sizes_them_again():
    kw, preds, target = _cases()["flat600_tail"]
    sizes = [4, 4, 22]  # capacity is set by the first update (4 rows x hold): 22 rows do not fit
    alone = _fed(kw, _batches(preds, target, sizes), hold=1)
    held = _fed(kw, _batches(preds, target, sizes), hold=4)
    assert held._pending.capacity["rows"] == 88  # sized again for the 22-row update, which is held
    assert held._pending.updates == 1  # the two 4-row updates were added before it
    _assert_same_states(alone, held.merged())


def test_logits_that_change_dtype_settle_what_is_held_first():
    kw, preds, target = _cases()["flat10"]
    batches = [(preds[:10], target[:10]), (preds[10:20].double(), target[10:20]), (preds[20:], target[20:])]
    alone = _fed(kw, batches, hold=1)
    held = _fed(kw, batches, hold=8)
    _assert_same_states(alone, held.merged())


def test_held_sample_values_stay_within_their_bound(monkeypatch):
    monkeypatch.setattr(pending, "MAX_SAMPLE_VALUES", 2_000)
    counts = ClassCounts("multiclass", "logits", 100, budget=500, hold=16)
    for _ in range(8):
        counts.update(torch.randn(64, 100), torch.randint(0, 100, (64,)))
    assert counts._pending.capacity["sample"] * 100 <= 2_000  # 5 sampled rows a step: 20 rows held at most
    assert counts.merged().rows[0].item() == 8 * 64


def test_holding_dispatches_fewer_operators_per_update():
    g = torch.Generator().manual_seed(0)
    preds, target = torch.randn(256, 1000, generator=g), torch.randint(0, 1000, (256,), generator=g)
    ops = {}
    for hold in (1, 16):
        counts = ClassCounts("multiclass", "logits", 1000, views=False, hold=hold)
        for _ in range(16):
            counts.update(preds, target)
        with _Ops() as counted:
            for _ in range(16):  # one settle among them
                counts.update(preds, target)
        ops[hold] = counted.count / 16
    assert ops[16] < 0.6 * ops[1], ops


def test_updates_too_large_to_hold_a_few_of_are_added_at_once(monkeypatch):
    monkeypatch.setattr(pending, "MAX_ROWS", 100)  # 40-row updates: fewer than MIN_HELD would fit
    kw, preds, target = _cases()["flat600_tail"]
    batches = _batches(preds, target, [10, 10, 10])
    kw = {**kw, "num_classes": 600}
    held = _fed(kw, [(torch.cat([p, p, p, p])[:40], torch.cat([t, t, t, t])[:40]) for p, t in batches], hold=16)
    alone = _fed(kw, [(torch.cat([p, p, p, p])[:40], torch.cat([t, t, t, t])[:40]) for p, t in batches], hold=1)
    assert held._pending.capacity == {"rows": 0, "sample": 0}
    assert held._pending.updates == 0
    _assert_same_states(alone, held)


def test_a_small_first_update_does_not_keep_larger_ones_from_being_held():
    kw, preds, target = _cases()["flat600_tail"]
    batches = [(preds[:2], target[:2]), (preds[2:12], target[2:12]), (preds[12:22], target[12:22])]
    held = _fed(kw, batches, hold=4)
    assert held._pending.capacity["rows"] == 40  # sized again by the 10-row update: 4 of them
    assert held._pending.updates == 2  # both 10-row updates held (the first settled the 2-row one before it)
    _assert_same_states(_fed(kw, batches, hold=1), held.merged())
