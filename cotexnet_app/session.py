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
from cotexnet_app.files import AccessError, DataRoot, Upload
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
from trame_slicer.segmentation import (SegmentationEffectErase, SegmentationEffectNoTool,  # noqa: E402
                                       SegmentationEffectPaint)
from trame_slicer.segmentation.segmentation_state_stack import SegmentationStateStack  # noqa: E402
from trame_slicer.segmentation.segmentation_undo_command import SegmentationLabelMapUndoCommand  # noqa: E402

from CoTexNetSegmentLib import CoTexNetSegmentLogic  # noqa: E402
from CoTexNetSegmentLib import mrml  # noqa: E402
from CoTexNetSegmentLib.logic import CONCEPT_COLUMNS  # noqa: E402
from CoTexNetSegmentLib.worker import SegmentationWorker  # noqa: E402
from CoTexNetTrainLib import TrainingInputError, TrainingRunError, TrainingState  # noqa: E402
from cotexnet.bundle import read_bundle_config  # noqa: E402
from cotexnet.data import list_dicom_series, read_image  # noqa: E402
from cotexnet.errors import CoTexNetError  # noqa: E402

from cotexnet_app.cases import (ADD_CLASS, MAP_TO, SKIP_CLASS, OpenedCase, OpenedCases, case_name,  # noqa: E402
                                split_case_name, statistics_path)
from cotexnet_app.jobs import DEFAULT_TRAINING_EPOCHS, DRAWING, SegmentationJobs, TrainingJobs  # noqa: E402
from cotexnet_app.layout import build_page, slice_view_ui  # noqa: E402
from cotexnet_app.models import ModelChooser  # noqa: E402
from cotexnet_app.promotion import mean_over, run_facts  # noqa: E402

log = logging.getLogger("cotexnet_app.session")
#: Window/level presets (window, level) in the volume's units; "MR auto" is Slicer's automatic window/level.
WINDOW_LEVEL_PRESETS = {"CT soft tissue": (400.0, 40.0), "CT lung": (1500.0, -600.0), "CT bone": (2000.0, 300.0),
                        "CT brain": (80.0, 40.0), "MR auto": None}
#: The tools the B, E and Escape keys choose.
TOOLS = {"paint": SegmentationEffectPaint, "erase": SegmentationEffectErase, "none": SegmentationEffectNoTool}
#: The segmentation representation the 3D view draws.
CLOSED_SURFACE = "Closed surface"
#: Seconds after the last edit before the segment statistics are counted again.
STATISTICS_DELAY_S = 0.5
#: Bytes of an uploaded file per websocket message: well under wslink's default message size (4 MiB) and
#: trame's websocket limit (10,000,000 bytes), so no upload size reaches either.
UPLOAD_CHUNK_BYTES = 2 << 20
#: The page's own scripts (upload.js).
WEB_FOLDER = Path(__file__).resolve().parent / "web"


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
        register_rca_factories(self.slicer_app.view_manager, self.server, slice_view_ui_f=slice_view_ui)
        self.layout_logic = LayoutButtonLogic(self.server, self.slicer_app)
        self.layout_logic.layout_manager.set_layout("Quad View")
        self.editor_logic = SegmentEditorLogic(self.server, self.slicer_app)
        self.logic = CoTexNetSegmentLogic(self.slicer_app.scene, worker=SegmentationWorker())
        self.cases = OpenedCases(self.slicer_app, data_root, self.logic.conceptTable)
        self.case: Optional[OpenedCase] = None  # the one in the views
        self.segmentation = SegmentationJobs(self.logic, device, batch_size)
        self.training = TrainingJobs(self.slicer_app.scene, data_root, device)
        self._upload: Optional[Upload] = None
        self._pending = None  # what the open question's answer button does
        self._segmentation_before = None  # the segments before the running segmentation, for its undo step
        for name in ("upload_begin", "upload_chunk", "upload_end", "undo", "redo", "key"):  # called by web/*.js
            self.server.trigger(f"cx_{name}")(getattr(self, name))
        self.server.enable_module({"serve": {"cotexnet": str(WEB_FOLDER)},
                                   "scripts": ["cotexnet/upload.js", "cotexnet/keys.js"]})
        self._set_defaults()
        build_page(self)
        self.ctrl.on_server_bind.add(self._require_secret)
        self.ctrl.on_client_connected.add(self.refresh_lists)
        self._statistics_due = False
        self.slicer_app.segmentation_editor.undo_stack.index_changed.connect(self._statistics_later)  # each edit
        self.ctrl.on_server_exited.add(self._end)

    def _end(self, **_) -> None:
        """The session ends: its worker, a training it started (stopped at once; its best model stays), and an
        unfinished upload."""
        self.logic.worker.stop()
        self.training.logic.terminate()
        if self._upload is not None:  # a file the page was still sending: nothing of it stays
            self._upload.abort()

    # ------------------------------------------------------------------ state
    def _set_defaults(self) -> None:
        s = self.state
        s.trame__title = "CoTexNet"
        self.refresh_lists()
        s.cx_volume = s.cx_volumes[0] if s.cx_volumes else None
        s.cx_model = self.models.default(s.cx_models)
        s.cx_candidate = ""  # a trained model the page did not make current (worse on held-out cases)
        s.cx_unknown, s.cx_unknown_choices = [], []  # segments that are not the model's classes, and what to do
        s.cx_opened = ""
        s.cx_cases = []
        s.cx_busy = False
        s.cx_progress = 0
        s.cx_phase = ""
        s.cx_message = "Open a volume from the data root, choose a model, then Segment."
        s.cx_error = ""
        s.cx_concepts = []
        s.cx_statistics = []
        s.cx_presets = list(WINDOW_LEVEL_PRESETS)
        s.cx_window_level = []
        # The page segments without a confidence volume, so the table's mean-confidence column would be empty.
        s.cx_concept_columns = [{"key": key, "title": title} for key, title in CONCEPT_COLUMNS
                                if key not in ("sources", "mean_confidence", "prompt")]  # the prompt: a line of its own
        s.cx_active_row = -1
        s.cx_upload_limit = self.data_root.upload_limit_bytes
        s.cx_upload_chunk_bytes = UPLOAD_CHUNK_BYTES
        s.cx_uploading = False
        s.cx_upload_progress = 0
        s.cx_training = False
        s.cx_epochs = DEFAULT_TRAINING_EPOCHS
        s.cx_train_message = ""
        s.cx_charts = []
        s.cx_question, s.cx_answer = "", ""
        s.cx_series_folder, s.cx_series = "", []  # a DICOM folder of several series, and its series to choose
        s.cx_conflict = False
        s.is_drawer_visible = True

    def refresh_lists(self, **_) -> None:
        """Lists the data root again: images, segmentations and models apart (on each page load, each open,
        and on the page's Refresh)."""
        with self.state:
            self.state.cx_volumes = self.data_root.volumes()
            self.state.cx_segmentations = self.data_root.segmentations()
            self.state.cx_models = self.models.choices()

    def _statistics_later(self, *_) -> None:
        """Segment statistics follow the edits, once they pause (a stroke modifies the segmentation often)."""
        if not self._statistics_due:
            self._statistics_due = True
            asyncio.ensure_future(self._update_statistics(STATISTICS_DELAY_S))

    async def _update_statistics(self, delay: float = 0.0) -> None:
        await asyncio.sleep(delay)
        self._statistics_due = False
        with self.state:
            self.state.cx_statistics = self.case.statistics() if self.case is not None else []

    def _fail(self, message: str) -> None:
        message = self.data_root.shown(message)  # paths relative to the data root, never the server's
        self.state.cx_error = message
        self.state.cx_busy = False
        log.warning(message)

    # ------------------------------------------------------------------ cases
    def open_volume(self, name: Optional[str] = None) -> None:
        """Opens a volume or DICOM folder of the data root as a new case (or shows it again if it is open). A
        folder of several DICOM series lists them for the user to choose one (:meth:`open_series`)."""
        name = name or self.state.cx_volume
        self.state.cx_error = ""
        relative, series = split_case_name(name or "")
        try:
            path = self.data_root.resolve(relative)
        except AccessError as error:
            return self._fail(str(error))
        if self.segmentation.running:
            return self._fail("a segmentation is running: Cancel it before opening another volume")
        self.refresh_lists()
        opened = set(self.cases.by_path)
        if series is None and path.is_dir() and self.data_root.relative(path) not in opened:
            try:
                found = list_dicom_series(path)
            except CoTexNetError as error:
                return self._fail(self.data_root.shown(str(error)))
            if len(found) > 1:
                self.state.cx_series_folder = self.data_root.relative(path)
                self.state.cx_series = [{"uid": one.uid, "description": one.description or "(no description)",
                                         "modality": one.modality or "?", "size": " x ".join(map(str, one.size)),
                                         "files": len(one.files)} for one in found]
                return
        try:
            case = self.cases.open(name)
        except AccessError as error:
            return self._fail(str(error))
        saved, problem = None, ""
        if case.relative not in opened:
            try:
                saved = self.cases.load_saved(case)
            except AccessError as error:
                problem = str(error)
        self._show_case(case)
        self.state.cx_message = f"Opened {case.relative}" + (
            f" with its saved segmentation {self.data_root.relative(saved)} ({case.segment_count} segments)."
            if saved else ".")
        self.state.cx_error = problem

    def open_series(self, uid: Optional[str] = None) -> None:
        """Opens the series the user chose from the DICOM folder's list (none: the list is closed)."""
        folder, self.state.cx_series = self.state.cx_series_folder, []
        if uid:
            self.open_volume(case_name(folder, uid))

    def close_case(self, confirmed: bool = False) -> None:
        """Removes the case in the views (volume, segmentation, its concept table) from the session's scene;
        asks first when it has unsaved edits."""
        self.state.cx_error = ""
        if self.case is None:
            return
        if self.segmentation.running:
            return self._fail("a segmentation is running: Cancel it before closing the case")
        case = self.case
        if not confirmed and case.has_unsaved_edits:
            return self._ask(f"{case.relative} has unsaved edits. Close it and discard them?", "Discard and close",
                             lambda: self.close_case(confirmed=True))
        self.slicer_app.segmentation_editor.deactivate_effect()
        following = self.cases.close(case)
        self.case = None
        if following is not None:
            self._show_case(following)
        else:
            self.state.cx_opened, self.state.cx_concepts, self.state.cx_statistics = "", [], []
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
        active = editor.active_segmentation
        if active is None or active.segmentation_node.GetID() != case.segmentation.GetID():
            editor.deactivate_effect()
            editor.set_active_segmentation(case.segmentation, case.volume)  # this clears the undo steps
            editor.undo_stack.set_undo_limit(case.undo_steps())
        else:
            editor.trigger_all_signals()  # the same segmentation, new segments: the segment list follows
        editor.set_surface_representation_enabled(show_3d)
        self.case = case
        self.state.cx_opened = case.relative
        self.state.cx_volume = case.relative
        self.state.cx_concepts = self._concept_rows(case.segmentation)
        self.state.cx_active_row = -1
        self.state.cx_cases = self.cases.choices()
        self.state.cx_statistics = case.statistics()

    def upload_begin(self, name: str, size: int) -> bool:
        """The page starts sending a file (cotexnet_app/web/upload.js): refused at once over the cap or if it
        is not a volume file; any upload this page left unfinished is dropped."""
        self.state.cx_error = ""
        if self._upload is not None:
            self._upload.abort()
        try:
            self._upload = self.data_root.begin_upload(str(name), int(size))
        except AccessError as error:
            self._upload = None
            self._fail(str(error))
            return False
        self.state.cx_uploading = True
        self.state.cx_message = f"Uploading {name}..."
        return True

    def upload_chunk(self, offset: int, data: bytes) -> bool:
        """One chunk of the file, written to disk at once (no process keeps the upload in memory)."""
        try:
            if self._upload is None:
                raise AccessError("upload chunk without a started upload")
            self._upload.write(int(offset), bytes(data))
        except AccessError as error:
            self._end_upload()
            self._fail(str(error))
            return False
        return True

    def upload_end(self) -> None:
        """The whole file has arrived: it is read with the engine's checked reader, moved into uploads/ and
        opened; a file the reader refuses leaves nothing behind."""
        upload = self._end_upload()
        if upload is None:
            return
        try:
            path = upload.finish(read_image)  # the engine's checked reader, as on open
        except AccessError as error:
            self.state.cx_message = "The upload was refused."
            return self._fail(str(error))
        relative = self.data_root.relative(path)
        self.state.cx_volume = relative
        self.open_volume(relative)

    def _end_upload(self):
        upload, self._upload = self._upload, None
        self.state.cx_uploading = False
        return upload

    def save(self) -> None:
        """Writes the (corrected) segmentation as .seg.nrrd next to the opened volume; refuses when that file
        changed on disk since this session read or wrote it (another session saved it, say)."""
        self.state.cx_error, self.state.cx_conflict = "", False
        case = self.case
        if case is None or not case.segment_count:
            return self._fail("nothing to save: segment a volume first")
        target = self.cases.segmentation_path(case)
        if self.cases.changed_on_disk(case):
            self.state.cx_conflict = True
            return self._fail(f"{self.data_root.relative(target)} changed on disk since this page opened it "
                              "(another session saved it?): reload it or save as a copy")
        self._write(case, target)

    def save_copy(self) -> None:
        """Writes the segmentation beside the usual file as ``<stem>-copy-N.seg.nrrd`` (a free name)."""
        if self.case is not None:
            self.state.cx_error, self.state.cx_conflict = "", False
            self._write(self.case, self.cases.free_copy_path(self.case))

    def reload(self, confirmed: bool = False) -> None:
        """Replaces the case's segments with the file on disk; asks first when that discards unsaved edits."""
        case = self.case
        if case is None:
            return
        if not confirmed and case.has_unsaved_edits:
            return self._ask("Reloading replaces your unsaved edits with the file on disk.", "Reload",
                             lambda: self.reload(confirmed=True))
        self.state.cx_error, self.state.cx_conflict = "", False
        case.segmentation.GetSegmentation().RemoveAllSegments()
        try:
            saved = self.cases.load_saved(case)
        except AccessError as error:
            return self._fail(str(error))
        self._show_case(case)
        self.state.cx_message = (f"Reloaded {self.data_root.relative(saved)}." if saved
                                 else "No saved segmentation on disk: the segments were cleared.")

    def _write(self, case: OpenedCase, target: Path) -> None:
        try:
            self.cases.save(case, target)
        except CoTexNetError as error:
            return self._fail(self.data_root.shown(str(error)))
        self.state.cx_message = (f"Saved {self.data_root.relative(target)} and its segment statistics "
                                 f"{self.data_root.relative(statistics_path(target))}.")

    # ------------------------------------------------------------------ questions
    def _ask(self, question: str, answer: str, action) -> None:
        """Shows a question with a button that runs ``action``, and Cancel."""
        self._pending = action
        self.state.cx_question, self.state.cx_answer = question, answer

    def answer(self, proceed: bool) -> None:
        action, self._pending = self._pending, None
        self.state.cx_question = ""
        if proceed and action is not None:
            action()

    def add_segment_without_volume(self) -> None:
        """trame-slicer's Add segment needs a segmentation: before a volume is open, say so."""
        if self.case is None:
            self._fail("open a volume first: segments belong to a volume")

    # ------------------------------------------------------------------ viewer
    def window_level(self, preset: str) -> None:
        """Applies a window/level preset to the case in the views."""
        if self.case is None or preset not in WINDOW_LEVEL_PRESETS:
            return
        display = self.case.volume.GetDisplayNode()
        values = WINDOW_LEVEL_PRESETS[preset]
        display.SetAutoWindowLevel(values is None)
        if values is not None:
            display.SetWindowLevel(*values)
        self.state.cx_window_level = [round(display.GetWindow(), 1), round(display.GetLevel(), 1)]

    # ------------------------------------------------------------------ keyboard
    def key(self, action: str, value) -> None:
        """A shortcut of web/keys.js: step the axial slice, choose the n-th segment, a tool, the brush size."""
        editor = self.slicer_app.segmentation_editor
        if self.case is None:
            return
        if action == "slice":
            view = next(v for v in self.slicer_app.view_manager.get_slice_views() if v.get_orientation() == "Axial")
            low, high = view.get_slice_range()
            view.set_slice_value(min(max(view.get_slice_value() + int(value) * view.get_slice_step(), low), high))
        elif action == "segment" and 1 <= int(value) <= self.case.segment_count:
            editor.set_active_segment_id(editor.get_nth_segment_id(int(value) - 1))
        elif action == "tool":
            editor.set_active_effect_type(TOOLS[value])
        elif action == "brush" and hasattr(editor.active_effect, "increase_brush_size"):
            (editor.active_effect.increase_brush_size if int(value) > 0 else editor.active_effect.decrease_brush_size)()

    # ------------------------------------------------------------------ undo
    def undo(self) -> None:
        self.slicer_app.segmentation_editor.undo_stack.undo()

    def redo(self) -> None:
        self.slicer_app.segmentation_editor.undo_stack.redo()

    # ------------------------------------------------------------------ models
    def _use_model(self, folder: Path) -> None:
        """Lists ``folder`` first among the recent models and makes it this session's chosen one."""
        self.models.recent.add(folder)
        self.state.cx_models = self.models.choices()
        self.state.cx_model = self.models.value(folder)
        self.state.cx_candidate = ""

    # ------------------------------------------------------------------ segmentation
    def segment(self, confirmed: bool = False) -> None:
        """Segments the case in the views; its result replaces the segments named like the model's classes,
        as one step that Undo takes back. Asks first when the case has unsaved edits."""
        self.state.cx_error = ""
        if self.case is None:
            return self._fail("open a volume first")
        if self.segmentation.running:
            return self._fail("a segmentation is already running")
        if not confirmed and self.case.has_unsaved_edits:
            return self._ask("Segmenting replaces the model's classes in your unsaved edits (Undo brings them "
                             "back).", "Segment", lambda: self.segment(confirmed=True))
        before = SegmentationStateStack(self.case.segmentation.GetSegmentation(), max_size=2)
        try:
            model = self.models.path(self.state.cx_model)
            job = self.segmentation.start(self.case, model, beforeApply=before.save_state)
        except (CoTexNetError, ValueError, RuntimeError) as error:
            return self._fail(str(error))
        self._segmentation_before = before
        self.state.cx_busy, self.state.cx_progress = True, 0
        self.state.cx_message = f"Segmenting with {model.name}..."
        asyncio.ensure_future(self._watch(job))

    async def _watch(self, job) -> None:
        """Shows the job's progress, then its result: MRML changes only happen here, on the server's thread."""
        def progress(percent: int, phase: str) -> None:
            with self.state:
                self.state.cx_progress, self.state.cx_phase = percent, phase

        await self.segmentation.watch(job, progress)
        if job.state == job.DONE:  # say so before the (possibly long) drawing
            with self.state:
                self.state.cx_phase = DRAWING
            await asyncio.sleep(0.05)
        with self.state:
            self.state.cx_busy, self.state.cx_phase = False, ""
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
        # One undo step from the segments before the run (saved just before it changed the scene) to its result.
        editor = self.slicer_app.segmentation_editor
        self._segmentation_before.save_state()
        editor.undo_stack.push(SegmentationLabelMapUndoCommand(self._segmentation_before, editor.active_segmentation))
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
        self.state.cx_active_row = int(row)
        if segmentation.GetSegmentCenterRAS(segment_id) is None:
            name = segmentation.GetSegmentation().GetSegment(segment_id).GetName()
            self.state.cx_message = f"{name} has no voxels in this case: nothing to show (paint it to add some)."

    # ------------------------------------------------------------------ training
    def train(self, choices: Optional[list] = None) -> None:
        """Trains on every opened case that has segments, continuing from the chosen model, in a background
        process run by CoTexNetTrainLogic (the Slicer module's logic: checks, export, ``cotexnet train``,
        progress file, stop file, run lock). The run folder goes to ``runs/`` in the data root. Segments that
        are not the model's classes are listed first, each to be added as a class, skipped or mapped to one
        (``choices``: the page's rows, name and choice)."""
        self.state.cx_error, self.state.cx_unknown = "", []
        try:
            epochs = float(self.state.cx_epochs)
            if epochs < 1 or epochs != int(epochs):
                raise ValueError
            epochs = int(epochs)
        except (TypeError, ValueError):
            return self._fail(f"epochs: expected a whole number of at least 1, got {self.state.cx_epochs!r}")
        segmented = [case for case in self.cases if case.segment_count]
        if not segmented:
            return self._fail("nothing to train on: open a case and segment (or paint) it first")
        if self.training.running:
            return self._fail("a training is already running: Stop it first")
        segment_colors = {p.name: p.color for p in self.slicer_app.segmentation_editor.get_all_segment_properties().values()}
        try:
            model = self.models.path(self.state.cx_model)
            classes = list(read_bundle_config(model).classes)
        except (CoTexNetError, ValueError) as error:
            return self._fail(f"Training could not start: {error}")
        unknown = sorted({name for case in segmented for name in case.segment_names} - set(classes))
        if unknown and choices is None:
            self.state.cx_unknown_choices = [ADD_CLASS, SKIP_CLASS] + [f"{MAP_TO}{name}" for name in classes]
            self.state.cx_unknown = [{"name": name, "choice": ADD_CLASS} for name in unknown]
            return
        try:
            training_cases = [self.cases.with_classes(case, {row["name"]: row["choice"] for row in choices or []})
                              for case in segmented]
        except AccessError as error:
            return self._fail(str(error))
        try:
            run = self.training.start([case for case in training_cases if case.segment_count], model, epochs,
                                      segment_colors)
        except (CoTexNetError, TrainingInputError, TrainingRunError, ValueError, OSError) as error:
            for case in training_cases:
                self.cases.drop_copy(case)
            return self._fail(f"Training could not start: {error}")
        self.state.cx_training, self.state.cx_charts = True, self.training.curves.charts()
        self.state.cx_candidate = ""
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

        try:
            await self._watch_and_hand_over(show)
        finally:
            for case in self.training.cases:
                self.cases.drop_copy(case)

    async def _watch_and_hand_over(self, show) -> None:
        training = self.training.logic
        await self.training.watch(show)
        self.refresh_lists()  # the run is listed among the models, current or not
        with self.state:
            self.state.cx_training = False
            if training.state == TrainingState.FAILED:  # a segmentation may be running: cx_busy stays as it is
                self.state.cx_train_message, self.state.cx_error = "", f"Training failed: {training.errorMessage}"
                log.warning(self.state.cx_error)
                return
            summary = training.progress.summary()
            current = self.state.cx_model
            epochs, held_out = run_facts(training.outDir)
            if training.bundlePath is None or epochs < 1 or held_out is None or not held_out.case_ids:
                self.state.cx_train_message = (f"{summary}; it stopped before one full epoch, so the current model "
                                               f"stays {current}.")
                return
            where = (f"{len(held_out.case_ids)} held-out case(s)" if not held_out.trained_on else
                     "its training case(s): no case was held out, so this Dice is on training data")
            self.state.cx_train_message = f"{summary}; comparing it with {current} on {where}..."
        try:
            old, new = await self.training.compare(held_out)
        except (RuntimeError, ValueError, OSError, CoTexNetError) as error:
            with self.state:
                self.state.cx_candidate = self.models.value(training.outDir)
                self.state.cx_train_message = (f"{summary}; it could not be compared with {current} ({error}), so "
                                               "the current model stays.")
            return
        classes = list(old)  # the current model's classes: the new one's added classes have no rival
        old_mean, new_mean = mean_over(old, classes), mean_over(new, classes)
        with self.state:
            verdict = f"{summary}. Mean Dice on {where}: new {new_mean:.3f}, current {old_mean:.3f}"
            if new_mean >= old_mean:
                self._use_model(training.outDir)  # the run folder: segmenting with it uses its best model
                self.state.cx_train_message = f"{verdict}; the current model is now {self.state.cx_model}."
            else:
                self.state.cx_candidate = self.models.value(training.outDir)
                self.state.cx_train_message = f"{verdict}: it is worse, so the current model stays {current}."

    def use_candidate(self) -> None:
        """Makes the trained model that was not better the current one anyway (the user's choice)."""
        if self.state.cx_candidate:
            self._use_model(self.models.path(self.state.cx_candidate))
            self.state.cx_train_message = f"The current model is now {self.state.cx_model}."

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
