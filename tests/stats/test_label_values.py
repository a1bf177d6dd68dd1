"""The multilabel row loss: mean binary cross-entropy over each row's kept values, whatever the left-out ones hold.

On the CPU a left-out value's loss is cleared by an AND of its bits (``label_values``); elsewhere by a bool mask and
a masked fill. Both must give torch's ``binary_cross_entropy_with_logits`` over the kept values, propagate a NaN
or infinite logit of a kept value, and ignore one of a left-out value.
"""

import pytest
import torch
from torch.nn import functional as F

from lightning_lossdiag.stats import curves
from lightning_lossdiag.stats.label_values import label_values
from lightning_lossdiag.stats.row_ops import Workspace


def _reference(x: torch.Tensor, t: torch.Tensor, ignore: int) -> torch.Tensor:
    """Row by row: torch's BCE over the values whose target is in [0, 1] and not ``ignore``."""
    out = []
    for xr, tr in zip(x, t, strict=True):
        kept = (tr >= 0) & (tr <= 1) & (tr != ignore)
        out.append(F.binary_cross_entropy_with_logits(xr[kept], tr[kept]) if kept.any() else xr.new_zeros(()))
    return torch.stack(out)


def _batch(dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(3)
    x = torch.randn(6, 9, generator=g).to(dtype) * 4
    t = (torch.rand(6, 9, generator=g) < 0.4).to(dtype)
    t[0, 1], t[1, 2], t[2, 3] = float("nan"), -1.0, 7.0  # left out: NaN, the ignore index, out of range
    x[0, 1], x[1, 2], x[2, 3] = float("nan"), float("inf"), float("-inf")  # ... and non-finite logits there
    t[3, :] = -1.0  # a row with nothing kept: its loss is 0
    x[4, 0] = float("nan")  # a kept value's NaN logit: that row's loss is NaN
    return x, t


@pytest.mark.parametrize("device_path", [False, True], ids=["cpu-path", "device-path"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_row_losses_are_torch_bce_over_kept_values_only(monkeypatch, device_path, dtype):
    if device_path:
        monkeypatch.setattr(curves, "LOOKUP_DEVICES", frozenset())
    x, t = _batch(dtype)
    v = label_values(x.clone(), t.clone(), "logits", -1, Workspace(torch.device("cpu")))
    expected = _reference(x, t, -1)
    assert v.row_loss.dtype == dtype
    assert torch.isnan(v.row_loss[4])  # the kept NaN logit
    finite = torch.arange(6) != 4
    assert torch.isfinite(v.row_loss[finite]).all()  # left-out NaN/inf logits and targets leave no trace
    torch.testing.assert_close(v.row_loss[finite], expected[finite], rtol=1e-5, atol=1e-6)
    assert v.row_loss[3] == 0
