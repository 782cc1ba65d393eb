"""Data: image files, label maps, intensity normalisation, slicing, datasets, splits, training slices.

One job per module; every name is re-exported here, so ``from cotexnet.data import read_image`` works.
Only :mod:`.slice_dataset` and :mod:`.augment` need torch, and they load on first use, so
``import cotexnet.data`` (and the Slicer exporter that writes NRRD through it) imports no torch.

========================  ==========================================================================
:mod:`.image`             suffixes, :class:`ImageGeometry`, :class:`VolumeImage`, read/write (SimpleITK)
:mod:`.labels`            label maps from masks and ``.seg.nrrd``; ``.seg.nrrd`` writing
:mod:`.nifti`             NIfTI integrity (truncation, NaN/Inf) that SimpleITK does not check
:mod:`.normalization`     :class:`IntensityNormalization` (CT windows, percentiles, min-max, RGB)
:mod:`.slicing`           view -> array axis, volume <-> slices, :func:`resize_slices`
:mod:`.laterality`        left/right class pairs, :class:`FlipRule` (the flips anatomy allows), label swaps
:mod:`.datasets`          :class:`Case`, :class:`DatasetIndex`, :func:`load_dataset` (folder, nnU-Net, MSD)
:mod:`.splits`            patient-grouped splits, split files
:mod:`.slice_dataset`     :class:`SliceDataset`, the training items; :class:`ForegroundBatchSampler` (torch)
:mod:`.augment`           :func:`augment_batch`, random zoom and flips (torch)
========================  ==========================================================================
"""
from .datasets import SPLIT_NAMES, Case, DatasetIndex, case_group, load_dataset, load_split
from .image import (
    LOSSY_SUFFIXES,
    PICTURE_SUFFIXES,
    SEGMENTATION_SUFFIX,
    VOLUME_SUFFIXES,
    DicomSeries,
    ImageGeometry,
    VolumeImage,
    image_suffix,
    list_dicom_series,
    read_image,
    read_image_geometry,
    write_image,
)
from .labels import read_label_map, write_segmentation_nrrd
from .laterality import FlipRule, flip_rule, lateral_pairs, swap_channels, swap_labels, unpaired_lateral
from .normalization import CT_WINDOWS, IntensityNormalization
from .slicing import in_plane_spacing, resize_slices, slice_axis_index, stack_slices, volume_slices
from .splits import make_split, save_split, split_cases

#: Names whose modules import torch, loaded on first access.
_LAZY = {"SliceDataset": "slice_dataset", "ForegroundBatchSampler": "slice_dataset", "augment_batch": "augment"}

__all__ = [
    "CT_WINDOWS", "LOSSY_SUFFIXES", "PICTURE_SUFFIXES", "SEGMENTATION_SUFFIX", "SPLIT_NAMES", "VOLUME_SUFFIXES",
    "Case", "DatasetIndex", "DicomSeries", "FlipRule", "ForegroundBatchSampler", "ImageGeometry",
    "IntensityNormalization", "SliceDataset", "VolumeImage", "augment_batch", "case_group", "flip_rule",
    "image_suffix", "in_plane_spacing", "lateral_pairs", "list_dicom_series", "load_dataset", "load_split",
    "make_split", "read_image", "read_image_geometry", "read_label_map", "resize_slices", "save_split",
    "slice_axis_index", "split_cases", "stack_slices", "swap_channels", "swap_labels", "unpaired_lateral",
    "volume_slices", "write_image", "write_segmentation_nrrd",
]


def __getattr__(name):
    if name in _LAZY:
        from importlib import import_module

        return getattr(import_module(f".{_LAZY[name]}", __name__), name)
    raise AttributeError(f"module 'cotexnet.data' has no attribute {name!r}")
