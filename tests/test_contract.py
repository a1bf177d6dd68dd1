"""Contract test: every public callback constructs with defaults, survives fit twice, pickles, round-trips state."""

import importlib
import pickle

import pytest
from lightning.pytorch import Callback, Trainer
from lightning.pytorch.demos.boring_classes import BoringModel
from lightning.pytorch.loggers import TensorBoardLogger

import lightning_lossdiag


def _public_callbacks():
    found = []
    for name, module in lightning_lossdiag._EXPORTS.items():
        obj = getattr(importlib.import_module(module), name)
        if isinstance(obj, type) and issubclass(obj, Callback):
            found.append(obj)
    return found


CALLBACKS = _public_callbacks()


def test_every_documented_callback_is_exported():
    names = {cls.__name__ for cls in CALLBACKS}
    assert {
        "LossMonitor",
        "GradientMonitor",
        "SchedulerMonitor",
        "ErrorDistributionMonitor",
        "MetricCurves",
        "ActivationMonitor",
        "Doctor",
        "LossDiagnostics",
    } <= names


@pytest.mark.parametrize("cls", CALLBACKS, ids=lambda c: c.__name__)
def test_callback_contract(cls, tmp_path):
    callback = cls()
    doc = cls.__doc__ or ""
    assert "key" in doc.lower(), f"{cls.__name__}'s docstring must have a table of the keys it logs"
    for run in range(2):
        trainer = Trainer(
            default_root_dir=tmp_path,
            max_epochs=1,
            limit_train_batches=4,
            limit_val_batches=2,
            log_every_n_steps=2,
            enable_progress_bar=False,
            enable_model_summary=False,
            enable_checkpointing=False,
            logger=TensorBoardLogger(tmp_path, name=f"run{run}"),
            callbacks=[callback],
        )
        trainer.fit(BoringModel())
    clone = pickle.loads(pickle.dumps(callback))
    assert type(clone) is cls
    state = callback.state_dict()
    fresh = cls()
    fresh.load_state_dict(pickle.loads(pickle.dumps(state)))
    assert fresh.state_dict() == state
    assert isinstance(callback.state_key, str)
