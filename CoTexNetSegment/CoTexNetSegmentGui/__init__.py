"""Qt side shared by the CoTexNetSegment widget, the "CoTexNet" Segment Editor effect and CoTexNetTrain.

Dialogs (dependency setup, the LLaVA download question) and polling a background job on a timer. The
work itself is in ``CoTexNetSegmentLib`` (no Qt). The effect file lives in another folder
(``SegmentEditorCoTexNet``) that nothing imports as a package: Slicer 5.10+ registers an effect by
putting a module named after the effect's folder into ``sys.modules`` (docs/slicer.md, "Effect loading").
"""

import json
import traceback

import qt

import slicer
from CoTexNetSegmentLib import backbone, dependencies
from CoTexNetSegmentLib.errors import formatError
from CoTexNetSegmentLib.settings import CONCEPT_BACKEND_OPTIONS_SETTING, readSetting

try:
    from slicer.i18n import tr as _
except ImportError:  # slicer-core, without the application: the source text
    def _(text):
        return text

PYTORCH_EXTENSION = "PyTorch"


def pytorchExtensionInstalled() -> bool:
    """Whether the PyTorch extension's utility module is loaded in this application."""
    return hasattr(slicer.modules, "pytorchutils")


def installPyTorchExtension() -> None:
    """Installs the PyTorch extension from the extensions server; Slicer asks to restart afterwards."""
    manager = slicer.app.extensionsManagerModel()
    if not manager.installExtensionFromServer(PYTORCH_EXTENSION, True):
        slicer.util.errorDisplay(_(
            "The PyTorch extension could not be installed. Install it from View > Extensions Manager, then "
            "restart Slicer."
        ))


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
    one confirmation lists everything that will be installed, and the action goes on after installing,
    unless a package this session had imported before was replaced: then a restart is offered, naming it.
    """
    report = dependencies.checkRequirements()
    if not report.needsInstall:
        return True
    if report.torchMissing and not pytorchExtensionInstalled():
        slicer.util.errorDisplay(
            _("CoTexNet needs PyTorch, which Slicer installs through the PyTorch extension (it picks the build "
              "that matches your GPU driver).\n\nInstall the PyTorch extension with the button in the CoTexNet "
              "Segment module or from View > Extensions Manager, restart Slicer, and try again."),
            windowTitle=_("CoTexNet: PyTorch extension needed"),
        )
        return False

    def confirm(text):
        return slicer.util.confirmOkCancelDisplay(
            text + "\n\n" + _("Install now? Downloading can take several minutes."),
            windowTitle=_("CoTexNet: install dependencies"),
        )

    def pipInstall(requirements):
        with slicer.util.WaitCursor():
            slicer.util.pip_install(requirements)

    try:
        outcome = dependencies.ensureDependencies(confirm, _installTorch, pipInstall)
    except Exception as error:
        slicer.util.errorDisplay(_("Installing CoTexNet's dependencies failed:") + f"\n\n{error}",
                                 detailedText=traceback.format_exc())
        return False
    if outcome == dependencies.RESTART:
        replaced = "\n  ".join(outcome.replaced) or _("(packages are still missing or out of range)")
        if slicer.util.confirmYesNoDisplay(
            _("These packages were already loaded in this session and have been replaced:") + f"\n  {replaced}\n\n"
            + _("Restart Slicer now to use them?"),
            windowTitle=_("CoTexNet: restart needed"),
        ):
            slicer.util.restart()
        return False
    return outcome == dependencies.READY


def conceptBackendOptions(backend: str) -> dict:
    """Options of an LMM concept backend from the application settings (empty for ``geometric``)."""
    text = readSetting(CONCEPT_BACKEND_OPTIONS_SETTING, "") or "{}"
    try:
        options = json.loads(text)
    except json.JSONDecodeError as error:
        raise ValueError(f"setting {CONCEPT_BACKEND_OPTIONS_SETTING}: not valid JSON ({error})") from None
    return dict(options.get(backend, {})) if isinstance(options, dict) else {}


def confirmLlavaDownload(repoId: str) -> bool:
    """Asks before the multi-GB LLaVA download, with its size (when the hub can tell)."""
    size = backbone.downloadSize(repoId, backbone.LLAVA_PATTERNS)
    sizeText = _("{size:.1f} GB").format(size=size / 1e9) if size else _("several GB (the size is unknown)")
    return slicer.util.confirmOkCancelDisplay(
        _("Concepts from LLaVA need the model {repo}, which is not downloaded yet: {size}.\n\nDownload it now? "
          "Progress is shown in the module, and Cancel stops the download (it resumes next time).").format(
            repo=repoId, size=sizeText),
        windowTitle=_("CoTexNet: download LLaVA"),
    )


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


__all__ = [
    "JobPoller", "conceptBackendOptions", "confirmLlavaDownload", "ensureEngineReady", "formatError",
    "installPyTorchExtension", "pytorchExtensionInstalled",
]
