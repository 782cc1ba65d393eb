"""3D post-processing of label maps, chosen on validation data as nnU-Net chooses its own.

A slice-wise model can leave islands and holes that no 3D model would. Three steps exist per class:

* ``largest_component``: keep only the class's largest connected component (face connectivity);
* ``min_volume_mm3``: remove the class's connected components smaller than this volume (0: off);
* ``fill_holes``: background voxels enclosed by the class become the class (other classes are never
  overwritten, so white matter inside grey matter stays white matter).

Removed voxels become background. Island sizes are volumes, so ``min_volume_mm3`` applies to 3D label
maps only: a 2D one (a picture, whose spacing is a nominal 1, or a single slice, which has no thickness)
keeps its islands. :func:`choose_postprocessing` tries the steps one after another for each class on the
validation predictions (no island sizes on 2D cases) and keeps a step only when it raises that class's
Dice pooled over the validation cases; the result is a JSON-ready dict that a bundle stores as
``config.postprocessing`` and :func:`apply_postprocessing` applies. numpy and scipy only.
"""
from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from .config import POSTPROCESSING_MIN_VOLUMES_MM3, validate_postprocessing

#: What a class with no post-processing step holds.
NO_STEPS = {"largest_component": False, "min_volume_mm3": 0.0, "fill_holes": False}


def _components(mask: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Connected components of ``mask`` (faces touch) and the voxel count of each (index 0: outside)."""
    from scipy import ndimage

    labelled, count = ndimage.label(mask, structure=ndimage.generate_binary_structure(mask.ndim, 1))
    return labelled, np.bincount(labelled.ravel(), minlength=count + 1)


def voxel_volume(labels: np.ndarray, spacing: Sequence[float] | None) -> float | None:
    """mm3 of one voxel of a 3D label map (1 without a spacing); ``None`` for a 2D map, which has no volume."""
    if labels.ndim != 3:
        return None
    return float(np.prod(spacing)) if spacing is not None else 1.0


def apply_class_steps(labels: np.ndarray, index: int, steps: dict, voxel_mm3: float | None = 1.0) -> np.ndarray:
    """``labels`` with one class's steps applied (a new array; ``labels`` is not changed); ``voxel_mm3`` ``None``
    (a 2D map) skips the island size."""
    out = labels.copy()
    mask = labels == index
    if not mask.any():
        return out
    by_size = steps.get("min_volume_mm3", 0) > 0 and voxel_mm3 is not None
    if steps.get("largest_component") or by_size:
        components, sizes = _components(mask)
        sizes[0] = 0
        keep = np.zeros(len(sizes), dtype=bool)
        keep[1:] = True
        if by_size:
            keep &= sizes * voxel_mm3 >= steps["min_volume_mm3"]
        if steps.get("largest_component"):
            keep &= np.arange(len(sizes)) == int(np.argmax(sizes))
        removed = mask & ~keep[components]
        out[removed] = 0
        mask &= ~removed
    if steps.get("fill_holes") and mask.any():
        from scipy import ndimage

        holes = ndimage.binary_fill_holes(mask) & (out == 0)
        out[holes] = index
    return out


def apply_postprocessing(labels: np.ndarray, choice: dict | None, classes: Sequence[str],
                         spacing: Sequence[float] | None = None) -> np.ndarray:
    """Apply a stored choice (``{class name: steps}``) to a label map; ``spacing`` in mm sets voxel volume."""
    if not choice:
        return labels
    voxel_mm3 = voxel_volume(labels, spacing)
    for index, name in enumerate(classes, start=1):
        steps = choice.get(name)
        if steps and steps != NO_STEPS:
            labels = apply_class_steps(labels, index, steps, voxel_mm3)
    return labels


def _pooled_dice(predictions, truths, index: int, steps: dict, voxel_volumes) -> float:
    """Dice of one class over all cases together (2·TP / (|P| + |T|)); 1 when both are empty."""
    overlap = predicted = actual = 0
    for labels, truth, voxel_mm3 in zip(predictions, truths, voxel_volumes):
        labels = apply_class_steps(labels, index, steps, voxel_mm3) if steps != NO_STEPS else labels
        mine, theirs = labels == index, truth == index
        overlap += int(np.count_nonzero(mine & theirs))
        predicted += int(np.count_nonzero(mine))
        actual += int(np.count_nonzero(theirs))
    return 1.0 if predicted + actual == 0 else 2.0 * overlap / (predicted + actual)


def choose_postprocessing(predictions: Sequence[np.ndarray], truths: Sequence[np.ndarray], classes: Sequence[str],
                          spacings: Sequence[Sequence[float]] | None = None,
                          min_volumes_mm3: Sequence[float] = POSTPROCESSING_MIN_VOLUMES_MM3) -> dict:
    """Per class, keep each step only if it raises the class's pooled validation Dice.

    Steps are tried in order (largest component, then each island size in ``min_volumes_mm3`` with the
    best one kept, then hole filling), each on top of those already kept. Returns
    ``{"classes": {name: steps}, "dice_before": {...}, "dice_after": {...}}``; ``classes`` is what a
    bundle stores.
    """
    if len(predictions) != len(truths) or not predictions:
        raise ValueError(f"expected as many predictions as truths (at least one), got {len(predictions)} and {len(truths)}")
    spacings = spacings if spacings is not None else [None] * len(predictions)
    voxel_volumes = [voxel_volume(labels, spacing) for labels, spacing in zip(predictions, spacings)]
    if None in voxel_volumes:  # 2D cases: no island volume to choose
        min_volumes_mm3 = ()
    chosen, before, after = {}, {}, {}
    for index, name in enumerate(classes, start=1):
        steps = dict(NO_STEPS)
        best = before[name] = _pooled_dice(predictions, truths, index, steps, voxel_volumes)
        trials = [{"largest_component": True}, *({"min_volume_mm3": float(v)} for v in min_volumes_mm3),
                  {"fill_holes": True}]
        for trial in trials:
            if "min_volume_mm3" in trial and steps["largest_component"]:
                continue  # one component left: an island threshold could only remove the class
            candidate = {**steps, **trial}
            dice = _pooled_dice(predictions, truths, index, candidate, voxel_volumes)
            if dice > best + 1e-9:
                steps, best = candidate, dice
        chosen[name], after[name] = steps, best
    return {"classes": validate_postprocessing(chosen, classes), "dice_before": before, "dice_after": after}
