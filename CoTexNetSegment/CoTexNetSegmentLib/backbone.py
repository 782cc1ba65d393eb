"""Hugging Face models CoTexNet fetches once: find them in the cache or download them with progress and a real Cancel.

Two kinds: the base CLIPSeg backbone (a trained bundle carries all its weights, so segmenting never needs
it; training a new model starts from it) and the LLaVA model of the ``llava`` concept backend (several
GB: the GUI asks first; the job logs the size). One mechanism, parameterised by repository id and file patterns.
The download runs in a child Python process because huggingface_hub offers no way to interrupt a file
transfer: Cancel ends the process tree (PythonSlicer is a launcher, see :mod:`.processes`; the partial file
is resumed next time), and progress is the number of bytes that have arrived in the cache folder.
"""

from __future__ import annotations

import fnmatch
import json
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Optional, Sequence

from .jobs import Job, Reporter
from .processes import NO_WINDOW, engineEnvironment, killProcessTree, pythonExecutable

DEFAULT_BACKBONE = "CIDAS/clipseg-rd64-refined"
#: Application setting holding the folder used as the Hugging Face cache (also the offline folder).
BACKBONE_FOLDER_SETTING = "CoTexNet/BackboneFolder"
#: What a LLaVA repository needs for ``from_pretrained``: configs, safetensors weights, tokenizer files.
LLAVA_PATTERNS = ("*.json", "*.safetensors", "tokenizer.model", "*.txt")
#: argv: repository id, cache folder ("" for the default), JSON list of file patterns ("" for a CLIPSeg backbone).
_DOWNLOAD_SCRIPT = (
    "import json, sys\n"
    "repo, cache, patterns = sys.argv[1], sys.argv[2] or None, sys.argv[3]\n"
    "if patterns:\n"
    "    from huggingface_hub import snapshot_download\n"
    "    print(snapshot_download(repo, cache_dir=cache, allow_patterns=json.loads(patterns)))\n"
    "else:\n"
    "    from cotexnet.bundle import download_backbone\n"
    "    print(download_backbone(repo, cache))\n"
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


def _filePatterns(patterns: Optional[Sequence[str]]) -> Sequence[str]:
    """The file patterns of a download; None means a CLIPSeg backbone (the engine's ``BACKBONE_FILES``)."""
    if patterns is not None:
        return patterns
    from cotexnet.bundle import BACKBONE_FILES

    return BACKBONE_FILES


def _matches(filename: str, patterns: Sequence[str]) -> bool:
    return any(fnmatch.fnmatch(filename, pattern) for pattern in patterns)


def _expectedBytes(repoId: str, patterns: Optional[Sequence[str]] = None) -> int:
    """Total size of the files to fetch, 0 when the hub cannot tell (progress is then indeterminate)."""
    from huggingface_hub import HfApi

    patterns = _filePatterns(patterns)
    try:
        info = HfApi().model_info(repoId, files_metadata=True, timeout=10)
    except Exception:
        return 0
    return sum(s.size or 0 for s in info.siblings if _matches(s.rfilename, patterns))


def cachedModel(repoId: str, patterns: Sequence[str], cacheDir: Optional[str] = None) -> Optional[Path]:
    """The local folder of a fully cached repository (every file matching ``patterns``), or None; offline."""
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(repoId, cache_dir=cacheDir, local_files_only=True, allow_patterns=list(patterns)))
    except Exception:  # not (completely) cached
        return None


def _arrivedBytes(repoFolder: Path) -> int:
    blobs = repoFolder / "blobs"
    return sum(f.stat().st_size for f in blobs.iterdir() if f.is_file()) if blobs.is_dir() else 0


def llavaDownloadNeeded(options: Optional[dict] = None, cacheDir: Optional[str] = None) -> Optional[str]:
    """The repository the ``llava`` concept backend would download on first use, or None (a local folder, or cached).

    ``options`` are the backend's options (``model`` defaults to the engine's ``llava.DEFAULT_MODEL``).
    """
    from cotexnet.concepts.llava import DEFAULT_MODEL

    model = str((options or {}).get("model") or DEFAULT_MODEL)
    if Path(model).expanduser().is_dir() or cachedModel(model, LLAVA_PATTERNS, cacheDir) is not None:
        return None
    return model


def startBackboneDownload(repoId: str = DEFAULT_BACKBONE, cacheDir: Optional[str] = None,
                          patterns: Optional[Sequence[str]] = None) -> Job:
    """Downloads ``repoId`` into ``cacheDir`` (the Hugging Face cache if None); ``job.result`` is its folder.

    ``patterns`` (huggingface_hub ``allow_patterns``) choose the files; None fetches a CLIPSeg backbone.
    """
    repoFolder = cacheRoot(cacheDir) / ("models--" + repoId.replace("/", "--"))

    def work(reporter: Reporter) -> Path:
        # The size is asked here, off the GUI's thread: the hub may take seconds to answer, or never (offline).
        total = _expectedBytes(repoId, patterns) if patterns is not None else _expectedBytes(repoId)
        size = f"{total / 1e9:.1f} GB" if total else "size unknown"
        reporter.log(f"Downloading {repoId} ({size}) into {cacheRoot(cacheDir)}")
        environment = engineEnvironment()
        # Output goes to files, not pipes: tqdm writes enough to stderr to fill a pipe and stall the child.
        with tempfile.TemporaryFile("w+") as output, tempfile.TemporaryFile("w+") as errors:
            process = subprocess.Popen([pythonExecutable(), "-c", _DOWNLOAD_SCRIPT, repoId, cacheDir or "",
                                        json.dumps(list(patterns)) if patterns is not None else ""],
                                       stdout=output, stderr=errors, text=True, env=environment,
                                       creationflags=NO_WINDOW)
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
