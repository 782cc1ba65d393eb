"""NIfTI reading: the named file's bytes, decompressed once, checked, and placed as ITK places them.

SimpleITK (ITK's NIfTI library) reads a file cut short as a volume padded with zeros, opens
``scan.nii`` when asked for ``scan.nii.gz`` if both exist (it resolves the name itself), allocates what a
header promises before finding the file too short, and places a header that contradicts itself (a
valid sform with zero pixdim, negative pixdim without orientation codes) differently in its header
reader and its full reader. So the voxels are read here, from the named file only: the gzip stream is
inflated once, into a buffer no larger than the file can hold, with its CRC checked; the header is
checked against the file's size before anything is allocated. ITK reads only a copy of the header
(in a private folder, so it cannot find a sibling), to keep ITK's conventions for spacing, origin,
direction and pixel type; that geometry is normalised (spacing positive, its sign in the direction)
and checked against the file's own sform or qform, and refused where they disagree.
"""
from __future__ import annotations

import contextlib
import math
import struct
import tempfile
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from ..errors import DataError, error_summary

#: NIfTI datatype code -> (numpy dtype character, bytes per voxel) (NIfTI-1 standard, nifti1.h).
_DTYPES = {
    2: ("u1", 1), 4: ("i2", 2), 8: ("i4", 4), 16: ("f4", 4), 32: ("c8", 8), 64: ("f8", 8), 128: ("u1", 3),
    256: ("i1", 1), 512: ("u2", 2), 768: ("u4", 4), 1024: ("i8", 8), 1280: ("u8", 8), 1536: ("f16", 16),
    1792: ("c16", 16), 2048: ("c32", 32), 2304: ("u1", 4),
}
#: SimpleITK scalar pixel types -> numpy dtypes, for the voxels ITK would have produced.
_SITK_DTYPES = {
    sitk.sitkUInt8: np.uint8, sitk.sitkInt8: np.int8, sitk.sitkUInt16: np.uint16, sitk.sitkInt16: np.int16,
    sitk.sitkUInt32: np.uint32, sitk.sitkInt32: np.int32, sitk.sitkUInt64: np.uint64, sitk.sitkInt64: np.int64,
    sitk.sitkFloat32: np.float32, sitk.sitkFloat64: np.float64,
}
_GZIP_MAGIC = b"\x1f\x8b"
_MAX_DEFLATE_RATIO = 1032  # deflate cannot expand data more than this (RFC 1951 limits), plus a header's bytes
_CHUNK = 1 << 16  # compressed bytes inflated at a time: at most ~66 MB of output each


@contextlib.contextmanager
def quiet_itk():
    """Silence ITK's own warnings (printed to stderr with object addresses); the caller says what is wrong."""
    shown = sitk.ProcessObject.GetGlobalWarningDisplay()
    sitk.ProcessObject.SetGlobalWarningDisplay(False)
    try:
        yield
    finally:
        sitk.ProcessObject.SetGlobalWarningDisplay(shown)


class _Header:
    """The fields of a NIfTI-1 or NIfTI-2 header that say how many bytes of voxels follow, where, and where
    they lie in space."""

    def __init__(self, raw: bytes, path: Path):
        if len(raw) < 4:
            raise DataError("is not a NIfTI file: shorter than its header", path)
        for endian in "<>":
            size = struct.unpack(endian + "i", raw[:4])[0]
            if size in (348, 540):
                break
        else:
            raise DataError("is not a NIfTI file: the header size is neither 348 (NIfTI-1) nor 540 (NIfTI-2)", path)
        if len(raw) < size:
            raise DataError(f"is truncated: the file ends inside its {size}-byte NIfTI header", path)
        one = size == 348
        fields = ((40, "8h", 70, "2h", 76, "8f", 108, "f", 112, "2f", 252, "2h", 256, "6f", 280, "12f") if one else
                  (16, "8q", 12, "2h", 104, "8d", 168, "q", 176, "2d", 344, "2i", 352, "6d", 400, "12d"))
        (dims, types, pixdim, offset, scaling, codes, quaternion, srows) = (
            struct.unpack_from(endian + fmt, raw, at) for at, fmt in zip(fields[::2], fields[1::2]))
        ndim = dims[0]
        if not 1 <= ndim <= 7 or any(d < 1 for d in dims[1 : ndim + 1]):
            raise DataError(f"has an invalid NIfTI header: dim = {list(dims[: ndim + 1])}", path)
        datatype, bitpix = types
        self.offset = max(int(offset[0]), size + 4 if one else size)
        self.voxels = math.prod(int(d) for d in dims[1 : ndim + 1])
        code, voxel_bytes = _DTYPES.get(int(datatype), (None, int(bitpix) // 8))
        self.bytes = self.voxels * voxel_bytes
        self.dtype = np.dtype(endian + code) if code is not None else None
        self.pixdim = pixdim
        self.scale = scaling  # scl_slope, scl_inter
        self.qform_code, self.sform_code = codes
        self.quaternion, self.srows = quaternion, srows

    def placements(self) -> dict[str, np.ndarray]:
        """The voxel-to-LPS 4x4 matrices this header states: its sform and qform where their codes are set,
        else ITK's reading of a header without either (``x = pixdim * index``, zero pixdim counted as 1)."""
        ras_to_lps = np.diag([-1.0, -1.0, 1.0, 1.0])
        placements = {}
        if self.sform_code > 0:
            placements["sform"] = ras_to_lps @ np.vstack([np.reshape(self.srows, (3, 4)), [0, 0, 0, 1]])
        if self.qform_code > 0:
            b, c, d, *offset = self.quaternion
            a = math.sqrt(max(0.0, 1.0 - (b * b + c * c + d * d)))
            rotation = np.array([
                [a * a + b * b - c * c - d * d, 2 * (b * c - a * d), 2 * (b * d + a * c)],
                [2 * (b * c + a * d), a * a + c * c - b * b - d * d, 2 * (c * d - a * b)],
                [2 * (b * d - a * c), 2 * (c * d + a * b), a * a + d * d - b * b - c * c]])
            steps = [v if v > 0 else 1.0 for v in self.pixdim[1:4]]  # nifti1_io: non-positive steps count as 1
            steps[2] *= -1.0 if self.pixdim[0] < 0 else 1.0  # qfac
            matrix = np.eye(4)
            matrix[:3, :3], matrix[:3, 3] = rotation * steps, offset
            placements["qform"] = ras_to_lps @ matrix
        if not placements:
            placements["pixdim"] = np.diag([v if v != 0 else 1.0 for v in self.pixdim[1:4]] + [1.0])
        return placements


@dataclass
class NiftiGrid:
    """Where ITK puts a NIfTI's voxels (x-first, LPS, spacing positive) and the voxel layout it reads."""

    size: tuple[int, ...]
    spacing: tuple[float, ...]
    origin: tuple[float, ...]
    direction: tuple[float, ...]
    pixel_id: int
    components: int


def _gunzip_chunks(handle, path: Path):
    """The decompressed bytes of a gzip file (every member), chunk by chunk, its CRC checked."""
    decompressor = zlib.decompressobj(16 + zlib.MAX_WBITS)
    try:
        while True:
            data = handle.read(_CHUNK)
            if not data:
                if not decompressor.eof:
                    raise DataError("is truncated or corrupt: its gzip stream is incomplete", path)
                return
            while data:
                chunk = decompressor.decompress(data)
                if chunk:
                    yield chunk
                data = b""
                if decompressor.eof:
                    data = decompressor.unused_data
                    if not data.strip(b"\0"):  # zero padding after the last member
                        break
                    decompressor = zlib.decompressobj(16 + zlib.MAX_WBITS)
    except zlib.error as error:
        raise DataError(f"is truncated or corrupt: its gzip stream is damaged ({error})", path) from None


def _open_nifti(handle, path: Path):
    """(header, chunks of the decompressed stream or None for ``.nii``), the compression the name states checked
    against the file's first bytes."""
    compressed = path.name.lower().endswith(".gz")
    if compressed != (handle.read(2) == _GZIP_MAGIC):
        name, other = (".gz", "a plain NIfTI should be named .nii") if compressed else \
            (".nii", "a compressed NIfTI should be named .nii.gz")
        state = "not gzip-compressed" if compressed else "gzip-compressed"
        raise DataError(f"cannot be read as an image ({state}, although its name ends in {name}; {other})", path)
    handle.seek(0)
    if not compressed:
        return _Header(handle.read(540), path), None
    chunks, start = _gunzip_chunks(handle, path), b""
    for chunk in chunks:
        start += chunk
        if len(start) >= 540:
            break
    return _Header(start, path), (start, chunks)


def _check_size(header: _Header, path: Path, compressed: bool) -> None:
    """Refuse a header that promises more voxel data than the file can hold, before allocating it."""
    size = path.stat().st_size
    promised = header.offset + header.bytes
    holds = size * _MAX_DEFLATE_RATIO if compressed else size
    if promised > holds:
        what = f"a {size}-byte gzip stream can hold at most {holds}" if compressed else f"the file holds {size}"
        raise DataError(f"is truncated: its header promises {header.bytes} bytes of voxel data ({header.voxels} "
                        f"voxels) from byte {header.offset}, but {what}", path)


def _read_bytes(path: Path, header_only: bool) -> tuple[_Header, bytearray]:
    with path.open("rb") as handle:
        header, stream = _open_nifti(handle, path)
        _check_size(header, path, stream is not None)
        want = header.offset if header_only else header.offset + header.bytes
        buffer = bytearray(want)
        if stream is None:
            handle.seek(0)
            got = handle.readinto(buffer)
        else:
            start, chunks = stream
            got = min(len(start), want)
            buffer[:got] = start[:got]
            for chunk in chunks:
                take = min(len(chunk), want - got)
                buffer[got : got + take] = memoryview(chunk)[:take]
                got += take
                if header_only and got == want:
                    break
    if got < want:
        raise DataError(f"is truncated: its header promises {header.bytes} bytes of voxel data ({header.voxels} "
                        f"voxels) but the file holds {max(0, got - header.offset)}", path)
    return header, buffer


def _itk_error(error: RuntimeError, copy: Path, path: Path) -> DataError:
    """ITK's complaint about the private copy, told about the user's file."""
    return DataError(f"cannot be read as an image ({error_summary(error).replace(str(copy), path.name)})", path)


def _itk_grid(header: _Header, header_bytes: bytes, path: Path) -> NiftiGrid:
    """ITK's reading of this header (from a copy in a private folder), normalised and checked."""
    with tempfile.TemporaryDirectory(prefix="cotexnet-nifti-") as folder:
        copy = Path(folder) / "header.nii"
        copy.write_bytes(header_bytes)
        reader = sitk.ImageFileReader()
        reader.SetFileName(str(copy))
        try:
            with quiet_itk():
                reader.ReadImageInformation()
        except RuntimeError as error:
            raise _itk_error(error, copy, path) from None
    n = reader.GetDimension()
    spacing = np.array(reader.GetSpacing(), dtype=float)
    direction = np.reshape(reader.GetDirection(), (n, n)).copy()
    direction[:, spacing < 0] *= -1.0  # a negative step is a direction, as ITK's full reader (not its header reader) says
    spacing = np.abs(spacing)
    grid = NiftiGrid(tuple(reader.GetSize()), tuple(spacing), tuple(reader.GetOrigin()), tuple(direction.ravel() + 0.0),
                     reader.GetPixelID(), reader.GetNumberOfComponents())
    _check_placement(grid, header, path)
    return grid


def _check_placement(grid: NiftiGrid, header: _Header, path: Path) -> None:
    """Refuse a header whose sform/qform places the voxels elsewhere than ITK does (a valid sform with zero
    pixdim: ITK takes 1 mm steps); one stated placement that agrees is enough."""
    n = min(len(grid.spacing), 3)
    ours = _placement(np.reshape(grid.direction, (len(grid.spacing),) * 2)[:n, :n] * grid.spacing[:n],
                      grid.origin[:n])
    differences = {}
    for source, matrix in header.placements().items():
        stated = _placement(matrix[:n, :n], matrix[:n, 3])
        difference = next((f"{name} {tuple(round(float(v), 6) for v in ours[name])} but its {source} says "
                           f"{tuple(round(float(v), 6) for v in stated[name])}"
                           for name in ("spacing", "origin", "direction") if not _close(name, ours, stated)), None)
        if difference is None:
            return
        differences[source] = difference
    pixdim = tuple(round(float(v), 6) for v in header.pixdim[1 : n + 1])
    raise DataError(f"has a NIfTI header that contradicts itself: a reader places the voxels with "
                    f"{next(iter(differences.values()))} (pixdim {pixdim}, qform_code {header.qform_code}, "
                    f"sform_code {header.sform_code}); correct the header", path)


def _placement(matrix: np.ndarray, origin) -> dict[str, np.ndarray]:
    spacing = np.linalg.norm(matrix, axis=0)
    return {"spacing": spacing, "origin": np.asarray(origin, float),
            "direction": (matrix / np.where(spacing > 0, spacing, 1.0)).ravel()}


def _close(name: str, a: dict, b: dict) -> bool:
    """Equal within what single-precision headers and quaternions keep."""
    if name == "spacing":
        return np.allclose(a[name], b[name], rtol=1e-4, atol=0)
    if name == "origin":
        return np.allclose(a[name], b[name], rtol=0, atol=1e-3 * max(min(a["spacing"]), 1e-6))
    return np.allclose(a[name], b[name], rtol=0, atol=1e-4)


def read_nifti_grid(path: str | Path) -> NiftiGrid:
    """The grid of a ``.nii``/``.nii.gz``, from its header only, checked as :func:`read_nifti` checks it."""
    path = Path(path)
    header, buffer = _read_bytes(path, header_only=True)
    return _itk_grid(header, bytes(buffer), path)


def read_nifti(path: str | Path) -> tuple[np.ndarray | sitk.Image, NiftiGrid]:
    """The voxels of the named ``.nii``/``.nii.gz`` (decompressed once) and ITK's grid for them.

    Scalar voxels come back as a numpy array in SimpleITK order with ITK's pixel type and scaling
    (``scl_slope``/``scl_inter``); other layouts (RGB, vectors, complex) as the :class:`SimpleITK.Image`
    ITK reads from a private copy of the bytes. Raises :class:`~cotexnet.errors.DataError` naming the
    file for a cut or damaged file, a compression its name does not state, or a contradictory header.
    """
    path = Path(path)
    header, buffer = _read_bytes(path, header_only=False)
    grid = _itk_grid(header, bytes(buffer[: header.offset]), path)
    dtype = _SITK_DTYPES.get(grid.pixel_id)
    if grid.components == 1 and dtype is not None and header.dtype is not None and \
            math.prod(grid.size) == header.voxels:
        raw = np.frombuffer(buffer, header.dtype, header.voxels, header.offset).reshape(tuple(reversed(grid.size)))
        slope, intercept = header.scale
        if math.isfinite(slope) and slope != 0 and (slope != 1 or intercept != 0):  # ITK's rule for scaling
            return (raw.astype(dtype) * dtype(slope) + dtype(intercept)).astype(dtype, copy=False), grid
        return raw.astype(np.dtype(dtype), copy=False), grid
    with tempfile.TemporaryDirectory(prefix="cotexnet-nifti-") as folder:
        copy = Path(folder) / "image.nii"
        copy.write_bytes(buffer)
        del buffer
        try:
            with quiet_itk():
                return sitk.ReadImage(str(copy)), grid
        except RuntimeError as error:
            raise _itk_error(error, copy, path) from None
