"""The app's files: everything a browser names lies inside the data root, checked before any use.

A browser sends relative paths (``cases/ct1.nii.gz``). :class:`DataRoot` turns them into real paths and
refuses absolute paths, ``..`` parts, and paths whose real location (symlinks resolved) lies outside the
root, so a page can never read or write elsewhere on the server. Uploads are capped in size and written
to a temporary file that is renamed into place (a half-written upload is never seen).
"""

from __future__ import annotations

import os
import re
from pathlib import Path, PurePosixPath

from cotexnet.atomic import write_files_atomic
from cotexnet.data.image import SEGMENTATION_SUFFIX, VOLUME_SUFFIXES, strip_suffix
from cotexnet.errors import CoTexNetError

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

    def volumes(self, limit: int = 500) -> list[str]:
        """Relative paths of the volumes and DICOM folders under the root (segmentations excluded)."""
        found = []
        for folder, dirs, files in os.walk(self.root):
            dirs[:] = sorted(d for d in dirs if not d.startswith("."))
            here = Path(folder)
            if not self._inside(here):
                continue
            if any(name.lower().endswith(".dcm") for name in files):
                found.append(self.relative(here))
            for name in sorted(files):
                lower = name.lower()
                if lower.endswith(SEGMENTATION_SUFFIX) or lower.endswith(".dcm"):
                    continue
                if lower.endswith(VOLUME_SUFFIXES) and self._inside(here / name):
                    found.append(self.relative(here / name))
            if len(found) >= limit:
                break
        return found[:limit]

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

    def save_upload(self, name: str, content: bytes) -> Path:
        """Writes an uploaded file into ``uploads/`` under a safe name; returns its path."""
        if len(content) > self.upload_limit_bytes:
            raise AccessError(f"{name}: {len(content) / 2**20:.1f} MiB is over the upload limit of "
                              f"{self.upload_limit_bytes / 2**20:.0f} MiB")
        safe = _SAFE_NAME.sub("_", PurePosixPath(str(name).replace("\\", "/")).name).lstrip(".")
        if not safe.lower().endswith(VOLUME_SUFFIXES):
            raise AccessError(f"{name}: expected a volume file ({', '.join(VOLUME_SUFFIXES)})")
        target = self.resolve(f"{UPLOADS_FOLDER}/{safe}", must_exist=False)
        target.parent.mkdir(exist_ok=True)
        stem, suffix = strip_suffix(target), target.name[len(strip_suffix(target)):]
        number = 1
        while True:  # never replace an earlier upload (another session may have it open): claim a free name
            try:
                os.close(os.open(target, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644))
                break
            except FileExistsError:
                number += 1
                target = target.with_name(f"{stem}-{number}{suffix}")
        try:
            write_files_atomic(target, lambda temporary: Path(temporary).write_bytes(content))
        except BaseException:
            target.unlink(missing_ok=True)  # the empty file that claimed the name
            raise
        return target

    def _inside(self, path: Path) -> bool:
        real = path.resolve()
        return real == self.root or self.root in real.parents
