"""Writing a result through the Segment Editor, so that its masking settings apply. Imports no Qt.

The module's Apply writes segments directly (:func:`mrml.labelMapToSegmentation`). The "CoTexNet" effect
instead hands each class to the Segment Editor's ``modifySegmentByLabelmap``, which honours the editable
area, the editable intensity range and whether other segments may be overwritten, as Slicer's own
effects do (SegmentEditorIslandsEffect.py calls it per segment). The caller passes that function in, so
this file runs the same on ``slicer-core``, where ``vtkSlicerSegmentEditorLogic.ModifySegmentByLabelmap``
implements the same masking (Slicer 5.10 moved it there from ``qSlicerSegmentEditorAbstractEffect``).
"""
from __future__ import annotations

from typing import Callable, Sequence

import numpy as np

import slicer

from . import mrml

#: ``modifySegment(segmentationNode, segmentId, labelmap)``: replaces a segment inside the editable area.
ModifySegment = Callable[[object, str, "slicer.vtkOrientedImageData"], None]


def classLabelmap(labels: np.ndarray, index: int, volumeNode, segmentationNode) -> "slicer.vtkOrientedImageData":
    """The voxels of label ``index`` as a binary labelmap in the segmentation node's coordinate frame."""
    image = mrml._orientedImage(labels == index, volumeNode)
    slicer.vtkOrientedImageDataResample.TransformOrientedImage(
        image, mrml._volumeToSegmentationTransform(volumeNode, segmentationNode))
    return image


def applyPerSegment(labels: np.ndarray, volumeNode, classes: Sequence[str], colors: Sequence[Sequence[float]],
                    segmentationNode, modifySegment: ModifySegment) -> list[str]:
    """Writes an engine label map (0 = background, c + 1 = ``classes[c]``) class by class through ``modifySegment``.

    Segments are found by name (created, with the model's color, when missing), so other segments stay as
    they are unless the editor's overwrite setting says otherwise. Returns the segment IDs in class order.
    """
    if len(colors) != len(classes):
        raise ValueError(f"{len(classes)} classes but {len(colors)} colors")
    if tuple(labels.shape) != mrml.volumeToArrayShape(volumeNode):
        raise ValueError(f"label map shape {labels.shape} differs from volume {volumeNode.GetName()!r}")
    mrml.ensureSegmentationConverters()
    segmentation = segmentationNode.GetSegmentation()
    segmentIds = []
    for index, (name, color) in enumerate(zip(classes, colors), start=1):
        segmentId = segmentation.GetSegmentIdBySegmentName(name)
        if not segmentId:
            segmentId = segmentation.AddEmptySegment("", name, [float(c) for c in color])
        modifySegment(segmentationNode, segmentId, classLabelmap(labels, index, volumeNode, segmentationNode))
        segmentIds.append(segmentId)
    return segmentIds
