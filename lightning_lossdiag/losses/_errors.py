"""The one exception type of the loss package."""

from __future__ import annotations


class LossConfigError(ValueError):
    """A loss specification that cannot be built: unknown name, bad argument, bad value or ``auto`` left unresolved.

    Subclasses :class:`ValueError`, so LightningCLI and callers that catch ``ValueError`` still see it. The message is
    one paragraph that names the bad thing and how to fix it.

    Example:
        >>> issubclass(LossConfigError, ValueError)
        True
    """


__all__ = ["LossConfigError"]
