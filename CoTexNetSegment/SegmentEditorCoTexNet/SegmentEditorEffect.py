"""The "CoTexNet" Segment Editor effect: one click segments the source volume with a trained model.

Segments named like the model's classes are replaced (after ``saveStateForUndo``, so Undo brings them
back); every other segment is left as it was. The engine runs in the background; Cancel leaves the
segmentation untouched.
"""

import os

import ctk
import qt

import slicer
from SegmentEditorEffects import AbstractScriptedSegmentEditorEffect

from CoTexNetSegmentGui import RECENT_MODELS_SETTING, JobPoller, ensureEngineReady, formatError
from CoTexNetSegmentLib import CoTexNetSegmentLogic

MODEL_PATH_PARAMETER = "CoTexNet.ModelPath"
DEVICE_PARAMETER = "CoTexNet.Device"
DEVICES = ("auto", "cpu", "cuda")


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
        return (
            "<html>Segment the source volume with a trained CoTexNet model.<p>"
            "Each class of the model becomes a segment with the model's name and color. Segments with those "
            "names are replaced (Undo restores them); other segments are not changed.</html>"
        )

    def setupOptionsFrame(self):
        self.modelPathLineEdit = ctk.ctkPathLineEdit()
        self.modelPathLineEdit.filters = ctk.ctkPathLineEdit.Dirs | ctk.ctkPathLineEdit.Drives | ctk.ctkPathLineEdit.NoDot | ctk.ctkPathLineEdit.NoDotDot
        self.modelPathLineEdit.settingKey = RECENT_MODELS_SETTING
        self.modelPathLineEdit.toolTip = "Folder of a trained CoTexNet model (it holds config.json)."
        self.scriptedEffect.addLabeledOptionsWidget("Model:", self.modelPathLineEdit)

        self.deviceComboBox = qt.QComboBox()
        self.deviceComboBox.addItems(list(DEVICES))
        self.deviceComboBox.toolTip = "auto: the GPU when one is usable, else the CPU."
        self.scriptedEffect.addLabeledOptionsWidget("Device:", self.deviceComboBox)

        self.applyButton = qt.QPushButton("Segment")
        self.applyButton.objectName = self.__class__.__name__ + "Apply"
        self.applyButton.toolTip = "Segment the source volume into the current segmentation."
        self.cancelButton = qt.QPushButton("Cancel")
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
        self.modelPathLineEdit.currentPath = self.scriptedEffect.parameter(MODEL_PATH_PARAMETER)
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
            slicer.util.errorDisplay("Select a segmentation and a source volume first.")
            return
        if not ensureEngineReady():
            return
        if self.logic is None:
            self.logic = CoTexNetSegmentLogic(segmentationNode.GetScene())
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
            slicer.util.errorDisplay(f"CoTexNet could not start:\n\n{formatError(error)}")
            return
        self.poller = JobPoller(job, self.onJobEvent, self.onFinished)
        self.applyButton.enabled = False
        self.cancelButton.enabled = True
        self.progressBar.visible = True
        self.progressBar.setRange(0, 0)
        self.statusLabel.text = f"Segmenting {sourceVolumeNode.GetName()}…"

    def onCancel(self):
        if self.poller is not None:
            self.poller.cancel()
            self.statusLabel.text = "Cancelling…"

    def onJobEvent(self, event):
        if event.kind == "progress":
            done, total = event.value
            self.progressBar.setRange(0, total)
            self.progressBar.setValue(done)
        else:
            self.statusLabel.text = event.value

    def onFinished(self, job):
        self.poller = None
        self.applyButton.enabled = True
        self.cancelButton.enabled = False
        self.progressBar.visible = False
        if job.state == job.DONE:
            self.statusLabel.text = "Done. Undo restores the previous segments."
            self.modelPathLineEdit.addCurrentPathToHistory()
        elif job.state == job.CANCELLED:
            self.statusLabel.text = "Cancelled: the segmentation was not changed."
        else:
            self.statusLabel.text = f"Failed: {formatError(job.error)}"
            slicer.util.errorDisplay(f"CoTexNet segmentation failed:\n\n{formatError(job.error)}")
