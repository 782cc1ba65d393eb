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

import numpy as np
import psutil
import pytest
from PIL import Image

slicer = pytest.importorskip("slicer")

from CoTexNetSegmentLib import backbone, processes  # noqa: E402
from CoTexNetTrainLib import CoTexNetTrainLogic, TrainingRunError  # noqa: E402
from CoTexNetTrainLib import logic as train_logic  # noqa: E402

from cotexnet.runlock import LOCK_NAME, RunLock, RunLockedError, read_holder  # noqa: E402

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


def shapes_dataset(root: Path, count: int = 6, size: int = 48) -> Path:
    """A 2D folder dataset: a bright disk (class 1) and a dark square (class 2) on gray."""
    rng = np.random.default_rng(0)
    (root / "images").mkdir(parents=True)
    (root / "masks").mkdir()
    yy, xx = np.mgrid[:size, :size]
    for i in range(count):
        image = np.full((size, size), 120, np.uint8)
        mask = np.zeros((size, size), np.uint8)
        cy, cx = rng.integers(12, size - 12, 2)
        disk = (yy - cy) ** 2 + (xx - cx) ** 2 < 8 ** 2
        sy, sx = rng.integers(2, size - 12, 2)
        square = np.zeros_like(disk)
        square[sy: sy + 10, sx: sx + 10] = True
        square &= ~disk
        image[disk], mask[disk] = 220, 1
        image[square], mask[square] = 30, 2
        Image.fromarray(image).save(root / "images" / f"case{i:02d}.png")
        Image.fromarray(mask).save(root / "masks" / f"case{i:02d}.png")
    return root


@pytest.fixture(scope="module")
def shapes(tmp_path_factory):
    return shapes_dataset(tmp_path_factory.mktemp("shapes"))


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
    process = subprocess.Popen([sys.executable, "-c", HOLDER, str(folder)], stdout=subprocess.PIPE, text=True,
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
