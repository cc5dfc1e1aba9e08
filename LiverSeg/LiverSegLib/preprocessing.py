"""The one preprocessing of the project, shared by training and inference, in numpy (no torch).

A canonical (S, P, L) CT in HU becomes a stack of windowed axial slices on the model's square grid:
clip to the intensity window, scale to [0, 1], pad each slice to a square (air), resize with
anti-aliasing. Training caches exactly this output; inference feeds it to the network and maps the
probabilities back with ``to_slice_grid``, the exact inverse of the pad-and-resize.

Resizing is separable, so each axis is one small matrix (``resize_weights``): a slice is resized by two
matrix products. The weights are those of torch's ``F.interpolate(mode="bilinear", align_corners=False)``,
with and without ``antialias`` (the tests compare both to torch on real CT), so the bundled model, trained
with torch's resizing, sees the same input; the CPU engine then runs without torch.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import lru_cache
from typing import Callable

import numpy as np

from .geometry import Box, bounding_box, grow_box


@dataclass(frozen=True)
class SliceGrid:
    """Where an original (rows, cols) slice sits inside the padded square that is resized."""

    rows: int
    cols: int

    @property
    def side(self) -> int:
        return max(self.rows, self.cols)

    @property
    def offset(self) -> tuple[int, int]:
        return (self.side - self.rows) // 2, (self.side - self.cols) // 2


@lru_cache(maxsize=32)
def resize_weights(in_size: int, out_size: int, antialias: bool) -> np.ndarray:
    """(out_size, in_size) float32 matrix of 1-D bilinear resampling, half-pixel centres (align_corners=False).

    With ``antialias`` the triangle filter is stretched by the scale when shrinking (as in PIL and torch's
    antialiased bilinear): every input pixel contributes, so thin structures are averaged, not skipped.
    Without it, plain bilinear interpolation between the two nearest pixels (edges clamped).
    """
    scale = in_size / out_size
    weights = np.zeros((out_size, in_size), np.float64)
    if antialias:
        support = scale if scale >= 1.0 else 1.0
        inverse_scale = 1.0 / scale if scale >= 1.0 else 1.0
        for i in range(out_size):
            centre = scale * (i + 0.5)
            first = max(int(centre - support + 0.5), 0)
            last = min(int(centre + support + 0.5), in_size)
            taps = np.arange(first, last)
            triangle = np.clip(1.0 - np.abs((taps - centre + 0.5) * inverse_scale), 0.0, None)
            weights[i, first:last] = triangle / triangle.sum()
    else:
        source = np.maximum(scale * (np.arange(out_size) + 0.5) - 0.5, 0.0)
        lower = np.minimum(source.astype(np.int64), in_size - 1)
        upper = np.minimum(lower + 1, in_size - 1)
        fraction = source - lower
        rows = np.arange(out_size)
        np.add.at(weights, (rows, lower), 1.0 - fraction)
        np.add.at(weights, (rows, upper), fraction)
    return weights.astype(np.float32)


def _separable(slices: np.ndarray, row_weights: np.ndarray, col_weights: np.ndarray) -> np.ndarray:
    """row_weights @ slice @ col_weightsᵀ for every 2-D slice of (..., rows, cols), as two large matrix
    products (numpy's stacked matmul would loop over the slices without BLAS)."""
    *lead, rows, cols = slices.shape
    count = int(np.prod(lead, dtype=np.int64))
    along_cols = np.asarray(slices, dtype=np.float32).reshape(count * rows, cols) @ col_weights.T  # (count·rows, cols_out)
    cols_out = col_weights.shape[0]
    by_rows = along_cols.reshape(count, rows, cols_out).transpose(1, 0, 2).reshape(rows, count * cols_out)
    resized = row_weights @ by_rows  # (rows_out, count·cols_out)
    return np.ascontiguousarray(resized.reshape(row_weights.shape[0], count, cols_out).transpose(1, 0, 2)).reshape(*lead, row_weights.shape[0], cols_out)


def resize_slices(slices: np.ndarray, rows_out: int, cols_out: int, antialias: bool) -> np.ndarray:
    """(..., rows, cols) float32 → (..., rows_out, cols_out), each 2-D slice resized on its own."""
    return _separable(slices, resize_weights(slices.shape[-2], rows_out, antialias), resize_weights(slices.shape[-1], cols_out, antialias))


def window_hu(ct_hu: np.ndarray, window_hu: tuple[float, float]) -> np.ndarray:
    """Clip to the window and scale to [0, 1]; values outside the window carry no liver contrast."""
    low, high = window_hu
    scaled = (np.asarray(ct_hu, dtype=np.float32) - np.float32(low)) / np.float32(high - low)
    return np.clip(scaled, 0.0, 1.0, out=scaled)


def to_model_grid(slices: np.ndarray, input_size: int, pad_value: float = 0.0) -> np.ndarray:
    """(..., rows, cols) → (..., input_size, input_size) float32: pad to a square, then resize (antialiased)."""
    grid = SliceGrid(slices.shape[-2], slices.shape[-1])
    top, left = grid.offset
    padding = [(0, 0)] * (slices.ndim - 2) + [(top, grid.side - grid.rows - top), (left, grid.side - grid.cols - left)]
    padded = np.pad(np.asarray(slices, dtype=np.float32), padding, constant_values=pad_value)
    if grid.side == input_size:
        return padded
    return resize_slices(padded, input_size, input_size, antialias=True)


def slice_grid_weights(size: int, grid: SliceGrid) -> tuple[np.ndarray, np.ndarray]:
    """The (rows, size) and (cols, size) matrices of ``to_slice_grid`` for (..., size, size) maps: the
    resize to the padded square, cropped to the slice (an identity crop when no resize is needed)."""
    top, left = grid.offset
    square = np.eye(size, dtype=np.float32) if size == grid.side else resize_weights(size, grid.side, False)
    return square[top : top + grid.rows], square[left : left + grid.cols]


def to_slice_grid(model_grid: np.ndarray, grid: SliceGrid, rows: slice = slice(None), cols: slice = slice(None)) -> np.ndarray:
    """Inverse of ``to_model_grid`` for (..., n, n) maps: resize to the padded square, crop the slice.

    Only the rows and columns of the slice are computed (the crop is taken from the resize matrices), or
    only ``rows`` × ``cols`` of it: the same values as that part of the whole slice."""
    top, left = grid.offset
    model_grid = np.asarray(model_grid, dtype=np.float32)
    if model_grid.shape[-1] == grid.side:
        return model_grid[..., top : top + grid.rows, left : left + grid.cols][..., rows, cols]
    row_weights, col_weights = slice_grid_weights(model_grid.shape[-1], grid)
    return _separable(model_grid, row_weights[rows], col_weights[cols])


def volume_to_model_grid(
    volume: np.ndarray, input_size: int, pad_value: float = 0.0, per_chunk: Callable[[np.ndarray], np.ndarray] | None = None,
    chunk_slices: int = 32,
) -> np.ndarray:
    """(Z, rows, cols) → (Z, input_size, input_size) float32 (``to_model_grid``), ``per_chunk`` (a HU window)
    applied to each chunk of slices first.

    Slice by slice in chunks: every step is per slice, so the result is the same as on the whole volume (up
    to a float32 rounding step: a BLAS may sum a smaller matrix product in another order), but the
    full-resolution float copies (300 MB each for 300 slices of 512²) never exist at once.
    """
    depth = volume.shape[0]
    resized = np.empty((depth, input_size, input_size), dtype=np.float32)
    for start in range(0, depth, chunk_slices):
        chunk = volume[start : start + chunk_slices]
        resized[start : start + len(chunk)] = to_model_grid(per_chunk(chunk) if per_chunk else chunk, input_size, pad_value)
    return resized


def prepare_volume(
    ct_canonical_hu: np.ndarray, window: tuple[float, float], input_size: int, chunk_slices: int = 32
) -> np.ndarray:
    """Canonical CT (Z, rows, cols) in HU → (Z, input_size, input_size) float32 in [0, 1]: the network's input,
    for training and inference alike."""
    return volume_to_model_grid(ct_canonical_hu, input_size, per_chunk=lambda chunk: window_hu(chunk, window), chunk_slices=chunk_slices)


CROP_MARGIN_SLICES = 3  # slices a cascade's stage 2 sees beyond the liver's first and last (training and inference)


def liver_crop(liver_box: Box, shape: tuple[int, int, int], spacing_mm: tuple[float, float, float], margin_mm: float) -> Box:
    """The part of a canonical (Z, rows, cols) volume that a cascade's stage 2 sees: the liver's box grown
    by ``margin_mm`` in the slice plane (at least a voxel) and by ``CROP_MARGIN_SLICES`` along z, inside the
    volume. Training takes ``liver_box`` from the label, inference from stage 1: the same crop either way.

    The margin keeps what the liver's boundary is judged against (ribs, kidney, stomach) in view and absorbs
    the difference between stage 1's box and the liver's."""
    margins = (CROP_MARGIN_SLICES, *(max(1, math.ceil(margin_mm / spacing)) for spacing in spacing_mm[1:]))
    return grow_box(liver_box, margins, shape)


def label_crop(label_canonical: np.ndarray, spacing_mm: tuple[float, float, float], margin_mm: float) -> Box:
    """The crop stage 2 trains and is calibrated on: ``liver_crop``'s rows and columns around a label map's
    liver (0/1/2), on every slice of the scan. At inference stage 1's box reaches wherever stage 1 saw liver,
    which may be slices above the dome or below the liver's tip: stage 2 is trained on such slices, in the
    same box, so that what it is shown at inference is what it was trained on."""
    rows_cols = liver_crop(bounding_box(np.asarray(label_canonical) >= 1, margin=0), label_canonical.shape, spacing_mm, margin_mm)[1:]
    return (slice(0, label_canonical.shape[0]), *rows_cols)


def prepare_label(label_canonical: np.ndarray, input_size: int) -> np.ndarray:
    """Label map (Z, rows, cols) with 0/1/2 → (Z, 2, n, n) uint8 masks: liver (incl. lesion), lesion.

    Masks are area-averaged onto the model grid and thresholded at one half, so a structure keeps its
    size at the lower resolution instead of being eroded or dilated by nearest-neighbour picking.
    """
    label = np.asarray(label_canonical)
    masks = np.stack([label >= 1, label == 2], axis=1).astype(np.float32)
    return (to_model_grid(masks, input_size) >= 0.5).astype(np.uint8)


def slice_stack(volume, indices, context_slices: int):
    """(Z, n, n) volume → (B, 2·context+1, n, n): each slice with its neighbours (2.5D input).

    Neighbours beyond the first/last slice repeat the edge slice. ``volume`` may be a numpy array or a
    torch tensor (training), ``indices`` any integer sequence.
    """
    offsets = np.arange(-context_slices, context_slices + 1)
    neighbours = np.clip(np.asarray(indices, dtype=np.int64)[:, None] + offsets[None, :], 0, volume.shape[0] - 1)
    return volume[neighbours]
