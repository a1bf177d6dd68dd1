"""Doctor: capture of the user's logged values, monitors' modes, the report (table, TensorBoard text, JSON), state."""

import json
import pickle

import lightning as L
import pytest
import torch
from lightning.pytorch import Trainer
from lightning.pytorch.callbacks import EarlyStopping, ModelCheckpoint
from lightning.pytorch.loggers import TensorBoardLogger
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_lossdiag.callbacks.doctor import Doctor
from lightning_lossdiag.diagnosis.findings import Finding
from lightning_lossdiag.diagnosis.record import RunRecord

BATCHES = 4  # training batches per epoch


class Logged(L.LightningModule):
    """Logs values whose numbers are known in advance, from every place a user logs from."""

    def __init__(self, fail_at_step=None):
        super().__init__()
        self.net = nn.Linear(4, 1)
        self.fail_at_step = fail_at_step

    def training_step(self, batch, batch_idx):
        if self.fail_at_step is not None and self.global_step == self.fail_at_step:
            raise RuntimeError("user bug")
        x, y = batch
        loss = nn.functional.mse_loss(self.net(x).squeeze(-1), y)
        self.log("train_loss", loss, on_step=True, on_epoch=True)
        return loss

    def on_train_epoch_end(self):
        self.log("train_tag", 10.0 + self.current_epoch)

    def validation_step(self, batch, batch_idx):
        x, y = batch
        self.log("val_loss", nn.functional.mse_loss(self.net(x).squeeze(-1), y))
        self.log("val/const", 0.25)

    def on_validation_epoch_end(self):
        self.log("val_tag", 100.0 + self.current_epoch)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.05)


def loaders():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(128, 4, generator=g)
    y = x.sum(1)
    return DataLoader(TensorDataset(x, y), batch_size=16), DataLoader(TensorDataset(x[:32], y[:32]), batch_size=16)


def make_trainer(tmp_path, callbacks, name="run", **kw):
    args = dict(
        default_root_dir=tmp_path,
        max_epochs=2,
        limit_train_batches=BATCHES,
        limit_val_batches=2,
        log_every_n_steps=2,
        enable_progress_bar=False,
        enable_model_summary=False,
        accelerator="cpu",
        devices=1,
        logger=TensorBoardLogger(tmp_path, name=name),
        callbacks=callbacks,
        enable_checkpointing=False,
    )
    args.update(kw)
    return Trainer(**args)


def test_rejects_bad_arguments():
    with pytest.raises(ValueError, match="json_name"):
        Doctor(json_name="")
    with pytest.raises(ValueError, match="unknown keys"):
        Doctor(config={"plateau_epoch": 3})
    with pytest.raises(ValueError, match="print_report"):
        Doctor(print_report="yes")


def test_captures_epoch_values_at_the_right_steps(tmp_path):
    doctor = Doctor(print_report=False)
    trainer = make_trainer(tmp_path, [doctor], max_epochs=4, check_val_every_n_epoch=2)
    trainer.fit(Logged(), *loaders())
    r = trainer.lossdiag_record
    # validation ran after epochs 1 and 3 (global steps 8 and 16); the stale values are not copied again in between
    assert r.series("val_tag") == [(2 * BATCHES, 101.0), (4 * BATCHES, 103.0)]
    assert r.series("val/const") == [(2 * BATCHES, 0.25), (4 * BATCHES, 0.25)]
    # values logged in the module's on_train_epoch_end land at the step that ended that epoch
    assert r.series("train_tag") == [(BATCHES * (e + 1), 10.0 + e) for e in range(4)]
    assert [s for s, _ in r.series("train_loss_epoch")] == [BATCHES * (e + 1) for e in range(4)]
    assert "val_loss" in r.notes["doctor/callback_metrics"]


def test_report_json_tensorboard_text_and_printed_table(tmp_path, capsys):
    doctor = Doctor()
    callbacks = [
        doctor,
        # a silent EarlyStopping (strict=False) watching a key nobody logs: it never acts, the Doctor says why
        EarlyStopping(monitor="val_accuracy", mode="max", strict=False, verbose=False),
        ModelCheckpoint(monitor="val_loss", mode="max", dirpath=tmp_path / "ck"),  # keeps the worst model
    ]
    trainer = make_trainer(tmp_path, callbacks, enable_checkpointing=True)
    trainer.fit(Logged(), *loaders())
    codes = [f.code for f in doctor.findings]
    mismatch = next(f for f in doctor.findings if f.code == "scheduler_mode_mismatch")
    assert mismatch.evidence["callback"] == "ModelCheckpoint"
    assert mismatch.evidence["expected"] == "min"
    missing = next(f for f in doctor.findings if f.code == "scheduler_monitor_missing")
    assert missing.evidence["monitor"] == "val_accuracy"
    assert "val_loss" in missing.message
    report = json.loads((tmp_path / "run" / "version_0" / "lossdiag_report.json").read_text())
    assert [f["code"] for f in report["findings"]] == codes
    assert report["summary"]["status"] == "finished"
    assert report["summary"]["global_step"] == 2 * BATCHES
    assert report["summary"]["last"]["val/loss"] == pytest.approx(trainer.callback_metrics["val_loss"].item())
    assert set(report["versions"]) == {"lightning_lossdiag", "torch", "lightning"}
    acc = EventAccumulator(str(tmp_path / "run" / "version_0"))
    acc.Reload()
    text = acc.Tensors("diagnosis/text_summary")[-1].tensor_proto.string_val[0].decode()
    assert "`scheduler_monitor_missing`" in text
    assert text.startswith("| severity | code | step | message |")
    out = capsys.readouterr().out
    assert "scheduler_mode_mismatch" in out
    assert "diagnosis" in out


def test_mode_mismatch_of_early_stopping_is_found_at_fit_start(tmp_path):
    doctor = Doctor(print_report=False)
    es = EarlyStopping(monitor="val_loss", mode="max", patience=100)
    trainer = make_trainer(tmp_path, [doctor, es], max_epochs=1)
    trainer.fit(Logged(), *loaders())
    (f,) = [f for f in doctor.findings if f.code == "scheduler_mode_mismatch"]
    assert f.evidence == {"callback": "EarlyStopping", "monitor": "val_loss", "mode": "max", "expected": "min"}
    assert trainer.lossdiag_record.notes["callbacks/monitors"] == [
        {"callback": "EarlyStopping", "monitor": "val_loss", "mode": "max"}
    ]


def test_healthy_run_has_no_warning(tmp_path):
    doctor = Doctor(print_report=False)
    callbacks = [doctor, ModelCheckpoint(monitor="val_loss", mode="min", dirpath=tmp_path / "ck")]
    trainer = make_trainer(tmp_path, callbacks, max_epochs=2, enable_checkpointing=True)
    trainer.fit(Logged(), *loaders())
    assert [f for f in doctor.findings if f.severity != "info"] == []


def test_exception_writes_the_report_of_what_was_seen(tmp_path):
    doctor = Doctor(print_report=False)
    trainer = make_trainer(tmp_path, [doctor], max_epochs=3)
    with pytest.raises(RuntimeError, match="user bug"):
        trainer.fit(Logged(fail_at_step=BATCHES + 2), *loaders())
    report = json.loads((tmp_path / "run" / "version_0" / "lossdiag_report.json").read_text())
    assert report["summary"]["status"] == "interrupted"
    assert report["summary"]["exception"] == "RuntimeError: user bug"
    assert report["summary"]["last"]["val/loss"] == pytest.approx(trainer.lossdiag_record.last("val_loss"))


def test_validate_and_test_write_a_report(tmp_path):
    doctor = Doctor(print_report=False, json_name="eval.json")
    trainer = make_trainer(tmp_path, [doctor])
    model = Logged()
    model.test_step = model.validation_step
    trainer.validate(model, loaders()[1])
    assert json.loads((tmp_path / "run" / "version_0" / "eval.json").read_text())["summary"]["stage"] == "validate"
    assert trainer.lossdiag_record.series("val_tag") == [(0, 100.0)]
    trainer.test(model, loaders()[1])
    assert json.loads((tmp_path / "run" / "version_0" / "eval.json").read_text())["summary"]["stage"] == "test"


def test_state_round_trip_plain():
    doctor = Doctor()
    record = RunRecord()
    record.add_scalars(4, {"val_loss": 0.5})
    record.notes["task"] = "binary"
    record.add_finding(Finding("double_sigmoid", "warning", "sigmoid twice", 0, {"where": "head"}))
    state = {
        "record": record.state_dict(),
        "own_keys": ["val_loss"],
        "findings": [Finding("plateau", "warning", "flat", 3).to_dict()],
    }
    doctor.load_state_dict(pickle.loads(pickle.dumps(state)))
    assert doctor.state_dict() == state
    assert doctor.findings[0].code == "plateau"


@pytest.mark.parametrize("with_val", [True, False], ids=["val", "no_val"])
def test_resumed_run_keeps_what_it_saw(tmp_path, with_val):
    val = {} if with_val else {"limit_val_batches": 0}
    ckpt_cb = ModelCheckpoint(dirpath=tmp_path / "ck", save_last=True)
    first = Doctor(print_report=False)
    trainer = make_trainer(tmp_path, [first, ckpt_cb], max_epochs=2, enable_checkpointing=True, **val)
    trainer.fit(Logged(), *loaders())
    saved = torch.load(tmp_path / "ck" / "last.ckpt", weights_only=False)["callbacks"][first.state_key]
    assert saved["findings"] == [f.to_dict() for f in first.findings]

    second = Doctor(print_report=False)
    trainer2 = make_trainer(
        tmp_path,
        [second, ModelCheckpoint(dirpath=tmp_path / "ck2")],
        name="resumed",
        max_epochs=3,
        enable_checkpointing=True,
        **val,
    )
    trainer2.fit(Logged(), *loaders(), ckpt_path=tmp_path / "ck" / "last.ckpt")
    r = trainer2.lossdiag_record
    if with_val:
        assert saved["record"]["scalars"]["val_tag"] == [[BATCHES, 100.0], [2 * BATCHES, 101.0]]
        assert r.series("val_tag") == [(BATCHES, 100.0), (2 * BATCHES, 101.0), (3 * BATCHES, 102.0)]
    else:  # saved at train epoch end: the module's on_train_epoch_end values of that epoch are in the checkpoint
        assert r.series("train_tag") == [(BATCHES, 10.0), (2 * BATCHES, 11.0), (3 * BATCHES, 12.0)]
    report = json.loads((tmp_path / "resumed" / "version_0" / "lossdiag_report.json").read_text())
    assert report["summary"]["global_step"] == 3 * BATCHES
