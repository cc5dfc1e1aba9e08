"""Running the network over the axial slices: device choice, batching, mixed precision, OOM recovery."""

from __future__ import annotations

import logging
import warnings
from typing import Callable

import torch

from .model import ModelCard
from .options import DEVICES
from .preprocessing import SliceGrid, slice_stack, to_slice_grid

log = logging.getLogger(__name__)
ProgressCallback = Callable[[int, int], None]


def choose_device(requested: str = "auto") -> torch.device:
    """CUDA, then MPS, then CPU; an explicit request that the machine cannot honour is an error."""
    from .errors import LiverSegInputError

    if requested not in DEVICES:
        raise LiverSegInputError(f"unknown device '{requested}', choose one of {', '.join(DEVICES)}")
    cuda_ok = torch.cuda.is_available()
    mps_ok = getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available()
    if requested == "auto":
        return torch.device("cuda" if cuda_ok else "mps" if mps_ok else "cpu")
    if requested == "cuda" and not cuda_ok:
        raise LiverSegInputError("--device cuda was asked for but no CUDA GPU is available (torch sees none)")
    if requested == "mps" and not mps_ok:
        raise LiverSegInputError("--device mps was asked for but Apple MPS is not available")
    return torch.device(requested)


CUDA_MAX_BATCH = 64


def default_batch_size(device: torch.device, card: ModelCard) -> int:
    """Slices per batch: 16 on the CPU; on CUDA at most 64, fewer when half the free GPU memory cannot
    hold them at a conservative 6 MB per 128² slice (out-of-memory still halves the batch).

    64 is the fastest batch measured on an H100, for the 192-px and the 128-px model alike, and the GPU
    memory it takes there is small (benchmarks/README.md).
    """
    if device.type != "cuda":
        return 16
    free_bytes, _ = torch.cuda.mem_get_info(device)
    per_slice_bytes = 6e6 * (card.input_size / 128) ** 2
    return int(max(1, min(CUDA_MAX_BATCH, 0.5 * free_bytes // per_slice_bytes)))


def _forward(network: torch.nn.Module, batch: torch.Tensor, device: torch.device) -> torch.Tensor:
    batch = batch.contiguous(memory_format=torch.channels_last)
    if device.type == "cuda":
        with torch.autocast("cuda", dtype=torch.float16):
            return torch.sigmoid(network(batch).float())
    return torch.sigmoid(network(batch))


def predict_probabilities(
    network: torch.nn.Module,
    volume: torch.Tensor,
    card: ModelCard,
    device: torch.device,
    batch_size: int | None = None,
    progress: ProgressCallback | None = None,
) -> tuple[torch.Tensor, torch.device]:
    """Sigmoid probabilities (Z, channels, n, n) on the model grid, float32 on the CPU.

    CUDA out-of-memory halves the batch and retries; at batch 1 it falls back to the CPU with a
    warning. Returns the device that actually did the work.
    """
    batch_size = batch_size or default_batch_size(device, card)
    total = volume.shape[0]
    network = network.eval()
    volume_on_device: torch.Tensor | None = None  # moved inside the loop: the move itself can run out of memory
    output = torch.empty((total, len(card.channels), volume.shape[1], volume.shape[2]), dtype=torch.float32)
    start = 0
    with torch.inference_mode():
        while start < total:
            try:
                if volume_on_device is None:
                    # Channels-last (NHWC) convolutions: faster than NCHW on the CPU (benchmarks/README.md),
                    # and the layout tensor cores want under autocast. Converted
                    # outside inference mode: parameters made inside it could not be trained any more
                    # (validation runs this on the network being trained).
                    with torch.inference_mode(False):
                        network = network.to(device, memory_format=torch.channels_last)
                    volume_on_device = volume.to(device)
                indices = torch.arange(start, min(start + batch_size, total), device=device)
                probabilities = _forward(network, slice_stack(volume_on_device, indices, card.context_slices), device)
            except torch.cuda.OutOfMemoryError:
                torch.cuda.empty_cache()
                if batch_size > 1 and volume_on_device is not None:
                    batch_size //= 2
                    log.warning("CUDA out of memory: retrying with batch size %d", batch_size)
                    continue
                where = "even at batch size 1" if volume_on_device is not None else "moving the model and volume to the GPU"
                warnings.warn(f"CUDA out of memory {where}: falling back to the CPU", RuntimeWarning)
                device, volume_on_device = torch.device("cpu"), None
                batch_size = default_batch_size(device, card)
                continue
            output[start : start + len(indices)] = probabilities.float().cpu()
            start += len(indices)
            if progress is not None:
                progress(start, total)
    return output, device


def probabilities_to_masks(
    probabilities: torch.Tensor, grid: SliceGrid, threshold: float, chunk_slices: int = 16
) -> torch.Tensor:
    """(Z, channels, n, n) model-grid probabilities → (Z, channels, rows, cols) bool masks on the slice grid.

    Works in chunks so that full-resolution float maps never exist for the whole volume at once, and
    only on slices where some probability reaches the threshold: bilinear upsampling is a convex
    combination, so a slice below it everywhere stays empty (a third or more of a CT's slices).
    """
    masks = torch.zeros((probabilities.shape[0], probabilities.shape[1], grid.rows, grid.cols), dtype=torch.bool)
    occupied = torch.nonzero(probabilities.amax(dim=(1, 2, 3)) >= threshold).flatten()
    for start in range(0, len(occupied), chunk_slices):
        indices = occupied[start : start + chunk_slices]
        masks[indices] = to_slice_grid(probabilities[indices], grid) >= threshold
    return masks
