"""A browser session's background work: segmentation in the worker process, training in its own process.

Both are the Slicer modules' logic (CoTexNetSegmentLogic.startSegmentation, CoTexNetTrainLogic.train); this
module starts them and polls them from the server's event loop (MRML changes only happen on its thread),
handing what it reads to callbacks of the page.
"""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from typing import Callable, Optional, Sequence

from cotexnet.bundle import read_bundle_config

from cotexnet_app import logic_path
from cotexnet_app.cases import OpenedCase
from cotexnet_app.curves import TrainingCurves, hex_color
from cotexnet_app.files import RUNS_FOLDER, DataRoot

logic_path.add_slicer_logic_to_path()

from CoTexNetTrainLib import CoTexNetTrainLogic, TrainingState  # noqa: E402

#: How often the page's job watcher polls the worker, in seconds.
POLL_INTERVAL_S = 0.1
#: How often the training watcher reads the training process's progress file, in seconds.
TRAINING_POLL_INTERVAL_S = 0.5
#: Epochs of a training started from the page unless the page asks for another number.
DEFAULT_TRAINING_EPOCHS = 20


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

    async def watch(self, job, on_progress: Callable[[int], None]) -> None:
        """Polls ``job`` until it ends, reporting its progress in percent."""
        while True:
            job.poll()
            done, total = job.progress
            on_progress(int(100 * done / total) if total else 0)
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

    def stop(self) -> bool:
        """Asks the training process to stop after its current step; it saves its best model and exits."""
        if self.logic.isRunning:
            self.logic.requestStop()
            return True
        return False
