"""Evaluation metrics against hand-computed values."""

from __future__ import annotations

import math

import numpy as np
import pytest

from LiverSegTraining.metrics import label_map_metrics, overlap, structure_metrics, surface_distances_mm


def test_overlap_of_shifted_cubes():
    prediction = np.zeros((4, 4, 4), bool)
    truth = np.zeros((4, 4, 4), bool)
    prediction[0:2, 0:2, 0:2] = True
    truth[0:2, 0:2, 1:3] = True
    # |P| = |T| = 8, |P∩T| = 4, |P∪T| = 12, 8 voxels disagree out of 64
    assert overlap(prediction, truth) == pytest.approx({"dice": 0.5, "iou": 1 / 3, "accuracy": 56 / 64})


def test_point_to_point_distance_in_mm():
    prediction = np.zeros((12, 12, 12), bool)
    truth = np.zeros((12, 12, 12), bool)
    prediction[5, 5, 5] = True
    truth[5, 5, 8] = True
    # 3 voxels apart along an axis of 2 mm spacing
    assert surface_distances_mm(prediction, truth, (1.0, 1.0, 2.0)) == pytest.approx({"assd_mm": 6.0, "hd95_mm": 6.0})


def test_asymmetric_distances():
    prediction = np.zeros((12, 12, 12), bool)
    truth = np.zeros((12, 12, 12), bool)
    prediction[5, 5, 5] = True
    truth[5, 5, 8:10] = True
    # prediction → truth: [3]; truth → prediction: [3, 4]; ASSD = 10/3; HD95 = max(3, 3 + 0.95·1)
    assert surface_distances_mm(prediction, truth, (1.0, 1.0, 1.0)) == pytest.approx({"assd_mm": 10 / 3, "hd95_mm": 3.95})


def test_empty_masks():
    empty = np.zeros((5, 5, 5), bool)
    one = empty.copy()
    one[2, 2, 2] = True
    assert surface_distances_mm(empty, empty, (1, 1, 1)) == {"assd_mm": 0.0, "hd95_mm": 0.0}
    assert all(math.isnan(v) for v in surface_distances_mm(one, empty, (1, 1, 1)).values())
    assert overlap(empty, empty)["dice"] == 1.0 and overlap(one, empty)["dice"] == 0.0


def test_volumes_in_ml():
    prediction = np.zeros((10, 10, 10), bool)
    truth = np.zeros((10, 10, 10), bool)
    prediction[:5] = True  # 500 voxels
    truth[:4] = True  # 400 voxels
    figures = structure_metrics(prediction, truth, (2.0, 1.0, 0.5))  # 1 mm³ per voxel
    assert figures["volume_ml"] == pytest.approx(0.5) and figures["true_volume_ml"] == pytest.approx(0.4)
    assert figures["volume_error_pct"] == pytest.approx(25.0)


def test_label_map_metrics_split_liver_and_lesion():
    truth = np.zeros((6, 6, 6), np.uint8)
    truth[1:5, 1:5, 1:5] = 1
    truth[2, 2, 2] = 2
    prediction = truth.copy()
    prediction[2, 2, 2] = 1  # lesion missed, liver (which includes the lesion) intact
    row = label_map_metrics(prediction, truth, (1, 1, 1), lesion_labelled=True)
    assert row["liver_dice"] == 1.0 and row["lesion_dice"] == 0.0
    assert "lesion_dice" not in label_map_metrics(prediction, truth, (1, 1, 1), lesion_labelled=False)


def test_summary_reports_the_worst_case_of_each_figure():
    from LiverSegTraining.runner import summarise

    rows = [
        {"liver_dice": 0.9, "liver_hd95_mm": 10.0, "liver_volume_error_pct": -8.0},
        {"liver_dice": 0.8, "liver_hd95_mm": 30.0, "liver_volume_error_pct": 5.0},
    ]
    summary = summarise(rows)
    assert summary["worst_liver_dice"] == 0.8 and summary["worst_liver_hd95_mm"] == 30.0
    assert summary["worst_liver_volume_error_pct"] == -8.0 and summary["mean_liver_dice"] == pytest.approx(0.85)
