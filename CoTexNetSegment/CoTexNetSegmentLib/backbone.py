"""The base CLIPSeg backbone: find it in the cache or download it once, with progress and a real Cancel.

A trained bundle carries all its weights, so segmenting never needs the backbone; training a new model
starts from it. The download runs in a child Python process because huggingface_hub offers no way to
interrupt a file transfer: Cancel ends the process tree (PythonSlicer is a launcher, see :mod:`.processes`;
the partial file is resumed next time), and progress is the number of bytes that have arrived in the cache
folder.
"""

from __future__ import annotations

import subprocess
import tempfile
import time
from pathlib import Path
from typing import Optional

from .jobs import Job, Reporter
from .processes import engineEnvironment, killProcessTree, pythonExecutable

DEFAULT_BACKBONE = "CIDAS/clipseg-rd64-refined"
#: Application setting holding the folder used as the Hugging Face cache (also the offline folder).
BACKBONE_FOLDER_SETTING = "CoTexNet/BackboneFolder"
_DOWNLOAD_SCRIPT = (
    "import sys\n"
    "from cotexnet.bundle import download_backbone\n"
    "print(download_backbone(sys.argv[1], sys.argv[2] or None))\n"
)


def cacheRoot(cacheDir: Optional[str]) -> Path:
    if cacheDir:
        return Path(cacheDir).expanduser()
    from huggingface_hub import constants

    return Path(constants.HF_HUB_CACHE)


def cachedBackbone(repoId: str = DEFAULT_BACKBONE, cacheDir: Optional[str] = None) -> Optional[Path]:
    """The local folder of a complete cached backbone, or None; never touches the network."""
    from huggingface_hub import snapshot_download
    from cotexnet.bundle import BACKBONE_FILES, WEIGHTS_NAME

    try:
        folder = Path(snapshot_download(repoId, cache_dir=cacheDir, local_files_only=True,
                                        allow_patterns=list(BACKBONE_FILES)))
    except Exception:  # not cached (huggingface_hub raises several types for that)
        return None
    return folder if (folder / WEIGHTS_NAME).is_file() else None


def _expectedBytes(repoId: str) -> int:
    """Total size of the files to fetch, 0 when the hub cannot tell (progress is then indeterminate)."""
    from huggingface_hub import HfApi
    from cotexnet.bundle import BACKBONE_FILES

    try:
        info = HfApi().model_info(repoId, files_metadata=True, timeout=10)
    except Exception:
        return 0
    return sum(s.size or 0 for s in info.siblings if s.rfilename in BACKBONE_FILES)


def _arrivedBytes(repoFolder: Path) -> int:
    blobs = repoFolder / "blobs"
    return sum(f.stat().st_size for f in blobs.iterdir() if f.is_file()) if blobs.is_dir() else 0


def startBackboneDownload(repoId: str = DEFAULT_BACKBONE, cacheDir: Optional[str] = None) -> Job:
    """Downloads ``repoId`` into ``cacheDir`` (the Hugging Face cache if None); ``job.result`` is its folder."""
    repoFolder = cacheRoot(cacheDir) / ("models--" + repoId.replace("/", "--"))

    def work(reporter: Reporter) -> Path:
        reporter.log(f"Downloading {repoId} into {cacheRoot(cacheDir)}")
        total = _expectedBytes(repoId)
        environment = engineEnvironment()
        # Output goes to files, not pipes: tqdm writes enough to stderr to fill a pipe and stall the child.
        with tempfile.TemporaryFile("w+") as output, tempfile.TemporaryFile("w+") as errors:
            process = subprocess.Popen([pythonExecutable(), "-c", _DOWNLOAD_SCRIPT, repoId, cacheDir or ""],
                                       stdout=output, stderr=errors, text=True, env=environment)
            try:
                while process.poll() is None:
                    if reporter.cancelled:
                        from cotexnet.errors import Cancelled

                        raise Cancelled("backbone download cancelled")
                    reporter.progress(min(_arrivedBytes(repoFolder), total), total)
                    time.sleep(0.5)
            finally:
                if process.poll() is None:
                    killProcessTree(process)
            output.seek(0)
            errors.seek(0)
            outputText, errorText = output.read(), errors.read()
        if process.returncode != 0:
            from cotexnet.errors import BundleError

            lines = errorText.strip().splitlines() or [f"exit code {process.returncode}"]
            raise BundleError(lines[-1].partition("Error: ")[2] or lines[-1])
        reporter.progress(total, total)
        return Path(outputText.strip().splitlines()[-1])

    return Job(work, lambda folder: folder, name=f"Download {repoId}").start()
