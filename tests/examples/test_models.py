from __future__ import annotations

import lightning as L
import pytest
import torch

from lightning_lossdiag.examples import (
    LinearRegressionDataModule,
    MLPClassifier,
    MLPRegressor,
    MultiTaskMLP,
)


def test_output_shapes():
    x = torch.randn(7, 4)
    assert MLPRegressor(in_features=4)(x).shape == (7,)
    assert MLPRegressor(in_features=4, out_features=3, loss="l1")(x).shape == (7, 3)
    assert MLPClassifier(in_features=4)(x).shape == (7,)
    assert MLPClassifier(in_features=4, num_classes=5, loss="cross_entropy")(x).shape == (7, 5)
    out = MultiTaskMLP(in_features=4)(x)
    assert set(out) == {"ctr", "cvr"}
    assert out["cvr"].shape == (7,)


def test_hyperparameters_include_loss():
    model = MLPClassifier(loss={"name": "focal", "gamma": 1.0})
    assert model.hparams["loss"] == {"name": "focal", "gamma": 1.0}
    assert model.hparams["hidden"] == 32


def test_plateau_scheduler_monitors_val_loss():
    model = MLPRegressor(plateau_patience=2)
    config = model.configure_optimizers()
    sched = config["lr_scheduler"]
    assert isinstance(sched["scheduler"], torch.optim.lr_scheduler.ReduceLROnPlateau)
    assert sched["monitor"] == "val/loss"
    assert sched["scheduler"].patience == 2
    assert isinstance(MLPRegressor().configure_optimizers(), torch.optim.Adam)


def test_optimizer_includes_learnable_loss_parameters():
    spec = {"name": "composite", "weighting": "uncertainty", "terms": {"ctr": "bce_with_logits", "cvr": "bce"}}
    model = MultiTaskMLP(loss=spec)
    params = {id(p) for group in model.configure_optimizers().param_groups for p in group["params"]}
    assert id(model.criterion.log_vars) in params


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"lr": 0.0}, "`lr` must be > 0"),
        ({"hidden": 0}, "`hidden` must be a positive integer"),
        ({"plateau_patience": -1}, "`plateau_patience` must be"),
    ],
)
def test_bad_arguments_are_named(kwargs, match):
    with pytest.raises(ValueError, match=match):
        MLPRegressor(**kwargs)
    with pytest.raises(ValueError, match="`num_classes` must be an integer >= 2"):
        MLPClassifier(num_classes=1)
    with pytest.raises(ValueError, match="`heads` must be distinct"):
        MultiTaskMLP(heads=("a", "a"))


def test_regressor_learns_the_linear_example():
    dm = LinearRegressionDataModule(num_samples=600, batch_size=32, noise=0.1)
    model = MLPRegressor(depth=0, lr=0.1)  # a linear model
    trainer = L.Trainer(
        max_epochs=4,
        limit_val_batches=0,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
        accelerator="cpu",
        devices=1,
    )
    trainer.fit(model, dm)
    x = torch.linspace(-1.5, 1.5, 20).unsqueeze(1)
    with torch.no_grad():
        error = (model(x) - (2 * x[:, 0] + 1)).abs().mean().item()
    assert error < 0.3  # y's own scale over this range is ~3
