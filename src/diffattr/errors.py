"""Errors the user can act on: one clear line plus an optional hint; warnings and notices."""

from __future__ import annotations

import errno
import sys


class DiffattrError(Exception):
    """Base class for every error diffattr reports to the user.

    The message names the file, sample or option at fault; ``hint`` says what to do.
    The CLI prints ``error: <message>`` and ``hint: <hint>`` instead of a traceback.
    """

    def __init__(self, message: str, hint: str | None = None) -> None:
        super().__init__(message)
        self.hint = hint

    def __reduce__(self):
        """Pickle with the hint (errors cross process and Ray worker boundaries)."""
        return type(self), (str(self), self.hint)


class DataError(DiffattrError):
    """A dataset, image file or index file cannot be used."""


class ConfigError(DiffattrError):
    """An option or configuration value is invalid."""


class CheckpointError(DiffattrError):
    """A checkpoint is missing, corrupt or made for another architecture."""


class StoreMismatchError(DiffattrError):
    """A feature store on disk was created with other settings than requested."""


class NumericalError(DiffattrError):
    """A computation produced NaN/Inf or a singular system."""


class StorageError(DiffattrError):
    """A file or directory cannot be written: disk full, read-only, no permission."""


#: errno values that mean "no space left" (full disk or exhausted quota).
DISK_FULL = frozenset({errno.ENOSPC, errno.EDQUOT})


def storage_error(path: object, exc: OSError) -> StorageError:
    """A :class:`StorageError` naming ``path`` for an ``OSError`` raised while writing it."""
    if exc.errno in DISK_FULL:
        return StorageError(
            f"disk full while writing {path}",
            hint="free some space (or choose an output on another disk) and rerun; "
            "completed work is kept and resumes",
        )
    hint = None
    if exc.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        hint = "choose a writable output location"
    return StorageError(f"cannot write {path}: {exc.strerror or exc}", hint=hint)


def warn(message: str) -> None:
    """Print ``warning: message`` on stderr (something was done differently than asked)."""
    print(f"warning: {message}", file=sys.stderr, flush=True)


def notice(message: str) -> None:
    """Print ``note: message`` on stderr (what happened, e.g. waiting for another process)."""
    print(f"note: {message}", file=sys.stderr, flush=True)
