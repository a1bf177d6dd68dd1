"""ErrorDistributionMonitor on real small Trainers, read back from the TensorBoard event files."""

import io
import warnings

import numpy as np
import pytest
import torch
import torchmetrics.functional.classification as tmfc
from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.loggers import TensorBoardLogger
from PIL import Image
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from tensorboard.util import tensor_util
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_lossdiag.callbacks._class_engine import DEFAULT_BUFFER_BYTES
from lightning_lossdiag.callbacks._error_states import regression_ranges
from lightning_lossdiag.callbacks._task import TaskInfo
from lightning_lossdiag.callbacks.error_distribution import ErrorDistributionMonitor
from lightning_lossdiag.callbacks.metric_curves import MetricCurves
from lightning_lossdiag.diagnosis.record import record_for
from lightning_lossdiag.testing import HostReadCounter


class _Module(LightningModule):
    """Tiny module returning {"loss", "preds", "target"}; `squeeze=False` keeps (N, 1) regression outputs."""

    def __init__(self, x, y, out, loss_fn, n_val, squeeze=True, val_batch=None):
        super().__init__()
        torch.manual_seed(0)
        self.net = nn.Sequential(nn.Linear(x.shape[-1], 16), nn.Tanh(), nn.Linear(16, out))
        self.x, self.y, self.loss_fn, self.n_val, self.squeeze = x, y, loss_fn, n_val, squeeze
        self.val_batch = val_batch or n_val // 2

    def forward(self, x):
        out = self.net(x)
        return out.squeeze(-1) if out.shape[-1] == 1 and self.squeeze else out

    def _step(self, batch):
        x, y = batch
        preds = self(x)
        loss = self.loss_fn(preds.reshape(y.shape) if preds.numel() == y.numel() else preds, y)
        return {"loss": loss, "preds": preds, "target": y}

    def training_step(self, batch, batch_idx):
        return self._step(batch)

    def validation_step(self, batch, batch_idx):
        return self._step(batch)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.05)

    def train_dataloader(self):
        return DataLoader(TensorDataset(self.x[:256], self.y[:256]), batch_size=32, shuffle=True)

    def val_dataloader(self):
        return DataLoader(TensorDataset(self.x[-self.n_val :], self.y[-self.n_val :]), batch_size=self.val_batch)


def _trainer(tmp_path, callbacks, epochs=1, logger=True):
    return Trainer(
        default_root_dir=tmp_path,
        max_epochs=epochs,
        limit_train_batches=4,
        limit_val_batches=2,
        num_sanity_val_steps=1,
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
        logger=TensorBoardLogger(tmp_path, name="tb") if logger else False,
        accelerator="cpu",
        devices=1,
        callbacks=callbacks,
    )


def _regression(n_val=200, seed=0, **kw):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(256 + n_val, 3, generator=g)
    y = x @ torch.tensor([1.0, -2.0, 0.5]) + 0.3 * torch.randn(256 + n_val, generator=g)
    return _Module(x, y, 1, nn.functional.mse_loss, n_val, **kw)


def _multiclass(n_val=200, seed=1):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(256 + n_val, 4, generator=g)
    y = ((x[:, 0] * 2 + x[:, 1]).round().clamp(-2, 2) + 2).long()
    return _Module(x, y, 5, nn.functional.cross_entropy, n_val)


def _val_outputs(model):
    model.eval()
    with torch.no_grad():
        return model(model.x[-model.n_val :]), model.y[-model.n_val :]


def _events(trainer):
    acc = EventAccumulator(trainer.logger.log_dir, size_guidance={"histograms": 0, "images": 0, "tensors": 0})
    acc.Reload()
    return acc


def _text(acc, tag):
    event = acc.Tensors(f"{tag}/text_summary")[-1]
    return tensor_util.make_ndarray(event.tensor_proto).reshape(-1)[0].decode()


def _table_column(text, column):
    lines = [ln for ln in text.splitlines() if ln.startswith("|")]
    header = [c.strip() for c in lines[0].strip("|").split("|")]
    col = header.index(column)
    return [[c.strip() for c in ln.strip("|").split("|")][col] for ln in lines[2:]]


def test_regression_residual_histogram_scatter_and_worst(tmp_path):
    model = _regression()
    monitor = ErrorDistributionMonitor(stages=("val",), bins=32, worst_k=7)
    trainer = _trainer(tmp_path, [monitor])
    trainer.fit(model)
    preds, target = _val_outputs(model)
    residual = (preds - target).numpy().astype(np.float64)
    acc = _events(trainer)

    hist_events = acc.Histograms("errors/val/residual")
    assert len(hist_events) == 1  # the sanity check wrote nothing
    hist = hist_events[0].histogram_value
    assert hist.num == 200
    assert sum(hist.bucket) == 200
    assert len(hist.bucket) == 32  # no outer under/overflow bucket: the fitted range holds every residual
    # the same counts as numpy over the written edges (first bucket starts at `min`, buckets are (l_{i-1}, l_i])
    limits = np.asarray(hist.bucket_limit)
    finite = limits[np.isfinite(limits)]
    width = finite[1] - finite[0]
    edges = np.concatenate([[finite[0] - width], finite])
    expected, _ = np.histogram(np.clip(residual, edges[0], edges[-1]), bins=edges)
    written = np.asarray(hist.bucket)[np.isfinite(limits)]
    inside = (residual >= edges[0]) & (residual <= edges[-1])
    assert inside.all()  # ranges fitted with a margin hold this data
    np.testing.assert_array_equal(written, expected)
    assert hist.min == pytest.approx(residual.min(), rel=1e-5)
    assert hist.max == pytest.approx(residual.max(), rel=1e-5)

    image = acc.Images("errors/val/pred_vs_true")[-1]
    png = Image.open(io.BytesIO(image.encoded_image_string))
    assert png.size[0] > 300
    assert png.size[1] > 100

    text = _text(acc, "errors/val/worst")
    worst = np.argsort(-np.abs(residual))[:7]
    assert [int(i) for i in _table_column(text, "index")] == worst.tolist()
    losses = [float(v) for v in _table_column(text, "loss")]
    np.testing.assert_allclose(losses, np.abs(residual)[worst], rtol=1e-4)

    for tag in ("errors/val/abs_error", "errors/val/target_dist", "errors/val/pred_dist"):
        assert acc.Histograms(tag)[-1].histogram_value.num == 200
    record = record_for(trainer)
    assert record.last("errors/val/constant_pred_std") == pytest.approx(float(np.std(preds.numpy())), rel=1e-3)
    assert record.last("errors/val/samples") == 200
    assert record.notes["task"] == "regression"


def test_multiclass_confusion_pr_curves_and_class_counts(tmp_path):
    model = _multiclass()
    trainer = _trainer(tmp_path, [ErrorDistributionMonitor(stages=("val",), thresholds=101)])
    trainer.fit(model)
    logits, target = _val_outputs(model)
    probs = logits.softmax(-1)
    acc = _events(trainer)

    assert acc.Images("errors/val/confusion_matrix")
    tags = set(acc.Tags()["tensors"])
    assert {f"errors/val/pr_curve/{c}" for c in range(5)} <= tags
    precision, recall, _ = tmfc.multiclass_precision_recall_curve(probs, target, num_classes=5, thresholds=101)
    for c in range(5):
        data = tensor_util.make_ndarray(acc.Tensors(f"errors/val/pr_curve/{c}")[-1].tensor_proto)
        tm_p, tm_r = precision[c, :-1].numpy(), recall[c, :-1].numpy()
        ok = ~np.isnan(tm_p)  # torchmetrics gives nan where nothing is predicted positive; we draw 1
        np.testing.assert_allclose(data[4][ok], tm_p[ok], atol=1e-5)
        np.testing.assert_allclose(data[5], tm_r, atol=1e-5)

    record = record_for(trainer)
    note = record.notes["data/class_counts"]
    support = np.bincount(target, minlength=5)
    assert (note["stage"], note["counts"]) == ("val", support.tolist())
    pred = probs.argmax(-1).numpy()
    hits = np.bincount(target, weights=(pred == target.numpy()), minlength=5)
    np.testing.assert_allclose(note["recall"], hits / support)  # each class's recall, for the class_imbalance rule
    majority = np.bincount(target.numpy(), minlength=5).argmax()
    assert record.last("errors/val/majority_pred_share") == pytest.approx((pred == majority).mean(), abs=1e-6)
    hist = acc.Histograms("errors/val/true_class_prob")[-1].histogram_value
    assert hist.num == 200
    true_prob = probs[torch.arange(200), target].numpy()
    assert hist.sum == pytest.approx(true_prob.sum(), rel=1e-4)
    text = _text(acc, "errors/val/worst")
    worst = np.argsort(true_prob)[:20]  # highest -log p(true) = lowest p(true)
    assert [int(i) for i in _table_column(text, "index")] == worst.tolist()
    assert (
        acc.Histograms("errors/val/target_dist")[-1].histogram_value.bucket == np.bincount(target, minlength=5).tolist()
    )


def test_binary_writes_one_pr_curve(tmp_path):
    g = torch.Generator().manual_seed(3)
    x = torch.randn(456, 3, generator=g)
    y = (x[:, 0] > 0.3).float()
    model = _Module(x, y, 1, nn.functional.binary_cross_entropy_with_logits, 200)
    trainer = _trainer(tmp_path, [ErrorDistributionMonitor(stages=("val",))])
    trainer.fit(model)
    tags = {t for t in _events(trainer).Tags()["tensors"] if "pr_curve" in t}
    assert tags == {"errors/val/pr_curve/1"}
    assert record_for(trainer).notes["task"] == "binary"


class _BytesProbe(Callback):
    """After the monitor: the largest state it held during validation batches."""

    def __init__(self, monitor, **options):
        self.monitor, self.options = monitor, options
        self.most = 0

    def on_validation_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0):
        held = self.monitor.held_bytes(**self.options) if self.options else self.monitor.held_bytes()
        self.most = max(self.most, held)


@pytest.mark.parametrize("task", ["regression", "multiclass"])
def test_state_size_does_not_grow_with_samples(tmp_path, task):
    held, curves_held, curves_total = [], [], []
    for n_val in (20_000, 400_000):
        model = _regression(n_val=n_val) if task == "regression" else _multiclass(n_val=n_val)
        monitor = ErrorDistributionMonitor(stages=("val",))
        curves = MetricCurves(stages=("val",))
        probes = [_BytesProbe(monitor), _BytesProbe(curves, buffers=False), _BytesProbe(curves, buffers=True)]
        _trainer(tmp_path / str(n_val), [monitor, curves, *probes], logger=False).fit(model)
        held.append(probes[0].most)
        curves_held.append(probes[1].most)
        curves_total.append(probes[2].most)
    assert held[0] == held[1]
    assert 0 < held[0] < 512 * 1024
    # MetricCurves: fixed-size metric states, plus held steps of at most `buffer_bytes` (8 MiB) and one step
    assert curves_held[0] == curves_held[1]
    assert 0 < curves_held[0] < 512 * 1024
    assert all(total < DEFAULT_BUFFER_BYTES + 512 * 1024 for total in curves_total), curves_total


class _ValReadProbe(Callback):
    """Counts our package's host reads per validation batch (put first in callbacks)."""

    def __init__(self, counter):
        self.reads = []
        self._open = False
        counter.listeners.append(self._on_read)

    def _on_read(self, kind, site):
        if self._open:
            self.reads[-1] += 1

    def on_validation_batch_start(self, trainer, pl_module, batch, batch_idx, dataloader_idx=0):
        if not trainer.sanity_checking:
            self.reads.append(0)
            self._open = True

    def on_validation_epoch_end(self, trainer, pl_module):
        self._open = False


@pytest.mark.parametrize("make", [_regression, _multiclass], ids=["regression", "multiclass"])
def test_no_host_reads_in_validation_batches_after_the_first(tmp_path, make):
    counter = HostReadCounter()
    probe = _ValReadProbe(counter)
    with counter:
        _trainer(tmp_path, [probe, ErrorDistributionMonitor(stages=("val",))], epochs=2).fit(make())
    assert len(probe.reads) == 4
    assert probe.reads[1:] == [0, 0, 0]  # the second epoch's first batch too: ranges are refitted at epoch end
    assert 1 <= probe.reads[0] <= 2  # one-time: task inference and ranges of the first batch


def test_shape_broadcast_is_recorded_and_squeezed(tmp_path):
    model = _regression(squeeze=False)
    trainer = _trainer(tmp_path, [ErrorDistributionMonitor(stages=("val",))])
    trainer.fit(model)
    codes = [f.code for f in record_for(trainer).findings]
    assert "shape_broadcast" in codes
    assert _events(trainer).Histograms("errors/val/residual")[-1].histogram_value.num == 200


def test_layout_state_and_bad_arguments(tmp_path):
    monitor = ErrorDistributionMonitor(stages=("val",))
    _trainer(tmp_path, [monitor], logger=False).fit(_regression())
    state = monitor.state_dict()
    assert state["info"]["val"]["task"] == "regression"
    assert state["epochs"] == {"val": 1}
    fresh = ErrorDistributionMonitor(stages=("val",))
    fresh.load_state_dict(state)
    assert fresh.state_dict() == state
    assert "errors/val/constant_pred_std" in monitor.layout_entries()["Errors: val"]
    with pytest.raises(ValueError, match="`bins`"):
        ErrorDistributionMonitor(bins=1)
    with pytest.raises(ValueError, match="`residual_range`"):
        ErrorDistributionMonitor(residual_range=(1.0, -1.0))
    with pytest.raises(ValueError, match="`stages`"):
        ErrorDistributionMonitor(stages=("predict",))
    with pytest.raises(ValueError, match="`task`"):
        ErrorDistributionMonitor(task="segmentation")


# ---------------------------------------------------------------- multi-task (CompositeLoss over heads)


def _multitask_val_outputs(model, dm):
    model.eval()
    preds, target = {"ctr": [], "cvr": []}, {"ctr": [], "cvr": []}
    with torch.no_grad():
        for x, y in dm.val_dataloader():
            out = model(x)
            for head in preds:
                preds[head].append(out[head])
                target[head].append(y[head])
    return {h: torch.cat(v) for h, v in preds.items()}, {h: torch.cat(v) for h, v in target.items()}


def test_multitask_writes_per_term_keys_equal_to_torchmetrics(tmp_path):
    from lightning_lossdiag.examples import MultiTaskDataModule, MultiTaskMLP

    dm = MultiTaskDataModule(num_samples=400, batch_size=32, seed=0)
    torch.manual_seed(0)
    model = MultiTaskMLP(in_features=6, hidden=8, depth=1)
    trainer = _trainer(tmp_path, [ErrorDistributionMonitor(stages=("val",), thresholds=101, worst_k=5)])
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer.fit(model, dm)
    assert not [w for w in caught if "handed no tensor" in str(w.message)]
    preds, target = _multitask_val_outputs(model, dm)
    n_val = target["ctr"].numel()
    assert n_val == 64  # both val batches were seen (limit_val_batches=2)
    acc = _events(trainer)

    tensors, images, hists = set(acc.Tags()["tensors"]), set(acc.Tags()["images"]), set(acc.Tags()["histograms"])
    for head in ("ctr", "cvr"):
        assert f"errors/val/{head}/pr_curve/1" in tensors
        assert f"errors/val/{head}/worst/text_summary" in tensors
        assert f"errors/val/{head}/confusion_matrix" in images
        assert {f"errors/val/{head}/true_class_prob", f"errors/val/{head}/target_dist"} <= hists
        probs, labels = preds[head].sigmoid(), target[head].long()
        precision, recall, _ = tmfc.binary_precision_recall_curve(probs, labels, thresholds=101)
        data = tensor_util.make_ndarray(acc.Tensors(f"errors/val/{head}/pr_curve/1")[-1].tensor_proto)
        ok = ~np.isnan(precision[:-1].numpy())
        np.testing.assert_allclose(data[4][ok], precision[:-1].numpy()[ok], atol=1e-5)
        np.testing.assert_allclose(data[5], recall[:-1].numpy(), atol=1e-5)
        hist = acc.Histograms(f"errors/val/{head}/true_class_prob")[-1].histogram_value
        true_prob = torch.where(labels == 1, probs, 1 - probs)
        assert hist.num == n_val
        assert hist.sum == pytest.approx(true_prob.sum().item(), rel=1e-4)
        assert (
            acc.Histograms(f"errors/val/{head}/target_dist")[-1].histogram_value.bucket
            == np.bincount(labels, minlength=2).tolist()
        )
    assert not any(t.startswith(("errors/val/pr_curve", "errors/val/worst")) for t in tensors)  # no untermed keys
    record = record_for(trainer)
    assert record.last("errors/val/ctr/samples") == n_val
    assert record.last("errors/val/cvr/samples") == n_val
    assert record.notes["task"] == "binary"
    heads = record.notes["data/class_counts"]["heads"]
    assert heads == {h: np.bincount(target[h].long(), minlength=2).tolist() for h in ("ctr", "cvr")}
    assert "Errors: val/ctr" in trainer.callbacks[0].layout_entries()


def test_multitask_no_host_reads_in_validation_batches_after_the_first(tmp_path):
    from lightning_lossdiag.examples import MultiTaskDataModule, MultiTaskMLP

    counter = HostReadCounter()
    probe = _ValReadProbe(counter)
    monitor = ErrorDistributionMonitor(stages=("val",))
    with counter:
        trainer = _trainer(tmp_path, [probe, monitor], epochs=2, logger=False)
        trainer.fit(MultiTaskMLP(in_features=6, hidden=8, depth=1), MultiTaskDataModule(num_samples=400, batch_size=32))
    assert len(probe.reads) == 4
    assert probe.reads[1:] == [0, 0, 0]
    assert sorted(monitor.state_dict()["info"]) == ["val/ctr", "val/cvr"]


# ---------------------------------------------------------------- DDP: per-rank sample keys


def test_each_rank_draws_its_own_sample_keys():
    g = torch.Generator().manual_seed(5)
    t = torch.randn(64, generator=g)
    p = t + 0.1 * torch.randn(64, generator=g)
    monitor = ErrorDistributionMonitor(stages=("val",), sample_size=8)
    monitor._info["val"] = TaskInfo("regression", "values")
    monitor._ranges["val"] = regression_ranges(p, t, 4, None, lambda x: x.unsqueeze(0))
    states = {rank: monitor._make_state("val", torch.device("cpu"), rank) for rank in (0, 1)}
    again = monitor._make_state("val", torch.device("cpu"), 0)
    for rank, state in [*states.items(), (0, again)]:
        state.update(p, t, rank=rank, world=2)
    keys0, keys1 = states[0].sample.keys, states[1].sample.keys
    assert keys0.shape == keys1.shape == (8,)
    assert not torch.equal(keys0, keys1)  # a shared seed would give both ranks the same keys
    assert not torch.equal(states[0].sample.rows, states[1].sample.rows)  # and so the same sampled positions
    assert torch.equal(again.sample.keys, keys0)  # the seed, not chance, makes the difference
