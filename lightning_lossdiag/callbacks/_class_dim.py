"""The class dimension of dense outputs: torch's ``(N, C, d1, ...)`` or sequences ``(B, T, V)``; shapes only.

Also the validation of the callbacks' ``class_dim`` and ``ignore_index`` options.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor


def check_class_dim(class_dim: Any) -> int | None:
    """Validate a callback's ``class_dim`` option: ``None`` (tell from the shapes), ``1`` or ``-1``."""
    if class_dim is not None and (isinstance(class_dim, bool) or class_dim not in (1, -1)):
        raise ValueError(
            f"`class_dim` must be None (tell from the shapes), 1 (N, C, ...) or -1 (B, T, V), got {class_dim!r}"
        )
    return class_dim  # type: ignore[no-any-return]


def check_ignore_index(ignore_index: Any) -> int | None:
    """Validate a callback's ``ignore_index`` option: ``None`` or an integer target value."""
    if ignore_index is not None and (isinstance(ignore_index, bool) or not isinstance(ignore_index, int)):
        raise ValueError(f"`ignore_index` must be None or an integer target value, got {ignore_index!r}")
    return ignore_index  # type: ignore[no-any-return]


def likely_class_dim(preds: Tensor, target: Tensor) -> int:
    """Dim 1, or the last dim when only it fits integer targets (``(B, T, V)`` with ``(B, T)``); shapes only."""
    nd = preds.ndim
    last_fits = nd > 2 and target.ndim == nd - 1 and tuple(preds.shape[:-1]) == tuple(target.shape)
    return nd - 1 if last_fits and tuple(preds.shape[:1] + preds.shape[2:]) != tuple(target.shape) else 1


def class_dimension(preds: Tensor, target: Tensor, task: str, class_dim: int | None = None) -> int:
    """The class dimension of ``preds`` (``1`` or ``preds.ndim - 1``) for ``target``; shapes only, no host read.

    Multiclass targets are ``preds``' shape without the class dimension: torch's ``(N, C, d1, ...)`` with
    ``(N, d1, ...)`` labels (``class_dim=1``), or sequences ``(B, T, V)`` with ``(B, T)`` labels (``class_dim=-1``).
    When both fit (``(B, T, T)`` logits with ``(B, T)`` labels) the shapes cannot tell, and ``class_dim`` must be
    given. Multilabel targets have ``preds``' shape; the labels are on dim 1 unless ``class_dim`` says otherwise.

    Raises:
        ValueError: the shapes do not fit ``class_dim`` (or any class dimension), or they fit both.

    Example:
        >>> class_dimension(torch.zeros(8, 21, 4, 4), torch.zeros(8, 4, 4), "multiclass")
        1
        >>> class_dimension(torch.zeros(2, 16, 1000), torch.zeros(2, 16), "multiclass")
        2
    """
    nd = preds.ndim
    if class_dim is not None:
        if class_dim not in (1, -1, nd - 1) or nd < 2:
            raise ValueError(
                f"`class_dim` must be 1 or -1 for predictions of shape {tuple(preds.shape)}, got {class_dim}"
            )
        dim = class_dim % nd
        expected = tuple(preds.shape[:dim] + preds.shape[dim + 1 :]) if task == "multiclass" else tuple(preds.shape)
        if task == "multiclass" and tuple(target.shape) != expected:
            raise ValueError(
                f"multiclass targets must have the predictions' shape without the class dimension {class_dim}: "
                f"expected {expected}, got {tuple(target.shape)} for predictions {tuple(preds.shape)}"
            )
        return dim
    if task != "multiclass" or nd == 2:
        return 1
    fits = [
        d for d in dict.fromkeys((1, nd - 1)) if tuple(preds.shape[:d] + preds.shape[d + 1 :]) == tuple(target.shape)
    ]
    if len(fits) == 1:
        return fits[0]
    if not fits:
        raise ValueError(
            f"multiclass predictions {tuple(preds.shape)} do not fit targets {tuple(target.shape)}: the targets must "
            "be the predictions' shape without the class dimension, (N, C, d1, ...) with (N, d1, ...) or (B, T, V) "
            "with (B, T)"
        )
    raise ValueError(
        f"cannot tell the class dimension of predictions {tuple(preds.shape)} with targets {tuple(target.shape)}: "
        "both dim 1 and the last dim fit. Pass `class_dim=1` for (N, C, d1, ...) outputs or `class_dim=-1` for "
        "(B, T, V) sequences (LossDiagnostics: `errors: {class_dim: -1}` and `metrics: {class_dim: -1}`)"
    )


__all__ = ["check_class_dim", "check_ignore_index", "class_dimension", "likely_class_dim"]

_ = torch  # torch is used in doctests
