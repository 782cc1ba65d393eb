"""Training augmentation on batches of slices (torch): random zoom and flips, the same for image and labels.

Which flips are allowed, and which classes a left-right flip swaps, is a :class:`~.laterality.FlipRule`.
"""
from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

from .laterality import FlipRule, swap_labels
from .slicing import resize_slices


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
    flips: FlipRule | bool = True,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Random zoom (``scale``, then crop or zero-pad back) and random flips, per sample.

    The same transform is applied to ``images`` (B, C, H, W) and ``labels`` (B, H, W); labels are
    resized nearest. ``flips``: a :class:`FlipRule` (its axes; a flip of its left-right axis swaps its class
    pairs in the labels), ``True`` both axes with labels untouched, ``False`` none. The random draws are
    the same whatever ``flips`` is, so a seed gives the same zoom either way. Works on any device;
    ``generator`` is a CPU generator.
    """
    if isinstance(flips, bool):
        flips = FlipRule(axes=(0, 1) if flips else (), left_right_axis=None, pairs=())
    size = tuple(images.shape[-2:])
    draws = torch.rand(images.shape[0], 5, generator=generator).tolist()
    out_images, out_labels = [], []
    for b, (zoom, dy, dx, flip_h, flip_v) in enumerate(draws):
        factor = scale[0] + (scale[1] - scale[0]) * zoom
        zoomed = (max(1, round(size[0] * factor)), max(1, round(size[1] * factor)))
        image = _crop_or_pad(resize_slices(images[b:b + 1], zoomed, "bilinear"), size, (dy, dx))
        label = _crop_or_pad(resize_slices(labels[b:b + 1], zoomed, "nearest"), size, (dy, dx))
        axes = [axis for axis, draw in ((1, flip_h), (0, flip_v)) if axis in flips.axes and draw < 0.5]
        if axes:
            image, label = image.flip([axis - 2 for axis in axes]), label.flip([axis - 2 for axis in axes])
            label = swap_labels(label, flips.pairs_for(axes))
        out_images.append(image)
        out_labels.append(label)
    return torch.cat(out_images), torch.cat(out_labels)
