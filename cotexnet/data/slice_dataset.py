"""Training slices: a torch ``Dataset`` of 2D items at the model size, cut from a dataset's volumes."""
from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset, Sampler

from ..errors import ConfigError, DataError
from .datasets import DatasetIndex
from .image import PICTURE_SUFFIXES, VolumeImage, image_suffix, read_image, read_image_geometry
from .labels import read_label_map
from .normalization import LUMA, IntensityNormalization
from .slicing import in_plane_spacing, resize_slices, volume_slices
from .splits import split_cases


class SliceDataset(Dataset):
    """2D training items from a dataset's volumes and pictures, at the model size.

    Every slice with foreground is kept, plus a seeded ``empty_fraction`` of the slices without any.
    Labels are read (and checked) once at construction and kept at the model size; each image is read
    and normalised once, on first use, and its kept slices are cached at the model size as float16.
    Memory is therefore about ``(2 * C + 1) * S * S`` bytes per kept slice (C = 1 grayscale, 3 RGB),
    independent of the volumes' size; each DataLoader worker holds its own cache. Pass the ``split``
    you save with the model; without one, :func:`split_cases` is used with ``seed``.

    With ``color`` false, colour pictures become their luminance first (what inference gives a model trained
    so, ``CoTexNetConfig.channels``).

    Items: ``image`` float32 (3, S, S) in [0, 1] (grayscale replicated), ``label`` int64 (S, S),
    ``case`` id, ``index`` slice index along the slicing axis, ``spacing`` float32 (2,) in-plane mm,
    ``item`` the item's own position (the feature cache's key).
    ``class_voxels[c]`` counts the voxels of class ``c`` (0 = background) in these cases' label maps.
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
        color: bool = True,
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
        self.color = color
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
        self.class_voxels = np.zeros(self.num_classes + 1, dtype=np.int64)
        for position, case in enumerate(self.cases):
            geometry = read_image_geometry(case.image_path)
            labels = read_label_map(case.label_path, geometry, classes=index.classes)
            self.class_voxels += np.bincount(labels.ravel(), minlength=self.num_classes + 1)
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

    def class_presence(self) -> np.ndarray:
        """(items, n) bool: which classes each item's label slice holds (at the model size)."""
        rows = [(self._labels[position][self._rows[position][index]]) for position, index in self.slices]
        stacked = torch.stack(rows).flatten(1) if rows else torch.zeros(0, 1, dtype=torch.uint8)
        return np.stack([(stacked == c).any(1).numpy() for c in range(1, self.num_classes + 1)], axis=1)

    def _case_images(self, position: int) -> torch.Tensor:
        if position not in self._images:
            image = read_image(self.cases[position].image_path)
            array = image.array if self.color or not image.is_rgb else image.array.astype(np.float32) @ LUMA
            normalized = VolumeImage(self.normalization.apply(array), image.spacing, image.origin, image.direction)
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
            "item": item,
        }


#: Pillow modes that :func:`~cotexnet.data.read_image` keeps as one channel; it turns every other mode to RGB.
_GRAY_PICTURE_MODES = ("1", "L", "LA", "I", "I;16", "I;16B", "I;16L", "F")


def reads_as_color(path) -> bool:
    """Whether :func:`~cotexnet.data.read_image` gives ``path`` as an RGB picture, from its header alone
    (a DICOM file or series, whose header reader reads it whole, is read)."""
    import SimpleITK as sitk

    path = Path(path)
    if path.is_dir() or image_suffix(path) == ".dcm":
        return read_image(path).is_rgb
    try:
        if image_suffix(path) in PICTURE_SUFFIXES:
            from PIL import Image

            with Image.open(path) as picture:
                return picture.mode not in _GRAY_PICTURE_MODES
        reader = sitk.ImageFileReader()
        reader.SetFileName(str(path))
        reader.ReadImageInformation()
        return reader.GetNumberOfComponents() > 1
    except (OSError, RuntimeError, ValueError):  # a damaged file: reading its voxels says what is wrong
        return False


class ForegroundBatchSampler(Sampler):
    """Batches of item indices where a share is drawn from slices that hold a class (nnU-Net's rule).

    Each batch's last ``round(share * batch_size)`` places (at least one when ``share > 0``) each pick a
    class uniformly among the classes present anywhere, then a slice holding it; the other places go
    through a shuffled pass over all items. So a class on few slices is seen in about ``share / n`` of
    every batch instead of its share of the slices. Seeded by (seed, rank, epoch) through
    :meth:`set_epoch`; under torchrun every rank draws its own batches.
    """

    def __init__(self, presence: np.ndarray, batch_size: int, share: float, seed: int = 0, rank: int = 0,
                 world: int = 1, drop_last: bool = True):
        self.holding = [np.flatnonzero(presence[:, c]) for c in range(presence.shape[1])]
        self.holding = [items for items in self.holding if len(items)]
        self.count, self.batch_size, self.seed, self.rank = len(presence), batch_size, seed, rank
        self.forced = max(1, round(share * batch_size)) if share > 0 and self.holding else 0
        self.forced = min(self.forced, batch_size)
        per_rank = self.count / world
        self.batches = max(1, int(per_rank // batch_size) if drop_last else math.ceil(per_rank / batch_size))
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return self.batches

    def __iter__(self):
        rng = np.random.default_rng((self.seed, self.rank, self.epoch))
        free = self.batch_size - self.forced
        order = rng.permutation(self.count)
        while len(order) < self.batches * free:
            order = np.concatenate([order, rng.permutation(self.count)])
        for b in range(self.batches):
            batch = [int(i) for i in order[b * free:(b + 1) * free]]
            for _ in range(self.forced):
                items = self.holding[rng.integers(len(self.holding))]
                batch.append(int(items[rng.integers(len(items))]))
            yield batch
