"""The cases a browser session has opened: their volumes and segmentations in the session's MRML scene,
and the files they come from and are saved to, all inside the data root.

No trame here: the page (:mod:`cotexnet_app.session`) calls these and shows what they return or raise.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Optional

from cotexnet.data.image import SEGMENTATION_SUFFIX, strip_suffix

from cotexnet_app.files import AccessError, DataRoot


@dataclass
class OpenedCase:
    """A case opened in the page: its volume and the segmentation that Segment, the effects and Save work on.
    Cases stay in the session's scene until closed, so a training can use every one of them."""

    relative: str  # its path in the data root, as the page names it
    path: Path
    volume: object  # vtkMRMLScalarVolumeNode
    segmentation: object  # vtkMRMLSegmentationNode

    @property
    def stem(self) -> str:
        return self.path.name if self.path.is_dir() else strip_suffix(self.path)

    @property
    def segment_count(self) -> int:
        return self.segmentation.GetSegmentation().GetNumberOfSegments()


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

    def open(self, relative: str) -> OpenedCase:
        """The case of a volume or DICOM folder of the data root, read into the scene on first use."""
        path = self.data_root.resolve(relative or "")
        relative = self.data_root.relative(path)
        if relative not in self.by_path:
            files = sorted(str(p) for p in path.iterdir() if p.is_file()) if path.is_dir() else [str(path)]
            volumes = self.slicer_app.io_manager.load_volumes(files)
            if not volumes:
                raise AccessError(f"{relative}: no volume could be read from it")
            for extra in volumes[1:]:  # a folder of several series: the first is the case
                self.slicer_app.scene.RemoveNode(extra)
            segmentation = self.slicer_app.segmentation_editor.create_empty_segmentation_node()
            segmentation.SetName(f"{volumes[0].GetName()} segmentation")
            self.by_path[relative] = OpenedCase(relative, path, volumes[0], segmentation)
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

    def segmentation_path(self, case: OpenedCase) -> Path:
        """Where a case's segmentation is saved: beside the volume file, or beside the DICOM folder (never
        inside a series)."""
        return self.data_root.resolve(str(PurePosixPath(case.relative).parent / f"{case.stem}{SEGMENTATION_SUFFIX}"),
                                      must_exist=False)
