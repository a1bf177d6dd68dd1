"""Test utilities: count host reads (device-to-host synchronisations) per training step.

:class:`HostReadCounter` is a ``TorchFunctionMode`` that counts every call that makes the host wait for a tensor's
value: ``item``, ``tolist``, ``cpu``, ``numpy``, ``__bool__``, ``__float__``, ``__int__``, ``__index__``,
``nonzero``, ``to("cpu")``, boolean-mask indexing, and ``torch.tensor`` over lists of tensors. On CPU nothing
actually waits, but the count is exactly what would synchronise a CUDA stream, so the hot-path rule is testable
on any machine.

Reads are attributed to the code that asked for them: with ``only_package="lightning_lossdiag"`` (the default) a
read counts only when a frame of that package is on the stack, so Lightning's own bookkeeping is not counted.

:class:`StepReadProbe` is a callback that splits the counts by training batch.

Example:
    >>> import torch
    >>> with HostReadCounter(only_package=None) as counter:
    ...     _ = torch.ones(2).sum().item()
    >>> counter.total
    1
"""

from __future__ import annotations

import os
import sys
from collections import Counter
from collections.abc import Callable
from typing import Any

import torch
from lightning.pytorch import Callback
from torch import Tensor
from torch.overrides import TorchFunctionMode

_READ_METHODS: dict[Any, str] = {
    Tensor.item: "item",
    Tensor.tolist: "tolist",
    Tensor.cpu: "cpu",
    Tensor.numpy: "numpy",
    Tensor.__bool__: "__bool__",
    Tensor.__float__: "__float__",
    Tensor.__int__: "__int__",
    Tensor.__index__: "__index__",
    Tensor.nonzero: "nonzero",
    torch.nonzero: "nonzero",
}
_PKG_DIR = os.path.dirname(os.path.abspath(__file__))
_THIS_FILE = os.path.abspath(__file__)


def _is_cpu_target(args: tuple[Any, ...], kwargs: dict[str, Any]) -> bool:
    """``t.to("cpu")`` always counts; ``t.to(torch.device("cpu"))`` counts only for a tensor not already on the CPU.

    (Code that moves state to "the model's device" passes a ``torch.device``; on a CPU machine that device is the
    CPU and the move is not a read.)
    """
    src_on_cpu = isinstance(args[0], Tensor) and args[0].device.type == "cpu"
    for a in list(args[1:]) + [kwargs.get("device")]:
        if isinstance(a, str) and a.startswith("cpu"):
            return True
        if isinstance(a, torch.device) and a.type == "cpu" and not src_on_cpu:
            return True
    return False


def _has_bool_mask(index: Any) -> bool:
    items = index if isinstance(index, tuple) else (index,)
    return any(isinstance(i, Tensor) and i.dtype == torch.bool for i in items)


class HostReadCounter(TorchFunctionMode):
    """Count host reads while active (a context manager). See the module docstring.

    Args:
        only_package: count a read only if a frame from this package's folder is on the stack (``None``: count all).

    Attributes:
        total: number of reads counted.
        by_kind: ``Counter`` of read kinds (``"item"``, ``"cpu"``, ...).
        sites: ``Counter`` of ``"file:line"`` of the innermost package frame of each read.
    """

    def __init__(self, only_package: str | None = "lightning_lossdiag") -> None:
        super().__init__()
        self.only_package = only_package
        self.total = 0
        self.by_kind: Counter[str] = Counter()
        self.sites: Counter[str] = Counter()
        self.listeners: list[Callable[[str, str], None]] = []
        self._orig_tensor: Any = None

    def _site(self) -> str | None:
        frame = sys._getframe(2)
        while frame is not None:
            fname = os.path.abspath(frame.f_code.co_filename)
            if fname.startswith(_PKG_DIR) and fname != _THIS_FILE:
                return f"{os.path.relpath(fname, os.path.dirname(_PKG_DIR))}:{frame.f_lineno}"
            frame = frame.f_back  # type: ignore[assignment]
        return None

    def _count(self, kind: str) -> None:
        if self.only_package is None:
            site = "<any>"
        else:
            found = self._site()
            if found is None:
                return
            site = found
        self.total += 1
        self.by_kind[kind] += 1
        self.sites[site] += 1
        for listener in self.listeners:
            listener(kind, site)

    def __torch_function__(
        self, func: Any, types: Any, args: tuple[Any, ...] = (), kwargs: dict[str, Any] | None = None
    ) -> Any:
        kwargs = kwargs or {}
        kind = _READ_METHODS.get(func)
        if kind is not None:
            self._count(kind)
        elif func is Tensor.to and _is_cpu_target(args, kwargs) and isinstance(args[0], Tensor):
            self._count("to_cpu")
        elif func is Tensor.__getitem__ and len(args) > 1 and _has_bool_mask(args[1]):
            self._count("bool_mask")
        return func(*args, **kwargs)

    def __enter__(self) -> HostReadCounter:
        counter = self
        orig = torch.tensor
        self._orig_tensor = orig

        def patched_tensor(data: Any, *a: Any, **kw: Any) -> Tensor:
            if isinstance(data, (list, tuple)) and any(isinstance(x, Tensor) for x in data):
                counter._count("tensor_of_tensors")
            return orig(data, *a, **kw)

        torch.tensor = patched_tensor  # type: ignore[assignment]
        super().__enter__()
        return self

    def __exit__(self, *exc: Any) -> None:
        super().__exit__(*exc)
        torch.tensor = self._orig_tensor


class StepReadProbe(Callback):
    """Split a :class:`HostReadCounter`'s reads by training batch. Put it FIRST in ``callbacks``.

    ``reads[i]`` is the number of reads between the start of training batch ``i`` (counted over the whole fit)
    and the start of batch ``i + 1``; ``flush_batches`` are the batches after which ``global_step`` was a multiple
    of ``every_n`` (set it to the monitors' flush interval).
    """

    def __init__(self, counter: HostReadCounter) -> None:
        self.counter = counter
        self.reads: list[int] = []
        self.steps_after: list[int] = []
        self._current = -1
        counter.listeners.append(self._on_read)

    def _on_read(self, kind: str, site: str) -> None:
        if self._current >= 0:
            self.reads[self._current] += 1

    def on_train_batch_start(self, trainer: Any, pl_module: Any, batch: Any, batch_idx: int) -> None:
        """Open a new bucket for this batch."""
        self.reads.append(0)
        self.steps_after.append(-1)
        self._current = len(self.reads) - 1

    def on_train_batch_end(self, trainer: Any, pl_module: Any, outputs: Any, batch: Any, batch_idx: int) -> None:
        """Remember the global step after this batch."""
        self.steps_after[self._current] = int(trainer.global_step)

    def on_train_epoch_end(self, trainer: Any, pl_module: Any) -> None:
        """Reads at epoch end are not per-step reads: stop attributing them to the last batch."""
        self._current = -1

    def on_validation_start(self, trainer: Any, pl_module: Any) -> None:
        """Validation reads are not training-step reads."""
        self._current = -1
