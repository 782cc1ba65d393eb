"""Slice-wise volume inference: exact geometry, bounded memory, progress and cancel.

A volume is cut into 2D slices along the model's axis, normalised with the bundle's intensity
settings, resized to the model size and segmented in batches; the *logits* are resized back to each
slice's size (never nearest-neighbour on labels) and reduced to labels at once, so memory holds one
batch of logits, never a volume's. The label map has exactly the input's shape and is written with
exactly its geometry.
"""
from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Callable, Sequence
from contextlib import nullcontext
from pathlib import Path

import numpy as np
import torch

from .config import DEVICES, EVALUATION_SPLITS, PRECISIONS
from .data import (IntensityNormalization, VolumeImage, image_suffix, read_image, read_label_map, write_image,
                   write_segmentation_nrrd)
from .data.slicing import array_slice_axis, from_slices, resize_slices, to_slices
from .errors import Cancelled, CoTexNetError, DataError

logger = logging.getLogger(__name__)

#: ITU-R BT.601 luma weights, to give an RGB picture to a model trained on grayscale.
LUMA = np.array([0.299, 0.587, 0.114], dtype=np.float32)


def resolve_device(device: str | torch.device = "auto") -> torch.device:
    """``auto`` → the first CUDA GPU when there is one, else the CPU; ``cuda[:N]`` checked to exist."""
    if str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    name = str(device)
    try:
        device = torch.device(device)
    except (RuntimeError, TypeError):
        device = None
    if device is None or device.type not in DEVICES:
        raise CoTexNetError(f"device {name!r}: expected {', '.join(DEVICES)} or cuda:N")
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise CoTexNetError(f"device {device}: CUDA is not available on this machine; use --device cpu or auto")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise CoTexNetError(f"device {device}: only {torch.cuda.device_count()} CUDA device(s) are present")
    return device


def autocast_dtype(device: torch.device, precision: str = "auto") -> torch.dtype | None:
    """The autocast dtype for a precision setting; ``None`` means plain fp32.

    ``auto`` is bf16 on GPUs that support it (fp16 on older ones) and fp32 on the CPU, where reduced
    precision is rarely faster and changes results.
    """
    if precision not in PRECISIONS:
        raise CoTexNetError(f"precision: expected one of {', '.join(PRECISIONS)}, got {precision!r}")
    if precision == "auto":
        if device.type != "cuda":
            return None
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}[precision]


def _is_cancelled(cancel) -> bool:
    if cancel is None:
        return False
    if isinstance(cancel, threading.Event):
        return cancel.is_set()
    return bool(cancel())


def _check_volume(array: np.ndarray, rgb: bool) -> None:
    spatial = array.ndim - (1 if rgb else 0)
    if array.size == 0:
        raise DataError(f"the image is empty (shape {array.shape})")
    if spatial == 4 or (spatial == 3 and rgb):
        raise DataError(f"4D images are not supported (shape {array.shape}); extract one 3D volume first")
    if spatial not in (2, 3):
        raise DataError(f"expected a 2D or 3D image, got shape {array.shape}")
    if np.issubdtype(array.dtype, np.floating) and not np.isfinite(array).all():
        raise DataError(f"the image holds {int(np.size(array) - np.isfinite(array).sum())} NaN or infinite voxel(s)")


def segment_volume(
    model,
    volume: np.ndarray | VolumeImage,
    *,
    direction: Sequence[float] | None = None,
    axis: str | int | None = None,
    rgb: bool | None = None,
    batch_size: int = 16,
    device: str | torch.device = "auto",
    precision: str = "auto",
    progress: Callable[[int, int], None] | None = None,
    cancel: Callable[[], bool] | threading.Event | None = None,
) -> np.ndarray:
    """Segment a 2D image or 3D volume; returns a ``uint8`` label map of the same spatial shape.

    ``volume`` is a :class:`~cotexnet.data.VolumeImage` or an array in SimpleITK order (3D ``(z, y, x)``,
    2D ``(y, x)`` or ``(y, x, 3)`` RGB). ``axis`` is a view name (default: the model's ``slice_axis``,
    matched to the volume's ``direction``) or an array axis. ``progress(done, total)`` is called after
    each batch; ``cancel`` (a callable or :class:`threading.Event`) is checked between batches and
    raises :class:`~cotexnet.errors.Cancelled`. The model is moved to ``device`` and put in eval mode.
    """
    if isinstance(volume, VolumeImage):
        direction = volume.direction if direction is None else direction
        rgb = volume.is_rgb if rgb is None else rgb
        volume = volume.array
    array = np.asarray(volume)
    config = model.config
    normalization = IntensityNormalization.from_dict(config.intensity)
    if rgb is None:  # the documented array layouts: (y, x, 3) is a picture, whatever the model was trained on
        rgb = array.ndim == 3 and array.shape[-1] == 3
    _check_volume(array, rgb)
    if batch_size < 1:
        raise CoTexNetError(f"batch_size: expected a positive integer, got {batch_size}")
    if rgb and normalization.mode != "rgb":  # a photo for a grayscale model: its luminance
        array, rgb = array.astype(np.float32) @ LUMA, False

    view = axis if isinstance(axis, int) else (axis or config.slice_axis)
    slice_axis = array_slice_axis(array.ndim - (1 if rgb else 0), direction, view)
    slices = to_slices(array, slice_axis)

    device = resolve_device(device)
    dtype = autocast_dtype(device, precision)
    model.to(device).eval()
    low, high = normalization.bounds(array)
    scale = 1.0 / (high - low) if high > low else 0.0
    height, width = slices.shape[1:3]
    labels = np.empty(slices.shape[:3], dtype=np.uint8)
    total = len(slices)
    autocast = torch.autocast(device.type, dtype=dtype) if dtype is not None else nullcontext()
    with torch.inference_mode():
        for start in range(0, total, batch_size):
            if _is_cancelled(cancel):
                raise Cancelled("segmentation cancelled")
            chunk = torch.from_numpy(np.ascontiguousarray(slices[start : start + batch_size])).to(device)
            chunk = ((chunk.float() - low) * scale).clamp_(0.0, 1.0) if scale else torch.zeros_like(chunk, dtype=torch.float32)
            chunk = chunk.permute(0, 3, 1, 2) if rgb else chunk.unsqueeze(1)
            images = resize_slices(chunk, config.image_size)
            with autocast:
                logits = model(images)
            logits = resize_slices(logits.float(), (height, width))
            labels[start : start + len(chunk)] = logits.argmax(dim=1).to(torch.uint8).cpu().numpy()
            if progress is not None:
                progress(min(start + batch_size, total), total)
    return from_slices(labels, slice_axis)


def _input_stem(path: Path) -> str:
    suffix = image_suffix(path) if path.is_file() else ""
    return path.name[: len(path.name) - len(suffix)] if suffix else path.name


def output_stems(paths: Sequence[str | Path]) -> list[str]:
    """One output name per input that tells it apart from the others: its name without the suffix, or,
    where inputs share that, their path below the folder they have in common (``a/scan.nii.gz`` and
    ``b/scan.nii.gz`` -> ``a_scan``, ``b_scan``), then also their suffix (``scan_nii``, ``scan_nii-gz``).
    Names are compared case-insensitively, as some file systems do. The same file given twice keeps
    one name (the caller refuses the second)."""
    paths = [Path(p) for p in paths]
    stems = [_input_stem(p) for p in paths]

    def clashing(names: list[str]) -> list[int]:
        seen: dict[str, list[int]] = {}
        for i, name in enumerate(names):
            seen.setdefault(name.casefold(), []).append(i)
        return [i for group in seen.values() if len({paths[j].resolve() for j in group}) > 1 for i in group]

    clash = clashing(stems)
    if clash:
        resolved = {i: paths[i].resolve() for i in clash}
        common = Path(os.path.commonpath([resolved[i].parent for i in clash]))
        for i in clash:
            stems[i] = "_".join((*resolved[i].parent.relative_to(common).parts, stems[i]))
    for i in clashing(stems):
        suffix = image_suffix(paths[i]) if paths[i].is_file() else ""
        stems[i] = f"{stems[i]}_{suffix[1:].replace('.', '-')}" if suffix else f"{stems[i]}_folder"
    return stems


def output_paths(input_path: Path, out_dir: Path, stem: str | None = None) -> tuple[Path, Path]:
    """Where a label map and a ``.seg.nrrd`` for ``input_path`` go: its stem (or ``stem``), format kept where
    possible."""
    suffix = image_suffix(input_path) if input_path.is_file() else ""
    stem = stem or _input_stem(input_path)
    label_suffix = {".nii": ".nii.gz", ".nii.gz": ".nii.gz", ".mha": ".mha", ".png": ".png", ".bmp": ".png",
                    ".jpg": ".png", ".jpeg": ".png", ".tif": ".tif", ".tiff": ".tif"}.get(suffix, ".nrrd")
    return out_dir / f"{stem}_labels{label_suffix}", out_dir / f"{stem}.seg.nrrd"


def segment_file(
    model,
    path: str | Path,
    out_dir: str | Path,
    *,
    seg_nrrd: bool = True,
    reference: str | Path | None = None,
    stem: str | None = None,
    overwrite: bool = False,
    **options,
) -> dict:
    """Segment one image file; write its label map (input geometry) and optionally a ``.seg.nrrd``.

    With ``reference`` (a ground-truth label map of the same image) the Dice of each class is
    reported too. Outputs are named after ``stem`` (default: the input's name) and an existing one is
    refused unless ``overwrite``. ``options`` go to :func:`segment_volume`. Returns what was written
    and measured.
    """
    from .metrics import segmentation_metrics

    path, out_dir = Path(path), Path(out_dir)
    started = time.perf_counter()
    label_path, seg_path = output_paths(path, out_dir, stem)
    check_output_folder(out_dir)
    for output in (label_path, seg_path) if seg_nrrd else (label_path,):
        if output.exists() and not overwrite:
            raise DataError(f"exists already (from an earlier run?); pass --overwrite (overwrite=True) to replace "
                            f"it, or choose another output folder", output)
    image = read_image(path)
    truth = None
    if reference is not None:
        truth = read_label_map(reference, reference=image, num_classes=model.config.num_classes)
    labels = segment_volume(model, image, **options)
    write_image(labels, image, label_path)
    result = {"input": str(path), "labels": str(label_path), "shape": list(labels.shape),
              "voxels": {name: int((labels == i).sum()) for i, name in enumerate(model.config.classes, start=1)}}
    if seg_nrrd:
        write_segmentation_nrrd(labels, image, seg_path, model.config.classes, model.config.colors)
        result["segmentation"] = str(seg_path)
    if truth is not None:
        scores = segmentation_metrics(labels, truth, model.config.num_classes, spacing=image.spacing[::-1])
        result["dice"] = {name: scores["per_class"][i]["dice"] for i, name in enumerate(model.config.classes)}
    result["seconds"] = round(time.perf_counter() - started, 3)
    return result


def segment_files(
    model,
    paths: Sequence[str | Path],
    out_dir: str | Path,
    *,
    references: Sequence[str | Path | None] | None = None,
    show_progress: bool = True,
    **options,
) -> list[dict]:
    """Segment many files; a file that fails is reported (``{"input", "error"}``) and the batch goes on.

    Each input's outputs get a name no other input's have (:func:`output_stems`); a file given again
    after it was segmented is not segmented twice. Cancellation (``options["cancel"]``) stops the whole batch.
    """
    from tqdm.auto import tqdm

    references = list(references) if references is not None else [None] * len(paths)
    if len(references) != len(paths):
        raise CoTexNetError(f"{len(references)} reference label maps given for {len(paths)} inputs")
    check_output_folder(Path(out_dir))
    results, segmented = [], {}
    inputs = list(enumerate(zip(paths, references, output_stems(paths))))
    for i, (path, reference, stem) in tqdm(inputs, desc="segmenting", unit="image", disable=not show_progress):
        try:
            earlier = segmented.get(Path(path).resolve())
            if earlier is not None:
                raise DataError(f"given twice (also as input {earlier + 1}, {paths[earlier]}); segmented once", path)
            results.append(segment_file(model, path, out_dir, reference=reference, stem=stem, **options))
            segmented[Path(path).resolve()] = i
        except Cancelled:
            raise
        except (CoTexNetError, OSError, RuntimeError, ValueError) as error:
            message = str(error) if str(path) in str(error) else f"{path}: {error}"
            logger.debug("skipped %s", message)  # the caller reports it: the CLI prints it, Slicer shows it
            results.append({"input": str(path), "error": message})
    return results


def check_output_folder(out_dir: Path) -> None:
    """An output folder that is a file is refused before any work, not after the first inference."""
    if out_dir.exists() and not out_dir.is_dir():
        raise CoTexNetError(f"{out_dir}: the output is a file; --out takes a folder")


def evaluate(
    model_path: str | Path,
    data: str | Path,
    *,
    split: str = "test",
    show_progress: bool = True,
    **options,
) -> dict:
    """Segment a labelled dataset's cases and score them with the paper's four metrics.

    ``split`` is ``test``, ``val``, ``train`` or ``all``. The split saved in the bundle is used when the
    bundle was trained on this dataset; otherwise the dataset's split file, else the seeded 8:1:1 split.
    Returns per-case rows, per-class and mean metrics (Dice/IoU/accuracy as fractions, HD95 in mm)
    and a paper-style table.
    """
    from tqdm.auto import tqdm

    from .bundle import read_training_info
    from .data import load_dataset, split_cases
    from .metrics import aggregate, format_table, segmentation_metrics
    from .model import CoTexNet

    if split not in EVALUATION_SPLITS:
        raise CoTexNetError(f"split: expected one of {', '.join(EVALUATION_SPLITS)}, got {split!r}")
    model = CoTexNet.from_pretrained(model_path)
    config = model.config
    # A dataset.json names its classes; an images/ + masks/ folder takes the model's.
    index = load_dataset(data, None if (Path(data) / "dataset.json").is_file() else config.classes)
    if len(index.classes) != config.num_classes:
        raise DataError(f"the dataset has {len(index.classes)} classes {index.classes} but the model has "
                        f"{config.num_classes} {config.classes}", index.root)
    if [c.casefold() for c in index.classes] != [c.casefold() for c in config.classes]:
        logger.warning("dataset classes %s are matched by position to the model's %s", index.classes, config.classes)
    info = read_training_info(model_path)
    if split == "all":
        case_ids = [case.case_id for case in index.cases]
    else:
        same_data = info.get("data") == str(Path(data).resolve()) and "split" in info
        case_ids = (info["split"] if same_data else split_cases(index)).get(split, [])
    if not case_ids:
        raise DataError(f"the '{split}' split of this dataset holds no case", index.root)
    rows = []
    for case_id in tqdm(case_ids, desc=f"evaluating {split}", unit="case", disable=not show_progress):
        case = index.case(case_id)
        image = read_image(case.image_path)
        truth = read_label_map(case.label_path, reference=image, classes=index.classes)
        labels = segment_volume(model, image, **options)
        scores = segmentation_metrics(labels, truth, config.num_classes, spacing=image.spacing[::-1])
        rows.append({"case": case_id, **scores})
    summary = aggregate(rows)
    return {"model": str(model_path), "data": str(index.root), "split": split, "classes": config.classes,
            "per_class": summary["per_class"], "mean": summary["mean"], "cases": rows,
            "table": format_table(summary, config.classes)}
