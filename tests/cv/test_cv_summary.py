from __future__ import annotations

import json
import math
import statistics

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from rich.console import Console

from lightning_lossdiag.cv import summarize_folds
from lightning_lossdiag.cv.summary import summary_table, write_summary_json

_finite = st.floats(min_value=-1e6, max_value=1e6, allow_nan=False, allow_infinity=False)


@settings(max_examples=50, deadline=None)
@given(values=st.lists(st.tuples(_finite, _finite), min_size=2, max_size=10), ddof=st.sampled_from([0, 1]))
def test_mean_and_std_equal_numpy_and_statistics(values, ddof):
    per_fold = [{"val/loss": a, "metrics/val/mae": b} for a, b in values]
    summary = summarize_folds(per_fold, ddof=ddof)
    assert list(summary) == ["metrics/val/mae", "val/loss"]
    for name, column in (("val/loss", [a for a, _ in values]), ("metrics/val/mae", [b for _, b in values])):
        s = summary[name]
        assert s.values == column
        assert s.count == len(column)
        assert s.ddof == ddof
        assert s.mean == pytest.approx(np.mean(column), rel=1e-12, abs=1e-9)
        assert s.std == pytest.approx(np.std(column, ddof=ddof), rel=1e-9, abs=1e-6)
        reference = statistics.pstdev(column) if ddof == 0 else statistics.stdev(column)
        assert s.std == pytest.approx(reference, rel=1e-6, abs=1e-6)


def test_missing_metric_is_left_out_of_mean_and_std():
    per_fold = [{"a": 1.0, "b": 10.0}, {"a": 2.0}, {"a": 4.0, "b": 14.0}]
    summary = summarize_folds(per_fold, ddof=1)
    assert summary["b"].values == [10.0, None, 14.0]
    assert summary["b"].count == 2
    assert summary["b"].mean == pytest.approx(12.0)
    assert summary["b"].std == pytest.approx(math.sqrt(8.0))  # ((10-12)^2 + (14-12)^2) / (2 - 1)
    assert summary["a"].mean == pytest.approx(7 / 3)


def test_nan_fold_makes_the_mean_nan():
    summary = summarize_folds([{"a": 1.0}, {"a": float("nan")}])
    assert math.isnan(summary["a"].mean)
    assert summary["a"].count == 2


@pytest.mark.parametrize("ddof", [2, -1, True], ids=["two", "negative", "bool"])
def test_bad_ddof_is_rejected(ddof):
    with pytest.raises(ValueError, match=r"`ddof` must be 0 or 1, got"):
        summarize_folds([{"a": 1.0}], ddof=ddof)


def test_empty_folds_are_rejected():
    with pytest.raises(ValueError, match="at least one fold"):
        summarize_folds([])


def test_json_is_strict_and_states_ddof(tmp_path):
    summary = summarize_folds([{"a": 1.0, "b": float("inf")}, {"a": 3.0, "b": 2.0}], ddof=0)
    path = write_summary_json(tmp_path / "sub" / "cv_summary.json", summary, folds=2, seed=5)
    text = path.read_text()
    assert "NaN" not in text
    assert "Infinity" not in text
    data = json.loads(text)
    assert data["std_ddof"] == 0
    assert data["folds"] == 2
    assert data["seed"] == 5
    assert data["metrics"]["a"] == {"values": [1.0, 3.0], "mean": 2.0, "std": 1.0, "count": 2}
    assert data["metrics"]["b"]["values"] == [None, 2.0]
    assert data["metrics"]["b"]["mean"] is None


def test_table_shows_every_fold_and_mean_std():
    summary = summarize_folds([{"val/loss": 0.5}, {"val/loss": 0.7}, {"val/loss": 0.9}], ddof=1)
    table = summary_table(summary, [(20, 10), (20, 10), (20, 10)], findings=[["plateau"], [], None])
    console = Console(record=True, width=160)
    console.print(table)
    text = console.export_text()
    assert "mean ± std" in text
    for cell in ("fold 0", "fold 1", "fold 2", "0.5", "0.7", "0.9"):
        assert cell in text
    findings_row = next(line for line in text.splitlines() if "findings" in line)
    assert [c.strip() for c in findings_row.split("│")[2:6]] == ["1", "0", "-", "1 in all"]
    plateau_row = next(line for line in text.splitlines() if "plateau" in line)
    assert [c.strip() for c in plateau_row.split("│")[2:6]] == ["yes", "", "-", "1/3 folds"]
    assert f"0.7 ± {np.std([0.5, 0.7, 0.9], ddof=1):.4g}" in text
    assert "ddof=1" in text
