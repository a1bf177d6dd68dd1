"""Step outputs held back from the metrics and fed to them in one batched update (one per buffer, not per step).

Adding a step keeps references to its detached ``preds``/``target``: no kernel, no copy, no host read. Draining
concatenates the held steps along dim 0 (runs of steps whose other dims line up) so each metric sees one ``update``
instead of one per step. torchmetrics' states are sums and binned counts, so the result is that of per-step updates.
"""

from __future__ import annotations

import torch
from torch import Tensor

_Pair = tuple[Tensor, Tensor]


class StepBuffer:
    """Held ``(preds, target)`` pairs of one metric slot, full at ``max_steps`` steps or past ``max_bytes``.

    Bytes count the storages the held tensors keep alive (a view of a big output counts the whole output), each
    storage once.

    Example:
        >>> buf = StepBuffer(max_steps=3, max_bytes=1 << 20)
        >>> [buf.add(torch.zeros(2), torch.ones(2)) for _ in range(3)]
        [False, False, True]
        >>> [(tuple(p.shape), tuple(t.shape)) for p, t in buf.take()], len(buf), buf.nbytes
        ([((6,), (6,))], 0, 0)
    """

    def __init__(self, max_steps: int, max_bytes: int) -> None:
        if not isinstance(max_steps, int) or max_steps < 1:
            raise ValueError(f"`max_steps` must be a positive integer, got {max_steps!r}")
        if not isinstance(max_bytes, int) or max_bytes < 0:
            raise ValueError(f"`max_bytes` must be a non-negative integer, got {max_bytes!r}")
        self.max_steps = max_steps
        self.max_bytes = max_bytes
        self.nbytes = 0
        self._pairs: list[_Pair] = []
        self._storages: set[int] = set()

    def __len__(self) -> int:
        return len(self._pairs)

    def add(self, preds: Tensor, target: Tensor) -> bool:
        """Hold one step's tensors (references, no kernel); True when the buffer should be drained now."""
        self._pairs.append((preds, target))
        for tensor in (preds, target):
            storage = tensor.untyped_storage()  # metadata: the address and size of the memory, no host read
            if storage.data_ptr() not in self._storages:
                self._storages.add(storage.data_ptr())
                self.nbytes += storage.nbytes()
        return len(self._pairs) >= self.max_steps or self.nbytes > self.max_bytes

    def take(self) -> list[_Pair]:
        """Empty the buffer; the held steps as few concatenated pairs as their shapes allow (in step order)."""
        pairs, self._pairs, self._storages, self.nbytes = self._pairs, [], set(), 0
        return concat_runs(pairs)


def _run_key(preds: Tensor, target: Tensor) -> tuple[object, ...] | None:
    """What two steps must share to be concatenated; None when a step must stay alone (0-d, or rows disagree)."""
    if preds.ndim == 0 or target.ndim == 0 or preds.shape[0] != target.shape[0]:
        return None
    return (preds.shape[1:], target.shape[1:], preds.dtype, target.dtype, preds.device, target.device)


def concat_runs(pairs: list[_Pair]) -> list[_Pair]:
    """Concatenate consecutive pairs with the same dims after dim 0 (and dtype, device) along dim 0.

    A step whose ``preds`` and ``target`` disagree on dim 0 is kept alone, so a malformed step fails as it would on
    its own and never pairs with a neighbour's rows.

    Example:
        >>> pairs = [(torch.zeros(2, 3), torch.zeros(2)), (torch.zeros(1, 3), torch.zeros(1)),
        ...          (torch.zeros(2, 4), torch.zeros(2))]
        >>> [tuple(p.shape) for p, _ in concat_runs(pairs)]
        [(3, 3), (2, 4)]
    """
    runs: list[list[_Pair]] = []
    last: tuple[object, ...] | None = None
    for pair in pairs:
        key = _run_key(*pair)
        if runs and key is not None and key == last:
            runs[-1].append(pair)
        else:
            runs.append([pair])
        last = key
    return [
        run[0] if len(run) == 1 else (torch.cat([p for p, _ in run]), torch.cat([t for _, t in run])) for run in runs
    ]


__all__ = ["StepBuffer", "concat_runs"]
