"""Writes that never leave half a file: text, JSON, files written by a library, and whole folders.

Everything goes to a temporary name in the destination's own folder (so the final rename stays on one
file system and is atomic) and is renamed into place only once complete; a crash or an exception leaves
the previous file or folder as it was. Every writer of the engine goes through this module.
"""
from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any


def write_text_atomic(path: str | os.PathLike, text: str) -> None:
    """Write UTF-8 text through a temporary file in the same folder, so a crash never leaves half a file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            handle.write(text)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def json_default(value):
    """JSON fallback for numpy scalars and arrays (and anything else, as text)."""
    return value.tolist() if hasattr(value, "tolist") else str(value)


def write_json_atomic(path: str | os.PathLike, data: Any) -> None:
    """Write ``data`` as indented JSON, atomically (numpy values become lists or numbers)."""
    write_text_atomic(path, json.dumps(data, indent=2, default=json_default) + "\n")


def write_files_atomic(path: str | os.PathLike, write: Callable[[Path], None]) -> None:
    """Let ``write(target)`` create ``path`` in a private folder next to it, then move the result(s) into place.

    Formats with a separate data file (``.mhd`` + ``.raw``) refer to it by name, so the files are
    written under their final names and moved data-first, header last.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{path.name}.", dir=path.parent))
    try:
        write(staging / path.name)
        for produced in sorted(staging.iterdir(), key=lambda p: p.name == path.name):
            os.replace(produced, path.parent / produced.name)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def write_folder_atomic(path: str | os.PathLike, fill: Callable[[Path], None],
                        may_replace: Callable[[Path], bool] = lambda folder: True) -> Path:
    """Let ``fill(staging)`` write a whole folder, then swap it in for ``path`` in one rename.

    An existing ``path`` is moved aside first and removed once the new folder is in place; it is
    replaced only if ``may_replace(path)`` says so, else :class:`FileExistsError` is raised and nothing
    is touched.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".partial", dir=path.parent))
    try:
        fill(staging)
        if path.exists():
            if not may_replace(path):
                raise FileExistsError(path)
            old = path.with_name(f".{path.name}.old-{os.getpid()}")
            os.replace(path, old)
            os.replace(staging, path)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(staging, path)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return path
