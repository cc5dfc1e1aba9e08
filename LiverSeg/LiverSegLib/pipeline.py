"""The engine's one entry point: a CT image in, a label map on the same voxel grid out.

On the CPU with ONNX Runtime and a model that ships its ONNX graph, nothing on this path imports torch.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import SimpleITK as sitk
from scipy import ndimage

from .geometry import Box, canonical_transform
from .inference import (
    PROBE_STRIDE,
    ProgressCallback,
    choose_device_name,
    mask_box,
    predict_in_batches,
    predict_near_liver,
    predict_probabilities,
    probabilities_to_box_masks,
    probe_slices,
    torch_runner,
)
from .model import BUNDLED_CARD, ModelCard
from .postprocessing import LIVER, compose_label_map, cut_organ, largest_component, lesion_volumes_ml, mark_darker_lesions, require_graph_cut
from .preprocessing import SliceGrid, liver_crop, prepare_volume, volume_to_model_grid
from .qc import qc_warnings
from .runtime import load_runtime_networks

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
    probabilities: np.ndarray | None = None  # (Z, channels, n, n) float32 on the model grid of ``region``, when kept
    # The part of the canonical (S, P, L) volume the kept probabilities cover: all of it for one stage,
    # stage 2's crop for a cascade (None: stage 1 saw no liver, so stage 2 did not run).
    region: Box | None = None
    qc_warnings: list[str] = field(default_factory=list)  # plausibility warnings (qc.py)
    # A cascade's stage-1 liver (``stage1_liver``) and the slices stage 1 ran, kept with the probabilities:
    # with them training judges other gate margins (``stage2_gate``) without running the networks again.
    stage1_liver: np.ndarray | None = None
    stage1_slices: np.ndarray | None = None
    stage1_probabilities: np.ndarray | None = None  # (Z, channels, n, n) on stage 1's grid, zero on slices not run: what gate_liver cuts


def voxel_volume_ml(image: sitk.Image) -> float:
    return float(np.prod(image.GetSpacing())) / 1000.0


def whole_volume(shape: tuple[int, ...]) -> Box:
    return tuple(slice(0, size) for size in shape)


def label_map_in_box(
    probabilities: np.ndarray, region: Box, card: ModelCard, voxel_ml: float, lesions: bool = True, postprocess: bool = True,
    allowed: np.ndarray | None = None, ct_canonical: np.ndarray | None = None, spacing_mm: tuple[float, float, float] | None = None,
) -> tuple[Box, np.ndarray]:
    """(box, label map inside it) of the canonical volume from the network's (Z, channels, n, n) probabilities
    over ``region`` of it (the whole volume, or a cascade's stage-2 crop), with the card's thresholds (the
    lesion channel's own) and minimum lesion size: the one place a label map is made, so the engine and the
    choice of lesion settings in training agree voxel for voxel. ``allowed``: a bool array over ``region``
    outside which no channel is kept (a cascade's ``stage2_gate``), applied before the clean-up. A card with a
    ``lesion_rule`` takes its lesions from the canonical CT (``ct_canonical``, HU, with ``spacing_mm``) inside
    the cleaned liver instead (``postprocessing.mark_darker_lesions``).

    Upsampling and clean-up run inside the box where some channel can reach its threshold (the liver's, a
    fraction of the CT): the label map is the same as on the whole grid (tested), since connectivity and
    hole filling need the organ and a rim or the edge of the volume only."""
    depths, rows, cols = region
    probabilities = label_map_cut(probabilities, region, card, ct_canonical, spacing_mm, allowed)
    (box_depths, box_rows, box_cols), masks = probabilities_to_box_masks(
        probabilities, SliceGrid(rows.stop - rows.start, cols.stop - cols.start), card.channel_thresholds())
    if allowed is not None:
        masks &= allowed[box_depths, box_rows, box_cols][:, None]
    liver, lesion = masks[:, 0], (masks[:, 1] if lesions else None)
    rule = card.lesion_rule if lesions else {}
    if rule:  # the network's lesions are organ for the clean-up; the lesions come from the CT afterwards
        if ct_canonical is None or spacing_mm is None:
            raise ValueError("a card with a lesion_rule needs the canonical CT and its spacing")
        liver, lesion = liver | lesion, None
    label_map = compose_label_map(liver, lesion, keep_largest=postprocess, fill=postprocess, min_lesion_ml=card.min_lesion_ml, voxel_ml=voxel_ml)
    box = tuple(slice(outer.start + inner.start, outer.start + inner.stop) for outer, inner in zip(region, (box_depths, box_rows, box_cols)))
    if rule:
        mark_darker_lesions(label_map, box, ct_canonical, spacing_mm, rule, card.min_lesion_ml, voxel_ml)
    return box, label_map


def label_map_cut(
    probabilities: np.ndarray, region: Box, card: ModelCard, ct_canonical: np.ndarray | None,
    spacing_mm: tuple[float, float, float] | None, allowed: np.ndarray | None = None,
) -> np.ndarray:
    """``probabilities`` redrawn by the graph cut of the stage that made them (a single stage's, a cascade's
    stage 2's: ``graph_cut_probabilities``), or as they are when that stage has none: the label map's cut,
    which ``label_map_in_box`` applies and training keeps for candidates that share it."""
    cut = card.stage_card(card.stages).graph_cut
    if not cut:
        return probabilities
    if ct_canonical is None or spacing_mm is None:
        raise ValueError("a card with a graph_cut needs the canonical CT and its spacing")
    return graph_cut_probabilities(probabilities, region, card, cut, ct_canonical, spacing_mm, allowed)


def graph_cut_probabilities(
    probabilities: np.ndarray, region: Box, card: ModelCard, cut: dict[str, float], ct_canonical: np.ndarray,
    spacing_mm: tuple[float, float, float], allowed: np.ndarray | None = None,
) -> np.ndarray:
    """The network's (Z, channels, n, n) probabilities over ``region`` with the organ redrawn by a card's
    ``graph_cut`` (``cut``: ``cut_organ``), at ``card``'s thresholds. The cut runs on the network's own grid
    (the CT resized to it, in HU, as the network's input is), which is what makes it cheap enough; it decides
    on which side of the threshold each model-grid pixel lies, the network how far: a pixel the cut moves
    across is mirrored about the threshold (0.8 → 0.2), the others keep their probability. So the bilinear
    boundary on the slice grid stays the network's wherever the cut agrees with it, and a cut that changes
    nothing changes no voxel. Lesions are kept inside the cut only. The result then goes through the
    thresholds, the gate and the clean-up as the network's own probabilities do. With a cascade's gate
    (``allowed``) the cut decides inside it only: outside, the organ is background already."""
    depths, rows, cols = region
    size = probabilities.shape[-1]
    grid = SliceGrid(rows.stop - rows.start, cols.stop - cols.start)
    organ = probabilities.max(axis=1)
    network_organ = (probabilities >= np.asarray(card.channel_thresholds(), np.float32)[:, None, None]).any(axis=1)
    inside = None
    if allowed is not None:  # the gate on the model grid: the cut starts from the gated organ and never grows it past the gate
        inside = volume_to_model_grid(allowed, size) >= 0.5
        organ = np.where(inside, organ, 0.0)
        network_organ &= inside
    ct_model = volume_to_model_grid(ct_canonical[region], size, pad_value=-1024.0)
    spacing_model_mm = (spacing_mm[0], grid.side * spacing_mm[1] / size, grid.side * spacing_mm[2] / size)
    organ_cut = cut_organ(organ, ct_model, spacing_model_mm, cut["smoothness"], cut["contrast_hu"], network_organ, free=inside)
    liver = card.channels.index("liver")
    threshold = np.float32(card.threshold)
    mirrored = 2 * threshold - probabilities[:, liver]
    redrawn = probabilities.copy()
    added, removed = organ_cut & ~network_organ, network_organ & ~organ_cut
    redrawn[:, liver][added] = np.maximum(mirrored[added], threshold)
    redrawn[:, liver][removed] = np.minimum(mirrored[removed], np.nextafter(threshold, np.float32(0)))
    for channel in range(probabilities.shape[1]):
        if channel != liver:  # no lesion where the cut took the organ away
            redrawn[:, channel][removed] = 0.0
    return redrawn


def stage1_liver(stage1_probabilities: np.ndarray, slices_run: np.ndarray, card: ModelCard) -> np.ndarray | None:
    """Stage 1's largest liver component, (len(slices_run), n, n) bool on its model grid, or None when it
    finds no liver: a stray island elsewhere (spleen, heart) would only widen stage 2's crop and gate.

    ``slices_run``: the slices stage 1 ran, in order (every slice, or ``stage1_liver_extent``'s); they are
    taken as neighbours, so a liver seen on probes 6 mm apart is still one component."""
    found = stage1_probabilities[slices_run, card.channels.index("liver")] >= card.threshold
    return largest_component(found) if found.any() else None


def gate_liver(
    card: ModelCard, stage1_probabilities: np.ndarray, slices_run: np.ndarray, liver: np.ndarray,
    ct_canonical: np.ndarray | None, spacing_mm: tuple[float, float, float],
) -> np.ndarray:
    """The stage-1 liver that gates a cascade's stage 2: stage 1's ``liver`` (``stage1_liver``), or, when the
    card gives stage 1 a ``graph_cut``, the largest component of stage 1's organ cut on the CT
    (``graph_cut_probabilities`` on stage 1's grid, about 3 mm a pixel: a few seconds on 2 cores).

    Why: stage 1 sees whole slices and runs the liver into a mass beside it or the pancreas; stage 2 sees
    only its crop and keeps whatever the gate lets through. Cut on stage 1's grid, those neighbours leave the
    gate (LiverSegTraining/RESULTS.md, "Stage 1's liver cut on the CT"). The crop stays stage 1's own liver's:
    it only says what stage 2 looks at. The cut needs the slices around the liver run one after another
    (``stage1_liver_extent``'s ``whole_extent``); where they are not, stage 1's liver is returned uncut."""
    if not card.graph_cut or ct_canonical is None:
        return liver
    occupied = np.flatnonzero(liver.any(axis=(1, 2)))
    first, last = int(occupied[0]), int(occupied[-1])
    if np.any(np.diff(slices_run[first : last + 1]) != 1):
        return liver
    while first > 0 and slices_run[first - 1] == slices_run[first] - 1:
        first -= 1
    while last < len(slices_run) - 1 and slices_run[last + 1] == slices_run[last] + 1:
        last += 1
    depths = slice(int(slices_run[first]), int(slices_run[last]) + 1)
    region = (depths, slice(0, ct_canonical.shape[1]), slice(0, ct_canonical.shape[2]))
    redrawn = graph_cut_probabilities(stage1_probabilities[depths], region, card, card.graph_cut, ct_canonical, spacing_mm)
    found = np.zeros(liver.shape, bool)
    found[first : last + 1] = redrawn[:, card.channels.index("liver")] >= card.threshold
    return largest_component(found) if found.any() else liver


def stage2_crop(
    liver: np.ndarray, slices_run: np.ndarray, shape: tuple[int, int, int], card: ModelCard, spacing_mm: tuple[float, float, float]
) -> Box:
    """The crop of the canonical volume that a cascade's stage 2 segments: the slices and the box of the
    slice grid that stage 1's ``liver`` (``stage1_liver``) can reach, grown by stage 2's margin
    (``preprocessing.liver_crop``)."""
    occupied = slices_run[np.flatnonzero(liver.any(axis=(1, 2)))]
    _, rows, cols = mask_box(liver[:, None].astype(np.float32), SliceGrid(*shape[1:]), 0.5)
    liver_box = (slice(int(occupied[0]), int(occupied[-1]) + 1), rows, cols)
    return liver_crop(liver_box, shape, spacing_mm, card.stage_card(2).crop_margin_mm)


def stage2_gate(
    liver: np.ndarray, slices_run: np.ndarray, region: Box, shape: tuple[int, int, int], spacing_mm: tuple[float, float, float], margin_mm: float
) -> np.ndarray:
    """Where in ``region`` (stage 2's crop) a cascade's stage 2 may keep liver or lesion: within about
    ``margin_mm`` of stage 1's ``liver`` (``stage1_liver``), as a bool array over the region.

    Stage 1 sees whole slices and tells the liver from the heart above the dome; stage 2 sees its crop only
    and can mistake the heart, which then fills much of the crop, for liver. The gate keeps stage 2's finer
    boundary and lesions wherever stage 1 put the liver give or take the margin (stage 2's crop margin: the
    error of stage 1 that the crop already allows for).

    Built on stage 1's model grid (about 3 mm a pixel): each slice stage 1 ran has its liver grown in plane
    by the margin (Euclidean, in mm); each slice of the region takes the union of those grown livers on the
    slices run within the margin along z and on the nearest slice run on each side (the CPU runs every 4th
    slice and the liver's ends only); each slice-grid pixel then takes the value of the model-grid pixel its
    centre falls in."""
    depths, rows, cols = region
    size = liver.shape[-1]
    grid = SliceGrid(*shape[1:])
    pixel_mm = tuple(grid.side * spacing / size for spacing in spacing_mm[1:])
    grown = np.zeros(liver.shape, bool)  # growing each slice run, then taking unions: the same as growing the unions
    for index in np.flatnonzero(liver.any(axis=(1, 2))):
        grown[index] = ndimage.distance_transform_edt(~liver[index], sampling=pixel_mm) <= margin_mm
    gate = np.zeros((depths.stop - depths.start, size, size), bool)
    for index, z in enumerate(range(depths.start, depths.stop)):
        near = np.abs(slices_run - z) * spacing_mm[0] <= margin_mm
        below, above = np.flatnonzero(slices_run <= z), np.flatnonzero(slices_run >= z)
        near[below[-1:]] = near[above[:1]] = True
        gate[index] = grown[near].any(axis=0)
    top, left = grid.offset
    model_rows = np.minimum(((np.arange(rows.start, rows.stop) + top + 0.5) * size / grid.side).astype(int), size - 1)
    model_cols = np.minimum(((np.arange(cols.start, cols.stop) + left + 0.5) * size / grid.side).astype(int), size - 1)
    return gate.take(model_rows, axis=1).take(model_cols, axis=2)


def cascade_gate(
    card: ModelCard, liver: np.ndarray | None, slices_run: np.ndarray | None, region: Box, shape: tuple[int, int, int],
    spacing_mm: tuple[float, float, float], stage1_probabilities: np.ndarray | None = None, ct_canonical: np.ndarray | None = None,
) -> np.ndarray | None:
    """``stage2_gate`` at ``card``'s margin around ``gate_liver`` (stage 1's ``liver``, cut on the CT when the
    card says so), or None where the card keeps stage 2's output ungated (one stage, a margin of 0, or no
    stage-1 liver): what the engine applies and training re-applies."""
    margin_mm = card.stage_card(2).gate_margin_mm if card.stages == 2 else 0.0
    if margin_mm <= 0 or liver is None or slices_run is None:
        return None
    if stage1_probabilities is not None:
        liver = gate_liver(card, stage1_probabilities, slices_run, liver, ct_canonical, spacing_mm)
    return stage2_gate(liver, slices_run, region, shape, spacing_mm, margin_mm)


def stage1_liver_extent(
    run_batch, volume: np.ndarray, card: ModelCard, batch_size: int, progress: ProgressCallback | None = None, whole_extent: bool = False,
) -> tuple[np.ndarray, np.ndarray]:
    """(probabilities, slices run) of a cascade's stage 1 on the CPU, where each slice costs: stage 1 only
    has to say where the liver is, which every ``PROBE_STRIDE``-th slice shows in plane (stage 2's margin
    absorbs what lies between probes), and where it ends, which the slices between the probes of the
    largest liver component's ends and the probes beyond tell. About a third of a CT's slices instead of
    the half to two thirds ``predict_near_liver`` runs; a short scan is run whole. ``whole_extent``: every
    slice from the probe before the liver's first to the probe after its last (what a cut of stage 1's liver
    on the CT needs: ``gate_liver``)."""
    depth = volume.shape[0]
    probes = probe_slices(depth)
    if probes is None:
        return predict_in_batches(run_batch, volume, card, batch_size, progress), np.arange(depth)
    output = predict_in_batches(run_batch, volume, card, batch_size, None, slices=probes)
    found = output[probes, card.channels.index("liver")] >= card.threshold
    if not found.any():
        return output, probes
    component = probes[np.flatnonzero(largest_component(found).any(axis=(1, 2)))]
    before, after = max(component[0] - PROBE_STRIDE + 1, 0), min(component[-1] + PROBE_STRIDE, depth)
    ends = np.arange(before, after) if whole_extent else np.r_[before : component[0], component[-1] + 1 : after]
    ends = np.setdiff1d(ends, probes)
    total = len(probes) + len(ends)
    if progress is not None:
        progress(len(probes), total)
    predict_in_batches(run_batch, volume, card, batch_size, progress, slices=ends, output=output, done_before=len(probes), total_work=total)
    return output, np.union1d(probes, ends)


class LiverSegmenter:
    """Holds a verified model on its device so that many volumes reuse one load.

    ``card`` and ``network`` (a torch network; ``stage2_network`` for a cascade) are given by training, to
    evaluate the networks it holds. ``precision`` "auto" runs the card's int8 graphs on the CPU when it
    ships them, "fp32" the fp32 graphs."""

    def __init__(
        self,
        card_path: str | Path = BUNDLED_CARD,
        device: str = "auto",
        card: ModelCard | None = None,
        network=None,
        runtime: str = "auto",
        precision: str = "auto",
        stage2_network=None,
    ):
        self.device = choose_device_name(device)
        if network is None:
            card, (network, *stage2), self.runtime = load_runtime_networks(card_path, self.device, runtime, precision)
            stage2_network = stage2[0] if stage2 else None
        else:
            self.runtime = "torch"
        assert card is not None
        if card.cuts():
            require_graph_cut()
        self.card = card
        self.networks = [self._on_device(network)] + ([self._on_device(stage2_network)] if card.stages == 2 else [])
        self.network = self.networks[0]
        precisions = {each.precision if self.runtime == "onnxruntime" else "fp32" for each in self.networks}
        self.precision = precisions.pop() if len(precisions) == 1 else "mixed"

    def _on_device(self, network):
        return network.to(self.device).eval() if self.runtime == "torch" else network

    def _probabilities(self, stage: int, volume: np.ndarray, near_liver: bool, batch_size: int | None, progress: ProgressCallback | None):
        """(probabilities, device used) of one stage's network over ``volume`` (Z, n, n)."""
        network, card = self.networks[stage - 1], self.card.stage_card(stage)
        if self.runtime == "onnxruntime":
            run = predict_near_liver if near_liver else predict_in_batches  # see predict_near_liver
            return run(network, volume, card, batch_size or CPU_BATCH, progress), "cpu"
        return predict_probabilities(network, volume, card, self.device, batch_size=batch_size, progress=progress)

    def segment(
        self,
        image: sitk.Image,
        lesions: bool = True,
        postprocess: bool = True,
        batch_size: int | None = None,
        progress: ProgressCallback | None = None,
        keep_probabilities: bool = False,
        stage1_whole_extent: bool = False,
    ) -> SegmentationResult:
        """``stage1_whole_extent``: a cascade's stage 1 on the CPU runs every slice around the liver, as it does
        when the card cuts stage 1's liver (training keeps them to judge such cuts: ``gate_liver``)."""
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
        cascade = self.card.stages == 2
        spacing_mm = transform.canonical_spacing_mm(image.GetSpacing())
        region: Box | None = whole_volume(ct_canonical.shape)
        if cascade and self.device == "cpu":  # on a GPU every slice costs little: stage 1 runs them all
            run_batch = self.network if self.runtime == "onnxruntime" else torch_runner(self.network)
            probabilities, slices_run = stage1_liver_extent(run_batch, volume, self.card, batch_size or CPU_BATCH, _halves(progress, first=True) if progress else None,
                                                            whole_extent=stage1_whole_extent or bool(self.card.graph_cut))
            used_device = "cpu"
        else:
            probabilities, used_device = self._probabilities(1, volume, postprocess, batch_size, _halves(progress, first=True) if cascade and progress else progress)
            slices_run = np.arange(len(volume))
        lap("network")
        allowed, liver, stage1_probabilities = None, None, None
        if cascade:
            liver, stage1_probabilities = stage1_liver(probabilities, slices_run, self.card), probabilities
            region = None
            if liver is not None:
                stage2 = self.card.stage_card(2)
                region = stage2_crop(liver, slices_run, ct_canonical.shape, self.card, spacing_mm)
                crop_volume = prepare_volume(ct_canonical[region], stage2.window_hu, stage2.input_size)
                probabilities, used_device = self._probabilities(2, crop_volume, False, batch_size, _halves(progress, first=False) if progress else None)
            lap("stage2")
            if liver is not None:  # stage 1's liver, cut on the CT where the card says so, around which stage 2 is kept
                allowed = cascade_gate(self.card, liver, slices_run, region, ct_canonical.shape, spacing_mm, stage1_probabilities, ct_canonical)
            lap("gate")
        voxel_ml = voxel_volume_ml(image)
        label_canonical = np.zeros(ct_canonical.shape, np.uint8)
        label_in_box = label_canonical[:0]
        if region is not None:
            box, label_in_box = label_map_in_box(probabilities, region, self.card, voxel_ml, lesions, postprocess, allowed, ct_canonical, spacing_mm)
            label_canonical[box] = label_in_box
        lap("postprocess")
        label_image = sitk.GetImageFromArray(np.ascontiguousarray(transform.from_canonical(label_canonical)))
        label_image.CopyInformation(image)
        lap("to_input_grid")
        lesion_volumes: list[float] = []
        if lesions and label_in_box.size:
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
            probabilities=probabilities if keep_probabilities and region is not None else None,
            region=region,
            stage1_liver=liver if cascade and keep_probabilities else None,
            stage1_probabilities=stage1_probabilities if keep_probabilities else None,
            stage1_slices=slices_run if cascade and keep_probabilities else None,
            qc_warnings=qc_warnings(intensities.GetMinimum(), intensities.GetMaximum(), liver_ml, label_canonical),
        )


def _halves(progress: ProgressCallback, first: bool) -> ProgressCallback:
    """A stage's progress as one half of the cascade's: stage 1 fills the first half, stage 2 the second
    (the count of stage-2 slices is known only once stage 1 has found the liver)."""
    return lambda done, total: progress(done if first else total + done, 2 * total)
