"""Training data from a Slicer scene: find and check (volume, segmentation) pairs, export them.

The engine trains from files, so the scene's pairs are written as an nnU-Net v2 raw dataset: one
image and one label map per case, both on the volume's own voxel grid and geometry, with labels
numbered by class order (``classes[c]`` -> ``c + 1``). Every check runs before anything is written
or started, and each error names the node at fault.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Sequence

import numpy as np
import slicer

FILE_ENDING = ".nrrd"


class TrainingInputError(ValueError):
    """Training data or options that cannot be used; the message names the node, file or field."""


def segmentNames(segmentationNode) -> list[str]:
    """Names of a segmentation's segments, in the segmentation's order."""
    segmentation = segmentationNode.GetSegmentation()
    return [segmentation.GetNthSegment(i).GetName() for i in range(segmentation.GetNumberOfSegments())]


def referencedVolume(segmentationNode):
    """The volume a segmentation was drawn on (its reference geometry node), or None."""
    node = segmentationNode.GetNodeReference(slicer.vtkMRMLSegmentationNode.GetReferenceImageGeometryReferenceRole())
    return node if node is not None and node.IsA("vtkMRMLScalarVolumeNode") else None


def findScenePairs(scene) -> list[tuple]:
    """Every (volume, segmentation) pair of the scene: each segmentation with the volume it was drawn on."""
    pairs = []
    for index in range(scene.GetNumberOfNodesByClass("vtkMRMLSegmentationNode")):
        segmentationNode = scene.GetNthNodeByClass(index, "vtkMRMLSegmentationNode")
        volumeNode = referencedVolume(segmentationNode)
        if volumeNode is not None:
            pairs.append((volumeNode, segmentationNode))
    return pairs


def _sequenceProxyOf(volumeNode):
    """The sequence browser that plays ``volumeNode`` as one frame of a time series, or None."""
    scene = volumeNode.GetScene()
    if scene is None:
        return None
    for index in range(scene.GetNumberOfNodesByClass("vtkMRMLSequenceBrowserNode")):
        browser = scene.GetNthNodeByClass(index, "vtkMRMLSequenceBrowserNode")
        if browser.IsProxyNodeID(volumeNode.GetID()):
            return browser
    return None


def checkVolume(volumeNode) -> None:
    """Refuses volumes the engine cannot train on as 3D: missing voxels, 2D (one slice) or 4D."""
    name = volumeNode.GetName()
    if volumeNode.IsA("vtkMRMLLabelMapVolumeNode") or not volumeNode.IsA("vtkMRMLScalarVolumeNode"):
        raise TrainingInputError(f"{name!r} is a {volumeNode.GetClassName()}, not a scalar (grayscale) volume")
    imageData = volumeNode.GetImageData()
    if imageData is None or imageData.GetPointData().GetScalars() is None:
        raise TrainingInputError(f"volume {name!r} has no voxels")
    components = imageData.GetNumberOfScalarComponents()
    if components != 1:
        raise TrainingInputError(
            f"volume {name!r} is 4D ({components} components per voxel); train on one 3D frame at a time"
        )
    browser = _sequenceProxyOf(volumeNode)
    if browser is not None:
        raise TrainingInputError(
            f"volume {name!r} is 4D (a frame of sequence browser {browser.GetName()!r}); "
            "train on single 3D volumes (e.g. copy the frame to a new volume)"
        )
    dimensions = imageData.GetDimensions()
    if min(dimensions) < 2:
        raise TrainingInputError(
            f"volume {name!r} is 2D ({dimensions[0]}x{dimensions[1]}x{dimensions[2]} voxels); "
            "train on 2D images from a folder with images/ and masks/ instead"
        )


def checkPairs(pairs: Sequence[tuple], classes: Sequence[str] | None = None) -> list[str]:
    """Checks scene training pairs and returns the classes to train.

    Without ``classes`` they are the segment names of the first segmentation, in its segment order.
    A case may lack some classes (those get no voxels there), but a segment whose name is not a
    class means the segmentations disagree and is refused, as is a volume without a segmentation.
    """
    if not pairs:
        raise TrainingInputError("no training cases: select at least one volume with a segmentation")
    seen = set()
    for volumeNode, segmentationNode in pairs:
        if volumeNode is None:
            name = segmentationNode.GetName() if segmentationNode is not None else "None"
            raise TrainingInputError(f"segmentation {name!r} has no volume; pick the volume it was drawn on")
        if segmentationNode is None:
            raise TrainingInputError(f"volume {volumeNode.GetName()!r} has no segmentation")
        if not segmentationNode.IsA("vtkMRMLSegmentationNode"):
            raise TrainingInputError(
                f"{segmentationNode.GetName()!r} paired with volume {volumeNode.GetName()!r} is a "
                f"{segmentationNode.GetClassName()}, not a segmentation"
            )
        if volumeNode.GetID() in seen:
            raise TrainingInputError(f"volume {volumeNode.GetName()!r} is listed twice")
        seen.add(volumeNode.GetID())
        checkVolume(volumeNode)
        if not segmentNames(segmentationNode):
            raise TrainingInputError(f"segmentation {segmentationNode.GetName()!r} has no segments")

    firstSegmentation = pairs[0][1]
    classes = list(classes) if classes is not None else segmentNames(firstSegmentation)
    checkClasses(classes)
    for _, segmentationNode in pairs:
        extra = [n for n in segmentNames(segmentationNode) if n not in classes]
        if extra:
            raise TrainingInputError(
                f"segment names differ: segmentation {segmentationNode.GetName()!r} has {extra} "
                f"which are not among the classes {classes}"
                + (f" (taken from {firstSegmentation.GetName()!r})" if segmentationNode is not firstSegmentation else "")
                + "; rename or remove those segments"
            )
    return classes


def modelClasses(modelFolder: str | os.PathLike) -> list[str]:
    """The classes of a model (a bundle or a run folder), read from its config.json; no torch is imported."""
    from .engine import importEngine

    importEngine()
    from cotexnet.bundle import read_bundle_config
    from cotexnet.errors import CoTexNetError

    try:
        return list(read_bundle_config(modelFolder).classes)
    except CoTexNetError as error:
        raise TrainingInputError(f"the model to continue from: {error}") from error


def continuedClasses(pairs: Sequence[tuple], modelClassNames: Sequence[str]) -> list[str]:
    """Classes of a run that continues from a model on scene pairs: the model's classes in its order
    (fine-tuning keeps every one of them), then the segment names it lacks, in the order first met."""
    classes = list(modelClassNames)
    for _, segmentationNode in pairs:
        if segmentationNode is not None and segmentationNode.IsA("vtkMRMLSegmentationNode"):
            classes += [name for name in segmentNames(segmentationNode) if name not in classes]
    return classes


def labelMaps(pairs: Sequence[tuple], classes: Sequence[str]) -> list[np.ndarray]:
    """Each pair's segmentation rasterised on its volume's voxel grid, labelled by class order
    (``classes[c]`` -> ``c + 1``): what the export writes and the class check counts."""
    from CoTexNetSegmentLib import mrml  # the one MRML <-> numpy conversion, shared with CoTexNetSegment

    return [mrml.segmentationToLabelMap(segmentationNode, volumeNode, classes) for volumeNode, segmentationNode in pairs]


def checkEveryClassHasVoxels(pairs: Sequence[tuple], classes: Sequence[str], labels: Sequence[np.ndarray]) -> None:
    """Refuses a class with no voxel in any case: it could only be learned as absent everywhere (the engine
    refuses it too, but only after the export, and by label number). ``labels`` are the pairs'
    :func:`labelMaps`, so a segment outside its volume counts as empty."""
    present = np.zeros(len(classes) + 1, dtype=bool)
    for caseLabels in labels:
        present |= np.bincount(caseLabels.ravel(), minlength=len(classes) + 1) > 0
    empty = [name for name, found in zip(classes, present[1:]) if not found]
    if empty:
        where = f"the {len(pairs)} training cases" if len(pairs) > 1 else f"segmentation {pairs[0][1].GetName()!r}"
        raise TrainingInputError(
            f"{', '.join(map(repr, empty))} {'has' if len(empty) == 1 else 'have'} no voxels in {where}: paint "
            f"{'it' if len(empty) == 1 else 'them'} in at least one case (a class is learned from its examples, and a "
            "run that continues from a model keeps every class of that model)"
        )


def checkClasses(classes: Sequence[str], keywords: Sequence[str] | None = None) -> None:
    """Class names must be non-empty, unique and not 'background' (label 0 in nnU-Net's dataset.json)."""
    if not classes:
        raise TrainingInputError("classes: expected at least one class name")
    for name in classes:
        if not isinstance(name, str) or not name.strip():
            raise TrainingInputError(f"classes: expected non-empty names, got {list(classes)}")
        if name.strip().lower() == "background":
            raise TrainingInputError("classes: 'background' is label 0 and cannot be a class name")
    if len(set(classes)) != len(classes):
        raise TrainingInputError(f"classes: names must be unique, got {list(classes)}")
    if len(classes) > 255:
        raise TrainingInputError(f"classes: at most 255 classes fit a label map, got {len(classes)}")
    if keywords is not None:
        if len(keywords) != len(classes):
            raise TrainingInputError(f"keywords: expected one per class ({len(classes)}), got {len(keywords)}")
        if any(not isinstance(k, str) or not k.strip() for k in keywords):
            raise TrainingInputError(f"keywords: expected non-empty keywords, got {list(keywords)}")


def folderClasses(folder: str | os.PathLike, classes: Sequence[str] | None = None) -> list[str]:
    """Checks a dataset folder with the engine's own loader and returns its classes.

    Folders are 2D/3D ``images/`` + ``masks/``, nnU-Net v2 raw or MSD. Without ``classes`` they come
    from dataset.json or the masks' segment names; a folder that names none needs ``classes``.
    """
    from .engine import importEngine

    importEngine()
    from cotexnet.data import load_dataset
    from cotexnet.errors import CoTexNetError

    try:
        return list(load_dataset(folder, classes).classes)
    except CoTexNetError as error:
        raise TrainingInputError(str(error)) from error


def exportDataset(
    pairs: Sequence[tuple],
    classes: Sequence[str] | None,
    folder: str | os.PathLike,
    modality: str = "MR",
    labels: Sequence[np.ndarray] | None = None,
) -> Path:
    """Writes scene pairs as an nnU-Net v2 raw dataset in ``folder`` and returns it.

    ``imagesTr/case_XXX_0000.nrrd`` holds each volume as is; ``labelsTr/case_XXX.nrrd`` its
    segmentation rasterised onto the same voxel grid and geometry, labelled by class order (``labels``:
    the pairs' :func:`labelMaps` when the caller has them already). ``modality`` goes to dataset.json's
    channel_names.
    """
    from CoTexNetSegmentLib import mrml

    from .engine import importEngine

    classes = checkPairs(pairs, classes)
    if labels is None:
        labels = labelMaps(pairs, classes)
    importEngine()
    from cotexnet.data.image import write_image  # the engine's writer: exact geometry, atomic, no torch
    folder = Path(folder)
    (folder / "imagesTr").mkdir(parents=True, exist_ok=True)
    (folder / "labelsTr").mkdir(parents=True, exist_ok=True)
    for index, ((volumeNode, _), caseLabels) in enumerate(zip(pairs, labels)):
        case = f"case_{index:03d}"
        image, geometry = mrml.volumeToArray(volumeNode)
        write_image(image, geometry, folder / "imagesTr" / f"{case}_0000{FILE_ENDING}")
        write_image(caseLabels, geometry, folder / "labelsTr" / f"{case}{FILE_ENDING}")
    dataset = {
        "name": "CoTexNet training data exported from 3D Slicer",
        "channel_names": {"0": modality},
        "labels": {"background": 0, **{name: index for index, name in enumerate(classes, start=1)}},
        "numTraining": len(pairs),
        "file_ending": FILE_ENDING,
        "cases": {
            f"case_{index:03d}": {"volume": volumeNode.GetName(), "segmentation": segmentationNode.GetName()}
            for index, (volumeNode, segmentationNode) in enumerate(pairs)
        },
    }
    (folder / "dataset.json").write_text(json.dumps(dataset, indent=2), encoding="utf-8")
    return folder
