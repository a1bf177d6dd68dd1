"""The shared shell of the streaming statistics: state bookkeeping, merge, sync, state dicts, device moves.

A statistic declares the names of its state tensors (``_state_names``), how to build the initial state, and a pure
``_reduce`` that folds ``(W, ...)`` stacks of states into one state. ``merge`` stacks two states (``W = 2``) and
``sync`` gathers the states of all ranks (``W = world size``); both call the same ``_reduce``, so merging two objects
and syncing two ranks give the same result. Nothing here reads a tensor on the host.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, ClassVar

import torch
from torch import Tensor
from typing_extensions import Self

from lightning_lossdiag.stats.distributed import GatherFn, gather_states, stack_states


def resolve_device(device: torch.device | str | int | None) -> torch.device:
    """``None`` means the CPU; anything else goes through ``torch.device`` (``"cuda"`` gets the current index)."""
    if device is None:
        return torch.device("cpu")
    resolved = torch.device(device)
    if resolved.type == "cuda" and resolved.index is None:
        resolved = torch.device("cuda", torch.cuda.current_device())
    return resolved


def on_device(t: Tensor, device: torch.device) -> Tensor:
    """Move ``t`` only when it is elsewhere (a move to the CPU is a host read, so avoid a no-op ``.to``)."""
    return t if t.device == device else t.to(device)


def check_positive_int(name: str, value: Any) -> int:
    """Validate a positive integer argument (bools are refused)."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"`{name}` must be a positive integer, got {value!r}")
    return value


class StreamingStat:
    """Base class: subclasses set ``_state_names`` and implement ``_initial_state``, ``_reduce`` and ``_config``."""

    _state_names: ClassVar[tuple[str, ...]] = ()

    def __init__(self, device: torch.device | str | int | None = None) -> None:
        self.device = resolve_device(device)

    # -- to implement -------------------------------------------------------------------------------------------
    def _initial_state(self) -> Sequence[Tensor]:
        raise NotImplementedError

    def _reduce(self, stacked: Sequence[Tensor]) -> Sequence[Tensor]:
        raise NotImplementedError

    def _config(self) -> dict[str, Any]:
        """Plain data that two states must share to be merged (bins, k, columns, ...)."""
        return {}

    # -- state bookkeeping --------------------------------------------------------------------------------------
    @property
    def state(self) -> tuple[Tensor, ...]:
        """The state tensors, in ``_state_names`` order."""
        return tuple(getattr(self, name) for name in self._state_names)

    def _set_state(self, values: Sequence[Tensor]) -> None:
        for name, value in zip(self._state_names, values, strict=True):
            setattr(self, name, value)

    def state_bytes(self) -> int:
        """Bytes held by the state tensors (fixed at construction: independent of the number of values seen)."""
        return sum(t.numel() * t.element_size() for t in self.state)

    def reset(self) -> None:
        """Forget everything seen."""
        self._set_state(self._initial_state())

    def _check_compatible(self, other: Any, what: str) -> None:
        if type(other) is not type(self):
            raise TypeError(f"`{what}` must be a {type(self).__name__}, got {type(other).__name__}")
        if other._config() != self._config():
            raise ValueError(
                f"`{what}` must have the same configuration as this {type(self).__name__}: "
                f"expected {self._config()}, got {other._config()}"
            )

    # -- merging ------------------------------------------------------------------------------------------------
    def merge(self, other: Self) -> Self:
        """Fold ``other``'s state into this one, in place; returns ``self``. ``other`` is not changed."""
        self._check_compatible(other, "other")
        theirs = [on_device(t, self.device) for t in other.state]
        self._set_state(self._reduce(stack_states([self.state, theirs])))
        return self

    def sync(self, gather: GatherFn) -> None:
        """Replace this state by the merge of the states of all ranks (a collective: every rank must call it).

        Args:
            gather: stacks a tensor from every rank along a new dim 0, e.g. ``pl_module.all_gather``;
                ``lambda t: t.unsqueeze(0)`` in a single process. It is called once.
        """
        self._set_state(self._reduce(gather_states(self.state, gather)))

    # -- persistence and devices --------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """Configuration (plain data under ``"config"``) and clones of the state tensors."""
        out: dict[str, Any] = {"config": dict(self._config())}
        for name, t in zip(self._state_names, self.state, strict=True):
            out[name] = t.detach().clone()
        return out

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore a state saved by :meth:`state_dict`; missing entries keep their initial value.

        Raises:
            ValueError: if the saved configuration or a saved tensor's shape differs from this object's.
        """
        config = state_dict.get("config")
        if config is not None and dict(config) != self._config():
            raise ValueError(
                f"`state_dict` was saved with configuration {dict(config)}, "
                f"but this {type(self).__name__} has {self._config()}"
            )
        values = []
        for name, current in zip(self._state_names, self._initial_state(), strict=True):
            saved = state_dict.get(name)
            if saved is None:
                values.append(current)
                continue
            saved = torch.as_tensor(saved)
            if saved.shape != current.shape:
                raise ValueError(
                    f"`state_dict[{name!r}]` must have shape {tuple(current.shape)}, got {tuple(saved.shape)}"
                )
            values.append(saved.detach().to(device=self.device, dtype=current.dtype).clone())
        self._set_state(values)

    def to(self, device: torch.device | str | int) -> Self:
        """Move the state to ``device``, in place; returns ``self``."""
        self.device = resolve_device(device)
        self._set_state([on_device(t, self.device) for t in self.state])
        return self

    def __repr__(self) -> str:
        config = ", ".join(f"{k}={v!r}" for k, v in self._config().items())
        return f"{type(self).__name__}({config}, device={str(self.device)!r})"
