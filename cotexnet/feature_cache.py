"""The frozen encoders' outputs of training slices, kept on disk so later epochs skip the encoders.

With the image encoder frozen, what it gives a slice (and an augmentation view of it) never changes: the
decoder's activations, the image's CLS embedding and the ``n`` ROI CLS embeddings (docs/method.md). Those
passes are nearly all of a step's time, so each (slice, view) is encoded once, on first use, and stored
in 16-bit in memory-mapped files under the run folder, with the view's label map and real-text prompt.
With augmentation, each slice has ``views`` fixed random views; a step draws one of them at random.

On a GPU whose free memory holds every view (within :data:`RESIDENT_SHARE` of it), the cache lives in GPU
memory instead: no file, no host copy per step, and no disk cap (the memory is the run's until it ends).
Otherwise the files are sized up front and their blocks reserved on disk at once (a sparse memory-mapped file
whose disk fills up later kills the process with SIGBUS; a reservation that fails is an ordinary error); when
``views`` do not fit under the cap (and half the free disk), fewer views are kept, and when one view does not
fit the cache is off and the step encodes on the fly.
"""
from __future__ import annotations

import logging
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from .model import CoTexNet, EncodedFeatures

logger = logging.getLogger(__name__)

CACHE_FOLDER = "feature_cache"
#: Share of the GPU's free memory (measured once the model is on it) the cache may take there; the rest is the
#: training step's (activations of the decoder and the ROI branch, optimiser state).
RESIDENT_SHARE = 0.5


@dataclass(frozen=True)
class CacheLayout:
    """Shapes of one (slice, view) entry, from the model's architecture."""

    layers: int
    tokens: int
    width: int
    projection: int
    classes: int
    image_size: int
    roi: bool

    @classmethod
    def of(cls, model: CoTexNet) -> "CacheLayout":
        vision = model.vision.config
        size = model.config.image_size
        return cls(layers=len(model.extract_layers), tokens=(size // vision.patch_size) ** 2 + 1,
                   width=vision.hidden_size, projection=model.clipseg.config.projection_dim,
                   classes=model.config.num_classes, image_size=size, roi=model.uses_roi_branch)

    @property
    def entry_bytes(self) -> int:
        floats = self.layers * self.tokens * self.width + self.projection * (1 + (self.classes if self.roi else 0))
        return 2 * floats + self.image_size ** 2


@dataclass(frozen=True)
class CachePlan:
    """Where the cache lives and how many views per slice it keeps (0: no cache), with a line saying so."""

    views: int
    resident: bool
    message: str


def plan_cache(layout: CacheLayout, items: int, views: int, limit_bytes: float, folder: Path,
               free_gpu_bytes: int | None = None) -> CachePlan:
    """In GPU memory when ``free_gpu_bytes`` (``None`` off a GPU) holds every view within :data:`RESIDENT_SHARE`;
    else on disk, as many of ``views`` as fit under ``limit_bytes`` (the disk cap) and half the free disk."""
    per_view = layout.entry_bytes * items
    needed = (f"{items} slices x {views} view(s) x {layout.entry_bytes / 2**20:.2f} MB = "
              f"{views * per_view / 2**30:.2f} GB")
    if free_gpu_bytes is not None and views * per_view <= RESIDENT_SHARE * free_gpu_bytes:
        return CachePlan(views, True, f"feature cache: {needed} in GPU memory ({free_gpu_bytes / 2**30:.1f} GB free)")
    folder.mkdir(parents=True, exist_ok=True)
    budget = min(limit_bytes, 0.5 * shutil.disk_usage(folder).free)
    fit = min(views, int(budget // per_view))
    if fit == 0:
        return CachePlan(0, False, f"feature cache off: {needed}, over the cap of {budget / 2**30:.2f} GB "
                                   "(--cache-limit-gb, half the free disk); the frozen encoders run on the fly "
                                   "every step")
    if fit < views:
        return CachePlan(fit, False, f"feature cache: {fit} of {views} views per slice fit ({needed} is over "
                                     f"{budget / 2**30:.2f} GB)")
    return CachePlan(fit, False, f"feature cache: {needed} under {folder}")


def reserve(path: Path, size: int) -> None:
    """Create ``path`` with ``size`` bytes allocated on disk (not a sparse file); raises OSError when they do not fit."""
    with open(path, "wb") as handle:
        if hasattr(os, "posix_fallocate"):
            os.posix_fallocate(handle.fileno(), 0, size)
            return
        chunk = bytes(max(1, min(size, 2**26)))  # no fallocate (Windows, macOS): zeros allocate the blocks
        for start in range(0, size, len(chunk)):
            handle.write(chunk[: size - start])


class FeatureCache:
    """:class:`~cotexnet.model.EncodedFeatures`, label maps and prompts per (item, view), 16-bit, in memory-mapped
    files under ``folder`` or, with ``resident``, in tensors on ``device`` (the training device)."""

    def __init__(self, folder: Path, layout: CacheLayout, items: int, views: int, resident: bool = False,
                 device: torch.device | str = "cpu"):
        self.folder, self.layout, self.views = Path(folder), layout, views
        self.storage = torch.device(device) if resident else torch.device("cpu")
        self.maps: list[np.memmap] = []
        if not resident:
            self.folder.mkdir(parents=True, exist_ok=True)
        L = layout

        def array(name, shape, dtype):
            shape = (items, views, *shape)
            if resident:
                return torch.empty(shape, dtype=torch.from_numpy(np.zeros(0, dtype)).dtype, device=self.storage)
            path = self.folder / f"{name}.bin"
            reserve(path, int(np.prod(shape)) * np.dtype(dtype).itemsize)
            self.maps.append(np.memmap(path, dtype=dtype, mode="r+", shape=shape))
            return torch.from_numpy(self.maps[-1])

        self.activations = array("activations", (L.layers, L.tokens, L.width), np.float16)
        self.image_embeds = array("image_embeds", (L.projection,), np.float16)
        self.roi_embeds = array("roi_embeds", (L.classes, L.projection), np.float16) if L.roi else None
        self.labels = array("labels", (L.image_size, L.image_size), np.uint8)
        self.filled = np.zeros((items, views), dtype=bool)
        self.prompts: dict[tuple[int, int], str | None] = {}

    def index(self, keys: list[tuple[int, int]]) -> tuple[torch.Tensor, torch.Tensor]:
        items, views = zip(*keys)
        return (torch.tensor(items, device=self.storage), torch.tensor(views, device=self.storage))

    def missing(self, keys: list[tuple[int, int]]) -> list[int]:
        """Positions in ``keys`` whose entry is not stored yet."""
        return [k for k, (item, view) in enumerate(keys) if not self.filled[item, view]]

    def put(self, keys: list[tuple[int, int]], encoded: EncodedFeatures, labels: torch.Tensor,
            prompts: list[str] | None) -> None:
        at, storage = self.index(keys), self.storage
        self.activations[at] = torch.stack(encoded.activations, dim=1).to(storage, torch.float16)
        self.image_embeds[at] = encoded.image_embeds.to(storage, torch.float16)
        if self.roi_embeds is not None:
            self.roi_embeds[at] = encoded.roi_embeds.to(storage, torch.float16)
        self.labels[at] = labels.to(storage, torch.uint8)
        for row, key in enumerate(keys):
            self.prompts[key] = prompts[row] if prompts is not None else None
            self.filled[key] = True

    def get(self, keys: list[tuple[int, int]], device: torch.device) -> tuple[EncodedFeatures, torch.Tensor, list | None]:
        """(features as float32 on ``device``, label maps int64, prompts or ``None``) of stored entries."""
        at = self.index(keys)

        def tensor(stored):
            return stored[at].to(device).float()

        activations = tensor(self.activations)
        encoded = EncodedFeatures(list(activations.unbind(1)), tensor(self.image_embeds),
                                  tensor(self.roi_embeds) if self.roi_embeds is not None else None)
        labels = self.labels[at].to(device).long()
        prompts = [self.prompts[key] for key in keys]
        return encoded, labels, None if prompts[0] is None else prompts

    def close(self) -> None:
        """Free the memory or drop the files (they are rebuilt by the next run; a resumed run re-encodes)."""
        self.activations = self.image_embeds = self.roi_embeds = self.labels = None
        for array in self.maps:
            array._mmap.close()
        self.maps = []
        shutil.rmtree(self.folder, ignore_errors=True)
