"""DDP scenarios for ``test_ddp.py``, run as ``python ddp_script.py <scenario> <out_dir> <devices>``.

Lightning's ``strategy="ddp"`` re-launches this file with the same ``sys.argv`` for rank 1, so every rank runs the
same sequence of Trainers. Each rank dumps what it saw to ``<out_dir>/<name>_rank<r>.json``; the test compares.

Scenarios:

* ``validate``: a regression and a multiclass module with identical seeded weights are validated (no training) on a
  fixed validation set whose size divides by 2 and by the batch size (no DistributedSampler padding); then a short
  fit of each under the same strategy, with every part of ``LossDiagnostics`` on.
* ``nonfinite``: a NaN is put into rank 1's input at a known step, once under each ``on_nonfinite`` policy
  (``"stop"``, ``"skip"``, ``"warn"``, ``"raise"``); each rank dumps where it stopped, what it skipped, whether it
  raised, and a checksum of its weights.

``devices=1`` runs the same scenario in one process (``validate`` is also imported and called in-process by the
test for the single-process reference).
"""

from __future__ import annotations

import faulthandler
import json
import math
import os
import sys
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.loggers import TensorBoardLogger
from lightning.pytorch.strategies import DDPStrategy
from torch.utils.data import DataLoader, TensorDataset

from lightning_lossdiag import LossDiagnostics
from lightning_lossdiag.callbacks.nonfinite_guard import NonFiniteError
from lightning_lossdiag.diagnosis.record import record_for
from lightning_lossdiag.examples import MLPClassifier, MLPRegressor

N_VAL = 64  # divisible by 2 ranks * BATCH: every rank gets 4 full batches, no padding
N_TRAIN = 128
BATCH = 8
NAN_STEP = 3  # global_step before the optimizer step that gets a NaN on rank 1 (the monitors call it step 4)
FLUSH_EVERY = 2


def make_data(task: str, n: int, seed: int) -> TensorDataset:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 4, generator=g)
    if task == "regression":
        y = torch.sin(2 * x[:, 0]) + 0.5 * x[:, 1] + 0.1 * torch.randn(n, generator=g)
    elif task == "manyclass":  # 40 classes: above max_classes, so the confused pairs are a sketch merged over ranks
        y = ((x[:, 0] + 2 * x[:, 1] + x[:, 2]) * 5).long().clamp(-20, 19) + 20
    else:
        y = (x[:, 0] > 0.3).long() + (x[:, 1] > -0.2).long()  # three classes
    return TensorDataset(x, y)


def make_model(task: str, seed: int = 0) -> L.LightningModule:
    L.seed_everything(seed, verbose=False)
    if task == "regression":
        return MLPRegressor(in_features=4, hidden=16, depth=1, loss="mse", lr=0.01)
    if task == "manyclass":
        return MLPClassifier(in_features=4, num_classes=40, hidden=16, depth=1, loss="cross_entropy", lr=0.01)
    return MLPClassifier(in_features=4, num_classes=3, hidden=16, depth=1, loss="cross_entropy", lr=0.01)


def reference(task: str, model: L.LightningModule, data: TensorDataset) -> dict[str, float]:
    """Metrics of ``model`` on all of ``data``, computed with plain torch (the independent reference)."""
    x, y = data.tensors
    with torch.no_grad():
        preds = model(x)
    if task == "regression":
        r = (preds - y).double()
        return {"mae": r.abs().mean().item(), "mse": (r * r).mean().item(), "residual_sum": r.sum().item()}
    return {"accuracy": (preds.argmax(1) == y).double().mean().item()}


def trainer_for(devices: int, out: Path, name: str, version: str, **kwargs: Any) -> L.Trainer:
    strategy: Any = DDPStrategy(process_group_backend="gloo") if devices > 1 else "auto"
    return L.Trainer(
        accelerator="cpu",
        devices=devices,
        strategy=strategy,
        logger=TensorBoardLogger(save_dir=str(out), name=name, version=version),
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
        num_sanity_val_steps=0,
        **kwargs,
    )


def _floats(mapping: Any) -> dict[str, float]:
    return {k: float(v) for k, v in mapping.items() if torch.as_tensor(v).numel() == 1}


def dump(out: Path, name: str, trainer: L.Trainer, payload: dict[str, Any]) -> None:
    payload = {"rank": trainer.global_rank, "world_size": trainer.world_size, **payload}
    path = out / f"{name}_rank{trainer.global_rank}.json"
    path.write_text(json.dumps(payload, indent=1, default=str), encoding="utf-8")


def validate_task(task: str, out: Path, devices: int) -> None:
    """Validate a seeded, untrained model (identical weights in every run) on the fixed validation set."""
    val = make_data(task, N_VAL, seed=1)
    model = make_model(task)
    ref = reference(task, model, val)
    diag = LossDiagnostics()
    trainer = trainer_for(devices, out, task, "validate", callbacks=[diag])
    trainer.validate(model, dataloaders=DataLoader(val, batch_size=BATCH))
    payload = {
        "reference": ref,
        "callback_metrics": _floats(trainer.callback_metrics),
        "report_path": getattr(diag.parts["doctor"], "report_path", None),
        "log_dir": trainer.logger.log_dir if trainer.logger else None,
    }
    dump(out, f"validate_{task}", trainer, payload)


def fit_task(task: str, out: Path, devices: int) -> None:
    """A short fit with every part on (activations, gradients, scheduler, errors, metrics, doctor)."""
    val = make_data(task, N_VAL, seed=1)
    train = make_data(task, N_TRAIN, seed=2)
    model = make_model(task)
    diag = LossDiagnostics(every_n_steps=FLUSH_EVERY)
    trainer = trainer_for(devices, out, task, "fit", callbacks=[diag], max_epochs=2, log_every_n_steps=FLUSH_EVERY)
    trainer.fit(model, DataLoader(train, batch_size=BATCH), DataLoader(val, batch_size=BATCH))
    payload = {
        "global_step": trainer.global_step,
        "callback_metrics": _floats(trainer.callback_metrics),
        "report_path": getattr(diag.parts["doctor"], "report_path", None),
        "param_sum": sum(p.detach().double().sum().item() for p in model.parameters()),
    }
    dump(out, f"fit_{task}", trainer, payload)


class HandOver(L.LightningModule):
    """Returns ``{"loss", "preds", "target"}`` from its steps and logs nothing itself."""

    def __init__(self) -> None:
        super().__init__()
        L.seed_everything(0, verbose=False)
        self.net = torch.nn.Linear(4, 1)

    def validation_step(self, batch: Any, batch_idx: int) -> dict[str, torch.Tensor]:
        x, y = batch
        preds = self.net(x).squeeze(1)
        return {"loss": torch.nn.functional.mse_loss(preds, y), "preds": preds, "target": y}


def validate_handover(out: Path, devices: int) -> None:
    """The handed-over validation loss, averaged over the rows of every rank (``LossMonitor``'s ``val/loss``)."""
    val = make_data("regression", N_VAL, seed=1)
    model = HandOver()
    with torch.no_grad():
        expected = torch.nn.functional.mse_loss(model.net(val.tensors[0]).squeeze(1), val.tensors[1]).item()
    trainer = trainer_for(devices, out, "handover", "validate", callbacks=[LossDiagnostics()])
    trainer.validate(model, dataloaders=DataLoader(val, batch_size=BATCH))
    points = record_for(trainer).series("val/loss")
    dump(out, "validate_handover", trainer, {"expected": expected, "val_loss": points})


def run_validate(out: Path, devices: int) -> None:
    out.mkdir(parents=True, exist_ok=True)
    for task in ("regression", "multiclass"):
        validate_task(task, out, devices)
        fit_task(task, out, devices)
    validate_task("manyclass", out, devices)
    validate_handover(out, devices)


class NaNOnRankOne(MLPRegressor):
    """Puts a NaN into rank 1's input at ``NAN_STEP`` (rank 0's batch stays finite)."""

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = batch
        if self.global_step == NAN_STEP and self.global_rank == self.trainer.world_size - 1:
            x = x.clone()
            x[0, 0] = math.nan
        return self.compute_loss(self(x), y, stage="train")


def run_nonfinite(out: Path, devices: int) -> None:
    out.mkdir(parents=True, exist_ok=True)
    train = make_data("regression", N_TRAIN, seed=2)
    for policy in ("stop", "skip", "warn", "raise"):
        L.seed_everything(0, verbose=False)
        model = NaNOnRankOne(in_features=4, hidden=16, depth=1, loss="mse", lr=0.01)
        diag = LossDiagnostics(on_nonfinite=policy, every_n_steps=FLUSH_EVERY, activations=False)
        trainer = trainer_for(devices, out, "nonfinite", policy, callbacks=[diag], max_epochs=1, limit_val_batches=0)
        raised = None
        try:
            trainer.fit(model, DataLoader(train, batch_size=BATCH))
        except NonFiniteError as err:  # "raise": every rank must raise at the same step (none left waiting)
            raised = str(err)
        guard = diag.parts.get("nonfinite")
        doctor = diag.parts["doctor"]
        dump(
            out,
            f"nonfinite_{policy}",
            trainer,
            {
                "global_step": trainer.global_step,
                "should_stop": trainer.should_stop,
                "raised": raised,
                "guard": guard.state_dict() if guard is not None else None,
                "report_path": getattr(doctor, "report_path", None),
                "findings": [f.code for f in doctor.findings],
                "finding_steps": {f.code: f.step for f in doctor.findings},
                "param_sum": sum(p.detach().double().sum().item() for p in model.parameters()),
                "params_finite": all(bool(torch.isfinite(p).all()) for p in model.parameters()),
            },
        )


SCENARIOS = {"validate": run_validate, "nonfinite": run_nonfinite}


def main(argv: list[str]) -> int:
    scenario, out, devices = argv[0], Path(argv[1]), int(argv[2])
    # a rank that waits on a collective the other rank never makes prints where it hangs, then exits
    faulthandler.dump_traceback_later(float(os.environ.get("LOSSDIAG_HANG_AFTER", "100")), exit=True)
    SCENARIOS[scenario](out, devices)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
