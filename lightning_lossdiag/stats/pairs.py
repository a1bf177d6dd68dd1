"""The most confused ``(true class, predicted class)`` pairs of a classifier with many classes, in bounded memory.

A dense ``C x C`` confusion matrix is too big for 1,000 to 32,000 classes, so the pairs go into a count-min sketch
(``depth`` rows of ``width`` counters, one hash per row) and each counter remembers one candidate pair, the heaviest
one seen in it. The update is fixed-shape tensor code: no host read, no boolean-mask indexing, no ``nonzero``,
``unique`` or ``bincount``. Rows that must not count (correct predictions, weight 0, a class outside
``[0, num_classes)`` such as ``ignore_index=-100``) go to an extra trash column, so no mask is needed.

Hashing: row ``d`` sends the pair ``(t, p)`` to ``((a_d * t + c_d * p + b_d) mod P) mod width`` with
``P = 2**31 - 1`` and ``0 < a_d, c_d < P``, ``0 <= b_d < P`` drawn from ``seed`` (ranks must share it, and the
configuration check of ``merge`` makes sure they do). Hashing the two classes with two coefficients, not the key
``t * num_classes + p`` reduced mod ``P``, keeps the family universal for every ``num_classes <= 2**26``: keys that
differ by ``P`` would otherwise collide in every row. Every product is below ``2**62``, so nothing overflows int64.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, NamedTuple

import torch
from torch import Tensor
from typing_extensions import Self

from lightning_lossdiag.stats._base import StreamingStat, check_positive_int, on_device
from lightning_lossdiag.stats.distributed import pack

_PRIME = 2**31 - 1
_MAX_CLASSES = 2**26  # pair keys stay below 2**52: exact in the float64 that `sync` sends


class PairsState(NamedTuple):
    """The state tensors of :class:`ConfusedPairs`, both ``(depth, width + 1)``; the last column is the trash."""

    counts: Tensor
    keys: Tensor


def _hash_coefficients(depth: int, seed: int, device: torch.device) -> Tensor:
    """``(depth, 3)`` int64 columns ``a, c, b`` of the row hashes, the same for a given seed on every rank."""
    gen = torch.Generator().manual_seed(seed)
    ac = torch.randint(1, _PRIME, (depth, 2), generator=gen, dtype=torch.int64)
    b = torch.randint(0, _PRIME, (depth, 1), generator=gen, dtype=torch.int64)
    return torch.cat([ac, b], dim=1).to(device)


def _buckets(true: Tensor, pred: Tensor, coef: Tensor, width: int) -> Tensor:
    """``(depth, N)`` bucket of every pair in every row (``true``, ``pred`` in ``[0, 2**26]``).

    ``a * t + c * p + b < 2**58``: the sum is reduced mod ``P`` once, which equals reducing each term first.
    """
    a, c, b = coef[:, 0:1], coef[:, 1:2], coef[:, 2:3]
    return torch.addcmul(b, a, true).addcmul_(c, pred).remainder_(_PRIME).remainder_(width)


def _estimates(counts: Tensor, keys: Tensor, coef: Tensor, num_classes: int) -> Tensor:
    """Count-min estimate of every key in ``keys`` (any shape, int64); 0 where the key is -1 (an empty slot)."""
    flat = keys.reshape(-1)  # an empty slot (-1) hashes to some bucket too (remainder is never negative): masked below
    true = torch.div(flat, num_classes, rounding_mode="floor")
    idx = _buckets(true, torch.sub(flat, true, alpha=num_classes), coef, counts.shape[1] - 1)
    est = counts.gather(1, idx).amin(0)
    return torch.where(keys.reshape(-1) >= 0, est, 0.0).reshape(keys.shape)


def _pairs_init(depth: int, width: int, device: torch.device) -> PairsState:
    return PairsState(
        counts=torch.zeros((depth, width + 1), dtype=torch.float64, device=device),
        keys=torch.full((depth, width + 1), -1, dtype=torch.int64, device=device),
    )


def _pairs_update(
    state: PairsState,
    true: Tensor,
    pred: Tensor,
    weight: Tensor,
    coef: Tensor,
    num_classes: int,
    *,
    checked: bool = False,
) -> PairsState:
    """Pure update: count the pairs with their weights, then let each bucket's heaviest incoming pair claim it.

    ``checked``: the caller guarantees classes in ``[0, num_classes)`` and a weight of 0 (not NaN) on every row that
    must not count (correct predictions, ignored rows), so the range and weight masks are not built again.
    """
    depth, cols = state.counts.shape
    width = cols - 1
    counted = weight > 0  # NaN and negative weights are not counted either
    if not checked:
        in_range = (true >= 0) & (true < num_classes) & (pred >= 0) & (pred < num_classes)
        counted &= in_range & (true != pred)
        true, pred = torch.where(counted, true, 0), torch.where(counted, pred, 0)
        weight = torch.where(counted, weight, 0.0)
    idx = torch.where(counted, _buckets(true, pred, coef, width), width)  # (depth, N); trash column when not counted
    counts = state.counts.scatter_add(1, idx, weight.expand(depth, -1))
    # Candidates: incoming estimate vs the bucket's best incoming estimate and the stored key's estimate (rows not
    # counted only ever meet in the trash column, and never win).
    key = torch.add(pred, true, alpha=num_classes)
    est = counts.gather(1, idx).amin(0).expand(depth, -1)
    best = torch.empty_like(counts).scatter_reduce_(1, idx, est, "amax", include_self=False)  # read where scattered
    stored = _estimates(counts, state.keys.gather(1, idx), coef, num_classes)  # only the buckets this batch touches
    wins = (est == best.gather(1, idx)) & (est >= stored) & counted
    # the heaviest winner's key claims its bucket (the largest key on a tie); losers go to the trash column, reset
    at = torch.where(wins, idx, width)
    keys = state.keys.scatter_reduce(1, at, key.expand(depth, -1), "amax", include_self=False)
    keys[:, width] = -1
    return PairsState(counts, keys)


def _pairs_reduce(stacked: Sequence[Tensor]) -> PairsState:
    """Pure merge of ``(W, depth, width + 1)`` stacks: counts add; each bucket keeps the key of its heaviest rank."""
    s = PairsState(*stacked)
    heaviest = s.counts.argmax(0, keepdim=True)
    return PairsState(s.counts.sum(0), s.keys.gather(0, heaviest).squeeze(0))


class ConfusedPairs(StreamingStat):
    """The most confused ``(true, pred)`` pairs of a many-class classifier: a count-min sketch on the device.

    Error bound (count-min): an estimate is never below the pair's true count, and it exceeds it by at most
    ``e / width * total`` with probability at least ``1 - e**-depth`` (``total``: all counted weight). Memory is
    ``depth * (width + 1) * 16`` bytes whatever the number of classes (64 KiB for the defaults). A pair is reported
    when its bucket remembers it in at least one row, which the heavy pairs do.

    ``update`` makes no host read; :meth:`top` reads the state once (epoch end). ``merge`` and ``sync`` add the
    counts and keep, per bucket, the candidate of the rank that counted the most there.

    Args:
        num_classes: number of classes, ``2 <= num_classes <= 2**26``.
        width: counters per hash row (the error shrinks like ``1 / width``).
        depth: hash rows (the failure probability shrinks like ``e**-depth``).
        device: where the state lives (default: CPU).
        seed: seed of the hash functions; every rank must use the same one.

    Example:
        >>> cp = ConfusedPairs(num_classes=10, width=64, depth=2)
        >>> cp.update(torch.tensor([3, 3, 3, 1, 2]), torch.tensor([5, 5, 3, 7, 2]))
        >>> cp.top(5)
        [(3, 5, 2.0), (1, 7, 1.0)]
        >>> float(cp.total()), cp.state_bytes()
        (3.0, 2080)
    """

    _state_names = PairsState._fields

    counts: Tensor
    keys: Tensor

    def __init__(
        self,
        num_classes: int,
        width: int = 4096,
        depth: int = 3,
        device: torch.device | str | None = None,
        seed: int = 0,
    ) -> None:
        super().__init__(device)
        if isinstance(num_classes, bool) or not isinstance(num_classes, int) or not 2 <= num_classes <= _MAX_CLASSES:
            raise ValueError(f"`num_classes` must be an integer with 2 <= num_classes <= 2**26, got {num_classes!r}")
        if isinstance(width, bool) or not isinstance(width, int) or width < 2:
            raise ValueError(f"`width` must be an integer >= 2, got {width!r}")
        if isinstance(seed, bool) or not isinstance(seed, int):
            raise ValueError(f"`seed` must be an integer, got {seed!r}")
        self.num_classes, self.width, self.depth, self.seed = (
            num_classes,
            width,
            check_positive_int("depth", depth),
            seed,
        )
        self.coef = _hash_coefficients(depth, seed, self.device)
        self.reset()

    def _config(self) -> dict[str, Any]:
        return {"num_classes": self.num_classes, "width": self.width, "depth": self.depth, "seed": self.seed}

    def _initial_state(self) -> PairsState:
        return _pairs_init(self.depth, self.width, self.device)

    def _reduce(self, stacked: Sequence[Tensor]) -> PairsState:
        return _pairs_reduce(stacked)

    def update(self, true: Tensor, pred: Tensor, weight: Tensor | None = None, *, checked: bool = False) -> None:
        """Count the confused rows of ``true`` and ``pred`` (1-d integer tensors of equal length). No host read.

        Args:
            true: true classes, ``(N,)``.
            pred: predicted classes, ``(N,)``.
            weight: optional floating ``(N,)`` row weights (default 1). Rows with ``true == pred``, a weight that is
                not > 0, or a class outside ``[0, num_classes)`` (e.g. ``ignore_index``) are not counted.
            checked: the caller guarantees int64 classes in ``[0, num_classes)`` on this device and a weight of 0 on
                every row that must not count (``ClassCounts`` does), so fewer kernels run.
        """
        if checked and weight is not None:
            self._set_state(
                _pairs_update(PairsState(*self.state), true, pred, weight, self.coef, self.num_classes, checked=True)
            )
            return
        for name, t in (("true", true), ("pred", pred)):
            if not isinstance(t, Tensor) or t.dim() != 1 or t.dtype.is_floating_point or t.dtype == torch.bool:
                got = f"{t.dtype} tensor of shape {tuple(t.shape)}" if isinstance(t, Tensor) else type(t).__name__
                raise ValueError(f"`{name}` must be a 1-d integer tensor, got {got}")
        if pred.shape != true.shape:
            raise ValueError(f"`pred` must have the shape of `true` {tuple(true.shape)}, got {tuple(pred.shape)}")
        if weight is not None and (
            not isinstance(weight, Tensor) or weight.shape != true.shape or not weight.dtype.is_floating_point
        ):
            got = f"{weight.dtype} tensor of shape {tuple(weight.shape)}" if isinstance(weight, Tensor) else weight
            raise ValueError(f"`weight` must be a floating tensor of shape {tuple(true.shape)}, got {got!r}")
        if true.shape[0] == 0:
            return
        true_d = on_device(true.detach(), self.device).long()
        pred_d = on_device(pred.detach(), self.device).long()
        if weight is None:
            w = torch.ones(true_d.shape, dtype=torch.float64, device=self.device)
        else:
            w = on_device(weight.detach(), self.device).to(torch.float64)
        self._set_state(_pairs_update(PairsState(*self.state), true_d, pred_d, w, self.coef, self.num_classes))

    def total(self) -> Tensor:
        """Counted weight, a 0-d float64 tensor on the device (no host read)."""
        return self.counts[0, : self.width].sum()

    def top(self, k: int) -> list[tuple[int, int, float]]:
        """The ``k`` pairs with the largest estimated counts, as ``(true, pred, count)``; count descending, ties by key.

        Only pairs with a count > 0 are listed. Reads the state on the host in one transfer: call it at epoch end.
        """
        check_positive_int("k", k)
        keys = self.keys[:, : self.width]
        est = _estimates(self.counts, keys, self.coef, self.num_classes)
        host = pack([keys, est]).cpu().tolist()  # epoch-end host read: one transfer for the whole sketch
        n = keys.numel()
        found = {int(key): count for key, count in zip(host[:n], host[n:], strict=True) if key >= 0 and count > 0}
        ranked = sorted(found.items(), key=lambda kc: (-kc[1], kc[0]))[:k]
        return [(key // self.num_classes, key % self.num_classes, count) for key, count in ranked]

    def to(self, device: torch.device | str | int) -> Self:
        """Move the state and the hash coefficients to ``device``, in place; returns ``self``."""
        super().to(device)
        self.coef = on_device(self.coef, self.device)
        return self


__all__ = ["ConfusedPairs", "PairsState"]
