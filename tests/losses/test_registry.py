"""The registry: every registered loss builds by name and runs, aliases, YAML lists, error messages, traits."""

from __future__ import annotations

import warnings
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import torch
from torch import nn
from torch.nn.modules import loss as torch_loss

from lightning_lossdiag.losses import (
    CompositeLoss,
    DiceLoss,
    FocalLoss,
    LogCoshLoss,
    LossConfigError,
    LossTraits,
    QuantileLoss,
    _registry,
    build_loss,
    describe_loss,
    list_losses,
    register_loss,
)

N, C, D = 8, 4, 5


def _gen() -> torch.Generator:
    return torch.Generator().manual_seed(0)


def _sign(g: torch.Generator, *shape: int) -> torch.Tensor:
    return torch.randint(0, 2, shape, generator=g).float() * 2 - 1


def _ctc(g: torch.Generator) -> tuple[Any, ...]:
    t, n, c, s = 10, 2, 5, 3
    log_probs = torch.randn(t, n, c, generator=g).log_softmax(-1)
    targets = torch.randint(1, c, (n, s), generator=g)
    return log_probs, targets, torch.full((n,), t), torch.full((n,), s)


# name -> (keyword arguments, maker of the forward arguments); one entry per registered loss
SHAPES: dict[str, tuple[dict[str, Any], Callable[[torch.Generator], tuple[Any, ...]]]] = {
    "mse": ({}, lambda g: (torch.randn(N, generator=g), torch.randn(N, generator=g))),
    "l1": ({}, lambda g: (torch.randn(N, generator=g), torch.randn(N, generator=g))),
    "huber": ({"delta": 0.5}, lambda g: (torch.randn(N, generator=g), torch.randn(N, generator=g))),
    "smooth_l1": ({"beta": 0.5}, lambda g: (torch.randn(N, generator=g), torch.randn(N, generator=g))),
    "log_cosh": ({}, lambda g: (torch.randn(N, generator=g), torch.randn(N, generator=g))),
    "quantile": (
        {"quantiles": [0.1, 0.5, 0.9]},
        lambda g: (torch.randn(N, 3, generator=g), torch.randn(N, generator=g)),
    ),
    "gaussian_nll": (
        {},
        lambda g: (torch.randn(N, generator=g), torch.randn(N, generator=g), torch.rand(N, generator=g) + 0.1),
    ),
    "poisson_nll": ({}, lambda g: (torch.randn(N, generator=g), torch.poisson(torch.full((N,), 2.0), generator=g))),
    "cross_entropy": ({}, lambda g: (torch.randn(N, C, generator=g), torch.randint(0, C, (N,), generator=g))),
    "nll": ({}, lambda g: (torch.randn(N, C, generator=g).log_softmax(1), torch.randint(0, C, (N,), generator=g))),
    "nll_2d": (
        {},
        lambda g: (torch.randn(2, C, 3, 3, generator=g).log_softmax(1), torch.randint(0, C, (2, 3, 3), generator=g)),
    ),
    "multi_margin": ({}, lambda g: (torch.randn(N, C, generator=g), torch.randint(0, C, (N,), generator=g))),
    "linear_cross_entropy": (
        {"in_features": D, "num_classes": C},
        lambda g: (torch.randn(N, D, generator=g), torch.randint(0, C, (N,), generator=g)),
    ),
    "bce": ({}, lambda g: (torch.rand(N, generator=g) * 0.98 + 0.01, torch.randint(0, 2, (N,), generator=g).float())),
    "bce_with_logits": ({}, lambda g: (torch.randn(N, generator=g), torch.randint(0, 2, (N,), generator=g).float())),
    "soft_margin": ({}, lambda g: (torch.randn(N, generator=g), _sign(g, N))),
    "focal": ({}, lambda g: (torch.randn(N, generator=g), torch.randint(0, 2, (N,), generator=g).float())),
    "dice": ({"mode": "binary"}, lambda g: (torch.randn(N, generator=g), torch.randint(0, 2, (N,), generator=g))),
    "multilabel_soft_margin": (
        {},
        lambda g: (torch.randn(N, C, generator=g), torch.randint(0, 2, (N, C), generator=g).float()),
    ),
    "multilabel_margin": (
        {},
        lambda g: (torch.randn(2, C, generator=g), torch.tensor([[3, 0, -1, 1], [1, 2, 3, -1]])),
    ),
    "kl_div": (
        {"reduction": "batchmean"},
        lambda g: (torch.randn(N, C, generator=g).log_softmax(1), torch.randn(N, C, generator=g).softmax(1)),
    ),
    "ctc": ({}, _ctc),
    "margin_ranking": ({}, lambda g: (torch.randn(N, generator=g), torch.randn(N, generator=g), _sign(g, N))),
    "hinge_embedding": ({}, lambda g: (torch.rand(N, generator=g), _sign(g, N))),
    "cosine_embedding": (
        {},
        lambda g: (torch.randn(N, D, generator=g), torch.randn(N, D, generator=g), _sign(g, N)),
    ),
    "triplet_margin": ({}, lambda g: tuple(torch.randn(N, D, generator=g) for _ in range(3))),
    "triplet_margin_with_distance": ({}, lambda g: tuple(torch.randn(N, D, generator=g) for _ in range(3))),
    "composite": (
        {"terms": {"a": {"loss": "mse"}, "b": {"loss": "bce_with_logits", "weight": 0.5}}},
        lambda g: (
            {"a": torch.randn(N, generator=g), "b": torch.randn(N, generator=g)},
            {"a": torch.randn(N, generator=g), "b": torch.randint(0, 2, (N,), generator=g).float()},
        ),
    ),
}

# Losses only some torch releases have: the registry finds them when torch has them (torch 2.13 has
# LinearCrossEntropyLoss, the 2.11 of the GPU machine has not), and the table expects them only then.
_RELEASE_DEPENDENT = {"linear_cross_entropy": "LinearCrossEntropyLoss"}
SHAPES = {k: v for k, v in SHAPES.items() if k not in _RELEASE_DEPENDENT or hasattr(nn, _RELEASE_DEPENDENT[k])}

REQUIRED_NAMES = [
    "mse", "l1", "mae", "huber", "smooth_l1", "cross_entropy", "ce", "nll", "bce", "bce_with_logits", "kl_div",
    "poisson_nll", "gaussian_nll", "ctc", "margin_ranking", "hinge_embedding", "cosine_embedding", "triplet_margin",
    "triplet_margin_with_distance", "multi_margin", "multilabel_margin", "multilabel_soft_margin", "soft_margin",
    "focal", "dice", "log_cosh", "quantile", "pinball", "composite",
]  # fmt: skip


@pytest.fixture
def restore_registry() -> Iterator[None]:
    saved = (dict(_registry._ENTRIES), dict(_registry._LOOKUP), dict(_registry._DISPLAY))
    yield
    for current, old in zip((_registry._ENTRIES, _registry._LOOKUP, _registry._DISPLAY), saved, strict=True):
        current.clear()
        current.update(old)  # type: ignore[attr-defined]


def _all_names(info: Any) -> set[str]:
    return {info.name, *info.aliases}


def test_catalogue_has_required_names_and_every_torch_loss() -> None:
    infos = list_losses()
    assert len(infos) >= 25
    known = set().union(*(_all_names(i) for i in infos))
    missing = [n for n in REQUIRED_NAMES if n not in known]
    assert not missing
    torch_classes = [
        n
        for n, o in vars(torch_loss).items()
        if isinstance(o, type) and issubclass(o, torch_loss._Loss) and n[0] != "_"
    ]
    assert torch_classes  # discovery found something to check
    assert [n for n in torch_classes if n not in known] == []
    for info in infos:
        assert info.summary, info.name
        assert "\n" not in info.summary


def test_shape_table_covers_every_registered_loss() -> None:
    assert {i.name for i in list_losses()} == set(SHAPES)


@pytest.mark.parametrize("name", sorted(SHAPES), ids=sorted(SHAPES))
def test_every_loss_builds_by_name_and_runs(name: str) -> None:
    kwargs, make = SHAPES[name]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # NLLLoss2d is deprecated in torch
        warnings.simplefilter("ignore", DeprecationWarning)
        loss = build_loss({"name": name, **kwargs})
        info = next(i for i in list_losses() if i.name == name)
        by_alias = build_loss({"name": info.aliases[0].upper(), **kwargs}) if info.aliases else loss
    assert isinstance(loss, nn.Module)
    assert type(by_alias) is type(loss)
    args = make(_gen())
    leaf = args[0]["a"] if isinstance(args[0], dict) else args[0]
    leaf.requires_grad_(True)
    value = loss(*args)
    assert value.shape == ()
    assert torch.isfinite(value)
    value.backward()
    assert leaf.grad is not None
    assert torch.isfinite(leaf.grad).all()


@pytest.mark.parametrize(
    ("alias", "expected"),
    [
        ("mae", nn.L1Loss),
        ("L1Loss", nn.L1Loss),
        ("ce", nn.CrossEntropyLoss),
        ("CROSS-ENTROPY", nn.CrossEntropyLoss),
        ("CrossEntropyLoss", nn.CrossEntropyLoss),
        ("Smooth-L1", nn.SmoothL1Loss),
        ("bceWithLogitsLoss", nn.BCEWithLogitsLoss),
        ("pinball", QuantileLoss),
        ("QuantileLoss", QuantileLoss),
        ("logcosh", LogCoshLoss),
        ("FocalLoss", FocalLoss),
    ],
    ids=lambda v: v if isinstance(v, str) else v.__name__,
)
def test_aliases_resolve_to_the_same_class(alias: str, expected: type) -> None:
    assert type(build_loss(alias)) is expected


def test_module_spec_is_returned_unchanged() -> None:
    module = nn.HuberLoss(delta=0.3)
    assert build_loss(module) is module


def test_yaml_lists_become_tensors() -> None:
    ce = build_loss({"name": "cross_entropy", "weight": [1, 2, 3]})
    assert isinstance(ce.weight, torch.Tensor)
    torch.testing.assert_close(ce.weight, torch.tensor([1.0, 2.0, 3.0]))
    bce = build_loss({"name": "bce_with_logits", "pos_weight": 2.5})
    torch.testing.assert_close(bce.pos_weight, torch.tensor(2.5))
    x, y = torch.randn(6, 3), torch.randint(0, 3, (6,))
    torch.testing.assert_close(ce(x, y), nn.functional.cross_entropy(x, y, weight=torch.tensor([1.0, 2.0, 3.0])))
    focal = build_loss({"name": "focal", "alpha": [0.2, 0.3, 0.5]})
    torch.testing.assert_close(focal.class_weights, torch.tensor([0.2, 0.3, 0.5]))
    quantile = build_loss({"name": "quantile", "quantiles": [0.25, 0.75]})
    torch.testing.assert_close(quantile.quantiles, torch.tensor([0.25, 0.75]))


ERROR_CASES: list[tuple[Any, str]] = [
    ("focall", r"unknown loss 'focall'; did you mean 'focal'\? Run `lossdiag losses` for the catalogue\."),
    ("zzzzzz", r"unknown loss 'zzzzzz'\. Run `lossdiag losses`"),
    (
        {"name": "huber", "delt": 1.0},
        r"loss 'huber' got an unexpected argument 'delt'; accepted arguments: delta, reduction\. "
        r"Did you mean 'delta'\?",
    ),
    ({"name": "mse", "size_average": True}, r"unexpected argument 'size_average'.*use `reduction`"),
    ({"name": "focal", "gamma": -1.0}, r"loss 'focal': `gamma` must be a number >= 0, got -1\.0"),
    ({"name": "quantile", "quantiles": [0.5, 1.0]}, r"loss 'quantile': `quantiles` must be a number in \(0, 1\)"),
    ({"name": "quantile", "quantiles": 0}, r"`quantiles` must be a number in \(0, 1\), got 0"),
    ({"name": "huber", "delta": -1.0}, r"loss 'huber': `delta` must be a number > 0, got -1\.0"),
    ({"name": "huber", "delta": "big"}, r"loss 'huber': `delta` must be a number, got str 'big'"),
    ({"name": "mse", "reduction": "avg"}, r"loss 'mse': `reduction` must be one of 'mean', 'sum', 'none', got 'avg'"),
    ({"name": "ce", "label_smoothing": 1.5}, r"`label_smoothing` must be a number in \[0, 1\], got 1\.5"),
    ({"name": "ce", "weight": ["a", "b"]}, r"loss 'ce': `weight` must be a number, a list of numbers or a tensor"),
    ({"name": "dice"}, r"loss 'dice' needs the argument\(s\) mode"),
    ({"name": "dice", "mode": "soft"}, r"loss 'dice': `mode` must be one of 'binary', 'multiclass', 'multilabel'"),
    ({"name": "focal", "mode": "multilabel"}, r"`mode` must be one of 'binary', 'multiclass' or None"),
    ({"name": "multi_margin", "p": 3}, r"loss 'multi_margin' could not be built .*p == 1 and p == 2"),
    ({"gamma": 2.0}, r"a loss mapping needs a `name` key.*got keys: gamma"),
    ({"name": 3}, r"the `name` of a loss must be a string, got int 3"),
    (3, r"a loss spec must be a name \(str\), a mapping with a `name` key, or an nn\.Module; got int 3"),
    ({"name": "bce_with_logits", "pos_weight": "auto"}, r"`pos_weight: auto`.*call `resolve_auto_weights"),
    ({"name": "ce", "weight": "AUTO"}, r"`weight: auto`.*resolve_auto_weights\(spec, targets\)"),
    (
        {"name": "composite", "terms": {"a": {"loss": "focall"}}},
        r"loss 'composite': term 'a': unknown loss 'focall'; did you mean 'focal'",
    ),
]


@pytest.mark.parametrize(("spec", "match"), ERROR_CASES, ids=[repr(spec)[:60] for spec, _ in ERROR_CASES])
def test_config_errors_name_the_problem(spec: Any, match: str) -> None:
    with pytest.raises(LossConfigError, match=match):
        build_loss(spec)


def test_config_error_is_a_value_error_without_torch_chain() -> None:
    with pytest.raises(ValueError, match="multi_margin") as info:
        build_loss({"name": "multi_margin", "p": 5})
    assert info.value.__cause__ is None
    assert info.value.__suppress_context__


def test_register_loss_custom_and_duplicates(restore_registry: None) -> None:
    @register_loss("scaled_mse_test", aliases=("ScaledMSETest",), task="regression")
    class ScaledMSE(nn.Module):
        """MSE times a factor."""

        def __init__(self, factor: float = 2.0) -> None:
            super().__init__()
            self.factor = factor

        def forward(self, preds: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
            return self.factor * nn.functional.mse_loss(preds, target)

    info = next(i for i in list_losses() if i.name == "scaled_mse_test")
    assert info.arguments == ("factor",)
    assert info.summary == "MSE times a factor."
    assert info.task == "regression"
    loss = build_loss({"name": "scaled-mse-test", "factor": 3.0})
    assert isinstance(loss, ScaledMSE)
    assert loss.factor == 3.0
    with pytest.raises(LossConfigError, match=r"`factor` must be a number, got str 'x'"):
        build_loss({"name": "scaled_mse_test", "factor": "x"})
    with pytest.raises(LossConfigError, match=r"loss name 'MSE' is already registered \(for 'mse'\)"):
        register_loss("MSE")(ScaledMSE)
    with pytest.raises(LossConfigError, match=r"loss name 'scaledmsetest' is already registered"):
        register_loss("other_test", aliases=("scaledmsetest",))(ScaledMSE)


def test_register_factory_function(restore_registry: None) -> None:
    @register_loss("half_l1_test", summary="half the absolute error")
    def half_l1(reduction: str = "mean") -> nn.Module:
        return QuantileLoss(0.5, reduction=reduction)

    x, y = torch.randn(5), torch.randn(5)
    torch.testing.assert_close(build_loss("half_l1_test")(x, y), 0.5 * (x - y).abs().mean())
    with pytest.raises(LossConfigError, match="accepted arguments: reduction"):
        build_loss({"name": "half_l1_test", "q": 1})


@pytest.mark.parametrize(
    ("criterion", "task", "inputs"),
    [
        (nn.BCEWithLogitsLoss(), "binary", "logits"),
        (nn.BCELoss(), "binary", "probabilities"),
        (nn.CrossEntropyLoss(), "multiclass", "logits"),
        (nn.NLLLoss(), "multiclass", "log_probabilities"),
        (nn.MSELoss(), "regression", "values"),
        (nn.L1Loss(), "regression", "values"),
        (nn.HuberLoss(), "regression", "values"),
        (nn.SmoothL1Loss(), "regression", "values"),
        (LogCoshLoss(), "regression", "values"),
        (QuantileLoss([0.1, 0.9]), "regression", "values"),
        (FocalLoss(mode="binary"), "binary", "logits"),
        (FocalLoss(mode="multiclass"), "multiclass", "logits"),
        (DiceLoss("multilabel"), "multilabel", "logits"),
        (DiceLoss("multiclass", from_logits=False), "multiclass", "probabilities"),
        (nn.MultiLabelSoftMarginLoss(), "multilabel", "logits"),
        (nn.KLDivLoss(), "other", "log_probabilities"),
        (nn.TripletMarginLoss(), "other", "other"),
        (CompositeLoss({"a": {"loss": "mse"}}), "multitask", "other"),
        (nn.Linear(2, 2), "other", "other"),
    ],
    ids=lambda v: type(v).__name__ if isinstance(v, nn.Module) else v,
)
def test_describe_loss(criterion: nn.Module, task: str, inputs: str) -> None:
    assert describe_loss(criterion) == LossTraits(task, inputs)  # type: ignore[arg-type]


def test_describe_focal_infers_mode_at_forward_and_custom_traits() -> None:
    focal = FocalLoss()
    assert describe_loss(focal).task == "other"
    focal(torch.randn(4, 3), torch.tensor([0, 1, 2, 1]))
    assert describe_loss(focal) == LossTraits("multiclass", "logits")

    class Custom(nn.Module):
        lossdiag_traits = LossTraits("regression", "values")

    assert describe_loss(Custom()) == LossTraits("regression", "values")
