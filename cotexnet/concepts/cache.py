"""A JSON-lines cache of concept records, reused across runs.

One line per (case, class) answer: ``{"key": ..., "case": ..., "class": ..., "backend": ...,
"attributes": [...], "record": {...}}``. The key hashes the case's content (pixels, labels, spacing,
direction), the class name and keyword, the backend (with its model), the attribute set and
:data:`RULES_VERSION`, so a changed image, mask, model or rule never reuses a stale answer. Lines are
only appended; the last line for a key wins. A line that cannot be read (a crash mid-write, a hand
edit) is skipped with a warning naming the file and line.
"""
from __future__ import annotations

import copy
import hashlib
import json
import os
import warnings
from pathlib import Path

#: Bump when the geometric rules, the vocabulary or the LMM question change: old answers are not reused.
RULES_VERSION = 1


class ConceptCache:
    """Records by key, loaded from ``path`` (if it exists) and appended to on :meth:`put`."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self.hits = 0
        self.misses = 0
        self._records: dict[str, dict] = {}
        if self.path.is_file():
            self._load()

    def _load(self) -> None:
        with self.path.open(encoding="utf-8", errors="replace") as handle:
            for number, line in enumerate(handle, 1):
                if not line.strip():
                    continue
                try:
                    entry = json.loads(line)
                    key, record = entry["key"], entry["record"]
                    if not isinstance(key, str) or not isinstance(record, dict):
                        raise TypeError("key or record has the wrong type")
                    if record.setdefault("provisional", False):
                        continue  # a fallback standing in for an LMM that gave no answer: ask again
                except (ValueError, KeyError, TypeError) as error:
                    warnings.warn(f"{self.path}:{number}: skipped a corrupt concept-cache line ({error})")
                    continue
                self._records[key] = record

    def __len__(self) -> int:
        return len(self._records)

    @staticmethod
    def key(case_hash: str, class_name: str, keyword: str, backend_id: str, attributes: tuple[str, ...]) -> str:
        parts = [RULES_VERSION, case_hash, class_name, keyword, backend_id, sorted(attributes)]
        return hashlib.blake2b(json.dumps(parts).encode(), digest_size=16).hexdigest()

    def get(self, key: str) -> dict | None:
        """A copy of the cached record, or None; counts hits and misses."""
        record = self._records.get(key)
        if record is None:
            self.misses += 1
            return None
        self.hits += 1
        return copy.deepcopy(record)

    def put(self, key: str, record: dict, context: dict | None = None, persist: bool = True) -> None:
        """Store ``record`` and, if ``persist``, append it to the file; ``context`` (case, class, …) is saved
        for readers. ``persist=False`` keeps it for this process only (a provisional fallback)."""
        self._records[key] = copy.deepcopy(record)
        if not persist:
            return
        data = (json.dumps({"key": key, **(context or {}), "record": record}) + "\n").encode("utf-8")
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with self.path.open("ab+") as handle:
            # A run that died mid-line left no newline: start a fresh line so only that line is lost.
            if handle.seek(0, os.SEEK_END) > 0:
                handle.seek(-1, os.SEEK_END)
                if handle.read(1) != b"\n":
                    data = b"\n" + data
            handle.write(data)


_OPENED: dict[Path, ConceptCache] = {}


def open_cache(cache) -> ConceptCache | None:
    """Accept None, a :class:`ConceptCache` or a path; a path is read once per process, then reused.

    Training describes every slice through the same path, and rereading the file each time would
    cost more than the geometric attributes themselves.
    """
    if cache is None or isinstance(cache, ConceptCache):
        return cache
    path = Path(cache).resolve()
    if path not in _OPENED:
        _OPENED[path] = ConceptCache(path)
    return _OPENED[path]
