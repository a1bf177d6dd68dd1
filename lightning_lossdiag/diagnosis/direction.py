"""Which way a metric should move, guessed from its name: ``"min"`` (losses, errors) or ``"max"`` (scores).

Used to check ``mode`` of ``ReduceLROnPlateau``, ``EarlyStopping`` and ``ModelCheckpoint`` against the monitored
metric. A pure function of the name, so it is tested without a Trainer.
"""

from __future__ import annotations

import re
from typing import Literal

_LOWER: frozenset[str] = frozenset(
    {
        "loss", "losses", "error", "err", "errors", "mse", "mae", "rmse", "rmsle", "msle", "mape", "smape", "wape",
        "nll", "nlll", "perplexity", "ppl", "cer", "wer", "ter", "kl", "kld", "divergence", "huber", "bce", "ce",
        "brier", "ece", "mce", "regret", "fpr", "fnr", "far", "frr", "eer", "distance", "cost", "logloss", "hinge",
        "hamming", "chamfer", "fid", "lpips", "ssd", "sse", "deviance",
    }
)  # fmt: skip
_HIGHER: frozenset[str] = frozenset(
    {
        "acc", "accuracy", "f1", "fbeta", "f2", "auroc", "auc", "auprc", "roc", "precision", "prec", "recall", "r2",
        "ap", "map", "iou", "miou", "jaccard", "dice", "score", "top1", "top5", "sensitivity", "specificity", "tpr",
        "tnr", "mcc", "kappa", "psnr", "ssim", "bleu", "rouge", "meteor", "reward", "return", "ndcg", "mrr", "hit",
        "hits", "hitrate", "explained", "spearman", "pearson", "corr", "correlation", "concordance",
        "cindex", "fscore", "ari", "nmi", "silhouette", "coverage", "exact", "em",
    }
)  # fmt: skip
_CAMEL = re.compile(r"(?<=[a-z0-9])(?=[A-Z])")
_SPLIT = re.compile(r"[^a-z0-9]+")


def _tokens(name: str) -> list[str]:
    words = _SPLIT.split(_CAMEL.sub("_", name).lower())
    out: list[str] = []
    for w in words:
        if w:
            out.append(w)
            stripped = w.rstrip("0123456789")
            if stripped and stripped != w:
                out.append(stripped)  # "acc1" -> "acc", "top5" stays too
    return out


def metric_direction(name: str) -> Literal["min", "max"] | None:
    """Guess whether the metric ``name`` should fall (``"min"``) or rise (``"max"``); ``None`` when unsure.

    The name is split into words (on ``/``, ``_``, ``-``, ``.``, spaces and camelCase). A word naming a loss or an
    error (``loss``, ``error``, ``mse``, ``mae``, ``nll``, ``perplexity``, ...) wins over a score word, so
    ``val/dice_loss`` is ``"min"`` and ``val/dice`` is ``"max"``.

    Example:
        >>> [metric_direction(n) for n in ["val/loss", "val_acc", "valAccuracy", "val/dice_loss", "val/f1", "lr"]]
        ['min', 'max', 'max', 'min', 'max', None]
    """
    if not isinstance(name, str):
        raise TypeError(f"`name` must be a string, got {type(name).__name__}")
    tokens = _tokens(name)
    if any(t in _LOWER for t in tokens):
        return "min"
    if any(t in _HIGHER for t in tokens):
        return "max"
    return None


__all__ = ["metric_direction"]
