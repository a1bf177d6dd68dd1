"""ActivationMonitor: hooks only on flush steps, no host reads elsewhere, statistics against direct computations."""

import copy
import warnings

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.loggers import TensorBoardLogger
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_lossdiag.callbacks._activation_stats import (
    FINISHED,
    activation_bounds,
    call_stats,
    finish_all,
    finish_stats,
    histogram,
    histograms,
    merge_stats,
)
from lightning_lossdiag.callbacks.activation_monitor import ActivationMonitor, _is_compiled, select_modules
from lightning_lossdiag.callbacks.doctor import Doctor
from lightning_lossdiag.callbacks.gradient_monitor import GradientMonitor
from lightning_lossdiag.diagnosis.record import record_for
from lightning_lossdiag.testing import HostReadCounter, StepReadProbe

IN = 4
BATCH = 16


class Model(LightningModule):
    def __init__(self, net=None, lr=0.01, seed=0):
        super().__init__()
        torch.manual_seed(seed)
        self.net = net if net is not None else nn.Sequential(nn.Linear(IN, 8), nn.ReLU(), nn.Linear(8, 1))
        self.lr = lr
        g = torch.Generator().manual_seed(seed)
        self.x = torch.randn(160, IN, generator=g)
        self.y = torch.randn(160, 1, generator=g)

    def forward(self, x):
        return self.net(x)

    def training_step(self, batch, batch_idx):
        x, y = batch
        return F.mse_loss(self(x), y)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=self.lr)

    def train_dataloader(self):
        return DataLoader(TensorDataset(self.x, self.y), batch_size=BATCH)


class SharedActModel(Model):
    """One ReLU module called twice in forward; the second call is dead (huge negative bias)."""

    def __init__(self):
        super().__init__(net=nn.Identity())
        self.lin1 = nn.Linear(IN, 8)
        self.lin2 = nn.Linear(8, 8)
        self.act = nn.ReLU()
        self.head = nn.Linear(8, 1)
        with torch.no_grad():
            self.lin2.bias[:4] = -1000.0  # units 0..3 dead on the second call only

    def forward(self, x):
        return self.head(self.act(self.lin2(self.act(self.lin1(x)))))


class Capture(Callback):
    """Keep the weights and inputs of each micro-batch that precedes a flush (the last micro-batch wins)."""

    def __init__(self, every):
        self.every = every
        self.snaps = {}

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if (trainer.global_step + 1) % self.every == 0:
            self.snaps[trainer.global_step + 1] = (copy.deepcopy(pl_module.state_dict()), batch[0].clone(), batch_idx)


class HookChecker(Callback):
    """After ActivationMonitor: which modules carry forward hooks at batch start and end."""

    def __init__(self, every):
        self.every = every
        self.at_start = []  # (flush_next, {hooked module paths})
        self.at_end = []

    @staticmethod
    def _hooked(pl_module):
        return {name for name, m in pl_module.named_modules() if m._forward_hooks}

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.at_start.append(((trainer.global_step + 1) % self.every == 0, self._hooked(pl_module)))

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.at_end.append(self._hooked(pl_module))


def _trainer(tmp_path, callbacks, logger=True, **kw):
    opts = dict(
        max_epochs=1,
        limit_train_batches=8,
        limit_val_batches=0,
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
        accelerator="cpu",
        devices=1,
        logger=TensorBoardLogger(tmp_path, name="tb") if logger else False,
        callbacks=callbacks,
        default_root_dir=tmp_path,
    )
    opts.update(kw)
    return Trainer(**opts)


def _layers(net, x):
    """Outputs of each child of a Sequential, computed directly."""
    outs = []
    with torch.no_grad():
        for child in net:
            x = child(x)
            outs.append(x)
    return outs


def _direct(h, unit_dim=1):
    units = h.movedim(unit_dim, 0).reshape(h.shape[unit_dim], -1)
    return {
        "mean": h.mean().item(),
        "std": h.std(correction=0).item(),
        "zero_frac": (h == 0).float().mean().item(),
        "dead_frac": (units == 0).all(dim=1).float().mean().item(),
    }


def _deep_net(n_blocks):
    layers = [nn.Linear(IN, 8), nn.ReLU()]
    for _ in range(n_blocks - 1):
        layers += [nn.Linear(8, 8), nn.ReLU()]
    return nn.Sequential(*layers, nn.Linear(8, 1))


# ----------------------------------------------------------------- hot path


def _run_counted(tmp_path, n_blocks, every=3):
    counter = HostReadCounter()
    probe = StepReadProbe(counter)
    checker = HookChecker(every)
    monitor = ActivationMonitor(every_n_steps=every, depth=2)
    with counter:
        trainer = _trainer(tmp_path / f"d{n_blocks}", [probe, monitor, checker])
        trainer.fit(Model(net=_deep_net(n_blocks)))
    return probe, checker, trainer


def test_no_reads_and_no_hooks_off_flush_steps(tmp_path):
    probe, checker, trainer = _run_counted(tmp_path, n_blocks=2)
    flush_batches = [i for i, s in enumerate(probe.steps_after) if s % 3 == 0]
    assert flush_batches == [2, 5]
    for i, reads in enumerate(probe.reads):
        if i > 0 and i not in flush_batches:
            assert reads == 0, f"batch {i} made {reads} host reads"
    assert all(probe.reads[i] > 0 for i in flush_batches)  # the flush does transfer (the probe really counts)
    # hooks: on exactly the group outputs before a flush step, on nothing otherwise, and never after a batch
    # depth 2: one group per Linear (the ReLU after it belongs to it), hooked on the group's activation output
    expected = {"net.1", "net.3", "net.4"}
    armed = [hooked for flush_next, hooked in checker.at_start if flush_next]
    idle = [hooked for flush_next, hooked in checker.at_start if not flush_next]
    assert len(armed) == 2
    assert len(idle) == 6
    assert all(h == expected for h in armed)
    assert all(h == set() for h in idle)
    assert all(h == set() for h in checker.at_end)
    assert record_for(trainer).keys("act/mean/") == ["act/mean/net.0", "act/mean/net.2", "act/mean/net.4"]


def test_flush_reads_do_not_grow_with_depth(tmp_path):
    shallow, _, _ = _run_counted(tmp_path, n_blocks=1)
    deep, _, _ = _run_counted(tmp_path, n_blocks=4)
    assert shallow.reads[2] == deep.reads[2]
    assert shallow.reads[5] == deep.reads[5]


# ----------------------------------------------------------------- statistics


def test_statistics_equal_direct_computation(tmp_path):
    capture = Capture(every=3)
    monitor = ActivationMonitor(every_n_steps=3, depth=2)
    trainer = _trainer(tmp_path, [monitor, capture])
    model = Model()
    trainer.fit(model)
    record = record_for(trainer)
    assert sorted(capture.snaps) == [3, 6]
    for step, (state, x, _) in capture.snaps.items():
        ref = Model()
        ref.load_state_dict(state)
        outs = _layers(ref.net, x)
        for group, i in (("net.0", 1), ("net.2", 2)):  # Linear+ReLU: the ReLU's output; the head: its output
            for stat, value in _direct(outs[i]).items():
                got = dict(record.series(f"act/{stat}/{group}"))[step]
                assert got == pytest.approx(value, rel=1e-5, abs=1e-6), (stat, group, step)
    assert record.keys("act/mean/") == ["act/mean/net.0", "act/mean/net.2"]  # the grad/norm/<layer> names
    assert not record.keys("act/saturated_frac/")  # no bounded activation in this model


def test_gradient_accumulation_keeps_last_micro_batch(tmp_path):
    capture = Capture(every=2)
    checker = HookChecker(every=2)
    monitor = ActivationMonitor(every_n_steps=2, depth=2)
    trainer = _trainer(tmp_path, [monitor, checker, capture], accumulate_grad_batches=2)
    trainer.fit(Model())
    # optimizer step 2 is made of batches 2 and 3: hooks armed on both, stats from batch 3
    assert [bool(h) for _, h in checker.at_start] == [False, False, True, True, False, False, True, True]
    state, x, batch_idx = capture.snaps[2]
    assert batch_idx == 3
    ref = Model()
    ref.load_state_dict(state)
    relu = _layers(ref.net, x)[1]
    got = dict(record_for(trainer).series("act/mean/net.0"))[2]
    assert got == pytest.approx(relu.mean().item(), rel=1e-5)


def test_dead_relu_layer(tmp_path):
    net = nn.Sequential(nn.Linear(IN, 8), nn.ReLU(), nn.Linear(8, 1))
    with torch.no_grad():
        net[0].bias.fill_(-1000.0)
    trainer = _trainer(tmp_path, [ActivationMonitor(every_n_steps=2, depth=2)], logger=False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer.fit(Model(net=net))
    record = record_for(trainer)
    assert record.values("act/dead_frac/net.0") == [1.0] * 4
    assert record.values("act/zero_frac/net.0") == [1.0] * 4
    assert all(v < 1.0 for v in record.values("act/dead_frac/net.2"))


def test_saturated_sigmoid(tmp_path):
    net = nn.Sequential(nn.Linear(IN, 8), nn.Sigmoid(), nn.Linear(8, 1))
    with torch.no_grad():
        net[0].weight.mul_(1000.0)
    trainer = _trainer(tmp_path, [ActivationMonitor(every_n_steps=2, depth=2)], logger=False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer.fit(Model(net=net))
    values = record_for(trainer).values("act/saturated_frac/net.0")
    assert len(values) == 4
    assert all(v > 0.95 for v in values)
    assert not record_for(trainer).keys("act/saturated_frac/net.2")  # the linear head has no bounds


def test_histogram_in_event_files(tmp_path):
    capture = Capture(every=3)
    monitor = ActivationMonitor(every_n_steps=3, depth=2, hist_bins=16)
    trainer = _trainer(tmp_path, [monitor, capture], max_epochs=2)
    trainer.fit(Model())
    acc = EventAccumulator(trainer.logger.log_dir, size_guidance={"histograms": 0})
    acc.Reload()
    assert "act/hist/net.0" in acc.Tags()["histograms"]
    events = acc.Histograms("act/hist/net.0")
    assert [e.step for e in events] == [8, 16]
    # the epoch-2 histogram comes from the last flush batch of epoch 2 (step 15)
    state, x, _ = capture.snaps[15]
    ref = Model()
    ref.load_state_dict(state)
    relu = _layers(ref.net, x)[1].numpy().ravel()
    hist = events[-1].histogram_value
    assert sum(hist.bucket) == hist.num == BATCH * 8
    assert hist.min == pytest.approx(relu.min())
    assert hist.max == pytest.approx(relu.max())
    ref_counts, ref_edges = np.histogram(relu, bins=16, range=(relu.min(), relu.max()))
    assert np.abs(np.array(hist.bucket) - ref_counts).sum() <= 2  # a value on a bin edge may round either way
    assert np.allclose(hist.bucket_limit, ref_edges[1:], rtol=1e-5)


# ----------------------------------------------------------------- shared module, compile


def test_shared_module_pools_both_calls(tmp_path):
    capture = Capture(every=2)
    checker = HookChecker(every=2)
    monitor = ActivationMonitor(every_n_steps=2, modules="activations")
    trainer = _trainer(tmp_path, [monitor, checker, capture], logger=False, limit_train_batches=4)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer.fit(SharedActModel())
    assert {h for _, hooked in checker.at_start for h in hooked} == {"act"}
    state, x, _ = capture.snaps[4]
    ref = SharedActModel()
    ref.load_state_dict(state)
    with torch.no_grad():
        h1 = torch.relu(ref.lin1(x))
        h2 = torch.relu(ref.lin2(h1))
    both = torch.cat([h1, h2])
    record = record_for(trainer)
    at = {stat: dict(record.series(f"act/{stat}/act"))[4] for stat in ("mean", "std", "zero_frac", "dead_frac")}
    assert at["mean"] == pytest.approx(both.mean().item(), rel=1e-5)
    assert at["std"] == pytest.approx(both.std(correction=0).item(), rel=1e-5)
    assert at["zero_frac"] == pytest.approx((both == 0).float().mean().item())
    dead = ((h1 == 0).all(0) & (h2 == 0).all(0)).float().mean().item()
    assert at["dead_frac"] == pytest.approx(dead)
    assert ((h2 == 0).all(0)).float().mean().item() >= 0.5  # the second call alone would report more dead units


def test_is_compiled_detection_without_running():
    assert _is_compiled(torch.compile(nn.Linear(2, 2), backend="eager"))
    lin = nn.Linear(2, 2)
    lin.compile(backend="eager")
    assert _is_compiled(lin)
    lin2 = nn.Linear(2, 2)
    lin2.forward = torch.compile(lin2.forward, backend="eager")
    assert _is_compiled(lin2)
    assert not _is_compiled(nn.Linear(2, 2))


class PartlyCompiled(Model):
    def __init__(self):
        super().__init__(net=nn.Identity())
        self.body = torch.compile(nn.Sequential(nn.Linear(IN, 8), nn.ReLU()), backend="eager")
        self.head = nn.Sequential(nn.Linear(8, 8), nn.Tanh(), nn.Linear(8, 1))

    def forward(self, x):
        return self.head(self.body(x))


def test_compiled_submodule_is_skipped_with_one_warning(tmp_path):
    checker = HookChecker(every=2)
    monitor = ActivationMonitor(every_n_steps=2, depth=1)
    trainer = _trainer(tmp_path, [monitor, checker], logger=False, max_epochs=2, limit_train_batches=4)
    with pytest.warns(UserWarning, match="torch.compile") as caught:
        trainer.fit(PartlyCompiled())
    assert sum("torch.compile" in str(w.message) for w in caught) == 1
    assert all(not h.startswith("body") for _, hooked in checker.at_start for h in hooked)
    keys = record_for(trainer).keys("act/")
    assert "act/saturated_frac/head" in keys
    assert not any("body" in k for k in keys)


def test_compiled_lightning_module_gives_no_stats(tmp_path):
    trainer = _trainer(tmp_path, [ActivationMonitor(every_n_steps=2)], logger=False, limit_train_batches=4)
    with pytest.warns(UserWarning, match="nothing left to monitor"):
        trainer.fit(torch.compile(Model(), backend="eager"))
    assert record_for(trainer).keys("act/") == []


# ----------------------------------------------------------------- state, arguments, pure functions


def test_state_round_trip_and_resume(tmp_path):
    monitor = ActivationMonitor(every_n_steps=3)
    trainer = _trainer(tmp_path, [monitor], logger=False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer.fit(Model())
    state = monitor.state_dict()
    assert state == {"last_flushed": 6, "flushes": 2}
    fresh = ActivationMonitor(every_n_steps=3)
    fresh.load_state_dict(copy.deepcopy(state))
    assert fresh.state_dict() == state
    assert not fresh._schedule.is_flush(6, None)  # a resumed run does not flush step 6 twice
    empty = ActivationMonitor()
    empty.load_state_dict({})
    assert empty.state_dict() == {"last_flushed": -1, "flushes": 0}
    assert monitor.state_key != ActivationMonitor(every_n_steps=3, modules="activations").state_key


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"depth": 0}, "`depth`"),
        ({"max_groups": 0}, "`max_groups`"),
        ({"hist_bins": -1}, "`hist_bins`"),
        ({"saturation_tol": 0.7}, "`saturation_tol`"),
        ({"saturation_tol": "x"}, "`saturation_tol`"),
        ({"modules": "leaf"}, "`modules`"),
        ({"unit_dim": 1.5}, "`unit_dim`"),
        ({"every_n_steps": 0}, "`every_n_steps`"),
    ],
    ids=lambda v: str(v),
)
def test_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        ActivationMonitor(**kwargs)


def test_conv_dead_channels_and_merge():
    x = torch.randn(3, 5, 4, 4)
    x[:, 1] = 0.0
    x[:, 3] = 0.0
    f = finish_stats(call_stats(x, unit_dim=1, bounds=None, tol=0.01))
    assert f["dead_frac"].item() == pytest.approx(2 / 5)
    assert f["zero_frac"].item() == pytest.approx((x == 0).float().mean().item())
    a, b = torch.randn(7, 3) * 3 + 2, torch.randn(11, 3)
    m = finish_stats(merge_stats(call_stats(a, 1, None, 0.01), call_stats(b, 1, None, 0.01)))
    both = torch.cat([a, b])
    assert m["mean"].item() == pytest.approx(both.mean().item(), rel=1e-5)
    assert m["std"].item() == pytest.approx(both.std(correction=0).item(), rel=1e-5)


def test_finish_all_matches_direct_statistics_of_every_layer():
    torch.manual_seed(0)
    tanh = activation_bounds(nn.Tanh())
    relu = torch.relu(torch.randn(8, 5))
    relu[:, 2] = 0.0  # one dead unit
    bounded = torch.tanh(torch.randn(4, 3, 6) * 3)
    a, b = torch.randn(2, 7), torch.randn(9, 7) + 1
    zeros = torch.zeros(3)
    accs = [
        call_stats(relu, 1, None, 0.01),
        call_stats(bounded, 1, tanh, 0.01),  # bounded: saturation counted
        merge_stats(call_stats(a, 1, None, 0.01), call_stats(b, 1, None, 0.01)),
        call_stats(zeros, 1, None, 0.01),  # one unit, all zeros
    ]
    raw = [(relu, 1, False), (bounded, 1, True), (torch.cat([a, b]), 1, False), (zeros, None, False)]
    rows = finish_all(accs)
    assert rows.shape == (len(accs), len(FINISHED))
    for (x, unit_dim, has_bounds), row in zip(raw, rows.tolist(), strict=True):
        got = dict(zip(FINISHED, row, strict=True))
        assert got["mean"] == pytest.approx(x.double().mean().item(), rel=1e-6, abs=1e-9)
        assert got["std"] == pytest.approx(x.double().std(correction=0).item(), rel=1e-5, abs=1e-9)
        assert got["zero_frac"] == pytest.approx((x == 0).double().mean().item())
        if unit_dim is None:
            dead = float(bool((x == 0).all()))
        else:
            others = tuple(d for d in range(x.ndim) if d != unit_dim)
            dead = (x != 0).sum(dim=others).eq(0).double().mean().item()
        assert got["dead_frac"] == pytest.approx(dead)
        if has_bounds:
            assert got["saturated_frac"] == pytest.approx(((x <= -0.98) | (x >= 0.98)).double().mean().item())
        else:
            assert got["saturated_frac"] != got["saturated_frac"]  # NaN: no saturation count for this layer
    for acc, row in zip(accs, rows, strict=True):  # finish_stats is the one-layer view of the same numbers
        one = finish_stats(acc)
        assert [k for k in FINISHED if k in one] == list(one)
        assert all(one[k].item() == row[FINISHED.index(k)].item() for k in one)
    assert finish_all([]).shape == (0, len(FINISHED))


def test_bounds_and_saturation():
    assert activation_bounds(nn.Hardtanh(-2.0, 3.0)) == (-2.0, 3.0)
    assert activation_bounds(nn.Hardsigmoid()) == (0.0, 1.0)
    assert activation_bounds(nn.GELU()) is None
    x = torch.tensor([[-1.0, -0.97, 0.0, 0.985, 1.0]])
    f = finish_stats(call_stats(x, 1, activation_bounds(nn.Tanh()), tol=0.01))  # margin 0.02 of the range 2
    assert f["saturated_frac"].item() == pytest.approx(3 / 5)


def test_histogram_matches_numpy_and_ignores_nonfinite():
    x = torch.randn(1000)
    h = histogram(x, bins=10)
    ref, _ = np.histogram(x.numpy(), bins=10, range=(x.min().item(), x.max().item()))
    assert np.abs(h[5:].numpy() - ref).sum() <= 2
    assert h[2].item() == 1000
    assert h[3].item() == pytest.approx(x.sum().item(), rel=1e-4, abs=1e-3)
    y = torch.tensor([1.0, float("nan"), float("inf"), 3.0])
    hy = histogram(y, bins=2)
    assert hy[:3].tolist() == [1.0, 3.0, 2.0]
    assert hy[5:].tolist() == [1.0, 1.0]
    assert histogram(torch.zeros(6), bins=4)[5:].tolist() == [6.0, 0.0, 0.0, 0.0]


def test_select_modules_groups_line_up_with_gradient_groups():
    net = nn.Sequential(nn.Linear(2, 3), nn.Sequential(nn.Linear(3, 3), nn.ReLU(), nn.Linear(3, 3)))
    picked = select_modules(net, depth=1, max_groups=32, mode="groups")
    assert [(n, type(m).__name__) for n, m in picked] == [("0", "Linear"), ("1", "ReLU")]


@pytest.mark.parametrize(("blocks", "max_groups"), [(10, 32), (24, 32), (40, 32), (6, 4)])
def test_activation_groups_are_the_gradient_groups(tmp_path, blocks, max_groups):
    # a flat Sequential of Linear/ReLU pairs: same names, same number, same cap as grad/norm/<layer>
    options = {"every_n_steps": 2, "depth": 2, "max_groups": max_groups}
    trainer = _trainer(tmp_path, [GradientMonitor(**options), ActivationMonitor(**options)], limit_train_batches=2)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer.fit(Model(net=_deep_net(blocks)))
    record = record_for(trainer)
    grad_groups = [k.removeprefix("grad/norm/") for k in record.keys("grad/norm/")]
    act_groups = [k.removeprefix("act/mean/") for k in record.keys("act/mean/")]
    assert act_groups == grad_groups
    assert len(grad_groups) == min(blocks + 1, max_groups)


# ----------------------------------------------------------------- findings from real runs
def _diagnose(tmp_path, net):
    doctor = Doctor(print_report=False)
    trainer = _trainer(tmp_path, [ActivationMonitor(every_n_steps=2, depth=2), doctor], logger=False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer.fit(Model(net=net))
    return {f.code: f for f in doctor.findings}


def test_a_layer_made_dead_is_named_by_dead_units(tmp_path):
    net = _deep_net(2)
    with torch.no_grad():
        net[2].bias.fill_(-1000.0)  # the second Linear's ReLU never fires
    found = _diagnose(tmp_path, net)
    assert set(found["dead_units"].evidence["layers"]) == {"net.2"}
    assert found["dead_units"].evidence["layers"]["net.2"] == 1.0
    assert "`net.2` (100%)" in found["dead_units"].message
    assert "saturated_activations" not in found


def test_a_sigmoid_driven_to_saturation_is_named_by_saturated_activations(tmp_path):
    net = nn.Sequential(nn.Linear(IN, 8), nn.Sigmoid(), nn.Linear(8, 8), nn.Tanh(), nn.Linear(8, 1))
    with torch.no_grad():
        net[0].weight.mul_(1000.0)
    found = _diagnose(tmp_path, net)
    assert set(found["saturated_activations"].evidence["layers"]) == {"net.0"}  # the tanh layer is not named
    assert "dead_units" not in found


def test_a_healthy_network_gets_no_activation_finding(tmp_path):
    found = _diagnose(tmp_path, nn.Sequential(nn.Linear(IN, 8), nn.Tanh(), nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 1)))
    assert not {"dead_units", "saturated_activations"} & set(found)


def test_the_values_kept_for_the_histogram_reuse_one_buffer_per_layer():
    monitor = ActivationMonitor(hist_bins=8)
    first = monitor._keep_values("net.0", torch.arange(6.0))
    again = monitor._keep_values("net.0", torch.arange(4.0) + 10)  # a smaller last batch fits the same buffer
    assert again.untyped_storage().data_ptr() == first.untyped_storage().data_ptr()
    assert again.tolist() == [10.0, 11.0, 12.0, 13.0]
    grown = monitor._keep_values("net.0", torch.ones(9))  # a bigger batch gets a new buffer
    assert grown.tolist() == [1.0] * 9
    half = monitor._keep_values("net.0", torch.ones(3, dtype=torch.float16))  # the dtype follows the values
    assert half.dtype == torch.float16


def test_histograms_of_several_layers_at_once_equal_each_layer_alone():
    g = torch.Generator().manual_seed(3)
    layers = [
        torch.randn(500, generator=g),
        torch.relu(torch.randn(37, 5, generator=g)),  # another length and shape
        torch.tensor([1.0, float("nan"), float("inf"), -2.0]),  # non-finite values are not counted
        torch.full((7,), 0.5),  # min == max: everything in bin 0
        torch.tensor([float("nan")]),  # no finite value
        torch.tensor([3e38, -3e38, 0.0]),  # max - min overflows float32: every value is still counted
    ]
    together = histograms(layers, bins=16)
    for row, x in zip(together, layers, strict=True):
        alone = histogram(x, bins=16)
        assert torch.allclose(row, alone, equal_nan=True), (row, alone)
    finite_counts = [int(torch.isfinite(x).sum()) for x in layers]
    assert together[:, 2].tolist() == finite_counts  # num
    assert together[:, 5:].sum(dim=1).tolist() == finite_counts  # every finite value in exactly one bin
    assert (together[-1, 5].item(), together[-1, -1].item()) == (1.0, 1.0)  # the minimum first, the maximum last


@pytest.mark.parametrize(("shape", "unit_dim"), [((6, 5), 1), ((3, 4, 5), 1), ((7,), 1), ((2, 3, 4), 5)])
def test_zero_counts_and_alive_units_equal_a_direct_count(shape, unit_dim):
    g = torch.Generator().manual_seed(sum(shape))
    x = torch.randn(*shape, generator=g)
    x[x < 0.3] = 0.0
    x.view(-1)[0] = -0.0  # a negative zero is a zero
    x.view(-1)[-1] = float("nan")  # NaN is not a zero, and its unit is alive
    stats = call_stats(x, unit_dim, None, 0.01)
    assert stats["zeros"].item() == (x == 0).sum().item()
    if x.ndim == 1:
        expected_alive = (x != 0).any().reshape(1)
    else:
        axis = unit_dim if unit_dim < x.ndim else x.ndim - 1
        expected_alive = (x != 0).movedim(axis, 0).reshape(x.shape[axis], -1).any(dim=1)
    assert stats["alive"].tolist() == expected_alive.tolist()
