"""CoTexNetSegmentLogic: segment volumes with a trained CoTexNet bundle, from the GUI or the console.

Works on any MRML scene (the application's or a ``slicer-core`` one in tests) and imports no Qt.
Reading the input and writing the result touch MRML on the calling thread; the engine runs in between,
in the persistent worker process for the GUI (see :mod:`.worker`) or on a thread for console calls that
wait (see :mod:`.jobs`), so a cancelled or failed run leaves the scene as it was. This module never
imports torch: device facts come from the worker.
"""

from __future__ import annotations

import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional, Sequence

import numpy as np

import slicer

from cotexnet.config import CONCEPT_BACKENDS, DEVICES, SLICE_AXES, validate_planes  # plain Python: no torch needed

from . import mrml
from .editing import SegmentEditorTarget, applyPerSegment
from .jobs import BackgroundJob, Job, Reporter
from .settings import isChosenPath
from .worker import SegmentationWorker, WorkerJob, sharedWorker

MODULE_NAME = "CoTexNetSegment"
#: Node reference from a segmentation node to its concept table.
CONCEPTS_REFERENCE_ROLE = "CoTexNetConcepts"
#: Concept-table columns: keys of the engine's concept records, and the titles Slicer shows.
CONCEPT_COLUMNS = (
    ("class", "Class"),
    ("number", "Number"),
    ("shape", "Shape"),
    ("size", "Size"),
    ("color", "Color"),
    ("location", "Location"),
    ("prompt", "Prompt"),
    ("sources", "Source"),
    ("mean_confidence", "Mean confidence"),
)
#: Node reference from a segmentation node to its confidence volume (top class probability per voxel).
CONFIDENCE_REFERENCE_ROLE = "CoTexNetConfidence"
#: Colour table of the confidence overlay (a Slicer built-in: blue = unsure, red = sure) and its opacity.
CONFIDENCE_COLOR_NODE_ID = "vtkMRMLColorTableNodeFileColdToHotRainbow.txt"
CONFIDENCE_OPACITY = 0.4
#: Node reference (and empty parameter) of the module's result, as ``parameterNodeWrapper`` stores a node
#: field (Slicer's Base/Python/slicer/parameterNodeWrapper/serializers.py, ``NodeSerializer.write``).
OUTPUT_SEGMENTATION_PARAMETER = "outputSegmentation"
#: Rough GPU memory in GB that inference needs at 352 px (ViT-B/16 weights, CUDA context and
#: workspace) plus what each slice of a batch adds (activations, logits in 16-bit). An estimate for
#: the warning in the GUI, not a measurement.
GPU_BASE_GB, GPU_PER_SLICE_GB = 1.5, 0.05


@dataclass
class EngineResult:
    """What the worker hands to the main thread: a label map in the volume's (k, j, i) grid, and its meaning."""

    labels: np.ndarray
    classes: list
    colors: list
    concepts: Optional[list]
    confidence: Optional[np.ndarray] = None


@dataclass
class DeviceInfo:
    """What the device chooser shows: whether a GPU is usable and how much memory it has free."""

    cuda: bool
    name: str
    totalGB: float = 0.0
    freeGB: float = 0.0

    def describe(self) -> str:
        if not self.cuda:
            return "No CUDA GPU detected: CoTexNet runs on the CPU."
        return f"{self.name}: {self.freeGB:.1f} of {self.totalGB:.1f} GB free"

    def memoryWarning(self, batchSize: int, imageSize: int = 352) -> Optional[str]:
        """A warning when the GPU's free memory looks too small for this batch size, else None."""
        if not self.cuda:
            return None
        needed = GPU_BASE_GB + GPU_PER_SLICE_GB * batchSize * (imageSize / 352) ** 2
        if self.freeGB >= needed:
            return None
        return (f"Only {self.freeGB:.1f} GB of GPU memory is free; about {needed:.1f} GB is needed at batch size "
                f"{batchSize}. Lower the batch size, close other GPU programs, or use the CPU.")


class CoTexNetSegmentLogic:
    """Runs CoTexNet on volume nodes and writes segmentations and concept tables into a scene.

    Console example::

        from CoTexNetSegmentLib import CoTexNetSegmentLogic
        segmentation = CoTexNetSegmentLogic(slicer.mrmlScene).segment(volumeNode, "/path/to/model")

    ``worker`` is the worker process that GUI runs use (default: the application's shared one, started
    on first use).
    """

    def __init__(self, scene=None, segmentEditor: Optional[SegmentEditorTarget] = None,
                 worker: Optional[SegmentationWorker] = None):
        """``segmentEditor`` (the Segment Editor effect passes its editor) writes each class through the editor's
        masking, on the editor's voxel grid, instead of replacing segments directly (:mod:`.editing`)."""
        self.scene = scene if scene is not None else getattr(slicer, "mrmlScene", None)
        if self.scene is None:
            raise ValueError("CoTexNetSegmentLogic needs a MRML scene (none given and slicer.mrmlScene is unset)")
        self.segmentEditor = segmentEditor
        self._worker = worker
        self._models = None  # this process's ModelCache, for console runs: created on first use

    @property
    def worker(self) -> SegmentationWorker:
        if self._worker is None:
            self._worker = sharedWorker()
        return self._worker

    # ---------------------------------------------------------------- models

    @staticmethod
    def bundleConfig(modelPath):
        """The bundle's config (classes, colors, image size) without loading weights; BundleError if unusable."""
        from cotexnet.bundle import read_bundle_config

        return read_bundle_config(_checkedModelPath(modelPath))

    @staticmethod
    def modelDescription(modelPath) -> dict:
        """``{"title", "classes", "config"}`` of a model for the model field: its card's title, its classes and its
        config, read with no network access, since the field updates on the GUI thread. A Hugging Face Hub
        repository id (``owner/name``) is read from the Hugging Face cache; one never downloaded gives its id as
        the title and no classes or config (the worker downloads it on the first run). BundleError if unusable."""
        from cotexnet.bundle import card_summary
        from cotexnet.hub import cached_snapshot, parse_repo_id

        path = _checkedModelPath(modelPath)
        repo = parse_repo_id(path)
        if repo is not None:
            path = cached_snapshot(*repo)
            if path is None:
                return {"title": f"{repo[0]}: a Hugging Face Hub model, downloaded on the first run", "classes": None,
                        "config": None}
        return card_summary(path)

    def loadModel(self, modelPath, device: str = "auto"):
        """Loads a bundle in this process once per (folder, device, weights file version); later calls reuse it."""
        if self._models is None:
            from cotexnet.worker import ModelCache

            self._models = ModelCache()
        return self._models.get(_checkedModelPath(modelPath), device)

    def deviceInfo(self, timeout: float = 120.0) -> DeviceInfo:
        """Whether a GPU is usable and its free memory, as the worker process sees it.

        Asked of the worker (started if needed) so that this process never imports torch or touches CUDA;
        raises ImportError when torch is not installed.
        """
        return _deviceInfo(self.worker.request("device_info", timeout))

    def startDeviceInfo(self) -> WorkerJob:
        """:meth:`deviceInfo` without waiting (the first call starts the worker, which takes seconds):
        poll the job like a segmentation; ``job.result`` is then the :class:`DeviceInfo`."""
        return WorkerJob(self.worker, "device_info", {}, _deviceInfo, lambda info: info, name="CoTexNet device check")

    # ---------------------------------------------------------------- segmentation

    def startSegmentation(
        self,
        volumeNode,
        modelPath,
        device: str = "auto",
        *,
        segmentationNode=None,
        batchSize: int = 16,
        sliceAxis: Optional[str] = None,
        planes: Optional[Sequence[str]] = None,
        tta: bool = False,
        postprocess: bool = True,
        confidence: bool = False,
        concepts: bool = True,
        conceptBackend: str = "geometric",
        conceptBackendOptions: Optional[dict] = None,
        beforeApply: Optional[Callable[[], None]] = None,
        inProcess: bool = False,
    ) -> BackgroundJob:
        """Starts segmenting ``volumeNode`` in the background; returns the running job.

        Call ``job.poll()`` from this thread (the widget does, on a timer) to receive progress and, at the
        end, get the result written to the scene: ``job.result`` is then the segmentation node. Segments
        named like the bundle's classes are replaced in ``segmentationNode`` (a new node next to the volume
        if None); other segments are untouched. ``beforeApply`` runs just before the scene is changed
        (the Segment Editor effect saves its undo state there). ``sliceAxis`` None uses the bundle's axis.
        ``conceptBackend`` and ``conceptBackendOptions`` choose how the concept table is computed
        (``cotexnet.concepts.describe``); ``concepts=False`` skips the table. ``planes`` (views whose class
        probabilities are averaged; None: the bundle's recommendation), ``tta`` (flips laterality allows) and
        ``postprocess`` (the bundle's 3D post-processing) are ``cotexnet.infer.predict_volume``'s.
        ``confidence`` also writes a confidence volume (top class probability), shown as a colour overlay
        (:meth:`showConfidence`), and fills the concept table's mean-confidence column.

        The engine runs in the worker process (the model stays loaded for the next run; ``job.cancel()``
        ends the worker at once), or with ``inProcess=True`` on a thread of this process, which suits
        console scripts that wait for the result.
        """
        if sliceAxis is not None and sliceAxis not in SLICE_AXES:
            raise ValueError(f"sliceAxis: expected one of {', '.join(SLICE_AXES)} or None, got {sliceAxis!r}")
        if planes is not None:
            if sliceAxis is not None:
                raise ValueError("give either sliceAxis or planes, not both")
            planes = validate_planes(planes)
        if batchSize < 1:
            raise ValueError(f"batchSize: expected a positive number, got {batchSize}")
        if str(device).partition(":")[0] not in DEVICES:
            raise ValueError(f"device: expected one of {', '.join(DEVICES)} or cuda:N, got {device!r}")
        if concepts and conceptBackend not in CONCEPT_BACKENDS:
            raise ValueError(f"conceptBackend: expected one of {', '.join(CONCEPT_BACKENDS)}, got {conceptBackend!r}")
        config = self.bundleConfig(modelPath)  # fail fast, before any work starts, on a wrong folder
        image, geometry = mrml.volumeToArray(volumeNode)
        volumeId = volumeNode.GetID()
        segmentationId = segmentationNode.GetID() if segmentationNode is not None else None
        name = f"CoTexNet {volumeNode.GetName()}"
        # Keywords of cotexnet.worker.segment_array, which both paths run.
        options = dict(axis=sliceAxis, planes=planes, tta=tta, postprocess=postprocess, confidence=confidence,
                       batch_size=batchSize, device=device, concepts=concepts, concept_backend=conceptBackend,
                       concept_options=conceptBackendOptions)

        def engineResult(labels: np.ndarray, records: Optional[list], certainty: Optional[np.ndarray]) -> EngineResult:
            return EngineResult(labels, list(config.classes), [list(c) for c in config.colors], records, certainty)

        def finish(result: EngineResult):
            return self._apply(result, volumeId, segmentationId, beforeApply)

        if not inProcess:
            return self._startInWorker(image, geometry, modelPath, options, engineResult, finish, name)

        def work(reporter: Reporter) -> EngineResult:
            from cotexnet.worker import segment_array

            model = self.loadModel(modelPath, device)
            reporter.log(f"Loaded model {model.name_or_path}: {', '.join(config.classes)}")
            labels, records, certainty = segment_array(model, image, geometry.spacing, geometry.direction,
                                                       progress=reporter.progress, cancel=reporter.cancelEvent,
                                                       log=reporter.log, **options)
            return engineResult(labels, records, certainty)

        return Job(work, finish, name=name).start()

    def _startInWorker(self, image, geometry, modelPath, options: dict, engineResult, finish, name) -> WorkerJob:
        """Hands the volume to the worker through a temporary folder of .npy files, removed when the job ends."""
        folder = tempfile.TemporaryDirectory(prefix="cotexnet-")
        inputPath, outputPath = os.path.join(folder.name, "input.npy"), os.path.join(folder.name, "labels.npy")
        try:
            np.save(inputPath, image)
            request = dict(model=_workerModel(modelPath), input=inputPath, output=outputPath,
                           spacing=list(geometry.spacing), direction=list(geometry.direction), **options)

            def decode(reply: dict) -> EngineResult:
                certainty = np.load(reply["confidence"], allow_pickle=False) if reply.get("confidence") else None
                return engineResult(np.load(reply["output"], allow_pickle=False), reply["concepts"], certainty)

            return WorkerJob(self.worker, "segment", request, decode, finish, name=name, cleanup=folder.cleanup)
        except BaseException:
            folder.cleanup()
            raise

    def segment(self, volumeNode, modelPath, device: str = "auto", *, waitForCompletion: bool = True, **options):
        """Segments ``volumeNode``; returns the segmentation node (or the running job when not waiting).

        ``options`` are those of :meth:`startSegmentation`; ``inProcess`` defaults to ``waitForCompletion``
        (a script that waits runs the engine here; a GUI that polls uses the worker). Raises the engine's
        errors (``BundleError`` for a wrong or corrupt bundle) with the scene unchanged.
        """
        options.setdefault("inProcess", waitForCompletion)
        job = self.startSegmentation(volumeNode, modelPath, device, **options)
        return job.wait() if waitForCompletion else job

    def segmentVolumes(self, volumeNodes: Sequence, modelPath, device: str = "auto", **options) -> list:
        """Segments each volume in turn with one loaded model; returns their segmentation nodes."""
        return [self.segment(volumeNode, modelPath, device, **options) for volumeNode in volumeNodes]

    def segmentFiles(self, paths: Sequence, modelPath, outDir, device: str = "auto", report: bool = False, *,
                     dicomSeg: bool = False,
                     **options) -> list[dict]:
        """Segments image files without loading them into the scene; returns one result per input, in order.

        A file that fails does not stop the others, as with ``cotexnet segment``: its result is
        ``{"input", "error"}``, the others say what was written. ``dicomSeg`` also writes a DICOM
        Segmentation for each DICOM series (``cotexnet segment --dicom-seg``). ``options`` go to
        ``cotexnet.infer.segment_files`` (e.g. ``batch_size``, ``seg_nrrd``, ``overwrite``). With ``report``
        the batch runs as ``cotexnet segment --inputs`` does (``cotexnet.cohort``; ``paths`` may name
        manifests): studies done by an earlier run are skipped, ``outDir/report.csv`` and ``report.json`` are
        written, and the rows of that report are returned (``status``, ``error``, ``outputs``, ``volume_ml``...).
        """
        model = self.loadModel(modelPath, device)
        os.makedirs(outDir, exist_ok=True)
        if report:
            from cotexnet.cohort import segment_cohort

            return segment_cohort(model, modelPath, paths, outDir, device=device, show_progress=False,
                                  dicom_seg=dicomSeg, **options)["studies"]
        from cotexnet.infer import segment_files

        return segment_files(model, paths, outDir, device=device, show_progress=False, dicom_seg=dicomSeg, **options)

    def _companion(self, segmentationNode, role: str, className: str, suffix: str, volumeNode, created: list):
        """The node ``segmentationNode`` references under ``role`` (its concept table, its confidence volume), made
        next to ``volumeNode`` and added to ``created`` the first time."""
        node = segmentationNode.GetNodeReference(role)
        if node is None:
            node = self.scene.AddNewNodeByClass(className,
                                                self.scene.GenerateUniqueName(f"{segmentationNode.GetName()} {suffix}"))
            created.append(node)
            node.AddDefaultStorageNode()  # saved with the scene
            segmentationNode.SetNodeReferenceID(role, node.GetID())
            mrml.placeNextTo(node, volumeNode)
        return node

    def _apply(self, result: EngineResult, volumeId: str, segmentationId: Optional[str], beforeApply) -> object:
        """Writes a finished result into the scene; on failure removes the nodes it created."""
        volumeNode = self.scene.GetNodeByID(volumeId)
        segmentationNode = self.scene.GetNodeByID(segmentationId) if segmentationId else None
        if volumeNode is None or (segmentationId and segmentationNode is None):
            raise RuntimeError("the input volume or the output segmentation was removed while CoTexNet was running")
        if beforeApply is not None:
            beforeApply()
        created = []
        try:
            if self.segmentEditor is not None and segmentationNode is not None:
                applyPerSegment(result.labels, volumeNode, result.classes, result.colors, segmentationNode,
                                self.segmentEditor)
            else:
                if segmentationNode is not None:
                    # Each run's result takes its own input's grid (as TotalSegmentator does on every run);
                    # the grid of an earlier input would resample this one.
                    segmentationNode.SetReferenceImageGeometryParameterFromVolumeNode(volumeNode)
                segmentationNode = mrml.labelMapToSegmentation(
                    self.scene, result.labels, volumeNode, result.classes, result.colors, segmentationNode
                )
            if segmentationId is None:
                created.append(segmentationNode)
            if result.concepts is not None:
                table = self._companion(segmentationNode, CONCEPTS_REFERENCE_ROLE, "vtkMRMLTableNode", "concepts",
                                        volumeNode, created)
                writeConceptTable(table, result.concepts)
            if result.confidence is not None:
                confidenceNode = self._companion(segmentationNode, CONFIDENCE_REFERENCE_ROLE, "vtkMRMLScalarVolumeNode",
                                                 "confidence", volumeNode, created)
                mrml.arrayToVolume(result.confidence, volumeNode, confidenceNode)
                _showAsColourMap(self.scene, confidenceNode)
        except Exception:
            for node in created:
                _removeWithCompanions(self.scene, node)
            raise
        return segmentationNode

    def setOutputSegmentation(self, segmentationNode) -> None:
        """Records a result as the module's output in the scene's parameter node, which the GUI shows when
        the module is (re-)entered: a run that ends while another module is shown still lands."""
        parameterNode = self.getParameterNode()
        parameterNode.SetParameter(OUTPUT_SEGMENTATION_PARAMETER, "")
        parameterNode.SetNodeReferenceID(OUTPUT_SEGMENTATION_PARAMETER,
                                         segmentationNode.GetID() if segmentationNode is not None else None)

    # ---------------------------------------------------------------- confidence

    @staticmethod
    def confidenceVolume(segmentationNode):
        """The confidence volume written for a segmentation (``confidence=True``), or None."""
        return segmentationNode.GetNodeReference(CONFIDENCE_REFERENCE_ROLE)

    def showConfidence(self, segmentationNode, show: bool = True) -> bool:
        """Shows a segmentation's confidence volume as the colour foreground of every slice view (or hides it).

        Returns False when the segmentation has no confidence volume.
        """
        confidenceNode = self.confidenceVolume(segmentationNode)
        if confidenceNode is None:
            return False
        for composite in self.scene.GetNodesByClass("vtkMRMLSliceCompositeNode"):
            if show:
                composite.SetForegroundVolumeID(confidenceNode.GetID())
                composite.SetForegroundOpacity(CONFIDENCE_OPACITY)
            elif composite.GetForegroundVolumeID() == confidenceNode.GetID():
                composite.SetForegroundVolumeID(None)
        return True

    # ---------------------------------------------------------------- concepts

    @staticmethod
    def conceptTable(segmentationNode):
        """The concept table written for a segmentation, or None."""
        return segmentationNode.GetNodeReference(CONCEPTS_REFERENCE_ROLE)

    def showConceptRow(self, segmentationNode, row: int) -> Optional[str]:
        """Shows the segment of a concept-table row: makes it visible and centres the slice views on it.

        Returns the segment ID, or None when the row's class has no segment (any more).
        """
        table = self.conceptTable(segmentationNode)
        if table is None or not 0 <= row < table.GetNumberOfRows():
            return None
        segmentId = segmentationNode.GetSegmentation().GetSegmentIdBySegmentName(table.GetCellText(row, 0))
        if not segmentId:
            return None
        displayNode = segmentationNode.GetDisplayNode()
        if displayNode is not None:
            displayNode.SetVisibility(True)
            displayNode.SetSegmentVisibility(segmentId, True)
        center = segmentationNode.GetSegmentCenterRAS(segmentId)
        if center is not None:
            slicer.vtkMRMLSliceNode.JumpAllSlices(self.scene, *center, slicer.vtkMRMLSliceNode.CenteredJumpSlice)
        return segmentId

    # ---------------------------------------------------------------- parameters

    def getParameterNode(self):
        """The module's singleton parameter node in this scene (created on first use)."""
        node = self.scene.GetSingletonNode(MODULE_NAME, "vtkMRMLScriptedModuleNode")
        if node is None:
            node = slicer.vtkMRMLScriptedModuleNode()
            node.SetSingletonTag(MODULE_NAME)
            node.SetModuleName(MODULE_NAME)
            node.SetName(self.scene.GenerateUniqueName(MODULE_NAME))
            node = self.scene.AddNode(node)
        return node


def writeConceptTable(table, records: Sequence[dict]) -> None:
    """Fills a table node with one row per class (records of ``cotexnet.concepts.describe``)."""
    wasModifying = table.StartModify()
    try:
        table.RemoveAllColumns()
        for key, title in CONCEPT_COLUMNS:
            column = table.AddColumn()
            column.SetName(key)
            table.SetColumnTitle(key, title)
        table.SetUseColumnTitleAsColumnHeader(True)
        for record in records:
            row = table.AddEmptyRow()
            for index, (key, _) in enumerate(CONCEPT_COLUMNS):
                value = record.get(key, "")
                if isinstance(value, dict):  # sources: {field: backend}; the backends are what matters
                    value = ", ".join(dict.fromkeys(str(v) for v in value.values()))
                table.SetCellText(row, index, "" if value is None else str(value))
    finally:
        table.EndModify(wasModifying)


def _removeWithCompanions(scene, node) -> None:
    """Removes a node with its display and storage nodes (the scene does not remove those by itself)."""
    displayNodes = [node.GetNthDisplayNode(i) for i in range(node.GetNumberOfDisplayNodes())] if node.IsA(
        "vtkMRMLDisplayableNode") else []
    for companion in [*displayNodes, node.GetStorageNode(), node]:
        if companion is not None:
            scene.RemoveNode(companion)


def _showAsColourMap(scene, volumeNode) -> None:
    """Display a 0..1 volume through the confidence colour table over its full range."""
    if volumeNode.GetDisplayNode() is None:
        volumeNode.CreateDefaultDisplayNodes()
    display = volumeNode.GetDisplayNode()
    if scene.GetNodeByID(CONFIDENCE_COLOR_NODE_ID) is not None:  # the application's built-in tables
        display.SetAndObserveColorNodeID(CONFIDENCE_COLOR_NODE_ID)
    display.AutoWindowLevelOff()
    display.SetWindowLevelMinMax(0.0, 1.0)


def _deviceInfo(facts: dict) -> DeviceInfo:
    return DeviceInfo(cuda=facts["cuda"], name=facts["name"], totalGB=facts["total_gb"], freeGB=facts["free_gb"])


def _checkedModelPath(modelPath) -> Path:
    from cotexnet.errors import BundleError

    if not isChosenPath(modelPath):
        raise BundleError("no model chosen: select a trained CoTexNet model folder (it holds config.json) or type a "
                          "Hugging Face Hub repository id (owner/name)")
    return Path(modelPath).expanduser()


def _workerModel(modelPath) -> str:
    """What the worker loads: a Hub repository id as given (the worker downloads it, off the GUI's thread), else
    the folder's absolute path (the worker's working folder may differ)."""
    from cotexnet.hub import parse_repo_id

    path = _checkedModelPath(modelPath)
    return str(modelPath) if parse_repo_id(str(modelPath)) else str(path.resolve())
