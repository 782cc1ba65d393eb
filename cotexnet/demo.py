"""The demo on real anatomy: MNI152 T1 with grey/white matter, trained, segmented and described.

nilearn's wheel ships the MNI152 template and its grey- and white-matter probability maps, so the demo
needs no download. Each voxel is labelled grey (1) or white matter (2) where that tissue's probability
exceeds 0.5 and the other's. The axial slices are dealt round-robin into ``cases`` interleaved
sub-volumes (slice ``k`` goes to case ``k mod cases``), written as an nnU-Net v2 raw dataset with a
split file: training, validation and test cases share the anatomy but never a slice.
"""
from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

from .atomic import write_files_atomic, write_json_atomic
from .data import VolumeImage, read_image, read_label_map, save_split, write_image

CLASSES = ["grey matter", "white matter"]
KEYWORDS = ["grey matter", "white matter"]


def mni152_volumes(resolution: int = 2) -> tuple[VolumeImage, VolumeImage]:
    """(T1 image, label map) of the MNI152 template, in the geometry SimpleITK reads from the NIfTI."""
    import tempfile

    from nilearn import datasets

    t1 = datasets.load_mni152_template(resolution=resolution)
    gm = datasets.load_mni152_gm_template(resolution=resolution).get_fdata()
    wm = datasets.load_mni152_wm_template(resolution=resolution).get_fdata()
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "t1.nii.gz"
        t1.to_filename(path)
        image = read_image(path)
    labels = np.zeros(gm.shape, dtype=np.uint8)
    labels[(gm > 0.5) & (gm >= wm)] = 1
    labels[(wm > 0.5) & (wm > gm)] = 2
    labels = np.ascontiguousarray(labels.transpose(2, 1, 0))  # nibabel (i, j, k) -> SimpleITK (k, j, i)
    image.path = None
    return image, VolumeImage(labels, image.spacing, image.origin, image.direction)


def write_mni152_dataset(folder: str | Path, cases: int = 5, resolution: int = 2,
                         relabel: Callable[[VolumeImage, VolumeImage], tuple[np.ndarray, list[str]]] | None = None) -> Path:
    """Write the interleaved MNI152 cases as an nnU-Net v2 raw dataset with ``split.json``.

    Case ``cases-1`` is the test case, case ``cases-2`` the validation case, the rest train. ``relabel(image,
    labels)`` may give other classes on the same anatomy: (label array in the image's shape, class names).
    """
    folder = Path(folder)
    image, labels = mni152_volumes(resolution)
    classes = CLASSES
    if relabel is not None:
        array, classes = relabel(image, labels)
        labels = VolumeImage(array.astype(np.uint8), labels.spacing, labels.origin, labels.direction)
    (folder / "imagesTr").mkdir(parents=True, exist_ok=True)
    (folder / "labelsTr").mkdir(parents=True, exist_ok=True)
    direction = np.reshape(image.direction, (3, 3))
    ids = []
    for k in range(cases):
        case_id = f"mni152_{k:02d}"
        origin = np.asarray(image.origin) + direction[:, 2] * image.spacing[2] * k
        spacing = (image.spacing[0], image.spacing[1], image.spacing[2] * cases)
        grid = VolumeImage(image.array[k::cases], spacing, tuple(origin), image.direction)
        write_image(grid.array.astype(np.float32), grid, folder / "imagesTr" / f"{case_id}_0000.nii.gz")
        write_image(labels.array[k::cases], grid, folder / "labelsTr" / f"{case_id}.nii.gz")
        ids.append(case_id)
    meta = {"channel_names": {"0": "MR"}, "labels": {"background": 0, **{c: i for i, c in enumerate(classes, 1)}},
            "numTraining": cases, "file_ending": ".nii.gz", "name": "MNI152 grey/white matter (nilearn)"}
    write_json_atomic(folder / "dataset.json", meta)
    save_split({"train": ids[:-2], "val": [ids[-2]], "test": [ids[-1]]}, folder / "split.json")
    return folder


def overlay_png(image: np.ndarray, labels: np.ndarray, colors, path: Path) -> Path:
    """A PNG of one slice with the label map blended over it in the class colors."""
    from PIL import Image

    low, high = np.percentile(image, [0.5, 99.5])
    gray = np.clip((image - low) / max(high - low, 1e-6), 0, 1)
    rgb = np.repeat(gray[..., None], 3, axis=2)
    for index, color in enumerate(colors, start=1):
        mask = labels == index
        rgb[mask] = 0.55 * rgb[mask] + 0.45 * np.asarray(color)
    picture = Image.fromarray((rgb[::-1] * 255).astype(np.uint8))  # superior up for an axial LPS slice
    picture = picture.resize((picture.width * 3, picture.height * 3), Image.NEAREST)
    write_files_atomic(path, picture.save)
    return path


def run_demo(out: str | Path = "cotexnet-demo", *, epochs: int = 60, image_size: int = 96, batch_size: int = 4,
             lr: float = 3e-3, max_steps_per_epoch: int | None = None, device: str = "auto",
             show_progress: bool = True, model_path: str | Path | None = None) -> dict:
    """Train (unless ``model_path`` is given), segment the held-out case, describe it; returns a report.

    The defaults suit the random-init ``tiny`` backbone on a CPU: small slices, small batches and a learning
    rate ten times the paper's (which is meant for the pretrained decoder) reach a useful Dice in about a minute.
    """
    from .concepts import describe
    from .infer import segment_file
    from .metrics import segmentation_metrics
    from .model import CoTexNet
    from .train import TrainOptions, train

    out = Path(out)
    started = time.perf_counter()
    data = write_mni152_dataset(out / "data")
    if model_path is None:
        options = TrainOptions(data=str(data), out=str(out / "model"), backbone="tiny", image_size=image_size,
                               epochs=epochs, batch_size=batch_size, lr=lr, patience=epochs, device=device,
                               max_steps_per_epoch=max_steps_per_epoch, show_progress=show_progress,
                               progress_file=str(out / "model" / "progress.jsonl"))
        model_path = train(options)
    model = CoTexNet.from_pretrained(model_path, device="cpu")
    test_image = data / "imagesTr" / "mni152_04_0000.nii.gz"
    truth_path = data / "labelsTr" / "mni152_04.nii.gz"
    result = segment_file(model, test_image, out / "segmentation", device=device)
    image = read_image(test_image)
    labels = read_image(result["labels"]).array
    truth = read_label_map(truth_path, reference=image, num_classes=model.config.num_classes)
    scores = segmentation_metrics(labels, truth, model.config.num_classes, spacing=image.spacing[::-1])
    middle = labels.shape[0] // 2
    overlay = overlay_png(image.array[middle], labels[middle], model.config.colors, out / "segmentation" / "overlay.png")
    concepts = describe(image.array, labels, model.config.classes, model.config.keywords,
                        spacing=image.spacing, direction=image.direction)
    concepts_path = out / "segmentation" / "concepts.json"
    write_json_atomic(concepts_path, concepts)
    return {"model": str(model_path), "labels": result["labels"], "segmentation": result["segmentation"],
            "overlay": str(overlay), "concepts": str(concepts_path), "metrics": scores,
            "prompts": [c["prompt"] for c in concepts], "seconds": round(time.perf_counter() - started, 1)}

