"""Trained models shared with CoTexNetSegment through one application setting.

Both modules use the key ``CoTexNet/RecentModels``: a list of bundle folders, newest first, in the
format of a ``ctkPathLineEdit`` history (CoTexNetSegment's model selector uses the key as its
``settingKey``), so a model trained here shows up in that selector. Inside Slicer the list persists
in the application settings (``qt.QSettings``); without Qt (``slicer-core``, a plain Python
console) it lives in memory for the session.
"""
from __future__ import annotations

import os
from pathlib import Path

RECENT_MODELS_KEY = "CoTexNet/RecentModels"
MAX_RECENT_MODELS = 20

_memory: dict[str, list[str]] = {}


def _qsettings():
    """Slicer's application settings, or None where Qt (and so ``slicer.app``) is not available."""
    try:
        import qt
    except ImportError:
        return None
    return qt.QSettings()


def _read() -> list[str]:
    settings = _qsettings()
    if settings is None:
        return list(_memory.get(RECENT_MODELS_KEY, []))
    value = settings.value(RECENT_MODELS_KEY)
    if not value:
        return []
    # QSettings returns a single-entry list as a plain string.
    return [value] if isinstance(value, str) else [str(v) for v in value]


def _write(paths: list[str]) -> None:
    settings = _qsettings()
    if settings is None:
        _memory[RECENT_MODELS_KEY] = list(paths)
    else:
        settings.setValue(RECENT_MODELS_KEY, list(paths))


def recentModels() -> list[str]:
    """Bundle directories of models trained or loaded before, newest first; vanished ones are left out."""
    return [path for path in _read() if os.path.isfile(os.path.join(path, "config.json"))]


def _normalized(path: str | os.PathLike) -> str:
    """Absolute, with forward slashes, as Qt path widgets store paths."""
    return Path(path).absolute().as_posix()


def addRecentModel(bundlePath: str | os.PathLike) -> list[str]:
    """Put ``bundlePath`` first in the shared list (once) and return the new list."""
    path = _normalized(bundlePath)
    paths = [path] + [p for p in _read() if _normalized(p) != path]
    _write(paths[:MAX_RECENT_MODELS])
    return recentModels()
