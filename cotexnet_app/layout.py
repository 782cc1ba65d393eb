"""The page's layout: trame-slicer's viewer with the CoTexNet panel (open, upload, model, Segment, concept
table, training and its charts) in the drawer. Widgets only: what they do is the page's handlers
(:class:`cotexnet_app.session.CoTexNetWebApp`), what they show is its state (``cx_*``).
"""

from __future__ import annotations

from trame.widgets import html
from trame.widgets import vuetify3 as v3
from trame_client.widgets.core import HtmlElement
from trame_server.utils.typed_state import TypedState
from trame_slicer.app.logic.slice_view_logic import get_view_slider_typed_state
from trame_slicer.app.ui import (PaintEffectState, SegmentEditorState, SegmentEditorToolbarUI, SegmentEditorUI,
                                 SegmentEditorUndoRedoUI, ViewerLayout, create_vertical_slice_view_gutter_ui)
from trame_slicer.segmentation import SegmentationEffectErase, SegmentationEffectPaint


def build_page(page) -> None:
    """The page's widgets, bound to its state and to ``page``'s handlers (a CoTexNetWebApp)."""
    with ViewerLayout(page.server, title="CoTexNet", is_drawer_visible=True) as page.ui:
        page.ui.drawer.width = 560  # room for the concept table
        with page.ui.drawer:
            _build_panel(page)
            page.editor_ui = SegmentEditorUI()
            page.editor_ui.add_segment_clicked.connect(page.add_segment_without_volume)
        with page.ui.toolbar:
            SegmentEditorToolbarUI(editor_ui=page.editor_ui)
            _build_brush_size(page)
        with page.ui.undo_redo:
            SegmentEditorUndoRedoUI(editor_ui=page.editor_ui)
        with page.ui.content:
            page.layout_logic.layout_manager.initialize_layout_grid(page.ui)
            html.Div("No volume: open one from the data root or upload one", id="cx-no-volume", v_show=("!cx_opened",),
                     classes="text-h6 text-grey-lighten-1",
                     style="position: absolute; top: 45%; left: 50%; transform: translate(-50%, -50%); "
                           "pointer-events: none; z-index: 5")
        page.ui.footer.clear()  # trame-slicer's footer names its own maker; this page says what it is
        with page.ui.footer:
            html.Span("CoTexNet in the browser, on trame-slicer and 3D Slicer", classes="text-grey-lighten-1 text-caption")
    page.editor_logic.set_ui(page.editor_ui)


def _build_brush_size(page) -> None:
    """Brush size beside the paint and erase buttons, while one of them is active: + and - change the active
    effect's brush diameter as the + and - keys do (``page.key``); the number is trame-slicer's brush slider
    (the effect panel's), which follows the effect's diameter."""
    active = TypedState(page.state, SegmentEditorState).name.active_effect_name
    brushes = [effect.get_effect_name() for effect in (SegmentationEffectPaint, SegmentationEffectErase)]
    diameter = TypedState(page.state, PaintEffectState).name.brush_diameter_slider.value
    with html.Div(id="cx-brush", v_if=(f"{brushes}.includes({active})",), classes="d-flex flex-column align-center",
                  title="Brush size (% of the view; keys + and -)"):
        with v3.VBtn(id="cx-brush-larger", icon=True, size="small", variant="text", title="Larger brush (+)",
                     click=(page.key, "['brush', 1]")):
            v3.VIcon("mdi-plus")
        html.Span(f"{{{{ Math.round({diameter} * 10) / 10 }}}}", id="cx-brush-size", classes="text-caption")
        with v3.VBtn(id="cx-brush-smaller", icon=True, size="small", variant="text", title="Smaller brush (-)",
                     click=(page.key, "['brush', -1]")):
            v3.VIcon("mdi-minus")


def _build_panel(page) -> None:
    with v3.VCard(id="cotexnet-panel", flat=True, classes="pa-2"):
        with html.Div(classes="d-flex align-center"):
            v3.VSelect(id="cx-volume", label="Volume (data root)", items=("cx_volumes",), v_model=("cx_volume",),
                       density="compact", hide_details=True)
            v3.VBtn("Open", id="cx-open", click=page.open_volume, disabled=("cx_busy",), density="compact",
                    classes="ml-1")
            with v3.VBtn(id="cx-refresh", icon=True, click=page.refresh_lists, density="compact", variant="text",
                         title="List the data root again", classes="ml-1"):
                v3.VIcon("mdi-refresh")
        with html.Details(v_show=("cx_segmentations.length",), classes="text-caption mt-1", id="cx-segmentations"):
            html.Summary("{{ cx_segmentations.length }} segmentation(s) in the data root (a volume opens with the "
                         ".seg.nrrd saved beside it)")
            html.Div("{{ name }}", v_for="name in cx_segmentations", key="name", classes="ml-3")
        with html.Div(classes="d-flex align-center mt-2", v_if=("cx_cases.length",)):
            v3.VSelect(id="cx-case", label="Opened cases (training uses those with segments)",
                       items=("cx_cases",), model_value=("cx_opened",), update_modelValue=(page.open_volume, "[$event]"),
                       disabled=("cx_busy",), density="compact", hide_details=True)
            v3.VBtn("Close", id="cx-close", click=page.close_case, disabled=("cx_busy",),
                    density="compact", classes="ml-1")
        with html.Div(classes="d-flex align-center mt-2", v_if=("cx_opened",)):
            v3.VSelect(id="cx-window-level", label="Window/level preset (or left-drag in a view with no tool)",
                       items=("cx_presets",), density="compact", hide_details=True,
                       update_modelValue=(page.window_level, "[$event]"))
            html.Span("W {{ cx_window_level[0] }} / L {{ cx_window_level[1] }}", v_show=("cx_window_level.length",),
                      classes="text-caption ml-2")
        v3.VFileInput(
            id="cx-upload", label="Upload a volume", density="compact", hide_details=True, classes="mt-2",
            # In chunks, with the cap checked before anything is sent (web/upload.js).
            change="window.cotexnetUpload($event.target.files[0], trame)",
            disabled=("cx_busy || cx_uploading",),
        )
        v3.VProgressLinear(id="cx-upload-progress", model_value=("cx_upload_progress",), v_show=("cx_uploading",),
                           color="secondary", classes="mt-1")
        v3.VSelect(id="cx-model", label="Model (recent, --model, run folders and bundles in the data root)",
                   items=("cx_models",), v_model=("cx_model",), density="compact", hide_details=True,
                   classes="mt-2")
        with html.Div(classes="d-flex align-center mt-2"):
            # A disabled button keeps its colour in Vuetify 3; grey says it cannot be clicked.
            v3.VBtn("Segment", id="cx-segment", color=("cx_busy || !cx_opened ? 'grey-lighten-1' : 'primary'",),
                    click=page.segment, disabled=("cx_busy || !cx_opened",))
            v3.VBtn("Cancel", id="cx-cancel", click=page.cancel, disabled=("!cx_busy",), classes="ml-2")
            v3.VBtn("Save .seg.nrrd", id="cx-save", click=page.save, disabled=("cx_busy || !cx_opened",),
                    classes="ml-2")
        with html.Div(classes="d-flex align-center mt-1", v_if=("cx_conflict",)):
            v3.VBtn("Reload from disk", id="cx-reload", click=page.reload, density="compact", variant="tonal")
            v3.VBtn("Save as a copy", id="cx-save-copy", click=page.save_copy, density="compact", variant="tonal",
                    classes="ml-2")
        with v3.VDialog(model_value=("!!cx_question",), persistent=True, max_width=420):
            with v3.VCard(id="cx-question"):
                v3.VCardText("{{ cx_question }}")
                with v3.VCardActions():
                    v3.VSpacer()
                    v3.VBtn("Cancel", id="cx-question-cancel", click=(page.answer, "[false]"))
                    v3.VBtn("{{ cx_answer }}", id="cx-question-proceed", color="error", click=(page.answer, "[true]"))
        with v3.VDialog(model_value=("cx_series.length > 0",), persistent=True, max_width=640):
            with v3.VCard(id="cx-series"):
                v3.VCardTitle("{{ cx_series_folder }} holds {{ cx_series.length }} DICOM series: click the one to open",
                              classes="text-wrap text-body-1")
                with v3.VTable(density="compact", hover=True):
                    with html.Thead():
                        with html.Tr():
                            for title in ("Description", "Modality", "Size (rows x columns x slices)", "Files"):
                                html.Th(title)
                    with html.Tbody():
                        with html.Tr(v_for="(one, index) in cx_series", key="one.uid", classes="cx-series-row",
                                     id=("`cx-series-${index}`",), style="cursor: pointer", title=("one.uid",),
                                     click=(page.open_series, "[one.uid]")):
                            for field in ("description", "modality", "size", "files"):
                                html.Td(f"{{{{ one.{field} }}}}")
                with v3.VCardActions():
                    v3.VSpacer()
                    v3.VBtn("Cancel", id="cx-series-cancel", click=(page.open_series, "[null]"))
        with v3.VProgressLinear(id="cx-progress", model_value=("cx_progress",), v_show=("cx_busy",), height=18,
                                classes="mt-2"):
            html.Span("{{ cx_phase }}", id="cx-phase", classes="text-caption")
        html.Div("{{ cx_message }}", id="cx-message", classes="text-caption mt-1")
        html.Div("{{ cx_error }}", id="cx-error", v_show=("cx_error",), classes="text-caption text-error")
        with v3.VTable(id="cx-concepts", density="compact", hover=True, v_show=("cx_concepts.length",), classes="mt-2"):
            with html.Thead():
                with html.Tr():
                    html.Th("{{ column.title }}", v_for="column in cx_concept_columns", key="column.key")
            with html.Tbody():
                # Per class: its attributes on one line, then its prompt over the whole width (no sideways
                # scrolling); the chosen class is highlighted.
                with HtmlElement("template", v_for="(row, index) in cx_concepts", key="index"):
                    highlight = "index === cx_active_row ? 'background: rgba(33, 150, 243, 0.3)' : ''"
                    with html.Tr(classes="cx-concept-row", style=(f"`cursor: pointer; ${{{highlight}}}`",),
                                 click=(page.show_concept_row, "[index]")):
                        html.Td("{{ row[column.key] }}", v_for="column in cx_concept_columns", key="column.key",
                                style="white-space: nowrap; border-bottom: none")
                    with html.Tr(classes="cx-concept-prompt", style=(f"`cursor: pointer; ${{{highlight}}}`",),
                                 click=(page.show_concept_row, "[index]")):
                        html.Td("{{ row.prompt }}", colspan=("cx_concept_columns.length",),
                                classes="text-caption text-medium-emphasis", style="white-space: normal")
        with v3.VTable(id="cx-statistics", density="compact", v_show=("cx_statistics.length",), classes="mt-2"):
            with html.Thead():
                with html.Tr():
                    html.Th("Segment")
                    html.Th("Voxels")
                    html.Th("Volume (mL)")
            with html.Tbody():
                with html.Tr(v_for="row in cx_statistics", key="row.segment", classes="cx-statistics-row"):
                    html.Td("{{ row.segment }}")
                    html.Td("{{ row.voxels }}")
                    html.Td("{{ row.ml.toFixed(2) }}")
        _build_training_panel(page)


def _build_training_panel(page) -> None:
    """Train on the opened cases from the current model; loss and per-class Dice drawn as SVG per epoch."""
    with html.Div(classes="d-flex align-center mt-3"):
        v3.VTextField(id="cx-epochs", label="Epochs", v_model_number=("cx_epochs",), type="number", min=1,
                      density="compact", hide_details=True, style="max-width: 90px", disabled=("cx_training",))
        v3.VBtn("Train on the opened cases", id="cx-train", click=page.train, classes="ml-2",
                disabled=("cx_training || cx_busy || !cx_opened",))
        v3.VBtn("Stop", id="cx-stop", click=page.stop_training, disabled=("!cx_training",), classes="ml-2")
    html.Div("{{ cx_train_message }}", id="cx-train-message", classes="text-caption mt-1")
    with v3.VDialog(model_value=("cx_unknown.length > 0",), persistent=True, max_width=560):
        with v3.VCard(id="cx-unknown"):
            v3.VCardTitle("Segments that are not the model's classes")
            v3.VCardText("Choose what the training does with each of them.", classes="pb-0")
            with html.Div(v_for="row in cx_unknown", key="row.name", classes="d-flex align-center px-4 py-1"):
                html.Span("{{ row.name }}", classes="cx-unknown-name", style="min-width: 150px")
                v3.VSelect(items=("cx_unknown_choices",), v_model=("row.choice",), density="compact",
                           hide_details=True, classes="cx-unknown-choice")
            with v3.VCardActions():
                v3.VSpacer()
                v3.VBtn("Cancel", id="cx-unknown-cancel", click="cx_unknown = []")
                v3.VBtn("Train", id="cx-unknown-train", color="primary", click=(page.train, "[cx_unknown]"))
    v3.VBtn("Use the new model anyway", id="cx-use-candidate", click=page.use_candidate, v_show=("cx_candidate",),
            density="compact", variant="tonal", classes="mt-1")
    with html.Div(id="cx-charts", classes="d-flex mt-1", v_if=("cx_charts.length",)):
        with html.Div(v_for="chart in cx_charts", key="chart.title", classes="mr-1"):
            with html.Svg(width=("chart.width",), height=("chart.height",), classes="cx-chart",
                          style="background: #fafafa"):
                SvgElement("text", "{{ chart.title }}", x=("chart.margin",), y="11", font_size="11")
                SvgElement("text", "{{ chart.y_top }}", x="1", y=("chart.top + 4",), font_size="9")
                SvgElement("text", "epoch {{ chart.x_max }}", x=("chart.width - 50",), y=("chart.height - 4",),
                           font_size="9")
                SvgElement("line", x1=("chart.margin",), y1=("chart.top",), x2=("chart.margin",),
                           y2=("chart.height - chart.margin",), stroke="#999")
                SvgElement("line", x1=("chart.margin",), y1=("chart.height - chart.margin",), x2=("chart.right",),
                           y2=("chart.height - chart.margin",), stroke="#999")
                with SvgElement("g", v_for="series in chart.series", key="series.name"):
                    SvgElement("polyline", points=("series.points",), fill="none", stroke=("series.color",),
                               stroke_width="1.5")
                    SvgElement("circle", v_for="(dot, i) in series.dots", key="i", cx=("dot[0]",), cy=("dot[1]",),
                               r="2.5", fill=("series.color",), classes="cx-point")
                    SvgElement("title", "{{ series.name }}")
            with html.Div(classes="cx-legend text-caption d-flex flex-wrap"):
                with html.Span(v_for="series in chart.series", key="series.name", classes="mr-2"):
                    html.Span(style=("`display: inline-block; width: 10px; height: 10px; margin-right: 3px; "
                                     "background: ${series.color}`",))
                    html.Span("{{ series.name }}")


class SvgElement(HtmlElement):
    """An SVG element by tag name (trame's html module has <svg> but not the shapes inside it)."""

    def __init__(self, tag: str, children=None, **kwargs):
        super().__init__(tag, children, **kwargs)
        self._attr_names += ["x", "y", "x1", "y1", "x2", "y2", "cx", "cy", "r", "points", "fill", "stroke",
                             ("stroke_width", "stroke-width"), ("font_size", "font-size")]


#: Where the patient's sides lie on the screen in Slicer's slice views (left, right, top, bottom): radiological
#: convention, the patient's right on the screen's left; sagittal views face left.
ORIENTATION_LABELS = {"Axial": ("R", "L", "A", "P"), "Coronal": ("R", "L", "S", "I"), "Sagittal": ("A", "P", "S", "I")}
#: The axis a slice view's position is measured along, as Slicer names it in its views.
SLICE_AXIS = {"Axial": "S", "Coronal": "A", "Sagittal": "R"}


def slice_view_ui(server, view_id: str, view) -> None:
    """trame-slicer's slider gutter, plus the orientation labels on each side and the slice position (mm)."""
    create_vertical_slice_view_gutter_ui(server, view_id, view)
    orientation = view.get_orientation()
    if orientation not in ORIENTATION_LABELS:
        return
    left, right, top, bottom = ORIENTATION_LABELS[orientation]
    label = "position: absolute; color: #ffd54f; font: 13px sans-serif; pointer-events: none; text-shadow: 0 0 2px #000;"
    for text, where in ((left, "left: 6px; top: 50%"), (right, "right: 28px; top: 50%"),
                        (top, "top: 4px; left: 50%"), (bottom, "bottom: 36px; left: 50%")):
        html.Div(text, classes="cx-orientation", style=label + where)
    position = get_view_slider_typed_state(server, view).name.value
    html.Div(f"{SLICE_AXIS[orientation]} {{{{ Number({position}).toFixed(1) }}}} mm", classes="cx-slice-position",
             style=label + "left: 6px; bottom: 30px")
