import math

import pytest
import torch
from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.loggers import TensorBoardLogger
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_lossdiag.callbacks.gradient_monitor import GradientMonitor
from lightning_lossdiag.diagnosis.record import record_for


class MLP(LightningModule):
    def __init__(self, width=8, depth=3):
        super().__init__()
        layers = [nn.Linear(4, width), nn.ReLU()]
        for _ in range(depth - 1):
            layers += [nn.Linear(width, width), nn.Tanh()]
        self.body = nn.Sequential(*layers)
        self.head = nn.Linear(width, 1)

    def training_step(self, batch, batch_idx):
        x, y = batch
        return nn.functional.mse_loss(self.head(self.body(x)).squeeze(-1), y)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.05)

    def train_dataloader(self):
        g = torch.Generator().manual_seed(0)
        x = torch.randn(64, 4, generator=g)
        return DataLoader(TensorDataset(x, x.sum(-1) * 3), batch_size=8)


class Scripted(LightningModule):
    """loss = <a, ga[t]> + <b, gb[t]>: the gradient of step t is exactly (ga[t], gb[t])."""

    def __init__(self, ga, gb, unused=False):
        super().__init__()
        self.a = nn.Linear(3, 1, bias=False)
        self.b = nn.Linear(2, 1, bias=False)
        self.zero = nn.Linear(2, 1, bias=False)
        self.unused = nn.Linear(2, 1, bias=False) if unused else None
        self.ga, self.gb = ga, gb

    def training_step(self, batch, batch_idx):
        t = self.trainer.global_step
        return (
            (self.a.weight * self.ga[t]).sum()
            + (self.b.weight * self.gb[t]).sum()
            + (self.zero.weight * 0.0).sum()
            + batch[0].sum() * 0.0
        )

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.01)

    def train_dataloader(self):
        return DataLoader(TensorDataset(torch.zeros(64, 1)), batch_size=8)


class Capture(Callback):
    """Independent reference: the gradients Lightning hands to the optimizer, before and after clipping."""

    def __init__(self):
        self.pre, self.post = [], []

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        self.pre.append({n: p.grad.clone() for n, p in pl_module.named_parameters() if p.grad is not None})

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.post.append({n: p.grad.clone() for n, p in pl_module.named_parameters() if p.grad is not None})


def trainer_for(tmp_path, callbacks, batches=8, epochs=1, **kw):
    return Trainer(
        max_epochs=epochs,
        limit_train_batches=batches,
        limit_val_batches=0,
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
        logger=TensorBoardLogger(tmp_path, name="", version=""),
        accelerator="cpu",
        devices=1,
        callbacks=callbacks,
        **kw,
    )


def group_norm(grads, prefix):
    return math.sqrt(sum(float((g.double() ** 2).sum()) for n, g in grads.items() if n.startswith(prefix + ".")))


def test_total_and_group_norms_match_torch(tmp_path):
    cap = Capture()
    mon = GradientMonitor(every_n_steps=1, depth=2)
    trainer = trainer_for(tmp_path, [cap, mon])
    trainer.fit(MLP())
    rec = record_for(trainer)
    totals = rec.values("grad/norm_total")
    assert len(totals) == 8
    for t, grads in enumerate(cap.pre):
        ref = torch.nn.utils.get_total_norm(list(grads.values()))
        assert totals[t] == pytest.approx(float(ref), rel=1e-6)
        for group in ["body.0", "body.2", "body.4", "head"]:
            assert rec.values(f"grad/norm/{group}")[t] == pytest.approx(group_norm(grads, group), rel=1e-5)
    assert rec.values("grad/norm_total_clipped") == pytest.approx(totals)  # no clipping configured
    assert rec.values("grad/clip_rate") == [0.0] * 8
    assert rec.notes["grad/clip"] == {"val": None, "algorithm": "norm"}
    assert rec.notes["grad/dead_params"] == []


def test_double_precision_training_is_measured(tmp_path):
    """``precision="64-true"``: float64 gradients (``_foreach_norm`` refuses a float32 result for them)."""
    cap = Capture()
    trainer = trainer_for(tmp_path, [cap, GradientMonitor(every_n_steps=1)], precision="64-true")
    trainer.fit(MLP())
    totals = record_for(trainer).values("grad/norm_total")
    assert all(g.dtype == torch.float64 for g in cap.pre[0].values())
    assert totals == pytest.approx([float(torch.nn.utils.get_total_norm(list(g.values()))) for g in cap.pre], rel=1e-6)


def test_param_norms_of_mixed_dtypes_equal_torch():
    from lightning_lossdiag.callbacks._grad_window import param_norms

    tensors = [
        torch.randn(5),
        torch.full((4,), 60000.0, dtype=torch.float16),  # its norm overflows float16, not float32
        torch.randn(3, dtype=torch.bfloat16),
        torch.randn(6, dtype=torch.float64),
        torch.randn(2, dtype=torch.complex64),
    ]
    for p in (2.0, 1.0, math.inf):
        expected = [
            float(torch.linalg.vector_norm(t.to(torch.complex128 if t.is_complex() else torch.float64), p))
            for t in tensors
        ]
        got = param_norms(tensors, p)
        assert got.dtype == torch.float32
        assert got.tolist() == pytest.approx(expected, rel=1e-3)


def test_groups_beyond_max_groups_merge_into_other(tmp_path):
    cap = Capture()
    trainer = trainer_for(tmp_path, [cap, GradientMonitor(every_n_steps=2, depth=2, max_groups=2)], batches=2)
    trainer.fit(MLP())
    rec = record_for(trainer)
    assert rec.keys("grad/norm/") == ["grad/norm/body.0", "grad/norm/other"]
    grads = cap.pre[1]
    rest = math.sqrt(sum(float((g.double() ** 2).sum()) for n, g in grads.items() if not n.startswith("body.0.")))
    assert rec.values("grad/norm/other") == pytest.approx([rest], rel=1e-5)


SCALES = [0.5, 3.0, 1.0, 10.0, 0.1, 2.5, 0.2, 4.0]


def scripted_grads(n=8):
    g = torch.Generator().manual_seed(1)
    ga = [torch.randn(1, 3, generator=g) * s for s in SCALES[:n]]
    gb = [torch.randn(1, 2, generator=g) * s for s in SCALES[:n]]
    return ga, gb


@pytest.mark.parametrize("algorithm", ["norm", "value"])
def test_clipping_matches_what_torch_leaves(tmp_path, algorithm):
    ga, gb = scripted_grads()
    clip = 2.0 if algorithm == "norm" else 1.0
    cap = Capture()
    mon = GradientMonitor(every_n_steps=4)
    trainer = trainer_for(tmp_path, [cap, mon], gradient_clip_val=clip, gradient_clip_algorithm=algorithm)
    trainer.fit(Scripted(ga, gb))
    rec = record_for(trainer)
    expected_clipped = []
    for t in range(8):
        grads = [ga[t], gb[t], torch.zeros(1, 2)]
        if algorithm == "norm":
            copies = [g.clone() for g in grads]
            ref_params = [nn.Parameter(torch.zeros_like(g)) for g in grads]
            for p, g in zip(ref_params, copies, strict=False):
                p.grad = g
            torch.nn.utils.clip_grad_norm_(ref_params, clip)
            expected_clipped.append(not all(torch.equal(p.grad, g) for p, g in zip(ref_params, grads, strict=False)))
        else:
            expected_clipped.append(any(bool((g.abs() > clip).any()) for g in grads))
    assert sum(expected_clipped) not in (0, 8)  # the script clips on some steps only
    rates = [sum(expected_clipped[:4]) / 4, sum(expected_clipped[4:]) / 4]
    assert rec.values("grad/clip_rate") == pytest.approx(rates)
    # post-clip norm at the flush steps (4 and 8) == norm of the gradients the optimizer actually received
    for i, t in enumerate([3, 7]):
        left = torch.nn.utils.get_total_norm(list(cap.post[t].values()))
        assert rec.values("grad/norm_total_clipped")[i] == pytest.approx(float(left), rel=1e-5)
        pre = torch.nn.utils.get_total_norm([ga[t], gb[t]])
        assert rec.values("grad/norm_total")[i] == pytest.approx(float(pre), rel=1e-6)
    assert rec.values("grad/norm_total_max") == pytest.approx(
        [max(float(torch.nn.utils.get_total_norm([ga[t], gb[t]])) for t in r) for r in (range(4), range(4, 8))]
    )
    assert rec.notes["grad/clip"] == {"val": clip, "algorithm": algorithm}
    assert rec.values("grad/clip_val") == [clip, clip]  # charted beside the pre/post-clip norms at each flush


@pytest.mark.parametrize("algorithm", ["norm", "value"])
@pytest.mark.parametrize("limit", ["max_epochs", "max_steps"])
def test_last_step_of_a_fit_off_the_flush_grid_is_complete(tmp_path, algorithm, limit):
    # 6 steps, flushes every 4: step 6 is flushed at train end; its post-clip and group norms must be right too
    ga, gb = scripted_grads()
    clip = 2.0 if algorithm == "norm" else 1.0
    cap = Capture()
    ends = {"batches": 6} if limit == "max_epochs" else {"epochs": -1, "max_steps": 6}
    trainer = trainer_for(
        tmp_path,
        [cap, GradientMonitor(every_n_steps=4)],
        gradient_clip_val=clip,
        gradient_clip_algorithm=algorithm,
        **ends,
    )
    trainer.fit(Scripted(ga, gb))
    rec = record_for(trainer)
    assert [s for s, _ in rec.series("grad/norm_total_clipped")] == [4, 6]
    left = float(torch.nn.utils.get_total_norm(list(cap.post[5].values())))
    assert rec.values("grad/norm_total_clipped")[-1] == pytest.approx(left, rel=1e-5)
    assert [s for s, _ in rec.series("grad/norm/a")] == [4, 6]
    assert rec.values("grad/norm/a")[-1] == pytest.approx(float(ga[5].norm()), rel=1e-5)


def test_a_stop_nobody_saw_coming_still_logs_the_group_norms_of_the_last_step(tmp_path):
    # flushes every 4 of 8 planned steps; a callback stops the fit after step 6 (as EarlyStopping or a
    # KeyboardInterrupt-free `should_stop` would): step 6 is flushed at train end with the norms of its own groups
    ga, gb = scripted_grads()

    class StopAfter6(Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            if trainer.global_step == 6:
                trainer.should_stop = True

    trainer = trainer_for(tmp_path, [GradientMonitor(every_n_steps=4), StopAfter6()])
    trainer.fit(Scripted(ga, gb))
    assert trainer.global_step == 6
    rec = record_for(trainer)
    assert [s for s, _ in rec.series("grad/norm/a")] == [4, 6]
    assert rec.values("grad/norm/a")[-1] == pytest.approx(float(ga[5].norm()), rel=1e-5)
    assert rec.values("grad/norm/b")[-1] == pytest.approx(float(gb[5].norm()), rel=1e-5)


def test_dead_and_nonfinite_params(tmp_path):
    ga, gb = scripted_grads()
    gb[5] = torch.tensor([[float("inf"), 1.0]])  # step 6: b.weight has an inf gradient
    mon = GradientMonitor(every_n_steps=4)
    trainer = trainer_for(tmp_path, [mon])
    trainer.fit(Scripted(ga, gb, unused=True))
    rec = record_for(trainer)
    assert sorted(rec.notes["grad/dead_params"]) == ["unused.weight", "zero.weight"]
    assert rec.notes["grad/nonfinite_params"] == ["b.weight"]
    assert rec.notes["grad/first_nonfinite_step"] == 6
    assert rec.values("grad/nonfinite_count") == [0, 1]


def test_gradient_accumulation_measures_the_accumulated_gradient(tmp_path):
    ga, gb = scripted_grads()
    mon = GradientMonitor(every_n_steps=1)
    trainer = trainer_for(tmp_path, [mon], accumulate_grad_batches=2)
    trainer.fit(Scripted(ga, gb))
    rec = record_for(trainer)
    # global_step stays t during both batches of step t+1, so both use script index t; Lightning divides by 2
    expected = [float(torch.nn.utils.get_total_norm([ga[t], gb[t]])) for t in range(4)]
    assert rec.values("grad/norm_total") == pytest.approx(expected, rel=1e-6)


def test_param_norms_and_tensorboard_tags(tmp_path):
    class Weights(Callback):
        def __init__(self):
            self.seen = []

        def on_before_optimizer_step(self, trainer, pl_module, optimizer):
            self.seen.append([p.detach().clone() for p in pl_module.head.parameters()])

    weights = Weights()
    mon = GradientMonitor(every_n_steps=2, depth=1, param_norms=True)
    trainer = trainer_for(tmp_path, [weights, mon], batches=6)
    trainer.fit(MLP())
    rec = record_for(trainer)
    expected = [float(torch.nn.utils.get_total_norm(weights.seen[t])) for t in (1, 3, 5)]
    assert rec.values("param/norm/head") == pytest.approx(expected, rel=1e-6)
    acc = EventAccumulator(str(tmp_path))
    acc.Reload()
    tags = set(acc.Tags()["scalars"])
    assert {"grad/norm_total", "grad/norm/body", "grad/norm/head", "param/norm/body", "grad/clip_rate"} <= tags
    assert [e.step for e in acc.Scalars("grad/norm/body")] == [2, 4, 6]


class TwoOptimizers(MLP):
    def __init__(self):
        super().__init__()
        self.automatic_optimization = False

    def training_step(self, batch, batch_idx):
        opt_a, opt_b = self.optimizers()
        loss = super().training_step(batch, batch_idx)
        opt_a.zero_grad()
        opt_b.zero_grad()
        self.manual_backward(loss)
        self.clip_gradients(opt_a, gradient_clip_val=0.5, gradient_clip_algorithm="norm")
        opt_a.step()
        opt_b.step()
        return loss

    def configure_optimizers(self):
        return [torch.optim.SGD(self.body.parameters(), lr=0.01), torch.optim.Adam(self.head.parameters())]


def test_several_optimizers_get_suffixes_and_manual_clipping_is_seen_after(tmp_path):
    mon = GradientMonitor(every_n_steps=4, depth=1)
    trainer = trainer_for(tmp_path, [mon], batches=4)
    trainer.fit(TwoOptimizers())
    rec = record_for(trainer)
    assert "grad/norm_total" not in rec.scalars
    assert rec.keys("grad/norm/") == ["grad/norm/body_opt0", "grad/norm/head_opt1"]
    # manual optimization: the hook fires inside opt.step(), after the module's own clip_gradients(0.5)
    assert max(rec.values("grad/norm_total_opt0")) <= 0.5 + 1e-5
    assert rec.values("grad/clip_rate_opt0") == [0.0, 0.0]  # global_step advances by 2 per batch: flushes at 4, 8


def test_state_round_trip(tmp_path):
    ga, gb = scripted_grads()
    gb[1] = torch.tensor([[float("nan"), 1.0]])
    mon = GradientMonitor(every_n_steps=4)
    trainer = trainer_for(tmp_path, [mon], batches=4)
    trainer.fit(Scripted(ga, gb))
    state = mon.state_dict()
    other = GradientMonitor(every_n_steps=4)
    other.load_state_dict(state)
    assert other.state_dict() == state
    assert state["nonfinite_counts"] == {"0": 1}
    assert state["first_nonfinite_step"] == 2


def test_resume_continues_nonfinite_count(tmp_path):
    ga, gb = scripted_grads()
    gb[1] = torch.tensor([[float("nan"), 1.0]])
    model = Scripted(ga, gb)
    trainer = trainer_for(tmp_path, [GradientMonitor(every_n_steps=4)], batches=4)
    trainer.fit(model)
    trainer.save_checkpoint(tmp_path / "a.ckpt")
    again = GradientMonitor(every_n_steps=4)
    trainer2 = trainer_for(tmp_path / "b", [again], batches=4, epochs=2)
    trainer2.fit(Scripted(ga, gb), ckpt_path=tmp_path / "a.ckpt")
    assert record_for(trainer2).values("grad/nonfinite_count") == [1]


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [({"depth": 0}, "depth"), ({"max_groups": 0}, "max_groups"), ({"norm_type": -1}, "norm_type")],
    ids=["depth", "max_groups", "norm_type"],
)
def test_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        GradientMonitor(**kwargs)


# ------------------------------------------------------------------ a checkpoint between flushes
#: total gradient norm of each step (the gradient of `a` is (c, 0, 0)); `b` gets a gradient on step 1 only
NORMS = [1.0, 9.0, 3.0, 4.0, 2.0, 5.0, 2.0, 3.0]
CLIP = 4.5


def window_grads():
    ga = [torch.tensor([[c, 0.0, 0.0]]) for c in NORMS]
    gb = [torch.tensor([[0.5, 0.5]])] + [torch.zeros(1, 2)] * (len(NORMS) - 1)
    return ga, gb


def window_trainer(tmp_path, mon, ckpt_every=None):
    callbacks = [mon]
    if ckpt_every:
        callbacks.append(ModelCheckpoint(dirpath=tmp_path / "ckpt", every_n_train_steps=ckpt_every, save_top_k=-1))
    return Trainer(
        max_epochs=1,
        limit_train_batches=len(NORMS),
        limit_val_batches=0,
        gradient_clip_val=CLIP,
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=bool(ckpt_every),
        logger=TensorBoardLogger(tmp_path, name="", version=""),
        accelerator="cpu",
        devices=1,
        callbacks=callbacks,
    )


def test_window_survives_a_checkpoint_between_flushes(tmp_path):
    ga, gb = window_grads()
    # the flush at step 8 covers steps 1..8; the checkpoint at step 5 falls between (before the first flush)
    full = window_trainer(tmp_path / "full", GradientMonitor(every_n_steps=8), ckpt_every=5)
    full.fit(Scripted(ga, gb))
    (ckpt,) = (tmp_path / "full" / "ckpt").glob("*step=5.ckpt")
    resumed = window_trainer(tmp_path / "resumed", GradientMonitor(every_n_steps=8))
    resumed.fit(Scripted(ga, gb), ckpt_path=ckpt)
    assert resumed.global_step == 8
    totals = [math.sqrt(float((a**2).sum() + (b**2).sum())) for a, b in zip(ga, gb, strict=True)]
    clipped = [t + 1e-6 > CLIP for t in totals]  # what clip_grad_norm_ does
    for trainer in (full, resumed):
        rec = record_for(trainer)
        assert rec.series("grad/norm_total_max") == [(8, pytest.approx(max(totals)))]  # step 2's, before the ckpt
        assert rec.values("grad/clip_rate") == [pytest.approx(sum(clipped) / len(clipped))]
        assert rec.notes["grad/dead_params"] == ["zero.weight"]  # `b` had a gradient on step 1, before the ckpt


def test_nonfinite_between_flushes_survives_a_checkpoint(tmp_path):
    ga, gb = window_grads()
    ga[2] = torch.tensor([[float("nan"), 0.0, 0.0]])  # step 3, before the checkpoint of step 5
    full = window_trainer(tmp_path / "full", GradientMonitor(every_n_steps=8), ckpt_every=5)
    full.fit(Scripted(ga, gb))
    (ckpt,) = (tmp_path / "full" / "ckpt").glob("*step=5.ckpt")
    saved = torch.load(ckpt, weights_only=False)["callbacks"]
    (state,) = [v for k, v in saved.items() if k.startswith("GradientMonitor")]
    assert state["nonfinite_counts"] == {"0": 1}
    assert state["first_nonfinite_step"] == 3
    assert state["nonfinite_params"] == ["a.weight"]
    assert state["windows"]["0"]["steps"] == 5
    fresh = GradientMonitor(every_n_steps=8)
    fresh.load_state_dict(state)
    assert fresh.state_dict() == state  # plain data, round trip before the optimizer state is rebuilt
    resumed = window_trainer(tmp_path / "resumed", GradientMonitor(every_n_steps=8))
    resumed.fit(Scripted(ga, gb), ckpt_path=ckpt)
    for trainer in (full, resumed):
        rec = record_for(trainer)
        assert rec.values("grad/nonfinite_count") == [1]
        assert rec.notes["grad/first_nonfinite_step"] == 3
        assert rec.notes["grad/nonfinite_params"] == ["a.weight"]


# ------------------------------------------------------------------ the per-step window, folded in batches
def test_window_folded_in_small_blocks_gives_the_same_flush(tmp_path, monkeypatch):
    from lightning_lossdiag.callbacks import _grad_window

    ga, gb = scripted_grads()
    ga[2] = torch.tensor([[float("nan"), 0.0, 0.0]])  # step 3
    gb[6] = torch.tensor([[float("inf"), 0.0]])  # step 7
    monkeypatch.setattr(_grad_window, "FOLD_ROWS", 3)  # 8 steps per flush: folded after steps 3, 6 and at the flush
    trainer = trainer_for(tmp_path, [GradientMonitor(every_n_steps=8)], gradient_clip_val=2.0)
    trainer.fit(Scripted(ga, gb))
    rec = record_for(trainer)
    totals = [math.sqrt(float((a.double() ** 2).sum() + (b.double() ** 2).sum())) for a, b in zip(ga, gb, strict=True)]
    clipped = [t + 1e-6 > 2.0 for t in totals]  # NaN: clip_grad_norm_'s coefficient is NaN, not < 1
    assert rec.values("grad/clip_rate") == [pytest.approx(sum(clipped) / 8)]
    assert rec.values("grad/nonfinite_count") == [2]
    assert rec.notes["grad/first_nonfinite_step"] == 3
    assert rec.notes["grad/nonfinite_params"] == ["a.weight", "b.weight"]
    assert math.isnan(rec.values("grad/norm_total_max")[0])  # a NaN total poisons the max, as torch.maximum does
    assert rec.values("grad/norm_total") == [pytest.approx(totals[7], rel=1e-6)]


class Sometimes(Scripted):
    """`b` takes part in the loss on even steps only: its gradient is None on odd steps (set_to_none)."""

    def training_step(self, batch, batch_idx):
        t = self.trainer.global_step
        loss = (self.a.weight * self.ga[t]).sum() + batch[0].sum() * 0.0
        return loss + (self.b.weight * self.gb[t]).sum() if t % 2 == 0 else loss


@pytest.mark.parametrize("algorithm", ["norm", "value"])
def test_parameters_without_gradient_on_some_steps(tmp_path, algorithm):
    ga, gb = scripted_grads()
    cap = Capture()
    clip = 2.0 if algorithm == "norm" else 1.0
    mon = GradientMonitor(every_n_steps=1, norm_type=1.0)
    trainer = trainer_for(tmp_path, [cap, mon], gradient_clip_val=clip, gradient_clip_algorithm=algorithm)
    trainer.fit(Sometimes(ga, gb))
    rec = record_for(trainer)
    assert [sorted(g) for g in cap.pre[:2]] == [["a.weight", "b.weight"], ["a.weight"]]
    expected = [float(torch.nn.utils.get_total_norm(list(g.values()), norm_type=1.0)) for g in cap.pre]
    assert rec.values("grad/norm_total") == pytest.approx(expected, rel=1e-6)
    for t, grads in enumerate(cap.pre):
        if algorithm == "norm":
            was_clipped = float(torch.nn.utils.get_total_norm(list(grads.values()))) + 1e-6 > clip
        else:
            was_clipped = any(bool((g.abs() > clip).any()) for g in grads.values())
        assert rec.values("grad/clip_rate")[t] == float(was_clipped)
        left = torch.nn.utils.get_total_norm(list(cap.post[t].values()), norm_type=1.0)
        assert rec.values("grad/norm_total_clipped")[t] == pytest.approx(float(left), rel=1e-5)
    assert rec.notes["grad/dead_params"] == ["zero.weight"]
