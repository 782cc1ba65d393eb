"""NIfTI integrity checks that SimpleITK does not make.

SimpleITK (through ITK's NIfTI reader) reads a ``.nii`` or ``.nii.gz`` cut short as a volume padded
with zeros, and maps NaN and infinite voxels of a floating-point NIfTI to 0, raising nothing in either
case. A truncated download or a failed copy would then be segmented, or trained on, as if it were
real anatomy. This module reads the header itself, checks that the file holds every byte the header
promises (for ``.nii.gz``, a complete gzip stream), and checks the raw floating-point voxels for
NaN/Inf while streaming through them, so the data is never held twice in memory.
"""
from __future__ import annotations

import gzip
import struct
import zlib
from pathlib import Path

import numpy as np

from ..errors import DataError

#: NIfTI datatype code -> numpy dtype character (NIfTI-1 standard, nifti1.h).
_DTYPES = {
    2: "u1", 4: "i2", 8: "i4", 16: "f4", 32: "c8", 64: "f8", 128: "u1", 256: "i1", 512: "u2",
    768: "u4", 1024: "i8", 1280: "u8", 1536: "f16", 1792: "c16", 2048: "c32", 2304: "u1",
}
_CHUNK = 1 << 24  # bytes read at a time: 16 MiB, a multiple of every voxel size


class _Header:
    """The fields of a NIfTI-1 or NIfTI-2 header that say how many bytes of voxels follow, and where."""

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
        if size == 348:
            dims = struct.unpack(endian + "8h", raw[40:56])
            datatype, bitpix = struct.unpack(endian + "2h", raw[70:74])
            offset = struct.unpack(endian + "f", raw[108:112])[0]
        else:
            datatype, bitpix = struct.unpack(endian + "2h", raw[12:16])
            dims = struct.unpack(endian + "8q", raw[16:80])
            offset = struct.unpack(endian + "q", raw[168:176])[0]
        ndim = dims[0]
        if not 1 <= ndim <= 7 or any(d < 1 for d in dims[1 : ndim + 1]):
            raise DataError(f"has an invalid NIfTI header: dim = {list(dims[: ndim + 1])}", path)
        self.size = size
        self.offset = max(int(offset), size + 4 if size == 348 else size)
        self.voxels = int(np.prod([int(d) for d in dims[1 : ndim + 1]], dtype=np.int64))
        self.bytes = self.voxels * int(bitpix) // 8
        code = _DTYPES.get(int(datatype))
        self.float_dtype = (
            np.dtype(endian + code) if code and code[0] == "f" and code != "f16" else None
        )  # NaN/Inf exist only in floating-point voxels


def check_nifti(path: str | Path) -> None:
    """Refuse a ``.nii``/``.nii.gz`` whose voxel data is cut short, or (floating point) holds NaN/Inf.

    Raises :class:`~cotexnet.errors.DataError` naming the file and what is wrong.
    """
    path = Path(path)
    compressed = path.name.lower().endswith(".gz")
    try:
        handle = gzip.open(path, "rb") if compressed else path.open("rb")
        with handle:
            header = _Header(handle.read(540), path)
            handle.seek(header.offset)
            _scan_voxels(handle, header, path)
            if compressed:
                handle.read()  # the rest of the stream, so a cut after the voxels is found too
    except (EOFError, zlib.error, gzip.BadGzipFile) as error:
        raise DataError(f"is truncated or corrupt: its gzip stream is incomplete ({error})", path) from None


def _scan_voxels(handle, header: _Header, path: Path) -> None:
    remaining, bad = header.bytes, 0
    item = header.float_dtype.itemsize if header.float_dtype is not None else 1
    while remaining > 0:
        chunk = handle.read(min(_CHUNK, remaining))
        if not chunk:
            got = header.bytes - remaining
            raise DataError(
                f"is truncated: its header promises {header.bytes} bytes of voxel data "
                f"({header.voxels} voxels) but the file holds {got}", path,
            )
        remaining -= len(chunk)
        if header.float_dtype is not None:
            usable = len(chunk) - len(chunk) % item  # a short read ends on a voxel boundary except at EOF
            values = np.frombuffer(chunk[:usable], header.float_dtype)
            bad += int(values.size - np.count_nonzero(np.isfinite(values)))
    if bad:
        raise DataError(f"holds {bad} NaN or infinite voxel(s) (NIfTI readers silently turn them into 0)", path)
