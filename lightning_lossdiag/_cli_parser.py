"""The argument parser of ``lossdiag fit|validate|test|predict``: LightningCLI's, with short errors.

jsonargparse answers a bad value with the full usage of every Trainer option (about 50 lines) and, for a value that
matches none of a Union's types, the reason each type refused it. A newcomer needs one paragraph: which key, what is
allowed, what came. The full list of options stays one ``--help`` away.
"""

from __future__ import annotations

import re
import sys
from typing import TYPE_CHECKING, NoReturn

from lightning.pytorch.cli import LightningArgumentParser

if TYPE_CHECKING:  # pragma: no cover
    from _typeshed import SupportsWrite

_KEY = re.compile(r'Parser key "([^"]+)"')
_GIVEN_TYPE = re.compile(r"Given value type: <class '([^']+)'>")
_GIVEN = re.compile(r"Given value: (.*)")
_SUBTYPES = re.compile(r"Subtypes: \[(.*)\]")
_LITERAL = re.compile(r"Expected a typing\.Literal\[(.*)\]\. Got value: (.*)")
_DONE = re.compile(r"^\s*(`[^`]+`.*; it must be .*)$", re.M)

#: what a key of ours accepts, said the way a user writes it in YAML
_ALLOWED = {
    "loss": (
        "a loss name (`loss: huber`), a mapping with `name` and its arguments (`loss: {name: focal, gamma: 2.0}`) "
        "or an nn.Module by `class_path`. Run `lossdiag losses` for the catalogue."
    ),
}


def _type_names(subtypes: str) -> str:
    """``[<class 'int'>, <class 'NoneType'>]`` -> ``int or None``."""
    names = [
        n.rpartition(".")[2] for n in re.findall(r"<class '([^']+)'>|([\w.]+\[[^\]]*\])", subtypes) for n in n if n
    ]
    names = ["None" if n == "NoneType" else n for n in names]
    return " or ".join(names) if names else subtypes


def condense_error(message: str) -> str:
    """One paragraph for a jsonargparse error about a bad value, else ``message`` unchanged.

    The innermost key is named with the keys around it, then what came and what is allowed: in our words for the
    keys of this package (``loss``), else the types the key accepts.

    Example:
        >>> lines = ['Parser key "model":', ' Parser key "loss":', " Given value type: <class 'int'>"]
        >>> condense_error(chr(10).join([*lines, " Given value: 3"])).split(";")[0]
        '`loss` (under model) got 3 (int)'
    """
    keys = _KEY.findall(message)
    done = _DONE.search(message)  # a nested parser already condensed the inner error: name the outer keys
    if done:
        text = done.group(1)
        outer = [k for k in keys if f"`{k}`" not in text]
        if outer and " (under " not in text:
            name_end = text.index("`", 1) + 1
            text = f"{text[:name_end]} (under {'.'.join(outer)}){text[name_end:]}"
        return text
    if not keys:
        return message
    key = keys[-1]
    tail = message[message.rfind(f'Parser key "{key}"') :]
    kind, given = _GIVEN_TYPE.search(tail), _GIVEN.search(tail)
    subtypes, literal = _SUBTYPES.search(tail), _LITERAL.search(tail)
    where = f" (under {'.'.join(keys[:-1])})" if len(keys) > 1 else ""
    if literal:
        return f"`{key}`{where} got {literal.group(2).strip()}; it must be one of {literal.group(1)}"
    if key in _ALLOWED:
        allowed = _ALLOWED[key]
    elif subtypes:
        allowed = _type_names(subtypes.group(1)) + ". Run `--help` for the options."
    else:
        return message
    came = f" got {given.group(1).strip()}" if given else " got a value it cannot use"
    came += f" ({kind.group(1)})" if kind else ""
    return f"`{key}`{where}{came}; it must be {allowed}"


class LossDiagParser(LightningArgumentParser):
    """``LightningArgumentParser`` whose errors fit on a screen: a one-line usage and a condensed message."""

    def print_usage(self, file: SupportsWrite[str] | None = None) -> None:
        """One line instead of every option (``--help`` lists them)."""
        prog = self.prog.replace(" [options]", "")
        (file or sys.stderr).write(f"usage: {prog} --config FILE [--<section>.<key> VALUE ...]\n")

    def error(self, message: str, ex: Exception | None = None) -> NoReturn:
        """Exit 2 with :func:`condense_error`'s message (jsonargparse prints it after the usage)."""
        super().error(condense_error(message), ex)


__all__ = ["LossDiagParser", "condense_error"]
