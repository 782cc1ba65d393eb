"""Left/right classes and the flips anatomy allows. No torch.

A flip of a slice across the patient's left-right axis turns a left structure into a right one, so it is
only a valid augmentation (or test-time view) when the labels of paired classes ("left kidney" /
"right kidney") are swapped with it, and only when every lateral class has a partner. Flips across
the anterior-posterior or superior-inferior axis make images no body produces and are never allowed.

Class indices here are 0-based positions in the class-name list; in label maps and in the model's
``n + 1`` output channels, class ``k`` is value / channel ``k + 1`` (0 is background).
"""
from __future__ import annotations

import itertools
import re
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from .slicing import slice_axis_index

#: Words that mark a side, lower case (after splitting at spaces, ``_``, ``-``, ``.`` and camelCase).
SIDE_WORDS = {"left": "left", "l": "left", "lt": "left", "right": "right", "r": "right", "rt": "right"}
#: In-plane axes of a 2D slice ``(y, x)``.
SLICE_PLANE_AXES = ("y", "x")


def _side_and_stem(name: str) -> tuple[str, tuple[str, ...]] | None:
    """``("left", ("kidney", "<side>"))`` for "Kidney_L"; ``None`` when the name has no single side word."""
    spaced = re.sub(r"(?<=[a-z])(?=[A-Z])", " ", name.strip())
    words = [w for w in re.split(r"[\s_\-.()]+", spaced.lower()) if w]
    marks = [i for i, w in enumerate(words) if w in SIDE_WORDS]
    if len(marks) != 1 or len(words) < 2:
        return None
    i = marks[0]
    # Single letters mark a side only at either end ("L kidney", "kidney_L"), never inside a name.
    if len(words[i]) < 4 and i not in (0, len(words) - 1):
        return None
    stem = [w for w in words if w not in SIDE_WORDS]
    return SIDE_WORDS[words[i]], tuple(stem)


def lateral_pairs(names: Sequence[str]) -> list[tuple[int, int]]:
    """``(left, right)`` 0-based class indices of classes named as partners.

    "left X"/"right X", "X left"/"X right", "X_L"/"X_R", "l X"/"r X", "XLeft"/"XRight", "lt X"/"rt X" pair up
    when X matches (case and separators ignored). A class with two partners of the other side pairs with none.
    """
    sides = [_side_and_stem(n) for n in names]
    pairs = []
    for i, j in itertools.combinations(range(len(names)), 2):
        if sides[i] and sides[j] and sides[i][1] == sides[j][1] and sides[i][0] != sides[j][0]:
            pairs.append((i, j) if sides[i][0] == "left" else (j, i))
    counts = {}
    for pair in pairs:
        for k in pair:
            counts[k] = counts.get(k, 0) + 1
    return sorted(p for p in pairs if counts[p[0]] == 1 and counts[p[1]] == 1)


def unpaired_lateral(names: Sequence[str]) -> list[int]:
    """0-based indices of classes named with a side that have no partner in :func:`lateral_pairs`."""
    paired = {k for pair in lateral_pairs(names) for k in pair}
    return [i for i, n in enumerate(names) if _side_and_stem(n) and i not in paired]


@dataclass(frozen=True)
class FlipRule:
    """Which in-plane axes of a slice ``(y, x)`` (0 = y, 1 = x) may be flipped, and what a flip swaps.

    ``left_right_axis`` is the in-plane axis along the patient's left-right direction (``None`` when the
    slice plane does not contain it); flipping it swaps the classes in ``pairs``. ``reason`` says why
    axes are off, for the log and ``training.json``.
    """

    axes: tuple[int, ...]
    left_right_axis: int | None
    pairs: tuple[tuple[int, int], ...]
    reason: str = ""

    def pairs_for(self, axes: Sequence[int]) -> tuple[tuple[int, int], ...]:
        """The class pairs to swap for a flip of ``axes`` (empty unless it includes the left-right axis)."""
        return self.pairs if self.left_right_axis is not None and self.left_right_axis in axes else ()

    def describe(self, names: Sequence[str]) -> str:
        """One line for the training log."""
        flips = ", ".join(SLICE_PLANE_AXES[a] + (" (left-right)" if a == self.left_right_axis else "")
                          for a in self.axes) or "none"
        swaps = "; ".join(f"{names[i]} <-> {names[j]}" for i, j in self.pairs) or "none"
        return f"flips: {flips}; swapped on a left-right flip: {swaps}" + (f" ({self.reason})" if self.reason else "")

    def to_json(self, names: Sequence[str]) -> dict:
        return {"axes": [SLICE_PLANE_AXES[a] for a in self.axes],
                "left_right_axis": None if self.left_right_axis is None else SLICE_PLANE_AXES[self.left_right_axis],
                "pairs": [[names[i], names[j]] for i, j in self.pairs], "reason": self.reason}


def _in_plane_physical_axes(slice_axis: int, direction: Sequence[float]) -> tuple[int, int]:
    """LPS axis (0 = L-R, 1 = A-P, 2 = S-I) each in-plane axis (y, x) of a slice along array axis ``slice_axis``
    runs along, matched as one assignment like :func:`~cotexnet.data.slicing.slice_axis_index`."""
    alignment = np.abs(np.reshape(np.asarray(direction, dtype=float), (3, 3)))  # [physical, index axis]
    best = max(itertools.permutations(range(3)), key=lambda perm: sum(alignment[p, perm[p]] for p in range(3)))
    physical_of_index = {index: physical for physical, index in enumerate(best)}
    y, x = (a for a in range(3) if a != slice_axis)  # array axes (z, y, x order); index axis = 2 - array axis
    return physical_of_index[2 - y], physical_of_index[2 - x]


def flip_rule(slice_axis: str | int | None, direction: Sequence[float] | None, names: Sequence[str]) -> FlipRule:
    """The flips anatomy allows for slices of a volume cut along ``slice_axis`` (a view name or array axis).

    Volumes: only the in-plane axis along the patient's left-right direction may flip, with paired classes
    swapped, and not at all when a lateral class has no partner. 2D pictures (``slice_axis`` ``None``) carry no
    patient axes: both axes flip unless a class is lateral, in which case x is taken as left-right.
    """
    pairs = tuple(lateral_pairs(names))
    unpaired = [names[i] for i in unpaired_lateral(names)]
    lateral = bool(pairs or unpaired)
    if slice_axis is None:
        left_right = 1 if lateral else None
        axes = (1,) if lateral else (0, 1)
        reason = "2D image, x taken as left-right" if lateral else "2D image without lateral classes"
    else:
        direction = np.eye(3).ravel() if direction is None else direction
        if isinstance(slice_axis, str):
            slice_axis = slice_axis_index(direction, slice_axis)
        physical = _in_plane_physical_axes(int(slice_axis), direction)
        left_right = physical.index(0) if 0 in physical else None
        axes = () if left_right is None else (left_right,)
        reason = "" if left_right is not None else "the slice plane has no left-right axis"
    if unpaired and left_right in axes:
        axes = tuple(a for a in axes if a != left_right)
        reason = f"left-right flip off: {', '.join(repr(n) for n in unpaired)} has no partner"
    return FlipRule(axes=axes, left_right_axis=left_right, pairs=pairs if left_right is not None else (),
                    reason=reason)


def _class_permutation(pairs: Sequence[tuple[int, int]], size: int) -> np.ndarray:
    """Index map of length ``size`` over values/channels (0 = background) that swaps class ``i`` and ``j``."""
    order = np.arange(size)
    for i, j in pairs:
        order[i + 1], order[j + 1] = j + 1, i + 1
    return order


def swap_channels(array, pairs: Sequence[tuple[int, int]], axis: int = 1):
    """``array`` (numpy or torch) with channels ``i + 1`` and ``j + 1`` of each pair exchanged along ``axis``
    (``n + 1`` channels, background first: the model's logits or probabilities)."""
    if not pairs:
        return array
    order = _class_permutation(pairs, array.shape[axis])
    if isinstance(array, np.ndarray):
        return np.take(array, order, axis=axis)
    import torch

    return torch.index_select(array, axis, torch.as_tensor(order, device=array.device))


def swap_labels(labels, pairs: Sequence[tuple[int, int]]):
    """Label map (numpy or torch integers, 0 = background) with the values of each class pair exchanged."""
    if not pairs:
        return labels
    size = max(max(p) for p in pairs) + 2
    order = _class_permutation(pairs, size)
    if isinstance(labels, np.ndarray):
        out = labels.copy()
        inside = labels < size
        out[inside] = order[labels[inside]]
        return out
    import torch

    lookup = torch.as_tensor(order, device=labels.device, dtype=labels.dtype)
    inside = labels < size
    return torch.where(inside, lookup[labels.clamp(max=size - 1)], labels)
