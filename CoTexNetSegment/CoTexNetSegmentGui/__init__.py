"""Qt side shared by the CoTexNetSegment widget, the "CoTexNet" Segment Editor effect and CoTexNetTrain.

Dialogs (dependency setup, the LLaVA download question) and polling a background job on a timer. The
work itself is in ``CoTexNetSegmentLib`` (no Qt). The effect file lives in another folder
(``SegmentEditorCoTexNet``) that nothing imports as a package: Slicer 5.10+ registers an effect by
putting a module named after the effect's folder into ``sys.modules`` (docs/slicer.md, "Effect loading").
"""

import json
import traceback

import qt
import vtk

import slicer
from CoTexNetSegmentLib import dependencies
from CoTexNetSegmentLib.errors import formatError
from CoTexNetSegmentLib.settings import CONCEPT_BACKEND_OPTIONS_SETTING, readSetting

from CoTexNetSegmentLib.i18n import tr as _

PYTORCH_EXTENSION = "PyTorch"


def pytorchExtensionInstalled() -> bool:
    """Whether the PyTorch extension's utility module is loaded in this application."""
    return hasattr(slicer.modules, "pytorchutils")


def installPyTorchExtension() -> None:
    """Installs the PyTorch extension from the extensions server, after one question, then offers a restart.

    Slicer's ``installExtensionFromServer`` returns False alike when the user answers No to its own question and
    when the install fails (Base/QTCore/qSlicerExtensionsManagerModel.cxx, v5.6.2 lines 1716-1816). So CoTexNet
    asks itself and runs the install non-interactively: a "No" is then reported as a choice, not a failure.
    """
    if not slicer.util.confirmOkCancelDisplay(
        _("CoTexNet needs the PyTorch extension, which installs PyTorch for your GPU. Install it now from the "
          "extensions server? Slicer restarts afterwards."),
        windowTitle=_("CoTexNet: install the PyTorch extension"),
    ):
        slicer.util.infoDisplay(
            _("The PyTorch extension was not installed, as you chose. CoTexNet cannot segment or train without it; "
              "install it later with the button in the CoTexNet Segment module or from View > Extensions Manager."),
            windowTitle=_("CoTexNet: PyTorch extension not installed"),
        )
        return
    manager = slicer.app.extensionsManagerModel()
    wasInteractive = manager.interactive
    manager.interactive = False  # the user has answered; Slicer would ask again and hide the answer
    try:
        installed = manager.installExtensionFromServer(PYTORCH_EXTENSION, False)
    finally:
        manager.interactive = wasInteractive
    if not installed:
        slicer.util.errorDisplay(_(
            "The PyTorch extension could not be installed (see the log for the reason). Install it from View > "
            "Extensions Manager, then restart Slicer."
        ))
        return
    if slicer.util.confirmYesNoDisplay(_("The PyTorch extension is installed. Restart Slicer now to load it?"),
                                       windowTitle=_("CoTexNet: restart needed")):
        slicer.util.restart()


def _installTorch() -> bool:
    import PyTorchUtils

    with slicer.util.WaitCursor():
        torch = PyTorchUtils.PyTorchUtilsLogic().installTorch(
            askConfirmation=False, torchVersionRequirement=dependencies.TORCH_REQUIREMENT
        )
    return torch is not None


#: True while dependencies install. Slicer processes events for every line pip prints (slicer.util's
#: ``logProcessOutput``, v5.6.2 util.py line 3804), so Apply, Install, Segment and Start stay clickable:
#: a second install into the same site-packages must not start.
_installing = False


def ensureEngineReady() -> bool:
    """Makes sure torch and the engine's packages are installed; True when CoTexNet can run now.

    torch comes from the PyTorch extension; without that extension the user is told how to get it. Then
    one confirmation lists everything that will be installed, and the action goes on after installing,
    unless a package this session had imported before was replaced: then a restart is offered, naming it.
    While an install runs, any other call returns False at once with a note.
    """
    global _installing
    if _installing:
        slicer.util.showStatusMessage(_("CoTexNet is installing its dependencies; try again when it is done."), 5000)
        return False
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

    _installing = True
    try:
        outcome = dependencies.ensureDependencies(confirm, _installTorch, pipInstall)
    except Exception as error:
        slicer.util.errorDisplay(_("Installing CoTexNet's dependencies failed:") + f"\n\n{error}",
                                 detailedText=traceback.format_exc())
        return False
    finally:
        _installing = False
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
    """Asks before the multi-GB LLaVA download, at once: asking the hub for the size here would freeze Slicer
    (up to 10 s, always when offline); the download job logs the size when it knows it."""
    return slicer.util.confirmOkCancelDisplay(
        _("Concepts from LLaVA need the model {repo}, which is not downloaded yet: several GB.\n\nDownload it "
          "now? The module shows the size and the progress, and \"Cancel download\" stops it (it resumes next "
          "time).").format(repo=repoId),
        windowTitle=_("CoTexNet: download LLaVA"),
    )


class ParameterNodeGui:
    """A widget's one ``parameterNodeWrapper`` object, connected to its GUI once.

    In Slicer 5.6/5.8 ``connectGui`` returns None, so ``disconnectGui`` cannot undo it, and each call adds an
    observer that is never removed (Base/Python/slicer/parameterNodeWrapper/wrapper.py, v5.6.2 lines 212 and
    241-253; 5.10 returns the tag). Wrapping the node anew on every module entry therefore added another live
    set of GUI connections each time. Here the wrapper is made and connected when the parameter node is first
    seen (``setup``), and again only when the scene's parameter node is another one.
    """

    def __init__(self, wrapperClass, gui, onModified):
        self._wrapperClass = wrapperClass
        self._gui = gui
        self._onModified = onModified
        self.wrapper = None
        self._guiTag = None
        self._observerTag = None

    def attach(self, parameterNode):
        """The wrapper of ``parameterNode``, connected to the GUI (kept when it is the node already shown)."""
        if self.wrapper is not None and self.wrapper.parameterNode is parameterNode:
            return self.wrapper
        self.detach()
        self.wrapper = self._wrapperClass(parameterNode)
        self._guiTag = self.wrapper.connectGui(self._gui)
        self._observerTag = parameterNode.AddObserver(vtk.vtkCommand.ModifiedEvent, self._onModified)
        return self.wrapper

    def detach(self):
        """Disconnects the GUI (module cleanup, or before another parameter node is shown)."""
        if self.wrapper is None:
            return
        self.wrapper.disconnectGui(self._guiTag)
        self.wrapper.parameterNode.RemoveObserver(self._observerTag)
        self.wrapper = self._guiTag = self._observerTag = None


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
    "JobPoller", "ParameterNodeGui", "conceptBackendOptions", "confirmLlavaDownload", "ensureEngineReady",
    "formatError", "installPyTorchExtension", "pytorchExtensionInstalled",
]
