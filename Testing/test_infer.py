"""Volume inference: geometry, formats, batching, bad files in a batch, .seg.nrrd, CLI, demo."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
import torch

from cotexnet import Cancelled, CoTexNet
from cotexnet.cli import main
from cotexnet.data import VolumeImage, read_image, write_image
from cotexnet.infer import predict_volume, segment_file, segment_files, segment_volume

OBLIQUE = tuple(np.array([[0.866, -0.5, 0.0], [0.5, 0.866, 0.0], [0.0, 0.0, 1.0]]).ravel())


@pytest.fixture(scope="module")
def bundle(tmp_path_factory):
    from cotexnet import CoTexNetConfig

    config = CoTexNetConfig(classes=["liver", "tumor"], backbone="tiny", image_size=64,
                            colors=[[0.9, 0.4, 0.3], [0.2, 0.8, 0.3]])
    model = CoTexNet.from_config(config)
    head = model.clipseg.decoder.transposed_convolution[-1]
    with torch.no_grad():  # independent random channels, so every class wins somewhere in a random image
        torch.manual_seed(0)
        head.weight.normal_(std=0.5)
        head.bias.zero_()
    return model.save_pretrained(tmp_path_factory.mktemp("model") / "bundle")


@pytest.fixture(scope="module")
def model(bundle):
    return CoTexNet.from_pretrained(bundle)


def assert_labels_agree_where_decided(labels, expected, probabilities, margin=1e-5):
    """Label maps computed by two float paths (other batch shapes, softmax before the arg-max, another CPU's
    kernels) agree wherever the top two class probabilities differ by more than ``margin``: float32 sums
    in another order move a probability by ~1e-7, so only a near-tie can flip. Most voxels must be decided."""
    top_two = np.sort(probabilities, axis=0)[-2:]
    decided = top_two[1] - top_two[0] > margin
    assert decided.mean() > 0.95, f"only {decided.mean():.3f} of the voxels are decided"
    np.testing.assert_array_equal(labels[decided], expected[decided])


def volume(shape=(9, 40, 50), seed=0):
    rng = np.random.default_rng(seed)
    return rng.normal(100, 30, size=shape).astype(np.float32)


def test_label_map_has_the_input_shape_and_batching_does_not_change_it(model):
    array = volume()
    one = segment_volume(model, array, batch_size=1, device="cpu")
    seven = segment_volume(model, array, batch_size=7, device="cpu")
    assert one.shape == array.shape and one.dtype == np.uint8
    assert_labels_agree_where_decided(one, seven, predict_volume(model, array, probabilities=True).probabilities)
    assert set(np.unique(one)) <= {0, 1, 2}


def test_logits_are_resized_back_not_labels(model):
    """Labels are the argmax of the model's logits resized bilinearly to the slice size."""
    import torch.nn.functional as F

    array = volume()
    labels = segment_volume(model, array, axis=0, device="cpu")
    low, high = np.percentile(array, [0.5, 99.5])
    normalised = np.clip((array[4] - low) / (high - low), 0, 1)
    image = F.interpolate(torch.from_numpy(normalised)[None, None].float(), size=(64, 64), mode="bilinear",
                          antialias=False, align_corners=False)
    with torch.no_grad():
        logits = model(image.expand(-1, 3, -1, -1))
    expected = F.interpolate(logits, size=(40, 50), mode="bilinear", align_corners=False, antialias=True).argmax(1)[0]
    assert np.mean(labels[4] == expected.numpy()) > 0.999
    nearest = F.interpolate(logits.argmax(1, keepdim=True).float(), size=(40, 50), mode="nearest")[0, 0]
    assert not np.array_equal(labels[4], nearest.numpy())


def test_slicing_axis_follows_the_direction_matrix(model):
    """With axes permuted in the direction matrix, 'axial' slices along the array axis that is S-I."""
    array = volume((20, 12, 16))
    # columns = physical directions of index axes i, j, k: i is S-I (array axis 2), j is L-R, k is A-P
    permuted = (0.0, 1.0, 0.0, 0.0, 0.0, 1.0, 1.0, 0.0, 0.0)
    by_direction = segment_volume(model, array, direction=permuted, device="cpu")
    explicit = segment_volume(model, array, axis=2, device="cpu")
    assert np.array_equal(by_direction, explicit)


def test_progress_and_cancel(model):
    seen = []
    segment_volume(model, volume(), batch_size=4, device="cpu", progress=lambda d, t: seen.append((d, t)))
    assert seen == [(4, 9), (8, 9), (9, 9)]
    calls = []

    def cancel_after_first():
        calls.append(1)
        return len(calls) > 1

    with pytest.raises(Cancelled):
        segment_volume(model, volume(), batch_size=4, device="cpu", cancel=cancel_after_first)


@pytest.mark.parametrize("suffix", [".nii.gz", ".nrrd"])
def test_geometry_is_preserved_exactly_for_oblique_anisotropic_volumes(model, tmp_path, suffix):
    source = VolumeImage(volume(), (0.7, 0.9, 3.0), (-12.5, 40.25, 7.0), OBLIQUE)
    path = write_image(source.array, source, tmp_path / f"scan{suffix}")
    result = segment_file(model, path, tmp_path / "out", device="cpu")
    written = sitk.ReadImage(result["labels"])
    original = sitk.ReadImage(str(path))
    assert written.GetSize() == original.GetSize()
    assert written.GetSpacing() == original.GetSpacing()
    assert written.GetOrigin() == original.GetOrigin()
    # NRRD stores direction x spacing as text: equal to the last bit or one ulp from it
    np.testing.assert_allclose(written.GetDirection(), original.GetDirection(), rtol=0, atol=1e-15)
    assert np.array_equal(sitk.GetArrayFromImage(written), segment_volume(model, read_image(path), device="cpu"))


def test_seg_nrrd_has_names_colors_and_voxels(model, tmp_path):
    import slicerio

    source = VolumeImage(volume(), (0.7, 0.9, 3.0), (-12.5, 40.25, 7.0), OBLIQUE)
    path = write_image(source.array, source, tmp_path / "scan.nrrd")
    result = segment_file(model, path, tmp_path / "out", device="cpu")
    segmentation = slicerio.read_segmentation(result["segmentation"])
    segments = {s["name"]: s for s in segmentation["segments"]}
    assert list(segments) == ["liver", "tumor"]
    assert segments["liver"]["color"] == pytest.approx([0.9, 0.4, 0.3])
    labels = sitk.GetArrayFromImage(sitk.ReadImage(result["labels"]))
    voxels = slicerio.extract_segments(segmentation, [("tumor", 2)])["voxels"]  # (i, j, k) order
    assert (labels == 2).any()
    assert np.array_equal(np.asarray(voxels).transpose(2, 1, 0) == 2, labels == 2)


def test_png_input(model, tmp_path):
    from PIL import Image

    rgb = (np.random.default_rng(1).random((48, 60, 3)) * 255).astype(np.uint8)
    Image.fromarray(rgb).save(tmp_path / "photo.png")
    result = segment_file(model, tmp_path / "photo.png", tmp_path / "out", device="cpu")
    labels = np.asarray(Image.open(result["labels"]))
    assert labels.shape == (48, 60) and result["labels"].endswith("photo_labels.png")


def test_dicom_series_input(model, tmp_path):
    series = tmp_path / "dicom"
    series.mkdir()
    array = (volume((5, 32, 32)) * 10).astype(np.int16)
    writer = sitk.ImageFileWriter()
    writer.KeepOriginalImageUIDOn()
    for k in range(5):
        image = sitk.GetImageFromArray(array[k])
        image.SetSpacing((0.8, 0.8))
        for tag, value in (("0008|0060", "CT"), ("0020|000d", "1.2.3"), ("0020|000e", "1.2.3.4"),
                           ("0020|0013", str(k + 1)), ("0020|0032", f"0\\0\\{2.5 * k}"),
                           ("0020|0037", "1\\0\\0\\0\\1\\0"), ("0028|0030", "0.8\\0.8"), ("0018|0050", "2.5")):
            image.SetMetaData(tag, value)
        writer.SetFileName(str(series / f"slice{k:03d}.dcm"))
        writer.Execute(image)
    result = segment_file(model, series, tmp_path / "out", device="cpu")
    written = sitk.ReadImage(result["labels"])
    assert written.GetSize() == (32, 32, 5)
    assert written.GetSpacing() == pytest.approx((0.8, 0.8, 2.5))


def test_bad_files_are_reported_and_the_batch_goes_on(model, tmp_path):
    good = write_image(volume(), VolumeImage(volume(), (1, 1, 2), (0, 0, 0), tuple(np.eye(3).ravel())),
                       tmp_path / "good.nii.gz")
    four_d = sitk.JoinSeries([sitk.GetImageFromArray(volume((3, 8, 8), s)) for s in range(2)])
    sitk.WriteImage(four_d, str(tmp_path / "fourd.nii.gz"))
    (tmp_path / "empty.nii.gz").write_bytes(b"")
    (tmp_path / "notes.nrrd").write_text("these are my notes, not an image", encoding="utf-8")
    nan = volume()
    nan[2, 3, 4] = np.nan
    sitk.WriteImage(sitk.GetImageFromArray(nan), str(tmp_path / "nan.nrrd"))
    wrong_labels = np.zeros((9, 40, 50), np.uint8)
    wrong_labels[0, 0, :5] = 5
    write_image(wrong_labels, read_image(good), tmp_path / "truth_bad.nii.gz")
    inputs = ["fourd.nii.gz", "empty.nii.gz", "notes.nrrd", "nan.nrrd", "good.nii.gz", "good.nii.gz"]
    references = [None, None, None, None, tmp_path / "truth_bad.nii.gz", None]
    results = segment_files(model, [tmp_path / n for n in inputs], tmp_path / "out", references=references,
                            device="cpu", show_progress=False)
    errors = [r.get("error", "") for r in results]
    assert "fourd.nii.gz" in errors[0] and "4D" in errors[0]
    assert "empty.nii.gz" in errors[1] and "empty" in errors[1]
    assert "notes.nrrd" in errors[2] and "cannot be read" in errors[2]
    assert "nan.nrrd" in errors[3] and "NaN" in errors[3]
    assert "truth_bad.nii.gz" in errors[4] and "[5]" in errors[4]
    assert "error" not in results[5] and (tmp_path / "out" / "good_labels.nii.gz").is_file()


def test_reference_labels_give_dice(model, tmp_path):
    image = VolumeImage(volume(), (1, 1, 2), (0, 0, 0), tuple(np.eye(3).ravel()))
    path = write_image(image.array, image, tmp_path / "ct.nii.gz")
    predicted = segment_volume(model, image, device="cpu")
    write_image(predicted, image, tmp_path / "truth.nii.gz")
    result = segment_file(model, path, tmp_path / "out", reference=tmp_path / "truth.nii.gz", device="cpu")
    assert result["dice"] == {"liver": 1.0, "tumor": 1.0}


def test_segment_cli_json_and_exit_code(bundle, tmp_path, capsys):
    image = VolumeImage(volume(), (1, 1, 2), (0, 0, 0), tuple(np.eye(3).ravel()))
    write_image(image.array, image, tmp_path / "a.nii.gz")
    code = main(["segment", str(bundle), str(tmp_path / "a.nii.gz"), str(tmp_path / "missing.nii.gz"),
                 "--out", str(tmp_path / "out"), "--device", "cpu", "--json"])
    report = json.loads(capsys.readouterr().out)
    assert code == 1  # one input failed
    assert report["results"][0]["labels"].endswith("a_labels.nii.gz")
    assert "missing.nii.gz" in report["results"][1]["error"]


def test_demo_runs_end_to_end(tmp_path, capsys):
    code = main(["demo", "--out", str(tmp_path / "demo"), "--epochs", "1", "--max-steps-per-epoch", "2",
                 "--image-size", "64", "--device", "cpu", "--json"])
    report = json.loads(capsys.readouterr().out)
    assert code == 0
    for key in ("labels", "segmentation", "overlay", "concepts"):
        assert Path(report[key]).is_file(), key
    assert 0.0 <= report["metrics"]["mean"]["dice"] <= 1.0
    concepts = json.loads((tmp_path / "demo" / "segmentation" / "concepts.json").read_text(encoding="utf-8"))
    assert [c["class"] for c in concepts] == ["grey matter", "white matter"]
    assert all(c["prompt"].endswith(".") for c in concepts)
