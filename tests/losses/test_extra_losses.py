"""Focal, Dice, log-cosh and quantile losses against hand-written references."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F  # noqa: N812

from lightning_lossdiag.losses import CompositeLoss, DiceLoss, FocalLoss, LogCoshLoss, LossConfigError, QuantileLoss
from lightning_lossdiag.testing import HostReadCounter

# ----------------------------------------------------------------------------------------------------------- focal


def _focal_binary_reference(x: torch.Tensor, y: torch.Tensor, gamma: float, alpha: float | None) -> torch.Tensor:
    """Lin et al. (2017), eq. 5, written out element by element."""
    total = 0.0
    for xi, yi in zip(x.flatten().tolist(), y.flatten().tolist(), strict=True):
        p = 1.0 / (1.0 + math.exp(-xi))
        p_t = p if yi == 1 else 1.0 - p
        a_t = 1.0 if alpha is None else (alpha if yi == 1 else 1.0 - alpha)
        total += -a_t * (1.0 - p_t) ** gamma * math.log(p_t)
    return torch.tensor(total / x.numel(), dtype=torch.float64)


def _focal_multiclass_reference(
    x: torch.Tensor, y: torch.Tensor, gamma: float, alpha: list[float] | None
) -> torch.Tensor:
    num, den = 0.0, 0.0
    for row, label in zip(x.tolist(), y.tolist(), strict=True):
        exps = [math.exp(v) for v in row]
        p_t = exps[label] / sum(exps)
        a_t = 1.0 if alpha is None else alpha[label]
        num += -a_t * (1.0 - p_t) ** gamma * math.log(p_t)
        den += a_t
    return torch.tensor(num / den, dtype=torch.float64)


@pytest.mark.parametrize(("gamma", "alpha"), [(2.0, None), (2.0, 0.25), (0.5, 0.8), (5.0, None)])
def test_focal_binary_matches_paper_formula(gamma: float, alpha: float | None) -> None:
    g = torch.Generator().manual_seed(1)
    x = torch.randn(20, dtype=torch.float64, generator=g) * 3
    y = torch.randint(0, 2, (20,), generator=g).double()
    got = FocalLoss(alpha=alpha, gamma=gamma)(x, y)
    torch.testing.assert_close(got, _focal_binary_reference(x, y, gamma, alpha))


@pytest.mark.parametrize(("gamma", "alpha"), [(2.0, None), (1.0, [0.2, 0.5, 1.0, 2.0]), (3.0, [1.0, 1.0, 0.1, 0.1])])
def test_focal_multiclass_matches_paper_formula(gamma: float, alpha: list[float] | None) -> None:
    g = torch.Generator().manual_seed(2)
    x = torch.randn(16, 4, dtype=torch.float64, generator=g) * 2
    y = torch.randint(0, 4, (16,), generator=g)
    got = FocalLoss(alpha=alpha, gamma=gamma, mode="multiclass")(x, y)
    torch.testing.assert_close(got, _focal_multiclass_reference(x, y, gamma, alpha))


def test_focal_gamma_zero_equals_weighted_bce_and_ce() -> None:
    g = torch.Generator().manual_seed(3)
    x, y = torch.randn(4, 5, generator=g), torch.randint(0, 2, (4, 5), generator=g).float()
    alpha = 0.3
    weight = alpha * y + (1 - alpha) * (1 - y)
    torch.testing.assert_close(
        FocalLoss(alpha=alpha, gamma=0.0)(x, y), F.binary_cross_entropy_with_logits(x, y, weight=weight)
    )
    torch.testing.assert_close(FocalLoss(gamma=0.0)(x, y), F.binary_cross_entropy_with_logits(x, y))
    logits, labels = torch.randn(10, 3, 2, 2, generator=g), torch.randint(0, 3, (10, 2, 2), generator=g)
    labels[0, 0, 0] = -100
    w = [0.5, 2.0, 1.5]
    focal = FocalLoss(alpha=w, gamma=0.0)
    expected = F.cross_entropy(logits, labels, weight=torch.tensor(w))
    torch.testing.assert_close(focal(logits, labels), expected)
    torch.testing.assert_close(
        FocalLoss(alpha=w, gamma=0.0, reduction="none")(logits, labels),
        F.cross_entropy(logits, labels, weight=torch.tensor(w), reduction="none"),
    )
    torch.testing.assert_close(
        FocalLoss(gamma=0.0, reduction="sum")(logits, labels), F.cross_entropy(logits, labels, reduction="sum")
    )


def test_focal_downweights_easy_examples() -> None:
    x, y = torch.tensor([4.0, 0.1]), torch.tensor([1.0, 1.0])
    per = FocalLoss(gamma=2.0, reduction="none")(x, y)
    bce = F.binary_cross_entropy_with_logits(x, y, reduction="none")
    assert (per / bce)[0] < (per / bce)[1]  # the confident correct example is scaled down more


def test_focal_errors() -> None:
    with pytest.raises(LossConfigError, match=r"`gamma` must be a number >= 0, got -0\.5"):
        FocalLoss(gamma=-0.5)
    with pytest.raises(LossConfigError, match=r"`alpha` must be a number in \[0, 1\], got 1\.5"):
        FocalLoss(alpha=1.5)
    with pytest.raises(LossConfigError, match="binary focal loss must be a number"):
        FocalLoss(alpha=[0.2, 0.8], mode="binary")
    with pytest.raises(LossConfigError, match="multiclass focal loss must be a list"):
        FocalLoss(alpha=0.25, mode="multiclass")
    with pytest.raises(ValueError, match=r"cannot tell binary from multiclass .* \(4, 3\) .* \(5,\)"):
        FocalLoss()(torch.randn(4, 3), torch.zeros(5, dtype=torch.long))
    with pytest.raises(ValueError, match="3 class weights, but preds have 4 classes"):
        FocalLoss(alpha=[1.0, 1.0, 1.0])(torch.randn(2, 4), torch.tensor([0, 1]))


# ------------------------------------------------------------------------------------------------------------ dice


def test_dice_binary_by_hand() -> None:
    p = torch.tensor([0.9, 0.2, 0.6, 0.1])
    t = torch.tensor([1.0, 0.0, 1.0, 0.0])
    # intersection 0.9 + 0.6 = 1.5, sum p = 1.8, sum t = 2, smooth 1
    expected = 1 - (2 * 1.5 + 1) / (1.8 + 2 + 1)
    torch.testing.assert_close(DiceLoss("binary", from_logits=False)(p, t), torch.tensor(expected))
    logits = torch.logit(p)
    torch.testing.assert_close(DiceLoss("binary")(logits, t), torch.tensor(expected))
    assert DiceLoss("binary", smooth=0.0, from_logits=False)(t, t) == 0


def test_dice_multiclass_by_hand_and_ignore_index() -> None:
    probs = torch.tensor([[0.7, 0.2, 0.1], [0.1, 0.8, 0.1], [0.3, 0.3, 0.4], [0.5, 0.1, 0.4]])
    labels = torch.tensor([0, 1, 1, 2])
    expected = []
    for c in range(3):
        inter = sum(probs[i, c].item() for i in range(4) if labels[i] == c)
        total = probs[:, c].sum().item() + sum(1 for lab in labels.tolist() if lab == c)
        expected.append(1 - (2 * inter + 0.5) / (total + 0.5))
    loss = DiceLoss("multiclass", smooth=0.5, from_logits=False, reduction="none")
    torch.testing.assert_close(loss(probs, labels), torch.tensor(expected))
    mean = DiceLoss("multiclass", smooth=0.5, from_logits=False)(probs, labels)
    torch.testing.assert_close(mean, torch.tensor(sum(expected) / 3))
    # an ignored position must count as if it were not there
    with_ignored = torch.cat([labels, torch.tensor([-1])])
    extra = torch.cat([probs, torch.tensor([[0.2, 0.2, 0.6]])])
    ignoring = DiceLoss("multiclass", smooth=0.5, from_logits=False, reduction="none", ignore_index=-1)
    torch.testing.assert_close(ignoring(extra, with_ignored), torch.tensor(expected))


def test_dice_multilabel_is_per_class_binary_dice() -> None:
    g = torch.Generator().manual_seed(4)
    logits, t = torch.randn(6, 3, 2, generator=g), torch.randint(0, 2, (6, 3, 2), generator=g).float()
    per_class = DiceLoss("multilabel", reduction="none")(logits, t)
    for c in range(3):
        torch.testing.assert_close(per_class[c], DiceLoss("binary")(logits[:, c], t[:, c]))


def test_dice_errors() -> None:
    with pytest.raises(LossConfigError, match=r"`smooth` must be a number >= 0, got -1"):
        DiceLoss("binary", smooth=-1)
    with pytest.raises(ValueError, match=r"same shape, got \(4,\) and \(4, 1\)"):
        DiceLoss("binary")(torch.zeros(4), torch.zeros(4, 1))
    with pytest.raises(ValueError, match="needs logits"):
        DiceLoss("multiclass")(torch.zeros(4, 3), torch.zeros(4, 3))


# -------------------------------------------------------------------------------------------------- log-cosh / pinball


def test_log_cosh_matches_definition_and_stays_finite() -> None:
    x = torch.linspace(-8, 8, 41, dtype=torch.float64)
    y = torch.zeros_like(x)
    torch.testing.assert_close(LogCoshLoss(reduction="none")(x, y), torch.log(torch.cosh(x)))
    torch.testing.assert_close(LogCoshLoss()(x + 1.0, y + 1.0), torch.log(torch.cosh(x)).mean())
    big = torch.tensor([-1e4, 500.0, 1e30], requires_grad=True)
    assert not torch.isfinite(torch.log(torch.cosh(big.detach()))).all()  # the naive formula overflows
    out = LogCoshLoss(reduction="none")(big, torch.zeros(3))
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out[:2], big.detach()[:2].abs() - math.log(2))
    out.sum().backward()
    assert big.grad is not None
    torch.testing.assert_close(big.grad, torch.tensor([-1.0, 1.0, 1.0]))  # d/dx log cosh x = tanh x


def _pinball(q: float, y: float, yhat: float) -> float:
    r = y - yhat
    return q * r if r >= 0 else (q - 1) * r


def test_quantile_single_and_several() -> None:
    g = torch.Generator().manual_seed(5)
    preds, target = torch.randn(7, generator=g), torch.randn(7, generator=g)
    expected = sum(_pinball(0.3, y, p) for y, p in zip(target.tolist(), preds.tolist(), strict=True)) / 7
    torch.testing.assert_close(QuantileLoss(0.3)(preds, target), torch.tensor(expected))
    torch.testing.assert_close(QuantileLoss()(preds, target), 0.5 * (preds - target).abs().mean())
    qs = [0.1, 0.5, 0.9]
    multi = torch.randn(7, 3, generator=g)
    rows = [
        [_pinball(q, y, p) for q, p in zip(qs, row, strict=True)]
        for y, row in zip(target.tolist(), multi.tolist(), strict=True)
    ]
    torch.testing.assert_close(QuantileLoss(qs, reduction="none")(multi, target), torch.tensor(rows))
    torch.testing.assert_close(QuantileLoss(qs, reduction="sum")(multi, target.unsqueeze(1)), torch.tensor(rows).sum())
    torch.testing.assert_close(QuantileLoss(qs)(multi, target), torch.tensor(rows).mean())


@pytest.mark.parametrize("bad", [0.0, 1.0, -0.2, 1.5, [0.2, 0.0], [], "0.5"], ids=repr)
def test_quantile_outside_open_interval_raises(bad: object) -> None:
    with pytest.raises(LossConfigError, match=r"`quantiles` must be a number"):
        QuantileLoss(bad)  # type: ignore[arg-type]


def test_quantile_shape_errors() -> None:
    with pytest.raises(ValueError, match=r"2 quantiles needs preds \(\.\.\., 2\)"):
        QuantileLoss([0.2, 0.8])(torch.zeros(4, 3), torch.zeros(4))
    with pytest.raises(ValueError, match="same shape"):
        QuantileLoss(0.5)(torch.zeros(4, 1), torch.zeros(4))


# ------------------------------------------------------------------------------------------------ hot path: no reads


def test_forward_passes_make_no_host_reads() -> None:
    g = torch.Generator().manual_seed(6)
    cases = [
        (FocalLoss(), torch.randn(8, 3, generator=g), torch.randint(0, 3, (8,), generator=g)),
        (FocalLoss(alpha=[1.0, 2.0, 3.0]), torch.randn(8, 3, generator=g), torch.randint(0, 3, (8,), generator=g)),
        (FocalLoss(alpha=0.25), torch.randn(8, generator=g), torch.randint(0, 2, (8,), generator=g).float()),
        (
            DiceLoss("multiclass", ignore_index=-1),
            torch.randn(8, 3, generator=g),
            torch.randint(0, 3, (8,), generator=g),
        ),
        (DiceLoss("binary"), torch.randn(8, generator=g), torch.randint(0, 2, (8,), generator=g)),
        (LogCoshLoss(), torch.randn(8, generator=g), torch.randn(8, generator=g)),
        (QuantileLoss([0.1, 0.9]), torch.randn(8, 2, generator=g), torch.randn(8, generator=g)),
    ]
    composite = CompositeLoss({"a": {"loss": "focal"}, "b": {"loss": "log_cosh"}}, weighting="uncertainty")
    with HostReadCounter() as counter:
        for loss, preds, target in cases:
            loss(preds, target)
        composite({"a": torch.randn(4), "b": torch.randn(4)}, {"a": torch.ones(4), "b": torch.zeros(4)})
        composite.term_weights()
    assert counter.total == 0
