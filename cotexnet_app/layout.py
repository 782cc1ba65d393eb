"""The page's layout: trame-slicer's viewer with the CoTexNet panel (open, upload, model, Segment, concept
table, training and its charts) in the drawer. Widgets only: what they do is the page's handlers
(:class:`cotexnet_app.session.CoTexNetWebApp`), what they show is its state (``cx_*``).
"""

from __future__ import annotations

from trame.widgets import html
from trame.widgets import vuetify3 as v3
from trame_client.widgets.core import HtmlElement
from trame_slicer.app.ui import SegmentEditorToolbarUI, SegmentEditorUI, SegmentEditorUndoRedoUI, ViewerLayout


def build_page(page) -> None:
    """The page's widgets, bound to its state and to ``page``'s handlers (a CoTexNetWebApp)."""
    with ViewerLayout(page.server, title="CoTexNet", is_drawer_visible=True) as page.ui:
        page.ui.drawer.width = 560  # room for the concept table
        with page.ui.drawer:
            _build_panel(page)
            page.editor_ui = SegmentEditorUI()
        with page.ui.toolbar:
            SegmentEditorToolbarUI(editor_ui=page.editor_ui)
        with page.ui.undo_redo:
            SegmentEditorUndoRedoUI(editor_ui=page.editor_ui)
        with page.ui.content:
            page.layout_logic.layout_manager.initialize_layout_grid(page.ui)
    page.editor_logic.set_ui(page.editor_ui)


def _build_panel(page) -> None:
    with v3.VCard(id="cotexnet-panel", flat=True, classes="pa-2"):
        with html.Div(classes="d-flex align-center"):
            v3.VSelect(id="cx-volume", label="Volume (data root)", items=("cx_volumes",), v_model=("cx_volume",),
                       density="compact", hide_details=True)
            v3.VBtn("Open", id="cx-open", click=page.open_volume, disabled=("cx_busy",), density="compact",
                    classes="ml-1")
        with html.Div(classes="d-flex align-center mt-2", v_show=("cx_cases.length",)):
            v3.VSelect(id="cx-case", label="Opened cases (training uses those with segments)",
                       items=("cx_cases",), model_value=("cx_opened",), update_modelValue=(page.open_volume, "[$event]"),
                       disabled=("cx_busy",), density="compact", hide_details=True)
            v3.VBtn("Close", id="cx-close", click=page.close_case, disabled=("cx_busy",),
                    density="compact", classes="ml-1")
        v3.VFileInput(
            id="cx-upload", label="Upload a volume", density="compact", hide_details=True, classes="mt-2",
            # The cap is checked here too, so an oversized file is never sent.
            change=(f"$event.target.files[0] && $event.target.files[0].size > cx_upload_limit "
                    f"? (cx_error = `${{$event.target.files[0].name}}: over the upload limit`) "
                    f": trigger('{page.ctrl.trigger_name(page.upload)}', [$event.target.files])"),
            disabled=("cx_busy",),
        )
        v3.VSelect(id="cx-model", label="Model (recent, --model, run folders and bundles in the data root)",
                   items=("cx_models",), v_model=("cx_model",), density="compact", hide_details=True,
                   classes="mt-2")
        with html.Div(classes="d-flex align-center mt-2"):
            v3.VBtn("Segment", id="cx-segment", color="primary", click=page.segment, disabled=("cx_busy || !cx_opened",))
            v3.VBtn("Cancel", id="cx-cancel", click=page.cancel, disabled=("!cx_busy",), classes="ml-2")
            v3.VBtn("Save .seg.nrrd", id="cx-save", click=page.save, disabled=("cx_busy || !cx_concepts.length",),
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
                             style="cursor: pointer", click=(page.show_concept_row, "[index]")):
                    # One line per class; a long prompt is cut, with the whole of it on hover.
                    html.Td("{{ row[column.key] }}", v_for="column in cx_concept_columns", key="column.key",
                            title=("row[column.key]",),
                            style="white-space: nowrap; max-width: 160px; overflow: hidden; text-overflow: ellipsis")
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
