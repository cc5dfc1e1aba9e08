"""The engine's one entry point: a CT image in, a label map on the same voxel grid out.

On the CPU with ONNX Runtime and a model that ships its ONNX graph, nothing on this path imports torch.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from .geometry import canonical_transform
from .inference import (
    Box,
    ProgressCallback,
    choose_device_name,
    predict_in_batches,
    predict_near_liver,
    predict_probabilities,
    probabilities_to_box_masks,
)
from .model import BUNDLED_CARD, ModelCard
from .postprocessing import LIVER, compose_label_map, lesion_volumes_ml
from .preprocessing import SliceGrid, prepare_volume
from .qc import qc_warnings
from .runtime import load_runtime_network

CPU_BATCH = 16


@dataclass
class SegmentationResult:
    """The label map on the input grid plus the figures a user asks for first."""

    label_image: sitk.Image
    liver_ml: float
    lesion_ml: float
    lesion_count: int | None  # None: lesions were not segmented
    lesion_volumes_ml: list[float]
    seconds: float
    device: str
    model_name: str
    model_version: str
    lesions_validated: bool
    timings_s: dict[str, float] = field(default_factory=dict)
    runtime: str = "torch"  # what ran the network: torch or onnxruntime
    precision: str = "fp32"  # "int8": ONNX Runtime ran the card's quantised graph (torch on CUDA: fp16 autocast)
    probabilities: np.ndarray | None = None  # (Z, channels, n, n) float32 on the canonical model grid, when kept
    qc_warnings: list[str] = field(default_factory=list)  # plausibility warnings (qc.py)


def voxel_volume_ml(image: sitk.Image) -> float:
    return float(np.prod(image.GetSpacing())) / 1000.0


def label_map_in_box(
    probabilities: np.ndarray, grid: SliceGrid, card: ModelCard, voxel_ml: float, lesions: bool = True, postprocess: bool = True
) -> tuple[Box, np.ndarray]:
    """(box, label map inside it) of the slice grid from the network's (Z, channels, n, n) probabilities,
    with the card's thresholds (the lesion channel's own) and minimum lesion size: the one place a label
    map is made, so the engine and the choice of lesion settings in training agree voxel for voxel.

    Upsampling and clean-up run inside the box where some channel can reach its threshold (the liver's, a
    fraction of the CT): the label map is the same as on the whole grid (tested), since connectivity and
    hole filling need the organ and a rim or the edge of the volume only."""
    box, masks = probabilities_to_box_masks(probabilities, grid, card.channel_thresholds())
    liver, lesion = masks[:, 0], (masks[:, 1] if lesions else None)
    label_map = compose_label_map(liver, lesion, keep_largest=postprocess, fill=postprocess, min_lesion_ml=card.min_lesion_ml, voxel_ml=voxel_ml)
    return box, label_map


class LiverSegmenter:
    """Holds a verified model on its device so that many volumes reuse one load.

    ``card`` and ``network`` (a torch network) are given by training, to evaluate the network it holds.
    ``precision`` "auto" runs the card's int8 graph on the CPU when it ships one, "fp32" the fp32 graph."""

    def __init__(
        self,
        card_path: str | Path = BUNDLED_CARD,
        device: str = "auto",
        card: ModelCard | None = None,
        network=None,
        runtime: str = "auto",
        precision: str = "auto",
    ):
        self.device = choose_device_name(device)
        if network is None:
            card, network, self.runtime = load_runtime_network(card_path, self.device, runtime, precision)
        else:
            self.runtime = "torch"
        assert card is not None
        self.card = card
        self.network = network.to(self.device).eval() if self.runtime == "torch" else network
        self.precision = self.network.precision if self.runtime == "onnxruntime" else "fp32"

    def segment(
        self,
        image: sitk.Image,
        lesions: bool = True,
        postprocess: bool = True,
        batch_size: int | None = None,
        progress: ProgressCallback | None = None,
        keep_probabilities: bool = False,
    ) -> SegmentationResult:
        timings: dict[str, float] = {}
        started = clock = time.perf_counter()

        def lap(name: str) -> None:
            nonlocal clock
            now = time.perf_counter()
            timings[name] = now - clock
            clock = now

        transform = canonical_transform(image.GetDirection())
        ct_canonical = transform.to_canonical(sitk.GetArrayViewFromImage(image))
        volume = prepare_volume(ct_canonical, self.card.window_hu, self.card.input_size)
        lap("preprocess")
        if self.runtime == "onnxruntime":
            near_liver_only = predict_near_liver if postprocess else predict_in_batches  # see predict_near_liver
            probabilities = near_liver_only(self.network, volume, self.card, batch_size or CPU_BATCH, progress)
            used_device = "cpu"
        else:
            probabilities, used_device = predict_probabilities(
                self.network, volume, self.card, self.device, batch_size=batch_size, progress=progress
            )
        lap("network")
        voxel_ml = voxel_volume_ml(image)
        box, label_in_box = label_map_in_box(probabilities, SliceGrid(*ct_canonical.shape[1:]), self.card, voxel_ml, lesions, postprocess)
        label_canonical = np.zeros(ct_canonical.shape, np.uint8)
        label_canonical[box] = label_in_box
        lap("postprocess")
        label_image = sitk.GetImageFromArray(np.ascontiguousarray(transform.from_canonical(label_canonical)))
        label_image.CopyInformation(image)
        lap("to_input_grid")
        lesion_volumes: list[float] = []
        if lesions:
            lesion_volumes = lesion_volumes_ml(label_in_box, voxel_ml)
        lap("lesion_count")
        liver_ml = float(np.count_nonzero(label_in_box >= LIVER)) * voxel_ml
        intensities = sitk.MinimumMaximumImageFilter()
        intensities.Execute(image)
        return SegmentationResult(
            label_image=label_image,
            liver_ml=liver_ml,
            lesion_ml=float(sum(lesion_volumes)),
            lesion_count=len(lesion_volumes) if lesions else None,
            lesion_volumes_ml=lesion_volumes,
            seconds=time.perf_counter() - started,
            device=str(used_device),
            model_name=self.card.name,
            model_version=self.card.version,
            lesions_validated=self.card.lesions_validated,
            timings_s=timings,
            runtime=self.runtime,
            precision=self.precision,
            probabilities=probabilities if keep_probabilities else None,
            qc_warnings=qc_warnings(intensities.GetMinimum(), intensities.GetMaximum(), liver_ml, label_canonical),
        )
