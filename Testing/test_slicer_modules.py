"""The Slicer modules and the effect as Slicer loads and runs them, on slicer-core, without Slicer's GUI.

Qt and the pieces of Slicer that need the application (``qt``, ``ctk``, ``slicer.ScriptedLoadableModule``,
``slicer.parameterNodeWrapper``, ``SegmentEditorEffects``) are replaced by small stand-ins; what is under
test (how Slicer imports the module and effect files, the MRML scene, the Segment Editor's masking logic,
settings) is the real mechanism, reproduced from Slicer's sources cited in each test.
"""
from __future__ import annotations

import importlib._bootstrap
import importlib.metadata
import importlib.util
import logging
import pathlib
import sys
import time
import types
import unittest
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

slicer = pytest.importorskip("slicer")
import vtk  # noqa: E402  (comes with slicer-core)

from CoTexNetSegmentLib import CoTexNetSegmentLogic, backbone, dependencies, mrml, settings  # noqa: E402
from CoTexNetSegmentLib.editing import SegmentEditorTarget  # noqa: E402
from CoTexNetSegmentLib.logic import CONCEPTS_REFERENCE_ROLE, EngineResult  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
SEGMENT_MODULE = REPO / "CoTexNetSegment" / "CoTexNetSegment.py"
TRAIN_MODULE = REPO / "CoTexNetTrain" / "CoTexNetTrain.py"


# ------------------------------------------------------------------------------------------ Slicer's loaders


def load_source_5_10(name: str, path: str):
    """``qSlicerScriptedUtils::loadSourceAsModule`` of Slicer 5.10 (Base/QTCore/qSlicerScriptedUtils.cxx,
    v5.10.0 lines 37-62): ``spec_from_file_location``, ``module_from_spec``, ``sys.modules[name] = module``,
    ``exec_module``."""
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


def load_source_5_6(name: str, path: str):
    """Slicer 5.6/5.8: ``PyImport_AddModule(name)`` then ``imp.load_source(name, path)`` (qSlicerScriptedUtils.cxx
    v5.6.2 lines 37-68). On Python 3.9, ``imp.load_source`` runs the file in the module object already in
    ``sys.modules`` (imp.py: ``if name in sys.modules: module = _exec(spec, sys.modules[name])``)."""
    module = sys.modules.setdefault(name, types.ModuleType(name))
    importlib._bootstrap._exec(importlib.util.spec_from_file_location(name, path), module)
    return module


LOADERS = {"5.10": load_source_5_10, "5.6": load_source_5_6}


# ------------------------------------------------------------------------------------------ stand-ins


class Anything:
    """A Qt object stand-in: accepts any constructor, attribute, call and signal connection."""

    def __init__(self, *args, **kwargs):
        pass

    def __getattr__(self, name):
        return Anything()

    def __call__(self, *args, **kwargs):
        return Anything()

    def __or__(self, other):
        return self


def _stub(name, **attributes):
    module = types.ModuleType(name)
    module.__dict__.update(attributes)
    return module


def _qt_like(name):
    def attribute(attributeName):
        if attributeName.startswith("__"):  # module metadata that tools such as inspect look up
            raise AttributeError(attributeName)
        return Anything

    module = _stub(name)
    module.__getattr__ = attribute
    return module


class ScriptedEffectStandIn:
    """``qSlicerSegmentEditorScriptedEffect``: ``setPythonSource`` as in Slicer's
    Modules/Loadable/Segmentations/EditorEffects/qSlicerSegmentEditorScriptedEffect.cxx (v5.10.0 lines
    132-210; v5.6.2 lines 129-210): the module name is the file's parent folder, the class its base name;
    an existing class in ``sys.modules[folder]`` is reused, else the file is loaded with the version's loader."""

    loader = staticmethod(load_source_5_10)
    registered: list = []

    def __init__(self, parent=None):
        self._self = None

    def setPythonSource(self, path):
        moduleName, className = Path(path).parent.name, Path(path).stem
        module = sys.modules.get(moduleName)
        if module is None or not hasattr(module, className):
            module = self.loader(moduleName, path)
        self._self = getattr(module, className)(self)
        return True

    def self(self):
        return self._self


class AbstractEffectStandIn:
    def __init__(self, scriptedEffect):
        self.scriptedEffect = scriptedEffect

    def register(self):
        ScriptedEffectStandIn.registered.append(self)


class ModuleWidgetStandIn(Anything):
    """``ScriptedLoadableModuleWidget``: its methods that a module widget calls on its base class."""

    def setup(self):
        self.layout = Anything()

    def enter(self):
        pass

    def exit(self):
        pass

    def resourcePath(self, filename):
        return filename


class TestCaseStandIn(unittest.TestCase):
    def delayDisplay(self, message, msec=None):
        pass


#: Module widgets set up by a test; their scene observers are removed after it.
OPENED_WIDGETS = []
#: Modules that import Qt (here: the stand-ins), forgotten after each test.
GUI_MODULES = {"CoTexNetSegment", "CoTexNetSegmentGui", "CoTexNetTrain", "SegmentEditorCoTexNet"}


def _plain(*args, **kwargs):
    return None


@pytest.fixture
def slicer_app(monkeypatch, tmp_path):
    """Slicer's Python environment minus the GUI; the modules imported against the stand-ins are forgotten after it."""
    before = dict(sys.modules)
    scene = slicer.vtkMRMLScene()
    slicer.vtkMRMLSubjectHierarchyNode.GetSubjectHierarchyNode(scene)
    monkeypatch.setattr(slicer, "mrmlScene", scene, raising=False)
    mrml.ensureSegmentationConverters()
    stubs = {
        "qt": _qt_like("qt"),
        "ctk": _qt_like("ctk"),
        "slicer.ScriptedLoadableModule": _stub(
            "slicer.ScriptedLoadableModule", ScriptedLoadableModule=Anything, ScriptedLoadableModuleWidget=ModuleWidgetStandIn,
            ScriptedLoadableModuleLogic=Anything, ScriptedLoadableModuleTest=TestCaseStandIn),
        "slicer.parameterNodeWrapper": _stub(
            "slicer.parameterNodeWrapper", parameterNodeWrapper=lambda cls: cls, Choice=_plain, WithinRange=_plain,
            Decimals=_plain, SingleStep=_plain),
        "SegmentEditorEffects": _stub("SegmentEditorEffects", AbstractScriptedSegmentEditorEffect=AbstractEffectStandIn),
        "qSlicerSegmentationsEditorEffectsPythonQt": _stub(
            "qSlicerSegmentationsEditorEffectsPythonQt", qSlicerSegmentEditorScriptedEffect=ScriptedEffectStandIn),
    }
    for name, module in stubs.items():
        monkeypatch.setitem(sys.modules, name, module)
    ScriptedEffectStandIn.registered = []
    yield SimpleNamespace(scene=scene)
    while OPENED_WIDGETS:
        OPENED_WIDGETS.pop().removeObservers()
    for name in set(sys.modules) - set(before):  # what was imported against the stand-ins
        if name.split(".")[0] in GUI_MODULES:
            del sys.modules[name]
    if sys.modules.get("CoTexNetSegmentLib.i18n") is not before.get("CoTexNetSegmentLib.i18n"):
        sys.modules.pop("CoTexNetSegmentLib.i18n")  # bound to a slicer.i18n stand-in


def add_volume(scene, array, spacing, origin=(0.0, 0.0, 0.0), name="volume"):
    node = slicer.util.addVolumeFromArray(np.asarray(array, np.float32), name=name)
    node.SetSpacing(*spacing)
    node.SetOrigin(*origin)
    return node


# ------------------------------------------------------------------------------------------ 10.1 effect loading


@pytest.mark.parametrize("version", ["5.10", "5.6"])
def test_effect_registers_after_the_module_file_was_imported_as_slicer_does(slicer_app, monkeypatch, version):
    """Startup as in Slicer: the module file is loaded with ``loadSourceAsModule`` under its base name
    (Base/QTGUI/qSlicerScriptedLoadableModule.cxx, v5.10.0 lines 121-143), then ``startupCompleted()`` runs
    ``registerSegmentEditorEffect``, whose ``setPythonSource`` loads the effect file under its folder's
    name. Before the fix the effect sat in ``CoTexNetSegmentGui``, which the module file had imported, and
    5.10's ``sys.modules[folder] = module`` made its ``from CoTexNetSegmentGui import ...`` import itself."""
    loader = LOADERS[version]
    monkeypatch.setattr(ScriptedEffectStandIn, "loader", staticmethod(loader))
    module = loader("CoTexNetSegment", str(SEGMENT_MODULE))

    module.registerSegmentEditorEffect()

    [effect] = ScriptedEffectStandIn.registered
    assert type(effect).__name__ == "SegmentEditorEffect" and effect.scriptedEffect.name == "CoTexNet"
    folder = type(effect).__module__
    assert folder == module.EFFECT_FOLDER  # its __init__.py (translation context) is never executed
    assert sys.modules["CoTexNetSegmentGui"].__file__.endswith("__init__.py")  # the helper package is intact
    # clone() loads the same file again: the class already in sys.modules[folder] is reused
    assert type(effect.clone().self()) is type(effect)


# ------------------------------------------------------------------------------------------ 10.2 first install


class FakeDistributions:
    """Installed distributions (name -> version) with the import names each provides."""

    def __init__(self, versions, modules):
        self.versions, self.modules = dict(versions), modules

    def version(self, name):
        if name not in self.versions:
            raise importlib.metadata.PackageNotFoundError(name)
        return self.versions[name]

    def topLevel(self, name):
        return self.modules.get(name, {name})


def test_install_continues_unless_a_package_loaded_before_was_replaced():
    """SlicerPyTorch's ``installTorch`` imports torch itself (PyTorchUtils.py ``installTorch`` ends with
    ``import torch``): torch loaded *after* its install must not ask for a restart; tqdm loaded *before* and
    upgraded by pip must, and is named. Before the fix every first install asked for a restart."""
    from packaging.requirements import Requirement

    def run(loadedBefore):
        distributions = FakeDistributions({"tqdm": "4.50.0"}, {})
        loaded = dict.fromkeys(loadedBefore)

        def install_torch():
            distributions.versions["torch"] = "2.4.0"
            loaded["torch"] = None  # the PyTorch extension's installer imports torch
            return True

        def pip_install(arguments):
            for text in dependencies.REQUIREMENTS:
                name = Requirement(text).name
                distributions.versions[name] = "4.66.0" if name in ("tqdm", "transformers") else "99.0"

        return dependencies.ensureDependencies(lambda text: True, install_torch, pip_install,
                                               versionOf=distributions.version, loadedModules=loaded,
                                               topLevelModules=distributions.topLevel)

    outcome = run(loadedBefore=["numpy"])  # numpy was not installed before: nothing loaded was replaced
    assert outcome == dependencies.READY and outcome.replaced == ()
    outcome = run(loadedBefore=["tqdm"])
    assert outcome == dependencies.RESTART and outcome.replaced == ("tqdm 4.50.0 -> 4.66.0",)


# ------------------------------------------------------------------------------------------ 10.3 leaving the module


class WidgetStandIn:
    """A Qt widget of a loaded .ui: any attribute is a child stand-in, any call is recorded, signals connect."""

    def __init__(self, **attributes):
        self.__dict__.update(attributes)
        self.calls = []

    def __getattr__(self, name):
        if name.startswith("__"):
            raise AttributeError(name)
        child = WidgetStandIn()
        self.__dict__[name] = child
        return child

    def __call__(self, *args, **kwargs):
        self.calls.append(args)


def test_a_run_that_ends_in_another_module_still_lands_with_its_concept_table(slicer_app):
    """A run may end while another module is shown, with no wrapper at hand (here none at all): the run's end
    records the result in the scene's parameter node (as parameterNodeWrapper stores a node field:
    serializers.py ``NodeSerializer.write``, v5.6.2 lines 402-406) and fills the concept table view."""
    module = load_source_5_10("CoTexNetSegment", str(SEGMENT_MODULE))
    scene = slicer_app.scene
    segmentation = scene.AddNewNodeByClass("vtkMRMLSegmentationNode", "result")
    table = scene.AddNewNodeByClass("vtkMRMLTableNode", "concepts")
    segmentation.SetNodeReferenceID(CONCEPTS_REFERENCE_ROLE, table.GetID())
    widget = module.CoTexNetSegmentWidget()
    widget.logic, widget._parameterNode, widget._segmentationPoller = CoTexNetSegmentLogic(scene), None, None
    widget.ui = SimpleNamespace(progressBar=WidgetStandIn(), modelPathLineEdit=WidgetStandIn(currentPath=""),
                                logTextEdit=WidgetStandIn(), conceptsTableView=WidgetStandIn(),
                                conceptsCollapsibleButton=WidgetStandIn(collapsed=True),
                                applyButton=WidgetStandIn(), cancelButton=WidgetStandIn())
    job = SimpleNamespace(state="done", DONE="done", CANCELLED="cancelled", result=segmentation,
                          started=time.monotonic(), error=None)

    widget.onSegmentationFinished(job)

    assert widget.logic.getParameterNode().GetNodeReference("outputSegmentation") is segmentation
    assert widget.ui.conceptsTableView.setMRMLTableNode.calls == [(table,)]
    assert widget.ui.conceptsCollapsibleButton.collapsed is False


# ------------------------------------------------------------------------------------------ 10.4 geometry


def test_second_run_on_another_volume_has_that_volumes_geometry(slicer_app):
    """Re-running into the previous result (the output selector keeps it) must not resample onto the first
    input's grid: the reference geometry is reset on every run, as SlicerTotalSegmentator does
    (TotalSegmentator.py ``processVolume``: ``SetReferenceImageGeometryParameterFromVolumeNode`` each run)."""
    scene = slicer_app.scene
    logic = CoTexNetSegmentLogic(scene)
    first = add_volume(scene, np.zeros((4, 10, 12)), spacing=(1.0, 1.0, 3.0), name="first")
    second = add_volume(scene, np.zeros((7, 23, 19)), spacing=(0.55, 0.7, 1.3), origin=(3.1, -2.2, 5.0), name="second")
    rng = np.random.default_rng(0)

    def run(volume, segmentationNode):
        labels = rng.integers(0, 3, mrml.volumeToArrayShape(volume)).astype(np.uint8)
        result = EngineResult(labels, ["organ", "lesion"], [[1, 0, 0], [0, 1, 0]], None)
        node = logic._apply(result, volume.GetID(), segmentationNode.GetID() if segmentationNode else None, None)
        return node, labels

    segmentation, _ = run(first, None)
    again, labels = run(second, segmentation)

    assert again is segmentation
    np.testing.assert_array_equal(mrml.segmentationToLabelMap(segmentation, second, ["organ", "lesion"]), labels)
    role = slicer.vtkMRMLSegmentationNode.GetReferenceImageGeometryReferenceRole()
    assert segmentation.GetNodeReference(role) is second


# ------------------------------------------------------------------------------------------ 10.6 model path


def _parameter_fields(path: Path, class_name: str):
    import ast

    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.ClassDef) and node.name == class_name:
            return {s.target.id: (ast.unparse(s.annotation), s.value) for s in node.body if isinstance(s, ast.AnnAssign)}
    raise AssertionError(class_name)


def test_no_path_parameter_can_show_a_dot_and_the_newest_model_is_selected(slicer_app, tmp_path):
    """Slicer's ``PathSerializer`` (parameterNodeWrapper/serializers.py, v5.6.2 lines 309-338) defaults a
    ``pathlib.Path`` field to ``Path()`` and writes ``str(value)``: "." for an empty choice, and the
    ``ctkPathLineEdit`` connector writes that into the field's widget. No parameter node may have a Path
    field without a real default; the model selector shows the newest recent model, and the model
    CoTexNetTrain adds becomes the selection (``refreshModels``)."""
    assert str(pathlib.Path()) == "."  # what PathSerializer.default() + write() store
    for path, name in ((SEGMENT_MODULE, "CoTexNetSegmentParameterNode"), (TRAIN_MODULE, "CoTexNetTrainParameterNode")):
        for field, (annotation, default) in _parameter_fields(path, name).items():
            if "pathlib.Path" in annotation:
                assert default is not None, f"{path.name}: {field} has no default and would show '.'"

    bundles = []
    for name in ("older", "newer"):
        (tmp_path / name).mkdir()
        (tmp_path / name / "config.json").write_text("{}", encoding="utf-8")
        bundles.append((tmp_path / name).as_posix())
    assert settings.preferredModelPath("", []) == "" and settings.preferredModelPath(".", []) == ""
    settings.addRecentModel(bundles[0])
    assert settings.preferredModelPath("", settings.recentModels()) == bundles[0]
    assert settings.preferredModelPath("/chosen/model", settings.recentModels()) == "/chosen/model"

    module = load_source_5_10("CoTexNetSegment", str(SEGMENT_MODULE))
    widget = module.CoTexNetSegmentWidget()
    widget.ui = SimpleNamespace(modelPathLineEdit=WidgetStandIn(currentPath=bundles[0]))
    settings.addRecentModel(bundles[1])  # what CoTexNetTrainLogic does when a model is ready
    widget.refreshModels()
    assert widget.ui.modelPathLineEdit.currentPath == bundles[1]


# ------------------------------------------------------------------------------------------ 10.9 self-tests


@pytest.mark.parametrize("torch_installed", [True, False])
def test_self_test_skips_only_the_engine_part_without_torch(slicer_app, monkeypatch, caplog, torch_installed):
    """The extensions build machines run ``slicer_add_python_unittest`` without torch: the engine part is
    skipped with a warning (SlicerTotalSegmentator's self-test skips its logic test the same way), the
    MRML part runs; here, with torch, the whole self-test runs and segments."""
    module = load_source_5_10("CoTexNetSegment", str(SEGMENT_MODULE))
    if not torch_installed:
        monkeypatch.setattr(module.dependencies, "checkRequirements",
                            lambda: dependencies.DependencyReport(torchMissing=True))
    with caplog.at_level(logging.WARNING):
        module.CoTexNetSegmentTest("runTest").runTest()
    segmentations = [n for n in slicer.util.getNodesByClass("vtkMRMLSegmentationNode")]
    names = [[s.GetSegmentation().GetNthSegment(i).GetName() for i in range(s.GetSegmentation().GetNumberOfSegments())]
             for s in segmentations]
    if torch_installed:
        assert names == [["organ", "lesion"]] and "skipped" not in caplog.text
    else:
        assert names == [] and "test_segmentVolume skipped" in caplog.text


# ------------------------------------------------------------------------------------------ 10.10 masking


def segment_editor(scene, segmentation, volume):
    """The Segment Editor an effect writes through, on slicer-core: ``vtkSlicerSegmentEditorLogic`` holds the
    masking of ``qSlicerSegmentEditorAbstractEffect::modifySegmentByLabelmap`` from Slicer 5.10 on
    (Modules/Loadable/Segmentations/Logic/vtkSlicerSegmentEditorLogic.cxx, v5.10.0 lines 1663-1935; 5.6/5.8:
    qSlicerSegmentEditorAbstractEffect.cxx, v5.6.2 lines 300-560). ``referenceGeometryImage`` is the effect's
    (qSlicerSegmentEditorAbstractEffect.cxx, v5.10.0 lines 1010-1020: the editor refreshes it from the
    segmentation's reference geometry, ``UpdateReferenceGeometryImage``)."""
    editorNode = slicer.vtkMRMLSegmentEditorNode()
    scene.AddNode(editorNode)
    logic = slicer.vtkSlicerSegmentEditorLogic()
    logic.SetMRMLScene(scene)
    logic.SetSegmentEditorNode(editorNode)
    editorNode.SetAndObserveSegmentationNode(segmentation)
    editorNode.SetAndObserveSourceVolumeNode(volume)

    def referenceGeometryImage():
        assert logic.UpdateReferenceGeometryImage()
        return logic.GetReferenceGeometryImage()

    def modifySegment(node, segmentId, labelmap):  # the effect's modifySegmentByLabelmap, ModificationModeSet
        logic.ModifySegmentByLabelmap(node, segmentId, labelmap, logic.ModificationModeSet, False, False)

    return SegmentEditorTarget(editorNode, referenceGeometryImage, modifySegment)


def write_through_effect(scene, editor, labels, classes, volume, segmentation):
    """What the effect's finished job does: ``CoTexNetSegmentLogic._apply`` with the editor."""
    result = EngineResult(labels, list(classes), [[1, 0, 0], [0, 1, 0]][:len(classes)], None)
    CoTexNetSegmentLogic(scene, segmentEditor=editor)._apply(result, volume.GetID(), segmentation.GetID(), None)
    return mrml.segmentationToLabelMap(segmentation, volume, classes)


@pytest.fixture
def editor(slicer_app):
    """A segmentation with a segment "kept" (rows 0-4), a volume whose right half is bright, and the Segment
    Editor (:func:`segment_editor`)."""
    scene = slicer_app.scene
    shape = (4, 10, 12)
    image = np.zeros(shape, np.float32)
    image[:, :, 6:] = 100
    volume = add_volume(scene, image, spacing=(0.7, 0.9, 2.0))
    segmentation = scene.AddNewNodeByClass("vtkMRMLSegmentationNode")
    segmentation.CreateDefaultDisplayNodes()
    segmentation.SetReferenceImageGeometryParameterFromVolumeNode(volume)
    kept = np.zeros(shape, np.uint8)
    kept[:, :5, :] = 1
    mrml.labelMapToSegmentation(scene, kept, volume, ["kept"], [[0, 0, 1]], segmentation)
    target = segment_editor(scene, segmentation, volume)
    labels = np.zeros(shape, np.uint8)
    labels[:, 2:8, 2:10] = 1

    def run(classLabels=labels):
        organ = write_through_effect(scene, target, classLabels, ["organ"], volume, segmentation)
        return organ, mrml.segmentationToLabelMap(segmentation, volume, ["kept"])

    return SimpleNamespace(node=target.parameterSetNode, image=image, kept=kept, labels=labels, run=run,
                           segmentation=segmentation)


def test_effect_result_stays_inside_the_editable_intensity_range(editor):
    editor.node.SetSourceVolumeIntensityMask(True)
    editor.node.SetSourceVolumeIntensityMaskRange(50, 150)
    editor.node.SetOverwriteMode(editor.node.OverwriteNone)
    organ, kept = editor.run()
    np.testing.assert_array_equal(organ, (editor.labels == 1) & (editor.image >= 50))
    np.testing.assert_array_equal(kept, editor.kept)  # overlap allowed: the other segment is not touched


def test_effect_result_stays_outside_other_segments_and_overwrites_them_only_when_allowed(editor):
    editor.node.SetMaskMode(slicer.vtkMRMLSegmentationNode.EditAllowedOutsideAllSegments)
    organ, kept = editor.run()
    np.testing.assert_array_equal(organ, (editor.labels == 1) & (editor.kept == 0))

    editor.node.SetMaskMode(slicer.vtkMRMLSegmentationNode.EditAllowedEverywhere)
    editor.node.SetOverwriteMode(editor.node.OverwriteAllSegments)
    organ, kept = editor.run()
    np.testing.assert_array_equal(organ, editor.labels == 1)
    np.testing.assert_array_equal(kept, (editor.kept == 1) & (editor.labels == 0))


def test_effect_writes_each_class_with_its_segment_selected_and_restores_the_selection(editor):
    """The edit mask is built around the *selected* segment (vtkMRMLSegmentationNode.cxx ``GenerateEditMask``,
    v5.10.0 line 653: the edited segment is taken out of the mask segments, so only it stays editable; the editor passes its
    selected segment: vtkSlicerSegmentEditorLogic.cxx, v5.10.0 lines 1250-1254; 5.6:
    qMRMLSegmentEditorWidget.cxx, v5.6.2 lines 750-752). Writing "organ" while "kept" was selected made organ's
    own old voxels uneditable, so they stayed; each class must be written with its segment selected."""
    old = np.zeros(editor.labels.shape, np.uint8)
    old[:, 6:10, 0:3] = 1  # organ's voxels from an earlier run, none of them in the new result
    editor.run(old)
    keptId = editor.segmentation.GetSegmentation().GetSegmentIdBySegmentName("kept")
    editor.node.SetSelectedSegmentID(keptId)
    editor.node.SetMaskMode(slicer.vtkMRMLSegmentationNode.EditAllowedOutsideAllSegments)

    organ, kept = editor.run()

    np.testing.assert_array_equal(organ, (editor.labels == 1) & (editor.kept == 0))  # the old voxels are gone
    np.testing.assert_array_equal(kept, editor.kept)
    assert editor.node.GetSelectedSegmentID() == keptId  # the user's selection is back


def _labels(shape, seed):
    """Two classes in blocks (so nearest-neighbour resampling has something to get wrong)."""
    rng = np.random.default_rng(seed)
    coarse = rng.integers(0, 3, (shape[0], (shape[1] + 1) // 2, (shape[2] + 1) // 2)).astype(np.uint8)
    return coarse.repeat(2, axis=1).repeat(2, axis=2)[:, :shape[1], :shape[2]]


def _module_result(scene, labels, volume):
    """The module's Apply: a new segmentation on the volume's own grid."""
    result = EngineResult(labels, ["organ", "lesion"], [[1, 0, 0], [0, 1, 0]], None)
    node = CoTexNetSegmentLogic(scene)._apply(result, volume.GetID(), None, None)
    return mrml.segmentationToLabelMap(node, volume, ["organ", "lesion"])


@pytest.mark.parametrize("intensityMask", [False, True])
def test_effect_equals_the_module_on_an_oversampled_segmentation(slicer_app, intensityMask):
    """A segmentation oversampled x2 (the "Specify geometry" dialog: vtkSlicerSegmentationGeometryLogic,
    ``SetOversamplingFactor(2)``, ``CalculateOutputGeometry``, ``SetReferenceImageGeometryInSegmentationNode``).
    In Set mode Slicer re-reads the edited segment with the modifier's geometry (vtkSlicerSegmentEditorLogic.cxx,
    v5.10.0 lines 1909-1920; qSlicerSegmentEditorAbstractEffect.cxx, v5.6.2 lines 501-512), and with an editable
    intensity range it writes nothing unless the modifier has the aligned source volume's geometry (v5.10.0 lines
    1770-1776; v5.6.2 lines 358-360). The effect's classes, resampled onto ``referenceGeometryImage()``, must give
    the module's result voxel for voxel, also on a second run that replaces the first."""
    scene = slicer_app.scene
    shape = (4, 10, 12)
    image = np.arange(np.prod(shape), dtype=np.float32).reshape(shape)
    volume = add_volume(scene, image, spacing=(0.7, 0.9, 2.0), origin=(3.0, -4.0, 1.5))
    segmentation = scene.AddNewNodeByClass("vtkMRMLSegmentationNode")
    segmentation.CreateDefaultDisplayNodes()
    geometry = slicer.vtkSlicerSegmentationGeometryLogic()
    geometry.SetInputSegmentationNode(segmentation)
    geometry.SetSourceGeometryNode(volume)
    geometry.SetOversamplingFactor(2.0)
    geometry.CalculateOutputGeometry()
    geometry.SetReferenceImageGeometryInSegmentationNode()
    editor = segment_editor(scene, segmentation, volume)
    assert editor.referenceGeometryImage().GetSpacing() == pytest.approx((0.35, 0.45, 1.0))
    if intensityMask:  # a range that holds every voxel: masking must change nothing
        editor.parameterSetNode.SetSourceVolumeIntensityMask(True)
        editor.parameterSetNode.SetSourceVolumeIntensityMaskRange(-1, image.max() + 1)

    for seed in (1, 2):
        labels = _labels(shape, seed)
        effect = write_through_effect(scene, editor, labels, ["organ", "lesion"], volume, segmentation)
        np.testing.assert_array_equal(effect, _module_result(scene, labels, volume))
    organ = slicer.vtkOrientedImageData()
    segmentation.GetBinaryLabelmapRepresentation(segmentation.GetSegmentation().GetSegmentIdBySegmentName("organ"), organ)
    assert slicer.vtkOrientedImageDataResample.DoGeometriesMatch(organ, editor.referenceGeometryImage())


@pytest.mark.parametrize("intensityMask", [False, True])
def test_effect_equals_the_module_on_a_volume_under_a_linear_transform(slicer_app, intensityMask):
    """The segmentation's grid was taken from the volume, then the volume was moved by a linear transform
    (registration): its voxels now lie on the grid turned by 180 degrees about the volume's axis, a different
    geometry on the same voxel centres, so nearest-neighbour resampling is exact. Same Slicer rules as the
    oversampled test; the effect's result must be the module's voxel for voxel, through the real editor logic."""
    import vtk

    scene = slicer_app.scene
    shape = (4, 10, 12)
    image = np.arange(np.prod(shape), dtype=np.float32).reshape(shape)
    spacing, origin = np.array([0.7, 0.9, 2.0]), np.array([3.0, -4.0, 1.5])
    volume = add_volume(scene, image, spacing=tuple(spacing), origin=tuple(origin))
    segmentation = scene.AddNewNodeByClass("vtkMRMLSegmentationNode")
    segmentation.CreateDefaultDisplayNodes()
    segmentation.SetReferenceImageGeometryParameterFromVolumeNode(volume)
    centre = origin + spacing * (np.array(shape[::-1]) - 1) / 2
    turn = np.diag([-1.0, -1.0, 1.0, 1.0])
    turn[:3, 3] = centre - turn[:3, :3] @ centre
    matrix = vtk.vtkMatrix4x4()
    matrix.DeepCopy(turn.ravel().tolist())
    transform = scene.AddNewNodeByClass("vtkMRMLLinearTransformNode")
    transform.SetMatrixTransformToParent(matrix)
    volume.SetAndObserveTransformNodeID(transform.GetID())
    editor = segment_editor(scene, segmentation, volume)
    if intensityMask:
        editor.parameterSetNode.SetSourceVolumeIntensityMask(True)
        editor.parameterSetNode.SetSourceVolumeIntensityMaskRange(-1, image.max() + 1)

    for seed in (1, 2):
        labels = _labels(shape, seed)
        effect = write_through_effect(scene, editor, labels, ["organ", "lesion"], volume, segmentation)
        expected = _module_result(scene, labels, volume)
        np.testing.assert_array_equal(expected, labels)
        np.testing.assert_array_equal(effect, expected)


# ------------------------------------------------------------------------------------------ 10.11 LLaVA download


def test_llava_download_logs_its_size_and_runs_through_the_backbone_mechanism(tmp_path, monkeypatch):
    import huggingface_hub

    sizes = {"config.json": 1_000, "model-00001-of-00002.safetensors": 9_000_000_000,
             "model-00002-of-00002.safetensors": 5_000_000_000, "tokenizer.model": 500_000,
             "pytorch_model-00001-of-00002.bin": 9_900_000_000, ".gitattributes": 1_500}

    class FakeApi:
        def model_info(self, repoId, files_metadata, timeout):
            return SimpleNamespace(siblings=[SimpleNamespace(rfilename=n, size=s) for n, s in sizes.items()])

    monkeypatch.setattr(huggingface_hub, "HfApi", FakeApi)
    expected = sum(s for n, s in sizes.items() if not n.endswith((".bin", ".gitattributes")))

    cache = tmp_path / "cache"
    assert backbone.llavaDownloadNeeded({"model": "org/llava"}, str(cache)) == "org/llava"
    assert backbone.llavaDownloadNeeded({"model": str(tmp_path)}, str(cache)) is None  # a local model folder

    # The same child-process download as the backbone's, told which files to fetch.
    script = ("import json, pathlib, sys\n"
              "folder = pathlib.Path(sys.argv[2]) / 'fetched'\n"
              "folder.mkdir(parents=True)\n"
              "(folder / 'argv.json').write_text(json.dumps(sys.argv[1:]))\n"
              "print(folder)\n")
    monkeypatch.setattr(backbone, "_DOWNLOAD_SCRIPT", script)
    job = backbone.startBackboneDownload("org/llava", str(cache), backbone.LLAVA_PATTERNS)
    events, deadline = [], time.monotonic() + 60
    while not job.finished and time.monotonic() < deadline:
        events += job.poll()
        time.sleep(0.05)
    folder = job.wait(1)
    import json

    assert json.loads((folder / "argv.json").read_text()) == [
        "org/llava", str(cache), json.dumps(list(backbone.LLAVA_PATTERNS))]
    assert job.progress == (expected, expected)
    assert f"Downloading org/llava ({expected / 1e9:.1f} GB)" in events[0].value  # the size, told by the job


def test_llava_question_is_asked_at_once_without_the_network(slicer_app, monkeypatch):
    """Asking the hub for the size before the question froze Slicer up to 10 s (``model_info(timeout=10)`` on the
    GUI thread; offline: always). The question must be asked with no hub call."""
    import huggingface_hub

    hubCalls = []

    class OfflineApi:
        def model_info(self, *args, **kwargs):
            hubCalls.append(kwargs)
            raise OSError("offline")

    monkeypatch.setattr(huggingface_hub, "HfApi", OfflineApi)
    asked = []
    monkeypatch.setattr(slicer.util, "confirmOkCancelDisplay", lambda text, **kw: asked.append(text) or True,
                        raising=False)
    import CoTexNetSegmentGui

    assert CoTexNetSegmentGui.confirmLlavaDownload("org/llava") is True
    assert len(asked) == 1 and "org/llava" in asked[0] and "several GB" in asked[0]
    assert hubCalls == []


# ------------------------------------------------------------------------------------------ 11.7 translation


def test_modules_import_without_slicer_i18n_and_wrap_strings_with_it(slicer_app, monkeypatch):
    """Slicer's own modules use ``from slicer.i18n import tr as _`` (Modules/Scripted/SegmentEditor/
    SegmentEditor.py, v5.6.2 line 2; Base/Python/slicer/i18n.py ``tr`` takes the context from the caller's
    file). Without ``slicer.i18n`` (slicer-core) the modules still import and show the source text."""
    assert "slicer.i18n" not in sys.modules
    plain = load_source_5_10("CoTexNetSegment", str(SEGMENT_MODULE))
    assert plain._("Segment") == "Segment"
    for name in set(sys.modules):
        if name.split(".")[0] in GUI_MODULES or name == "CoTexNetSegmentLib.i18n":
            del sys.modules[name]

    translated = []

    def tr(text):
        translated.append(text)
        return text.upper()

    monkeypatch.setitem(sys.modules, "slicer.i18n", _stub("slicer.i18n", tr=tr, translate=lambda c, t: t))
    segment = load_source_5_10("CoTexNetSegment", str(SEGMENT_MODULE))
    train = load_source_5_10("CoTexNetTrain", str(TRAIN_MODULE))
    monkeypatch.setattr(slicer, "app", Anything(), raising=False)  # the module connects to startupCompleted()
    parent = SimpleNamespace()
    segment.CoTexNetSegment.__init__(SimpleNamespace(parent=parent), parent)
    assert parent.title == "COTEXNET SEGMENT" and parent.helpText.startswith("SEGMENT A VOLUME")
    assert train.DataSource.Folder.label() == "DATASET FOLDER"


# ------------------------------------------------------------------------------------------ lifecycle and GUI


class UiStandIn:
    """``slicer.util.childWidgetVariables`` of a .ui: one stand-in per widget name; path fields start empty."""

    def __getattr__(self, name):
        if name.startswith("__"):
            raise AttributeError(name)
        widget = WidgetStandIn(currentPath="") if name.endswith("PathLineEdit") else WidgetStandIn()
        setattr(self, name, widget)
        return widget


class Wrapper5_6:
    """``parameterNodeWrapper`` of Slicer 5.6/5.8 (Base/Python/slicer/parameterNodeWrapper/wrapper.py, v5.6.2):
    ``connectGui`` returns None (lines 241-253), every call adds a ModifiedEvent observer that is never removed
    (line 212), and ``disconnectGui(None)`` finds nothing to undo (lines 256-260)."""

    live = []  # connected (wrapper, gui) pairs: each one writes the GUI into its node and back

    def __init__(self, parameterNode, **fields):
        self.parameterNode = parameterNode
        self.__dict__.update(fields)

    def connectGui(self, gui):
        Wrapper5_6.live.append((self, gui))
        self.parameterNode.AddObserver(vtk.vtkCommand.ModifiedEvent, lambda caller, event: None)
        return None

    def disconnectGui(self, tag):
        if tag is not None:
            raise AssertionError("5.6 has no tag to give")


class ScriptedLogicStandIn:
    """``ScriptedLoadableModuleLogic.getParameterNode``: the module's singleton node in the scene."""

    moduleName = None

    def getParameterNode(self):
        return CoTexNetSegmentLogic(slicer.mrmlScene).getParameterNode() if self.moduleName is None else \
            _singleton(self.moduleName)


def _singleton(moduleName):
    node = slicer.mrmlScene.GetSingletonNode(moduleName, "vtkMRMLScriptedModuleNode")
    if node is None:
        node = slicer.vtkMRMLScriptedModuleNode()
        node.SetSingletonTag(moduleName)
        node = slicer.mrmlScene.AddNode(node)
    return node



def open_module(monkeypatch, name, startDeviceInfo=None):
    """Loads a module file as Slicer does and runs its widget's ``setup()`` against stand-in widgets (the .ui is
    not loaded: ``loadUI``/``childWidgetVariables`` give :class:`UiStandIn`), with 5.6's parameterNodeWrapper."""
    module = load_source_5_10(name, str(SEGMENT_MODULE if name == "CoTexNetSegment" else TRAIN_MODULE))
    ui = UiStandIn()
    monkeypatch.setattr(slicer.util, "loadUI", lambda path: Anything(), raising=False)
    monkeypatch.setattr(slicer.util, "childWidgetVariables", lambda widget: ui, raising=False)
    Wrapper5_6.live = []
    if name == "CoTexNetSegment":
        monkeypatch.setattr(module, "CoTexNetSegmentParameterNode", lambda node: Wrapper5_6(node, inputVolume=None))
        monkeypatch.setattr(module.CoTexNetSegmentLogic, "startDeviceInfo", startDeviceInfo)
        widget = module.CoTexNetSegmentWidget()
    else:
        fields = dict(backbone="tiny", dataSource=module.DataSource.SegmentedVolumes, classNames=[], keywords=[],
                      modelName="MyModel", outputFolder=pathlib.Path("/models"), segmentVolume=None, epochs=80,
                      batchSize=4, learningRate=3e-3, patience=80, imageSize=96, device="cpu",
                      conceptBackend="geometric")
        monkeypatch.setattr(module, "CoTexNetTrainParameterNode", lambda node: Wrapper5_6(node, **fields))
        monkeypatch.setattr(module, "ScriptedLoadableModuleLogic", ScriptedLogicStandIn)
        widget = module.CoTexNetTrainWidget()
        widget.moduleName = name
    widget.setup()
    OPENED_WIDGETS.append(widget)
    return module, widget, ui


def _no_worker(self):
    """What ``startDeviceInfo`` raises where PythonSlicer cannot be found (CoTexNetSegmentLib.processes)."""
    from CoTexNetSegmentLib.processes import EngineProcessError

    raise EngineProcessError("PythonSlicer not found on PATH nor at /opt/Slicer/bin/PythonSlicer")


@pytest.mark.parametrize("name", ["CoTexNetSegment", "CoTexNetTrain"])
def test_entering_a_module_again_keeps_one_set_of_gui_connections(slicer_app, monkeypatch, name):
    """On 5.6/5.8 a wrapper made and connected on every ``enter()`` could never be disconnected (``connectGui``
    returns None there, wrapper.py v5.6.2 lines 241-253; its observer at line 212 stays): each entry added a
    live set of GUI connections. The widget connects once, in ``setup()``, and keeps one wrapper object."""
    module, widget, ui = open_module(monkeypatch, name, _no_worker)
    node = widget._parameterNode.parameterNode
    for _ in range(3):
        widget.exit()
        widget.enter()
    assert len(Wrapper5_6.live) == 1 and Wrapper5_6.live[0][1] is ui
    assert widget._parameterNode is Wrapper5_6.live[0][0] and widget._parameterNode.parameterNode is node


def test_opening_the_module_builds_its_gui_when_the_worker_cannot_start(slicer_app, monkeypatch):
    """``setup()`` asks the worker for the device facts; when PythonSlicer is missing (or Popen fails) the error
    goes to the device label and the rest of the GUI is built (setup() must not raise)."""
    module, widget, ui = open_module(monkeypatch, "CoTexNetSegment", _no_worker)
    assert "PythonSlicer not found" in ui.deviceInfoLabel.text
    assert widget._devicePoller is None
    assert ui.applyButton.enabled is False and ui.applyButton.toolTip  # the panel below the label was built
    widget.enter()  # entering again asks again, and fails the same way
    assert "PythonSlicer not found" in ui.deviceInfoLabel.text


class PollerStandIn:
    def __init__(self):
        self.cancelled = self.stopped = False

    def cancel(self):
        self.cancelled = True

    def stop(self):
        self.stopped = True


def test_cancel_cancels_only_the_job_its_button_belongs_to(slicer_app, monkeypatch):
    """Cancel stopped all three pollers: cancelling a segmentation killed a backbone/LLaVA download, and a
    download's cancel ended the shared worker. Cancel belongs to the segmentation; the download button becomes
    "Cancel download" for the download; the device check is nobody's to cancel."""
    module, widget, ui = open_module(monkeypatch, "CoTexNetSegment", _no_worker)
    segmentation, download, device = PollerStandIn(), PollerStandIn(), PollerStandIn()
    widget._segmentationPoller, widget._backbonePoller, widget._devicePoller = segmentation, download, device

    widget.onCancel()
    assert (segmentation.cancelled, download.cancelled, device.cancelled) == (True, False, False)

    segmentation.cancelled = False
    monkeypatch.setattr(module, "ensureEngineReady", lambda: pytest.fail("a cancel must not start anything"))
    widget.onDownloadBackbone()
    assert (segmentation.cancelled, download.cancelled, device.cancelled) == (False, True, False)


def test_translated_strings_are_looked_up_once_not_on_every_update(slicer_app, monkeypatch):
    """In 5.6 ``slicer.i18n.tr`` calls ``inspect.stack()`` for every string (Base/Python/slicer/i18n.py, v5.6.2
    line 54); ``updateApplyButton`` and CoTexNetTrain's ``updateGUI`` run on every parameter and scene change."""
    looked_up = []
    monkeypatch.setitem(sys.modules, "slicer.i18n", _stub("slicer.i18n", tr=lambda text: looked_up.append(text) or text,
                                                          translate=lambda context, text: text))
    sys.modules.pop("CoTexNetSegmentLib.i18n", None)
    _, segment, _ = open_module(monkeypatch, "CoTexNetSegment", _no_worker)
    _, train, _ = open_module(monkeypatch, "CoTexNetTrain")
    assert looked_up, "the modules did not use slicer.i18n"
    looked_up.clear()
    for _ in range(5):
        segment.updateApplyButton()
        train.updateGUI()
    assert looked_up == []


def test_effect_strings_have_their_own_translation_context():
    """``slicer.i18n.getContext`` (Base/Python/slicer/i18n.py, v5.6.2 lines 15-38): a file next to an
    ``__init__.py`` gets "<folder>.<file>", any other one its file name, which every scripted effect's
    SegmentEditorEffect.py shares (Slicer's own effects are in the SegmentEditorEffects package)."""
    def context(path: Path) -> str:
        return f"{path.parent.name}.{path.stem}" if (path.parent / "__init__.py").is_file() else path.stem

    effect = REPO / "CoTexNetSegment" / "SegmentEditorCoTexNet" / "SegmentEditorEffect.py"
    assert context(effect) == "SegmentEditorCoTexNet.SegmentEditorEffect"


def test_continue_from_model_is_not_a_parameter_and_shows_no_dot(slicer_app, monkeypatch):
    """``initFrom: pathlib.Path = pathlib.Path("")`` was stored and shown as "." (serializers.py ``PathSerializer``,
    v5.6.2 lines 334-338: ``str(Path(""))``). It is the path field's own value now, as the model folder is."""
    import ast

    fields = _parameter_fields(TRAIN_MODULE, "CoTexNetTrainParameterNode")
    assert "initFrom" not in fields
    for path, name in ((SEGMENT_MODULE, "CoTexNetSegmentParameterNode"), (TRAIN_MODULE, "CoTexNetTrainParameterNode")):
        for field, (annotation, default) in _parameter_fields(path, name).items():
            if "pathlib.Path" in annotation:
                shown = str(eval(ast.unparse(default), {"pathlib": pathlib}))
                assert shown not in ("", "."), f"{path.name}: {field} would show {shown!r}"
    _, widget, ui = open_module(monkeypatch, "CoTexNetTrain")
    assert widget._trainingOptions()["initFrom"] is None
    ui.initFromPathLineEdit.currentPath = "/models/liver-run"
    assert widget._trainingOptions()["initFrom"] == "/models/liver-run"


def test_training_sends_only_the_fields_the_user_changed_from_the_backbones_recipe(slicer_app, monkeypatch):
    """The fields show the backbone's recipe; a field still at that value is not sent, so the engine's recipe
    for the chosen backbone applies (``cotexnet train`` fills what is unset, cotexnet/config.py ``RECIPES``)."""
    from CoTexNetTrainLib import recipeFields

    _, widget, _ = open_module(monkeypatch, "CoTexNetTrain")
    options = widget._trainingOptions()
    assert [options[field] for field in recipeFields("tiny")] == [None] * 5
    widget._parameterNode.epochs = 12
    widget._parameterNode.learningRate = 3e-3 * (1 + 1e-12)  # a spin box's float noise is no change
    options = widget._trainingOptions()
    assert options["epochs"] == 12 and options["learningRate"] is None and options["backbone"] == "tiny"


def test_dependency_install_cannot_start_twice(slicer_app, monkeypatch):
    """pip's output is read line by line with ``processEvents()`` between lines (slicer.util ``logProcessOutput``,
    v5.6.2 util.py line 3804), so a click on Apply, Segment or Start lands while pip runs: it must not start a
    second install into the same site-packages."""
    import contextlib

    import CoTexNetSegmentGui

    monkeypatch.setattr(dependencies, "checkRequirements",
                        lambda *args, **kwargs: dependencies.DependencyReport(toInstall=["slicerio>=1.1"]))
    monkeypatch.setattr(slicer.util, "confirmOkCancelDisplay", lambda *a, **k: True, raising=False)
    monkeypatch.setattr(slicer.util, "confirmYesNoDisplay", lambda *a, **k: False, raising=False)
    monkeypatch.setattr(slicer.util, "WaitCursor", contextlib.nullcontext, raising=False)
    notes, installs, nested = [], [], []
    monkeypatch.setattr(slicer.util, "showStatusMessage", lambda text, duration=0: notes.append(text), raising=False)

    def pip_install(arguments):
        installs.append(arguments)
        nested.append(CoTexNetSegmentGui.ensureEngineReady())  # a click processed while pip prints

    monkeypatch.setattr(slicer.util, "pip_install", pip_install, raising=False)
    CoTexNetSegmentGui.ensureEngineReady()
    assert len(installs) == 1 and nested == [False] and "installing" in notes[0]
    CoTexNetSegmentGui.ensureEngineReady()  # after the install, a new one may run
    assert len(installs) == 2


@pytest.mark.parametrize("answer, installed", [(False, None), (True, False), (True, True)])
def test_declining_the_pytorch_extension_is_reported_as_a_choice(slicer_app, monkeypatch, answer, installed):
    """Slicer's ``installExtensionFromServer`` returns False both when the user answers No to "Install extension?"
    and when the install fails (Base/QTCore/qSlicerExtensionsManagerModel.cxx, v5.6.2 lines 1716-1816). CoTexNet
    asks itself and installs non-interactively, so "No" is reported as the user's choice."""
    import CoTexNetSegmentGui

    shown, calls = [], []

    class Manager:
        interactive = True

        def installExtensionFromServer(self, name, restart):
            calls.append((name, restart, self.interactive))
            return installed

    manager = Manager()
    monkeypatch.setattr(slicer, "app", SimpleNamespace(extensionsManagerModel=lambda: manager), raising=False)
    for dialog in ("infoDisplay", "errorDisplay"):
        monkeypatch.setattr(slicer.util, dialog, lambda text, dialog=dialog, **k: shown.append((dialog, text)),
                            raising=False)
    monkeypatch.setattr(slicer.util, "confirmOkCancelDisplay", lambda *a, **k: answer, raising=False)
    monkeypatch.setattr(slicer.util, "confirmYesNoDisplay", lambda text, **k: shown.append(("restart?", text)),
                        raising=False)

    CoTexNetSegmentGui.installPyTorchExtension()

    if not answer:
        assert calls == [] and shown[0][0] == "infoDisplay" and "as you chose" in shown[0][1]
    else:
        assert calls == [("PyTorch", False, False)] and manager.interactive is True
        assert shown[0][0] == ("restart?" if installed else "errorDisplay")
        assert installed or "could not be installed" in shown[0][1]


class _AnyClassAttribute(type):
    def __getattr__(cls, name):  # enum values such as ctkPathLineEdit.Dirs
        if name.startswith("__"):
            raise AttributeError(name)
        return Anything()


class SignalWidgetStandIn(Anything, metaclass=_AnyClassAttribute):
    """A Qt widget whose signal connections are recorded (PythonQt's ``connect``/``disconnect``)."""

    connections = []

    def connect(self, signal, slot):
        SignalWidgetStandIn.connections.append((self, signal, slot))

    def disconnect(self, signal, slot):
        SignalWidgetStandIn.connections.remove((self, signal, slot))


class EffectStandIn(ScriptedEffectStandIn):
    """The C++ effect's option-panel helpers accept any widget."""

    def __getattr__(self, name):
        if name.startswith("__"):
            raise AttributeError(name)
        return Anything()


def test_effect_cleanup_disconnects_its_signals_and_5_6_stops_the_job_with_its_widgets(slicer_app, monkeypatch):
    """``cleanup()`` is called only from Slicer 5.10 (qSlicerSegmentEditorScriptedEffect.cxx, v5.10.0 lines
    507-517; qMRMLSegmentEditorWidget.cxx v5.10.0 lines 278-288 calls it, then deletes the effect) and the
    Python slots it leaves connected keep the effect alive (SegmentEditorThresholdEffect.py ``cleanup``, v5.10.0
    lines 72-78). 5.6/5.8 delete the effect's widgets without it: a running job must stop with them."""
    qt_module = _qt_like("qt")
    qt_module.__getattr__ = lambda name: (_ for _ in ()).throw(AttributeError(name)) if name.startswith("__") \
        else SignalWidgetStandIn
    monkeypatch.setitem(sys.modules, "qt", qt_module)
    monkeypatch.setitem(sys.modules, "ctk", qt_module)
    SignalWidgetStandIn.connections = []
    module = load_source_5_10("SegmentEditorCoTexNet",
                              str(REPO / "CoTexNetSegment" / "SegmentEditorCoTexNet" / "SegmentEditorEffect.py"))
    effect = module.SegmentEditorEffect(EffectStandIn())

    effect.setupOptionsFrame()
    assert len(SignalWidgetStandIn.connections) >= 6
    effect.poller = running = PollerStandIn()
    effect.cleanup()
    assert SignalWidgetStandIn.connections == [] and running.stopped and effect.poller is None

    effect.setupOptionsFrame()  # 5.6/5.8: no cleanup(); the editor widget is destroyed with the effect's widgets
    effect.poller = running = PollerStandIn()
    for widget, signal, slot in list(SignalWidgetStandIn.connections):
        if signal == "destroyed()":
            slot()
    assert running.stopped and effect.poller is None
