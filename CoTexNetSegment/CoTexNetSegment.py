"""CoTexNetSegment: segment volumes with a trained CoTexNet model, and the "CoTexNet" Segment Editor effect.

The widget only wires the .ui to ``CoTexNetSegmentLib.CoTexNetSegmentLogic``, which does the work and
can be used from the Python console without this GUI.
"""

import html
import logging
import os
import tempfile
import time
import unittest
from typing import Annotated

import qt

import slicer
from slicer import vtkMRMLScalarVolumeNode, vtkMRMLSegmentationNode
from slicer.parameterNodeWrapper import Choice, WithinRange, parameterNodeWrapper
from slicer.ScriptedLoadableModule import (
    ScriptedLoadableModule,
    ScriptedLoadableModuleTest,
    ScriptedLoadableModuleWidget,
)
from slicer.util import VTKObservationMixin

from CoTexNetSegmentGui import (
    JobPoller,
    ParameterNodeGui,
    conceptBackendOptions,
    confirmLlavaDownload,
    ensureEngineReady,
    installPyTorchExtension,
    pytorchExtensionInstalled,
)
from CoTexNetSegmentLib import CoTexNetSegmentLogic, backbone, dependencies
from CoTexNetSegmentLib.errors import formatError
from CoTexNetSegmentLib.logic import CONCEPT_BACKENDS, DEVICES, SLICE_AXES
from CoTexNetSegmentLib.settings import RECENT_MODELS_SETTING, isChosenPath, preferredModelPath, recentModels

from CoTexNetSegmentLib.i18n import tr as _
from CoTexNetSegmentLib.i18n import translate

#: Slice-axis choice that means "the plane the model was trained on".
MODEL_DEFAULT_AXIS = "model default"
#: Folder of the Segment Editor effect file. Slicer names the effect's module after it, so nothing may
#: import it as a package (docs/slicer.md, "Effect loading").
EFFECT_FOLDER = "SegmentEditorCoTexNet"


class CoTexNetSegment(ScriptedLoadableModule):
    def __init__(self, parent):
        ScriptedLoadableModule.__init__(self, parent)
        self.parent.title = _("CoTexNet Segment")
        self.parent.categories = [translate("qSlicerAbstractCoreModule", "Segmentation")]
        self.parent.dependencies = ["Segmentations"]
        self.parent.contributors = ["CoTexNet for 3D Slicer contributors (CoTexNet for 3D Slicer project)"]
        self.parent.helpText = _(
            "Segment a volume or a 2D image with a trained CoTexNet model (a vision-language model that learned "
            "from text prompts during training and needs no text to segment). Choose the input and the model "
            "folder, then Apply. Each class of the model becomes a segment with the model's name and color; the "
            "Concepts table describes what was found. The same model is available in the Segment Editor as the "
            "\"CoTexNet\" effect, and from the Python console through CoTexNetSegmentLib.CoTexNetSegmentLogic."
        )
        self.parent.acknowledgementText = _(
            "CoTexNet follows the method of its authors' paper (CLIPSeg backbone, text used only in training, "
            "self-adding-noise distillation). This extension is an independent implementation."
        )
        slicer.app.connect("startupCompleted()", registerSegmentEditorEffect)


def registerSegmentEditorEffect():
    """Adds the "CoTexNet" effect to the Segment Editor (once the application has started)."""
    import qSlicerSegmentationsEditorEffectsPythonQt as effects

    effect = effects.qSlicerSegmentEditorScriptedEffect(None)
    effectPath = os.path.join(os.path.dirname(__file__), EFFECT_FOLDER, "SegmentEditorEffect.py")
    effect.setPythonSource(effectPath.replace("\\", "/"))
    effect.self().register()


@parameterNodeWrapper
class CoTexNetSegmentParameterNode:
    """What the module's GUI shows, saved with the scene. ``outputSegmentation`` None creates a new node.

    The model folder is not here: a ``pathlib.Path`` field serialises an empty choice as "." (Slicer's
    parameterNodeWrapper/serializers.py, ``PathSerializer``), which replaced the selector's history. It is
    a per-user setting instead: the selector's history is the recent-models list.
    """

    inputVolume: vtkMRMLScalarVolumeNode
    outputSegmentation: vtkMRMLSegmentationNode
    device: Annotated[str, Choice(DEVICES)] = "auto"
    sliceAxis: Annotated[str, Choice((MODEL_DEFAULT_AXIS, *SLICE_AXES))] = MODEL_DEFAULT_AXIS
    batchSize: Annotated[int, WithinRange(1, 512)] = 16
    conceptBackend: Annotated[str, Choice(CONCEPT_BACKENDS)] = "geometric"
    fusePlanes: bool = False
    tta: bool = False
    postprocess: bool = True
    confidence: bool = False


class CoTexNetSegmentWidget(ScriptedLoadableModuleWidget, VTKObservationMixin):
    def __init__(self, parent=None):
        ScriptedLoadableModuleWidget.__init__(self, parent)
        VTKObservationMixin.__init__(self)
        self.logic = None
        self._parameterGui = None  # the one parameter node wrapper, connected once (CoTexNetSegmentGui.ParameterNodeGui)
        self._parameterNode = None
        self._segmentationPoller = None
        self._backbonePoller = None
        self._devicePoller = None
        self._deviceInfo = None  # DeviceInfo from the worker; asked once, without blocking the GUI
        self._conceptsSegmentation = None
        # Looked up once: Slicer 5.6's tr() inspects the whole stack on every call (Base/Python/slicer/i18n.py,
        # v5.6.2 line 54), and updateApplyButton runs on every parameter change.
        self._applyTips = {"running": _("Segmentation is running."), "ready": _("Segment the input volume with the model."),
                           "missing": _("Select an input volume and a model folder.")}

    def setup(self):
        ScriptedLoadableModuleWidget.setup(self)
        uiWidget = slicer.util.loadUI(self.resourcePath("UI/CoTexNetSegment.ui"))
        self.layout.addWidget(uiWidget)
        self.ui = slicer.util.childWidgetVariables(uiWidget)
        uiWidget.setMRMLScene(slicer.mrmlScene)
        self.logic = CoTexNetSegmentLogic(slicer.mrmlScene)
        self._parameterGui = ParameterNodeGui(CoTexNetSegmentParameterNode, self.ui, self.updateApplyButton)

        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.StartCloseEvent, self.onSceneStartClose)
        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.EndCloseEvent, self.onSceneEndClose)

        self.ui.applyButton.connect("clicked(bool)", self.onApply)
        self.ui.cancelButton.connect("clicked(bool)", self.onCancel)
        self.ui.installDependenciesButton.connect("clicked(bool)", self.onInstallDependencies)
        self.ui.installPyTorchExtensionButton.connect("clicked()", installPyTorchExtension)
        self.ui.modelPathLineEdit.connect("currentPathChanged(QString)", self.updateModelInfo)
        self.ui.deviceComboBox.connect("currentIndexChanged(int)", self.updateDeviceInfo)
        self.ui.batchSizeSpinBox.connect("valueChanged(int)", self.updateDeviceInfo)
        self.ui.conceptsTableView.connect("clicked(QModelIndex)", self.onConceptRowClicked)
        self.ui.modelPathLineEdit.settingKey = RECENT_MODELS_SETTING
        self.ui.modelPathLineEdit.currentPath = preferredModelPath(self.ui.modelPathLineEdit.currentPath, recentModels())
        self.ui.modelPathLineEdit.connect("currentPathChanged(QString)", self.updateApplyButton)
        self.ui.backboneFolderLineEdit.currentPath = qt.QSettings().value(backbone.BACKBONE_FOLDER_SETTING, "")
        self.ui.backboneFolderLineEdit.connect("currentPathChanged(QString)", self.onBackboneFolderChanged)
        self.ui.downloadBackboneButton.connect("clicked(bool)", self.onDownloadBackbone)

        self.initializeParameterNode()
        self.updateDependencyPanel()
        self.ui.backboneStatusLabel.text = cachedBackboneText(self.ui.backboneFolderLineEdit.currentPath)

    def cleanup(self):
        for poller in (self._segmentationPoller, self._backbonePoller, self._devicePoller):
            if poller is not None:
                poller.stop()
        if self._parameterGui is not None:
            self._parameterGui.detach()
        self.removeObservers()

    def enter(self):
        self.initializeParameterNode()
        self.updateDependencyPanel()

    def onSceneStartClose(self, caller, event):
        if self._segmentationPoller is not None:
            self._segmentationPoller.cancel()

    def onSceneEndClose(self, caller, event):
        if self.parent.isEntered:
            self.initializeParameterNode()

    # ------------------------------------------------------------ parameter node

    def initializeParameterNode(self):
        """Shows the scene's parameter node (connected to the GUI once per node, see ``ParameterNodeGui``)."""
        self._parameterNode = self._parameterGui.attach(self.logic.getParameterNode())
        if not self._parameterNode.inputVolume:
            firstVolume = slicer.mrmlScene.GetFirstNodeByClass("vtkMRMLScalarVolumeNode")
            if firstVolume:
                self._parameterNode.inputVolume = firstVolume
        self.updateApplyButton()
        self.updateModelInfo()
        self.updateDeviceInfo()

    def updateApplyButton(self, caller=None, event=None):
        running = self._segmentationPoller is not None
        parameters = self._parameterNode
        ready = bool(parameters and parameters.inputVolume and isChosenPath(self.ui.modelPathLineEdit.currentPath))
        self.ui.applyButton.enabled = ready and not running
        self.ui.cancelButton.enabled = running
        self.ui.applyButton.toolTip = self._applyTips["running" if running else "ready" if ready else "missing"]

    # ------------------------------------------------------------ information labels

    def updateDependencyPanel(self):
        report = dependencies.checkRequirements()
        self.ui.dependenciesFrame.visible = report.needsInstall
        self.ui.installPyTorchExtensionButton.visible = report.torchMissing and not pytorchExtensionInstalled()
        self.ui.dependenciesLabel.text = report.describe()

    def refreshModels(self):
        """Re-reads the recent-models list and selects its newest entry (CoTexNetTrain calls this when a new
        model is ready, so the model just trained is the one Apply uses)."""
        self.ui.modelPathLineEdit.retrieveHistory()
        self.ui.modelPathLineEdit.currentPath = preferredModelPath("", recentModels())

    def updateModelInfo(self, *unused):
        path = self.ui.modelPathLineEdit.currentPath
        if not path:
            self.ui.modelInfoLabel.text = _("Choose a trained model folder or type a Hugging Face repository id.")
            return
        try:  # no network here: a Hub id is read from the Hugging Face cache, or named until its first run
            description = self.logic.modelDescription(path)
        except ImportError:
            self.ui.modelInfoLabel.text = _("Install the dependencies to read this model.")
            return
        except Exception as error:
            self.ui.modelInfoLabel.text = f"<span style='color:#c0392b'>{formatError(error)}</span>"
            return
        config, title = description["config"], description["title"]
        if config is None:
            self.ui.modelInfoLabel.text = f"<b>{html.escape(title)}</b>"
            return
        tiny = " <b>" + _("Test model with a random tiny backbone: not for real use.") + "</b>" if config.backbone == "tiny" else ""
        self.ui.modelInfoLabel.text = f"<b>{html.escape(title)}</b><br>" + _("Classes: {classes} ({axis} slices, {size} px).").format(
            classes=", ".join(config.classes), axis=config.slice_axis, size=config.image_size) + tiny

    def updateDeviceInfo(self, *unused):
        """Shows the device facts; the first call asks the worker for them without waiting (starting the
        worker takes seconds, and this module never imports torch itself)."""
        info = self._deviceInfo
        if info is None:
            if self._devicePoller is None:
                try:  # starts the worker: PythonSlicer may be missing, Popen may fail; the GUI must still build
                    job = self.logic.startDeviceInfo()
                except Exception as error:
                    self.ui.deviceInfoLabel.text = _("Cannot check the devices: {error}").format(error=formatError(error))
                    return
                self.ui.deviceInfoLabel.text = _("Checking the available devices...")
                self._devicePoller = JobPoller(job, lambda event: None, self.onDeviceInfo)
            return
        text = info.describe()
        device = self.ui.deviceComboBox.currentText
        warning = None
        if device == "cuda" and not info.cuda:
            warning = _("No CUDA GPU is usable here: choose auto or cpu.")
        elif device != "cpu":
            warning = info.memoryWarning(self.ui.batchSizeSpinBox.value)
        if warning:
            text += f"<br><span style='color:#d35400'>{warning}</span>"
        self.ui.deviceInfoLabel.text = text

    def onDeviceInfo(self, job):
        self._devicePoller = None
        if job.error is not None:  # asked again after the next install or model change
            self.ui.deviceInfoLabel.text = (
                _("PyTorch is not installed yet.") if isinstance(job.error, ImportError) else formatError(job.error)
            )
            return
        self._deviceInfo = job.result
        self.updateDeviceInfo()

    def log(self, text):
        self.ui.logTextEdit.appendPlainText(f"{time.strftime('%H:%M:%S')} {text}")

    # ------------------------------------------------------------ segmentation

    def onInstallDependencies(self):
        ensureEngineReady()
        self.updateDependencyPanel()
        self.updateModelInfo()
        self.updateDeviceInfo()
        self.ui.backboneStatusLabel.text = cachedBackboneText(self.ui.backboneFolderLineEdit.currentPath)

    def onApply(self):
        if not ensureEngineReady():
            self.updateDependencyPanel()
            return
        self.updateDependencyPanel()
        parameters = self._parameterNode
        modelPath = self.ui.modelPathLineEdit.currentPath
        try:
            options = conceptBackendOptions(parameters.conceptBackend)
            if parameters.conceptBackend == "llava" and not self.ensureLlava(options):
                return
            job = self.logic.startSegmentation(
                parameters.inputVolume,
                modelPath,
                parameters.device,
                segmentationNode=parameters.outputSegmentation,
                batchSize=parameters.batchSize,
                sliceAxis=None if parameters.sliceAxis == MODEL_DEFAULT_AXIS or parameters.fusePlanes
                else parameters.sliceAxis,
                planes=list(SLICE_AXES) if parameters.fusePlanes else None,
                tta=parameters.tta,
                postprocess=parameters.postprocess,
                confidence=parameters.confidence,
                conceptBackend=parameters.conceptBackend,
                conceptBackendOptions=options,
            )
        except Exception as error:
            self.log(_("Not started: {error}").format(error=formatError(error)))
            slicer.util.errorDisplay(_("CoTexNet could not start:") + f"\n\n{formatError(error)}")
            return
        self.log(_("Segmenting {volume} with {model}").format(volume=parameters.inputVolume.GetName(), model=modelPath))
        self.ui.progressBar.setRange(0, 0)  # busy until the first batch reports
        self._segmentationPoller = JobPoller(job, self.onJobEvent, self.onSegmentationFinished)
        self.updateApplyButton()

    def onCancel(self):
        """Cancels the segmentation only: a download has its own button, and the device check is no user job."""
        if self._segmentationPoller is not None:
            self._segmentationPoller.cancel()
            self.log(_("Cancelling…"))

    def onJobEvent(self, event):
        if event.kind == "progress":
            done, total = event.value
            self.ui.progressBar.setRange(0, total)
            self.ui.progressBar.setValue(done)
        else:
            self.log(event.value)

    def onSegmentationFinished(self, job):
        """Runs whatever module is shown: the result goes to the scene's parameter node (which the connected GUI
        shows) and the concept table to this widget, which the user sees on return."""
        self._segmentationPoller = None
        self.ui.progressBar.setRange(0, 1)
        self.ui.progressBar.setValue(1 if job.state == job.DONE else 0)
        seconds = time.monotonic() - job.started
        if job.state == job.DONE:
            segmentationNode = job.result
            self.log(_("Done in {seconds} s: {name}").format(seconds=f"{seconds:.1f}", name=segmentationNode.GetName()))
            self.ui.modelPathLineEdit.addCurrentPathToHistory()
            self.logic.setOutputSegmentation(segmentationNode)
            self.showConcepts(segmentationNode)
            self.logic.showConfidence(segmentationNode)
        elif job.state == job.CANCELLED:
            self.log(_("Cancelled: the scene was not changed."))
        else:
            self.log(_("Failed: {error}").format(error=formatError(job.error)))
            slicer.util.errorDisplay(_("CoTexNet segmentation failed:") + f"\n\n{formatError(job.error)}")
        self.updateApplyButton()

    # ------------------------------------------------------------ concepts

    def showConcepts(self, segmentationNode):
        self._conceptsSegmentation = segmentationNode
        table = self.logic.conceptTable(segmentationNode)
        self.ui.conceptsTableView.setMRMLTableNode(table)
        self.ui.conceptsCollapsibleButton.collapsed = table is None

    def onConceptRowClicked(self, index):
        if self._conceptsSegmentation is not None:
            self.logic.showConceptRow(self._conceptsSegmentation, index.row())

    # ------------------------------------------------------------ backbone

    def onBackboneFolderChanged(self, path):
        qt.QSettings().setValue(backbone.BACKBONE_FOLDER_SETTING, path)
        self.ui.backboneStatusLabel.text = cachedBackboneText(path)

    def onDownloadBackbone(self):
        """Starts the backbone download, or cancels the running download (the button reads "Cancel download")."""
        if self._backbonePoller is not None:
            self._backbonePoller.cancel()
            self.log(_("Cancelling the download…"))
            return
        if not ensureEngineReady():
            return
        self.startDownload(backbone.startBackboneDownload(backbone.DEFAULT_BACKBONE,
                                                          self.ui.backboneFolderLineEdit.currentPath or None))

    def ensureLlava(self, options) -> bool:
        """True when the LLaVA concept model is at hand; else asks (with the size) and starts its download,
        which reports progress like the backbone's and stops on Cancel. Apply again once it is done."""
        repoId = backbone.llavaDownloadNeeded(options)
        if repoId is None:
            return True
        if self._backbonePoller is None and confirmLlavaDownload(repoId):
            self.log(_("Downloading {repo}; press Apply again when it is done.").format(repo=repoId))
            self.startDownload(backbone.startBackboneDownload(repoId, None, backbone.LLAVA_PATTERNS))
        return False

    def startDownload(self, job):
        self._backbonePoller = JobPoller(job, self.onJobEvent, self.onBackboneFinished, intervalMs=500)
        self.ui.downloadBackboneButton.text = _("Cancel download")
        self.ui.progressBar.setRange(0, 0)

    def onBackboneFinished(self, job):
        self._backbonePoller = None
        self.ui.downloadBackboneButton.text = _("Download")
        self.ui.progressBar.setRange(0, 1)
        self.ui.progressBar.setValue(1 if job.state == job.DONE else 0)
        if job.state == job.DONE:
            self.log(_("Downloaded into {folder}").format(folder=job.result))
        elif job.state == job.CANCELLED:
            self.log(_("Download cancelled; it resumes where it stopped next time."))
        else:
            self.log(_("Download failed: {error}").format(error=formatError(job.error)))
        self.ui.backboneStatusLabel.text = cachedBackboneText(self.ui.backboneFolderLineEdit.currentPath)
        self.updateApplyButton()


def cachedBackboneText(folder) -> str:
    """Whether the base backbone is in the (offline) folder, for the status label."""
    try:
        cached = backbone.cachedBackbone(backbone.DEFAULT_BACKBONE, folder or None)
    except ImportError:
        return _("Install the dependencies first.")
    return (_("{backbone}: downloaded.") if cached else _("{backbone}: not downloaded.")).format(
        backbone=backbone.DEFAULT_BACKBONE)


class CoTexNetSegmentTest(ScriptedLoadableModuleTest):
    """Writes a label map into a segmentation and reads it back (everywhere), then builds a tiny model (random
    weights) and segments an oblique, anisotropic volume through the logic where the engine can run.

    The extensions build machines have no torch: there the engine part is skipped with a warning (as
    SlicerTotalSegmentator's self-test skips its logic test), and the MRML part still runs.
    """

    def setUp(self):
        slicer.mrmlScene.Clear()

    def runTest(self):
        self.setUp()
        self.test_labelMapRoundTrip()
        self.setUp()
        if dependencies.checkRequirements().needsInstall:
            logging.warning("CoTexNetSegmentTest: the engine's packages (torch ...) are not installed; "
                            "test_segmentVolume skipped")
            return
        self.test_segmentVolume()

    def _obliqueVolume(self):
        import numpy as np

        volume = slicer.util.addVolumeFromArray(np.random.default_rng(0).random((5, 24, 20), dtype=np.float32),
                                                name="CoTexNet test volume")
        volume.SetSpacing(0.8, 0.6, 2.5)
        volume.SetIJKToRASDirections([[0.0, 1.0, 0.0], [-1.0, 0.0, 0.0], [0.0, 0.0, 1.0]])
        return volume

    def test_labelMapRoundTrip(self):
        import numpy as np

        from CoTexNetSegmentLib import mrml

        volume = self._obliqueVolume()
        labels = np.random.default_rng(1).integers(0, 3, (5, 24, 20)).astype(np.uint8)
        segmentation = mrml.labelMapToSegmentation(slicer.mrmlScene, labels, volume, ["a", "b"], [[1, 0, 0], [0, 1, 0]])
        np.testing.assert_array_equal(mrml.segmentationToLabelMap(segmentation, volume, ["a", "b"]), labels)
        self.delayDisplay("Label map round trip passed")

    def test_segmentVolume(self):
        import numpy as np

        from cotexnet import BundleError, CoTexNet, CoTexNetConfig
        from cotexnet.infer import segment_volume
        from CoTexNetSegmentLib import mrml

        self.delayDisplay("Building a tiny CoTexNet model")
        classes, colors = ["organ", "lesion"], [[0.9, 0.2, 0.2], [0.2, 0.8, 0.3]]
        modelDir = os.path.join(tempfile.mkdtemp(prefix="CoTexNetSelfTest-"), "model")
        try:
            model = CoTexNet.from_config(CoTexNetConfig(classes=classes, colors=colors, backbone="tiny", image_size=64))
        except BundleError as error:  # the tiny backbone's tokenizer needs CLIP's vocabulary file
            raise unittest.SkipTest(str(error)) from None
        model.save_pretrained(modelDir)
        volume = self._obliqueVolume()

        self.delayDisplay("Segmenting")
        segmentation = CoTexNetSegmentLogic(slicer.mrmlScene).segment(volume, modelDir, device="cpu")

        image, geometry = mrml.volumeToArray(volume)
        expected = segment_volume(model, image, direction=geometry.direction, device="cpu")
        segments = segmentation.GetSegmentation()
        self.assertEqual([segments.GetNthSegment(i).GetName() for i in range(segments.GetNumberOfSegments())], classes)
        np.testing.assert_array_equal(mrml.segmentationToLabelMap(segmentation, volume, classes), expected)
        self.assertEqual(CoTexNetSegmentLogic.conceptTable(segmentation).GetNumberOfRows(), len(classes))
        self.delayDisplay("Test passed")
