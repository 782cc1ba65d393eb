"""Training: paper defaults, checkpoints that are always loadable bundles, resume, clean stops, DDP.

Defaults follow the paper (DESIGN.md §1): Adam, cosine schedule, max lr 3e-4, batch 8, at most 500
epochs, early stop after 50 epochs without validation improvement; the authors' choices (AdamW, 224 px,
batch 16, KL ×10) are options. The output folder holds::

    best/  last/       bundles (``CoTexNet.from_pretrained``); last/ also holds trainer_state.pt
    metrics.csv        one row per epoch
    split.json         the case split used
    progress.jsonl     machine-readable progress events (when --progress-file points here)

Under ``torchrun`` the same code runs DistributedDataParallel (NCCL on GPUs, gloo on CPUs) with a
distributed sampler; only rank 0 writes.
"""
from __future__ import annotations

import csv
import io
import json
import logging
import math
import os
import random
import signal
import sys
import time
from contextlib import nullcontext
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from torch.utils.data import DataLoader, DistributedSampler

from .atomic import write_text_atomic
from .config import CoTexNetConfig, TrainOptions
from .data import IntensityNormalization, load_dataset, save_split, split_cases
from .data.augment import augment_batch
from .data.slice_dataset import SliceDataset
from .errors import CoTexNetError, DataError
from .infer import autocast_dtype, resolve_device

logger = logging.getLogger(__name__)

TRAINER_STATE = "trainer_state.pt"


class ProgressWriter:
    """Progress events as JSON lines (file and/or stdout) for scripts and the Slicer module."""

    def __init__(self, path: str | None, stdout: bool, enabled: bool):
        self.path = Path(path) if (path and enabled) else None
        self.stdout = stdout and enabled
        if self.path is not None:
            self.path.parent.mkdir(parents=True, exist_ok=True)

    def __call__(self, event: str, **values) -> None:
        line = json.dumps({"event": event, "time": round(time.time(), 3), **values}, allow_nan=False, default=str)
        if self.path is not None:
            with open(self.path, "a", encoding="utf-8") as handle:
                handle.write(line + "\n")
        if self.stdout:
            print(line, flush=True)


class StopRequest:
    """Set by SIGINT/SIGTERM or by a stop file; checked between steps so a stop always ends cleanly."""

    def __init__(self, stop_file: str | None):
        self.stop_file = Path(stop_file) if stop_file else None
        self.signalled = False
        self._previous = {}

    def install(self) -> None:
        if threading_main():
            for sig in (signal.SIGINT, signal.SIGTERM):
                self._previous[sig] = signal.signal(sig, self._handle)

    def uninstall(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)

    def _handle(self, signum, frame) -> None:
        self.signalled = True

    def __bool__(self) -> bool:
        return self.signalled or (self.stop_file is not None and self.stop_file.exists())


def threading_main() -> bool:
    import threading

    return threading.current_thread() is threading.main_thread()


# ------------------------------------------------------------------------------------ distributed
def distributed_setup(device: torch.device) -> tuple[int, int, torch.device]:
    """(rank, world size, device) — initialising the process group when started by torchrun."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return 0, 1, device
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if device.type == "cuda":
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return dist.get_rank(), world, device


def any_rank(flag: bool, device: torch.device, world: int) -> bool:
    """True on every rank when ``flag`` is true on any, so all ranks stop together."""
    if world <= 1:
        return flag
    tensor = torch.tensor([1.0 if flag else 0.0], device=device)
    dist.all_reduce(tensor, op=dist.ReduceOp.MAX)
    return bool(tensor.item())


# ------------------------------------------------------------------------------------------ prompts
class PromptSource:
    """Real-text prompts ``T_r`` of training slices (all classes' prompts, concatenated).

    The geometric backend is exact and takes milliseconds, so it describes each slice *after*
    augmentation and locations stay true under flips. LMM backends answer once per original slice
    through the cache, and flips are then turned off (a flip would contradict the cached location).
    """

    def __init__(self, options: TrainOptions, config: CoTexNetConfig):
        from .concepts import get_backend

        self.config = config
        self.backend = get_backend(options.concept_backend, **options.concept_options)
        self.attributes = options.attributes
        self.cache = options.concept_cache
        self.cached_per_slice = options.concept_backend != "geometric"

    def __call__(self, images: torch.Tensor, labels: torch.Tensor) -> list[str]:
        from .concepts import describe

        images_np = images.detach().float().cpu().numpy()
        labels_np = labels.detach().cpu().numpy()
        prompts = []
        for image, label in zip(images_np, labels_np):
            picture = image[0] if self.config.intensity.get("mode") != "rgb" else np.moveaxis(image, 0, -1)
            records = describe(picture, label, self.config.classes, self.config.keywords, self.backend,
                               attributes=self.attributes, cache=self.cache if self.cached_per_slice else None)
            prompts.append(" ".join(record["prompt"] for record in records))
        return prompts


# ------------------------------------------------------------------------------------------ training
def _seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def _rng_state() -> dict:
    return {"torch": torch.get_rng_state(), "numpy": list(np.random.get_state()[1].tolist()),
            "numpy_pos": int(np.random.get_state()[2]), "python": repr(random.getstate())}


def _set_rng_state(state: dict) -> None:
    import ast

    torch.set_rng_state(state["torch"])
    np.random.set_state(("MT19937", np.array(state["numpy"], dtype=np.uint32), state["numpy_pos"], 0, 0.0))
    random.setstate(ast.literal_eval(state["python"]))


def _build_config(options: TrainOptions, classes: list[str], normalization: IntensityNormalization,
                  modality: str | None) -> CoTexNetConfig:
    fields = dict(classes=classes, keywords=options.keywords, backbone=options.backbone,
                  image_size=options.image_size, slice_axis=options.slice_axis, modality=modality or "MR",
                  intensity=normalization.to_dict())
    fields.update(options.config_overrides)
    return CoTexNetConfig(**fields)


def _dice_counts(logits: torch.Tensor, labels: torch.Tensor, num_classes: int) -> torch.Tensor:
    """Per-class (intersection, prediction, truth) voxel counts of a batch, for a dataset-wide Dice."""
    prediction = logits.argmax(1)
    counts = torch.zeros(num_classes, 3, dtype=torch.float64)
    for c in range(1, num_classes + 1):
        p, t = prediction == c, labels == c
        counts[c - 1] = torch.tensor([(p & t).sum().item(), p.sum().item(), t.sum().item()], dtype=torch.float64)
    return counts


def validation_dice(model, loader, device, num_classes: int, dtype) -> tuple[float, list[float]]:
    """Dice of each class over all validation slices (empty in both prediction and truth counts as 1)."""
    model.eval()
    counts = torch.zeros(num_classes, 3, dtype=torch.float64)
    autocast = torch.autocast(device.type, dtype=dtype) if dtype is not None else nullcontext()
    with torch.inference_mode(), autocast:
        for batch in loader:
            logits = model(batch["image"].to(device))
            counts += _dice_counts(logits.float().cpu(), batch["label"], num_classes)
    per_class = [1.0 if (p + t) == 0 else float(2 * i / (p + t)) for i, p, t in counts.tolist()]
    return float(np.mean(per_class)), per_class


def _write_metrics_csv(path: Path, rows: list[dict]) -> None:
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=list(rows[0]))
    writer.writeheader()
    writer.writerows(rows)
    write_text_atomic(path, buffer.getvalue())


def train(options: TrainOptions, on_event: Callable[..., None] | None = None) -> Path:
    """Train CoTexNet on a dataset folder; returns the path of the best bundle (``OUT/best``).

    ``on_event(event, **values)`` receives the same progress events that go to the progress file.
    """
    from tqdm.auto import tqdm

    from .model import CoTexNet

    out = Path(options.out)
    device = resolve_device(options.device)
    rank, world, device = distributed_setup(device)
    is_main = rank == 0
    writer = ProgressWriter(options.progress_file, options.progress_stdout, is_main)

    def emit(event: str, **values) -> None:
        writer(event, **values)
        if on_event is not None and is_main:
            on_event(event, **values)

    stop = StopRequest(options.stop_file)
    stop.install()
    try:
        return _train(options, out, device, rank, world, is_main, emit, stop, tqdm, CoTexNet)
    except CoTexNetError as error:
        emit("error", message=str(error))
        raise
    finally:
        stop.uninstall()
        if world > 1 and dist.is_initialized():
            dist.destroy_process_group()


def _train(options, out, device, rank, world, is_main, emit, stop, tqdm, CoTexNet) -> Path:
    _seed_everything(options.seed + rank)
    index = load_dataset(options.data, options.classes)
    classes = index.classes
    last_dir, best_dir = out / "last", out / "best"
    resume_state = None
    if options.resume:
        if not (last_dir / TRAINER_STATE).is_file():
            raise CoTexNetError(f"{last_dir}: nothing to resume (no {TRAINER_STATE}); start without --resume")
        model = CoTexNet.from_pretrained(last_dir)
        config = model.config
        if config.classes != classes:
            raise DataError(f"classes {classes} differ from the run being resumed ({config.classes})", options.data)
        resume_state = torch.load(last_dir / TRAINER_STATE, map_location="cpu", weights_only=True)
        split = resume_state["split"]
    else:
        if options.intensity is not None:
            normalization = IntensityNormalization.from_dict(options.intensity)
        else:
            normalization = IntensityNormalization.for_modality(options.modality or index.modality)
        config = _build_config(options, classes, normalization, options.modality or index.modality)
        from .bundle import load_backbone

        backbone, tokenizer = load_backbone(config.backbone, config.image_size, options.cache_dir)
        model = CoTexNet(config, backbone=backbone, tokenizer=tokenizer)
        split = split_cases(index, options.seed)
    normalization = IntensityNormalization.from_dict(config.intensity)
    if not split["train"]:
        raise DataError("the split leaves no training case", options.data)
    common = dict(normalization=normalization, split=split, axis=config.slice_axis, image_size=config.image_size,
                  seed=options.seed)
    train_set = SliceDataset(index, "train", empty_fraction=options.empty_fraction, **common)
    val_name = "val" if split.get("val") else "train"
    if val_name == "train":
        logger.warning("no validation cases: validating on the training cases")
    val_set = SliceDataset(index, val_name, empty_fraction=options.empty_fraction, **common)
    if len(train_set) == 0:
        raise DataError("no training slice holds any labelled voxel", options.data)
    if is_main:
        out.mkdir(parents=True, exist_ok=True)
        save_split(split, out / "split.json")

    model.to(device)
    params = model.trainable_parameters()
    optimizer_class = torch.optim.AdamW if options.optimizer == "adamw" else torch.optim.Adam
    optimizer = optimizer_class(params, lr=options.lr, weight_decay=options.weight_decay)
    net = model
    if world > 1:
        net = torch.nn.parallel.DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None, find_unused_parameters=True)
    prompts = PromptSource(options, config) if config.uses_text_encoder_in_training and config.use_real_text else None
    flips = options.augment and (prompts is None or not prompts.cached_per_slice)
    dtype = autocast_dtype(device, "auto")
    # fp16 (GPUs without bf16) needs loss scaling against gradient underflow; bf16 and fp32 do not.
    scaler = torch.amp.GradScaler(device.type, enabled=dtype == torch.float16)
    batch_size = options.batch_size

    def loaders(size: int):
        sampler = DistributedSampler(train_set, world, rank, shuffle=True, seed=options.seed) if world > 1 else None
        generator = torch.Generator()
        train_loader = DataLoader(train_set, batch_size=size, shuffle=sampler is None, sampler=sampler,
                                  num_workers=options.num_workers, drop_last=len(train_set) > size * world,
                                  generator=generator, pin_memory=device.type == "cuda")
        val_loader = DataLoader(val_set, batch_size=size, num_workers=options.num_workers)
        return train_loader, val_loader

    train_loader, val_loader = loaders(batch_size)
    steps = len(train_loader) if options.max_steps_per_epoch is None else min(len(train_loader), options.max_steps_per_epoch)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=max(1, options.epochs * steps))
    start_epoch, best, stale, history = 1, -math.inf, 0, []
    if resume_state is not None:
        optimizer.load_state_dict(resume_state["optimizer"])
        scheduler.load_state_dict(resume_state["scheduler"])
        start_epoch, best, stale = resume_state["epoch"] + 1, resume_state["best"], resume_state["stale"]
        history = json.loads(resume_state["history"])
        _set_rng_state(resume_state["rng"])
    augment_rng = torch.Generator()
    emit("start", epochs=options.epochs, start_epoch=start_epoch, steps_per_epoch=steps, batch_size=batch_size,
         train_cases=len(split["train"]), val_cases=len(split.get("val", [])), train_slices=len(train_set),
         val_slices=len(val_set), device=str(device), world_size=world, classes=classes)
    started = time.time()
    stopped = False
    bar = tqdm(total=(options.epochs - start_epoch + 1) * steps, desc="training", unit="step", mininterval=1.0,
               disable=not (is_main and options.show_progress))
    epoch = start_epoch - 1
    for epoch in range(start_epoch, options.epochs + 1):
        # Every random stream restarts from (seed, rank, epoch), so a resumed run repeats an uninterrupted one.
        if isinstance(train_loader.sampler, DistributedSampler):
            train_loader.sampler.set_epoch(epoch)
        train_loader.generator.manual_seed(options.seed + epoch)
        augment_rng.manual_seed((options.seed * 1_000_003 + rank) * 10_007 + epoch)
        net.train()
        totals = {"loss": 0.0, "loss_seg": 0.0, "loss_kd": 0.0}
        done = 0
        iterator = iter(train_loader)
        while done < steps:
            if any_rank(bool(stop), device, world):
                stopped = True
                break
            try:
                batch = next(iterator)
            except StopIteration:
                break
            try:
                terms = _step(net, model, batch, device, dtype, optimizer, scheduler, scaler, options, prompts, flips,
                              augment_rng)
            except torch.cuda.OutOfMemoryError:
                if batch_size == 1:
                    raise CoTexNetError("out of GPU memory even with batch size 1; lower --image-size or use the CPU") from None
                optimizer.zero_grad(set_to_none=True)
                torch.cuda.empty_cache()
                batch_size = max(1, batch_size // 2)
                emit("warning", message=f"out of GPU memory: retrying with batch size {batch_size}")
                logger.warning("out of GPU memory: retrying with batch size %d", batch_size)
                train_loader, val_loader = loaders(batch_size)
                iterator = iter(train_loader)
                continue
            done += 1
            for key in totals:
                totals[key] += terms[key]
            elapsed = time.time() - started
            finished = (epoch - start_epoch) * steps + done
            remaining = (options.epochs - epoch) * steps + (steps - done)
            eta = elapsed / finished * remaining
            emit("step", epoch=epoch, step=done, steps=steps, lr=scheduler.get_last_lr()[0], eta_s=round(eta, 1), **terms)
            bar.set_postfix(epoch=epoch, loss=f"{terms['loss']:.4f}", best_dice=f"{max(best, 0):.3f}", refresh=False)
            bar.update(1)
        if done == 0 and stopped:
            break
        val_dice, per_class = validation_dice(model, val_loader, device, len(classes), dtype)
        improved = val_dice > best
        if improved:
            best, stale = val_dice, 0
        else:
            stale += 1
        row = {"epoch": epoch, **{k: round(v / max(done, 1), 6) for k, v in totals.items()},
               "val_dice": round(val_dice, 6), **{f"val_dice_{c}": round(d, 6) for c, d in zip(classes, per_class)},
               "lr": scheduler.get_last_lr()[0], "seconds": round(time.time() - started, 1)}
        history.append(row)
        if is_main:
            info = _training_info(options, index, split, history, best, epoch, config)
            if improved:
                model.save_pretrained(best_dir, training_info=info)
            _save_last(model, last_dir, info, optimizer, scheduler, epoch, best, stale, history, split)
            _write_metrics_csv(out / "metrics.csv", history)
        elapsed = time.time() - started
        eta = elapsed / max(epoch - start_epoch + 1, 1) * (options.epochs - epoch)
        emit("epoch", epoch=epoch, epochs=options.epochs, loss=row["loss"], loss_seg=row["loss_seg"],
             loss_kd=row["loss_kd"], val_dice=row["val_dice"], val_dice_per_class=dict(zip(classes, per_class)),
             best_val_dice=best, lr=row["lr"], eta_s=round(eta, 1), improved=improved)
        if stopped or stale >= options.patience:
            if stale >= options.patience:
                emit("early_stop", epoch=epoch, patience=options.patience, best_val_dice=best)
            break
    bar.close()
    if world > 1:
        dist.barrier()
    if not (best_dir / "config.json").is_file() and is_main:
        # Stopped before the first validation: the current weights are the best there are.
        model.save_pretrained(best_dir, training_info=_training_info(options, index, split, history, best, epoch, config))
    emit("done", bundle=str(best_dir), best_val_dice=best if best > -math.inf else None, stopped=stopped, epoch=epoch)
    return best_dir


def _step(net, model, batch, device, dtype, optimizer, scheduler, scaler, options, prompts, flips, augment_rng) -> dict:
    images = batch["image"].to(device, non_blocking=True)
    labels = batch["label"].to(device, non_blocking=True)
    described = (images, labels)  # LMM answers are cached per original slice
    if options.augment:
        images, labels = augment_batch(images, labels, augment_rng, flips=flips)
    if prompts is not None and not prompts.cached_per_slice:
        described = (images, labels)  # geometric attributes are exact for the augmented slice
    num_classes = model.config.num_classes
    masks = torch.stack([(labels == c).to(images.dtype) for c in range(1, num_classes + 1)], dim=1)
    text_ids = model.encode_prompts(prompts(*described)) if prompts is not None else None
    autocast = torch.autocast(device.type, dtype=dtype) if dtype is not None else nullcontext()
    with autocast:
        output = net(images, masks, text_ids)
    terms = model.compute_loss(output, labels)
    optimizer.zero_grad(set_to_none=True)
    scaler.scale(terms.total).backward()
    if options.grad_clip > 0:
        scaler.unscale_(optimizer)
        torch.nn.utils.clip_grad_norm_(model.trainable_parameters(), options.grad_clip)
    scaler.step(optimizer)
    scaler.update()
    scheduler.step()
    return {"loss": terms.total.item(), "loss_seg": terms.segmentation.item(), "loss_kd": terms.distillation.item()}


def _training_info(options, index, split, history, best, epoch, config) -> dict:
    return {
        "data": str(Path(options.data).resolve()), "format": index.format, "classes": config.classes,
        "split": split, "epochs_run": epoch, "best_val_dice": best if best > -math.inf else None,
        "history": history, "concept_backend": options.concept_backend,
        "attributes": options.attributes or ["number", "shape", "size", "color", "location", "keyword"],
        "options": {k: v for k, v in asdict(options).items() if k not in ("progress_file", "stop_file")},
        "torch": torch.__version__, "python": sys.version.split()[0],
    }


def _save_last(model, last_dir, info, optimizer, scheduler, epoch, best, stale, history, split) -> None:
    """The last bundle and, inside it, the optimizer/scheduler/RNG state that ``--resume`` continues from."""
    state = {"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(), "epoch": epoch,
             "best": best, "stale": stale, "history": json.dumps(history), "rng": _rng_state(), "split": split}

    def write_state(directory: Path) -> None:
        torch.save(state, directory / TRAINER_STATE)

    from .bundle import save_bundle

    save_bundle(model, last_dir, info, extra_files=write_state)

