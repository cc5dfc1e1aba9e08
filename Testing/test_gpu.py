"""CUDA: the GPU result equals the CPU one, and out-of-memory halves the batch, then falls back to the
CPU, under a memory limit forced with ``torch.cuda.set_per_process_memory_fraction``.

These run only where torch sees a CUDA GPU (the CI machine has none; they are skipped there and run on
a GPU machine with the same command).
"""

from __future__ import annotations

import logging

import numpy as np
import pytest
import SimpleITK as sitk
import torch

from LiverSegLib.geometry import canonical_transform
from LiverSegLib.inference import CUDA_MAX_BATCH, default_batch_size, predict_probabilities
from LiverSegLib.model import load_model
from LiverSegLib.pipeline import LiverSegmenter
from LiverSegLib.preprocessing import prepare_volume

from conftest import read_case

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def _ircad_17(data_root) -> sitk.Image:
    return read_case(data_root, "ircad_17")[0]


def test_cuda_label_map_matches_the_cpu(data_root):
    ct = _ircad_17(data_root)
    on_gpu = LiverSegmenter(device="cuda").segment(ct)
    on_cpu = LiverSegmenter(device="cpu", precision="fp32").segment(ct)  # the same weights as on the GPU, not the int8 graph
    assert on_gpu.device.startswith("cuda") and on_gpu.runtime == "torch"
    gpu = sitk.GetArrayViewFromImage(on_gpu.label_image) >= 1
    cpu = sitk.GetArrayViewFromImage(on_cpu.label_image) >= 1
    # fp16 autocast moves probabilities by ~1e-3: a thin shell of threshold voxels may differ.
    dice = 2 * np.count_nonzero(gpu & cpu) / (np.count_nonzero(gpu) + np.count_nonzero(cpu))
    assert dice > 0.999


@pytest.fixture
def limited_gpu():
    """Sets a per-process memory cap; always lifted afterwards."""
    total = torch.cuda.get_device_properties(0).total_memory

    def limit(allowed_bytes: int) -> None:
        torch.cuda.empty_cache()
        torch.cuda.set_per_process_memory_fraction(min(1.0, allowed_bytes / total), 0)

    yield limit
    torch.cuda.set_per_process_memory_fraction(1.0, 0)
    torch.cuda.empty_cache()


def _volume_and_network(data_root):
    card, network = load_model()
    ct = _ircad_17(data_root)
    canonical = canonical_transform(ct.GetDirection()).to_canonical(sitk.GetArrayViewFromImage(ct))
    return card, network, prepare_volume(canonical, card.window_hu, card.input_size)


def test_out_of_memory_halves_the_batch(data_root, limited_gpu, caplog):
    card, network, volume = _volume_and_network(data_root)
    reference, _ = predict_probabilities(network, volume, card, torch.device("cpu"), batch_size=16)
    # Four copies of the CT (476 slices): one 512-slice batch needs several hundred MB of activations
    # even at 0.5 MB a slice, while 100 MB above the weights and volume hold a batch of 16 even at 6 MB.
    stacked = np.concatenate([volume] * 4)  # the engine's volumes are numpy (preprocessing has no torch)
    network.cuda()
    limited_gpu(torch.cuda.memory_allocated() + stacked.nbytes + 100 * 2**20)
    with caplog.at_level(logging.WARNING, logger="LiverSegLib.inference"):
        probabilities, device = predict_probabilities(network, stacked, card, torch.device("cuda"), batch_size=512)
    assert device.type == "cuda"
    assert "retrying with batch size 256" in caplog.text
    # The first copy, bar its last slice (whose neighbour is now the next copy's first), matches the CPU.
    last = volume.shape[0] - 1
    assert float(np.abs(probabilities[:last] - reference[:last]).max()) < 0.02


def test_out_of_memory_at_batch_one_falls_back_to_the_cpu(data_root, limited_gpu):
    card, network, volume = _volume_and_network(data_root)
    network.cuda()
    limited_gpu(torch.cuda.memory_allocated() + 2**20)  # not even one slice's activations fit
    with pytest.warns(RuntimeWarning, match="falling back to the CPU"):
        probabilities, device = predict_probabilities(network, volume, card, torch.device("cuda"), batch_size=4)
    assert device.type == "cpu" and probabilities.shape[0] == volume.shape[0]


def test_default_cuda_batch_is_the_measured_fastest_when_memory_allows():
    """64 slices (benchmarks/README.md: the fastest batch on an H100), fewer only when the GPU is short."""
    card, _ = load_model()
    free_bytes, _ = torch.cuda.mem_get_info()
    batch = default_batch_size(torch.device("cuda"), card)
    assert 1 <= batch <= CUDA_MAX_BATCH
    if free_bytes > 8 * 2**30:  # far more than 64 slices need (peak memory by batch: benchmarks/README.md)
        assert batch == CUDA_MAX_BATCH


def test_augmentation_on_the_gpu_is_the_cpu_geometry_with_seeded_noise(data_root):
    """Training augments where the network runs (``train.train_steps``): on the GPU the same resampling as
    on the CPU for the same generator, and per-pixel noise that comes from the seed alone."""
    from LiverSegLib.preprocessing import prepare_label, slice_stack
    from LiverSegTraining.augment import AugmentConfig, augment_batch

    ct, label = read_case(data_root, "ircad_17")
    window_hu = (-200.0, 300.0)
    volume = torch.from_numpy(prepare_volume(sitk.GetArrayFromImage(ct), window_hu, 128)).float()
    masks = torch.from_numpy(prepare_label(sitk.GetArrayFromImage(label), 128)).float()
    liver_slices = torch.nonzero(masks[:, 0].flatten(1).any(1)).flatten()[::8][:8].tolist()
    images, masks = slice_stack(volume, liver_slices, 1).float(), masks[liver_slices]
    quiet = AugmentConfig(noise_std=0.0, fov_probability=0.5)
    on_cpu = augment_batch(images, masks, quiet, torch.Generator().manual_seed(1), window_hu)
    on_gpu = augment_batch(images.cuda(), masks.cuda(), quiet, torch.Generator().manual_seed(1), window_hu)
    assert torch.allclose(on_cpu[0], on_gpu[0].cpu(), atol=1e-3)
    assert (on_cpu[1] == on_gpu[1].cpu()).float().mean() > 0.999  # a pixel right at one half may round either way

    # no geometry, flips or intensity changes: what is left is the two noises (10 HU in the 500 HU window
    # is 0.02, the fixed noise 0.02: together a std of 0.028 where nothing clips)
    noisy = AugmentConfig(probability=0.0, crop_probability=0.0, flip_z_probability=0.0, contrast=(1.0, 1.0), brightness=0.0,
                          gamma=(1.0, 1.0), noise_std=0.02, noise_hu=(10.0, 10.0))
    first = augment_batch(images.cuda(), masks.cuda(), noisy, torch.Generator().manual_seed(2), window_hu)[0]
    again = augment_batch(images.cuda(), masks.cuda(), noisy, torch.Generator().manual_seed(2), window_hu)[0]
    other = augment_batch(images.cuda(), masks.cuda(), noisy, torch.Generator().manual_seed(3), window_hu)[0]
    assert torch.equal(first, again) and not torch.equal(first, other)
    clean = images.cuda()
    difference = (first - clean)[(clean > 0.2) & (clean < 0.8)]
    assert 0.025 < float(difference.std()) < 0.031
