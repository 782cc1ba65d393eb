"""Models shared through the Hugging Face Hub: push a bundle, use one by its repository id.

Wherever a bundle folder is expected (``CoTexNet.from_pretrained``, ``cotexnet segment``, the worker, both
Slicer modules), ``owner/name`` or ``owner/name@revision`` that is not an existing local path names a Hub
repository. It is downloaded once into the Hugging Face cache (``HF_HOME``/``HF_HUB_CACHE``) and read from
there afterwards, also with ``HF_HUB_OFFLINE=1``. Only safetensors, JSON, text and the card are fetched, never
pickles (``.bin``, ``.pt``) or code (``.py``), and loading reads tensors only: nothing from a repository runs.
``HF_ENDPOINT`` points everything at another Hub (the tests run a stand-in on loopback).
"""
from __future__ import annotations

import os
import re
from pathlib import Path

from .config import CONFIG_NAME, WEIGHTS_NAME
from .errors import BundleError

#: A Hub model repository id (``owner/name``), as huggingface_hub validates it.
REPO_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,95}/[A-Za-z0-9][A-Za-z0-9._-]{0,95}$")
#: What a bundle repository may give us: weights as safetensors, config/tokenizer JSON and text, the card.
DOWNLOAD_PATTERNS = ("*.safetensors", "*.json", "*.txt", "README.md")
#: Enough to show a model (its card's title, its classes) without fetching the weights.
DESCRIPTION_FILES = ("config.json", "README.md")
#: What ``cotexnet push`` uploads from a bundle. Never trainer_state.pt (a training run's last/), and not
#: training.json, which holds local paths and every option of the run; the card carries its summary.
UPLOAD_FILES = ("config.json", "model.safetensors", "vocab.json", "merges.txt", "tokenizer_config.json",
                "special_tokens_map.json", "tokenizer.json", "README.md")


def parse_repo_id(name: str | os.PathLike) -> tuple[str, str | None] | None:
    """``(repo_id, revision)`` when ``name`` names a Hub repository rather than a local path, else None."""
    text = str(name)
    if not text or text.startswith((".", "/", "~")) or Path(text).expanduser().exists():
        return None
    repo_id, _, revision = text.partition("@")
    return (repo_id, revision or None) if REPO_ID.match(repo_id) else None


def download_model(repo_id: str, revision: str | None = None, files=DOWNLOAD_PATTERNS,
                   cache_dir: str | os.PathLike | None = None) -> Path:
    """The cached snapshot folder of a Hub bundle repository, downloading what ``files`` match if needed."""
    from huggingface_hub import constants, snapshot_download
    from huggingface_hub.utils import RepositoryNotFoundError, RevisionNotFoundError

    where = f"{repo_id}" + (f"@{revision}" if revision else "")
    try:
        folder = Path(snapshot_download(repo_id, revision=revision, allow_patterns=list(files), cache_dir=cache_dir))
    except RevisionNotFoundError:
        raise BundleError(f"{where}: the Hub repository has no revision {revision!r}") from None
    except RepositoryNotFoundError:
        raise BundleError(f"{repo_id}: no such local folder, and no such model repository on {constants.ENDPOINT} (or "
                          f"it is private and no token was given: hf auth login, or set HF_TOKEN)") from None
    except Exception as error:  # offline and not cached, network down, server errors: one message
        offline = " (HF_HUB_OFFLINE is set)" if constants.HF_HUB_OFFLINE else ""
        raise BundleError(f"{where}: no such local folder, and as a Hub repository it could not be downloaded from "
                          f"{constants.ENDPOINT} and is not in the Hugging Face cache{offline} ({type(error).__name__}). "
                          f"Run once with a connection to cache it, or download it (hf download {repo_id} "
                          f"--local-dir DIR) and use that folder") from None
    needed = [CONFIG_NAME] + ([WEIGHTS_NAME] if any(p.endswith(".safetensors") for p in files) else [])
    missing = [name for name in needed if not (folder / name).is_file()]
    if missing:
        raise BundleError(f"{where}: the repository (or its cached copy) has no {', '.join(missing)}; it is not a "
                          f"CoTexNet model, or it was only partly downloaded (run once online to complete it)")
    return folder


def cached_snapshot(repo_id: str, revision: str | None = None) -> Path | None:
    """The Hugging Face cache's copy of a Hub bundle repository, found with no network access (a GUI field may
    ask on every keystroke); None when it was never downloaded."""
    from huggingface_hub import snapshot_download

    try:
        folder = Path(snapshot_download(repo_id, revision=revision, allow_patterns=list(DESCRIPTION_FILES),
                                        local_files_only=True))
    except Exception:  # noqa: BLE001 - not cached (LocalEntryNotFoundError and kin): the caller says so
        return None
    return folder if (folder / CONFIG_NAME).is_file() else None


def resolve_model(name: str | os.PathLike, revision: str | None = None, files=DOWNLOAD_PATTERNS) -> Path:
    """A local folder for a model: ``name`` itself, or the cached snapshot of the Hub repository it names."""
    parsed = parse_repo_id(name)
    if parsed is None:
        if revision is not None:
            raise BundleError(f"{name}: a revision applies to a Hub repository id (owner/name), not to a local folder")
        return Path(name).expanduser()
    repo_id, tagged = parsed
    if revision is not None and tagged is not None and revision != tagged:
        raise BundleError(f"{name}: revision {revision!r} given besides {tagged!r} in the name")
    return download_model(repo_id, revision or tagged, files)
