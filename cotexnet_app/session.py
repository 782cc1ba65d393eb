"""One browser session of ``cotexnet app``: a trame-slicer page over its own MRML scene.

The views, the segment list and the correction effects (paint, erase, scissors, islands, undo) are
trame-slicer's; segmentation, the concept table and MRML conversion are CoTexNetSegmentLib's, the same
logic the Slicer module runs, with the engine in a persistent worker process (docs/slicer-worker.md), so
the page stays responsive while a model runs. Every file path the page sends goes through
:class:`cotexnet_app.files.DataRoot`. The gateway (:mod:`cotexnet_app.gateway`) starts one such process
per browser session and is the only one that knows its secret.

This module binds the page's state to the session's parts: the opened cases (:mod:`.cases`), the model
choice (:mod:`.models`), the segmentation and training jobs (:mod:`.jobs`) and the widgets (:mod:`.layout`).
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import sys
import time
from pathlib import Path
from typing import Optional

from cotexnet_app import logic_path
from cotexnet_app.files import AccessError, DataRoot
from cotexnet_app.recent import RecentModels
from cotexnet_app.gateway import SECRET_ENVIRONMENT, SECRET_HEADER

logic_path.add_slicer_logic_to_path()

from aiohttp import web  # noqa: E402
from trame.app import TrameApp  # noqa: E402
from trame_slicer import module as trame_slicer_module  # noqa: E402
from trame_slicer.app.logic import LayoutButtonLogic  # noqa: E402
from trame_slicer.app.logic.segmentation import SegmentEditorLogic  # noqa: E402
from trame_slicer.core import SlicerApp  # noqa: E402
from trame_slicer.rca_view import register_rca_factories  # noqa: E402

from CoTexNetSegmentLib import CoTexNetSegmentLogic  # noqa: E402
from CoTexNetSegmentLib import mrml  # noqa: E402
from CoTexNetSegmentLib.logic import CONCEPT_COLUMNS  # noqa: E402
from CoTexNetSegmentLib.worker import SegmentationWorker  # noqa: E402
from CoTexNetTrainLib import TrainingInputError, TrainingRunError, TrainingState  # noqa: E402
from cotexnet.errors import CoTexNetError  # noqa: E402

from cotexnet_app.cases import OpenedCase, OpenedCases  # noqa: E402
from cotexnet_app.jobs import DEFAULT_TRAINING_EPOCHS, SegmentationJobs, TrainingJobs  # noqa: E402
from cotexnet_app.layout import build_page  # noqa: E402
from cotexnet_app.models import ModelChooser  # noqa: E402

log = logging.getLogger("cotexnet_app.session")
#: The segmentation representation the 3D view draws.
CLOSED_SURFACE = "Closed surface"


class CoTexNetWebApp(TrameApp):
    """The page: open a volume, Segment with progress and Cancel, concept table, correct, save, train."""

    def __init__(self, server, data_root: DataRoot, models: list[str], device: str = "auto", batch_size: int = 8,
                 recent: Optional[RecentModels] = None):
        super().__init__(server)
        self.data_root = data_root
        self.models = ModelChooser(data_root, models, recent or RecentModels())
        self.server.enable_module(trame_slicer_module)
        self.slicer_app = SlicerApp()
        mrml.ensureSegmentationConverters()
        register_rca_factories(self.slicer_app.view_manager, self.server)
        self.layout_logic = LayoutButtonLogic(self.server, self.slicer_app)
        self.layout_logic.layout_manager.set_layout("Quad View")
        self.editor_logic = SegmentEditorLogic(self.server, self.slicer_app)
        self.logic = CoTexNetSegmentLogic(self.slicer_app.scene, worker=SegmentationWorker())
        self.cases = OpenedCases(self.slicer_app, data_root, self.logic.conceptTable)
        self.case: Optional[OpenedCase] = None  # the one in the views
        self.segmentation = SegmentationJobs(self.logic, device, batch_size)
        self.training = TrainingJobs(self.slicer_app.scene, data_root, device)
        self._set_defaults()
        build_page(self)
        self.ctrl.on_server_bind.add(self._require_secret)
        self.ctrl.on_server_exited.add(self._end)

    def _end(self, **_) -> None:
        """The session ends: its worker, and a training it started (stopped at once; its best model stays)."""
        self.logic.worker.stop()
        self.training.logic.terminate()

    # ------------------------------------------------------------------ state
    def _set_defaults(self) -> None:
        s = self.state
        s.trame__title = "CoTexNet"
        s.cx_volumes = self.data_root.volumes()
        s.cx_volume = s.cx_volumes[0] if s.cx_volumes else None
        s.cx_models = self.models.choices()
        s.cx_model = s.cx_models[0]["value"] if s.cx_models else None
        s.cx_opened = ""
        s.cx_cases = []
        s.cx_busy = False
        s.cx_progress = 0
        s.cx_message = "Open a volume from the data root, choose a model, then Segment."
        s.cx_error = ""
        s.cx_concepts = []
        s.cx_concept_columns = [{"key": key, "title": title} for key, title in CONCEPT_COLUMNS if key != "sources"]
        s.cx_upload_limit = self.data_root.upload_limit_bytes
        s.cx_training = False
        s.cx_epochs = DEFAULT_TRAINING_EPOCHS
        s.cx_train_message = ""
        s.cx_charts = []
        s.is_drawer_visible = True

    def _fail(self, message: str) -> None:
        self.state.cx_error = message
        self.state.cx_busy = False
        log.warning(message)

    # ------------------------------------------------------------------ cases
    def open_volume(self, relative: Optional[str] = None) -> None:
        """Opens a volume or DICOM folder of the data root as a new case (or shows it again if it is open)."""
        relative = relative or self.state.cx_volume
        self.state.cx_error = ""
        try:
            self.data_root.resolve(relative or "")
        except AccessError as error:
            return self._fail(str(error))
        if self.segmentation.running:
            return self._fail("a segmentation is running: Cancel it before opening another volume")
        try:
            case = self.cases.open(relative)
        except AccessError as error:
            return self._fail(str(error))
        self._show_case(case)
        self.state.cx_message = f"Opened {case.relative}."

    def close_case(self) -> None:
        """Removes the case in the views (volume, segmentation, its concept table) from the session's scene."""
        self.state.cx_error = ""
        if self.case is None:
            return
        if self.segmentation.running:
            return self._fail("a segmentation is running: Cancel it before closing the case")
        case = self.case
        self.slicer_app.segmentation_editor.deactivate_effect()
        following = self.cases.close(case)
        self.case = None
        if following is not None:
            self._show_case(following)
        else:
            self.state.cx_opened, self.state.cx_concepts = "", []
            self.state.cx_cases = self.cases.choices()
        self.state.cx_message = f"Closed {case.relative}."

    def _show_case(self, case: OpenedCase) -> None:
        """Puts a case in the views and in the segment editor; the other cases' volumes and segments are hidden."""
        self.cases.hide_all_but(case)
        case.segmentation.SetDisplayVisibility(True)
        self.slicer_app.display_manager.show_volume(case.volume, do_reset_views=True)
        editor = self.slicer_app.segmentation_editor
        # The editor carries one "show 3D" switch over to the segmentation it activates; each case keeps its own.
        show_3d = case.segmentation.GetSegmentation().ContainsRepresentation(CLOSED_SURFACE)
        editor.deactivate_effect()
        editor.set_active_segmentation(case.segmentation, case.volume)
        editor.set_surface_representation_enabled(show_3d)
        self.case = case
        self.state.cx_opened = case.relative
        self.state.cx_volume = case.relative
        self.state.cx_concepts = self._concept_rows(case.segmentation)
        self.state.cx_cases = self.cases.choices()

    def upload(self, files) -> None:
        """Saves an uploaded volume into the data root's uploads/ folder and opens it."""
        self.state.cx_error = ""
        if not files:
            return
        upload = files[0] if isinstance(files, list) else files
        try:
            content = upload.get("content") or b""
            if isinstance(content, list):  # large files arrive in chunks
                content = b"".join(content)
            path = self.data_root.save_upload(upload.get("name", ""), content)
        except AccessError as error:
            return self._fail(str(error))
        relative = self.data_root.relative(path)
        self.state.cx_volumes = self.data_root.volumes()
        self.state.cx_volume = relative
        self.open_volume(relative)

    def save(self) -> None:
        """Writes the (corrected) segmentation as .seg.nrrd next to the opened volume."""
        from cotexnet.data.labels import write_segmentation_nrrd

        self.state.cx_error = ""
        case = self.case
        if case is None or not case.segment_count:
            return self._fail("nothing to save: segment a volume first")
        editor = self.slicer_app.segmentation_editor
        names = editor.get_segment_names()
        labels = mrml.segmentationToLabelMap(case.segmentation, case.volume, names)
        colors = [editor.get_segment_properties(i).color for i in editor.get_segment_ids()]
        target = self.cases.segmentation_path(case)
        try:
            write_segmentation_nrrd(labels, mrml.geometryFromVolume(case.volume), target, names, colors)
        except CoTexNetError as error:
            return self._fail(str(error))
        self.state.cx_message = f"Saved {self.data_root.relative(target)}."

    # ------------------------------------------------------------------ models
    def _use_model(self, folder: Path) -> None:
        """Lists ``folder`` first among the recent models and makes it the chosen one."""
        self.models.recent.add(folder)
        self.state.cx_models = self.models.choices()
        self.state.cx_model = self.models.value(folder)

    # ------------------------------------------------------------------ segmentation
    def segment(self) -> None:
        self.state.cx_error = ""
        if self.case is None:
            return self._fail("open a volume first")
        if self.segmentation.running:
            return self._fail("a segmentation is already running")
        try:
            model = self.models.path(self.state.cx_model)
            job = self.segmentation.start(self.case, model)
        except (CoTexNetError, ValueError, RuntimeError) as error:
            return self._fail(str(error))
        self.state.cx_busy, self.state.cx_progress = True, 0
        self.state.cx_message = f"Segmenting with {model.name}..."
        asyncio.ensure_future(self._watch(job))

    async def _watch(self, job) -> None:
        """Shows the job's progress, then its result: MRML changes only happen here, on the server's thread."""
        def progress(percent: int) -> None:
            with self.state:
                self.state.cx_progress = percent

        await self.segmentation.watch(job, progress)
        with self.state:
            self.state.cx_busy = False
            if job.state == job.DONE:
                self._show_result(job.result)
                self.models.recent.add(self.segmentation.model)
            elif job.state == job.CANCELLED:
                self.state.cx_message = "Cancelled; the segmentation was left as it was."
            else:
                self._fail(f"Segmentation failed: {job.error}")

    def _show_result(self, segmentation) -> None:
        self.case.segmentation = segmentation  # the node the job filled (the case's own)
        segmentation.CreateClosedSurfaceRepresentation()  # surfaces in the 3D view, as Segment Editor's "Show 3D"
        self._show_case(self.case)
        seconds = time.perf_counter() - self.segmentation.started_at
        count = segmentation.GetSegmentation().GetNumberOfSegments()
        self.state.cx_message = f"Segmented {count} segments in {seconds:.1f} s."
        log.info(f"segment click to segments shown: {seconds:.2f} s")

    def _concept_rows(self, segmentation) -> list[dict]:
        table = self.logic.conceptTable(segmentation)
        if table is None:
            return []
        keys = [key for key, _ in CONCEPT_COLUMNS]
        return [{key: table.GetCellText(row, column) for column, key in enumerate(keys)}
                for row in range(table.GetNumberOfRows())]

    def cancel(self) -> None:
        self.segmentation.cancel()

    def show_concept_row(self, row: int) -> None:
        """Centres the views on the row's segment and makes it the one the effects edit."""
        if self.case is None:
            return
        segmentation = self.case.segmentation
        segment_id = self.logic.showConceptRow(segmentation, int(row))
        if not segment_id:
            return
        self.slicer_app.segmentation_editor.set_active_segment_id(segment_id)
        if segmentation.GetSegmentCenterRAS(segment_id) is None:
            name = segmentation.GetSegmentation().GetSegment(segment_id).GetName()
            self.state.cx_message = f"{name} has no voxels in this case: nothing to show (paint it to add some)."

    # ------------------------------------------------------------------ training
    def train(self) -> None:
        """Trains on every opened case that has segments, continuing from the chosen model, in a background
        process run by CoTexNetTrainLogic (the Slicer module's logic: checks, export, ``cotexnet train``,
        progress file, stop file, run lock). The run folder goes to ``runs/`` in the data root."""
        self.state.cx_error = ""
        segmented = [case for case in self.cases if case.segment_count]
        if not segmented:
            return self._fail("nothing to train on: open a case and segment (or paint) it first")
        if self.training.running:
            return self._fail("a training is already running: Stop it first")
        try:
            epochs = int(self.state.cx_epochs)
            if epochs < 1:
                raise ValueError
        except (TypeError, ValueError):
            return self._fail(f"epochs: expected a whole number of at least 1, got {self.state.cx_epochs!r}")
        segment_colors = {p.name: p.color for p in self.slicer_app.segmentation_editor.get_all_segment_properties().values()}
        try:
            model = self.models.path(self.state.cx_model)
            run = self.training.start(segmented, model, epochs, segment_colors)
        except (CoTexNetError, TrainingInputError, TrainingRunError, ValueError, OSError) as error:
            return self._fail(f"Training could not start: {error}")
        self.state.cx_training, self.state.cx_charts = True, self.training.curves.charts()
        cases = "this case" if len(segmented) == 1 else f"{len(segmented)} cases"
        self.state.cx_train_message = f"Training {self.data_root.relative(run)} on {cases} from {model.name}..."
        asyncio.ensure_future(self._watch_training())

    async def _watch_training(self) -> None:
        """Draws the curves as the training process reports epochs; at its end its model becomes the chosen one."""
        training = self.training.logic
        first_point = True

        def show(events: list) -> None:
            nonlocal first_point
            with self.state:
                if events:
                    self.state.cx_charts = self.training.curves.charts()
                    self.state.cx_train_message = training.progress.summary()
                if first_point and self.training.curves.epochs:
                    first_point = False
                    log.info("training start to first plot point: "
                             f"{time.perf_counter() - self.training.started_at:.2f} s")

        await self.training.watch(show)
        with self.state:
            self.state.cx_training = False
            if training.state == TrainingState.FAILED:  # a segmentation may be running: cx_busy stays as it is
                self.state.cx_train_message, self.state.cx_error = "", f"Training failed: {training.errorMessage}"
                log.warning(self.state.cx_error)
                return
            self.state.cx_train_message = training.progress.summary()
            if training.bundlePath is not None:
                self._use_model(training.outDir)  # the run folder: segmenting with it uses its best model
                self.state.cx_train_message += f"; the current model is now {self.state.cx_model}."

    def stop_training(self) -> None:
        """Asks the training process to stop after its current step; it saves its best model and exits."""
        if self.training.stop():
            self.state.cx_train_message = "Stopping after the current step..."

    # ------------------------------------------------------------------ security
    def _require_secret(self, wslink_server) -> None:
        """Only the gateway, which holds this session's secret, may talk to this process."""
        secret = os.environ.get(SECRET_ENVIRONMENT, "")

        @web.middleware
        async def check(request, handler):
            if not secret or request.headers.get(SECRET_HEADER) != secret:
                return web.Response(status=403, text="connect through the cotexnet app gateway")
            return await handler(request)

        wslink_server.app.middlewares.append(check)


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="cotexnet_app.session", description="one browser session (started by the gateway)")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--data-root", required=True)
    parser.add_argument("--model", action="append", default=[])
    parser.add_argument("--device", default="auto")
    parser.add_argument("--upload-limit-mb", type=float, required=True)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s session: %(message)s")
    log.setLevel(logging.INFO)
    root = DataRoot(args.data_root, args.upload_limit_mb)
    from trame.app import get_server

    app = CoTexNetWebApp(get_server(client_type="vue3"), root, [str(Path(m).resolve()) for m in args.model], args.device)
    app.server.start(host="127.0.0.1", port=args.port, open_browser=False, show_connection_info=False)
    return 0


if __name__ == "__main__":
    sys.exit(main())
