"""GUI segmentation in the persistent worker process (``python -m cotexnet.worker``), on real MRML classes.

Why a process: Slicer never enables PythonQt's thread support, so the main thread holds the GIL while
Qt's event loop runs and a Python thread advances only while the main thread runs Python (see
docs/slicer-worker.md). The worker is started through a stand-in for PythonSlicer (a launcher that runs
the interpreter as its child, as ``ctkAppLauncherPrivate::runProcess`` does in commontk/AppLauncher,
Base/ctkAppLauncher.cpp lines 668-686 at dcb7a7e: stdin/stdout forwarded, no signals), so Cancel and
crashes are checked on a real process tree.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import psutil
import pytest

slicer = pytest.importorskip("slicer")

from CoTexNetSegmentLib import CoTexNetSegmentLogic, mrml, processes  # noqa: E402
from CoTexNetSegmentLib import worker as worker_module  # noqa: E402
from CoTexNetSegmentLib.worker import SegmentationWorker, WorkerError  # noqa: E402
from test_processes import LAUNCHER  # noqa: E402
from test_slicer_segment import CLASSES, add_volume, bundle, node_ids, phantom, scene  # noqa: E402,F401

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def launched_worker(tmp_path_factory):
    """A worker started through the stand-in PythonSlicer launcher; stopped after the module's tests."""
    path = tmp_path_factory.mktemp("launcher") / "PythonSlicer"
    path.write_text(f"#!{sys.executable}\n{LAUNCHER}", encoding="utf-8")
    path.chmod(0o755)
    worker = SegmentationWorker(command=[str(path), "-m", "cotexnet.worker"])
    yield worker
    worker.stop()


def run(job, timeout=120.0) -> list:
    """Polls a job the way the widget's timer does; returns its events."""
    events = []
    deadline = time.monotonic() + timeout
    while not job.finished:
        assert time.monotonic() < deadline, f"{job.name} did not finish within {timeout} s"
        events += job.poll()
        time.sleep(0.01)
    return events


def poll_until_progress(job, timeout=120.0) -> None:
    deadline = time.monotonic() + timeout
    while not any(event.kind == "progress" for event in job.poll()):
        assert not job.finished, f"{job.name} ended before it reported progress: {job.state} {job.error}"
        assert time.monotonic() < deadline
        time.sleep(0.01)


def table_cells(table) -> list[list[str]]:
    return [[table.GetCellText(r, c) for c in range(table.GetNumberOfColumns())] for r in range(table.GetNumberOfRows())]


def tree_pids(worker) -> list[int]:
    """The launcher's pid and the interpreter's own pid (reported by the worker)."""
    assert worker.pid is not None and worker.pid != worker.process.pid  # the interpreter is the launcher's child
    return [worker.process.pid, worker.pid]


# ------------------------------------------------------------------------------------------ results


def test_worker_result_equals_the_in_process_result_voxel_for_voxel(scene, bundle, launched_worker):
    volume = add_volume(scene, phantom())
    logic = CoTexNetSegmentLogic(scene, worker=launched_worker)
    job = logic.startSegmentation(volume, bundle, "cpu", batchSize=4)
    events = run(job)
    assert job.state == job.DONE, job.error
    assert [e.value for e in events if e.kind == "progress"] == [(4, 6), (6, 6)]
    in_process = logic.segment(volume, bundle, "cpu", batchSize=4)

    worker_labels = mrml.segmentationToLabelMap(job.result, volume, CLASSES)
    local_labels = mrml.segmentationToLabelMap(in_process, volume, CLASSES)
    assert worker_labels.shape == phantom().shape
    assert len(np.unique(worker_labels)) >= 2  # not a constant map: the comparison means something
    np.testing.assert_array_equal(worker_labels, local_labels)
    assert table_cells(logic.conceptTable(job.result)) == table_cells(logic.conceptTable(in_process))


def test_second_run_reuses_the_loaded_model(scene, bundle, launched_worker, tmp_path):
    import shutil

    logic = CoTexNetSegmentLogic(scene, worker=launched_worker)
    launched_worker.stop()  # a fresh worker: the first run below loads the model
    volume = add_volume(scene, phantom())
    replies, seconds = [], []
    for _ in range(2):
        started = time.perf_counter()
        job = logic.startSegmentation(volume, bundle, "cpu", concepts=False)
        run(job)
        seconds.append(time.perf_counter() - started)
        assert job.state == job.DONE, job.error
        replies.append(job.reply)
    print(f"tiny model via worker: first run {seconds[0]:.2f} s, second run {seconds[1]:.2f} s")
    assert [r["model_loads"] for r in replies] == [1, 1]
    assert replies[0]["model_id"] == replies[1]["model_id"]
    status = launched_worker.request("status")
    assert status["model_loads"] == 1 and status["pid"] == launched_worker.pid
    assert status["model"] == {"path": str(Path(bundle).resolve()), "device": "cpu"}

    other = tmp_path / "other"  # another model folder is loaded, so the counter counts real loads
    shutil.copytree(bundle, other)
    job = logic.startSegmentation(volume, other, "cpu", concepts=False)
    run(job)
    assert job.state == job.DONE and job.reply["model_loads"] == 2


def test_device_facts_come_from_the_worker(scene, launched_worker):
    import torch

    logic = CoTexNetSegmentLogic(scene, worker=launched_worker)
    info = logic.deviceInfo()
    assert info.cuda == torch.cuda.is_available()
    assert info.name == (torch.cuda.get_device_name() if info.cuda else "CPU")
    job = logic.startDeviceInfo()  # the widget's non-blocking way
    run(job, timeout=60)
    assert job.state == job.DONE and (job.result.cuda, job.result.name) == (info.cuda, info.name)  # free memory varies


def test_engine_errors_come_back_with_their_type_and_message(scene, bundle, launched_worker, tmp_path):
    from cotexnet.errors import BundleError

    corrupt = tmp_path / "corrupt"
    import shutil

    shutil.copytree(bundle, corrupt)
    weights = corrupt / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    volume = add_volume(scene, phantom())
    before = node_ids(scene)
    job = CoTexNetSegmentLogic(scene, worker=launched_worker).startSegmentation(volume, corrupt, "cpu")
    with pytest.raises(BundleError, match="model.safetensors"):
        job.wait(120)
    assert node_ids(scene) == before
    assert "Traceback" in job.error.remoteTraceback
    assert launched_worker.alive  # an engine error does not end the worker


# ------------------------------------------------------------------------------------------ cancel, crash


def segmentation_under_way(scene, bundle, worker):
    """A 400-slice segmentation through ``worker``, one slice per batch, past its first progress event: long
    enough to be cancelled or crashed mid-run. Returns the logic, the volume, the scene's node IDs before
    the run, and the job."""
    volume = add_volume(scene, phantom(shape=(400, 28, 32)))
    before = node_ids(scene)
    logic = CoTexNetSegmentLogic(scene, worker=worker)
    job = logic.startSegmentation(volume, bundle, "cpu", batchSize=1)
    poll_until_progress(job)
    return logic, volume, before, job


def assert_next_run_works(logic, volume, bundle) -> None:
    job = logic.startSegmentation(volume, bundle, "cpu", batchSize=64, concepts=False)
    run(job)
    assert job.state == job.DONE, job.error


def test_cancel_mid_run_leaves_the_scene_unchanged_and_no_process_behind(scene, bundle, launched_worker):
    logic, volume, before, job = segmentation_under_way(scene, bundle, launched_worker)
    pids = tree_pids(launched_worker)
    assert logic.deviceInfo(timeout=10).name  # answered while the segmentation runs
    job.cancel()
    run(job, timeout=10)
    assert job.state == job.CANCELLED and job.progress[0] < 400
    assert node_ids(scene) == before
    assert not any(processes.isRunning(pid) for pid in pids)

    assert_next_run_works(logic, volume, bundle)  # on a new worker
    assert launched_worker.pid not in pids


def test_killed_worker_gives_a_clear_error_and_the_next_run_works(scene, bundle, launched_worker):
    logic, volume, before, job = segmentation_under_way(scene, bundle, launched_worker)
    launcher, interpreter = tree_pids(launched_worker)
    psutil.Process(interpreter).kill()  # a crash of the interpreter behind the launcher
    run(job, timeout=30)
    assert job.state == job.FAILED and isinstance(job.error, WorkerError)
    assert "worker process ended unexpectedly" in str(job.error) and "next run starts a new one" in str(job.error)
    assert node_ids(scene) == before

    assert_next_run_works(logic, volume, bundle)
    assert launched_worker.pid != interpreter


# ------------------------------------------------------------------------------------------ shared workers


@pytest.fixture
def shared_workers(monkeypatch):
    """cotexnet.worker.SharedWorkers on a private socket, served from a thread's event loop (as the web app's
    gateway serves it from its own); every SegmentationWorker started here relays to it."""
    import asyncio
    import tempfile
    import threading

    from cotexnet.worker import SOCKET_ENVIRONMENT, SharedWorkers

    folder = tempfile.mkdtemp(prefix="cx-")  # short: a Unix socket's path is limited to about 100 bytes
    workers = SharedWorkers(os.path.join(folder, "workers.sock"))
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    asyncio.run_coroutine_threadsafe(workers.start(), loop).result(10)
    monkeypatch.setenv(SOCKET_ENVIRONMENT, workers.address)
    yield workers
    asyncio.run_coroutine_threadsafe(workers.close(), loop).result(30)
    loop.call_soon_threadsafe(loop.stop)
    thread.join(10)


def relayed_worker() -> SegmentationWorker:
    return SegmentationWorker(command=[sys.executable, "-m", "cotexnet.worker"])


def wait_until(condition, timeout=30.0, what="condition"):
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


def test_sessions_share_one_worker_and_one_loaded_model(scene, bundle, shared_workers):
    """Two clients (two web sessions) segmenting with the same model on the same device: one worker process,
    the model loaded once, the same labels as in-process; the worker ends when no client uses it."""
    volume = add_volume(scene, phantom())
    clients = [relayed_worker() for _ in range(2)]
    jobs = [CoTexNetSegmentLogic(scene, worker=client).startSegmentation(volume, bundle, "cpu", concepts=False)
            for client in clients]
    for job in jobs:
        run(job)
        assert job.state == job.DONE, job.error
    assert [job.reply["model_loads"] for job in jobs] == [1, 1]
    assert jobs[0].reply["model_id"] == jobs[1].reply["model_id"]
    [engine] = shared_workers.pids
    assert all(processes.isRunning(client.pid) and client.pid != engine for client in clients)  # relays, not engines
    in_process = CoTexNetSegmentLogic(scene).segment(volume, bundle, "cpu", concepts=False)
    expected = mrml.segmentationToLabelMap(in_process, volume, CLASSES)
    for job in jobs:
        np.testing.assert_array_equal(mrml.segmentationToLabelMap(job.result, volume, CLASSES), expected)
    status = clients[0].request("status")
    assert status["workers"] == [{"model": str(Path(bundle).resolve()), "device": "cpu", "pid": engine}]
    for client in clients:
        client.stop()
    wait_until(lambda: not processes.isRunning(engine), what="the unused worker to end")


def test_queued_segmentations_take_turns_and_a_cancel_frees_the_worker_for_the_next(scene, bundle, shared_workers):
    """Client A queues three segmentations, client B one while A's first runs: B's runs second, not after all
    of A's. Then A cancels while B waits: A's run stops, B's runs on the same worker without a reload."""
    slow = add_volume(scene, phantom(shape=(120, 28, 32)), name="slow")
    small = add_volume(scene, phantom(), name="small")
    first, second = relayed_worker(), relayed_worker()
    second.request("status")  # connected before A's runs start, so its request arrives while A1 runs
    logic_a, logic_b = CoTexNetSegmentLogic(scene, worker=first), CoTexNetSegmentLogic(scene, worker=second)
    a_jobs = [logic_a.startSegmentation(slow, bundle, "cpu", batchSize=1, concepts=False) for _ in range(3)]
    poll_until_progress(a_jobs[0])
    b_job = logic_b.startSegmentation(small, bundle, "cpu", concepts=False)
    order = []
    deadline = time.monotonic() + 300
    pending = {"A1": a_jobs[0], "A2": a_jobs[1], "A3": a_jobs[2], "B": b_job}
    while pending:
        assert time.monotonic() < deadline, f"still running: {list(pending)}"
        for name, job in list(pending.items()):
            job.poll()
            if job.finished:
                assert job.state == job.DONE, (name, job.error)
                order.append(name)
                del pending[name]
        time.sleep(0.01)
    assert order == ["A1", "B", "A2", "A3"]

    [engine] = shared_workers.pids
    cancelled = logic_a.startSegmentation(slow, bundle, "cpu", batchSize=1, concepts=False)
    poll_until_progress(cancelled)
    waiting = logic_b.startSegmentation(small, bundle, "cpu", concepts=False)
    cancelled.cancel()
    run(cancelled, timeout=10)
    assert cancelled.state == cancelled.CANCELLED
    run(waiting, timeout=60)
    assert waiting.state == waiting.DONE and waiting.reply["model_loads"] == 1
    assert shared_workers.pids == [engine]
    first.stop()
    second.stop()


# ------------------------------------------------------------------------------------------ lifecycle


def test_worker_protocol_status_unknown_request_and_shutdown():
    """The engine side alone: ready line, answers by id, a clear error for a bad request, clean exit."""
    environment = dict(os.environ, PYTHONPATH=str(REPO))
    process = subprocess.Popen([sys.executable, "-m", "cotexnet.worker"], stdin=subprocess.PIPE,
                               stdout=subprocess.PIPE, encoding="utf-8", errors="replace", env=environment)
    requests = [{"id": 1, "type": "status"}, {"id": 2, "type": "teleport"}, "not json", {"type": "shutdown"}]
    output, _ = process.communicate("\n".join(r if isinstance(r, str) else json.dumps(r) for r in requests) + "\n",
                                    timeout=60)
    messages = [json.loads(line) for line in output.splitlines()]
    assert messages[0]["event"] == "ready" and messages[0]["pid"] == process.pid
    assert messages[1] == {"id": 1, "event": "result", "value": {"pid": process.pid, "protocol": 1,
                                                                 "model_loads": 0, "model": None}}
    assert messages[2]["id"] == 2 and messages[2]["event"] == "error" and "'teleport'" in messages[2]["message"]
    assert messages[3]["event"] == "error" and "not a request: not json" in messages[3]["message"]
    assert process.returncode == 0 and len(messages) == 4


def test_worker_exits_when_its_parent_closes_stdin():
    """If Slicer dies without quitting properly, the pipe closes and the worker ends by itself."""
    environment = dict(os.environ, PYTHONPATH=str(REPO))
    process = subprocess.Popen([sys.executable, "-m", "cotexnet.worker"], stdin=subprocess.PIPE,
                               stdout=subprocess.PIPE, env=environment)
    assert json.loads(process.stdout.readline())["event"] == "ready"
    process.stdin.close()
    assert process.wait(30) == 0


def test_shared_worker_stops_when_the_application_quits(monkeypatch):
    """Extensions stop their processes on ``slicer.app``'s aboutToQuit() signal (module cleanup() does not
    run at exit); outside the application, atexit does it."""
    connections, exits = [], []

    class App:
        def connect(self, signal, slot):
            connections.append((signal, slot))

    monkeypatch.setattr(worker_module, "_shared", None)
    monkeypatch.setattr(slicer, "app", App(), raising=False)
    monkeypatch.setattr(worker_module.atexit, "register", exits.append)
    shared = worker_module.sharedWorker()
    assert worker_module.sharedWorker() is shared  # one per application
    assert connections == [("aboutToQuit()", shared.stop)] and exits == [shared.stop]


def test_stop_ends_the_whole_tree(launched_worker):
    launched_worker.request("status")
    pids = tree_pids(launched_worker)
    launched_worker.stop()
    assert launched_worker.process is None
    assert not any(processes.isRunning(pid) for pid in pids)


# ------------------------------------------------------------------------------------------ module open


def test_opening_the_module_imports_no_torch(bundle):
    """What the widget's setup() asks of the logic (and of the Lib) runs without importing torch here."""
    code = f"""
import sys
sys.path[:0] = [{str(REPO)!r}, {str(REPO / 'CoTexNetSegment')!r}]
import slicer
from CoTexNetSegmentLib import CoTexNetSegmentLogic, backbone, dependencies
scene = slicer.vtkMRMLScene()
slicer.mrmlScene = scene
logic = CoTexNetSegmentLogic(scene)
logic.getParameterNode()
dependencies.checkRequirements()
backbone.cachedBackbone(backbone.DEFAULT_BACKBONE, {str(bundle.parent / 'no-cache')!r})
config = logic.bundleConfig({str(bundle)!r})
info = logic.deviceInfo()
assert 'torch' not in sys.modules, 'torch was imported'
print(config.classes, info.describe())
"""
    result = subprocess.run([sys.executable, "-c", code], capture_output=True,
                            encoding="utf-8", errors="replace", timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == f"{CLASSES} No CUDA GPU detected: CoTexNet runs on the CPU."
