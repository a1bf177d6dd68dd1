"""The engine (merge, dedupe, order, broken rules), the renderers and the config."""

import io
import json

import pytest

from lightning_lossdiag.diagnosis.config import DoctorConfig
from lightning_lossdiag.diagnosis.engine import diagnose, sort_findings
from lightning_lossdiag.diagnosis.findings import Finding
from lightning_lossdiag.diagnosis.record import RunRecord
from lightning_lossdiag.diagnosis.report import build_report, print_table, summary, to_markdown


def test_engine_merges_record_findings_and_drops_rule_duplicates():
    r = RunRecord()
    r.add_finding(Finding("double_sigmoid", "warning", "sigmoid applied twice", 0))
    one_time = Finding(
        "scheduler_mode_mismatch", "warning", "from the scheduler monitor", None, {"monitor": "val_acc", "mode": "min"}
    )
    r.add_finding(one_time)
    r.notes["scheduler/plateau"] = [{"optimizer": 0, "monitor": "val_acc", "mode": "min"}]
    r.notes["callbacks/monitors"] = [{"callback": "EarlyStopping", "monitor": "val_acc", "mode": "min"}]
    r.notes["loss/first_nonfinite_step"] = 30
    found = diagnose(r)
    codes = [f.code for f in found]
    assert codes == ["nonfinite_loss", "double_sigmoid", "scheduler_mode_mismatch", "scheduler_mode_mismatch"]
    assert found[2] is one_time  # the rule saw the same scheduler monitor: the one-time check's finding is kept
    assert found[3].evidence["callback"] == "EarlyStopping"  # same metric, another callback: its own finding


def test_sort_order_is_severity_then_step_then_code():
    fs = [
        Finding("b", "info", "", 1),
        Finding("a", "warning", "", None),
        Finding("c", "warning", "", 5),
        Finding("d", "error", "", 99),
        Finding("a", "warning", "", 5),
    ]
    assert [(f.code, f.step) for f in sort_findings(fs)] == [("d", 99), ("a", 5), ("c", 5), ("a", None), ("b", 1)]


def test_a_broken_rule_warns_and_the_rest_still_report():
    def broken(record, cfg):
        raise KeyError("boom")

    def fine(record, cfg):
        return [Finding("plateau", "warning", "flat", 3)]

    with pytest.warns(UserWarning, match="broken failed"):
        found = diagnose(RunRecord(), rules=[broken, fine])
    assert [f.code for f in found] == ["plateau"]


def test_config_validation_and_overrides():
    assert DoctorConfig.from_value(None) == DoctorConfig()
    cfg = DoctorConfig(plateau_epochs=2)
    assert DoctorConfig.from_value(cfg) is cfg
    with pytest.raises(ValueError, match="unknown keys.*'nope'"):
        DoctorConfig.from_value({"nope": 1})
    with pytest.raises(ValueError, match="`clip_rate` must be in"):
        DoctorConfig(clip_rate=2.0)
    with pytest.raises(ValueError, match="`plateau_epochs` must be an integer"):
        DoctorConfig(plateau_epochs=2.5)
    with pytest.raises(ValueError, match="`dead_frac` must be a number"):
        DoctorConfig(dead_frac="high")
    with pytest.raises(ValueError, match="`config` must be"):
        DoctorConfig.from_value(3)
    r = RunRecord()
    for e, v in enumerate([1.0, 0.5, 0.5, 0.5]):
        r.add_scalars(e, {"val/loss": v})
    assert diagnose(r) == []
    assert [f.code for f in diagnose(r, {"plateau_epochs": 2})] == ["plateau"]


def test_markdown_escapes_pipes_and_has_a_row_per_finding():
    fs = [Finding("plateau", "warning", "a | b\nc", 4), Finding("dead_parameters", "warning", "x", None)]
    lines = to_markdown(fs).splitlines()
    assert lines[0] == "| severity | code | step | message |"
    assert len(lines) == 4
    assert lines[2] == "| warning | `plateau` | 4 | a \\| b c |"
    assert lines[3] == "| warning | `dead_parameters` |  | x |"
    assert "No findings" in to_markdown([])


def test_json_report_is_strict_json_with_counts_and_summary():
    r = RunRecord()
    r.add_scalars(10, {"train/loss": 0.5, "lr/SGD/0": 0.1, "metrics/val/f1": 0.7, "val_loss": float("inf")})
    fs = [Finding("nonfinite_loss", "error", "m", 10, {"value": float("nan"), "shape": (2, 3)})]
    report = build_report(fs, r, {"epochs": 3})
    text = json.dumps(report, allow_nan=False)  # would raise on NaN/inf
    back = json.loads(text)
    assert back["counts"] == {"info": 0, "warning": 0, "error": 1}
    assert back["findings"][0]["evidence"] == {"value": "nan", "shape": [2, 3]}
    assert back["summary"]["last"] == {"train/loss": 0.5, "val/loss": "inf", "lr/SGD/0": 0.1, "metrics/val/f1": 0.7}
    assert back["summary"]["epochs"] == 3
    assert back["summary"]["last_step"] == 10


def test_summary_of_empty_record():
    assert summary(RunRecord()) == {"last": {}, "last_step": None, "series": 0}


def test_table_lists_every_finding():
    buf = io.StringIO()
    print_table([Finding("loss_spike", "info", "one spike", 7), Finding("nonfinite_grad", "error", "nan", 3)], buf)
    out = buf.getvalue()
    assert "loss_spike" in out
    assert "nonfinite_grad" in out
    assert "1 error, 1 info" in out
    buf = io.StringIO()
    print_table([], buf)
    assert "no findings" in buf.getvalue()


def test_table_prints_messages_as_they_are():
    # rich markup, emoji codes and brackets in a message are text, not styles: nothing is lost or replaced
    message = "w[0] [bold]b[/bold] :smile:"
    buf = io.StringIO()
    print_table([Finding("nonfinite_grad", "error", message, 3)], buf)
    assert message in buf.getvalue()
