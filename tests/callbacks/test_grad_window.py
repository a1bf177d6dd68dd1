"""Per-gradient norms: every path of param_norms gives what torch's own norm gives, NaN/inf and overflow included."""

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import lightning_lossdiag.callbacks._grad_window as grad_window
from lightning_lossdiag.callbacks._grad_window import cpu_l2_norms, norm_path, param_norms

SPECIAL = [math.nan, math.inf, -math.inf, 1e20, 0.0]  # 1e20: its square overflows float32


def _tensors(seed: int, specials: list[tuple[int, float]]) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    out = [
        torch.randn(64, 32, generator=g),
        torch.randn(32, generator=g) * 1e-20,  # tiny values: no underflow to a wrong zero norm
        torch.randn(16, 8, generator=g).t(),  # not contiguous
        torch.zeros(5),
        torch.randn(1, generator=g),
    ]
    for index, value in specials:
        out[index][(0,) * out[index].ndim] = value
    return out


@given(
    seed=st.integers(0, 2**16),
    specials=st.lists(
        st.tuples(st.integers(0, 3), st.sampled_from(SPECIAL)) | st.tuples(st.just(4), st.sampled_from(SPECIAL[:3])),
        max_size=3,
    ),
)
@settings(max_examples=60, deadline=None)
def test_the_cpu_dot_path_matches_torch_norms(seed, specials):
    tensors = _tensors(seed, specials)
    ours = cpu_l2_norms(tensors)
    reference = torch.stack(torch._foreach_norm(tensors, 2.0))
    # same float32 accumulation: NaN where torch has NaN, inf where torch overflows, the same values elsewhere
    assert torch.equal(torch.isnan(ours), torch.isnan(reference))
    assert torch.equal(torch.isinf(ours), torch.isinf(reference))
    finite = torch.isfinite(reference)
    assert torch.allclose(ours[finite], reference[finite], rtol=1e-5, atol=0.0)


def test_one_element_beyond_the_square_range_is_the_documented_difference():
    huge = [torch.tensor(1e20), torch.full((2,), 1e20)]
    assert cpu_l2_norms(huge).tolist() == [math.inf, math.inf]
    assert torch.stack(torch._foreach_norm(huge, 2.0)).tolist() == [pytest.approx(1e20, rel=1e-6), math.inf]


def test_the_path_is_chosen_from_the_parameters_and_every_path_agrees(monkeypatch):
    cpu32 = [torch.randn(4, 3), torch.randn(3)]
    assert norm_path(cpu32, 2.0) == "fused"  # a few small tensors: one fused call costs less than their dots
    assert norm_path([torch.randn(400, 400), torch.randn(400)], 2.0) == "cpu_l2"  # 160k values: the dots
    monkeypatch.setattr(grad_window, "DOT_VALUES", 0)
    assert norm_path(cpu32, 2.0) == "cpu_l2"
    assert norm_path(cpu32, 1.0) == "fused"
    assert norm_path([torch.randn(3, dtype=torch.bfloat16)], 2.0) == "fused"  # reduced in float32 by _foreach_norm
    assert norm_path([torch.randn(3, dtype=torch.float64)], 2.0) is None  # checked per call, own precision
    assert norm_path([], 2.0) is None
    expected = torch.stack([torch.linalg.vector_norm(t) for t in cpu32])
    for path in (None, "fused", "cpu_l2"):
        assert param_norms(cpu32, 2.0, path=path) == pytest.approx(expected.tolist(), rel=1e-6)
