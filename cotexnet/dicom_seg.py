"""DICOM Segmentation (SEG) output: what PACS, OHIF and clinical viewers read, written with highdicom.

A SEG must reference the series it was derived from (study, series and SOP instance UIDs, frame of
reference), so it is written only for DICOM input. Each of the engine's slices is matched to its source
file by its position in space (never by file order), and highdicom takes every frame's position and
orientation from that file, so oblique series come out right. One segment per class that holds
foreground (empty classes are left out and reported), only frames with foreground, BINARY from the
label map or FRACTIONAL from the class probabilities.

highdicom and pydicom are the optional extra ``cotexnet[dicom]``; they load on first use.
"""
from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from .data.image import VolumeImage, _dicom_series_files, image_suffix
from .errors import CoTexNetError, DataError

logger = logging.getLogger(__name__)

INSTALL_HINT = 'pip install "cotexnet[dicom]"'
SEG_SUFFIX = "_seg.dcm"
#: Generic codes (DICOM CID 7150/7151) for a class whose name is not a SNOMED CT concept DICOM lists.
GENERIC_CATEGORY = ("85756007", "SCT", "Tissue")
GENERIC_TYPE = ("91723000", "SCT", "Anatomical Structure")
ANATOMY_CATEGORY = ("91723000", "SCT", "Anatomical Structure")
ABNORMAL_CATEGORY = ("49755003", "SCT", "Morphologically Abnormal Structure")
#: SNOMED CT concepts (pydicom's DICOM code dictionary keywords) that are findings, not anatomy.
ABNORMAL_KEYWORDS = frozenset({"Neoplasm", "Tumor", "Lesion", "Nodule", "Cyst", "Mass", "Hemorrhage", "Edema",
                               "Necrosis", "Ulcer", "Polyp", "Infarction", "Calcification", "Abscess"})
#: British spellings in class names, mapped to the American ones DICOM's dictionary uses.
SPELLINGS = {"tumour": "tumor", "grey": "gray", "oedema": "edema", "haemorrhage": "hemorrhage"}
#: Tolerance (mm) when matching an engine slice to its source file's ImagePositionPatient.
POSITION_TOLERANCE_MM = 1e-2


def require_dicom_libraries():
    """(highdicom, pydicom), or one error that says how to install them."""
    try:
        import highdicom
        import pydicom
    except ImportError as error:
        raise CoTexNetError(f"DICOM SEG output needs the optional 'dicom' extra ({error.name} is not installed): "
                            f"{INSTALL_HINT}") from None
    return highdicom, pydicom


def check_dicom_input(path: str | Path) -> None:
    """Refuse, before any work, an input a SEG cannot be written for, or a missing extra."""
    path = Path(path)
    if not (path.is_dir() or image_suffix(path) == ".dcm"):
        raise DataError("DICOM SEG output needs DICOM input (a series folder or a .dcm file): a SEG must reference "
                        "the study, series and instance UIDs of its source images, which this file does not have",
                        path)
    require_dicom_libraries()


def seg_path(out_dir: Path, stem: str) -> Path:
    return out_dir / f"{stem}{SEG_SUFFIX}"


def model_name(model) -> str:
    """How a SEG names the model: the Hub repository id, or the bundle folder's name, as it was loaded."""
    from .hub import parse_repo_id

    given = getattr(model, "name_or_path", None)
    if not given:
        return f"unsaved {model.config.backbone} model"
    return given if parse_repo_id(given) else Path(given).name


def write_for_input(model, path: Path, image: VolumeImage, labels: np.ndarray, target: Path,
                    probabilities: np.ndarray | None = None) -> dict:
    """:func:`write_dicom_seg` for one segmented input: its source files, the model's classes, colours and codes."""
    config = model.config
    return write_dicom_seg(target, source_datasets(path, image), labels, config.classes, config.colors,
                           model_name=model_name(model), probabilities=probabilities, codes=config.segment_codes)


def segment_codes(name: str, carried: dict | None = None) -> tuple[tuple[str, str, str], tuple[str, str, str]]:
    """(category, type) codes of a class: the bundle's own (``segment_codes`` in config.json), else the SNOMED CT
    concept DICOM's dictionary has for the name (anatomy, or a finding), else generic tissue."""
    if carried and name in carried:
        return tuple(carried[name]["category"]), tuple(carried[name]["type"])
    from pydicom.sr.codedict import codes

    words = [SPELLINGS.get(word, word) for word in name.replace("_", " ").replace("-", " ").lower().split()]
    keyword = "".join(word.capitalize() for word in words)
    try:
        code = getattr(codes.SCT, keyword)
    except (AttributeError, KeyError):
        return GENERIC_CATEGORY, GENERIC_TYPE
    category = ABNORMAL_CATEGORY if keyword in ABNORMAL_KEYWORDS else ANATOMY_CATEGORY
    return category, (code.value, code.scheme_designator, code.meaning)


def source_datasets(path: Path, image: VolumeImage) -> list:
    """The source DICOM headers in the engine's slice order, each matched to its slice by position.

    ``image`` is what :func:`cotexnet.data.read_image` read from ``path``; a file whose position is not
    where the engine put a slice means the two disagree, and no SEG is better than a misplaced one.
    """
    _, pydicom = require_dicom_libraries()
    files = _dicom_series_files(path) if path.is_dir() else [str(path)]
    try:
        datasets = [pydicom.dcmread(file, stop_before_pixels=True) for file in files]
    except Exception as error:  # pydicom raises several types for damaged files
        raise DataError(f"cannot read the DICOM headers for SEG output ({error})", path) from None
    depth = image.shape[0] if image.ndim == 3 else 1
    if len(datasets) != depth:
        raise DataError(f"the series has {len(datasets)} files but {depth} slices were read; DICOM SEG needs one "
                        f"file per slice (multi-frame sources are not supported)", path)
    geometry = image.geometry.ijk_to_lps()
    slice_positions = [geometry[:3, :3] @ [0.0, 0.0, k] + geometry[:3, 3] for k in range(depth)]
    ordered = [None] * depth
    for dataset, file in zip(datasets, files):
        position = np.asarray(getattr(dataset, "ImagePositionPatient", None) or [np.nan] * 3, dtype=float)
        distances = [np.linalg.norm(position - p) for p in slice_positions]
        k = int(np.nanargmin(distances)) if np.isfinite(distances).any() else -1
        if k < 0 or distances[k] > POSITION_TOLERANCE_MM or ordered[k] is not None:
            raise DataError(f"{Path(file).name}: ImagePositionPatient {position.tolist()} matches no slice of the "
                            f"volume read from the series; cannot reference it in a DICOM SEG", path)
        ordered[k] = dataset
    return ordered


def write_dicom_seg(
    target: str | Path,
    source: Sequence,
    labels: np.ndarray,
    classes: Sequence[str],
    colors: Sequence[Sequence[float]],
    *,
    model_name: str,
    probabilities: np.ndarray | None = None,
    codes: dict | None = None,
) -> dict:
    """Write a DICOM SEG for ``labels`` (``(z, y, x)``, slice ``k`` from ``source[k]``) and say what it holds.

    With ``probabilities`` (``(n+1, z, y, x)`` softmax) the SEG is FRACTIONAL (probability, 8 bits), else BINARY.
    Returns ``{"path", "segments": [class names], "empty": [class names left out], "frames"}``.
    """
    import highdicom as hd
    from pydicom.sr.codedict import codes as dicom_codes

    from .config import ENGINE_VERSION
    from .atomic import write_files_atomic

    labels = labels.reshape((len(source), *labels.shape[-2:]))
    present = [i for i in range(1, len(classes) + 1) if (labels == i).any()]
    empty = [classes[i - 1] for i in range(1, len(classes) + 1) if i not in present]
    if not present:
        raise CoTexNetError(f"{target}: no class has any voxel; a DICOM SEG needs at least one segment, so none "
                            f"was written")
    algorithm = hd.AlgorithmIdentificationSequence(name="CoTexNet", family=dicom_codes.cid7162.ArtificialIntelligence,
                                                   version=ENGINE_VERSION, parameters={"model": model_name})
    descriptions = []
    for number, index in enumerate(present, start=1):
        name = classes[index - 1]
        category, kind = segment_codes(name, codes)
        rgb = [round(255 * c) for c in colors[index - 1]]
        descriptions.append(hd.seg.SegmentDescription(
            segment_number=number, segment_label=name[:64],
            segmented_property_category=hd.sr.CodedConcept(*category),
            segmented_property_type=hd.sr.CodedConcept(*kind),
            algorithm_type=hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC, algorithm_identification=algorithm,
            display_color=hd.color.CIELabColor.from_rgb(*rgb)))
    if probabilities is None:
        pixels = np.stack([labels == i for i in present], axis=-1).astype(np.uint8)
        kind = hd.seg.SegmentationTypeValues.BINARY
    else:
        fractions = probabilities[present].reshape((len(present), *labels.shape))
        # Quantised as stored (8 bits), so a frame that stores only zeros is recognised as empty and left out.
        pixels = np.moveaxis(np.round(np.clip(fractions, 0.0, 1.0) * 255.0) / 255.0, 0, -1).astype(np.float32)
        kind = hd.seg.SegmentationTypeValues.FRACTIONAL
    reference = source[0]
    seg = hd.seg.Segmentation(
        source_images=list(source), pixel_array=pixels, segmentation_type=kind, segment_descriptions=descriptions,
        series_instance_uid=hd.UID(), series_number=int(getattr(reference, "SeriesNumber", None) or 0) + 1000,
        sop_instance_uid=hd.UID(), instance_number=1, manufacturer="CoTexNet",
        manufacturer_model_name=model_name[:64], software_versions=ENGINE_VERSION, device_serial_number="n/a",
        content_label="COTEXNET", content_description=f"CoTexNet segmentation ({model_name})"[:64],
        series_description=f"CoTexNet {model_name}"[:64],
    )
    target = Path(target)
    write_files_atomic(target, lambda path: seg.save_as(str(path)))
    if empty:
        logger.info("%s: no voxel of %s; left out of the DICOM SEG", target, ", ".join(empty))
    return {"path": str(target), "segments": [classes[i - 1] for i in present], "empty": empty,
            "frames": int(seg.NumberOfFrames)}
