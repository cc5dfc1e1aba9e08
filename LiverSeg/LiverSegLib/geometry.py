"""Exact axis permutations/flips between a volume's voxel grid and the canonical axial grid.

The network always sees axial slices in one orientation: numpy axes (S, P, L), i.e. slices ordered
inferior→superior, rows anterior→posterior, columns right→left (the radiological display of an
LPS-aligned DICOM axial series). Any input direction — LPS, RAS, flipped, permuted or oblique — is
brought there by permuting and flipping array axes only, never by resampling, so the way back is exact
and the output label map lies voxel for voxel on the input's grid.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class CanonicalTransform:
    """How to turn an (k, j, i)-ordered image array into canonical (S, P, L) order and back.

    ``axes`` is the numpy transpose taking the input array to canonical order; ``flip`` tells, per
    canonical axis, whether it must be reversed after the transpose.
    """

    axes: tuple[int, int, int]
    flip: tuple[bool, bool, bool]

    def to_canonical(self, array_kji: np.ndarray) -> np.ndarray:
        out = np.transpose(array_kji, self.axes)
        flip_axes = tuple(a for a, f in enumerate(self.flip) if f)
        return np.flip(out, flip_axes) if flip_axes else out

    def from_canonical(self, array_spl: np.ndarray) -> np.ndarray:
        flip_axes = tuple(a for a, f in enumerate(self.flip) if f)
        out = np.flip(array_spl, flip_axes) if flip_axes else array_spl
        return np.transpose(out, np.argsort(self.axes))

    def canonical_spacing_mm(self, spacing_ijk_mm: tuple[float, float, float]) -> tuple[float, float, float]:
        """The voxel size along the canonical (S, P, L) axes, from ITK's (i, j, k) spacing."""
        spacing_kji_mm = tuple(reversed(spacing_ijk_mm))
        return tuple(float(spacing_kji_mm[axis]) for axis in self.axes)  # type: ignore[return-value]


Box = tuple[slice, ...]


def bounding_box(mask: np.ndarray, margin: int = 1) -> Box:
    """The smallest box holding every True voxel, grown by ``margin`` (empty mask: the whole array)."""
    if not mask.any():
        return tuple(slice(0, n) for n in mask.shape)
    box = []
    for axis in range(mask.ndim):
        present = np.flatnonzero(mask.any(axis=tuple(a for a in range(mask.ndim) if a != axis)))
        box.append(slice(max(int(present[0]) - margin, 0), min(int(present[-1]) + 1 + margin, mask.shape[axis])))
    return tuple(box)


def grow_box(box: Box, margins: tuple[int, ...], shape: tuple[int, ...]) -> Box:
    """``box`` grown by ``margins`` voxels on both sides of each axis, kept inside an array of ``shape``."""
    return tuple(slice(max(side.start - margin, 0), min(side.stop + margin, size)) for side, margin, size in zip(box, margins, shape))


def canonical_transform(direction: tuple[float, ...] | np.ndarray) -> CanonicalTransform:
    """Pick the permutation/flip that best aligns the index axes with L, P, S (LPS physical frame).

    ``direction`` is the 3×3 ITK direction (columns = physical direction of index axes i, j, k),
    flat row-major as SimpleITK gives it. For oblique volumes the closest axis wins, chosen jointly
    over all six permutations so that two index axes never claim the same physical axis.
    """
    matrix = np.asarray(direction, dtype=float).reshape(3, 3)
    if not np.all(np.isfinite(matrix)) or abs(np.linalg.det(matrix)) < 1e-6:
        raise ValueError("direction matrix is singular or not finite")
    best = max(
        itertools.permutations(range(3)),
        key=lambda perm: sum(abs(matrix[physical, perm[physical]]) for physical in range(3)),
    )
    # best[p] = index axis (0=i, 1=j, 2=k) that runs along physical axis p (0=L, 1=P, 2=S).
    # Canonical numpy order is (S, P, L); a numpy axis of the (k, j, i) array is 2 - index axis.
    axes = tuple(2 - best[physical] for physical in (2, 1, 0))
    flip = tuple(bool(matrix[physical, best[physical]] < 0) for physical in (2, 1, 0))
    return CanonicalTransform(axes=axes, flip=flip)  # type: ignore[arg-type]
