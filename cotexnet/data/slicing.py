"""Slices: which array axis a view cuts, a volume as a stack of 2D slices and back, resizing to the model.

Training and inference cut and resize through these functions only, so they cannot drift apart.
``resize_slices`` imports torch when called; the rest is numpy.
"""
from __future__ import annotations

import itertools
from collections.abc import Sequence
from typing import TYPE_CHECKING

import numpy as np

from ..config import SLICE_AXES
from ..errors import ConfigError

if TYPE_CHECKING:
    import torch

    from .image import ImageGeometry, VolumeImage

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


def array_slice_axis(ndim: int, direction: Sequence[float] | None, axis: str | int) -> int | None:
    """The array axis a ``ndim``-D image is cut along: ``None`` for 2D (one slice), ``axis`` itself when it is
    an array axis, else the view name matched to ``direction`` (the identity when ``None``)."""
    if ndim == 2:
        return None
    if isinstance(axis, int):
        return axis
    return slice_axis_index(np.eye(3).ravel() if direction is None else direction, axis)


def to_slices(array: np.ndarray, index: int | None) -> np.ndarray:
    """``array`` as a stack of 2D slices along array axis ``index`` (a view); ``None``: a 2D image, one slice."""
    return array[None] if index is None else np.moveaxis(array, index, 0)


def from_slices(slices: np.ndarray, index: int | None) -> np.ndarray:
    """Inverse of :func:`to_slices`: per-slice results back into the image's axis order."""
    return slices[0] if index is None else np.moveaxis(slices, 0, index)


def _slice_axis(image: VolumeImage | ImageGeometry, axis: str | int) -> int | None:
    return array_slice_axis(image.ndim, image.direction, axis)


def volume_slices(image: VolumeImage, axis: str | int = "axial") -> np.ndarray:
    """The image as a stack of 2D slices ``(N, H, W[, 3])`` (a view); a 2D image is one slice.

    ``axis`` is a view name (see :func:`slice_axis_index`) or an array axis.
    """
    return to_slices(image.array, _slice_axis(image, axis))


def stack_slices(slices: np.ndarray, image: VolumeImage | ImageGeometry, axis: str | int = "axial") -> np.ndarray:
    """Inverse of :func:`volume_slices`: per-slice results ``(N, H, W)`` back into the image's shape."""
    return from_slices(slices, _slice_axis(image, axis))


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
    import torch
    import torch.nn.functional as F

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
