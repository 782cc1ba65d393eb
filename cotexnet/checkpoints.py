"""A training run's folder and its checkpoints: what :class:`cotexnet.train.Trainer` saves, loads, recovers and locks.

The folder holds ``best/`` and ``last/`` (bundles; ``last/`` also holds :data:`TRAINER_STATE`, what ``--resume``
continues from), ``metrics.csv`` and ``split.json``. Every save is atomic (a bundle's staging folder renamed into
place, :data:`TRAINER_STATE` written last so its presence means complete); a save cut between its two renames is
put back on the next start; one trainer at a time holds the folder (:class:`~cotexnet.runlock.RunLock`).
"""
from __future__ import annotations

import csv
import io
import json
import logging
import random
import shutil
from pathlib import Path

import numpy as np
import torch

from .atomic import recover_folder, write_files_atomic, write_text_atomic
from .bundle import TRAINING_NAME, save_bundle
from .errors import CoTexNetError
from .runlock import RunLock, existing_run_files

logger = logging.getLogger(__name__)

TRAINER_STATE = "trainer_state.pt"


class RunFolder:
    """The folder ``out`` of one training run."""

    def __init__(self, out: str | Path):
        self.out = Path(out)
        self.last, self.best = self.out / "last", self.out / "best"

    def lock(self) -> RunLock:
        return RunLock(self.out)

    def check(self, resume: bool, overwrite: bool) -> None:
        """Refuse, before anything is written, to train over an earlier run that is not to be replaced."""
        found = existing_run_files(self.out)
        if found and not (resume or overwrite):
            raise CoTexNetError(f"{self.out}: already holds a training run ({', '.join(found)}); pass --resume to "
                                f"continue it or --overwrite to replace it")

    def prepare(self, overwrite: bool) -> list[str]:
        """Under the run lock: clear the earlier run (``overwrite``), or put back the checkpoints whose
        swap a kill cut between its two renames (the newest complete version) and remove stale staging.
        Returns a message per checkpoint put back."""
        if overwrite:
            for name in existing_run_files(self.out):
                path = self.out / name
                if path.is_dir():
                    shutil.rmtree(path)
                else:
                    path.unlink()
            return []
        messages = []
        for folder, complete_file in ((self.best, TRAINING_NAME), (self.last, TRAINER_STATE)):
            # Both files are the last of their bundle to be written, each atomically.
            restored = recover_folder(folder, lambda version, name=complete_file: (version / name).is_file())
            if restored is not None:
                message = f"{folder}: restored from {restored.name}, left there by a save that was interrupted"
                logger.warning(message)
                messages.append(message)
        return messages

    def check_resumable(self) -> None:
        if not (self.last / TRAINER_STATE).is_file():
            raise CoTexNetError(f"{self.last}: nothing to resume (no {TRAINER_STATE}); start without --resume")

    def trainer_state(self) -> dict:
        """The trainer state saved in ``last/`` (tensors and plain containers only: nothing in it runs)."""
        return torch.load(self.last / TRAINER_STATE, map_location="cpu", weights_only=True)

    def save(self, model, info: dict, state: dict, improved: bool, history: list[dict]) -> None:
        """``best/`` when validation improved, ``last/`` with the trainer ``state``, ``metrics.csv`` of ``history``."""
        if improved:
            model.save_pretrained(self.best, training_info=info)
        save_bundle(model, self.last, info, extra_files=lambda folder: write_files_atomic(
            folder / TRAINER_STATE, lambda target: torch.save(state, target)))  # last, so its presence means complete
        if history:
            _write_metrics_csv(self.out / "metrics.csv", history)


def trainer_state(trainer, totals: dict | None = None) -> dict:
    """What ``--resume`` needs besides the weights: optimiser, schedule, early-stopping state, RNGs, split, the
    batch the run trains with (``--batch-size auto`` or an out-of-memory retry chose it), and for a stop mid-epoch
    the step reached, its loss sums and the augmentation stream."""
    state = {"optimizer": trainer.optimizer.state_dict(), "scheduler": trainer.scheduler.state_dict(),
             "epoch": trainer.epoch, "best": trainer.best, "stale": trainer.stale, "history": json.dumps(trainer.history),
             "rng": _rng_state(), "split": trainer.split, "step": trainer.step if totals is not None else 0,
             "batch_size": trainer.batch_size, "accumulate": trainer.accumulate}
    if totals is not None:
        state.update(totals=json.dumps(totals), augment_rng=trainer.augment_rng.get_state())
    return state


def restore_trainer_state(trainer, state: dict) -> int:
    """Restore :func:`trainer_state` into ``trainer``; returns the last epoch it completed."""
    trainer.optimizer.load_state_dict(state["optimizer"])
    trainer.scheduler.load_state_dict(state["scheduler"])
    trainer.best, trainer.stale = state["best"], state["stale"]
    trainer.history = json.loads(state["history"])
    _set_rng_state(state["rng"])
    if state.get("step"):
        trainer.resume_from = {"step": state["step"], "totals": json.loads(state["totals"]),
                               "augment_rng": state["augment_rng"]}
    return state["epoch"]


def _rng_state() -> dict:
    return {"torch": torch.get_rng_state(), "numpy": list(np.random.get_state()[1].tolist()),
            "numpy_pos": int(np.random.get_state()[2]), "python": repr(random.getstate())}


def _set_rng_state(state: dict) -> None:
    import ast

    torch.set_rng_state(state["torch"])
    np.random.set_state(("MT19937", np.array(state["numpy"], dtype=np.uint32), state["numpy_pos"], 0, 0.0))
    random.setstate(ast.literal_eval(state["python"]))


def _write_metrics_csv(path: Path, rows: list[dict]) -> None:
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=list(rows[0]))
    writer.writeheader()
    writer.writerows(rows)
    write_text_atomic(path, buffer.getvalue())
