"""Slicer-side logic of the CoTexNetTrain module, usable without Qt (Slicer's Python console, scripts, tests).

    from CoTexNetTrainLib import CoTexNetTrainLogic
    bundle = CoTexNetTrainLogic(slicer.mrmlScene).train(pairs, ["liver", "tumor"], "/data/models/liver")
"""
from .dataset import (
    TrainingInputError,
    checkEveryClassHasVoxels,
    checkPairs,
    checkVolume,
    continuedClasses,
    exportDataset,
    findScenePairs,
    folderClasses,
    modelClasses,
    segmentNames,
)
from .engine import TrainingRunError, pythonExecutable
from .logic import CoTexNetTrainLogic, RunExistsError, TrainingState, recipeFields, trainingFieldOptions
from .progress import TrainingProgress, formatDuration


def __getattr__(name):
    """The recent-models list is CoTexNetSegment's (one setting for both modules); imported on first use so
    that this package still imports from its own folder alone."""
    if name in ("addRecentModel", "recentModels", "RECENT_MODELS_SETTING"):
        from CoTexNetSegmentLib import settings

        return getattr(settings, name)
    raise AttributeError(f"module 'CoTexNetTrainLib' has no attribute {name!r}")


__all__ = [
    "CoTexNetTrainLogic",
    "RunExistsError",
    "TrainingInputError",
    "TrainingProgress",
    "TrainingRunError",
    "TrainingState",
    "RECENT_MODELS_SETTING",
    "addRecentModel",
    "checkEveryClassHasVoxels",
    "checkPairs",
    "checkVolume",
    "continuedClasses",
    "exportDataset",
    "findScenePairs",
    "folderClasses",
    "formatDuration",
    "modelClasses",
    "pythonExecutable",
    "recipeFields",
    "recentModels",
    "segmentNames",
    "trainingFieldOptions",
]
