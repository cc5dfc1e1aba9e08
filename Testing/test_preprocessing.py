"""Preprocessing and post-processing on small arrays with hand-known answers."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from LiverSegLib.postprocessing import compose_label_map, fill_holes, label_components, largest_component, lesion_volumes_ml
from LiverSegLib.preprocessing import SliceGrid, prepare_label, prepare_volume, slice_stack, to_model_grid, to_slice_grid, window_hu


def test_window_scales_and_clips():
    values = window_hu(torch.tensor([-1000.0, -200.0, 50.0, 300.0, 1500.0]), (-200.0, 300.0))
    assert values.tolist() == [0.0, 0.0, 0.5, 1.0, 1.0]


def test_non_square_slices_are_padded_centred_and_cropped_back():
    slices = torch.arange(8, dtype=torch.float32).reshape(1, 4, 2) + 1
    square = to_model_grid(slices, input_size=4)
    assert square.shape == (1, 4, 4)
    assert torch.equal(square[0, :, 1:3], slices[0]) and square[0, :, [0, 3]].eq(0).all()
    grid = SliceGrid(4, 2)
    assert grid.offset == (0, 1)
    assert torch.equal(to_slice_grid(square[:, None], grid)[:, 0], slices)


def test_resize_keeps_a_constant_and_the_position_of_a_structure():
    volume = np.full((2, 300, 200), 50.0, np.float32)  # HU 50 → 0.5 in the window
    assert torch.allclose(prepare_volume(volume, (-200.0, 300.0), 64)[:, 8:56, 16:48], torch.tensor(0.5))
    label = np.zeros((1, 256, 256), np.uint8)
    label[0, 64:128, 128:192] = 1
    masks = prepare_label(label, 64)
    rows, cols = np.nonzero(masks[0, 0].numpy())
    assert (rows.min(), rows.max(), cols.min(), cols.max()) == (16, 31, 32, 47)
    # Back to the slice grid: the mask lands where it was drawn; bilinear interpolation only rounds
    # off the four corner pixels (0.625² < 0.5).
    back = (to_slice_grid(masks[:, :1].float(), SliceGrid(256, 256))[0, 0] >= 0.5).numpy()
    assert np.count_nonzero(back != (label[0] == 1)) == 4
    assert not back[64, 128] and back[65, 129] and back[64:128, 128:192].sum() == 64 * 64 - 4


def test_lesion_is_part_of_the_liver_channel():
    label = np.zeros((1, 4, 4), np.uint8)
    label[0, 0, 0], label[0, 1, 1] = 1, 2
    masks = prepare_label(label, 4)
    assert masks[0, 0].sum() == 2 and masks[0, 1].sum() == 1 and masks[0, 1, 1, 1] == 1


def test_slice_stack_repeats_edge_slices():
    volume = torch.arange(3, dtype=torch.float32)[:, None, None].expand(3, 2, 2)
    stack = slice_stack(volume, torch.tensor([0, 2]), context_slices=1)
    assert stack[:, :, 0, 0].tolist() == [[0, 0, 1], [1, 2, 2]]


def test_largest_component_and_hole_filling():
    mask = np.zeros((9, 9, 9), bool)
    mask[1:6, 1:6, 1:6] = True
    mask[3, 3, 3] = False  # an enclosed hole
    island = mask.copy()
    island[:] = False
    island[8, 8, 8] = True  # not even diagonally touching the cube
    kept = largest_component(mask | island)
    assert not kept[8, 8, 8] and kept.sum() == 124
    assert fill_holes(kept).sum() == 125


def test_hole_filling_in_3d_and_per_slice_by_hand():
    """A cavity sealed in 3D fills; a tunnel open to the top and bottom (a vessel through the organ) is
    not a 3D hole but is one in every slice it crosses, so it fills too; a notch open at the side stays."""
    mask = np.zeros((7, 9, 9), bool)
    mask[1:6, 1:8, 1:8] = True
    mask[3, 2, 2] = False  # sealed cavity
    mask[:, 4, 4] = False  # tunnel through all slices (open in 3D: it reaches the first and last slice)
    mask[1:6, 6:8, 5] = False  # notch reaching the side in every slice
    mask[0, 4, 4] = mask[6, 4, 4] = False
    filled = fill_holes(mask)
    assert filled[3, 2, 2] and filled[1:6, 4, 4].all()
    assert not filled[1:6, 6:8, 5].any() and not filled[0].any() and not filled[6].any()
    assert filled.sum() == 5 * 7 * 7 - 5 * 2


def test_hole_filling_equals_scipy_slice_by_slice_on_a_real_liver(data_root):
    """Same result as scipy's binary_fill_holes in 3D, then in each slice, on ircad_17's expert liver
    with holes punched in: the single-pass labelling replaces the iterative propagation exactly."""
    from scipy import ndimage

    import SimpleITK as sitk

    from conftest import read_case

    liver = sitk.GetArrayFromImage(read_case(data_root, "ircad_17")[1]) >= 1
    generator = np.random.default_rng(1)
    holed = liver & (generator.random(liver.shape) > 0.02)
    expected = ndimage.binary_fill_holes(holed)
    for index in range(expected.shape[0]):
        expected[index] = ndimage.binary_fill_holes(expected[index])
    assert np.array_equal(fill_holes(holed), expected)



@pytest.mark.parametrize(("fully_connected", "density"), [(True, 0.08), (False, 0.25)])  # below percolation
def test_itk_components_partition_like_scipy_on_a_real_liver(data_root, fully_connected, density):
    """ITK's labelling (used for speed) splits a speckled real liver into exactly the components that
    ``ndimage.label`` finds with the 26- or 6-connected structure: same count, one-to-one labels."""
    from scipy import ndimage

    import SimpleITK as sitk

    from conftest import read_case

    liver = sitk.GetArrayFromImage(read_case(data_root, "ircad_17")[1]) >= 1
    speckled = liver & (np.random.default_rng(2).random(liver.shape) < density)  # thousands of components
    structure = ndimage.generate_binary_structure(3, 3 if fully_connected else 1)
    expected, expected_count = ndimage.label(speckled, structure=structure)
    labels, count = label_components(speckled, fully_connected)
    assert count == expected_count > 1000
    assert np.array_equal(labels > 0, expected > 0)
    pairs = np.unique(np.stack([labels[speckled], expected[speckled]]), axis=1)
    assert pairs.shape[1] == count  # each ITK label maps to one scipy label and back


def test_lesions_only_inside_the_cleaned_liver():
    liver = np.zeros((6, 10, 10), bool)
    liver[1:5, 1:6, 1:6] = True
    lesion = np.zeros_like(liver)
    lesion[2, 2, 2] = True  # inside the liver
    lesion[2, 8, 8] = True  # a separate island: removed with the other islands
    label = compose_label_map(liver & ~lesion, lesion)
    assert label[2, 2, 2] == 2 and label[2, 8, 8] == 0
    assert np.count_nonzero(label == 1) == liver.sum() - 1
    raw = compose_label_map(liver, lesion, keep_largest=False, fill=False)
    assert raw[2, 8, 8] == 2


def test_cropping_to_the_organ_changes_nothing():
    """Post-processing inside the bounding box equals the same steps on the whole volume."""
    from LiverSegLib.postprocessing import bounding_box

    generator = np.random.default_rng(0)
    liver = np.zeros((20, 40, 40), bool)
    liver[5:15, 10:30, 8:33] = generator.random((10, 20, 25)) > 0.25
    liver[0, 0, 0] = liver[19, 39, 39] = False
    lesion = np.zeros_like(liver)
    lesion[8:11, 15:18, 15:18] = True
    organ = liver | lesion
    expected = fill_holes(largest_component(organ)).astype(np.uint8)
    expected[lesion & (expected == 1)] = 2
    assert np.array_equal(compose_label_map(liver, lesion), expected)
    assert bounding_box(organ) == (slice(4, 16), slice(9, 31), slice(7, 34))


def test_masks_from_probabilities_skip_empty_slices_exactly():
    """Slices whose model-grid probabilities stay below the threshold are skipped; the rest equal a
    plain full-volume upsampling, and a slice just under the threshold everywhere stays empty."""
    from LiverSegLib.inference import probabilities_to_masks

    generator = torch.Generator().manual_seed(0)
    probabilities = torch.rand(7, 2, 16, 16, generator=generator)
    probabilities[[1, 4]] *= 0.49 / probabilities[[1, 4]].max()  # under 0.5 everywhere
    grid = SliceGrid(40, 52)
    masks = probabilities_to_masks(probabilities, grid, 0.5, chunk_slices=2)
    assert torch.equal(masks, to_slice_grid(probabilities, grid) >= 0.5)
    assert not masks[[1, 4]].any() and masks[[0, 2, 3, 5, 6]].flatten(1).any(1).all()


def test_lesion_volumes_by_hand():
    """Two lesions, one of them two cubes touching only at a corner (26-connected: one lesion)."""
    label = np.zeros((10, 12, 12), np.uint8)
    label[1:9, 1:11, 1:11] = 1
    label[2:4, 2:4, 2:4] = 2  # 8 voxels
    label[4:5, 4:5, 4:5] = 2  # touches the first at a corner: same lesion, 9 voxels
    label[6:8, 7:10, 7:8] = 2  # 6 voxels
    assert sorted(lesion_volumes_ml(label, 0.5)) == [3.0, 4.5]
    assert lesion_volumes_ml(np.zeros((3, 3, 3), np.uint8), 1.0) == []


def test_chunked_preprocessing_equals_the_whole_volume_at_once(data_root):
    """prepare_volume works in slice chunks to bound memory; every step is per slice, so the chunk size
    must not change a single value (training caches and inference both use it)."""
    import SimpleITK as sitk

    from conftest import read_case

    ct = sitk.GetArrayFromImage(read_case(data_root, "dcmqi_ct3slice")[0])
    ct = np.concatenate([ct] * 5)  # 15 slices: chunks of 4 leave a remainder of 3
    whole = prepare_volume(ct, (-200.0, 300.0), 128, chunk_slices=len(ct))
    assert torch.equal(prepare_volume(ct, (-200.0, 300.0), 128, chunk_slices=4), whole)
    assert whole.shape == (15, 128, 128) and whole.dtype == torch.float32
