"""The one preprocessing of the project, shared by training and inference.

A canonical (S, P, L) CT in HU becomes a stack of windowed axial slices on the model's square grid:
clip to the intensity window, scale to [0, 1], pad each slice to a square (air), resize with
anti-aliasing. Training caches exactly this output; inference feeds it to the network and maps the
probabilities back with ``to_slice_grid``, the exact inverse of the pad-and-resize.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F


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


def window_hu(ct_hu: torch.Tensor, window_hu: tuple[float, float]) -> torch.Tensor:
    """Clip to the window and scale to [0, 1]; values outside the window carry no liver contrast."""
    low, high = window_hu
    return ((ct_hu.float() - low) / (high - low)).clamp_(0.0, 1.0)


def to_model_grid(slices: torch.Tensor, input_size: int, pad_value: float = 0.0) -> torch.Tensor:
    """(Z, C?, rows, cols) → (Z, C?, input_size, input_size): pad to a square, then resize."""
    squeeze = slices.dim() == 3
    batch = slices.unsqueeze(1) if squeeze else slices
    grid = SliceGrid(batch.shape[-2], batch.shape[-1])
    top, left = grid.offset
    padded = F.pad(
        batch.float(),
        (left, grid.side - grid.cols - left, top, grid.side - grid.rows - top),
        value=pad_value,
    )
    if grid.side != input_size:
        padded = F.interpolate(padded, size=(input_size, input_size), mode="bilinear", antialias=True, align_corners=False)
    return padded[:, 0] if squeeze else padded


def to_slice_grid(model_grid: torch.Tensor, grid: SliceGrid) -> torch.Tensor:
    """Inverse of ``to_model_grid`` for (B, C, n, n) maps: resize to the padded square, crop the slice."""
    resized = model_grid
    if model_grid.shape[-1] != grid.side:
        resized = F.interpolate(model_grid, size=(grid.side, grid.side), mode="bilinear", align_corners=False)
    top, left = grid.offset
    return resized[..., top : top + grid.rows, left : left + grid.cols]


def prepare_volume(
    ct_canonical_hu: np.ndarray, window: tuple[float, float], input_size: int, chunk_slices: int = 32
) -> torch.Tensor:
    """Canonical CT (Z, rows, cols) in HU → (Z, input_size, input_size) float32 in [0, 1].

    Slice by slice in chunks: every step is per slice, so the result is the same as on the whole volume,
    but the full-resolution float copies (three of them, 300 MB each for 300 slices of 512²) never exist.
    """
    depth = ct_canonical_hu.shape[0]
    volume = torch.empty((depth, input_size, input_size), dtype=torch.float32)
    for start in range(0, depth, chunk_slices):
        chunk = torch.from_numpy(np.array(ct_canonical_hu[start : start + chunk_slices], dtype=np.float32, order="C"))
        volume[start : start + len(chunk)] = to_model_grid(window_hu(chunk, window), input_size)
    return volume


def prepare_label(label_canonical: np.ndarray, input_size: int) -> torch.Tensor:
    """Label map (Z, rows, cols) with 0/1/2 → (Z, 2, n, n) uint8 masks: liver (incl. lesion), lesion.

    Masks are area-averaged onto the model grid and thresholded at one half, so a structure keeps its
    size at the lower resolution instead of being eroded or dilated by nearest-neighbour picking.
    """
    label = torch.from_numpy(np.array(label_canonical, order="C"))
    masks = torch.stack([label >= 1, label == 2], dim=1).float()
    return (to_model_grid(masks, input_size) >= 0.5).to(torch.uint8)


def slice_stack(volume: torch.Tensor, indices: torch.Tensor, context_slices: int) -> torch.Tensor:
    """(Z, n, n) volume → (B, 2·context+1, n, n): each slice with its neighbours (2.5D input).

    Neighbours beyond the first/last slice repeat the edge slice.
    """
    offsets = torch.arange(-context_slices, context_slices + 1, device=indices.device)
    neighbour_indices = (indices[:, None] + offsets[None, :]).clamp_(0, volume.shape[0] - 1)
    return volume[neighbour_indices]
