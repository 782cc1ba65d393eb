"""Exceptions raised by the engine.

Every error a user can cause is a subclass of :class:`CoTexNetError`, so the CLI and the Slicer
modules can show its message as is, without a traceback.
"""
from __future__ import annotations

import re
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


#: A line that only says where in C++ an error was thrown, as SimpleITK/ITK put before the message.
_SOURCE_LOCATION = re.compile(r"\.(?:c|cc|cxx|cpp|h|hxx|hpp|txx):\d+:?$")


#: The address ITK prints after a class name (``NrrdImageIO(0x55b08a280df0)``): noise to a user.
_ADDRESS = re.compile(r"\s*\(0x[0-9a-fA-F]+\)")


def error_summary(error: BaseException) -> str:
    """One line that says what went wrong, for messages that wrap a library's error.

    The first non-empty line that is not a bare source location, so SimpleITK's
    ``Exception thrown in ... sitkImageReaderBase.cxx:99:`` header gives way to its message on the next
    line, while multi-line messages that start with the point (torch, transformers) keep their first
    line. ITK's ``sitk::ERROR:``/``itk::ERROR:`` prefixes and object addresses are dropped; a line that
    ends in a colon gets the message's last line, where ITK's readers put the reason; an empty message
    gives the exception's type name.
    """
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    for index, line in enumerate(lines):
        if not _SOURCE_LOCATION.search(line):
            summary = line.removeprefix("sitk::ERROR:").strip().removeprefix("itk::ERROR:").strip()
            if summary.endswith(":") and index + 1 < len(lines):
                summary = f"{summary} {lines[-1]}"
            return _ADDRESS.sub("", summary) or type(error).__name__
    return type(error).__name__
