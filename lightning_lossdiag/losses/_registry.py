"""The loss registry: name -> factory, with the accepted arguments of each factory read from its signature.

Names are case-insensitive and hyphens equal underscores (``"Smooth-L1"`` is ``"smooth_l1"``). Every argument of a
spec is checked against the factory's signature before anything is built, so a typo gets a message that names it
and lists what is accepted instead of a bare ``TypeError`` from torch.
"""

from __future__ import annotations

import difflib
import inspect
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, TypeAlias, TypeVar

from torch import nn

from lightning_lossdiag.losses._errors import LossConfigError

LossSpec: TypeAlias = str | Mapping[str, Any] | nn.Module
"""A loss as users write it: a name, a mapping ``{"name": ..., **arguments}``, or a ready ``nn.Module``."""

AUTO_ARGUMENTS: tuple[str, ...] = ("pos_weight", "weight")
DEPRECATED_ARGUMENTS = ("size_average", "reduce")
CATALOGUE_HINT = "Run `lossdiag losses` for the catalogue."

F = TypeVar("F", bound=Callable[..., Any])


@dataclass(frozen=True)
class LossInfo:
    """One entry of the catalogue, as :func:`list_losses` returns it.

    Attributes:
        name: the canonical name used in YAML (``"huber"``).
        aliases: other accepted names (the torch class name, short forms such as ``"mae"``).
        summary: what the loss is for, one line.
        arguments: keyword arguments the loss accepts (from the factory's signature).
        task: the problem it is meant for (``regression``, ``binary``, ``multiclass``, ``multilabel``,
            ``multitask``, ``classification`` when its ``mode`` decides, ``other``).
    """

    name: str
    aliases: tuple[str, ...]
    summary: str
    arguments: tuple[str, ...]
    task: str


@dataclass(frozen=True)
class Entry:
    """A registered factory with what :func:`build_loss` needs to check its arguments."""

    info: LossInfo
    factory: Callable[..., nn.Module]
    accepts_any: bool
    required: tuple[str, ...]
    tensor_arguments: Mapping[str, bool]  # argument -> whether the factory also takes a plain number
    simple_types: Mapping[str, str]


_ENTRIES: dict[str, Entry] = {}  # canonical name -> entry
_LOOKUP: dict[str, str] = {}  # normalised name or alias -> canonical name
_DISPLAY: dict[str, str] = {}  # normalised name or alias -> spelling as registered

_SIMPLE = {"float": "float", "int": "int", "bool": "bool", "str": "str"}


def normalise_name(name: str) -> str:
    """The lookup key of a loss name: stripped, lower case, hyphens as underscores.

    Example:
        >>> normalise_name(" Smooth-L1 ")
        'smooth_l1'
    """
    return name.strip().lower().replace("-", "_")


def _annotation_text(annotation: Any) -> str:
    if isinstance(annotation, str):
        return annotation
    if isinstance(annotation, type):
        return annotation.__name__
    return str(annotation)


def _inspect_factory(
    factory: Callable[..., Any],
) -> tuple[tuple[str, ...], bool, tuple[str, ...], dict[str, bool], dict[str, str]]:
    try:
        if inspect.isclass(factory):  # the constructor's own signature (a wrapped __new__ would hide it)
            parameters = list(inspect.signature(factory.__init__).parameters.values())[1:]
        else:
            parameters = list(inspect.signature(factory).parameters.values())
    except (TypeError, ValueError):  # builtins without a signature accept anything we cannot check
        return (), True, (), {}, {}
    names: list[str] = []
    required: list[str] = []
    tensors: dict[str, bool] = {}
    simple: dict[str, str] = {}
    accepts_any = False
    for p in parameters:
        if p.kind is inspect.Parameter.VAR_KEYWORD:
            accepts_any = True
            continue
        if p.kind is inspect.Parameter.VAR_POSITIONAL or p.name in (*DEPRECATED_ARGUMENTS, "self"):
            continue
        names.append(p.name)
        if p.default is inspect.Parameter.empty:
            required.append(p.name)
        text = _annotation_text(p.annotation)
        if "Tensor" in text:
            tensors[p.name] = "float" in text
        if text in _SIMPLE:
            simple[p.name] = text
    return tuple(names), accepts_any, tuple(required), tensors, simple


def register_loss(
    name: str, *, aliases: Sequence[str] = (), summary: str = "", task: str = "other"
) -> Callable[[F], F]:
    """Register a loss class or factory under ``name`` (and ``aliases``) so :func:`build_loss` can build it.

    Args:
        name: the canonical name used in YAML.
        aliases: other names; matching is case-insensitive and hyphens equal underscores.
        summary: one line saying what the loss is for (default: the first line of the docstring).
        task: the problem it is meant for (see :class:`LossInfo`).

    Raises:
        LossConfigError: when a name or alias is already taken.

    Example::

        @register_loss("scaled_mse", summary="MSE times a constant factor", task="regression")
        class ScaledMSE(nn.MSELoss):
            def __init__(self, factor: float = 2.0) -> None:
                super().__init__()
                self.factor = factor

        build_loss({"name": "scaled_mse", "factor": 3.0})
    """
    if not isinstance(name, str) or not name.strip():
        raise LossConfigError(f"`name` of a registered loss must be a non-empty string, got {name!r}")
    if isinstance(aliases, str):
        raise LossConfigError(f"`aliases` must be a sequence of names, not the string {aliases!r}")
    keys = [name, *aliases]
    seen: set[str] = set()
    for key in keys:
        norm = normalise_name(key)
        if norm in _LOOKUP or norm in seen:
            owner = _LOOKUP.get(norm, name)
            raise LossConfigError(f"loss name {key!r} is already registered (for {owner!r}); choose another name")
        seen.add(norm)

    def decorator(factory: F) -> F:
        arguments, accepts_any, required, tensors, simple = _inspect_factory(factory)
        doc_line = (inspect.getdoc(factory) or "").strip().splitlines()
        info = LossInfo(
            name=name,
            aliases=tuple(aliases),
            summary=summary or (doc_line[0] if doc_line else ""),
            arguments=arguments,
            task=task,
        )
        _ENTRIES[name] = Entry(info, factory, accepts_any, required, tensors, simple)
        for key in keys:
            _LOOKUP[normalise_name(key)] = name
            _DISPLAY[normalise_name(key)] = key
        return factory

    return decorator


def list_losses() -> list[LossInfo]:
    """Every registered loss, sorted by name.

    Example:
        >>> "huber" in [info.name for info in list_losses()]
        True
    """
    return [_ENTRIES[name].info for name in sorted(_ENTRIES)]


def get_entry(name: str) -> Entry:
    """The registry entry of ``name`` (any alias); raise :class:`LossConfigError` with suggestions when unknown."""
    if not isinstance(name, str):
        raise LossConfigError(f"a loss name must be a string, got {type(name).__name__} {name!r}")
    canonical = _LOOKUP.get(normalise_name(name))
    if canonical is not None:
        return _ENTRIES[canonical]
    close = difflib.get_close_matches(normalise_name(name), list(_LOOKUP), n=3, cutoff=0.6)
    best: dict[str, str] = {}  # canonical -> best-matching spelling, one suggestion per loss
    for key in close:
        best.setdefault(_LOOKUP[key], _DISPLAY[key])
    suggestions = list(best.values())
    hint = f"; did you mean {' or '.join(map(repr, suggestions))}?" if suggestions else "."
    raise LossConfigError(f"unknown loss {name!r}{hint} {CATALOGUE_HINT}")


def is_auto(value: Any) -> bool:
    """Whether ``value`` is the placeholder ``"auto"`` (any case).

    Example:
        >>> is_auto("AUTO"), is_auto([1.0])
        (True, False)
    """
    return isinstance(value, str) and value.strip().lower() == "auto"


def split_spec(spec: Mapping[str, Any] | str) -> tuple[str, dict[str, Any]]:
    """Split a name or mapping spec into ``(name, arguments)``; raise when the mapping has no string ``name``.

    Example:
        >>> split_spec({"name": "huber", "delta": 0.5})
        ('huber', {'delta': 0.5})
    """
    if isinstance(spec, str):
        return spec, {}
    if "name" not in spec:
        keys = ", ".join(map(str, spec)) or "none"
        raise LossConfigError(
            f"a loss mapping needs a `name` key, e.g. {{'name': 'focal', 'gamma': 2.0}}; got keys: {keys}. "
            f"{CATALOGUE_HINT}"
        )
    name = spec["name"]
    if not isinstance(name, str):
        raise LossConfigError(f"the `name` of a loss must be a string, got {type(name).__name__} {name!r}")
    arguments = {k: v for k, v in spec.items() if k != "name"}
    bad_keys = [k for k in arguments if not isinstance(k, str)]
    if bad_keys:
        raise LossConfigError(f"loss {name!r}: argument names must be strings, got {bad_keys!r}")
    return name, arguments


__all__ = [
    "AUTO_ARGUMENTS",
    "DEPRECATED_ARGUMENTS",
    "CATALOGUE_HINT",
    "Entry",
    "LossConfigError",
    "LossInfo",
    "LossSpec",
    "get_entry",
    "is_auto",
    "list_losses",
    "normalise_name",
    "register_loss",
    "split_spec",
]
