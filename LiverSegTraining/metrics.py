"""Overlap and surface metrics in physical units, per structure (liver, lesion).

Surface distances follow MONAI's conventions: surfaces are mask voxels with a background
6-neighbour, distances are Euclidean in mm (anisotropic spacing honoured), ASSD averages both
directions, HD95 is the larger of the two directed 95th percentiles. Empty-versus-empty is a perfect
match (Dice 1, distances 0); one empty side leaves the distances undefined (NaN).
"""

from __future__ import annotations

import math

import numpy as np
from scipy import ndimage


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


def structure_metrics(prediction: np.ndarray, truth: np.ndarray, spacing_mm: tuple[float, ...]) -> dict[str, float]:
    """All figures for one structure: overlap, surface distances and volumes (mL)."""
    voxel_ml = float(np.prod(spacing_mm)) / 1000.0
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


def label_map_metrics(
    prediction: np.ndarray, truth: np.ndarray, spacing_mm: tuple[float, ...], lesion_labelled: bool
) -> dict[str, float]:
    """Liver (labels ≥ 1) and, when the truth has a lesion label, lesion (label 2) figures, flat keys."""
    row = {f"liver_{k}": v for k, v in structure_metrics(prediction >= 1, truth >= 1, spacing_mm).items()}
    if lesion_labelled:
        row.update({f"lesion_{k}": v for k, v in structure_metrics(prediction == 2, truth == 2, spacing_mm).items()})
    return row
