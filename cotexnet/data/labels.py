"""Label maps: class-index arrays from any mask format or a Slicer ``.seg.nrrd``, and ``.seg.nrrd`` writing.

Label maps are ``uint8`` arrays of class indices in SimpleITK order, 0 = background, ``1..n`` = the
classes in order. Segments of a ``.seg.nrrd`` are matched to classes by name, case-insensitively.
"""
from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from ..atomic import write_files_atomic
from ..config import MAX_CLASSES
from ..errors import DataError
from .image import (
    COMPRESSION_LEVEL,
    LOSSY_SUFFIXES,
    PICTURE_SUFFIXES,
    SEGMENTATION_SUFFIX,
    ImageGeometry,
    VolumeImage,
    as_geometry,
    check_file,
    check_written,
    image_suffix,
    read_image,
    read_picture,
    read_segmentation_file,
    sitk_on_grid,
)


def names_match(a: str, b: str) -> bool:
    return a.strip().casefold() == b.strip().casefold()


def _segmentation_labels(path: Path, reference: ImageGeometry | None, classes: Sequence[str] | None) -> np.ndarray:
    """Class-index array of a ``.seg.nrrd``, segments matched to ``classes`` by name (case-insensitive).

    A segmentation stored on another grid than the reference (Slicer may crop it to the segments'
    extent) is resampled onto the reference with nearest-neighbour interpolation.
    """
    segmentation, geometry = read_segmentation_file(path)
    segments = segmentation.get("segments", [])
    names = [segment.get("name", segment.get("id", "")) for segment in segments]
    classes = list(classes) if classes is not None else names
    voxels = segmentation["voxels"]
    labels = np.zeros(voxels.shape[-3:], dtype=np.uint8)
    for segment, name in zip(segments, names):
        index = next((i for i, c in enumerate(classes) if names_match(c, name)), None)
        if index is None:
            raise DataError(f"segment '{name}' is not one of the classes {classes}", path)
        layer = voxels[segment.get("layer", 0)] if voxels.ndim == 4 else voxels  # overlapping segments use layers
        labels[layer == segment.get("labelValue", 1)] = index + 1
    labels = np.ascontiguousarray(labels.transpose(2, 1, 0))  # (i, j, k) -> (k, j, i)
    if reference is None:
        return labels
    if reference.ndim == 2:
        if labels.shape[0] != 1:
            raise DataError(f"segmentation shape {labels.shape} cannot label a 2D image of shape {reference.shape}",
                            path)
        return labels[0]
    if not geometry.same_grid(reference):
        _check_inside(labels, geometry, reference, classes, path)
        grid = sitk.Image([int(s) for s in reversed(reference.shape)], sitk.sitkUInt8)
        grid.SetSpacing(reference.spacing)
        grid.SetOrigin(reference.origin)
        grid.SetDirection(reference.direction)
        resampled = sitk.Resample(sitk_on_grid(labels, geometry), grid, sitk.Transform(), sitk.sitkNearestNeighbor, 0)
        labels = sitk.GetArrayFromImage(resampled)
    return labels


def _check_inside(labels: np.ndarray, geometry: ImageGeometry, reference: ImageGeometry, classes: list[str],
                  path: Path) -> None:
    """Refuse a segmentation whose segment voxels fall outside the image it is resampled onto: resampling
    would drop them silently (a segmentation of another image, or one placed elsewhere)."""
    to_reference = np.linalg.inv(reference.ijk_to_lps()) @ geometry.ijk_to_lps()
    upper = np.array(list(reversed(reference.shape))) - 0.5
    outside, dropped = 0, set()
    voxels = np.flatnonzero(labels)
    for start in range(0, voxels.size, 1 << 20):  # a million voxels at a time
        chunk = voxels[start : start + (1 << 20)]
        k, j, i = np.unravel_index(chunk, labels.shape)
        ijk = to_reference[:3, :3] @ np.stack([i, j, k]) + to_reference[:3, 3:]
        out = ((ijk < -0.5) | (ijk > upper[:, None])).any(axis=0)
        outside += int(out.sum())
        dropped.update(np.unique(labels.ravel()[chunk[out]]).tolist())
    if outside:
        segments = [classes[c - 1] for c in sorted(dropped)]
        where = f" ({reference.path})" if reference.path is not None else ""
        raise DataError(f"{outside} of its {voxels.size} segment voxels (of {', '.join(segments)}) lie outside the "
                        f"image{where}; the segmentation belongs to another image or is placed elsewhere", path)


def _class_indices(image: VolumeImage, path: Path, num_classes: int | None) -> np.ndarray:
    """Integer class indices from a stored mask: one channel, whole numbers, 0/255 binary masks as 0/1.

    JPEG masks are lossy, so they can only hold a binary mask; they are thresholded at 128.
    """
    array = image.array
    if image.is_rgb:
        if not (np.array_equal(array[..., 0], array[..., 1]) and np.array_equal(array[..., 0], array[..., 2])):
            raise DataError("colour mask: masks must hold class indices (one channel, or equal RGB channels)", path)
        array = array[..., 0]
    if image_suffix(path) in LOSSY_SUFFIXES:
        if num_classes is not None and num_classes > 1:
            raise DataError(f"a JPEG mask (lossy) can only hold a binary mask, not {num_classes} classes", path)
        return (array >= 128).astype(np.uint8)
    if np.issubdtype(array.dtype, np.floating) and not np.array_equal(array, np.round(array)):
        raise DataError("mask holds non-integer values; masks must hold class indices", path)
    values = np.unique(array)
    if values.size and values[-1] == 255 and set(values.tolist()) <= {0, 255} and (num_classes or 1) < 255:
        return (array == 255).astype(np.uint8)
    bad = values[(values < 0) | (values > (num_classes if num_classes is not None else 255))]
    if bad.size:
        allowed = f"0..{num_classes}" if num_classes is not None else "0..255"
        raise DataError(f"labels {bad[:10].tolist()} outside the class indices {allowed}", path)
    return array.astype(np.uint8)


def read_label_map(
    path: str | Path,
    reference: VolumeImage | ImageGeometry | None = None,
    num_classes: int | None = None,
    classes: Sequence[str] | None = None,
) -> np.ndarray:
    """Read a mask as a ``uint8`` array of class indices (0 = background, ``1..num_classes``).

    Any image format works, and Slicer ``.seg.nrrd`` files, whose segments are matched to ``classes``
    by name. Binary masks stored as 0/255 become 0/1. With a ``reference``, the shape must match.
    """
    path = Path(path)
    check_file(path)
    if num_classes is None and classes is not None:
        num_classes = len(classes)
    if num_classes is not None and num_classes > MAX_CLASSES:
        raise DataError(f"{num_classes} classes: label maps hold 8-bit class indices, so at most {MAX_CLASSES}", path)
    geometry = as_geometry(reference) if reference is not None else None
    suffix = image_suffix(path)
    if suffix == SEGMENTATION_SUFFIX:
        labels = _segmentation_labels(path, geometry, classes)
        if num_classes is not None and labels.max(initial=0) > num_classes:
            raise DataError(f"labels {sorted(set(np.unique(labels)) - set(range(num_classes + 1)))} "
                            f"outside the class indices 0..{num_classes}", path)
    else:
        image = read_picture(path, label=True) if suffix in PICTURE_SUFFIXES else read_image(path)
        labels = _class_indices(image, path, num_classes)
        if geometry is not None:
            check_label_placement(image.geometry, geometry)
    if geometry is not None and labels.shape != geometry.shape:
        where = f" ({geometry.path})" if geometry.path is not None else ""
        raise DataError(f"mask shape {labels.shape} differs from image shape {geometry.shape}{where}", path)
    return labels


def check_label_placement(mask: ImageGeometry, image: ImageGeometry) -> None:
    """Refuse a mask that lies elsewhere in space than its image (another origin, spacing or direction):
    its voxels would label the wrong anatomy. Pictures store no placement, so they are not compared."""
    if any(g.path is not None and image_suffix(g.path) in PICTURE_SUFFIXES for g in (mask, image)):
        return
    difference = image.placement_difference(mask)
    if difference is not None:
        where = f" ({image.path})" if image.path is not None else ""
        raise DataError(f"mask geometry differs from its image{where}: {difference}", mask.path)


def write_segmentation_nrrd(
    labels: np.ndarray,
    reference: VolumeImage | ImageGeometry,
    path: str | Path,
    classes: Sequence[str],
    colors: Sequence[Sequence[float]] | None = None,
) -> Path:
    """Write a label map as a Slicer ``.seg.nrrd``: one segment per class, named and coloured, label value
    = class index, on the reference grid (a 2D image becomes one slice), atomically."""
    import slicerio

    path = Path(path)
    geometry = as_geometry(reference)
    labels = np.asarray(labels)
    if labels.shape != geometry.shape:
        raise DataError(f"label map shape {labels.shape} differs from the reference image shape {geometry.shape}", path)
    if labels.max(initial=0) > len(classes):
        raise DataError(f"label map holds value {int(labels.max())} but only {len(classes)} classes are named", path)
    if colors is not None and len(colors) != len(classes):
        raise DataError(f"{len(colors)} colors given for {len(classes)} classes", path)
    voxels = labels.astype(np.uint8, copy=False).T  # (z, y, x) -> (i, j, k), Fortran order: what NRRD stores
    if geometry.ndim == 2:
        voxels = voxels[..., None]
    extent = [v for size in voxels.shape for v in (0, size - 1)]
    segments = []
    for index, name in enumerate(classes, start=1):
        segment = {"id": f"Segment_{index}", "name": name, "labelValue": index, "layer": 0, "extent": extent}
        if colors is not None:
            segment["color"] = [float(c) for c in colors[index - 1]]
        segments.append(segment)
    segmentation = {
        "voxels": voxels,
        "ijkToLPS": geometry.ijk_to_lps(),
        "segments": segments,
        "containedRepresentationNames": ["Binary labelmap"],
        "masterRepresentation": "Binary labelmap",
    }

    def verify(target: Path) -> None:
        back, grid = read_segmentation_file(target)
        if not np.array_equal(back["voxels"], segmentation["voxels"]) or not grid.same_grid(geometry if geometry.ndim
                                                                                          == 3 else grid):
            raise DataError("the written segments differ from the label map", target)

    write_files_atomic(path, lambda target: slicerio.write_segmentation(str(target), segmentation, COMPRESSION_LEVEL),
                       lambda target: check_written(path, target, verify))
    return path
