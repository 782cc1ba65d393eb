"""The ``cotexnet`` command: train, segment, evaluate, postprocess, concepts, bench, demo.

Errors the user can fix (bad data, bad bundle, bad option) print one clear line and exit with code 2;
``--json`` prints a machine-readable result on stdout for scripts.
"""
from __future__ import annotations

import argparse
import json
import logging
import math
import os
import sys
from pathlib import Path

from .atomic import json_default
from .config import (COMPILE_MODES, CONCEPT_BACKENDS, DEFAULT_IMAGE_SIZE, DEVICES, EVALUATION_SPLITS,
                     FEATURE_CACHE_MODES, FLIP_MODES, KD_MODES, KL_FORMS, OPTIMIZERS, PRECISIONS, PROBABILITY_FORMATS,
                     RECIPES, SLICE_AXES, TRAIN_ENCODER_HELP, VARIANTS, CoTexNetConfig, TrainOptions, validate_planes)
from .errors import CoTexNetError


def _print_json(data) -> None:
    print(json.dumps(_finite(data), indent=2, default=json_default))


def _finite(value):
    """NaN/inf (e.g. HD95 with an empty mask) become null so the output is strict JSON."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite(v) for v in value]
    return value


def _default(cls, name: str):
    """The default of a dataclass field (TrainOptions, CoTexNetConfig): defaults live in cotexnet.config only."""
    return cls.__dataclass_fields__[name].default


# --------------------------------------------------------------------------------------------- train
def _add_train(sub) -> None:
    train, model = (lambda name: _default(TrainOptions, name)), (lambda name: _default(CoTexNetConfig, name))
    recipes = "; ".join(f"{name}: " + ", ".join(f"{k} {v}" for k, v in values.items()) for name, values in RECIPES.items())
    p = sub.add_parser("train", help="train a CoTexNet model on a labelled dataset",
                       description="Train CoTexNet. Options not given come from the backbone's recipe (pretrained "
                                   f"CLIPSeg: paper; tiny, full-random: random) - {recipes}. "
                                   "DATA: images/+masks/ folder, nnU-Net v2 raw or MSD dataset.")
    p.add_argument("data", help="dataset folder")
    p.add_argument("--out", required=True, help="output folder (best/ and last/ bundles, metrics.csv)")
    p.add_argument("--classes", nargs="+", help="class names in label order (default: from dataset.json)")
    p.add_argument("--keywords", nargs="+", help="one prompt keyword per class (default: the class names)")
    p.add_argument("--backbone", default=train("backbone"), help="Hugging Face id, local folder, or 'tiny'")
    p.add_argument("--cache-dir", help="where a Hugging Face backbone is downloaded once (default: the HF cache; "
                                       "HF_HUB_OFFLINE=1 uses the cache only)")
    p.add_argument("--image-size", type=int, help="default: the recipe's")
    p.add_argument("--epochs", type=int, help="default: the recipe's")
    p.add_argument("--batch-size", type=_batch_size, help="slices per batch, or auto: on a GPU the largest batch "
                                                          "whose step fits half the free memory (default: the recipe's)")
    p.add_argument("--accumulate", type=int, default=train("accumulate"),
                   help="batches whose gradients each optimiser step sums (an effective batch of accumulate x "
                        "batch size, for a device too small for the batch)")
    p.add_argument("--lr", type=float, help="default: the recipe's")
    p.add_argument("--compile", choices=COMPILE_MODES,
                   help="torch.compile the step's text encoder and decoder (reduce-overhead: CUDA graphs)")
    p.add_argument("--train-encoder", help=f"image-encoder layers that train: {TRAIN_ENCODER_HELP} (default: the "
                                           "recipe's); anything but none turns the feature cache off")
    p.add_argument("--init-from", help="start from this bundle's (or run folder's) weights: same classes, or "
                                       "matched by name with new classes added")
    p.add_argument("--optimizer", choices=OPTIMIZERS, default=train("optimizer"))
    p.add_argument("--weight-decay", type=float, default=train("weight_decay"))
    p.add_argument("--patience", type=int, help="early stop after this many epochs without improvement "
                                                "(default: the recipe's)")
    _add_device(p, train("device"))
    p.add_argument("--seed", type=int, default=train("seed"))
    p.add_argument("--grad-clip", type=float, default=train("grad_clip"), help="max gradient norm (0 disables)")
    p.add_argument("--no-augment", action="store_true", help="no random zoom/flip")
    p.add_argument("--flips", choices=FLIP_MODES, default=train("flips"),
                   help="anatomy: left-right only, left/right classes swapped; all: both axes, labels untouched")
    p.add_argument("--oversample", type=float, default=train("oversample"),
                   help="share of each batch drawn from slices holding a class (0: off)")
    p.add_argument("--feature-cache", choices=FEATURE_CACHE_MODES, default=train("feature_cache"),
                   help="cache the frozen encoders' outputs per slice and view, in GPU memory when they all fit "
                        "there, else under OUT (auto: when it fits)")
    p.add_argument("--views", type=int, default=train("views"), help="cached augmented views per slice")
    p.add_argument("--cache-limit-gb", type=float, default=train("cache_limit_gb"),
                   help="size cap of the feature cache on disk; beyond it features are computed on the fly "
                        "(in GPU memory the cap is half the free memory)")
    p.add_argument("--empty-fraction", type=float, default=train("empty_fraction"),
                   help="share of slices without labels kept")
    p.add_argument("--slice-axis", choices=SLICE_AXES, default=train("slice_axis"))
    p.add_argument("--modality", help="CT, MR, US or RGB (default: from dataset.json; sets intensity normalisation)")
    p.add_argument("--ct-window", type=_ct_window,
                   help="CT window preset (soft_tissue, lung, bone, brain, liver) or CENTER,WIDTH")
    p.add_argument("--variant", choices=VARIANTS, default=model("variant"))
    p.add_argument("--clipseg-prompt", default=model("clipseg_prompt"), help="fixed prompt of the clipseg variant")
    for switch in ("real-text", "pseudo-text", "text-encoder", "text-module"):
        p.add_argument(f"--no-{switch}", action="store_true", help=f"ablation: without the {switch.replace('-', ' ')}")
    p.add_argument("--kd-mode", choices=KD_MODES, default=model("kd_mode"))
    p.add_argument("--kl-form", choices=KL_FORMS, default=model("kl_form"))
    p.add_argument("--kd-weight", type=float, default=model("kd_weight"),
                   help="weight of the distillation term (authors' code: 10)")
    p.add_argument("--alpha-init", type=float, default=model("alpha_init"))
    p.add_argument("--dropout", type=float, default=model("dropout"))
    p.add_argument("--attributes", nargs="+", help="concept attributes kept in prompts (default: all)")
    _add_concept_backend(p, prefix="concept-")
    p.add_argument("--concept-cache", help="JSONL cache of concept attributes (default: OUT/concepts.jsonl)")
    p.add_argument("--max-steps-per-epoch", type=int, help="cap steps per epoch (quick runs)")
    p.add_argument("--workers", type=int, default=train("num_workers"), help="DataLoader worker processes")
    p.add_argument("--progress-file", help="append JSON-lines progress events to this file")
    p.add_argument("--progress-json", action="store_true", help="print JSON-lines progress events on stdout")
    p.add_argument("--stop-file", help="stop cleanly when this file appears")
    again = p.add_mutually_exclusive_group()
    again.add_argument("--resume", action="store_true", help="continue the run in --out from its last checkpoint")
    again.add_argument("--overwrite", action="store_true", help="replace the run already in --out (its best/, last/ "
                                                                "and metrics.csv are deleted)")
    p.set_defaults(func=_run_train)


def _add_device(p, default: str = "auto") -> None:
    p.add_argument("--device", default=default, help=f"{', '.join(DEVICES)} or cuda:N")


def _planes(text: str) -> list[str]:
    try:
        return validate_planes(text)
    except CoTexNetError as error:
        raise argparse.ArgumentTypeError(str(error)) from None


def _add_inference(p) -> None:
    """Options of :func:`cotexnet.infer.predict_volume` shared by segment, evaluate and postprocess."""
    _add_device(p)
    p.add_argument("--batch-size", type=_positive_int, help="slices per batch (default: from free GPU memory on CUDA, else 16)")
    p.add_argument("--precision", choices=PRECISIONS, default="auto")
    views = p.add_mutually_exclusive_group()
    views.add_argument("--axis", choices=SLICE_AXES, help="slice axis (default: the model's)")
    views.add_argument("--planes", type=_planes, metavar="PLANES",
                       help="average the class probabilities of passes along these views, e.g. axial,coronal,sagittal "
                            "(default: the bundle's recommendation, else its slice axis)")
    p.add_argument("--tta", action="store_true",
                   help="test-time augmentation: also the flips laterality allows (left-right, pairs swapped)")
    p.add_argument("--compile", choices=COMPILE_MODES,
                   help="run the model through torch.compile (reduce-overhead: CUDA graphs)")


def _inference_options(args) -> dict:
    options = dict(batch_size=args.batch_size, device=args.device, precision=args.precision, axis=args.axis,
                   planes=args.planes, tta=args.tta, compile=args.compile)
    if hasattr(args, "no_postprocess"):
        options["postprocess"] = not args.no_postprocess
    return options


def _add_concept_backend(p, prefix: str = "") -> None:
    p.add_argument(f"--{prefix}backend", choices=CONCEPT_BACKENDS, default=_default(TrainOptions, "concept_backend"),
                   help="concept attribute backend")
    p.add_argument(f"--{prefix}model", help="LLaVA folder/Hugging Face id, or the model name on the server")
    p.add_argument(f"--{prefix}base-url", help="OpenAI-compatible server URL (e.g. http://127.0.0.1:11434/v1)")
    p.add_argument(f"--{prefix}api-key-env", help="environment variable holding the server's API key")


def _backend_options(args, prefix: str = "") -> dict:
    key = prefix.replace("-", "_")
    options = {}
    for name in ("model", "base_url", "api_key_env"):
        value = getattr(args, f"{key}{name}")
        if value is not None:
            options[name] = value
    return options


def _ct_window(text: str) -> dict:
    """``--ct-window``: a preset name, or CENTER,WIDTH in Hounsfield units (checked by the normalisation)."""
    if "," not in text:
        return {"mode": "ct", "window": text}
    try:
        center, width = (float(v) for v in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a preset name or two numbers CENTER,WIDTH (e.g. 40,400), "
                                         f"got {text!r}") from None
    return {"mode": "ct", "window": "custom", "center": center, "width": width}


def _run_train(args) -> int:
    from .train import TrainOptions, Trainer

    overrides = {"variant": args.variant, "clipseg_prompt": args.clipseg_prompt, "kd_mode": args.kd_mode,
                 "kl_form": args.kl_form, "kd_weight": args.kd_weight, "alpha_init": args.alpha_init,
                 "dropout": args.dropout, "use_real_text": not args.no_real_text,
                 "use_pseudo_text": not args.no_pseudo_text, "use_text_encoder": not args.no_text_encoder,
                 "use_text_module": not args.no_text_module}
    options = TrainOptions(
        data=args.data, out=args.out, classes=args.classes, keywords=args.keywords, backbone=args.backbone,
        cache_dir=args.cache_dir, image_size=args.image_size, epochs=args.epochs, batch_size=args.batch_size,
        accumulate=args.accumulate, compile=args.compile, lr=args.lr,
        train_encoder=args.train_encoder, init_from=args.init_from, flips=args.flips, oversample=args.oversample,
        feature_cache=args.feature_cache, views=args.views, cache_limit_gb=args.cache_limit_gb,
        optimizer=args.optimizer, weight_decay=args.weight_decay, patience=args.patience, device=args.device,
        seed=args.seed, grad_clip=args.grad_clip, augment=not args.no_augment, empty_fraction=args.empty_fraction,
        slice_axis=args.slice_axis, modality=args.modality, intensity=args.ct_window,
        concept_backend=args.concept_backend, concept_options=_backend_options(args, "concept-"),
        concept_cache=args.concept_cache or str(Path(args.out) / "concepts.jsonl"), attributes=args.attributes,
        max_steps_per_epoch=args.max_steps_per_epoch, num_workers=args.workers,
        progress_file=args.progress_file, progress_stdout=args.progress_json, show_progress=not args.progress_json,
        stop_file=args.stop_file, resume=args.resume, overwrite=args.overwrite, config_overrides=overrides)
    trainer = Trainer(options)
    best = trainer.run()
    if not args.progress_json:
        print(f"best model: {best}")
    if trainer.stop.signal is not None:  # Ctrl-C or kill: what was done is saved, the run is not finished
        print(f"cotexnet train: interrupted after epoch {trainer.epoch}, step {trainer.step}; continue with "
              f"--resume", file=sys.stderr)
        return 128 + trainer.stop.signal
    return 0


# ------------------------------------------------------------------------------------------- segment
def _add_segment(sub) -> None:
    p = sub.add_parser("segment", help="segment images or volumes with a trained model",
                       description="Segment NIfTI, NRRD, MHA, DICOM series folders and PNG/JPG/TIFF images. Writes "
                                   "<name>_labels.<ext> (input geometry) and <name>.seg.nrrd per input.")
    p.add_argument("model", help="model bundle folder, a training run folder (RUN means RUN/best), or a Hugging Face "
                                 "Hub repository id owner/name[@revision] (downloaded once, then cached)")
    p.add_argument("inputs", nargs="*", help="image files or DICOM folders")
    p.add_argument("--out", required=True, help="output folder")
    _add_inference(p)
    p.add_argument("--no-postprocess", action="store_true", help="skip the bundle's 3D post-processing")
    p.add_argument("--probabilities", nargs="?", const="uint8", choices=PROBABILITY_FORMATS,
                   help="also write <name>_prob_<class> maps in the input geometry (uint8 0-255, the default, or float32)")
    p.add_argument("--no-seg-nrrd", action="store_true", help="do not write Slicer .seg.nrrd files")
    p.add_argument("--dicom-seg", action="store_true",
                   help="also write <name>_seg.dcm, a DICOM Segmentation referencing each DICOM input series "
                        "(FRACTIONAL with --probabilities, else BINARY; needs the 'dicom' extra)")
    p.add_argument("--reference", nargs="+", help="ground-truth label maps, one per input, to report Dice")
    p.add_argument("--json", action="store_true", help="print the results as JSON")
    p.add_argument("--overwrite", action="store_true", help="replace outputs an earlier run left in --out")
    _add_cohort(p)
    p.set_defaults(func=_run_segment)


def _add_cohort(p) -> None:
    """The options of a cohort run (:mod:`cotexnet.cohort`)."""
    p.add_argument("--inputs", nargs="+", metavar="LIST", dest="cohort_inputs",
                   help="studies as a manifest (.txt/.lst: one path per line; .csv: a 'path' column and an optional "
                        "'id' column naming the outputs; relative paths are relative to the manifest), files, DICOM "
                        "folders or glob patterns; runs as a cohort: resumable, one report (OUT/report.csv, .json)")
    p.add_argument("--num-parts", type=int, help="split the cohort into this many shares (e.g. a Slurm array's size)")
    p.add_argument("--part-id", type=int, help="the share this process segments, 0 .. num-parts - 1 "
                                              "(e.g. $SLURM_ARRAY_TASK_ID)")
    p.add_argument("--read-ahead", type=int, default=2,
                   help="studies read and written on background threads while one is segmented (cohort; 0: none)")
    p.add_argument("--no-confidence", action="store_true",
                   help="cohort: skip the per-class mean confidence in the report (saves a probability volume)")


def _is_cohort(args) -> bool:
    """A manifest, a share, or torchrun makes ``segment`` a cohort run."""
    return bool(args.cohort_inputs) or args.num_parts is not None or args.part_id is not None \
        or int(os.environ.get("WORLD_SIZE", "1")) > 1


def _run_segment(args) -> int:
    from .infer import check_output_folder, resolve_device, segment_files
    from .model import CoTexNet

    if _is_cohort(args):
        from .cohort import run_command

        return run_command(args, _inference_options(args))
    if not args.inputs:
        raise CoTexNetError("no inputs: give image files, DICOM folders or --inputs LIST")
    check_output_folder(Path(args.out))
    device = resolve_device(args.device)
    model = CoTexNet.from_pretrained(args.model, device=device)
    options = {**_inference_options(args), "device": device}
    results = segment_files(model, args.inputs, args.out, references=args.reference, seg_nrrd=not args.no_seg_nrrd,
                            probabilities=args.probabilities, show_progress=not args.json, overwrite=args.overwrite,
                            dicom_seg=args.dicom_seg, **options)
    failed = [r for r in results if "error" in r]
    if args.json:
        _print_json({"model": args.model, "device": str(device), "results": results})
    else:
        for result in results:
            if "error" in result:
                print(f"FAILED  {result['error']}", file=sys.stderr)
            else:
                dice = "  Dice " + ", ".join(f"{k} {v:.3f}" for k, v in result["dice"].items()) if "dice" in result else ""
                print(f"ok      {result['input']} -> {result['labels']} ({result['seconds']} s){dice}")
        print(f"{len(results) - len(failed)} segmented, {len(failed)} failed")
    return 1 if failed else 0


# ------------------------------------------------------------------------------------------ evaluate
def _add_evaluate(sub) -> None:
    p = sub.add_parser("evaluate", help="Dice, IoU, HD95 and pixel accuracy of a model on a labelled dataset")
    p.add_argument("model", help="model bundle folder, or a training run folder (RUN means RUN/best)")
    p.add_argument("data", help="labelled dataset folder")
    p.add_argument("--split", choices=EVALUATION_SPLITS, default="test")
    _add_inference(p)
    p.add_argument("--no-postprocess", action="store_true", help="skip the bundle's 3D post-processing")
    p.add_argument("--json", action="store_true", help="print per-class, mean and per-case results as JSON")
    p.set_defaults(func=_run_evaluate)


def _run_evaluate(args) -> int:
    from .infer import evaluate

    result = evaluate(args.model, args.data, split=args.split, show_progress=not args.json, **_inference_options(args))
    if args.json:
        _print_json(result)
    else:
        inference = result["inference"]
        print(f"{args.split} split, {len(result['cases'])} case(s); planes {','.join(map(str, inference['planes']))}, "
              f"TTA {'on' if inference['tta'] else 'off'}, post-processing "
              f"{'on' if inference['postprocessing'] else 'off'}; segmentation {inference['segment_seconds']:.2f} s")
        print(result["table"])
    return 0


# ------------------------------------------------------------------------------------------ card / push
def _add_card(sub) -> None:
    p = sub.add_parser("card", help="rewrite a bundle's model card (README.md), recording evaluations",
                       description="Rewrites README.md of a bundle from its config and training record. Each "
                                   "--evaluation file (the output of `cotexnet evaluate MODEL DATA --json`) is stored "
                                   "in training.json under its split and shown on the card.")
    p.add_argument("model", help="model bundle folder, or a training run folder (RUN means RUN/best)")
    p.add_argument("--evaluation", nargs="+", default=[], help="JSON files written by `cotexnet evaluate --json`")
    p.add_argument("--license", help="Hugging Face license id for the card, e.g. apache-2.0 (kept for later rewrites)")
    p.set_defaults(func=_run_card)


def _run_card(args) -> int:
    from .bundle import bundle_folder
    from .card import record_evaluation, write_model_card
    from .hub import parse_repo_id

    if parse_repo_id(args.model):  # its files live in the Hugging Face cache, which is not ours to edit
        raise CoTexNetError(f"{args.model}: no such folder; card rewrites a local bundle (download a Hub model with "
                            f"hf download {args.model} --local-dir DIR and give DIR)")
    folder = bundle_folder(args.model)
    results = []
    for path in args.evaluation:  # all read before the bundle changes, so a bad file changes nothing
        try:
            results.append((path, json.loads(Path(path).read_text(encoding="utf-8"))))
        except (OSError, ValueError) as error:
            raise CoTexNetError(f"{path}: cannot read it as JSON ({error})") from None
    card = write_model_card(folder, args.license)
    for path, result in results:
        print(f"recorded the {record_evaluation(folder, result, path)} split from {path}")
    print(f"wrote {card}")
    return 0


def _add_push(sub) -> None:
    p = sub.add_parser("push", help="upload a bundle to the Hugging Face Hub",
                       description="Uploads config, safetensors weights, tokenizer files and the model card of a "
                                   "bundle (a run folder's best model) to a Hub model repository, created if missing. "
                                   "Never the training state of last/, nor training.json (it holds local paths). "
                                   "Log in first (hf auth login) or set HF_TOKEN.")
    p.add_argument("model", help="model bundle folder, or a training run folder (RUN means RUN/best)")
    p.add_argument("repo_id", help="Hub repository id, owner/name")
    p.add_argument("--private", action="store_true", help="create the repository private")
    p.add_argument("--revision", help="branch to push to (created from main if missing)")
    p.add_argument("--license", help="Hugging Face license id written into the card first, e.g. apache-2.0")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=_run_push)


def _run_push(args) -> int:
    from .bundle import push_bundle

    report = push_bundle(args.model, args.repo_id, private=args.private, revision=args.revision, license=args.license)
    if args.json:
        _print_json(report)
    else:
        print(f"pushed {report['bundle']} to {report['repo_id']}@{report['revision']} ({', '.join(report['files'])})")
        print(f"use it with: cotexnet segment {report['repo_id']}"
              + (f"@{report['revision']}" if args.revision else "") + " INPUT --out DIR")
    return 0


# --------------------------------------------------------------------------------------- postprocess
def _add_postprocess(sub) -> None:
    p = sub.add_parser("postprocess", help="choose a bundle's 3D post-processing on validation cases and store it",
                       description="Segment the validation cases of the split the bundle was trained with (or of the "
                                   "dataset's split) and keep, per class, each step (largest component, island "
                                   "removal, hole filling) that raises its Dice; the choice goes into config.json. "
                                   "Training does this by itself at its end.")
    p.add_argument("model", help="model bundle folder (rewritten in place)")
    p.add_argument("data", help="the labelled dataset it was trained on")
    _add_inference(p)
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=_run_postprocess)


def _run_postprocess(args) -> int:
    from .infer import fit_postprocessing

    report = fit_postprocessing(args.model, args.data, show_progress=not args.json, **_inference_options(args))
    if args.json:
        _print_json(report)
    else:
        for name, steps in report["classes"].items():
            kept = [f"{key}={value}" if key == "min_volume_mm3" else key for key, value in steps.items() if value]
            print(f"{name}: {', '.join(kept) or 'none'} (validation Dice {report['dice_before'][name]:.5f} -> "
                  f"{report['dice_after'][name]:.5f})")
    return 0


# ------------------------------------------------------------------------------------------ concepts
def _add_concepts(sub) -> None:
    p = sub.add_parser("concepts", help="compute and cache concept attributes of a dataset",
                       description="Fill the concept cache for a dataset and print how often each attribute value occurs.")
    p.add_argument("data", help="labelled dataset folder")
    p.add_argument("--keywords", nargs="+", help="one keyword per class (default: the class names)")
    p.add_argument("--classes", nargs="+", help="class names (default: from dataset.json)")
    _add_concept_backend(p)
    p.add_argument("--attributes", nargs="+", help="attributes to keep (default: all)")
    p.add_argument("--out", help="JSONL cache file (default: DATA/concepts.jsonl)")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=_run_concepts)


def _dataset_cases(index):
    """(case id, image, labels, spacing, direction) of every labelled case, read one at a time."""
    from .data import read_image, read_label_map

    class Cases:
        def __len__(self):
            return len(index.cases)

        def __iter__(self):
            for case in index.cases:
                image = read_image(case.image_path)
                labels = read_label_map(case.label_path, reference=image, classes=index.classes)
                direction = image.direction if image.ndim == 3 else None
                yield case.case_id, image.array, labels, image.spacing, direction

    return Cases()


def _run_concepts(args) -> int:
    from .concepts import format_summary, summarize_dataset
    from .data import load_dataset

    index = load_dataset(args.data, args.classes)
    cache = args.out or str(Path(args.data) / "concepts.jsonl")
    summary = summarize_dataset(_dataset_cases(index), args.keywords or index.classes, index.classes,
                                backend=args.backend, cache=cache, attributes=args.attributes,
                                progress=not args.json, **_backend_options(args))
    if args.json:
        _print_json(summary)
    else:
        print(format_summary(summary))
    return 0


# -------------------------------------------------------------------------------------- bench / demo
def _add_bench(sub) -> None:
    p = sub.add_parser("bench", help="CoTexNet vs stock CLIPSeg inference speed and memory, same run; --train: "
                                     "training steps/s with the feature cache off and on")
    p.add_argument("--train", action="store_true",
                   help="measure training steps (cached vs uncached frozen features) instead of inference")
    p.add_argument("--backbone", default="full-random", help="tiny, full-random, a Hugging Face id or a folder")
    _add_device(p)
    p.add_argument("--batch-size", type=_positive_int, default=8)
    p.add_argument("--image-size", type=_positive_int, default=DEFAULT_IMAGE_SIZE)
    p.add_argument("--classes", type=_positive_int, default=1, help="number of CoTexNet classes")
    p.add_argument("--precision", nargs="+", choices=[name for name in PRECISIONS if name != "auto"],
                   help="precisions to measure (default: fp32 bf16 on CPU, fp32 bf16 fp16 on CUDA)")
    p.add_argument("--iterations", type=_positive_int, default=5)
    p.add_argument("--warmup", type=_count, default=2)
    p.add_argument("--volume", type=_volume_shape, help="also time a synthetic CT volume end to end, e.g. 300x512x512")
    p.add_argument("--volume-batch-size", type=_positive_int,
                   help="slices per batch for --volume (default: from free GPU memory on CUDA, else --batch-size)")
    p.add_argument("--compile", choices=COMPILE_MODES,
                   help="torch.compile both sides; with --train, the step's text encoder and decoder (reduce-overhead: "
                        "CUDA graphs)")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=_run_bench)


def _run_bench(args) -> int:
    from .bench import bench, bench_train, format_report, format_train_report

    if args.train:
        report = bench_train(args.backbone, args.device, args.batch_size, args.image_size, args.classes,
                             iterations=args.iterations, compile=args.compile)
        if args.json:
            _print_json(report)
        else:
            print(format_train_report(report))
        return 0
    report = bench(args.backbone, args.device, args.batch_size, args.image_size, args.classes, args.precision,
                   args.iterations, args.warmup, args.volume, args.volume_batch_size, args.compile)
    if args.json:
        _print_json(report)
    else:
        print(format_report(report))
    return 0


def _integer_at_least(text: str, low: int) -> int:
    try:
        value = int(text)
    except ValueError:
        value = None
    if value is None or value < low:
        raise argparse.ArgumentTypeError(f"expected an integer >= {low}, got {text!r}")
    return value


def _batch_size(text: str) -> int | str:
    try:
        return text if text == "auto" else _positive_int(text)
    except argparse.ArgumentTypeError:
        raise argparse.ArgumentTypeError(f"expected an integer >= 1 or auto, got {text!r}") from None


def _positive_int(text: str) -> int:
    return _integer_at_least(text, 1)


def _count(text: str) -> int:
    return _integer_at_least(text, 0)


def _volume_shape(text: str) -> tuple[int, int, int]:
    """``--volume DxHxW``: three positive sizes."""
    try:
        shape = tuple(_positive_int(v) for v in text.lower().split("x"))
    except argparse.ArgumentTypeError:
        shape = ()
    if len(shape) != 3:
        raise argparse.ArgumentTypeError(f"expected DxHxW with three positive integers (e.g. 300x512x512), got {text!r}")
    return shape


def _add_demo(sub) -> None:
    p = sub.add_parser("demo", help="train a tiny model on real anatomy (MNI152, nilearn), segment, report Dice",
                       description="With no trained model at hand: trains a 'tiny' CoTexNet on the MNI152 T1 template "
                                   "with grey/white matter for about a minute on CPU, segments a held-out part and "
                                   "writes the label map, a .seg.nrrd, a PNG overlay and the concept attributes.")
    p.add_argument("--out", default="cotexnet-demo", help="output folder")
    p.add_argument("--epochs", type=int, default=60)
    p.add_argument("--image-size", type=int, default=96)
    p.add_argument("--max-steps-per-epoch", type=int)
    p.add_argument("--model", help="skip training and use this bundle")
    _add_device(p)
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=_run_demo)


def _run_demo(args) -> int:
    from .demo import run_demo

    report = run_demo(args.out, epochs=args.epochs, image_size=args.image_size, device=args.device,
                      max_steps_per_epoch=args.max_steps_per_epoch, show_progress=not args.json, model_path=args.model)
    if args.json:
        _print_json(report)
        return 0
    print("NOTE: the 'tiny' backbone is random-init and for demonstration only, not for clinical use.")
    for name, metrics in zip(["grey matter", "white matter"], report["metrics"]["per_class"]):
        print(f"Dice {name}: {metrics['dice']:.3f}")
    print(f"mean Dice on the held-out case: {report['metrics']['mean']['dice']:.3f}")
    for key in ("model", "labels", "segmentation", "overlay", "concepts"):
        print(f"{key:>12}: {report[key]}")
    for prompt in report["prompts"]:
        print(f"      prompt: {prompt}")
    print(f"done in {report['seconds']} s")
    return 0


def _add_app(sub) -> None:
    p = sub.add_parser("app", help="serve CoTexNet in the browser (trame-slicer; optional extra 'app')",
                       description="Starts the web app: open volumes from --data-root, segment, read the concept "
                                   "table, correct and save. Binds to 127.0.0.1 unless --host says otherwise; any "
                                   "other host needs a token (a random one is printed when --token is not given).")
    p.add_argument("--model", action="append", default=[],
                   help="model bundle or training run folder offered in the page (repeatable)")
    p.add_argument("--data-root", default=".", help="the only folder the page may read and write")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8080)
    p.add_argument("--token", help="required on every connection (default: random when --host is not loopback)")
    p.add_argument("--upload-limit-mb", type=float, default=512.0)
    p.add_argument("--max-sessions", type=int, default=4, help="browser sessions served at once (one scene each)")
    p.add_argument("--idle-timeout", type=float, default=120.0,
                   help="seconds after a browser session's last connection closed before its scene is dropped")
    _add_device(p)
    p.set_defaults(func=_run_app)


def _run_app(args) -> int:
    try:
        import trame_slicer  # noqa: F401  (checked here so the message names the missing extra)
        from cotexnet_app.launch import serve
    except ImportError as error:
        raise CoTexNetError(f"the web app needs the 'app' extra ({error}); run scripts/setup-app.sh "
                            "and use .venv-app/bin/cotexnet app") from error
    serve(data_root=args.data_root, models=args.model, host=args.host, port=args.port, token=args.token,
          device=args.device, upload_limit_mb=args.upload_limit_mb, max_sessions=args.max_sessions,
          idle_timeout=args.idle_timeout)
    return 0


# ------------------------------------------------------------------------------------------------ main
def build_parser() -> argparse.ArgumentParser:
    from . import __version__

    parser = argparse.ArgumentParser(prog="cotexnet", description="CoTexNet segmentation: train, segment, evaluate.")
    parser.add_argument("--version", action="version", version=f"cotexnet {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging and full tracebacks")
    sub = parser.add_subparsers(dest="command", required=True)
    for add in (_add_train, _add_segment, _add_evaluate, _add_postprocess, _add_card, _add_push, _add_concepts,
                _add_bench, _add_demo, _add_app):
        add(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO, format="%(levelname)s %(message)s")
    try:
        return args.func(args)
    except CoTexNetError as error:
        if args.verbose:
            raise
        print(f"cotexnet {args.command}: error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"cotexnet {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
