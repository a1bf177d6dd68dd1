"""What the per-step paths of the gradient monitor and the NaN guard decide once and reuse stays right when the things
it was decided from change between steps: gradients that appear and disappear, a parameter group added to the
optimizer, the Trainer's clipping changed, fp16 verdicts of the GradScaler; and the one-stack norms equal the
separate ones."""

import math
from types import SimpleNamespace

import pytest
import torch
from torch import nn

import lightning_lossdiag.callbacks._grad_window as grad_window
from lightning_lossdiag.callbacks._amp import scaler_found_inf, scaler_skip_mask
from lightning_lossdiag.callbacks._grad_window import norm_path, param_norms, stacked_norms
from lightning_lossdiag.callbacks.gradient_monitor import GradientMonitor
from lightning_lossdiag.callbacks.nonfinite_guard import NonFiniteGuard

NAN, INF = float("nan"), float("inf")


def fake_trainer(opt, clip_val=None, algorithm=None, step=0):
    """The few Trainer attributes the per-step hooks read (no Lightning loop: the hooks are called by hand)."""
    return SimpleNamespace(
        optimizers=[opt],
        global_step=step,
        gradient_clip_val=clip_val,
        gradient_clip_algorithm=algorithm,
        precision_plugin=SimpleNamespace(),
        log_every_n_steps=10**9,
        max_steps=10**9,
        fit_loop=None,
        world_size=1,
    )


def net() -> nn.Module:
    module = nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 2), nn.Linear(2, 1))
    module.automatic_optimization = True
    return module


def set_grads(params, present, seed, bad=None):
    """Fresh gradients (new tensors, as `zero_grad(set_to_none=True)` leaves them) for the parameters in `present`."""
    g = torch.Generator().manual_seed(seed)
    for i, p in enumerate(params):
        p.grad = torch.randn(p.shape, generator=g) if i in present else None
    if bad is not None:
        params[bad].grad.view(-1)[0] = NAN


PATTERNS = [range(6), [0, 1, 2, 3], range(6), [0, 1, 4, 5], [0, 1, 2, 3], [2, 3], range(6), [0, 1, 4, 5]]


@pytest.mark.parametrize("clip", [None, ("norm", 1.0), ("value", 0.5)], ids=["no-clip", "norm", "value"])
@pytest.mark.parametrize("norm_type", [2.0, 1.0])
def test_rows_stay_right_when_gradients_appear_and_disappear(clip, norm_type):
    module = net()
    params = list(module.parameters())
    opt = torch.optim.SGD(params, lr=0.1)
    trainer = fake_trainer(opt, *(reversed(clip) if clip else ()))
    mon = GradientMonitor(norm_type=norm_type)
    mon.shares_latest = True  # as inside LossDiagnostics: the measured step is handed over
    lists = {}
    for step, present in enumerate(PATTERNS):
        set_grads(params, set(present), seed=step)
        trainer.global_step = step
        mon.on_before_optimizer_step(trainer, module, opt)
        st = mon._states[0]
        expected = [float(torch.linalg.vector_norm(p.grad, norm_type)) if p.grad is not None else 0.0 for p in params]
        assert st.rows[-1].tolist() == pytest.approx(expected, rel=1e-6)
        if clip is not None and clip[0] == "value":  # the clip decision's max-abs row follows the same pattern
            expected_aux = [float(p.grad.abs().max()) if p.grad is not None else 0.0 for p in params]
            assert st.aux_rows[-1].tolist() == pytest.approx(expected_aux, rel=1e-6)
        _, seen_params, seen_grads, seen_norms = mon.take_latest(opt)
        assert [id(p) for p in seen_params] == [id(params[i]) for i in present]
        assert all(g is params[i].grad for g, i in zip(seen_grads, present, strict=True))
        assert seen_norms.tolist() == pytest.approx([expected[i] for i in present], rel=1e-6)
        key = tuple(present)
        if key in lists:  # the same pattern again: the same list object (what the guard keys its rows on)
            assert seen_params is lists[key]
        lists[key] = seen_params


def test_patterns_beyond_the_cache_bound_are_measured_without_being_kept(monkeypatch):
    monkeypatch.setattr(grad_window, "MAX_SUBSETS", 2)
    module = net()
    params = list(module.parameters())
    opt = torch.optim.SGD(params, lr=0.1)
    trainer = fake_trainer(opt)
    mon = GradientMonitor()
    for step, present in enumerate([[0, 1], [2, 3], [4, 5], [0, 1, 2, 3], [0, 1, 4, 5], [4, 5]]):
        set_grads(params, set(present), seed=step)
        mon.on_before_optimizer_step(trainer, module, opt)
        expected = [float(p.grad.norm()) if p.grad is not None else 0.0 for p in params]
        assert mon._states[0].rows[-1].tolist() == pytest.approx(expected, rel=1e-6)
    assert len(mon._states[0].subsets) == 2


def test_the_clip_spec_follows_the_trainer_between_steps():
    mon = GradientMonitor()
    trainer = fake_trainer(None, 1.0, "norm")
    assert mon._clip_spec(trainer, True) == ("norm", 1.0)
    trainer.gradient_clip_val = 0.25
    assert mon._clip_spec(trainer, True) == ("norm", 0.25)
    trainer.gradient_clip_algorithm = "value"
    assert mon._clip_spec(trainer, True) == ("value", 0.25)
    assert mon._clip_spec(trainer, False) is None  # manual optimization: Lightning forbids the Trainer's clipping
    trainer.gradient_clip_val = None
    assert mon._clip_spec(trainer, True) is None
    trainer.gradient_clip_val = 0.0
    assert mon._clip_spec(trainer, True) is None


def guard_step(guard, trainer, module, opt, loss=1.0):
    guard.on_before_backward(trainer, module, torch.tensor(loss))
    guard.on_before_optimizer_step(trainer, module, opt)
    guard._clear_found_inf()
    trainer.global_step += 1


def test_the_lone_guard_follows_a_changed_parameter_set():
    module = net()
    params = list(module.parameters())
    extra = nn.Parameter(torch.ones(3))
    opt = torch.optim.SGD(params[:4], lr=0.1)
    trainer = fake_trainer(opt)
    guard = NonFiniteGuard(policy="skip")
    guard._param_names = {id(p): n for n, p in module.named_parameters()} | {id(extra): "extra"}
    everything = [*params, extra]

    set_grads(everything, set(range(7)), seed=0)
    guard_step(guard, trainer, module, opt)
    first, _ = guard._optimizer_params(opt)
    assert first == params[:4]
    set_grads(everything, set(range(7)), seed=1)
    guard_step(guard, trainer, module, opt)
    assert guard._optimizer_params(opt)[0] is first  # decided once while the groups hold the same parameters

    opt.add_param_group({"params": [*params[4:], extra]})  # a group added between steps
    set_grads(everything, set(range(7)), seed=2, bad=6)  # the new parameter's gradient is NaN
    guard_step(guard, trainer, module, opt)
    now, _ = guard._optimizer_params(opt)
    assert now is not first
    assert now == everything
    assert all(bool((p.grad == 0).all()) for p in everything)  # the bad step of the new set was dropped whole

    set_grads(everything, {0, 1, 2, 3, 6}, seed=3, bad=2)  # two gradients missing: the per-step fallback
    guard_step(guard, trainer, module, opt)
    assert all(bool((p.grad == 0).all()) for p in everything if p.grad is not None)
    set_grads(everything, set(range(7)), seed=4)
    before = [p.grad.clone() for p in everything]
    guard_step(guard, trainer, module, opt)  # a good step after them: untouched, bit for bit
    assert all(torch.equal(p.grad, b) for p, b in zip(everything, before, strict=True))
    guard._read()
    assert guard.nonfinite_steps == 2
    assert guard.skipped_steps == 2
    assert guard.first_grad_step == 3  # steps are global_step + 1
    assert guard.bad_params == ["extra", "2.weight"]


def test_the_lone_guard_sees_a_parameter_swapped_inside_a_group():
    module = net()
    params = list(module.parameters())
    opt = torch.optim.SGD(params, lr=0.1)
    trainer = fake_trainer(opt)
    guard = NonFiniteGuard(policy="skip")
    set_grads(params, set(range(6)), seed=0)
    guard_step(guard, trainer, module, opt)
    swapped = nn.Parameter(torch.zeros(1))
    opt.param_groups[0]["params"][5] = swapped  # same length, other object
    set_grads([*params[:5], swapped], set(range(6)), seed=1, bad=5)
    guard_step(guard, trainer, module, opt)
    assert guard._optimizer_params(opt)[0][5] is swapped
    assert all(bool((p.grad == 0).all()) for p in [*params[:5], swapped])


@pytest.mark.parametrize("p", [2.0, 1.0, INF])
@pytest.mark.parametrize("second", [None, 2.0, INF])
@pytest.mark.parametrize("special", [None, NAN, INF])
def test_one_stack_of_two_norms_equals_the_separate_norms(p, second, special, monkeypatch):
    monkeypatch.setattr(grad_window, "DOT_VALUES", 0)  # small tensors take the CPU dot path too
    torch.manual_seed(0)
    tensors = [torch.randn(3, 4), torch.randn(5), torch.randn(4, 3).t(), torch.randn(2, 2, dtype=torch.bfloat16)]
    if special is not None:
        tensors[2][1, 0] = special
    cases = [("fused", tensors)]  # any dtype of the fused path; the CPU dot path: float32 and L2 only
    if p == 2.0:
        cases.append(("cpu_l2", [t.float() for t in tensors]))
    for path, ts in cases:
        assert norm_path(ts, p) == path
        row = stacked_norms(ts, p, path, second)
        separate = [param_norms(ts, p, path=path)]
        if second is not None:  # the second norms by _foreach_norm (the fused path) whatever the tensors
            separate.append(param_norms(ts, second, path="fused"))
        torch.testing.assert_close(row, torch.cat(separate), rtol=0, atol=0, equal_nan=True)
        assert row.shape == (len(ts) * (1 if second is None else 2),)


def test_the_scaler_verdict_is_its_own_flag_and_the_mask_follows_it():
    weight = nn.Parameter(torch.ones(2))
    opt = torch.optim.SGD([weight], lr=0.1)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0)
    assert scaler_found_inf(scaler, opt) is None  # nothing unscaled yet
    assert scaler_skip_mask(scaler, opt) is None
    for value, skipped in ((1.0, False), (math.inf, True), (1.0, False)):
        scaler.scale((weight * value).sum()).backward()
        scaler.unscale_(opt)
        own = scaler._per_optimizer_states[id(opt)]["found_inf_per_device"]
        found = scaler_found_inf(scaler, opt)
        assert found is next(iter(own.values()))  # no kernel: the scaler's 0/1 flag itself
        assert found.item() == float(skipped)
        mask = scaler_skip_mask(scaler, opt)
        assert mask.dtype == torch.bool
        assert bool(mask) is skipped
        scaler.step(opt)
        scaler.update()
        opt.zero_grad()
