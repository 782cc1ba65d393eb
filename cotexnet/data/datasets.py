"""Datasets: the cases of an ``images/`` + ``masks/`` folder, an nnU-Net v2 raw or an MSD dataset, and the split
file a dataset may carry (``split.json``, nnU-Net ``splits_final.json``).

Indexing reads headers only (to check that each mask fits its image), never voxels.
"""
from __future__ import annotations

import json
import logging
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import DataError
from .image import (PICTURE_SUFFIXES, SEGMENTATION_SUFFIX, VOLUME_SUFFIXES, check_file, image_suffix,
                    read_image_geometry, read_segmentation_file, strip_suffix)
from .labels import check_label_placement, names_match

logger = logging.getLogger(__name__)

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
        stem = path.name if path.is_dir() else strip_suffix(path)
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
    """Header-only check that each mask fits its image: shape and placement (a .seg.nrrd is resampled onto its
    image, so it is skipped)."""
    for case in cases:
        image = read_image_geometry(case.image_path)
        if image_suffix(case.label_path) == SEGMENTATION_SUFFIX:
            continue
        mask = read_image_geometry(case.label_path)
        if mask.shape != image.shape:
            raise DataError(f"mask shape {mask.shape} differs from image shape {image.shape} ({case.image_path})",
                            case.label_path)
        check_label_placement(mask, image)


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
        case_id = strip_suffix(image)
        cases.append(Case(case_id, image, resolve(item["label"]), case_group(case_id)))
    unlabeled = []
    for entry in meta.get("test", []):
        image = resolve(entry if isinstance(entry, str) else entry["image"])
        unlabeled.append(Case(strip_suffix(image), image, None, case_group(strip_suffix(image))))
    modality = meta.get("modality")
    return cases, classes, modality.get("0") if isinstance(modality, dict) else modality, unlabeled


def _seg_classes(cases: list[Case]) -> list[str] | None:
    """Class names of a folder dataset whose masks are ``.seg.nrrd``: the first file's segment names."""
    for case in cases:
        if image_suffix(case.label_path) == SEGMENTATION_SUFFIX:
            segmentation, _ = read_segmentation_file(case.label_path)
            return [s.get("name", s.get("id")) for s in segmentation.get("segments", [])]
    return None


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
        meta = read_json(json_path)
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
        if classes is not None and (len(classes) != len(found) or not all(map(names_match, classes, found))):
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
    index.split = split_from_files(index)
    return index


# ------------------------------------------------------------------------ the split files a dataset carries
SPLIT_NAMES = ("train", "val", "test")


def read_json(path: Path):
    """A JSON file's content (dataset.json, split files), or a :class:`DataError` naming the file."""
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise DataError(f"cannot be read as JSON ({error})", path) from None


def validated_split(data, path: Path) -> dict[str, list[str]]:
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


def load_split(path: str | Path, index: DatasetIndex | None = None) -> dict[str, list[str]]:
    """Read a split file; with ``index``, every case id must belong to the dataset."""
    path = Path(path)
    check_file(path)
    split = validated_split(read_json(path), path)
    if index is not None:
        _check_split_ids(split, index, path)
    return split


def split_from_files(index: DatasetIndex) -> dict[str, list[str]] | None:
    """``split.json`` ({"train": [...], "val": [...], "test": [...]}) or nnU-Net ``splits_final.json`` fold 0."""
    path = index.root / "split.json"
    if path.is_file():
        return load_split(path, index)
    path = index.root / "splits_final.json"
    if not path.is_file():
        return None
    folds = read_json(path)
    if not isinstance(folds, list) or not folds or not isinstance(folds[0], dict):
        raise DataError("expected a list of folds, each {\"train\": [...], \"val\": [...]}", path)
    split = validated_split({"train": folds[0].get("train", []), "val": folds[0].get("val", [])}, path)
    _check_split_ids(split, index, path)
    return split
