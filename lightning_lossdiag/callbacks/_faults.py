"""Fault checks run before training starts, so a run fails in its first second rather than after an hour.

:func:`check_log_dirs_writable` is called by :class:`~lightning_lossdiag.LossDiagnostics` in ``setup``: every logger
whose log folder is a local path gets that folder created and a temporary file written in it (global rank 0 only).
A folder that cannot be written raises :class:`LogDirNotWritableError` naming the logger, the folder and the reason
the operating system gave, before the first training step instead of at the first flush or the final report.

Lightning itself creates the folder of each logger that has an ``experiment`` (TensorBoard, CSV) just before the
callbacks' ``setup``; when that fails, :func:`explain_log_dir_error` (for ``on_exception``) adds the same explanation
as a note to Lightning's bare ``OSError``.
"""

from __future__ import annotations

import os
import re
import tempfile
from collections.abc import Iterator
from typing import Any

#: logger attributes holding a local folder, most specific first: the first one a logger has is checked
_DIR_ATTRIBUTES: tuple[str, ...] = ("log_dir", "root_dir", "save_dir")
#: ``s3://bucket``, ``gs://...``, ``file:./mlruns``: remote or URI folders are left to the logger (not ``C:\\``)
_URI = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]+:")


class LogDirNotWritableError(OSError):
    """A logger's folder cannot be created or written; raised before the first training step.

    Subclasses :class:`OSError`, so code that catches file-system errors still catches it.

    Example:
        >>> err = LogDirNotWritableError("TensorBoardLogger cannot write to its log folder '/x': Permission denied")
        >>> isinstance(err, OSError), "Permission denied" in str(err)
        (True, True)
    """


def logger_dirs(logger: Any) -> Iterator[tuple[str, str]]:
    """``(attribute, folder)``: the local log folder of ``logger``, the first of ``log_dir``/``root_dir``/``save_dir``.

    Attributes that are missing, ``None``, not a path, remote (``s3://...``) or that raise on access are skipped
    (the logger reports its own problems with them).

    Example:
        >>> class FakeLogger:
        ...     log_dir = None
        ...     save_dir = "runs"
        >>> list(logger_dirs(FakeLogger()))
        [('save_dir', 'runs')]
        >>> class RemoteLogger:
        ...     log_dir = "s3://bucket/runs"
        >>> list(logger_dirs(RemoteLogger()))
        []
    """
    for attribute in _DIR_ATTRIBUTES:
        try:
            value = getattr(logger, attribute, None)
        except Exception:  # a logger property may fail for reasons of its own; the logger reports them itself
            continue
        if value is None or not isinstance(value, (str, os.PathLike)):
            continue
        folder = os.fspath(value)
        if not isinstance(folder, str) or not folder:
            continue
        if _URI.match(folder):
            return
        yield attribute, folder
        return


def probe_dir(folder: str) -> OSError | None:
    """Create ``folder`` (with its parents) and write and delete a temporary file in it; the error, if one came.

    Example:
        >>> import tempfile
        >>> with tempfile.TemporaryDirectory() as tmp:
        ...     probe_dir(os.path.join(tmp, "runs", "version_0")) is None
        True
        >>> with tempfile.NamedTemporaryFile() as afile:
        ...     type(probe_dir(os.path.join(afile.name, "logs"))).__name__
        'NotADirectoryError'
    """
    try:
        os.makedirs(folder, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=folder, prefix=".lossdiag_write_check_", delete=True) as fh:
            fh.write(b"ok")
            fh.flush()
    except OSError as err:
        return err
    return None


def _reason(err: OSError) -> str:
    words = err.strerror or str(err) or type(err).__name__
    where = f" ({err.filename})" if err.filename else ""
    return f"{type(err).__name__}: {words}{where}"


def _failures(trainer: Any) -> Iterator[tuple[int, Any, str, str, OSError]]:
    """``(index, logger, attribute, folder, error)`` for every logger folder that cannot be created and written."""
    for index, logger in enumerate(getattr(trainer, "loggers", None) or []):
        for attribute, folder in logger_dirs(logger):
            err = probe_dir(folder)
            if err is not None:
                yield index, logger, attribute, folder, err


def _explain(index: int, logger: Any, attribute: str, folder: str, err: OSError) -> str:
    name = type(logger).__name__
    return (
        f"{name} (logger {index}) cannot write to its log folder {folder!r} (`{attribute}`): {_reason(err)}. "
        f"Give the logger a folder this process can create and write (e.g. "
        f"`{name}(save_dir=...)`, or `--trainer.logger.init_args.save_dir=...` on the command line), or pass "
        "`logger=False` to train without logs."
    )


def check_log_dirs_writable(trainer: Any) -> None:
    """Fail now if a logger of ``trainer`` could not write its log folder.

    For each logger with a local ``log_dir`` (else ``root_dir``, else ``save_dir``) the folder is created and a
    temporary file is written and removed in it, on global rank 0 only (the rank that writes logs). With several
    processes rank 0's verdict is broadcast (one collective, at setup), so every rank raises together and none is
    left waiting for the others. Loggers without a local folder (remote URIs, loggers that keep nothing on disk) and
    Trainers without loggers are left alone.

    Args:
        trainer: the Trainer (anything with ``loggers`` and ``is_global_zero``).

    Raises:
        LogDirNotWritableError: naming the logger, the attribute, the folder and the operating system's reason.

    Example:
        >>> import tempfile
        >>> from types import SimpleNamespace
        >>> class Folder:
        ...     def __init__(self, path):
        ...         self.log_dir = path
        >>> with tempfile.NamedTemporaryFile() as afile:
        ...     trainer = SimpleNamespace(is_global_zero=True, loggers=[Folder(os.path.join(afile.name, "logs"))])
        ...     try:
        ...         check_log_dirs_writable(trainer)
        ...     except LogDirNotWritableError as err:
        ...         print("Folder" in str(err), "Not a directory" in str(err))
        True True
    """
    message: str | None = None
    cause: OSError | None = None
    if getattr(trainer, "is_global_zero", True):
        for failure in _failures(trainer):
            message, cause = _explain(*failure), failure[-1]
            break
    message = _from_rank_zero(trainer, message)
    if message is not None:
        raise LogDirNotWritableError(message) from cause


def _from_rank_zero(trainer: Any, message: str | None) -> str | None:
    """Rank 0's verdict on every rank (one broadcast at setup), so no rank trains on while another has stopped."""
    broadcast = getattr(getattr(trainer, "strategy", None), "broadcast", None)
    if int(getattr(trainer, "world_size", 1) or 1) > 1 and callable(broadcast):
        shared: str | None = broadcast(message, src=0)
        return shared
    return message


def explain_log_dir_error(trainer: Any, exception: BaseException) -> bool:
    """Add a note naming the logger and folder to an ``OSError`` that a logger raised (for ``on_exception``).

    Lightning creates each logger's folder (``logger.experiment``) before any callback's ``setup``, so a folder that
    cannot be created fails there with a bare ``NotADirectoryError``/``PermissionError`` from the file system. Called
    from ``on_exception``, this probes the loggers' folders and, for each one that cannot be written, adds a note
    (PEP 678, shown under the traceback) with the same explanation :func:`check_log_dirs_writable` gives. The
    exception itself is left as it is, so Lightning's clean-up still runs. Global rank 0 only.

    Args:
        trainer: the Trainer.
        exception: the exception ``on_exception`` received; anything but an ``OSError`` is ignored.

    Returns:
        True when a note was added.

    Example:
        >>> import tempfile
        >>> from types import SimpleNamespace
        >>> with tempfile.NamedTemporaryFile() as afile:
        ...     logger = SimpleNamespace(log_dir=os.path.join(afile.name, "logs"))
        ...     err = NotADirectoryError(20, "Not a directory")
        ...     explain_log_dir_error(SimpleNamespace(is_global_zero=True, loggers=[logger]), err)
        True
        >>> err.__notes__[0].startswith("lightning-lossdiag: SimpleNamespace (logger 0) cannot write")
        True
    """
    if not isinstance(exception, OSError) or isinstance(exception, LogDirNotWritableError):
        return False
    if not getattr(trainer, "is_global_zero", True):
        return False
    notes = [f"lightning-lossdiag: {_explain(*failure)}" for failure in _failures(trainer)]
    for note in notes:
        _add_note(exception, note)
    return bool(notes)


def _add_note(exception: BaseException, note: str) -> None:
    add = getattr(exception, "add_note", None)
    if add is not None:  # Python >= 3.11 prints notes under the traceback
        add(note)
    else:  # Python 3.10: kept where 3.11 keeps it (tools such as pytest and rich read it), not printed
        exception.__notes__ = [*getattr(exception, "__notes__", []), note]  # type: ignore[attr-defined]


__all__ = ["LogDirNotWritableError", "check_log_dirs_writable", "explain_log_dir_error", "logger_dirs", "probe_dir"]
