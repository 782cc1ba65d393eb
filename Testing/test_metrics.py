"""Metrics against values computed by hand on tiny masks."""
import math

import numpy as np
import pytest
import torch

from cotexnet.metrics import aggregate, format_table, segmentation_metrics


def _mask(shape, *pixels, value=1):
    array = np.zeros(shape, dtype=np.uint8)
    for pixel in pixels:
        array[pixel] = value
    return array


def test_shifted_square_2d():
    # G = 2x2 square at rows 0-1, cols 0-1; P = the same square shifted one column right.
    # |P ∩ G| = 2, |P| = |G| = 4: Dice = 2*2/8 = 0.5, IoU = 2/6 = 1/3.
    # Accuracy on 4x4: TP 2, FP 2, FN 2, TN 10 -> 12/16 = 0.75.
    # Every pixel of a 2x2 square is a boundary pixel; directed distances G->P are [1, 0, 1, 0] columns,
    # P->G likewise, so HD95 = 1 pixel; with spacing (rows 2.0 mm, cols 0.5 mm) it is 0.5 mm.
    target = _mask((4, 4), (0, 0), (0, 1), (1, 0), (1, 1))
    pred = _mask((4, 4), (0, 1), (0, 2), (1, 1), (1, 2))
    result = segmentation_metrics(pred, target, num_classes=1)
    expected = {"dice": 0.5, "iou": 1 / 3, "hd95": 1.0, "pixel_accuracy": 0.75}
    assert result["per_class"][0] == pytest.approx(expected)
    assert result["mean"] == pytest.approx(expected)
    assert segmentation_metrics(pred, target, 1, spacing=(2.0, 0.5))["per_class"][0]["hd95"] == pytest.approx(0.5)


def test_hd95_anisotropic_2d_and_3d():
    # 2D: one pixel each, 2 rows apart; rows are 2.0 mm apart -> 4.0 mm.
    assert segmentation_metrics(_mask((5, 5), (3, 1)), _mask((5, 5), (1, 1)), 1, spacing=(2.0, 0.5))[
        "per_class"][0]["hd95"] == pytest.approx(4.0)
    # 3D (z, y, x) spacing (3.0, 1.0, 0.5): P at (2, 1, 2), G at (0, 1, 1): dz = 2 * 3.0 = 6.0 mm,
    # dx = 1 * 0.5 = 0.5 mm -> sqrt(36 + 0.25) = sqrt(36.25) ≈ 6.0208 mm. No overlap: Dice = IoU = 0.
    row = segmentation_metrics(_mask((3, 3, 3), (2, 1, 2)), _mask((3, 3, 3), (0, 1, 1)), 1,
                               spacing=(3.0, 1.0, 0.5))["per_class"][0]
    assert row["hd95"] == pytest.approx(math.sqrt(36.25))
    assert row["dice"] == 0.0 and row["iou"] == 0.0
    # 27 voxels, TP 0, FP 1, FN 1 -> accuracy 25/27.
    assert row["pixel_accuracy"] == pytest.approx(25 / 27)


def test_hd95_is_the_95th_percentile():
    # P = {(2, 2)}, G = {(2, 5), (6, 2)}, spacing (2.0, 0.5).
    # G->P: (2, 5) is 3 columns = 1.5 mm away, (6, 2) is 4 rows = 8.0 mm away.
    # 95th percentile of [1.5, 8.0] (linear) = 1.5 + 0.95 * 6.5 = 7.675 mm; P->G: 1.5 mm; max = 7.675 mm.
    pred = _mask((8, 8), (2, 2))
    target = _mask((8, 8), (2, 5), (6, 2))
    assert segmentation_metrics(torch.from_numpy(pred), torch.from_numpy(target), 1, spacing=(2.0, 0.5))[
        "per_class"][0]["hd95"] == pytest.approx(7.675)


def test_empty_mask_conventions_and_mean_skips_nan():
    target = np.zeros((4, 4), dtype=np.uint8)
    target[0, :2] = 1  # class 1: two pixels, predicted exactly
    target[3, 3] = 2  # class 2: one pixel, missed
    pred = np.zeros_like(target)
    pred[0, :2] = 1
    result = segmentation_metrics(pred, target, num_classes=3)
    one, two, three = result["per_class"]
    assert one == pytest.approx({"dice": 1.0, "iou": 1.0, "hd95": 0.0, "pixel_accuracy": 1.0})
    # Class 2: prediction empty, ground truth not -> Dice = IoU = 0, HD95 undefined; 15 of 16 pixels right.
    assert two["dice"] == 0.0 and two["iou"] == 0.0 and math.isnan(two["hd95"])
    assert two["pixel_accuracy"] == pytest.approx(15 / 16)
    # Class 3: both empty -> Dice = IoU = 1, HD95 = 0.
    assert three == pytest.approx({"dice": 1.0, "iou": 1.0, "hd95": 0.0, "pixel_accuracy": 1.0})
    # Means over the three classes; HD95 skips class 2's NaN.
    assert result["mean"]["dice"] == pytest.approx(2 / 3)
    assert result["mean"]["hd95"] == 0.0
    assert result["mean"]["pixel_accuracy"] == pytest.approx((1 + 15 / 16 + 1) / 3)


def test_aggregate_and_table():
    perfect = {"dice": 1.0, "iou": 1.0, "hd95": 0.0, "pixel_accuracy": 1.0}
    half = {"dice": 0.5, "iou": 1 / 3, "hd95": 2.0, "pixel_accuracy": 0.75}
    missed = {"dice": 0.0, "iou": 0.0, "hd95": math.nan, "pixel_accuracy": 0.5}
    rows = [{"per_class": [perfect, half]}, {"per_class": [half, missed]}]
    result = aggregate(rows)
    assert result["cases"] == 2
    assert result["per_class"][0] == pytest.approx({"dice": 0.75, "iou": 2 / 3, "hd95": 1.0, "pixel_accuracy": 0.875})
    assert result["per_class"][1]["hd95"] == 2.0  # the NaN case is skipped
    assert result["mean"]["dice"] == pytest.approx((0.75 + 0.25) / 2)

    table = format_table(result, ["LV", "RV"]).splitlines()
    assert table[0].split() == ["Class", "Dice", "(%)", "IoU", "(%)", "HD95", "(mm)", "Acc", "(%)"]
    assert table[1].split() == ["LV", "75.00", "66.67", "1.00", "87.50"]
    assert table[3].split()[0] == "Mean"
    assert "n/a" in format_table({"per_class": [missed], "mean": missed}, ["x"])


def test_rejects_mismatched_inputs():
    with pytest.raises(ValueError, match="differs"):
        segmentation_metrics(np.zeros((2, 2)), np.zeros((2, 3)), 1)
    with pytest.raises(ValueError, match="one value per axis"):
        segmentation_metrics(np.zeros((2, 2)), np.zeros((2, 2)), 1, spacing=(1.0, 1.0, 1.0))


def test_dataset_dice_pools_voxels_over_batches_and_scores_absent_classes_one():
    """Validation Dice: confusion counts summed over every batch, then 2TP / (2TP + FP + FN) per class."""
    from cotexnet.metrics import DatasetDice

    generator = torch.Generator().manual_seed(3)
    metric = DatasetDice(num_classes=3)
    tp, fp, fn = np.zeros(3), np.zeros(3), np.zeros(3)
    for size in (5, 2, 7):  # unequal batches: pooling is not a mean of batch Dice values
        prediction = torch.randint(0, 3, (size, 12, 12), generator=generator)  # class 3 never predicted ...
        truth = torch.randint(0, 3, (size, 12, 12), generator=generator)  # ... nor present
        metric(prediction, truth)
        for c in range(1, 4):
            p, t = (prediction == c).numpy(), (truth == c).numpy()
            tp[c - 1] += (p & t).sum()
            fp[c - 1] += (p & ~t).sum()
            fn[c - 1] += (~p & t).sum()
    mean, per_class = metric.aggregate()
    expected = [2 * tp[0] / (2 * tp[0] + fp[0] + fn[0]), 2 * tp[1] / (2 * tp[1] + fp[1] + fn[1]), 1.0]
    np.testing.assert_allclose(per_class, expected, rtol=1e-6)
    assert mean == pytest.approx(np.mean(expected))
    metric.reset()
    metric(torch.ones(1, 4, 4, dtype=torch.long), torch.zeros(1, 4, 4, dtype=torch.long))
    assert metric.aggregate()[1] == [0.0, 1.0, 1.0]
