"""Build a loss module from a spec: check every argument against the factory's signature, then construct it.

A typo gets a message that names it and lists what is accepted, a bad value names the argument, what is allowed and
what came, and errors raised by torch constructors come back as :class:`LossConfigError` with the loss name.
"""

from __future__ import annotations

import difflib
from collections.abc import Mapping, Sequence
from typing import Any

from torch import Tensor, nn

from lightning_lossdiag.losses._checks import REDUCTIONS, as_float_tensor, check_number, check_reduction, is_number
from lightning_lossdiag.losses._errors import LossConfigError
from lightning_lossdiag.losses._registry import (
    AUTO_ARGUMENTS,
    DEPRECATED_ARGUMENTS,
    Entry,
    LossSpec,
    get_entry,
    is_auto,
    split_spec,
)

_VALUE_RULES: dict[str, dict[str, Any]] = {
    "delta": {"low": 0.0, "low_open": True},
    "beta": {"low": 0.0},
    "label_smoothing": {"low": 0.0, "high": 1.0},
    "eps": {"low": 0.0, "low_open": True},
    "margin": {},
}
_EXTRA_REDUCTIONS = {"KLDivLoss": (*REDUCTIONS, "batchmean")}  # factory name -> accepted reductions
_TYPE_WORDS = {"float": "a number", "int": "an integer", "bool": "true or false", "str": "a string"}


def _check_type(argument: str, kind: str, value: Any) -> None:
    ok = {
        "float": is_number(value),
        "int": isinstance(value, int) and not isinstance(value, bool),
        "bool": isinstance(value, bool),
        "str": isinstance(value, str),
    }[kind]
    if not ok:
        raise LossConfigError(f"`{argument}` must be {_TYPE_WORDS[kind]}, got {type(value).__name__} {value!r}")


def _unexpected(name: str, argument: str, accepted: Sequence[str]) -> LossConfigError:
    listed = ", ".join(sorted(accepted)) or "none"
    message = f"loss {name!r} got an unexpected argument {argument!r}; accepted arguments: {listed}."
    if argument in DEPRECATED_ARGUMENTS and "reduction" in accepted:
        message += " `size_average` and `reduce` are deprecated in torch; use `reduction` ('mean', 'sum', 'none')."
    else:
        close = difflib.get_close_matches(argument, list(accepted), n=1, cutoff=0.5)
        if close:
            message += f" Did you mean {close[0]!r}?"
    return LossConfigError(message)


def prepare_arguments(name: str, entry: Entry, arguments: Mapping[str, Any]) -> dict[str, Any]:
    """Check ``arguments`` against ``entry`` and convert YAML lists to tensors where torch wants tensors."""
    accepted = entry.info.arguments
    if not entry.accepts_any:
        for argument in arguments:
            if argument not in accepted:
                raise _unexpected(name, argument, accepted)
    missing = [r for r in entry.required if r not in arguments]
    if missing:
        raise LossConfigError(
            f"loss {name!r} needs the argument(s) {', '.join(missing)}; "
            f"accepted arguments: {', '.join(sorted(accepted))}"
        )
    prepared = dict(arguments)
    try:
        for argument, value in arguments.items():
            if argument in AUTO_ARGUMENTS and is_auto(value):
                raise LossConfigError(
                    f"`{argument}: auto` is computed from the training targets and must be resolved before the loss "
                    f"is built: call `resolve_auto_weights(spec, targets)` with the training targets and build the "
                    f"spec it returns"
                )
            if argument == "reduction":
                check_reduction(value, _EXTRA_REDUCTIONS.get(getattr(entry.factory, "__name__", ""), REDUCTIONS))
            elif argument in entry.simple_types:
                _check_type(argument, entry.simple_types[argument], value)
            if argument in _VALUE_RULES and value is not None:
                check_number(argument, value, **_VALUE_RULES[argument])
            takes_number = entry.tensor_arguments.get(argument)
            convert = takes_number is not None and value is not None and not isinstance(value, Tensor)
            if convert and not (takes_number and is_number(value)):
                prepared[argument] = as_float_tensor(argument, value)
    except LossConfigError as err:
        raise LossConfigError(f"loss {name!r}: {err}") from None
    return prepared


def build_loss(spec: LossSpec) -> nn.Module:
    """Build a loss module from a name, a mapping ``{"name": ..., **arguments}``, or return an ``nn.Module`` as is.

    YAML lists become tensors for arguments torch wants as tensors (``weight``, ``pos_weight``). ``"auto"`` values
    must first go through :func:`~lightning_lossdiag.losses.resolve_auto_weights`.

    Args:
        spec: ``"huber"``, ``{"name": "focal", "gamma": 2.0}``, or a module (returned unchanged, so LightningCLI's
            ``class_path`` works).

    Returns:
        The loss module.

    Raises:
        LossConfigError: unknown name, unexpected or missing argument, bad value, unresolved ``auto``, or an error
            raised by the loss's constructor (re-raised with the loss name).

    Example:
        >>> build_loss({"name": "cross_entropy", "weight": [1, 2, 3]}).weight
        tensor([1., 2., 3.])
        >>> build_loss("mae")
        L1Loss()
    """
    if isinstance(spec, nn.Module):
        return spec
    if not isinstance(spec, (str, Mapping)):
        raise LossConfigError(
            "a loss spec must be a name (str), a mapping with a `name` key, or an nn.Module; "
            f"got {type(spec).__name__} {spec!r}"
        )
    name, arguments = split_spec(spec)
    entry = get_entry(name)
    prepared = prepare_arguments(name, entry, arguments)
    try:
        return entry.factory(**prepared)
    except LossConfigError as err:
        message = str(err)
        raise LossConfigError(
            message if message.startswith(f"loss {name!r}") else f"loss {name!r}: {message}"
        ) from None
    except (TypeError, ValueError, RuntimeError) as err:
        raise LossConfigError(f"loss {name!r} could not be built from {dict(arguments)!r}: {err}") from None


__all__ = ["build_loss", "prepare_arguments"]
