"""The cases a browser session has opened: their volumes and segmentations in the session's MRML scene,
and the files they come from and are saved to, all inside the data root.

No trame here: the page (:mod:`cotexnet_app.session`) calls these and shows what they return or raise.
"""

from __future__ import annotations

import csv
import hashlib
import math
import os
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Optional

import numpy as np
from cotexnet.atomic import write_files_atomic
from cotexnet.data.image import (SEGMENTATION_SUFFIX, list_dicom_series, read_image, read_image_geometry,
                                 read_segmentation_file, strip_suffix)
from cotexnet.data.labels import read_label_map, write_segmentation_nrrd
from cotexnet.errors import CoTexNetError, DataError

from cotexnet_app import logic_path
from cotexnet_app.files import AccessError, DataRoot

logic_path.add_slicer_logic_to_path()

from CoTexNetSegmentLib import mrml  # noqa: E402

#: What a training does with a segment that is not one of the model's classes: add it as a class (the
#: default), leave it out, or count it as the named class ("map to white matter").
ADD_CLASS, SKIP_CLASS, MAP_TO = "add as a new class", "skip (leave it out)", "map to "
#: Joins a DICOM folder's path in the data root and the UID of the series opened from it, in the name the page
#: gives such a case (a folder of one series is named by its path alone).
SERIES_MARK = "#series="
#: Suffix of the segment statistics written beside a saved segmentation.
STATISTICS_SUFFIX = ".statistics.csv"
#: Memory the undo steps of the case in the views may hold: each step keeps the segmentation before and
#: after (trame-slicer's SegmentationLabelMapUndoCommand), about two bytes per voxel.
UNDO_MEMORY_BYTES = 2 << 30
#: Undo steps kept: as many as fit UNDO_MEMORY_BYTES, between these bounds.
MIN_UNDO_STEPS, MAX_UNDO_STEPS = 10, 100


@dataclass
class OpenedCase:
    """A case opened in the page: its volume and the segmentation that Segment, the effects and Save work on.
    Cases stay in the session's scene until closed, so a training can use every one of them."""

    relative: str  # its path in the data root, as the page names it (with SERIES_MARK and the series' UID)
    path: Path
    volume: object  # vtkMRMLScalarVolumeNode
    segmentation: object  # vtkMRMLSegmentationNode
    #: The segmentation file's (mtime, size) when this session last read or wrote it; None: it had none.
    disk_stamp: Optional[tuple] = None
    #: The segmentation's content when last read or written (:func:`fingerprint`); None: never.
    saved: Optional[str] = None
    #: The UID of the series chosen from a DICOM folder of several; None: a file, or a folder of one series.
    series: Optional[str] = None

    @property
    def stem(self) -> str:
        """The name its saved segmentation starts with: the file's, the folder's, or for a series chosen from
        a folder of several ``<folder>-<series UID>`` (so the series of one folder never share a file)."""
        if not self.path.is_dir():
            return strip_suffix(self.path)
        return f"{self.path.name}-{self.series}" if self.series else self.path.name

    @property
    def segment_count(self) -> int:
        return self.segmentation.GetSegmentation().GetNumberOfSegments()

    @property
    def segment_names(self) -> list[str]:
        segmentation = self.segmentation.GetSegmentation()
        return [segmentation.GetNthSegment(i).GetName() for i in range(segmentation.GetNumberOfSegments())]

    @property
    def segment_colors(self) -> list[tuple]:
        segmentation = self.segmentation.GetSegmentation()
        return [tuple(segmentation.GetNthSegment(i).GetColor()) for i in range(segmentation.GetNumberOfSegments())]

    def label_map(self):
        """The segments as one label map on the volume's grid (1 = first segment)."""
        return mrml.segmentationToLabelMap(self.segmentation, self.volume, self.segment_names)

    def fingerprint(self) -> str:
        """What the segmentation holds (names, colours, voxels), to tell whether it changed since saved."""
        digest = hashlib.sha1(repr((self.segment_names, self.segment_colors)).encode())
        digest.update(self.label_map().tobytes())
        return digest.hexdigest()

    @property
    def has_unsaved_edits(self) -> bool:
        """Segments that are not in the file as this session last read or wrote it."""
        if not self.segment_count:
            return self.saved is not None  # all segments deleted since the saved file was read
        return self.fingerprint() != self.saved

    def statistics(self) -> list[dict]:
        """Per segment: its voxels and its volume in mL (voxel count times the voxel's volume; where segments
        overlap, a voxel counts for the later one, as in the saved file)."""
        names = self.segment_names
        labels = self.label_map()
        counts = np.bincount(labels.ravel(), minlength=len(names) + 1)
        voxel_ml = float(np.prod(mrml.geometryFromVolume(self.volume).spacing)) / 1000.0
        return [{"segment": name, "voxels": int(counts[i]), "ml": round(int(counts[i]) * voxel_ml, 3)}
                for i, name in enumerate(names, start=1)]

    def undo_steps(self) -> int:
        """Undo depth for this case: the steps that fit UNDO_MEMORY_BYTES (two copies per step)."""
        voxels = max(1, math.prod(mrml.volumeToArrayShape(self.volume)))
        return max(MIN_UNDO_STEPS, min(MAX_UNDO_STEPS, UNDO_MEMORY_BYTES // (2 * voxels)))


def statistics_path(segmentation: Path) -> Path:
    """``<stem>.statistics.csv`` beside ``<stem>.seg.nrrd``."""
    return segmentation.with_name(segmentation.name[:-len(SEGMENTATION_SUFFIX)] + STATISTICS_SUFFIX)


def write_statistics_csv(rows: list[dict], path: Path) -> None:
    """Segment, voxels, volume in mL: one row per segment, written through a temporary file."""
    def write(target: Path) -> None:
        with open(target, "w", newline="", encoding="utf-8") as file:
            writer = csv.writer(file)
            writer.writerow(["segment", "voxels", "volume_ml"])
            writer.writerows([row["segment"], row["voxels"], f"{row['ml']:.3f}"] for row in rows)

    write_files_atomic(path, write)


def disk_stamp(path: Path) -> Optional[tuple]:
    """(modification time, size) of a file, None if there is none."""
    try:
        status = os.stat(path)
    except FileNotFoundError:
        return None
    return status.st_mtime_ns, status.st_size


def case_name(relative: str, series: Optional[str] = None) -> str:
    """The page's name of a case: its path in the data root, plus the series chosen from a DICOM folder."""
    return f"{relative}{SERIES_MARK}{series}" if series else relative


def split_case_name(name: str) -> tuple[str, Optional[str]]:
    """(path in the data root, series UID or None) of a name made by :func:`case_name`."""
    relative, mark, series = name.rpartition(SERIES_MARK)
    return (relative, series) if mark else (name, None)


def check_volume(path: Path, data_root: Optional[DataRoot] = None, series: Optional[str] = None) -> None:
    """Reads a volume (or the series ``series`` of a DICOM folder) with the engine's checked reader (the CLI's:
    a cut or damaged file, NaN voxels, misplaced slices and the like are refused), so the page never shows or
    segments what the CLI would refuse."""
    try:
        read_image(path, series_uid=series)
    except DataError as error:
        raise AccessError(data_root.shown(str(error)) if data_root is not None else str(error)) from None


class OpenedCases:
    """The session's opened cases, by their path in the data root, in the order they were opened."""

    def __init__(self, slicer_app, data_root: DataRoot, concept_table):
        self.slicer_app, self.data_root = slicer_app, data_root
        self._concept_table = concept_table  # segmentation node -> its concept table node (or None)
        self.by_path: dict[str, OpenedCase] = {}

    def __iter__(self):
        return iter(self.by_path.values())

    def __len__(self) -> int:
        return len(self.by_path)

    def open(self, name: str) -> OpenedCase:
        """The case of a volume, DICOM folder or series of a DICOM folder (named as :func:`case_name` does) of
        the data root, read into the scene on first use."""
        relative, series = split_case_name(name or "")
        path = self.data_root.resolve(relative)
        relative = case_name(self.data_root.relative(path), series)
        if relative not in self.by_path:
            check_volume(path, self.data_root, series)
            if series is not None:  # only its files: Slicer would read every series of the folder
                files = next(list(found.files) for found in list_dicom_series(path) if found.uid == series)
            elif path.is_dir():
                files = sorted(str(p) for p in path.iterdir() if p.is_file())
            else:
                files = [str(path)]
            volumes = self.slicer_app.io_manager.load_volumes(files)
            if not volumes:
                raise AccessError(f"{relative}: no volume could be read from it")
            for extra in volumes[1:]:  # a folder of several series: the first is the case
                self.slicer_app.scene.RemoveNode(extra)
            segmentation = self.slicer_app.segmentation_editor.create_empty_segmentation_node()
            segmentation.SetName(f"{volumes[0].GetName()} segmentation")
            self.by_path[relative] = OpenedCase(relative, path, volumes[0], segmentation, series=series)
        return self.by_path[relative]

    def close(self, case: OpenedCase) -> Optional[OpenedCase]:
        """Removes a case (volume, segmentation, its concept table) from the scene; returns the case to show
        next (the last opened one), if any."""
        self.by_path.pop(case.relative)  # a running training has its own copy (exported at its start)
        for node in (self._concept_table(case.segmentation), case.segmentation, case.volume):
            if node is not None:
                self.slicer_app.scene.RemoveNode(node)
        return next(reversed(self.by_path.values()), None)

    def hide_all_but(self, case: OpenedCase) -> None:
        for other in self:
            if other is not case:
                self.slicer_app.display_manager.hide_volume(other.volume)
                other.segmentation.SetDisplayVisibility(False)

    def choices(self) -> list[dict]:
        """The opened cases for the page, each with how many segments it has (training uses those with some)."""
        return [{"value": case.relative, "title": f"{case.relative} ({case.segment_count} segments)"} for case in self]

    def load_saved(self, case: OpenedCase) -> Optional[Path]:
        """Reads the segmentation saved beside the case (its names, colours and voxels) into the case, through
        the engine's reader; returns its path, or None when there is none."""
        path = self.segmentation_path(case)
        if not path.is_file():
            case.disk_stamp, case.saved = None, None
            return None
        stamp = disk_stamp(path)
        try:
            segments = read_segmentation_file(path)[0]["segments"]
            names = [str(segment.get("name") or f"Segment_{segment.get('labelValue')}") for segment in segments]
            colors = [tuple(segment.get("color") or (0.5, 0.5, 0.5)) for segment in segments]
            labels = read_label_map(path, reference=read_image_geometry(case.path, case.series), classes=names)
            mrml.labelMapToSegmentation(self.slicer_app.scene, labels, case.volume, names, colors, case.segmentation)
        except (CoTexNetError, ValueError) as error:
            raise AccessError(self.data_root.shown(f"{path}: not loaded ({error}); Save will not replace it")) from None
        case.disk_stamp, case.saved = stamp, case.fingerprint()
        return path

    def with_classes(self, case: OpenedCase, choices: dict) -> OpenedCase:
        """The case as a training should see it: segments whose name ``choices`` maps to ``SKIP`` left out,
        to ``MAP_TO + class`` renamed; the case itself when nothing changes, else a copy of its segmentation
        (hidden, removed with :meth:`drop_copy`) so the user's segments stay as they are."""
        names = case.segment_names
        changes = {name: choices[name] for name in names if choices.get(name, ADD_CLASS) != ADD_CLASS}
        if not changes:
            return case
        copy = self.slicer_app.scene.AddNewNodeByClass("vtkMRMLSegmentationNode",
                                                      f"{case.segmentation.GetName()} for training")
        segmentation = copy.GetSegmentation()
        segmentation.DeepCopy(case.segmentation.GetSegmentation())
        for name, choice in changes.items():
            segment_id = segmentation.GetSegmentIdBySegmentName(name)
            if choice == SKIP_CLASS:
                segmentation.RemoveSegment(segment_id)
                continue
            target = choice[len(MAP_TO):]
            if target in names:
                self.slicer_app.scene.RemoveNode(copy)
                raise AccessError(f"{case.relative}: '{name}' cannot be mapped to '{target}', which the case has "
                                  "too: skip one of them, or merge them by painting")
            segmentation.GetSegment(segment_id).SetName(target)
        return OpenedCase(case.relative, case.path, case.volume, copy, series=case.series)

    def drop_copy(self, case: OpenedCase) -> None:
        """Removes a training copy made by :meth:`with_classes` (an opened case itself stays)."""
        if self.by_path.get(case.relative) is not case:
            self.slicer_app.scene.RemoveNode(case.segmentation)

    def changed_on_disk(self, case: OpenedCase, target: Optional[Path] = None) -> bool:
        """Whether the case's segmentation file differs from the one this session last read or wrote (another
        session saved it, or it appeared after the case was opened)."""
        return disk_stamp(target or self.segmentation_path(case)) != case.disk_stamp

    def save(self, case: OpenedCase, target: Optional[Path] = None) -> Path:
        """Writes the case's segments as .seg.nrrd (through the engine's writer, temp file then rename) at
        ``target`` (default: beside the volume) and remembers what was written."""
        target = target or self.segmentation_path(case)
        names = case.segment_names
        write_segmentation_nrrd(case.label_map(), mrml.geometryFromVolume(case.volume), target, names,
                                case.segment_colors)
        write_statistics_csv(case.statistics(), statistics_path(target))
        if target == self.segmentation_path(case):
            case.disk_stamp, case.saved = disk_stamp(target), case.fingerprint()
        return target

    def free_copy_path(self, case: OpenedCase) -> Path:
        """``<stem>-copy-N.seg.nrrd`` beside the case's segmentation file, the first N that is free."""
        usual = self.segmentation_path(case)
        number = 1
        while True:
            candidate = usual.with_name(f"{case.stem}-copy-{number}{SEGMENTATION_SUFFIX}")
            if not candidate.exists():
                return candidate
            number += 1

    def segmentation_path(self, case: OpenedCase) -> Path:
        """Where a case's segmentation is saved: beside the volume file, or beside the DICOM folder (never
        inside a series)."""
        return self.data_root.resolve(str(PurePosixPath(case.relative).parent / f"{case.stem}{SEGMENTATION_SUFFIX}"),
                                      must_exist=False)
