"""Volumes, not slices: multi-plane fusion, test-time flips, probabilities, 3D post-processing (tiny models, CPU)."""
from __future__ import annotations

import json

import numpy as np
import pytest

from cotexnet.config import ConfigError, CoTexNetConfig
from cotexnet.data import VolumeImage, read_image
from cotexnet.data.laterality import swap_channels
from cotexnet.infer import augmented_views, predict_volume, segment_volume
from cotexnet.postprocess import apply_class_steps, apply_postprocessing, choose_postprocessing
from test_infer import assert_labels_agree_where_decided

LATERAL = ["left kidney", "right kidney"]


@pytest.fixture(scope="module")
def model():
    from cotexnet import CoTexNet

    return CoTexNet.from_config(CoTexNetConfig(classes=list(LATERAL), backbone="tiny", image_size=32))


@pytest.fixture(scope="module")
def bundle(model, tmp_path_factory):
    return model.save_pretrained(tmp_path_factory.mktemp("bundle") / "model")


def volume(shape=(6, 20, 24), seed=0):
    return np.random.default_rng(seed).normal(size=shape).astype(np.float32)


# ------------------------------------------------------------------------------------------ fusion
def test_fusion_averages_the_probabilities_of_each_plane_on_the_input_grid(model):
    v = volume()
    single = {p: predict_volume(model, v, planes=[p], probabilities=True).probabilities
              for p in ("axial", "coronal", "sagittal")}
    fused = predict_volume(model, v, planes="axial,coronal,sagittal", probabilities=True)
    assert fused.probabilities.shape == (3, *v.shape)
    np.testing.assert_allclose(fused.probabilities, sum(single.values()) / 3, atol=1e-6)
    np.testing.assert_array_equal(fused.labels, fused.probabilities.argmax(0))
    np.testing.assert_allclose(fused.probabilities.sum(0), 1.0, atol=1e-5)
    # a coronal pass (identity direction: array axis 1) is an axial pass of the volume with axes 0 and 1 swapped
    swapped = predict_volume(model, np.ascontiguousarray(np.moveaxis(v, 1, 0)), axis=0, probabilities=True)
    np.testing.assert_allclose(single["coronal"], np.moveaxis(swapped.probabilities, 2, 1), atol=1e-5)
    # one plane without probabilities takes the batch-wise arg-max path and agrees with it
    assert_labels_agree_where_decided(segment_volume(model, v), single["axial"].argmax(0), single["axial"])


def test_fused_planes_follow_the_direction_matrix(model):
    """With a direction whose index axes are permuted, 'coronal' is still the patient's coronal plane."""
    v = volume((8, 10, 12))
    permuted = (0, 0, 1, 0, 1, 0, 1, 0, 0)  # index k runs L-R, j A-P, i S-I: array axis 2 is axial
    fused = predict_volume(model, v, direction=permuted, planes=["axial"], probabilities=True)
    along_axis = predict_volume(model, v, axis=2, probabilities=True)
    np.testing.assert_allclose(fused.probabilities, along_axis.probabilities, atol=1e-6)


def test_bundle_recommends_planes_and_config_round_trips(model, tmp_path):
    config = CoTexNetConfig(classes=["a", "b"], planes="axial,sagittal",
                            postprocessing={"a": {"largest_component": True, "min_volume_mm3": 5}})
    again = CoTexNetConfig.from_dict(json.loads(json.dumps(config.to_dict())))
    assert again.planes == ["axial", "sagittal"]
    assert again.postprocessing == {"a": {"largest_component": True, "min_volume_mm3": 5.0, "fill_holes": False}}
    for bad, message in (({"planes": ["axial", "oblique"]}, "'oblique' is not one of"),
                         ({"planes": ["axial", "axial"]}, "each view at most once"),
                         ({"postprocessing": {"c": {}}}, "'c' is not one of the classes"),
                         ({"postprocessing": {"a": {"fill_holes": 1}}}, "expected true or false"),
                         ({"postprocessing": {"a": {"min_volume_mm3": -1}}}, "expected a volume >= 0")):
        with pytest.raises(ConfigError, match=message):
            CoTexNetConfig(classes=["a", "b"], **bad)
    model.config.planes = ["axial", "coronal"]
    try:
        v = volume()
        recommended = predict_volume(model, v, probabilities=True).probabilities
        explicit = predict_volume(model, v, planes=["axial", "coronal"], probabilities=True).probabilities
        np.testing.assert_allclose(recommended, explicit, rtol=0, atol=1e-6)  # the same passes
        with pytest.raises(Exception, match="either planes or axis"):
            predict_volume(model, v, planes=["axial"], axis="axial")
    finally:
        model.config.planes = None


def test_first_release_bundle_still_loads_without_the_new_fields():
    from pathlib import Path

    from cotexnet.bundle import read_bundle_config

    config = read_bundle_config(Path(__file__).parent / "fixtures" / "bundle_v1")
    assert config.planes is None and config.postprocessing is None


# --------------------------------------------------------------------------------------------- TTA
def test_tta_flips_only_left_right_and_swaps_lateral_pairs(model):
    v = volume()
    axial = augmented_views(LATERAL, 0, None, tta=True)
    assert [(a.flip_dims, a.swapped_pairs) for a in axial] == [((), ()), ((1,), ((0, 1),))]  # x is L-R
    assert len(augmented_views(LATERAL, 2, None, tta=True)) == 1  # sagittal slices hold no L-R axis
    assert len(augmented_views(["left kidney", "liver"], 0, None, tta=True)) == 1  # unpaired lateral class
    plain = predict_volume(model, v, probabilities=True).probabilities
    mirrored = predict_volume(model, np.ascontiguousarray(v[:, :, ::-1]), probabilities=True).probabilities
    expected = (plain + swap_channels(mirrored[:, :, :, ::-1], [(0, 1)], axis=0)) / 2
    tta = predict_volume(model, v, tta=True, probabilities=True)
    np.testing.assert_allclose(tta.probabilities, expected, atol=1e-5)
    assert_labels_agree_where_decided(tta.labels, expected.argmax(0), expected)


# --------------------------------------------------------------------------------- post-processing
def _ball(shape, center, radius):
    grid = np.indices(shape)
    return sum((g - c) ** 2 for g, c in zip(grid, center)) <= radius ** 2


def test_postprocessing_steps():
    shape = (20, 20, 20)
    labels = np.zeros(shape, np.uint8)
    labels[_ball(shape, (10, 10, 10), 6)] = 1
    labels[_ball(shape, (10, 10, 10), 2)] = 0  # a hole of background
    labels[10, 10, 4] = 2  # another class touching the inside edge: never overwritten
    labels[1:3, 1:3, 1:3] = 1  # an island of 8 voxels
    kept = apply_class_steps(labels, 1, {"largest_component": True})
    assert kept[1:3, 1:3, 1:3].sum() == 0 and (kept == 1).sum() == (labels == 1).sum() - 8
    # 8 voxels of 2 x 2 x 2 mm = 64 mm3: removed by a 100 mm3 threshold, kept by a 50 mm3 one
    assert (apply_class_steps(labels, 1, {"min_volume_mm3": 100.0}, voxel_mm3=8.0) == 1).sum() == (labels == 1).sum() - 8
    np.testing.assert_array_equal(apply_class_steps(labels, 1, {"min_volume_mm3": 50.0}, voxel_mm3=8.0), labels)
    filled = apply_class_steps(labels, 1, {"fill_holes": True})
    assert (filled[_ball(shape, (10, 10, 10), 2)] == 1).all() and filled[10, 10, 4] == 2
    assert (filled == 1).sum() == (labels == 1).sum() + _ball(shape, (10, 10, 10), 2).sum()
    assert apply_postprocessing(labels, {"b": {"fill_holes": True}}, ["a", "b"]) is not None


def test_chooser_keeps_a_step_only_where_it_raises_validation_dice():
    shape = (16, 16, 16)
    truth = np.zeros(shape, np.uint8)
    truth[_ball(shape, (8, 8, 8), 4)] = 1
    truth[1:3, 12:15, 12:15] = 2  # class 2 really has two parts
    truth[12:15, 1:3, 1:3] = 2
    prediction = truth.copy()
    prediction[1, 1, 1] = 1  # a false island of class 1
    prediction[8, 8, 8] = 0  # a false hole in class 1
    report = choose_postprocessing([prediction], [truth], ["one", "two"], spacings=[(1.0, 1.0, 1.0)])
    assert report["classes"]["one"]["largest_component"] and report["classes"]["one"]["fill_holes"]
    assert report["dice_after"]["one"] == 1.0 > report["dice_before"]["one"]
    assert report["classes"]["two"] == {"largest_component": False, "min_volume_mm3": 0.0, "fill_holes": False}
    assert report["dice_after"]["two"] == report["dice_before"]["two"] == 1.0
    np.testing.assert_array_equal(apply_postprocessing(prediction, report["classes"], ["one", "two"]), truth)


def test_fit_postprocessing_stores_the_choice_and_evaluate_applies_it(mni152_dataset, bundle, tmp_path):
    import shutil

    from cotexnet.bundle import read_bundle_config, read_training_info
    from cotexnet.cli import main
    from cotexnet.infer import evaluate, fit_postprocessing

    target = tmp_path / "model"
    shutil.copytree(bundle, target)
    config = read_bundle_config(target)
    config.classes = ["grey matter", "white matter"]  # the MNI152 task's classes, same architecture
    config.to_json_file(target / "config.json")
    report = fit_postprocessing(target, mni152_dataset, device="cpu")
    stored = read_bundle_config(target).postprocessing
    assert stored == report["classes"] and set(stored) == {"grey matter", "white matter"}
    assert all(report["dice_after"][c] >= report["dice_before"][c] for c in stored)
    assert read_training_info(target)["postprocessing"]["cases"] == ["mni152_03"]
    on = evaluate(target, mni152_dataset, split="val", device="cpu", show_progress=False)
    off = evaluate(target, mni152_dataset, split="val", device="cpu", postprocess=False, show_progress=False)
    for index, name in enumerate(["grey matter", "white matter"]):  # one validation case: pooled = per-case Dice
        assert on["per_class"][index]["dice"] == pytest.approx(report["dice_after"][name], abs=1e-6)
        assert off["per_class"][index]["dice"] == pytest.approx(report["dice_before"][name], abs=1e-6)
    assert on["inference"]["postprocessing"] == stored and off["inference"]["postprocessing"] is None
    assert main(["postprocess", str(target), str(mni152_dataset), "--device", "cpu", "--json"]) == 0


# ----------------------------------------------------------------------------------- files and CLI
def test_segment_cli_writes_probability_maps_in_the_input_geometry(bundle, model, tmp_path, capsys):
    from cotexnet.cli import main
    from cotexnet.data import write_image

    v = volume((5, 18, 22))
    direction = (0.0, 1.0, 0.0, -1.0, 0.0, 0.0, 0.0, 0.0, 1.0)
    image = VolumeImage(v, (0.7, 0.9, 2.5), (3.0, -4.0, 5.0), direction)
    source = write_image(v, image, tmp_path / "in.nii.gz")
    code = main(["segment", str(bundle), str(source), "--out", str(tmp_path / "out"), "--device", "cpu",
                 "--planes", "axial,coronal", "--tta", "--probabilities", "--json"])
    assert code == 0
    result = json.loads(capsys.readouterr().out)["results"][0]
    expected = predict_volume(model, read_image(source), planes=["axial", "coronal"], tta=True, probabilities=True)
    for index, name in enumerate(LATERAL, start=1):
        written = read_image(result["probabilities"][name])
        assert written.array.dtype == np.uint8 and written.geometry.same_grid(read_image(source).geometry)
        np.testing.assert_array_less(np.abs(written.array.astype(float) - expected.probabilities[index] * 255), 0.5 + 1e-3)
        inside = expected.labels == index
        if inside.any():
            assert result["mean_confidence"][name] == pytest.approx(float(expected.confidence[inside].mean()), abs=1e-5)
    np.testing.assert_array_equal(read_image(result["labels"]).array, expected.labels)
    with pytest.raises(SystemExit) as exited:
        main(["segment", str(bundle), str(source), "--out", str(tmp_path / "o2"), "--planes", "axial,axis"])
    assert exited.value.code == 2 and "'axis' is not one of" in capsys.readouterr().err


# ---------------------------------------------------------------------------------- Slicer logic
def test_slicer_logic_fusion_tta_and_confidence_volume(bundle, model):
    """The logic's options reach the engine; the confidence volume lies on the input's grid and is the
    foreground of every slice view (vtkMRMLSliceCompositeNode, Slicer's Libs/MRML/Core)."""
    import slicer

    from CoTexNetSegmentLib import CoTexNetSegmentLogic
    from CoTexNetSegmentLib import mrml

    scene = slicer.vtkMRMLScene()
    slicer.mrmlScene = scene
    mrml.ensureSegmentationConverters()
    composite = scene.AddNewNodeByClass("vtkMRMLSliceCompositeNode")
    v = (volume((5, 16, 18)) * 100).astype(np.int16)
    node = scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", "ct")
    mrml.arrayToVolume(v, node, node)
    node.SetSpacing(0.8, 0.9, 2.0)
    logic = CoTexNetSegmentLogic(scene)
    segmentation = logic.segment(node, bundle, device="cpu", planes=["axial", "sagittal"], tta=True, confidence=True)
    array, geometry = mrml.volumeToArray(node)
    expected = predict_volume(model, array, direction=geometry.direction, planes=["axial", "sagittal"], tta=True,
                              probabilities=True)
    confidenceNode = logic.confidenceVolume(segmentation)
    values, grid = mrml.volumeToArray(confidenceNode)
    np.testing.assert_allclose(values, expected.confidence, atol=1e-6)
    assert grid.same_grid(geometry)
    assert logic.showConfidence(segmentation) and composite.GetForegroundVolumeID() == confidenceNode.GetID()
    table = logic.conceptTable(segmentation)
    column = [table.GetColumnName(c) for c in range(table.GetNumberOfColumns())].index("mean_confidence")
    for row, index in enumerate((1, 2)):
        inside = expected.labels == index
        text = table.GetCellText(row, column)
        assert (float(text) == pytest.approx(float(expected.confidence[inside].mean()), abs=1e-4)) if inside.any() else text == ""
    np.testing.assert_array_equal(mrml.segmentationToLabelMap(segmentation, node, LATERAL), expected.labels)


# ------------------------------------------------------------------------------------------- bench
def test_bench_runs_on_cpu_with_a_small_volume_and_reports_peak_memory(capsys):
    from cotexnet.cli import main

    assert main(["bench", "--backbone", "tiny", "--device", "cpu", "--precision", "fp32", "--image-size", "64",
                 "--iterations", "1", "--warmup", "0", "--batch-size", "2", "--volume", "4x40x48", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert [(r["side"], r["precision"]) for r in report["rows"]] == [("clipseg", "fp32"), ("cotexnet", "fp32")]
    volume = report["volume"]
    assert volume["shape"] == [4, 40, 48] and volume["batch_size"] == 2 and volume["peak_rss_mib"] > 0
    assert volume["slices_per_s"] == pytest.approx(4 / volume["array_to_labels_s"])
    assert set(volume["phases_s"]) == {"normalise", "resize", "model", "resize_back", "argmax", "download"}  # no upload
    assert volume["file_read_s"] > 0 and volume["file_write_s"] > 0 and volume["array_to_labels_first_s"] > 0
    for row in report["rows"]:  # MFU is achieved FLOP/s over the matrix-product peak measured in the same process
        assert row["flops_per_slice"] > 0 and row["peak_matmul_tflops"] > 0
        assert row["mfu"] == pytest.approx(row["slices_per_s"] * row["flops_per_slice"] / 1e12 / row["peak_matmul_tflops"])
    # stock CLIPSeg also runs the text encoder on its prompt and every encoder layer in full
    assert report["rows"][0]["flops_per_slice"] > report["rows"][1]["flops_per_slice"]
    assert report["ratio_same_precision"]["fp32"] == pytest.approx(
        report["rows"][1]["slices_per_s"] / report["rows"][0]["slices_per_s"])
