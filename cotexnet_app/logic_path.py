"""Where the app finds CoTexNetSegmentLib: the Slicer module's logic, which it reuses rather than copies."""

from __future__ import annotations

import sys
from pathlib import Path

SOURCE_ROOT = Path(__file__).resolve().parents[1]


def add_slicer_logic_to_path() -> None:
    """Puts the checkout's CoTexNetSegment folder on sys.path (the app runs from a source checkout)."""
    folder = SOURCE_ROOT / "CoTexNetSegment"
    if not (folder / "CoTexNetSegmentLib" / "__init__.py").is_file():
        raise ImportError(f"CoTexNetSegmentLib not found in {folder}: run `cotexnet app` from an editable install "
                          "of the source checkout (scripts/setup-app.sh)")
    if str(folder) not in sys.path:
        sys.path.insert(0, str(folder))
