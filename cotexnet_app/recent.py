"""The app's recent-models list: models trained or used in the app, newest first, kept across sessions.

Inside Slicer the modules keep this list in the application settings (CoTexNetSegmentLib.settings);
outside the application that module holds it in memory only, and each browser session is a process of
its own, so the app keeps it in a small JSON file in the user's config folder, written atomically.
Entries are folders the app itself chose (a ``--model``, a model it trained, a model a session used);
those that no longer hold a model are left out when read.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from cotexnet.atomic import write_json_atomic
from cotexnet.bundle import bundle_folder

MAX_RECENT_MODELS = 20
FILE_NAME = "app-recent-models.json"


def default_path() -> Path:
    """``$XDG_CONFIG_HOME/cotexnet/app-recent-models.json`` (``~/.config`` when unset)."""
    base = os.environ.get("XDG_CONFIG_HOME") or Path.home() / ".config"
    return Path(base) / "cotexnet" / FILE_NAME


def is_model_folder(path: str | os.PathLike) -> bool:
    """A bundle, or a training run folder whose ``best/`` is one."""
    return (bundle_folder(path) / "config.json").is_file()


class RecentModels:
    """Absolute model folders, newest first, in one JSON file shared by the app's sessions."""

    def __init__(self, path: str | os.PathLike | None = None):
        self.path = Path(path) if path is not None else default_path()

    def _entries(self) -> list[str]:
        try:
            data = json.loads(self.path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            return []
        except (OSError, UnicodeDecodeError, json.JSONDecodeError):
            return []  # a damaged list is rewritten by the next add(); the models themselves are untouched
        return [str(p) for p in data.get("models", [])] if isinstance(data, dict) else []

    def models(self) -> list[str]:
        return [path for path in self._entries() if is_model_folder(path)]

    def add(self, folder: str | os.PathLike) -> list[str]:
        """Puts ``folder`` first (once) and returns the list."""
        path = str(Path(folder).resolve())
        entries = [path] + [p for p in self._entries() if p != path]
        write_json_atomic(self.path, {"models": entries[:MAX_RECENT_MODELS]})
        return self.models()
