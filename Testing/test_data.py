"""Image I/O, label maps, normalisation, slicing, datasets, splits and augmentation on tiny files."""
import json
import math
import os

import numpy as np
import pytest
import SimpleITK as sitk
import slicerio
import torch
from PIL import Image

from cotexnet.data import (
    CT_WINDOWS,
    ImageGeometry,
    IntensityNormalization,
    SliceDataset,
    VolumeImage,
    augment_batch,
    case_group,
    in_plane_spacing,
    load_dataset,
    load_split,
    make_split,
    read_image,
    list_dicom_series,
    read_image_geometry,
    read_label_map,
    resize_slices,
    save_split,
    slice_axis_index,
    split_cases,
    stack_slices,
    volume_slices,
    write_image,
    write_segmentation_nrrd,
)
from cotexnet.errors import ConfigError, DataError


def _rotation(a: float, b: float) -> np.ndarray:
    rz = np.array([[math.cos(a), -math.sin(a), 0], [math.sin(a), math.cos(a), 0], [0, 0, 1]])
    rx = np.array([[1, 0, 0], [0, math.cos(b), -math.sin(b)], [0, math.sin(b), math.cos(b)]])
    return rz @ rx


def _volume(array, spacing=(0.7, 0.9, 2.5), origin=(1.5, -2.25, 3.125), direction=None) -> sitk.Image:
    image = sitk.GetImageFromArray(array)
    image.SetSpacing(spacing)
    image.SetOrigin(origin)
    if direction is not None:
        image.SetDirection(tuple(np.ravel(direction)))
    return image


def _write(image: sitk.Image, path):
    path.parent.mkdir(parents=True, exist_ok=True)
    sitk.WriteImage(image, str(path))
    return path


def _png(path, array):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.asarray(array, dtype=np.uint8)).save(path)
    return path


def _ct_and_labels(z=6, y=8, x=10):
    """A CT-like volume and a two-class label map with foreground in slices 2 and 3 only."""
    ct = np.full((z, y, x), -1000, dtype=np.int16)
    labels = np.zeros((z, y, x), dtype=np.uint8)
    ct[2:4, 2:6, 3:8] = 50
    labels[2:4, 2:6, 3:6] = 1
    labels[2:4, 2:6, 6:8] = 2
    return ct, labels


def _nnunet(root, cases=("patient001_frame01", "patient001_frame12", "patient002_frame01"), classes=("liver", "tumour")):
    ct, labels = _ct_and_labels()
    for case in cases:
        _write(_volume(ct), root / "imagesTr" / f"{case}_0000.nii.gz")
        _write(_volume(labels), root / "labelsTr" / f"{case}.nii.gz")
    _write(_volume(ct), root / "imagesTs" / "patient009_frame01_0000.nii.gz")
    meta = {"channel_names": {"0": "CT"}, "labels": {"background": 0, **{c: i + 1 for i, c in enumerate(classes)}},
            "numTraining": len(cases), "file_ending": ".nii.gz"}
    (root / "dataset.json").write_text(json.dumps(meta), encoding="utf-8")
    return root


def _folder2d(root, names=("a", "b"), size=(8, 10)):
    for i, name in enumerate(names):
        rgb = np.zeros(size + (3,), dtype=np.uint8)
        rgb[..., i % 3] = 200
        mask = np.zeros(size, dtype=np.uint8)
        mask[2:5, 3:7] = 255
        _png(root / "images" / f"{name}.png", rgb)
        _png(root / "masks" / f"{name}.png", mask)
    return root


def _dicom_series(folder, array, spacing=(0.8, 0.6, 2.0), origin=(10.0, 20.0, 30.0), z_positions=None, uid_end="7",
                  description=None, prefix="slice"):
    """Write ``array`` (z, y, x) as a CT DICOM series, one file per slice; ``z_positions`` (mm) replaces the
    slices' evenly spaced positions. A folder may hold several series (each with its own ``uid_end`` and file
    ``prefix``)."""
    folder.mkdir(parents=True, exist_ok=True)
    volume = _volume(array, spacing, origin)
    writer = sitk.ImageFileWriter()
    writer.KeepOriginalImageUIDOn()
    uid = f"1.2.826.0.1.3680043.2.1125.{uid_end}"
    for k in range(volume.GetDepth()):
        image = volume[:, :, k]
        position = volume.TransformIndexToPhysicalPoint((0, 0, k))
        if z_positions is not None:
            position = (*position[:2], z_positions[k])
        tags = {
            "0008|0016": "1.2.840.10008.5.1.4.1.1.2", "0008|0018": f"{uid}.3.{k + 1}", "0008|0060": "CT",
            "0020|000d": f"{uid}.1", "0020|000e": f"{uid}.2", "0020|0013": str(k + 1),
            "0020|0032": "\\".join(map(str, position)),
            "0020|0037": "1\\0\\0\\0\\1\\0", "0018|0050": str(spacing[2]),
        }
        if description is not None:
            tags["0008|103e"] = description
        for tag, value in tags.items():
            image.SetMetaData(tag, value)
        writer.SetFileName(str(folder / f"{prefix}{k:03d}.dcm"))
        writer.Execute(image)
    return folder


# ----------------------------------------------------------------------------------------------- I/O


@pytest.mark.parametrize("suffix, atol", [(".nii.gz", 1e-6), (".nrrd", 1e-14), (".mha", 0.0)])
def test_write_image_keeps_geometry(tmp_path, suffix, atol):
    source = _write(_volume(np.random.default_rng(0).normal(size=(4, 5, 6)).astype(np.float32),
                            direction=_rotation(0.3, 0.2)), tmp_path / f"ct{suffix}")
    reference = read_image(source)
    labels = (reference.array > 0).astype(np.uint8)
    out = write_image(labels, reference, tmp_path / "out" / f"labels{suffix}")
    back = read_image(out)
    assert back.shape == reference.shape
    for name in ("spacing", "origin", "direction"):  # to the precision the format stores
        np.testing.assert_allclose(getattr(back, name), getattr(reference, name), rtol=0, atol=atol, err_msg=name)
    np.testing.assert_array_equal(back.array, labels)
    assert sorted(p.name for p in out.parent.iterdir()) == [out.name]  # no temporary files left behind


def test_write_image_mhd_moves_data_file(tmp_path):
    reference = VolumeImage(np.zeros((2, 3, 4), np.uint8), (1, 2, 3), (0, 0, 0), tuple(np.eye(3).ravel()))
    out = write_image(np.ones((2, 3, 4), np.uint8), reference, tmp_path / "labels.mhd")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["labels.mhd", "labels.zraw"]
    assert read_image(out).array.sum() == 24
    with pytest.raises(DataError, match=r"array shape \(2, 3\) differs"):
        write_image(np.zeros((2, 3)), reference, tmp_path / "bad.nrrd")


def test_read_pictures(tmp_path):
    rgba = np.zeros((4, 5, 4), np.uint8)
    rgba[..., 0], rgba[..., 3] = 10, 255
    Image.fromarray(rgba).save(tmp_path / "rgba.png")
    image = read_image(tmp_path / "rgba.png")
    assert image.is_rgb and image.ndim == 2 and image.shape == (4, 5) and image.array.shape == (4, 5, 3)
    assert image.array[..., 0].max() == 10
    gray = read_image(_png(tmp_path / "gray.tif", np.arange(20).reshape(4, 5)))
    assert not gray.is_rgb and gray.array.shape == (4, 5)
    assert read_image_geometry(tmp_path / "rgba.png").shape == (4, 5)


def test_read_dicom_series_picks_largest(tmp_path):
    array = np.arange(4 * 6 * 5, dtype=np.int16).reshape(4, 6, 5)
    folder = _dicom_series(tmp_path / "ct", array)
    image = read_image(folder)
    np.testing.assert_array_equal(image.array, array)
    assert image.spacing == pytest.approx((0.8, 0.6, 2.0)) and image.origin == pytest.approx((10, 20, 30))
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="no DICOM series") as error:
        read_image(tmp_path / "empty")
    assert "empty" in str(error.value)


def test_a_folder_of_two_dicom_series_lists_both_and_reads_the_chosen_one(tmp_path, caplog):
    large = np.arange(5 * 6 * 4, dtype=np.int16).reshape(5, 6, 4)
    small = (np.arange(3 * 4 * 7, dtype=np.int16).reshape(3, 4, 7) * 3 + 100)
    folder = _dicom_series(tmp_path / "study", large, uid_end="7", description="Axial T1")
    _dicom_series(folder, small, spacing=(0.5, 0.5, 3.0), uid_end="8", description="Scout", prefix="scout")
    series = list_dicom_series(folder)
    uid = "1.2.826.0.1.3680043.2.1125.{}.2"
    assert [(s.uid, s.description, s.modality, s.size, len(s.files)) for s in series] == [
        (uid.format(7), "Axial T1", "CT", (6, 4, 5), 5), (uid.format(8), "Scout", "CT", (4, 7, 3), 3)]
    assert all(os.path.basename(f).startswith("scout") for f in series[1].files)
    chosen = read_image(folder, series_uid=uid.format(8))
    np.testing.assert_array_equal(chosen.array, small)
    assert chosen.spacing == pytest.approx((0.5, 0.5, 3.0))
    assert read_image_geometry(folder, series_uid=uid.format(8)).shape == (3, 4, 7)
    with caplog.at_level("WARNING", logger="cotexnet.data.image"):
        np.testing.assert_array_equal(read_image(folder).array, large)  # unchosen: the largest, with a warning
    assert "holds 2 DICOM series" in caplog.text and uid.format(8) in caplog.text
    with pytest.raises(DataError, match=r"holds no DICOM series 1\.2\.3 \(it holds: .*'Axial T1'.*'Scout'"):
        read_image(folder, series_uid="1.2.3")
    with pytest.raises(DataError, match="chooses a series of a DICOM folder; this is a file"):
        read_image(series[0].files[0], series_uid=uid.format(7))
    # the chosen series keeps the slice-position checks: one of its slices moved is refused
    moved = _dicom_series(tmp_path / "gap", large, uid_end="9", z_positions=[30.0, 32.0, 34.0, 38.0, 40.0])
    _dicom_series(moved, small, uid_end="8", prefix="scout")
    with pytest.raises(DataError, match="1 slice\\(s\\) missing"):
        read_image(moved, series_uid=uid.format(9))


def test_bad_images_name_file_and_problem(tmp_path):
    with pytest.raises(DataError, match="missing.nii.gz: file not found"):
        read_image(tmp_path / "missing.nii.gz")
    (tmp_path / "empty.nrrd").write_bytes(b"")
    with pytest.raises(DataError, match="empty.nrrd: file is empty"):
        read_image(tmp_path / "empty.nrrd")
    (tmp_path / "junk.png").write_bytes(b"not a png at all")
    with pytest.raises(DataError, match="junk.png: cannot be read as an image"):
        read_image(tmp_path / "junk.png")
    (tmp_path / "junk.nii.gz").write_bytes(b"not a nifti")
    with pytest.raises(DataError, match="junk.nii.gz: cannot be read as an image"):
        read_image(tmp_path / "junk.nii.gz")
    (tmp_path / "notes.txt").write_text("hello", encoding="utf-8")
    with pytest.raises(DataError, match="notes.txt: unsupported file type '.txt'"):
        read_image(tmp_path / "notes.txt")


def test_error_summary_keeps_the_line_that_says_what_went_wrong(tmp_path):
    """SimpleITK puts a C++ source location before its message; torch and transformers start with the point."""
    from cotexnet.errors import error_summary

    (tmp_path / "junk.nrrd").write_bytes(b"garbage")
    with pytest.raises(RuntimeError) as raised:
        sitk.ReadImage(str(tmp_path / "junk.nrrd"))
    assert ".cxx:" in str(raised.value).splitlines()[0]  # the header the summary must skip
    assert error_summary(raised.value).startswith("Unable to determine ImageIO reader")
    with pytest.raises(DataError, match=r"junk.nrrd: cannot be read as an image \(Unable to determine ImageIO"):
        read_image(tmp_path / "junk.nrrd")
    pickle = RuntimeError("Weights only load failed.\n\t(1) In PyTorch 2.6 ...\nCheck the documentation of torch.load")
    assert error_summary(pickle) == "Weights only load failed."
    assert error_summary(ValueError("  \n")) == "ValueError"
    four_d = sitk.JoinSeries([_volume(np.zeros((2, 3, 4), np.float32))] * 2)
    _write(four_d, tmp_path / "4d.nii.gz")
    for read in (read_image, read_image_geometry):
        with pytest.raises(DataError, match="4d.nii.gz: 4D images are not supported; extract one 3D volume first"):
            read(tmp_path / "4d.nii.gz")
    nan = np.zeros((2, 3, 4), np.float32)
    nan[1, 1, 1], nan[0, 0, 0] = np.nan, np.inf
    _write(_volume(nan), tmp_path / "nan.nrrd")
    with pytest.raises(DataError, match="nan.nrrd: image holds 2 NaN or infinite voxel"):
        read_image(tmp_path / "nan.nrrd")


# ----------------------------------------------------------------------------------------- label maps


def test_read_label_map_conventions(tmp_path):
    mask = np.zeros((4, 5), np.uint8)
    mask[1:3, 1:4] = 255
    assert set(np.unique(read_label_map(_png(tmp_path / "m.png", mask), num_classes=1))) == {0, 1}
    rgb = np.repeat((mask // 255 * 2)[..., None], 3, axis=2)
    labels = read_label_map(_png(tmp_path / "rgb.png", rgb), num_classes=2)
    assert labels.dtype == np.uint8 and labels.max() == 2
    with pytest.raises(DataError, match=r"rgb.png: labels \[2\] outside the class indices 0..1"):
        read_label_map(tmp_path / "rgb.png", num_classes=1)
    image = VolumeImage(np.zeros((4, 6)), (1, 1), (0, 0), (1, 0, 0, 1), tmp_path / "image.png")
    with pytest.raises(DataError, match=r"m.png: mask shape \(4, 5\) differs from image shape \(4, 6\) \(.*image.png\)"):
        read_label_map(tmp_path / "m.png", image)
    colour = np.zeros((4, 5, 3), np.uint8)
    colour[0, 0] = (255, 0, 0)
    with pytest.raises(DataError, match="colour.png: colour mask"):
        read_label_map(_png(tmp_path / "colour.png", colour))
    Image.fromarray(mask).save(tmp_path / "lossy.jpg", quality=70)
    np.testing.assert_array_equal(read_label_map(tmp_path / "lossy.jpg", num_classes=1), mask // 255)


def test_seg_nrrd_round_trip_and_read_by_name(tmp_path):
    _, labels = _ct_and_labels()
    reference = VolumeImage(labels, (0.7, 0.9, 2.5), (1.5, -2.25, 3.125), tuple(_rotation(0.3, 0.2).ravel()))
    colors = [[0.9, 0.1, 0.1], [0.1, 0.8, 0.2]]
    path = write_segmentation_nrrd(labels, reference, tmp_path / "case.seg.nrrd", ["liver", "tumour"], colors)
    segmentation = slicerio.read_segmentation(str(path))
    assert slicerio.segment_names(segmentation) == ["liver", "tumour"]
    assert [s["labelValue"] for s in segmentation["segments"]] == [1, 2]
    assert segmentation["segments"][1]["color"] == pytest.approx(colors[1])
    np.testing.assert_allclose(segmentation["ijkToLPS"], reference.geometry.ijk_to_lps(), atol=1e-12)
    np.testing.assert_array_equal(slicerio.segment_mask(segmentation, "tumour"), (labels == 2).T)
    # Read back with the class order reversed: segments are matched by (case-insensitive) name.
    back = read_label_map(path, reference, classes=["Tumour", "LIVER"])
    np.testing.assert_array_equal(back, np.choose(labels, [0, 2, 1]))
    with pytest.raises(DataError, match="case.seg.nrrd: segment 'tumour' is not one of the classes"):
        read_label_map(path, reference, classes=["liver"])
    rgb = VolumeImage(np.zeros((3, 4, 3), np.uint8), (0.5, 0.5), (0, 0), (1, 0, 0, 1))
    flat = write_segmentation_nrrd(np.eye(3, 4, dtype=np.uint8), rgb, tmp_path / "2d.seg.nrrd", ["a"])
    np.testing.assert_array_equal(read_label_map(flat, rgb, classes=["a"]), np.eye(3, 4))


def test_cropped_seg_nrrd_is_resampled_onto_the_image(tmp_path):
    reference = ImageGeometry((4, 6, 8), (0.5, 1.0, 2.0), (10.0, 0.0, -5.0), tuple(np.eye(3).ravel()))
    # A segmentation covering x 2..5, y 1..3, z 1..2 of the image only (as Slicer may save it).
    matrix = reference.ijk_to_lps()
    matrix[:3, 3] += matrix[:3, :3] @ [2, 1, 1]
    segmentation = slicerio.create_segmentation((4, 3, 2), matrix)
    mask = np.zeros((4, 3, 2), bool)
    mask[1, 2, 0] = True  # image voxel x=3, y=3, z=1
    slicerio.add_segment(segmentation, mask, {"name": "lesion"})
    slicerio.write_segmentation(str(tmp_path / "crop.seg.nrrd"), segmentation)
    labels = read_label_map(tmp_path / "crop.seg.nrrd", reference, classes=["lesion"])
    assert labels.shape == (4, 6, 8) and list(zip(*np.nonzero(labels))) == [(1, 3, 3)]


def test_overlapping_segments_in_layers(tmp_path):
    segmentation = slicerio.create_segmentation((4, 3, 2), np.eye(4))
    first, second = np.zeros((4, 3, 2), bool), np.zeros((4, 3, 2), bool)
    first[:2], second[1:3] = True, True  # overlap at i = 1, so slicerio stores "b" in a second layer
    slicerio.add_segment(segmentation, first, {"name": "a"})
    slicerio.add_segment(segmentation, second, {"name": "b"})
    assert segmentation["voxels"].ndim == 4
    slicerio.write_segmentation(str(tmp_path / "layers.seg.nrrd"), segmentation)
    labels = read_label_map(tmp_path / "layers.seg.nrrd", classes=["a", "b"])
    assert labels[0].tolist() == [[1, 2, 2, 0]] * 3  # z = 0, rows y, columns x; later segments win where they overlap


# ------------------------------------------------------------------------------------ normalisation


def test_normalization_values():
    ct = IntensityNormalization("ct")
    assert (ct.center, ct.width, ct.window) == (40, 400, "soft_tissue")
    np.testing.assert_allclose(ct.apply(np.array([-160, 40, 240, -1000, 1000])), [0, 0.5, 1, 0, 1])
    lung = IntensityNormalization("ct", window="lung")
    np.testing.assert_allclose(lung.apply(np.array([-1350, -600, 150])), [0, 0.5, 1])
    custom = IntensityNormalization("ct", center=0, width=100)
    assert custom.window == "custom" and custom.apply(np.array([-25.0]))[0] == pytest.approx(0.25)
    percentile = IntensityNormalization("percentile", lower=10, upper=90)
    values = np.arange(101, dtype=np.int16)  # 10th/90th percentiles are 10 and 90
    np.testing.assert_allclose(percentile.apply(values)[[0, 10, 50, 90, 100]], [0, 0, 0.5, 1, 1])
    np.testing.assert_allclose(IntensityNormalization("minmax").apply(np.array([2, 4, 6])), [0, 0.5, 1])
    out = IntensityNormalization("rgb").apply(np.array([0, 51, 255], np.uint8))
    assert out.dtype == np.float32
    np.testing.assert_allclose(out, [0, 0.2, 1])
    assert not IntensityNormalization("minmax").apply(np.full((3, 3), 7)).any()  # constant image -> zeros


def test_normalization_dict_and_modalities():
    assert IntensityNormalization().to_dict() == {"mode": "percentile", "lower": 0.5, "upper": 99.5}
    for mode in ("ct", "percentile", "minmax", "rgb"):
        norm = IntensityNormalization(mode)
        assert IntensityNormalization.from_dict(json.loads(json.dumps(norm.to_dict()))) == norm
    assert IntensityNormalization("ct", window="bone").to_dict() == {
        "mode": "ct", "window": "bone", "center": 400.0, "width": 1800.0}
    assert set(CT_WINDOWS) == {"soft_tissue", "lung", "bone", "brain", "liver"}
    assert IntensityNormalization.for_modality("CT").to_dict()["window"] == "soft_tissue"
    for name in ("MR", "MRI", "US"):
        assert IntensityNormalization.for_modality(name).mode == "percentile"
    assert IntensityNormalization.for_modality("photo").mode == "rgb"
    bad = [({"mode": "xray"}, "intensity.mode"), ({"mode": "ct", "center": 0, "width": -5}, "intensity.width"),
           ({"mode": "percentile", "center": 3}, "intensity.center"), ({"mode": "ct", "window": "heart"},
                                                                       "intensity.window"),
           ({"mode": "percentile", "lower": 99, "upper": 1}, "intensity.lower/upper"),
           ({"mode": "percentile", "lower": "low"}, "intensity.lower"),
           ({"mode": "ct", "window": "lung", "center": 1, "width": 2}, "intensity.window")]
    for data, field_name in bad:
        with pytest.raises(ConfigError, match=field_name.replace(".", r"\.")):
            IntensityNormalization.from_dict(data)


# ------------------------------------------------------------------------------------------ slicing


def test_slice_axis_index():
    identity = np.eye(3).ravel()
    assert [slice_axis_index(identity, n) for n in ("axial", "coronal", "sagittal")] == [0, 1, 2]
    # Index axis i runs S-I, j runs L-R, k runs A-P (columns of the direction matrix).
    permuted = np.array([[0, 1, 0], [0, 0, 1], [1, 0, 0]], float).ravel()
    assert slice_axis_index(permuted, "axial") == 2  # i is array axis 2
    assert slice_axis_index(permuted, "sagittal") == 1  # j is array axis 1
    assert slice_axis_index(permuted, "coronal") == 0  # k is array axis 0
    assert slice_axis_index(_rotation(math.radians(30), 0).ravel(), "axial") == 0
    with pytest.raises(ConfigError, match="slice_axis: 'oblique'"):
        slice_axis_index(identity, "oblique")


def test_volume_slices_round_trip():
    image = VolumeImage(np.arange(24).reshape(2, 3, 4), (0.5, 0.7, 3.0), (0, 0, 0), tuple(np.eye(3).ravel()))
    sagittal = volume_slices(image, "sagittal")
    assert sagittal.shape == (4, 2, 3)
    np.testing.assert_array_equal(stack_slices(sagittal, image, "sagittal"), image.array)
    assert in_plane_spacing(image, "axial") == (0.7, 0.5)
    assert in_plane_spacing(image, "sagittal") == (3.0, 0.7)
    rgb = VolumeImage(np.zeros((3, 4, 3)), (0.2, 0.3), (0, 0), (1, 0, 0, 1))
    assert volume_slices(rgb).shape == (1, 3, 4, 3) and in_plane_spacing(rgb) == (0.3, 0.2)


def test_resize_slices():
    labels = torch.tensor([[[0, 1], [2, 3]]])
    up = resize_slices(labels, 4, "nearest")
    assert up.dtype == labels.dtype and up.shape == (1, 4, 4)
    assert torch.equal(up[0], labels[0].repeat_interleave(2, 0).repeat_interleave(2, 1))
    images = torch.rand(2, 3, 8, 8)
    assert resize_slices(images, (5, 6)).shape == (2, 3, 5, 6)
    assert resize_slices(images, 8) is images


# ------------------------------------------------------------------------------------------ datasets


def test_folder_dataset_2d(tmp_path):
    index = load_dataset(_folder2d(tmp_path), classes=["polyp"])
    assert index.format == "folder" and index.classes == ["polyp"]
    assert [c.case_id for c in index.cases] == ["a", "b"]
    dataset = SliceDataset(index, None, normalization=IntensityNormalization("rgb"), image_size=16,
                           empty_fraction=0.0)
    assert len(dataset) == 2
    item = dataset[1]
    assert item["image"].shape == (3, 16, 16) and item["image"].dtype == torch.float32
    assert item["image"][1].max() == pytest.approx(200 / 255, abs=1e-3) and item["image"][0].max() == 0
    assert item["label"].dtype == torch.int64 and set(item["label"].unique().tolist()) == {0, 1}
    assert item["case"] == "b" and item["index"] == 0 and item["spacing"].tolist() == [1.0, 1.0]


def test_nnunet_dataset_and_slices(tmp_path):
    index = load_dataset(_nnunet(tmp_path))
    assert index.format == "nnunet" and index.classes == ["liver", "tumour"] and index.modality == "CT"
    assert [c.group for c in index.cases] == ["patient001", "patient001", "patient002"]
    assert [c.case_id for c in index.unlabeled] == ["patient009_frame01"]
    norm = IntensityNormalization.for_modality(index.modality)
    dataset = SliceDataset(index, None, normalization=norm, image_size=12, empty_fraction=0.0)
    assert len(dataset) == 6 and {item["index"] for item in dataset} == {2, 3}
    item = dataset[0]
    assert item["image"].shape == (3, 12, 12) and 0 <= item["image"].min() and item["image"].max() <= 1
    assert item["label"].shape == (12, 12) and set(item["label"].unique().tolist()) == {0, 1, 2}
    assert item["spacing"].tolist() == pytest.approx([0.9, 0.7])
    assert len(SliceDataset(index, None, normalization=norm, image_size=12, empty_fraction=1.0)) == 18
    sagittal = SliceDataset(index, None, normalization=norm, axis="sagittal", image_size=12, empty_fraction=1.0)
    assert len(sagittal) == 30 and sagittal[0]["spacing"].tolist() == pytest.approx([2.5, 0.9])
    half = SliceDataset(index, None, normalization=norm, image_size=12, empty_fraction=0.5, seed=3)
    assert len(half) == 12


def test_nnunet_split_file_and_class_check(tmp_path):
    root = _nnunet(tmp_path)
    folds = [{"train": ["patient001_frame01", "patient001_frame12"], "val": ["patient002_frame01"]}]
    (root / "splits_final.json").write_text(json.dumps(folds), encoding="utf-8")
    index = load_dataset(root, classes=["Liver", "tumour"])
    assert split_cases(index) == {"train": folds[0]["train"], "val": folds[0]["val"], "test": []}
    dataset = SliceDataset(index, "val", normalization=IntensityNormalization("ct"), image_size=8, empty_fraction=0)
    assert {item["case"] for item in dataset} == {"patient002_frame01"}
    with pytest.raises(DataError, match=r"dataset.json: class names \['liver'\] don't match dataset.json labels"):
        load_dataset(root, classes=["liver"])


def test_msd_dataset(tmp_path):
    ct, labels = _ct_and_labels()
    for name in ("spleen_1", "spleen_2"):
        _write(_volume(ct), tmp_path / "imagesTr" / f"{name}.nii.gz")
        _write(_volume((labels > 0).astype(np.uint8)), tmp_path / "labelsTr" / f"{name}.nii.gz")
    meta = {"modality": {"0": "CT"}, "labels": {"0": "background", "1": "spleen"}, "test": [],
            "training": [{"image": f"./imagesTr/{n}.nii.gz", "label": f"./labelsTr/{n}.nii.gz"}
                         for n in ("spleen_1", "spleen_2")]}
    (tmp_path / "dataset.json").write_text(json.dumps(meta), encoding="utf-8")
    index = load_dataset(tmp_path)
    assert index.format == "msd" and index.classes == ["spleen"] and index.modality == "CT"
    assert [c.case_id for c in index.cases] == ["spleen_1", "spleen_2"]
    assert index.cases[0].label_path.name == "spleen_1.nii.gz"


def test_seg_nrrd_and_dicom_folder_dataset(tmp_path):
    ct, labels = _ct_and_labels(4, 6, 5)
    _dicom_series(tmp_path / "images" / "ct1", ct)
    reference = read_image(tmp_path / "images" / "ct1")
    # Label map written with slicerio itself; the tumour segment comes first in the file.
    segmentation = slicerio.create_segmentation(labels.T.shape, reference.geometry.ijk_to_lps())
    slicerio.add_segment(segmentation, (labels == 2).T, {"name": "tumour", "color": [0, 1, 0]})
    slicerio.add_segment(segmentation, (labels == 1).T, {"name": "liver", "color": [1, 0, 0]})
    (tmp_path / "masks").mkdir()
    slicerio.write_segmentation(str(tmp_path / "masks" / "ct1.seg.nrrd"), segmentation)
    index = load_dataset(tmp_path, classes=["liver", "tumour"])
    assert index.cases[0].image_path.is_dir()
    np.testing.assert_array_equal(read_label_map(index.cases[0].label_path, reference, classes=index.classes),
                                  labels)
    dataset = SliceDataset(index, None, normalization=IntensityNormalization("ct"), image_size=6,
                           empty_fraction=0.0)
    assert [item["index"] for item in dataset] == [2, 3]
    assert dataset[0]["spacing"].tolist() == pytest.approx([0.6, 0.8])
    assert load_dataset(tmp_path).classes == ["tumour", "liver"]  # names from the first .seg.nrrd


def test_bad_datasets_name_file_and_problem(tmp_path):
    root = _folder2d(tmp_path / "nomask", names=("a", "b"))
    (root / "masks" / "b.png").unlink()
    with pytest.raises(DataError, match=r"b.png: no mask for this image"):
        load_dataset(root, ["x"])

    root = _folder2d(tmp_path / "shape", names=("a",))
    _png(root / "masks" / "a.png", np.zeros((8, 9)))
    with pytest.raises(DataError, match=r"a.png: mask shape \(8, 9\) differs from image shape \(8, 10\)"):
        load_dataset(root, ["x"])

    root = _folder2d(tmp_path / "labels", names=("a",))
    mask = np.zeros((8, 10))
    mask[0, 0], mask[1, 1] = 1, 3
    _png(root / "masks" / "a.png", mask)
    index = load_dataset(root, ["x"])
    with pytest.raises(DataError, match=r"masks/a.png: labels \[3\] outside the class indices 0..1"):
        SliceDataset(index, None, normalization=IntensityNormalization("rgb"), image_size=8)

    (tmp_path / "empty" / "images").mkdir(parents=True)
    (tmp_path / "empty" / "masks").mkdir()
    with pytest.raises(DataError, match="empty: dataset holds no cases"):
        load_dataset(tmp_path / "empty", ["x"])

    root = _folder2d(tmp_path / "junk", names=("a",))
    (root / "images" / "a.png").write_bytes(b"\x89PNG broken")
    with pytest.raises(DataError, match="images/a.png: cannot be read as an image"):
        load_dataset(root, ["x"])

    with pytest.raises(DataError, match="not a dataset"):
        load_dataset(tmp_path / "junk" / "images")
    with pytest.raises(DataError, match="class names are needed"):
        load_dataset(_folder2d(tmp_path / "noclasses"))

    root = _nnunet(tmp_path / "nn")
    (root / "labelsTr" / "patient002_frame01.nii.gz").unlink()
    with pytest.raises(DataError, match=r"patient002_frame01_0000.nii.gz: no mask for this image"):
        load_dataset(root)


# ---------------------------------------------------------------------------------------------- splits


def test_case_group_rule():
    assert case_group("patient001_frame01") == "patient001"
    assert case_group("patient0001_2CH_ED") == "patient0001"
    for own in ("liver_12", "BraTS2021_00001", "ISIC_0000000", "cju0qkwl35piu0993l0dewei2"):
        assert case_group(own) == own


def test_split_is_grouped_and_seeded(tmp_path):
    index = load_dataset(_nnunet(tmp_path, cases=[f"patient{p:03d}_frame{f:02d}" for p in range(20) for f in (1, 12)]))
    split = split_cases(index, seed=7)
    assert split == make_split(index.cases, seed=7)
    assert [len(split[n]) for n in ("train", "val", "test")] == [32, 4, 4]  # 16/2/2 patients
    owner = {}
    for name, ids in split.items():
        for case_id in ids:
            assert owner.setdefault(case_group(case_id), name) == name  # no patient in two parts
    assert make_split(index.cases, seed=8) != split
    three = make_split(index.cases[:6], seed=0)  # 3 patients -> one each
    assert [len(three[n]) for n in ("train", "val", "test")] == [2, 2, 2]

    path = save_split(split, tmp_path / "out" / "split.json")
    assert load_split(path, index) == split
    (tmp_path / "split.json").write_text(json.dumps({"train": ["patient000_frame01"], "val": ["patient001_frame01"]}), encoding="utf-8")
    assert load_dataset(tmp_path).split == {"train": ["patient000_frame01"], "val": ["patient001_frame01"], "test": []}
    (tmp_path / "split.json").write_text(json.dumps({"train": ["nobody"]}), encoding="utf-8")
    with pytest.raises(DataError, match=r"split.json: split names cases that are not in the dataset: \['nobody'\]"):
        load_dataset(tmp_path)
    with pytest.raises(DataError, match="'a' is in both 'train' and 'test'"):
        save_split({"train": ["a"], "test": ["a"]}, tmp_path / "x.json")


# -------------------------------------------------------------------------------------- augmentation


def test_augmentation_keeps_image_and_label_aligned():
    labels = torch.zeros(8, 16, 16, dtype=torch.int64)
    labels[:, 2:6, 3:9] = 1  # an asymmetric block near the top-left corner
    labels[:, 10:12, 12:15] = 2
    images = (labels[:, None] > 0).float().repeat(1, 3, 1, 1)
    out_images, out_labels = augment_batch(images, labels, torch.Generator().manual_seed(0), scale=(1.0, 1.0))
    assert torch.equal(out_images[:, 0] > 0.5, out_labels > 0)
    variants = [labels[0], labels[0].flip(-1), labels[0].flip(-2), labels[0].flip((-1, -2))]
    chosen = [next(i for i, v in enumerate(variants) if torch.equal(out, v)) for out in out_labels]
    assert len(set(chosen)) > 1  # each sample is a flip of the original, not all the same one
    images2, labels2 = augment_batch(images, labels, torch.Generator().manual_seed(1))
    assert images2.shape == images.shape and labels2.shape == labels.shape and labels2.dtype == torch.int64
    agreement = ((images2[:, 0] > 0.5) == (labels2 > 0)).float().mean()
    assert agreement > 0.97
    assert set(labels2.unique().tolist()) <= {0, 1, 2}
