"""``cotexnet bench``: CoTexNet inference next to stock transformers CLIPSeg, same run, same settings.

Both sides get the same architecture, weights, resolution, batch and device. Stock CLIPSeg runs as
users run it — ``CLIPSegForImageSegmentation(input_ids=…, pixel_values=…)`` with a text prompt per
image — and CoTexNet runs its test-time path (image only, no text encoder). Each measurement runs in
a fresh process so that peak memory (GPU: ``max_memory_allocated``; CPU: peak resident set) belongs
to that side alone. Speed does not depend on weights, so ``full-random`` (the ViT-B/16, 352 px
CLIPSeg architecture with random weights) measures the real model offline.
"""
from __future__ import annotations

import multiprocessing
import platform
import time
from pathlib import Path

import numpy as np
import torch

from .infer import autocast_dtype, resolve_device

PROMPT = "a photo of something"


def _build(side: str, backbone: str, image_size: int, num_classes: int):
    """(callable running one batch, model) for ``side`` in {"clipseg", "cotexnet"}."""
    from .bundle import SYNTHETIC_BACKBONES, build_clipseg, clipseg_architecture, load_backbone
    from .config import CoTexNetConfig
    from .model import CoTexNet

    if backbone in SYNTHETIC_BACKBONES:
        from .prompts import load_tokenizer, offline_clip_tokenizer_dir

        clipseg, tokenizer = build_clipseg(clipseg_architecture(backbone, image_size)), load_tokenizer(offline_clip_tokenizer_dir())
    else:
        clipseg, tokenizer = load_backbone(backbone, image_size)
    if side == "clipseg":
        from .model import CLIP_MEAN, CLIP_STD

        ids = tokenizer([PROMPT], return_tensors="pt")["input_ids"]
        mean = torch.tensor(CLIP_MEAN).view(1, 3, 1, 1)
        std = torch.tensor(CLIP_STD).view(1, 3, 1, 1)

        def run(images):
            pixel_values = (images - mean.to(images.device)) / std.to(images.device)
            return clipseg(input_ids=ids.to(images.device).expand(len(images), -1), pixel_values=pixel_values).logits

        return run, clipseg
    config = CoTexNetConfig(classes=[f"class {i + 1}" for i in range(num_classes)], backbone=backbone,
                            image_size=image_size)
    model = CoTexNet(config, backbone=clipseg, tokenizer=tokenizer)
    return model, model


def measure(side: str, backbone: str, device: str, precision: str, batch_size: int, image_size: int,
            num_classes: int, iterations: int, warmup: int) -> dict:
    """Slices per second and peak memory of one side at one precision (run in its own process)."""
    import resource

    device = torch.device(device)
    run, model = _build(side, backbone, image_size, num_classes)
    model.to(device).eval()
    dtype = autocast_dtype(device, precision)
    images = torch.rand(batch_size, 3, image_size, image_size, device=device)
    _sync(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)

    def once():
        with torch.inference_mode(), torch.autocast(device.type, dtype=dtype, enabled=dtype is not None):
            return run(images)

    for _ in range(warmup):
        once()
    _sync(device)
    started = time.perf_counter()
    for _ in range(iterations):
        once()
    _sync(device)
    seconds = time.perf_counter() - started
    result = {"side": side, "precision": precision, "slices_per_s": batch_size * iterations / seconds,
              "seconds": seconds}
    if device.type == "cuda":
        result["peak_gpu_memory_mib"] = torch.cuda.max_memory_allocated(device) / 2**20
    result["peak_rss_mib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return result


def _child(queue, args):
    try:
        queue.put(measure(*args))
    except BaseException as error:  # reported to the parent, which raises it with context
        queue.put({"error": f"{type(error).__name__}: {error}"})


def _in_fresh_process(*args) -> dict:
    context = multiprocessing.get_context("spawn")
    queue = context.Queue()
    process = context.Process(target=_child, args=(queue, args))
    process.start()
    result = queue.get()
    process.join()
    if "error" in result:
        raise RuntimeError(f"benchmark of {args[0]} at {args[3]} failed: {result['error']}")
    return result


def bench(backbone: str = "full-random", device: str = "auto", batch_size: int = 8, image_size: int = 352,
          num_classes: int = 1, precisions: list[str] | None = None, iterations: int = 5, warmup: int = 2,
          volume_shape: tuple[int, int, int] | None = None) -> dict:
    """Measure both sides at each precision; report same-precision ratios and best-vs-best.

    With ``volume_shape`` (e.g. 300×512×512), CoTexNet also segments a synthetic CT volume of that
    shape end to end: array in → label map out, and file read → label map file written.
    """
    device = resolve_device(device)
    if precisions is None:
        precisions = ["fp32", "bf16"] if device.type == "cpu" else ["fp32", "bf16", "fp16"]
    rows = []
    for precision in precisions:
        for side in ("clipseg", "cotexnet"):
            rows.append(_in_fresh_process(side, backbone, str(device), precision, batch_size, image_size,
                                          num_classes, iterations, warmup))
    by = {(r["side"], r["precision"]): r for r in rows}
    same = {p: by[("cotexnet", p)]["slices_per_s"] / by[("clipseg", p)]["slices_per_s"] for p in precisions}
    best = {side: max((r for r in rows if r["side"] == side), key=lambda r: r["slices_per_s"]) for side in ("clipseg", "cotexnet")}
    report = {
        "backbone": backbone, "device": str(device), "device_name": _device_name(device), "batch_size": batch_size,
        "image_size": image_size, "num_classes": num_classes, "iterations": iterations,
        "torch": torch.__version__, "threads": torch.get_num_threads(), "rows": rows,
        "ratio_same_precision": same,
        "best": {side: {"precision": r["precision"], "slices_per_s": r["slices_per_s"]} for side, r in best.items()},
        "ratio_best": best["cotexnet"]["slices_per_s"] / best["clipseg"]["slices_per_s"],
    }
    if volume_shape is not None:
        report["volume"] = bench_volume(backbone, device, volume_shape, batch_size, image_size, num_classes)
    return report


def bench_volume(backbone, device, shape, batch_size, image_size, num_classes) -> dict:
    """End-to-end timing of a synthetic CT volume (HU-like int16), from array and from file."""
    import tempfile

    from .data import VolumeImage, read_image, write_image
    from .infer import segment_volume

    model, _ = _build("cotexnet", backbone, image_size, num_classes)
    model.config.intensity = {"mode": "ct", "window": "soft_tissue", "center": 40.0, "width": 400.0}
    rng = np.random.default_rng(0)
    volume = rng.integers(-1000, 1000, size=shape, dtype=np.int16)
    segment_volume(model, volume[: batch_size * 2], batch_size=batch_size, device=device)  # warm-up
    _sync(device)
    started = time.perf_counter()
    segment_volume(model, volume, batch_size=batch_size, device=device)
    _sync(device)
    array_seconds = time.perf_counter() - started
    with tempfile.TemporaryDirectory() as tmp:
        source = Path(tmp) / "ct.nii.gz"
        write_image(volume, VolumeImage(volume, (0.8, 0.8, 1.5), (0, 0, 0), tuple(np.eye(3).ravel())), source)
        started = time.perf_counter()
        image = read_image(source)
        labels = segment_volume(model, image, batch_size=batch_size, device=device)
        write_image(labels, image, Path(tmp) / "labels.nii.gz")
        file_seconds = time.perf_counter() - started
    return {"shape": list(shape), "array_to_labels_s": array_seconds, "file_to_file_s": file_seconds,
            "slices_per_s": shape[0] / array_seconds}


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _device_name(device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"{platform.processor() or platform.machine()} ({torch.get_num_threads()} threads)"


def format_report(report: dict) -> str:
    lines = [f"backbone {report['backbone']}, {report['image_size']} px, batch {report['batch_size']}, "
             f"{report['device_name']}, torch {report['torch']}",
             f"{'side':<10} {'precision':<9} {'slices/s':>10} {'peak MiB':>10}"]
    for row in report["rows"]:
        memory = row.get("peak_gpu_memory_mib", row["peak_rss_mib"])
        lines.append(f"{row['side']:<10} {row['precision']:<9} {row['slices_per_s']:>10.2f} {memory:>10.0f}")
    for precision, ratio in report["ratio_same_precision"].items():
        lines.append(f"CoTexNet / CLIPSeg at {precision}: {ratio:.2f}x")
    best = report["best"]
    lines.append(f"best vs best: CoTexNet {best['cotexnet']['slices_per_s']:.2f} ({best['cotexnet']['precision']}) / "
                 f"CLIPSeg {best['clipseg']['slices_per_s']:.2f} ({best['clipseg']['precision']}) = {report['ratio_best']:.2f}x")
    if "volume" in report:
        v = report["volume"]
        lines.append(f"volume {'x'.join(map(str, v['shape']))}: array→labels {v['array_to_labels_s']:.2f} s "
                     f"({v['slices_per_s']:.1f} slices/s), file→file {v['file_to_file_s']:.2f} s")
    memory_kind = "GPU max_memory_allocated" if report["device"].startswith("cuda") else "process peak RSS"
    lines.append(f"peak memory: {memory_kind}, each side in its own process")
    return "\n".join(lines)


# -------------------------------------------------------------------------------------------- training
def _training_dataset(folder: Path, num_classes: int, count: int, size: int) -> Path:
    """A 2D images/ + masks/ dataset of ``count`` random pictures, each holding every class as a rectangle."""
    from PIL import Image

    rng = np.random.default_rng(0)
    (folder / "images").mkdir(parents=True)
    (folder / "masks").mkdir()
    for i in range(count):
        image = rng.integers(0, 255, (size, size), dtype=np.uint8)
        mask = np.zeros((size, size), np.uint8)
        for c in range(1, num_classes + 1):
            y, x = rng.integers(0, size * 3 // 4, 2)
            mask[y:y + size // 5, x:x + size // 5] = c
        Image.fromarray(image).save(folder / "images" / f"case{i:03d}.png")
        Image.fromarray(mask).save(folder / "masks" / f"case{i:03d}.png")
    return folder


def bench_train(backbone: str = "full-random", device: str = "auto", batch_size: int = 4, image_size: int = 352,
                num_classes: int = 3, batches: int = 2, iterations: int = 3) -> dict:
    """Training steps per second with the frozen-feature cache off and on, side by side in one run.

    Both sides run :meth:`cotexnet.train.Trainer.train_step` on the same ``batches`` batches (augmentation
    off, one view per slice; the trainer's precision: bf16 on a GPU, fp32 on the CPU). Uncached: a warm-up
    step, then ``iterations`` timed steps. Cached: one pass over the batches fills the cache (the first
    epoch, timed apart), then ``iterations`` timed steps read it. ``train_ratio`` is cached / uncached.
    """
    import tempfile

    from .train import TrainOptions, Trainer

    resolved = resolve_device(device)
    sides = {}
    with tempfile.TemporaryDirectory() as tmp:
        count = batch_size * batches * 10 // 8 + 3  # the 8:1:1 split leaves ``batches`` training batches
        data = _training_dataset(Path(tmp) / "data", num_classes, count, image_size)
        for cache in ("off", "auto"):
            options = TrainOptions(data=str(data), out=str(Path(tmp) / cache), backbone=backbone,
                                   classes=[f"class {i + 1}" for i in range(num_classes)], image_size=image_size,
                                   batch_size=batch_size, epochs=1, device=str(resolved), augment=False, oversample=0,
                                   train_encoder="none", feature_cache=cache, show_progress=False)
            trainer = Trainer(options)
            trainer.initialize()
            if cache == "auto" and trainer.cache is None:
                raise RuntimeError("the feature cache did not fit; lower --batch-size or --image-size")
            loader = list(trainer.train_loader)[:batches]
            if resolved.type == "cuda":
                torch.cuda.reset_peak_memory_stats(resolved)
            started = time.perf_counter()
            for batch in loader if cache == "auto" else loader[:1]:  # first epoch (fills the cache) / warm-up
                trainer.train_step(batch)
            _sync(resolved)
            first = time.perf_counter() - started
            started = time.perf_counter()
            for i in range(iterations):
                trainer.train_step(loader[i % len(loader)])
            _sync(resolved)
            seconds = time.perf_counter() - started
            sides[cache] = {"steps_per_s": iterations / seconds, "first_pass_s": first,
                            "peak_gpu_memory_mib": (torch.cuda.max_memory_allocated(resolved) / 2**20
                                                    if resolved.type == "cuda" else None)}
            if trainer.cache is not None:
                trainer.cache.close()
    precision = {None: "fp32"}.get(trainer.dtype, str(trainer.dtype).removeprefix("torch."))
    return {"mode": "train", "backbone": backbone, "device": str(resolved), "device_name": _device_name(resolved),
            "precision": precision, "batch_size": batch_size, "image_size": image_size, "num_classes": num_classes,
            "iterations": iterations, "torch": torch.__version__, "threads": torch.get_num_threads(),
            "uncached": sides["off"], "cached": sides["auto"],
            "train_ratio": sides["auto"]["steps_per_s"] / sides["off"]["steps_per_s"]}
