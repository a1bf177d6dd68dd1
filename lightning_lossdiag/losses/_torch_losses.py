"""Registers every public loss class of ``torch.nn`` under its class name and a snake_case alias set.

The classes are discovered from ``torch.nn.modules.loss`` (public subclasses of ``_Loss``), so a torch release that
adds a loss gets it into the catalogue; a class this table does not know is named by converting its class name.
"""

from __future__ import annotations

import inspect
import re

from torch.nn.modules import loss as torch_loss

from lightning_lossdiag.losses._registry import register_loss

# class name -> (snake_case names, task, summary)
_KNOWN: dict[str, tuple[tuple[str, ...], str, str]] = {
    "MSELoss": (("mse",), "regression", "Mean squared error; punishes large errors quadratically."),
    "L1Loss": (("l1", "mae"), "regression", "Mean absolute error; robust to outliers, predicts the median."),
    "HuberLoss": (
        ("huber",),
        "regression",
        "Squared error below `delta`, absolute error above: MSE near 0, MAE for outliers.",
    ),
    "SmoothL1Loss": (
        ("smooth_l1",),
        "regression",
        "Huber loss divided by `beta` (squared below `beta`, linear above).",
    ),
    "CrossEntropyLoss": (
        ("cross_entropy", "ce"),
        "multiclass",
        "Softmax cross-entropy on raw logits (N, C) vs class indices or probabilities.",
    ),
    "NLLLoss": (("nll",), "multiclass", "Negative log-likelihood on log-probabilities (output of log_softmax)."),
    "NLLLoss2d": (("nll_2d",), "multiclass", "Deprecated torch alias of NLLLoss; use 'nll'."),
    "BCELoss": (("bce",), "binary", "Binary cross-entropy on probabilities (after a sigmoid)."),
    "BCEWithLogitsLoss": (
        ("bce_with_logits",),
        "binary",
        "Binary cross-entropy on raw logits; stable, supports `pos_weight` (binary or multilabel).",
    ),
    "KLDivLoss": (
        ("kl_div",),
        "other",
        "Kullback-Leibler divergence; input is log-probabilities, target a distribution.",
    ),
    "PoissonNLLLoss": (
        ("poisson_nll",),
        "regression",
        "Poisson negative log-likelihood for count targets; input is the log-rate by default.",
    ),
    "GaussianNLLLoss": (
        ("gaussian_nll",),
        "regression",
        "Gaussian negative log-likelihood with a predicted mean and variance.",
    ),
    "CTCLoss": (("ctc",), "other", "Connectionist temporal classification for unaligned sequences (speech, OCR)."),
    "MarginRankingLoss": (
        ("margin_ranking",),
        "other",
        "Pairwise ranking: x1 above x2 by `margin` when y = 1 (below when y = -1).",
    ),
    "HingeEmbeddingLoss": (("hinge_embedding",), "other", "Similar/dissimilar pairs from a distance, targets +1/-1."),
    "CosineEmbeddingLoss": (
        ("cosine_embedding",),
        "other",
        "Similar/dissimilar pairs by cosine similarity, targets +1/-1.",
    ),
    "TripletMarginLoss": (
        ("triplet_margin",),
        "other",
        "Metric learning: anchor nearer the positive than the negative by `margin`.",
    ),
    "TripletMarginWithDistanceLoss": (
        ("triplet_margin_with_distance",),
        "other",
        "Triplet loss with a custom distance function.",
    ),
    "MultiMarginLoss": (
        ("multi_margin",),
        "multiclass",
        "Multiclass hinge (SVM-style) loss on class scores vs class indices.",
    ),
    "MultiLabelMarginLoss": (
        ("multilabel_margin",),
        "multilabel",
        "Multilabel hinge loss; targets are class indices padded with -1.",
    ),
    "MultiLabelSoftMarginLoss": (
        ("multilabel_soft_margin",),
        "multilabel",
        "One-vs-all logistic loss on logits (N, C) with 0/1 targets.",
    ),
    "SoftMarginLoss": (("soft_margin",), "binary", "Two-class logistic loss on scores with targets +1/-1."),
    "LinearCrossEntropyLoss": (
        ("linear_cross_entropy",),
        "multiclass",
        "Final linear layer fused with cross-entropy (saves memory for large vocabularies).",
    ),
}


def snake_name(class_name: str) -> str:
    """A snake_case name for a torch loss class: ``"MultiLabelSoftMarginLoss"`` -> ``"multi_label_soft_margin"``.

    Example:
        >>> snake_name("BCEWithLogitsLoss")
        'bce_with_logits'
    """
    stem = class_name[:-4] if class_name.endswith("Loss") else class_name
    stem = re.sub(r"([A-Z]+)([A-Z][a-z])", r"\1_\2", stem)
    return re.sub(r"([a-z0-9])([A-Z])", r"\1_\2", stem).lower()


def torch_loss_classes() -> dict[str, type]:
    """The public loss classes of ``torch.nn.modules.loss`` (subclasses of ``_Loss``), by class name.

    Example:
        >>> "MSELoss" in torch_loss_classes()
        True
    """
    return {
        name: obj
        for name, obj in vars(torch_loss).items()
        if inspect.isclass(obj) and not name.startswith("_") and issubclass(obj, torch_loss._Loss)
    }


def _register_all() -> None:
    for class_name, cls in torch_loss_classes().items():
        names, task, summary = _KNOWN.get(class_name, ((snake_name(class_name),), "other", ""))
        register_loss(names[0], aliases=(class_name, *names[1:]), summary=summary, task=task)(cls)


_register_all()
