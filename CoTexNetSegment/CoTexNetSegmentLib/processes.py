"""The Python processes that run the engine: which interpreter, which environment, and how to stop them.

Inside Slicer the engine runs under ``PythonSlicer``. That program is a CTKAppLauncher: it sets up
Slicer's environment and starts the real interpreter as its *child*, forwarding stdin and stdout but no
signals. A process started here is therefore the root of a process tree, and stopping it means stopping
the whole tree (:func:`killProcessTree`, with psutil, as SlicerMONAIAuto3DSeg does); terminating the
``Popen`` alone would end the launcher and leave the interpreter running. See docs/slicer-worker.md.
psutil is itself one of the packages CoTexNet installs: before it is there, the launcher and the children
the caller knows are killed without it.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Iterable

import slicer


#: ``creationflags`` of every engine process: on Windows, no console window opens (0 elsewhere).
NO_WINDOW = getattr(subprocess, "CREATE_NO_WINDOW", 0)


class EngineProcessError(RuntimeError):
    """The engine's interpreter or package cannot be found; the message says what to do."""


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
        raise EngineProcessError(f"PythonSlicer not found on PATH nor at {candidate}")
    return candidate


def engineLocation() -> str:
    """Folder that holds the ``cotexnet`` package (it goes on the engine process's PYTHONPATH)."""
    spec = importlib.util.find_spec("cotexnet")
    if spec is None or not spec.submodule_search_locations:
        raise EngineProcessError(
            "the CoTexNet engine (Python package 'cotexnet') is not installed in Slicer's Python; "
            "open the CoTexNet Segment module once to install it"
        )
    return str(Path(list(spec.submodule_search_locations)[0]).parent)


def engineEnvironment() -> dict[str, str]:
    """Environment of an engine process: the engine on PYTHONPATH, unbuffered output.

    Inside the application it starts from the environment Slicer was launched with (as
    ``slicer.util.launchConsoleProcess`` does); the PythonSlicer launcher adds Slicer's own paths.
    """
    environment = dict(slicer.util.startupEnvironment() if getattr(slicer, "app", None) else os.environ)
    paths = [engineLocation()] + [p for p in environment.get("PYTHONPATH", "").split(os.pathsep) if p]
    environment["PYTHONPATH"] = os.pathsep.join(dict.fromkeys(paths))
    environment["PYTHONUNBUFFERED"] = "1"
    return environment


def killProcessTree(process: subprocess.Popen, timeout: float = 5.0, knownChildren: Iterable[int] = ()) -> None:
    """Ends ``process`` and every process it started: terminate, then kill what is left after ``timeout`` s.

    The descendants are listed before anything is ended (an orphan cannot be found from its parent any
    more). ``process`` itself is waited for through its ``Popen``, so its exit code stays readable.
    Without psutil (not installed yet) only ``process`` and ``knownChildren`` (pids, e.g. the interpreter
    behind PythonSlicer) can be found: they are killed.
    """
    try:
        import psutil
    except ImportError:
        _killWithoutPsutil(process, knownChildren, timeout)
        return

    try:
        descendants = psutil.Process(process.pid).children(recursive=True)
    except psutil.NoSuchProcess:
        descendants = []
    for child in descendants:
        _signal(child, "terminate")
    if process.poll() is None:
        process.terminate()
    for child in _waitUntilGone(descendants, timeout):
        _signal(child, "kill")
    try:
        process.wait(timeout)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()
    _waitUntilGone(descendants, timeout)


def _killWithoutPsutil(process: subprocess.Popen, knownChildren: Iterable[int], timeout: float) -> None:
    for pid in knownChildren:
        try:
            os.kill(pid, getattr(signal, "SIGKILL", signal.SIGTERM))  # SIGTERM is TerminateProcess on Windows
        except OSError:  # already gone
            pass
    if process.poll() is None:
        process.kill()
    try:
        process.wait(timeout)
    except subprocess.TimeoutExpired:
        pass


def isRunning(pid: int) -> bool:
    """Whether a process with this id runs (a zombie, ended but not yet reaped, does not)."""
    import psutil

    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def _signal(process, action: str) -> None:
    import psutil

    try:
        getattr(process, action)()
    except psutil.NoSuchProcess:
        pass


def _waitUntilGone(processes: Iterable, timeout: float) -> list:
    """Waits until the processes have ended; returns those still running after ``timeout`` s.

    psutil's own ``wait_procs`` counts a zombie whose parent is gone as alive until someone reaps it,
    which in a container without an init that reaps may be never.
    """
    alive = list(processes)
    deadline = time.monotonic() + timeout
    while alive:
        alive = [p for p in alive if isRunning(p.pid) and _sameProcess(p)]
        if not alive or time.monotonic() >= deadline:
            break
        time.sleep(0.02)
    return alive


def _sameProcess(process) -> bool:
    import psutil

    try:
        return process.is_running()  # False when the pid now belongs to another process
    except psutil.NoSuchProcess:
        return False
