"""Kill a fit after a checkpoint, resume it with ``lossdiag fit --ckpt_path``, and compare with an uninterrupted run.

Every run goes through the real CLI in a subprocess (``python -m lightning_lossdiag.cli``) with ``resume_script.py``
(module, data, a killer and a state dumper) importable from ``PYTHONPATH``. Training is a pure function of the
global step (see ``resume_script``), so the resumed run's final callback state must equal the uninterrupted run's.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

pytestmark = pytest.mark.slow

HERE = Path(__file__).resolve().parent
TIMEOUT = 180
MAX_EPOCHS = 4
TOTAL_STEPS = 6 * MAX_EPOCHS
FLUSH_EVERY = 3
KILL_AT = 9  # a checkpoint (and a flush) at step 9, mid-epoch 1; the process dies before step 10
DIAG = "lightning_lossdiag.LossDiagnostics"


def _config(
    tmp: Path, version: str, *, kill: bool, every_n_train_steps: int = FLUSH_EVERY, kill_at: int = KILL_AT
) -> Path:
    ckpt_dir = tmp / f"checkpoints_{version}"
    callbacks: list[dict[str, Any]] = [
        {"class_path": DIAG, "init_args": {"loss": {"spike_warmup": 5}, "on_nonfinite": "skip"}},
        {
            "class_path": "lightning.pytorch.callbacks.ModelCheckpoint",
            "init_args": {
                "dirpath": str(ckpt_dir),
                "every_n_train_steps": every_n_train_steps,
                "save_last": True,
                "save_top_k": -1,
            },
        },
        {"class_path": "resume_script.DumpState", "init_args": {"path": str(tmp / f"state_{version}.json")}},
    ]
    if kill:
        ckpt = ckpt_dir / f"epoch={kill_at // 6}-step={kill_at}.ckpt"
        callbacks.append(
            {"class_path": "resume_script.KillAfterCheckpoint", "init_args": {"step": kill_at, "checkpoint": str(ckpt)}}
        )
    config = {
        "seed_everything": 0,
        "trainer": {
            "accelerator": "cpu",
            "devices": 1,
            "max_epochs": MAX_EPOCHS,
            "log_every_n_steps": FLUSH_EVERY,
            "gradient_clip_val": 0.5,
            "enable_progress_bar": False,
            "enable_model_summary": False,
            "num_sanity_val_steps": 0,
            "logger": {
                "class_path": "lightning.pytorch.loggers.TensorBoardLogger",
                "init_args": {"save_dir": str(tmp / "runs"), "name": "run", "version": version},
            },
            "callbacks": callbacks,
        },
        "model": {"class_path": "resume_script.StepModule"},
        "data": {"class_path": "resume_script.StepData"},
    }
    path = tmp / f"{version}.yaml"
    path.write_text(json.dumps(config, indent=1), encoding="utf-8")  # JSON is YAML
    return path


def _fit(tmp: Path, config: Path, ckpt: Path | None = None) -> subprocess.CompletedProcess:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(HERE), *filter(None, [env.get("PYTHONPATH")])])
    cmd = [sys.executable, "-m", "lightning_lossdiag.cli", "fit", "--config", str(config)]
    if ckpt is not None:
        cmd.append(f"--ckpt_path={ckpt}")
    return subprocess.run(cmd, cwd=tmp, env=env, capture_output=True, text=True, timeout=TIMEOUT)


def _ok(proc: subprocess.CompletedProcess) -> None:
    assert proc.returncode == 0, f"exit {proc.returncode}\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}"


def _kill_and_resume(tmp: Path, kill_at: int, every_n_train_steps: int) -> None:
    killed = _fit(tmp, _config(tmp, "killed", kill=True, every_n_train_steps=every_n_train_steps, kill_at=kill_at))
    assert killed.returncode == -9, f"the fit was meant to be killed\n{killed.stderr[-4000:]}"
    assert not (tmp / "state_killed.json").exists()
    last = tmp / "checkpoints_killed" / "last.ckpt"
    assert torch.load(last, weights_only=False)["global_step"] == kill_at
    _ok(_fit(tmp, _config(tmp, "resumed", kill=False, every_n_train_steps=every_n_train_steps), ckpt=last))


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> Path:
    """An uninterrupted run, a run killed right after the checkpoint of step ``KILL_AT``, and its resumption."""
    tmp = tmp_path_factory.mktemp("resume")
    _ok(_fit(tmp, _config(tmp, "full", kill=False)))
    _kill_and_resume(tmp, KILL_AT, FLUSH_EVERY)
    return tmp


def _state(tmp: Path, version: str) -> dict[str, Any]:
    return json.loads((tmp / f"state_{version}.json").read_text())


def _assert_close(actual: Any, expected: Any, where: str = "") -> None:
    """Equal plain data, floats within 1e-6 relative (NaN equals NaN)."""
    if isinstance(expected, dict):
        assert isinstance(actual, dict), where
        assert sorted(actual) == sorted(expected), f"{where}: keys {sorted(actual)} != {sorted(expected)}"
        for key in expected:
            _assert_close(actual[key], expected[key], f"{where}.{key}")
    elif isinstance(expected, (list, tuple)):
        assert isinstance(actual, (list, tuple)), where
        assert len(actual) == len(expected), f"{where}: {actual} != {expected}"
        for i, (a, e) in enumerate(zip(actual, expected, strict=True)):
            _assert_close(a, e, f"{where}[{i}]")
    elif isinstance(expected, float) and math.isnan(expected):
        assert isinstance(actual, float), where
        assert math.isnan(actual), f"{where}: {actual} != nan"
    elif isinstance(expected, (int, float)) and not isinstance(expected, bool):
        assert actual == pytest.approx(expected, rel=1e-6, abs=1e-9), f"{where}: {actual} != {expected}"
    else:
        assert actual == expected, f"{where}: {actual!r} != {expected!r}"


def test_uninterrupted_run_has_something_to_resume(runs):
    full = _state(runs, "full")
    assert full["global_step"] == TOTAL_STEPS
    loss = full["diagnostics"]["loss"]["stats"]
    assert loss["nonfinite_count"] == 1
    assert loss["first_nonfinite_step"] == 5
    assert loss["spike_count"] >= 1
    assert loss["first_spike_step"] == 15
    assert full["diagnostics"]["nonfinite"]["skipped_steps"] == 1
    assert full["diagnostics"]["scheduler"]["reduction_counts"][0] >= 2
    assert {"scheduler_mode_mismatch", "nonfinite_loss"} <= set(full["findings"])


@pytest.mark.parametrize("part", ["loss", "gradients", "scheduler", "nonfinite", "errors", "metrics", "activations"])
def test_resumed_part_state_equals_uninterrupted(runs, part):
    full, resumed = _state(runs, "full"), _state(runs, "resumed")
    assert resumed["global_step"] == full["global_step"] == TOTAL_STEPS
    _assert_close(resumed["diagnostics"][part], full["diagnostics"][part], part)


def _without(doctor: dict[str, Any], prefixes: tuple[str, ...]) -> dict[str, Any]:
    scalars = {k: v for k, v in doctor["record"]["scalars"].items() if not k.startswith(prefixes)}
    return {**doctor, "record": {**doctor["record"], "scalars": scalars}}


TRAIN_METRICS = "metrics/train/"


def test_resumed_doctor_record_and_findings_equal_uninterrupted(runs):
    full, resumed = _state(runs, "full"), _state(runs, "resumed")
    doctor_full, doctor_resumed = full["diagnostics"]["doctor"], resumed["diagnostics"]["doctor"]
    assert any(k.startswith(TRAIN_METRICS) for k in doctor_resumed["record"]["scalars"])
    # every series (train/loss, grad/*, plateau/*, errors/*, metrics/val/*, val/loss, ...), the notes and findings;
    # the training metrics of the epoch the run was resumed in are checked by the xfail test below
    _assert_close(_without(doctor_resumed, (TRAIN_METRICS,)), _without(doctor_full, (TRAIN_METRICS,)), "doctor")
    assert resumed["findings"] == full["findings"]


def test_resumed_training_metrics_of_the_interrupted_epoch(runs):
    full, resumed = _state(runs, "full"), _state(runs, "resumed")
    key = f"{TRAIN_METRICS}mae"
    _assert_close(
        resumed["diagnostics"]["doctor"]["record"]["scalars"][key],
        full["diagnostics"]["doctor"]["record"]["scalars"][key],
        key,
    )


def test_resumed_plateau_state_equals_uninterrupted(runs):
    full, resumed = _state(runs, "full"), _state(runs, "resumed")
    _assert_close(resumed["plateau"], full["plateau"], "plateau")
    assert resumed["lr"] == pytest.approx(full["lr"], rel=1e-12)


def _scalars(folder: Path) -> EventAccumulator:
    acc = EventAccumulator(str(folder), size_guidance={"scalars": 0})
    acc.Reload()
    return acc


def test_resumed_event_files_continue_the_step_axis(runs):
    full = _scalars(runs / "runs" / "run" / "full")
    resumed = _scalars(runs / "runs" / "run" / "resumed")
    killed = _scalars(runs / "runs" / "run" / "killed")
    for key in ("train/loss", "train/loss_ema", "grad/norm_total"):
        after = [e.step for e in resumed.Scalars(key)]
        assert after == sorted(set(after)), f"{key}: a step written twice after the resume"
        assert after[0] == KILL_AT + FLUSH_EVERY
        assert after[-1] == TOTAL_STEPS
        before = [e.step for e in killed.Scalars(key)] if key in killed.Tags()["scalars"] else []
        assert all(s <= KILL_AT for s in before)
        # the flushed values after the resume are those of the uninterrupted run at the same steps
        reference = {e.step: e.value for e in full.Scalars(key)}
        for event in resumed.Scalars(key):
            assert event.value == pytest.approx(reference[event.step], rel=1e-5, abs=1e-7), (key, event.step)


def test_checkpoint_of_an_older_version_still_resumes(runs, tmp_path):
    """Drop keys from every part's saved state (an older callback version) and resume from that checkpoint."""
    ckpt = torch.load(runs / "checkpoints_killed" / "last.ckpt", weights_only=False)
    states = ckpt["callbacks"]
    (key,) = [k for k in states if k.startswith("LossDiagnostics")]
    parts = states[key]
    assert {"loss", "gradients", "doctor"} <= set(parts)
    for name, state in parts.items():
        for dropped in sorted(state)[::2]:  # every other key of every part
            del state[dropped]
        assert isinstance(state, dict), name
    del parts["scheduler"]  # and a whole part missing, as from a version before it existed
    old = tmp_path / "old.ckpt"
    torch.save(ckpt, old)
    proc = _fit(tmp_path, _config(tmp_path, "old", kill=False), ckpt=old)
    _ok(proc)
    state = _state(tmp_path, "old")
    assert state["global_step"] == TOTAL_STEPS
    assert state["diagnostics"]["loss"]["stats"]["ema_n"] > 0


@pytest.fixture(scope="module")
def runs_off_flush(tmp_path_factory, runs) -> Path:
    """Killed after a checkpoint at step 8, which is not a flush step (flushes every 3 steps)."""
    tmp = tmp_path_factory.mktemp("resume_off_flush")
    _kill_and_resume(tmp, 8, every_n_train_steps=4)
    return tmp


#: GradientMonitor keys over the steps since the last flush: its window accumulators are not in the checkpoint
GRAD_WINDOW = ("grad/norm_total_max", "grad/clip_rate")


@pytest.mark.parametrize("part", ["loss", "gradients", "scheduler", "nonfinite", "doctor"])
def test_resume_from_a_checkpoint_between_flushes(runs, runs_off_flush, part):
    full, resumed = _state(runs, "full"), _state(runs_off_flush, "resumed")
    assert resumed["global_step"] == TOTAL_STEPS
    expected, actual = full["diagnostics"][part], resumed["diagnostics"][part]
    if part == "doctor":  # every series but the two xfail cases (train metrics above, gradient window below)
        expected, actual = (_without(d, (TRAIN_METRICS, *GRAD_WINDOW)) for d in (expected, actual))
    _assert_close(actual, expected, part)


def test_gradient_window_survives_a_checkpoint_between_flushes(runs, runs_off_flush):
    full, resumed = _state(runs, "full"), _state(runs_off_flush, "resumed")
    key = "grad/norm_total_max"
    _assert_close(
        resumed["diagnostics"]["doctor"]["record"]["scalars"][key],
        full["diagnostics"]["doctor"]["record"]["scalars"][key],
        key,
    )
