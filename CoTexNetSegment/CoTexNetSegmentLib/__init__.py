"""Slicer-side logic of CoTexNet: MRML <-> numpy, background jobs, concept tables. Imports no Qt.

The engine (``cotexnet``) is bundled next to the modules in an installed extension; when the modules run
from a source checkout, the checkout's root is put on ``sys.path`` so the same engine is used.
"""

import importlib.util
import sys
from pathlib import Path


def _ensureEngineImportable() -> None:
    if importlib.util.find_spec("cotexnet") is not None:
        return
    sourceRoot = Path(__file__).resolve().parents[2]
    if (sourceRoot / "cotexnet" / "__init__.py").is_file():
        sys.path.insert(0, str(sourceRoot))


_ensureEngineImportable()

from .logic import CoTexNetSegmentLogic  # noqa: E402  (needs the engine path above)

__all__ = ["CoTexNetSegmentLogic"]
