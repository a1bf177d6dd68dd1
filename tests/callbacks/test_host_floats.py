"""``host_floats``: every part's values, in order, exactly, in one transfer whatever the number of parts."""

from __future__ import annotations

import pytest
import torch

from lightning_lossdiag.callbacks._grad_groups import host_floats
from lightning_lossdiag.testing import HostReadCounter


def _expected(parts: list[torch.Tensor]) -> list[float]:
    """What each value is as a Python float, part by part (Python ints and floats are exact here)."""
    return [float(x) for p in parts for x in p.reshape(-1).tolist()]


@pytest.mark.parametrize(
    "parts",
    [
        [torch.tensor(float(i) / 3) for i in range(50)],  # a flush of per-step losses: 0-d, one dtype
        [torch.tensor(0.5), torch.tensor([1.5, -2.0]), torch.ones(2, 2)],  # one dtype, several shapes
        [torch.tensor(2**53 + 1), torch.tensor([2**62, -7])],  # int64 counters and steps, one dtype
        [torch.tensor(1.25), torch.tensor([3, 4]), torch.tensor([True, False]), torch.tensor(2.0, dtype=torch.half)],
        [torch.tensor(float("nan")), torch.tensor(float("inf")), torch.tensor(-float("inf"))],
    ],
    ids=["scalars", "shapes", "int64", "mixed-dtypes", "non-finite"],
)
def test_values_in_order_and_exact(parts):
    got = host_floats(parts)
    want = _expected(parts)
    assert len(got) == len(want)
    for g, w in zip(got, want, strict=True):
        assert g == w or (g != g and w != w)  # NaN == NaN here


def test_one_transfer_whatever_the_number_of_parts():
    with HostReadCounter(only_package=None) as one:
        host_floats([torch.tensor(1.0)])
    with HostReadCounter(only_package=None) as many:
        host_floats([torch.tensor(float(i)) for i in range(200)])
    with HostReadCounter(only_package=None) as mixed:
        host_floats([torch.tensor(float(i)) for i in range(100)] + [torch.tensor([1, 2]), torch.tensor([True])])
    assert one.total >= 1
    assert many.total == one.total == mixed.total


def test_parts_that_need_grad_are_read_without_a_graph():
    w = torch.tensor([3.0], requires_grad=True)
    assert host_floats([w * 2, (w * w).sum()]) == [6.0, 9.0]
