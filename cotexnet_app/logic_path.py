"""Where the app finds the Slicer modules' logic (CoTexNetSegmentLib, CoTexNetTrainLib), which it reuses
rather than copies."""

from __future__ import annotations

import sys
from pathlib import Path

SOURCE_ROOT = Path(__file__).resolve().parents[1]
#: Module folder -> its logic package.
LOGIC_PACKAGES = {"CoTexNetSegment": "CoTexNetSegmentLib", "CoTexNetTrain": "CoTexNetTrainLib"}


def add_slicer_logic_to_path() -> None:
    """Puts the checkout's module folders on sys.path (the app runs from a source checkout)."""
    for module, package in LOGIC_PACKAGES.items():
        folder = SOURCE_ROOT / module
        if not (folder / package / "__init__.py").is_file():
            raise ImportError(f"{package} not found in {folder}: run `cotexnet app` from an editable install "
                              "of the source checkout (scripts/setup-app.sh)")
        if str(folder) not in sys.path:
            sys.path.insert(0, str(folder))
