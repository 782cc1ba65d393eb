"""Following a training process through the files it appends to: progress events and its log.

The engine appends one JSON object per line to its progress file (see the contract in the
engine's ``cotexnet.cli``). Files are read incrementally from the last offset, so polling costs
only the new bytes, and a line the process has not finished writing is kept for the next poll.
"""
from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path


class IncrementalReader:
    """Returns the complete lines appended to a file since the last call."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self._offset = 0
        self._partial = b""

    def readLines(self) -> list[str]:
        try:
            size = self.path.stat().st_size
        except FileNotFoundError:
            return []
        if size < self._offset:  # the file was replaced by a new run: start over
            self._offset, self._partial = 0, b""
        if size == self._offset:
            return []
        with open(self.path, "rb") as file:
            file.seek(self._offset)
            data = file.read(size - self._offset)
        self._offset += len(data)
        *lines, self._partial = (self._partial + data).split(b"\n")
        return [line.decode("utf-8", errors="replace").rstrip("\r") for line in lines]


class ProgressEventReader(IncrementalReader):
    """Parses the new JSON lines of a progress file; lines that are not JSON objects are logged and skipped."""

    def readEvents(self) -> list[dict]:
        events = []
        for line in self.readLines():
            if not line.strip():
                continue
            try:
                event = json.loads(line)
            except json.JSONDecodeError:
                logging.warning(f"{self.path}: skipping a progress line that is not JSON: {line[:200]!r}")
                continue
            if isinstance(event, dict) and "event" in event:
                events.append(event)
        return events


class LogReader(IncrementalReader):
    """New lines of a process log, with carriage-return progress bars reduced to their last state."""

    def readText(self) -> str:
        return "\n".join(line.split("\r")[-1] for line in self.readLines())


def formatDuration(seconds: float | None) -> str:
    """'1:02:03' style; empty when unknown."""
    if seconds is None or seconds != seconds or seconds < 0:
        return ""
    minutes, secs = divmod(int(round(seconds)), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}"


@dataclass
class TrainingProgress:
    """What is known about a run from its progress events so far.

    Epochs and steps are counted from 1, as the engine reports them.
    """

    epochs: int = 0
    stepsPerEpoch: int = 0
    epoch: int = 0
    step: int = 0
    loss: float | None = None
    valDice: float | None = None
    bestValDice: float | None = None
    etaSeconds: float | None = None
    bundle: str | None = None
    stopped: bool = False
    finished: bool = False
    error: str | None = None

    def update(self, event: dict) -> None:
        kind = event.get("event")
        if kind == "start":
            self.epochs = int(event.get("epochs", self.epochs))
            self.stepsPerEpoch = int(event.get("steps_per_epoch", self.stepsPerEpoch))
            self.finished, self.stopped, self.error = False, False, None
        elif kind == "step":
            self.epoch = int(event.get("epoch", self.epoch))
            self.step = int(event.get("step", self.step))
            self.stepsPerEpoch = int(event.get("steps", self.stepsPerEpoch))
            self.loss = event.get("loss", self.loss)
            self.etaSeconds = event.get("eta_s", self.etaSeconds)
        elif kind == "epoch":
            self.epoch = int(event.get("epoch", self.epoch))
            self.epochs = int(event.get("epochs", self.epochs))
            self.step = self.stepsPerEpoch
            self.loss = event.get("loss", self.loss)
            self.valDice = event.get("val_dice", self.valDice)
            self.bestValDice = event.get("best_val_dice", self.bestValDice)
            self.etaSeconds = event.get("eta_s", self.etaSeconds)
        elif kind == "done":
            self.bundle = event.get("bundle")
            self.bestValDice = event.get("best_val_dice", self.bestValDice)
            self.stopped = bool(event.get("stopped", False))
            self.finished = True
            self.etaSeconds = 0.0
        elif kind == "error":
            self.error = str(event.get("message", "training failed"))

    @property
    def fraction(self) -> float:
        """Share of all planned steps done, 0..1 (early stopping may end a run before 1)."""
        if self.finished and not self.stopped:
            return 1.0
        if not self.epochs or not self.stepsPerEpoch:
            return 0.0
        done = (self.epoch - 1) * self.stepsPerEpoch + self.step if self.epoch else 0
        return min(1.0, max(0.0, done / (self.epochs * self.stepsPerEpoch)))

    def summary(self) -> str:
        """One status line for a progress bar or the console."""
        if self.error:
            return f"Failed: {self.error}"
        if self.finished:
            what = "Stopped" if self.stopped else "Finished"
            dice = f", best validation Dice {self.bestValDice:.3f}" if self.bestValDice is not None else ""
            return f"{what}{dice}"
        if not self.epochs:
            return "Starting..."
        parts = [f"Epoch {max(self.epoch, 1)}/{self.epochs}"]
        if self.stepsPerEpoch:
            parts[0] += f", step {self.step}/{self.stepsPerEpoch}"
        if self.loss is not None:
            parts.append(f"loss {self.loss:.4f}")
        if self.valDice is not None:
            parts.append(f"val Dice {self.valDice:.3f}")
        eta = formatDuration(self.etaSeconds)
        if eta:
            parts.append(f"ETA {eta}")
        return " | ".join(parts)
