"""Slice-wise volume inference: exact geometry, bounded memory, progress and cancel.

A volume goes to the device once, is cut there into 2D slices along the model's axis, normalised with
the bundle's intensity settings, resized to the model size and segmented in batches; the *logits* are
resized back to each slice's size (never nearest-neighbour on labels). With one pass they are reduced
to labels at once, so memory holds one batch of logits, never a volume's; several passes (planes,
test-time flips) or a request for probabilities average softmax probabilities in one ``(n+1, *spatial)``
volume first. The label map has exactly the input's shape and is written with exactly its geometry;
the bundle's 3D post-processing (:mod:`cotexnet.postprocess`) follows unless switched off.
"""
from __future__ import annotations

import itertools
import logging
import os
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from .config import COMPILE_MODES, DEVICES, EVALUATION_SPLITS, PRECISIONS, PROBABILITY_FORMATS, validate_planes
from .data import (IntensityNormalization, VolumeImage, image_suffix, read_image, read_label_map, write_image,
                   write_segmentation_nrrd)
from .data.laterality import flip_rule, swap_channels
from .data.normalization import LUMA
from .data.slicing import array_slice_axis, resize_slices
from .errors import Cancelled, CoTexNetError, DataError

logger = logging.getLogger(__name__)


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
    if not (np.issubdtype(array.dtype, np.integer) or np.issubdtype(array.dtype, np.floating) or array.dtype == bool):
        raise DataError(f"the image holds {array.dtype} voxels (e.g. complex-valued); expected real numbers")
    if spatial == 4 or (spatial == 3 and rgb):
        raise DataError(f"4D images are not supported (shape {array.shape}); extract one 3D volume first")
    if spatial not in (2, 3):
        raise DataError(f"expected a 2D or 3D image, got shape {array.shape}")
    if np.issubdtype(array.dtype, np.floating) and not np.isfinite(array).all():
        raise DataError(f"the image holds {int(np.size(array) - np.isfinite(array).sum())} NaN or infinite voxel(s)")


@dataclass
class VolumePrediction:
    """What :func:`predict_volume` returns: the label map and, when asked, the class probabilities.

    ``probabilities`` is ``float32`` ``(n+1, *spatial)`` (channel 0 = background), the average over
    every plane and test-time view; ``labels`` is its arg-max, post-processed when the bundle says so.
    """

    labels: np.ndarray
    probabilities: np.ndarray | None = None

    @property
    def confidence(self) -> np.ndarray | None:
        """Per voxel, the probability of the most likely class (``None`` without probabilities)."""
        return None if self.probabilities is None else self.probabilities.max(axis=0)


@dataclass(frozen=True)
class AugmentedView:
    """One test-time pass: slice axes flipped (0 = rows, 1 = columns) on the way in and back on the way
    out, and the class pairs whose output channels the flip swaps (left/right partners)."""

    flip_dims: tuple[int, ...] = ()
    swapped_pairs: tuple[tuple[int, int], ...] = ()


def resolve_planes(config, planes: str | Sequence[str] | None = None, axis: str | int | None = None) -> list:
    """The views to average: ``planes`` if given, else ``axis``, else the bundle's ``planes``, else its ``slice_axis``."""
    if planes is not None and axis is not None:
        raise CoTexNetError("give either planes or axis, not both")
    if planes is not None:
        return validate_planes(planes)
    if axis is not None:
        return [axis]
    return list(config.planes or [config.slice_axis])


def predict_volume(
    model,
    volume: np.ndarray | VolumeImage,
    *,
    direction: Sequence[float] | None = None,
    spacing: Sequence[float] | None = None,
    axis: str | int | None = None,
    planes: str | Sequence[str] | None = None,
    tta: bool = False,
    postprocess: bool = True,
    probabilities: bool = False,
    rgb: bool | None = None,
    batch_size: int | None = None,
    device: str | torch.device = "auto",
    precision: str = "auto",
    compile: str | None = None,
    progress: Callable[[int, int], None] | None = None,
    cancel: Callable[[], bool] | threading.Event | None = None,
    timings: dict[str, float] | None = None,
) -> VolumePrediction:
    """Segment a 2D image or 3D volume: labels of the same spatial shape, and probabilities if asked.

    ``volume`` is a :class:`~cotexnet.data.VolumeImage` or an array in SimpleITK order (3D ``(z, y, x)``,
    2D ``(y, x)`` or ``(y, x, 3)`` RGB); ``spacing`` (x, y, z mm) sizes post-processing islands. One pass
    per view in ``planes`` (see :func:`resolve_planes`; ``axis`` may also be an array axis) and, with
    ``tta``, per flip that laterality allows; their softmax probabilities are averaged on the input grid
    before the arg-max. ``postprocess`` applies the bundle's stored 3D post-processing. ``compile``
    (``default``, ``reduce-overhead`` = CUDA graphs, ``max-autotune``) runs the model through
    ``torch.compile``. ``progress(done, total)`` is called after each batch; ``cancel`` (a callable or
    :class:`threading.Event`) is checked between batches and raises :class:`~cotexnet.errors.Cancelled`.
    ``batch_size`` ``None``: from the free GPU memory on a GPU (:func:`auto_batch_size`), else
    :data:`CPU_BATCH_SIZE`. ``timings`` (a dict) receives the seconds of each phase (:data:`VOLUME_PHASES`),
    measured with a device synchronisation at each phase's end, which the normal run (``None``) never waits for.
    """
    if isinstance(volume, VolumeImage):
        direction = volume.direction if direction is None else direction
        spacing = volume.spacing if spacing is None else spacing
        rgb = volume.is_rgb if rgb is None else rgb
        volume = volume.array
    array = np.asarray(volume)
    config = model.config
    normalization = IntensityNormalization.from_dict(config.intensity)
    if rgb is None:  # the documented array layouts: (y, x, 3) is a picture, whatever the model was trained on
        rgb = array.ndim == 3 and array.shape[-1] == 3
    _check_volume(array, rgb)
    if batch_size is not None and batch_size < 1:
        raise CoTexNetError(f"batch_size: expected a positive integer, got {batch_size}")
    if compile is not None and compile not in COMPILE_MODES:
        raise CoTexNetError(f"compile: expected one of {', '.join(COMPILE_MODES)}, got {compile!r}")
    if rgb and not config.color_input:  # a photo for a model trained on grayscale: its luminance, as in training
        array, rgb = array.astype(np.float32) @ LUMA, False
    spatial_ndim = array.ndim - (1 if rgb else 0)
    views = resolve_planes(config, planes, axis)
    slice_axes = [array_slice_axis(spatial_ndim, direction, view) for view in views]
    if spatial_ndim == 2:
        slice_axes = slice_axes[:1]  # a 2D image has one plane

    device = resolve_device(device)
    clock = PhaseClock(device, timings)
    runner = _Runner(model, device, precision, batch_size, compile, clock)
    passes = [(slice_axis, augmented) for slice_axis in slice_axes
              for augmented in augmented_views(config.classes, slice_axis, direction, tta)]
    spatial = tuple(array.shape[:spatial_ndim])
    total = sum(1 if a is None else spatial[a] for a, _ in passes)
    done = 0

    def step(count: int) -> None:
        nonlocal done
        done += count
        if progress is not None:
            progress(done, total)

    with torch.inference_mode():
        # The volume goes to the device once (on a GPU: pinned pieces, copied on a side stream while earlier
        # slices compute) and is normalised there; on the CPU it is the array itself, not a copy.
        voxels = DeviceVolume(array, device, clock)
        # Bounds that depend on the voxels are computed where the voxels are: the whole volume first goes up.
        on_device = device.type == "cuda" and normalization.mode in ("percentile", "minmax")
        whole = voxels.tensor(everything=True) if on_device else None
        with clock("normalise"):
            low, high = device_bounds(normalization, whole) if on_device else normalization.bounds(array)
        if len(passes) == 1 and not probabilities:  # one pass: labels batch by batch, no probability volume
            slice_axis, augmented = passes[0]
            labels = torch.empty(spatial, dtype=torch.uint8, device=device)
            target = _slice_view(labels, slice_axis)
            for start, logits in runner.logits(voxels, slice_axis, rgb, low, high, augmented, cancel):
                with clock("argmax"):
                    target[start : start + len(logits)] = logits.argmax(dim=1).to(torch.uint8)
                step(len(logits))
            probs = None
        else:
            probs = torch.zeros((config.num_classes + 1, *spatial), dtype=torch.float32, device=device)
            for slice_axis, augmented in passes:
                target = _slice_view(probs, slice_axis, channels=True)
                for start, logits in runner.logits(voxels, slice_axis, rgb, low, high, augmented, cancel):
                    with clock("argmax"):
                        target[:, start : start + len(logits)] += logits.softmax(dim=1).transpose(0, 1)
                    step(len(logits))
            with clock("argmax"):
                probs /= len(passes)
                labels = probs.argmax(dim=0).to(torch.uint8)
        with clock("download"):
            labels = download(labels)
    if postprocess and config.postprocessing:
        from .postprocess import apply_postprocessing

        labels = apply_postprocessing(labels, config.postprocessing, config.classes, spacing)
    return VolumePrediction(labels, None if probs is None else probs.cpu().numpy())


def segment_volume(model, volume: np.ndarray | VolumeImage, **options) -> np.ndarray:
    """Segment a 2D image or 3D volume; returns a ``uint8`` label map of the same spatial shape.

    The options are those of :func:`predict_volume` (``probabilities`` aside).
    """
    return predict_volume(model, volume, **options).labels


def augmented_views(classes: Sequence[str], slice_axis: int | None, direction, tta: bool) -> list[AugmentedView]:
    """The passes along one plane: the identity and, with ``tta``, each combination of the flips that
    :func:`cotexnet.data.laterality.flip_rule` allows (the training augmentation's rule: only the
    left-right axis, with lateral pairs swapped, and none when a lateral class has no partner)."""
    views = [AugmentedView()]
    if tta:
        rule = flip_rule(slice_axis, direction, list(classes))
        for count in range(1, len(rule.axes) + 1):
            for dims in itertools.combinations(rule.axes, count):
                views.append(AugmentedView(dims, tuple(rule.pairs_for(dims))))
    return views


def _slice_view(volume: torch.Tensor, slice_axis: int | None, channels: bool = False) -> torch.Tensor:
    """A view of ``volume`` (``(C, *spatial)`` with ``channels``) with the slices first (after the channels)."""
    offset = 1 if channels else 0
    if slice_axis is None:
        return volume.unsqueeze(offset)
    return volume.movedim(slice_axis + offset, offset)


#: Phases of a volume's segmentation that ``predict_volume(timings=...)`` reports (``bench --volume`` adds the
#: file's read and write).
VOLUME_PHASES = ("upload", "normalise", "resize", "model", "resize_back", "argmax", "download")
#: Slices per batch on the CPU when none is given (more gains nothing there and holds more memory).
CPU_BATCH_SIZE = 16
#: The most slices per batch chosen from free GPU memory: beyond it a GPU gains no throughput.
MAX_AUTO_BATCH_SIZE = 256
#: Slices the upload copies at a time; compute on earlier slices runs while the next piece travels.
UPLOAD_PIECE_SLICES = 32


class PhaseClock:
    """Seconds per phase, measured only when a ``timings`` dict is given: then each phase ends with a device
    synchronisation, so a phase holds its own GPU work; without it, phases cost nothing and never wait."""

    def __init__(self, device: torch.device, timings: dict[str, float] | None):
        self.device, self.timings = device, timings

    @contextmanager
    def __call__(self, phase: str):
        if self.timings is None:
            yield
            return
        started = time.perf_counter()
        yield
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        self.timings[phase] = self.timings.get(phase, 0.0) + time.perf_counter() - started


def auto_batch_size(free_bytes: int, slice_bytes: int, share: float = 0.5, cap: int = MAX_AUTO_BATCH_SIZE) -> int:
    """Slices per batch that fill ``share`` of ``free_bytes`` at ``slice_bytes`` each, at least 1, at most ``cap``."""
    return max(1, min(cap, int(free_bytes * share // max(slice_bytes, 1))))


def slice_memory_bytes(model, element_bytes: int, output_pixels: int) -> int:
    """Peak device memory one slice of a batch needs in inference, from the architecture: one encoder layer's
    working set (queries/keys/values/attention output and the MLP's hidden layer), the decoder's kept inputs,
    the logits at the model size and at the slice's own size (float32), and the input at the model size."""
    vision = model.vision.config
    size = model.config.image_size
    tokens = (size // vision.patch_size) ** 2 + 1
    layer = tokens * (5 * vision.hidden_size + vision.intermediate_size) * element_bytes
    kept = len(model.extract_layers) * tokens * vision.hidden_size * element_bytes
    channels = model.config.num_classes + 1
    logits = channels * (size * size + output_pixels) * 4
    return layer + kept + logits + 3 * size * size * 4


def inference_batch_size(model, device: torch.device, dtype: torch.dtype | None, output_pixels: int,
                         batch_size: int | None = None) -> int:
    """``batch_size`` when given, else :data:`CPU_BATCH_SIZE` on the CPU, else :func:`auto_batch_size` of the
    GPU's free memory for slices of ``output_pixels`` pixels."""
    if batch_size is not None:
        return batch_size
    if device.type != "cuda":
        return CPU_BATCH_SIZE
    free, _ = torch.cuda.mem_get_info(device)
    return auto_batch_size(free, slice_memory_bytes(model, 4 if dtype is None else 2, output_pixels))


class DeviceVolume:
    """A volume on the compute device. On a GPU it is copied in pieces of :data:`UPLOAD_PIECE_SLICES` along its
    first axis through two reused pinned buffers on a side stream, each piece only when a batch needs it, so the
    copy of the next piece overlaps the compute on the last; on the CPU it is the array itself."""

    def __init__(self, array: np.ndarray, device: torch.device, clock: PhaseClock):
        self.clock = clock
        self.source = torch.from_numpy(np.ascontiguousarray(array))
        self.cuda = device.type == "cuda"
        if not self.cuda:
            self.voxels = self.source
            return
        self.voxels = torch.empty(self.source.shape, dtype=self.source.dtype, device=device)
        piece = (min(UPLOAD_PIECE_SLICES, len(self.source)), *self.source.shape[1:])
        self.staging = [torch.empty(piece, dtype=self.source.dtype, pin_memory=True) for _ in range(2)]
        self.staged_events: list = [None, None]
        self.stream = torch.cuda.Stream(device)
        self.copied = 0  # slices along the first axis on their way to (or on) the device
        self.arrived = torch.cuda.Event()

    def tensor(self, upto: int | None = None, everything: bool = False) -> torch.Tensor:
        """The device volume, with its first ``upto`` slices along axis 0 (all with ``everything``) ready for the
        current stream."""
        if not self.cuda:
            return self.voxels
        needed = len(self.source) if everything or upto is None else min(upto, len(self.source))
        with self.clock("upload"):
            while self.copied < needed:
                self._copy_piece()
            torch.cuda.current_stream(self.voxels.device).wait_event(self.arrived)
        return self.voxels

    def _copy_piece(self) -> None:
        index = (self.copied // UPLOAD_PIECE_SLICES) % 2
        buffer, busy = self.staging[index], self.staged_events[index]
        if busy is not None:
            busy.synchronize()  # the side stream is done reading this buffer
        end = min(self.copied + len(buffer), len(self.source))
        count = end - self.copied
        buffer[:count].copy_(self.source[self.copied:end])
        with torch.cuda.stream(self.stream):
            self.voxels[self.copied:end].copy_(buffer[:count], non_blocking=True)
            event = torch.cuda.Event()
            event.record(self.stream)
        self.staged_events[index], self.arrived, self.copied = event, event, end


def device_bounds(normalization: IntensityNormalization, voxels: torch.Tensor) -> tuple[float, float]:
    """:meth:`IntensityNormalization.bounds` computed on the tensor's device: numpy's linear-interpolation
    percentiles from two order statistics each (``kthvalue``, which has no input-size limit, unlike
    ``torch.quantile``'s 2**24 elements), or the minimum and maximum."""
    if normalization.mode in ("ct", "rgb"):
        return normalization.bounds(np.zeros(1))
    values = voxels.reshape(-1)
    if normalization.mode == "minmax":
        return float(values.min()), float(values.max())
    if not values.dtype.is_floating_point:
        values = values.float()  # kthvalue needs a type it sorts on every device; ints below 2**24 stay exact
    count = values.numel()
    bounds = []
    for percent in (normalization.lower, normalization.upper):
        position = percent / 100.0 * (count - 1)
        below = int(position)
        fraction = position - below
        low = float(values.kthvalue(below + 1).values)
        high = float(values.kthvalue(min(below + 2, count)).values) if fraction > 0 else low
        bounds.append(low + (high - low) * fraction)
    return bounds[0], bounds[1]


def download(labels: torch.Tensor) -> np.ndarray:
    """A device label volume to numpy: one copy, into pinned memory on a GPU (a pageable target would take a
    staging copy more)."""
    if labels.device.type != "cuda":
        return labels.numpy()
    host = torch.empty(labels.shape, dtype=labels.dtype, pin_memory=True)
    host.copy_(labels)
    return host.numpy()


class _Runner:
    """Batches of slices through the model on one device: normalisation and resizing on the device,
    reduced precision by autocast, an optional compiled model with fixed batch shapes."""

    def __init__(self, model, device: torch.device, precision: str, batch_size: int | None, compile: str | None,
                 clock: PhaseClock | None = None):
        self.device, self.batch_size = device, batch_size
        self.dtype = autocast_dtype(device, precision)
        self.image_size = model.config.image_size
        self.model = model
        self.clock = clock or PhaseClock(device, None)
        model.place(device).eval()
        self.forward = _compiled(model, compile) if compile else model
        self.pad = compile is not None  # compiled graphs (and CUDA graphs) want one batch shape

    def logits(self, volume: DeviceVolume, slice_axis, rgb: bool, low: float, high: float, augmented: AugmentedView,
               cancel) -> Iterator[tuple[int, torch.Tensor]]:
        """(first slice index, float32 logits ``(B, n+1, H, W)`` at the slices' own size) per batch."""
        clock = self.clock
        slices = _slice_view(volume.voxels, slice_axis)
        scale = 1.0 / (high - low) if high > low else 0.0
        height, width = slices.shape[1:3]
        batch_size = inference_batch_size(self.model, self.device, self.dtype, height * width, self.batch_size)
        autocast = torch.autocast(self.device.type, dtype=self.dtype) if self.dtype is not None else nullcontext()
        flip = tuple(d + 2 for d in augmented.flip_dims)  # slice dims (H=0, W=1) -> batch dims
        for start in range(0, len(slices), batch_size):
            if _is_cancelled(cancel):
                raise Cancelled("segmentation cancelled")
            end = min(start + batch_size, len(slices))
            volume.tensor(upto=end if slice_axis == 0 else None, everything=slice_axis not in (0, None))
            chunk = slices[start:end]
            count = len(chunk)
            with clock("normalise"):
                chunk = (((chunk.float() - low) * scale).clamp_(0.0, 1.0) if scale
                         else torch.zeros(chunk.shape, device=chunk.device))
                chunk = chunk.permute(0, 3, 1, 2) if rgb else chunk.unsqueeze(1)
            with clock("resize"):
                if flip:
                    chunk = chunk.flip(flip)
                images = resize_slices(chunk, self.image_size)
                if self.pad and count < batch_size:
                    images = torch.cat([images, images.new_zeros((batch_size - count, *images.shape[1:]))])
            with clock("model"), autocast:
                logits = self.forward(images)[:count]
            with clock("resize_back"):
                logits = resize_slices(logits.float(), (height, width))
                if flip:
                    logits = logits.flip(flip)
                if augmented.swapped_pairs:
                    logits = swap_channels(logits, augmented.swapped_pairs, axis=1)
            yield start, logits


def _compiled(model, mode: str):
    """``torch.compile(model, mode=...)``, built once per model and mode and kept on the model."""
    cache = model.__dict__.setdefault("_cotexnet_compiled", {})
    if mode not in cache:
        cache[mode] = torch.compile(model, mode=mode)
    return cache[mode]


def _resolved(path: Path) -> Path:
    """``path`` with its symbolic links followed; a loop or a dangling link stays as given, so that only that
    input fails, when it is read, not the naming of a whole batch."""
    try:
        return path.resolve()
    except (OSError, RuntimeError):
        return path.absolute()


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
        return [i for group in seen.values() if len({_resolved(paths[j]) for j in group}) > 1 for i in group]

    clash = clashing(stems)
    if clash:
        resolved = {i: _resolved(paths[i]) for i in clash}
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


def probability_paths(input_path: Path, out_dir: Path, classes: Sequence[str], stem: str | None = None) -> list[Path]:
    """Where ``segment --probabilities`` writes each class's map: ``<stem>_prob_<class>`` beside the labels."""
    label_path, _ = output_paths(input_path, out_dir, stem)
    stem, suffix = label_path.name.split("_labels", 1)
    safe = ["".join(ch if ch.isalnum() else "_" for ch in name) for name in classes]
    return [out_dir / f"{stem}_prob_{name}{suffix}" for name in safe]


def probability_image(probabilities: np.ndarray, kind: str) -> np.ndarray:
    """One probability map as stored: ``uint8`` 0..255 (rounded) or ``float32`` in 0..1."""
    if kind not in PROBABILITY_FORMATS:
        raise CoTexNetError(f"probabilities: expected one of {', '.join(PROBABILITY_FORMATS)}, got {kind!r}")
    if kind == "uint8":
        return np.rint(np.clip(probabilities, 0.0, 1.0) * 255.0).astype(np.uint8)
    return probabilities.astype(np.float32, copy=False)


def segment_file(
    model,
    path: str | Path,
    out_dir: str | Path,
    *,
    seg_nrrd: bool = True,
    reference: str | Path | None = None,
    probabilities: str | None = None,
    stem: str | None = None,
    overwrite: bool = False,
    confidence: bool = False,
    dicom_seg: bool = False,
    **options,
) -> dict:
    """Segment one image file; write its label map (input geometry) and optionally a ``.seg.nrrd``.

    ``dicom_seg`` also writes ``<stem>_seg.dcm``, a DICOM Segmentation referencing a DICOM input
    (:mod:`cotexnet.dicom_seg`; FRACTIONAL with ``probabilities``, else BINARY).
    With ``reference`` (a ground-truth label map of the same image) the Dice of each class is
    reported too. ``probabilities`` (``uint8`` or ``float32``) also writes each class's probability
    map on the input's geometry; with it, or with ``confidence``, each class's mean confidence is reported.
    Outputs are named after ``stem`` (default: the input's name) and an
    existing one is refused unless ``overwrite``. ``options`` go to :func:`predict_volume`. Returns what
    was written and measured.
    """
    from .metrics import segmentation_metrics

    path, out_dir = Path(path), Path(out_dir)
    started = time.perf_counter()
    if probabilities is not None:
        probability_image(np.zeros(1, np.float32), probabilities)  # a wrong format fails before the work
    label_path, seg_path = output_paths(path, out_dir, stem)
    probability_targets = [] if probabilities is None else probability_paths(path, out_dir, model.config.classes, stem)
    check_output_folder(out_dir)
    dicom_targets = []
    if dicom_seg:
        from . import dicom_seg as seg

        seg.check_dicom_input(path)  # a non-DICOM input or a missing extra fails before the work
        dicom_targets.append(seg.seg_path(out_dir, stem or _input_stem(path)))
    for output in [label_path, *([seg_path] if seg_nrrd else []), *probability_targets, *dicom_targets]:
        if output.exists() and not overwrite:
            raise DataError("exists already (from an earlier run?); pass --overwrite (overwrite=True) to replace "
                            "it, or choose another output folder", output)
    image = read_image(path)
    truth = None
    if reference is not None:
        truth = read_label_map(reference, reference=image, num_classes=model.config.num_classes)
    prediction = predict_volume(model, image, probabilities=probabilities is not None or confidence, **options)
    labels = prediction.labels
    result = {"input": str(path), "labels": str(label_path), "shape": list(labels.shape), "spacing": list(image.spacing),
              "voxels": {name: int((labels == i).sum()) for i, name in enumerate(model.config.classes, start=1)}}
    written = []
    try:  # one input's outputs are all there or none: a failed write (disk full) removes the others
        written.append(write_image(labels, image, label_path))
        if seg_nrrd:
            written.append(write_segmentation_nrrd(labels, image, seg_path, model.config.classes, model.config.colors))
            result["segmentation"] = str(seg_path)
        if dicom_seg:
            fractions = prediction.probabilities if probabilities is not None else None
            result["dicom_seg"] = seg.write_for_input(model, path, image, labels, dicom_targets[0], fractions)
            written.append(Path(result["dicom_seg"]["path"]))
        if probabilities is not None:
            result["probabilities"] = {}
            for index, (name, target) in enumerate(zip(model.config.classes, probability_targets), start=1):
                written.append(write_image(probability_image(prediction.probabilities[index], probabilities), image,
                                           target))
                result["probabilities"][name] = str(target)
    except BaseException:
        for output in written:
            output.unlink(missing_ok=True)
        raise
    if prediction.probabilities is not None:
        confidence = prediction.confidence
        result["mean_confidence"] = {name: float(confidence[labels == i].mean()) if (labels == i).any() else None
                                     for i, name in enumerate(model.config.classes, start=1)}
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
            earlier = segmented.get(_resolved(Path(path)))
            if earlier is not None:
                raise DataError(f"given twice (also as input {earlier + 1}, {paths[earlier]}); segmented once", path)
            results.append(segment_file(model, path, out_dir, reference=reference, stem=stem, **options))
            segmented[_resolved(Path(path))] = i
        except Cancelled:
            raise
        except Exception as error:  # noqa: BLE001 - one input's failure, whatever it is, is that input's alone
            message = str(error) if str(path) in str(error) else f"{path}: {error}"
            logger.debug("skipped %s", message)  # the caller reports it: the CLI prints it, Slicer shows it
            results.append({"input": str(path), "error": message})
    return results


def check_output_folder(out_dir: Path) -> None:
    """An output folder that is a file is refused before any work, not after the first inference."""
    if out_dir.exists() and not out_dir.is_dir():
        raise CoTexNetError(f"{out_dir}: the output is a file; --out takes a folder")


def model_class_lookup(index, config) -> np.ndarray:
    """``lookup[dataset label] = model label``: a dataset's classes matched to a model's by name (case ignored),
    whatever their order; a dataset whose classes are not the model's is refused (scores by position would
    compare different classes)."""
    if len(index.classes) != config.num_classes:
        raise DataError(f"the dataset has {len(index.classes)} classes {index.classes} but the model has "
                        f"{config.num_classes} {config.classes}", index.root)
    model_names = [c.casefold() for c in config.classes]
    unknown = [c for c in index.classes if c.casefold() not in model_names]
    if unknown:
        raise DataError(f"the dataset's classes {unknown} are not among the model's {config.classes}; classes are "
                        f"matched by name", index.root)
    return np.array([0] + [model_names.index(c.casefold()) + 1 for c in index.classes], dtype=np.uint8)


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
    to_model = model_class_lookup(index, config)
    info = read_training_info(model_path)
    if split == "all":
        case_ids = [case.case_id for case in index.cases]
    else:
        same_data = info.get("data") == str(Path(data).resolve()) and "split" in info
        case_ids = (info["split"] if same_data else split_cases(index)).get(split, [])
    if not case_ids:
        raise DataError(f"the '{split}' split of this dataset holds no case", index.root)
    rows, seconds = [], 0.0
    for case_id in tqdm(case_ids, desc=f"evaluating {split}", unit="case", disable=not show_progress):
        case = index.case(case_id)
        image = read_image(case.image_path)
        truth = to_model[read_label_map(case.label_path, reference=image, classes=index.classes)]
        started = time.perf_counter()
        labels = segment_volume(model, image, **options)
        seconds += time.perf_counter() - started
        scores = segmentation_metrics(labels, truth, config.num_classes, spacing=image.spacing[::-1])
        rows.append({"case": case_id, **scores})
    summary = aggregate(rows)
    planes = resolve_planes(config, options.get("planes"), options.get("axis"))
    return {"model": str(model_path), "data": str(index.root), "split": split, "classes": config.classes,
            "per_class": summary["per_class"], "mean": summary["mean"], "cases": rows,
            "table": format_table(summary, config.classes),
            "inference": {"planes": planes, "tta": bool(options.get("tta", False)),
                          "postprocessing": config.postprocessing if options.get("postprocess", True) else None,
                          "segment_seconds": round(seconds, 3)}}


def fit_postprocessing(model_path: str | Path, data: str | Path | None = None, *, case_ids: Sequence[str] | None = None,
                       index=None, show_progress: bool = False, **options) -> dict:
    """Choose a bundle's 3D post-processing on its validation cases and store it in its ``config.json``.

    The cases are ``case_ids`` of ``index`` (the Trainer passes its own), else the ``val`` part of the
    split the bundle was trained with on ``data``. They are segmented as the bundle will be used (its
    planes, ``options`` of :func:`predict_volume`), without post-processing; the choice
    (:func:`cotexnet.postprocess.choose_postprocessing`) replaces ``config.json`` atomically and its
    validation Dice before and after goes to ``training.json``. Returns the chooser's report.
    """
    from tqdm.auto import tqdm

    from .atomic import write_json_atomic
    from .bundle import CONFIG_NAME, TRAINING_NAME, read_training_info
    from .card import write_model_card
    from .data import load_dataset, split_cases
    from .model import CoTexNet
    from .postprocess import choose_postprocessing

    model = CoTexNet.from_pretrained(model_path)
    config = model.config
    if index is None:
        if data is None:
            raise CoTexNetError("fit_postprocessing: give the dataset folder or an index")
        index = load_dataset(data, None if (Path(data) / "dataset.json").is_file() else config.classes)
    to_model = model_class_lookup(index, config)
    if case_ids is None:
        info = read_training_info(model_path)
        same_data = info.get("data") == str(Path(index.root).resolve()) and "split" in info
        case_ids = (info["split"] if same_data else split_cases(index)).get("val", [])
    if not case_ids:
        raise DataError("no validation case to choose post-processing on", index.root)
    predictions, truths, spacings = [], [], []
    for case_id in tqdm(list(case_ids), desc="post-processing", unit="case", disable=not show_progress):
        case = index.case(case_id)
        image = read_image(case.image_path)
        truths.append(to_model[read_label_map(case.label_path, reference=image, classes=index.classes)])
        predictions.append(segment_volume(model, image, postprocess=False, **options))
        spacings.append(image.spacing)
    report = choose_postprocessing(predictions, truths, config.classes, spacings)
    config.postprocessing = report["classes"]
    config.to_json_file(Path(model_path) / CONFIG_NAME)
    info = read_training_info(model_path)
    info["postprocessing"] = {**report, "cases": list(case_ids)}
    write_json_atomic(Path(model_path) / TRAINING_NAME, info)
    write_model_card(model_path)
    return report
