"""Writes that never leave half a file: text, JSON, files written by a library, and whole folders.

Everything goes to a temporary name in the destination's own folder (so the final rename stays on one
file system and is atomic) and is renamed into place only once complete; a crash or an exception leaves
the previous file or folder as it was. Every writer of the engine goes through this module.

``mkstemp``/``mkdtemp`` create owner-only files (0600) and folders (0700) whatever the umask; what is
renamed into place gets the permissions a plain ``open``/``mkdir`` would have given it, so a model saved
in a shared folder stays readable by the others the umask allows. A folder swap that a kill cuts
between its two renames leaves its versions in staging folders next to it; :func:`recover_folder`
puts the newest complete one back.
"""
from __future__ import annotations

import glob
import json
import os
import shutil
import tempfile
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

from .errors import CoTexNetError

_FILE_MODE, _FOLDER_MODE = 0o666, 0o777
_umask_lock = threading.Lock()


def _umask() -> int:
    with _umask_lock:  # the only way to read the umask is to set it; the lock keeps threads of ours out
        mask = os.umask(0o022)
        os.umask(mask)
    return mask


def _publish(path: Path) -> None:
    """Give a temporary file or folder, and what it holds, the permissions the umask gives new ones, before
    it is renamed into place (libraries that write into it may be as strict as mkstemp: safetensors is)."""
    mask = _umask()
    os.chmod(path, (_FOLDER_MODE if path.is_dir() else _FILE_MODE) & ~mask)
    if path.is_dir():
        for root, folders, files in os.walk(path):
            for name in folders:
                os.chmod(os.path.join(root, name), _FOLDER_MODE & ~mask)
            for name in files:
                os.chmod(os.path.join(root, name), _FILE_MODE & ~mask)


def _staging_error(folder: Path) -> CoTexNetError:
    """A temporary name means nothing to the user: say which folder cannot be written and what to do."""
    return CoTexNetError(f"{folder}: cannot write in this folder (permission denied); choose another output folder "
                         f"or ask its owner for write access")


def _mkstemp(path: Path, suffix: str) -> tuple[int, str]:
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        return tempfile.mkstemp(prefix=f".{path.name}.", suffix=suffix, dir=path.parent)
    except PermissionError:
        raise _staging_error(path.parent) from None


def _mkdtemp(path: Path, suffix: str | None = None) -> Path:
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        return Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=suffix, dir=path.parent))
    except PermissionError:
        raise _staging_error(path.parent) from None


def write_text_atomic(path: str | os.PathLike, text: str) -> None:
    """Write UTF-8 text through a temporary file in the same folder, so a crash never leaves half a file."""
    path = Path(path)
    fd, tmp = _mkstemp(path, ".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            handle.write(text)
        _publish(Path(tmp))
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


def write_files_atomic(path: str | os.PathLike, write: Callable[[Path], None],
                       verify: Callable[[Path], None] | None = None) -> None:
    """Let ``write(target)`` create ``path`` in a private folder next to it, then move the result(s) into place.

    ``verify(target)`` checks the staged file before anything is moved (libraries that ignore write
    errors, as SimpleITK's gzip writer does on a full disk, would otherwise put a cut file in place); an
    error from it, or a failed write (disk full, file size limit), leaves what was there before. Formats
    with a separate data file (``.mhd`` + ``.raw``) refer to it by name, so the files are written under
    their final names and moved data-first, header last.
    """
    path = Path(path)
    staging = _mkdtemp(path)
    try:
        target = staging / path.name
        write(target)
        if verify is not None:
            verify(target)
        _publish(staging)
        for produced in sorted(staging.iterdir(), key=lambda p: p.name == path.name):
            os.replace(produced, path.parent / produced.name)
    except OSError as error:
        raise CoTexNetError(f"{path}: could not be written ({error.strerror or error}); nothing was replaced") \
            from None
    finally:
        shutil.rmtree(staging, ignore_errors=True)


PARTIAL_SUFFIX, OLD_INFIX = ".partial", ".old-"


def write_folder_atomic(path: str | os.PathLike, fill: Callable[[Path], None],
                        may_replace: Callable[[Path], bool] = lambda folder: True) -> Path:
    """Let ``fill(staging)`` write a whole folder, then swap it in for ``path`` in one rename.

    An existing ``path`` is moved aside first and removed once the new folder is in place; it is
    replaced only if ``may_replace(path)`` says so, else :class:`FileExistsError` is raised and nothing
    is touched.
    """
    path = Path(path)
    staging = _mkdtemp(path, PARTIAL_SUFFIX)
    try:
        fill(staging)
        _publish(staging)
        if path.exists():
            if not may_replace(path):
                raise FileExistsError(path)
            old = path.with_name(f".{path.name}{OLD_INFIX}{os.getpid()}")
            os.replace(path, old)
            os.replace(staging, path)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(staging, path)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return path


def staged_versions(path: str | os.PathLike) -> list[Path]:
    """Staging folders :func:`write_folder_atomic` left next to ``path`` when it was stopped: the new
    versions (newest first), then the replaced ones (newest first)."""
    path = Path(path)
    pattern = glob.escape(f".{path.name}")

    def newest_first(folders) -> list[Path]:
        return sorted(folders, key=lambda folder: folder.stat().st_mtime, reverse=True)

    return (newest_first(path.parent.glob(f"{pattern}.*{PARTIAL_SUFFIX}"))
            + newest_first(path.parent.glob(f"{pattern}{OLD_INFIX}*")))


def recover_folder(path: str | os.PathLike, is_complete: Callable[[Path], bool]) -> Path | None:
    """Finish or undo a folder swap cut short by a kill, and remove stale staging folders.

    A complete new version (``is_complete``) replaces ``path``, as the swap would have; without one,
    a missing ``path`` gets back the newest complete replaced version. Returns the staging folder that
    was put in place, or None. Call it only while no writer can be using ``path`` (a held run lock).
    """
    path = Path(path)
    restored = None
    for version in staged_versions(path):
        if version.name.endswith(PARTIAL_SUFFIX) or not path.exists():
            if is_complete(version):
                write_folder_atomic(path, lambda staging, version=version: os.replace(version, staging))
                restored = version
                break
    for version in staged_versions(path):
        shutil.rmtree(version, ignore_errors=True)
    return restored
