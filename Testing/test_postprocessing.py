"""Post-processing on small arrays with hand-known answers and on a real liver: one liver, no holes,
lesions only inside it, lesion volumes, and ITK's labelling against scipy's."""

from __future__ import annotations

import numpy as np
import pytest

from LiverSegLib.postprocessing import compose_label_map, fill_holes, label_components, largest_component, lesion_volumes_ml


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


def test_any_box_holding_the_organ_gives_the_whole_volume_label_map():
    """The engine cleans up inside the box where the network's output can reach the threshold, which holds
    the organ but may fit it without a rim (pipeline.py): in any such box the label map is the whole
    volume's, with pockets opening onto the box's faces and an organ cut by the volume's edge."""
    generator = np.random.default_rng(4)
    liver = np.zeros((16, 30, 30), bool)
    liver[3:12, 5:25, 0:20] = generator.random((9, 20, 20)) > 0.3  # reaches the edge of the volume
    lesion = np.zeros_like(liver)
    lesion[6:8, 10:13, 10:13] = True
    lesion[14, 28, 28] = True  # a stray lesion voxel: part of the organ's box, not of its largest component
    expected = compose_label_map(liver, lesion)
    for box in [(slice(3, 15), slice(5, 29), slice(0, 29)), (slice(1, 16), slice(2, 30), slice(0, 30))]:
        label = np.zeros(liver.shape, np.uint8)
        label[box] = compose_label_map(liver[box], lesion[box])
        assert np.array_equal(label, expected)


def test_holes_are_filled_in_the_kept_organs_box_as_in_the_whole_volume():
    """Hole filling runs inside the box of the component that is kept, which is smaller than the organ's
    box when islands far from it are removed: the same label map as the steps on the whole volume, with a
    sealed cavity, a tunnel open in 3D and a notch at the side of the kept organ."""
    organ = np.zeros((30, 24, 24), bool)
    organ[2:12, 3:20, 2:22] = True
    organ[6, 8, 8] = False  # sealed cavity
    organ[2:12, 10, 10] = False  # tunnel through every slice
    organ[4:9, 18:20, 12] = False  # notch at the side
    island = np.zeros_like(organ)
    island[24:28, 1:5, 18:23] = True
    island[26, 3, 20] = False  # a cavity in the island: removed with it
    lesion = np.zeros_like(organ)
    lesion[7, 12:14, 12:14] = True
    expected = fill_holes(largest_component(organ | island | lesion)).astype(np.uint8)
    expected[lesion & (expected == 1)] = 2
    label = compose_label_map(organ | island, lesion)
    assert np.array_equal(label, expected)
    assert label[6, 8, 8] == 1 and label[2:12, 10, 10].all() and not label[4:9, 18:20, 12].any() and not label[20:].any()


def test_lesion_volumes_by_hand():
    """Two lesions, one of them two cubes touching only at a corner (26-connected: one lesion)."""
    label = np.zeros((10, 12, 12), np.uint8)
    label[1:9, 1:11, 1:11] = 1
    label[2:4, 2:4, 2:4] = 2  # 8 voxels
    label[4:5, 4:5, 4:5] = 2  # touches the first at a corner: same lesion, 9 voxels
    label[6:8, 7:10, 7:8] = 2  # 6 voxels
    assert sorted(lesion_volumes_ml(label, 0.5)) == [3.0, 4.5]
    assert lesion_volumes_ml(np.zeros((3, 3, 3), np.uint8), 1.0) == []


def _liver_with_two_lesions() -> tuple[np.ndarray, np.ndarray]:
    """A 10³-voxel liver holding a 1-voxel lesion and a 2×2×2 lesion (diagonal neighbours of the small
    one count: lesions are 26-connected)."""
    liver = np.zeros((12, 12, 12), bool)
    liver[1:11, 1:11, 1:11] = True
    lesion = np.zeros_like(liver)
    lesion[3, 3, 3] = True
    lesion[6:8, 6:8, 6:8] = True
    return liver, lesion


@pytest.mark.parametrize(("min_lesion_ml", "kept_voxels"), [(0.0, 9), (0.2, 8), (0.8, 8), (0.9, 0)])
def test_lesions_below_the_minimum_size_become_liver(min_lesion_ml, kept_voxels):
    """At 0.1 mL a voxel, the 1-voxel lesion (0.1 mL) goes below any bar above 0.1 mL and the 8-voxel one
    (0.8 mL) at a bar above 0.8 mL; dropped lesions stay liver, the liver itself is unchanged."""
    liver, lesion = _liver_with_two_lesions()
    label = compose_label_map(liver, lesion, min_lesion_ml=min_lesion_ml, voxel_ml=0.1)
    assert np.count_nonzero(label == 2) == kept_voxels
    assert np.array_equal(label >= 1, liver)
    assert lesion_volumes_ml(label, 0.1) == pytest.approx([0.1, 0.8] if kept_voxels == 9 else [0.8] if kept_voxels else [])


def test_diagonal_lesion_voxels_are_one_component_for_the_size_bar():
    """Two voxels touching only at a corner are one 26-connected lesion of 0.2 mL, kept at a 0.15 mL bar."""
    liver, lesion = _liver_with_two_lesions()
    lesion[4, 4, 4] = True  # corner neighbour of (3, 3, 3)
    label = compose_label_map(liver, lesion, min_lesion_ml=0.15, voxel_ml=0.1)
    assert label[3, 3, 3] == label[4, 4, 4] == 2


def test_no_minimum_size_leaves_the_label_map_as_before():
    liver, lesion = _liver_with_two_lesions()
    assert np.array_equal(compose_label_map(liver, lesion, min_lesion_ml=0.0, voxel_ml=0.1), compose_label_map(liver, lesion))
