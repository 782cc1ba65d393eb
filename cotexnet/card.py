"""Model cards: the README.md every bundle carries, in the Hugging Face model-card form.

YAML metadata first (library, tags, task, license, base model), then what the model segments, the data it
was trained on (counts and file names, never local paths), its metrics, the recipe and post-processing,
intended use and limits, and how to run it. Everything comes from the bundle's ``config.json`` and
``training.json``: metrics are those training measured and those of evaluations recorded with
:func:`record_evaluation` (``cotexnet card BUNDLE --evaluation EVAL.json``), so a card never claims a
number nobody measured. The card is rewritten whenever the bundle is saved or post-processing is chosen.
"""
from __future__ import annotations

import json
import math
import os
from pathlib import Path

from .config import CONFIG_NAME, SYNTHETIC_BACKBONES, TRAINING_NAME, CoTexNetConfig
from .errors import CoTexNetError

CARD_NAME = "README.md"
TAGS = ("cotexnet", "clipseg", "medical-imaging", "image-segmentation", "3d-slicer")
#: The license field when the user has chosen none (Hugging Face's id for it).
NO_LICENSE = "unknown"
#: Training cases named on the card at most; the rest are counted.
MAX_SOURCES = 20


def _percent(value) -> str:
    return "n/a" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{100 * value:.2f}"


def _millimetres(value) -> str:
    return "n/a" if value is None or (isinstance(value, float) and not math.isfinite(value)) else f"{value:.2f}"


def card_title(config: CoTexNetConfig) -> str:
    return f"CoTexNet: {', '.join(config.classes)} ({config.modality}, {config.slice_axis} slices)"


def _metadata(config: CoTexNetConfig, license: str) -> list[str]:
    lines = ["---", "library_name: cotexnet", "pipeline_tag: image-segmentation", f"license: {license}", "tags:"]
    lines += [f"- {tag}" for tag in TAGS]
    if config.backbone in SYNTHETIC_BACKBONES:
        lines.append("- random-init-not-for-real-use")
    elif not Path(config.backbone).is_absolute() and config.backbone.count("/") == 1:
        lines.append(f"base_model: {config.backbone}")
    return lines + ["---", ""]


def _metrics_table(classes: list[str], per_class: list[dict], mean: dict) -> list[str]:
    lines = ["| Class | Dice (%) | IoU (%) | HD95 (mm) |", "|---|---|---|---|"]
    rows = list(zip(classes, per_class)) + ([("Mean", mean)] if len(classes) > 1 else [])
    return lines + [f"| {name} | {_percent(m.get('dice'))} | {_percent(m.get('iou'))} | {_millimetres(m.get('hd95'))} |"
                    for name, m in rows]


def _data_section(info: dict) -> list[str]:
    split = info.get("split") or {}
    if not split:
        return ["No training record travels with this bundle (it was saved outside `cotexnet train`).", ""]
    counts = ", ".join(f"{part} {len(split.get(part, []))}" for part in ("train", "val", "test"))
    lines = [f"- Dataset: `{Path(info.get('data', '')).name}` ({info.get('format', 'unknown')} layout); cases: {counts}"]
    slices = info.get("slices") or {}
    if slices:
        lines.append("- 2D slices: " + ", ".join(f"{part} {n}" for part, n in slices.items()))
    sources = (info.get("sources") or {}).get("train", [])
    if sources:
        more = f" and {len(sources) - MAX_SOURCES} more" if len(sources) > MAX_SOURCES else ""
        lines.append("- Training images: " + ", ".join(f"`{name}`" for name in sources[:MAX_SOURCES]) + more)
    return lines + [f"- Epochs run: {info.get('epochs_run', 'n/a')}", ""]


def _metrics_section(config: CoTexNetConfig, info: dict) -> list[str]:
    lines = []
    history = info.get("history") or []
    if history:
        best = max(history, key=lambda row: row.get("val_dice", -1.0))
        per_class = ", ".join(f"{name} {_percent(best.get(f'val_dice_{name}'))}" for name in config.classes)
        lines += [f"During training (2D validation slices, best epoch {best['epoch']}): mean Dice "
                  f"{_percent(best.get('val_dice'))} % ({per_class}).", ""]
    chosen = info.get("postprocessing") or {}
    if chosen.get("dice_after"):
        lines += ["3D validation Dice after the chosen post-processing: " + ", ".join(
            f"{name} {_percent(chosen['dice_after'].get(name))} %" for name in config.classes) + ".", ""]
    for part, result in sorted((info.get("evaluations") or {}).items()):
        lines += [f"### {part} split ({result['cases']} case(s) of `{result['data']}`, 3D volumes)", ""]
        lines += _metrics_table(config.classes, result["per_class"], result["mean"]) + [""]
    return lines or ["No metrics recorded yet: evaluate it (`cotexnet evaluate MODEL DATA --json > test.json`) and "
                     "record them (`cotexnet card MODEL --evaluation test.json`).", ""]


def _recipe_section(config: CoTexNetConfig, info: dict) -> list[str]:
    recipe = info.get("recipe") or {}
    steps = ", ".join(f"{k} {v}" for k, v in recipe.items() if k != "name")
    lines = [f"- Backbone: `{config.backbone}`; variant `{config.variant}`; image size {config.image_size} px; "
             f"intensity `{json.dumps(config.intensity)}`"]
    if recipe:
        lines.append(f"- Recipe `{recipe.get('name')}`: {steps}")
    batch = info.get("batch")
    if batch:  # what the run trained with: --batch-size auto and out-of-memory retries choose it
        lines.append(f"- Batch: {batch['size']} slices x {batch['accumulate']} accumulated = "
                     f"{batch['size'] * batch['accumulate']} per optimiser step")
    chosen = config.postprocessing or {}
    kept = [f"{name}: " + (", ".join(k if k != "min_volume_mm3" else f"islands < {v} mm³ removed"
                                     for k, v in steps.items() if v) or "none")
            for name, steps in chosen.items()]
    lines.append("- Post-processing: " + ("; ".join(kept) if kept else "none chosen"))
    return lines + [""]


def model_card(config: CoTexNetConfig, info: dict, license: str = NO_LICENSE, repo_id: str = "OWNER/NAME") -> str:
    """The card's text for a bundle's config and training record; ``repo_id`` is where it is shared."""
    random_init = config.backbone in SYNTHETIC_BACKBONES
    classes = "\n".join(f"| {i} | {name} | {config.keywords[i - 1]} | "
                        f"#{''.join(f'{round(255 * c):02x}' for c in config.colors[i - 1])} |"
                        for i, name in enumerate(config.classes, start=1))
    lines = _metadata(config, license) + [f"# {card_title(config)}", ""]
    if random_init:
        lines += [f"> **Built on the random-init `{config.backbone}` backbone: for tests and demonstrations only, "
                  f"not for real use.**", ""]
    lines += ["A CoTexNet segmentation model: CLIPSeg whose decoder learned text prompts from regions of interest "
              "during training and needs no text at inference.", "",
              "## What it segments", "",
              f"Modality {config.modality}; volumes are cut into {config.slice_axis} slices"
              + (f" and the probabilities of {', '.join(config.planes)} views averaged" if config.planes else "") + ".",
              "", "| Label | Class | Keyword | Colour |", "|---|---|---|---|", classes, "",
              "## Training data", ""] + _data_section(info)
    lines += ["## Metrics", ""] + _metrics_section(config, info)
    lines += ["## Recipe", ""] + _recipe_section(config, info)
    lines += ["## Intended use and limits", "",
              "Research use only; **not a medical device** and not for diagnosis or treatment. It was trained on the "
              "data above and may fail on other scanners, protocols, populations or anatomy; check every result.", "",
              "## How to use", "",
              "Command line (`pip install cotexnet`; add `[dicom]` for DICOM SEG output):", "", "```bash",
              f"cotexnet segment {repo_id} scan.nii.gz --out results/",
              f"cotexnet segment {repo_id} dicom_series/ --out results/ --dicom-seg", "```", "",
              f"3D Slicer: install the CoTexNet extension, open *CoTexNetSegment*, type `{repo_id}` (the Hub repository "
              "id) or the bundle folder into *Model*, choose the volume and click *Apply*.", "",
              f"Python: `CoTexNet.from_pretrained(\"{repo_id}\")` (downloaded once into the Hugging Face cache; "
              "afterwards it works with `HF_HUB_OFFLINE=1`). Only safetensors weights are read; nothing in the "
              "repository is executed.", ""]
    return "\n".join(lines)


def _read(folder: Path) -> tuple[CoTexNetConfig, dict]:
    """The config and training record of a local bundle folder (one this process saved or already checked)."""
    training = folder / TRAINING_NAME
    return (CoTexNetConfig.from_json_file(folder / CONFIG_NAME),
            json.loads(training.read_text(encoding="utf-8")) if training.is_file() else {})


def write_model_card(folder: str | os.PathLike, license: str | None = None, repo_id: str | None = None) -> Path:
    """(Re)write ``README.md`` of a bundle folder from its config and training record. ``license`` and ``repo_id``
    (where it is shared) are kept in ``training.json`` for later rewrites."""
    from .atomic import write_json_atomic, write_text_atomic

    folder = Path(folder)
    config, info = _read(folder)
    if license is not None and (not license.strip() or any(ch.isspace() for ch in license)):
        raise CoTexNetError(f"license: expected a Hugging Face license id such as apache-2.0 or cc-by-4.0, got {license!r}")
    chosen = {key: value for key, value in (("license", license), ("repo_id", repo_id)) if value is not None}
    if chosen:
        info["card"] = {**info.get("card", {}), **chosen}
        write_json_atomic(folder / TRAINING_NAME, info)
    card = info.get("card") or {}
    write_text_atomic(folder / CARD_NAME, model_card(config, info, card.get("license", NO_LICENSE),
                                                     card.get("repo_id", "OWNER/NAME")))
    return folder / CARD_NAME


def record_evaluation(folder: str | os.PathLike, result: dict, source: str = "evaluation") -> str:
    """Store one ``cotexnet evaluate --json`` result in the bundle's training record (by split) and rewrite the
    card; returns the split. An evaluation of other classes than the bundle's is refused."""
    from .atomic import write_json_atomic

    folder = Path(folder)
    config, info = _read(folder)
    if not isinstance(result, dict) or not {"split", "classes", "per_class", "mean", "cases"} <= set(result):
        raise CoTexNetError(f"{source}: not the output of `cotexnet evaluate --json` (needs split, classes, "
                            f"per_class, mean, cases)")
    if list(result["classes"]) != list(config.classes):
        raise CoTexNetError(f"{source}: evaluates classes {result['classes']}, but {folder} segments {config.classes}")
    cases = result["cases"]
    info.setdefault("evaluations", {})[result["split"]] = {
        "data": Path(str(result.get("data", ""))).name, "cases": len(cases) if isinstance(cases, list) else cases,
        "per_class": result["per_class"], "mean": result["mean"], "inference": result.get("inference")}
    write_json_atomic(folder / TRAINING_NAME, info)
    write_model_card(folder)
    return result["split"]
