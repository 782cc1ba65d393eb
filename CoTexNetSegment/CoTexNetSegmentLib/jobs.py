"""Background work without Qt: the engine runs on a worker thread, the scene changes on the caller's.

MRML is not thread-safe, so a job splits into ``work`` (numpy and torch only; torch releases the GIL, so
the application stays responsive) and ``finish`` (scene changes), which runs inside :meth:`Job.poll` on
the thread that polls: the main thread in Slicer, the script's thread in a console. A cancelled or
failed job never calls ``finish``, so it leaves the scene exactly as it was.
"""

from __future__ import annotations

import queue
import threading
import time
from typing import Any, Callable, NamedTuple, Optional


class Event(NamedTuple):
    """A message from the worker: ``("progress", (done, total))`` or ``("log", text)``."""

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


class Job:
    """One piece of background work. States: ``running``, ``done``, ``failed``, ``cancelled``."""

    RUNNING, DONE, FAILED, CANCELLED = "running", "done", "failed", "cancelled"

    def __init__(self, work: Callable[[Reporter], Any], finish: Callable[[Any], Any], name: str = "CoTexNet"):
        self._work = work
        self._finish = finish
        self._events: queue.Queue = queue.Queue()
        self._cancelEvent = threading.Event()
        self._outcome: Optional[tuple[str, Any]] = None  # set by the worker thread, read after join
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self.state = self.RUNNING
        self.result: Any = None
        self.error: Optional[BaseException] = None
        self.progress = (0, 0)
        self.started = time.monotonic()

    def start(self) -> "Job":
        self._thread.start()
        return self

    def _run(self) -> None:
        reporter = Reporter(self._events, self._cancelEvent)
        try:
            self._outcome = ("ok", self._work(reporter))
        except BaseException as error:  # handed to the polling thread, which decides what it means
            self._outcome = ("error", error)

    def cancel(self) -> None:
        """Asks the worker to stop; the scene is left untouched even if the work already completed."""
        self._cancelEvent.set()

    @property
    def finished(self) -> bool:
        return self.state != self.RUNNING

    def poll(self) -> list[Event]:
        """Drains worker messages; when the worker has ended, completes the job on this thread."""
        events = []
        while True:
            try:
                event = self._events.get_nowait()
            except queue.Empty:
                break
            if event.kind == "progress":
                self.progress = event.value
            events.append(event)
        if self.state == self.RUNNING and not self._thread.is_alive() and self._outcome is not None:
            self._complete()
        return events

    def _complete(self) -> None:
        from cotexnet.errors import Cancelled

        kind, value = self._outcome
        if self._cancelEvent.is_set() or isinstance(value, Cancelled):
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

        Raises the worker's or ``finish``'s error, or ``cotexnet.errors.Cancelled``.
        """
        self._thread.join(timeout)
        if self._thread.is_alive():
            raise TimeoutError(f"{self._thread.name} still running after {timeout} s")
        self.poll()
        if self.state == self.FAILED:
            raise self.error
        if self.state == self.CANCELLED:
            from cotexnet.errors import Cancelled

            raise Cancelled("cancelled by the user")
        return self.result
