"""Overlap and surface metrics in physical units, per structure (liver, lesion), and per-lesion detection.

Surface distances follow MONAI's conventions: surfaces are mask voxels with a background
6-neighbour, distances are Euclidean in mm (anisotropic spacing honoured), ASSD averages both
directions, HD95 is the larger of the two directed 95th percentiles. Empty-versus-empty is a perfect
match (Dice 1, distances 0); one empty side leaves the distances undefined (NaN).

Lesions are also judged one by one, as a radiologist counts them (``lesion_detection``): a voxel Dice
can hide a missed metastasis behind a well-segmented large one, and says nothing about false lesions on a
liver that has none.
"""

from __future__ import annotations

import math

import numpy as np
from scipy import ndimage

from LiverSegLib.postprocessing import bounding_box, label_components


def overlap(prediction: np.ndarray, truth: np.ndarray) -> dict[str, float]:
    prediction, truth = prediction.astype(bool), truth.astype(bool)
    intersection = int(np.count_nonzero(prediction & truth))
    predicted, actual = int(np.count_nonzero(prediction)), int(np.count_nonzero(truth))
    union = predicted + actual - intersection
    return {
        "dice": 1.0 if predicted + actual == 0 else 2.0 * intersection / (predicted + actual),
        "iou": 1.0 if union == 0 else intersection / union,
        "accuracy": float(np.count_nonzero(prediction == truth)) / prediction.size,
    }


def _surface(mask: np.ndarray) -> np.ndarray:
    return mask & ~ndimage.binary_erosion(mask, structure=ndimage.generate_binary_structure(3, 1), border_value=0)


def surface_distances_mm(prediction: np.ndarray, truth: np.ndarray, spacing_mm: tuple[float, ...]) -> dict[str, float]:
    """ASSD and HD95 (mm) between two masks on a grid with ``spacing_mm`` per array axis."""
    prediction, truth = prediction.astype(bool), truth.astype(bool)
    if not prediction.any() and not truth.any():
        return {"assd_mm": 0.0, "hd95_mm": 0.0}
    if not prediction.any() or not truth.any():
        return {"assd_mm": math.nan, "hd95_mm": math.nan}
    # Work inside the bounding box of both masks (plus a margin) to keep the distance transforms small.
    both = np.argwhere(prediction | truth)
    low, high = np.maximum(both.min(0) - 2, 0), both.max(0) + 3
    box = tuple(slice(a, b) for a, b in zip(low, high))
    prediction, truth = np.pad(prediction[box], 1), np.pad(truth[box], 1)
    surface_prediction, surface_truth = _surface(prediction), _surface(truth)
    to_truth = ndimage.distance_transform_edt(~surface_truth, sampling=spacing_mm)[surface_prediction]
    to_prediction = ndimage.distance_transform_edt(~surface_prediction, sampling=spacing_mm)[surface_truth]
    return {
        "assd_mm": float((to_truth.sum() + to_prediction.sum()) / (len(to_truth) + len(to_prediction))),
        "hd95_mm": float(max(np.percentile(to_truth, 95), np.percentile(to_prediction, 95))),
    }


def voxel_volume_ml(spacing_mm: tuple[float, ...]) -> float:
    return float(np.prod(spacing_mm)) / 1000.0


def structure_metrics(prediction: np.ndarray, truth: np.ndarray, spacing_mm: tuple[float, ...]) -> dict[str, float]:
    """All figures for one structure: overlap, surface distances and volumes (mL)."""
    voxel_ml = voxel_volume_ml(spacing_mm)
    predicted_ml = float(np.count_nonzero(prediction)) * voxel_ml
    true_ml = float(np.count_nonzero(truth)) * voxel_ml
    return {
        **overlap(prediction, truth),
        **surface_distances_mm(prediction, truth, spacing_mm),
        "volume_ml": predicted_ml,
        "true_volume_ml": true_ml,
        "volume_error_ml": predicted_ml - true_ml,
        "volume_error_pct": math.nan if true_ml == 0 else 100.0 * (predicted_ml - true_ml) / true_ml,
    }


def _component_volumes_ml(mask: np.ndarray, voxel_ml: float) -> tuple[np.ndarray, np.ndarray]:
    """26-connected components of ``mask``: (labels, volume in mL of each label, index 0 = background)."""
    labels, count = label_components(mask, fully_connected=True)
    return labels, np.bincount(labels.ravel(), minlength=count + 1) * voxel_ml


def lesion_detection(
    predicted_lesion: np.ndarray, true_lesion: np.ndarray, voxel_ml: float, min_lesion_ml: float = 0.0
) -> dict[str, float]:
    """Per-lesion detection: lesions are 26-connected 3D components (the engine's lesion count uses the
    same connectivity, so the figures match its report).

    Overlap rule (LiTS-like): a true lesion counts as detected when at least one voxel of it lies in some
    predicted lesion component; a predicted component that overlaps no true lesion is a false lesion.
    Components smaller than ``min_lesion_ml`` are ignored on both sides (neither true lesions to find,
    nor detections, nor false lesions); 0 keeps every component.

    A truth without lesions (a lesion-free liver, or a label that has no lesion label at all: pass an
    empty ``true_lesion``) makes every predicted component a false lesion and leaves the recall undefined
    (NaN): false lesions are measurable on every case, recall only where lesions are labelled.
    """
    predicted_lesion, true_lesion = predicted_lesion.astype(bool), true_lesion.astype(bool)
    box = bounding_box(predicted_lesion | true_lesion)  # components never leave the box of both masks
    predicted_labels, predicted_ml = _component_volumes_ml(predicted_lesion[box], voxel_ml)
    true_labels, true_ml = _component_volumes_ml(true_lesion[box], voxel_ml)
    kept_predicted, kept_true = predicted_ml >= min_lesion_ml, true_ml >= min_lesion_ml
    kept_predicted[0] = kept_true[0] = False
    touching = (predicted_labels > 0) & (true_labels > 0)
    pairs_true, pairs_predicted = true_labels[touching], predicted_labels[touching]
    counted = kept_true[pairs_true] & kept_predicted[pairs_predicted]
    detected = np.zeros_like(kept_true)
    detected[pairs_true[counted]] = True
    matched = np.zeros_like(kept_predicted)
    matched[pairs_predicted[counted]] = True
    false_lesions = kept_predicted & ~matched
    true_count = int(kept_true.sum())
    return {
        "lesion_true_count": true_count,
        "lesion_detected_count": int(detected.sum()),
        "lesion_recall": math.nan if true_count == 0 else float(detected.sum()) / true_count,
        "lesion_false_count": int(false_lesions.sum()),
        "lesion_false_ml": float(predicted_ml[false_lesions].sum()),
    }


def label_map_metrics(
    prediction: np.ndarray, truth: np.ndarray, spacing_mm: tuple[float, ...], lesion_labelled: bool, min_lesion_ml: float = 0.0
) -> dict[str, float]:
    """Liver (labels ≥ 1) and, when the truth has a lesion label, lesion (label 2) figures, flat keys.

    Lesion detection is reported for every case: without a lesion label the liver is taken as lesion-free
    (ircad_07's expert label; the model-made labels, which mark the liver only), so that every predicted
    lesion counts as false and the recall is NaN.
    """
    row = {f"liver_{k}": v for k, v in structure_metrics(prediction >= 1, truth >= 1, spacing_mm).items()}
    true_lesion = truth == 2 if lesion_labelled else np.zeros(truth.shape, bool)
    if lesion_labelled:
        row.update({f"lesion_{k}": v for k, v in structure_metrics(prediction == 2, true_lesion, spacing_mm).items()})
    row.update(lesion_detection(prediction == 2, true_lesion, voxel_volume_ml(spacing_mm), min_lesion_ml))
    return row
