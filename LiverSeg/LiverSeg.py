"""LiverSeg: liver and liver-lesion segmentation of CT in 3D Slicer.

Scripted-module anatomy as in Slicer's template: ``LiverSeg`` (module description), ``LiverSegWidget``
(gathers parameters, shows progress; the only place with Qt), ``LiverSegLogic`` (calls the engine's MRML
layer, ``LiverSegLib.mrml``), ``LiverSegTest`` (a self-test that really runs inference). Nothing here
imports torch at load time: the module loads, and passes Slicer's generic tests, before torch exists.
"""

import importlib.util
import logging
import os
import threading
import time
from typing import Annotated, Callable, Optional

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

MODULE_DIR = os.path.dirname(os.path.abspath(__file__))
SAMPLE_FILE = os.path.join(MODULE_DIR, "Resources", "Samples", "CRLM-CT-1004.nii.gz")
SAMPLE_SHA256 = "SHA256:f9577d22f4e8a1d6223de3c28973ef12635e176c47574edc6e49cf297896f4f7"
# pip name → import name of what the engine needs beyond what Slicer bundles (numpy, SimpleITK, pydicom, scipy).
# onnxruntime (+ onnx to export the network once) runs the network on the CPU faster than torch; the engine
# falls back to torch without them, but most Slicer users segment on the CPU, so they are installed too.
REQUIREMENTS = {
    "torch": "torch",
    "segmentation-models-pytorch": "segmentation_models_pytorch",
    "safetensors": "safetensors",
    "onnxruntime": "onnxruntime",
    "onnx": "onnx",
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
    """The shipped sample CT, registered with its SHA-256 so Sample Data verifies it."""
    import SampleData

    SampleData.SampleDataLogic.registerCustomSampleDataSource(
        category="LiverSeg",
        sampleName="LiverSegCRLM1004",
        thumbnailFileName=os.path.join(MODULE_DIR, "Resources", "Icons", "LiverSeg.png"),
        uris="file://" + SAMPLE_FILE.replace("\\", "/"),
        fileNames="CRLM-CT-1004.nii.gz",
        checksums=SAMPLE_SHA256,
        nodeNames="CRLM-CT-1004",
    )


#
# LiverSegParameterNode
#


@parameterNodeWrapper
class LiverSegParameterNode:
    """inputVolume: the CT. outputSegmentation: created when empty. device: where the network runs.
    lesions / postprocess: engine switches. modelPath: a model card JSON; empty means the bundled model."""

    inputVolume: vtkMRMLScalarVolumeNode
    outputSegmentation: vtkMRMLSegmentationNode
    device: Annotated[str, Choice(["auto", "cuda", "mps", "cpu"])] = "auto"
    lesions: bool = True
    postprocess: bool = True
    modelPath: str = ""


#
# LiverSegWidget
#


class LiverSegWidget(ScriptedLoadableModuleWidget, VTKObservationMixin):
    """Gathers parameters and shows progress; all work goes through ``LiverSegLogic``."""

    def __init__(self, parent=None) -> None:
        ScriptedLoadableModuleWidget.__init__(self, parent)
        VTKObservationMixin.__init__(self)
        self.logic = None
        self._parameterNode = None
        self._parameterNodeGuiTag = None
        self._job = None
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
        self._timer.setInterval(100)
        self._timer.timeout.connect(self._poll)

        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.StartCloseEvent, self.onSceneStartClose)
        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.EndCloseEvent, self.onSceneEndClose)
        self.ui.applyButton.connect("clicked(bool)", self.onApplyButton)
        self.ui.cancelButton.connect("clicked(bool)", self.onCancelButton)
        self.ui.correctButton.connect("clicked(bool)", self.onCorrectButton)
        self.ui.cancelButton.enabled = False
        self.ui.correctButton.enabled = False
        self.initializeParameterNode()

    def cleanup(self) -> None:
        if self._job is not None:
            self._job.cancel()
        self.removeObservers()

    def enter(self) -> None:
        self.initializeParameterNode()

    def exit(self) -> None:
        if self._parameterNode:
            self._parameterNode.disconnectGui(self._parameterNodeGuiTag)
            self._parameterNodeGuiTag = None
            self.removeObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self._checkCanApply)

    def onSceneStartClose(self, caller, event) -> None:
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
        ready = bool(self._parameterNode and self._parameterNode.inputVolume) and self._job is None
        self.ui.applyButton.enabled = ready
        self.ui.applyButton.toolTip = _("Segment the liver") if ready else _("Select a CT volume")

    def onApplyButton(self) -> None:
        if not self.logic.ensureDependencies(askConfirmation=True):
            self.ui.statusLabel.text = _("Cancelled: LiverSeg needs PyTorch and segmentation-models-pytorch.")
            return
        from LiverSegLib.mrml import new_segmentation_node

        parameters = self._parameterNode
        if not parameters.outputSegmentation:
            parameters.outputSegmentation = new_segmentation_node(parameters.inputVolume)
        try:
            self._job = self.logic.start(parameters)
        except Exception as error:  # a clear message for every failure: bad volume, broken model, ...
            slicer.util.errorDisplay(_("LiverSeg cannot start: {error}").format(error=error))
            return
        self.ui.progressBar.value = 0
        self.ui.statusLabel.text = _("Segmenting…")
        self.ui.cancelButton.enabled = True
        self._checkCanApply()
        self._timer.start()

    def onCancelButton(self) -> None:
        if self._job is not None:
            self._job.cancel()
            self.ui.statusLabel.text = _("Cancelling…")

    def _poll(self) -> None:
        """Main-thread side of the background job: progress, then the MRML update when done."""
        job = self._job
        self.ui.progressBar.value = int(100 * job.fraction_done)
        if not job.finished:
            return
        self._timer.stop()
        self._job = None
        self.ui.cancelButton.enabled = False
        self._checkCanApply()
        if job.cancelled:
            self.ui.statusLabel.text = _("Cancelled; the segmentation was not changed.")
            return
        if job.error is not None:
            self.ui.statusLabel.text = _("Failed: {error}").format(error=job.error)
            slicer.util.errorDisplay(_("LiverSeg failed: {error}").format(error=job.error))
            return
        self.logic.finish(job)
        segmentation = self._parameterNode.outputSegmentation
        segmentation.CreateClosedSurfaceRepresentation()
        self.ui.statusLabel.text = self.logic.describe(segmentation)
        self.ui.correctButton.enabled = True

    def onCorrectButton(self) -> None:
        self.logic.openSegmentEditor(self._parameterNode.outputSegmentation, self._parameterNode.inputVolume)


#
# LiverSegLogic
#


class Cancelled(Exception):
    """Raised from the progress callback to stop the engine between slice batches."""


class LiverSegJob:
    """The engine's run in a background thread: reads nothing from MRML, writes nothing to it."""

    def __init__(self, image, parameters: LiverSegParameterNode, segmenter) -> None:
        self.volumeNode = parameters.inputVolume
        self.segmentationNode = parameters.outputSegmentation
        self.lesions = parameters.lesions
        self.fraction_done = 0.0
        self.finished = False
        self.cancelled = False
        self.error: Optional[str] = None
        self.result = None
        self._cancel = threading.Event()
        self._thread = threading.Thread(
            target=self._run, args=(image, segmenter, parameters.lesions, parameters.postprocess), daemon=True
        )
        self._thread.start()

    def _progress(self, done: int, total: int) -> None:
        self.fraction_done = done / total
        if self._cancel.is_set():
            raise Cancelled()

    def _run(self, image, segmenter, lesions: bool, postprocess: bool) -> None:
        try:
            self.result = segmenter.segment(image, lesions=lesions, postprocess=postprocess, progress=self._progress)
        except Cancelled:
            self.cancelled = True
        except Exception as error:  # reported on the main thread
            logging.exception("LiverSeg failed")
            self.error = str(error)
        finally:
            self.finished = True

    def cancel(self) -> None:
        self._cancel.set()

    def wait(self) -> None:
        self._thread.join()


class LiverSegLogic(ScriptedLoadableModuleLogic):
    """Calls the engine's MRML layer; usable without any GUI (batch script, self-test)."""

    def __init__(self) -> None:
        ScriptedLoadableModuleLogic.__init__(self)
        self._segmenters: dict = {}

    def getParameterNode(self) -> LiverSegParameterNode:
        return LiverSegParameterNode(super().getParameterNode())

    @staticmethod
    def missingRequirements() -> list[str]:
        return [pip_name for pip_name, module in REQUIREMENTS.items() if importlib.util.find_spec(module) is None]

    def ensureDependencies(self, askConfirmation: bool = True) -> bool:
        """Install what is missing, once and only after asking: torch through the PyTorch extension's
        PyTorchUtils (it picks the CUDA build that fits the driver) when present, else pip."""
        missing = self.missingRequirements()
        if not missing:
            return True
        if askConfirmation and not slicer.app.commandOptions().testingEnabled:
            if not slicer.util.confirmOkCancelDisplay(
                _("LiverSeg needs these Python packages, which are not installed yet: {packages}. Install them now? "
                  "This downloads about 1–3 GB and takes a few minutes.").format(packages=", ".join(missing))
            ):
                return False
        if "torch" in missing:
            try:
                import PyTorchUtils

                if PyTorchUtils.PyTorchUtilsLogic().installTorch(askConfirmation=False) is None:
                    raise RuntimeError("PyTorchUtils could not install torch")
            except ImportError:
                slicer.util.pip_install("torch")
        for package in self.missingRequirements():
            slicer.util.pip_install(package)
        return not self.missingRequirements()

    def segmenter(self, modelPath: str, device: str):
        """One verified model per (card, device), loaded on first use."""
        from LiverSegLib.model import BUNDLED_CARD
        from LiverSegLib.pipeline import LiverSegmenter

        key = (modelPath or str(BUNDLED_CARD), device)
        if key not in self._segmenters:
            started = time.perf_counter()
            self._segmenters[key] = LiverSegmenter(key[0], device=device)
            logging.info("LiverSeg: model %s loaded on %s (%s) in %.1f s", key[0], self._segmenters[key].device, self._segmenters[key].runtime, time.perf_counter() - started)
        return self._segmenters[key]

    def start(self, parameters: LiverSegParameterNode) -> LiverSegJob:
        """Validate the input on the main thread, then run the engine in a background thread."""
        from LiverSegLib.io import check_ct
        from LiverSegLib.mrml import image_from_volume_node

        volume = parameters.inputVolume
        image = check_ct(image_from_volume_node(volume), f"volume '{volume.GetName()}'")
        return LiverSegJob(image, parameters, self.segmenter(parameters.modelPath, parameters.device))

    def finish(self, job: LiverSegJob) -> None:
        """Main thread: write the result into the segmentation node and log device and timing."""
        from LiverSegLib.mrml import store_result

        store_result(job.segmentationNode, job.volumeNode, job.result, lesions=job.lesions)
        job.segmentationNode.CreateDefaultDisplayNodes()
        logging.info("LiverSeg: %s (stages: %s)", job.result.summary(), job.result.timings_s)

    def process(
        self,
        inputVolume: vtkMRMLScalarVolumeNode,
        outputSegmentation: Optional[vtkMRMLSegmentationNode] = None,
        device: str = "auto",
        lesions: bool = True,
        postprocess: bool = True,
        modelPath: str = "",
        progress: Optional[Callable[[int, int], None]] = None,
    ) -> vtkMRMLSegmentationNode:
        """Synchronous run for scripts and tests: returns the segmentation node."""
        from LiverSegLib.mrml import segment_volume_node

        started = time.perf_counter()
        segmentation = segment_volume_node(
            inputVolume, outputSegmentation, segmenter=self.segmenter(modelPath, device),
            lesions=lesions, postprocess=postprocess, progress=progress,
        )
        segmentation.CreateDefaultDisplayNodes()
        logging.info("LiverSeg: %s in %.1f s", self.describe(segmentation), time.perf_counter() - started)
        return segmentation

    @staticmethod
    def describe(segmentation: vtkMRMLSegmentationNode) -> str:
        text = _("Liver {liver} mL").format(liver=segmentation.GetAttribute("LiverSeg.LiverVolumeMl"))
        count = int(segmentation.GetAttribute("LiverSeg.LesionCount") or -1)
        if count >= 0:
            text += _("; {count} lesion(s), {volume} mL").format(count=count, volume=segmentation.GetAttribute("LiverSeg.LesionVolumeMl"))
            if segmentation.GetAttribute("LiverSeg.LesionsValidated") != "True":
                text += _(" (experimental)")
        return text + _("; {seconds} s on {device}").format(
            seconds=segmentation.GetAttribute("LiverSeg.Seconds"), device=segmentation.GetAttribute("LiverSeg.Device")
        )

    @staticmethod
    def openSegmentEditor(segmentation: vtkMRMLSegmentationNode, volume: vtkMRMLScalarVolumeNode) -> None:
        """Segment Editor on the new segmentation, CT as source volume, Liver selected, ready to paint."""
        slicer.util.selectModule("SegmentEditor")
        editor = slicer.modules.segmenteditor.widgetRepresentation().self().editor
        editor.setSegmentationNode(segmentation)
        editor.setSourceVolumeNode(volume)
        liverId = segmentation.GetSegmentation().GetSegmentIdBySegmentName("Liver")
        if liverId:
            editor.setCurrentSegmentID(liverId)
        editor.setActiveEffectByName("Paint")


#
# LiverSegTest
#


class LiverSegTest(ScriptedLoadableModuleTest):
    """Runs real inference on the shipped sample CT (verified by SHA-256 through Sample Data)."""

    def setUp(self):
        slicer.mrmlScene.Clear()

    def runTest(self):
        self.setUp()
        self.test_LiverSeg1()

    def test_LiverSeg1(self):
        import numpy as np
        import SampleData

        self.delayDisplay("Loading the sample CT")
        registerSampleData()
        volume = SampleData.downloadSample("LiverSegCRLM1004")
        self.assertIsNotNone(volume)

        logic = LiverSegLogic()
        self.assertTrue(logic.ensureDependencies(askConfirmation=False))
        self.delayDisplay("Segmenting")
        segmentation = logic.process(volume)

        segment_id = segmentation.GetSegmentation().GetSegmentIdBySegmentName("Liver")
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
