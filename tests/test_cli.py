from __future__ import annotations

import importlib
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from lightning_lossdiag.cli import config_stem, main
from lightning_lossdiag.losses import list_losses

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ["regression", "binary_imbalanced", "multiclass", "multitask"]


def _short_fit_args(config: str, save_dir: Path) -> list[str]:
    return [
        "fit",
        "--config",
        str(ROOT / "configs" / f"{config}.yaml"),
        "--trainer.max_epochs=1",
        "--trainer.limit_train_batches=4",
        "--trainer.limit_val_batches=2",
        "--trainer.enable_progress_bar=false",
        "--trainer.log_every_n_steps=2",
        f"--trainer.logger.init_args.save_dir={save_dir}",
    ]


def test_losses_lists_every_registered_loss(capsys):
    assert main(["losses"]) == 0
    out = capsys.readouterr().out
    rows = [m.group(1) for line in out.splitlines() if (m := re.match(r"^│ (\S+)", line))]
    names = [info.name for info in list_losses()]
    assert len(rows) >= 25
    assert rows == names
    for word in ("aliases", "task", "what it is for", "arguments"):
        assert word in out


def test_losses_task_filter(capsys):
    assert main(["losses", "--task", "regression"]) == 0
    out = capsys.readouterr().out
    assert "huber" in out
    assert "cross_entropy" not in out
    assert main(["losses", "--task", "nonsense"]) == 2
    assert "`--task` must be one of" in capsys.readouterr().err


def test_help_lists_all_commands(capsys):
    assert main(["--help"]) == 0
    out = capsys.readouterr().out
    for command in ("fit", "validate", "test", "predict", "losses", "report", "cv"):
        assert re.search(rf"^  {command}\s", out, flags=re.MULTILINE), command


def test_unknown_command_exits_2(capsys):
    assert main(["trian"]) == 2
    assert "unknown command 'trian'" in capsys.readouterr().err


def test_config_stem():
    assert config_stem(["fit", "-c", "x/multitask.yaml"]) == "multitask"
    assert config_stem(["fit", "--trainer.max_epochs=1"]) is None


@pytest.mark.slow
@pytest.mark.parametrize("config", CONFIGS)
def test_fit_each_config_writes_train_loss(config, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "argv", ["lossdiag", *_short_fit_args(config, tmp_path / "runs")])
    assert main() == 0
    run_dir = tmp_path / "runs" / config / "version_0"
    assert list(run_dir.glob("events.out.tfevents.*"))
    out = capsys.readouterr().out
    assert f"TensorBoard logs in {run_dir}" in out  # the CLI says where to look
    assert f"diagnosis report in {run_dir / 'lossdiag_report.json'}" in out
    assert (run_dir / "lossdiag_report.json").is_file()
    acc = EventAccumulator(str(run_dir))
    acc.Reload()
    tags = acc.Tags()["scalars"]
    assert "train/loss" in tags
    assert "val/loss" in tags
    assert len(acc.Scalars("train/loss")) >= 1
    if config == "multitask":
        assert {"val/loss/ctr", "val/loss/cvr"} <= set(tags)
    # `lossdiag report` on the finished run reads its event files back and prints the same kind of table
    assert main(["report", str(run_dir), "--json"]) == 0
    offline = json.loads(capsys.readouterr().out)
    assert isinstance(offline["findings"], list)
    assert offline["summary"]["last"]["train/loss"] == pytest.approx(acc.Scalars("train/loss")[-1].value)
    assert main(["report", str(run_dir)]) == 0  # and what a person reads
    text = capsys.readouterr().out
    assert "lossdiag report" in text
    for finding in offline["findings"]:
        assert finding["code"] in text
    if not offline["findings"]:
        assert "no findings" in text


@pytest.mark.slow
def test_misspelt_loss_exits_2_without_traceback(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    args = [*_short_fit_args("multiclass", tmp_path / "runs"), "--model.init_args.loss.name=focall"]
    monkeypatch.setattr(sys, "argv", ["lossdiag", *args])
    assert main() == 2
    err = capsys.readouterr().err
    assert "did you mean 'focal'" in err
    assert "Traceback" not in err
    assert not (tmp_path / "runs" / "multiclass" / "version_0" / "checkpoints").exists()


def _loss_three(tmp_path: Path) -> list[str]:
    text = (ROOT / "configs" / "regression.yaml").read_text()
    config = tmp_path / "bad.yaml"
    config.write_text(re.sub(r"    loss:\n      name: huber\n      delta: 1.0\n", "    loss: 3\n", text))
    assert "loss: 3" in config.read_text()
    return ["--config", str(config)]


@pytest.mark.parametrize(
    ("extra", "expected"),
    [
        (_loss_three, r"^error: `loss` \(under model\) got 3 \(int\); it must be a loss name .*lossdiag losses"),
        (["--trainer.max_epochs=abc"], r"^error: `trainer.max_epochs` got abc \(str\); it must be int or None"),
        (
            ["--trainer.gradient_clip_algorithm=sideways"],
            r"^lossdiag: bad configuration: `gradient_clip_algorithm` sideways is invalid. Allowed .*'value', 'norm'",
        ),
        (
            ["--trainer.callbacks+=lightning_lossdiag.LossDiagnostics", "--trainer.callbacks.on_nonfinite=ignore"],
            r"^error: `on_nonfinite` \(under trainer.callbacks\) got ignore; it must be one of 'warn', 'skip'",
        ),
    ],
    ids=["loss-of-wrong-type", "trainer-int", "trainer-choice", "callback-option"],
)
def test_bad_values_get_one_short_message(tmp_path, monkeypatch, capsys, extra, expected):
    monkeypatch.chdir(tmp_path)
    extra = extra(tmp_path) if callable(extra) else extra
    monkeypatch.setattr(sys, "argv", ["lossdiag", *_short_fit_args("regression", tmp_path / "runs"), *extra])
    try:
        status = main()
    except SystemExit as exc:  # jsonargparse exits by itself on a value it cannot parse
        status = exc.code
    err = capsys.readouterr().err
    assert status == 2
    assert "Traceback" not in err
    assert re.search(expected, err, flags=re.MULTILINE), err
    assert len(err.strip().splitlines()) <= 4, err  # not the 50 lines of every Trainer option
    assert not (tmp_path / "runs").exists()


@pytest.mark.slow
def test_console_entry_point_exit_status(tmp_path):
    config = tmp_path / "bad.yaml"
    text = (ROOT / "configs" / "multiclass.yaml").read_text().replace("name: focal", "name: focall")
    config.write_text(text)
    args = [a if not a.endswith("multiclass.yaml") else str(config) for a in _short_fit_args("multiclass", tmp_path)]
    proc = subprocess.run(
        [sys.executable, "-m", "lightning_lossdiag.cli", *args], cwd=tmp_path, capture_output=True, text=True
    )
    assert proc.returncode == 2
    assert "did you mean 'focal'" in proc.stderr
    assert "Traceback" not in proc.stderr


@pytest.mark.parametrize("command", ["report", "cv"])
def test_report_and_cv_are_dispatched(command, capsys):
    module = {"report": "lightning_lossdiag.diagnosis.offline", "cv": "lightning_lossdiag.cv"}[command]
    importlib.import_module(module)
    try:
        status = main([command, "--help"])
    except SystemExit as exc:  # argparse's --help exits
        status = exc.code
    assert status == 0
    assert f"{command}" in capsys.readouterr().out
