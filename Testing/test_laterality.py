"""Left/right class pairs, the flips anatomy allows per slice plane and direction, label and channel swaps."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from cotexnet.data import flip_rule, lateral_pairs, swap_channels, swap_labels, unpaired_lateral, volume_slices
from cotexnet.data.image import VolumeImage

IDENTITY = tuple(np.eye(3).ravel())


@pytest.mark.parametrize("left, right", [
    ("left kidney", "right kidney"), ("Kidney Left", "Kidney Right"), ("kidney_L", "kidney_R"),
    ("L kidney", "R kidney"), ("KidneyLeft", "KidneyRight"), ("lt kidney", "rt kidney"),
    ("lung_upper_lobe_left", "lung_upper_lobe_right"), ("rib_left_1", "rib_right_1"),
])
def test_lateral_pairs_by_name_forms(left, right):
    names = ["liver", right, "spleen", left]
    assert lateral_pairs(names) == [(3, 1)]
    assert unpaired_lateral(names) == []


def test_lateral_pairs_keeps_stems_apart_and_finds_unpaired():
    names = ["left kidney", "right lung", "left lung", "right adrenal", "rib_left_1", "rib_right_2", "L1 vertebra"]
    assert lateral_pairs(names) == [(2, 1)]
    # "L1" is one word, not a side; single letters inside a name are no side either.
    assert unpaired_lateral(names) == [0, 3, 4, 5]
    assert lateral_pairs(["a l b", "a r b"]) == []


def test_flip_rule_axial_identity_flips_only_left_right_and_swaps_pairs():
    rule = flip_rule("axial", IDENTITY, ["left grey matter", "right grey matter"])
    # Axial slice (y, x) = (A-P, L-R): only x flips; A-P is not anatomy.
    assert rule.axes == (1,) and rule.left_right_axis == 1 and rule.pairs == ((0, 1),)
    assert rule.pairs_for((1,)) == ((0, 1),) and rule.pairs_for((0,)) == ()
    assert "x (left-right)" in rule.describe(["left grey matter", "right grey matter"])


def test_flip_rule_per_plane_and_direction():
    names = ["liver"]
    assert flip_rule("coronal", IDENTITY, names).axes == (1,)  # (S-I, L-R)
    assert flip_rule("sagittal", IDENTITY, names).axes == ()  # (S-I, A-P): nothing anatomy allows
    # A volume stored with index axis 0 along S-I and index axis 2 along L-R (array (z, y, x) = (L-R, A-P, S-I)).
    permuted = np.zeros((3, 3))
    permuted[2, 0] = permuted[1, 1] = permuted[0, 2] = 1
    rule = flip_rule("axial", tuple(permuted.ravel()), names)
    image = VolumeImage(np.zeros((5, 6, 7)), (1, 1, 1), (0, 0, 0), tuple(permuted.ravel()))
    assert volume_slices(image, "axial").shape == (7, 5, 6)  # axial slices: rows L-R, columns A-P
    assert rule.axes == (0,) and rule.left_right_axis == 0
    # Cut along array axis 0 (L-R): the plane is sagittal, nothing flips.
    assert flip_rule(0, tuple(permuted.ravel()), names).axes == ()


def test_flip_rule_off_when_a_lateral_class_has_no_partner():
    rule = flip_rule("axial", IDENTITY, ["left kidney", "right kidney", "left adrenal"])
    assert rule.axes == () and "left adrenal" in rule.reason
    assert rule.to_json(["left kidney", "right kidney", "left adrenal"])["pairs"] == [["left kidney", "right kidney"]]


def test_flip_rule_2d_pictures():
    assert flip_rule(None, None, ["polyp"]).axes == (0, 1)
    rule = flip_rule(None, None, ["left lung", "right lung"])
    assert rule.axes == (1,) and rule.left_right_axis == 1


def test_swap_labels_and_channels_numpy_and_torch():
    labels = np.array([[0, 1, 2, 3], [3, 2, 1, 0]], dtype=np.uint8)
    swapped = swap_labels(labels, [(0, 2)])  # class 0 (value 1) <-> class 2 (value 3)
    assert swapped.tolist() == [[0, 3, 2, 1], [1, 2, 3, 0]] and labels[0, 1] == 1
    assert torch.equal(swap_labels(torch.as_tensor(labels).long(), [(0, 2)]), torch.as_tensor(swapped).long())
    logits = np.arange(2 * 4 * 3).reshape(2, 4, 3)
    out = swap_channels(logits, [(0, 2)], axis=1)
    assert out[:, 1].tolist() == logits[:, 3].tolist() and out[:, 3].tolist() == logits[:, 1].tolist()
    assert out[:, [0, 2]].tolist() == logits[:, [0, 2]].tolist()
    assert torch.equal(swap_channels(torch.as_tensor(logits), [(0, 2)], axis=1), torch.as_tensor(out))
    # Flipping twice with swaps is the identity; the argmax of swapped channels is the swapped label map.
    assert np.array_equal(swap_labels(swapped, [(0, 2)]), labels)
    probs = np.random.default_rng(0).random((1, 4, 5, 5))
    assert np.array_equal(swap_channels(probs, [(0, 2)]).argmax(1), swap_labels(probs.argmax(1), [(0, 2)]))
