"""DDP on two CPU processes (gloo): merged statistics, rank-0-only writing, no rank left waiting.

Lightning's DDP re-launches the running script with ``sys.argv``, so every DDP run happens in a subprocess (the CLI,
or ``ddp_script.py``); the pytest process only starts them and reads what they wrote. A subprocess that runs past
``TIMEOUT`` seconds is a failure (a rank waiting on a collective the other never makes).
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import numpy as np
import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

pytestmark = [pytest.mark.ddp, pytest.mark.slow]

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
SCRIPT = HERE / "ddp_script.py"
TIMEOUT = 120


def _load_script() -> ModuleType:
    spec = importlib.util.spec_from_file_location("lossdiag_ddp_script", SCRIPT)
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


ddp = _load_script()


def _run(cmd: list[str], cwd: Path) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in ("LOCAL_RANK", "NODE_RANK", "WORLD_SIZE", "MASTER_PORT")}
    env["LOSSDIAG_HANG_AFTER"] = str(TIMEOUT - 10)  # a hanging rank prints its stack before the timeout
    try:
        proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=TIMEOUT)
    except subprocess.TimeoutExpired as err:
        pytest.fail(f"DDP run did not finish within {TIMEOUT} s (a rank waits on the other): {cmd}\n{err.stdout}")
    assert proc.returncode == 0, (
        f"exit {proc.returncode}\nSTDOUT:\n{proc.stdout[-4000:]}\nSTDERR:\n{proc.stderr[-6000:]}"
    )
    return proc


def _ranks(out: Path, name: str) -> list[dict]:
    found = [json.loads((out / f"{name}_rank{r}.json").read_text()) for r in range(2)]
    assert [d["rank"] for d in found] == [0, 1]
    assert all(d["world_size"] == 2 for d in found)
    return found


def _events(folder: Path) -> EventAccumulator:
    files = sorted(folder.glob("events.out.tfevents.*"))
    assert len(files) == 1, f"expected one event file in {folder}, got {files}"
    acc = EventAccumulator(str(folder), size_guidance={"scalars": 0, "histograms": 0, "images": 0, "tensors": 0})
    acc.Reload()
    return acc


def _files(root: Path, pattern: str, sessions: bool = False) -> list[Path]:
    """Files under ``root`` matching ``pattern``: the run's own, or (``sessions``) the HParams session's."""
    return sorted(p for p in root.rglob(pattern) if p.is_file() and ("lossdiag_hparams" in p.parts) == sessions)


# ---------------------------------------------------------------------------------------------------- the CLI
@pytest.fixture(scope="module")
def cli_run(tmp_path_factory) -> Path:
    tmp = tmp_path_factory.mktemp("ddp_cli")
    cmd = [
        sys.executable, "-m", "lightning_lossdiag.cli", "fit",
        "--config", str(ROOT / "configs" / "regression.yaml"),
        "--trainer.accelerator=cpu", "--trainer.devices=2", "--trainer.strategy=ddp",
        "--trainer.max_epochs=2", "--trainer.limit_train_batches=4", "--trainer.limit_val_batches=2",
        "--trainer.log_every_n_steps=2", "--trainer.enable_progress_bar=false",
        f"--trainer.logger.init_args.save_dir={tmp / 'runs'}",
    ]  # fmt: skip
    _run(cmd, cwd=tmp)
    return tmp / "runs"


def test_cli_ddp_fit_writes_everything_once_on_rank_zero(cli_run):
    events = _files(cli_run, "events.out.tfevents.*")
    reports = _files(cli_run, "lossdiag_report.json")
    assert len(events) == 1, events
    assert len(reports) == 1, reports
    assert events[0].parent == reports[0].parent
    (session,) = _files(cli_run, "events.out.tfevents.*", sessions=True)  # one HParams session, from rank 0
    assert session.parent.parent == events[0].parent
    report = json.loads(reports[0].read_text())
    assert report["summary"]["status"] == "finished"
    assert report["summary"]["global_step"] == 8  # 2 epochs x 4 batches on each rank: every rank stepped together

    acc = _events(events[0].parent)
    steps = [e.step for e in acc.Scalars("train/loss")]
    assert steps == sorted(set(steps)), "a training step was written twice"
    assert steps[-1] == 8
    # validation: 256 rows split over 2 ranks x 2 batches of 64; the epoch histogram holds both ranks' rows
    residual = acc.Histograms("errors/val/residual")
    assert len(residual) == 2  # one per epoch, not one per rank
    for event in residual:
        assert sum(event.histogram_value.bucket) == 256
        assert event.histogram_value.num == 256
    assert [e.value for e in acc.Scalars("errors/val/samples")] == [256.0, 256.0]
    assert len(acc.Images("errors/val/pred_vs_true")) == 2


@pytest.mark.parametrize("config", ["binary_imbalanced", "multiclass", "multitask"])
def test_cli_ddp_fit_of_the_other_configs(tmp_path, config):
    cmd = [
        sys.executable, "-m", "lightning_lossdiag.cli", "fit",
        "--config", str(ROOT / "configs" / f"{config}.yaml"),
        "--trainer.accelerator=cpu", "--trainer.devices=2", "--trainer.strategy=ddp",
        "--trainer.max_epochs=1", "--trainer.limit_train_batches=4", "--trainer.limit_val_batches=2",
        "--trainer.log_every_n_steps=2", "--trainer.enable_progress_bar=false",
        f"--trainer.logger.init_args.save_dir={tmp_path / 'runs'}",
    ]  # fmt: skip
    _run(cmd, cwd=tmp_path)
    (events,) = _files(tmp_path / "runs", "events.out.tfevents.*")
    (report,) = _files(tmp_path / "runs", "lossdiag_report.json")
    assert json.loads(report.read_text())["summary"]["status"] == "finished"
    tags = _events(events.parent).Tags()
    assert "train/loss" in tags["scalars"]
    assert any(t.startswith("metrics/val/") for t in tags["scalars"])
    assert any(t.startswith("errors/val/") for t in tags["tensors"] + tags["images"] + tags["histograms"])


# ------------------------------------------------------------------------- validation of a fixed model
@pytest.fixture(scope="module")
def validate_run(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("ddp_validate")
    _run([sys.executable, str(SCRIPT), "validate", str(out), "2"], cwd=out)
    return out


@pytest.fixture(scope="module")
def single_run(tmp_path_factory) -> Path:
    """The same validation in this process, on one device (the reference of the DDP run)."""
    out = tmp_path_factory.mktemp("single_validate")
    for task in ("regression", "multiclass", "manyclass"):
        ddp.validate_task(task, out, devices=1)
    return out


def test_ddp_residual_histogram_counts_all_ranks(validate_run, single_run):
    ranks = _ranks(validate_run, "validate_regression")
    (single,) = [json.loads((single_run / "validate_regression_rank0.json").read_text())]
    hist = _events(validate_run / "regression" / "validate").Histograms("errors/val/residual")
    assert len(hist) == 1
    h = hist[0].histogram_value
    assert sum(h.bucket) == ddp.N_VAL  # 32 rows on each rank, summed
    assert h.num == ddp.N_VAL
    # the sum of residuals does not depend on the bucket edges: DDP == one process == plain torch
    ref_sum = ranks[0]["reference"]["residual_sum"]
    single_h = _events(single_run / "regression" / "validate").Histograms("errors/val/residual")[0].histogram_value
    assert h.sum == pytest.approx(ref_sum, rel=1e-4, abs=1e-4)
    assert h.sum == pytest.approx(single_h.sum, rel=1e-4, abs=1e-4)
    assert h.sum_squares == pytest.approx(single_h.sum_squares, rel=1e-4)
    assert single["world_size"] == 1
    # bucket by bucket: the merged counts are numpy's histogram of ALL rows' residuals on the written edges
    model, data = ddp.make_model("regression"), ddp.make_data("regression", ddp.N_VAL, seed=1)
    with torch.no_grad():
        residual = (model(data.tensors[0]) - data.tensors[1]).double().numpy()
    limits = np.asarray(h.bucket_limit)
    edges = np.concatenate([[limits[0] - (limits[1] - limits[0])], limits])
    expected, _ = np.histogram(residual, bins=edges)
    assert list(h.bucket) == expected.tolist()


def test_ddp_classification_counts_all_ranks(validate_run):
    acc = _events(validate_run / "multiclass" / "validate")
    y = ddp.make_data("multiclass", ddp.N_VAL, seed=1).tensors[1]
    target = acc.Histograms("errors/val/target_dist")[0].histogram_value
    true_prob = acc.Histograms("errors/val/true_class_prob")[0].histogram_value
    assert sum(true_prob.bucket) == ddp.N_VAL
    present = [int(c) for c in torch.bincount(y, minlength=3) if c > 0]
    assert [int(c) for c in target.bucket if c > 0] == present  # class counts of all validation rows
    assert len(acc.Images("errors/val/confusion_matrix")) == 1


def test_ddp_many_class_views_merge_all_ranks(validate_run, single_run):
    # 40 classes: the confused pairs come from the device sketch, merged over both ranks; per-class views are the
    # bounded ones (micro and worst-class PR curves, class histograms, tables), and equal a one-process run
    ddp_acc, single_acc = (
        _events(validate_run / "manyclass" / "validate"),
        _events(single_run / "manyclass" / "validate"),
    )
    for tag in ("errors/val/confused_pairs/text_summary", "errors/val/worst_classes/text_summary"):
        ours = ddp_acc.Tensors(tag)[0].tensor_proto.string_val[0].decode()
        assert ours == single_acc.Tensors(tag)[0].tensor_proto.string_val[0].decode(), tag
    assert "errors/val/pr_curve/micro" in ddp_acc.Tags()["tensors"]
    assert not [t for t in ddp_acc.Tags()["scalars"] if "/recall/" in t]
    recall = ddp_acc.Histograms("errors/val/class_recall")[0].histogram_value
    y = ddp.make_data("manyclass", ddp.N_VAL, seed=1).tensors[1]
    assert recall.num == len(torch.unique(y))  # one value per class present among ALL rows


@pytest.mark.parametrize("task", ["regression", "multiclass", "manyclass"])
def test_ddp_every_metric_equals_single_process(validate_run, single_run, task):
    ranks = _ranks(validate_run, f"validate_{task}")
    single = json.loads((single_run / f"validate_{task}_rank0.json").read_text())["callback_metrics"]
    keys = sorted(k for k in single if k.startswith("metrics/val/"))
    assert len(keys) >= 5  # regression: mae, mse, rmse, r2, explained variance; multiclass: 6 + per-class recall
    acc = _events(validate_run / task / "validate")
    for key in keys:
        for rank in ranks:
            assert rank["callback_metrics"][key] == pytest.approx(single[key], rel=1e-5, abs=1e-7), key
        assert acc.Scalars(key)[-1].value == pytest.approx(single[key], rel=1e-5, abs=1e-7), key


@pytest.mark.parametrize(
    ("task", "names"),
    [("regression", ["mae", "mse"]), ("multiclass", ["accuracy"])],
    ids=["regression", "multiclass"],
)
def test_ddp_metrics_equal_single_process(validate_run, single_run, task, names):
    ranks = _ranks(validate_run, f"validate_{task}")
    single = json.loads((single_run / f"validate_{task}_rank0.json").read_text())
    acc = _events(validate_run / task / "validate")
    for name in names:
        key = f"metrics/val/{name}"
        expected = ranks[0]["reference"][name]  # plain torch over all 64 rows
        assert single["callback_metrics"][key] == pytest.approx(expected, rel=1e-5)
        for rank in ranks:  # torchmetrics merged both halves on every rank
            assert rank["callback_metrics"][key] == pytest.approx(expected, rel=1e-5)
        assert acc.Scalars(key)[-1].value == pytest.approx(expected, rel=1e-5)


@pytest.mark.parametrize("task", ["regression", "multiclass"])
def test_ddp_only_rank_zero_writes(validate_run, task):
    for stage in ("validate", "fit"):
        name = f"{stage}_{task}"
        ranks = _ranks(validate_run, name)
        assert ranks[0]["report_path"] is not None
        assert Path(ranks[0]["report_path"]).is_file()
        assert ranks[1]["report_path"] is None
    assert len(_files(validate_run / task, "events.out.tfevents.*")) == 2  # one per Trainer (validate, fit)
    assert len(_files(validate_run / task, "lossdiag_report.json")) == 2


@pytest.mark.parametrize("task", ["regression", "multiclass"])
def test_ddp_fit_with_every_part(validate_run, task):
    ranks = _ranks(validate_run, f"fit_{task}")
    steps = ddp.N_TRAIN // (2 * ddp.BATCH) * 2  # 8 batches per rank per epoch, 2 epochs
    assert [r["global_step"] for r in ranks] == [steps, steps]
    assert ranks[0]["param_sum"] == pytest.approx(ranks[1]["param_sum"], rel=1e-9)  # replicas stayed in sync
    acc = _events(validate_run / task / "fit")
    tags = set(acc.Tags()["scalars"])
    for key in ("train/loss", "train/loss_ema", "grad/norm_total", f"metrics/val/{ddp_metric(task)}"):
        assert key in tags
    assert any(t.startswith("act/") for t in tags)
    for key in ("train/loss", "grad/norm_total"):
        written = [e.step for e in acc.Scalars(key)]
        assert written == sorted(set(written))
        assert written[-1] == steps


def ddp_metric(task: str) -> str:
    return "mae" if task == "regression" else "accuracy"


def test_ddp_val_loss_is_the_mean_over_all_rows(validate_run):
    ranks = _ranks(validate_run, "validate_regression")
    expected = ranks[0]["reference"]["mse"]  # loss="mse": the validation loss over all rows is the MSE
    assert [r["callback_metrics"]["val/loss"] for r in ranks] == pytest.approx([expected, expected], rel=1e-5)


# -------------------------------------------------------------------------------- non-finite under DDP
@pytest.fixture(scope="module")
def nonfinite_run(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("ddp_nonfinite")
    _run([sys.executable, str(SCRIPT), "nonfinite", str(out), "2"], cwd=out)
    return out


def test_ddp_nan_on_one_rank_stop(nonfinite_run):
    ranks = _ranks(nonfinite_run, "nonfinite_stop")
    bad_step = ddp.NAN_STEP + 1  # the optimizer step that received rank 1's NaN (a flush step: every 2)
    for r in ranks:  # the gradients are all-reduced, so both ranks saw the NaN and stopped at the same step
        assert r["global_step"] == bad_step
        assert r["should_stop"] is True
        assert r["guard"]["nonfinite_steps"] == 1
        assert r["guard"]["skipped_steps"] == 1
        assert r["guard"]["first_grad_step"] == bad_step
        assert r["params_finite"] is True
    assert ranks[0]["param_sum"] == pytest.approx(ranks[1]["param_sum"], rel=1e-12)
    assert ranks[1]["guard"]["first_loss_step"] == bad_step  # only rank 1's loss was NaN
    assert ranks[0]["guard"]["first_loss_step"] == -1
    folder = nonfinite_run / "nonfinite" / "stop"
    assert (folder / "nonfinite_stop.ckpt").is_file()
    report = json.loads(Path(ranks[0]["report_path"]).read_text())
    assert report["summary"]["status"] == "finished"
    assert report["summary"]["global_step"] == bad_step
    assert "nonfinite_grad" in ranks[0]["findings"]
    assert ranks[1]["report_path"] is None
    assert len(_files(folder, "lossdiag_report.json")) == 1


def test_ddp_nan_on_one_rank_skip(nonfinite_run):
    ranks = _ranks(nonfinite_run, "nonfinite_skip")
    steps = ddp.N_TRAIN // (2 * ddp.BATCH)
    for r in ranks:  # both ranks dropped the same update and went on to the end
        assert r["global_step"] == steps
        assert r["should_stop"] is False
        assert r["guard"]["skipped_steps"] == 1
        assert r["guard"]["first_grad_step"] == ddp.NAN_STEP + 1
        assert r["params_finite"] is True
    assert ranks[0]["param_sum"] == pytest.approx(ranks[1]["param_sum"], rel=1e-12)
    acc = _events(nonfinite_run / "nonfinite" / "skip")
    assert acc.Scalars("nonfinite/skipped_steps")[-1].value == 1.0
    assert Path(ranks[0]["report_path"]).is_file()


def test_ddp_nan_on_one_rank_warn(nonfinite_run):
    ranks = _ranks(nonfinite_run, "nonfinite_warn")
    steps = ddp.N_TRAIN // (2 * ddp.BATCH)
    for r in ranks:  # documented: "warn" only reports; the all-reduced NaN update reaches both replicas alike
        assert r["global_step"] == steps
        assert r["raised"] is None
        assert r["guard"] is None  # no guard on the hot path, the monitors count on the device
        assert r["params_finite"] is False
    report = json.loads(Path(ranks[0]["report_path"]).read_text())
    assert report["summary"]["status"] == "finished"
    assert ranks[0]["finding_steps"]["nonfinite_grad"] == ddp.NAN_STEP + 1
    assert ranks[0]["finding_steps"]["nonfinite_loss"] == ddp.NAN_STEP + 1  # rank 1's NaN loss, merged at a flush
    assert ranks[1]["report_path"] is None


def test_ddp_nan_on_one_rank_raise(nonfinite_run):
    ranks = _ranks(nonfinite_run, "nonfinite_raise")
    for r in ranks:  # both ranks raised at the same step, before the update: nobody was left waiting
        assert r["raised"] is not None
        assert f"global step {ddp.NAN_STEP + 1}" in r["raised"]
        assert r["global_step"] == ddp.NAN_STEP
        assert r["params_finite"] is True
    assert ranks[0]["param_sum"] == pytest.approx(ranks[1]["param_sum"], rel=1e-12)
    report = json.loads(Path(ranks[0]["report_path"]).read_text())
    assert report["summary"]["status"] == "interrupted"
    assert "NonFiniteError" in report["summary"]["exception"]
    assert ranks[1]["report_path"] is None


def test_ddp_report_knows_about_nan_loss_on_another_rank(nonfinite_run):
    ranks = _ranks(nonfinite_run, "nonfinite_skip")
    assert "nonfinite_loss" in ranks[0]["findings"]


def test_ddp_handed_over_val_loss_is_the_mean_over_all_rows(validate_run):
    # a module that logs no loss: LossMonitor writes the mean of the handed-over losses, gathered from both ranks
    ranks = _ranks(validate_run, "validate_handover")
    expected = ranks[0]["expected"]  # the MSE over every row of the validation set
    assert [len(r["val_loss"]) for r in ranks] == [1, 1]
    assert [r["val_loss"][0][1] for r in ranks] == pytest.approx([expected, expected], rel=1e-5)
