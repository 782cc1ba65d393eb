"""Where the engine is and how to start and stop a Python process that runs it.

The one implementation lives in ``CoTexNetSegmentLib.processes`` (CoTexNetTrain depends on
CoTexNetSegment); it is imported on first use, so this package still imports from its own folder alone.
"""
from __future__ import annotations

import sys


class TrainingRunError(RuntimeError):
    """The training process could not start, failed, or was killed; the message says why."""


def _processes():
    try:
        from CoTexNetSegmentLib import processes
    except ImportError as error:
        raise TrainingRunError(
            f"CoTexNetTrain needs the CoTexNet Segment module of the same extension ({error})"
        ) from error
    return processes


def _call(name: str, *arguments):
    processes = _processes()
    try:
        return getattr(processes, name)(*arguments)
    except processes.EngineProcessError as error:
        raise TrainingRunError(str(error)) from error


def engineLocation() -> str:
    """Folder that holds the ``cotexnet`` package (it goes on the training process's PYTHONPATH)."""
    return _call("engineLocation")


def importEngine() -> None:
    """Makes ``import cotexnet`` work in this process (raises TrainingRunError if it cannot)."""
    location = engineLocation()
    if location not in sys.path:
        sys.path.insert(0, location)


def pythonExecutable() -> str:
    """The interpreter that runs the engine: PythonSlicer inside the application, else this Python."""
    return _call("pythonExecutable")


def processEnvironment() -> dict[str, str]:
    """Environment of the training process: the engine on PYTHONPATH, unbuffered output."""
    return _call("engineEnvironment")


def killProcessTree(process, timeout: float) -> None:
    """Ends the training process and its children (PythonSlicer starts the interpreter as a child)."""
    _call("killProcessTree", process, timeout)
