"""The guard's per-step pieces: the finiteness flag, dropping an update, and the deferred counters."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from lightning_lossdiag.callbacks._grad_window import param_norms
from lightning_lossdiag.callbacks._guard_ops import drop_update, int_view
from lightning_lossdiag.callbacks._guard_rows import NO_STEP, GuardRows, loss_mark, loss_probe, step_ok

NAN, INF = float("nan"), float("inf")


def gradients() -> list[torch.Tensor]:
    """Every width the bitwise drop handles, and complex128 (the fallback), and a non-contiguous gradient."""
    big_half = torch.full((4,), 60000.0, dtype=torch.float16)  # finite; its L2 norm overflows float16, not float32
    return [
        torch.randn(3, 3),
        torch.tensor([1.0, -2.0]),
        big_half,
        torch.zeros(2),
        torch.randn(2, dtype=torch.float64),
        torch.randn(3, dtype=torch.bfloat16),
        torch.randn(2, dtype=torch.complex64),
        torch.randn(2, dtype=torch.complex128),
        torch.randn(4, 3).t(),
    ]


def test_a_good_step_keeps_every_gradient_bit_for_bit():
    grads = gradients()
    before = [g.clone() for g in grads]
    for loss in (torch.tensor(3.0), torch.tensor(3e38), torch.tensor(-65000.0, dtype=torch.float16)):
        drop_update(grads, step_ok(param_norms(grads, 2.0), loss_probe([loss])))
    assert all(torch.equal(g, b) and g.dtype == b.dtype for g, b in zip(grads, before, strict=True))


@given(where=st.integers(0, 8), value=st.sampled_from([NAN, INF, -INF]), in_loss=st.booleans())
@settings(max_examples=30, deadline=None)
def test_a_bad_step_zeroes_every_gradient(where, value, in_loss):
    grads = gradients()
    loss = torch.tensor(value if in_loss else 1.0)
    if not in_loss:
        grads[where][(0,) * grads[where].ndim] = value
    drop_update(grads, step_ok(param_norms(grads, 2.0), loss_probe([loss])))
    assert all(
        bool((g == 0).all()) and not bool(torch.signbit(torch.view_as_real(g) if g.is_complex() else g).any())
        for g in grads
    )


def test_the_view_is_decided_per_parameter_set_and_only_for_one_dtype_and_device():
    assert int_view([torch.zeros(2), torch.zeros(3, 4)]) == torch.int32
    assert int_view([torch.zeros(2, dtype=torch.float16), torch.zeros(1, dtype=torch.bfloat16)]) == torch.int16
    assert int_view([torch.zeros(2, dtype=torch.float64)]) == torch.int64
    assert int_view([torch.zeros(2), torch.zeros(2, dtype=torch.float64)]) is None  # two widths
    assert int_view([torch.zeros(2), torch.zeros(2, device="meta")]) is None  # two devices
    assert int_view([torch.zeros(2, dtype=torch.complex64)]) is None
    assert int_view([]) is None


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("bad", [None, NAN, INF])
def test_a_known_view_keeps_and_drops_exactly_like_grouping_each_gradient(dtype, bad):
    def grads() -> list[torch.Tensor]:
        torch.manual_seed(0)
        out = [torch.randn(3, 3, dtype=dtype), torch.randn(4, 3, dtype=dtype).t(), torch.randn(2, dtype=dtype)]
        out.append(torch.randn(2, dtype=dtype).requires_grad_())  # a gradient of a create_graph backward
        if bad is not None:
            out[1][0, 1] = bad
        return out

    fast, grouped = grads(), grads()
    before = [g.detach().clone() for g in fast]
    for gs, view in ((fast, int_view(fast)), (grouped, None)):
        drop_update(gs, step_ok(param_norms([g.detach() for g in gs], 2.0), None), view)
    assert int_view(fast) is not None
    for f, g, b in zip(fast, grouped, before, strict=True):
        ints = int_view([f])
        assert torch.equal(f.detach().view(ints), g.detach().view(ints))  # bit for bit
        assert torch.equal(f.detach(), b) if bad is None else bool((f == 0).all()) and not bool(f.signbit().any())


def test_the_loss_is_ignored_when_only_gradients_decide():  # DDP: the losses differ between ranks
    grads = gradients()
    before = [g.clone() for g in grads]
    drop_update(grads, step_ok(param_norms(grads, 2.0), None))
    assert all(torch.equal(g, b) for g, b in zip(grads, before, strict=True))
    assert not bool(step_ok(None, loss_mark(torch.tensor([1.0, NAN]))))
    assert step_ok(None, None) is None


def test_a_single_scalar_loss_is_its_own_probe_and_several_cannot_overflow():
    loss = torch.tensor(2.0)
    assert loss_probe([loss]) is loss  # the usual step: no kernel at all
    assert loss_probe([]) is None
    big = [torch.tensor(3e38), torch.tensor(3e38)]  # finite losses whose sum overflows float32
    assert bool(torch.isfinite(loss_probe(big)))
    assert not bool(torch.isfinite(loss_probe([torch.tensor(1.0), torch.tensor(-INF)])))
    assert not bool(torch.isfinite(loss_probe([torch.tensor([1.0, NAN])])))  # a non-scalar loss
    assert bool(step_ok(torch.tensor([1.0]), loss_probe(big)))


# one step: (loss finite, index of the parameter whose gradient is NaN or None)
steps_strategy = st.lists(st.tuples(st.booleans(), st.none() | st.integers(0, 2)), min_size=1, max_size=40)


@given(
    steps=steps_strategy,
    folds=st.sets(st.integers(0, 40)),
    grads_only=st.booleans(),
    dropping=st.booleans(),
)
@settings(max_examples=60, deadline=None)
def test_folded_counters_equal_a_count_on_the_host(steps, folds, grads_only, dropping):
    rows = GuardRows(["a", "b", "c"], torch.device("cpu"))
    for i, (loss_ok, bad_param) in enumerate(steps):
        norms = torch.ones(3)
        if bad_param is not None:
            norms[bad_param] = NAN
        dtype = (torch.float32, torch.bfloat16, torch.float16, torch.float64)[i % 4]  # probes are raw losses
        big = torch.finfo(dtype).max / 2  # finite, but overflows when doubled
        losses = [torch.tensor(big if loss_ok else INF, dtype=dtype)] + [torch.tensor(big, dtype=dtype)] * (i % 3)
        rows.push(10 + i, loss_probe(losses), norms)
        if i in folds:  # folding early (the memory bound) must not change the result
            rows.fold(grads_only, dropping)
    rows.fold(grads_only, dropping)

    bad = [(p is not None) or (not grads_only and not ok) for ok, p in steps]
    first_loss = next((10 + i for i, (ok, _) in enumerate(steps) if not ok), NO_STEP)
    first_grad = next((10 + i for i, (_, p) in enumerate(steps) if p is not None), NO_STEP)
    expected = [sum(bad), sum(bad) if dropping else 0, first_loss, first_grad]
    assert rows.totals.tolist() == expected
    assert rows.bad_params.tolist() == [any(p == k for _, p in steps) for k in range(3)]
    assert rows.steps == []  # nothing kept after a fold
    assert rows.norms == []


def test_the_flag_is_written_into_a_reused_tensor_when_one_is_given():
    out = torch.empty((), dtype=torch.int32)
    first = step_ok(torch.tensor([1.0, 2.0]), torch.tensor(0.5), out)
    assert first is out
    assert int(first) == 1
    assert step_ok(torch.tensor([1.0, NAN]), torch.tensor(0.5), out) is out
    assert int(out) == 0  # the same tensor now holds the new step's flag


@pytest.mark.parametrize(
    ("norms", "probe", "bad"),
    [
        ([1.0, 2.0], 0.5, 0.0),
        ([1.0, NAN], 0.5, 1.0),
        ([1.0, INF], None, 1.0),
        ([3e38, 3e38], -INF, 1.0),
        ([3e38, 3e38], 3e38, 0.0),
        (None, NAN, 1.0),
    ],
)
def test_the_found_inf_flag_is_the_inverse_as_float32(norms, probe, bad):
    n = None if norms is None else torch.tensor(norms)
    p = None if probe is None else torch.tensor(probe)
    flag = step_ok(n, p, found_inf=True)
    assert flag.dtype == torch.float32
    assert flag.ndim == 0
    assert float(flag) == bad
    assert int(step_ok(n, p)) == 1 - bad  # the same decision as the int32 flag


def test_the_found_inf_flag_reuses_a_float32_tensor_and_never_an_int32_one():
    out = torch.empty((), dtype=torch.float32)
    assert step_ok(torch.tensor([NAN]), None, out, found_inf=True) is out
    assert float(out) == 1.0
    assert step_ok(torch.tensor([1.0]), None, out, found_inf=True) is out
    assert float(out) == 0.0
    ints = torch.empty((), dtype=torch.int32)
    other = step_ok(torch.tensor([1.0]), None, ints, found_inf=True)
    assert other is not ints
    assert other.dtype == torch.float32


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32, torch.float64])
def test_the_flag_is_exact_for_huge_finite_values(dtype):
    huge = torch.finfo(dtype).max  # a finite loss at the top of its range: nothing may overflow into a false alarm
    norms = torch.tensor([3e38, 3e38, 0.0])
    assert int(step_ok(norms, torch.tensor(huge, dtype=dtype))) == 1
    assert int(step_ok(norms, torch.tensor(-huge, dtype=dtype))) == 1
    assert int(step_ok(norms, torch.tensor(-INF, dtype=dtype))) == 0
    assert int(step_ok(torch.tensor([3e38, INF]), torch.tensor(1.0, dtype=dtype))) == 0


def test_zeros_that_do_not_fit_the_norms_are_not_used():
    assert int(step_ok(torch.tensor([1.0, NAN]), None, zeros=torch.zeros(5))) == 0
    assert int(step_ok(torch.tensor([1.0, 2.0]), None, zeros=torch.zeros(1))) == 1
