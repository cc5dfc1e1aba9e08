"""Clean-up a radiologist expects: one liver, no holes, lesions only inside the liver."""

from __future__ import annotations

import numpy as np
from scipy import ndimage

LIVER, LESION = 1, 2


def largest_component(mask: np.ndarray) -> np.ndarray:
    """Keep the largest 26-connected component: stray islands in spleen or heart are false positives."""
    labels, count = ndimage.label(mask, structure=np.ones((3, 3, 3), bool))
    if count <= 1:
        return mask.astype(bool)
    sizes = np.bincount(labels.ravel())
    sizes[0] = 0
    return labels == int(sizes.argmax())


def _fill_enclosed(mask: np.ndarray, structure: np.ndarray, border_axes: tuple[int, ...]) -> np.ndarray:
    """``mask`` plus every background component (connected by ``structure``) that touches no border
    along ``border_axes``: what ``ndimage.binary_fill_holes`` computes, with one labelling pass
    instead of an iterative propagation (a third of the time on a CT's liver box)."""
    background, count = ndimage.label(~mask, structure=structure)
    reaches_border = np.zeros(count + 1, bool)
    for axis in border_axes:
        reaches_border[np.take(background, [0, -1], axis=axis)] = True
    reaches_border[0] = False  # label 0 is the mask itself
    return ~reaches_border[background]


def fill_holes(mask: np.ndarray) -> np.ndarray:
    """Fill enclosed holes in 3D and slice by slice (vessels at the hilum open a hole to the outside in 3D only)."""
    filled = _fill_enclosed(mask.astype(bool), ndimage.generate_binary_structure(3, 1), (0, 1, 2))
    in_slice = np.zeros((3, 3, 3), bool)
    in_slice[1] = ndimage.generate_binary_structure(2, 1)  # all slices at once, none connected to the next
    return _fill_enclosed(filled, in_slice, (1, 2))


def bounding_box(mask: np.ndarray, margin: int = 1) -> tuple[slice, ...]:
    """The smallest box holding every True voxel, grown by ``margin`` (empty mask: the whole array)."""
    if not mask.any():
        return tuple(slice(0, n) for n in mask.shape)
    box = []
    for axis in range(mask.ndim):
        present = np.flatnonzero(mask.any(axis=tuple(a for a in range(mask.ndim) if a != axis)))
        box.append(slice(max(int(present[0]) - margin, 0), min(int(present[-1]) + 1 + margin, mask.shape[axis])))
    return tuple(box)


def compose_label_map(
    liver: np.ndarray, lesion: np.ndarray | None, keep_largest: bool = True, fill: bool = True
) -> np.ndarray:
    """Liver and lesion masks (canonical grid) → uint8 label map 0/1/2 with lesions inside the liver.

    Lesions count as liver for the largest-component and hole-filling steps (a tumour is part of the
    organ), then are cut to the cleaned liver. The work is done inside the organ's bounding box (with a
    one-voxel margin, so filling and connectivity are the same as on the whole volume), which is a
    fraction of a 512² CT.
    """
    organ = liver | lesion if lesion is not None else liver.copy()
    box = bounding_box(organ)
    cropped = organ[box]
    if keep_largest:
        cropped = largest_component(cropped)
    if fill:
        cropped = fill_holes(cropped)
    label_map = np.zeros(organ.shape, np.uint8)
    label_map[box] = cropped
    if lesion is not None:
        label_map[lesion & (label_map == LIVER)] = LESION
    return label_map


def lesion_volumes_ml(label_map: np.ndarray, voxel_ml: float) -> list[float]:
    """Volume of each 26-connected lesion. Lesions lie inside the liver, so they are labelled in the
    liver's box rather than the whole CT (1 s saved on a 512²×129 CT)."""
    in_liver = label_map[bounding_box(label_map >= LIVER)]
    components, _ = ndimage.label(in_liver == LESION, structure=np.ones((3, 3, 3), bool))
    return [float(n) * voxel_ml for n in np.bincount(components.ravel())[1:]]
