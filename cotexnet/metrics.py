"""The paper's four metrics: Dice, IoU, HD95 and pixel accuracy, per class and averaged.

Dice, IoU, HD95 and the confusion counts come from ``monai.metrics``; this module adds the
label-map handling, the empty-mask conventions, dataset averaging and the paper-style table.

Empty masks (prediction ``P`` and ground truth ``G`` of one class):

* both empty: Dice = IoU = 1, HD95 = 0 (nothing to find, nothing found);
* exactly one empty: Dice = IoU = 0, HD95 = NaN (no surface to measure from). Means skip NaN, so a
  dataset's HD95 averages the cases where both masks exist.

HD95 follows MONAI: the larger of the two directed 95th-percentile distances between the masks'
boundary pixels, in mm when ``spacing`` is given (else in pixels). Pixel accuracy of a class is
``(TP + TN) / N`` of its binary mask.
"""
from __future__ import annotations

import math
import warnings
from collections.abc import Mapping, Sequence

import numpy as np
import torch

METRICS = ("dice", "iou", "hd95", "pixel_accuracy")


def _class_metrics(pred: torch.Tensor, target: torch.Tensor, spacing: Sequence[float] | None) -> dict[str, float]:
    from monai.metrics import (compute_confusion_matrix_metric, compute_dice, compute_hausdorff_distance,
                               compute_iou, get_confusion_matrix)

    # MONAI wants (batch, channel, *spatial) numbers (bool breaks its confusion counts); uint8 keeps memory low
    p, g = pred[None, None].to(torch.uint8), target[None, None].to(torch.uint8)
    accuracy = float(compute_confusion_matrix_metric("accuracy", get_confusion_matrix(p, g)))
    p_any, g_any = bool(pred.any()), bool(target.any())
    if not (p_any and g_any):
        both_empty = not (p_any or g_any)
        return {"dice": float(both_empty), "iou": float(both_empty), "hd95": 0.0 if both_empty else math.nan,
                "pixel_accuracy": accuracy}
    with warnings.catch_warnings():  # MONAI 1.5+ warns about its own internal use of a deprecated argument
        warnings.simplefilter("ignore", FutureWarning)
        hd95 = compute_hausdorff_distance(p, g, include_background=True, percentile=95,
                                          spacing=None if spacing is None else [float(s) for s in spacing])
    return {
        "dice": float(compute_dice(p, g, include_background=True, ignore_empty=False)),
        "iou": float(compute_iou(p, g, include_background=True, ignore_empty=False)),
        "hd95": float(hd95),
        "pixel_accuracy": accuracy,
    }


def _mean(rows: Sequence[Mapping[str, float]]) -> dict[str, float]:
    """Per-metric mean over ``rows``, skipping NaN (NaN only if every row is NaN)."""
    means = {}
    for name in METRICS:
        values = [row[name] for row in rows if not math.isnan(row[name])]
        means[name] = float(np.mean(values)) if values else math.nan
    return means


def segmentation_metrics(
    pred: np.ndarray | torch.Tensor,
    target: np.ndarray | torch.Tensor,
    num_classes: int,
    spacing: Sequence[float] | None = None,
) -> dict:
    """Metrics of one 2D or 3D label map against its ground truth.

    ``pred`` and ``target`` hold class indices (0 = background, ``1..num_classes``) with the same shape;
    ``spacing`` is the pixel size per array axis, in the arrays' axis order (for a SimpleITK array
    ``(z, y, x)`` that is the reversed SimpleITK spacing); anisotropic spacing is fine.

    Returns ``{"per_class": [{"dice", "iou", "hd95", "pixel_accuracy"}, ...], "mean": {...}}``; entry
    ``k`` of ``per_class`` is class ``k + 1``; Dice, IoU and accuracy are fractions, HD95 is in mm.
    """
    pred, target = (torch.as_tensor(x).detach().cpu() for x in (pred, target))
    if pred.shape != target.shape:
        raise ValueError(f"prediction shape {tuple(pred.shape)} differs from ground-truth shape {tuple(target.shape)}")
    if spacing is not None and len(spacing) != pred.ndim:
        raise ValueError(f"spacing {tuple(spacing)} must give one value per axis of shape {tuple(pred.shape)}")
    per_class = [_class_metrics(pred == k, target == k, spacing) for k in range(1, num_classes + 1)]
    return {"per_class": per_class, "mean": _mean(per_class)}


def aggregate(rows: Sequence[Mapping]) -> dict:
    """Dataset means of :func:`segmentation_metrics` results: per class over cases (NaN skipped), then
    the mean over classes; ``cases`` counts the rows."""
    if not rows:
        raise ValueError("no results to aggregate")
    num_classes = len(rows[0]["per_class"])
    per_class = [_mean([row["per_class"][k] for row in rows]) for k in range(num_classes)]
    return {"per_class": per_class, "mean": _mean(per_class), "cases": len(rows)}


def format_table(result: Mapping, classes: Sequence[str]) -> str:
    """A plain-text table like the paper's: Dice, IoU and Acc in %, HD95 in mm, one row per class + mean."""
    header = ("Class", "Dice (%)", "IoU (%)", "HD95 (mm)", "Acc (%)")
    rows = [(name, metrics) for name, metrics in zip(classes, result["per_class"])]
    if len(rows) > 1:
        rows.append(("Mean", result["mean"]))

    def cell(value: float, scale: float) -> str:
        return "n/a" if math.isnan(value) else f"{value * scale:.2f}"

    lines = [header] + [
        (name, cell(m["dice"], 100), cell(m["iou"], 100), cell(m["hd95"], 1), cell(m["pixel_accuracy"], 100))
        for name, m in rows
    ]
    width = max(len(line[0]) for line in lines)
    return "\n".join(
        f"{line[0]:<{width}}  " + "  ".join(f"{v:>{len(h)}}" for v, h in zip(line[1:], header[1:])) for line in lines
    )


class DatasetDice:
    """Dice of each class pooled over a whole dataset, accumulated batch by batch (validation during training).

    An accumulate/aggregate metric like MONAI's ``DiceMetric``, built on MONAI's ``ConfusionMatrixMetric``:
    each batch adds its per-class confusion counts; :meth:`aggregate` sums them over the dataset and then
    takes ``2 TP / (2 TP + FP + FN)`` (the F1 score, which is Dice), so every voxel weighs the same
    whichever slice it is on. A class absent from both prediction and truth everywhere scores 1, as in
    :func:`segmentation_metrics`.
    """

    def __init__(self, num_classes: int):
        from monai.metrics import ConfusionMatrixMetric

        self.num_classes = num_classes
        self._confusion = ConfusionMatrixMetric(include_background=False, metric_name="f1 score",
                                                compute_sample=False, reduction="sum_batch")

    def reset(self) -> None:
        self._confusion.reset()

    def __call__(self, prediction: torch.Tensor, target: torch.Tensor) -> None:
        """Add a batch of label maps ``(B, H, W)`` (class indices, 0 = background) and their ground truth."""
        channels = self.num_classes + 1
        one_hot = [torch.nn.functional.one_hot(x.long(), channels).movedim(-1, 1) for x in (prediction, target)]
        self._confusion(y_pred=one_hot[0], y=one_hot[1])

    def aggregate(self) -> tuple[float, list[float]]:
        """(mean over classes, Dice of each class) of everything added since the last :meth:`reset`."""
        dice = self._confusion.aggregate()[0]
        per_class = [1.0 if math.isnan(value) else value for value in dice.tolist()]
        return float(np.mean(per_class)), per_class
