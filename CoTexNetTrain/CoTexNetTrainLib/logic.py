"""CoTexNetTrainLogic: train a CoTexNet model on scene data in a background process.

Training runs for hours, so it never runs inside Slicer: the logic starts ``cotexnet train`` in a
separate Python process (PythonSlicer inside the application) and only reads what that process
appends to files in the run folder:

- ``progress.jsonl``: the engine's progress events, shown as a progress line and as rows of a
  table node (epoch, loss, val_dice) that a plot chart displays;
- ``train.log``: the process's output, for the log panel and for error messages;
- ``stop-training``: created by :meth:`stop`; the engine finishes its step, saves, and exits;
- ``run.json``: the command, so :meth:`resume` can continue a stopped run, also after a restart;
- ``run.lock``: held by the engine while it trains (``cotexnet.runlock``); a folder held by a live
  trainer is refused before anything in it is touched.

No Qt is used; the module widget calls :meth:`poll` from a timer, a console script can pass
``waitForCompletion=True``.
"""
from __future__ import annotations

import enum
import json
import logging
import math
import os
import shutil
import subprocess
import time
from pathlib import Path
from typing import Sequence

import slicer
import vtk

from .dataset import (TrainingInputError, checkClasses, checkEveryClassHasVoxels, checkPairs, continuedClasses,
                      exportDataset, folderClasses, labelMaps, modelClasses)
from .engine import TrainingRunError, importEngine, killProcessTree, processEnvironment, pythonExecutable
from .progress import LogReader, ProgressEventReader, TrainingProgress

PROGRESS_FILE = "progress.jsonl"
LOG_FILE = "train.log"
STOP_FILE = "stop-training"
RUN_FILE = "run.json"
DATASET_FOLDER = "dataset"
BUNDLE_FOLDER = "best"



class RunExistsError(TrainingInputError):
    """The output folder already holds a training run; ``train(..., overwrite=True)`` replaces it (the widget
    asks first)."""


class TrainingState(str, enum.Enum):
    """Where a training run stands; ``RUNNING`` and ``STOPPING`` have a live process. A ``str`` enum, so
    scripts that compare with the plain names (``logic.state == "finished"``) keep working."""

    IDLE = "idle"
    RUNNING = "running"
    STOPPING = "stopping"
    FINISHED = "finished"
    STOPPED = "stopped"
    FAILED = "failed"


def _addRecentModel(bundlePath: Path) -> None:
    """Lists a new bundle in CoTexNetSegment's model selectors (the setting belongs to CoTexNetSegmentLib)."""
    from CoTexNetSegmentLib.settings import addRecentModel

    addRecentModel(bundlePath)


#: The module's training fields and the entries of the engine's recipes (cotexnet.config.RECIPES) they show.
RECIPE_FIELDS = {"imageSize": "image_size", "epochs": "epochs", "batchSize": "batch_size", "learningRate": "lr",
                 "patience": "patience"}


def recipeFields(backbone: str) -> dict:
    """The training fields as the engine's recipe for ``backbone`` sets them: random-init backbones learn with
    another recipe than pretrained CLIPSeg, and the module sends its fields, so they must show that recipe."""
    importEngine()
    from cotexnet.config import RECIPES, recipe_name

    recipe = RECIPES[recipe_name(backbone.strip())]
    return {field: recipe[key] for field, key in RECIPE_FIELDS.items()}


def trainingFieldOptions(backbone: str, fields: dict) -> dict:
    """The training fields a run sends: None (not sent) for a value the backbone's recipe sets anyway, so that
    what the user did not change follows the engine's recipe for that backbone, as ``cotexnet train`` does."""
    recipe = recipeFields(backbone)
    return {field: None if math.isclose(value, recipe[field], rel_tol=1e-9) else value for field, value in fields.items()}


#: Table columns of the per-epoch curve, in order.
CURVE_COLUMNS = ("epoch", "loss", "val_dice")


def _trainArguments(
    data: Path,
    classes: Sequence[str],
    outDir: Path,
    keywords: Sequence[str] | None,
    options: dict,
) -> list[str]:
    """``cotexnet train`` arguments; options left at None are not passed, so the engine's defaults apply."""
    arguments = [str(data), "--classes", *classes, "--out", str(outDir)]
    if keywords is not None:
        arguments += ["--keywords", *keywords]
    flags = {
        "backbone": "--backbone",
        "epochs": "--epochs",
        "batchSize": "--batch-size",
        "learningRate": "--lr",
        "patience": "--patience",
        "imageSize": "--image-size",
        "device": "--device",
        "conceptBackend": "--concept-backend",
        "initFrom": "--init-from",
    }
    for name, value in options.items():
        if name not in flags:
            raise TypeError(f"train() got an unexpected option {name!r}; expected one of {', '.join(flags)}")
        if value is not None:
            arguments += [flags[name], str(value)]
    return arguments


class CoTexNetTrainLogic:
    """Exports training data, runs ``cotexnet train`` in the background and follows its progress.

    One logic runs one training process at a time. ``scene`` is the MRML scene that holds the
    training nodes and receives the progress table and chart.
    """

    def __init__(self, scene=None):
        self.scene = scene if scene is not None else slicer.mrmlScene
        self.process: subprocess.Popen | None = None
        self.outDir: Path | None = None
        self.progress = TrainingProgress()
        self.state = TrainingState.IDLE
        self.errorMessage: str | None = None
        self.classes: list[str] = []  # of the current run, in label order
        self.tableNode = None
        self.chartNode = None
        self._events: ProgressEventReader | None = None
        self._log: LogReader | None = None
        self._logFile = None
        self._stopRequestedAt: float | None = None

    # ------------------------------------------------------------------ starting

    @property
    def isRunning(self) -> bool:
        return self.process is not None and self.process.poll() is None

    @property
    def bundlePath(self) -> Path | None:
        """The best bundle of the current run once it exists (after the first validated epoch)."""
        if self.progress.bundle:
            return Path(self.progress.bundle)
        if self.outDir is not None and (self.outDir / BUNDLE_FOLDER / "config.json").is_file():
            return self.outDir / BUNDLE_FOLDER
        return None

    def train(
        self,
        data,
        classes: Sequence[str] | None,
        outDir: str | os.PathLike,
        *,
        keywords: Sequence[str] | None = None,
        modality: str = "MR",
        waitForCompletion: bool = True,
        timeout: float | None = None,
        overwrite: bool = False,
        **options,
    ) -> Path:
        """Trains a model and returns the path of its best bundle (``outDir/best``).

        ``data`` is a list of (volume node, segmentation node) pairs or a dataset folder (2D images/
        and masks/, or nnU-Net v2 raw). ``classes`` defaults to the first segmentation's segment
        names (scene data; with ``initFrom``, that model's classes and then the segments it lacks) or
        dataset.json's labels (folder); with scene data each class needs voxels in at least one case.
        ``options`` are ``backbone``, ``epochs``, ``batchSize``, ``learningRate``, ``patience``,
        ``imageSize``, ``device``, ``conceptBackend`` and ``initFrom`` (continue from this model: a bundle or
        run folder whose weights start the run); unset ones take the engine's defaults. Scene pairs are exported to
        ``outDir/dataset`` (removed when training finishes) with ``modality`` in its dataset.json,
        which picks the engine's intensity normalisation (CT: a soft-tissue window; others:
        percentiles). With ``waitForCompletion=False`` this returns as soon as the process runs;
        call :meth:`poll` to follow it. A folder that holds a run raises :class:`RunExistsError` unless
        ``overwrite`` (then the engine deletes that run's bundles and metrics first).
        """
        if self.isRunning:
            raise TrainingRunError(f"a training run is already in progress in {self.outDir}; stop it first")
        outDir = Path(outDir).absolute()
        _checkUnlocked(outDir)
        existing = _existingRunFiles(outDir)
        if existing and not overwrite:
            raise RunExistsError(
                f"{outDir} already holds a training run ({', '.join(existing)}); resume it, replace it, or choose "
                f"another output folder or model name"
            )
        if isinstance(data, (str, os.PathLike)):
            dataFolder = Path(data).absolute()
            classes = folderClasses(dataFolder, classes)
            checkClasses(classes, keywords)
            labels = None
        else:
            if classes is None and options.get("initFrom"):
                classes = continuedClasses(list(data), modelClasses(options["initFrom"]))
            classes = checkPairs(list(data), classes)
            checkClasses(classes, keywords)
            labels = labelMaps(list(data), classes)  # rasterised once: checked here, written by the export
            checkEveryClassHasVoxels(list(data), classes, labels)
            dataFolder = None
        self.classes = list(classes)
        arguments = _trainArguments(dataFolder or outDir / DATASET_FOLDER, classes, outDir, keywords, options)
        python, environment = pythonExecutable(), processEnvironment()  # fail early if either is missing

        outDir.mkdir(parents=True, exist_ok=True)
        for name in (PROGRESS_FILE, LOG_FILE, STOP_FILE):
            (outDir / name).unlink(missing_ok=True)
        if dataFolder is None:
            datasetFolder = outDir / DATASET_FOLDER
            shutil.rmtree(datasetFolder, ignore_errors=True)
            exportDataset(list(data), classes, datasetFolder, modality, labels)
        run = {"arguments": arguments, "exportedDataset": dataFolder is None}
        (outDir / RUN_FILE).write_text(json.dumps(run, indent=2), encoding="utf-8")
        self._start(outDir, run, False, python, environment, overwrite=bool(existing))
        if not waitForCompletion:
            return outDir / BUNDLE_FOLDER
        return self.wait(timeout)

    def resume(self, outDir: str | os.PathLike | None = None, *, waitForCompletion: bool = False,
               timeout: float | None = None) -> Path:
        """Continues the stopped (or crashed) run in ``outDir`` (default: this logic's last run)."""
        if self.isRunning:
            raise TrainingRunError(f"a training run is already in progress in {self.outDir}")
        outDir = Path(outDir).absolute() if outDir is not None else self.outDir
        problem = self.resumeProblem(outDir)
        if problem:
            raise TrainingInputError(problem)
        _checkUnlocked(outDir)
        run = json.loads((outDir / RUN_FILE).read_text(encoding="utf-8"))
        (outDir / STOP_FILE).unlink(missing_ok=True)
        self._start(outDir, run, True, pythonExecutable(), processEnvironment())
        if not waitForCompletion:
            return outDir / BUNDLE_FOLDER
        return self.wait(timeout)

    @staticmethod
    def resumeProblem(outDir: str | os.PathLike | None) -> str | None:
        """Why the run in ``outDir`` cannot be resumed, or None when it can."""
        if outDir is None or not (Path(outDir) / RUN_FILE).is_file():
            return f"{outDir}: no training run to resume (no {RUN_FILE})"
        outDir = Path(outDir)
        if not any(name == "last" or name.startswith(".last.") for name in _existingRunFiles(outDir)):
            return f"{outDir}: the run saved no checkpoint yet (no last/); start it again instead"
        run = json.loads((outDir / RUN_FILE).read_text(encoding="utf-8"))
        if run.get("exportedDataset") and not (outDir / DATASET_FOLDER).is_dir():
            return f"{outDir}: the run has finished (its exported training data was removed); start a new run"
        return None

    def _start(self, outDir: Path, run: dict, resume: bool, python: str, environment: dict[str, str],
               overwrite: bool = False) -> None:
        command = [python, "-m", "cotexnet.cli", "train", *run["arguments"],
                   "--progress-file", str(outDir / PROGRESS_FILE), "--stop-file", str(outDir / STOP_FILE)]
        if resume:
            command.append("--resume")
        elif overwrite:  # never stored in run.json: a later resume continues this run
            command.append("--overwrite")
        if not resume or self.outDir != outDir:  # a new run: follow its files from their beginning
            self._events = ProgressEventReader(outDir / PROGRESS_FILE)
            self._log = LogReader(outDir / LOG_FILE)
            self.progress = TrainingProgress()
            if self.outDir != outDir:
                self.tableNode = self.chartNode = None
        self.outDir = outDir
        self._ensureCurveNodes()
        if not resume:
            self._truncateCurve(0)
        self._closeLogFile()
        self._logFile = open(outDir / LOG_FILE, "ab")
        self._logFile.write(f"$ {subprocess.list2cmdline(command)}\n".encode())
        self._logFile.flush()
        logging.info(f"CoTexNet training: {subprocess.list2cmdline(command)}")
        try:
            self.process = subprocess.Popen(
                command,
                stdout=self._logFile,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                env=environment,
                cwd=str(outDir),
                creationflags=getattr(subprocess, "CREATE_NO_WINDOW", 0),
            )
        except OSError as error:
            self._closeLogFile()
            raise TrainingRunError(f"could not start {command[0]}: {error}") from error
        self.state, self.errorMessage, self._stopRequestedAt = TrainingState.RUNNING, None, None

    # ------------------------------------------------------------------ following

    def poll(self) -> list[dict]:
        """Reads new progress events, updates :attr:`progress` and the curve table; returns the events.

        When the process has ended, also settles :attr:`state` (finished, stopped or failed) and
        adds a finished model to the models CoTexNetSegment lists.
        """
        if self.process is None or self._events is None:
            return []
        returnCode = self.process.poll()
        events = self._events.readEvents()  # after poll(): an ended process has written everything
        for event in events:
            self.progress.update(event)
            if event.get("event") == "epoch":
                self._addCurveRow(event)
        if returnCode is not None and self.state in (TrainingState.RUNNING, TrainingState.STOPPING):
            self._settle(returnCode)
        return events

    def readLog(self) -> str:
        """Output the process has written since the last call."""
        return self._log.readText() if self._log is not None else ""

    def wait(self, timeout: float | None = None, interval: float = 0.5) -> Path:
        """Blocks until the process ends and returns the best bundle; raises if the run failed."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while self.isRunning:
            if deadline is not None and time.monotonic() > deadline:
                raise TimeoutError(f"training in {self.outDir} still runs after {timeout} s")
            self.poll()
            time.sleep(interval)
        self.poll()
        if self.state == TrainingState.FAILED:
            raise TrainingRunError(self.errorMessage)
        return self.bundlePath

    def _settle(self, returnCode: int) -> None:
        self._closeLogFile()
        if returnCode == 0 and self.progress.finished:
            self.state = TrainingState.STOPPED if self.progress.stopped else TrainingState.FINISHED
            if self.bundlePath is not None:
                _addRecentModel(self.bundlePath)
            if self.state == TrainingState.FINISHED and self._runInfo().get("exportedDataset"):
                shutil.rmtree(self.outDir / DATASET_FOLDER, ignore_errors=True)
            return
        if self._stopRequestedAt is not None and self.bundlePath is not None:
            self.state = TrainingState.STOPPED  # terminated after a stop request; the last saved best bundle stands
            _addRecentModel(self.bundlePath)
            return
        self.state = TrainingState.FAILED
        reason = self.progress.error or f"the training process exited with code {returnCode}"
        self.errorMessage = f"{reason}\n{self._logTail()}".strip()

    def _runInfo(self) -> dict:
        path = self.outDir / RUN_FILE
        return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}

    def _logTail(self, lines: int = 15) -> str:
        path = self.outDir / LOG_FILE
        if not path.is_file():
            return ""
        text = path.read_bytes()[-20000:].decode("utf-8", errors="replace")
        return "\n".join(line.split("\r")[-1] for line in text.splitlines()[-lines:])

    def _closeLogFile(self) -> None:
        if self._logFile is not None:
            self._logFile.close()
            self._logFile = None

    # ------------------------------------------------------------------ stopping

    def requestStop(self) -> None:
        """Asks the process to stop after its current step (it saves and exits); returns at once."""
        if not self.isRunning:
            return
        (self.outDir / STOP_FILE).touch()
        self.state = TrainingState.STOPPING
        self._stopRequestedAt = time.monotonic()

    def secondsSinceStopRequest(self) -> float | None:
        return None if self._stopRequestedAt is None else time.monotonic() - self._stopRequestedAt

    def terminate(self, timeout: float = 10.0) -> None:
        """Ends the process tree now (for a run that ignores the stop request); kills what lingers.

        PythonSlicer is a launcher that forwards no signals, so the whole tree gets them; the engine
        treats SIGTERM like a stop request, saving if it can within ``timeout`` s.
        """
        if not self.isRunning:
            return
        if self._stopRequestedAt is None:
            self._stopRequestedAt = time.monotonic()
        killProcessTree(self.process, timeout)
        self.poll()

    def stop(self, timeout: float = 120.0) -> Path | None:
        """Stops the run gracefully (terminating it after ``timeout`` s) and returns the best bundle, if any."""
        self.requestStop()
        deadline = time.monotonic() + timeout
        while self.isRunning and time.monotonic() < deadline:
            self.poll()
            time.sleep(0.2)
        self.terminate()
        self.poll()
        return self.bundlePath

    # ------------------------------------------------------------------ curve

    def _ensureCurveNodes(self) -> None:
        """Creates the (epoch, loss, val_dice) table and its chart in the scene, once per run folder."""
        if self.tableNode is not None and self.scene.IsNodePresent(self.tableNode):
            return
        name = f"CoTexNet training {self.outDir.name}"
        self.tableNode = self.scene.AddNewNodeByClass("vtkMRMLTableNode", self.scene.GenerateUniqueName(name))
        table = self.tableNode.GetTable()
        for column in CURVE_COLUMNS:
            array = vtk.vtkDoubleArray()
            array.SetName(column)
            table.AddColumn(array)
        self.chartNode = self.scene.AddNewNodeByClass("vtkMRMLPlotChartNode", self.tableNode.GetName())
        self.chartNode.SetTitle(f"CoTexNet training: {self.outDir.name}")
        self.chartNode.SetXAxisTitle("epoch")
        self.chartNode.SetYAxisTitle("loss / Dice")
        for column, color in (("loss", (0.90, 0.35, 0.20)), ("val_dice", (0.20, 0.65, 0.30))):
            series = self.scene.AddNewNodeByClass("vtkMRMLPlotSeriesNode", f"{self.tableNode.GetName()} {column}")
            series.SetAndObserveTableNodeID(self.tableNode.GetID())
            series.SetXColumnName("epoch")
            series.SetYColumnName(column)
            series.SetPlotType(slicer.vtkMRMLPlotSeriesNode.PlotTypeScatter)
            series.SetMarkerStyle(slicer.vtkMRMLPlotSeriesNode.MarkerStyleCircle)
            series.SetColor(*color)
            self.chartNode.AddAndObservePlotSeriesNodeID(series.GetID())

    def _addCurveRow(self, event: dict) -> None:
        self._ensureCurveNodes()
        table = self.tableNode.GetTable()
        columns = [table.GetColumnByName(name) for name in CURVE_COLUMNS]
        epoch = float(event.get("epoch", 0))
        # A resumed run repeats epochs after its last checkpoint: drop the rows it replaces.
        self._truncateCurve(sum(1 for row in range(columns[0].GetNumberOfTuples()) if columns[0].GetValue(row) < epoch))
        for array, value in zip(columns, (epoch, event.get("loss"), event.get("val_dice"))):
            array.InsertNextValue(float("nan") if value is None else float(value))
        table.Modified()
        self.tableNode.Modified()

    def _truncateCurve(self, rows: int) -> None:
        table = self.tableNode.GetTable()
        for name in CURVE_COLUMNS:
            table.GetColumnByName(name).SetNumberOfTuples(rows)
        table.Modified()
        self.tableNode.Modified()


def _existingRunFiles(outDir: Path) -> list[str]:
    """The engine's view of an earlier run in ``outDir`` (bundles, metrics, an interrupted save's staging)."""
    importEngine()
    from cotexnet.runlock import existing_run_files

    return existing_run_files(outDir)


def _checkUnlocked(outDir: Path) -> None:
    """Refuses a run folder that a live trainer holds (another Slicer, a console run), naming its pid."""
    importEngine()
    from cotexnet.runlock import RunLockedError, check_unlocked

    try:
        check_unlocked(outDir)
    except RunLockedError as error:
        raise TrainingRunError(str(error)) from None
