"""Which models a browser session may segment and train with, and which one it uses.

The chooser lists recent models, the ``--model`` folders, and the run folders and bundles under the data
root. A value the page sends is a path inside the data root unless the app itself listed it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional

from cotexnet_app.files import DataRoot
from cotexnet_app.recent import RecentModels


class ModelChooser:
    """The model chooser's entries and the folder behind the page's choice."""

    def __init__(self, data_root: DataRoot, fixed_models: list[str], recent: RecentModels):
        self.data_root = data_root
        self.fixed_models = fixed_models  # --model folders (outside the data root is fine: the server owner chose them)
        self.recent = recent

    def choices(self) -> list[dict]:
        """Recent models first, then --model folders, then the data root's run folders and the bundles that
        are not a run's. Values inside the data root are relative to it."""
        choices, seen = [], set()

        def add(value: str, title: str) -> None:
            if value not in seen:
                seen.add(value)
                choices.append({"title": title, "value": value})

        for path in self.recent.models():
            value = self.inside_root(Path(path)) or path
            add(value, f"{value} (recent)")
        for path in self.fixed_models:
            add(self.inside_root(Path(path)) or path, path)
        runs = self.data_root.runs()
        for run in runs:
            add(run, f"{run} (run)")
        for bundle in self.data_root.models():
            if not any(bundle.startswith(run + "/") for run in runs):
                add(bundle, bundle)
        return choices

    def default(self, choices: list[dict]) -> Optional[str]:
        """The model a new session starts with: the first --model, else the first model of the data root.
        The recent list (shared by every session) is offered, never chosen for the user."""
        if self.fixed_models:
            return self.value(Path(self.fixed_models[0]))
        recent = {self.value(Path(path)) for path in self.recent.models()}
        others = [choice["value"] for choice in choices if choice["value"] not in recent]
        return (others or [choice["value"] for choice in choices] or [None])[0]

    def inside_root(self, path: Path) -> Optional[str]:
        try:
            return self.data_root.relative(path)
        except ValueError:
            return None

    def path(self, chosen: Optional[str]) -> Path:
        """The chosen model's folder: an absolute path only if the app itself listed it (a --model or a recent
        model), anything else is a path inside the data root."""
        chosen = chosen or ""
        if chosen in self.fixed_models or chosen in self.recent.models():
            return Path(chosen)
        return self.data_root.resolve(chosen)

    def value(self, folder: Path) -> str:
        """The chooser's value for a model folder."""
        return self.inside_root(folder) or str(folder.resolve())
