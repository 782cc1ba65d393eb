"""One browser session of ``cotexnet app``: a trame-slicer page over its own MRML scene.

The views, the segment list and the correction effects (paint, erase, scissors, islands, undo) are
trame-slicer's; segmentation, the concept table and MRML conversion are CoTexNetSegmentLib's, the same
logic the Slicer module runs, with the engine in a persistent worker process (docs/slicer-worker.md), so
the page stays responsive while a model runs. Every file path the page sends goes through
:class:`cotexnet_app.files.DataRoot`. The gateway (:mod:`cotexnet_app.gateway`) starts one such process
per browser session and is the only one that knows its secret.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Optional

from cotexnet_app import logic_path
from cotexnet_app.curves import TrainingCurves, hex_color
from cotexnet_app.files import RUNS_FOLDER, AccessError, DataRoot
from cotexnet_app.recent import RecentModels
from cotexnet_app.gateway import SECRET_ENVIRONMENT, SECRET_HEADER

logic_path.add_slicer_logic_to_path()

from aiohttp import web  # noqa: E402
from trame.app import TrameApp  # noqa: E402
from trame.widgets import html  # noqa: E402
from trame_client.widgets.core import HtmlElement  # noqa: E402
from trame.widgets import vuetify3 as v3  # noqa: E402
from trame_slicer import module as trame_slicer_module  # noqa: E402
from trame_slicer.app.logic import LayoutButtonLogic  # noqa: E402
from trame_slicer.app.logic.segmentation import SegmentEditorLogic  # noqa: E402
from trame_slicer.app.ui import SegmentEditorToolbarUI, SegmentEditorUI, SegmentEditorUndoRedoUI, ViewerLayout  # noqa: E402
from trame_slicer.core import SlicerApp  # noqa: E402
from trame_slicer.rca_view import register_rca_factories  # noqa: E402

from CoTexNetSegmentLib import CoTexNetSegmentLogic  # noqa: E402
from CoTexNetSegmentLib import mrml  # noqa: E402
from CoTexNetSegmentLib.logic import CONCEPT_COLUMNS  # noqa: E402
from CoTexNetSegmentLib.worker import SegmentationWorker  # noqa: E402
from CoTexNetTrainLib import CoTexNetTrainLogic, TrainingInputError, TrainingRunError, TrainingState  # noqa: E402
from cotexnet.bundle import read_bundle_config  # noqa: E402
from cotexnet.data.image import SEGMENTATION_SUFFIX, strip_suffix  # noqa: E402
from cotexnet.errors import CoTexNetError  # noqa: E402

log = logging.getLogger("cotexnet_app.session")
#: How often the page's job watcher polls the worker, in seconds.
POLL_INTERVAL_S = 0.1
#: How often the training watcher reads the training process's progress file, in seconds.
TRAINING_POLL_INTERVAL_S = 0.5
#: The segmentation representation the 3D view draws.
CLOSED_SURFACE = "Closed surface"
#: Epochs of a training started from the page unless the page asks for another number.
DEFAULT_TRAINING_EPOCHS = 20


@dataclass
class OpenedCase:
    """A case opened in the page: its volume and the segmentation that Segment, the effects and Save work on.
    Cases stay in the session's scene until closed, so a training can use every one of them."""

    relative: str  # its path in the data root, as the page names it
    path: Path
    volume: object  # vtkMRMLScalarVolumeNode
    segmentation: object  # vtkMRMLSegmentationNode

    @property
    def stem(self) -> str:
        return self.path.name if self.path.is_dir() else strip_suffix(self.path)


class CoTexNetWebApp(TrameApp):
    """The page: open a volume, Segment with progress and Cancel, concept table, correct, save, train."""

    def __init__(self, server, data_root: DataRoot, models: list[str], device: str = "auto", batch_size: int = 8,
                 recent: Optional[RecentModels] = None):
        super().__init__(server)
        self.data_root, self.device, self.batch_size = data_root, device, batch_size
        self.fixed_models = models  # --model folders (outside the data root is fine: the server owner chose them)
        self.recent = recent or RecentModels()
        self.server.enable_module(trame_slicer_module)
        self.slicer_app = SlicerApp()
        mrml.ensureSegmentationConverters()
        register_rca_factories(self.slicer_app.view_manager, self.server)
        self.layout_logic = LayoutButtonLogic(self.server, self.slicer_app)
        self.layout_logic.layout_manager.set_layout("Quad View")
        self.editor_logic = SegmentEditorLogic(self.server, self.slicer_app)
        self.logic = CoTexNetSegmentLogic(self.slicer_app.scene, worker=SegmentationWorker())
        self.training = CoTexNetTrainLogic(self.slicer_app.scene)
        self.cases: dict[str, OpenedCase] = {}
        self.case: Optional[OpenedCase] = None  # the one in the views
        self.job = None
        self.curves: Optional[TrainingCurves] = None
        self._segmenting_with: Optional[Path] = None
        self._segment_clicked_at = self._training_started_at = 0.0
        self._set_defaults()
        self._build_ui()
        self.ctrl.on_server_bind.add(self._require_secret)
        self.ctrl.on_server_exited.add(self._end)

    def _end(self, **_) -> None:
        """The session ends: its worker, and a training it started (stopped at once; its best model stays)."""
        self.logic.worker.stop()
        self.training.terminate()

    # ------------------------------------------------------------------ state
    def _set_defaults(self) -> None:
        s = self.state
        s.trame__title = "CoTexNet"
        s.cx_volumes = self.data_root.volumes()
        s.cx_volume = s.cx_volumes[0] if s.cx_volumes else None
        s.cx_models = self._model_choices()
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

    # ------------------------------------------------------------------ volumes
    def open_volume(self, relative: Optional[str] = None) -> None:
        """Opens a volume or DICOM folder of the data root as a new case (or shows it again if it is open)."""
        relative = relative or self.state.cx_volume
        self.state.cx_error = ""
        try:
            path = self.data_root.resolve(relative or "")
        except AccessError as error:
            return self._fail(str(error))
        if self.job is not None and not self.job.finished:
            return self._fail("a segmentation is running: Cancel it before opening another volume")
        relative = self.data_root.relative(path)
        if relative not in self.cases:
            files = sorted(str(p) for p in path.iterdir() if p.is_file()) if path.is_dir() else [str(path)]
            volumes = self.slicer_app.io_manager.load_volumes(files)
            if not volumes:
                return self._fail(f"{relative}: no volume could be read from it")
            for extra in volumes[1:]:  # a folder of several series: the first is the case
                self.slicer_app.scene.RemoveNode(extra)
            segmentation = self.slicer_app.segmentation_editor.create_empty_segmentation_node()
            segmentation.SetName(f"{volumes[0].GetName()} segmentation")
            self.cases[relative] = OpenedCase(relative, path, volumes[0], segmentation)
        self._show_case(self.cases[relative])
        self.state.cx_message = f"Opened {relative}."

    def close_case(self) -> None:
        """Removes the case in the views (volume, segmentation, its concept table) from the session's scene."""
        self.state.cx_error = ""
        if self.case is None:
            return
        if self.job is not None and not self.job.finished:
            return self._fail("a segmentation is running: Cancel it before closing the case")
        case = self.cases.pop(self.case.relative)  # a running training has its own copy (exported at its start)
        self.slicer_app.segmentation_editor.deactivate_effect()
        for node in (self.logic.conceptTable(case.segmentation), case.segmentation, case.volume):
            if node is not None:
                self.slicer_app.scene.RemoveNode(node)
        self.case = None
        if self.cases:
            self._show_case(next(reversed(self.cases.values())))
        else:
            self.state.cx_opened, self.state.cx_concepts = "", []
            self._list_cases()
        self.state.cx_message = f"Closed {case.relative}."

    def _show_case(self, case: OpenedCase) -> None:
        """Puts a case in the views and in the segment editor; the other cases' volumes and segments are hidden."""
        for other in self.cases.values():
            if other is not case:
                self.slicer_app.display_manager.hide_volume(other.volume)
                other.segmentation.SetDisplayVisibility(False)
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
        self._list_cases()

    def _list_cases(self) -> None:
        """The opened cases for the page, each with how many segments it has (training uses those with some)."""
        self.state.cx_cases = [
            {"value": case.relative, "title": f"{case.relative} ({case.segmentation.GetSegmentation().GetNumberOfSegments()}"
                                              " segments)"} for case in self.cases.values()]

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

    # ------------------------------------------------------------------ models
    def _model_choices(self) -> list[dict]:
        """The model chooser's entries: recent models first, then --model folders, then the data root's run
        folders and the bundles that are not a run's. Values inside the data root are relative to it."""
        choices, seen = [], set()

        def add(value: str, title: str) -> None:
            if value not in seen:
                seen.add(value)
                choices.append({"title": title, "value": value})

        for path in self.recent.models():
            value = self._inside_root(Path(path)) or path
            add(value, f"{value} (recent)")
        for path in self.fixed_models:
            add(self._inside_root(Path(path)) or path, path)
        runs = self.data_root.runs()
        for run in runs:
            add(run, f"{run} (run)")
        for bundle in self.data_root.models():
            if not any(bundle.startswith(run + "/") for run in runs):
                add(bundle, bundle)
        return choices

    def _inside_root(self, path: Path) -> Optional[str]:
        try:
            return self.data_root.relative(path)
        except ValueError:
            return None

    def _model_path(self) -> Path:
        """The chosen model's folder: an absolute path only if the app itself listed it (a --model or a recent
        model), anything else is a path inside the data root."""
        chosen = self.state.cx_model or ""
        if chosen in self.fixed_models or chosen in self.recent.models():
            return Path(chosen)
        return self.data_root.resolve(chosen)

    def _use_model(self, folder: Path) -> None:
        """Lists ``folder`` first among the recent models and makes it the chosen one."""
        self.recent.add(folder)
        self.state.cx_models = self._model_choices()
        self.state.cx_model = self._inside_root(folder) or str(folder.resolve())

    # ------------------------------------------------------------------ segmentation

    def segment(self) -> None:
        self.state.cx_error = ""
        if self.case is None:
            return self._fail("open a volume first")
        if self.job is not None and not self.job.finished:
            return self._fail("a segmentation is already running")
        try:
            model = self._model_path()
            self.job = self.logic.startSegmentation(self.case.volume, model, self.device,
                                                    segmentationNode=self.case.segmentation, batchSize=self.batch_size)
        except (CoTexNetError, ValueError, RuntimeError) as error:
            return self._fail(str(error))
        self._segment_clicked_at = time.perf_counter()
        self.state.cx_busy, self.state.cx_progress = True, 0
        self.state.cx_message = f"Segmenting with {model.name}..."
        self._segmenting_with = model
        asyncio.ensure_future(self._watch(self.job))

    async def _watch(self, job) -> None:
        """Polls the job on the server's event loop: MRML changes only happen here, on its thread."""
        while True:
            job.poll()
            done, total = job.progress
            with self.state:
                self.state.cx_progress = int(100 * done / total) if total else 0
            if job.finished:
                break
            await asyncio.sleep(POLL_INTERVAL_S)
        with self.state:
            self.state.cx_busy = False
            if job.state == job.DONE:
                self._show_result(job.result)
                self.recent.add(self._segmenting_with)
            elif job.state == job.CANCELLED:
                self.state.cx_message = "Cancelled; the segmentation was left as it was."
            else:
                self._fail(f"Segmentation failed: {job.error}")

    def _show_result(self, segmentation) -> None:
        self.case.segmentation = segmentation  # the node the job filled (the case's own)
        segmentation.CreateClosedSurfaceRepresentation()  # surfaces in the 3D view, as Segment Editor's "Show 3D"
        self._show_case(self.case)
        seconds = time.perf_counter() - self._segment_clicked_at
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
        if self.job is not None and not self.job.finished:
            self.job.cancel()

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

    def save(self) -> None:
        """Writes the (corrected) segmentation as .seg.nrrd next to the opened volume."""
        from cotexnet.data.labels import write_segmentation_nrrd

        self.state.cx_error = ""
        case = self.case
        if case is None or not case.segmentation.GetSegmentation().GetNumberOfSegments():
            return self._fail("nothing to save: segment a volume first")
        editor = self.slicer_app.segmentation_editor
        names = editor.get_segment_names()
        labels = mrml.segmentationToLabelMap(case.segmentation, case.volume, names)
        colors = [editor.get_segment_properties(i).color for i in editor.get_segment_ids()]
        # Beside the volume file, or beside the DICOM folder (never inside a series).
        target = self.data_root.resolve(str(PurePosixPath(case.relative).parent / f"{case.stem}{SEGMENTATION_SUFFIX}"),
                                        must_exist=False)
        try:
            write_segmentation_nrrd(labels, mrml.geometryFromVolume(case.volume), target, names, colors)
        except CoTexNetError as error:
            return self._fail(str(error))
        self.state.cx_message = f"Saved {self.data_root.relative(target)}."

    # ------------------------------------------------------------------ training
    def train(self) -> None:
        """Trains on every opened case that has segments, continuing from the chosen model, in a background
        process run by CoTexNetTrainLogic (the Slicer module's logic: checks, export, ``cotexnet train``,
        progress file, stop file, run lock). The run's classes are the model's, then segments it lacks; the
        run folder goes to ``runs/`` in the data root."""
        self.state.cx_error = ""
        segmented = [case for case in self.cases.values() if case.segmentation.GetSegmentation().GetNumberOfSegments()]
        pairs = [(case.volume, case.segmentation) for case in segmented]
        if not pairs:
            return self._fail("nothing to train on: open a case and segment (or paint) it first")
        if self.training.isRunning:
            return self._fail("a training is already running: Stop it first")
        try:
            epochs = int(self.state.cx_epochs)
            if epochs < 1:
                raise ValueError
        except (TypeError, ValueError):
            return self._fail(f"epochs: expected a whole number of at least 1, got {self.state.cx_epochs!r}")
        try:
            model = self._model_path()
            config = read_bundle_config(model)
            name = segmented[0].stem if len(segmented) == 1 else f"{len(segmented)}-cases"
            run = self.data_root.resolve(f"{RUNS_FOLDER}/{name}-{time.strftime('%Y%m%d-%H%M%S')}", must_exist=False)
            self.training.train(pairs, None, run, waitForCompletion=False, initFrom=str(model),
                                backbone=config.backbone, epochs=epochs, device=self.device)
        except (CoTexNetError, TrainingInputError, TrainingRunError, ValueError, OSError) as error:
            return self._fail(f"Training could not start: {error}")
        classes = self.training.classes
        model_colors = dict(zip(config.classes, config.colors))
        segment_colors = {p.name: p.color for p in self.slicer_app.segmentation_editor.get_all_segment_properties().values()}
        self.curves = TrainingCurves(classes, [hex_color(model_colors.get(c) or segment_colors.get(c) or (0.4, 0.4, 0.4))
                                               for c in classes])
        self._training_started_at = time.perf_counter()
        self.state.cx_training, self.state.cx_charts = True, self.curves.charts()
        cases = "this case" if len(pairs) == 1 else f"{len(pairs)} cases"
        self.state.cx_train_message = f"Training {self.data_root.relative(run)} on {cases} from {model.name}..."
        asyncio.ensure_future(self._watch_training())

    async def _watch_training(self) -> None:
        """Reads the training process's progress events into the curves until it ends."""
        training, first_point = self.training, True
        while True:
            events = training.poll()
            with self.state:
                for event in events:
                    self.curves.add(event)
                if events:
                    self.state.cx_charts = self.curves.charts()
                    self.state.cx_train_message = training.progress.summary()
                if first_point and self.curves.epochs:
                    first_point = False
                    log.info(f"training start to first plot point: {time.perf_counter() - self._training_started_at:.2f} s")
            if not training.isRunning and training.state not in (TrainingState.RUNNING, TrainingState.STOPPING):
                break
            await asyncio.sleep(TRAINING_POLL_INTERVAL_S)
        with self.state:
            self.state.cx_training = False
            if training.state == TrainingState.FAILED:  # a segmentation may be running: cx_busy stays as it is
                self.state.cx_train_message, self.state.cx_error = "", f"Training failed: {training.errorMessage}"
                log.warning(self.state.cx_error)
                return
            bundle = training.bundlePath
            self.state.cx_train_message = training.progress.summary()
            if bundle is not None:
                self._use_model(training.outDir)  # the run folder: segmenting with it uses its best model
                self.state.cx_train_message += f"; the current model is now {self.state.cx_model}."

    def stop_training(self) -> None:
        """Asks the training process to stop after its current step; it saves its best model and exits."""
        if self.training.isRunning:
            self.training.requestStop()
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

    # ------------------------------------------------------------------ page
    def _build_ui(self) -> None:
        with ViewerLayout(self.server, title="CoTexNet", is_drawer_visible=True) as self.ui:
            self.ui.drawer.width = 560  # room for the concept table
            with self.ui.drawer:
                self._build_panel()
                self.editor_ui = SegmentEditorUI()
            with self.ui.toolbar:
                SegmentEditorToolbarUI(editor_ui=self.editor_ui)
            with self.ui.undo_redo:
                SegmentEditorUndoRedoUI(editor_ui=self.editor_ui)
            with self.ui.content:
                self.layout_logic.layout_manager.initialize_layout_grid(self.ui)
        self.editor_logic.set_ui(self.editor_ui)

    def _build_panel(self) -> None:
        with v3.VCard(id="cotexnet-panel", flat=True, classes="pa-2"):
            with html.Div(classes="d-flex align-center"):
                v3.VSelect(id="cx-volume", label="Volume (data root)", items=("cx_volumes",), v_model=("cx_volume",),
                           density="compact", hide_details=True)
                v3.VBtn("Open", id="cx-open", click=self.open_volume, disabled=("cx_busy",), density="compact",
                        classes="ml-1")
            with html.Div(classes="d-flex align-center mt-2", v_show=("cx_cases.length",)):
                v3.VSelect(id="cx-case", label="Opened cases (training uses those with segments)",
                           items=("cx_cases",), model_value=("cx_opened",), update_modelValue=(self.open_volume, "[$event]"),
                           disabled=("cx_busy",), density="compact", hide_details=True)
                v3.VBtn("Close", id="cx-close", click=self.close_case, disabled=("cx_busy",),
                        density="compact", classes="ml-1")
            v3.VFileInput(
                id="cx-upload", label="Upload a volume", density="compact", hide_details=True, classes="mt-2",
                # The cap is checked here too, so an oversized file is never sent.
                change=(f"$event.target.files[0] && $event.target.files[0].size > cx_upload_limit "
                        f"? (cx_error = `${{$event.target.files[0].name}}: over the upload limit`) "
                        f": trigger('{self.ctrl.trigger_name(self.upload)}', [$event.target.files])"),
                disabled=("cx_busy",),
            )
            v3.VSelect(id="cx-model", label="Model (recent, --model, run folders and bundles in the data root)",
                       items=("cx_models",), v_model=("cx_model",), density="compact", hide_details=True,
                       classes="mt-2")
            with html.Div(classes="d-flex align-center mt-2"):
                v3.VBtn("Segment", id="cx-segment", color="primary", click=self.segment, disabled=("cx_busy || !cx_opened",))
                v3.VBtn("Cancel", id="cx-cancel", click=self.cancel, disabled=("!cx_busy",), classes="ml-2")
                v3.VBtn("Save .seg.nrrd", id="cx-save", click=self.save, disabled=("cx_busy || !cx_concepts.length",),
                        classes="ml-2")
            v3.VProgressLinear(id="cx-progress", model_value=("cx_progress",), v_show=("cx_busy",), classes="mt-2")
            html.Div("{{ cx_message }}", id="cx-message", classes="text-caption mt-1")
            html.Div("{{ cx_error }}", id="cx-error", v_show=("cx_error",), classes="text-caption text-error")
            with v3.VTable(id="cx-concepts", density="compact", v_show=("cx_concepts.length",), classes="mt-2"):
                with html.Thead():
                    with html.Tr():
                        html.Th("{{ column.title }}", v_for="column in cx_concept_columns", key="column.key")
                with html.Tbody():
                    with html.Tr(v_for="(row, index) in cx_concepts", key="index", classes="cx-concept-row",
                                 style="cursor: pointer", click=(self.show_concept_row, "[index]")):
                        # One line per class; a long prompt is cut, with the whole of it on hover.
                        html.Td("{{ row[column.key] }}", v_for="column in cx_concept_columns", key="column.key",
                                title=("row[column.key]",),
                                style="white-space: nowrap; max-width: 160px; overflow: hidden; text-overflow: ellipsis")
            self._build_training_panel()

    def _build_training_panel(self) -> None:
        """Train on the opened cases from the current model; loss and per-class Dice drawn as SVG per epoch."""
        with html.Div(classes="d-flex align-center mt-3"):
            v3.VTextField(id="cx-epochs", label="Epochs", v_model_number=("cx_epochs",), type="number", min=1,
                          density="compact", hide_details=True, style="max-width: 90px", disabled=("cx_training",))
            v3.VBtn("Train on the opened cases", id="cx-train", click=self.train, classes="ml-2",
                    disabled=("cx_training || cx_busy || !cx_opened",))
            v3.VBtn("Stop", id="cx-stop", click=self.stop_training, disabled=("!cx_training",), classes="ml-2")
        html.Div("{{ cx_train_message }}", id="cx-train-message", classes="text-caption mt-1")
        with html.Div(id="cx-charts", classes="d-flex mt-1", v_show=("cx_charts.length",)):
            with html.Svg(v_for="chart in cx_charts", key="chart.title", width=("chart.width",),
                          height=("chart.height",), classes="cx-chart mr-1", style="background: #fafafa"):
                SvgElement("text", "{{ chart.title }}", x=("chart.margin",), y="12", font_size="11")
                SvgElement("text", "{{ chart.y_top }}", x="1", y="10", font_size="9")
                SvgElement("text", "epoch {{ chart.x_max }}", x=("chart.width - 50",), y=("chart.height - 4",),
                           font_size="9")
                SvgElement("line", x1=("chart.margin",), y1="0", x2=("chart.margin",),
                           y2=("chart.height - chart.margin",), stroke="#999")
                SvgElement("line", x1=("chart.margin",), y1=("chart.height - chart.margin",), x2=("chart.width",),
                           y2=("chart.height - chart.margin",), stroke="#999")
                with SvgElement("g", v_for="series in chart.series", key="series.name"):
                    SvgElement("polyline", points=("series.points",), fill="none", stroke=("series.color",),
                               stroke_width="1.5")
                    SvgElement("circle", v_for="(dot, i) in series.dots", key="i", cx=("dot[0]",), cy=("dot[1]",),
                               r="2.5", fill=("series.color",), classes="cx-point")
                    SvgElement("title", "{{ series.name }}")


class SvgElement(HtmlElement):
    """An SVG element by tag name (trame's html module has <svg> but not the shapes inside it)."""

    def __init__(self, tag: str, children=None, **kwargs):
        super().__init__(tag, children, **kwargs)
        self._attr_names += ["x", "y", "x1", "y1", "x2", "y2", "cx", "cy", "r", "points", "fill", "stroke",
                             ("stroke_width", "stroke-width"), ("font_size", "font-size")]


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
