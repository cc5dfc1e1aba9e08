"""Running the network over the axial slices: device choice, batching, mixed precision, OOM recovery.

torch is imported only where the torch runtime runs: on the CPU with ONNX Runtime (``predict_in_batches``)
nothing here needs it, and ``choose_device_name`` tells whether a GPU could be used without importing it
when torch is not installed.
"""

from __future__ import annotations

import logging
import shutil
import sys
import warnings
from pathlib import Path
from typing import Callable, Sequence

import numpy as np

from .dependencies import GPU_INSTALL_HINT, importable
from .errors import LiverSegInputError
from .model import ModelCard
from .options import DEVICES
from .preprocessing import SliceGrid, slice_grid_weights, slice_stack, to_slice_grid

log = logging.getLogger(__name__)
ProgressCallback = Callable[[int, int], None]


def nvidia_gpu_present() -> bool:
    """An NVIDIA driver is installed (what torch with CUDA would need), told without importing torch."""
    return Path("/proc/driver/nvidia/version").exists() or shutil.which("nvidia-smi") is not None


def choose_device_name(requested: str = "auto") -> str:
    """CUDA, then MPS, then CPU; an explicit request that the machine cannot honour is an error. Without
    torch only the CPU (ONNX Runtime) can run: ``auto`` says once how to use a GPU that is there."""
    if requested not in DEVICES:
        raise LiverSegInputError(f"unknown device '{requested}', choose one of {', '.join(DEVICES)}")
    if requested == "cpu" or (requested == "auto" and not nvidia_gpu_present() and sys.platform != "darwin"):
        return "cpu"  # no GPU that torch could use: decided without importing torch (a second of start-up)
    if not importable("torch"):
        if requested in ("cuda", "mps"):
            raise LiverSegInputError(f"--device {requested} needs torch, which is not installed: {GPU_INSTALL_HINT}")
        if requested == "auto" and nvidia_gpu_present():
            warnings.warn(f"an NVIDIA GPU is present but torch is not installed, so LiverSeg runs on the CPU; to use the GPU: {GPU_INSTALL_HINT}")
        return "cpu"
    import torch

    cuda_ok = torch.cuda.is_available()
    mps_ok = getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available()
    if requested == "auto":
        return "cuda" if cuda_ok else "mps" if mps_ok else "cpu"
    if requested == "cuda" and not cuda_ok:
        raise LiverSegInputError("--device cuda was asked for but no CUDA GPU is available (torch sees none)")
    if requested == "mps" and not mps_ok:
        raise LiverSegInputError("--device mps was asked for but Apple MPS is not available")
    return requested


def choose_device(requested: str = "auto"):
    """``choose_device_name`` as a ``torch.device`` (training and the torch runtime)."""
    import torch

    return torch.device(choose_device_name(requested))


CUDA_MAX_BATCH = 64


def default_batch_size(device, card: ModelCard) -> int:
    """Slices per batch: 16 on the CPU; on CUDA at most 64, fewer when half the free GPU memory cannot
    hold them at a conservative 6 MB per 128² slice (out-of-memory still halves the batch).

    64 is the fastest batch measured on an H100, for the 192-px and the 128-px model alike, and the GPU
    memory it takes there is small (benchmarks/README.md).
    """
    import torch

    device = torch.device(device)
    if device.type != "cuda":
        return 16
    free_bytes, _ = torch.cuda.mem_get_info(device)
    per_slice_bytes = 6e6 * (card.input_size / 128) ** 2
    return int(max(1, min(CUDA_MAX_BATCH, 0.5 * free_bytes // per_slice_bytes)))


def _forward(network, batch, device):
    import torch

    batch = batch.contiguous(memory_format=torch.channels_last)
    if device.type == "cuda":
        with torch.autocast("cuda", dtype=torch.float16):
            return torch.sigmoid(network(batch).float())
    return torch.sigmoid(network(batch))


def torch_runner(network, device: str = "cpu") -> Callable[[np.ndarray], np.ndarray]:
    """A torch network as the numpy batch → logits function ``predict_in_batches`` runs (the CPU paths that
    choose slices one batch at a time take either runtime this way)."""
    import torch

    def run(batch: np.ndarray) -> np.ndarray:
        with torch.inference_mode():
            return network(torch.from_numpy(batch).to(device)).float().cpu().numpy()

    return run


def sigmoid(logits: np.ndarray) -> np.ndarray:
    """Overflow-free logistic function in float32."""
    return (0.5 * (1.0 + np.tanh(0.5 * logits))).astype(np.float32, copy=False)


def predict_in_batches(
    run_batch: Callable[[np.ndarray], np.ndarray],
    volume: np.ndarray,
    card: ModelCard,
    batch_size: int = 16,
    progress: ProgressCallback | None = None,
    slices: np.ndarray | None = None,
    output: np.ndarray | None = None,
    done_before: int = 0,
    total_work: int | None = None,
) -> np.ndarray:
    """Sigmoid probabilities (Z, channels, n, n) float32 from a network that maps a (B, C, n, n) float32 batch
    of 2.5D stacks to logits: the torch-free path (ONNX Runtime on the CPU).

    ``slices``: only these slice indices are run (into ``output``, zeros elsewhere when it is new);
    ``done_before`` / ``total_work`` place this call's progress within a larger job."""
    depth = volume.shape[0]
    slices = np.arange(depth) if slices is None else np.asarray(slices, dtype=np.int64)
    if output is None:
        output = np.zeros((depth, len(card.channels), volume.shape[1], volume.shape[2]), dtype=np.float32)
    total_work = len(slices) if total_work is None else total_work
    for start in range(0, len(slices), batch_size):
        indices = slices[start : start + batch_size]
        batch = np.ascontiguousarray(slice_stack(volume, indices, card.context_slices), dtype=np.float32)
        output[indices] = sigmoid(run_batch(batch))
        if progress is not None:
            progress(done_before + start + len(indices), total_work)
    return output


PROBE_STRIDE = 4  # every 4th slice first: about 6 mm apart on a 1.5 mm CT, far less than a liver's height


def probe_slices(depth: int) -> np.ndarray | None:
    """Every ``PROBE_STRIDE``-th slice and the last, which the passes that choose slices run first; None for
    a scan so short that the probes would be half of it or more (it is run whole)."""
    probes = np.unique(np.append(np.arange(0, depth, PROBE_STRIDE), depth - 1))
    return None if len(probes) * 2 >= depth else probes


def predict_near_liver(
    run_batch: Callable[[np.ndarray], np.ndarray],
    volume: np.ndarray,
    card: ModelCard,
    batch_size: int = 16,
    progress: ProgressCallback | None = None,
) -> np.ndarray:
    """``predict_in_batches`` on the slices that can hold the liver that post-processing keeps.

    The network first sees every ``PROBE_STRIDE``-th slice, then every slice between a probe with a liver
    voxel (probability at the card's threshold) and its neighbouring probes. Slices between two probes
    without liver are left at zero: a liver voxel there could only belong to a piece that reaches no
    probe, so no more than ``PROBE_STRIDE`` − 1 slices thick and not connected to the liver through the
    empty probes, which the largest-component step removes anyway. So with post-processing the label map is
    the same as from the whole pass (tested on every real CT here); without it, run the whole pass. A scan
    whose probes show no liver is run whole. On the CPU the network is most of a run's time, and a
    chest–abdomen CT has liver on a third to a half of its slices.
    """
    depth = volume.shape[0]
    probes = probe_slices(depth)
    if probes is None:
        return predict_in_batches(run_batch, volume, card, batch_size, progress)
    liver_channel = card.channels.index("liver")
    output = predict_in_batches(run_batch, volume, card, batch_size, None, slices=probes)
    showing = probes[output[probes, liver_channel].reshape(len(probes), -1).max(axis=1) >= card.threshold]
    near = np.zeros(depth, bool) if len(showing) else np.ones(depth, bool)  # no probe with liver: every slice
    for probe in showing:
        near[max(probe - PROBE_STRIDE + 1, 0) : probe + PROBE_STRIDE] = True
    near[probes] = False  # already run
    remaining = np.flatnonzero(near)
    if progress is not None:
        progress(len(probes), len(probes) + len(remaining))
    return predict_in_batches(run_batch, volume, card, batch_size, progress, slices=remaining, output=output,
                              done_before=len(probes), total_work=len(probes) + len(remaining))


def predict_probabilities(
    network,
    volume,
    card: ModelCard,
    device,
    batch_size: int | None = None,
    progress: ProgressCallback | None = None,
):
    """Sigmoid probabilities (Z, channels, n, n) on the model grid, float32 numpy, from a torch network.

    CUDA out-of-memory halves the batch and retries; at batch 1 it falls back to the CPU with a
    warning. Returns the device that actually did the work.
    """
    import torch

    device = torch.device(device)
    volume = torch.as_tensor(volume)
    batch_size = batch_size or default_batch_size(device, card)
    total = volume.shape[0]
    network = network.eval()
    volume_on_device = None  # moved inside the loop: the move itself can run out of memory
    output = np.empty((total, len(card.channels), volume.shape[1], volume.shape[2]), dtype=np.float32)
    start = 0
    with torch.inference_mode():
        while start < total:
            try:
                if volume_on_device is None:
                    # Channels-last (NHWC) convolutions: faster on the CPU (benchmarks/README.md), and the
                    # layout tensor cores want under autocast. Converted outside inference mode: parameters
                    # made inside it could not be trained any more (validation runs this on the network
                    # being trained).
                    with torch.inference_mode(False):
                        network = network.to(device, memory_format=torch.channels_last)
                    volume_on_device = volume.to(device)
                indices = np.arange(start, min(start + batch_size, total))
                stacks = slice_stack(volume_on_device, indices, card.context_slices)
                probabilities = _forward(network, stacks.float(), device)
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
            output[start : start + len(indices)] = probabilities.float().cpu().numpy()
            start += len(indices)
            if progress is not None:
                progress(start, total)
    return output, device


Box = tuple[slice, slice, slice]
Threshold = float | Sequence[float]  # one for every channel, or one per channel


def per_channel(threshold: Threshold, channels: int) -> np.ndarray:
    """``threshold`` as a (channels,) float32 array: the lesion channel may have its own (ModelCard)."""
    return np.broadcast_to(np.asarray(threshold, dtype=np.float32), (channels,))


def mask_box(probabilities: np.ndarray, grid: SliceGrid, threshold: Threshold) -> Box:
    """The (slices, rows, cols) box of the slice grid outside which no upsampled probability of
    ``probabilities`` (Z, channels, n, n) reaches its channel's ``threshold``: an empty box when none does.

    Bilinear upsampling is a convex combination, so a slice-grid pixel can reach the threshold only if one
    of the model-grid pixels it is made of (weight above zero) does: the box holds every such pixel."""
    above = probabilities >= per_channel(threshold, probabilities.shape[1])[:, None, None]
    occupied = np.flatnonzero(above.any(axis=(1, 2, 3)))
    if not len(occupied):
        return slice(0, 0), slice(0, 0), slice(0, 0)
    row_weights, col_weights = slice_grid_weights(probabilities.shape[-1], grid)
    in_plane = above[occupied].any(axis=(0, 1))
    box = [slice(int(occupied[0]), int(occupied[-1]) + 1)]
    for weights, reached in ((row_weights, in_plane.any(axis=1)), (col_weights, in_plane.any(axis=0))):
        reachable = np.flatnonzero((weights[:, reached] > 0).any(axis=1))
        box.append(slice(int(reachable[0]), int(reachable[-1]) + 1))
    return tuple(box)


def probabilities_to_box_masks(
    probabilities: np.ndarray, grid: SliceGrid, threshold: Threshold, chunk_slices: int = 16
) -> tuple[Box, np.ndarray]:
    """(Z, channels, n, n) model-grid probabilities → (``mask_box``, (slices, channels, rows, cols) bool
    masks inside it): every voxel of the slice grid that reaches the threshold lies in the box, and the
    masks there equal those of upsampling whole slices.

    Works in chunks so that full-resolution float maps never exist for the whole volume at once, only on
    slices where some probability reaches the threshold (a slice below it everywhere stays empty: a third
    or more of a CT's slices) and only inside the box (the liver's, a fraction of a 512² slice)."""
    box = mask_box(probabilities, grid, threshold)
    depths, rows, cols = box
    thresholds = per_channel(threshold, probabilities.shape[1])
    masks = np.zeros((depths.stop - depths.start, probabilities.shape[1], rows.stop - rows.start, cols.stop - cols.start), dtype=bool)
    occupied = depths.start + np.flatnonzero((probabilities[depths].max(axis=(2, 3)) >= thresholds).any(axis=1))
    for start in range(0, len(occupied), chunk_slices):
        indices = occupied[start : start + chunk_slices]
        masks[indices - depths.start] = to_slice_grid(probabilities[indices], grid, rows, cols) >= thresholds[:, None, None]
    return box, masks


def probabilities_to_masks(
    probabilities: np.ndarray, grid: SliceGrid, threshold: Threshold, chunk_slices: int = 16
) -> np.ndarray:
    """(Z, channels, n, n) model-grid probabilities → (Z, channels, rows, cols) bool masks on the slice grid
    (``probabilities_to_box_masks`` placed into the whole grid)."""
    (depths, rows, cols), boxed = probabilities_to_box_masks(probabilities, grid, threshold, chunk_slices)
    masks = np.zeros((probabilities.shape[0], probabilities.shape[1], grid.rows, grid.cols), dtype=bool)
    masks[depths, :, rows, cols] = boxed
    return masks
