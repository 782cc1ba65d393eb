"""Writing a result through the Segment Editor, so that its masking settings apply. Imports no Qt.

The module's Apply writes segments directly (:func:`mrml.labelMapToSegmentation`). The "CoTexNet" effect
instead hands each class to the Segment Editor's ``modifySegmentByLabelmap``, which honours the editable
area, the editable intensity range and whether other segments may be overwritten, as Slicer's own
effects do (SegmentEditorIslandsEffect.py calls it per segment). Two rules of that function decide how
a class must be handed over (docs/slicer.md, "Masking (the effect)"):

- in Set mode it re-reads the existing segment with the modifier's geometry, and with an editable
  intensity range it writes nothing when the modifier's geometry is not the aligned source volume's:
  each class is therefore resampled onto the editor's reference geometry image first;
- the edit mask ("outside all segments", ...) is built around the *selected* segment: each class's
  segment is selected while it is written, and the user's selection is restored afterwards.

The effect passes a :class:`SegmentEditorTarget`, so this file runs the same on ``slicer-core``, where
``vtkSlicerSegmentEditorLogic.ModifySegmentByLabelmap`` implements the same masking (Slicer 5.10 moved it
there from ``qSlicerSegmentEditorAbstractEffect``).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Sequence

import numpy as np

from . import mrml

#: ``modifySegment(segmentationNode, segmentId, labelmap)``: replaces a segment inside the editable area.
ModifySegment = Callable[[object, str, "slicer.vtkOrientedImageData"], None]


@dataclass
class SegmentEditorTarget:
    """The Segment Editor an effect writes through.

    ``parameterSetNode`` is the editor's ``vtkMRMLSegmentEditorNode`` (masking settings, selected segment),
    ``referenceGeometryImage`` returns the segmentation's voxel grid in the segmentation's frame (the effect's
    ``scriptedEffect.referenceGeometryImage``), ``modifySegment`` is ``modifySegmentByLabelmap`` in Set mode.
    """

    parameterSetNode: object
    referenceGeometryImage: Callable[[], "slicer.vtkOrientedImageData"]
    modifySegment: ModifySegment


def applyPerSegment(labels: np.ndarray, volumeNode, classes: Sequence[str], colors: Sequence[Sequence[float]],
                    segmentationNode, editor: SegmentEditorTarget) -> list[str]:
    """Writes an engine label map (0 = background, c + 1 = ``classes[c]``) class by class through the editor.

    Segments are found by name (created, with the model's color, when missing), so other segments stay as
    they are unless the editor's overwrite setting says otherwise. Returns the segment IDs in class order.
    """
    if len(colors) != len(classes):
        raise ValueError(f"{len(classes)} classes but {len(colors)} colors")
    if tuple(labels.shape) != mrml.volumeToArrayShape(volumeNode):
        raise ValueError(f"label map shape {labels.shape} differs from volume {volumeNode.GetName()!r}")
    mrml.ensureSegmentationConverters()
    grid = editor.referenceGeometryImage()
    if grid is None:
        raise RuntimeError(f"the Segment Editor has no voxel grid for {segmentationNode.GetName()!r}: "
                           f"select a source volume")
    segmentation = segmentationNode.GetSegmentation()
    selected = editor.parameterSetNode.GetSelectedSegmentID()
    segmentIds = []
    try:
        for index, (name, color) in enumerate(zip(classes, colors), start=1):
            segmentId = segmentation.GetSegmentIdBySegmentName(name)
            if not segmentId:
                segmentId = segmentation.AddEmptySegment("", name, [float(c) for c in color])
            labelmap = mrml.classLabelmap(labels, index, volumeNode, segmentationNode, grid)
            editor.parameterSetNode.SetSelectedSegmentID(segmentId)
            editor.modifySegment(segmentationNode, segmentId, labelmap)
            segmentIds.append(segmentId)
    finally:
        editor.parameterSetNode.SetSelectedSegmentID(selected)
    return segmentIds
