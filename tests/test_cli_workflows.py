"""End-to-end workflows through the `lossdiag` CLI: what each example config writes, `lossdiag test` with a
checkpoint, and the promise that the example configs train healthily (no warning or error findings)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from lightning_lossdiag.cli import main

ROOT = Path(__file__).resolve().parents[1]

pytestmark = pytest.mark.slow


def _fit(config: str, save_dir: Path, *extra: str) -> Path:
    args = [
        "fit",
        "--config",
        str(ROOT / "configs" / f"{config}.yaml"),
        f"--trainer.logger.init_args.save_dir={save_dir}",
        "--trainer.enable_progress_bar=false",
        *extra,
    ]
    assert main(args) == 0
    (run_dir,) = sorted((save_dir / config).glob("version_*"))
    return run_dir


def _tags(run_dir: Path) -> dict[str, list[str]]:
    acc = EventAccumulator(str(run_dir), size_guidance={"scalars": 0, "images": 0, "tensors": 0, "histograms": 0})
    acc.Reload()
    return acc.Tags()


SHORT = ("--trainer.max_epochs=2", "--trainer.limit_train_batches=6", "--trainer.limit_val_batches=3")


def test_regression_config_writes_error_distributions_and_metric_curves(tmp_path):
    tags = _tags(_fit("regression", tmp_path, *SHORT))
    assert {"errors/val/residual", "errors/val/abs_error"} <= set(tags["histograms"])
    assert "errors/val/pred_vs_true" in tags["images"]
    assert {"metrics/val/mae", "metrics/val/r2", "metrics/train/mae", "train/loss", "grad/norm_total"} <= set(
        tags["scalars"]
    )
    assert "errors/val/worst/text_summary" in tags["tensors"]
    assert "custom_scalars__config__" in tags["tensors"]


def test_multiclass_config_writes_confusion_matrix_pr_curves_and_f1(tmp_path):
    tags = _tags(_fit("multiclass", tmp_path, *SHORT))
    assert "errors/val/confusion_matrix" in tags["images"]
    pr_curves = [t for t in tags["tensors"] if t.startswith("errors/val/pr_curve/")]
    assert len(pr_curves) == 5  # one curve per class
    assert "metrics/val/f1" in tags["scalars"]


def test_lossdiag_test_with_a_checkpoint_reports_on_the_test_split(tmp_path, capsys):
    run_dir = _fit("regression", tmp_path, *SHORT)
    ckpt = run_dir / "checkpoints" / "last.ckpt"  # the path the README's `lossdiag test` command uses
    assert f"last checkpoint in {ckpt}" in capsys.readouterr().out
    args = [
        "test",
        "--config",
        str(ROOT / "configs" / "regression.yaml"),
        f"--ckpt_path={ckpt}",
        f"--trainer.logger.init_args.save_dir={tmp_path / 'test'}",
        "--trainer.enable_progress_bar=false",
    ]
    assert main(args) == 0
    (test_dir,) = sorted((tmp_path / "test" / "regression").glob("version_*"))
    tags = _tags(test_dir)
    assert "errors/test/residual" in tags["histograms"]
    assert "errors/test/pred_vs_true" in tags["images"]
    assert {"metrics/test/mae", "metrics/test/r2", "test/loss"} <= set(tags["scalars"])
    assert "diagnosis/text_summary" in tags["tensors"]
    report = json.loads((test_dir / "lossdiag_report.json").read_text())
    assert report["summary"]["stage"] == "test"
    assert "diagnosis report in" in capsys.readouterr().out


@pytest.mark.parametrize("config", ["regression", "binary_imbalanced", "multiclass", "multitask"])
def test_example_configs_train_healthily_with_default_settings(config, tmp_path):
    run_dir = _fit(config, tmp_path)
    report = json.loads((run_dir / "lossdiag_report.json").read_text())
    serious = [(f["severity"], f["code"], f["message"]) for f in report["findings"] if f["severity"] != "info"]
    assert serious == []
    assert report["summary"]["status"] == "finished"
