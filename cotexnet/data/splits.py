"""Train/validation/test splits by patient, and split files (``split.json``, nnU-Net ``splits_final.json``).

Functions take a :class:`~.datasets.DatasetIndex`; :mod:`.datasets` imports this module (a dataset's
own split file is read while indexing it), so the index type is imported here for annotations only.
"""
from __future__ import annotations

import json
import random
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from ..atomic import write_json_atomic
from ..errors import DataError
from .image import check_file

if TYPE_CHECKING:  # types only: datasets imports this module
    from .datasets import Case, DatasetIndex

SPLIT_NAMES = ("train", "val", "test")


def read_json(path: Path):
    """A JSON file's content (dataset.json, split files), or a :class:`DataError` naming the file."""
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise DataError(f"cannot be read as JSON ({error})", path) from None


def make_split(cases: Sequence[Case], seed: int = 0, fractions: Sequence[float] = (0.8, 0.1, 0.1)
               ) -> dict[str, list[str]]:
    """Seeded train/val/test split by group (patient), so no group straddles two splits.

    Fractions count groups, not cases. With 3 or more groups, val and test get at least one each;
    with 2 groups, train and val get one each; one group goes to train.
    """
    groups = sorted({case.group for case in cases})
    random.Random(seed).shuffle(groups)
    n = len(groups)
    n_val = max(1, round(n * fractions[1])) if n >= 2 else 0
    n_test = max(1, round(n * fractions[2])) if n >= 3 else 0
    assigned = {g: "val" for g in groups[:n_val]}
    assigned.update({g: "test" for g in groups[n_val:n_val + n_test]})
    split: dict[str, list[str]] = {name: [] for name in SPLIT_NAMES}
    for case in cases:
        split[assigned.get(case.group, "train")].append(case.case_id)
    return split


def split_cases(index: DatasetIndex, seed: int = 0) -> dict[str, list[str]]:
    """The dataset's own split if it has a split file, else :func:`make_split`."""
    return index.split if index.split is not None else make_split(index.cases, seed)


def _validated_split(data, path: Path) -> dict[str, list[str]]:
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


def save_split(split: Mapping[str, Sequence[str]], path: str | Path) -> Path:
    path = Path(path)
    data = _validated_split({k: list(v) for k, v in split.items()}, path)
    write_json_atomic(path, data)
    return path


def load_split(path: str | Path, index: DatasetIndex | None = None) -> dict[str, list[str]]:
    """Read a split file; with ``index``, every case id must belong to the dataset."""
    path = Path(path)
    check_file(path)
    split = _validated_split(read_json(path), path)
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
    split = _validated_split({"train": folds[0].get("train", []), "val": folds[0].get("val", [])}, path)
    _check_split_ids(split, index, path)
    return split
