"""Qt side shared by the CoTexNetSegment widget and the "CoTexNet" Segment Editor effect.

Dependency setup with dialogs, polling a background job on a timer, and application settings. The
work itself is in ``CoTexNetSegmentLib`` (no Qt).
"""

import json
import traceback

import qt

import slicer
from CoTexNetSegmentLib import dependencies

PYTORCH_EXTENSION = "PyTorch"
#: Application settings (per user, not per scene).
RECENT_MODELS_SETTING = "CoTexNet/RecentModels"  # history of the model path line edits (ctkPathLineEdit settingKey)
CONCEPT_BACKEND_OPTIONS_SETTING = "CoTexNet/ConceptBackendOptions"  # JSON: {"openai": {"model": ..., "base_url": ...}}


def pytorchExtensionInstalled() -> bool:
    """Whether the PyTorch extension's utility module is loaded in this application."""
    return hasattr(slicer.modules, "pytorchutils")


def installPyTorchExtension() -> None:
    """Installs the PyTorch extension from the extensions server; Slicer asks to restart afterwards."""
    manager = slicer.app.extensionsManagerModel()
    if not manager.installExtensionFromServer(PYTORCH_EXTENSION, True):
        slicer.util.errorDisplay(
            "The PyTorch extension could not be installed. Install it from View > Extensions Manager, then restart Slicer."
        )


def _installTorch() -> bool:
    import PyTorchUtils

    with slicer.util.WaitCursor():
        torch = PyTorchUtils.PyTorchUtilsLogic().installTorch(
            askConfirmation=False, torchVersionRequirement=dependencies.TORCH_REQUIREMENT
        )
    return torch is not None


def ensureEngineReady() -> bool:
    """Makes sure torch and the engine's packages are installed; True when CoTexNet can run now.

    torch comes from the PyTorch extension; without that extension the user is told how to get it. Then
    one confirmation lists everything that will be installed; after it, a restart is offered if a
    package this session had already imported was replaced.
    """
    report = dependencies.checkRequirements()
    if not report.needsInstall:
        return True
    if report.torchMissing and not pytorchExtensionInstalled():
        slicer.util.errorDisplay(
            "CoTexNet needs PyTorch, which Slicer installs through the PyTorch extension (it picks the build "
            "that matches your GPU driver).\n\nInstall the PyTorch extension with the button in the CoTexNet "
            "Segment module or from View > Extensions Manager, restart Slicer, and try again.",
            windowTitle="CoTexNet: PyTorch extension needed",
        )
        return False

    def confirm(text):
        return slicer.util.confirmOkCancelDisplay(
            text + "\n\nInstall now? Downloading can take several minutes.", windowTitle="CoTexNet: install dependencies"
        )

    def pipInstall(requirements):
        with slicer.util.WaitCursor():
            slicer.util.pip_install(requirements)

    try:
        status = dependencies.ensureDependencies(confirm, _installTorch, pipInstall)
    except Exception as error:
        slicer.util.errorDisplay(f"Installing CoTexNet's dependencies failed:\n\n{error}",
                                 detailedText=traceback.format_exc())
        return False
    if status == dependencies.RESTART:
        if slicer.util.confirmYesNoDisplay(
            "Packages that this session had already loaded were updated. Restart Slicer now to use them?",
            windowTitle="CoTexNet: restart needed",
        ):
            slicer.util.restart()
        return False
    return status == dependencies.READY


def conceptBackendOptions(backend: str) -> dict:
    """Options of an LMM concept backend from the application settings (empty for ``geometric``)."""
    text = qt.QSettings().value(CONCEPT_BACKEND_OPTIONS_SETTING, "") or "{}"
    try:
        options = json.loads(text)
    except json.JSONDecodeError as error:
        raise ValueError(f"setting {CONCEPT_BACKEND_OPTIONS_SETTING}: not valid JSON ({error})") from None
    return dict(options.get(backend, {})) if isinstance(options, dict) else {}


class JobPoller:
    """Polls a ``CoTexNetSegmentLib.jobs.Job`` on a Qt timer: forwards its events, then reports the end.

    Polling runs on the main thread, which is where the job writes its result into the scene.
    """

    def __init__(self, job, onEvent, onFinished, intervalMs: int = 100):
        self.job = job
        self._onEvent = onEvent
        self._onFinished = onFinished
        self._timer = qt.QTimer()
        self._timer.setInterval(intervalMs)
        self._timer.connect("timeout()", self._poll)
        self._timer.start()

    def _poll(self):
        try:
            for event in self.job.poll():
                self._onEvent(event)
        finally:
            if self.job.finished:
                self._timer.stop()
                self._onFinished(self.job)

    def cancel(self):
        self.job.cancel()

    def stop(self):
        """Cancels the job and stops polling without waiting (module reload, application exit)."""
        self.job.cancel()
        self._timer.stop()


def formatError(error: BaseException) -> str:
    """Engine errors carry messages meant for users; anything else also says what kind of error it is."""
    from cotexnet.errors import CoTexNetError

    if isinstance(error, (CoTexNetError, ValueError)):
        return str(error)
    return f"{type(error).__name__}: {error}"


__all__ = [
    "JobPoller", "conceptBackendOptions", "ensureEngineReady", "formatError", "installPyTorchExtension",
    "pytorchExtensionInstalled", "RECENT_MODELS_SETTING",
]
