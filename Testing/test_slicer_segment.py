"""CoTexNetSegment's logic on real MRML classes (slicer-core), with a tiny CoTexNet bundle.

No Slicer GUI here: the widget and the Segment Editor effect are checked statically (names used by the
code exist in the .ui; SlicerParameterName values are parameter-node fields); the logic, which does all
the work, runs for real on a fresh scene per test.
"""
from __future__ import annotations

import ast
import math
import shutil
import sys
import time
import xml.etree.ElementTree as ElementTree
from pathlib import Path

import numpy as np
import pytest

slicer = pytest.importorskip("slicer")
import vtk  # noqa: E402  (comes with slicer-core)
from vtk.util import numpy_support  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
MODULE_DIR = REPO / "CoTexNetSegment"
sys.path.insert(0, str(MODULE_DIR))

from CoTexNetSegmentLib import CoTexNetSegmentLogic, backbone, dependencies, jobs, mrml  # noqa: E402
from CoTexNetSegmentLib.logic import CONCEPT_COLUMNS, CONCEPTS_REFERENCE_ROLE  # noqa: E402

CLASSES = ["organ", "lesion"]
COLORS = [[0.9, 0.3, 0.2], [0.1, 0.7, 0.4]]


# ------------------------------------------------------------------------------------------ fixtures


@pytest.fixture(scope="module")
def bundle(tmp_path_factory):
    """A tiny CoTexNet bundle saved to disk the way training saves one.

    A random decoder favours one class everywhere; its output bias is shifted so that every class wins
    somewhere on the phantom, which makes comparing label maps voxel by voxel meaningful.
    """
    import torch
    import torch.nn.functional as F

    from cotexnet import CoTexNet, CoTexNetConfig

    model = CoTexNet.from_config(CoTexNetConfig(classes=CLASSES, colors=COLORS, backbone="tiny", image_size=64)).eval()
    slices = torch.from_numpy(phantom()).unsqueeze(1)
    low, high = torch.quantile(slices, 0.005), torch.quantile(slices, 0.995)
    images = F.interpolate(((slices - low) / (high - low)).clamp(0, 1), size=64).expand(-1, 3, -1, -1)
    head_bias = [p for n, p in model.named_parameters() if n.endswith("bias") and p.shape == (len(CLASSES) + 1,)][-1]
    with torch.no_grad():
        logits = model(images)
        head_bias -= logits.mean(dim=(0, 2, 3))
    path = tmp_path_factory.mktemp("bundle") / "model"
    model.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def engine_model(bundle):
    from cotexnet import CoTexNet

    return CoTexNet.from_pretrained(bundle, device="cpu")


@pytest.fixture
def scene():
    """A fresh scene with the subject hierarchy that the Slicer application always has."""
    scene = slicer.vtkMRMLScene()
    slicer.vtkMRMLSubjectHierarchyNode.GetSubjectHierarchyNode(scene)
    slicer.mrmlScene = scene
    yield scene
    scene.Clear(True)


def rotation(axis, angle):
    axis = np.asarray(axis, float) / np.linalg.norm(axis)
    x, y, z = axis
    c, s = math.cos(angle), math.sin(angle)
    return np.array([
        [c + x * x * (1 - c), x * y * (1 - c) - z * s, x * z * (1 - c) + y * s],
        [y * x * (1 - c) + z * s, c + y * y * (1 - c), y * z * (1 - c) - x * s],
        [z * x * (1 - c) - y * s, z * y * (1 - c) + x * s, c + z * z * (1 - c)],
    ])


def phantom(shape=(6, 28, 32), seed=0):
    """Two bright blobs on a noisy background: something for the model to respond to."""
    rng = np.random.default_rng(seed)
    k, j, i = np.meshgrid(*[np.linspace(-1, 1, n) for n in shape], indexing="ij")
    image = 100 + 10 * rng.standard_normal(shape)
    image[(j / 0.6) ** 2 + (i / 0.5) ** 2 < 1] += 300
    image[((j - 0.5) / 0.2) ** 2 + ((i + 0.5) / 0.2) ** 2 < 1] += 600
    return image.astype(np.float32)


def add_volume(scene, array, spacing=(0.7, 0.9, 3.0), directions=None, origin=(12.0, -30.0, 45.0), name="input"):
    """A scalar (or, for (k, j, i, c) arrays, vector) volume node with the given IJK-to-RAS geometry."""
    vector = array.ndim == 4
    node = scene.AddNewNodeByClass("vtkMRMLVectorVolumeNode" if vector else "vtkMRMLScalarVolumeNode", name)
    image = vtk.vtkImageData()
    image.SetDimensions(array.shape[2], array.shape[1], array.shape[0])
    flat = array.reshape(-1, array.shape[3]) if vector else array.ravel()
    image.GetPointData().SetScalars(numpy_support.numpy_to_vtk(np.ascontiguousarray(flat), deep=True))
    node.SetAndObserveImageData(image)
    node.SetSpacing(*spacing)
    node.SetOrigin(*origin)
    if directions is not None:
        node.SetIJKToRASDirections(np.asarray(directions).tolist())
    return node


OBLIQUE = rotation((1.0, 2.0, 0.5), 0.4)


def engine_labels(model, volume):
    from cotexnet.infer import segment_volume

    array, geometry = mrml.volumeToArray(volume)
    return segment_volume(model, array, direction=geometry.direction, device="cpu")


def segment_names(segmentation_node):
    segmentation = segmentation_node.GetSegmentation()
    return [segmentation.GetNthSegment(i).GetName() for i in range(segmentation.GetNumberOfSegments())]


def node_ids(scene):
    return {scene.GetNthNode(i).GetID() for i in range(scene.GetNumberOfNodes())}


# ------------------------------------------------------------------------------------------ geometry


def test_volume_geometry_matches_simpleitk_reading_of_the_same_file(scene, tmp_path):
    """volumeToArray's (k, j, i) array and LPS geometry equal what SimpleITK reads from Slicer's own NRRD."""
    import SimpleITK as sitk

    array = phantom()
    volume = add_volume(scene, array, directions=OBLIQUE)
    storage = scene.AddNewNodeByClass("vtkMRMLVolumeArchetypeStorageNode")
    storage.SetFileName(str(tmp_path / "volume.nrrd"))
    assert storage.WriteData(volume)

    image = sitk.ReadImage(str(tmp_path / "volume.nrrd"))
    values, geometry = mrml.volumeToArray(volume)
    np.testing.assert_array_equal(values, sitk.GetArrayFromImage(image))
    np.testing.assert_allclose(geometry.spacing, image.GetSpacing(), atol=1e-6)
    np.testing.assert_allclose(geometry.origin, image.GetOrigin(), atol=1e-6)
    np.testing.assert_allclose(geometry.direction, image.GetDirection(), atol=1e-6)


def test_linear_parent_transform_is_part_of_the_geometry(scene):
    volume = add_volume(scene, phantom(), directions=np.eye(3), origin=(0, 0, 0))
    transform = scene.AddNewNodeByClass("vtkMRMLLinearTransformNode")
    matrix = vtk.vtkMatrix4x4()
    matrix.SetElement(0, 3, 5.0)  # 5 mm to the right (RAS +x)
    transform.SetMatrixTransformToParent(matrix)
    volume.SetAndObserveTransformNodeID(transform.GetID())
    assert mrml.volumeToArray(volume)[1].origin == pytest.approx((-5.0, 0.0, 0.0))  # LPS x = -R


# ------------------------------------------------------------------------------------------ segmentation


def test_segment_oblique_anisotropic_volume(scene, bundle, engine_model):
    array = phantom()
    volume = add_volume(scene, array, directions=OBLIQUE)
    study = slicer.vtkMRMLSubjectHierarchyNode.GetSubjectHierarchyNode(scene)
    studyItem = study.CreateStudyItem(study.GetSceneItemID(), "study")
    study.CreateItem(studyItem, volume)

    segmentation = CoTexNetSegmentLogic(scene).segment(volume, bundle, device="cpu")

    assert segment_names(segmentation) == CLASSES
    for name, color in zip(CLASSES, COLORS):
        segment = segmentation.GetSegmentation().GetSegment(segmentation.GetSegmentation().GetSegmentIdBySegmentName(name))
        assert segment.GetColor() == pytest.approx(color)
    expected = engine_labels(engine_model, volume)
    assert expected.shape == array.shape and len(np.unique(expected)) > 1, "the test needs a non-trivial label map"
    np.testing.assert_array_equal(mrml.segmentationToLabelMap(segmentation, volume, CLASSES), expected)
    assert segmentation.GetNodeReference(slicer.vtkMRMLSegmentationNode.GetReferenceImageGeometryReferenceRole()) is volume
    assert study.GetItemParent(study.GetItemByDataNode(segmentation)) == studyItem


def test_single_slice_rgb_image(scene, bundle, engine_model):
    """A photograph loaded in Slicer is a one-slice vector volume; the engine sees a (y, x, 3) image."""
    from cotexnet.infer import segment_volume

    gray = phantom((1, 30, 36))
    rgb = np.clip(np.stack([gray, gray * 0.8, gray * 0.5], axis=-1) / 4, 0, 255).astype(np.uint8)
    volume = add_volume(scene, rgb, spacing=(0.5, 0.5, 1.0))
    segmentation = CoTexNetSegmentLogic(scene).segment(volume, bundle, device="cpu")
    expected = segment_volume(engine_model, rgb[0], rgb=True, device="cpu")
    np.testing.assert_array_equal(mrml.segmentationToLabelMap(segmentation, volume, CLASSES)[0], expected)


def test_same_named_segments_replaced_others_untouched(scene, bundle, engine_model):
    volume = add_volume(scene, phantom(), directions=OBLIQUE)
    segmentation = scene.AddNewNodeByClass("vtkMRMLSegmentationNode", "existing")
    old = np.zeros(phantom().shape, np.uint8)
    old[1:4, 2:9, 3:12] = 1
    old[4:6, 15:25, 10:20] = 2
    mrml.labelMapToSegmentation(scene, old, volume, ["organ", "kept"], [[1, 1, 0], [0, 0, 1]], segmentation)
    organId = segmentation.GetSegmentation().GetSegmentIdBySegmentName("organ")

    result = CoTexNetSegmentLogic(scene).segment(volume, bundle, device="cpu", segmentationNode=segmentation)

    assert result is segmentation
    assert segment_names(segmentation) == ["organ", "kept", "lesion"]
    assert segmentation.GetSegmentation().GetSegmentIdBySegmentName("organ") == organId  # replaced in place
    assert segmentation.GetSegmentation().GetSegment(organId).GetColor() == pytest.approx(COLORS[0])
    expected = engine_labels(engine_model, volume)
    np.testing.assert_array_equal(mrml.segmentationToLabelMap(segmentation, volume, CLASSES), expected)
    np.testing.assert_array_equal(mrml.segmentationToLabelMap(segmentation, volume, ["kept"]), (old == 2).astype(np.uint8))


def test_label_map_round_trip_missing_segment_and_transformed_segmentation(scene):
    volume = add_volume(scene, phantom(), directions=OBLIQUE)
    labels = np.random.default_rng(1).integers(0, 4, phantom().shape).astype(np.uint8)
    segmentation = scene.AddNewNodeByClass("vtkMRMLSegmentationNode")
    transform = scene.AddNewNodeByClass("vtkMRMLLinearTransformNode")
    matrix = vtk.vtkMatrix4x4()
    matrix.DeepCopy([1, 0, 0, 4.0, 0, 0, -1, 2.0, 0, 1, 0, -3.0, 0, 0, 0, 1])
    transform.SetMatrixTransformToParent(matrix)
    segmentation.SetAndObserveTransformNodeID(transform.GetID())
    mrml.labelMapToSegmentation(scene, labels, volume, ["a", "b", "c"], [[1, 0, 0], [0, 1, 0], [0, 0, 1]], segmentation)

    np.testing.assert_array_equal(mrml.segmentationToLabelMap(segmentation, volume, ["a", "b", "c"]), labels)
    # a missing name keeps its label index empty and never shifts the others
    expected = np.where(labels == 3, 3, 0)
    np.testing.assert_array_equal(mrml.segmentationToLabelMap(segmentation, volume, ["a", "missing", "c"]),
                                  np.where(labels == 1, 1, expected))


def test_label_map_checks_shape_and_labels(scene):
    volume = add_volume(scene, phantom())
    with pytest.raises(ValueError, match="shape"):
        mrml.labelMapToSegmentation(scene, np.zeros((2, 3, 4), np.uint8), volume, ["a"], [[1, 0, 0]])
    with pytest.raises(ValueError, match="label 3"):
        mrml.labelMapToSegmentation(scene, np.full(phantom().shape, 3, np.uint8), volume, ["a"], [[1, 0, 0]])


def test_batches_of_volumes_and_files(scene, bundle, tmp_path):
    import SimpleITK as sitk

    logic = CoTexNetSegmentLogic(scene)
    volumes = [add_volume(scene, phantom(seed=s), name=f"case{s}") for s in range(2)]
    segmentations = logic.segmentVolumes(volumes, bundle, device="cpu", concepts=False)
    assert [s.GetName() for s in segmentations] == ["case0 CoTexNet", "case1 CoTexNet"]

    image = sitk.GetImageFromArray(phantom())
    image.SetSpacing((0.7, 0.9, 3.0))
    sitk.WriteImage(image, str(tmp_path / "case.nii.gz"))
    before = node_ids(scene)
    results = logic.segmentFiles([tmp_path / "case.nii.gz"], bundle, tmp_path / "out", device="cpu")
    assert Path(results[0]["labels"]).is_file() and Path(results[0]["segmentation"]).is_file()
    assert node_ids(scene) == before  # files in, files out: the scene is not touched


# ------------------------------------------------------------------------------------------ concepts


def test_concept_table_columns_values_and_storage(scene, bundle, engine_model, tmp_path):
    from cotexnet.concepts import describe

    volume = add_volume(scene, phantom(), directions=OBLIQUE)
    logic = CoTexNetSegmentLogic(scene)
    segmentation = logic.segment(volume, bundle, device="cpu")
    table = logic.conceptTable(segmentation)

    assert table is segmentation.GetNodeReference(CONCEPTS_REFERENCE_ROLE)
    assert [table.GetColumnName(c) for c in range(table.GetNumberOfColumns())] == [key for key, _ in CONCEPT_COLUMNS]
    assert [table.GetColumnTitle(table.GetColumnName(c)) for c in range(table.GetNumberOfColumns())] == [
        title for _, title in CONCEPT_COLUMNS]
    array, geometry = mrml.volumeToArray(volume)
    records = describe(array, engine_labels(engine_model, volume), CLASSES, spacing=geometry.spacing,
                       direction=geometry.direction)
    assert table.GetNumberOfRows() == len(CLASSES)
    keys = [key for key, _ in CONCEPT_COLUMNS]
    for row, record in enumerate(records):
        for column, key in enumerate(keys):
            if key not in ("sources", "mean_confidence"):
                value = record[key]
                assert table.GetCellText(row, column) == ("" if value is None else str(value))
        assert table.GetCellText(row, keys.index("sources")) == "geometric"
        assert table.GetCellText(row, keys.index("mean_confidence")) == ""  # filled only when confidence is asked

    # saved with the scene: the table has a storage node that writes and reads it back
    storage = table.GetStorageNode()
    assert storage is not None and storage.IsA("vtkMRMLTableStorageNode")
    storage.SetFileName(str(tmp_path / "concepts.tsv"))
    assert storage.WriteData(table)
    reread = scene.AddNewNodeByClass("vtkMRMLTableNode")
    reader = scene.AddNewNodeByClass("vtkMRMLTableStorageNode")
    reader.SetFileName(str(tmp_path / "concepts.tsv"))
    assert reader.ReadData(reread)
    assert reread.GetCellText(1, 0) == "lesion" and reread.GetCellText(0, 6) == table.GetCellText(0, 6)

    # a second run on the same segmentation refreshes the same table instead of adding one
    assert logic.segment(volume, bundle, device="cpu", segmentationNode=segmentation) is segmentation
    assert scene.GetNodesByClass("vtkMRMLTableNode").GetNumberOfItems() == 2  # the concept table + `reread`


def test_selecting_a_concept_row_shows_its_segment(scene, bundle):
    volume = add_volume(scene, phantom(), directions=OBLIQUE)
    sliceNode = scene.AddNewNodeByClass("vtkMRMLSliceNode")
    sliceNode.SetLayoutName("Red")
    logic = CoTexNetSegmentLogic(scene)
    segmentation = logic.segment(volume, bundle, device="cpu")
    organ = segmentation.GetSegmentation().GetSegmentIdBySegmentName("organ")
    segmentation.GetDisplayNode().SetSegmentVisibility(organ, False)

    assert logic.showConceptRow(segmentation, 0) == organ
    assert segmentation.GetDisplayNode().GetSegmentVisibility(organ)
    center = segmentation.GetSegmentCenterRAS(organ)
    if center is not None:  # the random tiny model may leave a class empty
        sliceToRAS = sliceNode.GetSliceToRAS()
        assert [sliceToRAS.GetElement(r, 3) for r in range(3)] == pytest.approx(center, abs=1e-3)
    assert logic.showConceptRow(segmentation, 99) is None


# ------------------------------------------------------------------------------------------ background, cancel, errors


def test_background_job_reports_progress_and_applies_on_poll(scene, bundle):
    volume = add_volume(scene, phantom())
    job = CoTexNetSegmentLogic(scene).startSegmentation(volume, bundle, "cpu", batchSize=2, concepts=False)
    events = []
    deadline = time.monotonic() + 60
    while not job.finished and time.monotonic() < deadline:
        events += job.poll()
        time.sleep(0.02)
    assert job.state == job.DONE, job.error
    progress = [e.value for e in events if e.kind == "progress"]
    assert progress == [(2, 6), (4, 6), (6, 6)]
    assert segment_names(job.result) == CLASSES


def test_cancel_leaves_no_new_nodes(scene, bundle):
    from cotexnet.errors import Cancelled

    volume = add_volume(scene, phantom())
    before = node_ids(scene)
    job = CoTexNetSegmentLogic(scene).segment(volume, bundle, device="cpu", waitForCompletion=False)
    job.cancel()
    with pytest.raises(Cancelled):
        job.wait(60)
    assert job.state == job.CANCELLED
    assert node_ids(scene) == before


def test_wrong_or_corrupt_bundle_leaves_the_scene_as_it_was(scene, bundle, tmp_path):
    from cotexnet.errors import BundleError

    volume = add_volume(scene, phantom())
    before = node_ids(scene)
    logic = CoTexNetSegmentLogic(scene)
    with pytest.raises(BundleError, match="config.json is missing"):
        logic.segment(volume, tmp_path, device="cpu")
    with pytest.raises(BundleError, match="no model chosen"):
        logic.segment(volume, "", device="cpu")

    corrupt = tmp_path / "corrupt"
    shutil.copytree(bundle, corrupt)
    weights = corrupt / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    with pytest.raises(BundleError, match="model.safetensors"):
        logic.segment(volume, corrupt, device="cpu")  # fails on the worker thread, reported here
    assert node_ids(scene) == before


def test_volume_removed_while_running_fails_cleanly(scene, bundle):
    volume = add_volume(scene, phantom())
    job = CoTexNetSegmentLogic(scene).segment(volume, bundle, device="cpu", waitForCompletion=False)
    scene.RemoveNode(volume)
    before = node_ids(scene)
    with pytest.raises(RuntimeError, match="removed"):
        job.wait(60)
    assert node_ids(scene) == before


def test_failure_while_writing_removes_created_nodes(scene, bundle, monkeypatch):
    from CoTexNetSegmentLib import logic as logic_module

    def broken(table, records):
        raise RuntimeError("disk full")

    monkeypatch.setattr(logic_module, "writeConceptTable", broken)
    volume = add_volume(scene, phantom())
    before = node_ids(scene)
    with pytest.raises(RuntimeError, match="disk full"):
        CoTexNetSegmentLogic(scene).segment(volume, bundle, device="cpu")
    assert node_ids(scene) == before


def test_job_failures_never_run_finish():
    finished = []
    failing = jobs.Job(lambda reporter: 1 / 0, finished.append).start()
    with pytest.raises(ZeroDivisionError):
        failing.wait(10)
    assert failing.state == failing.FAILED and not finished

    def bad_finish(value):
        raise ValueError("cannot apply")

    job = jobs.Job(lambda reporter: 42, bad_finish).start()
    with pytest.raises(ValueError, match="cannot apply"):
        job.wait(10)


def test_backbone_download_cancel_stops_the_child_process(tmp_path, monkeypatch):
    """Cancel terminates the downloading process at once (a real transfer cannot be interrupted in-process)."""
    from cotexnet.errors import Cancelled

    monkeypatch.setattr(backbone, "_DOWNLOAD_SCRIPT", "import time; time.sleep(60)")
    monkeypatch.setattr(backbone, "_expectedBytes", lambda repo: 1000)
    started = time.monotonic()
    job = backbone.startBackboneDownload("org/model", str(tmp_path))
    time.sleep(0.3)
    job.cancel()
    with pytest.raises(Cancelled):
        job.wait(20)
    assert time.monotonic() - started < 10
    assert backbone.cachedBackbone("org/model", str(tmp_path)) is None


# ------------------------------------------------------------------------------------------ dependencies


def versions(mapping):
    import importlib.metadata

    def version_of(name):
        if name not in mapping:
            raise importlib.metadata.PackageNotFoundError(name)
        return mapping[name]

    return version_of


def test_requirements_never_downgrade_slicer_packages():
    report = dependencies.checkRequirements(
        ["numpy>=1.23", "SimpleITK>=2.2", "transformers>=4.40,<6", "tqdm>=4.60", "monai>=1.3"],
        versions({"torch": "2.3.0", "numpy": "1.20.0", "SimpleITK": "2.4.0", "transformers": "6.1.0", "tqdm": "4.66.0"}),
        bundled=["numpy", "SimpleITK"],
    )
    assert report.toInstall == ["transformers>=4.40,<6", "monai>=1.3"]  # too new (not Slicer's) and missing
    assert report.conflicts == ["numpy 1.20.0 (CoTexNet expects >=1.23)"]  # Slicer's own: reported, untouched
    assert not report.torchMissing and report.needsInstall
    assert dependencies.checkRequirements([], versions({"torch": "2.0.1"})).torchMissing


def test_install_is_one_pip_run_constrained_to_keep_slicer_packages(monkeypatch):
    calls = []

    def pip_install(args):
        constraints = Path(args[args.index("-c") + 1]).read_text(encoding="utf-8")
        calls.append((args[2:], constraints))

    report = dependencies.DependencyReport(toInstall=["monai>=1.3", "slicerio>=1.1"])
    dependencies.installMissing(report, pip_install)
    assert len(calls) == 1 and calls[0][0] == ["monai>=1.3", "slicerio>=1.1"]
    assert f"numpy=={np.__version__}" in calls[0][1].splitlines()


#: The torch each monai release asks for: ``Requires-Dist: torch`` in its wheel's METADATA on PyPI.
MONAI_RELEASES = {"1.3.2": ">=1.9", "1.4.0": ">=1.9", "1.5.0": ">=2.4.1,<2.7.0", "1.5.1": ">=2.4.1",
                  "1.5.2": ">=2.4.1", "1.6.1": ">=2.8.0"}


def test_pip_never_replaces_the_pytorch_extensions_torch():
    """monai 1.6 needs torch>=2.8, so ``monai>=1.3`` beside the PyTorch extension's torch 2.4 made pip upgrade
    torch from the package index (a CPU build on Windows) and leave torchvision mismatched. SlicerTotalSegmentator
    never lets pip touch torch (TotalSegmentator/TotalSegmentator.py ``setupPythonRequirements``:
    ``packagesToSkip = ['SimpleITK', 'torch', 'requests']``, lassoan/SlicerTotalSegmentator at 024bdb5). With a
    fake installed torch 2.4.0: torch is never requested, the constraints pin torch and torchvision, and
    every monai release they allow is one that torch 2.4.0 satisfies."""
    import importlib.metadata

    from packaging.requirements import Requirement
    from packaging.specifiers import SpecifierSet
    from packaging.version import Version

    installed = {"torch": "2.4.0", "torchvision": "0.19.0", "numpy": "1.26.4"}
    calls = []

    def pip_install(args):
        constraints = Path(args[args.index("-c") + 1]).read_text(encoding="utf-8").splitlines()
        calls.append(([a for a in args[2:]], constraints))

    report = dependencies.checkRequirements(versionOf=versions(installed))
    assert "monai>=1.3" in report.toInstall
    dependencies.installMissing(report, pip_install, versions(installed))

    [(requested, constraints)] = calls
    assert not {Requirement(text).name for text in requested} & {"torch", "torchvision"}
    assert {"torch==2.4.0", "torchvision==0.19.0", "numpy==1.26.4"} <= set(constraints)
    [monai] = [Requirement(c).specifier for c in constraints if c.startswith("monai")]
    allowed = [release for release in MONAI_RELEASES if monai.contains(release)]
    assert allowed == ["1.3.2", "1.4.0"]  # 1.5 asks for torch>=2.4.1, 1.6 for torch>=2.8
    # The table above agrees with the monai installed here (real metadata).
    [torch] = [r for r in map(Requirement, importlib.metadata.requires("monai")) if r.name == "torch" and not r.marker]
    assert MONAI_RELEASES.get(importlib.metadata.version("monai"), str(torch.specifier)) == str(torch.specifier)
    # For any torch the engine accepts, the range is satisfiable and holds no release that needs another torch.
    for torchVersion in ("2.1.2", "2.4.0", "2.4.1", "2.6.0", "2.7.1", "2.8.0", "2.13.0+cpu"):
        monai = SpecifierSet(dependencies.monaiRange(Version(torchVersion)))
        allowed = [release for release in MONAI_RELEASES if monai.contains(release)]
        assert allowed, torchVersion
        assert all(SpecifierSet(MONAI_RELEASES[r]).contains(Version(torchVersion)) for r in allowed), (torchVersion, allowed)
        left_out = [r for r in MONAI_RELEASES if r not in allowed]
        assert not any(SpecifierSet(MONAI_RELEASES[r]).contains(Version(torchVersion)) for r in left_out), torchVersion


def test_ensure_dependencies_asks_once_and_respects_no(monkeypatch):
    missing = dependencies.DependencyReport(toInstall=["monai>=1.3"], torchMissing=True)
    monkeypatch.setattr(dependencies, "checkRequirements", lambda: missing)
    asked, installed = [], []
    status = dependencies.ensureDependencies(lambda text: asked.append(text) or False, installed.append, installed.append)
    assert status == dependencies.DECLINED and len(asked) == 1 and not installed
    assert "PyTorch" in asked[0] and "monai>=1.3" in asked[0]

    monkeypatch.setattr(dependencies, "checkRequirements", lambda: dependencies.DependencyReport())
    assert dependencies.ensureDependencies(lambda text: pytest.fail("asked"), None, None) == dependencies.READY


def test_requirements_match_the_engine_package():
    """The Slicer-side ranges are the engine's pyproject dependencies (torch comes from the PyTorch extension)."""
    tomllib = pytest.importorskip("tomllib")
    project = tomllib.loads((REPO / "pyproject.toml").read_text(encoding="utf-8"))["project"]
    engine = [r for r in project["dependencies"] if not r.startswith("torch")]
    assert list(dependencies.REQUIREMENTS) == engine
    assert f"torch{dependencies.TORCH_REQUIREMENT}" in project["dependencies"]


def test_gui_choices_match_the_engine():
    from cotexnet.concepts import BACKENDS
    from cotexnet.config import SLICE_AXES

    from CoTexNetSegmentLib import logic

    assert logic.SLICE_AXES == SLICE_AXES and logic.CONCEPT_BACKENDS == BACKENDS


def test_both_modules_take_choices_and_settings_from_one_place():
    """Every Choice(...) of both modules' parameter nodes names a constant (from cotexnet.config through
    CoTexNetSegmentLib), never a literal list; the recent-models key is spelled once, in CoTexNetSegmentLib."""
    import cotexnet.config

    from CoTexNetSegmentLib import settings

    sources = {path: path.read_text(encoding="utf-8") for path in (
        MODULE_DIR / "CoTexNetSegment.py", REPO / "CoTexNetTrain" / "CoTexNetTrain.py",
        MODULE_DIR / "SegmentEditorCoTexNet" / "SegmentEditorEffect.py")}
    choices = 0
    for path, source in sources.items():
        for field in ast.walk(ast.parse(source)):
            if not (isinstance(field, ast.AnnAssign) and "Choice(" in ast.unparse(field.annotation)):
                continue
            choices += 1
            call = next(n for n in ast.walk(field.annotation) if isinstance(n, ast.Call))
            names = {n.id for n in ast.walk(call.args[0]) if isinstance(n, ast.Name)}
            assert names and not any(isinstance(n, ast.Constant) and isinstance(n.value, str)
                                     for n in ast.walk(call.args[0])), f"{path.name}: {ast.unparse(field)}"
            if field.target.id in ("sliceAxis", "conceptBackend", "device", "precision", "kdMode", "klForm"):
                assert names & {"SLICE_AXES", "CONCEPT_BACKENDS", "DEVICES", "PRECISIONS", "KD_MODES", "KL_FORMS"}, (
                    f"{path.name}: {ast.unparse(field)} is not one of cotexnet.config's lists")
    assert choices >= 5
    for name in ("SLICE_AXES", "CONCEPT_BACKENDS", "DEVICES"):
        assert getattr(__import__("CoTexNetSegmentLib.logic").logic, name) is getattr(cotexnet.config, name)
    every_file = [*sources.values(), *(p.read_text(encoding="utf-8") for p in REPO.glob("CoTexNet*/**/*.py")),
                  *(p.read_text(encoding="utf-8") for p in REPO.glob("CoTexNet*/Resources/UI/*.ui"))]
    spelled = [text for text in every_file
               if f'"{settings.RECENT_MODELS_SETTING}"' in text or f">{settings.RECENT_MODELS_SETTING}<" in text]
    assert len(spelled) == 1 and "RECENT_MODELS_SETTING = " in spelled[0]  # CoTexNetSegmentLib/settings.py


def test_gpu_memory_warning():
    from CoTexNetSegmentLib.logic import DeviceInfo

    assert DeviceInfo(cuda=False, name="CPU").memoryWarning(16) is None
    assert DeviceInfo(cuda=True, name="GPU", totalGB=24, freeGB=20).memoryWarning(16) is None
    assert "batch size" in DeviceInfo(cuda=True, name="GPU", totalGB=4, freeGB=1.2).memoryWarning(16)


# ------------------------------------------------------------------------------------------ GUI, statically


def ui_widgets(path):
    root = ElementTree.parse(path).getroot()
    names = {w.get("name"): w.get("class") for w in root.iter("widget")}
    bound = {}
    for widget in root.iter("widget"):
        for prop in widget.findall("property"):
            if prop.get("name") == "SlicerParameterName":
                bound[widget.get("name")] = prop.find("string").text
    return names, bound


def parameter_fields(source: str, class_name: str) -> dict[str, str]:
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.ClassDef) and node.name == class_name:
            return {s.target.id: ast.unparse(s.annotation) for s in node.body if isinstance(s, ast.AnnAssign)}
    raise AssertionError(f"{class_name} not found")


def test_widget_names_exist_in_ui_and_parameter_names_match_fields():
    source = (MODULE_DIR / "CoTexNetSegment.py").read_text(encoding="utf-8")
    names, bound = ui_widgets(MODULE_DIR / "Resources" / "UI" / "CoTexNetSegment.ui")
    used = set(__import__("re").findall(r"self\.ui\.(\w+)", source))
    assert used and used <= set(names), f"not in the .ui: {sorted(used - set(names))}"
    fields = parameter_fields(source, "CoTexNetSegmentParameterNode")
    assert set(bound.values()) == set(fields), "every field bound once, every binding a field"
    # the parameter-node wrapper needs these widget classes for these types
    expected_class = {"vtkMRMLScalarVolumeNode": "qMRMLNodeComboBox", "vtkMRMLSegmentationNode": "qMRMLNodeComboBox",
                      "pathlib.Path": "ctkPathLineEdit", "Annotated[int": "QSpinBox", "Annotated[str": "QComboBox",
                      "bool": "QCheckBox"}  # QCheckBoxToBoolConnector in Slicer's parameterNodeWrapper/guiConnectors.py
    for widget, field in bound.items():
        annotation = fields[field]
        wanted = next(cls for prefix, cls in expected_class.items() if annotation.startswith(prefix))
        assert names[widget] == wanted, f"{widget} ({names[widget]}) cannot show {field}: {annotation}"


def test_logic_package_imports_no_qt():
    for path in sorted((MODULE_DIR / "CoTexNetSegmentLib").glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            modules = [a.name for a in node.names] if isinstance(node, ast.Import) else (
                [node.module or ""] if isinstance(node, ast.ImportFrom) else [])
            for module in modules:
                root = module.split(".")[0]
                assert root not in ("qt", "ctk", "PythonQt") and "ScriptedLoadableModule" not in module, (
                    f"{path.name} imports {module}")
