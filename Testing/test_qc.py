"""Plausibility warnings (qc.py) against hand-worked cases: thresholds, volume range and the scan's edges."""

from __future__ import annotations

import numpy as np

from LiverSegLib.qc import edge_warning, intensity_warning, qc_warnings, volume_warning


def test_intensities_that_are_not_ct():
    assert intensity_warning(-1024, 3071) is None  # air to bone: a CT
    assert intensity_warning(-500, 200) is None  # the limits themselves pass
    assert "0..800 do not look like CT" in intensity_warning(0, 800)  # MR-like: nothing below −500 HU
    assert "-1000..150 do not look" in intensity_warning(-1000, 150)  # nothing as dense as contrast or bone


def test_liver_volume_range():
    assert volume_warning(1500.0) is None
    assert volume_warning(500.0) is None and volume_warning(3500.0) is None
    assert volume_warning(499.4) == "liver volume 499 mL is outside the usual 500–3500 mL: check the segmentation"
    assert volume_warning(4083.0) == "liver volume 4083 mL is outside the usual 500–3500 mL: check the segmentation"
    assert volume_warning(0.0) == "no liver found: is the liver in the scan?"


def test_liver_at_the_edges_of_the_scan():
    label = np.zeros((5, 6, 7), np.uint8)
    label[1:4, 2:4, 2:5] = 1
    label[2, 3, 3] = 2
    assert edge_warning(label) is None  # inside on every side
    top = label.copy()
    top[0, 2, 2] = 1
    assert edge_warning(top).startswith("the liver reaches the first or last slice: ")
    side = label.copy()
    side[2, 3, 6] = 2  # a lesion voxel is liver too
    assert edge_warning(side).startswith("the liver reaches the edge of the field of view: ")
    both = top | side
    assert edge_warning(both).startswith("the liver reaches the first or last slice and the edge of the field of view: ")
    assert edge_warning(np.zeros_like(label)) is None


def test_all_warnings_in_reading_order():
    label = np.zeros((5, 6, 7), np.uint8)
    label[0, 2, 2] = 1
    found = qc_warnings(0.0, 800.0, 4200.0, label)
    assert [w.split()[0] for w in found] == ["intensities", "liver", "the"]
    assert qc_warnings(-1024.0, 2000.0, 1500.0, np.pad(label[1:], ((1, 0), (0, 0), (0, 0)))) == []
