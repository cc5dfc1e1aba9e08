"""Evaluation metrics against hand-computed values."""

from __future__ import annotations

import math

import numpy as np
import pytest
import SimpleITK as sitk

from LiverSegTraining.metrics import lesion_detection, label_map_metrics, overlap, structure_metrics, surface_distances_mm

from conftest import read_case


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
        {"label": "expert", "liver_dice": 0.9, "liver_hd95_mm": 10.0, "liver_volume_error_pct": -8.0},
        {"label": "expert", "liver_dice": 0.8, "liver_hd95_mm": 30.0, "liver_volume_error_pct": 5.0},
        # A validation case with a model-made label: agreement, not accuracy; only its false lesions are summed up.
        {"label": "model", "liver_dice": 0.1, "liver_hd95_mm": 90.0, "liver_volume_error_pct": 50.0, "lesion_false_count": 3, "lesion_false_ml": 1.5},
    ]
    summary = summarise(rows)
    assert summary["worst_liver_dice"] == 0.8 and summary["worst_liver_hd95_mm"] == 30.0
    assert summary["worst_liver_volume_error_pct"] == -8.0 and summary["mean_liver_dice"] == pytest.approx(0.85)
    assert summary["validation_false_lesions"] == 3.0 and summary["validation_false_lesion_ml"] == 1.5



def test_summary_and_table_carry_lesion_detection():
    """Worst recall is the lowest, worst false-lesion figures the largest; an unmeasured recall (no true
    lesion) is left out of the summary and reads n/a in the table, while false lesions show on every case."""
    from LiverSegTraining.runner import format_table, summarise

    rows = [
        {"case": "a", "label": "expert", "lesion_true_count": 4, "lesion_detected_count": 3, "lesion_recall": 0.75, "lesion_false_count": 1, "lesion_false_ml": 2.0},
        {"case": "b", "label": "expert", "lesion_true_count": 2, "lesion_detected_count": 1, "lesion_recall": 0.5, "lesion_false_count": 0, "lesion_false_ml": 0.0},
        {"case": "c", "label": "expert", "lesion_true_count": 0, "lesion_detected_count": 0, "lesion_recall": math.nan, "lesion_false_count": 6, "lesion_false_ml": 29.8},
    ]
    summary = summarise(rows)
    assert summary["worst_lesion_recall"] == 0.5 and summary["mean_lesion_recall"] == pytest.approx(0.625)
    assert summary["worst_lesion_false_count"] == 6 and summary["mean_lesion_false_count"] == pytest.approx(7 / 3)
    assert summary["worst_lesion_false_ml"] == 29.8
    header, _, *lines = format_table(rows).splitlines()
    columns = [c.strip() for c in header.strip("|").split("|")]
    cells = dict(zip(columns, (c.strip() for c in lines[2].strip("|").split("|"))))
    assert cells["lesion_recall"] == "n/a" and cells["lesion_false_count"] == "6" and cells["lesion_false_ml"] == "29.800"


def _two_lesions_one_found() -> tuple[np.ndarray, np.ndarray]:
    """(prediction, truth) label maps: true lesions A (8 voxels) and B (8 voxels) in a liver; the prediction
    touches A in a single voxel, misses B and adds a 4-voxel lesion far from both."""
    truth = np.zeros((10, 10, 10), np.uint8)
    truth[1:9, 1:9, 1:9] = 1
    truth[1:3, 1:3, 1:3] = 2  # A
    truth[6:8, 6:8, 6:8] = 2  # B
    prediction = np.where(truth >= 1, 1, 0).astype(np.uint8)
    prediction[2:4, 2:4, 2:4] = 2  # overlaps A in voxel (2, 2, 2) only
    prediction[6, 1:3, 3:5] = 2  # a false lesion: 4 voxels, touching neither A nor B
    return prediction, truth


def test_lesion_detection_counts_lesions_by_overlap():
    prediction, truth = _two_lesions_one_found()
    # 2 × 1 × 1 mm voxels: 0.002 mL each; the false lesion is 4 voxels = 0.008 mL.
    row = label_map_metrics(prediction, truth, (2.0, 1.0, 1.0), lesion_labelled=True)
    assert {k: row[k] for k in ("lesion_true_count", "lesion_detected_count", "lesion_false_count")} == {
        "lesion_true_count": 2, "lesion_detected_count": 1, "lesion_false_count": 1}
    assert row["lesion_recall"] == 0.5 and row["lesion_false_ml"] == pytest.approx(0.008)


def test_lesion_detection_minimum_size_ignores_small_components():
    """With a 0.01 mL minimum (5 voxels of 0.002 mL), the 4-voxel false lesion no longer counts; the 8-voxel
    lesions (0.016 mL) on both sides still do."""
    prediction, truth = _two_lesions_one_found()
    row = lesion_detection(prediction == 2, truth == 2, voxel_ml=0.002, min_lesion_ml=0.01)
    assert row == {"lesion_true_count": 2, "lesion_detected_count": 1, "lesion_recall": 0.5, "lesion_false_count": 0, "lesion_false_ml": 0.0}
    # A minimum above every lesion leaves nothing to find: recall undefined.
    assert math.isnan(lesion_detection(prediction == 2, truth == 2, voxel_ml=0.002, min_lesion_ml=1.0)["lesion_recall"])


def test_lesion_components_are_26_connected():
    """Two voxels touching only at a corner are one lesion."""
    prediction = np.zeros((4, 4, 4), bool)
    prediction[0, 0, 0] = prediction[1, 1, 1] = True
    assert lesion_detection(prediction, np.zeros_like(prediction), voxel_ml=1.0)["lesion_false_count"] == 1


def test_every_predicted_lesion_is_false_on_a_lesion_free_liver():
    """Without a lesion label (ircad_07, model-made labels) the liver counts as lesion-free: both
    predicted lesions are false, recall is undefined, and no lesion Dice is reported."""
    prediction, truth = _two_lesions_one_found()
    liver_only = np.minimum(truth, 1)
    for lesion_labelled in (False, True):  # no lesion label, or a lesion label with no lesion in it
        row = label_map_metrics(prediction, liver_only, (1.0, 1.0, 1.0), lesion_labelled=lesion_labelled)
        assert (row["lesion_true_count"], row["lesion_detected_count"], row["lesion_false_count"]) == (0, 0, 2)
        assert math.isnan(row["lesion_recall"]) and row["lesion_false_ml"] == pytest.approx(0.012)  # 8 + 4 voxels of 1 mm³
    assert "lesion_dice" not in label_map_metrics(prediction, liver_only, (1.0, 1.0, 1.0), lesion_labelled=False)


def test_empty_prediction_finds_no_lesion():
    _, truth = _two_lesions_one_found()
    row = lesion_detection(np.zeros(truth.shape, bool), truth == 2, voxel_ml=1.0)
    assert row == {"lesion_true_count": 2, "lesion_detected_count": 0, "lesion_recall": 0.0, "lesion_false_count": 0, "lesion_false_ml": 0.0}


def _independent_lesion_count(predicted: np.ndarray, true: np.ndarray, voxel_ml: float) -> dict[str, float]:
    """The same figures by scipy's labelling, one component at a time (the slow, obvious way)."""
    from scipy import ndimage

    cube = np.ones((3, 3, 3), bool)  # 26-connectivity
    true_labels, true_count = ndimage.label(true, structure=cube)
    predicted_labels, predicted_count = ndimage.label(predicted, structure=cube)
    detected, false_voxels = 0, []
    for t, box in enumerate(ndimage.find_objects(true_labels), start=1):
        detected += bool(predicted[box][true_labels[box] == t].any())
    for p, box in enumerate(ndimage.find_objects(predicted_labels), start=1):
        if not true[box][predicted_labels[box] == p].any():
            false_voxels.append(int((predicted_labels[box] == p).sum()))
    return {
        "lesion_true_count": true_count,
        "lesion_detected_count": detected,
        "lesion_recall": detected / true_count,
        "lesion_false_count": len(false_voxels),
        "lesion_false_ml": sum(false_voxels) * voxel_ml,
    }


def test_lesion_detection_on_a_real_case_matches_an_independent_count(data_root, segmenter):
    """The bundled model's lesions on ircad_01 (a pipeline check: the model trained on this patient)
    against its 7 expert tumours, and against the same tumours moved 30 rows (so that some predicted
    lesions overlap none): the counts equal scipy's component by component."""
    ct, label = read_case(data_root, "ircad_01")
    predicted = sitk.GetArrayFromImage(segmenter.segment(ct).label_image) == 2
    true = sitk.GetArrayViewFromImage(label) == 2
    voxel_ml = float(np.prod(ct.GetSpacing())) / 1000.0
    moved = np.roll(true, 30, axis=1)
    for truth in (true, moved):
        expected = _independent_lesion_count(predicted, truth, voxel_ml)
        assert lesion_detection(predicted, truth, voxel_ml) == pytest.approx(expected)
    assert _independent_lesion_count(predicted, true, voxel_ml)["lesion_true_count"] == 7  # the data README's 7 tumours
    assert _independent_lesion_count(predicted, moved, voxel_ml)["lesion_false_count"] > 0
