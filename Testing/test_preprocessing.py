"""Preprocessing (numpy): windowing, padding and resizing to the model grid and back, with hand-known
answers, and the same values as torch's resizing (which trained the bundled model) on real CT."""

from __future__ import annotations

import numpy as np
import pytest
import SimpleITK as sitk

from LiverSegLib.geometry import canonical_transform
from LiverSegLib.preprocessing import (
    SliceGrid,
    prepare_label,
    prepare_volume,
    resize_weights,
    slice_stack,
    to_model_grid,
    to_slice_grid,
    window_hu,
)

from conftest import read_case


def test_window_scales_and_clips():
    values = window_hu(np.array([-1000.0, -200.0, 50.0, 300.0, 1500.0]), (-200.0, 300.0))
    assert values.tolist() == [0.0, 0.0, 0.5, 1.0, 1.0] and values.dtype == np.float32


def test_resize_weights_by_hand():
    # Shrinking 4 → 2 with antialiasing: output pixel 0 is centred at input position 1.0 with a triangle
    # twice as wide, over pixels 0, 1, 2 at 0.25, 0.25, 0.75 of its half-width: weights 3/7, 3/7, 1/7.
    assert np.allclose(resize_weights(4, 2, antialias=True), [[3 / 7, 3 / 7, 1 / 7, 0], [0, 1 / 7, 3 / 7, 3 / 7]])
    # Growing 2 → 4 bilinearly, half-pixel centres: sources at −0.25 (clamped to 0), 0.25, 0.75, 1.25 (clamped to 1).
    assert np.allclose(resize_weights(2, 4, antialias=False), [[1, 0], [0.75, 0.25], [0.25, 0.75], [0, 1]])
    assert np.allclose(resize_weights(5, 5, antialias=True), np.eye(5))
    assert np.allclose(resize_weights(5, 5, antialias=False), np.eye(5))


def test_non_square_slices_are_padded_centred_and_cropped_back():
    slices = np.arange(8, dtype=np.float32).reshape(1, 4, 2) + 1
    square = to_model_grid(slices, input_size=4)
    assert square.shape == (1, 4, 4)
    assert np.array_equal(square[0, :, 1:3], slices[0]) and (square[0][:, [0, 3]] == 0).all()
    grid = SliceGrid(4, 2)
    assert grid.offset == (0, 1)
    assert np.array_equal(to_slice_grid(square[:, None], grid)[:, 0], slices)


def test_resize_keeps_a_constant_and_the_position_of_a_structure():
    volume = np.full((2, 300, 200), 50.0, np.float32)  # HU 50 → 0.5 in the window
    assert np.allclose(prepare_volume(volume, (-200.0, 300.0), 64)[:, 8:56, 16:48], 0.5)
    label = np.zeros((1, 256, 256), np.uint8)
    label[0, 64:128, 128:192] = 1
    masks = prepare_label(label, 64)
    rows, cols = np.nonzero(masks[0, 0])
    assert (rows.min(), rows.max(), cols.min(), cols.max()) == (16, 31, 32, 47)
    # Back to the slice grid: the mask lands where it was drawn; bilinear interpolation only rounds
    # off the four corner pixels (0.625² < 0.5).
    back = to_slice_grid(masks[:, :1].astype(np.float32), SliceGrid(256, 256))[0, 0] >= 0.5
    assert np.count_nonzero(back != (label[0] == 1)) == 4
    assert not back[64, 128] and back[65, 129] and back[64:128, 128:192].sum() == 64 * 64 - 4


def test_lesion_is_part_of_the_liver_channel():
    label = np.zeros((1, 4, 4), np.uint8)
    label[0, 0, 0], label[0, 1, 1] = 1, 2
    masks = prepare_label(label, 4)
    assert masks[0, 0].sum() == 2 and masks[0, 1].sum() == 1 and masks[0, 1, 1, 1] == 1


def test_slice_stack_repeats_edge_slices():
    volume = np.broadcast_to(np.arange(3, dtype=np.float32)[:, None, None], (3, 2, 2))
    stack = slice_stack(volume, [0, 2], context_slices=1)
    assert stack[:, :, 0, 0].tolist() == [[0, 0, 1], [1, 2, 2]]


@pytest.mark.parametrize("case", ["ircad_01", "totalseg_example_sm_MODEL"])
def test_same_values_as_torch_resizing_on_real_ct(data_root, case):
    """The bundled model was trained on torch's antialiased bilinear resizing; the numpy engine gives the
    same model input (to 2e-5 of the [0, 1] range), the same training masks but for rare ties at one half,
    and the same upsampled probabilities. 512² → 192 shrinks; 122×101 → 192 grows."""
    import torch

    functional = torch.nn.functional
    ct, label = read_case(data_root, case)
    transform = canonical_transform(ct.GetDirection())
    canonical = transform.to_canonical(sitk.GetArrayViewFromImage(ct)).astype(np.float32)
    grid = SliceGrid(canonical.shape[1], canonical.shape[2])
    top, left = grid.offset
    padding = (left, grid.side - grid.cols - left, top, grid.side - grid.rows - top)

    windowed = torch.from_numpy(np.clip((canonical + 200) / 500, 0, 1))
    padded = functional.pad(windowed[:, None], padding)
    expected = functional.interpolate(padded, size=(192, 192), mode="bilinear", antialias=True, align_corners=False)[:, 0].numpy()
    assert np.abs(prepare_volume(canonical, (-200.0, 300.0), 192) - expected).max() < 2e-5

    probabilities = np.random.default_rng(0).random((4, 2, 192, 192), dtype=np.float32)
    up = functional.interpolate(torch.from_numpy(probabilities), size=(grid.side, grid.side), mode="bilinear", align_corners=False)
    expected_back = up[..., top : top + grid.rows, left : left + grid.cols].numpy()
    assert np.abs(to_slice_grid(probabilities, grid) - expected_back).max() < 2e-5

    labels = transform.to_canonical(sitk.GetArrayViewFromImage(label))
    masks = torch.from_numpy(np.stack([labels >= 1, labels == 2], axis=1).astype(np.float32))
    expected_masks = functional.interpolate(functional.pad(masks, padding), size=(192, 192), mode="bilinear", antialias=True,
                                            align_corners=False) >= 0.5
    assert np.count_nonzero(prepare_label(labels, 192) != expected_masks.numpy()) <= 1e-5 * expected_masks.numel()


def test_chunked_preprocessing_equals_the_whole_volume_at_once(data_root):
    """prepare_volume works in slice chunks to bound memory; every step is per slice, so the chunk size
    changes no value by more than float32 rounding (training caches and inference both use it). Not bit for
    bit: OpenBLAS on an AVX2 CPU sums the smaller matrix products in another order (one step of 1.2e-7 on a
    few per cent of the pixels, 2026-11-30), on an AVX-512 one it did not."""
    ct = sitk.GetArrayFromImage(read_case(data_root, "dcmqi_ct3slice")[0])
    ct = np.concatenate([ct] * 5)  # 15 slices: chunks of 4 leave a remainder of 3
    whole = prepare_volume(ct, (-200.0, 300.0), 128, chunk_slices=len(ct))
    rounding = 2 * np.spacing(np.float32(1.0))  # values lie in [0, 1]
    for chunk_slices in (1, 4):
        assert np.abs(prepare_volume(ct, (-200.0, 300.0), 128, chunk_slices=chunk_slices) - whole).max() <= rounding
    assert whole.shape == (15, 128, 128) and whole.dtype == np.float32
