"""Whether a model trained from the page may replace the session's current model.

A run hands over only when it finished at least one epoch and its Dice on the cases it did not train on
(the run's validation split) is not below the current model's on the same cases, over the classes the
current model has. Both models are scored the same way here: the engine's prediction on each case of the
run's exported dataset, Dice pooled over the cases. With no held-out case (one opened case), the run
validated on its training case and the page says so.

Run as ``python -m cotexnet_app.promotion`` by the session, in its own process, so the page stays
responsive while the two models segment; it prints one JSON line.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

#: The run's folder holding its last epoch's bundle, whose training.json says how many epochs ran.
LAST_BUNDLE = "last"


@dataclass
class HeldOutCases:
    """The cases a run is judged on, and whether it trained on them (no case was held out)."""

    case_ids: list[str]
    trained_on: bool


def run_facts(run: Path) -> tuple[int, Optional[HeldOutCases]]:
    """(epochs the run finished, the cases to judge it on) from its last bundle's training.json."""
    try:
        info = json.loads((Path(run) / LAST_BUNDLE / "training.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return 0, None
    split = info.get("split") or {}
    held_out = list(split.get("val") or [])
    cases = HeldOutCases(held_out, False) if held_out else HeldOutCases(list(split.get("train") or []), True)
    return int(info.get("epochs_run") or 0), cases


def held_out_dice(models: list[str], cases: list[tuple[str, str, str]], classes: list[str],
                  device: str = "auto") -> list[dict]:
    """Per model, its Dice per class pooled over ``cases`` ((image, .seg.nrrd whose segments are named like
    ``classes``, the UID of the series read from a DICOM folder or "" for its only or largest one)), for its
    classes that ``classes`` names."""
    from cotexnet.data import read_image, read_label_map
    from cotexnet.infer import predict_volume
    from cotexnet.model import CoTexNet

    truths = []
    for image_path, truth_path, series in cases:
        image = read_image(image_path, series_uid=series or None)
        truths.append((image, read_label_map(truth_path, reference=image, classes=classes)))
    results = []
    for folder in models:
        model = CoTexNet.from_pretrained(folder)
        overlap: dict[str, list[int]] = {name: [0, 0] for name in model.config.classes if name in classes}
        for image, truth in truths:
            labels = predict_volume(model, image, device=device).labels
            for number, name in enumerate(model.config.classes, start=1):
                if name in overlap:
                    predicted, expected = labels == number, truth == classes.index(name) + 1
                    overlap[name][0] += 2 * int((predicted & expected).sum())
                    overlap[name][1] += int(predicted.sum() + expected.sum())
        results.append({name: (both / total if total else 1.0) for name, (both, total) in overlap.items()})
    return results


def mean_over(dice: dict, classes) -> float:
    values = [dice[name] for name in classes if name in dice]
    return sum(values) / len(values) if values else 0.0


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="cotexnet_app.promotion", description="Dice of models on held-out cases")
    parser.add_argument("models", nargs="+")
    parser.add_argument("--case", nargs=3, action="append", required=True, metavar=("IMAGE", "LABELS", "SERIES"))
    parser.add_argument("--classes", nargs="+", required=True)
    parser.add_argument("--device", default="auto")
    args = parser.parse_args(argv)
    from cotexnet.errors import CoTexNetError

    try:
        print(json.dumps(held_out_dice(args.models, [tuple(case) for case in args.case], args.classes, args.device)))
    except CoTexNetError as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
