"""The training curves the page draws: per-epoch loss and per-class validation Dice, as SVG coordinates.

The training process reports one ``epoch`` event per epoch (``cotexnet.cli`` progress file, read by
CoTexNetTrainLib); :class:`TrainingCurves` keeps what the events say and :meth:`TrainingCurves.charts`
turns it into polylines and points in pixel coordinates, so the page draws them with plain SVG and needs
no plotting library. Pure Python: no trame, slicer or vtk.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

#: Size of one chart in pixels, the margin left for the axis labels (left and bottom), the band above the
#: plot for the title (so a Dice of 1 does not run through it) and the room right of the last epoch (so its
#: point is drawn whole).
CHART_WIDTH, CHART_HEIGHT, MARGIN, TOP, RIGHT = 250, 150, 28, 16, 6
LOSS_COLOR = "#e65933"


@dataclass
class TrainingCurves:
    """Loss and validation Dice per epoch, from the training process's ``epoch`` events."""

    classes: list[str]
    colors: list[str]
    epochs: list[int] = field(default_factory=list)
    loss: list[float] = field(default_factory=list)
    dice: dict[str, list[float]] = field(default_factory=dict)

    def add(self, event: dict) -> None:
        """Adds an ``epoch`` event; a resumed run repeats epochs, so later values replace earlier ones."""
        if event.get("event") != "epoch":
            return
        epoch = int(event["epoch"])
        keep = sum(1 for e in self.epochs if e < epoch)
        per_class = event.get("val_dice_per_class") or {}
        self.epochs = self.epochs[:keep] + [epoch]
        self.loss = self.loss[:keep] + [_number(event.get("loss"))]
        for name in self.classes:
            self.dice[name] = self.dice.get(name, [])[:keep] + [_number(per_class.get(name))]

    def charts(self) -> list[dict]:
        """Two charts (loss; validation Dice per class) as the page's SVG data: each series has ``points``
        (a polyline's points attribute) and ``dots`` ([x, y] of each epoch that has a value)."""
        x_max = max(self.epochs[-1] if self.epochs else 1, 2)
        finite = [v for v in self.loss if math.isfinite(v)]
        loss_top = max(finite) * 1.1 if finite and max(finite) > 0 else 1.0
        loss = {"title": "loss", "y_top": f"{loss_top:.3g}",
                "series": [_series("loss", LOSS_COLOR, self.epochs, self.loss, x_max, loss_top)]}
        dice = {"title": "validation Dice", "y_top": "1",
                "series": [_series(name, color, self.epochs, self.dice.get(name, []), x_max, 1.0)
                           for name, color in zip(self.classes, self.colors)]}
        return [{**chart, "x_max": str(x_max), "width": CHART_WIDTH, "height": CHART_HEIGHT, "margin": MARGIN,
                 "top": TOP, "right": CHART_WIDTH - RIGHT} for chart in (loss, dice)]


def _number(value) -> float:
    return float(value) if value is not None else math.nan


def _series(name: str, color: str, epochs: list[int], values: list[float], x_max: int, y_top: float) -> dict:
    """Pixel coordinates: epoch 0..x_max across the plot area, 0..y_top from its bottom to its top."""
    width, height = CHART_WIDTH - MARGIN - RIGHT, CHART_HEIGHT - MARGIN - TOP
    dots = [[round(MARGIN + width * epoch / x_max, 1), round(TOP + height * (1 - min(value, y_top) / y_top), 1)]
            for epoch, value in zip(epochs, values) if math.isfinite(value)]
    return {"name": name, "color": color, "dots": dots, "points": " ".join(f"{x},{y}" for x, y in dots)}


def hex_color(rgb) -> str:
    """'#rrggbb' of an RGB colour in 0..1 (a bundle's class colours)."""
    return "#" + "".join(f"{round(255 * min(max(float(c), 0.0), 1.0)):02x}" for c in rgb)
