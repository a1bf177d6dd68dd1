"""Tests of the shared plumbing: step-output hand-off, flush schedule, one-transfer host reads, the run record."""

import pickle
import re

import pytest
import torch
from torch import nn

from lightning_lossdiag._outputs import StepOutputs, clear_outputs, fetch_outputs, lightning_stage, stash_outputs
from lightning_lossdiag.callbacks._base import FlushSchedule, to_host
from lightning_lossdiag.dashboards.layout import BASE_LAYOUT, build_layout, merge_entries
from lightning_lossdiag.diagnosis.findings import Finding
from lightning_lossdiag.diagnosis.record import RunRecord, record_for
from lightning_lossdiag.testing import HostReadCounter


def test_stash_detaches_and_wins_over_returned_mapping():
    module = nn.Linear(2, 1)
    preds = module(torch.randn(4, 2))
    stash_outputs(module, "train", StepOutputs(loss=preds.sum(), preds=preds, target=torch.zeros(4, 1)))
    got = fetch_outputs(module, {"preds": torch.ones(1), "target": torch.ones(1)}, "train")
    assert got is not None
    assert not got.preds.requires_grad
    assert not got.loss.requires_grad
    assert got.preds.shape == (4, 1)


def test_fetch_falls_back_to_returned_mapping_and_clear_forgets():
    module = nn.Linear(2, 1)
    out = fetch_outputs(
        module, {"loss": torch.tensor(2.0, requires_grad=True), "preds": torch.ones(3), "target": torch.zeros(3)}, "val"
    )
    assert out is not None
    assert torch.equal(out.target, torch.zeros(3))
    assert not out.loss.requires_grad
    stash_outputs(module, "val", StepOutputs(preds=torch.ones(1), target=torch.ones(1)))
    clear_outputs(module, "val")
    assert fetch_outputs(module, None, "val") is None


def test_a_returned_step_is_read_once_per_step_and_stage():
    module = nn.Linear(1, 1)
    step = {"loss": torch.tensor(1.0, requires_grad=True), "preds": torch.ones(2), "target": torch.zeros(2)}
    first = fetch_outputs(module, step, "train")
    assert fetch_outputs(module, step, "train") is first  # a second callback of the same step: no new detach
    assert fetch_outputs(module, step, "val") is not first  # same object, other stage: read again
    next_step = {"loss": torch.tensor(3.0), "preds": torch.ones(2), "target": torch.ones(2)}
    later = fetch_outputs(module, next_step, "train")
    assert later is not first
    assert later.loss == 3.0
    clear_outputs(module, "train")
    assert fetch_outputs(module, next_step, "train") is not later  # cleared at the next batch start: read afresh


def test_fetch_accepts_plain_loss_tensor_for_training_only():
    module = nn.Linear(1, 1)
    assert fetch_outputs(module, torch.tensor(1.0), "train").loss == 1.0
    assert fetch_outputs(module, torch.tensor(1.0), "val") is None


def test_lightning_stage_names():
    assert [lightning_stage(s) for s in ("train", "validate", "sanity_check", "test")] == [
        "train",
        "val",
        "val",
        "test",
    ]


@pytest.mark.parametrize("bad", [0, -3, 2.5, "10"], ids=["zero", "negative", "float", "str"])
def test_flush_schedule_rejects_bad_interval(bad):
    with pytest.raises(ValueError, match="`every_n_steps` must be a positive integer"):
        FlushSchedule(every_n_steps=bad)


def test_flush_schedule_uses_trainer_interval_and_flushes_each_step_once():
    class FakeTrainer:
        log_every_n_steps = 4
        global_step = 3

    sched = FlushSchedule()
    trainer = FakeTrainer()
    assert sched.interval(trainer) == 4
    assert sched.next_step_flushes(trainer)
    assert sched.is_flush(4, trainer)
    sched.mark(4)
    assert not sched.is_flush(4, trainer)  # a second batch at the same optimizer step (accumulation) does not flush
    assert not sched.is_flush(5, trainer)
    assert sched.is_flush(8, trainer)


def test_to_host_makes_exactly_one_read_whatever_the_number_of_values():
    values = {f"v{i}": torch.tensor(float(i)) for i in range(50)}
    with HostReadCounter(only_package=None) as counter:
        host = to_host(values)
    assert host == {f"v{i}": float(i) for i in range(50)}
    assert counter.by_kind["cpu"] == 1
    assert counter.total == 2  # one .cpu() and one .tolist() on the stacked tensor


def test_host_read_counter_sees_every_kind():
    t = torch.arange(4.0)
    with HostReadCounter(only_package=None) as counter:
        t.sum().item()
        t.tolist()
        bool(t.sum() > 0)
        float(t[1])
        _ = t[t > 1]
        torch.tensor([t[0], t[1]])
        t.nonzero()
        t.to("cpu")
    assert set(counter.by_kind) == {
        "item",
        "tolist",
        "__bool__",
        "__float__",
        "bool_mask",
        "tensor_of_tensors",
        "nonzero",
        "to_cpu",
    }


def test_host_read_counter_ignores_reads_outside_the_package_by_default():
    with HostReadCounter() as counter:
        torch.ones(2).sum().item()
    assert counter.total == 0


def test_record_series_are_bounded_and_keep_the_newest_point():
    record = RunRecord(max_points=64)
    for step in range(1000):
        record.add_scalars(step, {"train/loss": float(step)})
    series = record.series("train/loss")
    assert len(series) <= 64
    assert series[-1] == (999, 999.0)
    assert [s for s, _ in series] == sorted(s for s, _ in series)
    assert series[0][0] == 0


def test_record_state_round_trip_and_dedup_findings():
    record = RunRecord()
    record.add_scalars(1, {"a": 1.0, "b": 2.0})
    record.add_scalars(1, {"a": 3.0})
    record.notes["task"] = "binary"
    f = Finding("plateau", "warning", "flat", step=3, evidence={"epochs": 5})
    record.add_finding(f)
    record.add_finding(f)
    assert record.series("a") == [(1, 3.0)]
    assert len(record.findings) == 1
    copy = RunRecord()
    copy.load_state_dict(pickle.loads(pickle.dumps(record.state_dict())))
    assert copy.scalars == record.scalars
    assert copy.notes == {"task": "binary"}
    assert copy.findings == [f]


def test_record_for_is_one_per_trainer():
    class T:
        pass

    t1, t2 = T(), T()
    assert record_for(t1) is record_for(t1)
    assert record_for(t1) is not record_for(t2)


def test_finding_rejects_unknown_severity():
    with pytest.raises(ValueError, match="`severity` must be one of"):
        Finding("x", "fatal", "m")  # type: ignore[arg-type]


def test_layout_merge_keeps_order_and_union():
    merged = merge_entries({"Loss": ["train/loss$"]}, {"Loss": ["val/loss$"], "MAE": ["metrics/.*/mae$"]})
    layout = build_layout(merged)
    assert layout["lossdiag"]["Loss"] == ["Multiline", ["train/loss$", "val/loss$"]]
    assert list(layout["lossdiag"]) == ["Loss", "MAE"]


def _charts_of(tag):
    return [title for title, regexes in BASE_LAYOUT.items() if any(re.match(r, tag) for r in regexes)]


@pytest.mark.parametrize(
    "tags",
    [
        ["train/loss", "val/loss", "train/loss_ema"],
        ["grad/norm_total", "grad/norm_total_clipped", "grad/clip_val"],
        ["grad/norm_total_opt0", "grad/norm_total_clipped_opt1", "grad/clip_val"],  # several optimizers
        ["lr/Adam/group0", "plateau/num_bad_epochs", "plateau/epochs_to_reduction", "plateau/reductions"],
        ["grad/clip_rate_opt1"],
    ],
)
def test_base_layout_puts_related_series_in_one_chart(tags):
    charts = [set(_charts_of(t)) for t in tags]
    assert all(charts), [t for t, c in zip(tags, charts, strict=True) if not c]  # every tag is charted
    assert set.intersection(*charts)  # and side by side, in one chart
