"""Background work without Qt: the engine runs elsewhere, the scene changes on the caller's thread.

MRML is not thread-safe, so a job splits into work done elsewhere (numpy and torch only) and ``finish``
(scene changes), which runs inside :meth:`BackgroundJob.poll` on the thread that polls: the main thread
in Slicer, the script's thread in a console. A cancelled or failed job never calls ``finish``, so it
leaves the scene exactly as it was. :class:`Job` runs its work on a thread (console use, light work);
``worker.WorkerJob`` runs it in the persistent worker process (the GUI's segmentation).
"""

from __future__ import annotations

import queue
import threading
import time
from typing import Any, Callable, NamedTuple, Optional


class Event(NamedTuple):
    """A message from the work: ``("progress", (done, total))`` or ``("log", text)``."""

    kind: str
    value: Any


class Reporter:
    """Handed to ``work``: thread-safe progress/log reporting and the cancel flag."""

    def __init__(self, events: queue.Queue, cancelEvent: threading.Event):
        self._events = events
        self.cancelEvent = cancelEvent

    def progress(self, done: int, total: int) -> None:
        self._events.put(Event("progress", (int(done), int(total))))

    def log(self, text: str) -> None:
        self._events.put(Event("log", str(text)))

    @property
    def cancelled(self) -> bool:
        return self.cancelEvent.is_set()


class BackgroundJob:
    """One piece of background work. States: ``running``, ``done``, ``failed``, ``cancelled``.

    Subclasses say where events and the outcome come from (:meth:`_collect`), how to stop the work
    (:meth:`cancel`) and how to block until it ends (:meth:`_block`).
    """

    RUNNING, DONE, FAILED, CANCELLED = "running", "done", "failed", "cancelled"

    def __init__(self, finish: Callable[[Any], Any], name: str = "CoTexNet"):
        self.name = name
        self._finish = finish
        self._outcome: Optional[tuple[str, Any]] = None  # ("ok", value) or ("error", exception)
        self.state = self.RUNNING
        self.result: Any = None
        self.error: Optional[BaseException] = None
        self.progress = (0, 0)
        self.started = time.monotonic()

    def _collect(self) -> list[Event]:
        """New events; sets ``self._outcome`` once the work has ended."""
        raise NotImplementedError

    def _block(self, timeout: Optional[float]) -> None:
        """Returns when the work has ended; raises TimeoutError after ``timeout`` s."""
        raise NotImplementedError

    def _cancelRequested(self) -> bool:
        raise NotImplementedError

    def cancel(self) -> None:
        raise NotImplementedError

    @property
    def finished(self) -> bool:
        return self.state != self.RUNNING

    def poll(self) -> list[Event]:
        """Drains the work's messages; when the work has ended, completes the job on this thread."""
        events = self._collect()
        for event in events:
            if event.kind == "progress":
                self.progress = event.value
        if self.state == self.RUNNING and self._outcome is not None:
            self._complete()
        return events

    def _complete(self) -> None:
        from cotexnet.errors import Cancelled

        kind, value = self._outcome
        if self._cancelRequested() or isinstance(value, Cancelled):
            self.state = self.CANCELLED
            return
        if kind == "error":
            self.state, self.error = self.FAILED, value
            return
        try:
            self.result = self._finish(value)
            self.state = self.DONE
        except Exception as error:
            self.state, self.error = self.FAILED, error

    def wait(self, timeout: Optional[float] = None) -> Any:
        """Blocks until the job ends (scripts, ``waitForCompletion=True``); returns ``finish``'s result.

        Raises the work's or ``finish``'s error, or ``cotexnet.errors.Cancelled``.
        """
        self._block(timeout)
        self.poll()
        if self.state == self.FAILED:
            raise self.error
        if self.state == self.CANCELLED:
            from cotexnet.errors import Cancelled

            raise Cancelled("cancelled by the user")
        return self.result


class Job(BackgroundJob):
    """Work on a thread: ``work(reporter)`` returns the value that ``finish`` applies.

    Only for work that releases the GIL or runs from a console: in Slicer's GUI a Python thread advances
    only while the main thread runs Python (see docs/slicer-worker.md).
    """

    def __init__(self, work: Callable[[Reporter], Any], finish: Callable[[Any], Any], name: str = "CoTexNet"):
        super().__init__(finish, name)
        self._work = work
        self._events: queue.Queue = queue.Queue()
        self._cancelEvent = threading.Event()
        self._result: Optional[tuple[str, Any]] = None  # set by the worker thread, read after it ended
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)

    def start(self) -> "Job":
        self._thread.start()
        return self

    def _run(self) -> None:
        reporter = Reporter(self._events, self._cancelEvent)
        try:
            self._result = ("ok", self._work(reporter))
        except BaseException as error:  # handed to the polling thread, which decides what it means
            self._result = ("error", error)

    def cancel(self) -> None:
        """Asks the work to stop; the scene is left untouched even if the work already completed."""
        self._cancelEvent.set()

    def _cancelRequested(self) -> bool:
        return self._cancelEvent.is_set()

    def _collect(self) -> list[Event]:
        events = []
        while True:
            try:
                events.append(self._events.get_nowait())
            except queue.Empty:
                break
        if not self._thread.is_alive() and self._result is not None:
            self._outcome = self._result
        return events

    def _block(self, timeout: Optional[float]) -> None:
        self._thread.join(timeout)
        if self._thread.is_alive():
            raise TimeoutError(f"{self._thread.name} still running after {timeout} s")
