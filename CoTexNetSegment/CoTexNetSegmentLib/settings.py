"""Application settings of the CoTexNet modules (per user, not per scene), defined once for both modules.

Inside Slicer they live in the application's user settings (``slicer.app.userSettings()``, the same
file as a default-constructed ``QSettings``: Slicer's Base/QTCore/qSlicerCoreApplication.cxx makes it
with ``new QSettings(app)``), so ``ctkPathLineEdit`` history and this module share one list. Without the
application (``slicer-core``, a plain console) they live in memory for the session. No Qt is imported.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Sequence

import slicer

#: Trained models, newest first, in the format of a ``ctkPathLineEdit`` history (the model selectors of
#: CoTexNetSegment and of the Segment Editor effect use it as their ``settingKey``).
RECENT_MODELS_SETTING = "CoTexNet/RecentModels"
#: JSON: {"openai": {"model": ..., "base_url": ...}}, options of the LMM concept backends.
CONCEPT_BACKEND_OPTIONS_SETTING = "CoTexNet/ConceptBackendOptions"
MAX_RECENT_MODELS = 20

_memory: dict[str, object] = {}


def _userSettings():
    """Slicer's user settings, or None outside the application."""
    app = getattr(slicer, "app", None)
    return app.userSettings() if app is not None else None


def readSetting(key: str, default=None):
    settings = _userSettings()
    if settings is None:
        return _memory.get(key, default)
    value = settings.value(key)
    return default if value is None else value


def writeSetting(key: str, value) -> None:
    settings = _userSettings()
    if settings is None:
        _memory[key] = value
    else:
        settings.setValue(key, value)


def _recentEntries() -> list[str]:
    value = readSetting(RECENT_MODELS_SETTING)
    if not value:
        return []
    # QSettings returns a single-entry list as a plain string.
    return [value] if isinstance(value, str) else [str(v) for v in value]


def recentModels() -> list[str]:
    """Bundle folders of models trained or used before, newest first; vanished ones are left out.

    A training run folder stands for its best bundle, as the engine resolves it wherever a bundle is
    expected (``cotexnet.bundle.bundle_folder``): it is listed as that bundle.
    """
    from cotexnet.bundle import CONFIG_NAME, bundle_folder

    models = []
    for path in _recentEntries():
        bundle = bundle_folder(path)
        if (bundle / CONFIG_NAME).is_file():
            models.append(path if bundle == Path(path).expanduser() else bundle.as_posix())
    return list(dict.fromkeys(models))


def _normalized(path: str | os.PathLike) -> str:
    """Absolute, with forward slashes, as Qt path widgets store paths."""
    return Path(path).absolute().as_posix()


def addRecentModel(bundlePath: str | os.PathLike) -> list[str]:
    """Puts ``bundlePath`` first in the shared list (once) and returns the new list."""
    path = _normalized(bundlePath)
    paths = [path] + [p for p in _recentEntries() if _normalized(p) != path]
    writeSetting(RECENT_MODELS_SETTING, paths[:MAX_RECENT_MODELS])
    return recentModels()


def isChosenPath(path) -> bool:
    """Whether a path field holds a choice: not empty and not ``.``, which is what ``str(pathlib.Path(""))`` gives."""
    return path is not None and str(path).strip() not in ("", ".")


def preferredModelPath(currentPath, recent: Sequence[str]) -> str:
    """The model a selector should show: the user's current choice, else the most recent model, else ""."""
    if isChosenPath(currentPath):
        return str(currentPath)
    return recent[0] if recent else ""
