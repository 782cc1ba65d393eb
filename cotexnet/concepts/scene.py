"""One image with its label map and geometry, checked once and shared by every backend.

Arrays follow SimpleITK's numpy order: a 2D image is ``(y, x)`` or ``(y, x, 3|4)`` (RGB/RGBA), a volume
``(z, y, x)``. ``spacing`` and ``direction`` follow SimpleITK's ``GetSpacing()``/``GetDirection()``:
``(x, y[, z])`` order, direction row-major in LPS. An RGB image whose channels are equal (an
ultrasound frame saved as RGB, say) is treated as grayscale.
"""
from __future__ import annotations

import hashlib
from functools import cached_property

import numpy as np

from ..errors import DataError

#: Channels may differ by this share of the intensity range and the image still count as grayscale.
GRAYSCALE_TOLERANCE = 0.02
#: Percentile subsample size: intensity ranges of large volumes are estimated from this many voxels.
_RANGE_SAMPLE = 1_000_000


class Scene:
    """Validated arrays of one case: ``gray`` (float) or ``rgb`` (float 0..1), and ``classes`` (int map)."""

    def __init__(self, image, label_map, num_classes: int, spacing=None, direction=None):
        image = np.asarray(image)
        labels = np.asarray(label_map)
        if labels.ndim not in (2, 3):
            raise DataError(f"label map: expected a 2D (y, x) or 3D (z, y, x) array, got shape {labels.shape}")
        self.ndim = labels.ndim
        if image.shape == labels.shape:
            self.rgb = None
            self.gray = image.astype(np.float32, copy=False)
        elif self.ndim == 2 and image.ndim == 3 and image.shape[:2] == labels.shape and image.shape[2] in (3, 4):
            rgb = _unit_rgb(image[..., :3])
            red, green, blue = rgb[..., 0], rgb[..., 1], rgb[..., 2]
            if max(float(np.abs(red - green).max()), float(np.abs(red - blue).max())) <= GRAYSCALE_TOLERANCE:
                self.rgb, self.gray = None, red
            else:
                self.rgb, self.gray = rgb, None
        else:
            raise DataError(
                f"image shape {image.shape} does not match label map shape {labels.shape}; expected the same "
                "shape, or (y, x, 3) for an RGB image with a (y, x) label map"
            )
        if not np.issubdtype(labels.dtype, np.integer):
            if labels.dtype != bool and not np.array_equal(labels, np.round(labels)):
                raise DataError(f"label map: expected whole class indices, got {labels.dtype} values with fractions")
            labels = labels.astype(np.int64)
        # A single class may come as any non-zero mask (0/1, 0/255); several need indices 1..n.
        self.classes = (labels > 0).astype(np.uint8) if num_classes == 1 else labels
        self.spacing = self._vector("spacing", spacing)  # array-axis order, like the array shape
        self.direction = self._direction(direction)

    @property
    def grayscale(self) -> bool:
        return self.rgb is None

    @property
    def size(self) -> int:
        return self.classes.size

    def _vector(self, name: str, value) -> np.ndarray:
        if value is None:
            return np.ones(self.ndim)
        vector = np.asarray(value, dtype=float).ravel()
        if vector.size != self.ndim or not np.all(np.isfinite(vector)) or np.any(vector <= 0):
            raise DataError(f"{name}: expected {self.ndim} positive numbers in (x, y[, z]) order, got {value!r}")
        return vector[::-1].copy()

    def _direction(self, value) -> np.ndarray | None:
        """The 3×3 index-to-LPS direction (columns i, j, k = x, y, z); None for 2D images."""
        if self.ndim == 2:
            return None
        if value is None:
            return np.eye(3)
        matrix = np.asarray(value, dtype=float)
        if matrix.size != 9 or not np.all(np.isfinite(matrix)):
            raise DataError(f"direction: expected 9 numbers (a row-major 3×3 matrix), got {value!r}")
        return matrix.reshape(3, 3)

    @cached_property
    def content_hash(self) -> str:
        """Hash of the pixels, labels and geometry: the part of a cache key that names the case."""
        digest = hashlib.blake2b(digest_size=16)
        for array in (self.gray if self.rgb is None else self.rgb, self.classes, self.spacing, self.direction):
            if array is not None:
                array = np.ascontiguousarray(array)
                digest.update(f"{array.dtype.str}{array.shape}".encode())
                digest.update(array.tobytes())
        return digest.hexdigest()

    @cached_property
    def intensity_range(self) -> tuple[float, float]:
        """1st and 99th percentile of a grayscale image (a subsample for large volumes)."""
        flat = self.gray.ravel()
        step = max(1, flat.size // _RANGE_SAMPLE)
        low, high = np.percentile(flat[::step], (1, 99))
        return float(low), float(high)


def _unit_rgb(rgb: np.ndarray) -> np.ndarray:
    """RGB as float in 0..1: uint8 over 255; other types as is up to 1, over 255 up to 255, else over their maximum."""
    if rgb.dtype == np.uint8:
        return rgb.astype(np.float32) / 255.0
    rgb = rgb.astype(np.float32)
    top = float(rgb.max()) if rgb.size else 1.0
    return rgb if top <= 1.0 else rgb / (255.0 if top <= 255.0 else top)
