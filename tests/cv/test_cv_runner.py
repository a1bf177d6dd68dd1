from __future__ import annotations

import json
import math
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import yaml
from lightning.fabric.utilities.seed import seed_everything
from lightning.pytorch import Trainer
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from lightning_lossdiag.cv import cv_main, kfold_indices
from lightning_lossdiag.examples import ImbalancedBinaryDataModule, MLPRegressor, NonlinearRegressionDataModule

ROOT = Path(__file__).resolve().parents[2]
REGRESSION = str(ROOT / "configs" / "regression.yaml")
BINARY = str(ROOT / "configs" / "binary_imbalanced.yaml")


def _scalars(log_dir: Path) -> dict[str, list[float]]:
    acc = EventAccumulator(str(log_dir))
    acc.Reload()
    return {tag: [e.value for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


def _manual_fold(fold: int, k: int) -> float:
    """Fold ``fold`` of the regression config trained by hand (no CLI): a fresh model from the YAML's arguments."""
    cfg = yaml.safe_load(Path(REGRESSION).read_text())
    dm = NonlinearRegressionDataModule(**cfg["data"]["init_args"])
    split = kfold_indices(len(dm.cv_dataset()), k, seed=cfg["seed_everything"])[fold]
    dm.set_fold(split.train, split.val)
    seed_everything(cfg["seed_everything"], workers=True, verbose=False)
    model = MLPRegressor(**cfg["model"]["init_args"])
    trainer = Trainer(
        max_epochs=1,
        limit_train_batches=4,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        accelerator="cpu",
        devices=1,
    )
    trainer.fit(model, datamodule=dm)
    trainer.validate(model, datamodule=dm, verbose=False)
    return float(trainer.callback_metrics["val/loss"])


@pytest.mark.slow
def test_regression_cv_end_to_end(tmp_path, capsys):
    args = ["--config", REGRESSION, "--folds", "3", "--trainer.max_epochs=1", "--trainer.limit_train_batches=4"]
    assert cv_main([*args, "--out", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "mean ± std" in out
    for i in range(3):
        assert f"fold {i} ({i + 1} of 3)" in out
    assert "val/loss" in out
    assert "ddof=1" in out
    assert "lightning-lossdiag" not in out  # the Doctor's own table is not printed without --fold-reports

    data = json.loads((tmp_path / "cv_summary.json").read_text())
    assert data["folds"] == 3
    assert data["seed"] == 0
    assert data["stratified"] is False
    assert data["std_ddof"] == 1
    assert data["config"] == REGRESSION
    assert data["config_text"] == Path(REGRESSION).read_text(encoding="utf-8")  # readable without the file
    assert data["overrides"] == args[4:]

    dm = NonlinearRegressionDataModule(num_features=6, num_samples=1600, seed=0)
    n = len(dm.cv_dataset())
    sizes = data["fold_sizes"]
    assert [s["val"] for s in sizes] == [len(f.val) for f in kfold_indices(n, 3, seed=0)]
    assert all(s["train"] + s["val"] == n for s in sizes)

    metrics = data["metrics"]
    assert "val/loss" in metrics
    assert any(name.startswith("metrics/val/") for name in metrics)
    for name, m in metrics.items():
        assert len(m["values"]) == 3, name
        assert all(v is not None and math.isfinite(v) for v in m["values"]), name
        assert m["mean"] == pytest.approx(np.mean(m["values"]))
        assert m["std"] == pytest.approx(np.std(m["values"], ddof=1))
        assert f"{m['mean']:.4g} ± {m['std']:.4g}" in out

    # a Doctor ran in every fold (LossDiagnostics is in the config): findings are a count and codes per fold
    assert len(data["findings"]) == 3
    for f in data["findings"]:
        assert f["count"] == len(f["codes"])

    # every fold logs its own TensorBoard run under the parent folder; its last val/loss is the summary's value
    for i in range(3):
        log_dir = tmp_path / f"fold_{i}"
        assert data["log_dirs"][i] == str(log_dir)
        scalars = _scalars(log_dir)
        assert scalars["val/loss"][-1] == pytest.approx(metrics["val/loss"]["values"][i], rel=1e-6)

    # fold 1 started from a fresh model: training it by hand from the YAML gives the same validation loss
    assert _manual_fold(1, 3) == pytest.approx(metrics["val/loss"]["values"][1], rel=1e-5)


@pytest.mark.slow
def test_stratified_cv_keeps_class_shares_and_uses_default_folder(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    code = cv_main(
        [
            "--config",
            BINARY,
            "--folds",
            "3",
            "--stratified",
            "--seed",
            "11",
            "--trainer.max_epochs=1",
            "--trainer.limit_train_batches=2",
            "--trainer.limit_val_batches=2",
            "--trainer.enable_progress_bar=false",
            "--trainer.enable_checkpointing=false",
            "--ddof",
            "0",
            "--fold-reports",
        ]
    )
    assert code == 0
    out = capsys.readouterr().out
    assert out.count("lightning-lossdiag") == 3  # the Doctor printed once per fold (after fit, not after validate)
    assert "ddof=0" in out
    summary = tmp_path / "runs" / "cv" / "binary_imbalanced" / "cv_summary.json"
    data = json.loads(summary.read_text())
    assert data["stratified"] is True
    assert data["seed"] == 11
    assert data["std_ddof"] == 0
    labels = ImbalancedBinaryDataModule(positive_rate=0.1, num_samples=1600, seed=0).cv_targets().tolist()
    totals = Counter(labels)
    for counts in data["val_class_counts"]:
        for cls, total in totals.items():
            assert abs(counts.get(str(cls), 0) - total / 3) < 1
    for i in range(3):
        assert (summary.parent / f"fold_{i}").is_dir()
    for m in data["metrics"].values():
        assert m["std"] == pytest.approx(np.std(m["values"], ddof=0))


def _assert_usage_error(capsys, code, *fragments):
    captured = capsys.readouterr()
    assert code == 2
    assert "Traceback" not in captured.err
    for fragment in fragments:
        assert fragment in captured.err, captured.err
    message = [line for line in captured.err.splitlines() if line.startswith("lossdiag cv:")]
    assert len(message) == 1, captured.err


def test_error_folds_below_two(tmp_path, capsys):
    code = cv_main(["--config", REGRESSION, "--folds", "1", "--out", str(tmp_path)])
    _assert_usage_error(capsys, code, "`--folds` must be an integer >= 2, got 1")
    assert not any(tmp_path.iterdir())


def test_error_missing_config(tmp_path, capsys):
    missing = str(tmp_path / "nope.yaml")
    code = cv_main(["--config", missing, "--folds", "3"])
    _assert_usage_error(capsys, code, "`--config` must be an existing YAML file", missing)


def test_error_more_folds_than_rows(tmp_path, capsys):
    # 20 samples: 4 held out for testing, 16 rows for the folds
    args = ["--config", REGRESSION, "--folds", "17", "--data.num_samples=20", "--out", str(tmp_path)]
    _assert_usage_error(capsys, cv_main(args), "`--folds` must not exceed the number of rows", "(16), got 17")


def test_error_stratified_regression(tmp_path, capsys):
    code = cv_main(["--config", REGRESSION, "--folds", "3", "--stratified", "--out", str(tmp_path)])
    _assert_usage_error(capsys, code, "`--stratified` needs class labels", "cv_targets() returned None")


def test_error_datamodule_without_protocol(tmp_path, capsys):
    config = tmp_path / "boring.yaml"
    config.write_text(
        yaml.safe_dump(
            {
                "model": {"class_path": "lightning.pytorch.demos.boring_classes.BoringModel"},
                "data": {"class_path": "lightning.pytorch.demos.boring_classes.BoringDataModule"},
            }
        )
    )
    code = cv_main(["--config", str(config), "--folds", "2", "--out", str(tmp_path / "out")])
    _assert_usage_error(
        capsys, code, "BoringDataModule lacks `cv_dataset`, `set_fold`", "cross-validation protocol", "set_fold("
    )
    code = cv_main(["--config", str(config), "--folds", "2", "--stratified", "--out", str(tmp_path / "out")])
    _assert_usage_error(capsys, code, "lacks `cv_dataset`, `cv_targets`, `set_fold`")


def test_lossdiag_cv_command_dispatches_here(tmp_path, capsys):
    from lightning_lossdiag.cli import main

    code = main(["cv", "--config", str(tmp_path / "missing.yaml"), "--folds", "3"])
    _assert_usage_error(capsys, code, "`--config` must be an existing YAML file")
