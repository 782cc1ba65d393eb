"""A persistent segmentation worker: ``python -m cotexnet.worker`` answers JSON-line requests on stdin.

Slicer's GUI must not run inference on a Python thread (the main thread holds the GIL while Qt's event
loop runs), so it keeps one of these processes alive: the model loads once and later requests cost
inference only. Requests arrive as one JSON object per line on stdin; progress, log lines, results and
errors go back as one JSON object per line on stdout; arrays cross through ``.npy`` files. The protocol
is described in docs/slicer-worker.md. In-process callers use :class:`ModelCache` and
:func:`segment_array` directly, so both paths compute exactly the same thing.

Several clients can share one worker per (model, device) (the web app's sessions, docs/web-app.md):
:class:`SharedWorkers` listens on a private Unix socket, starts the workers and queues their clients'
segmentations fairly; a client process started with ``COTEXNET_WORKER_SOCKET`` set relays its stdin and
stdout to that socket instead of loading a model itself.
"""
from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import os
import socket
import sys
import threading
import traceback
from collections import deque
from pathlib import Path
from typing import Callable, Sequence

import numpy as np

from .data.image import check_file
from .errors import Cancelled, DataError

PROTOCOL = 1
#: Set in a client's environment, the address of the :class:`SharedWorkers` it relays to.
SOCKET_ENVIRONMENT = "COTEXNET_WORKER_SOCKET"
#: The longest protocol line (a result with many concept records is the largest).
MAX_LINE_BYTES = 64 << 20


class ModelCache:
    """The last loaded bundle, reused while its folder, device, weights and config files stay the same.

    ``loads`` counts real loads, so a caller can tell a reused model from a reloaded one.
    """

    def __init__(self):
        self._lock = threading.Lock()
        self._key = None
        self._model = None
        self.loads = 0

    def get(self, directory: str | os.PathLike, device: str = "auto"):
        from .bundle import CONFIG_NAME, WEIGHTS_NAME, bundle_folder
        from .infer import resolve_device
        from .model import CoTexNet

        path = bundle_folder(directory).resolve()
        resolved = str(resolve_device(device))
        # The config changes alone when post-processing is chosen after training: it counts too.
        versions = tuple(f.stat().st_mtime_ns if f.is_file() else None for f in (path / WEIGHTS_NAME, path / CONFIG_NAME))
        key = (str(path), resolved, versions)
        with self._lock:
            if self._model is None or self._key != key:
                self._key = self._model = None  # free the old model before loading the next one
                self._model = CoTexNet.from_pretrained(path, device=resolved)
                self._key = key
                self.loads += 1
            return self._model

    @property
    def key(self):
        return self._key


def engine_input(volume: np.ndarray) -> tuple[np.ndarray, bool]:
    """A (z, y, x[, c]) volume array as :func:`cotexnet.infer.segment_volume` takes it, and whether it is colour.

    A 2D image is stored as one slice, (1, y, x[, c]); the engine wants (y, x) or (y, x, 3).
    Multi-component volumes are single-slice colour images (e.g. a photograph); alpha is dropped.
    """
    rgb = volume.ndim == 4
    if rgb:
        if volume.shape[0] != 1 or volume.shape[3] not in (3, 4):
            raise DataError(
                f"the volume has {volume.shape[0]} slices of {volume.shape[3]} components; CoTexNet takes "
                f"grayscale volumes or single-slice RGB(A) images"
            )
        volume = volume[..., :3]
    return (volume[0] if volume.shape[0] == 1 else volume), rgb


def segment_array(
    model,
    volume: np.ndarray,
    spacing: Sequence[float],
    direction: Sequence[float],
    *,
    axis: str | None = None,
    planes: Sequence[str] | None = None,
    tta: bool = False,
    postprocess: bool = True,
    confidence: bool = False,
    batch_size: int = 16,
    device: str = "auto",
    concepts: bool = True,
    concept_backend: str = "geometric",
    concept_options: dict | None = None,
    progress: Callable[[int, int], None] | None = None,
    cancel=None,
    log: Callable[[str], None] | None = None,
) -> tuple[np.ndarray, list | None, np.ndarray | None]:
    """Segments a (z, y, x[, c]) volume and describes its classes: the GUI's whole engine step.

    Returns a ``uint8`` label map of shape ``volume.shape[:3]``, the concept records of
    :func:`cotexnet.concepts.describe` (None with ``concepts=False``; with ``confidence`` each record
    also holds ``mean_confidence``, the class's mean top probability) and, with ``confidence``, the
    ``float32`` confidence map (each voxel's top class probability) of the same shape, else None.
    ``planes``, ``tta`` and ``postprocess`` are those of :func:`cotexnet.infer.predict_volume`. ``spacing``/``direction`` are in
    SimpleITK order (x, y, z; row-major LPS 3x3); the direction goes to inference so that "axial" means
    the patient's axial plane whatever the volume's orientation. A 2D image gets its in-plane spacing and
    no 3D direction for its concepts.
    """
    from .infer import _is_cancelled, predict_volume

    image, rgb = engine_input(volume)
    if _is_cancelled(cancel):
        raise Cancelled("cancelled by the user")
    prediction = predict_volume(model, image, direction=direction, spacing=spacing, axis=axis, planes=planes, tta=tta,
                                postprocess=postprocess, probabilities=confidence, rgb=rgb, batch_size=batch_size,
                                device=device, progress=progress, cancel=cancel)
    labels = prediction.labels
    certainty = prediction.confidence if confidence else None  # tta and planes average probabilities anyway
    records = None
    if concepts:
        from .concepts import describe

        if log is not None:
            log("Describing the segmented classes")
        planar = rgb or image.ndim == 2
        spatial_shape = image.shape[:2] if planar else image.shape
        spacing3, direction3 = (tuple(spacing)[:2], None) if planar else (tuple(spacing), tuple(direction))
        config = model.config
        records = describe(image, labels.reshape(spatial_shape), config.classes, keywords=config.keywords,
                           backend=concept_backend, spacing=spacing3, direction=direction3, **(concept_options or {}))
        if certainty is not None:
            for index, record in enumerate(records, start=1):
                inside = labels == index
                record["mean_confidence"] = round(float(certainty[inside].mean()), 4) if inside.any() else None
    if certainty is not None:
        certainty = certainty.reshape(volume.shape[:3]).astype(np.float32, copy=False)
    return labels.reshape(volume.shape[:3]).astype(np.uint8, copy=False), records, certainty


def device_info() -> dict:
    """Whether a CUDA GPU is usable, its name, total and free memory in GiB."""
    import torch

    if not torch.cuda.is_available():
        return {"cuda": False, "name": "CPU", "total_gb": 0.0, "free_gb": 0.0}
    free, total = torch.cuda.mem_get_info()
    return {"cuda": True, "name": torch.cuda.get_device_name(), "total_gb": total / 2**30, "free_gb": free / 2**30}


def _jsonable(value):
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, Path):
        return str(value)
    raise TypeError(f"{type(value).__name__} is not JSON serialisable")


class Worker:
    """The request loop. Segmentations run one at a time on a thread, so that status and device requests
    are answered while one runs; cancelling means ending this process (the client does)."""

    def __init__(self, stream):
        self._stream = stream
        self._write_lock = threading.Lock()
        self.models = ModelCache()
        self._busy = threading.Lock()
        self._running: tuple = (None, None)  # the running segmentation's id and its cancel event

    def send(self, event: str, request_id=None, **values) -> None:
        line = json.dumps({"id": request_id, "event": event, **values}, default=_jsonable, allow_nan=False)
        with self._write_lock:
            self._stream.write(line + "\n")
            self._stream.flush()

    def serve(self, lines) -> None:
        """Answers the requests in ``lines`` (bytes or text, one JSON object each) until ``shutdown`` or the end."""
        self.send("ready", pid=os.getpid(), protocol=PROTOCOL, python=sys.executable)
        for line in lines:
            try:
                text = line.decode("utf-8") if isinstance(line, bytes) else line
            except UnicodeDecodeError as error:  # one bad byte costs its request, not the worker
                self.send("error", None, error="ProtocolError", message=f"a request line is not UTF-8 ({error})")
                continue
            if not text.strip():
                continue
            try:
                request = json.loads(text)
                kind = request["type"]
            except (ValueError, KeyError, TypeError):
                self.send("error", None, error="ProtocolError", message=f"not a request: {text.strip()[:200]}")
                continue
            if kind == "shutdown":
                return
            if kind == "cancel":
                self._cancel(request.get("id"))
                continue
            handler = getattr(self, f"_handle_{kind}", None)
            if handler is None:
                self.send("error", request.get("id"), error="ProtocolError", message=f"unknown request type {kind!r}")
            elif kind == "segment":
                if not self._busy.acquire(blocking=False):
                    self.send("error", request.get("id"), error="ProtocolError",
                              message="a segmentation is already running in this worker")
                    continue
                self._running = (request.get("id"), threading.Event())
                threading.Thread(target=self._run, args=(handler, request, self._busy), daemon=True).start()
            else:
                self._run(handler, request)

    def _cancel(self, request_id) -> None:
        """Stops the running segmentation if it is ``request_id`` (it ends with a ``Cancelled`` error)."""
        running_id, cancelled = self._running
        if running_id == request_id and cancelled is not None:
            cancelled.set()

    def _run(self, handler, request: dict, busy: threading.Lock | None = None) -> None:
        request_id = request.get("id")
        try:
            reply = ("result", {"value": handler(request_id, request)})
        except BaseException as error:  # every failure goes back to the client, which decides what it means
            reply = ("error", {"error": type(error).__name__, "message": str(error),
                               "traceback": traceback.format_exc()})
        if busy is not None:  # free before answering: a client may send its next request the moment it reads this
            self._running = (None, None)
            busy.release()
        self.send(reply[0], request_id, **reply[1])

    def _handle_status(self, request_id, request: dict) -> dict:
        key = self.models.key
        return {"pid": os.getpid(), "protocol": PROTOCOL, "model_loads": self.models.loads,
                "model": None if key is None else {"path": key[0], "device": key[1]}}

    def _handle_device_info(self, request_id, request: dict) -> dict:
        return device_info()

    def _handle_segment(self, request_id, request: dict) -> dict:
        check_file(Path(request["input"]))  # a FIFO would hold the segmentation slot forever
        volume = np.load(request["input"], allow_pickle=False)
        device = request.get("device", "auto")
        model = self.models.get(request["model"], device)
        self.send("log", request_id, text=f"Model {Path(request['model']).name} ready ({self.models.loads} load(s) "
                                           f"in this worker)")
        labels, records, certainty = segment_array(
            model, volume, request["spacing"], request["direction"], axis=request.get("axis"),
            planes=request.get("planes"), tta=_flag(request, "tta", False),
            postprocess=_flag(request, "postprocess", True), confidence=_flag(request, "confidence", False),
            batch_size=int(request.get("batch_size", 16)), device=device,
            concepts=_flag(request, "concepts", True), concept_backend=request.get("concept_backend", "geometric"),
            concept_options=request.get("concept_options"),
            progress=lambda done, total: self.send("progress", request_id, done=int(done), total=int(total)),
            cancel=self._running[1], log=lambda text: self.send("log", request_id, text=text),
        )
        output = Path(request["output"])
        _save_npy(output, labels)
        reply = {"output": str(output), "shape": list(labels.shape), "concepts": records,
                 "model_loads": self.models.loads, "model_id": id(model)}
        if certainty is not None:
            reply["confidence"] = str(_save_npy(output.with_name(output.stem + "_confidence.npy"), certainty))
        return reply


def _flag(request: dict, name: str, default: bool) -> bool:
    """A yes/no field of a request: JSON ``true`` or ``false`` only (the string "false" is not false)."""
    value = request.get(name, default)
    if not isinstance(value, bool):
        raise ValueError(f"request field {name!r}: expected true or false, got {value!r}")
    return value


def _save_npy(path: Path, array: np.ndarray) -> Path:
    """``np.save`` under a temporary name, then renamed: the client never reads half a file."""
    partial = path.with_name(path.name + ".partial.npy")
    np.save(partial, array)
    os.replace(partial, path)
    return path


class _Client:
    """One connection to :class:`SharedWorkers`: its requests keep their ids towards it."""

    def __init__(self, writer: asyncio.StreamWriter):
        self._writer = writer
        self.task = asyncio.current_task()
        self.key = None  # the (model, device) of its last segmentation: the worker it keeps alive

    def close(self) -> None:
        self._writer.close()

    def send(self, event: dict) -> None:
        if not self._writer.is_closing():
            self._writer.write((json.dumps(event) + "\n").encode())


class _SharedWorker:
    """One ``cotexnet.worker`` process and its queue: one segmentation at a time; the next is the oldest queued
    request of the client served longest ago (a client that has not been served yet goes first)."""

    def __init__(self, key, process: asyncio.subprocess.Process, on_exit: Callable[["_SharedWorker"], None]):
        self.key, self.process, self._on_exit = key, process, on_exit
        self._queues: dict[_Client, deque] = {}  # clients with queued segmentations
        self._served: dict[_Client, int] = {}  # when each client's last segmentation started (a counter)
        self._routes: dict[int, tuple[_Client, object]] = {}  # our request id -> (client, its id)
        self._running: int | None = None
        self._ids = itertools.count(1)
        self.reader = asyncio.ensure_future(self._read())

    @property
    def idle(self) -> bool:
        return self._running is None and not self._queues and not self._routes

    def submit(self, client: _Client, request: dict) -> None:
        if request["type"] != "segment":  # answered by the worker while it segments
            self._send(client, request)
            return
        self._queues.setdefault(client, deque()).append(request)
        self._next()

    def forget(self, client: _Client) -> None:
        """The client has gone: its queued requests are dropped and its running one is cancelled."""
        self._queues.pop(client, None)
        self._served.pop(client, None)
        for request_id, (owner, _) in list(self._routes.items()):
            if owner is client:
                self._routes[request_id] = (None, None)
                if request_id == self._running:
                    self._write({"type": "cancel", "id": request_id})

    def _next(self) -> None:
        if self._running is not None or not self._queues:
            return
        client = min(self._queues, key=lambda waiting: self._served.get(waiting, -1))
        request = self._queues[client].popleft()
        if not self._queues[client]:
            del self._queues[client]
        self._running = self._send(client, request)
        self._served[client] = self._running

    def _send(self, client: _Client, request: dict) -> int:
        request_id = next(self._ids)
        self._routes[request_id] = (client, request.get("id"))
        self._write({**request, "id": request_id})
        return request_id

    def _write(self, request: dict) -> None:
        if self.process.returncode is None:
            self.process.stdin.write((json.dumps(request) + "\n").encode())

    async def _read(self) -> None:
        while line := await self.process.stdout.readline():
            try:
                event = json.loads(line)
            except ValueError:
                continue
            request_id = event.get("id")
            if request_id not in self._routes:
                continue  # "ready", or an error about no request
            client, client_id = self._routes[request_id]
            if event.get("event") in ("result", "error"):
                del self._routes[request_id]
                if request_id == self._running:
                    self._running = None
                    self._next()
            if client is not None:
                client.send({**event, "id": client_id})
        code = await self.process.wait()
        for client, client_id in self._routes.values():
            if client is not None:
                client.send({"id": client_id, "event": "error", "error": "WorkerError",
                             "message": f"the shared CoTexNet worker process ended unexpectedly (exit code {code}); "
                                        "the next run starts a new one"})
        for client, queued in self._queues.items():
            for request in queued:
                client.send({"id": request.get("id"), "event": "error", "error": "WorkerError",
                             "message": f"the shared CoTexNet worker process ended (exit code {code}) before this "
                                        "request ran; the next run starts a new one"})
        self._routes.clear()
        self._queues.clear()
        self.process._transport.close()  # asyncio leaves an exited process's pipes to the garbage collector
        self._on_exit(self)


class SharedWorkers:
    """Engine workers shared by every client that connects to ``address`` (a Unix socket in a private folder).

    Clients speak the worker protocol. A ``segment`` request goes to the worker of its (model, device),
    started on first use, so clients of one model share one copy of it in memory; each worker runs one
    segmentation at a time and takes its clients' queued requests in turn (round robin), so one client's
    batch cannot hold the others up. A client that disconnects has its queued requests dropped and its
    running one cancelled. A worker that no connected client uses any more is ended. Workers run in their own
    process group: a terminal's Ctrl-C reaches the owner, which ends them.
    """

    def __init__(self, address: str | os.PathLike, command: Sequence[str] | None = None):
        self.address = str(address)
        self._command = list(command or [sys.executable, "-m", "cotexnet.worker"])
        self._workers: dict[object, _SharedWorker] = {}
        self._starting: dict[object, asyncio.Future] = {}
        self._clients: set[_Client] = set()
        self._ending: set[_SharedWorker] = set()  # workers told to exit, until they have
        self._server: asyncio.AbstractServer | None = None

    @property
    def pids(self) -> list[int]:
        return [worker.process.pid for worker in self._workers.values()]

    async def start(self) -> None:
        self._server = await asyncio.start_unix_server(self._serve_client, self.address, limit=MAX_LINE_BYTES)
        os.chmod(self.address, 0o600)

    async def close(self) -> None:
        """Stops listening and ends every worker (their stdin closes; what is left is killed after 3 s)."""
        if self._server is not None:
            self._server.close()
        clients = list(self._clients)
        for client in clients:
            client.close()  # its connection ends: its task cleans up and returns
        await asyncio.gather(*(client.task for client in clients), return_exceptions=True)
        workers = [*self._workers.values(), *self._ending]
        self._workers.clear()
        for worker in workers:
            worker.process.stdin.close()
        done = asyncio.gather(*(worker.process.wait() for worker in workers))
        try:
            await asyncio.wait_for(asyncio.shield(done), 3.0)
        except asyncio.TimeoutError:
            for worker in workers:
                if worker.process.returncode is None:
                    worker.process.kill()
            await done
        await asyncio.gather(*(worker.reader for worker in workers), return_exceptions=True)

    async def _worker(self, key) -> _SharedWorker:
        if key in self._workers:
            return self._workers[key]
        if key not in self._starting:
            self._starting[key] = asyncio.ensure_future(self._start_worker(key))
        try:
            return await asyncio.shield(self._starting[key])
        finally:
            self._starting.pop(key, None)

    async def _start_worker(self, key) -> _SharedWorker:
        environment = {name: value for name, value in os.environ.items() if name != SOCKET_ENVIRONMENT}
        process = await asyncio.create_subprocess_exec(*self._command, stdin=asyncio.subprocess.PIPE,
                                                       stdout=asyncio.subprocess.PIPE, env=environment,
                                                       limit=MAX_LINE_BYTES, start_new_session=True)
        self._workers[key] = _SharedWorker(key, process, self._ended)
        return self._workers[key]

    def _ended(self, worker: _SharedWorker) -> None:
        self._ending.discard(worker)
        if self._workers.get(worker.key) is worker:
            del self._workers[worker.key]

    def _end_unused(self) -> None:
        used = {client.key for client in self._clients}
        for key, worker in list(self._workers.items()):
            if key not in used and worker.idle:
                del self._workers[key]
                self._ending.add(worker)
                worker.process.stdin.close()  # it exits by itself

    def _status(self) -> dict:
        return {"pid": os.getpid(), "protocol": PROTOCOL, "shared": True,
                "workers": [{"model": key[0], "device": key[1], "pid": worker.process.pid}
                            for key, worker in self._workers.items()]}

    async def _serve_client(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        client = _Client(writer)
        self._clients.add(client)
        try:
            while line := await reader.readline():
                try:
                    request = json.loads(line.decode("utf-8"))
                    kind = request["type"]
                except (ValueError, KeyError, TypeError):
                    client.send({"id": None, "event": "error", "error": "ProtocolError",
                                 "message": f"not a request: {line.decode('utf-8', 'replace').strip()[:200]}"})
                    continue
                if kind == "shutdown":
                    break
                if kind == "status":
                    client.send({"id": request.get("id"), "event": "result", "value": self._status()})
                    continue
                if kind == "segment":
                    client.key = (str(request.get("model")), str(request.get("device", "auto")))
                    self._end_unused()
                # device facts come from any worker (the client's own when it has one)
                key = client.key or next(iter(self._workers), ("", "auto"))
                (await self._worker(key)).submit(client, request)
        except (ConnectionError, ValueError):
            pass  # a client that vanished, or sent a line over MAX_LINE_BYTES
        finally:
            self._clients.discard(client)
            for worker in self._workers.values():
                worker.forget(client)
            self._end_unused()
            client.close()


def relay(address: str) -> int:
    """The client side of :class:`SharedWorkers` behind a worker's command line: stdin to the socket, the
    socket to stdout. Ends when the client closes stdin (0) or the shared workers go away (1)."""
    connection = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        connection.connect(address)
    except OSError as error:
        print(f"cannot reach the shared CoTexNet workers at {address}: {error}", file=sys.stderr)
        return 1
    stdout = sys.stdout.buffer
    stdout.write((json.dumps({"id": None, "event": "ready", "pid": os.getpid(), "protocol": PROTOCOL,
                              "python": sys.executable, "shared": address}) + "\n").encode())
    stdout.flush()
    client_done = threading.Event()

    def forward_requests() -> None:
        with contextlib.suppress(OSError):
            while chunk := os.read(sys.stdin.fileno(), 1 << 16):
                connection.sendall(chunk)
        client_done.set()
        with contextlib.suppress(OSError):
            connection.shutdown(socket.SHUT_WR)

    threading.Thread(target=forward_requests, daemon=True).start()
    with contextlib.suppress(OSError):
        while chunk := connection.recv(1 << 16):
            stdout.write(chunk)
            stdout.flush()
    return 0 if client_done.is_set() else 1


def main() -> int:
    address = os.environ.get(SOCKET_ENVIRONMENT)
    if address:
        os._exit(relay(address))
    # stdout carries the protocol only: keep it for ourselves and send everything else (prints, C
    # libraries) to stderr.
    protocol = os.fdopen(os.dup(sys.stdout.fileno()), "w", encoding="utf-8", buffering=1)
    os.dup2(sys.stderr.fileno(), sys.stdout.fileno())
    Worker(protocol).serve(sys.stdin.buffer)
    protocol.flush()
    os._exit(0)  # also when stdin closed mid-run (Slicer is gone): do not wait for a segmentation thread


if __name__ == "__main__":
    sys.exit(main())
