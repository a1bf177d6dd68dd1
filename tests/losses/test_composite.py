"""CompositeLoss: static and uncertainty weighting, last_terms, errors, YAML specs."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F  # noqa: N812
from torch import nn

from lightning_lossdiag.losses import CompositeLoss, LossConfigError, build_loss


def _batch() -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(0)
    preds = {"ctr_logit": torch.randn(16, generator=g), "price": torch.randn(16, generator=g)}
    target = {"ctr": torch.randint(0, 2, (16,), generator=g).float(), "price": torch.randn(16, generator=g)}
    return preds, target


SPEC = {
    "name": "composite",
    "weighting": "static",
    "terms": {
        "ctr": {"loss": "bce_with_logits", "output": "ctr_logit", "weight": 0.7},
        "price": {"loss": {"name": "huber", "delta": 0.5}, "weight": 0.3},
    },
}


def test_static_weighting_is_weighted_sum_of_separate_terms() -> None:
    loss = build_loss(SPEC)
    assert isinstance(loss, CompositeLoss)
    preds, target = _batch()
    bce = F.binary_cross_entropy_with_logits(preds["ctr_logit"], target["ctr"])
    huber = F.huber_loss(preds["price"], target["price"], delta=0.5)
    torch.testing.assert_close(loss(preds, target), 0.7 * bce + 0.3 * huber)
    assert set(loss.last_terms) == {"ctr", "price"}
    torch.testing.assert_close(loss.last_terms["ctr"], bce)
    torch.testing.assert_close(loss.last_terms["price"], huber)
    weights = loss.term_weights()
    torch.testing.assert_close(weights["ctr"], torch.tensor(0.7))
    torch.testing.assert_close(weights["price"], torch.tensor(0.3))


def test_last_terms_are_detached_and_refreshed() -> None:
    loss = CompositeLoss({"a": {"loss": "mse"}})
    x = torch.ones(3, requires_grad=True)
    loss({"a": x}, {"a": torch.zeros(3)})
    assert not loss.last_terms["a"].requires_grad
    torch.testing.assert_close(loss.last_terms["a"], torch.tensor(1.0))
    loss({"a": x}, {"a": torch.full((3,), 3.0)})
    torch.testing.assert_close(loss.last_terms["a"], torch.tensor(4.0))


def test_uncertainty_weighting_formula_and_gradients() -> None:
    loss = CompositeLoss(
        {"ctr": {"loss": "bce_with_logits", "output": "ctr_logit"}, "price": {"loss": "mse"}}, weighting="uncertainty"
    )
    assert isinstance(loss.log_vars, nn.Parameter)
    with torch.no_grad():
        loss.log_vars.copy_(torch.tensor([0.5, -0.3]))
    preds, target = _batch()
    l_ctr = F.binary_cross_entropy_with_logits(preds["ctr_logit"], target["ctr"])
    l_price = F.mse_loss(preds["price"], target["price"])
    s = [0.5, -0.3]
    expected = torch.exp(torch.tensor(-s[0])) * l_ctr + s[0] + torch.exp(torch.tensor(-s[1])) * l_price + s[1]
    total = loss(preds, target)
    torch.testing.assert_close(total, expected)
    total.backward()
    assert loss.log_vars.grad is not None
    # d total / d s_i = 1 - exp(-s_i) * L_i
    expected_grad = torch.stack(
        [1 - torch.exp(torch.tensor(-si)) * li for si, li in zip(s, [l_ctr, l_price], strict=True)]
    )
    torch.testing.assert_close(loss.log_vars.grad, expected_grad)
    weights = loss.term_weights()
    torch.testing.assert_close(weights["price"], torch.exp(torch.tensor(0.3)))


def test_uncertainty_log_vars_train_as_submodule_parameters() -> None:
    class Model(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.net = nn.Linear(3, 2)
            self.criterion = build_loss(
                {"name": "composite", "weighting": "uncertainty", "terms": {"a": {"loss": "mse"}, "b": {"loss": "l1"}}}
            )

    model = Model()
    assert any(p is model.criterion.log_vars for p in model.parameters())
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    x, y = torch.randn(8, 3), torch.randn(8, 2) * 10
    before = model.criterion.log_vars.detach().clone()
    out = model.net(x)
    model.criterion({"a": out[:, 0], "b": out[:, 1]}, {"a": y[:, 0], "b": y[:, 1]}).backward()
    opt.step()
    assert not torch.equal(before, model.criterion.log_vars.detach())
    # large losses -> the log-variances grow (effective weights shrink)
    assert (model.criterion.log_vars.detach() > before).all()


def test_composite_forward_errors() -> None:
    loss = CompositeLoss({"ctr": {"loss": "bce_with_logits", "output": "ctr_logit"}})
    with pytest.raises(LossConfigError, match=r"term 'ctr' reads output 'ctr_logit', but preds has keys: 'ctr'"):
        loss({"ctr": torch.zeros(2)}, {"ctr": torch.zeros(2)})
    with pytest.raises(LossConfigError, match=r"term 'ctr' reads target 'ctr', but target has keys: 'click'"):
        loss({"ctr_logit": torch.zeros(2)}, {"click": torch.zeros(2)})
    with pytest.raises(TypeError, match=r"needs `preds` as a mapping .*got Tensor"):
        loss(torch.zeros(2), {"ctr": torch.zeros(2)})  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"term 'ctr' returned a loss of shape \(2,\)"):
        CompositeLoss({"ctr": {"loss": {"name": "mse", "reduction": "none"}}})(
            {"ctr": torch.zeros(2)}, {"ctr": torch.ones(2)}
        )


@pytest.mark.parametrize(
    ("terms", "weighting", "match"),
    [
        ({}, "static", r"`terms` must be a non-empty mapping"),
        ({"a": {"loss": "mse", "weight": -1.0}}, "static", r"term 'a': `weight` must be a number >= 0, got -1\.0"),
        ({"a": {"loss": "mse", "wieght": 1.0}}, "static", r"term 'a' has unknown key\(s\) 'wieght'; accepted keys"),
        ({"a": {"output": "x"}}, "static", r"term 'a' needs a `loss`"),
        ({"a": 3}, "static", r"term 'a' must be a mapping"),
        ({"a": {"loss": "mse", "weight": 0.7}}, "uncertainty", r"weighting='uncertainty' learns the weights"),
        ({"a": {"loss": "mse"}}, "learned", r"`weighting` must be one of 'static', 'uncertainty', got 'learned'"),
        ({"a.b": {"loss": "mse"}}, "static", r"term names must be non-empty strings without '\.'"),
        ({"a": {"loss": {"name": "huber", "delt": 1}}}, "static", r"term 'a': loss 'huber' got an unexpected argument"),
    ],
    ids=[
        "empty",
        "negative-weight",
        "unknown-key",
        "no-loss",
        "not-mapping",
        "weight-uncertainty",
        "bad-weighting",
        "dotted-name",
        "nested-bad-arg",
    ],  # fmt: skip
)
def test_composite_config_errors(terms: dict, weighting: str, match: str) -> None:
    with pytest.raises(LossConfigError, match=match):
        CompositeLoss(terms, weighting=weighting)  # type: ignore[arg-type]


def test_term_shorthand_and_module_terms() -> None:
    module = nn.L1Loss()
    loss = CompositeLoss({"a": "mse", "b": {"loss": module, "weight": 2.0}})
    assert loss.losses["b"] is module
    x, y = torch.randn(5), torch.randn(5)
    torch.testing.assert_close(loss({"a": x, "b": x}, {"a": y, "b": y}), F.mse_loss(x, y) + 2 * F.l1_loss(x, y))
