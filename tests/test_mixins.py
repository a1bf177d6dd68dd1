from __future__ import annotations

import re
import warnings
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import pytest
import torch
from lightning.pytorch.loggers import TensorBoardLogger
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_lossdiag._input_checks import input_problems
from lightning_lossdiag._outputs import fetch_outputs
from lightning_lossdiag.diagnosis.record import record_for
from lightning_lossdiag.examples import (
    ImbalancedBinaryDataModule,
    LinearRegressionDataModule,
    MLPClassifier,
    MLPRegressor,
    MulticlassDataModule,
    MultiTaskDataModule,
    MultiTaskMLP,
)
from lightning_lossdiag.losses import FocalLoss, LossConfigError
from lightning_lossdiag.mixins import LossMixin, class_counts, concat_targets


def make_trainer(tmp_path: Path | None, **kwargs: Any) -> L.Trainer:
    opts: dict[str, Any] = {
        "max_epochs": 1,
        "limit_train_batches": 4,
        "limit_val_batches": 2,
        "enable_progress_bar": False,
        "enable_model_summary": False,
        "enable_checkpointing": False,
        "logger": TensorBoardLogger(str(tmp_path)) if tmp_path is not None else False,
        "accelerator": "cpu",
        "devices": 1,
        "log_every_n_steps": 1,
    }
    opts.update(kwargs)
    return L.Trainer(**opts)


def read_scalars(log_dir: str) -> dict[str, list[tuple[int, float]]]:
    acc = EventAccumulator(log_dir)
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


# ---------------------------------------------------------------- logging


def test_logs_stage_loss_and_val_loss_matches_reference(tmp_path):
    dm = LinearRegressionDataModule(num_samples=200, batch_size=16)
    model = MLPRegressor(hidden=8, depth=1, loss="mse")
    trainer = make_trainer(tmp_path)
    trainer.fit(model, dm)
    scalars = read_scalars(trainer.logger.log_dir)
    assert len(scalars["train/loss"]) == 4
    assert len(scalars["val/loss"]) == 1
    assert "val/loss" in trainer.progress_bar_metrics
    assert "train/loss" not in trainer.progress_bar_metrics  # a step value there is read back every batch: opt-in
    # validation ran after the last optimizer step: the weights are the final ones
    model.eval()
    total, n = 0.0, 0
    with torch.no_grad():
        for i, (x, y) in enumerate(dm.val_dataloader()):
            if i == 2:
                break
            total += float(((model(x) - y) ** 2).sum())
            n += len(y)
    assert scalars["val/loss"][0][1] == pytest.approx(total / n, rel=1e-5)


def test_test_stage_logs_test_loss(tmp_path):
    dm = LinearRegressionDataModule(num_samples=200, batch_size=16)
    model = MLPRegressor(hidden=8, depth=1, loss="l1")
    trainer = make_trainer(tmp_path, limit_test_batches=2)
    trainer.test(model, dm)
    scalars = read_scalars(trainer.logger.log_dir)
    assert "test/loss" in scalars
    assert "train/loss" not in scalars


class _WritesTrainLoss(L.Callback):
    writes_train_loss = True


def test_train_loss_not_sent_to_logger_when_a_callback_writes_it(tmp_path):
    dm = LinearRegressionDataModule(num_samples=200, batch_size=16)
    model = MLPRegressor(hidden=8, depth=1)
    trainer = make_trainer(tmp_path, callbacks=[_WritesTrainLoss()])
    trainer.fit(model, dm)
    scalars = read_scalars(trainer.logger.log_dir)
    assert "train/loss" not in scalars
    assert "val/loss" in scalars
    assert "train/loss" in trainer.callback_metrics  # still seen by ModelCheckpoint/EarlyStopping


def test_loss_in_progress_bar_opt_in(tmp_path):
    class Shown(MLPRegressor):
        loss_in_progress_bar = True

    trainer = make_trainer(tmp_path)
    trainer.fit(Shown(hidden=8, depth=1), LinearRegressionDataModule(num_samples=200, batch_size=16))
    assert {"train/loss", "val/loss"} <= set(trainer.progress_bar_metrics)


def test_composite_terms_logged_and_sum_to_val_loss(tmp_path):
    dm = MultiTaskDataModule(num_samples=200, batch_size=16)
    model = MultiTaskMLP(hidden=8, depth=1)  # default loss: 0.7 * ctr + 0.3 * cvr
    trainer = make_trainer(tmp_path)
    trainer.fit(model, dm)
    s = read_scalars(trainer.logger.log_dir)
    for key in ("train/loss/ctr", "train/loss/cvr", "val/loss/ctr", "val/loss/cvr"):
        assert key in s, sorted(s)
    assert len(s["train/loss/ctr"]) == 4
    expected = 0.7 * s["val/loss/ctr"][0][1] + 0.3 * s["val/loss/cvr"][0][1]
    assert s["val/loss"][0][1] == pytest.approx(expected, rel=1e-5)


def test_learnable_composite_weights_are_trained_and_checkpointed(tmp_path):
    spec = {
        "name": "composite",
        "weighting": "uncertainty",
        "terms": {"ctr": "bce_with_logits", "cvr": "bce_with_logits"},
    }
    model = MultiTaskMLP(hidden=8, depth=1, loss=spec)
    before = model.criterion.log_vars.detach().clone()
    trainer = make_trainer(None, limit_val_batches=0)
    trainer.fit(model, MultiTaskDataModule(num_samples=200, batch_size=16))
    assert not torch.equal(before, model.criterion.log_vars.detach())
    assert "criterion.log_vars" in model.state_dict()


# ---------------------------------------------------------------- hand-off to callbacks


class _Grab(L.Callback):
    def __init__(self) -> None:
        self.seen: list[tuple[Any, Any, Any]] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.seen.append((fetch_outputs(pl_module, outputs, "train"), batch, outputs))


def test_stash_carries_detached_preds_and_target(tmp_path):
    grab = _Grab()
    model = MLPRegressor(hidden=8, depth=1)
    trainer = make_trainer(None, callbacks=[grab], limit_train_batches=2, limit_val_batches=0)
    trainer.fit(model, LinearRegressionDataModule(num_samples=200, batch_size=16))
    assert len(grab.seen) == 2
    for out, batch, returned in grab.seen:
        assert out is not None
        assert not out.preds.requires_grad
        assert not out.loss.requires_grad
        assert out.preds.shape == batch[1].shape
        assert torch.equal(out.target, batch[1])
        assert out.loss == pytest.approx(float(returned["loss"]))
        assert isinstance(out.criterion, nn.MSELoss)


def test_compute_loss_without_trainer_and_bad_stage():
    model = MLPRegressor(in_features=1, hidden=4, depth=1)
    x, y = torch.randn(8, 1), torch.randn(8)
    loss = model.compute_loss(model(x), y, stage="val")
    assert loss.item() == pytest.approx(nn.functional.mse_loss(model(x), y).item())
    assert fetch_outputs(model, None, "val") is not None
    with pytest.raises(ValueError, match="`stage` must be one of"):
        model.compute_loss(model(x), y, stage="training")


# ---------------------------------------------------------------- first-batch input checks


class _Probe(LossMixin, L.LightningModule):
    def __init__(self, loss: Any, out_features: int, transform: str) -> None:
        super().__init__(loss=loss)
        self.layer = nn.Linear(3, out_features)
        self.transform = transform

    def forward(self, x):
        z = self.layer(x)
        return {
            "none": z,
            "squeeze": z.squeeze(-1),
            "scaled": 10 * z.squeeze(-1),
            "sigmoid": torch.sigmoid(z.squeeze(-1)),
            "softmax": torch.softmax(z, dim=1),
            "unit": torch.frac(z.abs()).squeeze(-1),  # logits that happen to lie in [0, 1]
        }[self.transform]

    def training_step(self, batch, batch_idx):
        x, y = batch
        return self.compute_loss(self(x), y, stage="train")

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.01)


def _loader(target: torch.Tensor) -> DataLoader:
    gen = torch.Generator().manual_seed(0)
    x = 3 * torch.randn(len(target), 3, generator=gen)
    return DataLoader(TensorDataset(x, target), batch_size=32)


N = 96
FLOAT_N = torch.randn(N)
BINARY_N = (torch.arange(N) % 3 == 0).float()
CLASSES_N = torch.arange(N) % 5

ERROR_CASES = [
    ("mse", 1, "none", FLOAT_N, "broadcast to \\(32, 32\\)", "shape_broadcast"),
    ("huber", 1, "none", FLOAT_N, "broadcast", "shape_broadcast"),
    ("log_cosh", 1, "none", FLOAT_N, "broadcast", "shape_broadcast"),
    ("bce", 1, "scaled", BINARY_N, "use `bce_with_logits`", None),
    ("cross_entropy", 5, "none", CLASSES_N.float(), "torch.long", None),
    ("cross_entropy", 5, "none", CLASSES_N.unsqueeze(1), "squeeze\\(1\\)", None),
    ("nll", 5, "none", CLASSES_N.int(), "torch.long", None),
    ("cross_entropy", 5, "none", CLASSES_N + 1, "must lie in \\[0, 4\\]", None),
    ({"name": "cross_entropy", "weight": [1.0, 2.0, 3.0]}, 5, "none", CLASSES_N, "`weight` .*C = 5 .*got 3", None),
    ({"name": "nll", "weight": [1.0] * 6}, 5, "none", CLASSES_N, "`weight` .*C = 5 classes.*got 6 weights", None),
    ({"name": "focal", "alpha": [0.5, 0.5]}, 5, "none", CLASSES_N, "`alpha` .*C = 5 classes.*got 2 weights", None),
]


@pytest.mark.parametrize(
    ("loss", "out", "transform", "target", "match", "code"),
    ERROR_CASES,
    ids=[
        "mse-broadcast",
        "huber-broadcast",
        "logcosh-broadcast",
        "bce-logits",
        "ce-float",
        "ce-n1",
        "nll-int32",
        "ce-range",
        "ce-weight-length",
        "nll-weight-length",
        "focal-alpha-length",
    ],
)
def test_first_batch_errors(loss, out, transform, target, match, code):
    model = _Probe(loss, out, transform)
    trainer = make_trainer(None, max_steps=2, limit_val_batches=0)
    with pytest.raises(ValueError, match=match):
        trainer.fit(model, _loader(target))
    codes = [f.code for f in record_for(trainer).findings]
    if code is None:
        assert codes == []
    else:
        assert codes == [code]
        assert record_for(trainer).findings[0].severity == "error"


WARN_CASES = [
    ("bce_with_logits", 1, "sigmoid", BINARY_N, "applies a sigmoid", "double_sigmoid"),
    ({"name": "focal", "mode": "binary"}, 1, "sigmoid", BINARY_N, "applies a sigmoid", "double_sigmoid"),
    ("focal", 1, "sigmoid", BINARY_N, "applies a sigmoid", "double_sigmoid"),  # mode inferred from the shapes
    ("cross_entropy", 5, "softmax", CLASSES_N, "come straight from a softmax", "softmax_into_cross_entropy"),
    ("nll", 5, "softmax", CLASSES_N, "Use `log_softmax` instead of `softmax`", "softmax_into_cross_entropy"),
]


@pytest.mark.parametrize(
    ("loss", "out", "transform", "target", "match", "code"),
    WARN_CASES,
    ids=["bce-logits-sigmoid", "focal-sigmoid", "focal-auto-sigmoid", "ce-softmax", "nll-softmax"],
)
def test_first_batch_warnings_once_with_finding(loss, out, transform, target, match, code):
    model = _Probe(loss, out, transform)
    trainer = make_trainer(None, max_steps=3, limit_val_batches=0)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer.fit(model, _loader(target))
    ours = [w for w in caught if re.search(match, str(w.message))]
    assert len(ours) == 1, [str(w.message) for w in caught]  # first batch only, though 3 steps ran
    findings = record_for(trainer).findings
    assert [f.code for f in findings] == [code]
    assert findings[0].severity == "warning"


@pytest.mark.parametrize(
    ("loss", "out", "transform", "target"),
    [
        ("mse", 1, "squeeze", FLOAT_N),
        ("bce_with_logits", 1, "scaled", BINARY_N),
        ("bce", 1, "sigmoid", BINARY_N),
        ("cross_entropy", 5, "none", CLASSES_N),
        ("cross_entropy", 5, "none", nn.functional.one_hot(CLASSES_N, 5).float()),  # soft labels are fine
        ({"name": "cross_entropy", "weight": [1.0, 2.0, 1.0, 0.5, 1.0]}, 5, "none", CLASSES_N),
        ({"name": "focal", "alpha": [1.0, 2.0, 1.0, 0.5, 1.0]}, 5, "none", CLASSES_N),
    ],
    ids=["mse", "bce-logits", "bce-probs", "ce", "ce-soft", "ce-weight", "focal-alpha"],
)
def test_correct_inputs_pass_without_findings(loss, out, transform, target):
    model = _Probe(loss, out, transform)
    trainer = make_trainer(None, max_steps=2, limit_val_batches=0)
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message=".*(sigmoid|softmax).*")
        trainer.fit(model, _loader(target))
    assert record_for(trainer).findings == []


def test_logits_in_unit_interval_are_not_flagged_during_fit():
    model = _Probe("bce_with_logits", 1, "unit")
    trainer = make_trainer(None, max_steps=2, limit_val_batches=0)
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message=".*sigmoid.*")
        trainer.fit(model, _loader(BINARY_N))
    assert record_for(trainer).findings == []


def test_values_decide_without_a_graph_in_standalone_validate():
    class WithVal(_Probe):
        def validation_step(self, batch, batch_idx):
            x, y = batch
            return self.compute_loss(self(x), y, stage="val")

    trainer = make_trainer(None, limit_val_batches=1)
    with pytest.warns(UserWarning, match="all 32 lie in"):
        trainer.validate(WithVal("bce_with_logits", 1, "sigmoid"), _loader(BINARY_N))
    finding = record_for(trainer).findings[0]
    assert finding.code == "double_sigmoid"
    assert finding.evidence["detected_by"] == "values"


def test_input_problems_composite_term_labels():
    problems = input_problems(FocalLoss(), torch.softmax(torch.randn(16, 4), 1), torch.arange(16) % 4)
    assert [p.code for p in problems] == ["softmax_into_cross_entropy"]
    assert problems[0].evidence["num_classes"] == 4
    model = MultiTaskMLP(in_features=3, hidden=4, depth=1)
    preds = {"ctr": torch.zeros(8, 1), "cvr": torch.zeros(8)}
    target = {"ctr": torch.zeros(8), "cvr": torch.zeros(8)}
    with pytest.raises(ValueError, match="term 'ctr'.*broadcast"):
        model._check_first_batch(None, model.criterion, preds, target)


def test_wrong_weight_length_is_our_error_before_torch_raises():
    weighted = nn.CrossEntropyLoss(weight=torch.ones(2))
    logits, target = torch.randn(8, 3), torch.arange(8) % 3
    with pytest.raises(RuntimeError, match="weight"):  # what the user would see without the check
        weighted(logits, target)
    model = _Probe({"name": "cross_entropy", "weight": [1.0, 2.0]}, 3, "none")
    with pytest.raises(ValueError, match=r"`weight` must hold one weight per class, C = 3 classes .*got 2 weights"):
        model.compute_loss(logits, target, stage="val")
    problems = input_problems(weighted, logits, target)
    assert [p.is_error for p in problems] == [True]
    assert input_problems(nn.CrossEntropyLoss(weight=torch.ones(3)), logits, target) == []


# ---------------------------------------------------------------- construction and auto weights


def test_bad_spec_fails_at_construction():
    with pytest.raises(LossConfigError, match="did you mean 'huber'"):
        MLPRegressor(loss="hubr")
    with pytest.raises(LossConfigError, match="reductin"):
        MLPClassifier(loss={"name": "bce_with_logits", "pos_weight": "auto", "reductin": "mean"})
    with pytest.raises(LossConfigError, match="focall"):
        MLPClassifier(loss={"name": "focall", "alpha": "auto"})


def test_pos_weight_auto_resolved_from_datamodule_and_checkpointed(tmp_path):
    dm = ImbalancedBinaryDataModule(num_samples=300, batch_size=32)
    model = MLPClassifier(hidden=8, depth=1, loss={"name": "bce_with_logits", "pos_weight": "auto"})
    assert model.criterion is None
    trainer = make_trainer(None, max_steps=2, limit_val_batches=0)
    trainer.fit(model, dm)
    y = dm.train_targets().numpy()
    neg, pos = int((y == 0).sum()), int((y == 1).sum())
    assert record_for(trainer).notes["data/class_counts"] == {"stage": "train", "counts": [neg, pos]}
    assert float(model.criterion.pos_weight) == pytest.approx(neg / pos)
    path = tmp_path / "m.ckpt"
    trainer.save_checkpoint(path)
    loaded = MLPClassifier.load_from_checkpoint(path)
    assert float(loaded.criterion.pos_weight) == pytest.approx(neg / pos)


def test_auto_weights_logged_and_printed_once(tmp_path, caplog):
    dm = ImbalancedBinaryDataModule(num_samples=300, batch_size=32)
    model = MLPClassifier(hidden=8, depth=1, loss={"name": "bce_with_logits", "pos_weight": "auto"})
    trainer = make_trainer(tmp_path, max_epochs=2, limit_val_batches=1)
    with caplog.at_level("INFO"):
        trainer.fit(model, dm)
        trainer.validate(model, dm)  # a later stage does not resolve (or say) it again
    y = dm.train_targets().numpy()
    expected = float((y == 0).sum() / (y == 1).sum())
    assert read_scalars(trainer.logger.log_dir)["loss/pos_weight"] == [(0, pytest.approx(expected))]
    said = [r.getMessage() for r in caplog.records if "automatic loss weights" in r.getMessage()]
    assert len(said) == 1
    assert f"loss/pos_weight = {expected:.4g}" in said[0]


def test_auto_class_weights_of_composite_terms_are_logged_per_term(tmp_path):
    spec = {
        "name": "composite",
        "terms": {
            "ctr": {"loss": {"name": "bce_with_logits", "pos_weight": "auto"}, "weight": 0.7},
            "cvr": {"loss": "bce_with_logits", "weight": 0.3},
        },
    }
    dm = MultiTaskDataModule(num_samples=200, batch_size=16)
    trainer = make_trainer(tmp_path, max_steps=1, limit_val_batches=0)
    trainer.fit(MultiTaskMLP(hidden=8, depth=1, loss=spec), dm)
    scalars = read_scalars(trainer.logger.log_dir)
    ctr = dm.train_targets()["ctr"]
    assert scalars["loss/ctr/pos_weight"] == [(0, pytest.approx(float((ctr == 0).sum() / (ctr == 1).sum())))]
    assert not [k for k in scalars if k.startswith("loss/cvr/")]  # not auto: nothing to report


class _NoTargetsDM(L.LightningDataModule):
    def __init__(self) -> None:
        super().__init__()
        gen = torch.Generator().manual_seed(1)
        self.y = torch.cat([torch.zeros(60), torch.ones(30), torch.full((10,), 2)]).long()
        self.x = torch.randn(100, 4, generator=gen)

    def train_dataloader(self):
        return DataLoader(TensorDataset(self.x, self.y), batch_size=16, shuffle=True)


def test_weight_auto_from_dataloader_when_no_train_targets():
    model = MLPClassifier(num_classes=3, hidden=8, depth=1, loss={"name": "cross_entropy", "weight": "auto"})
    trainer = make_trainer(None, max_steps=1, limit_val_batches=0)
    trainer.fit(model, _NoTargetsDM())
    counts = np.array([60, 30, 10])
    inv = 1.0 / counts
    np.testing.assert_allclose(model.criterion.weight.numpy(), inv / inv.mean(), rtol=1e-6)
    assert record_for(trainer).notes["data/class_counts"]["counts"] == [60, 30, 10]


def test_class_counts_noted_without_auto_when_targets_are_cheap():
    dm = MulticlassDataModule(num_samples=200, batch_size=32)
    model = MLPClassifier(in_features=8, num_classes=5, hidden=8, depth=1, loss="cross_entropy")
    trainer = make_trainer(None, max_steps=1, limit_val_batches=0)
    trainer.fit(model, dm)
    expected = np.bincount(dm.train_targets().numpy(), minlength=5).tolist()
    assert record_for(trainer).notes["data/class_counts"]["counts"] == expected


def test_auto_weights_without_data_source_say_what_to_do():
    model = _Probe({"name": "bce_with_logits", "pos_weight": "auto"}, 1, "squeeze")
    trainer = make_trainer(None, max_steps=1)
    with pytest.raises(RuntimeError, match="train_targets"):
        trainer.fit(model, _loader(BINARY_N))


def test_concat_targets_and_class_counts():
    batches = [{"target": torch.tensor([1, 1])}, {"target": torch.tensor([0])}]
    assert torch.equal(concat_targets(batches), torch.tensor([1, 1, 0]))
    dict_batches = [(0, {"a": torch.tensor([1.0])}), (0, {"a": torch.tensor([0.0])})]
    assert torch.equal(concat_targets(dict_batches)["a"], torch.tensor([1.0, 0.0]))
    with pytest.raises(ValueError, match="'target'"):
        concat_targets([{"y": torch.zeros(1)}])
    assert class_counts(torch.tensor([0.5, 1.0])) is None
    assert class_counts(torch.tensor([3, 0])) == [1, 0, 0, 1]


def test_no_host_reads_after_the_first_batch():
    from lightning_lossdiag.testing import HostReadCounter, StepReadProbe

    counter = HostReadCounter()
    probe = StepReadProbe(counter)
    dm = ImbalancedBinaryDataModule(num_samples=300, batch_size=16)
    model = MLPClassifier(hidden=8, depth=1, loss="bce_with_logits")
    with counter:
        trainer = make_trainer(None, callbacks=[probe], limit_train_batches=6, limit_val_batches=0)
        trainer.fit(model, dm)
    assert len(probe.reads) == 6
    assert probe.reads[0] >= 1  # the one-time input check of the first batch
    assert probe.reads[1:] == [0, 0, 0, 0, 0]
