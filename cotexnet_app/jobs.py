"""A browser session's background work: segmentation in the worker process, training in its own process.

Both are the Slicer modules' logic (CoTexNetSegmentLogic.startSegmentation, CoTexNetTrainLogic.train); this
module starts them and polls them from the server's event loop (MRML changes only happen on its thread),
handing what it reads to callbacks of the page.
"""

from __future__ import annotations

import asyncio
import json
import sys
import time
from pathlib import Path
from typing import Callable, Optional, Sequence

from cotexnet.atomic import write_json_atomic
from cotexnet.bundle import read_bundle_config
from cotexnet.data.labels import write_segmentation_nrrd

from cotexnet_app import logic_path
from cotexnet_app.cases import OpenedCase
from cotexnet_app.curves import TrainingCurves, hex_color
from cotexnet_app.files import RUNS_FOLDER, DataRoot
from cotexnet_app.promotion import HeldOutCases

logic_path.add_slicer_logic_to_path()

from CoTexNetSegmentLib import mrml  # noqa: E402
from CoTexNetTrainLib import CoTexNetTrainLogic, TrainingState  # noqa: E402

#: The file of a run folder that names the data-root files each exported case came from.
SOURCES_FILE = "sources.json"
#: The run's subfolder with the segmentations its held-out cases were trained with, for the comparison.
HELD_OUT_FOLDER = "held-out"

#: How often the page's job watcher polls the worker, in seconds.
POLL_INTERVAL_S = 0.1
#: How often the training watcher reads the training process's progress file, in seconds.
TRAINING_POLL_INTERVAL_S = 0.5
#: Epochs of a training started from the page unless the page asks for another number.
DEFAULT_TRAINING_EPOCHS = 20


STARTING_WORKER, LOADING_MODEL = "Starting the worker", "Loading the model"
MODEL_READY, POSTPROCESSING, DESCRIBING = "Model ready", "Post-processing", "Describing the segmented classes"
DRAWING = "Drawing the segments"


def next_phase(phase: str, kind: str, value) -> str:
    """The phase a segmentation is in after one of its worker's events (cotexnet.worker's messages)."""
    if kind == "progress":
        done, total = value
        return f"Slices {done} of {total}" if done < total else POSTPROCESSING
    if kind == "log" and "ready" in str(value):
        return MODEL_READY
    if kind == "log" and str(value).startswith("Describing"):
        return DESCRIBING
    return phase


class SegmentationJobs:
    """At most one segmentation at a time, in the session's worker process."""

    def __init__(self, logic, device: str, batch_size: int):
        self.logic, self.device, self.batch_size = logic, device, batch_size
        self.job = None
        self.model: Optional[Path] = None
        self.started_at = 0.0

    @property
    def running(self) -> bool:
        return self.job is not None and not self.job.finished

    def start(self, case: OpenedCase, model: Path, **options):
        self.job = self.logic.startSegmentation(case.volume, model, self.device, segmentationNode=case.segmentation,
                                                batchSize=self.batch_size, **options)
        self.model, self.started_at = model, time.perf_counter()
        return self.job

    async def watch(self, job, on_progress: Callable[[int, str], None]) -> None:
        """Polls ``job`` until it ends, reporting its progress in percent and the phase it is in."""
        phase = LOADING_MODEL if self.logic.worker.alive else STARTING_WORKER
        while True:
            for event in job.poll():
                phase = next_phase(phase, event.kind, event.value)
            if phase == STARTING_WORKER and self.logic.worker.alive:
                phase = LOADING_MODEL
            done, total = job.progress
            on_progress(int(100 * done / total) if total else 0, phase)
            if job.finished:
                return
            await asyncio.sleep(POLL_INTERVAL_S)

    def cancel(self) -> None:
        if self.running:
            self.job.cancel()


class TrainingJobs:
    """Training on the opened cases from the chosen model, with its curves (CoTexNetTrainLogic runs it)."""

    def __init__(self, scene, data_root: DataRoot, device: str):
        self.logic = CoTexNetTrainLogic(scene)
        self.data_root, self.device = data_root, device
        self.curves: Optional[TrainingCurves] = None
        self.started_at = 0.0
        self.init_model: Optional[Path] = None
        self.run: Optional[Path] = None
        self.cases: list[OpenedCase] = []  # the run's cases (copies where segments were skipped or mapped)

    @property
    def running(self) -> bool:
        return self.logic.isRunning

    def start(self, cases: Sequence[OpenedCase], model: Path, epochs: int, segment_colors: dict) -> Path:
        """Starts the run; returns its folder under ``runs/``. The run's classes are the model's, then
        segments it lacks; ``segment_colors`` (segment name -> RGB) colours the classes the model lacks."""
        config = read_bundle_config(model)
        name = cases[0].stem if len(cases) == 1 else f"{len(cases)}-cases"
        run = self.data_root.resolve(f"{RUNS_FOLDER}/{name}-{time.strftime('%Y%m%d-%H%M%S')}", must_exist=False)
        self.logic.train([(case.volume, case.segmentation) for case in cases], None, run, waitForCompletion=False,
                         initFrom=str(model), backbone=config.backbone, epochs=epochs, device=self.device)
        # The export names cases case_000, case_001, ... in this order: say which files they are.
        write_json_atomic(run / SOURCES_FILE, {export_name(i): case.relative for i, case in enumerate(cases)})
        self.init_model, self.run, self.cases = model, run, list(cases)
        classes = self.logic.classes
        model_colors = dict(zip(config.classes, config.colors))
        self.curves = TrainingCurves(classes, [hex_color(model_colors.get(c) or segment_colors.get(c) or (0.4, 0.4, 0.4))
                                               for c in classes])
        self.started_at = time.perf_counter()
        return run

    async def watch(self, on_events: Callable[[list], None]) -> None:
        """Reads the training process's progress events into the curves until it ends."""
        training = self.logic
        while True:
            events = training.poll()
            for event in events:
                self.curves.add(event)
            on_events(events)
            if not training.isRunning and training.state not in (TrainingState.RUNNING, TrainingState.STOPPING):
                return
            await asyncio.sleep(TRAINING_POLL_INTERVAL_S)

    async def compare(self, held_out: HeldOutCases) -> tuple[dict, dict]:
        """Dice per class of the model the run started from and of the run, on the run's held-out cases
        (segmented as the page has them now), computed in a process of its own (cotexnet_app.promotion)."""
        folder = self.run / HELD_OUT_FOLDER
        folder.mkdir(exist_ok=True)
        arguments = []
        classes = list(self.logic.classes)
        for case_id in held_out.case_ids:
            case = self.cases[int(case_id.rpartition("_")[2])]
            names = [name for name in case.segment_names if name in classes]
            labels = mrml.segmentationToLabelMap(case.segmentation, case.volume, names)
            truth = folder / f"{case_id}.seg.nrrd"
            write_segmentation_nrrd(labels, mrml.geometryFromVolume(case.volume), truth, names)
            arguments += ["--case", str(case.path), str(truth), case.series or ""]
        process = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "cotexnet_app.promotion", str(self.init_model), str(self.run), *arguments,
            "--classes", *classes, "--device", self.device,
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
        out, err = await process.communicate()
        if process.returncode:
            lines = err.decode(errors="replace").strip().splitlines()
            raise RuntimeError(lines[-1] if lines else f"exit status {process.returncode}")
        current, new = json.loads(out.decode().strip().splitlines()[-1])
        return current, new

    def stop(self) -> bool:
        """Asks the training process to stop after its current step; it saves its best model and exits."""
        if self.logic.isRunning:
            self.logic.requestStop()
            return True
        return False


def export_name(index: int) -> str:
    """The name CoTexNetTrainLib's export gives the ``index``-th case (dataset.py: ``case_XXX``)."""
    return f"case_{index:03d}"
