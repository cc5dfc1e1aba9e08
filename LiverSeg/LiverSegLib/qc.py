"""Plausibility checks on a finished segmentation: what a reader should know before trusting the volumes.

Each check gives one sentence that names the problem; the CLI prints them as ``liverseg: warning: …``, the
report lists them under ``qc_warnings`` and the Slicer panel shows them. None of them stops a run: an
unusual liver can be real (hepatomegaly, a resected lobe, a child).
"""

from __future__ import annotations

import numpy as np

from .postprocessing import LIVER

# Adult livers measure about 1000–2500 mL on CT; outside 500–3500 mL a result is more likely wrong than rare.
PLAUSIBLE_LIVER_ML = (500.0, 3500.0)
# CT of the abdomen spans air (about −1000 HU) to bone (several hundred HU); an image that does not is
# probably MR, unscaled raw values, or a derived map.
CT_LOWEST_BELOW_HU = -500.0
CT_HIGHEST_ABOVE_HU = 200.0


def intensity_warning(low_hu: float, high_hu: float) -> str | None:
    if low_hu > CT_LOWEST_BELOW_HU or high_hu < CT_HIGHEST_ABOVE_HU:
        return (f"intensities {low_hu:g}..{high_hu:g} do not look like CT Hounsfield units (MR or unscaled?); "
                "the segmentation is probably wrong")
    return None


def volume_warning(liver_ml: float) -> str | None:
    low, high = PLAUSIBLE_LIVER_ML
    if liver_ml == 0:
        return "no liver found: is the liver in the scan?"
    if not low <= liver_ml <= high:
        return f"liver volume {liver_ml:.0f} mL is outside the usual {low:.0f}–{high:.0f} mL: check the segmentation"
    return None


def edge_warning(label_canonical: np.ndarray) -> str | None:
    """The liver reaching the first or last slice, or the side of the field of view, continues outside the
    scan: its volume is understated. ``label_canonical``: (slices, rows, columns), axial slices."""
    liver = label_canonical >= LIVER
    if not liver.any():
        return None
    edges = []
    if liver[0].any() or liver[-1].any():
        edges.append("the first or last slice")
    if liver[:, 0, :].any() or liver[:, -1, :].any() or liver[:, :, 0].any() or liver[:, :, -1].any():
        edges.append("the edge of the field of view")
    if edges:
        return f"the liver reaches {' and '.join(edges)}: part of it may lie outside the scan, so its volume is understated"
    return None


def qc_warnings(low_hu: float, high_hu: float, liver_ml: float, label_canonical: np.ndarray) -> list[str]:
    """Every plausibility warning of a run, in the order a reader should see them."""
    found = (intensity_warning(low_hu, high_hu), volume_warning(liver_ml), edge_warning(label_canonical))
    return [warning for warning in found if warning]
