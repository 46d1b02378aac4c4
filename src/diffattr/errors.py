"""Errors the user can act on: one clear line plus an optional hint."""

from __future__ import annotations


class DiffattrError(Exception):
    """Base class for every error diffattr reports to the user.

    The message names the file, sample or option at fault; ``hint`` says what to do.
    The CLI prints ``error: <message>`` and ``hint: <hint>`` instead of a traceback.
    """

    def __init__(self, message: str, hint: str | None = None) -> None:
        super().__init__(message)
        self.hint = hint


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
