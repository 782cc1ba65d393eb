"""Engine processes: Cancel/Stop end the whole process tree, and one trainer per run folder (run.lock).

PythonSlicer is a CTKAppLauncher. ``ctkAppLauncherPrivate::runProcess`` (commontk/AppLauncher,
Base/ctkAppLauncher.cpp, lines 668-686 at dcb7a7e) starts the real interpreter with ``QProcess`` using
``ForwardedChannels`` and ``ForwardedInputChannel``: the child shares the launcher's stdin and stdout, and
the launcher installs no signal handler that would pass a SIGTERM on. The stand-in launcher below does the
same: it starts a child interpreter with inherited stdio and dies on SIGTERM without telling it.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

slicer = pytest.importorskip("slicer")

from CoTexNetSegmentLib import backbone, processes  # noqa: E402
from CoTexNetTrainLib import CoTexNetTrainLogic, TrainingRunError  # noqa: E402
from CoTexNetTrainLib import logic as train_logic  # noqa: E402

from cotexnet.runlock import LOCK_NAME, RunLock, RunLockedError, read_holder  # noqa: E402
from test_train import shapes_dataset  # noqa: E402

LAUNCHER = """\
import os, subprocess, sys
# Like CTKAppLauncher: run the real interpreter as a child with inherited stdio, forward no signal.
# STAND_IN_CHILD replaces the command with a stand-in program (to test without running the engine).
arguments = ["-c", os.environ["STAND_IN_CHILD"]] if os.environ.get("STAND_IN_CHILD") else sys.argv[1:]
sys.exit(subprocess.call([sys.executable, *arguments]))
"""
#: The interpreter's stand-in: writes its pid where the test looks, then sleeps (ignoring SIGTERM if asked).
SLEEPER = """\
import os, signal, time
if os.environ.get("STAND_IN_IGNORE_TERM"):
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
with open(os.environ["STAND_IN_PID_FILE"] + ".tmp", "w") as f:
    f.write(str(os.getpid()))
os.replace(os.environ["STAND_IN_PID_FILE"] + ".tmp", os.environ["STAND_IN_PID_FILE"])
time.sleep(120)
"""


@pytest.fixture
def launcher(tmp_path, monkeypatch):
    """An executable stand-in for PythonSlicer; yields (path, pid file of the interpreter it starts)."""
    path = tmp_path / "PythonSlicer"
    path.write_text(f"#!{sys.executable}\n{LAUNCHER}", encoding="utf-8")
    path.chmod(0o755)
    pid_file = tmp_path / "interpreter.pid"
    monkeypatch.setenv("STAND_IN_PID_FILE", str(pid_file))
    yield path, pid_file
    if pid_file.exists():  # never leave a sleeper behind, whatever the test did
        pid = int(pid_file.read_text())
        if processes.isRunning(pid):
            psutil.Process(pid).kill()


def interpreter_pid(pid_file: Path, timeout: float = 30.0) -> int:
    deadline = time.monotonic() + timeout
    while not pid_file.exists():
        assert time.monotonic() < deadline, "the stand-in interpreter did not start"
        time.sleep(0.02)
    return int(pid_file.read_text())


@pytest.fixture(scope="module")
def shapes(tmp_path_factory):
    return shapes_dataset(tmp_path_factory.mktemp("shapes"), count=6, size=48)


# ------------------------------------------------------------------------------------------ process tree


def test_terminating_the_launcher_alone_leaves_the_interpreter_running(launcher, monkeypatch):
    """The defect being fixed: Popen.terminate() ends PythonSlicer, not the interpreter it started."""
    path, pid_file = launcher
    monkeypatch.setenv("STAND_IN_CHILD", SLEEPER)
    process = subprocess.Popen([str(path)])
    pid = interpreter_pid(pid_file)
    process.terminate()
    process.wait(10)
    time.sleep(0.3)
    assert processes.isRunning(pid)


def test_kill_process_tree_ends_launcher_and_interpreter_even_if_it_ignores_sigterm(launcher, monkeypatch):
    path, pid_file = launcher
    monkeypatch.setenv("STAND_IN_CHILD", SLEEPER)
    monkeypatch.setenv("STAND_IN_IGNORE_TERM", "1")
    process = subprocess.Popen([str(path)])
    pid = interpreter_pid(pid_file)
    processes.killProcessTree(process, timeout=1.0)
    assert process.returncode is not None
    assert not processes.isRunning(pid)


def test_backbone_download_cancel_ends_the_interpreter_behind_the_launcher(launcher, monkeypatch, tmp_path):
    from cotexnet.errors import Cancelled

    path, pid_file = launcher
    monkeypatch.setattr(backbone, "pythonExecutable", lambda: str(path))
    monkeypatch.setattr(backbone, "_DOWNLOAD_SCRIPT", SLEEPER)
    monkeypatch.setattr(backbone, "_expectedBytes", lambda repo: 1000)
    job = backbone.startBackboneDownload("org/model", str(tmp_path / "cache"))
    pid = interpreter_pid(pid_file)
    job.cancel()
    with pytest.raises(Cancelled):
        job.wait(30)
    assert not processes.isRunning(pid)


#: A stand-in for ``python -m cotexnet.worker``: says ready with its pid, answers "quick" requests at once and
#: leaves every other request running.
FAKE_WORKER = """\
import json, os, sys
print(json.dumps({"event": "ready", "pid": os.getpid()}), flush=True)
for line in sys.stdin:
    request = json.loads(line)
    if request.get("type") == "quick":
        print(json.dumps({"id": request["id"], "event": "result", "value": "done"}), flush=True)
"""


def _job(worker, kind, name):
    from CoTexNetSegmentLib.worker import WorkerJob

    return WorkerJob(worker, kind, {}, decode=lambda value: value, finish=lambda value: value, name=name)


def _settle(job, timeout=30.0):
    deadline = time.monotonic() + timeout
    while not job.finished and time.monotonic() < deadline:
        job.poll()
        time.sleep(0.02)


def test_a_job_whose_shared_worker_was_ended_for_another_job_fails_with_a_clear_message():
    """The module, the effect and CoTexNetTrain share one worker, and Cancel ends it. Another widget's running job
    then failed with "exit code None", or, when a new request restarted the worker before its next poll (which
    wipes the request ids), never finished. Each job belongs to the worker generation it was sent to."""
    from CoTexNetSegmentLib.worker import SegmentationWorker

    worker = SegmentationWorker(command=[sys.executable, "-c", FAKE_WORKER])
    try:
        segmentation, download = _job(worker, "slow", "Segmentation"), _job(worker, "slow", "Device check")
        download.cancel()  # ends the shared worker
        _settle(segmentation)
        assert segmentation.state == segmentation.FAILED
        assert "ended for another job" in str(segmentation.error) and "exit code" not in str(segmentation.error)

        waiting, cancelled = _job(worker, "slow", "Segmentation"), _job(worker, "slow", "Effect")
        cancelled.cancel()
        following = _job(worker, "quick", "Next run")  # restarts the worker before `waiting` is polled again
        _settle(waiting, timeout=10)
        assert waiting.state == waiting.FAILED and "ended for another job" in str(waiting.error)
        _settle(following)
        assert following.state == following.DONE and following.result == "done"
    finally:
        worker.stop()


def test_cancel_before_psutil_is_installed_ends_the_launcher_and_the_interpreter(launcher, monkeypatch):
    """psutil is one of the packages CoTexNet installs; Cancel or cleanup() during the first device check ran
    ``import psutil`` and raised. Without it, the launcher (Popen.kill) and the interpreter whose pid the worker
    reported are killed."""
    from CoTexNetSegmentLib.worker import SegmentationWorker

    path, pid_file = launcher
    worker = SegmentationWorker(command=[str(path), "-c", FAKE_WORKER])
    job = _job(worker, "slow", "Device check")
    deadline = time.monotonic() + 30
    while worker.pid is None:
        assert time.monotonic() < deadline, "the worker did not say ready"
        worker.pump()
        time.sleep(0.02)
    launcher_process, interpreter = worker.process, worker.pid
    with monkeypatch.context() as without:
        without.setitem(sys.modules, "psutil", None)  # import psutil raises ImportError
        job.cancel()
    assert launcher_process.poll() is not None
    deadline = time.monotonic() + 10
    while processes.isRunning(interpreter):
        assert time.monotonic() < deadline, "the interpreter behind the launcher is still running"
        time.sleep(0.05)


def test_the_download_process_opens_no_console_window(monkeypatch, tmp_path):
    """On Windows a child process gets a console window unless ``CREATE_NO_WINDOW`` is passed, as the worker
    and the training process do (CoTexNetSegmentLib.processes.NO_WINDOW)."""
    windows_flag = 0x08000000  # CREATE_NO_WINDOW, the value subprocess has on Windows
    monkeypatch.setattr(backbone, "NO_WINDOW", windows_flag)
    monkeypatch.setattr(backbone, "_DOWNLOAD_SCRIPT", "print('/fetched')")
    monkeypatch.setattr(backbone, "_expectedBytes", lambda repo: 0)
    real_popen, flags = subprocess.Popen, []

    def popen(*args, **kwargs):
        flags.append(kwargs.pop("creationflags", None))  # POSIX refuses Windows flags
        return real_popen(*args, **kwargs)

    monkeypatch.setattr(backbone.subprocess, "Popen", popen)
    assert str(backbone.startBackboneDownload("org/model", str(tmp_path)).wait(30)) == "/fetched"
    assert flags == [windows_flag]


def test_peek_named_pipe_is_declared_so_64_bit_handles_pass_whole():
    """ctypes passes an undeclared argument as a C int: a pipe handle above 2**31 on 64-bit Windows was cut
    (or refused). ``PeekNamedPipe`` gets its argtypes and restype, and a 2**40 handle arrives whole."""
    import ctypes
    from ctypes import wintypes

    from CoTexNetSegmentLib.worker import _peekNamedPipe

    received = []
    prototype = ctypes.CFUNCTYPE(wintypes.BOOL, wintypes.HANDLE, wintypes.LPVOID, wintypes.DWORD,
                                 wintypes.LPDWORD, wintypes.LPDWORD, wintypes.LPDWORD)

    def peek(handle, buffer, size, read, available, left):
        received.append(handle)
        available[0] = 7
        return 1

    callback = prototype(peek)
    undeclared = ctypes.CFUNCTYPE(ctypes.c_int)(ctypes.cast(callback, ctypes.c_void_p).value)  # like windll's
    kernel32 = type("Kernel32", (), {"PeekNamedPipe": undeclared})()
    available = wintypes.DWORD()
    assert _peekNamedPipe(kernel32)(2 ** 40, None, 0, None, ctypes.byref(available), None)
    assert received == [2 ** 40] and available.value == 7
    assert kernel32.PeekNamedPipe.argtypes[0] is wintypes.HANDLE and kernel32.PeekNamedPipe.restype is wintypes.BOOL


def _start_training(logic, shapes, outDir, monkeypatch, path):
    monkeypatch.setattr(train_logic, "pythonExecutable", lambda: str(path))
    logic.train(str(shapes), ["disk", "square"], outDir, waitForCompletion=False)
    assert logic.isRunning


def test_training_terminate_ends_the_whole_tree(launcher, monkeypatch, shapes, tmp_path):
    path, pid_file = launcher
    monkeypatch.setenv("STAND_IN_CHILD", SLEEPER)
    monkeypatch.setenv("STAND_IN_IGNORE_TERM", "1")  # a run that does not stop: terminate must kill it
    logic = CoTexNetTrainLogic(slicer.vtkMRMLScene())
    _start_training(logic, shapes, tmp_path / "run", monkeypatch, path)
    pid = interpreter_pid(pid_file)
    logic.terminate(timeout=1.0)
    assert not logic.isRunning and not processes.isRunning(pid)
    assert logic.state == "failed"  # nothing was saved: no bundle to fall back to


def test_training_stop_ends_the_whole_tree(launcher, monkeypatch, shapes, tmp_path):
    """Stop asks through the stop file first; the stand-in ignores it, so Stop terminates the tree."""
    path, pid_file = launcher
    monkeypatch.setenv("STAND_IN_CHILD", SLEEPER)
    logic = CoTexNetTrainLogic(slicer.vtkMRMLScene())
    _start_training(logic, shapes, tmp_path / "run", monkeypatch, path)
    pid = interpreter_pid(pid_file)
    assert logic.stop(timeout=0.5) is None
    assert (tmp_path / "run" / train_logic.STOP_FILE).exists()
    assert not logic.isRunning and not processes.isRunning(pid)


# ------------------------------------------------------------------------------------------ run lock

HOLDER = """\
import sys, time
from cotexnet.runlock import RunLock
with RunLock(sys.argv[1]):
    print("locked", flush=True)
    time.sleep(120)
"""


@pytest.fixture
def live_holder(tmp_path):
    """Another process holding ``tmp_path / 'run'``; yields (folder, its pid)."""
    folder = tmp_path / "run"
    environment = dict(os.environ, PYTHONPATH=os.pathsep.join([str(Path(__file__).resolve().parents[1]),
                                                              os.environ.get("PYTHONPATH", "")]))
    process = subprocess.Popen([sys.executable, "-c", HOLDER, str(folder)], stdout=subprocess.PIPE,
                               encoding="utf-8", errors="replace",
                               env=environment)
    assert process.stdout.readline().strip() == "locked"
    yield folder, process.pid
    process.kill()
    process.wait()


def test_lock_file_names_its_holder(tmp_path):
    import socket

    with RunLock(tmp_path / "run") as lock:
        data = json.loads((tmp_path / "run" / LOCK_NAME).read_text(encoding="utf-8"))
        assert data["pid"] == os.getpid() and data["host"] == socket.gethostname()
        assert abs(data["started"] - time.time()) < 5
        assert read_holder(tmp_path / "run") == lock.holder
        with pytest.raises(RunLockedError, match=rf"in use by training process {os.getpid()} "):
            RunLock(tmp_path / "run").acquire()
    assert not (tmp_path / "run" / LOCK_NAME).exists()


def test_second_acquire_fails_naming_the_live_pid(live_holder):
    folder, pid = live_holder
    with pytest.raises(RunLockedError, match=rf"{folder} is in use by training process {pid} "):
        RunLock(folder).acquire()
    assert read_holder(folder).pid == pid  # the holder's lock is untouched


def _write_lock(folder: Path, pid: int, started: float) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / LOCK_NAME).write_text(json.dumps({"pid": pid, "host": __import__("socket").gethostname(),
                                                "started": started}), encoding="utf-8")


def test_stale_lock_of_a_finished_process_is_taken_over(tmp_path, caplog):
    finished = subprocess.Popen([sys.executable, "-c", "pass"])
    finished.wait()
    folder = tmp_path / "run"
    _write_lock(folder, finished.pid, time.time() - 5)
    with caplog.at_level("WARNING", logger="cotexnet.runlock"):
        with RunLock(folder) as lock:
            assert read_holder(folder).pid == os.getpid() == lock.holder.pid
    assert f"training process {finished.pid} " in caplog.text and "no longer running" in caplog.text
    assert not (folder / LOCK_NAME).exists()


def test_lock_with_a_reused_pid_is_stale(tmp_path):
    """Our own pid, but written before this process started: the pid was reused, the trainer is gone."""
    folder = tmp_path / "run"
    _write_lock(folder, os.getpid(), psutil.Process().create_time() - 3600)
    with RunLock(folder) as lock:
        assert lock.holder.started > psutil.Process().create_time()


def test_unreadable_lock_is_refused_with_the_file_named(tmp_path):
    (tmp_path / LOCK_NAME).write_text("", encoding="utf-8")
    with pytest.raises(RunLockedError, match=rf"{tmp_path / LOCK_NAME}: unreadable lock file"):
        RunLock(tmp_path).acquire()


def test_training_holds_the_lock_and_releases_it_at_the_end(shapes, tmp_path):
    from cotexnet.train import TrainOptions, train

    out = tmp_path / "run"
    holders = []
    options = TrainOptions(data=str(shapes), out=str(out), classes=["disk", "square"], backbone="tiny", image_size=32,
                           epochs=1, batch_size=4, device="cpu", show_progress=False)
    train(options, on_event=lambda event, **values: holders.append(read_holder(out)))
    assert holders and all(h is not None and h.pid == os.getpid() for h in holders)
    assert not (out / LOCK_NAME).exists()

    from cotexnet.errors import DataError

    bad = TrainOptions(**{**options.__dict__, "data": str(tmp_path / "nowhere")})
    with pytest.raises(DataError, match="nowhere"):
        train(bad)
    assert not (out / LOCK_NAME).exists()  # released after a failed run too


def test_training_refuses_a_folder_held_by_a_live_trainer(live_holder, shapes):
    from cotexnet.train import TrainOptions, train

    folder, pid = live_holder
    options = TrainOptions(data=str(shapes), out=str(folder), classes=["disk", "square"], backbone="tiny",
                           image_size=32, epochs=1, device="cpu", show_progress=False)
    with pytest.raises(RunLockedError, match=f"training process {pid} "):
        train(options)
    assert sorted(p.name for p in folder.iterdir()) == [LOCK_NAME]


def test_slicer_training_logic_refuses_a_locked_folder_before_touching_it(live_holder, shapes):
    folder, pid = live_holder
    (folder / "train.log").write_text("the live run's log\n", encoding="utf-8")
    logic = CoTexNetTrainLogic(slicer.vtkMRMLScene())
    with pytest.raises(TrainingRunError, match=rf"in use by training process {pid} "):
        logic.train(str(shapes), ["disk", "square"], folder, waitForCompletion=False)
    assert logic.process is None
    assert (folder / "train.log").read_text(encoding="utf-8") == "the live run's log\n"
