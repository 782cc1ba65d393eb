"""Images, label maps, intensity normalisation, slicing, datasets and splits.

One loader per format, one place that normalises intensities (:class:`IntensityNormalization`) and one
place that resizes slices to the model size (:func:`resize_slices`), so training and inference cannot
drift apart.

Conventions (those of SimpleITK, which reads every volume format here):

* arrays: 3D ``(z, y, x)``; 2D ``(y, x)``, or ``(y, x, 3)`` for RGB;
* geometry: ``spacing``, ``origin`` and ``direction`` (row-major, column ``i`` is the physical direction
  of index axis ``i``) are x-first, in LPS millimetres;
* label maps are ``uint8`` arrays of class indices, 0 = background, ``1..n`` = the classes in order.
"""
from __future__ import annotations

import itertools
import json
import logging
import os
import random
import re
import shutil
import tempfile
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import SimpleITK as sitk
import torch
import torch.nn.functional as F
from torch.utils.data import Dataset

from .config import SLICE_AXES, write_json_atomic
from .errors import ConfigError, DataError

logger = logging.getLogger(__name__)

VOLUME_SUFFIXES = (".nii.gz", ".nii", ".nrrd", ".nhdr", ".mha", ".mhd", ".dcm")
PICTURE_SUFFIXES = (".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp")
SEGMENTATION_SUFFIX = ".seg.nrrd"
LOSSY_SUFFIXES = (".jpg", ".jpeg")
SPLIT_NAMES = ("train", "val", "test")

# --------------------------------------------------------------------------------------------------
# Images and geometry
# --------------------------------------------------------------------------------------------------


def image_suffix(path: str | Path) -> str:
    """Lower-case file suffix, keeping the compound ones (``.nii.gz``, ``.seg.nrrd``) whole."""
    name = Path(path).name.lower()
    for compound in (SEGMENTATION_SUFFIX, ".nii.gz"):
        if name.endswith(compound):
            return compound
    return Path(name).suffix


def _strip_suffix(path: Path) -> str:
    suffix = image_suffix(path)
    return path.name[: len(path.name) - len(suffix)] if suffix else path.name


@dataclass(frozen=True)
class ImageGeometry:
    """The grid of an image without its voxels: enough to check, resample or write onto it."""

    shape: tuple[int, ...]  # spatial shape in array order
    spacing: tuple[float, ...]
    origin: tuple[float, ...]
    direction: tuple[float, ...]
    path: Path | None = None

    def __post_init__(self):
        for name in ("spacing", "origin", "direction"):
            object.__setattr__(self, name, tuple(float(v) for v in getattr(self, name)))
        object.__setattr__(self, "shape", tuple(int(v) for v in self.shape))

    @property
    def ndim(self) -> int:
        return len(self.spacing)

    def ijk_to_lps(self) -> np.ndarray:
        """4x4 voxel-to-LPS matrix; a 2D grid becomes one slice of thickness 1 at z = 0."""
        n = self.ndim
        matrix = np.eye(4)
        direction = np.reshape(self.direction, (n, n))
        matrix[:n, :n] = direction * np.asarray(self.spacing)[None, :]
        matrix[:n, 3] = self.origin
        return matrix

    def same_grid(self, other: ImageGeometry, atol: float = 1e-4) -> bool:
        return self.shape == other.shape and np.allclose(self.ijk_to_lps(), other.ijk_to_lps(), atol=atol)


@dataclass
class VolumeImage:
    """A 2D or 3D image as a numpy array (SimpleITK order) with its physical geometry."""

    array: np.ndarray
    spacing: tuple[float, ...]
    origin: tuple[float, ...]
    direction: tuple[float, ...]
    path: Path | None = None

    def __post_init__(self):
        self.array = np.asarray(self.array)
        self.spacing = tuple(float(v) for v in self.spacing)
        self.origin = tuple(float(v) for v in self.origin)
        self.direction = tuple(float(v) for v in self.direction)
        n = len(self.spacing)
        if n not in (2, 3) or len(self.origin) != n or len(self.direction) != n * n:
            raise ValueError(
                f"inconsistent geometry: spacing {self.spacing}, origin {self.origin}, direction {self.direction}"
            )
        rgb = self.array.ndim == n + 1 and n == 2 and self.array.shape[-1] == 3
        if self.array.ndim != n and not rgb:
            raise ValueError(f"array of shape {self.array.shape} does not fit a {n}D geometry")

    @property
    def ndim(self) -> int:
        """Number of spatial dimensions (2 or 3)."""
        return len(self.spacing)

    @property
    def is_rgb(self) -> bool:
        return self.array.ndim == self.ndim + 1

    @property
    def shape(self) -> tuple[int, ...]:
        """Spatial shape in array order (without the RGB channel)."""
        return tuple(self.array.shape[: self.ndim])

    @property
    def geometry(self) -> ImageGeometry:
        return ImageGeometry(self.shape, self.spacing, self.origin, self.direction, self.path)

    @classmethod
    def from_sitk(cls, image: sitk.Image, path: str | Path | None = None) -> VolumeImage:
        return cls(
            sitk.GetArrayFromImage(image),
            image.GetSpacing(),
            image.GetOrigin(),
            image.GetDirection(),
            Path(path) if path is not None else None,
        )

    def to_sitk(self, array: np.ndarray | None = None) -> sitk.Image:
        """This image, or ``array`` (same spatial shape) placed on this image's grid."""
        return _sitk_on_grid(self.array if array is None else np.asarray(array), self.geometry)


def _sitk_on_grid(array: np.ndarray, geometry: ImageGeometry) -> sitk.Image:
    if tuple(array.shape[: geometry.ndim]) != geometry.shape:
        raise ValueError(f"array shape {array.shape} differs from image shape {geometry.shape}")
    if array.dtype == bool:
        array = array.astype(np.uint8)
    image = sitk.GetImageFromArray(array, isVector=array.ndim == geometry.ndim + 1)
    image.SetSpacing(geometry.spacing)
    image.SetOrigin(geometry.origin)
    image.SetDirection(geometry.direction)
    return image


def _as_geometry(reference: VolumeImage | ImageGeometry) -> ImageGeometry:
    return reference.geometry if isinstance(reference, VolumeImage) else reference


def _check_file(path: Path) -> None:
    if not path.exists():
        raise DataError("file not found", path)
    if path.is_file() and path.stat().st_size == 0:
        raise DataError("file is empty", path)


def _unsupported(path: Path) -> DataError:
    supported = ", ".join(VOLUME_SUFFIXES + PICTURE_SUFFIXES + (SEGMENTATION_SUFFIX,))
    return DataError(
        f"unsupported file type '{image_suffix(path) or path.name}' (supported: {supported}, or a DICOM series folder)",
        path,
    )


def _dicom_series_files(folder: Path) -> list[str]:
    """Files of the DICOM series with the most files in ``folder``."""
    series = [sitk.ImageSeriesReader.GetGDCMSeriesFileNames(str(folder), uid)
              for uid in sitk.ImageSeriesReader.GetGDCMSeriesIDs(str(folder))]
    if not series:
        raise DataError("folder holds no DICOM series", folder)
    return list(max(series, key=len))


def _read_sitk(path: Path) -> sitk.Image:
    try:
        if path.is_dir():
            reader = sitk.ImageSeriesReader()
            reader.SetFileNames(_dicom_series_files(path))
            return reader.Execute()
        return sitk.ReadImage(str(path))
    except RuntimeError as error:
        raise DataError(f"cannot be read as an image ({_first_line(error)})", path) from None


def _first_line(error: Exception) -> str:
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    return lines[-1] if lines else type(error).__name__


def _drop_time_axis(image: sitk.Image, path: Path) -> sitk.Image:
    if image.GetDimension() == 4:
        if image.GetSize()[3] != 1:
            raise DataError(
                f"4D images are not supported; extract one 3D volume first (size {image.GetSize()})", path
            )
        image = image[:, :, :, 0]
    components = image.GetNumberOfComponentsPerPixel()
    if image.GetDimension() == 3 and components > 1:
        raise DataError(f"3D images with {components} components per voxel are not supported", path)
    if image.GetDimension() == 2 and components not in (1, 3, 4):
        raise DataError(f"2D images with {components} components per pixel are not supported", path)
    return image


def _read_picture(path: Path, *, label: bool) -> VolumeImage:
    """PNG/JPEG/TIFF/BMP through Pillow, which keeps palette indices of label images intact."""
    from PIL import Image

    try:
        with Image.open(path) as picture:
            if getattr(picture, "n_frames", 1) > 1:
                raise DataError("multi-page images are not supported; save the stack as NRRD or NIfTI", path)
            if picture.mode in ("RGBA", "LA", "PA") or (picture.mode == "P" and not label):
                picture = picture.convert("RGB" if picture.mode != "LA" else "L")
            elif picture.mode not in ("1", "L", "P", "I", "I;16", "I;16B", "I;16L", "F", "RGB"):
                picture = picture.convert("RGB")
            array = np.array(picture)
    except DataError:
        raise
    except Exception as error:  # Pillow raises many types for damaged files
        raise DataError(f"cannot be read as an image ({_first_line(error)})", path) from None
    if array.dtype == bool:
        array = array.astype(np.uint8)
    return VolumeImage(array, (1.0, 1.0), (0.0, 0.0), (1.0, 0.0, 0.0, 1.0), path)


def _check_finite(image: VolumeImage) -> VolumeImage:
    if np.issubdtype(image.array.dtype, np.floating) and not np.isfinite(image.array).all():
        count = int(np.size(image.array) - np.isfinite(image.array).sum())
        raise DataError(f"image holds {count} NaN or infinite voxel(s)", image.path)
    return image


def read_image(path: str | Path) -> VolumeImage:
    """Read NIfTI, NRRD, MHA/MHD, DICOM (a series folder or one file) or a PNG/JPEG/TIFF/BMP picture.

    RGB pictures stay ``(y, x, 3)`` (alpha dropped); a 4D file with one time point becomes 3D.
    """
    path = Path(path)
    _check_file(path)
    if path.is_dir():
        image = _read_sitk(path)
    else:
        suffix = image_suffix(path)
        if suffix in PICTURE_SUFFIXES:
            return _check_finite(_read_picture(path, label=False))
        if suffix == SEGMENTATION_SUFFIX:
            raise DataError("a Slicer segmentation is a label map, not an image (use read_label_map)", path)
        if suffix not in VOLUME_SUFFIXES:
            raise _unsupported(path)
        image = _read_sitk(path)
    image = _drop_time_axis(image, path)
    if image.GetNumberOfComponentsPerPixel() == 4:
        image = sitk.Compose([sitk.VectorIndexSelectionCast(image, i) for i in range(3)])
    return _check_finite(VolumeImage.from_sitk(image, path))


def read_image_geometry(path: str | Path) -> ImageGeometry:
    """The grid of an image file, reading only its header (a DICOM series is read whole)."""
    path = Path(path)
    _check_file(path)
    suffix = image_suffix(path)
    if path.is_dir() or suffix == ".dcm":
        return read_image(path).geometry
    if suffix in PICTURE_SUFFIXES:
        from PIL import Image

        try:
            with Image.open(path) as picture:
                width, height = picture.size
        except Exception as error:
            raise DataError(f"cannot be read as an image ({_first_line(error)})", path) from None
        return ImageGeometry((height, width), (1.0, 1.0), (0.0, 0.0), (1.0, 0.0, 0.0, 1.0), path)
    if suffix == SEGMENTATION_SUFFIX:
        return _read_segmentation(path)[1]
    if suffix not in VOLUME_SUFFIXES:
        raise _unsupported(path)
    reader = sitk.ImageFileReader()
    reader.SetFileName(str(path))
    try:
        reader.ReadImageInformation()
    except RuntimeError as error:
        raise DataError(f"cannot be read as an image ({_first_line(error)})", path) from None
    size, n = reader.GetSize(), reader.GetDimension()
    if n == 4 and size[3] != 1:
        raise DataError(f"4D images are not supported; extract one 3D volume first (size {size})", path)
    n = min(n, 3)
    direction = np.reshape(reader.GetDirection(), (reader.GetDimension(),) * 2)[:n, :n]
    return ImageGeometry(
        tuple(reversed(size[:n])), reader.GetSpacing()[:n], reader.GetOrigin()[:n],
        tuple(direction.ravel()), path,
    )


def _write_atomically(path: Path, write: Callable[[Path], None]) -> None:
    """Write into a private folder next to ``path``, then move the result(s) into place.

    Formats with a separate data file (``.mhd`` + ``.raw``) refer to it by name, so the files are
    written under their final names and moved data-first, header last.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{path.name}.", dir=path.parent))
    try:
        write(staging / path.name)
        for produced in sorted(staging.iterdir(), key=lambda p: p.name == path.name):
            os.replace(produced, path.parent / produced.name)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def write_image(array: np.ndarray, reference: VolumeImage | ImageGeometry, path: str | Path) -> Path:
    """Write ``array`` with exactly the reference's size, spacing, origin and direction, atomically.

    The format follows the suffix. NIfTI stores the direction as single precision, so it comes back
    within ~1e-7 of the reference; NRRD and MHA keep it to double precision.
    """
    path = Path(path)
    geometry = _as_geometry(reference)
    suffix = image_suffix(path)
    if suffix not in VOLUME_SUFFIXES + PICTURE_SUFFIXES or suffix == ".dcm":
        raise _unsupported(path)
    array = np.asarray(array)
    if tuple(array.shape[: geometry.ndim]) != geometry.shape:
        raise DataError(f"array shape {array.shape} differs from the reference image shape {geometry.shape}", path)
    image = _sitk_on_grid(array, geometry)
    try:
        _write_atomically(
            path, lambda target: sitk.WriteImage(image, str(target), useCompression=suffix not in PICTURE_SUFFIXES)
        )
    except RuntimeError as error:
        raise DataError(f"cannot be written as {suffix} with pixel type {array.dtype} ({_first_line(error)})",
                        path) from None
    return path


# --------------------------------------------------------------------------------------------------
# Label maps
# --------------------------------------------------------------------------------------------------


def _names_match(a: str, b: str) -> bool:
    return a.strip().casefold() == b.strip().casefold()


def _read_segmentation(path: Path):
    """(slicerio segmentation, its geometry); the voxels are indexed (i, j, k[, layer first])."""
    import slicerio

    try:
        segmentation = slicerio.read_segmentation(str(path))
    except Exception as error:
        raise DataError(f"cannot be read as a Slicer segmentation ({_first_line(error)})", path) from None
    matrix = np.asarray(segmentation["ijkToLPS"], dtype=float)
    spacing = np.linalg.norm(matrix[:3, :3], axis=0)
    geometry = ImageGeometry(
        tuple(reversed(segmentation["voxels"].shape[-3:])), tuple(spacing), tuple(matrix[:3, 3]),
        tuple((matrix[:3, :3] / spacing).ravel()), path,
    )
    return segmentation, geometry


def _segmentation_labels(path: Path, reference: ImageGeometry | None, classes: Sequence[str] | None) -> np.ndarray:
    """Class-index array of a ``.seg.nrrd``, segments matched to ``classes`` by name (case-insensitive).

    A segmentation stored on another grid than the reference (Slicer may crop it to the segments'
    extent) is resampled onto the reference with nearest-neighbour interpolation.
    """
    segmentation, geometry = _read_segmentation(path)
    segments = segmentation.get("segments", [])
    names = [segment.get("name", segment.get("id", "")) for segment in segments]
    classes = list(classes) if classes is not None else names
    voxels = segmentation["voxels"]
    labels = np.zeros(voxels.shape[-3:], dtype=np.uint8)
    for segment, name in zip(segments, names):
        index = next((i for i, c in enumerate(classes) if _names_match(c, name)), None)
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
        grid = sitk.Image([int(s) for s in reversed(reference.shape)], sitk.sitkUInt8)
        grid.SetSpacing(reference.spacing)
        grid.SetOrigin(reference.origin)
        grid.SetDirection(reference.direction)
        resampled = sitk.Resample(_sitk_on_grid(labels, geometry), grid, sitk.Transform(), sitk.sitkNearestNeighbor, 0)
        labels = sitk.GetArrayFromImage(resampled)
    return labels


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
    _check_file(path)
    if num_classes is None and classes is not None:
        num_classes = len(classes)
    geometry = _as_geometry(reference) if reference is not None else None
    suffix = image_suffix(path)
    if suffix == SEGMENTATION_SUFFIX:
        labels = _segmentation_labels(path, geometry, classes)
        if num_classes is not None and labels.max(initial=0) > num_classes:
            raise DataError(f"labels {sorted(set(np.unique(labels)) - set(range(num_classes + 1)))} "
                            f"outside the class indices 0..{num_classes}", path)
    else:
        image = _read_picture(path, label=True) if suffix in PICTURE_SUFFIXES else read_image(path)
        labels = _class_indices(image, path, num_classes)
    if geometry is not None and labels.shape != geometry.shape:
        where = f" ({geometry.path})" if geometry.path is not None else ""
        raise DataError(f"mask shape {labels.shape} differs from image shape {geometry.shape}{where}", path)
    return labels


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
    geometry = _as_geometry(reference)
    labels = np.asarray(labels)
    if labels.shape != geometry.shape:
        raise DataError(f"label map shape {labels.shape} differs from the reference image shape {geometry.shape}", path)
    if labels.max(initial=0) > len(classes):
        raise DataError(f"label map holds value {int(labels.max())} but only {len(classes)} classes are named", path)
    if colors is not None and len(colors) != len(classes):
        raise DataError(f"{len(colors)} colors given for {len(classes)} classes", path)
    voxels = labels.astype(np.uint8).T  # (z, y, x) -> (i, j, k)
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
        "voxels": np.ascontiguousarray(voxels),
        "ijkToLPS": geometry.ijk_to_lps(),
        "segments": segments,
        "containedRepresentationNames": ["Binary labelmap"],
        "masterRepresentation": "Binary labelmap",
    }
    _write_atomically(path, lambda target: slicerio.write_segmentation(str(target), segmentation))
    return path


# --------------------------------------------------------------------------------------------------
# Intensity normalisation
# --------------------------------------------------------------------------------------------------

#: CT windows as (center, width) in Hounsfield units, the usual radiology presets.
CT_WINDOWS: dict[str, tuple[float, float]] = {
    "soft_tissue": (40.0, 400.0),
    "lung": (-600.0, 1500.0),
    "bone": (400.0, 1800.0),
    "brain": (40.0, 80.0),
    "liver": (60.0, 160.0),
}
_MODE_FIELDS = {
    "ct": {"mode", "window", "center", "width"},
    "percentile": {"mode", "lower", "upper"},
    "minmax": {"mode"},
    "rgb": {"mode"},
}


@dataclass
class IntensityNormalization:
    """Maps raw intensities to float32 in [0, 1]; stored in the model bundle so inference repeats it.

    Modes:
      * ``ct``: the window ``[center - width/2, center + width/2]`` (HU) mapped to [0, 1], clipped.
        ``window`` names a preset of :data:`CT_WINDOWS` (default ``soft_tissue``), or give ``center``
        and ``width`` for a custom window.
      * ``percentile``: the ``lower``/``upper`` percentiles (default 0.5/99.5) of the whole array passed
        to :meth:`apply` (pass the whole volume, not a slice) mapped to [0, 1], clipped. For MR,
        ultrasound and anything else without calibrated units.
      * ``minmax``: the array's minimum and maximum mapped to [0, 1].
      * ``rgb``: 8-bit values divided by 255.
    A constant array normalises to zeros.
    """

    mode: str = "percentile"
    window: str | None = None
    center: float | None = None
    width: float | None = None
    lower: float = 0.5
    upper: float = 99.5

    def __post_init__(self):
        if self.mode not in _MODE_FIELDS:
            raise ConfigError(f"intensity.mode: '{self.mode}' is not one of {sorted(_MODE_FIELDS)}")
        self.lower = _finite(self.lower, "intensity.lower")
        self.upper = _finite(self.upper, "intensity.upper")
        if not 0 <= self.lower < self.upper <= 100:
            raise ConfigError(
                f"intensity.lower/upper: need 0 <= lower < upper <= 100, got {self.lower} and {self.upper}"
            )
        if self.mode != "ct":
            for name in ("window", "center", "width"):
                if getattr(self, name) is not None:
                    raise ConfigError(f"intensity.{name} only applies to mode 'ct', not '{self.mode}'")
            return
        if (self.center is None) != (self.width is None):
            raise ConfigError("intensity.center and intensity.width must be given together")
        if self.window not in (None, "custom") and self.window not in CT_WINDOWS:
            raise ConfigError(f"intensity.window: '{self.window}' is not one of {sorted(CT_WINDOWS)} or 'custom'")
        if self.center is None:
            if self.window == "custom":
                raise ConfigError("intensity.window 'custom' needs intensity.center and intensity.width")
            self.window = self.window or "soft_tissue"
            self.center, self.width = CT_WINDOWS[self.window]
            return
        self.center = _finite(self.center, "intensity.center")
        self.width = _finite(self.width, "intensity.width")
        if self.width <= 0:
            raise ConfigError(f"intensity.width must be positive, got {self.width}")
        if self.window in CT_WINDOWS and CT_WINDOWS[self.window] != (self.center, self.width):
            raise ConfigError(
                f"intensity.window '{self.window}' is {CT_WINDOWS[self.window]}, not ({self.center}, {self.width})"
            )
        self.window = self.window or "custom"

    @classmethod
    def for_modality(cls, name: str | None) -> IntensityNormalization:
        """CT -> soft-tissue window; RGB/photo -> /255; anything else (MR, MRI, US, ...) -> percentile."""
        key = (name or "").strip().lower()
        if key == "ct":
            return cls("ct", window="soft_tissue")
        if key in ("rgb", "photo"):
            return cls("rgb")
        return cls("percentile")

    def to_dict(self) -> dict:
        return {key: getattr(self, key) for key in ("mode", "window", "center", "width", "lower", "upper")
                if key in _MODE_FIELDS[self.mode]}

    @classmethod
    def from_dict(cls, data: Mapping) -> IntensityNormalization:
        if not isinstance(data, Mapping):
            raise ConfigError(f"intensity: expected a dict, got {type(data).__name__}")
        mode = data.get("mode", "percentile")
        if mode not in _MODE_FIELDS:
            raise ConfigError(f"intensity.mode: '{mode}' is not one of {sorted(_MODE_FIELDS)}")
        unknown = set(data) - _MODE_FIELDS.get(mode, set(data))
        if unknown:
            raise ConfigError(
                f"intensity.{sorted(unknown)[0]}: not a field of mode '{mode}' (fields: {sorted(_MODE_FIELDS[mode])})"
            )
        return cls(**data)

    def bounds(self, array: np.ndarray) -> tuple[float, float]:
        """The raw intensities mapped to 0 and 1 for this array (every mode is a clipped linear map).

        Inference computes them once per volume and applies the map on the device, slice batch by
        slice batch.
        """
        if self.mode == "rgb":
            return 0.0, 255.0
        if self.mode == "ct":
            return self.center - self.width / 2, self.center + self.width / 2
        values = np.asarray(array)
        if self.mode == "percentile":
            low, high = np.percentile(values, [self.lower, self.upper])
            return float(low), float(high)
        return float(values.min()), float(values.max())

    def apply(self, array: np.ndarray) -> np.ndarray:
        values = np.asarray(array, dtype=np.float32)
        low, high = self.bounds(values)
        if high <= low:
            return np.zeros_like(values)
        out = (values - np.float32(low)) / np.float32(high - low)
        return np.clip(out, 0.0, 1.0, out=out)


def _finite(value, name: str) -> float:
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise ConfigError(f"{name}: expected a number, got {value!r}") from None
    if not np.isfinite(number):
        raise ConfigError(f"{name}: expected a finite number, got {value!r}")
    return number


# --------------------------------------------------------------------------------------------------
# Slicing and resizing
# --------------------------------------------------------------------------------------------------

#: Physical (LPS) axis each view of :data:`~cotexnet.config.SLICE_AXES` is perpendicular to.
_NORMAL_AXIS = dict(zip(SLICE_AXES, (2, 1, 0)))


def slice_axis_index(direction: Sequence[float], name: str) -> int:
    """Array axis (SimpleITK order, z first) to slice along for an axial/coronal/sagittal view.

    The three index axes are matched to the L-R, A-P and S-I directions as one assignment that
    maximises the alignment, so oblique volumes still get three distinct axes.
    """
    if name not in _NORMAL_AXIS:
        raise ConfigError(f"slice_axis: '{name}' is not one of {sorted(SLICE_AXES)}")
    alignment = np.abs(np.reshape(np.asarray(direction, dtype=float), (3, 3)))  # [physical, index axis]
    best = max(itertools.permutations(range(3)), key=lambda perm: sum(alignment[p, perm[p]] for p in range(3)))
    return 2 - best[_NORMAL_AXIS[name]]


def _slice_axis(image: VolumeImage | ImageGeometry, axis: str | int) -> int | None:
    if image.ndim == 2:
        return None
    return axis if isinstance(axis, int) else slice_axis_index(image.direction, axis)


def volume_slices(image: VolumeImage, axis: str | int = "axial") -> np.ndarray:
    """The image as a stack of 2D slices ``(N, H, W[, 3])`` (a view); a 2D image is one slice.

    ``axis`` is a view name (see :func:`slice_axis_index`) or an array axis.
    """
    index = _slice_axis(image, axis)
    return image.array[None] if index is None else np.moveaxis(image.array, index, 0)


def stack_slices(slices: np.ndarray, image: VolumeImage | ImageGeometry, axis: str | int = "axial") -> np.ndarray:
    """Inverse of :func:`volume_slices`: per-slice results ``(N, H, W)`` back into the image's shape."""
    index = _slice_axis(image, axis)
    return slices[0] if index is None else np.moveaxis(slices, 0, index)


def in_plane_spacing(image: VolumeImage | ImageGeometry, axis: str | int = "axial") -> tuple[float, float]:
    """Pixel spacing (rows, columns) in mm of the slices :func:`volume_slices` returns."""
    index = _slice_axis(image, axis)
    if index is None:
        return image.spacing[1], image.spacing[0]
    rows, cols = (a for a in range(3) if a != index)
    return image.spacing[2 - rows], image.spacing[2 - cols]


def resize_slices(batch: torch.Tensor, size: int | Sequence[int], mode: str = "bilinear") -> torch.Tensor:
    """Resize a batch of slices; the one place images meet the model size.

    ``bilinear`` (antialiased when shrinking) for images ``(B, C, H, W)``; ``nearest`` for label maps
    ``(B, H, W)`` (or ``(B, C, H, W)``), which keeps their dtype and values.
    """
    size = (int(size), int(size)) if isinstance(size, int) else tuple(int(s) for s in size)
    if tuple(batch.shape[-2:]) == size:
        return batch
    if mode == "bilinear":
        values = batch if batch.dtype in (torch.float32, torch.float64) else batch.float()
        out = F.interpolate(values, size=size, mode="bilinear", align_corners=False, antialias=True)
        return out.to(batch.dtype)
    if mode == "nearest":
        values = batch[:, None] if batch.ndim == 3 else batch
        out = F.interpolate(values.float(), size=size, mode="nearest-exact").to(batch.dtype)
        return out[:, 0] if batch.ndim == 3 else out
    raise ValueError(f"resize mode '{mode}' is not 'bilinear' or 'nearest'")


# --------------------------------------------------------------------------------------------------
# Datasets
# --------------------------------------------------------------------------------------------------

_GROUP = re.compile(r"^(.*?\d)_(?=.*[A-Za-z])")


def case_group(case_id: str) -> str:
    """The patient a case belongs to, so that splits never separate a patient's cases.

    The group is the case id up to the first ``_`` that follows a digit and is followed by text with a
    letter: ``patient001_frame01`` -> ``patient001``, ``patient0001_2CH_ED`` -> ``patient0001``. Ids without
    such a suffix (``liver_12``, ``BraTS2021_00001``, ``ISIC_0000000``) are their own group.
    """
    match = _GROUP.match(case_id)
    return match.group(1) if match else case_id


@dataclass(frozen=True)
class Case:
    case_id: str
    image_path: Path
    label_path: Path | None
    group: str


@dataclass
class DatasetIndex:
    """The cases of a dataset and what it says about itself; no voxels are held."""

    root: Path
    format: str  # "folder", "nnunet" or "msd"
    classes: list[str]
    cases: list[Case]
    modality: str | None = None
    split: dict[str, list[str]] | None = None  # from a split file, if the dataset has one
    unlabeled: list[Case] = field(default_factory=list)  # e.g. nnU-Net imagesTs

    def case(self, case_id: str) -> Case:
        for case in self.cases:
            if case.case_id == case_id:
                return case
        raise DataError(f"no case '{case_id}' in the dataset", self.root)


def _image_files(folder: Path) -> dict[str, Path]:
    """Supported images (files, or DICOM series folders) in ``folder`` by stem; others are skipped."""
    found: dict[str, Path] = {}
    for path in sorted(folder.iterdir()):
        if path.name.startswith("."):
            continue
        suffix = image_suffix(path)
        if not path.is_dir() and suffix not in VOLUME_SUFFIXES + PICTURE_SUFFIXES + (SEGMENTATION_SUFFIX,):
            continue
        stem = path.name if path.is_dir() else _strip_suffix(path)
        if stem in found:
            raise DataError(f"two files for the same case: {found[stem].name} and {path.name}", folder)
        found[stem] = path
    return found


def _pair(images: dict[str, Path], masks: dict[str, Path], masks_dir: Path) -> list[Case]:
    missing = sorted(set(images) - set(masks))
    if missing:
        raise DataError(f"no mask for this image in {masks_dir} (expected a file named '{missing[0]}.*')",
                        images[missing[0]])
    orphans = sorted(set(masks) - set(images))
    if orphans:
        raise DataError("mask without an image of the same name", masks[orphans[0]])
    return [Case(stem, images[stem], masks[stem], case_group(stem)) for stem in sorted(images)]


def _check_shapes(cases: Iterable[Case]) -> None:
    """Header-only check that each mask fits its image (a .seg.nrrd is resampled, so it is skipped)."""
    for case in cases:
        image = read_image_geometry(case.image_path)
        if image_suffix(case.label_path) == SEGMENTATION_SUFFIX:
            continue
        mask = read_image_geometry(case.label_path)
        if mask.shape != image.shape:
            raise DataError(f"mask shape {mask.shape} differs from image shape {image.shape} ({case.image_path})",
                            case.label_path)


def _read_json(path: Path):
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise DataError(f"cannot be read as JSON ({error})", path) from None


def _ordered_classes(by_value: dict[int, str], path: Path) -> list[str]:
    """Foreground class names ordered by label value, which must run 1..n."""
    values = sorted(v for v in by_value if v != 0)
    if values != list(range(1, len(values) + 1)):
        raise DataError(f"label values must be 0..n without gaps, got {sorted(by_value)}", path)
    if any(name.strip().lower() == "ignore" for name in by_value.values()):
        raise DataError("an 'ignore' label is not supported", path)
    return [by_value[v] for v in values]


def _load_nnunet(root: Path, meta: dict, json_path: Path) -> tuple[list[Case], list[str], str | None, list[Case]]:
    labels = meta.get("labels")
    if not isinstance(labels, dict) or not all(isinstance(v, int) for v in labels.values()):
        raise DataError("'labels' must map names to integer values (region-based labels are not supported)",
                        json_path)
    classes = _ordered_classes({v: k for k, v in labels.items()}, json_path)
    ending = meta["file_ending"]
    channels = meta.get("channel_names") or meta.get("modality") or {}
    if len(channels) > 1:
        logger.warning("%s: %d channels; CoTexNet uses channel 0 (%s) only", json_path, len(channels),
                       channels.get("0"))
    images_dir, labels_dir = root / "imagesTr", root / "labelsTr"
    for folder in (images_dir, labels_dir):
        if not folder.is_dir():
            raise DataError("folder not found (nnU-Net v2 raw layout needs imagesTr/ and labelsTr/)", folder)

    def channel0(folder: Path) -> dict[str, Path]:
        suffix = "_0000" + ending
        return {p.name[: -len(suffix)]: p for p in sorted(folder.iterdir()) if p.name.endswith(suffix)}

    masks = {p.name[: -len(ending)]: p for p in sorted(labels_dir.iterdir()) if p.name.endswith(ending)}
    cases = _pair(channel0(images_dir), masks, labels_dir)
    expected = meta.get("numTraining")
    if cases and isinstance(expected, int) and expected != len(cases):
        raise DataError(f"numTraining is {expected} but imagesTr/labelsTr hold {len(cases)} cases", json_path)
    tests = channel0(root / "imagesTs") if (root / "imagesTs").is_dir() else {}
    unlabeled = [Case(cid, path, None, case_group(cid)) for cid, path in tests.items()]
    return cases, classes, channels.get("0"), unlabeled


def _load_msd(root: Path, meta: dict, json_path: Path) -> tuple[list[Case], list[str], str | None, list[Case]]:
    try:
        classes = _ordered_classes({int(k): v for k, v in meta["labels"].items()}, json_path)
    except (KeyError, ValueError, AttributeError):
        raise DataError("'labels' must map label values to names, e.g. {\"0\": \"background\", \"1\": \"liver\"}",
                        json_path) from None

    def resolve(entry: str) -> Path:
        path = (root / entry).resolve()
        if not path.exists():
            raise DataError(f"file listed in {json_path.name} not found", path)
        return path

    if not isinstance(meta["training"], list):
        raise DataError("'training' must be a list of {\"image\": ..., \"label\": ...} entries", json_path)
    cases = []
    for item in meta["training"]:
        if not isinstance(item, dict) or "image" not in item:
            raise DataError(f"training entries need 'image' and 'label', got {item!r}", json_path)
        image = resolve(item["image"])
        if not item.get("label"):
            raise DataError(f"no mask for this image in {json_path.name}", image)
        case_id = _strip_suffix(image)
        cases.append(Case(case_id, image, resolve(item["label"]), case_group(case_id)))
    unlabeled = []
    for entry in meta.get("test", []):
        image = resolve(entry if isinstance(entry, str) else entry["image"])
        unlabeled.append(Case(_strip_suffix(image), image, None, case_group(_strip_suffix(image))))
    modality = meta.get("modality")
    return cases, classes, modality.get("0") if isinstance(modality, dict) else modality, unlabeled


def _seg_classes(cases: list[Case]) -> list[str] | None:
    """Class names of a folder dataset whose masks are ``.seg.nrrd``: the first file's segment names."""
    for case in cases:
        if image_suffix(case.label_path) == SEGMENTATION_SUFFIX:
            segmentation, _ = _read_segmentation(case.label_path)
            return [s.get("name", s.get("id")) for s in segmentation.get("segments", [])]
    return None


def _split_from_files(index: DatasetIndex) -> dict[str, list[str]] | None:
    """``split.json`` ({"train": [...], "val": [...], "test": [...]}) or nnU-Net ``splits_final.json`` fold 0."""
    path = index.root / "split.json"
    if path.is_file():
        return load_split(path, index)
    path = index.root / "splits_final.json"
    if not path.is_file():
        return None
    folds = _read_json(path)
    if not isinstance(folds, list) or not folds or not isinstance(folds[0], dict):
        raise DataError("expected a list of folds, each {\"train\": [...], \"val\": [...]}", path)
    split = _validated_split({"train": folds[0].get("train", []), "val": folds[0].get("val", [])}, path)
    _check_split_ids(split, index, path)
    return split


def load_dataset(path: str | Path, classes: Sequence[str] | None = None) -> DatasetIndex:
    """Index a dataset folder without reading voxels (headers are read to check mask shapes).

    Layouts: ``images/`` + ``masks/`` (same names; 2D pictures or volumes, DICOM series folders as
    images, ``.seg.nrrd`` masks); nnU-Net v2 raw (``dataset.json`` with ``labels`` and ``file_ending``);
    MSD (``dataset.json`` with ``training``). Label values are checked when masks are read.
    """
    root = Path(path)
    if not root.is_dir():
        raise DataError("dataset folder not found", root)
    json_path = root / "dataset.json"
    modality, unlabeled = None, []
    if json_path.is_file():
        meta = _read_json(json_path)
        if not isinstance(meta, dict):
            raise DataError("expected a JSON object", json_path)
        if "file_ending" in meta:
            format_name = "nnunet"
            cases, found, modality, unlabeled = _load_nnunet(root, meta, json_path)
        elif "training" in meta:
            format_name = "msd"
            cases, found, modality, unlabeled = _load_msd(root, meta, json_path)
        else:
            raise DataError("neither nnU-Net v2 ('file_ending') nor MSD ('training') dataset.json", json_path)
        if classes is not None and (len(classes) != len(found) or not all(map(_names_match, classes, found))):
            raise DataError(f"class names {list(classes)} don't match dataset.json labels {found}", json_path)
        classes = list(classes) if classes is not None else found
    elif (root / "images").is_dir() and (root / "masks").is_dir():
        format_name = "folder"
        cases = _pair(_image_files(root / "images"), _image_files(root / "masks"), root / "masks")
        classes = list(classes) if classes is not None else _seg_classes(cases)
        if not classes:
            raise DataError("class names are needed for an images/ + masks/ dataset (pass classes)", root)
    else:
        raise DataError("not a dataset: expected images/ and masks/ folders, or a dataset.json "
                        "(nnU-Net v2 raw or Medical Segmentation Decathlon)", root)
    if not cases:
        raise DataError("dataset holds no cases (no image with a mask)", root)
    _check_shapes(cases)
    index = DatasetIndex(root, format_name, list(classes), cases, modality, None, unlabeled)
    index.split = _split_from_files(index)
    return index


# --------------------------------------------------------------------------------------------------
# Splits
# --------------------------------------------------------------------------------------------------


def make_split(cases: Sequence[Case], seed: int = 0, fractions: Sequence[float] = (0.8, 0.1, 0.1)
               ) -> dict[str, list[str]]:
    """Seeded train/val/test split by group (patient), so no group straddles two splits.

    Fractions count groups, not cases. With 3 or more groups, val and test get at least one each;
    with 2 groups, train and val get one each; one group goes to train.
    """
    groups = sorted({case.group for case in cases})
    random.Random(seed).shuffle(groups)
    n = len(groups)
    n_val = max(1, round(n * fractions[1])) if n >= 2 else 0
    n_test = max(1, round(n * fractions[2])) if n >= 3 else 0
    assigned = {g: "val" for g in groups[:n_val]}
    assigned.update({g: "test" for g in groups[n_val:n_val + n_test]})
    split: dict[str, list[str]] = {name: [] for name in SPLIT_NAMES}
    for case in cases:
        split[assigned.get(case.group, "train")].append(case.case_id)
    return split


def split_cases(index: DatasetIndex, seed: int = 0) -> dict[str, list[str]]:
    """The dataset's own split if it has a split file, else :func:`make_split`."""
    return index.split if index.split is not None else make_split(index.cases, seed)


def _validated_split(data, path: Path) -> dict[str, list[str]]:
    if not isinstance(data, dict) or not set(data) <= set(SPLIT_NAMES):
        raise DataError(f"a split is a JSON object with keys {list(SPLIT_NAMES)}", path)
    split = {name: list(data.get(name, [])) for name in SPLIT_NAMES}
    seen: dict[str, str] = {}
    for name, ids in split.items():
        for case_id in ids:
            if not isinstance(case_id, str):
                raise DataError(f"'{name}' holds {case_id!r}; case ids are strings", path)
            if case_id in seen:
                raise DataError(f"case '{case_id}' is in both '{seen[case_id]}' and '{name}'", path)
            seen[case_id] = name
    return split


def _check_split_ids(split: Mapping[str, list[str]], index: DatasetIndex, path: Path) -> None:
    known = {case.case_id for case in index.cases}
    unknown = sorted({cid for ids in split.values() for cid in ids} - known)
    if unknown:
        raise DataError(f"split names cases that are not in the dataset: {unknown[:10]}", path)


def save_split(split: Mapping[str, Sequence[str]], path: str | Path) -> Path:
    path = Path(path)
    data = _validated_split({k: list(v) for k, v in split.items()}, path)
    write_json_atomic(path, data)
    return path


def load_split(path: str | Path, index: DatasetIndex | None = None) -> dict[str, list[str]]:
    """Read a split file; with ``index``, every case id must belong to the dataset."""
    path = Path(path)
    _check_file(path)
    split = _validated_split(_read_json(path), path)
    if index is not None:
        _check_split_ids(split, index, path)
    return split


# --------------------------------------------------------------------------------------------------
# Training slices
# --------------------------------------------------------------------------------------------------


class SliceDataset(Dataset):
    """2D training items from a dataset's volumes and pictures, at the model size.

    Every slice with foreground is kept, plus a seeded ``empty_fraction`` of the slices without any.
    Labels are read (and checked) once at construction and kept at the model size; each image is read
    and normalised once, on first use, and its kept slices are cached at the model size as float16.
    Memory is therefore about ``(2 * C + 1) * S * S`` bytes per kept slice (C = 1 grayscale, 3 RGB),
    independent of the volumes' size; each DataLoader worker holds its own cache. Pass the ``split``
    you save with the model; without one, :func:`split_cases` is used with ``seed``.

    Items: ``image`` float32 (3, S, S) in [0, 1] (grayscale replicated), ``label`` int64 (S, S),
    ``case`` id, ``index`` slice index along the slicing axis, ``spacing`` float32 (2,) in-plane mm.
    """

    def __init__(
        self,
        index: DatasetIndex,
        subset: str | Sequence[str] | None = "train",
        *,
        normalization: IntensityNormalization,
        split: Mapping[str, Sequence[str]] | None = None,
        axis: str = "axial",
        image_size: int = 352,
        empty_fraction: float = 0.1,
        seed: int = 0,
    ):
        if not 0.0 <= empty_fraction <= 1.0:
            raise ConfigError(f"empty_fraction must lie in [0, 1], got {empty_fraction}")
        if subset is None:
            case_ids = [case.case_id for case in index.cases]
        else:
            split = split if split is not None else split_cases(index, seed)
            names = [subset] if isinstance(subset, str) else list(subset)
            for name in names:
                if name not in split:
                    raise ConfigError(f"subset '{name}' is not one of the split's parts {sorted(split)}")
            case_ids = [cid for name in names for cid in split[name]]
        self.normalization = normalization
        self.axis = axis
        self.image_size = image_size
        by_id = {case.case_id: case for case in index.cases}
        unknown = [cid for cid in case_ids if cid not in by_id]
        if unknown:
            raise DataError(f"cases {unknown[:10]} are not in the dataset", index.root)
        self.cases = [by_id[cid] for cid in case_ids]
        self.num_classes = len(index.classes)
        rng = np.random.default_rng(seed)
        self.slices: list[tuple[int, int]] = []  # (case position, slice index)
        self._spacing: list[tuple[float, float]] = []
        self._labels: list[torch.Tensor] = []  # per case: (kept, S, S) uint8
        self._rows: list[dict[int, int]] = []  # per case: slice index -> row in the caches
        self._images: dict[int, torch.Tensor] = {}  # per case: (kept, C, S, S) float16
        for position, case in enumerate(self.cases):
            geometry = read_image_geometry(case.image_path)
            labels = read_label_map(case.label_path, geometry, classes=index.classes)
            stack = volume_slices(VolumeImage(labels, geometry.spacing, geometry.origin, geometry.direction), axis)
            foreground = stack.reshape(len(stack), -1).any(axis=1)
            empty = np.flatnonzero(~foreground)
            keep_empty = rng.choice(empty, size=round(empty_fraction * len(empty)), replace=False)
            kept = np.sort(np.concatenate([np.flatnonzero(foreground), keep_empty])).astype(int)
            self._rows.append({int(s): row for row, s in enumerate(kept)})
            self._labels.append(resize_slices(torch.from_numpy(np.ascontiguousarray(stack[kept])), image_size,
                                              "nearest"))
            self._spacing.append(in_plane_spacing(geometry, axis))
            self.slices.extend((position, int(s)) for s in kept)

    def __len__(self) -> int:
        return len(self.slices)

    def _case_images(self, position: int) -> torch.Tensor:
        if position not in self._images:
            image = read_image(self.cases[position].image_path)
            normalized = VolumeImage(self.normalization.apply(image.array), image.spacing, image.origin,
                                     image.direction)
            stack = volume_slices(normalized, self.axis)
            kept = stack[sorted(self._rows[position])]
            tensor = torch.from_numpy(np.ascontiguousarray(kept))
            tensor = tensor.permute(0, 3, 1, 2) if tensor.ndim == 4 else tensor[:, None]
            self._images[position] = resize_slices(tensor, self.image_size, "bilinear").to(torch.float16)
        return self._images[position]

    def __getitem__(self, item: int) -> dict:
        position, slice_index = self.slices[item]
        row = self._rows[position][slice_index]
        image = self._case_images(position)[row].float()
        return {
            "image": image.expand(3, -1, -1).contiguous() if image.shape[0] == 1 else image,
            "label": self._labels[position][row].long(),
            "case": self.cases[position].case_id,
            "index": slice_index,
            "spacing": torch.tensor(self._spacing[position], dtype=torch.float32),
        }


# --------------------------------------------------------------------------------------------------
# Augmentation
# --------------------------------------------------------------------------------------------------


def _crop_or_pad(tensor: torch.Tensor, size: tuple[int, int], offsets: Sequence[float]) -> torch.Tensor:
    """Crop or zero-pad the last two dims to ``size``; ``offsets`` in [0, 1) place the window."""
    for dim, (target, offset) in enumerate(zip(size, offsets), start=tensor.ndim - 2):
        current = tensor.shape[dim]
        start = int(offset * (abs(current - target) + 1))
        if current > target:
            tensor = tensor.narrow(dim, start, target)
        elif current < target:
            pad = [0, 0] * (tensor.ndim - 1 - dim) + [start, target - current - start]
            tensor = F.pad(tensor, pad)
    return tensor


def augment_batch(
    images: torch.Tensor,
    labels: torch.Tensor,
    generator: torch.Generator | None = None,
    scale: tuple[float, float] = (0.95, 1.2),
    flips: bool = True,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Random zoom (``scale``, then crop or zero-pad back), horizontal and vertical flips, per sample.

    The same transform is applied to ``images`` (B, C, H, W) and ``labels`` (B, H, W); labels are
    resized nearest. Works on any device; ``generator`` is a CPU generator. ``flips=False`` keeps the
    zoom only (the random draws stay the same, so a seed gives the same zoom either way).
    """
    size = tuple(images.shape[-2:])
    draws = torch.rand(images.shape[0], 5, generator=generator).tolist()
    out_images, out_labels = [], []
    for b, (zoom, dy, dx, flip_h, flip_v) in enumerate(draws):
        factor = scale[0] + (scale[1] - scale[0]) * zoom
        zoomed = (max(1, round(size[0] * factor)), max(1, round(size[1] * factor)))
        image = _crop_or_pad(resize_slices(images[b:b + 1], zoomed, "bilinear"), size, (dy, dx))
        label = _crop_or_pad(resize_slices(labels[b:b + 1], zoomed, "nearest"), size, (dy, dx))
        dims = [d for d, draw in ((-1, flip_h), (-2, flip_v)) if flips and draw < 0.5]
        if dims:
            image, label = image.flip(dims), label.flip(dims)
        out_images.append(image)
        out_labels.append(label)
    return torch.cat(out_images), torch.cat(out_labels)
