"""pos_weight: auto and weight: auto against counts computed here."""

from __future__ import annotations

from collections import Counter

import pytest
import torch
from torch import nn

from lightning_lossdiag.losses import (
    CompositeLoss,
    LossConfigError,
    build_loss,
    needs_auto_weights,
    resolve_auto_weights,
)


def test_pos_weight_auto_binary() -> None:
    y = torch.tensor([0, 0, 1, 0, 0, 1, 0, 0, 0, 0]).float()
    values = y.tolist()
    n_pos, n_neg = values.count(1.0), values.count(0.0)
    spec = {"name": "bce_with_logits", "pos_weight": "auto"}
    assert needs_auto_weights(spec)
    resolved, info = resolve_auto_weights(spec, y)
    assert not needs_auto_weights(resolved)
    assert spec["pos_weight"] == "auto"  # the input spec is not modified
    assert resolved["pos_weight"] == pytest.approx(n_neg / n_pos)
    assert info["positive_counts"] == [n_pos]
    assert info["negative_counts"] == [n_neg]
    loss = build_loss(resolved)
    assert isinstance(loss, nn.BCEWithLogitsLoss)
    torch.testing.assert_close(loss.pos_weight, torch.tensor(n_neg / n_pos))


def test_pos_weight_auto_multilabel_per_column() -> None:
    y = torch.tensor([[1, 0, 0], [0, 0, 1], [1, 1, 0], [0, 0, 0], [1, 0, 0]])
    columns = list(zip(*y.tolist(), strict=True))
    expected = [col.count(0) / col.count(1) for col in columns]
    resolved, info = resolve_auto_weights({"name": "BCEWithLogitsLoss", "pos_weight": "auto"}, y)
    assert resolved["pos_weight"] == pytest.approx(expected)
    assert info["positive_counts"] == [col.count(1) for col in columns]
    torch.testing.assert_close(build_loss(resolved).pos_weight, torch.tensor(expected))


def test_weight_auto_multiclass_inverse_frequency_with_ignore_index() -> None:
    y = torch.tensor([0, 0, 0, 0, 1, 1, 2, -100, -100, 0, 2, 2])
    counts = Counter(v for v in y.tolist() if v != -100)
    inverse = [1 / counts[c] for c in range(3)]
    expected = [v / (sum(inverse) / 3) for v in inverse]
    resolved, info = resolve_auto_weights({"name": "cross_entropy", "weight": "auto"}, y)
    assert resolved["weight"] == pytest.approx(expected)
    assert sum(resolved["weight"]) / 3 == pytest.approx(1.0)
    assert info["class_counts"] == [counts[0], counts[1], counts[2]]
    assert info["ignored"] == 2
    ce = build_loss(resolved)
    torch.testing.assert_close(ce.weight, torch.tensor(expected))


def test_weight_auto_respects_custom_ignore_index_and_num_classes() -> None:
    y = torch.tensor([0, 1, 1, -1, 2, 2, 2])
    resolved, info = resolve_auto_weights({"name": "nll", "weight": "auto", "ignore_index": -1}, y, num_classes=3)
    assert info["class_counts"] == [1, 2, 3]
    with pytest.raises(LossConfigError, match=r"cannot weight class\(es\) \[3\]: no training samples"):
        resolve_auto_weights({"name": "nll", "weight": "auto", "ignore_index": -1}, y, num_classes=4)
    with pytest.raises(LossConfigError, match=r"cannot weight class\(es\) \[1\].*class counts \[2, 0, 1\]"):
        resolve_auto_weights({"name": "ce", "weight": "auto"}, torch.tensor([0, 0, 2]))


def test_composite_resolves_each_term_against_its_target() -> None:
    spec = {
        "name": "composite",
        "terms": {
            "ctr": {"loss": {"name": "bce_with_logits", "pos_weight": "auto"}, "output": "ctr_logit", "weight": 0.7},
            "kind": {"loss": {"name": "ce", "weight": "auto"}, "target": "kind_label"},
            "price": {"loss": "mse"},
        },
    }
    assert needs_auto_weights(spec)
    targets = {"ctr": torch.tensor([1.0, 0.0, 0.0, 0.0]), "kind_label": torch.tensor([0, 1, 1, 1]), "price": None}
    resolved, info = resolve_auto_weights(spec, targets)
    assert not needs_auto_weights(resolved)
    assert resolved["terms"]["ctr"]["loss"]["pos_weight"] == pytest.approx(3.0)
    assert resolved["terms"]["kind"]["loss"]["weight"] == pytest.approx([1.5, 0.5])
    assert resolved["terms"]["ctr"]["weight"] == 0.7
    assert set(info["terms"]) == {"ctr", "kind"}
    loss = build_loss(resolved)
    assert isinstance(loss, CompositeLoss)
    torch.testing.assert_close(loss.losses["ctr"].pos_weight, torch.tensor(3.0))


def test_spec_without_auto_is_returned_as_is() -> None:
    spec = {"name": "mse"}
    assert resolve_auto_weights(spec, torch.zeros(3)) == (spec, {})
    assert resolve_auto_weights("mse", torch.zeros(3)) == ("mse", {})
    assert not needs_auto_weights(nn.MSELoss())


@pytest.mark.parametrize(
    ("spec", "targets", "match"),
    [
        ({"name": "mse", "weight": "auto"}, torch.randn(4), r"loss 'mse' is a regression loss; `weight: auto`"),
        ({"name": "huber", "pos_weight": "auto"}, torch.randn(4), r"loss 'huber' is a regression loss"),
        (
            {"name": "bce_with_logits", "pos_weight": "auto"},
            torch.tensor([0.0, 0.37, 1.0]),
            r"loss 'bce_with_logits': `pos_weight: auto` needs 0/1 targets.*e\.g\. \[0\.37",
        ),
        (
            {"name": "bce_with_logits", "pos_weight": "auto"},
            torch.tensor([[1, 0], [0, 0]]),
            r"column 1 has no positive samples",
        ),
        (
            {"name": "bce", "pos_weight": "auto"},
            torch.tensor([0, 1]),
            r"loss 'bce' takes no `pos_weight`.*bce_with_logits",
        ),
        ({"name": "focal", "weight": "auto"}, torch.tensor([0, 1]), r"loss 'focal' takes no `weight` \(accepted"),
        (
            {"name": "bce_with_logits", "weight": "auto"},
            torch.tensor([0.0, 1.0]),
            r"loss 'bce_with_logits' is a binary loss; `weight: auto` computes multiclass class weights",
        ),
        (
            {"name": "ce", "weight": "auto"},
            torch.tensor([0.0, 1.0, 2.0]),
            r"`weight: auto` needs integer class indices .*got dtype torch\.float32",
        ),
        (
            {"name": "composite", "terms": {"a": {"loss": {"name": "ce", "weight": "auto"}}}},
            torch.tensor([0, 1]),
            r"needs `targets` as a mapping",
        ),
        (
            {"name": "composite", "terms": {"a": {"loss": {"name": "ce", "weight": "auto"}}}},
            {"b": torch.tensor([0, 1])},
            r"term 'a' reads target 'a', but `targets` has keys: 'b'",
        ),
        (
            {"name": "composite", "terms": {"a": {"loss": {"name": "mse", "weight": "auto"}}}},
            {"a": torch.tensor([0.0, 1.0])},
            r"term 'a': loss 'mse' is a regression loss",
        ),
    ],
    ids=["mse-weight", "huber-pos-weight", "not-binary", "column-without-positives", "bce-pos-weight", "focal-weight",
         "bce-weight", "float-classes", "composite-tensor-targets", "composite-missing-key", "composite-regression"],
)  # fmt: skip
def test_auto_errors(spec: dict, targets: object, match: str) -> None:
    with pytest.raises(LossConfigError, match=match):
        resolve_auto_weights(spec, targets)
