"""Exceptions raised by the engine.

Every error a user can cause is a subclass of :class:`CoTexNetError`, so the CLI and the Slicer
modules can show its message as is, without a traceback.
"""
from __future__ import annotations

from pathlib import Path


class CoTexNetError(Exception):
    """Base class of every error the engine raises on purpose."""


class ConfigError(CoTexNetError, ValueError):
    """A configuration field holds a value it cannot take."""


class BundleError(CoTexNetError):
    """A model bundle (directory) is missing, incomplete, corrupt or of an unknown format."""


class DataError(CoTexNetError):
    """An input image, mask or dataset cannot be used; the message names the file."""

    def __init__(self, message: str, path: str | Path | None = None):
        self.path = Path(path) if path is not None else None
        super().__init__(f"{path}: {message}" if path is not None else message)


class Cancelled(CoTexNetError):
    """Work stopped because the caller asked to cancel it."""
