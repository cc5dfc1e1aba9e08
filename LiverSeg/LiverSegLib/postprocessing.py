"""Clean-up a radiologist expects: one liver, no holes, lesions only inside the liver."""

from __future__ import annotations

import importlib.util
import math

import numpy as np
import SimpleITK as sitk
from scipy import ndimage

from .dependencies import GRAPH_CUT_INSTALL_HINT
from .errors import LiverSegInputError
from .geometry import Box, bounding_box, grow_box

LIVER, LESION = 1, 2


def label_components(mask: np.ndarray, fully_connected: bool) -> tuple[np.ndarray, int]:
    """Connected components of a 3D mask, 26-connected (``fully_connected``) or 6-connected: the same
    partition as ``ndimage.label`` with the matching structure, but by ITK's multi-threaded filter
    (faster than scipy's single-threaded labelling even on 2 cores: benchmarks/README.md)."""
    labels = sitk.GetArrayFromImage(sitk.ConnectedComponent(sitk.GetImageFromArray(mask.astype(np.uint8)), fully_connected))
    return labels, int(labels.max()) if labels.size else 0


def largest_component(mask: np.ndarray) -> np.ndarray:
    """Keep the largest 26-connected component: stray islands in spleen or heart are false positives."""
    labels, count = label_components(mask, fully_connected=True)
    if count <= 1:
        return mask.astype(bool)
    sizes = np.bincount(labels.ravel())
    sizes[0] = 0
    return labels == int(sizes.argmax())


def _fill_enclosed(mask: np.ndarray, background: np.ndarray, count: int, border_axes: tuple[int, ...]) -> np.ndarray:
    """``mask`` plus every component of ``background`` (the labelled complement of ``mask``, ``count``
    components) that touches no border along ``border_axes``: what ``ndimage.binary_fill_holes``
    computes, with one labelling pass instead of an iterative propagation (faster on a CT's liver box:
    benchmarks/README.md)."""
    reaches_border = np.zeros(count + 1, bool)
    for axis in border_axes:
        reaches_border[np.take(background, [0, -1], axis=axis)] = True
    reaches_border[0] = False  # label 0 is the mask itself
    return ~reaches_border[background]


def fill_holes(mask: np.ndarray) -> np.ndarray:
    """Fill enclosed holes in 3D and slice by slice (vessels at the hilum open a hole to the outside in 3D only)."""
    mask = mask.astype(bool)
    filled = _fill_enclosed(mask, *label_components(~mask, fully_connected=False), (0, 1, 2))
    in_slice = np.zeros((3, 3, 3), bool)
    in_slice[1] = ndimage.generate_binary_structure(2, 1)  # all slices at once, none connected to the next
    return _fill_enclosed(filled, *ndimage.label(~filled, structure=in_slice), (1, 2))


def require_graph_cut() -> None:
    """Refuse, in one line that says what to install, a card's graph cut where Numba (the ``graphcut``
    extra) is missing: the engine asks when it loads such a card, before a minute of inference."""
    try:
        found = importlib.util.find_spec("numba") is not None
    except ImportError:  # a finder that refuses it
        found = False
    if not found:
        raise LiverSegInputError(f"this model's graph cut needs numba, which is not installed: {GRAPH_CUT_INSTALL_HINT}")


def graph_cut_solver():
    """The ``mincut`` module, imported: Numba's import and the compiled solver's load from its cache take
    about 1 s on 2 cores, once a process (loading it in a thread while the networks ran saved nothing there)."""
    try:
        from . import mincut
    except ImportError as error:  # installed but broken
        raise LiverSegInputError(f"this model's graph cut needs numba, which does not import ({error}): {GRAPH_CUT_INSTALL_HINT}") from error
    return mincut


CUT_REACH_MM = 10.0  # how far beyond the network's organ a graph cut may add organ
CUT_COST_SCALE = 100.0  # costs in nats → the integer capacities of the max-flow (a hundredth of a nat)
CUT_PROBABILITY_FLOOR = 1e-4


def cut_organ(
    organ_probability: np.ndarray, ct_hu: np.ndarray, spacing_mm: tuple[float, float, float], smoothness: float, contrast_hu: float,
    network_organ: np.ndarray | None = None, free: np.ndarray | None = None,
) -> np.ndarray:
    """The organ (bool, same shape) as the exact minimum cut (``mincut.padded_min_cut`` of ``mincut.ct_graph``)
    of a 3-D graph (Boykov and Jolly 2001) over a (Z, rows, cols) probability map and the CT on the same grid
    (HU): each voxel pays −log p to be organ and −log(1 − p) to be background; each pair of 6-neighbours on
    either side of the boundary pays ``smoothness`` · exp(−ΔHU² / 2 ``contrast_hu``²) / their distance in mm.

    Why: the network judges each pixel from a low-resolution view and runs the liver into neighbours of the
    same grey (pancreas, duodenum, a mass beside the right lobe) through voxels it is unsure of; the cut
    draws the boundary where the CT has an edge and drops what is joined to the organ through no edge
    (LiverSegTraining/RESULTS.md, "A graph cut of the liver"). Solved inside the box of the network's organ
    grown by ``CUT_REACH_MM`` (nothing farther becomes organ). A cut that keeps less than half of the
    network's organ (too strong a ``smoothness``) is refused: the network's organ is returned.

    ``network_organ``: the network's own organ (default p ≥ 0.5; a card's thresholds may differ): the side
    each voxel takes when no boundary costs anything. ``free``: where the cut may decide (default
    everywhere); elsewhere each voxel keeps the network's side and pulls its free neighbours to that side
    by their boundary's cost: the exact cut with the others fixed, solved in the box of the free voxels, where
    a fixed voxel is a node with no arc and no terminal (a cascade's stage 2 inside its gate, outside which it
    keeps no organ)."""
    mincut = graph_cut_solver()
    if network_organ is None:
        network_organ = organ_probability >= 0.5
    if not network_organ.any():
        return network_organ
    reach = tuple(math.ceil(CUT_REACH_MM / step) for step in spacing_mm)
    box = grow_box(bounding_box(network_organ), reach, organ_probability.shape)
    if free is not None:  # the free voxels' box and their fixed neighbours: the rest cannot change the cut
        if not free[box].any():
            return network_organ
        inner = grow_box(bounding_box(free[box]), (1, 1, 1), free[box].shape)
        box = tuple(slice(outer.start + part.start, outer.start + part.stop) for outer, part in zip(box, inner))
    sure = network_organ[box]
    is_free = None if free is None else free[box]
    # Of a voxel's two costs only their difference log(p / (1 − p)) counts: one net terminal capacity a voxel
    # (> 0 from the source, the organ), of at least one unit towards the network's own side, so that a cut with
    # no boundary cost is the network's organ (mincut.ct_graph).
    graph = mincut.ct_graph(organ_probability[box], ct_hu[box], sure, is_free, spacing_mm, smoothness, contrast_hu, CUT_COST_SCALE, CUT_PROBABILITY_FLOOR)
    organ_side = mincut.padded_min_cut(*graph)
    organ = network_organ.copy()
    organ[box] = organ_side if is_free is None else np.where(is_free, organ_side, sure)
    if np.count_nonzero(organ) < 0.5 * np.count_nonzero(network_organ):
        return network_organ
    return organ


def drop_small_lesions(label_map: np.ndarray, min_lesion_ml: float, voxel_ml: float) -> None:
    """Relabel as liver, in place, every lesion component (26-connected: the lesion count's connectivity)
    smaller than ``min_lesion_ml``: a speck of a few voxels is more often noise than a metastasis, and on
    a healthy liver each one is a false lesion. 0 keeps every lesion."""
    lesion = label_map == LESION
    if min_lesion_ml <= 0 or not lesion.any():
        return
    box = bounding_box(lesion)
    components, _ = label_components(lesion[box], fully_connected=True)
    small = np.bincount(components.ravel()) * voxel_ml < min_lesion_ml
    small[0] = False  # background
    label_map[box][small[components]] = LIVER


def distance_to_outside_mm(mask: np.ndarray, spacing_mm: tuple[float, float, float]) -> np.ndarray:
    """Euclidean distance in mm from each voxel of ``mask`` to the nearest voxel outside it (0 outside), as
    ``ndimage.distance_transform_edt(mask, sampling=spacing_mm)`` gives it where the mask does not reach the
    array's edge, by ITK's multi-threaded Maurer transform: seven times faster on a liver's box on 2 cores.
    The outside is the object: its boundary voxels are the outside voxels next to the mask."""
    outside = sitk.GetImageFromArray((~mask.astype(bool)).astype(np.uint8))
    outside.SetSpacing([float(step) for step in reversed(spacing_mm)])
    distance = sitk.SignedMaurerDistanceMap(outside, insideIsPositive=False, squaredDistance=False, useImageSpacing=True)
    return np.maximum(sitk.GetArrayFromImage(distance), 0.0)


def darker_than_liver(ct_hu: np.ndarray, liver: np.ndarray, spacing_mm: tuple[float, float, float], sigma_mm: float, erode_mm: float, k_mad: float) -> np.ndarray:
    """Where the CT, smoothed by a Gaussian of ``sigma_mm``, is darker than the liver's median by more than
    ``k_mad`` robust standard deviations (1.4826 × the median absolute deviation, both over the smoothed
    liver), farther inside the liver than ``erode_mm`` from its edge.

    Metastases, cysts and most primary tumours are hypodense in the portal-venous phase; the vessels,
    bright in that phase, are not taken, and the rim of partial volume with fat is left out by the erosion.
    The statistics are the patient's own, so no lesion has to be learnt: with two or three lesion patients
    to learn from, a network finds few. ``ct_hu`` and ``liver`` share a grid (axes in ``spacing_mm``'s
    order); the smoothing sees ``ct_hu`` to its edges, so a caller that wants the whole CT's result gives
    it a margin of 4 σ around the liver (``mark_darker_lesions``)."""
    liver = liver.astype(bool)
    if not liver.any():
        return liver
    smoothed = ndimage.gaussian_filter(ct_hu.astype(np.float32), sigma=[sigma_mm / step for step in spacing_mm])
    values = smoothed[liver]
    median = float(np.median(values))
    spread = 1.4826 * float(np.median(np.abs(values - median)))
    interior = liver
    if erode_mm > 0:
        interior = distance_to_outside_mm(liver, spacing_mm) > erode_mm
    return interior & liver & (smoothed < median - k_mad * spread)


def mark_darker_lesions(
    label_map: np.ndarray, box: Box, ct_canonical: np.ndarray, spacing_mm: tuple[float, float, float], rule: dict[str, float],
    min_lesion_ml: float, voxel_ml: float,
) -> None:
    """Lesions of ``label_map`` (the canonical volume's ``box``), in place, by a card's ``lesion_rule``: any
    lesion it holds becomes liver, the liver's darker part (``darker_than_liver``) becomes lesion, and lesions
    smaller than ``min_lesion_ml`` liver again. The CT is read with 4 σ around the box (the reach of
    ``gaussian_filter``'s kernel), so the smoothing inside the box is the whole CT's."""
    margins = tuple(int(np.ceil(4 * rule["sigma_mm"] / step)) + 1 for step in spacing_mm)
    padded = grow_box(box, margins, ct_canonical.shape)
    inner = tuple(slice(b.start - p.start, b.stop - p.start) for b, p in zip(box, padded))
    liver = np.zeros(tuple(p.stop - p.start for p in padded), bool)
    liver[inner] = label_map >= LIVER
    darker = darker_than_liver(ct_canonical[padded], liver, spacing_mm, **rule)[inner]
    label_map[label_map == LESION] = LIVER
    label_map[darker] = LESION
    drop_small_lesions(label_map, min_lesion_ml, voxel_ml)


def compose_label_map(
    liver: np.ndarray,
    lesion: np.ndarray | None,
    keep_largest: bool = True,
    fill: bool = True,
    min_lesion_ml: float = 0.0,
    voxel_ml: float = 0.0,
) -> np.ndarray:
    """Liver and lesion masks (canonical grid) → uint8 label map 0/1/2 with lesions inside the liver.

    Lesions count as liver for the largest-component and hole-filling steps (a tumour is part of the
    organ), then are cut to the cleaned liver; lesions smaller than ``min_lesion_ml`` (voxels of
    ``voxel_ml``) then become liver (``drop_small_lesions``). The work is done inside the organ's bounding box (with a
    one-voxel margin, so filling and connectivity are the same as on the whole volume), which is a
    fraction of a 512² CT, and the holes are filled inside the kept component's own box (the same holes:
    each lies inside it). Any box that holds the organ gives the same result (the pipeline passes one).
    """
    organ = liver | lesion if lesion is not None else liver.copy()
    box = bounding_box(organ)
    cropped = organ[box]
    if keep_largest:
        cropped = largest_component(cropped)
    if fill:  # holes lie inside the kept organ's own box, smaller than the first when islands were removed
        kept = bounding_box(cropped)
        cropped[kept] = fill_holes(cropped[kept])
    label_map = np.zeros(organ.shape, np.uint8)
    label_map[box] = cropped
    if lesion is not None:
        label_map[lesion & (label_map == LIVER)] = LESION
        drop_small_lesions(label_map, min_lesion_ml, voxel_ml)
    return label_map


def lesion_volumes_ml(label_map: np.ndarray, voxel_ml: float) -> list[float]:
    """Volume of each 26-connected lesion. Lesions lie inside the liver, so they are labelled in the
    liver's box rather than the whole CT (much less work: benchmarks/README.md)."""
    in_liver = label_map[bounding_box(label_map >= LIVER)]
    components, _ = label_components(in_liver == LESION, fully_connected=True)
    return [float(n) * voxel_ml for n in np.bincount(components.ravel())[1:]]
