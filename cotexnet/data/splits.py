"""Train/validation/test splits by patient, and saving them as ``split.json``.

A dataset's own split file is read while it is indexed (:func:`.datasets.load_split`); this module imports
:mod:`.datasets`, never the other way round.
"""
from __future__ import annotations

import random
from collections.abc import Mapping, Sequence
from pathlib import Path

from ..atomic import write_json_atomic
from .datasets import SPLIT_NAMES, Case, DatasetIndex, validated_split


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


def save_split(split: Mapping[str, Sequence[str]], path: str | Path) -> Path:
    path = Path(path)
    data = validated_split({k: list(v) for k, v in split.items()}, path)
    write_json_atomic(path, data)
    return path
