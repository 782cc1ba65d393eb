"""CoTexNetTrain on real MRML classes (slicer-core): export, input checks, a real background training run,
stop/resume, and the module's packaging (.ui bindings, CMake lists, icon).

The training tests start the engine for real (``python -m cotexnet.cli train``) in a subprocess, with the
tiny backbone at 64 px on thin slabs of the MNI152 template, so they exercise exactly what Slicer runs.
"""
from __future__ import annotations

import ast
import json
import re
import subprocess
import sys
import time
import xml.etree.ElementTree as ElementTree
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
import vtk

import slicer
from CoTexNetSegmentLib import mrml
from CoTexNetTrainLib import (
    CoTexNetTrainLogic,
    TrainingInputError,
    addRecentModel,
    TrainingRunError,
    continuedClasses,
    exportDataset,
    findScenePairs,
    folderClasses,
    modelClasses,
    recentModels,
)
from CoTexNetTrainLib.logic import RECIPE_FIELDS, _trainArguments, recipeFields
from CoTexNetTrainLib.progress import ProgressEventReader, TrainingProgress

REPO = Path(__file__).resolve().parents[1]
MODULE_DIR = REPO / "CoTexNetTrain"
# An oblique voxel grid (axes permuted, anisotropic, rotated) so that geometry mistakes show.
OBLIQUE = np.array([[0.0, 0.8, 0.0, 12.0], [1.2, 0.0, 0.3, -30.0], [0.0, 0.0, 2.0, 7.5], [0, 0, 0, 1]])


@pytest.fixture
def scene():
    scene = slicer.vtkMRMLScene()
    scene.RegisterNodeClass(slicer.vtkMRMLSequenceBrowserNode())  # the application registers it; slicer-core does not
    slicer.mrmlScene = scene
    mrml.ensureSegmentationConverters()
    yield scene
    scene.Clear(True)


def _matrix(array: np.ndarray) -> vtk.vtkMatrix4x4:
    matrix = vtk.vtkMatrix4x4()
    for row in range(4):
        for column in range(4):
            matrix.SetElement(row, column, float(array[row, column]))
    return matrix


def addVolume(scene, array, ijkToRas=OBLIQUE, name="volume"):
    node = slicer.util.addVolumeFromArray(np.asarray(array, np.float32), ijkToRAS=ijkToRas, name=name)
    assert node.GetScene() is scene
    return node


def addSegmentation(scene, volumeNode, labels, names, ijkToRas=None, name="segmentation"):
    """Segments through Slicer's own label map import (label v -> names[v - 1]), on any voxel grid."""
    labelNode = scene.AddNewNodeByClass("vtkMRMLLabelMapVolumeNode")
    slicer.util.updateVolumeFromArray(labelNode, np.asarray(labels, np.uint8))
    matrix = vtk.vtkMatrix4x4()
    if ijkToRas is None:
        volumeNode.GetIJKToRASMatrix(matrix)
    else:
        matrix = _matrix(ijkToRas)
    labelNode.SetIJKToRASMatrix(matrix)
    segmentationNode = scene.AddNewNodeByClass("vtkMRMLSegmentationNode", name)
    segmentationNode.SetReferenceImageGeometryParameterFromVolumeNode(volumeNode)
    assert slicer.vtkSlicerSegmentationsModuleLogic.ImportLabelmapToSegmentationNode(labelNode, segmentationNode)
    segmentation = segmentationNode.GetSegmentation()
    assert segmentation.GetNumberOfSegments() == len(names)
    for index, segmentName in enumerate(names):
        segmentation.GetNthSegment(index).SetName(segmentName)
    scene.RemoveNode(labelNode)
    return segmentationNode


def readArray(path) -> np.ndarray:
    return sitk.GetArrayFromImage(sitk.ReadImage(str(path)))


# --------------------------------------------------------------------------------------------- export


def test_export_matches_each_segmentation_voxels_and_geometry(scene, tmp_path):
    rng = np.random.default_rng(1)
    volume = addVolume(scene, rng.normal(size=(5, 9, 11)), name="CT oblique")
    labels = np.zeros((5, 9, 11), np.uint8)
    labels[1:3, 2:6, 3:7] = 1  # tumor
    labels[3:5, 5:8, 1:4] = 2  # liver
    segmentation = addSegmentation(scene, volume, labels, ["tumor", "liver"])

    # A second case whose segmentation lives on a cropped grid, offset by (i, j) = (2, 1) voxels.
    volume2 = addVolume(scene, rng.normal(size=(5, 9, 11)), name="second")
    sub = np.zeros((5, 6, 7), np.uint8)
    sub[0:2, 1:4, 2:5] = 1
    cropped = OBLIQUE.copy()
    cropped[:3, 3] += OBLIQUE[:3, :3] @ np.array([2, 1, 0])
    segmentation2 = addSegmentation(scene, volume2, sub, ["tumor"], ijkToRas=cropped, name="cropped")

    folder = exportDataset(findScenePairs(scene), None, tmp_path / "data")

    meta = json.loads((folder / "dataset.json").read_text(encoding="utf-8"))
    assert meta["labels"] == {"background": 0, "tumor": 1, "liver": 2}  # segment order of the first segmentation
    assert meta["file_ending"] == ".nrrd" and meta["numTraining"] == 2 and meta["channel_names"] == {"0": "MR"}
    assert [c["segmentation"] for c in meta["cases"].values()] == [segmentation.GetName(), segmentation2.GetName()]

    np.testing.assert_array_equal(readArray(folder / "labelsTr/case_000.nrrd"), labels)
    expected2 = np.zeros((5, 9, 11), np.uint8)
    expected2[:, 1:7, 2:9] = sub
    np.testing.assert_array_equal(readArray(folder / "labelsTr/case_001.nrrd"), expected2)

    # Geometry: as Slicer's own NRRD writer stores the volume, for image and label map alike.
    for case, node in (("case_000", volume), ("case_001", volume2)):
        reference = tmp_path / f"{case}_slicer.nrrd"
        storage = slicer.vtkMRMLVolumeArchetypeStorageNode()
        storage.SetFileName(str(reference))
        assert storage.WriteData(node)
        expected = sitk.ReadImage(str(reference))
        for path in (folder / f"imagesTr/{case}_0000.nrrd", folder / f"labelsTr/{case}.nrrd"):
            image = sitk.ReadImage(str(path))
            assert image.GetSize() == expected.GetSize()
            np.testing.assert_allclose(image.GetSpacing(), expected.GetSpacing(), atol=1e-6)
            np.testing.assert_allclose(image.GetOrigin(), expected.GetOrigin(), atol=1e-6)
            np.testing.assert_allclose(image.GetDirection(), expected.GetDirection(), atol=1e-6)
        np.testing.assert_allclose(readArray(folder / f"imagesTr/{case}_0000.nrrd"), slicer.util.arrayFromVolume(node))
    # The engine's own dataset loader accepts the export and reads the same classes.
    assert folderClasses(folder) == ["tumor", "liver"]
    with pytest.raises(TrainingInputError, match=r"don't match dataset.json labels"):
        folderClasses(folder, ["liver"])


def test_export_classes_follow_given_order_and_missing_class_gives_no_voxels(scene, tmp_path):
    labels = np.zeros((4, 8, 8), np.uint8)
    labels[1:3, 1:4, 1:4] = 1
    labels[1:3, 5:7, 5:7] = 2
    volume = addVolume(scene, labels * 10.0, name="full")
    addSegmentation(scene, volume, labels, ["tumor", "liver"], name="both")
    volume2 = addVolume(scene, labels * 10.0, name="tumor only")
    onlyTumor = (labels == 1).astype(np.uint8)
    addSegmentation(scene, volume2, onlyTumor, ["tumor"], name="one")

    folder = exportDataset(findScenePairs(scene), ["liver", "tumor"], tmp_path / "data")

    assert json.loads((folder / "dataset.json").read_text(encoding="utf-8"))["labels"] == {"background": 0, "liver": 1, "tumor": 2}
    first = readArray(folder / "labelsTr/case_000.nrrd")
    np.testing.assert_array_equal(first == 1, labels == 2)
    np.testing.assert_array_equal(first == 2, labels == 1)
    second = readArray(folder / "labelsTr/case_001.nrrd")
    assert not (second == 1).any()  # liver is missing there: no voxels, and tumor keeps label 2
    np.testing.assert_array_equal(second == 2, labels == 1)


# ----------------------------------------------------------------------------------------- bad input


def _segmented(scene, name, names=("liver",), shape=(4, 8, 8)):
    volume = addVolume(scene, np.ones(shape), name=name)
    labels = np.zeros(shape, np.uint8)
    for index in range(len(names)):
        labels[0, index, :2] = index + 1
    return volume, addSegmentation(scene, volume, labels, list(names), name=f"{name} seg")


def _noSegmentation(scene):
    volume = addVolume(scene, np.ones((4, 8, 8)), name="lonely CT")
    return [(volume, None)], r"'lonely CT' has no segmentation"


def _differentNames(scene):
    first = _segmented(scene, "case A", ("liver", "tumor"))
    second = _segmented(scene, "case B", ("liver", "spleen"))
    return [first, second], r"segment names differ: segmentation 'case B seg' has \['spleen'\]"


def _twoD(scene):
    volume = addVolume(scene, np.ones((1, 16, 16)), name="xray")
    segmentation = _segmented(scene, "other")[1]
    return [(volume, segmentation)], r"'xray' is 2D \(16x16x1 voxels\)"


def _multiComponent(scene):
    volume = slicer.util.addVolumeFromArray(
        np.ones((4, 8, 8, 3), np.float32), name="dwi", nodeClassName="vtkMRMLVectorVolumeNode"
    )
    segmentation = _segmented(scene, "other")[1]
    return [(volume, segmentation)], r"'dwi' is 4D \(3 components per voxel\)"


def _sequenceFrame(scene):
    volume, segmentation = _segmented(scene, "cine")
    sequence = scene.AddNewNodeByClass("vtkMRMLSequenceNode", "cine sequence")
    sequence.SetDataNodeAtValue(volume, "0")
    browser = scene.AddNewNodeByClass("vtkMRMLSequenceBrowserNode", "cine browser")
    browser.SetAndObserveMasterSequenceNodeID(sequence.GetID())
    browser.AddProxyNode(volume, sequence, False)
    return [(volume, segmentation)], r"'cine' is 4D \(a frame of sequence browser 'cine browser'\)"


def _emptyEverywhere(scene):
    first, second = _segmented(scene, "case A", ("liver",)), _segmented(scene, "case B", ("liver",))
    for _, segmentation in (first, second):  # a segment the user added but never painted
        segmentation.GetSegmentation().AddEmptySegment("tumor", "tumor")
    return [first, second], r"'tumor' has no voxels in the 2 training cases: paint it in at least one case"


@pytest.mark.parametrize("make", [_noSegmentation, _differentNames, _twoD, _multiComponent, _sequenceFrame,
                                  _emptyEverywhere])
def test_bad_input_is_refused_before_any_process_starts(scene, tmp_path, make):
    pairs, message = make(scene)
    logic = CoTexNetTrainLogic(scene)
    with pytest.raises(TrainingInputError, match=message):
        logic.train(pairs, None, tmp_path / "run", backbone="tiny", waitForCompletion=False)
    assert logic.process is None
    assert not (tmp_path / "run").exists()


def test_continuing_from_a_model_trains_its_classes_then_the_new_segments(scene, tmp_path, tiny_model):
    """With ``initFrom`` and no classes, the run's classes are the model's (fine-tuning keeps every one, in its
    label order) and then segments it lacks; a model class that no case shows is refused by name."""
    tiny_model(classes=("liver", "spleen")).save_pretrained(tmp_path / "model")
    first = _segmented(scene, "case A", ("tumor", "liver"))
    second = _segmented(scene, "case B", ("spleen", "cyst", "tumor"))
    assert modelClasses(tmp_path / "model") == ["liver", "spleen"]
    assert continuedClasses([first, second], ["liver", "spleen"]) == ["liver", "spleen", "tumor", "cyst"]
    logic = CoTexNetTrainLogic(scene)
    with pytest.raises(TrainingInputError, match=r"^'spleen' has no voxels in segmentation 'case A seg'"):
        logic.train([first], None, tmp_path / "run", backbone="tiny", initFrom=str(tmp_path / "model"),
                    waitForCompletion=False)
    assert logic.process is None and not (tmp_path / "run").exists()
    with pytest.raises(TrainingInputError, match=r"the model to continue from: .*not found"):
        modelClasses(tmp_path / "no model")


# ------------------------------------------------------------------------------------ progress events


def test_progress_reader_keeps_a_partial_last_line(tmp_path):
    path = tmp_path / "progress.jsonl"
    reader = ProgressEventReader(path)
    assert reader.readEvents() == []
    start = json.dumps({"event": "start", "epochs": 2, "steps_per_epoch": 3})
    step = json.dumps({"event": "step", "epoch": 2, "step": 1, "steps": 3, "loss": 0.5, "eta_s": 75})
    path.write_text(start + "\n" + step[:10], encoding="utf-8")
    assert [e["event"] for e in reader.readEvents()] == ["start"]
    with open(path, "a", encoding="utf-8") as stream:
        stream.write(step[10:] + "\n")
    events = reader.readEvents()
    assert events == [json.loads(step)]
    progress = TrainingProgress()
    for event in [json.loads(start)] + events:
        progress.update(event)
    assert progress.fraction == pytest.approx(4 / 6)
    assert "Epoch 2/2, step 1/3" in progress.summary() and "ETA 0:01:15" in progress.summary()


def test_recent_models_list_is_shared_newest_first(tmp_path):
    bundles = []
    for name in ("a", "b"):
        (tmp_path / name).mkdir()
        (tmp_path / name / "config.json").write_text("{}", encoding="utf-8")
        bundles.append(str(tmp_path / name))
    addRecentModel(bundles[0])
    addRecentModel(bundles[1])
    addRecentModel(bundles[0])
    listed = recentModels()
    assert listed.index(bundles[0]) < listed.index(bundles[1]) and listed.count(bundles[0]) == 1
    addRecentModel(tmp_path / "gone")
    assert str(tmp_path / "gone") not in recentModels()


def test_recent_models_list_a_run_folder_as_its_best_bundle(tmp_path):
    """A training run folder (best/ and last/ inside) is accepted wherever a bundle is expected
    (cotexnet.bundle.bundle_folder); the recent-models list hid it because it holds no config.json itself."""
    from CoTexNetSegmentLib.settings import preferredModelPath

    run = tmp_path / "liver-run"
    for bundle in ("best", "last"):
        (run / bundle).mkdir(parents=True)
        (run / bundle / "config.json").write_text("{}", encoding="utf-8")
    (tmp_path / "empty-run").mkdir()
    addRecentModel(tmp_path / "empty-run")  # no bundle at all: still left out
    addRecentModel(run)
    listed = recentModels()
    assert listed[0] == (run / "best").as_posix() and (tmp_path / "empty-run").as_posix() not in listed
    assert preferredModelPath("", listed) == (run / "best").as_posix()
    addRecentModel(run / "best")  # the same bundle named both ways is listed once
    assert recentModels().count((run / "best").as_posix()) == 1


# ------------------------------------------------------------------------------ real training runs


@pytest.fixture(scope="module")
def mni152():
    """Real anatomy: the MNI152 T1 template with its grey/white-matter label map (shipped in nilearn's wheel)."""
    from cotexnet.demo import mni152_volumes

    return mni152_volumes()


@pytest.fixture
def mniPairs(scene, mni152):
    """Two thin axial slabs of the MNI152 template, each with a grey/white-matter segmentation."""
    image, labels = mni152
    lpsToRas = np.diag([-1.0, -1.0, 1.0])
    ijkToRas = np.eye(4)
    ijkToRas[:3, :3] = lpsToRas @ np.reshape(image.direction, (3, 3)) @ np.diag(image.spacing)
    pairs = []
    for index, start in enumerate((44, 49)):
        slab = ijkToRas.copy()
        slab[:3, 3] = lpsToRas @ np.asarray(image.origin) + ijkToRas[:3, 2] * start
        volume = addVolume(scene, image.array[start:start + 4], ijkToRas=slab, name=f"MNI slab {index}")
        segmentation = addSegmentation(scene, volume, labels.array[start:start + 4],
                                       ["grey matter", "white matter"], name=f"GM/WM {index}")
        pairs.append((volume, segmentation))
    return pairs


OPTIONS = dict(backbone="tiny", imageSize=64, batchSize=4, device="cpu", learningRate=1e-3)


def _epochEvents(outDir: Path) -> list[dict]:
    lines = (outDir / "progress.jsonl").read_text(encoding="utf-8").splitlines()
    return [event for event in map(json.loads, lines) if event["event"] == "epoch"]


def _tableRows(logic) -> list[tuple]:
    table = logic.tableNode.GetTable()
    columns = [table.GetColumnByName(name) for name in ("epoch", "loss", "val_dice")]
    return [tuple(column.GetValue(row) for column in columns) for row in range(table.GetNumberOfRows())]


def test_short_training_run_produces_a_bundle_and_fills_the_plot_table(scene, mniPairs, tmp_path):
    logic = CoTexNetTrainLogic(scene)
    outDir = tmp_path / "gm-wm"
    bundle = logic.train(mniPairs, None, outDir, keywords=["grey", "white"], epochs=2, patience=5, timeout=120,
                         **OPTIONS)

    assert logic.state == "finished" and logic.process.returncode == 0
    assert bundle == outDir / "best" and (bundle / "config.json").is_file()
    config = json.loads((bundle / "config.json").read_text(encoding="utf-8"))
    assert config["classes"] == ["grey matter", "white matter"] and config["keywords"] == ["grey", "white"]
    assert str(bundle.resolve()) in [str(Path(p).resolve()) for p in recentModels()]
    assert not (outDir / "dataset").exists()  # the temporary export is gone once training finished
    assert "has finished" in logic.resumeProblem(outDir)
    with pytest.raises(TrainingInputError, match="already holds a training run"):
        logic.train(mniPairs, None, outDir, **OPTIONS)

    epochs = _epochEvents(outDir)
    assert [e["epoch"] for e in epochs] == [1, 2]
    assert _tableRows(logic) == [(e["epoch"], pytest.approx(e["loss"]), pytest.approx(e["val_dice"])) for e in epochs]
    chart = logic.chartNode
    series = [chart.GetNthPlotSeriesNode(i) for i in range(chart.GetNumberOfPlotSeriesNodes())]
    assert sorted(s.GetYColumnName() for s in series) == ["loss", "val_dice"]
    assert all(s.GetTableNode() is logic.tableNode and s.GetXColumnName() == "epoch" for s in series)
    assert logic.progress.fraction == 1.0 and logic.progress.finished and not logic.progress.stopped


def test_engine_failure_is_reported_with_the_process_output(scene, mniPairs, tmp_path):
    logic = CoTexNetTrainLogic(scene)
    with pytest.raises(TrainingRunError, match=r"exited with code 2(.|\n)*invalid choice: 'bogus'"):
        logic.train(mniPairs, None, tmp_path / "bad", conceptBackend="bogus", timeout=60, **OPTIONS)
    assert logic.state == "failed" and logic.bundlePath is None
    assert (tmp_path / "bad" / "dataset").is_dir()  # kept: the run can be fixed and started again


def _pollUntil(logic, condition, timeout=60.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        logic.poll()
        if condition():
            return
        assert logic.isRunning, f"training ended early:\n{logic.errorMessage or logic.readLog()}"
        time.sleep(0.2)
    raise AssertionError(f"condition not met within {timeout} s")


def test_stop_leaves_a_loadable_bundle_and_resume_continues(scene, mniPairs, tmp_path):
    from cotexnet import CoTexNet

    logic = CoTexNetTrainLogic(scene)
    outDir = tmp_path / "long"
    logic.train(mniPairs, None, outDir, epochs=200, patience=200, waitForCompletion=False, **OPTIONS)
    assert logic.isRunning
    _pollUntil(logic, lambda: logic.tableNode.GetNumberOfRows() >= 1)

    bundle = logic.stop(timeout=60)
    assert not logic.isRunning and logic.process.returncode == 0
    assert logic.state == "stopped" and logic.progress.stopped
    model = CoTexNet.from_pretrained(bundle)
    assert model.config.classes == ["grey matter", "white matter"]
    stoppedAt = int(_tableRows(logic)[-1][0])
    assert (outDir / "dataset").is_dir() and logic.resumeProblem(outDir) is None  # kept for Resume

    logic.resume()
    _pollUntil(logic, lambda: _tableRows(logic)[-1][0] > stoppedAt)
    logic.stop(timeout=60)
    assert logic.state == "stopped"
    epochs = [int(row[0]) for row in _tableRows(logic)]
    assert epochs == list(range(1, len(epochs) + 1))  # continued, not restarted, and no duplicate rows
    assert CoTexNet.from_pretrained(logic.bundlePath).config.classes == ["grey matter", "white matter"]


# ----------------------------------------------------------------------------------------- packaging


def _parameterAnnotations() -> dict[str, str]:
    """Parameter name -> annotation source, read from the module file (which needs Qt to import)."""
    tree = ast.parse((MODULE_DIR / "CoTexNetTrain.py").read_text(encoding="utf-8"))
    wrapper = next(
        node for node in tree.body
        if isinstance(node, ast.ClassDef) and any(getattr(d, "id", None) == "parameterNodeWrapper" for d in node.decorator_list)
    )
    return {
        item.target.id: ast.unparse(item.annotation) for item in wrapper.body if isinstance(item, ast.AnnAssign)
    }


def test_training_fields_show_the_recipe_of_the_backbone():
    """The module sends its epochs, lr, size, batch and patience, so they must be the engine's recipe for the
    chosen backbone (config.RECIPES): the random-init tiny model does not learn with the paper's recipe. The
    parameter node's defaults are the default backbone's recipe; another backbone fills in its own."""
    from cotexnet.cli import build_parser
    from cotexnet.config import DEFAULT_BACKBONE

    tree = ast.parse((MODULE_DIR / "CoTexNetTrain.py").read_text(encoding="utf-8"))
    wrapper = next(node for node in tree.body if isinstance(node, ast.ClassDef) and node.name == "CoTexNetTrainParameterNode")
    defaults = {item.target.id: ast.literal_eval(item.value) for item in wrapper.body
                if isinstance(item, ast.AnnAssign) and item.target.id in RECIPE_FIELDS}
    assert defaults == recipeFields(DEFAULT_BACKBONE) == {
        "imageSize": 352, "epochs": 500, "batchSize": 8, "learningRate": 3e-4, "patience": 50}
    for backbone in ("tiny", " full-random "):
        assert recipeFields(backbone) == {"imageSize": 96, "epochs": 80, "batchSize": 4, "learningRate": 3e-3,
                                          "patience": 80}
    arguments = _trainArguments(Path("data"), ["gm"], Path("run"), None, {"backbone": "tiny", **recipeFields("tiny")})
    assert build_parser().parse_args(["train", *arguments]).lr == 3e-3  # each field reaches the engine


def _uiWidgets(root) -> dict[str, ElementTree.Element]:
    return {widget.get("name"): widget for widget in root.iter("widget")}


def _boundName(widget) -> str | None:
    for prop in widget.findall("property"):
        if prop.get("name") == "SlicerParameterName":
            return prop.find("string").text
    return None


def _widgetsFor(annotation: str) -> set[str]:
    """Widget classes whose parameterNodeWrapper GUI connector handles a parameter of this annotation."""
    base = re.sub(r"^Annotated\[([^,\]]+).*$", r"\1", annotation)
    if "Choice(" in annotation or base == "DataSource":
        return {"QComboBox"}
    return {
        "int": {"QSpinBox", "QSlider"},
        "float": {"QDoubleSpinBox", "ctkSliderWidget"},
        "str": {"QLineEdit", "QTextEdit"},
        "bool": {"QCheckBox", "QPushButton"},
        "pathlib.Path": {"ctkPathLineEdit", "ctkDirectoryButton"},
        "vtkMRMLScalarVolumeNode": {"qMRMLNodeComboBox"},
    }.get(base, set())


def test_ui_bindings_match_the_parameter_node():
    root = ElementTree.parse(MODULE_DIR / "Resources/UI/CoTexNetTrain.ui").getroot()
    widgets = _uiWidgets(root)
    assert root.find("widget").get("class") == "qMRMLWidget"
    parameters = _parameterAnnotations()
    bound = {_boundName(w): w for w in widgets.values() if _boundName(w)}
    for name, widget in bound.items():
        assert name in parameters, f"{widget.get('name')} binds unknown parameter {name!r}"
        assert widget.get("class") in _widgetsFor(parameters[name]), (
            f"{widget.get('name')} ({widget.get('class')}) cannot show {name}: {parameters[name]}"
        )
    # Every scalar parameter has a widget; lists (pairs, classes, keywords) are shown in tables by the widget.
    assert {n for n, a in parameters.items() if not a.startswith("list[")} == set(bound)
    used = set(re.findall(r"self\.ui\.(\w+)", (MODULE_DIR / "CoTexNetTrain.py").read_text(encoding="utf-8")))
    assert used <= set(widgets), f"CoTexNetTrain.py uses widgets missing from the .ui: {sorted(used - set(widgets))}"
    for connection in root.iter("connection"):
        assert connection.find("receiver").text in widgets
    for widget in widgets.values():
        if widget.get("class") == "qMRMLNodeComboBox":
            receivers = [c.find("receiver").text for c in root.iter("connection")
                         if c.find("slot").text == "setMRMLScene(vtkMRMLScene*)"]
            assert widget.get("name") in receivers, f"{widget.get('name')} never gets the scene"


def test_cmake_lists_every_file_and_registers_the_self_test():
    text = (MODULE_DIR / "CMakeLists.txt").read_text(encoding="utf-8").replace("${MODULE_NAME}", "CoTexNetTrain")

    def listed(variable):
        match = re.search(rf"set\({variable}\s+(.*?)\)", text, re.S)
        return set(match.group(1).split())

    scripts = {p.relative_to(MODULE_DIR).as_posix() for p in MODULE_DIR.rglob("*.py") if "__pycache__" not in p.parts}
    resources = {p.relative_to(MODULE_DIR).as_posix() for p in (MODULE_DIR / "Resources").rglob("*") if p.is_file()}
    assert listed("MODULE_PYTHON_SCRIPTS") == scripts
    assert listed("MODULE_PYTHON_RESOURCES") == resources
    assert re.search(r"slicerMacroBuildScriptedModule\(\s*NAME CoTexNetTrain", text)
    assert "slicer_add_python_unittest(SCRIPT CoTexNetTrain.py)" in text
    tree = ast.parse((MODULE_DIR / "CoTexNetTrain.py").read_text(encoding="utf-8"))
    classes = {node.name: node for node in tree.body if isinstance(node, ast.ClassDef)}
    assert {"CoTexNetTrain", "CoTexNetTrainWidget", "CoTexNetTrainTest"} <= set(classes)
    assert "runTest" in {f.name for f in classes["CoTexNetTrainTest"].body if isinstance(f, ast.FunctionDef)}

    from PIL import Image

    with Image.open(MODULE_DIR / "Resources/Icons/CoTexNetTrain.png") as icon:
        assert icon.format == "PNG" and icon.size[0] == icon.size[1] >= 64
        assert len(icon.convert("RGB").getcolors(maxcolors=1 << 16)) > 16  # drawn, not a flat placeholder


def test_logic_imports_without_qt_from_its_module_folder_alone():
    code = (
        "import sys; sys.path.insert(0, sys.argv[1]); "
        "from CoTexNetTrainLib import CoTexNetTrainLogic; "
        "assert 'qt' not in sys.modules and 'CoTexNetSegmentLib' not in sys.modules; "
        "print(CoTexNetTrainLogic.train.__name__)"
    )
    result = subprocess.run([sys.executable, "-c", code, str(MODULE_DIR)], capture_output=True,
                            encoding="utf-8", errors="replace", timeout=60)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "train"
