"""The "CoTexNet" Segment Editor effect: one click segments the source volume with a trained model.

Each class goes into the segment of its name through the Segment Editor (``modifySegmentByLabelmap``), so
the editable area, the editable intensity range and the overwrite setting apply as for Slicer's own
effects; Undo (``saveStateForUndo`` first) brings the previous segments back. The engine runs in the
background; Cancel leaves the segmentation untouched.

This folder is not a package and nothing imports it: Slicer 5.10+ loads this file as a module named after
the folder and puts it into ``sys.modules`` under that name (5.6/5.8: ``imp.load_source``). Helpers come
from ``CoTexNetSegmentLib`` and ``CoTexNetSegmentGui`` (docs/slicer.md, "Effect loading").
"""

import os

import ctk
import qt

import slicer
from SegmentEditorEffects import AbstractScriptedSegmentEditorEffect

from CoTexNetSegmentGui import JobPoller, ensureEngineReady
from CoTexNetSegmentLib import CoTexNetSegmentLogic
from CoTexNetSegmentLib.errors import formatError
from CoTexNetSegmentLib.logic import DEVICES
from CoTexNetSegmentLib.settings import RECENT_MODELS_SETTING, preferredModelPath, recentModels

try:
    from slicer.i18n import tr as _
except ImportError:  # slicer-core, without the application: the source text
    def _(text):
        return text

MODEL_PATH_PARAMETER = "CoTexNet.ModelPath"
DEVICE_PARAMETER = "CoTexNet.Device"


class SegmentEditorEffect(AbstractScriptedSegmentEditorEffect):
    def __init__(self, scriptedEffect):
        scriptedEffect.name = "CoTexNet"  # not translated: modules find effects by this name
        scriptedEffect.perSegment = False
        scriptedEffect.requireSegments = False
        AbstractScriptedSegmentEditorEffect.__init__(self, scriptedEffect)
        self.logic = None
        self.poller = None

    def clone(self):
        import qSlicerSegmentationsEditorEffectsPythonQt as effects

        clonedEffect = effects.qSlicerSegmentEditorScriptedEffect(None)
        clonedEffect.setPythonSource(__file__.replace("\\", "/"))
        return clonedEffect

    def icon(self):
        iconPath = os.path.join(os.path.dirname(os.path.dirname(__file__)), "Resources", "Icons", "SegmentEditorCoTexNet.png")
        return qt.QIcon(iconPath) if os.path.exists(iconPath) else qt.QIcon()

    def helpText(self):
        return _(
            "<html>Segment the source volume with a trained CoTexNet model.<p>"
            "Each class of the model goes into the segment of its name (created with the model's color when "
            "missing), within the editable area and intensity range of the masking settings. Undo restores the "
            "previous segments.</html>"
        )

    def setupOptionsFrame(self):
        self.modelPathLineEdit = ctk.ctkPathLineEdit()
        self.modelPathLineEdit.filters = ctk.ctkPathLineEdit.Dirs | ctk.ctkPathLineEdit.Drives | ctk.ctkPathLineEdit.NoDot | ctk.ctkPathLineEdit.NoDotDot
        self.modelPathLineEdit.settingKey = RECENT_MODELS_SETTING
        self.modelPathLineEdit.toolTip = _("Folder of a trained CoTexNet model (it holds config.json).")
        self.scriptedEffect.addLabeledOptionsWidget(_("Model:"), self.modelPathLineEdit)

        self.deviceComboBox = qt.QComboBox()
        self.deviceComboBox.addItems(list(DEVICES))
        self.deviceComboBox.toolTip = _("auto: the GPU when one is usable, else the CPU.")
        self.scriptedEffect.addLabeledOptionsWidget(_("Device:"), self.deviceComboBox)

        self.applyButton = qt.QPushButton(_("Segment"))
        self.applyButton.objectName = self.__class__.__name__ + "Apply"
        self.applyButton.toolTip = _("Segment the source volume into the current segmentation.")
        self.cancelButton = qt.QPushButton(_("Cancel"))
        self.cancelButton.enabled = False
        buttons = qt.QHBoxLayout()
        buttons.addWidget(self.applyButton)
        buttons.addWidget(self.cancelButton)
        self.scriptedEffect.addOptionsWidget(buttons)

        self.progressBar = qt.QProgressBar()
        self.progressBar.visible = False
        self.scriptedEffect.addOptionsWidget(self.progressBar)
        self.statusLabel = qt.QLabel()
        self.statusLabel.wordWrap = True
        self.scriptedEffect.addOptionsWidget(self.statusLabel)

        self.applyButton.connect("clicked()", self.onApply)
        self.cancelButton.connect("clicked()", self.onCancel)
        self.modelPathLineEdit.connect("currentPathChanged(QString)", self.updateMRMLFromGUI)
        self.deviceComboBox.connect("currentIndexChanged(int)", self.updateMRMLFromGUI)

    def cleanup(self):
        if self.poller is not None:
            self.poller.stop()
            self.poller = None

    def createCursor(self, widget):
        return slicer.util.mainWindow().cursor

    def setMRMLDefaults(self):
        self.scriptedEffect.setParameterDefault(MODEL_PATH_PARAMETER, "")
        self.scriptedEffect.setParameterDefault(DEVICE_PARAMETER, "auto")

    def updateGUIFromMRML(self):
        wasBlocked = self.modelPathLineEdit.blockSignals(True)
        self.modelPathLineEdit.currentPath = preferredModelPath(self.scriptedEffect.parameter(MODEL_PATH_PARAMETER),
                                                                recentModels())
        self.modelPathLineEdit.blockSignals(wasBlocked)
        wasBlocked = self.deviceComboBox.blockSignals(True)
        self.deviceComboBox.setCurrentText(self.scriptedEffect.parameter(DEVICE_PARAMETER) or "auto")
        self.deviceComboBox.blockSignals(wasBlocked)
        self.applyButton.enabled = self.poller is None

    def updateMRMLFromGUI(self, *unused):
        self.scriptedEffect.setParameter(MODEL_PATH_PARAMETER, self.modelPathLineEdit.currentPath)
        self.scriptedEffect.setParameter(DEVICE_PARAMETER, self.deviceComboBox.currentText)

    def onApply(self):
        parameterSetNode = self.scriptedEffect.parameterSetNode()
        segmentationNode = parameterSetNode.GetSegmentationNode()
        sourceVolumeNode = parameterSetNode.GetSourceVolumeNode()
        if segmentationNode is None or sourceVolumeNode is None:
            slicer.util.errorDisplay(_("Select a segmentation and a source volume first."))
            return
        if not ensureEngineReady():
            return
        if self.logic is None:
            self.logic = CoTexNetSegmentLogic(segmentationNode.GetScene(), modifySegment=self.modifySegment)
        try:
            job = self.logic.startSegmentation(
                sourceVolumeNode,
                self.modelPathLineEdit.currentPath,
                self.deviceComboBox.currentText,
                segmentationNode=segmentationNode,
                concepts=False,
                beforeApply=self.scriptedEffect.saveStateForUndo,
            )
        except Exception as error:
            slicer.util.errorDisplay(_("CoTexNet could not start:") + f"\n\n{formatError(error)}")
            return
        self.poller = JobPoller(job, self.onJobEvent, self.onFinished)
        self.applyButton.enabled = False
        self.cancelButton.enabled = True
        self.progressBar.visible = True
        self.progressBar.setRange(0, 0)
        self.statusLabel.text = _("Segmenting {volume}…").format(volume=sourceVolumeNode.GetName())

    def onCancel(self):
        if self.poller is not None:
            self.poller.cancel()
            self.statusLabel.text = _("Cancelling…")

    def onJobEvent(self, event):
        if event.kind == "progress":
            done, total = event.value
            self.progressBar.setRange(0, total)
            self.progressBar.setValue(done)
        else:
            self.statusLabel.text = event.value

    def modifySegment(self, segmentationNode, segmentId, labelmap):
        """Replaces a segment inside the editable area, as SegmentEditorIslandsEffect.py does per segment."""
        self.scriptedEffect.modifySegmentByLabelmap(segmentationNode, segmentId, labelmap,
                                                    slicer.qSlicerSegmentEditorAbstractEffect.ModificationModeSet)

    def onFinished(self, job):
        self.poller = None
        self.applyButton.enabled = True
        self.cancelButton.enabled = False
        self.progressBar.visible = False
        if job.state == job.DONE:
            self.statusLabel.text = _("Done. Undo restores the previous segments.")
            self.modelPathLineEdit.addCurrentPathToHistory()
        elif job.state == job.CANCELLED:
            self.statusLabel.text = _("Cancelled: the segmentation was not changed.")
        else:
            self.statusLabel.text = _("Failed: {error}").format(error=formatError(job.error))
            slicer.util.errorDisplay(_("CoTexNet segmentation failed:") + f"\n\n{formatError(job.error)}")
