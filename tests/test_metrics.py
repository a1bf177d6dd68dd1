"""DirectionalAccuracy against a numpy computation, and split invariance (states are sums)."""

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from lightning_lossdiag.metrics import DirectionalAccuracy, directional_accuracy


def _numpy_da(preds, target):
    dp = np.sign(np.diff(preds, axis=-1))
    dt = np.sign(np.diff(target, axis=-1))
    return float((dp == dt).mean())


def test_equals_numpy_on_random_sequences():
    rng = np.random.default_rng(0)
    preds = rng.normal(size=(32, 3, 10))
    target = preds + rng.normal(size=preds.shape)
    target[:, :, 4] = target[:, :, 3]  # flat steps in the truth
    metric = DirectionalAccuracy()
    metric.update(torch.from_numpy(preds[:20]), torch.from_numpy(target[:20]))
    metric.update(torch.from_numpy(preds[20:]), torch.from_numpy(target[20:]))
    assert metric.compute().item() == pytest.approx(_numpy_da(preds, target), abs=1e-6)
    assert directional_accuracy(torch.from_numpy(preds), torch.from_numpy(target)).item() == pytest.approx(
        _numpy_da(preds, target), abs=1e-6
    )


def test_hand_example_flat_steps():
    # changes: preds (+, 0, -) vs target (+, 0, +): two of three match (flat == flat counts)
    value = directional_accuracy(torch.tensor([0.0, 1.0, 1.0, 0.0]), torch.tensor([0.0, 2.0, 2.0, 3.0]))
    assert value.item() == pytest.approx(2 / 3)


@settings(max_examples=25, deadline=None)
@given(
    n=st.integers(2, 30),
    t=st.integers(2, 8),
    cuts=st.lists(st.integers(1, 29), max_size=4),
    seed=st.integers(0, 1000),
)
def test_any_split_into_batches_gives_the_full_value(n, t, cuts, seed):
    g = torch.Generator().manual_seed(seed)
    preds = torch.randint(-2, 3, (n, t), generator=g).float()  # small ints: many ties and flat steps
    target = torch.randint(-2, 3, (n, t), generator=g).float()
    bounds = sorted({0, n, *[c for c in cuts if c < n]})
    metric = DirectionalAccuracy()
    for a, b in zip(bounds[:-1], bounds[1:], strict=True):
        metric.update(preds[a:b], target[a:b])
    assert metric.compute().item() == pytest.approx(_numpy_da(preds.numpy(), target.numpy()), abs=1e-6)


def test_bad_shapes_raise():
    with pytest.raises(ValueError, match="same shape"):
        directional_accuracy(torch.zeros(3, 4), torch.zeros(3, 5))
    with pytest.raises(ValueError, match="length >= 2"):
        DirectionalAccuracy().update(torch.zeros(3, 1), torch.zeros(3, 1))
