"""Image files: suffixes, geometry, reading and writing with SimpleITK (and Pillow for pictures). No torch.

Conventions (those of SimpleITK, which reads every volume format here):

* arrays: 3D ``(z, y, x)``; 2D ``(y, x)``, or ``(y, x, 3)`` for RGB;
* geometry: ``spacing``, ``origin`` and ``direction`` (row-major, column ``i`` is the physical direction
  of index axis ``i``) are x-first, in LPS millimetres.

A Slicer ``.seg.nrrd`` is read here as a file (its voxels and grid, through slicerio); what its segments
mean as classes is :mod:`.labels`' job.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from ..atomic import write_files_atomic
from ..errors import DataError, error_summary
from .nifti import NiftiGrid, quiet_itk, read_nifti, read_nifti_grid

logger = logging.getLogger(__name__)

VOLUME_SUFFIXES = (".nii.gz", ".nii", ".nrrd", ".nhdr", ".mha", ".mhd", ".dcm")
PICTURE_SUFFIXES = (".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp")
SEGMENTATION_SUFFIX = ".seg.nrrd"
LOSSY_SUFFIXES = (".jpg", ".jpeg")
NIFTI_SUFFIXES = (".nii", ".nii.gz")


def image_suffix(path: str | Path) -> str:
    """Lower-case file suffix, keeping the compound ones (``.nii.gz``, ``.seg.nrrd``) whole."""
    name = Path(path).name.lower()
    for compound in (SEGMENTATION_SUFFIX, ".nii.gz"):
        if name.endswith(compound):
            return compound
    return Path(name).suffix


def strip_suffix(path: Path) -> str:
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

    def placement_difference(self, other: ImageGeometry) -> str | None:
        """How ``other`` lies elsewhere in space than this grid (spacing, origin, direction), or None.

        Tolerances absorb the single precision NIfTI stores: spacing 1e-4 relative, origin a thousandth
        of the smallest voxel, direction cosines 1e-4.
        """
        if self.ndim != other.ndim:
            return f"{other.ndim}D vs {self.ndim}D"
        checks = (("spacing", np.allclose(self.spacing, other.spacing, rtol=1e-4, atol=0)),
                  ("origin", np.allclose(self.origin, other.origin, rtol=0, atol=1e-3 * min(self.spacing))),
                  ("direction", np.allclose(self.direction, other.direction, rtol=0, atol=1e-4)))
        for name, same in checks:
            if not same:
                ours, theirs = (tuple(round(v, 6) for v in getattr(g, name)) for g in (self, other))
                return f"{name} {theirs} vs the image's {ours}"
        return None


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
        return sitk_on_grid(self.array if array is None else np.asarray(array), self.geometry)


def sitk_on_grid(array: np.ndarray, geometry: ImageGeometry) -> sitk.Image:
    if tuple(array.shape[: geometry.ndim]) != geometry.shape:
        raise ValueError(f"array shape {array.shape} differs from image shape {geometry.shape}")
    if array.dtype == bool:
        array = array.astype(np.uint8)
    image = sitk.GetImageFromArray(array, isVector=array.ndim == geometry.ndim + 1)
    image.SetSpacing(geometry.spacing)
    image.SetOrigin(geometry.origin)
    image.SetDirection(geometry.direction)
    return image


def as_geometry(reference: VolumeImage | ImageGeometry) -> ImageGeometry:
    return reference.geometry if isinstance(reference, VolumeImage) else reference


def check_file(path: Path) -> None:
    """Refuse a missing or empty file, and anything that is neither a regular file nor a folder before it is
    opened: reading a FIFO or a device would wait forever (and hold the worker's segmentation slot)."""
    if not path.exists():
        if path.is_symlink():
            raise DataError("a symbolic link that leads nowhere (a loop of symbolic links, or a missing target)", path)
        raise DataError("file not found", path)
    if not (path.is_file() or path.is_dir()):
        raise DataError("is neither a regular file nor a folder (a FIFO, socket or device?); give an image file or "
                        "a DICOM series folder", path)
    if path.is_file() and path.stat().st_size == 0:
        raise DataError("file is empty", path)


def _unsupported(path: Path) -> DataError:
    supported = ", ".join(VOLUME_SUFFIXES + PICTURE_SUFFIXES + (SEGMENTATION_SUFFIX,))
    return DataError(
        f"unsupported file type '{image_suffix(path) or path.name}' (supported: {supported}, or a DICOM series folder)",
        path,
    )


@dataclass(frozen=True)
class DicomSeries:
    """One DICOM series of a folder, as :func:`list_dicom_series` finds it."""

    uid: str  # Series Instance UID (0020,000E)
    description: str  # Series Description (0008,103E), "" if none
    modality: str  # Modality (0008,0060), "" if none
    size: tuple[int, int, int]  # rows, columns, slices
    files: tuple[str, ...]

    def __str__(self) -> str:
        described = f", {self.description!r}" if self.description else ""
        return f"{self.uid} ({len(self.files)} files{described})"


def _series_header(uid: str, files: tuple[str, ...]) -> DicomSeries:
    """The series' description, modality and size, from the header of its first file."""
    reader = sitk.ImageFileReader()
    reader.SetFileName(files[0])
    try:
        with quiet_itk():
            reader.ReadImageInformation()
    except RuntimeError:
        return DicomSeries(uid, "", "", (0, 0, len(files)), files)

    def tag(key: str) -> str:
        return reader.GetMetaData(key).strip() if reader.HasMetaDataKey(key) else ""

    size = reader.GetSize()
    frames = size[2] if len(size) > 2 else 1  # a multi-frame file holds several slices
    return DicomSeries(uid, tag("0008|103e"), tag("0008|0060"), (size[1], size[0], frames * len(files)), files)


def list_dicom_series(folder: str | Path) -> list[DicomSeries]:
    """The DICOM series of a folder, the one with most files first (the one :func:`read_image` reads when
    not told which; GDCM's order breaks a tie). A folder with none is refused.

    ITK prints a warning of its own for a folder without a series; the error raised here says it once.
    """
    folder = Path(folder)
    check_file(folder)
    with quiet_itk():
        files = {uid: tuple(sitk.ImageSeriesReader.GetGDCMSeriesFileNames(str(folder), uid))
                 for uid in sitk.ImageSeriesReader.GetGDCMSeriesIDs(str(folder))}
    if not files:
        empty = not any(folder.iterdir())
        raise DataError("folder holds no DICOM series" + (" (it is empty)" if empty else ""), folder)
    return sorted((_series_header(uid, names) for uid, names in files.items()), key=lambda s: -len(s.files))


def _dicom_series_files(folder: Path, series_uid: str | None = None) -> list[str]:
    """Files of the series ``series_uid`` of ``folder``, or of its largest series; when not told which and
    the folder holds others, a warning says which was read and lists the others."""
    series = list_dicom_series(folder)
    if series_uid is not None:
        chosen = next((s for s in series if s.uid == series_uid), None)
        if chosen is None:
            raise DataError(f"holds no DICOM series {series_uid} (it holds: {'; '.join(map(str, series))})", folder)
    else:
        chosen = series[0]
        if len(series) > 1:
            others = "; ".join(map(str, series[1:]))
            logger.warning("%s: holds %d DICOM series; reading %s. Not read: %s. Choose one in the web app's dialog, "
                           "with read_image(folder, series_uid=...) (list_dicom_series lists them), or by giving a "
                           "folder of that series alone", folder, len(series), chosen, others)
    return list(chosen.files)


def _read_dicom_series(folder: Path, series_uid: str | None = None) -> sitk.Image:
    reader = sitk.ImageSeriesReader()
    reader.SetFileNames(_dicom_series_files(folder, series_uid))
    reader.MetaDataDictionaryArrayUpdateOn()
    with quiet_itk():  # its warning about uneven slices names no file; the check below does
        image = reader.Execute()
    if image.GetDimension() == 3 and image.GetSize()[2] == len(reader.GetFileNames()) > 1:  # a file per slice
        _check_slice_positions(image, reader, folder)
    return image


def _check_slice_positions(image: sitk.Image, reader: sitk.ImageSeriesReader, folder: Path) -> None:
    """Refuse a series whose slices do not lie on the uniform grid ITK puts them on (a missing slice, uneven
    spacing, two slices at one position, slices shifted sideways): each would be drawn out of place."""
    files = reader.GetFileNames()
    if not all(reader.HasMetaDataKey(i, "0020|0032") for i in range(len(files))):
        logger.warning("%s: the DICOM slices carry no Image Position (Patient) (0020,0032); they are stacked "
                       "%.3f mm apart, as ITK guesses", folder, image.GetSpacing()[2])
        return
    try:
        positions = np.array([[float(v) for v in reader.GetMetaData(i, "0020|0032").split("\\")]
                              for i in range(len(files))])
    except ValueError:
        raise DataError("a slice of the DICOM series has an invalid Image Position (Patient) (0020,0032); its "
                        "slices cannot be placed", folder) from None
    direction = np.reshape(image.GetDirection(), (3, 3))
    along = positions @ direction[:, 2]
    sideways = np.linalg.norm((positions - positions[0]) - np.outer(along - along[0], direction[:, 2]), axis=1)
    gaps = np.diff(along)
    step = float(np.median(gaps))  # ITK spreads the slices evenly over the series' extent instead
    tolerance = max(1e-3, 0.01 * abs(step))

    def name(i: int) -> str:
        return Path(files[i]).name

    same = np.flatnonzero(np.abs(gaps) < tolerance)
    if same.size:
        i = int(same[0])
        raise DataError(f"DICOM series has slices at duplicate positions ({same.size} pair(s); first: {name(i)} and "
                        f"{name(i + 1)}, both at {along[i]:.3f} mm along the slice normal); remove the duplicates",
                        folder)
    uneven = np.flatnonzero(np.abs(gaps - step) > tolerance)
    if uneven.size:
        i = int(uneven[0])
        missing = round(gaps[i] / step) - 1
        what = f"{missing} slice(s) missing" if missing >= 1 and abs(gaps[i] - (missing + 1) * step) <= tolerance \
            else "uneven slice spacing"
        raise DataError(f"DICOM series has {what}: {gaps[i]:.3f} mm between {name(i)} and {name(i + 1)} where the "
                        f"other slices are {step:.3f} mm apart ({uneven.size} uneven gap(s)); its slices would be "
                        f"drawn out of place, so it is refused", folder)
    if sideways.max() > tolerance:
        i = int(np.argmax(sideways))
        raise DataError(f"DICOM series slices are not stacked along their normal: {name(i)} is shifted "
                        f"{sideways[i]:.3f} mm sideways (gantry tilt?); resample it before use", folder)


def _read_sitk(path: Path, series_uid: str | None = None) -> sitk.Image:
    try:
        return _read_dicom_series(path, series_uid) if path.is_dir() else sitk.ReadImage(str(path))
    except RuntimeError as error:
        raise DataError(f"cannot be read as an image ({error_summary(error)})", path) from None


def _check_layout(size: tuple[int, ...], components: int, path: Path) -> None:
    """Refuse what is not one 2D or 3D image: several time points, or several components per 3D voxel."""
    if len(size) == 4 and size[3] != 1:
        raise DataError(f"4D images are not supported; extract one 3D volume first (size {size})", path)
    if len(size) >= 3 and components > 1:
        raise DataError(f"3D images with {components} components per voxel are not supported", path)
    if len(size) == 2 and components not in (1, 3, 4):
        raise DataError(f"2D images with {components} components per pixel are not supported", path)


def _one_image(image: sitk.Image, path: Path) -> sitk.Image:
    """The 2D or 3D image in a file: a time axis of one point dropped, RGBA made RGB."""
    _check_layout(image.GetSize(), image.GetNumberOfComponentsPerPixel(), path)
    if image.GetDimension() == 4:
        image = image[:, :, :, 0]
    if image.GetNumberOfComponentsPerPixel() == 4:
        image = sitk.Compose([sitk.VectorIndexSelectionCast(image, i) for i in range(3)])
    return image


def _nifti_placement(grid: NiftiGrid) -> tuple[tuple[float, ...], tuple[float, ...], tuple[float, ...]]:
    """(spacing, origin, direction) of a NIfTI grid's spatial axes (a time axis of one point dropped)."""
    n = min(len(grid.size), 3)
    direction = np.reshape(grid.direction, (len(grid.size),) * 2)[:n, :n]
    return grid.spacing[:n], grid.origin[:n], tuple(direction.ravel())


def _read_nifti_image(path: Path) -> VolumeImage:
    """A NIfTI through :func:`.nifti.read_nifti`: the named file's voxels, on ITK's grid, checked."""
    voxels, grid = read_nifti(path)
    if isinstance(voxels, sitk.Image):  # RGB, vectors: ITK's own layout
        array = sitk.GetArrayFromImage(_one_image(voxels, path))
    else:
        _check_layout(grid.size, 1, path)
        array = voxels[0] if len(grid.size) == 4 else voxels
    return VolumeImage(array, *_nifti_placement(grid), path)


def read_picture(path: Path, *, label: bool) -> VolumeImage:
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
        raise DataError(f"cannot be read as an image ({error_summary(error)})", path) from None
    if array.dtype == bool:
        array = array.astype(np.uint8)
    return VolumeImage(array, (1.0, 1.0), (0.0, 0.0), (1.0, 0.0, 0.0, 1.0), path)


def _check_finite(image: VolumeImage) -> VolumeImage:
    if np.issubdtype(image.array.dtype, np.floating) and not np.isfinite(image.array).all():
        count = int(np.size(image.array) - np.isfinite(image.array).sum())
        raise DataError(f"image holds {count} NaN or infinite voxel(s)", image.path)
    return image


def read_image(path: str | Path, series_uid: str | None = None) -> VolumeImage:
    """Read NIfTI, NRRD, MHA/MHD, DICOM (a series folder or one file) or a PNG/JPEG/TIFF/BMP picture.

    RGB pictures stay ``(y, x, 3)`` (alpha dropped); a 4D file with one time point becomes 3D. ``series_uid``
    chooses a series of a DICOM folder (:func:`list_dicom_series`); without it the largest is read.
    """
    path = Path(path)
    check_file(path)
    if series_uid is not None and not path.is_dir():
        raise DataError(f"a series UID ({series_uid}) chooses a series of a DICOM folder; this is a file", path)
    if path.is_dir():
        image = _read_sitk(path, series_uid)
    else:
        suffix = image_suffix(path)
        if suffix in PICTURE_SUFFIXES:
            return _check_finite(read_picture(path, label=False))
        if suffix == SEGMENTATION_SUFFIX:
            raise DataError("a Slicer segmentation is a label map, not an image (use read_label_map)", path)
        if suffix not in VOLUME_SUFFIXES:
            raise _unsupported(path)
        if suffix in NIFTI_SUFFIXES:  # SimpleITK would read a cut file as zeros, or a sibling file
            return _check_finite(_read_nifti_image(path))
        image = _read_sitk(path)
    return _check_finite(VolumeImage.from_sitk(_one_image(image, path), path))


def read_segmentation_file(path: Path):
    """(slicerio segmentation, its geometry); the voxels are indexed (i, j, k[, layer first])."""
    import slicerio

    try:
        segmentation = slicerio.read_segmentation(str(path))
    except Exception as error:
        raise DataError(f"cannot be read as a Slicer segmentation ({error_summary(error)})", path) from None
    matrix = np.asarray(segmentation["ijkToLPS"], dtype=float)
    spacing = np.linalg.norm(matrix[:3, :3], axis=0)
    geometry = ImageGeometry(
        tuple(reversed(segmentation["voxels"].shape[-3:])), tuple(spacing), tuple(matrix[:3, 3]),
        tuple((matrix[:3, :3] / spacing).ravel()), path,
    )
    return segmentation, geometry


def read_image_geometry(path: str | Path, series_uid: str | None = None) -> ImageGeometry:
    """The grid of an image file, reading only its header (a DICOM series is read whole; ``series_uid`` as
    in :func:`read_image`)."""
    path = Path(path)
    check_file(path)
    suffix = image_suffix(path)
    if path.is_dir() or suffix == ".dcm" or series_uid is not None:
        return read_image(path, series_uid).geometry
    if suffix in PICTURE_SUFFIXES:
        from PIL import Image

        try:
            with Image.open(path) as picture:
                width, height = picture.size
        except Exception as error:
            raise DataError(f"cannot be read as an image ({error_summary(error)})", path) from None
        return ImageGeometry((height, width), (1.0, 1.0), (0.0, 0.0), (1.0, 0.0, 0.0, 1.0), path)
    if suffix == SEGMENTATION_SUFFIX:
        return read_segmentation_file(path)[1]
    if suffix not in VOLUME_SUFFIXES:
        raise _unsupported(path)
    if suffix in NIFTI_SUFFIXES:
        grid = read_nifti_grid(path)
        _check_layout(grid.size, 1, path)
        return ImageGeometry(tuple(reversed(grid.size[:3])), *_nifti_placement(grid), path)
    reader = sitk.ImageFileReader()
    reader.SetFileName(str(path))
    try:
        reader.ReadImageInformation()
    except RuntimeError as error:
        raise DataError(f"cannot be read as an image ({error_summary(error)})", path) from None
    size, n = reader.GetSize(), reader.GetDimension()
    if n == 4 and size[3] != 1:
        raise DataError(f"4D images are not supported; extract one 3D volume first (size {size})", path)
    n = min(n, 3)
    direction = np.reshape(reader.GetDirection(), (reader.GetDimension(),) * 2)[:n, :n]
    return ImageGeometry(
        tuple(reversed(size[:n])), reader.GetSpacing()[:n], reader.GetOrigin()[:n],
        tuple(direction.ravel()), path,
    )


#: zlib level of compressed outputs: 1, the fastest (a label map compresses well at any level; NRRD and
#: MHA at level 9 take ~14x longer for a ~4x smaller file). ITK's NIfTI writer takes no level (its own).
COMPRESSION_LEVEL = 1


def write_image(array: np.ndarray, reference: VolumeImage | ImageGeometry, path: str | Path) -> Path:
    """Write ``array`` with exactly the reference's size, spacing, origin and direction, atomically.

    The format follows the suffix. NIfTI stores the direction as single precision, so it comes back
    within ~1e-7 of the reference; NRRD and MHA keep it to double precision. The written file is read
    back before it replaces anything: its voxels must equal ``array`` and its grid the reference's.
    """
    path = Path(path)
    geometry = as_geometry(reference)
    suffix = image_suffix(path)
    if suffix not in VOLUME_SUFFIXES + PICTURE_SUFFIXES or suffix == ".dcm":
        raise _unsupported(path)
    array = np.asarray(array)
    if tuple(array.shape[: geometry.ndim]) != geometry.shape:
        raise DataError(f"array shape {array.shape} differs from the reference image shape {geometry.shape}", path)
    image = sitk_on_grid(array, geometry)
    picture = suffix in PICTURE_SUFFIXES

    def verify(target: Path) -> None:
        back = read_picture(target, label=True) if picture else read_image(target)
        if not np.array_equal(back.array, array):
            raise DataError("the written voxels differ from the label map", target)
        if not picture and not back.geometry.same_grid(geometry):
            raise DataError("the written grid differs from the reference image's", target)

    try:
        write_files_atomic(path, lambda target: sitk.WriteImage(image, str(target), not picture, COMPRESSION_LEVEL),
                           lambda target: check_written(path, target, verify))
    except RuntimeError as error:
        raise DataError(f"cannot be written as {suffix} with pixel type {array.dtype} ({error_summary(error)})",
                        path) from None
    return path


def check_written(path: Path, target: Path, verify) -> None:
    """Run ``verify(target)`` on a staged output; a difference is blamed on ``path``, with the likely cause."""
    try:
        verify(target)
    except DataError as error:
        reason = str(error).removeprefix(f"{target}: ")
        raise DataError(f"was not written completely (reading it back: {reason}); is the disk full or a file size "
                        f"limit reached? Nothing was replaced", path) from None
