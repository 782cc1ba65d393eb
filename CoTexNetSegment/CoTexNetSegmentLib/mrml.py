"""MRML <-> numpy conversions shared by the CoTexNet Slicer modules.

The engine works on numpy arrays in SimpleITK order ((k, j, i) = (z, y, x)) with SimpleITK/LPS geometry;
Slicer stores voxels in vtkImageData with an IJK-to-RAS matrix. This file is the single place where one
becomes the other, so class indices, names and colors cannot drift between modules. No Qt is imported.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
import vtk
from vtk.util import numpy_support

import slicer
# The engine's grid type (SimpleITK conventions: x-first spacing/origin, row-major LPS direction, shape in
# array order), so a volume's geometry goes to write_image, segment_volume and describe as it is. Its
# module needs numpy and SimpleITK only, never torch.
from cotexnet.data.image import ImageGeometry as Geometry

# RAS (Slicer) <-> LPS (ITK, DICOM): the first two world axes change sign.
_RAS_TO_LPS = np.diag([-1.0, -1.0, 1.0])


def ensureSegmentationConverters() -> None:
    """Registers the binary labelmap <-> closed surface converter rules if nobody has.

    The Slicer application registers them at startup; a bare ``slicer-core`` Python process does not, and
    segmentations then refuse to create representations.
    """
    factory = slicer.vtkSegmentationConverterFactory.GetInstance()
    if factory.GetConverterRules():
        return
    for rule in (
        slicer.vtkBinaryLabelmapToClosedSurfaceConversionRule,
        slicer.vtkClosedSurfaceToBinaryLabelmapConversionRule,
        slicer.vtkClosedSurfaceToFractionalLabelmapConversionRule,
        slicer.vtkFractionalLabelmapToClosedSurfaceConversionRule,
    ):
        factory.RegisterConverterRule(rule())


def _worldMatrix(node) -> vtk.vtkMatrix4x4:
    """IJK-to-world matrix of a volume: IJK-to-RAS with a linear parent transform applied (non-linear ones are ignored)."""
    ijkToRas = vtk.vtkMatrix4x4()
    node.GetIJKToRASMatrix(ijkToRas)
    parentToWorld = vtk.vtkMatrix4x4()
    if node.GetParentTransformNode() and slicer.vtkMRMLTransformNode.GetMatrixTransformBetweenNodes(
        node.GetParentTransformNode(), None, parentToWorld
    ):
        vtk.vtkMatrix4x4.Multiply4x4(parentToWorld, ijkToRas, ijkToRas)
    return ijkToRas


def _numpyFromMatrix(matrix: vtk.vtkMatrix4x4) -> np.ndarray:
    return np.array([[matrix.GetElement(r, c) for c in range(4)] for r in range(4)])


def geometryFromVolume(volumeNode) -> Geometry:
    """SimpleITK geometry of a volume node in world (RAS -> LPS) space, parent linear transforms applied.

    Spacing and origin are (i, j, k) = (x, y, z) ordered; ``direction`` is the row-major 3x3 matrix whose
    columns are the i, j, k axis directions, as ``SimpleITK.Image.SetDirection`` expects it.
    """
    ijkToRas = _numpyFromMatrix(_worldMatrix(volumeNode))
    axes = ijkToRas[:3, :3]
    spacing = np.linalg.norm(axes, axis=0)
    if np.any(spacing == 0):
        raise ValueError(f"{volumeNode.GetName()}: IJK-to-RAS matrix has a zero-length axis, spacing {spacing.tolist()}")
    direction = _RAS_TO_LPS @ (axes / spacing)
    origin = _RAS_TO_LPS @ ijkToRas[:3, 3]
    return Geometry(volumeToArrayShape(volumeNode), spacing, origin, direction.ravel())


def _checkedImageData(volumeNode) -> vtk.vtkImageData:
    imageData = volumeNode.GetImageData() if volumeNode is not None else None
    if imageData is None or imageData.GetPointData().GetScalars() is None:
        name = volumeNode.GetName() if volumeNode is not None else "None"
        raise ValueError(f"volume {name!r} has no voxels")
    return imageData


def volumeToArrayShape(volumeNode) -> tuple[int, int, int]:
    """(k, j, i) voxel shape of a volume node, without copying its voxels."""
    i, j, k = _checkedImageData(volumeNode).GetDimensions()
    return (k, j, i)


def volumeToArray(volumeNode) -> tuple[np.ndarray, Geometry]:
    """Copies a volume's voxels to a numpy array in SimpleITK (k, j, i[, component]) order, with its geometry."""
    imageData = _checkedImageData(volumeNode)
    i, j, k = imageData.GetDimensions()
    components = imageData.GetNumberOfScalarComponents()
    shape = (k, j, i) if components == 1 else (k, j, i, components)
    array = numpy_support.vtk_to_numpy(imageData.GetPointData().GetScalars()).reshape(shape).copy()
    return array, geometryFromVolume(volumeNode)


def _orientedImage(array: np.ndarray, volumeNode) -> slicer.vtkOrientedImageData:
    """Wraps a (k, j, i) uint8 array as oriented image data in the volume node's own (untransformed) frame."""
    image = slicer.vtkOrientedImageData()
    k, j, i = array.shape
    image.SetDimensions(i, j, k)
    scalars = numpy_support.numpy_to_vtk(np.ascontiguousarray(array, dtype=np.uint8).ravel(), deep=True)
    image.GetPointData().SetScalars(scalars)
    ijkToRas = vtk.vtkMatrix4x4()
    volumeNode.GetIJKToRASMatrix(ijkToRas)
    image.SetGeometryFromImageToWorldMatrix(ijkToRas)
    return image


def arrayToVolume(array: np.ndarray, referenceVolumeNode, volumeNode):
    """Fills a scalar volume node with a (k, j, i) array on the reference volume's grid (geometry, parent
    transform); returns the node."""
    k, j, i = array.shape
    image = vtk.vtkImageData()
    image.SetDimensions(i, j, k)
    image.GetPointData().SetScalars(numpy_support.numpy_to_vtk(np.ascontiguousarray(array).ravel(), deep=True))
    ijkToRas = vtk.vtkMatrix4x4()
    referenceVolumeNode.GetIJKToRASMatrix(ijkToRas)
    volumeNode.SetIJKToRASMatrix(ijkToRas)
    volumeNode.SetAndObserveImageData(image)
    volumeNode.SetAndObserveTransformNodeID(referenceVolumeNode.GetTransformNodeID())
    return volumeNode


def _volumeToSegmentationTransform(volumeNode, segmentationNode) -> vtk.vtkGeneralTransform:
    transform = vtk.vtkGeneralTransform()
    slicer.vtkSlicerSegmentationsModuleLogic.GetTransformBetweenRepresentationAndSegmentation(
        volumeNode, segmentationNode, transform
    )
    return transform


def _segmentationGrid(segmentation) -> "slicer.vtkOrientedImageData | None":
    """The segmentation's reference voxel grid (geometry and extent, no voxels), None when it has none."""
    geometry = segmentation.GetConversionParameter(slicer.vtkSegmentationConverter.GetReferenceImageGeometryParameterName())
    if not geometry:
        return None
    grid = slicer.vtkOrientedImageData()
    slicer.vtkSegmentationConverter.DeserializeImageGeometry(geometry, grid, False)
    return grid


def classLabelmap(labels: np.ndarray, index: int, volumeNode, segmentationNode,
                  grid: "slicer.vtkOrientedImageData | None" = None) -> slicer.vtkOrientedImageData:
    """The voxels of label ``index`` as a binary labelmap in the segmentation node's frame, on ``grid`` when given.

    ``grid`` is the segmentation's voxel grid (its reference geometry): segments live there, and the Segment
    Editor reads the edited segment, and masks by intensity, only on that geometry (docs/slicer.md,
    "Geometry"). A grid that differs (oversampled, another volume's, the volume moved by a transform) gets
    the labels by nearest-neighbour resampling, cropped to the grid's extent, as the editor's own effects are.
    """
    image = _orientedImage(labels == index, volumeNode)
    slicer.vtkOrientedImageDataResample.TransformOrientedImage(image, _volumeToSegmentationTransform(volumeNode,
                                                                                                     segmentationNode))
    if grid is None or slicer.vtkOrientedImageDataResample.DoGeometriesMatch(image, grid):
        return image
    resampled = slicer.vtkOrientedImageData()
    slicer.vtkOrientedImageDataResample.ResampleOrientedImageToReferenceOrientedImage(image, grid, resampled)
    return resampled


def placeNextTo(node, referenceNode) -> None:
    """Puts ``node`` under the same subject-hierarchy parent (patient/study) as ``referenceNode``.

    Outside the application nobody adds hierarchy items automatically, so a missing item is created.
    """
    shNode = slicer.vtkMRMLSubjectHierarchyNode.GetSubjectHierarchyNode(node.GetScene())
    referenceItem = shNode.GetItemByDataNode(referenceNode)
    parent = shNode.GetItemParent(referenceItem) if referenceItem else shNode.GetSceneItemID()
    item = shNode.GetItemByDataNode(node)
    if item:
        shNode.SetItemParent(item, parent)
    else:
        shNode.CreateItem(parent, node)


def labelMapToSegmentation(
    scene,
    labels: np.ndarray,
    referenceVolumeNode,
    classes: Sequence[str],
    colors: Sequence[Sequence[float]],
    segmentationNode=None,
):
    """Writes an engine label map (0 = background, c + 1 = ``classes[c]``) into a segmentation node.

    Creates one segment per class, named and colored from the bundle. Segments with the same names are
    replaced in place (keeping their IDs, so views and undo stay consistent); all other segments are left
    untouched. A new segmentation node is created next to the reference volume when none is given.
    """
    if len(colors) != len(classes):
        raise ValueError(f"{len(classes)} classes but {len(colors)} colors")
    volumeShape = volumeToArrayShape(referenceVolumeNode)
    labels = np.asarray(labels)
    if labels.shape != volumeShape:
        raise ValueError(
            f"label map shape {labels.shape} differs from volume {referenceVolumeNode.GetName()!r} shape {volumeShape}"
        )
    if labels.size and int(labels.max()) > len(classes):
        raise ValueError(f"label map holds label {int(labels.max())} but only {len(classes)} classes are named")
    ensureSegmentationConverters()
    if segmentationNode is None:
        segmentationNode = scene.AddNewNodeByClass(
            "vtkMRMLSegmentationNode", scene.GenerateUniqueName(f"{referenceVolumeNode.GetName()} CoTexNet")
        )
        segmentationNode.CreateDefaultDisplayNodes()
        segmentationNode.SetAndObserveTransformNodeID(referenceVolumeNode.GetTransformNodeID())
        placeNextTo(segmentationNode, referenceVolumeNode)
    if not segmentationNode.GetNodeReference(slicer.vtkMRMLSegmentationNode.GetReferenceImageGeometryReferenceRole()):
        segmentationNode.SetReferenceImageGeometryParameterFromVolumeNode(referenceVolumeNode)

    segmentation = segmentationNode.GetSegmentation()
    grid = _segmentationGrid(segmentation)
    wasModifying = segmentationNode.StartModify()
    try:
        for index, (name, color) in enumerate(zip(classes, colors), start=1):
            image = classLabelmap(labels, index, referenceVolumeNode, segmentationNode, grid)
            segmentId = segmentation.GetSegmentIdBySegmentName(name)
            if segmentId:
                segmentation.GetSegment(segmentId).SetColor(*[float(c) for c in color])
            else:
                segmentId = segmentation.AddEmptySegment("", name, [float(c) for c in color])
            if not slicer.vtkSlicerSegmentationsModuleLogic.SetBinaryLabelmapToSegment(
                image, segmentationNode, segmentId, slicer.vtkSlicerSegmentationsModuleLogic.MODE_REPLACE
            ):
                raise RuntimeError(f"could not write segment {name!r} into {segmentationNode.GetName()!r}")
    finally:
        segmentationNode.EndModify(wasModifying)
    return segmentationNode


def segmentationToLabelMap(segmentationNode, referenceVolumeNode, segmentNames: Sequence[str]) -> np.ndarray:
    """Rasterises named segments onto a volume's voxel grid as a uint8 (k, j, i) label map.

    The label of a segment is its position in ``segmentNames`` plus one, so a missing segment gives no
    voxels and never shifts the labels of the others. Where segments overlap, the later name wins.
    """
    if len(segmentNames) > 255:
        raise ValueError(f"{len(segmentNames)} segment names do not fit a uint8 label map")
    shape = volumeToArrayShape(referenceVolumeNode)
    labels = np.zeros(shape, np.uint8)
    ensureSegmentationConverters()
    segmentation = segmentationNode.GetSegmentation()
    reference = slicer.vtkOrientedImageData()
    reference.SetExtent(referenceVolumeNode.GetImageData().GetExtent())
    ijkToRas = vtk.vtkMatrix4x4()
    referenceVolumeNode.GetIJKToRASMatrix(ijkToRas)
    reference.SetGeometryFromImageToWorldMatrix(ijkToRas)
    segmentationToVolume = _volumeToSegmentationTransform(referenceVolumeNode, segmentationNode)
    segmentationToVolume.Inverse()
    for index, name in enumerate(segmentNames, start=1):
        segmentId = segmentation.GetSegmentIdBySegmentName(name)
        if not segmentId:
            continue
        segmentImage = slicer.vtkOrientedImageData()
        if not slicer.vtkSlicerSegmentationsModuleLogic.GetSegmentBinaryLabelmapRepresentation(
            segmentationNode, segmentId, segmentImage, False
        ):
            raise RuntimeError(f"{segmentationNode.GetName()!r}: segment {name!r} has no binary labelmap")
        resampled = slicer.vtkOrientedImageData()
        slicer.vtkOrientedImageDataResample.ResampleOrientedImageToReferenceOrientedImage(
            segmentImage, reference, resampled, False, False, segmentationToVolume
        )
        scalars = resampled.GetPointData().GetScalars()
        if scalars is None:
            continue  # empty segment
        # Segments share labelmap layers; a segment's voxels are those holding its label value.
        labelValue = segmentation.GetSegment(segmentId).GetLabelValue()
        mask = numpy_support.vtk_to_numpy(scalars).reshape(shape) == labelValue
        labels[mask] = index
    return labels
