"""The app's files: everything a browser names lies inside the data root, checked before any use.

A browser sends relative paths (``cases/ct1.nii.gz``). :class:`DataRoot` turns them into real paths and
refuses absolute paths, ``..`` parts, and paths whose real location (symlinks resolved) lies outside the
root, so a page can never read or write elsewhere on the server. Uploads are capped in size, arrive in
chunks into a hidden folder and are renamed into place once whole and readable (a half-written or damaged
upload is never seen).
"""

from __future__ import annotations

import os
import re
import shutil
import tempfile
from pathlib import Path, PurePosixPath
from typing import Callable
from cotexnet.data.image import SEGMENTATION_SUFFIX, VOLUME_SUFFIXES, strip_suffix
from cotexnet.errors import CoTexNetError, DataError

#: Default cap on one uploaded file, in MiB (a CT volume in .nii.gz is typically 20 to 200 MiB).
DEFAULT_UPLOAD_LIMIT_MB = 512
#: Folder of the data root that receives uploads.
UPLOADS_FOLDER = "uploads"
#: Folder of the data root that receives the training runs started from the page.
RUNS_FOLDER = "runs"
#: A training run folder's best bundle (cotexnet.bundle.bundle_folder resolves RUN to RUN/best).
RUN_BEST = "best"
#: Files a model bundle folder holds (docs/bundle-format.md).
BUNDLE_FILES = ("config.json", "model.safetensors")
#: Folders whose volumes are label maps (nnU-Net's labelsTr/labelsTs, the engine's masks/), not images.
LABEL_FOLDERS = ("labelstr", "labelsts", "labels", "masks")
#: Name prefix of the hidden folders that hold uploads still arriving.
STAGING_PREFIX = ".upload-"
_SAFE_NAME = re.compile(r"[^A-Za-z0-9._-]+")


class AccessError(CoTexNetError):
    """A path from the browser names something outside the data root, or an upload breaks a rule."""


class DataRoot:
    """The one folder the app reads and writes; every browser path goes through :meth:`resolve`."""

    def __init__(self, root: str | Path, upload_limit_mb: float = DEFAULT_UPLOAD_LIMIT_MB):
        self.root = Path(root).expanduser().resolve()
        if not self.root.is_dir():
            raise AccessError(f"--data-root {root}: not a folder")
        self.upload_limit_bytes = int(upload_limit_mb * 1024 * 1024)

    def resolve(self, relative: str, *, must_exist: bool = True) -> Path:
        """The real path of ``relative`` inside the root; AccessError for anything that would leave it."""
        text = str(relative).replace("\\", "/")
        pure = PurePosixPath(text)
        if not text or pure.is_absolute() or re.match(r"^[A-Za-z]:", text):
            raise AccessError(f"{relative!r}: expected a path relative to the data root")
        if ".." in pure.parts:
            raise AccessError(f"{relative!r}: '..' is not allowed; paths stay inside the data root")
        path = (self.root / pure).resolve()  # follows symlinks: a link out of the root is caught below
        if path != self.root and self.root not in path.parents:
            raise AccessError(f"{relative!r}: resolves outside the data root (a symbolic link?)")
        if must_exist and not path.exists():
            raise AccessError(f"{relative!r}: no such file or folder in the data root")
        return path

    def relative(self, path: Path) -> str:
        return path.resolve().relative_to(self.root).as_posix()

    def shown(self, message: str) -> str:
        """A message for the page: server paths inside the root become relative to it."""
        return message.replace(f"{self.root}{os.sep}", "").replace(str(self.root), ".")

    def volumes(self, limit: int = 500) -> list[str]:
        """Relative paths of the images (volumes and DICOM folders) under the root: no segmentation, no label
        map folder (labelsTr/, masks/, ...), nothing under runs/ (training exports)."""
        return self._files(limit)[0]

    def segmentations(self, limit: int = 500) -> list[str]:
        """Relative paths of the segmentations under the root: .seg.nrrd files and the files of label map
        folders (runs/ left out)."""
        return self._files(limit)[1]

    def _files(self, limit: int) -> tuple[list[str], list[str]]:
        images, segmentations = [], []
        for folder, dirs, files in os.walk(self.root):
            here = Path(folder)
            dirs[:] = sorted(d for d in dirs if not d.startswith(".") and not (here == self.root and d == RUNS_FOLDER))
            if not self._inside(here):
                continue
            labels_folder = here.name.lower() in LABEL_FOLDERS
            if any(name.lower().endswith(".dcm") for name in files):
                images.append(self.relative(here))
            for name in sorted(files):
                lower = name.lower()
                if lower.endswith(".dcm") or not self._inside(here / name):
                    continue
                if lower.endswith(SEGMENTATION_SUFFIX) or (labels_folder and lower.endswith(VOLUME_SUFFIXES)):
                    segmentations.append(self.relative(here / name))
                elif lower.endswith(VOLUME_SUFFIXES):
                    images.append(self.relative(here / name))
            if len(images) >= limit and len(segmentations) >= limit:
                break
        return images[:limit], segmentations[:limit]

    def models(self, limit: int = 100) -> list[str]:
        """Relative paths of model bundle folders under the root (training runs' ``best/`` included)."""
        found = []
        for folder, dirs, files in os.walk(self.root):
            dirs[:] = sorted(d for d in dirs if not d.startswith("."))
            if all(name in files for name in BUNDLE_FILES) and self._inside(Path(folder)):
                found.append(self.relative(Path(folder)))
            if len(found) >= limit:
                break
        return found

    def runs(self) -> list[str]:
        """Relative paths of the training run folders under the root (those with a ``best/`` bundle): a run
        folder is accepted wherever a bundle is, and stands for its best model."""
        bundles = self.models()
        return sorted({bundle.rpartition("/")[0] for bundle in bundles
                       if bundle.rpartition("/")[2] == RUN_BEST and bundle.count("/") >= 1})

    def save_upload(self, name: str, content: bytes, check: Callable[[Path], None] = lambda path: None) -> Path:
        """Writes a whole uploaded file into ``uploads/`` (see :class:`Upload`); returns its path."""
        upload = self.begin_upload(name, len(content))
        upload.write(0, content)
        return upload.finish(check)

    def begin_upload(self, name: str, size: int) -> "Upload":
        """Starts receiving a file of ``size`` bytes that the page sends in chunks; refuses it at once if it
        is over the cap or not a volume file."""
        if size > self.upload_limit_bytes:
            raise AccessError(f"{name}: {size / 2**20:.1f} MiB is over the upload limit of "
                              f"{self.upload_limit_bytes / 2**20:.0f} MiB")
        safe = _SAFE_NAME.sub("_", PurePosixPath(str(name).replace("\\", "/")).name).lstrip(".")
        if not safe.lower().endswith(VOLUME_SUFFIXES):
            raise AccessError(f"{name}: expected a volume file ({', '.join(VOLUME_SUFFIXES)})")
        folder = self.resolve(UPLOADS_FOLDER, must_exist=False)
        folder.mkdir(exist_ok=True)
        return Upload(folder, safe, size)

    def _inside(self, path: Path) -> bool:
        real = path.resolve()
        return real == self.root or self.root in real.parents


class Upload:
    """One uploaded file arriving in chunks, in order. It is written to a hidden folder of ``uploads/`` (which
    the listings skip) and moved into place under a free name only when whole and accepted by ``check``
    (the engine's reader); a refused or abandoned upload leaves nothing behind. The bytes go to disk as they
    arrive, so no process holds a whole upload in memory."""

    def __init__(self, folder: Path, name: str, size: int):
        self.folder, self.name, self.size = folder, name, size
        self.staging = Path(tempfile.mkdtemp(prefix=STAGING_PREFIX, dir=folder))
        self.received = 0

    @property
    def partial(self) -> Path:
        return self.staging / self.name  # the final name: readers choose their format by the suffix

    def write(self, offset: int, data: bytes) -> None:
        if offset != self.received or self.received + len(data) > self.size:
            self.abort()
            raise AccessError(f"{self.name}: upload chunk at byte {offset} does not follow the {self.received} "
                              f"bytes received (of {self.size})")
        with open(self.partial, "ab") as file:
            file.write(data)
        self.received += len(data)

    def finish(self, check: Callable[[Path], None] = lambda path: None) -> Path:
        """Checks the whole file with ``check`` (which raises to refuse it) and moves it into ``uploads/``
        under its name, or ``<stem>-N<suffix>`` when that name is taken (never replacing an earlier upload:
        another session may have it open)."""
        try:
            if self.received != self.size:
                raise AccessError(f"{self.name}: upload ended after {self.received} of {self.size} bytes")
            self.partial.touch()
            try:
                check(self.partial)
            except DataError as error:  # named after the file the user sent, not the staging folder
                reason = str(error)[len(f"{error.path}: "):] if error.path is not None else str(error)
                reason = reason.replace(str(self.partial), self.name)  # a library's message may name it too
                raise AccessError(f"{self.name}: {reason}; nothing was saved") from None
            stem, suffix = strip_suffix(self.partial), self.name[len(strip_suffix(self.partial)):]
            target, number = self.folder / self.name, 1
            while True:  # claim a free name, then move the file over the empty placeholder in one rename
                try:
                    os.close(os.open(target, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644))
                    break
                except FileExistsError:
                    number += 1
                    target = self.folder / f"{stem}-{number}{suffix}"
            os.replace(self.partial, target)
            return target
        finally:
            self.abort()

    def abort(self) -> None:
        shutil.rmtree(self.staging, ignore_errors=True)
