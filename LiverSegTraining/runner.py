"""Training, evaluation and patient-level cross-validation, end to end on real cases."""

from __future__ import annotations

import csv
import itertools
import json
import logging
import math
import shlex
import sys
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import SimpleITK as sitk
import torch

from LiverSegLib.errors import LiverSegInputError
from LiverSegLib.geometry import canonical_transform
from LiverSegLib.model import ModelCard, save_model
from LiverSegLib.outputs import atomic_output, write_strict_json
from LiverSegLib.runtime import export_int8_graph, export_onnx_graph
from LiverSegLib.geometry import Box
from LiverSegLib.pipeline import LiverSegmenter, cascade_gate, label_map_cut, label_map_in_box, voxel_volume_ml
from LiverSegLib.postprocessing import LESION, drop_small_lesions, lesion_volumes_ml

from .augment import thick_slab
from .config import LesionConfig, TrainConfig, expand
from .data import PreparedCase, prepare_case
from .metrics import label_map_metrics, overlap
from .plots import plot_history, plot_prediction_panel
from .sources import Case, discover
from .train import TrainResult, train

log = logging.getLogger(__name__)
LESION_DICE_BAR = 0.5
LESION_SELECTION_RULE = (
    "the lesion threshold and minimum lesion size are chosen from the grid of `[lesion]` on the training patients "
    "only: each training patient is held out once by an inner leave-one-patient-out fold, the network trained "
    "without it gives its lesion probabilities, and every candidate re-thresholds those stored probabilities "
    "through the engine's own label-map step; the candidate with the highest mean lesion Dice over the inner "
    "lesion cases minus `false_lesion_penalty` × the mean number of false lesions per lesion-free inner liver "
    "wins, ties going to fewer false lesions, then to the threshold nearest the card's and the smaller minimum size. "
    "With `[lesion]` rule_sigmas_mm, rule_erodes_mm and rule_k_mads the candidates also include lesions taken from the "
    "CT (the part of the cleaned liver darker than the liver's median by k_mad robust spreads, after smoothing, "
    "farther inside than the erosion), each with every minimum size, judged by the same objective; on a tie the "
    "network's candidates come first. "
    "A cascade with `[stage2] gate_margins_mm` first chooses its gate margin on the same inner folds: the margin "
    "with the highest mean liver Dice over the expert-labelled inner patients, ties going to the card's own margin, "
    "then to the wider one. "
    "With `[graph_cuts]` the organ's graph cut is chosen next, with that gate: every pair of smoothness and contrast_hu, "
    "and no cut, judged by the same mean inner liver Dice, ties going to the card's own cut, then to none, then to the "
    "weaker smoothness. The lesion settings are then chosen with that gate and cut"
)
LESION_COLUMNS = ("lesion_threshold", "min_lesion_ml", "gate_margin_mm", "graph_cut", "lesion_source", "lesion_chosen_on")  # rows of folds whose settings were chosen
SUMMARY_KEYS = (
    "liver_dice", "liver_iou", "liver_assd_mm", "liver_hd95_mm", "liver_volume_error_pct", "lesion_dice",
    "lesion_recall", "lesion_false_count", "lesion_false_ml", "liver_dice_cut_scan", "liver_dice_thick_slices",
    "lesion_dice_thick_slices", "liver_dice_small_fov",
)
HIGHER_IS_BETTER = ("_dice", "_iou", "_recall")  # the worst case of these is the lowest; of the others the largest in size
TABLE_COLUMNS = (
    "case", "label", "liver_dice", "liver_iou", "liver_accuracy", "liver_assd_mm", "liver_hd95_mm", "liver_volume_error_pct",
    "lesion_dice", "lesion_iou", "lesion_assd_mm", "lesion_hd95_mm", "lesion_volume_error_pct",
    "lesion_true_count", "lesion_detected_count", "lesion_recall", "lesion_false_count", "lesion_false_ml",
    "liver_dice_cut_scan", "liver_dice_cut_scan_whole", "liver_dice_thick_slices", "lesion_dice_thick_slices",
    "liver_dice_small_fov", "liver_dice_small_fov_whole",
)
THICK_SLICE_MM = 5.0  # the thickest slices the scanner augmentation trains for (augment.AugmentConfig.thickness_mm)
SMALL_FOV_FRACTION = 0.7  # the side of the smaller field of view, of the scan's (augment.AugmentConfig.fov_fraction: 0.6–0.9)


def load_cases(config: TrainConfig) -> list[Case]:
    cases: list[Case] = []
    for source in config.data:
        options = {k: v for k, v in source.items() if k not in ("layout", "path")}
        cases.extend(discover(source["layout"], expand(source["path"]), **options))
    cases = [c for c in cases if c.name not in config.split.exclude]
    if not cases:
        raise LiverSegInputError("no labelled cases found in the configured data sources")
    return cases


def split_cases(cases: list[Case], config: TrainConfig, test: Case | None = None) -> tuple[list[Case], list[Case]]:
    """(training cases, validation cases). Validation never trains; weak labels train only when listed."""
    train_cases = [c for c in cases if c != test and c.name not in config.split.val and (c.is_expert or c.name in config.split.weak_train)]
    val_cases = [c for c in cases if c.name in config.split.val and c != test]
    if not train_cases:
        raise LiverSegInputError("no case left to train on (expert cases, or weak ones listed in split.weak_train)")
    return train_cases, val_cases


def _prepare(cases: list[Case], config: TrainConfig, card: ModelCard) -> list[PreparedCase]:
    cache = Path(config.cache_dir)
    return [prepare_case(case, card, cache) for case in cases]


def part_of_scan_figures(
    segmenter: LiverSegmenter, ct: sitk.Image, region: tuple[slice, slice, slice], truth: np.ndarray, prediction: np.ndarray, name: str
) -> dict[str, float]:
    """Liver Dice of the engine on only ``region`` (i, j, k) of the scan, as a scanner that recorded only that
    much would give it (``liver_dice_NAME``), and of the whole scan's ``prediction`` on the same region
    (``liver_dice_NAME_whole``): the gap is what recording less costs. ``truth`` and ``prediction`` are the
    whole scan's (k, j, i) arrays."""
    kept = tuple(reversed(region))
    cut = sitk.GetArrayFromImage(segmenter.segment(ct[region]).label_image)  # a copy: the image is not kept
    kept_truth = truth[kept] >= 1
    return {
        f"liver_dice_{name}": overlap(cut >= 1, kept_truth)["dice"],
        f"liver_dice_{name}_whole": overlap(prediction[kept] >= 1, kept_truth)["dice"],
    }


def cut_scan_figures(segmenter: LiverSegmenter, ct: sitk.Image, truth: np.ndarray, prediction: np.ndarray) -> dict[str, float]:
    """``part_of_scan_figures`` of the scan cut through the labelled liver's middle slice (the slices from there
    on along the image's third axis kept, so the scan starts where the liver is about its widest): what a liver
    cut off at a scan's edge costs, which the issue asks to be segmented as far as it goes."""
    slices_with_liver = np.flatnonzero((truth >= 1).any(axis=(1, 2)))
    middle = int(slices_with_liver[len(slices_with_liver) // 2])
    return part_of_scan_figures(segmenter, ct, (slice(None), slice(None), slice(middle, None)), truth, prediction, "cut_scan")


def small_fov_figures(segmenter: LiverSegmenter, ct: sitk.Image, truth: np.ndarray, prediction: np.ndarray) -> dict[str, float]:
    """``part_of_scan_figures`` of the scan cut to a smaller field of view: the central ``SMALL_FOV_FRACTION``
    of each slice's side (the liver, on the image's left or right, then often cut at the image's edge, as in a
    reconstruction centred tighter on the patient)."""
    width, height = ct.GetSize()[:2]
    columns = slice(round(width * (1 - SMALL_FOV_FRACTION) / 2), round(width * (1 + SMALL_FOV_FRACTION) / 2))
    rows = slice(round(height * (1 - SMALL_FOV_FRACTION) / 2), round(height * (1 + SMALL_FOV_FRACTION) / 2))
    return part_of_scan_figures(segmenter, ct, (columns, rows, slice(None)), truth, prediction, "small_fov")


def thick_slice_scan(ct: sitk.Image, truth: np.ndarray, thickness_mm: float) -> tuple[sitk.Image, np.ndarray]:
    """The scan as a scanner reconstructing slices ``thickness_mm`` thick and apart from the same data would
    give it: along the image's third axis, each new slice the mean of the native slices it covers (box
    profile, ``augment.thick_slab``: the training's own thick slices), the labels the slab means of liver
    (≥ 1) and lesion (2) thresholded at one half. Many hospitals reconstruct 3–5 mm slices; the expert
    scans here are 1.6 mm. The slabs tile the scan from its first slice's edge; a remainder thinner than a
    slab is dropped."""
    spacing_mm = ct.GetSpacing()
    step_slices = thickness_mm / spacing_mm[2]
    if step_slices < 1:
        raise LiverSegInputError(f"thick slices of {thickness_mm} mm are thinner than the scan's {spacing_mm[2]} mm")
    if ct.GetSize()[2] < step_slices:
        raise LiverSegInputError(f"a scan of {ct.GetSize()[2]} slices of {spacing_mm[2]} mm is shorter than one slice of {thickness_mm} mm")
    native_hu, native_truth = torch.from_numpy(sitk.GetArrayFromImage(ct).astype(np.float32)), torch.from_numpy(truth)
    centres = [(j + 0.5) * step_slices - 0.5 for j in range(int(native_hu.shape[0] // step_slices))]

    def slabs(volume: torch.Tensor) -> np.ndarray:
        return torch.stack([thick_slab(volume, centre, step_slices) for centre in centres]).numpy()

    liver = slabs(native_truth >= 1) >= 0.5
    thick_truth = liver.astype(np.uint8)
    thick_truth[liver & (slabs(native_truth == LESION) >= 0.5)] = LESION
    thick = sitk.GetImageFromArray(slabs(native_hu).round().astype(sitk.GetArrayViewFromImage(ct).dtype))
    thick.SetSpacing((spacing_mm[0], spacing_mm[1], thickness_mm))
    thick.SetDirection(ct.GetDirection())
    thick.SetOrigin(ct.TransformContinuousIndexToPhysicalPoint((0.0, 0.0, centres[0])))
    return thick, thick_truth


def thick_slice_figures(segmenter: LiverSegmenter, ct: sitk.Image, truth: np.ndarray, lesion_labelled: bool) -> dict[str, float]:
    """Liver and lesion Dice on the scan as ``THICK_SLICE_MM`` slices (``thick_slice_scan``) against the
    label on the same slices: what another hospital's thicker slices cost (the same figures on the native
    slices are the row's ``liver_dice`` and ``lesion_dice``). None for a scan whose slices are that thick
    already (LiTS holds many) or that is shorter than one such slice."""
    spacing_z_mm, depth = ct.GetSpacing()[2], ct.GetSize()[2]
    if spacing_z_mm >= THICK_SLICE_MM or depth * spacing_z_mm < THICK_SLICE_MM:
        return {}
    thick, thick_truth = thick_slice_scan(ct, truth, THICK_SLICE_MM)
    prediction = sitk.GetArrayFromImage(segmenter.segment(thick).label_image)  # a copy: the image is not kept
    figures = {"liver_dice_thick_slices": overlap(prediction >= 1, thick_truth >= 1)["dice"]}
    if lesion_labelled:
        figures["lesion_dice_thick_slices"] = overlap(prediction == LESION, thick_truth == LESION)["dice"]
    return figures


def evaluate_case(
    segmenter: LiverSegmenter, case: Case, plot_path: Path | None = None, other_scanners: bool = False
) -> dict[str, float | str]:
    """Full engine run (reorient, preprocess, network, post-process, back to the input grid) vs. the label;
    ``other_scanners``: also the same scan as other scanners and protocols would give it (cut through the
    liver, a smaller field of view, thicker slices: ``cut_scan_figures``, ``small_fov_figures``,
    ``thick_slice_figures``)."""
    ct, truth = case.load()
    result = segmenter.segment(ct, keep_probabilities=plot_path is not None)
    prediction = sitk.GetArrayViewFromImage(result.label_image)
    spacing_kji_mm = tuple(reversed(ct.GetSpacing()))
    row: dict[str, float | str] = {"case": case.name, "label": case.label_kind, "seconds": round(result.seconds, 2)}
    row.update(label_map_metrics(prediction, truth, spacing_kji_mm, case.has_lesion_label))
    if other_scanners:
        row.update(cut_scan_figures(segmenter, ct, truth, prediction))
        row.update(small_fov_figures(segmenter, ct, truth, prediction))
        row.update(thick_slice_figures(segmenter, ct, truth, case.has_lesion_label))
    if plot_path is not None and result.probabilities is not None and result.region is not None:
        transform = canonical_transform(ct.GetDirection())
        canonical_prediction = transform.to_canonical(prediction)
        canonical_truth = transform.to_canonical(truth)
        z = int((canonical_truth >= 1).sum((1, 2)).argmax())
        slices = result.region[0]  # the probabilities cover stage 2's crop in a cascade: zero on slices outside it
        liver_probability = result.probabilities[z - slices.start, 0] if slices.start <= z < slices.stop else np.zeros_like(result.probabilities[0, 0])
        plot_prediction_panel(
            case.name,
            transform.to_canonical(sitk.GetArrayViewFromImage(ct))[z],
            canonical_truth[z],
            canonical_prediction[z],
            liver_probability,
            plot_path,
        )
    return row


def segmenter_of(result: TrainResult, device: str, card: ModelCard | None = None) -> LiverSegmenter:
    """The engine running a training's networks (both stages of a cascade) with ``card`` (default: the
    result's own)."""
    return LiverSegmenter(device=device, card=card or result.card, network=result.network,
                          stage2_network=result.stage2.network if result.stage2 else None)


def fit(config: TrainConfig, train_cases: list[Case], val_cases: list[Case], output_dir: Path, resume: bool) -> TrainResult:
    """Train the model of ``config`` on ``train_cases``; a cascade trains stage 2 on the same patients
    (in ``output_dir/stage2``) and returns one card for both."""
    card = config.card()
    log.info("training on %s; validating on %s", [c.name for c in train_cases], [c.name for c in val_cases])
    result = train(config, _prepare(train_cases, config, card), _prepare(val_cases, config, card), output_dir, resume)
    plot_history(result.history, output_dir)
    if config.stage2:
        log.info("training stage 2 of the cascade on the liver's box")
        stage2 = fit(config.stage2_config(), train_cases, val_cases, output_dir / "stage2", resume)
        result.card, result.stage2 = result.card.with_stage(2, stage2.card), stage2
    return result


# What one run (a cross-validation and its final model) has trained, by ``training_key``.
Trainings = dict[tuple[str, tuple[str, ...], tuple[str, ...]], TrainResult]


def training_key(config: TrainConfig, train_cases: list[Case], val_cases: list[Case]) -> tuple[str, tuple[str, ...], tuple[str, ...]]:
    """The settings (seed included) and the patients of a training: two trainings with one key are the same."""
    return repr(config), tuple(sorted(c.name for c in train_cases)), tuple(sorted(c.name for c in val_cases))


def run_record_key(config: TrainConfig, pool: list[Case], test: Case | None) -> dict:
    """What a stored fold outcome (``read_run_record``) was computed from: the settings (seed included), the
    patients the choice or the training saw, and the held-out patient."""
    return {"config": repr(config), "pool": sorted(c.name for c in pool), "test": test.name if test else None}


NON_FINITE = "non_finite_float"  # a run record's NaN or ±Infinity, strict JSON that reads back as the float it was


def read_run_record(path: Path, key: dict, resume: bool) -> dict | None:
    """With ``resume``, what ``write_run_record`` stored at ``path`` under the same ``key``; else None. Why: a
    resumed run (a CPU run spans several starts) would otherwise choose each finished fold's settings and
    evaluate it again, minutes a fold, to the same figures."""
    if not resume or not path.is_file():
        return None
    stored = json.loads(path.read_text(encoding="utf-8"), object_hook=lambda item: float(item[NON_FINITE]) if item.keys() == {NON_FINITE} else item)
    return stored["value"] if stored.get("key") == key else None


def numpy_scalar_as_python(item: object) -> object:
    """``json.dumps``' ``default`` for run records: a numpy scalar as Python's; anything else is an error, not a string."""
    if isinstance(item, np.generic):
        return item.item()
    raise TypeError(f"a run record cannot hold {type(item).__name__}")


def write_run_record(path: Path, key: dict, value: dict) -> None:
    """``value`` (rows or chosen settings) stored atomically under ``key`` as strict JSON. Unlike the tables
    (NaN as null) a figure never measured (NaN) stays apart from one that does not apply (None): each reads
    back as it was. Numpy scalars are written as Python's."""
    write_strict_json({"key": key, "value": value}, path, non_finite=lambda token: {NON_FINITE: token}, default=numpy_scalar_as_python)


def fit_once(config: TrainConfig, train_cases: list[Case], val_cases: list[Case], output_dir: Path, resume: bool, trainings: Trainings) -> TrainResult:
    """``fit``, unless ``trainings`` already holds the same training (then its result, trained in another
    folder). Why: nested cross-validation trains the same patients more than once. The inner fold of outer
    fold A that holds out B trains on what outer fold B's inner fold holding out A does, and the final model's
    inner fold holding out an expert patient trains on what that patient's outer fold does. With three expert
    and two weak-label training patients a seed takes 12 cascades instead of 15, its final model 3 instead of 6."""
    key = training_key(config, train_cases, val_cases)
    if key in trainings:
        log.info("the training on %s is the one already made: reused, not trained again in %s", list(key[1]), output_dir)
    else:
        trainings[key] = fit(config, train_cases, val_cases, output_dir, resume)
    return trainings[key]


@dataclass
class InnerCase:
    """An inner validation patient's network output, stored so that every candidate lesion setting is
    judged by re-thresholding it: one training per inner fold, not one per candidate."""

    name: str
    probabilities: np.ndarray | None  # (Z, channels, n, n) on the model grid of ``region``
    region: Box | None  # the part of the canonical volume they cover (None: no liver found, nothing to threshold)
    truth: np.ndarray  # label map 0/1/2 on the canonical slice grid
    voxel_ml: float
    has_lesions: bool  # labelled lesions present: judged by lesion Dice; otherwise a lesion-free liver
    # A cascade's stage-1 liver and slices run (SegmentationResult) and the canonical spacing: what its gate needs.
    stage1_liver: np.ndarray | None = None
    stage1_slices: np.ndarray | None = None
    spacing_mm: tuple[float, float, float] | None = None
    expert: bool = True  # an expert label: its liver Dice is accuracy (a model-made one's is agreement with a model)
    ct: np.ndarray | None = None  # the canonical CT in HU: what a lesion_rule candidate and a graph cut read
    stage1_probabilities: np.ndarray | None = None  # a cascade's, kept where a cut of stage 1's liver is judged (gate_liver)
    # The last card's gate and cut probabilities (``cut_outputs``): candidates that differ in lesion settings
    # only (a lesion rule, a size bar) reuse them instead of cutting again.
    cut_cache: dict = field(default_factory=dict, repr=False, compare=False)


def inner_training(config: TrainConfig, pool: list[Case], held_out: Case, fold_dir: Path, resume: bool, trainings: Trainings) -> TrainResult:
    """The inner fold's network: trained on ``pool``'s training patients other than ``held_out``."""
    return fit_once(config, *split_cases(pool, config, held_out), fold_dir, resume, trainings)


def inner_case(config: TrainConfig, pool: list[Case], held_out: Case, fold_dir: Path, resume: bool, trainings: Trainings) -> InnerCase:
    """Train on ``pool``'s training patients other than ``held_out`` and keep ``held_out``'s probabilities (and
    its canonical CT where lesion rules or the card's graph cut read it: about 70 MB a CT otherwise held for nothing)."""
    result = inner_training(config, pool, held_out, fold_dir, resume, trainings)
    ct, truth = held_out.load()
    reads, cuts = reads_ct(config), judges_cuts(config)
    # With cuts to judge, a cascade's stage 1 runs every slice around the liver on the CPU too (as on a GPU), for every candidate.
    segmented = segmenter_of(result, config.device).segment(ct, keep_probabilities=True, stage1_whole_extent=cuts)
    transform = canonical_transform(ct.GetDirection())
    has_lesions = held_out.has_lesion_label and bool((truth == LESION).any())
    return InnerCase(held_out.name, segmented.probabilities, segmented.region, transform.to_canonical(truth), voxel_volume_ml(ct), has_lesions,
                     segmented.stage1_liver, segmented.stage1_slices, transform.canonical_spacing_mm(ct.GetSpacing()), held_out.is_expert,
                     transform.to_canonical(sitk.GetArrayFromImage(ct)) if reads else None,
                     segmented.stage1_probabilities if cuts else None)


def judges_cuts(config: TrainConfig) -> bool:
    """Whether inner cases cut stage 1's liver (a single stage's organ): the card has that graph cut or there
    are cut candidates, which are that stage's."""
    return bool(config.card().graph_cut or config.graph_cut_candidates())


def reads_ct(config: TrainConfig) -> bool:
    """Whether the inner choice reads the CT: lesion-rule candidates, cuts of stage 1 (``judges_cuts``) or a
    cascade's stage-2 cut."""
    stage2_cuts = bool(config.stage2 and config.stage2_config().card().graph_cut)
    return bool(config.lesion.lesion_rules()) or judges_cuts(config) or stage2_cuts


def cut_outputs(case: InnerCase, card: ModelCard) -> tuple[np.ndarray | None, np.ndarray]:
    """(gate, probabilities) of an inner case under ``card``: the engine's ``cascade_gate`` and, where the card
    cuts the label map's organ, ``label_map_cut`` (what ``label_map_in_box`` would compute), kept for
    the next card with the same cuts, gate margin and thresholds: the cuts take seconds, the rest of a label map less."""
    margin_mm = card.stage_card(2).gate_margin_mm if card.stages == 2 else 0.0
    key = (json.dumps([card.graph_cut, card.stage_card(card.stages).graph_cut], sort_keys=True), margin_mm, card.channel_thresholds())
    if case.cut_cache.get("key") != key:
        allowed = cascade_gate(card, case.stage1_liver, case.stage1_slices, case.region, case.truth.shape, case.spacing_mm, case.stage1_probabilities, case.ct)
        probabilities = label_map_cut(case.probabilities, case.region, card, case.ct, case.spacing_mm, allowed)
        case.cut_cache.clear()
        case.cut_cache.update(key=key, allowed=allowed, probabilities=probabilities)
    return case.cut_cache["allowed"], case.cut_cache["probabilities"]


def without_label_map_cut(card: ModelCard) -> ModelCard:
    """``card`` with no cut of the label map's organ (a cascade's stage-1 cut kept: it only makes the gate)."""
    if card.stages == 2:
        return card.with_stage(2, replace(card.stage_card(2), graph_cut={}))
    return replace(card, graph_cut={})


def inner_label_map(case: InnerCase, card: ModelCard) -> np.ndarray:
    """The engine's label map of an inner case under ``card``'s settings (its gate and cuts included), on the
    whole canonical grid, from the stored outputs."""
    label_map = np.zeros(case.truth.shape, np.uint8)
    if case.region is None:
        return label_map
    allowed, probabilities = cut_outputs(case, card)
    box, in_box = label_map_in_box(probabilities, case.region, without_label_map_cut(card), case.voxel_ml, allowed=allowed,
                                   ct_canonical=case.ct, spacing_mm=case.spacing_mm)
    label_map[box] = in_box
    return label_map


def mean_inner_liver_dice(cases: list[InnerCase], card: ModelCard) -> float:
    """Mean liver Dice of ``card``'s settings over the expert-labelled inner cases (0 without one): what a
    gate margin is judged by."""
    dices = [overlap(inner_label_map(case, card) >= 1, case.truth >= 1)["dice"] for case in cases if case.expert]
    return float(np.mean(dices)) if dices else 0.0


def lesion_figures(cases: list[InnerCase], label_maps: list[np.ndarray]) -> dict[str, float]:
    """Mean lesion Dice over the lesion cases and mean false lesions per lesion-free liver (every predicted
    lesion there is false) of one label map per case; 0 where no case of that kind exists."""
    dices, false_counts = [], []
    for case, label in zip(cases, label_maps):
        if case.has_lesions:
            dices.append(overlap(label == LESION, case.truth == LESION)["dice"])
        else:
            false_counts.append(len(lesion_volumes_ml(label, case.voxel_ml)))
    return {
        "mean_lesion_dice": float(np.mean(dices)) if dices else 0.0,
        "false_lesions_per_free_liver": float(np.mean(false_counts)) if false_counts else 0.0,
    }


def with_size_bar(label_map: np.ndarray, min_lesion_ml: float, voxel_ml: float) -> np.ndarray:
    """A copy of a label map made without a size bar, its lesions under ``min_lesion_ml`` turned liver: the
    engine's map with that bar, whose last step is the same ``drop_small_lesions``."""
    barred = label_map.copy()
    drop_small_lesions(barred, min_lesion_ml, voxel_ml)
    return barred


def with_gate_margin(card: ModelCard, margin_mm: float) -> ModelCard:
    return card.with_stage(2, replace(card.stage_card(2), gate_margin_mm=float(margin_mm)))


def select_gate_margin(cases: list[InnerCase], card: ModelCard, margins_mm: list[float]) -> dict:
    """The gate margin of ``margins_mm`` with the highest mean inner liver Dice over the expert-labelled
    inner cases (ties: the card's own, then the wider: the gate then removes least; without an expert inner
    case every margin ties), with each margin's figure."""
    own = card.stage_card(2).gate_margin_mm
    scored = {float(margin): mean_inner_liver_dice(cases, with_gate_margin(card, margin)) for margin in margins_mm}
    best = max(scored, key=lambda margin: (scored[margin], margin == own, margin))
    return {"gate_margin_mm": best, "mean_liver_dice_by_gate_margin": {f"{margin:g}": dice for margin, dice in scored.items()}}


def with_graph_cut(card: ModelCard, cut: dict[str, float]) -> ModelCard:
    return replace(card, graph_cut=dict(cut))


def describe_graph_cut(cut: dict[str, float]) -> str:
    """A graph cut as a table cell: "smoothness/contrast_hu", or "none"."""
    return f"{cut['smoothness']:g}/{cut['contrast_hu']:g}" if cut else "none"


def select_graph_cut(cases: list[InnerCase], card: ModelCard, candidates: list[dict[str, float]]) -> dict:
    """The graph cut of ``candidates`` and no cut with the highest mean inner liver Dice over the expert-labelled
    inner cases (ties: the card's own, then none, then the weaker smoothness: the cut that moves the least),
    with each one's figure. Chosen after the gate margin, with it: the cut starts from the gated organ."""
    options = [{}] + [cut for cut in candidates if cut]
    scored = [(mean_inner_liver_dice(cases, with_graph_cut(card, cut)), cut) for cut in options]
    best = max(scored, key=lambda item: (item[0], item[1] == card.graph_cut, not item[1], -item[1].get("smoothness", 0.0)))[1]
    return {"graph_cut": best, "mean_liver_dice_by_graph_cut": {describe_graph_cut(cut): dice for dice, cut in scored}}


def lesion_candidates(card: ModelCard, grid: LesionConfig) -> list[tuple[tuple, dict]]:
    """(tie-break key, settings) of every candidate of ``grid``: the network's lesions at each threshold and
    size bar, then each lesion_rule with each size bar. On a tie the network comes first (the card's own
    kind), then the threshold nearest the card's, the stricter rule (larger ``k_mad``) and the smaller size bar."""
    candidates = []
    for threshold, min_lesion_ml in itertools.product(grid.thresholds, grid.min_sizes_ml):
        settings = {"lesion_threshold": float(threshold), "min_lesion_ml": float(min_lesion_ml), "lesion_rule": {}}
        candidates.append(((1, -abs(threshold - card.threshold), 0.0, -min_lesion_ml), settings))
    for rule, min_lesion_ml in itertools.product(grid.lesion_rules(), grid.min_sizes_ml):
        settings = {"lesion_threshold": card.lesion_channel_threshold, "min_lesion_ml": float(min_lesion_ml), "lesion_rule": rule}
        candidates.append(((0, 0.0, rule["k_mad"], -min_lesion_ml), settings))
    return candidates


def select_lesion_settings(cases: list[InnerCase], card: ModelCard, grid: LesionConfig) -> dict:
    """The candidate of ``grid`` (``lesion_candidates``: the network's threshold and size bar, or a
    lesion_rule and size bar) that maximises mean lesion Dice over the lesion cases minus
    ``false_lesion_penalty`` × mean false lesions per lesion-free liver (ties: fewer false lesions, then
    ``lesion_candidates``' order), with its figures and the inner patients it was chosen on (so that the outer
    test patient can be shown not to be among them)."""
    scored, source, unbarred_maps = [], None, []
    for tie_break, settings in lesion_candidates(card, grid):
        # Candidates of one lesion source (threshold or rule) follow each other, one per size bar: its maps are
        # made once without a bar (the upsampling, and a rule's smoothing), each bar then applied to a copy.
        if (settings["lesion_threshold"], settings["lesion_rule"]) != source:
            source = (settings["lesion_threshold"], settings["lesion_rule"])
            unbarred = with_lesion_settings(card, {**settings, "min_lesion_ml": 0.0})
            unbarred_maps = [inner_label_map(case, unbarred) for case in cases]
        maps = [with_size_bar(label, settings["min_lesion_ml"], case.voxel_ml) for label, case in zip(unbarred_maps, cases)]
        figures = lesion_figures(cases, maps)
        objective = figures["mean_lesion_dice"] - grid.false_lesion_penalty * figures["false_lesions_per_free_liver"]
        scored.append(((objective, -figures["false_lesions_per_free_liver"], *tie_break), {**settings, "objective": objective, **figures}))
    best = max(scored, key=lambda item: item[0])[1]
    return {**best, "chosen_on": [case.name for case in cases]}


def choose_lesion_settings(config: TrainConfig, pool: list[Case], output_dir: Path, resume: bool, trainings: Trainings | None = None) -> dict:
    """Lesion settings for a model trained on ``pool``'s training patients, chosen on those patients alone
    by inner leave-one-patient-out folds (``LESION_SELECTION_RULE``): the outer fold's test patient is not
    in ``pool``, so the settings it is judged with never saw it."""
    train_cases, _ = split_cases(pool, config)
    if len(train_cases) < 2:
        raise LiverSegInputError("choosing lesion settings on inner folds needs at least two training patients")
    trainings = {} if trainings is None else trainings
    record, key = output_dir / "lesion_settings.json", run_record_key(config, pool, None)
    stored = read_run_record(record, key, resume)
    if stored is not None:  # the inner networks still join ``trainings``: later folds and the final model reuse them
        for held_out in train_cases:
            inner_training(config, pool, held_out, output_dir / f"inner_{held_out.name}", resume, trainings)
        log.info("lesion settings chosen on %s before this start: %s (%s)", stored["chosen_on"], describe_lesion_source(stored), record)
        return stored
    inner = [inner_case(config, pool, held_out, output_dir / f"inner_{held_out.name}", resume, trainings) for held_out in train_cases]
    card, gate = config.card(), {}
    if config.stage2:
        card = card.with_stage(2, config.stage2_config().card())
        if config.gate_margins_mm():
            gate = select_gate_margin(inner, card, config.gate_margins_mm())
            card = with_gate_margin(card, gate["gate_margin_mm"])
            log.info("gate margin chosen on %s: %g mm (mean inner liver Dice by margin %s)", [c.name for c in inner], gate["gate_margin_mm"],
                     gate["mean_liver_dice_by_gate_margin"])
    cut = {}
    if config.graph_cut_candidates():
        cut = select_graph_cut(inner, card, config.graph_cut_candidates())
        card = with_graph_cut(card, cut["graph_cut"])
        log.info("graph cut chosen on %s: %s (mean inner liver Dice by cut %s)", [c.name for c in inner], describe_graph_cut(cut["graph_cut"]),
                 cut["mean_liver_dice_by_graph_cut"])
    chosen = {**select_lesion_settings(inner, card, config.lesion), **gate, **cut}
    log.info("lesion settings chosen on %s: %s, minimum %.2f mL (mean lesion Dice %.3f, %.2f false lesions per lesion-free liver)",
             chosen["chosen_on"], describe_lesion_source(chosen), chosen["min_lesion_ml"], chosen["mean_lesion_dice"], chosen["false_lesions_per_free_liver"])
    write_run_record(record, key, chosen)
    return chosen


def lesion_settings(config: TrainConfig, pool: list[Case], output_dir: Path, resume: bool, trainings: Trainings) -> dict:
    """``choose_lesion_settings`` when ``lesion.selection`` is "inner"; nothing ("fixed": the card's own)."""
    return choose_lesion_settings(config, pool, output_dir, resume, trainings) if config.lesion.selection == "inner" else {}


def with_lesion_settings(card: ModelCard, settings: dict) -> ModelCard:
    """``card`` carrying the chosen lesion settings and, for a cascade whose margin was chosen, gate margin
    (unchanged when none were chosen)."""
    if not settings:
        return card
    if "gate_margin_mm" in settings:
        card = with_gate_margin(card, settings["gate_margin_mm"])
    if "graph_cut" in settings:
        card = with_graph_cut(card, settings["graph_cut"])
    return replace(card, lesion_threshold=settings["lesion_threshold"], min_lesion_ml=settings["min_lesion_ml"],
                   lesion_rule=dict(settings.get("lesion_rule", {})))


def describe_lesion_source(settings: dict) -> str:
    """Where chosen settings take the lesions from, in words: the network at a threshold, or a lesion_rule."""
    rule = settings.get("lesion_rule")
    if rule:
        return f"darker than the liver by {rule['k_mad']:g} spreads (smoothing {rule['sigma_mm']:g} mm, {rule['erode_mm']:g} mm inside)"
    return f"network, threshold {settings['lesion_threshold']:.2f}"


def lesion_columns(settings: dict) -> dict:
    """The chosen settings as a cross-validation row records them (nothing when none were chosen)."""
    if not settings:
        return {}
    gate = {"gate_margin_mm": settings["gate_margin_mm"]} if "gate_margin_mm" in settings else {}
    cut = {"graph_cut": describe_graph_cut(settings["graph_cut"])} if "graph_cut" in settings else {}
    return {"lesion_threshold": settings["lesion_threshold"], "min_lesion_ml": settings["min_lesion_ml"], **gate, **cut,
            "lesion_source": describe_lesion_source(settings), "lesion_chosen_on": " ".join(settings["chosen_on"])}


def export(result: TrainResult, config: TrainConfig, train_cases: list[Case], output_dir: Path, evaluation: dict, lesion: dict | None = None) -> Path:
    """Write weights + card (training data, licences, command, figures) into ``output_dir/model``;
    ``lesion``: settings chosen by ``choose_lesion_settings``, which the card then carries."""
    card = with_lesion_settings(result.card, lesion or {})
    card.lesions_validated = bool(evaluation.get("lesions_validated", False))
    card.training = {
        "command": "liverseg-train " + " ".join(shlex.quote(a) for a in sys.argv[1:]),
        "cases": [{"case": c.name, "label": c.label_kind, "licence": c.licence} for c in train_cases],
        "validation_cases": list(config.split.val),
        "epochs": len(result.history),
        "best_val_liver_dice_model_grid": result.best_val_liver_dice,  # of the exported weights
        "checkpoint": "best validation liver Dice" if config.split.val and config.split.select_on_val else "last epoch",
        "schedule": vars(config.schedule),
    }
    if lesion:
        grid = {**vars(config.lesion), **({"gate_margins_mm": config.gate_margins_mm()} if "gate_margin_mm" in lesion else {}),
                **({"graph_cuts": config.graph_cuts} if "graph_cut" in lesion else {})}
        card.training["lesion_selection"] = {**lesion, "rule": LESION_SELECTION_RULE, "grid": grid}
    if result.stage2:
        card.training["stage2"] = {
            "epochs": len(result.stage2.history), "best_val_liver_dice_model_grid": result.stage2.best_val_liver_dice,
            "schedule": vars(config.stage2_config().schedule), "crop_margin_mm": result.stage2.card.crop_margin_mm,
        }
    card.evaluation = evaluation
    card_path = output_dir / "model" / "liverseg.json"
    save_model(result.network, card, card_path, result.stage2.network if result.stage2 else None)
    export_onnx_graph(card_path)  # the graphs the CPU runs without torch (every stage), reading these weights
    calibration_root = int8_calibration_root(config, train_cases)
    if calibration_root is not None:  # the CPU's int8 graphs: without them a cascade misses the CPU budget (benchmarks/README.md)
        export_int8_graph(card_path, calibration_root)
    else:
        log.warning("no int8 graph written (the training cases are not all in one 'cases' folder): make it with "
                    "export_int8_graph('%s', DATA), DATA/cases/NAME/ct.nii.gz holding them", card_path)
    return card_path


def int8_calibration_root(config: TrainConfig, train_cases: list[Case]) -> Path | None:
    """The folder whose ``cases/NAME`` holds every training case (a ``cases`` source in a folder named
    ``cases``): where ``runtime.export_int8_graph`` reads its calibration slices. None otherwise."""
    names = {case.name for case in train_cases}
    for source in config.data:
        folder = Path(expand(source["path"]))
        if source["layout"] == "cases" and folder.name == "cases" and all((folder / name / "ct.nii.gz").is_file() for name in names):
            return folder.parent
    return None


def measured(rows: list[dict], key: str) -> list[float]:
    """The values of ``key`` in the rows that measured it (absent or NaN: not measured on that case)."""
    return [float(r[key]) for r in rows if key in r and not math.isnan(float(r[key]))]


def summarise(rows: list[dict]) -> dict[str, float]:
    """Mean and worst case of each figure over the held-out expert patients: lowest overlap or lesion recall;
    largest distance, absolute volume error, false-lesion count or volume. Unmeasured figures (NaN: no lesion
    label, no true lesion) are left out; so are the model-made validation cases, whose false lesions the
    summary gives apart (``validation_false_lesions``, ``validation_false_lesion_ml``: their means)."""
    summary = {}
    weak = [row for row in rows if row.get("label") != "expert"]
    if weak:
        summary["validation_false_lesions"] = float(np.mean([float(row["lesion_false_count"]) for row in weak]))
        summary["validation_false_lesion_ml"] = float(np.mean([float(row["lesion_false_ml"]) for row in weak]))
    rows = expert_rows(rows)
    for key in SUMMARY_KEYS:
        values = measured(rows, key)
        if values:
            summary[f"mean_{key}"] = float(np.mean(values))
            if key.endswith(HIGHER_IS_BETTER):
                summary[f"worst_{key}"] = float(np.min(values))
            else:
                summary[f"worst_{key}"] = float(max(values, key=abs))
    return summary


def write_table(rows: list[dict], path_stem: Path) -> None:
    keys = list(dict.fromkeys(k for row in rows for k in row))
    with atomic_output(path_stem.with_suffix(".csv"), ".csv") as temporary, open(temporary, "w", newline="", encoding="utf-8") as stream:
        writer = csv.DictWriter(stream, fieldnames=keys)
        writer.writeheader()
        writer.writerows(rows)
    write_strict_json(rows, path_stem.with_suffix(".json"))  # an unmeasured figure (NaN in the CSV) is null


def format_table(rows: list[dict]) -> str:
    """Markdown table of the per-case figures; a figure not measured on a case (no lesion label: no lesion
    Dice, no recall) reads n/a, while false lesions are counted on every case."""
    columns = tuple(c for c in ("seed", "fold") if any(c in row for row in rows)) + TABLE_COLUMNS + tuple(c for c in LESION_COLUMNS if any(c in row for row in rows))
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    for row in rows:
        cells = []
        for column in columns:
            value = row.get(column, "n/a")
            cells.append(f"{value:.3f}" if isinstance(value, float) and not math.isnan(value) else ("n/a" if isinstance(value, float) else str(value)))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def evaluate_fold(
    config: TrainConfig, result: TrainResult, settings: dict, test: Case, train_cases: list[Case], val_cases: list[Case], fold_dir: Path,
) -> dict:
    """A fold's rows: its held-out patient (``other_scanners`` too), then its validation cases; and, for a
    cascade, the held-out patient under stage 1 alone (``stage1_rows``)."""
    segmenter = segmenter_of(result, config.device, with_lesion_settings(result.card, settings))
    row = evaluate_case(segmenter, test, fold_dir / f"panel_{test.name}.png", other_scanners=True)
    row["trained_on"] = " ".join(c.name for c in train_cases)
    row.update(lesion_columns(settings))
    rows = [{**row, "fold": test.name}]
    # The validation cases were never trained on either: their livers, labelled without lesions, count the
    # fold's false lesions on another scanner (their liver figures are agreement with a model, not accuracy).
    for case in val_cases:
        rows.append({**evaluate_case(segmenter, case), "trained_on": row["trained_on"], "fold": test.name})
    stage1_rows = []
    if result.stage2:  # what stage 2 adds: the same fold's stage 1 as a single-stage model, on the same patient
        alone = LiverSegmenter(device=config.device, card=replace(segmenter.card, stage2={}), network=result.network)
        stage1_rows.append({**evaluate_case(alone, test, other_scanners=True), "fold": test.name})
    return {"rows": rows, "stage1_rows": stage1_rows}


def crossvalidate(
    config: TrainConfig, output_dir: Path, resume: bool = False, folds: list[str] | None = None, trainings: Trainings | None = None,
) -> tuple[list[dict], dict]:
    """Leave one expert-labelled patient out; each held-out volume is segmented by the full engine.

    ``folds`` restricts the held-out cases (a quick comparison of settings); training sets stay the same.
    ``trainings``: what this run has trained already (``fit_once``), shared with its final model.
    """
    trainings = {} if trainings is None else trainings
    cases = load_cases(config)
    experts = [c for c in cases if c.is_expert and c.name not in config.split.val]
    if len(experts) < 2:
        raise LiverSegInputError("cross-validation needs at least two expert-labelled cases")
    if folds:
        unknown = sorted(set(folds) - {c.name for c in experts})
        if unknown:
            raise LiverSegInputError(f"--folds names no expert test case: {', '.join(unknown)} (expert cases: {', '.join(c.name for c in experts)})")
        experts = [c for c in experts if c.name in folds]
    rows, stage1_rows, choices = [], [], []
    for test in experts:
        fold_dir = output_dir / f"fold_{test.name}"
        train_cases, val_cases = split_cases(cases, config, test)
        settings = lesion_settings(config, [c for c in cases if c != test], fold_dir, resume, trainings)
        if settings:
            choices.append({**settings, "fold": test.name})
        result = fit_once(config, train_cases, val_cases, fold_dir, resume, trainings)
        record, key = fold_dir / "fold_rows.json", run_record_key(config, cases, test)
        fold = read_run_record(record, key, resume)
        if fold is None:
            fold = evaluate_fold(config, result, settings, test, train_cases, val_cases, fold_dir)
            write_run_record(record, key, fold)
        else:
            log.info("fold %s evaluated before this start: its rows read from %s", test.name, record)
        row = fold["rows"][0]
        log.info(
            "fold %s: liver Dice %.4f, lesion Dice %s, lesions found %d of %d, false lesions %d (%.1f mL)", test.name, row["liver_dice"],
            row.get("lesion_dice", "n/a"), row["lesion_detected_count"], row["lesion_true_count"], row["lesion_false_count"], row["lesion_false_ml"],
        )
        rows += fold["rows"]
        stage1_rows += fold["stage1_rows"]
    summary = summarise(rows)
    summary["lesions_validated"] = lesions_validated(rows)
    if choices:
        summary["inner_choices"] = choices
    write_table(rows, output_dir / "crossval")
    if stage1_rows:
        summary["stage1_alone"] = {"per_case": stage1_rows, "summary": summarise(stage1_rows)}
        write_table(stage1_rows, output_dir / "crossval_stage1")
    return rows, summary


def expert_rows(rows: list[dict]) -> list[dict]:
    """The rows of held-out expert-labelled patients: the only ones accuracy is measured on."""
    return [row for row in rows if row.get("label") == "expert"]


def lesions_validated(rows: list[dict]) -> bool:
    """The card's rule: cross-validated lesion Dice ≥ ``LESION_DICE_BAR`` on every case that labels lesions
    (its mean over the seeds when several trainings were run)."""
    per_case: dict[str, list[float]] = {}
    for row in expert_rows(rows):
        if "lesion_dice" in row and not math.isnan(float(row["lesion_dice"])):
            per_case.setdefault(str(row["case"]), []).append(float(row["lesion_dice"]))
    return bool(per_case) and min(float(np.mean(dices)) for dices in per_case.values()) >= LESION_DICE_BAR


def crossvalidate_seeds(
    config: TrainConfig, output_dir: Path, seeds: list[int], resume: bool = False, folds: list[str] | None = None, trainings: Trainings | None = None,
) -> tuple[list[dict], dict]:
    """``crossvalidate`` once per seed (``output_dir/seed_N``), the same folds and settings each time: the
    rows carry their seed, and the summary adds how far the per-seed means lie apart (``seed_spread``), the
    training-to-training noise every comparison has to beat. One seed: ``crossvalidate`` as it is."""
    if len(seeds) == 1:
        return crossvalidate(replace(config, seed=seeds[0]), output_dir, resume, folds, trainings)
    rows: list[dict] = []
    stage1_rows: list[dict] = []
    choices: list[dict] = []
    for seed in seeds:
        seed_rows, seed_summary = crossvalidate(replace(config, seed=seed), output_dir / f"seed_{seed}", resume, folds, trainings)
        rows += [{**row, "seed": seed} for row in seed_rows]
        stage1_rows += [{**row, "seed": seed} for row in seed_summary.get("stage1_alone", {}).get("per_case", [])]
        choices += [{**choice, "seed": seed} for choice in seed_summary.get("inner_choices", [])]
    summary = {**summarise(rows), **seed_spread(rows), "seeds": list(seeds), "lesions_validated": lesions_validated(rows)}
    if choices:
        summary["inner_choices"] = choices
    write_table(rows, output_dir / "crossval")
    if stage1_rows:
        summary["stage1_alone"] = {"per_case": stage1_rows, "summary": {**summarise(stage1_rows), **seed_spread(stage1_rows)}}
        write_table(stage1_rows, output_dir / "crossval_stage1")
    return rows, summary


def seed_spread(rows: list[dict]) -> dict[str, float]:
    """For each figure of ``SUMMARY_KEYS``: the standard deviation (``seed_sd_mean_*``) and the range
    (``seed_range_mean_*``) over the seeds of its mean over the cases."""
    spread: dict[str, float] = {}
    rows = expert_rows(rows)
    seeds = sorted({row["seed"] for row in rows})
    for key in SUMMARY_KEYS:
        means = []
        for seed in seeds:
            values = measured([r for r in rows if r["seed"] == seed], key)
            if values:
                means.append(float(np.mean(values)))
        if len(means) == len(seeds):
            spread[f"seed_sd_mean_{key}"] = float(np.std(means, ddof=1))
            spread[f"seed_range_mean_{key}"] = float(max(means) - min(means))
    return spread


SEED_TABLE_KEYS = ("liver_dice", "liver_assd_mm", "liver_volume_error_pct", "lesion_dice", "lesion_recall", "lesion_false_count")


def format_seed_table(rows: list[dict]) -> str:
    """Markdown table per case over the seeds: mean ± standard deviation (lowest–highest) of each figure."""
    cases = list(dict.fromkeys(str(row["case"]) for row in rows))
    lines = ["| case | trainings | " + " | ".join(SEED_TABLE_KEYS) + " |", "|" + "---|" * (len(SEED_TABLE_KEYS) + 2)]
    for case in cases:
        mine = [row for row in rows if str(row["case"]) == case]
        cells = []
        for key in SEED_TABLE_KEYS:
            values = measured(mine, key)
            sd = float(np.std(values, ddof=1)) if len(values) > 1 else float("nan")
            cells.append(f"{np.mean(values):.3f} ± {sd:.3f} ({min(values):.3f}–{max(values):.3f})" if values else "n/a")
        lines.append(f"| {case} | {len(mine)} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def train_final(config: TrainConfig, output_dir: Path, evaluation: dict, resume: bool = False, trainings: Trainings | None = None) -> Path:
    """Train on every expert case (validation cases excepted) and export the model with ``evaluation``;
    with ``lesion.selection`` "inner" its lesion settings are chosen by inner folds over all training patients
    (those that hold out an expert patient are that patient's outer fold where ``trainings`` holds it)."""
    cases = load_cases(config)
    train_cases, val_cases = split_cases(cases, config)
    trainings = {} if trainings is None else trainings
    settings = lesion_settings(config, cases, output_dir / "final", resume, trainings)
    result = fit_once(config, train_cases, val_cases, output_dir / "final", resume, trainings)
    card_path = export(result, config, train_cases, output_dir, evaluation, settings)
    segmenter = LiverSegmenter(card_path, device=config.device)
    for case in val_cases[:2]:
        evaluate_case(segmenter, case, output_dir / "final" / f"panel_{case.name}.png")
    return card_path


def lesion_text(rows: list[dict]) -> str:
    """The paragraph of RESULTS.md on how each fold's lesion settings were chosen (empty when fixed)."""
    if not any("lesion_chosen_on" in row for row in rows):
        return ""
    gate = ", `gate_margin_mm`" if any("gate_margin_mm" in row for row in rows) else ""
    gate += ", `graph_cut` (smoothness/contrast_hu)" if any("graph_cut" in row for row in rows) else ""
    return f"Lesion settings per fold (`lesion_threshold`, `min_lesion_ml`{gate}, `lesion_chosen_on`): {LESION_SELECTION_RULE}. The outer test patient is never an inner patient.\n\n"


def seed_text(rows: list[dict]) -> str:
    """The paragraph and table of RESULTS.md on the trainings with different seeds (empty for one seed)."""
    if not any("seed" in row for row in rows):
        return ""
    seeds = sorted({row["seed"] for row in rows})
    return (f"Every fold was trained {len(seeds)} times, with seeds {', '.join(map(str, seeds))} (the same patients, settings and "
            "schedule; the seed draws the initial weights, the batches and the augmentation). Per case over the seeds, "
            "mean ± standard deviation (lowest–highest): the training-to-training noise any comparison of settings has to "
            f"beat. The lesion rule takes each case's mean over the seeds.\n\n{format_seed_table(rows)}\n\nEvery training:\n\n")


def stage1_text(summary: dict) -> str:
    """The section of RESULTS.md on a cascade's stage 1 alone (empty for a single-stage model)."""
    if "stage1_alone" not in summary:
        return ""
    alone = summary["stage1_alone"]
    return f"""
Stage 1 alone: each fold's first network run as a single-stage model on the same held-out patient (what stage 2
adds is the difference; the cascade's rows above):

{format_table(alone["per_case"])}

Summary: {json.dumps({k: round(v, 4) if isinstance(v, float) else v for k, v in alone["summary"].items()})}
"""


def scored_cell(chosen: str, scores: dict[str, float] | None) -> str:
    """A chosen setting and every candidate's mean inner liver Dice, as a table cell."""
    return chosen if not scores else f"{chosen} ({', '.join(f'{name}: {dice:.4f}' for name, dice in scores.items())})"


def inner_choice_text(summary: dict) -> str:
    """The table of RESULTS.md of what each fold's inner folds chose, with every candidate's figure: how far
    apart the candidates lay (to set beside the seed-to-seed spread) is what a reader needs to trust a choice."""
    choices = summary.get("inner_choices")
    if not choices:
        return ""
    lines = ["| seed | held out | chosen on | gate margin (mm; mean inner liver Dice by margin) | graph cut (by cut) | lesions "
             "(mean inner lesion Dice, false lesions per lesion-free inner liver) |", "|---|---|---|---|---|---|"]
    for choice in choices:
        gate = scored_cell(f"{choice['gate_margin_mm']:g}", choice.get("mean_liver_dice_by_gate_margin")) if "gate_margin_mm" in choice else "—"
        cut = scored_cell(describe_graph_cut(choice["graph_cut"]), choice.get("mean_liver_dice_by_graph_cut")) if "graph_cut" in choice else "—"
        lesions = (f"{describe_lesion_source(choice)}, minimum {choice['min_lesion_ml']:g} mL ({choice['mean_lesion_dice']:.3f}, "
                   f"{choice['false_lesions_per_free_liver']:.2f})")
        lines.append(f"| {choice.get('seed', '—')} | {choice['fold']} | {' '.join(choice['chosen_on'])} | {gate} | {cut} | {lesions} |")
    return "What each fold's inner folds chose, and every candidate's figure on them:\n\n" + "\n".join(lines) + "\n\n"


def write_results(rows: list[dict], summary: dict, path: Path, command: str) -> None:
    status = "validated (cross-validated lesion Dice ≥ 0.5 on every lesion case)" if summary.get("lesions_validated") else "EXPERIMENTAL (cross-validated lesion Dice below 0.5)"
    text = f"""# LiverSeg cross-validation results

Leave-one-patient-out over the expert-labelled volumes; each held-out CT is segmented by the full
engine (reorientation, preprocessing, network, post-processing, mapping back to the input grid) and
compared with its expert label at full resolution. Model-made labels are never test cases.

Lesions are also counted one by one (26-connected 3D components): a true lesion is detected when a
predicted lesion overlaps it by at least one voxel (`lesion_recall` = detected / true, n/a without true
lesions); a predicted lesion that overlaps no true lesion is a false lesion (`lesion_false_count`,
`lesion_false_ml`), counted on every case, including livers labelled without lesions.

A liver cut off at the scan's edge: each held-out CT is also segmented with its slices before the labelled
liver's middle slice removed (the scan then starts where the liver is about its widest);
`liver_dice_cut_scan` is the liver Dice on the slices kept, `liver_dice_cut_scan_whole` the whole scan's
Dice on the same slices. The gap is what the cut costs.

Thicker slices, as other hospitals reconstruct them: each held-out CT is also segmented as 5 mm slices made
from its own (box-profile slab means along the image's third axis, the training's thick-slice augmentation),
against its label on the same slabs (liver, lesion: slab mean ≥ one half): `liver_dice_thick_slices`,
`lesion_dice_thick_slices`, beside the native slices' `liver_dice`, `lesion_dice`. A smaller field of view:
each held-out CT cut to the central 70 % of its slices' side (the liver then often cut at the image's edge):
`liver_dice_small_fov` on that region, `liver_dice_small_fov_whole` the whole scan's Dice on the same region.

Rows labelled `model` are validation cases, never trained on, segmented by each fold's model (`fold`): their
livers are labelled without lesions, so every lesion found there is false; their liver Dice is agreement with
a model-made label, not accuracy. The summary's means and worst cases are over the expert rows only; the
validation cases' mean false lesions are given apart.

{lesion_text(rows)}{inner_choice_text(summary)}{seed_text(rows)}Command: `{command}`

{format_table(rows)}

Summary: {json.dumps({k: round(v, 4) if isinstance(v, float) else v for k, v in summary.items() if k not in ("stage1_alone", "inner_choices")})}
{stage1_text(summary)}
Lesion output: {status}.
"""
    with atomic_output(path, ".md") as temporary:
        Path(temporary).write_text(text, encoding="utf-8")


__all__ = ["choose_lesion_settings", "crossvalidate", "crossvalidate_seeds", "train_final", "evaluate_case", "load_cases", "write_results"]
