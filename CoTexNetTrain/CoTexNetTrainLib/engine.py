"""Where the engine is and how to start a Python process that runs it."""
from __future__ import annotations

import importlib.util
import os
import shutil
import sys
from pathlib import Path

import slicer


class TrainingRunError(RuntimeError):
    """The training process could not start, failed, or was killed; the message says why."""


def engineLocation() -> str:
    """Folder that holds the ``cotexnet`` package (it goes on the training process's PYTHONPATH)."""
    spec = importlib.util.find_spec("cotexnet")
    if spec is None:
        try:  # run from a source checkout, CoTexNetSegmentLib puts the checkout's engine on sys.path
            import CoTexNetSegmentLib  # noqa: F401
        except ImportError:
            pass
        spec = importlib.util.find_spec("cotexnet")
    if spec is None or not spec.submodule_search_locations:
        raise TrainingRunError(
            "the CoTexNet engine (Python package 'cotexnet') is not installed in Slicer's Python; "
            "open the CoTexNet Segment module once to install it"
        )
    return str(Path(list(spec.submodule_search_locations)[0]).parent)


def importEngine() -> None:
    """Makes ``import cotexnet`` work in this process (raises TrainingRunError if it cannot)."""
    location = engineLocation()
    if location not in sys.path:
        sys.path.insert(0, location)


def pythonExecutable() -> str:
    """The interpreter that runs the engine: PythonSlicer inside the application, else this Python."""
    app = getattr(slicer, "app", None)
    if app is None:
        return sys.executable
    found = shutil.which("PythonSlicer")
    if found:
        return found
    candidate = os.path.join(app.slicerHome, "bin", "PythonSlicer" + (".exe" if os.name == "nt" else ""))
    if not os.path.isfile(candidate):
        raise TrainingRunError(f"PythonSlicer not found on PATH nor at {candidate}")
    return candidate


def processEnvironment() -> dict[str, str]:
    """Environment of the training process: the engine on PYTHONPATH, unbuffered output.

    Inside the application it starts from the environment Slicer was launched with (as
    ``slicer.util.launchConsoleProcess`` does); the PythonSlicer launcher adds Slicer's own paths.
    """
    environment = dict(slicer.util.startupEnvironment() if getattr(slicer, "app", None) else os.environ)
    paths = [engineLocation()] + [p for p in environment.get("PYTHONPATH", "").split(os.pathsep) if p]
    environment["PYTHONPATH"] = os.pathsep.join(dict.fromkeys(paths))
    environment["PYTHONUNBUFFERED"] = "1"
    return environment
