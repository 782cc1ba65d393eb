"""DICOM SEG output: an oblique CT-like series written here, segmented to SEG, read back with highdicom and pydicom."""
from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from cotexnet.cli import main

highdicom = pytest.importorskip("highdicom")
pydicom = pytest.importorskip("pydicom")

STUDY, SERIES, FRAME = "1.2.826.0.1.3680043.8.498.101", "1.2.826.0.1.3680043.8.498.102", "1.2.826.0.1.3680043.8.498.103"
SPACING = (0.8, 0.7, 2.5)  # x, y (in-plane) and slice distance, mm


def oblique_axes() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Row, column and slice-normal directions tilted about two axes (no cosine is 0 or 1)."""
    row = np.array([np.cos(0.35), np.sin(0.35), 0.0])
    column = np.array([0.0, np.cos(0.3), -np.sin(0.3)])
    column -= row * (row @ column)
    column /= np.linalg.norm(column)
    return row, column, np.cross(row, column)


def write_ct_series(folder: Path, depth: int = 6, rows: int = 40, columns: int = 48) -> np.ndarray:
    """A CT-like series, one file per slice with real geometry tags; file names are not in slice order."""
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    volume = (rng.normal(0, 40, (depth, rows, columns)) - 50).astype(np.int16)
    volume[:, 10:30, 12:36] += 300
    row, column, normal = oblique_axes()
    origin = np.array([-20.0, 15.0, 30.0])
    writer = sitk.ImageFileWriter()
    writer.KeepOriginalImageUIDOn()
    for k in range(depth):
        image = sitk.GetImageFromArray(volume[k : k + 1])
        image.SetSpacing((SPACING[0], SPACING[1], 1.0))
        position = origin + normal * SPACING[2] * k
        tags = {"0010|0010": "Test^Patient", "0010|0020": "P1", "0010|0030": "19700101", "0010|0040": "O",
                "0020|000d": STUDY, "0020|000e": SERIES, "0020|0052": FRAME, "0020|0010": "1", "0008|0050": "A1",
                "0008|0020": "20260101", "0008|0030": "120000", "0008|0090": "", "0008|0060": "CT",
                "0008|0016": "1.2.840.10008.5.1.4.1.1.2", "0008|0018": f"1.2.826.0.1.3680043.8.498.110.{k + 1}",
                "0020|0011": "3", "0020|0013": str(k + 1), "0008|0008": "ORIGINAL\\PRIMARY\\AXIAL",
                "0020|0032": "\\".join(f"{v:.6f}" for v in position),
                "0020|0037": "\\".join(f"{v:.9f}" for v in (*row, *column)), "0018|0050": str(SPACING[2])}
        for key, value in tags.items():
            image.SetMetaData(key, value)
        writer.SetFileName(str(folder / f"IM{depth - 1 - k:04d}.dcm"))  # names in reverse slice order
        writer.Execute(image)
    return volume


@pytest.fixture(scope="module")
def series(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("ct") / "series"
    write_ct_series(folder)
    return folder


@pytest.fixture(scope="module")
def bundle(tmp_path_factory, series) -> Path:
    """A tiny CT model whose class channels differ and whose output bias is shifted so that each class wins
    somewhere in the series (a random decoder favours one class everywhere and starts its class channels
    equal), which makes a voxel-for-voxel comparison meaningful."""
    import torch

    from cotexnet import CoTexNet, CoTexNetConfig
    from cotexnet.data import read_image
    from cotexnet.infer import predict_volume

    model = CoTexNet.from_config(CoTexNetConfig(classes=["liver", "tumour", "grey matter"], backbone="tiny",
                                                image_size=32, modality="CT",
                                                intensity={"mode": "ct", "center": 40, "width": 400}))
    head = model.clipseg.decoder.transposed_convolution
    head = head[-1] if isinstance(head, torch.nn.Sequential) else head
    with torch.no_grad():
        head.weight += torch.randn(head.weight.shape, generator=torch.Generator().manual_seed(0)) * head.weight.std() * 3
        probabilities = predict_volume(model, read_image(series), probabilities=True).probabilities
        head.bias -= torch.as_tensor(np.median(np.log(np.clip(probabilities, 1e-12, 1)), axis=(1, 2, 3)))
    return model.save_pretrained(tmp_path_factory.mktemp("model") / "ct-model")


def dciodvfy_errors(path: Path) -> list[str]:
    """The errors dicom3tools' validator finds in a file (none checked where it is not installed)."""
    if not shutil.which("dciodvfy"):
        return []
    report = subprocess.run(["dciodvfy", str(path)], capture_output=True,
                            encoding="utf-8", errors="replace", timeout=120)
    return [line for line in (report.stdout + report.stderr).splitlines() if line.startswith("Error")]


def source_headers(series: Path) -> dict[str, pydicom.Dataset]:
    return {ds.SOPInstanceUID: ds for ds in (pydicom.dcmread(f, stop_before_pixels=True) for f in series.iterdir())}


def decode_with_pydicom(seg: pydicom.Dataset, sources: dict, labels_of_segment: dict) -> np.ndarray:
    """The SEG's frames placed back on the source slices by their referenced SOP instance, as class labels."""
    order = sorted(sources, key=lambda uid: int(sources[uid].InstanceNumber))
    frames = seg.pixel_array.reshape((int(seg.NumberOfFrames), int(seg.Rows), int(seg.Columns)))
    decoded = np.zeros((len(order), int(seg.Rows), int(seg.Columns)), np.uint8)
    shared = seg.SharedFunctionalGroupsSequence[0]
    for frame, group in zip(frames, seg.PerFrameFunctionalGroupsSequence):
        uid = group.DerivationImageSequence[0].SourceImageSequence[0].ReferencedSOPInstanceUID
        identification = group.get("SegmentIdentificationSequence") or shared.SegmentIdentificationSequence
        segment = int(identification[0].ReferencedSegmentNumber)
        decoded[order.index(uid)][frame > 0] = labels_of_segment[segment]
    return decoded


def test_dicom_seg_of_an_oblique_series_references_its_source_and_decodes_to_the_labels(series, bundle, tmp_path,
                                                                                        capsys):
    from cotexnet.data import read_image

    out = tmp_path / "out"
    assert main(["segment", str(bundle), str(series), "--out", str(out), "--dicom-seg", "--json",
                 "--device", "cpu"]) == 0
    import json

    result = json.loads(capsys.readouterr().out)["results"][0]
    labels = sitk.GetArrayFromImage(sitk.ReadImage(result["labels"]))
    seg_file = Path(result["dicom_seg"]["path"])
    seg = pydicom.dcmread(seg_file)
    sources = source_headers(series)
    first = next(iter(sources.values()))

    # What it references: study, frame of reference, the source series and each of its instances.
    assert seg.SOPClassUID == "1.2.840.10008.5.1.4.1.1.66.4"
    assert (seg.StudyInstanceUID, seg.FrameOfReferenceUID) == (STUDY, FRAME)
    assert seg.SeriesInstanceUID != SERIES
    referenced = seg.ReferencedSeriesSequence[0]
    assert referenced.SeriesInstanceUID == SERIES
    assert {item.ReferencedSOPInstanceUID for item in referenced.ReferencedInstanceSequence} == set(sources)
    assert seg.SegmentationType == "BINARY"

    # Segments: the classes that hold voxels, named, coloured and coded; algorithm identified.
    present = [name for i, name in enumerate(["liver", "tumour", "grey matter"], start=1) if (labels == i).any()]
    assert len(present) >= 2 and [s.SegmentLabel for s in seg.SegmentSequence] == present
    assert result["dicom_seg"]["empty"] == [n for n in ["liver", "tumour", "grey matter"] if n not in present]
    algorithm = seg.SegmentSequence[0].SegmentationAlgorithmIdentificationSequence[0]
    assert algorithm.AlgorithmName == "CoTexNet" and algorithm.AlgorithmParameters == "model=ct-model"
    labels_of_segment = {int(s.SegmentNumber): ["liver", "tumour", "grey matter"].index(s.SegmentLabel) + 1
                         for s in seg.SegmentSequence}

    # Frames: only slices with foreground; each frame sits exactly where its source slice is, oblique included.
    occupied = sum(len(np.unique(labels[k][labels[k] > 0])) for k in range(labels.shape[0]))
    assert int(seg.NumberOfFrames) == occupied == result["dicom_seg"]["frames"]
    shared = seg.SharedFunctionalGroupsSequence[0]
    np.testing.assert_allclose(np.asarray(shared.PlaneOrientationSequence[0].ImageOrientationPatient, float),
                               np.asarray(first.ImageOrientationPatient, float), atol=1e-6)
    np.testing.assert_allclose(np.asarray(shared.PixelMeasuresSequence[0].PixelSpacing, float),
                               np.asarray(first.PixelSpacing, float), atol=1e-6)
    for group in seg.PerFrameFunctionalGroupsSequence:
        uid = group.DerivationImageSequence[0].SourceImageSequence[0].ReferencedSOPInstanceUID
        np.testing.assert_allclose(np.asarray(group.PlanePositionSequence[0].ImagePositionPatient, float),
                                   np.asarray(sources[uid].ImagePositionPatient, float), atol=1e-4)

    # Voxel for voxel: pydicom's frames placed by their source instance, and highdicom's own reading.
    engine = read_image(series)
    assert engine.shape == labels.shape
    np.testing.assert_array_equal(decode_with_pydicom(seg, sources, labels_of_segment), labels)
    read_back = highdicom.seg.segread(seg_file)
    order = sorted(sources, key=lambda uid: int(sources[uid].InstanceNumber))
    numbers = sorted(labels_of_segment)
    masks = read_back.get_pixels_by_source_instance(source_sop_instance_uids=order, segment_numbers=numbers,
                                                    assert_missing_frames_are_empty=True)
    expected = np.stack([labels == labels_of_segment[n] for n in numbers], axis=-1)
    np.testing.assert_array_equal(masks.astype(bool), expected)

    assert dciodvfy_errors(seg_file) == []


def test_empty_classes_are_left_out_and_fractional_stores_probabilities(series, tmp_path):
    from cotexnet.data import read_image
    from cotexnet.dicom_seg import source_datasets, write_dicom_seg

    image = read_image(series)
    labels = np.zeros(image.shape, np.uint8)
    labels[1:4, 10:30, 12:36] = 1
    labels[2, 5:8, 5:8] = 3
    source = source_datasets(series, image)
    result = write_dicom_seg(tmp_path / "a_seg.dcm", source, labels, ["liver", "tumour", "grey matter"],
                             [[1, 0, 0], [0, 1, 0], [0, 0, 1]], model_name="m")
    assert result["segments"] == ["liver", "grey matter"] and result["empty"] == ["tumour"]
    assert result["frames"] == 3 + 1  # slices 1-3 hold liver, slice 2 grey matter; empty slices are left out
    seg = pydicom.dcmread(tmp_path / "a_seg.dcm")
    liver, grey = seg.SegmentSequence
    assert (liver.SegmentedPropertyTypeCodeSequence[0].CodeValue, grey.SegmentedPropertyTypeCodeSequence[0].CodeValue) \
        == ("10200004", "389081007")  # SNOMED CT Liver, Gray matter (DICOM's code dictionary)
    assert liver.SegmentedPropertyCategoryCodeSequence[0].CodeMeaning == "Anatomical Structure"
    np.testing.assert_allclose(highdicom.color.CIELabColor(*[v / 65535 * s - o for v, s, o in zip(
        liver.RecommendedDisplayCIELabValue, (100, 255, 255), (0, 128, 128))]).to_rgb(), (255, 0, 0), atol=2)

    rng = np.random.default_rng(1)
    probabilities = rng.dirichlet(np.ones(4), size=image.shape).transpose(3, 0, 1, 2).astype(np.float32)
    probabilities[:, 0] = 0.0  # slice 0 stores nothing
    probabilities[0, 0] = 1.0
    result = write_dicom_seg(tmp_path / "p_seg.dcm", source, labels, ["liver", "tumour", "grey matter"],
                             [[1, 0, 0], [0, 1, 0], [0, 0, 1]], model_name="m", probabilities=probabilities)
    seg = highdicom.seg.segread(tmp_path / "p_seg.dcm")
    assert seg.SegmentationType == "FRACTIONAL" and result["frames"] == 2 * (image.shape[0] - 1)
    order = [ds.SOPInstanceUID for ds in source]
    stored = seg.get_pixels_by_source_instance(source_sop_instance_uids=order, segment_numbers=[1, 2],
                                               assert_missing_frames_are_empty=True)
    expected = np.moveaxis(probabilities[[1, 3]], 0, -1)
    np.testing.assert_allclose(stored, expected, atol=0.5 / 255 + 1e-6)
    assert dciodvfy_errors(tmp_path / "p_seg.dcm") == []


def test_dicom_seg_needs_dicom_input_and_the_extra(tmp_path, bundle, capsys, monkeypatch):
    volume = tmp_path / "scan.nii.gz"
    sitk.WriteImage(sitk.GetImageFromArray(np.zeros((3, 8, 8), np.int16)), str(volume))
    assert main(["segment", str(bundle), str(volume), "--out", str(tmp_path / "o"), "--dicom-seg"]) == 1
    err = capsys.readouterr().err
    assert "scan.nii.gz: DICOM SEG output needs DICOM input" in err and "must reference" in err
    assert not (tmp_path / "o" / "scan_labels.nii.gz").exists()  # refused before any work

    import sys

    monkeypatch.setitem(sys.modules, "highdicom", None)  # as if the extra were not installed
    from cotexnet.dicom_seg import require_dicom_libraries
    from cotexnet.errors import CoTexNetError

    with pytest.raises(CoTexNetError, match=r"pip install \"cotexnet\[dicom\]\""):
        require_dicom_libraries()


def test_slicer_console_segment_files_writes_a_dicom_seg(series, bundle, tmp_path):
    import slicer

    from CoTexNetSegmentLib.logic import CoTexNetSegmentLogic

    results = CoTexNetSegmentLogic(slicer.vtkMRMLScene()).segmentFiles([series], bundle, tmp_path, "cpu",
                                                                       dicomSeg=True)
    seg = pydicom.dcmread(results[0]["dicom_seg"]["path"])
    assert seg.Modality == "SEG" and seg.ReferencedSeriesSequence[0].SeriesInstanceUID == SERIES
