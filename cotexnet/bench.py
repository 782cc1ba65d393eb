"""``cotexnet bench``: CoTexNet inference next to stock transformers CLIPSeg, same run, same settings.

Both sides get the same architecture, weights, resolution, batch and device. Stock CLIPSeg runs as
users run it — ``CLIPSegForImageSegmentation(input_ids=…, pixel_values=…)`` with a text prompt per
image — and CoTexNet runs its test-time path (image only, no text encoder). Each measurement runs in
a fresh process so that peak memory (GPU: ``max_memory_allocated``; CPU: peak resident set) belongs
to that side alone. Speed does not depend on weights, so ``full-random`` (the ViT-B/16, 352 px
CLIPSeg architecture with random weights) measures the real model offline.

Each row also says how close to the device's limit it runs: ``flops_per_slice`` (the matrix products,
convolutions and attention of one slice's forward, counted by ``torch.utils.flop_counter`` on the model
itself), ``peak_matmul_tflops`` (a large square matrix product in the row's precision, measured in the same
process) and ``mfu`` (achieved FLOP/s over that peak). The JSON keys are listed in docs/performance.md.
"""
from __future__ import annotations

import multiprocessing
import platform
import queue as queue_module
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


def counted_flops(call) -> float:
    """FLOP of ``call()``: every matrix product, convolution and attention it performs (forward and, when it
    back-propagates, backward), as ``torch.utils.flop_counter`` counts them (a multiply-add is 2 FLOP). Attention
    runs as its plain matrix products here, which the counter sees on every device (it has no formula for the
    CPU's fused kernel), and compiled functions run eagerly so that the counter sees inside them."""
    from contextlib import nullcontext

    from torch.utils.flop_counter import FlopCounterMode

    try:
        from torch.nn.attention import SDPBackend, sdpa_kernel

        math_attention = sdpa_kernel(SDPBackend.MATH)
    except ImportError:  # torch < 2.3: only CUDA has fused kernels to switch off
        math_attention = torch.backends.cuda.sdp_kernel(enable_flash=False, enable_mem_efficient=False)
    set_stance = getattr(torch.compiler, "set_stance", None)  # torch >= 2.6
    eager = set_stance("force_eager") if set_stance is not None else nullcontext()
    counter = FlopCounterMode(display=False)
    with math_attention, eager, counter:
        call()
    return float(counter.get_total_flops())


def flops_per_slice(run, image_size: int, device: torch.device) -> float:
    """FLOP of one slice's forward through ``run`` (:func:`counted_flops` of a one-slice batch)."""
    def forward():
        with torch.inference_mode():
            run(torch.rand(1, 3, image_size, image_size, device=device))

    return counted_flops(forward)


def matmul_peak_tflops(device: torch.device, dtype: torch.dtype | None, seconds: float = 0.5) -> float:
    """TFLOP/s of a large square matrix product in ``dtype`` (``None``: float32) on ``device``, the practical
    peak that MFU is measured against (8192² on a GPU, 1024² on the CPU)."""
    size = 8192 if device.type == "cuda" else 1024
    a, b = (torch.randn(size, size, device=device, dtype=dtype or torch.float32) for _ in range(2))
    for _ in range(2):
        a @ b
    _sync(device)
    count, started = 0, time.perf_counter()
    while count < 3 or time.perf_counter() - started < seconds:
        a @ b
        count += 1
        if count % 10 == 0 or count < 10:
            _sync(device)
    _sync(device)
    return 2 * size**3 * count / (time.perf_counter() - started) / 1e12


def utilisation(slices_per_s: float, flops_per_slice: float, peak_tflops: float) -> dict:
    """The FLOP keys of a bench row: FLOP per slice, the TFLOP/s achieved at the measured rate, and MFU (that over
    ``peak_tflops``)."""
    achieved = slices_per_s * flops_per_slice / 1e12
    return {"flops_per_slice": flops_per_slice, "achieved_tflops": achieved, "mfu": achieved / peak_tflops}


def measure(side: str, backbone: str, device: str, precision: str, batch_size: int, image_size: int,
            num_classes: int, iterations: int, warmup: int, compile: str | None = None) -> dict:
    """Slices per second, peak memory, FLOP per slice, the matrix-product peak and MFU of one side at one
    precision (run in its own process).

    ``compile`` runs the side through ``torch.compile`` in that mode (both sides alike).
    """
    import resource

    device = torch.device(device)
    run, model = _build(side, backbone, image_size, num_classes)
    (model.place(device) if side == "cotexnet" else model.to(device)).eval()  # stock CLIPSeg as users run it
    dtype = autocast_dtype(device, precision)
    flops = flops_per_slice(run, image_size, device)
    peak = matmul_peak_tflops(device, dtype)
    if compile is not None:
        run = torch.compile(run, mode=compile)
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
    rate = batch_size * iterations / seconds
    result = {"side": side, "precision": precision, "slices_per_s": rate, "seconds": seconds,
              **utilisation(rate, flops, peak), "peak_matmul_tflops": peak}
    if device.type == "cuda":
        result["peak_gpu_memory_mib"] = torch.cuda.max_memory_allocated(device) / 2**20
    result["peak_rss_mib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return result


def _child(queue, args):
    try:
        queue.put(bench_volume(*args[1:]) if args[0] == "volume" else measure(*args))
    except BaseException as error:  # reported to the parent, which raises it with context
        queue.put({"error": f"{type(error).__name__}: {error}"})


def _in_fresh_process(*args, target=_child) -> dict:
    """``target(queue, args)`` in a spawned process; its result, or a RuntimeError with its error or exit code."""
    context = multiprocessing.get_context("spawn")
    queue = context.Queue()
    process = context.Process(target=target, args=(queue, args))
    process.start()
    result = None
    while result is None:
        try:
            result = queue.get(timeout=1.0)
        except queue_module.Empty:
            if not process.is_alive():  # died before reporting (an import error, the OOM killer): never wait forever
                result = {"error": f"the process ended with exit code {process.exitcode} and no result"}
    process.join()
    if "error" in result:
        raise RuntimeError(f"benchmark {args[0]} ({', '.join(map(str, args[1:4]))}) failed: {result['error']}")
    return result


def bench(backbone: str = "full-random", device: str = "auto", batch_size: int = 8, image_size: int = 352,
          num_classes: int = 1, precisions: list[str] | None = None, iterations: int = 5, warmup: int = 2,
          volume_shape: tuple[int, int, int] | None = None, volume_batch_size: int | None = None,
          compile: str | None = None) -> dict:
    """Measure both sides at each precision; report same-precision ratios and best-vs-best.

    With ``volume_shape`` (e.g. 300×512×512), CoTexNet also segments a synthetic CT volume of that
    shape end to end (:func:`bench_volume`) in batches of ``volume_batch_size`` (default: chosen from free
    GPU memory on a GPU, ``batch_size`` on the CPU), in the best precision measured for CoTexNet.
    """
    device = resolve_device(device)
    if precisions is None:
        precisions = ["fp32", "bf16"] if device.type == "cpu" else ["fp32", "bf16", "fp16"]
    rows = []
    for precision in precisions:
        for side in ("clipseg", "cotexnet"):
            rows.append(_in_fresh_process(side, backbone, str(device), precision, batch_size, image_size,
                                          num_classes, iterations, warmup, compile))
    by = {(r["side"], r["precision"]): r for r in rows}
    same = {p: by[("cotexnet", p)]["slices_per_s"] / by[("clipseg", p)]["slices_per_s"] for p in precisions}
    best = {side: max((r for r in rows if r["side"] == side), key=lambda r: r["slices_per_s"]) for side in ("clipseg", "cotexnet")}
    report = {
        "backbone": backbone, "device": str(device), "device_name": _device_name(device), "batch_size": batch_size,
        "image_size": image_size, "num_classes": num_classes, "iterations": iterations, "compile": compile,
        "torch": torch.__version__, "threads": torch.get_num_threads(), "rows": rows,
        "ratio_same_precision": same,
        "best": {side: {"precision": r["precision"], "slices_per_s": r["slices_per_s"]} for side, r in best.items()},
        "ratio_best": best["cotexnet"]["slices_per_s"] / best["clipseg"]["slices_per_s"],
    }
    if volume_shape is not None:
        if volume_batch_size is None and device.type == "cpu":
            volume_batch_size = batch_size
        report["volume"] = _in_fresh_process("volume", backbone, str(device), volume_shape, volume_batch_size,
                                             image_size, num_classes, compile, best["cotexnet"]["precision"])
    return report


def bench_volume(backbone, device, shape, batch_size, image_size, num_classes, compile=None, precision="auto",
                 repeats: int = 3) -> dict:
    """A synthetic CT volume (HU-like int16) segmented from an array and from a file, phase by phase.

    ``array_to_labels_first_s`` is the first full-size call (after a two-batch warm-up that compiles),
    ``array_to_labels_s`` the median of ``repeats`` more; ``phases_s`` the seconds of each phase of one more call
    that synchronises the device at each phase's end (so their sum exceeds the unsynchronised time a little);
    ``file_to_file_s`` reads a ``.nii.gz``, segments it and writes the labels, ``file_read_s`` and
    ``file_write_s`` being its two ends.
    """
    import resource
    import statistics
    import tempfile

    from .data import VolumeImage, read_image, write_image
    from .infer import inference_batch_size, segment_volume

    device = torch.device(device)
    model, _ = _build("cotexnet", backbone, image_size, num_classes)
    model.config.intensity = {"mode": "ct", "window": "soft_tissue", "center": 40.0, "width": 400.0}
    model.place(device).eval()
    batch_size = inference_batch_size(model, device, autocast_dtype(device, precision), shape[1] * shape[2], batch_size)
    rng = np.random.default_rng(0)
    volume = rng.integers(-1000, 1000, size=shape, dtype=np.int16)
    options = dict(batch_size=batch_size, device=device, compile=compile, precision=precision)
    segment_volume(model, volume[: batch_size * 2], **options)  # warm-up (and compilation)
    _sync(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)

    def timed(**extra) -> float:
        started = time.perf_counter()
        segment_volume(model, volume, **options, **extra)
        _sync(device)
        return time.perf_counter() - started

    first = timed()
    steady = statistics.median(timed() for _ in range(repeats))
    phases: dict[str, float] = {}
    timed(timings=phases)
    with tempfile.TemporaryDirectory() as tmp:
        source = Path(tmp) / "ct.nii.gz"
        write_image(volume, VolumeImage(volume, (0.8, 0.8, 1.5), (0, 0, 0), tuple(np.eye(3).ravel())), source)
        started = time.perf_counter()
        image = read_image(source)
        read = time.perf_counter() - started
        labels = segment_volume(model, image, **options)
        written = time.perf_counter()
        write_image(labels, image, Path(tmp) / "labels.nii.gz")
        write = time.perf_counter() - written
        file_seconds = time.perf_counter() - started
    result = {"shape": list(shape), "batch_size": batch_size, "precision": precision, "compile": compile,
              "array_to_labels_first_s": first, "array_to_labels_s": steady, "slices_per_s": shape[0] / steady,
              "phases_s": phases, "file_read_s": read, "file_write_s": write, "file_to_file_s": file_seconds,
              "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}
    if device.type == "cuda":
        result["peak_gpu_memory_mib"] = torch.cuda.max_memory_allocated(device) / 2**20
    return result


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
             f"{'side':<10} {'precision':<9} {'slices/s':>10} {'peak MiB':>10} {'GFLOP/slice':>12} {'TFLOP/s':>9} "
             f"{'peak TFLOP/s':>13} {'MFU':>6}"]
    for row in report["rows"]:
        memory = row.get("peak_gpu_memory_mib", row["peak_rss_mib"])
        lines.append(f"{row['side']:<10} {row['precision']:<9} {row['slices_per_s']:>10.2f} {memory:>10.0f} "
                     f"{row['flops_per_slice'] / 1e9:>12.2f} {row['achieved_tflops']:>9.3f} "
                     f"{row['peak_matmul_tflops']:>13.3f} {row['mfu']:>6.1%}")
    for precision, ratio in report["ratio_same_precision"].items():
        lines.append(f"CoTexNet / CLIPSeg at {precision}: {ratio:.2f}x")
    best = report["best"]
    lines.append(f"best vs best: CoTexNet {best['cotexnet']['slices_per_s']:.2f} ({best['cotexnet']['precision']}) / "
                 f"CLIPSeg {best['clipseg']['slices_per_s']:.2f} ({best['clipseg']['precision']}) = {report['ratio_best']:.2f}x")
    if "volume" in report:
        v = report["volume"]
        memory = (f"peak GPU {v['peak_gpu_memory_mib']:.0f} MiB" if "peak_gpu_memory_mib" in v
                  else f"peak RSS {v['peak_rss_mib']:.0f} MiB")
        lines.append(f"volume {'x'.join(map(str, v['shape']))} ({v['precision']}, batch {v['batch_size']}): array→labels "
                     f"{v['array_to_labels_s']:.3f} s ({v['slices_per_s']:.1f} slices/s; first call "
                     f"{v['array_to_labels_first_s']:.3f} s), file→file {v['file_to_file_s']:.2f} s, {memory}")
        phases = {**v["phases_s"], "file_read": v["file_read_s"], "file_write": v["file_write_s"]}
        lines.append("  phases (s): " + ", ".join(f"{name} {seconds:.3f}" for name, seconds in phases.items()))
    memory_kind = "GPU max_memory_allocated" if report["device"].startswith("cuda") else "process peak RSS"
    lines.append(f"peak memory: {memory_kind}, each side in its own process; MFU against the matrix-product peak")
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


#: The paper recipe that ``bench --train`` estimates the duration of: a modest dataset's slices, epochs.
PAPER_RECIPE_SLICES, PAPER_RECIPE_EPOCHS = 4000, 500


def bench_train(backbone: str = "full-random", device: str = "auto", batch_size: int = 4, image_size: int = 352,
                num_classes: int = 3, batches: int = 2, iterations: int = 3, compile: str | None = None) -> dict:
    """Training steps per second with the frozen-feature cache off and on, side by side in one run, phase by phase.

    Both sides run :meth:`cotexnet.train.Trainer.train_step` on the same ``batches`` batches (augmentation
    off, one view per slice; the trainer's precision: bf16 on a GPU, fp32 on the CPU). Uncached: a warm-up
    step, then ``iterations`` timed steps. Cached: one pass over the batches fills the cache (the first
    epoch, timed apart), then ``iterations`` timed steps read it. ``train_ratio`` is cached / uncached.
    ``phases_per_step_s`` (data, forward, backward, optimizer) comes from ``iterations`` more steps that
    synchronise the device at each phase's end. ``flops_per_slice`` is a step's forward and backward per slice
    (:func:`counted_flops`; the cached step skips the encoders), ``mfu`` its rate over ``peak_matmul_tflops`` in
    the trainer's precision. ``paper_recipe_estimate_s`` is what
    :data:`PAPER_RECIPE_SLICES` slices x :data:`PAPER_RECIPE_EPOCHS` epochs take at the measured rates:
    uncached throughout, or cached after each of the trainer's default views was encoded once. ``compile`` runs
    the step's text encoder and decoder through ``torch.compile`` (``cotexnet train --compile``), compiled in the
    warm-up / first pass.
    """
    import tempfile

    from .config import TrainOptions
    from .infer import PhaseClock
    from .train import Trainer

    resolved = resolve_device(device)
    sides = {}
    peak = matmul_peak_tflops(resolved, autocast_dtype(resolved, "auto"))  # the trainer's precision
    with tempfile.TemporaryDirectory() as tmp:
        count = batch_size * batches * 10 // 8 + 3  # the 8:1:1 split leaves ``batches`` training batches
        data = _training_dataset(Path(tmp) / "data", num_classes, count, image_size)
        for cache in ("off", "auto"):
            options = TrainOptions(data=str(data), out=str(Path(tmp) / cache), backbone=backbone,
                                   classes=[f"class {i + 1}" for i in range(num_classes)], image_size=image_size,
                                   batch_size=batch_size, epochs=1, device=str(resolved), augment=False, oversample=0,
                                   train_encoder="none", feature_cache=cache, show_progress=False, compile=compile)
            trainer = Trainer(options)
            trainer.initialize()
            if cache == "auto" and trainer.cache is None:
                raise RuntimeError("the feature cache did not fit; lower --batch-size or --image-size")
            loader = list(trainer.train_loader)[:batches]
            if resolved.type == "cuda":
                torch.cuda.reset_peak_memory_stats(resolved)
            started = time.perf_counter()
            for batch in loader if cache == "auto" else loader[:1]:  # first epoch (fills the cache) / warm-up
                trainer.train_step([batch])
            _sync(resolved)
            first = time.perf_counter() - started
            started = time.perf_counter()
            for i in range(iterations):
                trainer.train_step([loader[i % len(loader)]])
            _sync(resolved)
            seconds = time.perf_counter() - started
            phases: dict[str, float] = {}
            trainer.clock = PhaseClock(resolved, phases)
            for i in range(iterations):
                trainer.train_step([loader[i % len(loader)]])
            flops = counted_flops(lambda: trainer.backward(loader[0], 1.0)) / batch_size
            trainer.optimizer.zero_grad(set_to_none=True)
            rate = iterations * batch_size / seconds
            sides[cache] = {"steps_per_s": iterations / seconds, "slices_per_s": rate, "first_pass_s": first,
                            **utilisation(rate, flops, peak),
                            "phases_per_step_s": {name: value / iterations for name, value in phases.items()},
                            "peak_gpu_memory_mib": (torch.cuda.max_memory_allocated(resolved) / 2**20
                                                    if resolved.type == "cuda" else None),
                            "cache_storage": None if trainer.cache is None else trainer.cache.storage.type}
            if trainer.cache is not None:
                trainer.cache.close()
    precision = {None: "fp32"}.get(trainer.dtype, str(trainer.dtype).removeprefix("torch."))
    total = PAPER_RECIPE_SLICES * PAPER_RECIPE_EPOCHS
    views = TrainOptions.__dataclass_fields__["views"].default
    uncached, cached = sides["off"]["slices_per_s"], sides["auto"]["slices_per_s"]
    estimate = {"slices": PAPER_RECIPE_SLICES, "epochs": PAPER_RECIPE_EPOCHS, "views": views,
                "uncached": total / uncached,
                "cached": views * PAPER_RECIPE_SLICES / uncached + (total - views * PAPER_RECIPE_SLICES) / cached}
    return {"mode": "train", "backbone": backbone, "device": str(resolved), "device_name": _device_name(resolved),
            "precision": precision, "batch_size": batch_size, "image_size": image_size, "num_classes": num_classes,
            "iterations": iterations, "compile": compile, "torch": torch.__version__,
            "threads": torch.get_num_threads(),
            "peak_matmul_tflops": peak, "uncached": sides["off"], "cached": sides["auto"],
            "train_ratio": sides["auto"]["steps_per_s"] / sides["off"]["steps_per_s"],
            "paper_recipe_estimate_s": estimate}


def format_train_report(report: dict) -> str:
    lines = [f"{report['backbone']}, {report['image_size']} px, batch {report['batch_size']}, {report['num_classes']} "
             f"classes, {report['device_name']} ({report['precision']}"
             + (f", compiled {report['compile']})" if report.get("compile") else ")")]
    for side in ("uncached", "cached"):
        row = report[side]
        phases = ", ".join(f"{name} {seconds * 1000:.1f}" for name, seconds in row["phases_per_step_s"].items())
        lines.append(f"{side:<9} {row['steps_per_s']:.3f} steps/s ({row['slices_per_s']:.2f} slices/s, "
                     f"{row['flops_per_slice'] / 1e9:.2f} GFLOP/slice, MFU {row['mfu']:.1%}); per step (ms): {phases}")
    estimate = report["paper_recipe_estimate_s"]
    lines.append(f"cached / uncached: {report['train_ratio']:.1f}x; paper recipe ({estimate['slices']} slices x "
                 f"{estimate['epochs']} epochs) at these rates: uncached {estimate['uncached'] / 3600:.2f} h, cached "
                 f"{estimate['cached'] / 3600:.2f} h")
    return "\n".join(lines)
