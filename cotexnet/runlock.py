"""One trainer per run folder: a lock file that names the process holding it.

Two trainers writing the same ``best/``, ``last/`` and ``metrics.csv`` would corrupt each other's
checkpoints, so training holds ``OUT/run.lock`` while it runs. The file is created with
``O_CREAT | O_EXCL`` (exactly one creator wins) and holds JSON: ``{"pid", "host", "started"}``
(``started`` in seconds since the epoch, ``started_at`` the same in ISO 8601 UTC, for people). A lock
whose process has ended on this host (the pid is gone, or now belongs to a process started later) is
stale: the next trainer takes it over and logs the old pid. A lock from another host cannot be checked
and is respected. The format is described in docs/slicer-worker.md.
"""
from __future__ import annotations

import json
import logging
import os
import socket
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

from .atomic import staged_versions
from .errors import CoTexNetError

logger = logging.getLogger(__name__)

LOCK_NAME = "run.lock"
#: How long a lock file may take from its creation to holding its JSON (it is written right after).
LOCK_WRITE_SECONDS = 5.0
#: What a training run writes in its folder besides the lock: any of them means the folder holds a run.
RUN_FILES = ("best", "last", "metrics.csv", "split.json")


class RunLockedError(CoTexNetError):
    """The run folder is held by another training process (named in the message)."""


@dataclass(frozen=True)
class LockHolder:
    pid: int
    host: str
    started: float

    def describe(self) -> str:
        when = datetime.fromtimestamp(self.started).strftime("%Y-%m-%d %H:%M:%S")
        return f"training process {self.pid} on {self.host} (started {when})"

    def is_alive(self) -> bool:
        """False only when we can tell the process has ended: same host, and its pid is gone or reused."""
        if self.host != socket.gethostname():
            return True
        import psutil

        try:
            process = psutil.Process(self.pid)
            # A pid created after the lock belongs to a later process; allow clock rounding of create_time.
            return process.status() != psutil.STATUS_ZOMBIE and process.create_time() <= self.started + 1.0
        except psutil.NoSuchProcess:
            return False


def read_holder(folder: str | os.PathLike) -> LockHolder | None:
    """Who holds ``folder``'s lock, or None when it is not locked.

    A lock is created empty and then written, so one that is not JSON yet but younger than
    :data:`LOCK_WRITE_SECONDS` is being written by the trainer taking it: it is read again until it is whole.
    """
    path = Path(folder) / LOCK_NAME
    deadline = time.monotonic() + LOCK_WRITE_SECONDS
    while True:
        try:
            text = path.read_text(encoding="utf-8")
            age = time.time() - path.stat().st_mtime
        except FileNotFoundError:
            return None
        try:
            data = json.loads(text)
            return LockHolder(int(data["pid"]), str(data["host"]), float(data["started"]))
        except (ValueError, KeyError, TypeError):
            if age >= LOCK_WRITE_SECONDS or time.monotonic() >= deadline:
                raise RunLockedError(
                    f"{path}: unreadable lock file (expected JSON with pid, host and started); if no training runs "
                    f"in {Path(folder)}, delete it"
                ) from None
        time.sleep(0.01)


def check_unlocked(folder: str | os.PathLike) -> None:
    """Raises :class:`RunLockedError` when a live process holds ``folder`` (before anything touches it)."""
    holder = read_holder(folder)
    if holder is not None and holder.is_alive():
        raise RunLockedError(_locked_message(folder, holder))


def existing_run_files(folder: str | os.PathLike) -> list[str]:
    """Names of an earlier run's files in ``folder``, with the staging folders of a save a kill cut short."""
    folder = Path(folder)
    found = [name for name in RUN_FILES if (folder / name).exists()]
    return found + [version.name for name in ("best", "last") for version in staged_versions(folder / name)]


class RunLock:
    """``with RunLock(out): ...`` holds ``out/run.lock`` for this process and removes it on exit."""

    def __init__(self, folder: str | os.PathLike):
        self.folder = Path(folder)
        self.path = self.folder / LOCK_NAME
        self.holder: LockHolder | None = None

    def acquire(self) -> "RunLock":
        self.folder.mkdir(parents=True, exist_ok=True)
        for _ in range(3):  # a lock released or taken over between our attempts: look again
            if self._create():
                return self
            holder = read_holder(self.folder)
            if holder is None:
                continue
            if holder.is_alive():
                raise RunLockedError(_locked_message(self.folder, holder))
            logger.warning("%s: taking over the lock of training process %d on %s, which is no longer running",
                           self.folder, holder.pid, holder.host)
            self.path.unlink(missing_ok=True)
        raise RunLockedError(f"{self.folder}: could not lock the run folder (other trainers keep taking it)")

    def _create(self) -> bool:
        started = time.time()
        holder = LockHolder(os.getpid(), socket.gethostname(), started)
        text = json.dumps({"pid": holder.pid, "host": holder.host, "started": started,
                           "started_at": datetime.fromtimestamp(started, timezone.utc).isoformat()})
        try:
            handle = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            return False
        with os.fdopen(handle, "w", encoding="utf-8") as stream:
            stream.write(text + "\n")
        self.holder = holder
        return True

    def release(self) -> None:
        """Removes the lock if it is still ours (never one a later trainer took over)."""
        if self.holder is None:
            return
        try:
            if read_holder(self.folder) == self.holder:
                self.path.unlink()
        except (RunLockedError, FileNotFoundError):
            pass
        self.holder = None

    def __enter__(self) -> "RunLock":
        return self.acquire()

    def __exit__(self, *exc_info) -> None:
        self.release()


def _locked_message(folder, holder: LockHolder) -> str:
    return (f"{Path(folder)} is in use by {holder.describe()}; stop that run first or choose another output "
            f"folder (lock file {Path(folder) / LOCK_NAME})")
