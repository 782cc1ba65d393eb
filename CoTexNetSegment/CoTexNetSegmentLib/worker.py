"""The Slicer side of the persistent segmentation worker (``python -m cotexnet.worker``).

One engine process, started with Slicer's own interpreter on first use, keeps the loaded model between
runs. Requests go to its stdin and events come back on its stdout as JSON lines; ``poll`` reads what has
arrived without ever blocking (no thread: in Slicer a Python thread would only advance while the main
thread runs Python). Cancel ends the worker's process tree; a worker that died is restarted by the next
request. The protocol and lifecycle are described in docs/slicer-worker.md.
"""

from __future__ import annotations

import atexit
import contextlib
import json
import logging
import os
import subprocess
import tempfile
import time
from typing import Any, Callable, Optional

from .jobs import BackgroundJob, Event
from .processes import NO_WINDOW, engineEnvironment, killProcessTree, pythonExecutable

#: How long a synchronous request (status, device facts) may take, including starting the worker.
REQUEST_TIMEOUT_S = 120.0


class WorkerError(RuntimeError):
    """The worker process could not start, or ended while it was working; the message says how."""


def _peekNamedPipe(kernel32):
    """kernel32's ``PeekNamedPipe`` with its signature declared: ctypes passes an undeclared argument as a C
    ``int``, which cuts a 64-bit handle above 2**31 (or refuses it)."""
    from ctypes import wintypes

    peek = kernel32.PeekNamedPipe
    peek.argtypes = (wintypes.HANDLE, wintypes.LPVOID, wintypes.DWORD, wintypes.LPDWORD, wintypes.LPDWORD,
                     wintypes.LPDWORD)
    peek.restype = wintypes.BOOL
    return peek


class _LineReader:
    """Complete lines that have arrived on a pipe, read without blocking."""

    def __init__(self, stream):
        self._fd = stream.fileno()
        self._buffer = b""
        self.closed = False
        if os.name != "nt":
            os.set_blocking(self._fd, False)

    def _available(self) -> Optional[int]:
        """Bytes waiting in the pipe (None: the other end is closed). Windows pipes cannot be non-blocking
        before Python 3.12, so ask the pipe how much it holds."""
        import ctypes
        import msvcrt
        from ctypes import wintypes

        available = wintypes.DWORD()
        handle = msvcrt.get_osfhandle(self._fd)
        if not _peekNamedPipe(ctypes.windll.kernel32)(handle, None, 0, None, ctypes.byref(available), None):
            return None
        return available.value

    def _readChunk(self) -> Optional[bytes]:
        if os.name == "nt":
            size = self._available()
            if size is None:
                return b""
            return os.read(self._fd, size) if size else None
        try:
            return os.read(self._fd, 1 << 16)
        except BlockingIOError:
            return None

    def lines(self) -> list[str]:
        while not self.closed:
            chunk = self._readChunk()
            if chunk is None:
                break
            if chunk == b"":
                self.closed = True
                break
            self._buffer += chunk
        *complete, self._buffer = self._buffer.split(b"\n")
        return [line.decode("utf-8", errors="replace") for line in complete if line.strip()]


class SegmentationWorker:
    """A persistent ``cotexnet.worker`` process, started on the first request and after a crash or Cancel."""

    def __init__(self, command: Optional[list[str]] = None):
        self._command = command
        self.process: Optional[subprocess.Popen] = None
        self.pid: Optional[int] = None  # the interpreter's own pid (behind PythonSlicer's launcher)
        self._reader: Optional[_LineReader] = None
        self._stderr = None
        self._events: dict[int, list[dict]] = {}
        self._nextId = 0
        #: Counts the worker processes started and ended: a job belongs to the generation it was sent to.
        self.generation = 0

    @property
    def alive(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def start(self) -> None:
        """Starts a fresh worker (ending any previous one)."""
        self.kill()
        command = self._command or [pythonExecutable(), "-m", "cotexnet.worker"]
        self._stderr = tempfile.TemporaryFile("w+b")  # a file, not a pipe: a full pipe would stall the worker
        try:
            self.process = subprocess.Popen(
                command, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self._stderr,
                env=engineEnvironment(), creationflags=NO_WINDOW,
            )
        except OSError as error:
            raise WorkerError(f"could not start the CoTexNet worker ({command[0]}): {error}") from error
        self._reader = _LineReader(self.process.stdout)
        self._events = {}
        self.pid = None
        self.generation += 1
        logging.info(f"CoTexNet worker started: {subprocess.list2cmdline(command)} (pid {self.process.pid})")

    def send(self, kind: str, **fields) -> int:
        """Sends a request (starting the worker if none runs); returns its id for :meth:`take`."""
        if not self.alive:
            self.start()
        self._nextId += 1
        self._events[self._nextId] = []
        line = json.dumps({"id": self._nextId, "type": kind, **fields}) + "\n"
        try:
            self.process.stdin.write(line.encode("utf-8"))
            self.process.stdin.flush()
        except OSError as error:  # the worker died before reading it: the next send starts a new one
            self._events.pop(self._nextId)
            raise WorkerError(self.exitMessage(f"before it received the request ({error})")) from error
        return self._nextId

    def pump(self) -> None:
        """Reads everything the worker has written so far and files it under its request id."""
        if self._reader is None:
            return
        for line in self._reader.lines():
            try:
                message = json.loads(line)
            except json.JSONDecodeError:
                logging.warning(f"CoTexNet worker: not a protocol line: {line[:200]}")
                continue
            if message.get("event") == "ready":
                self.pid = message.get("pid")
            elif message.get("id") in self._events:
                self._events[message["id"]].append(message)
            elif message.get("event") == "error":
                logging.error(f"CoTexNet worker: {message.get('message')}")

    def take(self, requestId: int) -> list[dict]:
        """The events of one request that arrived since the last call."""
        self.pump()
        events = self._events.get(requestId, [])
        if events:
            self._events[requestId] = []
            if events[-1].get("event") in ("result", "error"):
                del self._events[requestId]
        return events

    def request(self, kind: str, timeout: float = REQUEST_TIMEOUT_S, **fields) -> Any:
        """Sends a request and waits for its result (short requests only: status, device facts)."""
        requestId = self.send(kind, **fields)
        deadline = time.monotonic() + timeout
        while True:
            for message in self.take(requestId):
                if message["event"] == "result":
                    return message["value"]
                if message["event"] == "error":
                    raise remoteError(message)
            if not self.alive:
                raise WorkerError(self.exitMessage(f"while answering a {kind} request"))
            if time.monotonic() > deadline:
                raise TimeoutError(f"the CoTexNet worker did not answer a {kind} request within {timeout} s")
            time.sleep(0.01)

    def exitMessage(self, when: str) -> str:
        code = self.process.poll() if self.process is not None else None
        tail = ""
        if self._stderr is not None:
            self._stderr.seek(0)
            lines = self._stderr.read().decode("utf-8", errors="replace").strip().splitlines()
            tail = "\n".join(lines[-15:])
        text = f"the CoTexNet worker process ended unexpectedly (exit code {code}) {when}; the next run starts a new one"
        return f"{text}\n{tail}".strip()

    def kill(self) -> None:
        """Ends the worker's whole process tree at once (Cancel); the next request starts a new worker."""
        if self.process is not None:
            if self.process.poll() is None:
                killProcessTree(self.process, timeout=5.0, knownChildren=[self.pid] if self.pid else [])
            for stream in (self.process.stdin, self.process.stdout):
                with contextlib.suppress(OSError):  # a dead worker's pipe may refuse a last flush
                    stream.close()
            self.generation += 1
        if self._stderr is not None:
            self._stderr.close()
        self.process = self._reader = self._stderr = None
        self.pid = None
        self._events = {}

    def stop(self, timeout: float = 5.0) -> None:
        """Asks the worker to exit (application exit), ending its process tree if it does not."""
        if self.alive:
            try:
                self.process.stdin.write(b'{"type": "shutdown"}\n')
                self.process.stdin.flush()
                self.process.wait(timeout)
            except (OSError, subprocess.TimeoutExpired):
                pass
        self.kill()


class WorkerJob(BackgroundJob):
    """A request running in the worker, with the interface of :class:`.jobs.Job`.

    ``decode(value)`` turns the worker's result into what ``finish`` applies (it runs on the polling
    thread). Cancel ends the worker's process tree, so the work stops at once; the next run starts a new
    worker. The worker is shared (module, effect, CoTexNetTrain): a job whose worker was ended or restarted
    for another job fails with a message saying so. ``reply`` is the worker's raw result (e.g. its model
    load counter).
    """

    def __init__(self, worker: SegmentationWorker, kind: str, fields: dict, decode: Callable[[dict], Any],
                 finish: Callable[[Any], Any], name: str = "CoTexNet", cleanup: Callable[[], None] = lambda: None):
        super().__init__(finish, name)
        self._worker = worker
        self._decode = decode
        self._cleanup = cleanup
        self._cancelled = False
        self.reply: Optional[dict] = None
        self._requestId = worker.send(kind, **fields)
        self._generation = worker.generation

    def _collect(self) -> list[Event]:
        if self._outcome is not None:
            return []
        if self._worker.generation != self._generation:
            self._outcome = ("error", WorkerError(
                f"{self.name} stopped: the CoTexNet worker was ended for another job (a Cancel elsewhere, or a "
                f"new worker after a crash); run it again"))
            return []
        alive = self._worker.alive  # before reading: a worker that has ended has written all it will
        events = []
        for message in self._worker.take(self._requestId):
            kind = message.get("event")
            if kind == "progress":
                events.append(Event("progress", (int(message["done"]), int(message["total"]))))
            elif kind == "log":
                events.append(Event("log", str(message["text"])))
            elif kind == "result":
                self.reply = message["value"]
                try:
                    self._outcome = ("ok", self._decode(self.reply))
                except Exception as error:
                    self._outcome = ("error", error)
            elif kind == "error":
                self._outcome = ("error", remoteError(message))
        if self._outcome is None and not alive:
            self._outcome = ("error", WorkerError(self._worker.exitMessage(f"while running {self.name}")))
        return events

    def _complete(self) -> None:
        super()._complete()
        self._cleanup()

    def cancel(self) -> None:
        """Stops the work now by ending the worker; the scene is left untouched even if the work had completed."""
        if self.state != self.RUNNING:
            return
        self._cancelled = True
        if self._outcome is None:
            self._worker.kill()
            from cotexnet.errors import Cancelled

            self._outcome = ("error", Cancelled("cancelled by the user"))

    def _cancelRequested(self) -> bool:
        return self._cancelled

    def _block(self, timeout: Optional[float]) -> None:
        deadline = None if timeout is None else time.monotonic() + timeout
        while self._outcome is None:
            self.poll()
            if self._outcome is not None or self.finished:
                return
            if deadline is not None and time.monotonic() > deadline:
                raise TimeoutError(f"{self.name} still running after {timeout} s")
            time.sleep(0.01)


def remoteError(message: dict) -> BaseException:
    """The worker's error as the exception the in-process path would have raised (same type and text)."""
    import cotexnet.errors as errors

    name, text = message.get("error", "Error"), message.get("message", "")
    errorType = getattr(errors, name, None)
    if isinstance(errorType, type) and issubclass(errorType, errors.CoTexNetError):
        error = errorType(text)  # a DataError's text already names its file
    elif name in _BUILTIN_ERRORS:
        error = _BUILTIN_ERRORS[name](text)
    else:
        error = WorkerError(f"{name}: {text}")
    error.remoteTraceback = message.get("traceback")
    return error


#: Built-in errors the worker may report that callers catch by type (ImportError: torch is not installed).
_BUILTIN_ERRORS = {"ImportError": ImportError, "ModuleNotFoundError": ImportError, "ValueError": ValueError,
                   "TypeError": TypeError, "FileNotFoundError": FileNotFoundError, "MemoryError": MemoryError}

_shared: Optional[SegmentationWorker] = None


def sharedWorker() -> SegmentationWorker:
    """The application's one worker (the module, the effect and CoTexNetTrain share its loaded model).

    It is stopped when the application quits (``aboutToQuit``) or the interpreter exits (``atexit``);
    a worker whose parent vanished without either sees its stdin close and exits by itself.
    """
    global _shared
    if _shared is None:
        _shared = SegmentationWorker()
        atexit.register(_shared.stop)
        import slicer

        app = getattr(slicer, "app", None)
        if app is not None:
            app.connect("aboutToQuit()", _shared.stop)
    return _shared
