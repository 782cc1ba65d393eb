"""CoTexNetTrain: train a CoTexNet segmentation model on segmentations already in Slicer.

The widget only wires the UI to :class:`CoTexNetTrainLib.CoTexNetTrainLogic`, which exports the
data and runs ``cotexnet train`` in a background process; a timer polls the logic so Slicer never
waits on training.
"""
import enum
import pathlib
from typing import Annotated

import qt

import slicer
from slicer import vtkMRMLScalarVolumeNode, vtkMRMLSegmentationNode
from slicer.ScriptedLoadableModule import (
    ScriptedLoadableModule,
    ScriptedLoadableModuleLogic,
    ScriptedLoadableModuleTest,
    ScriptedLoadableModuleWidget,
)
from slicer.parameterNodeWrapper import Choice, Decimals, SingleStep, WithinRange, parameterNodeWrapper
from slicer.util import VTKObservationMixin

from cotexnet.config import CONCEPT_BACKENDS, DEFAULT_BACKBONE, DEVICES, recipe_name
from CoTexNetSegmentGui import ParameterNodeGui, ensureEngineReady  # shared with CoTexNetSegment
from CoTexNetSegmentLib.errors import formatError
from CoTexNetSegmentLib.settings import isChosenPath
from CoTexNetTrainLib import (
    CoTexNetTrainLogic,
    RunExistsError,
    TrainingInputError,
    TrainingRunError,
    TrainingState,
    continuedClasses,
    findScenePairs,
    folderClasses,
    formatDuration,
    modelClasses,
    recipeFields,
    segmentNames,
    trainingFieldOptions,
)

from CoTexNetSegmentLib.i18n import tr as _
from CoTexNetSegmentLib.i18n import translate

#: How often the widget reads the training process's progress, in milliseconds.
POLL_INTERVAL_MS = 1000
#: Modalities written to the exported dataset.json; CT picks the engine's soft-tissue window, others percentiles.
MODALITIES = ("MR", "CT", "US", "PET", "other")
#: A stop request the process has not honoured after this many seconds ends it by force.
STOP_GRACE_S = 120


class CoTexNetTrain(ScriptedLoadableModule):
    def __init__(self, parent):
        ScriptedLoadableModule.__init__(self, parent)
        self.parent.title = _("CoTexNet Train")
        self.parent.categories = [translate("qSlicerAbstractCoreModule", "Segmentation")]
        self.parent.dependencies = ["CoTexNetSegment"]  # its dependency setup, logic and model list
        self.parent.contributors = ["CoTexNet for 3D Slicer contributors (CoTexNet for 3D Slicer project)"]
        self.parent.helpText = _("""
Train a CoTexNet model on volumes you have segmented in Slicer (or on a dataset folder). Training runs
in a background process: Slicer stays usable, progress, loss and validation Dice are shown as they
arrive, Stop keeps the best model so far, and Resume continues. The trained model appears in the
CoTexNet Segment module.
""")
        self.parent.acknowledgementText = _("""
CoTexNet: vision-language segmentation with text used only in training, distilled into the image
(CLIPSeg backbone).
""")


class DataSource(enum.Enum):
    SegmentedVolumes = "segmentedVolumes"
    SelectedPairs = "selectedPairs"
    Folder = "folder"

    def label(self):
        return {
            DataSource.SegmentedVolumes: _("All segmented volumes in the scene"),
            DataSource.SelectedPairs: _("Selected volume/segmentation pairs"),
            DataSource.Folder: _("Dataset folder"),
        }[self]


@parameterNodeWrapper
class CoTexNetTrainParameterNode:
    dataSource: DataSource = DataSource.SegmentedVolumes
    pairVolumes: list[vtkMRMLScalarVolumeNode]
    pairSegmentations: list[vtkMRMLSegmentationNode]
    dataFolder: pathlib.Path = pathlib.Path.home()
    folderClassNames: str
    modality: Annotated[str, Choice(MODALITIES)] = "MR"
    classNames: list[str]
    keywords: list[str]
    conceptBackend: Annotated[str, Choice(CONCEPT_BACKENDS)] = "geometric"
    backbone: str = DEFAULT_BACKBONE
    epochs: Annotated[int, WithinRange(1, 10000)] = 500
    batchSize: Annotated[int, WithinRange(1, 256)] = 8
    learningRate: Annotated[float, WithinRange(1e-6, 1.0), Decimals(6), SingleStep(1e-5)] = 3e-4
    patience: Annotated[int, WithinRange(1, 10000)] = 50
    imageSize: Annotated[int, WithinRange(64, 1024), SingleStep(16)] = 352
    device: Annotated[str, Choice(DEVICES)] = "auto"
    outputFolder: pathlib.Path = pathlib.Path.home() / "CoTexNet" / "models"
    modelName: str = "MyModel"
    segmentVolume: vtkMRMLScalarVolumeNode
    # "Continue from model" is not here: an empty pathlib.Path is stored and shown as "." (parameterNodeWrapper's
    # PathSerializer, serializers.py v5.6.2 lines 334-338). It is the path field's own value, as CoTexNetSegment's
    # model folder is.


class CoTexNetTrainWidget(ScriptedLoadableModuleWidget, VTKObservationMixin):
    def __init__(self, parent=None):
        ScriptedLoadableModuleWidget.__init__(self, parent)
        VTKObservationMixin.__init__(self)
        self.logic = None
        self._parameterGui = None  # the one parameter node wrapper, connected once (CoTexNetSegmentGui.ParameterNodeGui)
        self._parameterNode = None
        self._segmentJob = None
        # Looked up once: Slicer 5.6's tr() inspects the whole stack on every call (Base/Python/slicer/i18n.py,
        # v5.6.2 line 54), and updateGUI runs on every parameter and scene change.
        self._noNodeText, self._noBundleText = _("(none)"), _("none yet")
        self._shownRecipe = None  # the backbone recipe the training fields show (cotexnet.config.RECIPES)
        self._timer = qt.QTimer()
        self._timer.setInterval(POLL_INTERVAL_MS)
        self._timer.timeout.connect(self.onPoll)

    def setup(self):
        ScriptedLoadableModuleWidget.setup(self)
        uiWidget = slicer.util.loadUI(self.resourcePath("UI/CoTexNetTrain.ui"))
        self.layout.addWidget(uiWidget)
        self.ui = slicer.util.childWidgetVariables(uiWidget)
        uiWidget.setMRMLScene(slicer.mrmlScene)
        self.logic = CoTexNetTrainLogic(slicer.mrmlScene)
        self._parameterGui = ParameterNodeGui(CoTexNetTrainParameterNode, self.ui, self.updateGUI)

        self.ui.addPairButton.clicked.connect(self.onAddPair)
        self.ui.removePairButton.clicked.connect(self.onRemovePairs)
        self.ui.readClassesButton.clicked.connect(self.onReadClasses)
        self.ui.classesTableWidget.itemChanged.connect(self.onKeywordEdited)
        self.ui.startButton.clicked.connect(self.onStart)
        self.ui.stopButton.clicked.connect(self.onStop)
        self.ui.resumeButton.clicked.connect(self.onResume)
        self.ui.showPlotButton.clicked.connect(self.onShowPlot)
        self.ui.segmentButton.clicked.connect(self.onSegment)

        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.EndCloseEvent, self.onSceneEndClose)
        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.NodeAddedEvent, self.onSceneNodesChanged)
        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.NodeRemovedEvent, self.onSceneNodesChanged)
        self.initializeParameterNode()

    def cleanup(self):
        """On module unload (or application exit) a running training is asked to save and stop; Resume continues it."""
        self._timer.stop()
        if self.logic is not None:
            self.logic.requestStop()
        if self._parameterGui is not None:
            self._parameterGui.detach()
        self.removeObservers()

    def enter(self):
        self.initializeParameterNode()

    def onSceneEndClose(self, caller, event):
        if self.parent.isEntered:
            self.initializeParameterNode()

    def onSceneNodesChanged(self, caller, event):
        if self._parameterNode and self._parameterNode.dataSource == DataSource.SegmentedVolumes:
            qt.QTimer.singleShot(0, self.updateGUI)  # after the node is fully added or removed

    # ------------------------------------------------------------------ parameter node

    def initializeParameterNode(self):
        """Shows the scene's parameter node (connected to the GUI once per node, see ``ParameterNodeGui``)."""
        store = ScriptedLoadableModuleLogic()
        store.moduleName = self.moduleName
        wrapper = self._parameterGui.attach(store.getParameterNode())
        if wrapper is not self._parameterNode:
            self._shownRecipe = recipe_name(wrapper.backbone.strip())  # keep the values a scene saved
        self._parameterNode = wrapper
        self.updateGUI()

    def _initFrom(self):
        """The "Continue from model" folder, or None when none is chosen."""
        path = self.ui.initFromPathLineEdit.currentPath
        return path if isChosenPath(path) else None

    def _pairs(self):
        if self._parameterNode.dataSource == DataSource.SegmentedVolumes:
            return findScenePairs(slicer.mrmlScene)
        return list(zip(self._parameterNode.pairVolumes, self._parameterNode.pairSegmentations))

    def _outDir(self) -> pathlib.Path:
        return pathlib.Path(self._parameterNode.outputFolder) / self._parameterNode.modelName.strip()

    def updateGUI(self, caller=None, event=None):
        """Shows the parameter node's pairs and classes, and enables what the run state allows."""
        if not self._parameterNode:
            return
        recipe = recipe_name(self._parameterNode.backbone.strip())
        if recipe != self._shownRecipe:  # another kind of backbone: its recipe's epochs, lr, size... (editable)
            self._shownRecipe = recipe
            with slicer.util.NodeModify(self._parameterNode):
                for field, value in recipeFields(self._parameterNode.backbone).items():
                    setattr(self._parameterNode, field, value)
        source = self._parameterNode.dataSource
        fromScene = source != DataSource.Folder
        self.ui.sceneDataWidget.setVisible(fromScene)
        self.ui.pairEditWidget.setVisible(source == DataSource.SelectedPairs)
        self.ui.dataFolderLabel.setVisible(not fromScene)
        self.ui.dataFolderPathLineEdit.setVisible(not fromScene)
        self.ui.folderClassNamesLabel.setVisible(not fromScene)
        self.ui.folderClassNamesLineEdit.setVisible(not fromScene)
        self.ui.modalityLabel.setVisible(fromScene)
        self.ui.modalityComboBox.setVisible(fromScene)

        pairs = self._pairs() if fromScene else []
        table = self.ui.pairsTableWidget
        table.setRowCount(len(pairs))
        for row, (volumeNode, segmentationNode) in enumerate(pairs):
            cells = (
                volumeNode.GetName() if volumeNode else self._noNodeText,
                segmentationNode.GetName() if segmentationNode else self._noNodeText,
                ", ".join(segmentNames(segmentationNode)) if segmentationNode else "",
            )
            for column, text in enumerate(cells):
                table.setItem(row, column, qt.QTableWidgetItem(text))

        classes = self._parameterNode.classNames
        keywords = self._parameterNode.keywords
        classTable = self.ui.classesTableWidget
        wasBlocked = classTable.blockSignals(True)
        classTable.setRowCount(len(classes))
        for row, name in enumerate(classes):
            nameItem = qt.QTableWidgetItem(name)
            nameItem.setFlags(qt.Qt.ItemIsEnabled | qt.Qt.ItemIsSelectable)
            classTable.setItem(row, 0, nameItem)
            classTable.setItem(row, 1, qt.QTableWidgetItem(keywords[row] if row < len(keywords) else name))
        classTable.blockSignals(wasBlocked)

        running = self.logic.isRunning
        outDir = self._outDir() if self._parameterNode.modelName.strip() else None
        resumable = outDir is not None and self.logic.resumeProblem(outDir) is None
        self.ui.startButton.enabled = not running and bool(self._parameterNode.modelName.strip())
        self.ui.stopButton.enabled = running and self.logic.state != TrainingState.STOPPING
        self.ui.resumeButton.enabled = not running and resumable
        self.ui.showPlotButton.enabled = self.logic.chartNode is not None
        bundle = self.logic.bundlePath
        self.ui.bundleLabel.text = str(bundle) if bundle else self._noBundleText
        self.ui.segmentButton.enabled = (
            bundle is not None and self._parameterNode.segmentVolume is not None and self._segmentJob is None
        )

    # ------------------------------------------------------------------ data and classes

    def onAddPair(self):
        volumeNode = self.ui.volumeSelector.currentNode()
        segmentationNode = self.ui.segmentationSelector.currentNode()
        if volumeNode is None or segmentationNode is None:
            slicer.util.errorDisplay(_("Select a volume and its segmentation first."))
            return
        with slicer.util.NodeModify(self._parameterNode):
            self._parameterNode.pairVolumes.append(volumeNode)
            self._parameterNode.pairSegmentations.append(segmentationNode)
        if not self._parameterNode.classNames:
            self.onReadClasses()

    def onRemovePairs(self):
        rows = sorted({index.row() for index in self.ui.pairsTableWidget.selectedIndexes()}, reverse=True)
        with slicer.util.NodeModify(self._parameterNode):
            for row in rows:
                del self._parameterNode.pairVolumes[row]
                del self._parameterNode.pairSegmentations[row]

    def onReadClasses(self):
        """Classes from the first segmentation's segments (or dataset.json), or when continuing from a model, its
        classes and then the segments it lacks; keywords kept for names that stay."""
        with slicer.util.tryWithErrorDisplay(_("Could not read the classes."), waitCursor=True):
            if self._parameterNode.dataSource == DataSource.Folder:
                typed = [n.strip() for n in self._parameterNode.folderClassNames.split(",") if n.strip()]
                classes = folderClasses(self._parameterNode.dataFolder, typed or None)
            elif self._initFrom():
                classes = continuedClasses(self._pairs(), modelClasses(self._initFrom()))
            else:
                pairs = self._pairs()
                classes = segmentNames(pairs[0][1]) if pairs and pairs[0][1] is not None else []
            previous = dict(zip(self._parameterNode.classNames, self._parameterNode.keywords))
            with slicer.util.NodeModify(self._parameterNode):
                self._parameterNode.classNames = classes
                self._parameterNode.keywords = [previous.get(name, name) for name in classes]

    def onKeywordEdited(self, item):
        if item.column() != 1 or not self._parameterNode:
            return
        keywords = list(self._parameterNode.keywords)
        keywords[item.row()] = item.text().strip() or self._parameterNode.classNames[item.row()]
        self._parameterNode.keywords = keywords

    # ------------------------------------------------------------------ running

    def _trainingOptions(self) -> dict:
        """The run's options; recipe fields the user left at the backbone's recipe are not sent (the engine's
        recipe for that backbone applies)."""
        p = self._parameterNode
        fields = {field: getattr(p, field) for field in ("epochs", "batchSize", "learningRate", "patience", "imageSize")}
        return {
            "backbone": p.backbone.strip(),
            **trainingFieldOptions(p.backbone, fields),
            "device": p.device,
            "conceptBackend": p.conceptBackend,
            "initFrom": self._initFrom(),
        }

    def onStart(self):
        if not ensureEngineReady():  # torch and the engine's packages, after one confirmation
            return
        p = self._parameterNode
        if (not p.classNames or self._initFrom()) and p.dataSource != DataSource.Folder:
            self.onReadClasses()  # show the classes that will be trained (the logic checks them)
        data = p.dataFolder if p.dataSource == DataSource.Folder else self._pairs()
        self.ui.logTextEdit.clear()

        def start(overwrite: bool) -> None:
            self.logic.train(data, list(p.classNames) or None, self._outDir(), keywords=list(p.keywords) or None,
                             modality=p.modality, waitForCompletion=False, overwrite=overwrite,
                             **self._trainingOptions())

        with slicer.util.tryWithErrorDisplay(_("Training could not start."), waitCursor=True):
            try:
                start(False)
            except RunExistsError as error:
                question = _("{error}\n\nReplace it? Its models and training curve are deleted.").format(error=error)
                if not slicer.util.confirmYesNoDisplay(question, windowTitle=_("Replace CoTexNet training run")):
                    return
                start(True)
            self._started()

    def onResume(self):
        if not ensureEngineReady():
            return
        with slicer.util.tryWithErrorDisplay(_("Training could not resume."), waitCursor=True):
            self.logic.resume(self._outDir())
            self._started()

    def _started(self):
        slicer.modules.plots.logic().ShowChartInLayout(self.logic.chartNode)
        self._timer.start()
        self.onPoll()

    def onStop(self):
        if not slicer.util.confirmOkCancelDisplay(
            _("Stop training after the current step?\n\nThe best model so far stays usable, and Resume continues "
              "this run later."),
            windowTitle=_("Stop CoTexNet training"),
        ):
            return
        self.logic.requestStop()
        self.updateGUI()

    def onPoll(self):
        """Timer tick: new events to the progress bar, status, log and plot (the logic fills the table)."""
        for event in self.logic.poll():
            if event.get("event") == "warning":
                self.ui.logTextEdit.appendPlainText(_("Warning: {message}").format(message=event.get("message", "")))
        log = self.logic.readLog()
        if log:
            self.ui.logTextEdit.appendPlainText(log)
        progress = self.logic.progress
        self.ui.progressBar.value = int(round(progress.fraction * self.ui.progressBar.maximum))
        eta = formatDuration(progress.etaSeconds) if self.logic.isRunning else ""
        self.ui.progressBar.format = "%p%   " + _("ETA {eta}").format(eta=eta) if eta else "%p%"
        waited = self.logic.secondsSinceStopRequest()
        if self.logic.isRunning and waited is not None and waited > STOP_GRACE_S:
            self.logic.terminate()
        if self.logic.isRunning:
            stopping = _("Stopping...") + " " if self.logic.state == TrainingState.STOPPING else ""
            self.ui.statusLabel.text = stopping + progress.summary()
        else:
            self._timer.stop()
            self._finished()
        self.updateGUI()

    def _finished(self):
        state = self.logic.state
        if state == TrainingState.FAILED:
            self.ui.statusLabel.text = _("Training failed.")
            slicer.util.errorDisplay(_("CoTexNet training failed."), detailedText=self.logic.errorMessage)
            return
        self.ui.statusLabel.text = self.logic.progress.summary()
        if self.logic.bundlePath is not None:
            self._refreshSegmentModule()

    def _refreshSegmentModule(self):
        """Lists the new model in an open CoTexNetSegment module and selects it (the shared recent-models list)."""
        module = getattr(slicer.modules, "cotexnetsegment", None)
        widget = module.widgetRepresentation().self() if module is not None else None
        refresh = getattr(widget, "refreshModels", None)
        if refresh is not None:
            refresh()

    def onShowPlot(self):
        if self.logic.chartNode is not None:
            slicer.modules.plots.logic().ShowChartInLayout(self.logic.chartNode)

    def onSegment(self):
        """Segments the chosen volume with the new model through CoTexNetSegment's logic, in the background."""
        from CoTexNetSegmentLib import CoTexNetSegmentLogic

        volumeNode = self._parameterNode.segmentVolume
        if not ensureEngineReady():
            return
        with slicer.util.tryWithErrorDisplay(_("Segmentation could not start."), waitCursor=True):
            self._segmentJob = CoTexNetSegmentLogic(slicer.mrmlScene).segment(
                volumeNode, str(self.logic.bundlePath), waitForCompletion=False
            )
            self.ui.segmentButton.enabled = False
            self.onSegmentPoll()

    def onSegmentPoll(self):
        job = self._segmentJob
        job.poll()
        if not job.finished:
            done, total = job.progress
            self.ui.statusLabel.text = (_("Segmenting: slice {done} of {total}").format(done=done, total=total)
                                        if total else _("Segmenting..."))
            qt.QTimer.singleShot(250, self.onSegmentPoll)
            return
        self._segmentJob = None
        if job.state == job.FAILED:
            self.ui.statusLabel.text = _("Segmentation failed.")
            slicer.util.errorDisplay(_("Segmentation failed:") + f"\n\n{formatError(job.error)}")
        elif job.state == job.DONE:
            self.ui.statusLabel.text = _("Segmented into {name}.").format(name=job.result.GetName())
        self.updateGUI()


class CoTexNetTrainTest(ScriptedLoadableModuleTest):
    """Self-test inside Slicer: export a synthetic segmented volume and train for one epoch with the tiny backbone."""

    def setUp(self):
        slicer.mrmlScene.Clear()

    def runTest(self):
        """The engine part is skipped (with a warning) where torch is missing: the extensions build machines."""
        self.setUp()
        self.test_InputErrorsAndShortTraining()

    def test_InputErrorsAndShortTraining(self):
        import logging
        import tempfile

        import numpy as np

        from CoTexNetSegmentLib import dependencies

        self.delayDisplay("Building segmented volumes")
        from CoTexNetSegmentLib import mrml

        rng = np.random.default_rng(0)
        pairs = []
        for case in range(2):
            labels = np.zeros((6, 48, 48), np.uint8)
            labels[:, 10 + 4 * case:30, 12:28 + 4 * case] = 1
            volume = np.where(labels == 1, 100.0, 0.0) + rng.normal(0, 5, labels.shape)
            volumeNode = slicer.util.addVolumeFromArray(volume.astype(np.float32), name=f"TrainTestVolume{case}")
            segmentationNode = mrml.labelMapToSegmentation(slicer.mrmlScene, labels, volumeNode, ["box"], [[1, 0, 0]])
            pairs.append((volumeNode, segmentationNode))

        logic = CoTexNetTrainLogic(slicer.mrmlScene)
        with self.assertRaises(TrainingInputError):
            logic.train([(pairs[0][0], None)], None, tempfile.mkdtemp(), waitForCompletion=False)
        if dependencies.checkRequirements().needsInstall:
            logging.warning("CoTexNetTrainTest: the engine's packages (torch ...) are not installed; training skipped")
            return

        self.delayDisplay("Training one epoch (tiny backbone)")
        outDir = pathlib.Path(tempfile.mkdtemp()) / "selftest"
        try:
            bundle = logic.train(
                pairs, None, outDir, backbone="tiny", epochs=1, imageSize=64, batchSize=4, device="cpu", timeout=600
            )
        except TrainingRunError as error:
            self.fail(str(error))
        self.assertTrue((bundle / "config.json").is_file())
        self.assertGreaterEqual(logic.tableNode.GetNumberOfRows(), 1)
        self.delayDisplay("Test passed")
