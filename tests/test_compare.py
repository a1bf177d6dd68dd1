"""`lossdiag compare` on real runs, and the TensorBoard HParams session every run writes at the end of fit.

Two quick runs with different hyperparameters and different metric keys: run "a" (LossDiagnostics, a NaN batch:
`nonfinite_loss`) and run "b" (a plain Doctor, logs `val_acc` too, EarlyStopping with the wrong mode:
`scheduler_mode_mismatch`). The numbers are checked against what TensorBoard's own readers get from the event files.
"""

from __future__ import annotations

import json
import math
import os
import shutil
from pathlib import Path

import lightning as L
import pytest
import torch
import yaml
from lightning.pytorch import Trainer
from lightning.pytorch.callbacks import EarlyStopping
from lightning.pytorch.loggers import TensorBoardLogger
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from tensorboard.plugins.hparams import metadata, plugin_data_pb2
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_lossdiag import LossDiagnostics
from lightning_lossdiag.callbacks.doctor import Doctor
from lightning_lossdiag.cli import main
from lightning_lossdiag.compare import compare_runs, load_run_summary
from lightning_lossdiag.diagnosis.outcome import SESSION_DIR, is_metric_key

pytestmark = pytest.mark.slow


class Net(L.LightningModule):
    """Regression with a made-up accuracy (`|error| < 0.5`) when `log_acc`; a NaN input batch at `nan_batch`."""

    def __init__(self, lr=0.05, hidden=16, seed=0, log_acc=False, nan_batch=None):
        super().__init__()
        self.save_hyperparameters()
        torch.manual_seed(seed)
        self.net = nn.Sequential(nn.Linear(4, hidden), nn.ReLU(), nn.Linear(hidden, 1))

    def training_step(self, batch, batch_idx):
        x, y = batch
        if batch_idx == self.hparams.nan_batch and self.current_epoch == 0:
            x = x * float("nan")
        loss = nn.functional.mse_loss(self.net(x).squeeze(-1), y)
        self.log("train_loss", loss)
        return loss

    def validation_step(self, batch, batch_idx):
        x, y = batch
        pred = self.net(x).squeeze(-1)
        self.log("val_loss", nn.functional.mse_loss(pred, y))
        if self.hparams.log_acc:
            self.log("val_acc", ((pred - y).abs() < 0.5).float().mean())

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=self.hparams.lr)


def _fit(root: Path, name: str, model: Net, callbacks: list, max_epochs: int) -> Path:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(96, 4, generator=g)
    y = x.sum(1) + 0.1 * torch.randn(96, generator=g)
    trainer = Trainer(
        max_epochs=max_epochs,
        limit_train_batches=4,
        limit_val_batches=2,
        log_every_n_steps=1,
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
        accelerator="cpu",
        devices=1,
        logger=TensorBoardLogger(root, name=name),  # Lightning's default: default_hp_metric=True
        callbacks=callbacks,
    )
    trainer.fit(model, DataLoader(TensorDataset(x, y), batch_size=16), DataLoader(TensorDataset(x, y), batch_size=32))
    return Path(trainer.logger.log_dir)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("runs")
    a = _fit(root, "a", Net(lr=0.05, hidden=16, nan_batch=1), [LossDiagnostics(doctor={"print_report": False})], 2)
    stop = EarlyStopping(monitor="val_acc", mode="min", patience=50)  # an accuracy with mode="min"
    b = _fit(root, "b", Net(lr=0.1, hidden=8, log_acc=True), [Doctor(print_report=False), stop], 3)
    return root, a, b


def _scalars(folder: Path) -> dict[str, list[tuple[int, float]]]:
    acc = EventAccumulator(str(folder), size_guidance={"scalars": 0})
    acc.Reload()
    return {t: [(e.step, e.value) for e in acc.Scalars(t)] for t in acc.Tags()["scalars"]}


def _codes(run: Path) -> set[str]:
    return {f["code"] for f in json.loads((run / "lossdiag_report.json").read_text())["findings"]}


def _compare_json(capsys, *dirs) -> dict:
    assert main(["compare", *map(str, dirs), "--json"]) == 0
    return json.loads(capsys.readouterr().out)


def _same(x, y) -> bool:
    return (isinstance(x, str) and math.isnan(y)) or x == y


# ---- lossdiag compare ----------------------------------------------------------------------------------------------
def test_final_and_best_are_what_tensorboard_reads_back(runs, capsys):
    _, a, b = runs
    out = _compare_json(capsys, a, b)
    metrics = out["metrics"]
    for i, run in enumerate((a, b)):
        tags = _scalars(run)
        assert {k for k, v in metrics.items() if v["runs"][i] is not None} == {t for t in tags if is_metric_key(t)}
        for key, entry in metrics.items():
            if entry["runs"][i] is None:
                continue
            points, got = tags[key], entry["runs"][i]
            assert _same(got["final"], points[-1][1])
            assert got["final_step"] == points[-1][0]
            finite = [v for _, v in points if math.isfinite(v)]
            if entry["direction"] is not None:
                assert got["best"] == (min(finite) if entry["direction"] == "min" else max(finite))
    assert metrics["val_acc"]["direction"] == "max"
    assert metrics["val_loss"]["direction"] == "min"
    assert metrics["val_acc"]["runs"][0] is None
    assert metrics["val_acc"]["runs"][1]["best"] is not None
    assert metrics["train/loss"]["runs"][1] is None  # LossDiagnostics only in run a
    assert "grad/norm_total" not in metrics
    assert "epoch" not in metrics
    assert "hp_metric" not in metrics


def test_config_diff_shows_only_the_differing_keys(runs, capsys):
    _, a, b = runs
    differing = _compare_json(capsys, a, b)["config"]["differing"]
    assert differing == {
        "hidden": [16, 8],
        "log_acc": [False, True],
        "lr": [0.05, 0.1],
        "nan_batch": [1, None],
        "optimizer.init_args.lr": [0.05, 0.1],  # from the HParams session: the optimizer the run built
        "trainer.max_epochs": [2, 3],
    }
    hparams = [yaml.safe_load((run / "hparams.yaml").read_text()) for run in (a, b)]
    assert hparams[0]["seed"] == hparams[1]["seed"] == 0  # equal values stay out of the diff


def test_findings_that_appeared_and_went_away(runs, capsys):
    _, a, b = runs
    first, second = _codes(a), _codes(b)
    assert "nonfinite_loss" in first - second
    assert "scheduler_mode_mismatch" in second - first
    findings = _compare_json(capsys, a, b)["findings"]
    assert findings["appeared"] == [[], sorted(second - first)]
    assert findings["gone"] == [[], sorted(first - second)]
    assert set(findings["codes"]) == first | second

    assert main(["compare", str(a), str(b)]) == 0
    table = capsys.readouterr().out
    lines = {line.split()[0]: line for line in table.splitlines() if line.strip()}
    assert lines["nonfinite_loss"].rstrip().endswith("- (gone)")
    assert lines["scheduler_mode_mismatch"].rstrip().endswith("(new)")
    assert lines["lr"].split()[1:] == ["0.05", "0.1"]
    assert "seed" not in lines
    assert f"run 1: {a}" in table
    assert f"run 2: {b}" in table


def test_findings_are_recomputed_when_the_report_is_missing(runs, tmp_path):
    _, a, _ = runs
    copy = tmp_path / "a_copy"
    shutil.copytree(a, copy)
    (copy / "lossdiag_report.json").unlink()
    summary = load_run_summary(copy)
    assert summary.findings_source == "recomputed"
    assert "nonfinite_loss" in summary.findings
    assert load_run_summary(a).findings_source == "report"


def test_a_folder_of_runs_means_its_latest_run(runs, tmp_path, capsys):
    _, a, b = runs
    parent = tmp_path / "several"
    old, new = parent / "version_0", parent / "version_1"
    shutil.copytree(b, old)
    shutil.copytree(a, new)
    for i, folder in enumerate((old, new)):
        for event in folder.rglob("events.out.tfevents.*"):
            os.utime(event, (1_000_000 + i, 1_000_000 + i))
    out = _compare_json(capsys, parent)
    assert out["runs"][0]["path"] == str(new)
    assert out["runs"][0]["other_runs"] == [str(old)]
    assert main(["compare", str(parent)]) == 0
    assert f"run 1: {new}  (latest of 2 runs under {parent})" in capsys.readouterr().out


def test_one_run_compares_with_itself(runs):
    _, a, _ = runs
    out = compare_runs([load_run_summary(a)])
    assert out["config"]["differing"] == {}
    assert out["findings"]["appeared"] == [[]]


# ---- errors --------------------------------------------------------------------------------------------------------
def test_missing_folder_is_one_line_and_exit_2(tmp_path, capsys):
    missing = tmp_path / "nope"
    assert main(["compare", str(missing)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1
    assert "Traceback" not in err
    assert f"'{missing}' does not exist" in err
    assert "expected a run folder holding TensorBoard event files" in err


def test_folder_without_event_files_is_one_line_and_exit_2(runs, tmp_path, capsys):
    _, a, _ = runs
    (tmp_path / "notes.txt").write_text("not a run")
    assert main(["compare", str(a), str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1
    assert "Traceback" not in err
    assert f"no TensorBoard event files (events.out.tfevents.*) under '{tmp_path}'" in err
    assert "expected a run folder" in err
    assert main(["compare", str(tmp_path / "notes.txt")]) == 2
    assert "is a file; expected a run folder" in capsys.readouterr().err


def test_no_argument_is_a_usage_error(capsys):
    assert main(["compare"]) == 2
    assert "RUN_DIR" in capsys.readouterr().err


# ---- the HParams session ---------------------------------------------------------------------------------------------
def _hparams_content(folder: Path) -> dict[str, bytes]:
    acc = EventAccumulator(str(folder))
    acc.Reload()
    return dict(acc.PluginTagToContent(metadata.PLUGIN_NAME)) if "hparams" in acc._plugin_to_tag_to_content else {}


def test_every_run_writes_its_hparams_session_with_real_metrics(runs):
    root, a, b = runs
    for run, lr, codes in ((a, 0.05, _codes(a)), (b, 0.1, _codes(b))):
        content = _hparams_content(run / SESSION_DIR)
        start = plugin_data_pb2.HParamsPluginData.FromString(content[metadata.SESSION_START_INFO_TAG])
        hparams = start.session_start_info.hparams
        assert hparams["lr"].number_value == pytest.approx(lr)
        assert hparams["optimizer.init_args.lr"].number_value == lr
        assert hparams["optimizer.class_path"].string_value == "torch.optim.sgd.SGD"
        end = plugin_data_pb2.HParamsPluginData.FromString(content[metadata.SESSION_END_INFO_TAG])
        assert end.session_end_info.status == 1  # STATUS_SUCCESS
        session, main_run = _scalars(run / SESSION_DIR), _scalars(run)
        assert session["final/val_loss"][-1][1] == main_run["val_loss"][-1][1]
        assert session["best/val_loss"][-1][1] == min(v for _, v in main_run["val_loss"] if math.isfinite(v))
        assert session["findings/total"][-1][1] == len(
            json.loads((run / "lossdiag_report.json").read_text())["findings"]
        )
        assert len(codes) >= 1
    assert "final/val_acc" in _scalars(b / SESSION_DIR)
    assert "final/val_acc" not in _scalars(a / SESSION_DIR)
    # no placeholder and no experiment summary anywhere (TensorBoard would take the first one for every run)
    for folder in {p.parent for p in root.rglob("events.out.tfevents.*")}:
        assert "hp_metric" not in _scalars(folder)
        assert metadata.EXPERIMENT_TAG not in _hparams_content(folder)


def test_the_hparams_tab_shows_the_columns_of_both_runs(runs):
    """What TensorBoard's HParams plugin builds from the logdir: the experiment (columns) and the session rows."""
    from tensorboard import context
    from tensorboard.backend.event_processing import data_provider
    from tensorboard.backend.event_processing import plugin_event_multiplexer as pem
    from tensorboard.plugins import base_plugin
    from tensorboard.plugins.hparams import api_pb2, backend_context, list_session_groups

    root, a, b = runs
    mux = pem.EventMultiplexer()
    mux.AddRunsFromDirectory(str(root))
    mux.Reload()
    tb = base_plugin.TBContext(logdir=str(root), data_provider=data_provider.MultiplexerDataProvider(mux, str(root)))
    ctx, request = backend_context.Context(tb), context.RequestContext()
    meta = ctx.hparams_metadata(request, "")
    experiment = ctx.experiment_from_metadata(request, "", True, meta, ctx.hparams_from_data_provider(request, "", 0))
    columns = {m.name.tag for m in experiment.metric_infos}
    assert {"final/val_acc", "best/val_acc", "final/train/loss", "final/val_loss", "findings/warning"} <= columns
    assert "hp_metric" not in columns
    assert not any(c.startswith("grad/") for c in columns)
    differs = {h.name for h in experiment.hparam_infos if h.differs}
    assert {"lr", "hidden", "log_acc", "trainer.max_epochs"} <= differs
    assert "seed" not in differs

    cols = [api_pb2.ColParams(metric=m.name) for m in experiment.metric_infos]
    req = api_pb2.ListSessionGroupsRequest(start_index=0, slice_size=10, col_params=cols, allowed_statuses=[0, 1, 2, 3])
    groups = list_session_groups.Handler(request, ctx, "", req).run().session_groups
    rows = {g.name: {m.name.tag: m.value for m in g.metric_values} for g in groups}
    assert set(rows) == {f"a/{a.name}/{SESSION_DIR}", f"b/{b.name}/{SESSION_DIR}"}
    val_acc = _scalars(b)["val_acc"]
    assert rows[f"b/{b.name}/{SESSION_DIR}"]["best/val_acc"] == pytest.approx(max(v for _, v in val_acc))
    assert "final/val_acc" not in rows[f"a/{a.name}/{SESSION_DIR}"]


def test_the_session_can_be_turned_off(tmp_path):
    run = _fit(tmp_path, "off", Net(), [Doctor(print_report=False, hparams_session=False)], 1)
    assert not (run / SESSION_DIR).exists()
    assert _scalars(run)["hp_metric"] == [(0, -1.0)]  # Lightning's own placeholder, left alone


def test_doctor_option_is_checked():
    with pytest.raises(ValueError, match="`hparams_session` must be True or False, got 'yes'"):
        Doctor(hparams_session="yes")


def test_lossdiag_cli_turns_off_the_placeholder(tmp_path, monkeypatch):
    from lightning_lossdiag._cli_base import LossDiagCLI

    monkeypatch.setattr("sys.argv", ["lossdiag"])

    args = [
        "--model=lightning_lossdiag.examples.MLPRegressor",
        "--data=lightning_lossdiag.examples.NonlinearRegressionDataModule",
    ]
    cli = LossDiagCLI(args=[*args, f"--trainer.logger.init_args.save_dir={tmp_path}"], run=False)
    assert cli.config["trainer"]["logger"]["init_args"]["default_hp_metric"] is False
