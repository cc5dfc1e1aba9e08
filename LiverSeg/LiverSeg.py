"""LiverSeg: liver and liver-lesion segmentation of CT in 3D Slicer.

Scripted-module anatomy as in Slicer's template: ``LiverSeg`` (module description), ``LiverSegWidget``
(gathers parameters, starts, polls and cancels a run, shows messages; the only place with Qt),
``LiverSegLogic`` (installs what is missing, calls the engine's MRML layer ``LiverSegLib.mrml``),
``LiverSegTest`` (a self-test that really segments the shipped sample).

The engine never runs in Slicer's process: Slicer's main thread holds Python's GIL, so a worker thread
would crawl, and a crash in torch would take Slicer down. ``LiverSegLib.mrml.start_segmentation`` writes
the CT to a temporary file and starts Slicer's own Python (``PythonSlicer``) on the ``liverseg`` command
line with ``--progress json``; a 100 ms timer polls it; its label map is imported on the main thread.
Nothing here imports torch, the engine's pipeline, or anything else heavy.

Slicer calls and the releases they were checked against (Slicer's source: 5.8 era, 5.10, main of 2026):

=============================================================  ==============================================
call                                                           availability / how it is used
=============================================================  ==============================================
``vtkSegment.SetTerminology``                                  5.10+; before, the ``TerminologyEntry`` tag
                                                               (``LiverSegLib.mrml.set_terminology``)
``parameterNodeWrapper``, ``Choice``, GUI connectors           5.4+
``slicer.i18n.tr`` / ``translate``                             5.4+ (context fix before 5.8)
``qMRMLSegmentEditorWidget.setSourceVolumeNode``               5.2+ (``setMasterVolumeNode`` deprecated)
``slicer.util.pip_install(list)``                              all; str split with shlex, list passed as is;
                                                               raises ``CalledProcessError``
``slicer.util.tryWithErrorDisplay`` / ``errorDisplay``         all in use; re-raises; dialogs only log in
                                                               testing mode
``slicer.util.arrayFromSegmentBinaryLabelmap(.., reference)``  5.6+ (the self-test)
``SampleDataLogic.registerCustomSampleDataSource``             all in use; ``file:`` URIs fetched by urllib
``PyTorchUtilsLogic().installTorch(askConfirmation=...)``      PyTorch extension; returns torch, ``None`` if
                                                               declined, raises on failure; adds torchvision
``shutil.which("PythonSlicer")``                               how Slicer's own pip calls find its Python
=============================================================  ==============================================
"""

import logging
import shutil
import sys
import time
from pathlib import Path
from typing import Annotated, Optional

import slicer
import vtk
from slicer import vtkMRMLScalarVolumeNode, vtkMRMLSegmentationNode
from slicer.i18n import tr as _
from slicer.i18n import translate
from slicer.parameterNodeWrapper import Choice, parameterNodeWrapper
from slicer.ScriptedLoadableModule import (
    ScriptedLoadableModule,
    ScriptedLoadableModuleLogic,
    ScriptedLoadableModuleTest,
    ScriptedLoadableModuleWidget,
)
from slicer.util import VTKObservationMixin

from LiverSegLib.options import DEVICES  # torch-free, like everything imported at load

MODULE_DIR = Path(__file__).resolve().parent
SAMPLE_FILE = MODULE_DIR / "Resources" / "Samples" / "CRLM-CT-1004.nii.gz"
SAMPLE_SHA256 = "SHA256:f9577d22f4e8a1d6223de3c28973ef12635e176c47574edc6e49cf297896f4f7"
POLL_INTERVAL_MS = 100
STAGE_TEXT = {
    "starting": "Starting the engine…",
    "reading": "Reading the CT…",
    "loading model": "Loading the model…",
    "segmenting": "Segmenting…",
    "writing": "Writing the result…",
}


#
# LiverSeg
#


class LiverSeg(ScriptedLoadableModule):
    def __init__(self, parent):
        ScriptedLoadableModule.__init__(self, parent)
        self.parent.title = _("Liver Segmentation (LiverSeg)")
        self.parent.categories = [translate("qSlicerAbstractCoreModule", "Segmentation")]
        self.parent.dependencies = []
        self.parent.contributors = ["LiverSeg team"]
        self.parent.helpText = _(
            "Segments the liver and liver lesions of a CT volume in seconds with a 2D U-Net, on the GPU when there "
            "is one. Select a CT, click <b>Segment Liver</b>, then <b>Correct in Segment Editor</b> to paint or erase. "
            "The segmentation lies voxel for voxel on the CT's grid. Lesion output is experimental unless the model "
            "card says it is validated."
        )
        self.parent.acknowledgementText = _(
            "The bundled model was trained on 3D-IRCADb-01 patients 1, 7 and 17 (IRCAD, CC BY-NC-ND 4.0: research "
            "use, not for commercial use). Sample CT: TCIA Colorectal-Liver-Metastases patient 1004 (CC BY 4.0, "
            "doi:10.7937/QXK2-QG03). Network: segmentation-models-pytorch (MIT)."
        )
        slicer.app.connect("startupCompleted()", registerSampleData)


def registerSampleData():
    """The shipped sample CT, registered with its SHA-256 so Sample Data verifies it. ``Path.as_uri`` gives a
    valid ``file:`` URI on Windows too (``file:///C:/...``)."""
    import SampleData

    SampleData.SampleDataLogic.registerCustomSampleDataSource(
        category="LiverSeg",
        sampleName="LiverSegCRLM1004",
        thumbnailFileName=str(MODULE_DIR / "Resources" / "Icons" / "LiverSeg.png"),
        uris=SAMPLE_FILE.as_uri(),
        fileNames=SAMPLE_FILE.name,
        checksums=SAMPLE_SHA256,
        nodeNames="CRLM-CT-1004",
    )


def pythonSlicerExecutable() -> str:
    """Slicer's Python for child processes, found as Slicer's own pip calls find it."""
    return shutil.which("PythonSlicer") or sys.executable


#
# LiverSegParameterNode
#


@parameterNodeWrapper
class LiverSegParameterNode:
    """inputVolume: the CT. outputSegmentation: created when empty. device: where the network runs.
    lesions / postprocess: engine switches. modelPath: a model card JSON; empty means the bundled model."""

    inputVolume: vtkMRMLScalarVolumeNode
    outputSegmentation: vtkMRMLSegmentationNode
    device: Annotated[str, Choice(list(DEVICES))] = "auto"
    lesions: bool = True
    postprocess: bool = True
    modelPath: str = ""


#
# LiverSegWidget
#


class LiverSegWidget(ScriptedLoadableModuleWidget, VTKObservationMixin):
    """Gathers parameters, starts / polls / cancels a run and shows messages; the work is in ``LiverSegLogic``.
    Every slot ends in a visible message and a panel ready for the next click, whatever fails."""

    def __init__(self, parent=None) -> None:
        ScriptedLoadableModuleWidget.__init__(self, parent)
        VTKObservationMixin.__init__(self)
        self.logic = None
        self._parameterNode = None
        self._parameterNodeGuiTag = None
        self._run = None  # LiverSegLib.mrml.VolumeJob while a segmentation runs
        self._lastResult = None  # (segmentation node, CT node) of the last finished run, for Segment Editor
        self._timer = None

    def setup(self) -> None:
        ScriptedLoadableModuleWidget.setup(self)
        import qt

        uiWidget = slicer.util.loadUI(self.resourcePath("UI/LiverSeg.ui"))
        self.layout.addWidget(uiWidget)
        self.ui = slicer.util.childWidgetVariables(uiWidget)
        uiWidget.setMRMLScene(slicer.mrmlScene)
        self.logic = LiverSegLogic()
        self._timer = qt.QTimer()
        self._timer.setInterval(POLL_INTERVAL_MS)
        self._timer.timeout.connect(self._poll)

        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.StartCloseEvent, self.onSceneStartClose)
        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.EndCloseEvent, self.onSceneEndClose)
        self.ui.applyButton.connect("clicked(bool)", self.onApplyButton)
        self.ui.cancelButton.connect("clicked(bool)", self.onCancelButton)
        self.ui.correctButton.connect("clicked(bool)", self.onCorrectButton)
        self._resetPanel(_("Select a CT and click Segment Liver."))
        self.ui.correctButton.enabled = False
        self.initializeParameterNode()

    def cleanup(self) -> None:
        """Module reload or application exit: no child may outlive the widget, no timer may fire into it."""
        self._stopRun()
        self.removeObservers()

    def enter(self) -> None:
        self.initializeParameterNode()

    def exit(self) -> None:
        if self._parameterNode:
            self._parameterNode.disconnectGui(self._parameterNodeGuiTag)
            self._parameterNodeGuiTag = None
            self.removeObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self._checkCanApply)

    def onSceneStartClose(self, caller, event) -> None:
        if self._run is not None:
            self._stopRun()
            self._resetPanel(_("Cancelled: the scene was closed."))
        self.setParameterNode(None)

    def onSceneEndClose(self, caller, event) -> None:
        if self.parent.isEntered:
            self.initializeParameterNode()

    def initializeParameterNode(self) -> None:
        self.setParameterNode(self.logic.getParameterNode())
        if not self._parameterNode.inputVolume:
            firstVolumeNode = slicer.mrmlScene.GetFirstNodeByClass("vtkMRMLScalarVolumeNode")
            if firstVolumeNode:
                self._parameterNode.inputVolume = firstVolumeNode

    def setParameterNode(self, inputParameterNode: Optional[LiverSegParameterNode]) -> None:
        if self._parameterNode:
            self._parameterNode.disconnectGui(self._parameterNodeGuiTag)
            self.removeObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self._checkCanApply)
        self._parameterNode = inputParameterNode
        if self._parameterNode:
            self._parameterNodeGuiTag = self._parameterNode.connectGui(self.ui)
            self.addObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self._checkCanApply)
            self._checkCanApply()

    def _checkCanApply(self, caller=None, event=None) -> None:
        ready = bool(self._parameterNode and self._parameterNode.inputVolume) and self._run is None
        self.ui.applyButton.enabled = ready
        self.ui.applyButton.toolTip = _("Segment the liver") if ready else _("Select a CT volume")

    def _resetPanel(self, status: str) -> None:
        self.ui.statusLabel.text = status
        self.ui.cancelButton.enabled = False
        self._checkCanApply()

    def _showFailure(self, what: str, error: Exception) -> None:
        logging.error("LiverSeg: %s: %s", what, error)
        self._resetPanel(_("Failed: {error}").format(error=error))
        slicer.util.errorDisplay(_("{what}: {error}").format(what=what, error=error))

    def _stopRun(self) -> None:
        if self._timer is not None:
            self._timer.stop()
        if self._run is not None:
            self._run.job.close()
            self._run = None

    def onApplyButton(self) -> None:
        parameters = self._parameterNode
        try:
            if not self.logic.ensureDependencies(parameters.device, askConfirmation=True, modelPath=parameters.modelPath):
                self._resetPanel(_("Cancelled: LiverSeg needs the Python packages it asked for."))
                return
            self._run = self.logic.start(
                parameters.inputVolume, parameters.outputSegmentation or None, device=parameters.device,
                lesions=parameters.lesions, postprocess=parameters.postprocess, modelPath=parameters.modelPath,
            )
        except Exception as error:  # a failed install, a volume that is no CT, an engine that cannot start
            self._showFailure(_("LiverSeg cannot start"), error)
            return
        self.ui.progressBar.value = 0
        self.ui.statusLabel.text = _(STAGE_TEXT["starting"])
        self.ui.cancelButton.enabled = True
        self.ui.correctButton.enabled = False
        self._checkCanApply()
        self._timer.start()

    def onCancelButton(self) -> None:
        if self._run is not None:
            self._stopRun()
            self.ui.progressBar.value = 0
            self._resetPanel(_("Cancelled; the segmentation was not changed."))

    def _poll(self) -> None:
        """Main-thread side of the run: progress, then the MRML import when the child has ended."""
        run = self._run
        if run is None:
            self._timer.stop()
            return
        try:
            finished = run.job.poll()
            self.ui.progressBar.value = int(100 * run.job.fraction_done)
            self.ui.statusLabel.text = _(STAGE_TEXT.get(run.job.stage, run.job.stage))
            if finished:
                self._timer.stop()
                self._run = None
                self._showResult(self.logic.finish(run), run)
        except Exception as error:  # the child's own one-line error, a crash, or a failed import
            self._stopRun()
            self._showFailure(_("LiverSeg failed"), error)

    def _showResult(self, segmentation: vtkMRMLSegmentationNode, run) -> None:
        segmentation.CreateClosedSurfaceRepresentation()  # shown in 3D at once (batch runs skip this cost)
        parameters = self._parameterNode
        if parameters and not parameters.outputSegmentation and run.volume_node is parameters.inputVolume:
            parameters.outputSegmentation = segmentation
        self._lastResult = (segmentation, run.volume_node)
        self.ui.progressBar.value = 100
        status = segmentation.GetAttribute("LiverSeg.Summary")
        if run.job.warnings:
            status += "\n" + _("Warning: {warnings}").format(warnings="; ".join(run.job.warnings))
        self._resetPanel(status)
        self.ui.correctButton.enabled = True

    def onCorrectButton(self) -> None:
        try:
            if self._lastResult is None:
                raise RuntimeError(_("segment a CT first"))
            self.logic.openSegmentEditor(*self._lastResult)
        except Exception as error:
            self._showFailure(_("Cannot open Segment Editor"), error)


#
# LiverSegLogic
#


class LiverSegLogic(ScriptedLoadableModuleLogic):
    """Installs what is missing and calls the engine's MRML layer; usable without any GUI (batch script,
    self-test). The engine runs in a child process started from here."""

    def __init__(self) -> None:
        ScriptedLoadableModuleLogic.__init__(self)

    def getParameterNode(self) -> LiverSegParameterNode:
        return LiverSegParameterNode(super().getParameterNode())

    @staticmethod
    def cardCuts(modelPath: str = "") -> bool:
        """Whether the model (its card's path; empty: the bundled model) cuts its organ on the CT, which
        needs Numba. A card that cannot be read counts as not cutting: the engine then says what is wrong."""
        from LiverSegLib.errors import LiverSegInputError
        from LiverSegLib.model import BUNDLED_CARD, read_card

        try:
            return read_card(modelPath or BUNDLED_CARD).cuts()
        except (LiverSegInputError, OSError, ValueError):
            return False

    @staticmethod
    def missingRequirements(device: str = "auto", modelPath: str = "") -> list[str]:
        from LiverSegLib.dependencies import missing_modules

        return missing_modules(device, LiverSegLogic.cardCuts(modelPath))

    def ensureDependencies(self, device: str = "auto", askConfirmation: bool = True, modelPath: str = "") -> bool:
        """Install what ``device`` and the model need and is missing, once and only after asking: ONNX Runtime
        (tens of MB) for the CPU; for a GPU, torch only through the PyTorch extension's PyTorchUtils (the
        build that fits the driver), then the other packages with their version bounds and with the installed
        torch and torchvision pinned so pip never replaces them; Numba for a model that cuts its organ on the
        CT. Raises on a failed install (the caller shows the message); False when the user declines."""
        from LiverSegLib.dependencies import TORCH_VERSION, missing_modules, pip_arguments

        graphCut = self.cardCuts(modelPath)
        missing = missing_modules(device, graphCut)
        if not missing:
            return True
        if askConfirmation and not slicer.app.commandOptions().testingEnabled:
            size = _("PyTorch alone downloads about 1–3 GB") if "torch" in missing else _("about 20–50 MB")
            if not slicer.util.confirmOkCancelDisplay(
                _("LiverSeg needs these Python packages, which are not installed yet: {packages}. Install them now? "
                  "({size}; this takes a minute or more.)").format(packages=", ".join(missing), size=size)
            ):
                return False
        if "torch" in missing:
            try:
                import PyTorchUtils
            except ImportError:
                raise RuntimeError("PyTorch is missing and the PyTorch extension is not installed: install 'PyTorch' "
                                   "from the Extensions Manager (it picks the torch build that fits this computer)") from None
            if PyTorchUtils.PyTorchUtilsLogic().installTorch(askConfirmation=False, torchVersionRequirement=TORCH_VERSION) is None:
                return False
        pip_missing = [r for r in missing_modules(device, graphCut) if r != "torch"]  # torch only ever through PyTorchUtils
        if pip_missing:
            slicer.util.pip_install(pip_arguments(pip_missing))
        still_missing = missing_modules(device, graphCut)
        if still_missing:
            raise RuntimeError(f"still missing after installing: {', '.join(still_missing)}")
        return True

    def start(
        self,
        inputVolume: vtkMRMLScalarVolumeNode,
        outputSegmentation: Optional[vtkMRMLSegmentationNode] = None,
        device: str = "auto",
        lesions: bool = True,
        postprocess: bool = True,
        modelPath: str = "",
        timeoutSeconds: Optional[float] = None,
    ):
        """Check the CT and start the engine on it in a child process; returns the running job at once."""
        from LiverSegLib.job import SegmentationOptions
        from LiverSegLib.mrml import start_segmentation

        options = SegmentationOptions(device=device, lesions=lesions, postprocess=postprocess, model_card=modelPath)
        run = start_segmentation(inputVolume, outputSegmentation, options, python_executable=pythonSlicerExecutable(), timeout_s=timeoutSeconds)
        logging.info("LiverSeg: segmenting '%s' in a child process: %s", inputVolume.GetName(), " ".join(run.job.command))
        return run

    def finish(self, run) -> vtkMRMLSegmentationNode:
        """Main thread, once the run has ended: import its result into the segmentation node (the one given
        at start, or a new one) and remove its files. Raises the run's error (the child's one line)."""
        from LiverSegLib.mrml import finish_segmentation

        segmentation = finish_segmentation(run)
        segmentation.CreateDefaultDisplayNodes()
        for warning in run.job.warnings:
            logging.warning("LiverSeg: %s", warning)
        logging.info("LiverSeg: %s (stages: %s)", segmentation.GetAttribute("LiverSeg.Summary"), run.job.report.get("timings_s"))
        return segmentation

    def process(
        self,
        inputVolume: vtkMRMLScalarVolumeNode,
        outputSegmentation: Optional[vtkMRMLSegmentationNode] = None,
        **options,
    ) -> vtkMRMLSegmentationNode:
        """Synchronous run for scripts, the batch script and the self-test (``options`` as for ``start``):
        start, wait, finish: the same child process and import as the button."""
        started = time.perf_counter()
        run = self.start(inputVolume, outputSegmentation, **options)
        try:
            run.job.wait()
        finally:
            if not run.job.finished:  # interrupted while waiting: no child left behind
                run.job.close()
        segmentation = self.finish(run)
        logging.info("LiverSeg: done in %.1f s", time.perf_counter() - started)
        return segmentation

    @staticmethod
    def openSegmentEditor(segmentation: vtkMRMLSegmentationNode, volume: vtkMRMLScalarVolumeNode) -> None:
        """Segment Editor on the new segmentation, CT as source volume, Liver selected, ready to paint."""
        from LiverSegLib.mrml import liverseg_segments

        slicer.util.selectModule("SegmentEditor")
        editor = slicer.modules.segmenteditor.widgetRepresentation().self().editor
        editor.setSegmentationNode(segmentation)
        editor.setSourceVolumeNode(volume)
        liverId = liverseg_segments(segmentation.GetSegmentation()).get("liver")
        if liverId:
            editor.setCurrentSegmentID(liverId)
        editor.setActiveEffectByName("Paint")


#
# LiverSegTest
#


class LiverSegTest(ScriptedLoadableModuleTest):
    """Segments the shipped sample CT (verified by SHA-256 through Sample Data) for real, through the child
    process, and checks the result on the CT's grid."""

    def setUp(self):
        slicer.mrmlScene.Clear()

    def runTest(self):
        self.setUp()
        self.test_LiverSeg1()

    def test_LiverSeg1(self):
        import numpy as np
        import SampleData

        from LiverSegLib.mrml import liverseg_segments

        self.delayDisplay("Loading the sample CT")
        registerSampleData()
        volume = SampleData.downloadSample("LiverSegCRLM1004")
        self.assertIsNotNone(volume)

        logic = LiverSegLogic()
        self.assertTrue(logic.ensureDependencies("cpu", askConfirmation=False))
        self.delayDisplay("Segmenting")
        segmentation = logic.process(volume, device="cpu", timeoutSeconds=600)

        segment_id = liverseg_segments(segmentation.GetSegmentation()).get("liver")
        self.assertTrue(segment_id)
        liver_ml = float(segmentation.GetAttribute("LiverSeg.LiverVolumeMl"))
        self.assertTrue(800 < liver_ml < 3500, f"implausible liver volume {liver_ml} mL")
        # Aligned to the input: the segment exported on the CT's grid has the CT's dimensions, and it lies
        # inside the body (soft-tissue HU, not air).
        mask = slicer.util.arrayFromSegmentBinaryLabelmap(segmentation, segment_id, volume)
        ct = slicer.util.arrayFromVolume(volume)
        self.assertEqual(mask.shape, ct.shape)
        self.assertTrue(-50 < float(np.median(ct[mask > 0])) < 250)
        self.delayDisplay("Test passed")
