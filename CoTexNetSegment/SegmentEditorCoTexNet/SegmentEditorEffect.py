"""The "CoTexNet" Segment Editor effect: one click segments the source volume with a trained model.

Each class goes into the segment of its name through the Segment Editor (``modifySegmentByLabelmap``), so
the editable area, the editable intensity range and the overwrite setting apply as for Slicer's own
effects; Undo (``saveStateForUndo`` first) brings the previous segments back. The engine runs in the
background; Cancel leaves the segmentation untouched.

Nothing imports this folder as a package (its ``__init__.py`` only gives the strings their own translation
context): Slicer 5.10+ loads this file as a module named after the folder and puts it into ``sys.modules``
under that name (5.6/5.8: ``imp.load_source``). Helpers come from ``CoTexNetSegmentLib`` and
``CoTexNetSegmentGui`` (docs/slicer.md, "Effect loading").
"""

import os

import ctk
import qt

import slicer
from SegmentEditorEffects import AbstractScriptedSegmentEditorEffect

from CoTexNetSegmentGui import JobPoller, ensureEngineReady
from CoTexNetSegmentLib import CoTexNetSegmentLogic
from CoTexNetSegmentLib.editing import SegmentEditorTarget
from CoTexNetSegmentLib.errors import formatError
from CoTexNetSegmentLib.logic import DEVICES, SLICE_AXES
from CoTexNetSegmentLib.settings import RECENT_MODELS_SETTING, preferredModelPath, recentModels

from CoTexNetSegmentLib.i18n import tr as _

MODEL_PATH_PARAMETER = "CoTexNet.ModelPath"
DEVICE_PARAMETER = "CoTexNet.Device"
FUSE_PLANES_PARAMETER = "CoTexNet.FusePlanes"
TTA_PARAMETER = "CoTexNet.TTA"


class SegmentEditorEffect(AbstractScriptedSegmentEditorEffect):
    def __init__(self, scriptedEffect):
        scriptedEffect.name = "CoTexNet"  # not translated: modules find effects by this name
        scriptedEffect.perSegment = False
        scriptedEffect.requireSegments = False
        AbstractScriptedSegmentEditorEffect.__init__(self, scriptedEffect)
        self.poller = None
        self._connections = []  # (widget, signal, slot) made by setupOptionsFrame, undone by cleanup

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

        self.fusePlanesCheckBox = qt.QCheckBox(_("Fuse axial, coronal and sagittal"))
        self.fusePlanesCheckBox.toolTip = _("Average the class probabilities of passes along all three planes.")
        self.ttaCheckBox = qt.QCheckBox(_("Test-time flips"))
        self.ttaCheckBox.toolTip = _("Also segment the left-right mirrored slices (left/right classes swapped back).")
        options = qt.QHBoxLayout()
        options.addWidget(self.fusePlanesCheckBox)
        options.addWidget(self.ttaCheckBox)
        self.scriptedEffect.addOptionsWidget(options)

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

        self._connections = [
            (self.applyButton, "clicked()", self.onApply),
            (self.cancelButton, "clicked()", self.onCancel),
            (self.modelPathLineEdit, "currentPathChanged(QString)", self.updateMRMLFromGUI),
            (self.deviceComboBox, "currentIndexChanged(int)", self.updateMRMLFromGUI),
            (self.fusePlanesCheckBox, "toggled(bool)", self.updateMRMLFromGUI),
            (self.ttaCheckBox, "toggled(bool)", self.updateMRMLFromGUI),
            # Slicer 5.6/5.8 delete an effect's widgets without calling cleanup(): a running job stops with them.
            (self.applyButton, "destroyed()", self.stopJob),
        ]
        for widget, signal, slot in self._connections:
            widget.connect(signal, slot)

    def cleanup(self):
        """Called by Slicer 5.10+ before the effect is deleted (qMRMLSegmentEditorWidget's destructor). The Python
        slots connected here would keep this object alive (Slicer issue #7392): disconnect them, stop the job."""
        for widget, signal, slot in self._connections:
            widget.disconnect(signal, slot)
        self._connections = []
        self.stopJob()

    def stopJob(self):
        """Cancels a running segmentation and stops polling it; the segmentation is left as it was."""
        if self.poller is not None:
            self.poller.stop()
            self.poller = None

    def createCursor(self, widget):
        return slicer.util.mainWindow().cursor

    def setMRMLDefaults(self):
        self.scriptedEffect.setParameterDefault(MODEL_PATH_PARAMETER, "")
        self.scriptedEffect.setParameterDefault(DEVICE_PARAMETER, "auto")
        self.scriptedEffect.setParameterDefault(FUSE_PLANES_PARAMETER, 0)
        self.scriptedEffect.setParameterDefault(TTA_PARAMETER, 0)

    def updateGUIFromMRML(self):
        wasBlocked = self.modelPathLineEdit.blockSignals(True)
        self.modelPathLineEdit.currentPath = preferredModelPath(self.scriptedEffect.parameter(MODEL_PATH_PARAMETER),
                                                                recentModels())
        self.modelPathLineEdit.blockSignals(wasBlocked)
        wasBlocked = self.deviceComboBox.blockSignals(True)
        self.deviceComboBox.setCurrentText(self.scriptedEffect.parameter(DEVICE_PARAMETER) or "auto")
        self.deviceComboBox.blockSignals(wasBlocked)
        for checkBox, name in ((self.fusePlanesCheckBox, FUSE_PLANES_PARAMETER), (self.ttaCheckBox, TTA_PARAMETER)):
            wasBlocked = checkBox.blockSignals(True)
            checkBox.checked = self.scriptedEffect.integerParameter(name) != 0
            checkBox.blockSignals(wasBlocked)
        self.applyButton.enabled = self.poller is None

    def updateMRMLFromGUI(self, *unused):
        self.scriptedEffect.setParameter(MODEL_PATH_PARAMETER, self.modelPathLineEdit.currentPath)
        self.scriptedEffect.setParameter(DEVICE_PARAMETER, self.deviceComboBox.currentText)
        self.scriptedEffect.setParameter(FUSE_PLANES_PARAMETER, int(self.fusePlanesCheckBox.checked))
        self.scriptedEffect.setParameter(TTA_PARAMETER, int(self.ttaCheckBox.checked))

    def onApply(self):
        parameterSetNode = self.scriptedEffect.parameterSetNode()
        segmentationNode = parameterSetNode.GetSegmentationNode()
        sourceVolumeNode = parameterSetNode.GetSourceVolumeNode()
        if segmentationNode is None or sourceVolumeNode is None:
            slicer.util.errorDisplay(_("Select a segmentation and a source volume first."))
            return
        if not ensureEngineReady():
            return
        editor = SegmentEditorTarget(parameterSetNode, self.scriptedEffect.referenceGeometryImage, self.modifySegment)
        try:
            job = CoTexNetSegmentLogic(segmentationNode.GetScene(), segmentEditor=editor).startSegmentation(
                sourceVolumeNode,
                self.modelPathLineEdit.currentPath,
                self.deviceComboBox.currentText,
                segmentationNode=segmentationNode,
                planes=list(SLICE_AXES) if self.fusePlanesCheckBox.checked else None,
                tta=self.ttaCheckBox.checked,
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
        """Replaces a segment inside the editable area, as SegmentEditorIslandsEffect.py does per segment; the
        labelmap is on ``referenceGeometryImage()`` and its segment is selected (``editing.applyPerSegment``)."""
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
