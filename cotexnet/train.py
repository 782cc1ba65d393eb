"""Training: paper defaults, checkpoints that are always loadable bundles, resume, clean stops, DDP.

:class:`Trainer` holds one run (as nnU-Net's trainer does): :meth:`Trainer.train_step`,
:meth:`Trainer.validate`, :meth:`Trainer.save_checkpoint` and the short epoch loop of
:meth:`Trainer.run`, the single entry point (:func:`train` is ``Trainer(options).run()``); the run folder and its
checkpoints (save, load, recover, lock) are :mod:`cotexnet.checkpoints`.
Defaults follow the paper (docs/method.md, "Training"): Adam, cosine schedule, max lr 3e-4, batch 8, at
most 500 epochs, early stop after 50 epochs without validation improvement; the authors' choices
(AdamW, 224 px, batch 16, KL ×10) are options. The output folder holds::

    best/  last/       bundles (``CoTexNet.from_pretrained``); last/ also holds trainer_state.pt
    metrics.csv        one row per completed epoch
    split.json         the case split used
    progress.jsonl     machine-readable progress events (when --progress-file points here)

Under ``torchrun`` the same code runs DistributedDataParallel (NCCL on GPUs, gloo on CPUs) with a
distributed sampler; only rank 0 writes.

A folder that holds a run is never replaced without ``overwrite`` (``--overwrite``); a stop (Ctrl-C,
SIGTERM, the stop file) in the middle of an epoch saves ``last/`` at that step, and ``--resume``
continues the epoch from there, so the resumed run takes as many optimiser steps as an uninterrupted one.
"""
from __future__ import annotations

import errno
import itertools
import json
import logging
import math
import os
import random
import shutil
import signal
import sys
import time
from collections.abc import Callable
from contextlib import nullcontext, suppress
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from torch.utils.data import DataLoader, DistributedSampler

from .bundle import read_training_info
from .card import record_evaluation
from .checkpoints import TRAINER_STATE, RunFolder, restore_trainer_state, trainer_state
from .config import CoTexNetConfig, TrainOptions
from .config import DEFAULT_PALETTE, RECIPES
from .data import (IntensityNormalization, flip_rule, load_dataset, read_image_geometry, save_split, split_cases)
from .data.augment import augment_batch
from .data.laterality import FlipRule
from .data.slice_dataset import ForegroundBatchSampler, SliceDataset, reads_as_color
from .data.slicing import array_slice_axis
from .errors import ConfigError, CoTexNetError, DataError, error_summary
from .infer import (MAX_AUTO_BATCH_SIZE, PhaseClock, auto_batch_size, autocast_dtype, evaluate, fit_postprocessing,
                    resolve_device)
from .losses import CoTexNetLoss
from .metrics import DatasetDice
from .model import CoTexNet, output_head

logger = logging.getLogger(__name__)

LOSS_TERMS = ("loss", "loss_seg", "loss_kd")
#: Options a resumed run takes from its checkpoint (model config, optimiser and schedule state): a new
#: value would be ignored, so resuming with one is refused.
RESUME_FIXED_OPTIONS = ("backbone", "image_size", "epochs", "batch_size", "accumulate", "lr", "optimizer",
                        "weight_decay", "slice_axis", "modality", "intensity", "max_steps_per_epoch")


class ProgressWriter:
    """Progress events as JSON lines (file and/or stdout) for scripts and the Slicer module."""

    def __init__(self, path: str | None, stdout: bool, enabled: bool):
        self.path = Path(path) if (path and enabled) else None
        self.stdout = stdout and enabled
        if self.path is not None and self.path.is_dir():
            raise ConfigError(f"{self.path}: the progress file is a folder; --progress-file takes a file name")
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
        self.signal: int | None = None  # the signal that asked to stop (the CLI exits 128 + it)
        self._previous = {}

    def install(self) -> None:
        if threading_main():
            for sig in (signal.SIGINT, signal.SIGTERM):
                self._previous[sig] = signal.signal(sig, self._handle)

    def uninstall(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)

    def _handle(self, signum, frame) -> None:
        self.signalled, self.signal = True, signum

    def __bool__(self) -> bool:
        return self.signalled or (self.stop_file is not None and self.stop_file.exists())

    def left_from_before(self) -> bool:
        """Whether the stop file was there before this process started: left by an earlier run, not a request.
        One written after the start (Stop clicked while the process still imports torch) is a stop request.
        The second of slack covers the precision of the process start time."""
        import psutil

        return (self.stop_file is not None and self.stop_file.exists()
                and self.stop_file.stat().st_mtime < psutil.Process().create_time() - 1.0)


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
            picture = np.moveaxis(image, 0, -1) if self.config.color_input else image[0]
            records = describe(picture, label, self.config.classes, self.config.keywords, self.backend,
                               attributes=self.attributes, cache=self.cache if self.cached_per_slice else None)
            prompts.append(" ".join(record["prompt"] for record in records))
        return prompts


# ------------------------------------------------------------------------------------------ training
def fused_optimizer(device: torch.device) -> dict:
    """Keyword arguments that make Adam/AdamW one fused kernel per step where torch has one (CUDA)."""
    return {"fused": True} if device.type == "cuda" else {}


def train_batch_size(free_bytes: int, fixed_bytes: int, slice_bytes: int, share: float = 0.5,
                     cap: int = MAX_AUTO_BATCH_SIZE) -> int:
    """Slices per training batch whose step (``fixed_bytes`` + ``slice_bytes`` per slice) fits ``share`` of
    ``free_bytes``: at least 1, at most ``cap``."""
    return auto_batch_size(free_bytes * share - fixed_bytes, slice_bytes, share=1.0, cap=cap)


def _seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def _build_config(options: TrainOptions, index, normalization: IntensityNormalization,
                  modality: str | None) -> CoTexNetConfig:
    """A new run's config; ``channels`` says what training feeds: colour when the dataset holds colour pictures
    (or the intensity mode is ``rgb``), so that inference feeds colour too."""
    color = normalization.mode == "rgb" or any(reads_as_color(case.image_path) for case in index.cases)
    fields = dict(classes=index.classes, keywords=options.keywords, backbone=options.backbone,
                  image_size=options.image_size, slice_axis=options.slice_axis, modality=modality or "MR",
                  intensity=normalization.to_dict(), channels="rgb" if color else "grayscale")
    fields.update(options.config_overrides)
    return CoTexNetConfig(**fields)


def initialized_from(bundle: str | Path, config: CoTexNetConfig) -> CoTexNet:
    """A model for ``config``'s classes starting from a trained bundle (or run folder): its architecture,
    weights, image size, slicing and intensity normalisation. The same classes keep every weight; otherwise
    (new classes, or the same in another order) the head's channels follow the class names (case ignored),
    each of the bundle's classes must be among the new ones, and new classes start from the background
    channel, negated."""
    from transformers import CLIPSegConfig

    from .bundle import build_clipseg

    source = CoTexNet.from_pretrained(bundle)
    old = source.config
    if old.classes == config.classes:
        return source
    names = [c.casefold() for c in config.classes]
    lost = [c for c in old.classes if c.casefold() not in names]
    if lost:
        raise ConfigError(f"--init-from {bundle}: its classes {lost} are not among the dataset's {config.classes}; "
                          "fine-tuning keeps a model's classes and may add new ones")
    old_names = [c.casefold() for c in old.classes]
    colors = [old.colors[old_names.index(name)] if name in old_names else DEFAULT_PALETTE[i % len(DEFAULT_PALETTE)]
              for i, name in enumerate(names)]
    new_config = CoTexNetConfig(**{**old.to_dict(), "classes": config.classes, "keywords": config.keywords,
                                   "colors": [list(c) for c in colors]})
    model = CoTexNet(new_config, build_clipseg(CLIPSegConfig.from_dict(old.backbone_config)), source.tokenizer)
    state = source.state_dict()
    head = output_head(model.clipseg.decoder)
    prefix = next(name for name, module in model.named_modules() if module is head)
    target = model.state_dict()
    for key in (f"{prefix}.weight", f"{prefix}.bias"):  # remapped by name even when only the order changed  # weight (in, n+1, k, k) or bias (n+1,): channel 0 is background
        dim = 1 if target[key].ndim == 4 else 0
        old_channels = state[key].movedim(dim, 0)
        new_channels = target[key].movedim(dim, 0).clone()
        new_channels[0] = old_channels[0]
        for i, name in enumerate(names, start=1):
            new_channels[i] = old_channels[old_names.index(name) + 1] if name in old_names else -old_channels[0]
        state[key] = new_channels.movedim(0, dim)
    model.load_state_dict(state)
    logger.info("initialised from %s: classes %s kept, %s new", bundle, old.classes,
                [c for c, name in zip(config.classes, names) if name not in old_names])
    return model


def train(options: TrainOptions, on_event: Callable[..., None] | None = None) -> Path:
    """Train CoTexNet on a dataset folder; returns the path of the best bundle (``OUT/best``).

    ``on_event(event, **values)`` receives the same progress events that go to the progress file.
    """
    return Trainer(options, on_event).run()


class Trainer:
    """One training run: data, model, optimisation, validation, checkpoints and progress events.

    :meth:`run` is the whole run; the steps it calls are the places later work plugs into:
    :meth:`make_loaders` (the batch sampler, e.g. foreground oversampling), :meth:`build_model`
    (where a run starts from: a backbone, a bundle being resumed, or another bundle's weights),
    :meth:`train_step` (the forward pass, e.g. behind a cache of frozen-encoder features),
    :meth:`validate` (a :class:`~cotexnet.metrics.DatasetDice`, per class) and :meth:`save_checkpoint`.
    Every random stream restarts from (seed, rank, epoch), so a resumed run repeats an uninterrupted one.
    """

    def __init__(self, options: TrainOptions, on_event: Callable[..., None] | None = None):
        self.options = options
        self.run_folder = RunFolder(options.out)
        self.out, self.last_dir, self.best_dir = self.run_folder.out, self.run_folder.last, self.run_folder.best
        self.rank, self.world, self.device = distributed_setup(resolve_device(options.device))
        self.is_main = self.rank == 0
        self.writer = ProgressWriter(options.progress_file, options.progress_stdout, self.is_main)
        self.on_event = on_event
        self.stop = StopRequest(options.stop_file)
        self.stopped = False
        self.epoch, self.best, self.stale, self.history = 0, -math.inf, 0, []
        self.step = 0  # optimiser steps done in the epoch after ``self.epoch`` (a stop mid-epoch)
        self.resume_from: dict | None = None  # where in its epoch a resumed checkpoint stopped
        self.cache = None  # the feature cache (make_cache)
        self.augment_rng = torch.Generator()

    def emit(self, event: str, **values) -> None:
        self.writer(event, **values)
        if self.on_event is not None and self.is_main:
            self.on_event(event, **values)

    # ------------------------------------------------------------------------------------------ the run
    def run(self) -> Path:
        """Train until ``epochs``, early stop, or a stop request; returns the best bundle's folder."""
        from tqdm.auto import tqdm

        options = self.options
        self.stop.install()
        try:
            self.check_output()
            with self.run_folder.lock() if self.is_main else nullcontext():  # one trainer per run folder
                self.initialize()
                start_epoch = self.start_epoch
                self.emit("start", epochs=options.epochs, start_epoch=start_epoch, steps_per_epoch=self.steps,
                          batch_size=self.batch_size, train_cases=len(self.split["train"]),
                          val_cases=len(self.split.get("val", [])), train_slices=len(self.train_set),
                          val_slices=len(self.val_set), device=str(self.device), world_size=self.world,
                          classes=self.config.classes, recipe=self.training_info()["recipe"],
                          augmentation=self.flips_info(), feature_cache=self.cache is not None)
                self.started, self.steps_run = time.time(), 0
                self.bar = tqdm(total=(options.epochs - start_epoch + 1) * self.steps, desc="training", unit="step",
                                mininterval=1.0, disable=not (self.is_main and options.show_progress))
                self.epoch = start_epoch - 1
                for epoch in range(start_epoch, options.epochs + 1):
                    self.epoch = epoch
                    done, totals = self.train_epoch(epoch)
                    if self.stopped and done < self.steps:  # stopped mid-epoch: keep its place, never count it
                        self.epoch, self.step = epoch - 1, done
                        if done > self.first_step and self.is_main:
                            self.save_checkpoint(False, totals)
                        break
                    self.end_epoch(epoch, done, totals, *self.validate())
                    if self.stopped or self.stale >= options.patience:
                        if self.stale >= options.patience:
                            self.emit("early_stop", epoch=epoch, patience=options.patience, best_val_dice=self.best)
                        break
                return self.finish()
        except OSError as error:
            if error.errno not in (errno.ENOSPC, errno.EDQUOT):
                raise
            message = f"{error.filename or self.out}: no space left on the disk; free space and continue with --resume"
            with suppress(OSError):  # the progress file may be on the full disk too
                self.emit("error", message=message)
            raise CoTexNetError(message) from None
        except CoTexNetError as error:
            with suppress(OSError):
                self.emit("error", message=str(error))
            raise
        finally:
            self.stop.uninstall()
            if getattr(self, "bar", None) is not None:  # ends its line, so an error is printed on a line of its own
                self.bar.close()
            if getattr(self, "cache", None) is not None:  # never leave gigabytes of cache behind an error
                self.cache.close()
            if self.world > 1 and dist.is_initialized():
                dist.destroy_process_group()

    # ------------------------------------------------------------------------------------------- set-up
    def check_output(self) -> None:
        """Refuse, before anything is written, an output that cannot hold a run, and a stop file already there."""
        data = Path(self.options.data).resolve()
        if self.out.exists() and not self.out.is_dir():
            raise ConfigError(f"{self.out}: the output is a file; --out takes a folder (a new one, or a run "
                              f"to resume)")
        if self.out.resolve().is_relative_to(data):
            raise ConfigError(f"{self.out}: the output folder lies inside the dataset {data}; choose a folder outside "
                              f"it (the run's files would become part of the dataset)")
        if self.stop.left_from_before():
            raise ConfigError(f"{self.stop.stop_file}: the stop file exists already (from an earlier run?), so the "
                              f"run would stop before its first step; delete it first")

    def check_model_options(self) -> None:
        """Options that only the built model can check: the size its patches tile, the encoder layers it has."""
        options, vision = self.options, self.model.vision.config
        size, patch = self.config.image_size, vision.patch_size
        if size % patch:
            raise ConfigError(f"image_size {size}: expected a multiple of the backbone's patch size {patch}, e.g. "
                              f"{-(-size // patch) * patch}")
        layers = vision.num_hidden_layers
        if options.train_encoder.startswith("last-") and int(options.train_encoder[5:]) > layers:
            raise ConfigError(f"train_encoder {options.train_encoder}: the image encoder has {layers} layers; "
                              f"expected last-1 to last-{layers}, or all")

    def prepare_run_folder(self) -> None:
        for message in self.run_folder.prepare(self.options.overwrite):
            self.emit("warning", message=message)

    def initialize(self) -> None:
        """Data, model, split, slices, optimiser, schedule and loaders, restored when resuming."""
        options = self.options
        _seed_everything(options.seed + self.rank)
        self.index = load_dataset(options.data, options.classes)
        self.run_folder.check(options.resume, options.overwrite)
        if self.is_main and options.resume:  # resuming reads last/: put back a checkpoint a kill left half-swapped
            self.prepare_run_folder()
        if self.world > 1:
            dist.barrier()
        resume_state = self.build_model()
        self.check_model_options()
        if self.is_main and not options.resume:  # an earlier run is replaced only once the new one's model is built
            self.prepare_run_folder()
        config = self.config
        normalization = IntensityNormalization.from_dict(config.intensity)
        if not self.split["train"]:
            raise DataError("the split leaves no training case", options.data)
        common = dict(normalization=normalization, split=self.split, axis=config.slice_axis,
                      image_size=config.image_size, seed=options.seed, color=config.color_input)
        self.train_set = SliceDataset(self.index, "train", empty_fraction=options.empty_fraction, **common)
        val_name = "val" if self.split.get("val") else "train"
        if val_name == "train":
            logger.warning("no validation cases: validating on the training cases")
        self.val_set = SliceDataset(self.index, val_name, empty_fraction=options.empty_fraction, **common)
        if len(self.train_set) == 0:
            raise DataError("no training slice holds any labelled voxel", options.data)
        self.check_classes_present()
        if self.is_main:
            self.out.mkdir(parents=True, exist_ok=True)
            save_split(self.split, self.out / "split.json")

        self.model.set_encoder_training(options.train_encoder)
        model = self.model.place(self.device)
        if options.compile is not None:
            model.compile_training(options.compile)
        optimizer_class = torch.optim.AdamW if options.optimizer == "adamw" else torch.optim.Adam
        self.optimizer = optimizer_class(model.trainable_parameters(), lr=options.lr, weight_decay=options.weight_decay,
                                         **fused_optimizer(self.device))
        self.net = model
        if self.world > 1:
            self.net = torch.nn.parallel.DistributedDataParallel(
                model, device_ids=[self.device.index] if self.device.type == "cuda" else None,
                find_unused_parameters=True)
        self.loss = CoTexNetLoss(config)
        self.dice = DatasetDice(config.num_classes)
        self.prompts = (PromptSource(options, config)
                        if config.uses_text_encoder_in_training and config.use_real_text else None)
        self.flips = self.choose_flips() if options.augment and (
            self.prompts is None or not self.prompts.cached_per_slice) else False
        self.dtype = autocast_dtype(self.device, "auto")
        # fp16 (GPUs without bf16) needs loss scaling against gradient underflow; bf16 and fp32 do not.
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=self.dtype == torch.float16)
        self.clock = PhaseClock(self.device, None)  # bench --train gives it a dict: seconds per phase of the step
        self.batch_size, self.accumulate = self.choose_batch(resume_state)
        self.train_loader, self.val_loader = self.make_loaders(self.batch_size)
        self.steps = math.ceil(len(self.train_loader) / self.accumulate)  # optimiser steps
        if options.max_steps_per_epoch is not None:
            self.steps = min(self.steps, options.max_steps_per_epoch)
        self.scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(self.optimizer,
                                                                    T_max=max(1, options.epochs * self.steps))
        self.start_epoch = 1 if resume_state is None else restore_trainer_state(self, resume_state) + 1
        self.cache = self.make_cache()
        recipe = {name: getattr(options, name) for name in RECIPES[options.recipe]}
        logger.info("recipe '%s' for backbone %s: %s", options.recipe, options.backbone,
                    ", ".join(f"{k} {v}" for k, v in recipe.items()))
        logger.info("augmentation %s", self.flips_info()["rule"])

    def choose_flips(self) -> FlipRule | bool:
        """The flips of ``--flips``: ``anatomy`` gives the :class:`FlipRule` of the training cases' slice plane
        and orientation (none when the cases disagree), ``all`` both axes label-blind, ``none`` no flips."""
        mode = self.options.flips
        if mode != "anatomy":
            return mode == "all"
        classes, rules = self.config.classes, set()
        for case_id in self.split["train"]:
            geometry = read_image_geometry(self.index.case(case_id).image_path)
            direction = geometry.direction if geometry.ndim == 3 else None
            rules.add(flip_rule(array_slice_axis(geometry.ndim, direction, self.config.slice_axis), direction, classes))
        if len(rules) > 1:
            return FlipRule(axes=(), left_right_axis=None, pairs=(), reason="training cases differ in orientation")
        return rules.pop()

    def flips_info(self) -> dict:
        """The flip rule for the log and training.json."""
        if isinstance(self.flips, FlipRule):
            return {"mode": "anatomy", "rule": self.flips.describe(self.config.classes),
                    **self.flips.to_json(self.config.classes)}
        mode = "off" if not self.options.augment else self.options.flips if self.flips else "none"
        return {"mode": mode, "rule": "flips: both axes, labels untouched" if self.flips else "flips: none"}

    def make_cache(self):
        """A :class:`~cotexnet.feature_cache.FeatureCache` when ``--feature-cache auto`` and it can work: frozen
        encoder, one process, the CoTexNet variant, and room under the cap (in GPU memory when it all fits there,
        else on disk); else ``None`` (said why)."""
        from .feature_cache import CACHE_FOLDER, CacheLayout, FeatureCache, plan_cache

        options = self.options
        if options.feature_cache == "off":
            return None
        reasons = [why for why, blocked in (
            (f"the encoder trains (--train-encoder {options.train_encoder})", self.model.encoder_trains),
            ("torchrun", self.world > 1), ("the clipseg variant", self.config.variant != "cotexnet")) if blocked]
        if reasons:
            logger.info("feature cache off: %s", ", ".join(reasons))
            return None
        views = options.views if options.augment else 1
        layout = CacheLayout.of(self.model)
        folder = self.out / CACHE_FOLDER
        free_gpu = torch.cuda.mem_get_info(self.device)[0] if self.device.type == "cuda" else None
        plan = plan_cache(layout, len(self.train_set), views, options.cache_limit_gb * 2**30, folder, free_gpu)
        logger.info(plan.message)
        if plan.views == 0:
            self.emit("warning", message=plan.message)
            return None
        try:
            return FeatureCache(folder, layout, len(self.train_set), plan.views, plan.resident, self.device)
        except OSError as error:
            shutil.rmtree(folder, ignore_errors=True)
            raise CoTexNetError(f"{folder}: cannot reserve the feature cache on disk ({error.strerror}); free space "
                                f"there, lower --cache-limit-gb or pass --feature-cache off") from None

    def build_model(self) -> dict | None:
        """``self.model``, ``self.config`` and ``self.split``: a new model on the backbone, or the run in
        ``OUT/last`` when resuming (then its trainer state is returned)."""
        options, index = self.options, self.index
        never_saved = not any((self.out / name).exists() for name in ("best", "last"))
        if options.resume and never_saved:  # stopped (killed, diverged) before its first checkpoint
            message = f"{self.out}: the run saved no checkpoint before it ended; starting it from the beginning"
            logger.warning(message)
            self.emit("warning", message=message)
        elif options.resume:
            self.run_folder.check_resumable()
            self.model = CoTexNet.from_pretrained(self.last_dir)
            self.config = self.model.config
            if self.config.classes != index.classes:
                raise DataError(f"classes {index.classes} differ from the run being resumed ({self.config.classes})",
                                options.data)
            self.check_resume_options()
            state = self.run_folder.trainer_state()
            self.split = state["split"]
            return state
        if options.intensity is not None:
            normalization = IntensityNormalization.from_dict(options.intensity)
        else:
            normalization = IntensityNormalization.for_modality(options.modality or index.modality)
        self.config = _build_config(options, index, normalization, options.modality or index.modality)
        if options.init_from:
            self.model = initialized_from(options.init_from, self.config)
            self.config = self.model.config
        else:
            self.model = CoTexNet.from_config(self.config, cache_dir=options.cache_dir)
        self.split = split_cases(index, options.seed)
        return None

    def check_resume_options(self) -> None:
        """Refuse a resume whose options differ from the run's where the checkpoint's would silently win."""
        saved = read_training_info(self.last_dir).get("options", {})
        current = json.loads(json.dumps(asdict(self.options), default=str))
        was = {name: saved[name] for name in RESUME_FIXED_OPTIONS if name in saved and saved[name] != current[name]}
        now = {name: current[name] for name in was}
        for name, value in self.options.config_overrides.items():  # model settings: the bundle's config holds them
            if getattr(self.config, name, value) != value:
                was[name], now[name] = getattr(self.config, name), value
        if was:
            raise ConfigError(
                f"{self.out}: the run being resumed was started with "
                + ", ".join(f"{name}={value!r}" for name, value in was.items()) + "; now "
                + ", ".join(f"{name}={value!r}" for name, value in now.items())
                + ". A resumed run keeps its own settings: pass the run's values, or start a new run")

    def check_classes_present(self) -> None:
        """Labels without foreground train a model that predicts background and scores Dice 1.0: refuse them.

        A class in none of the training and validation masks is refused by name; one missing only from
        the training cases cannot be learnt, which is said as a warning.
        """
        train_voxels = self.train_set.class_voxels[1:]
        all_voxels = train_voxels + self.val_set.class_voxels[1:]
        classes = self.config.classes
        if not all_voxels.any():
            raise DataError(f"the masks hold no foreground (every voxel is 0), so there is nothing to learn for "
                            f"the classes {classes}", self.options.data)
        absent = [f"'{name}' (label {i})" for i, name in enumerate(classes, start=1) if not all_voxels[i - 1]]
        if absent:
            raise DataError(f"class {', '.join(absent)} appears in none of the training and validation masks; "
                            f"remove it from the classes or add masks that hold it", self.options.data)
        untrained = [name for i, name in enumerate(classes) if not train_voxels[i]]
        if untrained:
            message = f"classes {untrained} appear in no training case (only in validation): they cannot be learnt"
            logger.warning(message)
            self.emit("warning", message=message)

    def make_loaders(self, batch_size: int) -> tuple[DataLoader, DataLoader]:
        """Training loader (shuffled; a distributed sampler under torchrun) and validation loader."""
        options = self.options
        drop_last = len(self.train_set) > batch_size * self.world
        if options.oversample > 0:
            batches = ForegroundBatchSampler(self.train_set.class_presence(), batch_size, options.oversample,
                                             options.seed, self.rank, self.world, drop_last)
            # A loader without its own generator draws each epoch's worker seed from torch's global RNG, which
            # would shift the dropout stream of a run resumed mid-epoch.
            train_loader = DataLoader(self.train_set, batch_sampler=batches, num_workers=options.num_workers,
                                      generator=torch.Generator(), pin_memory=self.device.type == "cuda")
            return train_loader, DataLoader(self.val_set, batch_size=batch_size, num_workers=options.num_workers)
        sampler = (DistributedSampler(self.train_set, self.world, self.rank, shuffle=True, seed=options.seed)
                   if self.world > 1 else None)
        train_loader = DataLoader(self.train_set, batch_size=batch_size, shuffle=sampler is None, sampler=sampler,
                                  num_workers=options.num_workers, drop_last=drop_last,
                                  generator=torch.Generator(), pin_memory=self.device.type == "cuda")
        val_loader = DataLoader(self.val_set, batch_size=batch_size, num_workers=options.num_workers)
        return train_loader, val_loader

    # ------------------------------------------------------------------------------------------ training
    def train_epoch(self, epoch: int) -> tuple[int, dict[str, float]]:
        """Up to ``steps`` optimiser steps; returns (steps done, summed loss terms). Halves the batch on GPU OOM."""
        options = self.options
        if isinstance(self.train_loader.batch_sampler, ForegroundBatchSampler):
            self.train_loader.batch_sampler.set_epoch(epoch)
        elif isinstance(self.train_loader.sampler, DistributedSampler):
            self.train_loader.sampler.set_epoch(epoch)
        self.train_loader.generator.manual_seed(options.seed + epoch)
        self.augment_rng.manual_seed((options.seed * 1_000_003 + self.rank) * 10_007 + epoch)
        self.net.train()
        totals = dict.fromkeys(LOSS_TERMS, 0.0)
        done = 0
        iterator = iter(self.train_loader)
        if self.resume_from is not None and epoch == self.start_epoch:  # a checkpoint saved mid-epoch
            done, totals = self.resume_from["step"], dict(self.resume_from["totals"])
            # the same shuffled order as before the stop; skip what was trained on
            for _ in range(done * self.accumulate):
                next(iterator)
            self.augment_rng.set_state(self.resume_from["augment_rng"])
            message = f"resuming epoch {epoch} at step {done + 1} of {self.steps}, where it was stopped"
            logger.info(message)
            self.emit("resumed", epoch=epoch, step=done, steps=self.steps, message=message)
        self.first_step = done
        while done < self.steps:
            if any_rank(bool(self.stop), self.device, self.world):
                self.stopped = True
                break
            batches = list(itertools.islice(iterator, self.accumulate))
            if not batches:
                break
            try:
                terms = self.train_step(batches)
            except torch.cuda.OutOfMemoryError:
                self._halve_batch()
                iterator = iter(self.train_loader)
                continue
            if any_rank(not math.isfinite(terms["loss"]), self.device, self.world):
                raise self.diverged(epoch, done + 1, terms["loss"])
            done += 1
            self.steps_run += 1
            for key in totals:
                totals[key] += terms[key]
            remaining = (options.epochs - epoch) * self.steps + (self.steps - done)
            eta = (time.time() - self.started) / self.steps_run * remaining
            self.emit("step", epoch=epoch, step=done, steps=self.steps, lr=self.scheduler.get_last_lr()[0],
                      eta_s=round(eta, 1), **terms)
            self.bar.set_postfix(epoch=epoch, loss=f"{terms['loss']:.4f}", best_dice=f"{max(self.best, 0):.3f}",
                                 refresh=False)
            self.bar.update(1)
        return done, totals

    def diverged(self, epoch: int, step: int, loss: float) -> CoTexNetError:
        """The error that ends a run whose loss stopped being finite; the weights it has now are never saved."""
        if (self.last_dir / TRAINER_STATE).is_file():
            kept = (f"the last good checkpoint is kept in {self.last_dir}; start again with --overwrite, or with "
                    f"--init-from {self.best_dir} and a new --out to keep what was learnt")
        else:
            kept = "no checkpoint had been saved, so --resume starts the run anew"
        return CoTexNetError(f"training diverged at epoch {epoch}, step {step}: the loss is {loss}; lower --lr "
                             f"(now {self.options.lr}) and {kept}")

    def _halve_batch(self) -> None:
        """Out of GPU memory: half the batch, twice the batches per optimiser step, so the effective batch, the
        steps per epoch and the schedule stay the run's."""
        if self.batch_size == 1:
            raise CoTexNetError("out of GPU memory even with batch size 1; lower --image-size or use the CPU") from None
        self.optimizer.zero_grad(set_to_none=True)
        torch.cuda.empty_cache()
        effective = self.batch_size * self.accumulate
        self.batch_size = max(1, self.batch_size // 2)
        self.accumulate = max(1, effective // self.batch_size)
        message = (f"out of GPU memory: retrying with batch size {self.batch_size}, {self.accumulate} batches per "
                   f"optimiser step (effective batch {self.batch_size * self.accumulate})")
        self.emit("warning", message=message)
        logger.warning(message)
        self.train_loader, self.val_loader = self.make_loaders(self.batch_size)

    def _class_masks(self, labels: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        return torch.stack([(labels == c).to(dtype) for c in range(1, self.config.num_classes + 1)], dim=1)

    def _augmented(self, images: torch.Tensor, labels: torch.Tensor, generator: torch.Generator):
        """(images, labels, prompts or ``None``) of a batch after augmentation."""
        described = (images, labels)  # LMM answers are cached per original slice
        if self.options.augment:
            images, labels = augment_batch(images, labels, generator, flips=self.flips)
        if self.prompts is not None and not self.prompts.cached_per_slice:
            described = (images, labels)  # geometric attributes are exact for the augmented slice
        return images, labels, self.prompts(*described) if self.prompts is not None else None

    def cached_inputs(self, batch: dict, images: torch.Tensor, labels: torch.Tensor):
        """(labels, prompts, encoded features) of the batch from the feature cache, encoding and storing the
        (item, view) entries seen for the first time. Each sample draws one of its ``views``; view ``v`` of
        item ``i`` is the augmentation seeded by (seed, i, v), so it is the same whenever it is encoded."""
        cache, options = self.cache, self.options
        views = torch.randint(cache.views, (len(images),), generator=self.augment_rng).tolist()
        keys = [(int(item), view) for item, view in zip(batch["item"], views)]
        missing = cache.missing(keys)
        if missing:
            parts = []
            for k in missing:
                generator = torch.Generator().manual_seed((options.seed * 1_000_003 + keys[k][0]) * 101 + keys[k][1])
                parts.append(self._augmented(images[k:k + 1], labels[k:k + 1], generator))
            view_images = torch.cat([p[0] for p in parts])
            view_labels = torch.cat([p[1] for p in parts])
            prompts = [p[2][0] for p in parts] if self.prompts is not None else None
            with torch.no_grad(), self._autocast():
                encoded = self.model.encode_frozen(view_images, self._class_masks(view_labels, view_images.dtype))
            cache.put([keys[k] for k in missing], encoded, view_labels, prompts)
        encoded, labels, prompts = cache.get(keys, self.device)
        return labels, prompts, encoded

    def _autocast(self):
        return torch.autocast(self.device.type, dtype=self.dtype) if self.dtype is not None else nullcontext()

    def train_step(self, batches: list[dict]) -> dict[str, float]:
        """One optimiser step on the summed gradients of ``batches`` (``--accumulate``: an effective batch of their
        sizes' sum), each through :meth:`backward` with 1/len(batches) of its loss. Returns the loss terms averaged
        over the batches."""
        self.optimizer.zero_grad(set_to_none=True)
        sums = dict.fromkeys(LOSS_TERMS, 0.0)
        for index, batch in enumerate(batches):
            # DDP averages gradients across ranks at the last backward of the step only
            synced = self.net.no_sync() if self.world > 1 and index < len(batches) - 1 else nullcontext()
            with synced:
                terms = self.backward(batch, 1 / len(batches))
            for key, value in zip(LOSS_TERMS, (terms.total, terms.segmentation, terms.distillation)):
                sums[key] += value.item() / len(batches)
        with self.clock("optimizer"):
            if self.options.grad_clip > 0:
                self.scaler.unscale_(self.optimizer)
                torch.nn.utils.clip_grad_norm_(self.model.trainable_parameters(), self.options.grad_clip)
            self.scaler.step(self.optimizer)
            self.scaler.update()
            self.scheduler.step()
        return sums

    def backward(self, batch: dict, weight: float, cached: bool = True):
        """Augment, describe (real-text prompts), forward, score with :class:`CoTexNetLoss` and back-propagate
        ``weight`` x the loss of one batch; returns the loss terms. With the feature cache (and ``cached``), the
        frozen encoders' outputs (and the view's labels and prompts) come from :meth:`cached_inputs` instead."""
        model, device, clock = self.model, self.device, self.clock
        with clock("data"):
            images = batch["image"].to(device, non_blocking=True)
            labels = batch["label"].to(device, non_blocking=True)
            encoded = None
            if self.cache is not None and cached:
                labels, prompts, encoded = self.cached_inputs(batch, images, labels)
            else:
                images, labels, prompts = self._augmented(images, labels, self.augment_rng)
            masks = self._class_masks(labels, images.dtype)
            text_ids = model.encode_prompts(prompts) if prompts is not None else None
        with clock("forward"):
            with self._autocast():
                output = self.net(images, masks, text_ids, encoded)
            terms = self.loss(output, labels)
        with clock("backward"):
            self.scaler.scale(terms.total * weight).backward()
        return terms

    def choose_batch(self, resume_state: dict | None) -> tuple[int, int]:
        """(batch size, batches per optimiser step): a resumed run's own (as an out-of-memory retry may have left
        them), else ``--batch-size`` and ``--accumulate``. ``--batch-size auto`` is, on a GPU, the largest batch
        whose step fits half the free memory (:meth:`step_memory`, :func:`train_batch_size`), and the recipe's
        off a GPU."""
        options = self.options
        if resume_state is not None and "batch_size" in resume_state:
            return int(resume_state["batch_size"]), int(resume_state["accumulate"])
        if options.batch_size != "auto":
            return options.batch_size, options.accumulate
        recipe = RECIPES[options.recipe]["batch_size"]
        if self.device.type != "cuda":
            logger.info("batch size auto: the recipe's %d (no GPU to size it for)", recipe)
            return recipe, options.accumulate
        fixed, per_slice = self.step_memory()
        optimizer_state = 2 * sum(p.numel() * 4 for p in self.model.trainable_parameters())  # Adam's two moments
        free = torch.cuda.mem_get_info(self.device)[0]
        batch = min(train_batch_size(free - optimizer_state, fixed, per_slice), len(self.train_set))
        if self.world > 1:  # every rank trains on the batch the fullest GPU allows
            smallest = torch.tensor([batch], device=self.device)
            dist.all_reduce(smallest, op=dist.ReduceOp.MIN)
            batch = int(smallest.item())
        logger.info("batch size auto: %d (a step takes %.0f MiB + %.1f MiB per slice; %.1f GiB free)", batch,
                    fixed / 2**20, per_slice / 2**20, free / 2**30)
        return batch, options.accumulate

    def step_memory(self) -> tuple[int, int]:
        """(bytes a training step takes besides its slices, bytes per slice) on this GPU, from the peak memory of
        an uncached forward and backward (the larger step) on one and on two training slices."""
        from torch.utils.data import default_collate

        peaks = []
        for count in (1, 2):
            batch = default_collate([self.train_set[index % len(self.train_set)] for index in range(count)])
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            base = torch.cuda.memory_allocated(self.device)
            self.backward(batch, 1.0, cached=False)
            self.optimizer.zero_grad(set_to_none=True)
            peaks.append(torch.cuda.max_memory_allocated(self.device) - base)
        per_slice = max(1, peaks[1] - peaks[0])
        return max(0, peaks[0] - per_slice), per_slice

    def validate(self) -> tuple[float, list[float]]:
        """Dice of each class over all validation slices, and their mean (test-time path, no text)."""
        self.model.eval()
        self.dice.reset()
        with torch.inference_mode(), self._autocast():
            for batch in self.val_loader:
                logits = self.model(batch["image"].to(self.device))
                self.dice(logits.float().argmax(1).cpu(), batch["label"])
        return self.dice.aggregate()

    def end_epoch(self, epoch: int, done: int, totals: dict, val_dice: float, per_class: list[float]) -> None:
        """Early-stopping bookkeeping, the metrics row, checkpoints (rank 0) and the ``epoch`` event."""
        improved = val_dice > self.best
        if improved:
            self.best, self.stale = val_dice, 0
        else:
            self.stale += 1
        classes = self.config.classes
        row = {"epoch": epoch, **{k: round(v / max(done, 1), 6) for k, v in totals.items()},
               "val_dice": round(val_dice, 6), **{f"val_dice_{c}": round(d, 6) for c, d in zip(classes, per_class)},
               "lr": self.scheduler.get_last_lr()[0], "seconds": round(time.time() - self.started, 1)}
        self.history.append(row)
        if self.is_main:
            self.save_checkpoint(improved)
        eta = (time.time() - self.started) / max(epoch - self.start_epoch + 1, 1) * (self.options.epochs - epoch)
        self.emit("epoch", epoch=epoch, epochs=self.options.epochs, loss=row["loss"], loss_seg=row["loss_seg"],
                  loss_kd=row["loss_kd"], val_dice=row["val_dice"], val_dice_per_class=dict(zip(classes, per_class)),
                  best_val_dice=self.best, lr=row["lr"], eta_s=round(eta, 1), improved=improved)

    # --------------------------------------------------------------------------------------- checkpoints
    def save_checkpoint(self, improved: bool, totals: dict | None = None) -> None:
        """``best/`` when validation improved, ``last/`` with the trainer state (``--resume``), metrics.csv
        (:class:`~cotexnet.checkpoints.RunFolder`). ``totals`` (the loss sums so far) marks a checkpoint saved
        mid-epoch, after ``self.step`` steps."""
        from safetensors import SafetensorError

        try:
            self.run_folder.save(self.model, self.training_info(), trainer_state(self, totals), improved, self.history)
        except (OSError, SafetensorError) as error:  # e.g. a full disk; the earlier checkpoints stay as they were
            raise CoTexNetError(f"{self.out}: the checkpoint of epoch {self.epoch} could not be written "
                                f"({error_summary(error)}); free space there or choose another --out") from None

    def finish(self) -> Path:
        if self.world > 1:
            dist.barrier()
        if not (self.best_dir / "config.json").is_file() and self.is_main:
            # Stopped before the first validation: the current weights are the best there are.
            self.model.save_pretrained(self.best_dir, training_info=self.training_info())
        if self.cache is not None:
            self.cache.close()
        if self.is_main and self.split.get("val"):  # 3D post-processing chosen on validation (cotexnet.postprocess)
            fit_postprocessing(self.best_dir, index=self.index, case_ids=self.split["val"], device=self.device)
        if self.is_main:  # the card's 3D metrics (Dice, IoU, HD95) on the validation and test cases
            for part in ("val", "test"):
                if self.split.get(part):
                    record_evaluation(self.best_dir, evaluate(self.best_dir, self.options.data, split=part,
                                                              show_progress=False, device=self.device))
        self.emit("done", bundle=str(self.best_dir), best_val_dice=self.best if self.best > -math.inf else None,
                  stopped=self.stopped, epoch=self.epoch, step=self.step)
        return self.best_dir

    def training_info(self) -> dict:
        """``training.json`` of the bundles: data, split, history and the options of this run."""
        options, best = self.options, self.best
        return {
            "data": str(Path(options.data).resolve()), "format": self.index.format, "classes": self.config.classes,
            "split": self.split, "epochs_run": self.epoch, "best_val_dice": best if best > -math.inf else None,
            "history": self.history, "concept_backend": options.concept_backend,
            "slices": {"train": len(self.train_set), "val": len(self.val_set)} if hasattr(self, "val_set") else {},
            "sources": {part: [self.index.case(case).image_path.name for case in cases]
                        for part, cases in self.split.items()},
            "recipe": {"name": options.recipe, **{name: getattr(options, name) for name in RECIPES[options.recipe]}},
            "batch": {"size": self.batch_size, "accumulate": self.accumulate} if hasattr(self, "batch_size") else None,
            "augmentation": self.flips_info() if hasattr(self, "flips") else None,
            "attributes": options.attributes or ["number", "shape", "size", "color", "location", "keyword"],
            "options": {k: v for k, v in asdict(options).items()
                        if k not in ("progress_file", "stop_file", "resume", "overwrite")},
            "torch": torch.__version__, "python": sys.version.split()[0],
        }
