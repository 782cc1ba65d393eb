"""Slicer-side logic of the CoTexNetTrain module, usable without Qt (Slicer's Python console, scripts, tests).

    from CoTexNetTrainLib import CoTexNetTrainLogic
    bundle = CoTexNetTrainLogic(slicer.mrmlScene).train(pairs, ["liver", "tumor"], "/data/models/liver")
"""
from .dataset import (
    TrainingInputError,
    checkPairs,
    checkVolume,
    exportDataset,
    findScenePairs,
    folderClasses,
    segmentNames,
)
from .engine import TrainingRunError, pythonExecutable
from .logic import CoTexNetTrainLogic
from .progress import TrainingProgress, formatDuration
from .settings import RECENT_MODELS_KEY, addRecentModel, recentModels

__all__ = [
    "CoTexNetTrainLogic",
    "TrainingInputError",
    "TrainingProgress",
    "TrainingRunError",
    "RECENT_MODELS_KEY",
    "addRecentModel",
    "checkPairs",
    "checkVolume",
    "exportDataset",
    "findScenePairs",
    "folderClasses",
    "formatDuration",
    "pythonExecutable",
    "recentModels",
    "segmentNames",
]
