"""Clean-up a radiologist expects: one liver, no holes, lesions only inside the liver."""

from __future__ import annotations

import numpy as np
import SimpleITK as sitk
from scipy import ndimage

from .geometry import bounding_box

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
